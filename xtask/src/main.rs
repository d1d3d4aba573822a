//! `cargo xtask`: the project's tasks. It drives tools (rustup, cargo, apt) and holds no
//! product logic.
//!
//! - `setup`: nightly `rust-src` and the pinned `bpf-linker` (each skipped when present);
//!   with `--test-deps`, the Debian packages the tests use.
//! - `build`: the eBPF object (through radius-userspace's build.rs), then the daemon.
//! - `run`: setup + build, then the daemon with the given flags.
//! - `test`: setup (with test deps) + fmt + clippy + every test, from one release build
//!   (and a check that the fuzz targets still build).
//! - `demo`: the newcomer's tour (FreeRADIUS, the sidecar, NASes in namespaces).
//! - `bench steer` / `bench codec` / `bench proxy`: benchmarks; their tables go into
//!   BENCHMARKS.md.
//! - `soak`: the soak (`tests::soak`) for `--minutes`; its plot and summary go into
//!   BENCHMARKS.md.
//! - `fuzz`: every cargo-fuzz target of `radius-userspace/fuzz` for a given time each; the
//!   corpora stay in the repository (minimized after the run), and the executions per
//!   target go into BENCHMARKS.md.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker that works with the nightly's LLVM here (see shared ebpf-toolchain notes).
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the tests need: ip, setpriv, and the real RADIUS peers (FreeRADIUS,
/// radclient, eapol_test, PostgreSQL for the shared directory; ssl-cert gives FreeRADIUS's
/// EAP module its snakeoil certificate).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "freeradius",
    "freeradius-utils",
    "eapoltest",
    "postgresql",
    "ssl-cert",
    "ca-certificates",
    // A real NAT in front of a NAS (the CoA test).
    "nftables",
    // A RadSec peer, and a TLS client with bad certificates (the TLS tests).
    "radsecproxy",
    // A real scraper of the metrics endpoint (tests/tests/http_e2e.rs).
    "prometheus",
    "openssl",
    // The soak's plot draws its text with DejaVu Sans.
    "fonts-dejavu-core",
    // `systemd-analyze verify` of the unit (tests/tests/service.rs).
    "systemd",
];
/// What `bench proxy` adds: the peer proxy it compares with, and `ss` (iproute2).
const BENCH_PACKAGES: &[&str] = &["radsecproxy"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building needs (idempotent).
    Setup {
        /// Also install the Debian packages the tests use (needs root).
        #[arg(long)]
        test_deps: bool,
    },
    /// Build the eBPF object and the daemon (release).
    Build,
    /// Build the Debian package (cargo-deb): the daemon, its unit, the default configuration
    /// as a conffile, the man page and shell completions; prints its path.
    Deb,
    /// Build and run the daemon; flags after `--` go to radius-sidecar.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, lint and run every test from one release build.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after its `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The newcomer's tour: FreeRADIUS, the sidecar and NASes in namespaces (root).
    Demo,
    /// Run a benchmark: `steer`, `codec` or `proxy`.
    Bench {
        which: String,
        /// Flow counts to measure (steer).
        #[arg(long, value_delimiter = ',', default_value = "10,1000,15000")]
        flows: Vec<usize>,
        /// Extra arguments for the benchmark binary (proxy: --seconds, --rounds,
        /// --outstanding, --sources, --only, --workers, --baseline PATH; and
        /// --baseline-rev REV, which builds that git revision's daemon to compare with).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
    /// Soak the sidecar behind FreeRADIUS at a share of its maximum, with churn; fails when
    /// something was lost or grew (root).
    Soak {
        /// Length of the run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Share of the measured maximum to hold.
        #[arg(long, default_value_t = 0.8)]
        share: f64,
        /// Leave BENCHMARKS.md alone.
        #[arg(long)]
        no_write: bool,
    },
    /// Run every fuzz target (cargo-fuzz, nightly) for `--seconds` each, `--jobs` at a time;
    /// fails on a crash.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only the targets whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// Targets fuzzed at once (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Leave BENCHMARKS.md alone.
        #[arg(long)]
        no_write: bool,
    },
}

/// The fuzz targets, and the longest input each is given (a configuration or dictionary
/// file need not be long to reach every branch, and short entries keep the corpus small).
const FUZZ_TARGETS: &[(&str, usize)] = &[
    ("parse", 4096),
    ("edit_resign", 4096),
    ("config", 1024),
    ("dictionary", 1024),
    ("engine", 1024),
];

