//! `cargo xtask soak`: the soak of `tests::soak` at the given length and share, its plot
//! written as a PNG and its summary printed, and (with `--write`) both put in BENCHMARKS.md.
//! Exits non-zero when a bound did not hold.

use anyhow::Context as _;
use std::time::Duration;
use tests::soak::{self, SoakOpts};

fn main() -> anyhow::Result<()> {
    let mut o = SoakOpts::default();
    let mut write: Option<String> = None;
    let mut png = std::path::PathBuf::from("target/soak.png");
    let mut command = String::from("cargo xtask soak");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> anyhow::Result<f64> {
            args.next().context("a number")?.parse().context("a number")
        };
        match a.as_str() {
            "--minutes" => {
                let m = num()?;
                o.duration = Duration::from_secs_f64(m * 60.0);
                command = format!("cargo xtask soak --minutes {m}");
            }
            "--share" => o.share = num()?.clamp(0.05, 1.0),
            "--warmup" => o.warmup = Duration::from_secs_f64(num()?),
            "--churn" => o.churn = num()?.max(1.0) as u32,
            "--png" => png = args.next().context("a path")?.into(),
            "--write" => write = args.next(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the soak needs root (a network namespace and eBPF)");
    }
    let s = soak::run(&o)?;
    soak::plot(&s, &png).context("drawing the plot")?;
    let text = soak::summary(&s, &command);
    println!("{text}\nplot: {}", png.display());
    if let Some(path) = write {
        let bench = std::path::Path::new(&path);
        let image = bench
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("docs/soak.png");
        std::fs::create_dir_all(image.parent().context("docs")?)?;
        std::fs::copy(&png, &image).context("copying the plot")?;
        let block = format!("{text}\n![the soak, second by second](docs/soak.png)\n\n");
        tests::splice_markdown(&path, "soak", "Soak (`cargo xtask soak`)", &block)?;
        eprintln!("written to {path} and {}", image.display());
    }
    anyhow::ensure!(s.passed(), "the soak failed a bound (see the table)");
    Ok(())
}
