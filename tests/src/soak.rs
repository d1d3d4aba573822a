//! The soak: minutes or hours of traffic at a share of the measured maximum, behind a real
//! FreeRADIUS, while new flows and new dynamic clients keep coming; the sidecar sampled every
//! second (throughput, p50/p99, RSS, open descriptors, flows, dedup entries) and judged
//! against stated bounds; drawn as a PNG. `cargo xtask soak` runs it (`src/bin/soak.rs`) and
//! writes its summary into BENCHMARKS.md; `cargo xtask test` runs one minute of it
//! (`tests/soak.rs`).
//!
//! In a private namespace (loopback only): 16 NASes (127.0.2.x) send at the target rate,
//! each on one flow; a churn NAS asks once from a new address and port every 1/`churn` s,
//! cycling over 2 000 addresses of a dynamic prefix (127.3.0.0/16, a file directory), so
//! that every ask makes a new flow and, once the address's definition has expired, a new
//! definition. The sidecar's flows end after 10 s idle and definitions live 20 s: after the
//! warm-up, flows, definitions and caches are in a steady state, and what still grows is a
//! leak.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use radius_sidecar::codec::{Code, Packet, auth};

use crate::{
    FreeRadius, NetNs,
    loadgen::{self, LoadResult, LoadSpec},
    metric, pap_request, sidecar_with_config,
};

const NAS_SECRET: &str = "soak-nas-secret";
const UP_SECRET: &str = "soak-upstream-secret";
const FR_PORT: u16 = 11812;
const METRICS: &str = "127.0.0.1:9812";
/// Addresses the churn NAS cycles over (each defined anew once its definition expired).
const CHURN_ADDRESSES: u32 = 2_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakOpts {
    pub duration: Duration,
    /// The share of the measured maximum to hold.
    pub share: f64,
    /// Samples before this are not judged (flows, definitions and caches fill up).
    pub warmup: Duration,
    /// New flows (and, through them, new definitions) per second.
    pub churn: u32,
}

impl Default for SoakOpts {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            share: 0.8,
            warmup: Duration::from_secs(30),
            churn: 20,
        }
    }
}

/// The sidecar as seen once a second.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub second: usize,
    pub rss_kib: u64,
    pub fds: u64,
    pub flows: u64,
    pub dedup: u64,
    pub definitions: u64,
}

/// What the churn NAS saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Churn {
    pub asked: u64,
    pub answered: u64,
    pub lost: u64,
}

/// A finished soak.
#[derive(Debug)]
pub struct Soak {
    pub opts: SoakOpts,
    /// Requests/s the calibration run reached (closed loop, 64 outstanding).
    pub max_rate: f64,
    pub target_rate: f64,
    pub load: LoadResult,
    pub churn: Churn,
    pub samples: Vec<Sample>,
    /// Each bound, what it allowed and what was measured, and whether it held.
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub what: &'static str,
    pub bound: String,
    pub measured: String,
    pub held: bool,
}

impl Soak {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.held)
    }
}

/// Runs a soak (root: a namespace and the fast path).
pub fn run(opts: &SoakOpts) -> anyhow::Result<Soak> {
    let ns = NetNs::new("soak");
    let _fr = FreeRadius::start_on(
        &ns,
        &[("127.0.0.1", UP_SECRET)],
        "soak Cleartext-Password := \"soak-pw\"\n",
        FR_PORT,
    );
    let dir = std::env::temp_dir().join(format!("rs-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("the soak's directory")?;
    let nas_file = dir.join("nas.toml");
    std::fs::write(
        &nas_file,
        format!("[[client]]\nprefix = \"127.3.0.0/16\"\nsecret = \"{NAS_SECRET}\"\n"),
    )
    .context("the directory file")?;
    let d = sidecar_with_config(
        &ns,
        "soak",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 2
iface = "lo"
ebpf = "require"
metrics = "{METRICS}"
idle_timeout = 10

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"

[dynamic]
prefixes = ["127.3.0.0/16"]
directory = "file"
file = "{}"
lifetime = 20
"#,
            nas_file.display()
        ),
    );
    let pid = d.child.id();
    let spec = |seconds: Duration, outstanding: usize, rate: Option<f64>| LoadSpec {
        target: "127.0.0.1:1812".parse().expect("an address"),
        sources: (1..=16)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
            .collect(),
        sockets_per_source: 1,
        outstanding,
        duration: seconds,
        max_requests: u64::MAX,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "soak".into(),
        password: "soak-pw".into(),
        timeout: Duration::from_secs(3),
        message_authenticator: true,
        rate,
    };
    let calibration = spec(Duration::from_secs(5), 64, None);
    let max_rate = ns.run(move || loadgen::run(&calibration))?.rate();
    let target_rate = max_rate * opts.share;
    eprintln!(
        "soak: maximum {max_rate:.0} req/s; holding {target_rate:.0} req/s for {:?}",
        opts.duration
    );
    let soak = spec(opts.duration, 256, Some(target_rate));
    let (load, churn, samples) = std::thread::scope(|scope| {
        let ns = &ns;
        let load = scope.spawn(move || ns.run(move || loadgen::run(&soak)));
        let (duration, per_second) = (opts.duration, opts.churn.max(1));
        let churn = scope.spawn(move || ns.run(move || churn_nas(duration, per_second)));
        let start = Instant::now();
        let mut samples = Vec::new();
        while !load.is_finished() {
            let second = samples.len() + 1;
            let next = start + Duration::from_secs(second as u64);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            samples.push(sample(ns, pid, second));
        }
        let load = load.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        let churn = churn
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (load, churn, samples)
    });
    let load = load?;
    let _ = std::fs::remove_dir_all(&dir);
    drop(d);
    let mut s = Soak {
        opts: opts.clone(),
        max_rate,
        target_rate,
        load,
        churn,
        samples,
        checks: Vec::new(),
    };
    s.checks = judge(&s);
    Ok(s)
}

/// The sidecar's process and metrics at `second`.
fn sample(ns: &NetNs, pid: u32, second: usize) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let m = |s: &str| metric(ns, METRICS, s);
    Sample {
        second,
        rss_kib,
        fds,
        flows: m("radius_flows_active"),
        dedup: m("radius_dedup_entries"),
        definitions: m("radius_dynamic_definitions_total{reason=\"defined\"}"),
    }
}