/// Runs the fuzz targets, `jobs` at a time (each libFuzzer process is one thread); returns
/// (target, executions, seconds) in the targets' order.
fn fuzz(seconds: u64, only: Option<&str>, jobs: usize) -> anyhow::Result<Vec<(String, u64, u64)>> {
    setup(false)?;
    if !output(Command::new("cargo").args(["fuzz", "--version"])).contains("cargo-fuzz") {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root().join("radius-userspace");
    let targets: Vec<(&str, usize)> = FUZZ_TARGETS
        .iter()
        .copied()
        .filter(|(t, _)| only.is_none_or(|o| t.contains(o)))
        .collect();
    // Built once, before the runs, so that they do not build side by side.
    run(Command::new("cargo")
        .current_dir(&dir)
        .env("RADIUS_EBPF_STUB", "1")
        .args(["+nightly", "fuzz", "build"]))?;
    let next = std::sync::Mutex::new(targets.iter());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let Some(&(target, max_len)) = next.lock().ok().and_then(|mut i| i.next())
                    else {
                        return;
                    };
                    let r = fuzz_one(&dir, target, max_len, seconds);
                    if let Ok(mut v) = results.lock() {
                        v.push((target, r));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(t, _)| targets.iter().position(|(n, _)| n == t));
    let mut counts = Vec::new();
    for (target, r) in results {
        let runs = r?;
        counts.push((target.to_owned(), runs, seconds));
        // Keep the corpus what covers the target, not everything it tried.
        run(Command::new("cargo")
            .current_dir(&dir)
            .env("RADIUS_EBPF_STUB", "1")
            .args(["+nightly", "fuzz", "cmin", target]))?;
    }
    Ok(counts)
}

/// One target for `seconds`: its executions, or why it failed.
fn fuzz_one(dir: &Path, target: &str, max_len: usize, seconds: u64) -> anyhow::Result<u64> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .env("RADIUS_EBPF_STUB", "1")
        .args(["+nightly", "fuzz", "run", target])
        .arg(format!("fuzz/corpus/{target}"));
    // Inputs a target once failed on are replayed first on every run; cmin never
    // minimises them away, as it could in the corpus.
    let regressions = format!("fuzz/regressions/{target}");
    if dir.join(&regressions).is_dir() {
        cmd.arg(regressions);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        .arg("-print_final_stats=1");
    eprintln!("xtask: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("starting the {target} fuzzer"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{text}");
        bail!("fuzz target {target} failed (its input is in radius-userspace/fuzz/artifacts)");
    }
    let runs = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .with_context(|| format!("no execution count from the {target} fuzzer"))?;
    eprintln!("xtask: {target}: {runs} executions in {seconds} s, no failure");
    Ok(runs)
}

