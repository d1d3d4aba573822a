//! One minute of the soak (`tests::soak`; `cargo xtask soak` runs ten): 80 % of the measured
//! maximum behind a real FreeRADIUS with new flows and dynamic clients coming all the time;
//! nothing lost, and RSS, descriptors, dedup entries and p99 within their bounds after a
//! 20 s warm-up.

use std::time::Duration;

use tests::{
    require_root,
    soak::{self, SoakOpts},
};

#[test]
fn a_one_minute_soak_loses_nothing_and_holds_its_bounds() {
    if !require_root("soak") {
        return;
    }
    let s = soak::run(&SoakOpts {
        duration: Duration::from_secs(60),
        warmup: Duration::from_secs(20),
        ..SoakOpts::default()
    })
    .expect("the soak ran");
    let png = std::env::temp_dir().join(format!("rs-soak-{}.png", std::process::id()));
    soak::plot(&s, &png).expect("the plot is drawn");
    let size = std::fs::metadata(&png).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&png);
    println!("{}", soak::summary(&s, "one minute, in cargo xtask test"));
    assert!(size > 10_000, "a PNG of {size} bytes");
    assert!(s.samples.len() >= 55, "{} samples", s.samples.len());
    let failed: Vec<String> = s
        .checks
        .iter()
        .filter(|c| !c.held)
        .map(|c| format!("{}: {} allowed, {} measured", c.what, c.bound, c.measured))
        .collect();
    assert!(failed.is_empty(), "bounds that did not hold: {failed:#?}");
}