/// A NAS that asks once from a new address and port, `per_second` times a second, for
/// `duration`: a new flow each time, and a new definition whenever the address's last one
/// expired. Waits for each answer (3 s).
fn churn_nas(duration: Duration, per_second: u32) -> Churn {
    let mut c = Churn::default();
    let start = Instant::now();
    let gap = Duration::from_secs(1) / per_second;
    while start.elapsed() < duration {
        let n = (c.asked as u32) % CHURN_ADDRESSES;
        let ip = Ipv4Addr::new(127, 3, (n / 250) as u8, (n % 250 + 1) as u8);
        c.asked += 1;
        let Ok(s) = UdpSocket::bind((ip, 0)) else {
            c.lost += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let (req, a) = pap_request(1, "soak", "soak-pw", NAS_SECRET, &[]);
        let _ = s.send_to(&req, "127.0.0.1:1812");
        let mut b = [0u8; 4096];
        match s.recv(&mut b) {
            Ok(len)
                if Packet::parse(&b[..len]).is_ok_and(|p| {
                    p.code() == Code::AccessAccept
                        && auth::verify(&p, NAS_SECRET.as_bytes(), Some(&a)).is_ok()
                }) =>
            {
                c.answered += 1
            }
            _ => c.lost += 1,
        }
        let next = start + gap * (c.asked as u32);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bounds: nothing lost; the rate held; after the warm-up, the last quarter of the run
/// against its first quarter: RSS at most 10 % + 8 MiB more, descriptors at most 64 more,
/// dedup entries at most 50 % + 1 000 more, the median p99 at most twice + 2 ms.
fn judge(s: &Soak) -> Vec<Check> {
    let mut checks = Vec::new();
    let l = &s.load;
    checks.push(Check {
        what: "nothing lost (load)",
        bound: "0 lost, 0 bad".into(),
        measured: format!("{} answered, {} lost, {} bad", l.answered, l.lost, l.bad),
        held: l.lost == 0 && l.bad == 0 && l.answered > 0,
    });
    checks.push(Check {
        what: "nothing lost (new flows and definitions)",
        bound: "0 lost".into(),
        measured: format!("{} asked, {} lost", s.churn.asked, s.churn.lost),
        held: s.churn.lost == 0 && s.churn.answered > 0,
    });
    let rate = l.rate();
    checks.push(Check {
        what: "rate held",
        bound: format!("at least 95 % of {:.0} req/s", s.target_rate),
        measured: format!("{rate:.0} req/s"),
        held: rate >= 0.95 * s.target_rate,
    });
    let warm = s.opts.warmup.as_secs() as usize;
    let judged: Vec<&Sample> = s.samples.iter().filter(|x| x.second > warm).collect();
    let q = (judged.len() / 4).max(1);
    let (first, last) = (
        &judged[..q.min(judged.len())],
        &judged[judged.len().saturating_sub(q)..],
    );
    let max = |v: &[&Sample], f: fn(&Sample) -> u64| v.iter().map(|x| f(x)).max().unwrap_or(0);
    let (rss0, rss1) = (max(first, |x| x.rss_kib), max(last, |x| x.rss_kib));
    let rss_bound = rss0 + rss0 / 10 + 8 * 1024;
    checks.push(Check {
        what: "RSS after warm-up",
        bound: format!(
            "last quarter <= {:.1} MiB (first quarter + 10 % + 8 MiB)",
            rss_bound as f64 / 1024.0
        ),
        measured: format!(
            "{:.1} -> {:.1} MiB",
            rss0 as f64 / 1024.0,
            rss1 as f64 / 1024.0
        ),
        held: rss1 <= rss_bound && rss0 > 0,
    });
    let (fd0, fd1) = (max(first, |x| x.fds), max(last, |x| x.fds));
    checks.push(Check {
        what: "open descriptors after warm-up",
        bound: format!("last quarter <= {} (first quarter + 64)", fd0 + 64),
        measured: format!("{fd0} -> {fd1}"),
        held: fd1 <= fd0 + 64 && fd0 > 0,
    });
    let (dd0, dd1) = (max(first, |x| x.dedup), max(last, |x| x.dedup));
    checks.push(Check {
        what: "dedup entries after warm-up",
        bound: format!(
            "last quarter <= {} (first quarter + 50 % + 1 000)",
            dd0 + dd0 / 2 + 1000
        ),
        measured: format!("{dd0} -> {dd1}"),
        held: dd1 <= dd0 + dd0 / 2 + 1000,
    });
    let p99 = |v: &[&Sample]| {
        median(
            v.iter()
                .filter_map(|x| l.per_second_latency.get(x.second.saturating_sub(1)))
                .map(|&(_, p99)| f64::from(p99) / 1000.0)
                .collect(),
        )
    };
    let (p0, p1) = (p99(first), p99(last));
    checks.push(Check {
        what: "p99 drift",
        bound: format!(
            "last quarter's median p99 <= {:.2} ms (twice the first's + 2 ms)",
            2.0 * p0 + 2.0
        ),
        measured: format!("{p0:.2} -> {p1:.2} ms"),
        held: p1 <= 2.0 * p0 + 2.0,
    });
    checks
}

/// The summary, in Markdown: the run, then each bound.
pub fn summary(s: &Soak, command: &str) -> String {
    let l = &s.load;
    let mut t = format!(
        "`{command}`: {:.0} s behind FreeRADIUS 3.2.1, fast path, 2 workers; {:.0} req/s \
         held ({:.0} % of the {:.0} req/s measured first), p50 {:.2} ms, p99 {:.2} ms; {} new \
         flows and {} new definitions ({} a second) meanwhile; {}.\n\n\
         | bound | allowed | measured | held |\n| --- | --- | --- | --- |\n",
        l.elapsed.as_secs_f64(),
        l.rate(),
        100.0 * s.opts.share,
        s.max_rate,
        l.latency_ms(0.5),
        l.latency_ms(0.99),
        s.churn.asked,
        s.samples.last().map_or(0, |x| x.definitions),
        s.opts.churn,
        if s.passed() { "passed" } else { "FAILED" },
    );
    for c in &s.checks {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |",
            c.what,
            c.bound,
            c.measured,
            if c.held { "yes" } else { "**no**" }
        );
    }
    t
}

/// Draws the run: requests/s, p50 and p99, RSS, descriptors, flows and dedup entries, each
/// against seconds, in one PNG. Text is drawn with the DejaVu Sans font (Debian's
/// fonts-dejavu-core).
pub fn plot(s: &Soak, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    static FONT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if FONT.get().is_none() {
        let bytes = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
            .context("DejaVu Sans (package fonts-dejavu-core)")?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| anyhow::anyhow!("the font does not load"))?;
        let _ = FONT.set(());
    }
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 3));
    let secs = s.samples.len().max(1) as f64;
    let l = &s.load;
    let series: [(&str, Vec<Line>); 6] = [
        (
            "requests/s",
            vec![
                l.per_second
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| (i as f64, n as f64))
                    .collect(),
            ],
        ),
        (
            "p50 and p99 (ms)",
            vec![
                l.per_second_latency
                    .iter()
                    .enumerate()
                    .map(|(i, &(p50, _))| (i as f64, f64::from(p50) / 1000.0))
                    .collect(),
                l.per_second_latency
                    .iter()
                    .enumerate()
                    .map(|(i, &(_, p99))| (i as f64, f64::from(p99) / 1000.0))
                    .collect(),
            ],
        ),
        ("RSS (MiB)", vec![of(s, |x| x.rss_kib as f64 / 1024.0)]),
        ("open descriptors", vec![of(s, |x| x.fds as f64)]),
        ("flows", vec![of(s, |x| x.flows as f64)]),
        ("dedup entries", vec![of(s, |x| x.dedup as f64)]),
    ];
    for (area, (title, lines)) in panels.iter().zip(series) {
        let top = lines
            .iter()
            .flatten()
            .map(|p| p.1)
            .fold(0.0_f64, f64::max)
            .max(1.0)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..secs, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 13))
            .draw()?;
        for (k, line) in lines.into_iter().enumerate() {
            let color = if k == 0 { BLUE } else { RED };
            chart.draw_series(LineSeries::new(line, &color))?;
        }
        // The warm-up, not judged, ends here.
        let w = s.opts.warmup.as_secs_f64();
        chart.draw_series(LineSeries::new([(w, 0.0), (w, top)], &BLACK.mix(0.3)))?;
    }
    root.present()?;
    Ok(())
}

/// One line of a panel: (second, value) points.
type Line = Vec<(f64, f64)>;

fn of(s: &Soak, f: fn(&Sample) -> f64) -> Line {
    s.samples.iter().map(|x| (x.second as f64, f(x))).collect()
}