/// The fuzz table for BENCHMARKS.md, between its markers.
fn write_fuzz_table(
    counts: &[(String, u64, u64)],
    seconds: u64,
    jobs: usize,
) -> anyhow::Result<()> {
    let total: u64 = counts.iter().map(|c| c.1).sum();
    let mut t = format!(
        "`cargo xtask fuzz --seconds {seconds} --jobs {jobs}` (cargo-fuzz, libFuzzer, {jobs} \
         target(s) at a time; the corpora in \
         `radius-userspace/fuzz/corpus`), no failure:\n\n\
         | target | what it checks | executions | per second |\n| --- | --- | ---: | ---: |\n"
    );
    for (target, runs, secs) in counts {
        let what = match target.as_str() {
            "parse" => "the codec and its readers on any bytes: no panic, reads in bounds",
            "edit_resign" => "the proxy's edit of any packet: parses, verifies, Proxy-State back",
            "config" => "the configuration parser: no panic, errors name file and line",
            "dictionary" => "the dictionary loader: no panic, what it takes is found",
            "engine" => {
                "the engine on a virtual clock: replies only to senders, nothing in flight for ever, counts consistent"
            }
            _ => "",
        };
        t.push_str(&format!(
            "| {target} | {what} | {runs} | {:.0} |\n",
            *runs as f64 / (*secs).max(1) as f64
        ));
    }
    t.push_str(&format!("| all | | {total} | |\n"));
    let path = root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).context("reading BENCHMARKS.md")?;
    let (begin, end) = ("<!-- fuzz:begin -->", "<!-- fuzz:end -->");
    let text = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{t}{}", &text[..b], &text[e..])
        }
        _ => format!("{text}\n## fuzz (`cargo xtask fuzz`)\n\n{begin}\n{t}{end}\n"),
    };
    std::fs::write(&path, text).context("writing BENCHMARKS.md")?;
    eprintln!("xtask: written to {}", path.display());
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup(test_deps: bool) -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]));
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }
    if test_deps {
        install_packages(TEST_PACKAGES)?;
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing (as root).
fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("{missing:?} are needed: install them as root (apt-get install)");
    }
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs `cargo test`, passing its output through, and closes with one line that sums every
/// test binary's result (`N passed, N failed`), so a run is judged on all of them.
fn test_with_summary(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |word: &str| {
                    rest.split(';')
                        .find_map(|p| {
                            p.trim()
                                .strip_suffix(word)?
                                .split_whitespace()
                                .last()?
                                .parse::<u64>()
                                .ok()
                        })
                        .unwrap_or(0)
                };
                passed += num("passed");
                failed += num("failed");
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Builds the .deb from the release build (run `build` first); returns its path.
fn deb() -> anyhow::Result<PathBuf> {
    let has_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_deb {
        run(Command::new("cargo").args(["install", "cargo-deb", "--locked"]))?;
    }
    let assets = root().join("target/assets");
    run(Command::new(root().join("target/release/radius-sidecar"))
        .arg("generate-assets")
        .arg(&assets))?;
    for page in std::fs::read_dir(&assets)? {
        let page = page?.path();
        if page.extension().is_some_and(|e| e == "8") {
            run(Command::new("gzip").arg("-9nf").arg(page))?;
        }
    }
    let mut cmd = cargo();
    cmd.args(["deb", "-p", "radius-userspace", "--no-build", "--output"])
        .arg(root().join("target/debian"));
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().context("starting cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no package path")?;
    eprintln!("xtask: package {}", path.display());
    Ok(path)
}

fn build() -> anyhow::Result<()> {
    // --workspace everywhere: one feature resolution, so the eBPF object is built once.
    run(cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "radius-ebpf",
        "--bins",
    ]))
}

/// Builds the daemon of git revision `rev` in a worktree under `target/baseline`, with a
/// target directory of its own; returns the binary.
fn build_baseline(rev: &str) -> anyhow::Result<PathBuf> {
    let dir = root().join("target/baseline");
    let src = dir.join("src");
    if src.join(".git").exists() {
        run(Command::new("git")
            .current_dir(&src)
            .args(["checkout", "--quiet", "--detach", rev]))?;
    } else {
        run(Command::new("git")
            .current_dir(root())
            .args(["worktree", "add", "--detach"])
            .arg(&src)
            .arg(rev))?;
    }
    run(cargo()
        .current_dir(&src)
        .args([
            "build",
            "--release",
            "-p",
            "radius-userspace",
            "--bin",
            "radius-sidecar",
        ])
        .env("CARGO_TARGET_DIR", dir.join("target")))?;
    Ok(dir.join("target/release/radius-sidecar"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { test_deps } => setup(test_deps),
        Cmd::Build => {
            setup(false)?;
            build()
        }
        Cmd::Deb => {
            setup(false)?;
            build()?;
            println!("{}", deb()?.display());
            Ok(())
        }
        Cmd::Run { args } => {
            setup(false)?;
            build()?;
            if !is_root() {
                eprintln!(
                    "xtask: not root: the daemon will say why the eBPF fast path is off and \
                     steer in user space (run as root, or grant CAP_BPF + CAP_NET_ADMIN)"
                );
            }
            let bin = root().join("target/release/radius-sidecar");
            // Become the daemon: SIGINT/SIGTERM reach it directly, and it exits cleanly.
            use std::os::unix::process::CommandExt as _;
            let err = Command::new(&bin).args(args).exec();
            Err(err).with_context(|| format!("starting {}", bin.display()))
        }
        Cmd::Test { no_lint, args } => {
            setup(true)?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--", "--check"]))?;
                run(cargo().args([
                    "clippy",
                    "--release",
                    "--workspace",
                    "--exclude",
                    "radius-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            build()?;
            if !no_lint {
                // The fuzz targets are a workspace of their own, outside the build above: a
                // field added to a core type once broke them unnoticed. Checked after the
                // build, in its target directory, so nothing of it is built again.
                run(cargo()
                    .args(["check", "--release", "--bins", "--manifest-path"])
                    .arg(root().join("radius-userspace/fuzz/Cargo.toml"))
                    .env("CARGO_TARGET_DIR", root().join("target")))?;
            }
            let package = deb()?;
            let bin = root().join("target/release/radius-sidecar");
            // One thread: privileged tests look at the kernel's global list of programs.
            test_with_summary(
                cargo()
                    .args([
                        "test",
                        "--release",
                        "--workspace",
                        "--exclude",
                        "radius-ebpf",
                        "--",
                    ])
                    .arg("--test-threads=1")
                    .args(args)
                    .env("RADIUS_SIDECAR_BIN", bin)
                    .env("RADIUS_SIDECAR_DEB", package),
            )
        }
        Cmd::Demo => {
            setup(true)?;
            build()?;
            run(Command::new(root().join("target/release/demo"))
                .env(
                    "RADIUS_SIDECAR_BIN",
                    root().join("target/release/radius-sidecar"),
                )
                .env("RADIUS_SIDECAR_LOG", "0"))
        }
        Cmd::Bench {
            which,
            flows,
            extra,
        } => match which.as_str() {
            "steer" => {
                setup(false)?;
                build()?;
                let flows: Vec<String> = flows.iter().map(|f| f.to_string()).collect();
                run(Command::new(root().join("target/release/steer-bench"))
                    .arg("--flows")
                    .arg(flows.join(","))
                    .arg("--write")
                    .arg(root().join("BENCHMARKS.md")))
            }
            "codec" => {
                setup(false)?;
                run(cargo()
                    .args(["bench", "-p", "radius-userspace", "--bench", "codec"])
                    .env("RADIUS_BENCH_WRITE", root().join("BENCHMARKS.md")))
            }
            "proxy" => {
                setup(true)?;
                install_packages(BENCH_PACKAGES)?;
                build()?;
                // `--baseline-rev REV`: that revision's daemon, built beside this one, is
                // measured in the same rounds (`--baseline PATH` takes a binary as it is).
                let mut extra = extra;
                if let Some(i) = extra.iter().position(|a| a == "--baseline-rev") {
                    let rev = extra
                        .get(i + 1)
                        .cloned()
                        .context("--baseline-rev needs a git revision")?;
                    extra.drain(i..i + 2);
                    let bin = build_baseline(&rev)?;
                    extra.push("--baseline".into());
                    extra.push(bin.display().to_string());
                }
                run(Command::new(root().join("target/release/proxy-bench"))
                    .args(&extra)
                    .arg("--write")
                    .arg(root().join("BENCHMARKS.md"))
                    .env(
                        "RADIUS_SIDECAR_BIN",
                        root().join("target/release/radius-sidecar"),
                    )
                    .env("RADIUS_SIDECAR_LOG", "0"))
            }
            other => bail!("unknown benchmark `{other}` (known: steer, codec, proxy)"),
        },
        Cmd::Soak {
            minutes,
            share,
            no_write,
        } => {
            setup(true)?;
            build()?;
            let mut cmd = Command::new(root().join("target/release/soak"));
            cmd.current_dir(root())
                .args([
                    "--minutes",
                    &minutes.to_string(),
                    "--share",
                    &share.to_string(),
                ])
                .env(
                    "RADIUS_SIDECAR_BIN",
                    root().join("target/release/radius-sidecar"),
                )
                .env("RADIUS_SIDECAR_LOG", "0");
            if !no_write {
                cmd.arg("--write").arg(root().join("BENCHMARKS.md"));
            }
            run(&mut cmd)
        }
        Cmd::Fuzz {
            seconds,
            only,
            jobs,
            no_write,
        } => {
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            let counts = fuzz(seconds, only.as_deref(), jobs)?;
            let total: u64 = counts.iter().map(|c| c.1).sum();
            for (target, runs, _) in &counts {
                println!("{target:<12} {runs:>12} executions");
            }
            println!("{:<12} {total:>12} executions, no failure", "all");
            if !no_write {
                write_fuzz_table(&counts, seconds, jobs)?;
            }
            Ok(())
        }
    }
}
