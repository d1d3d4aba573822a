//! `cargo xtask bench proxy`: the sidecar against its peers, in one run on one machine.
//!
//! In a private network namespace (loopback only), the project's load generator
//! ([`tests::loadgen`]) sends PAP Access-Requests from many NAS addresses (127.0.2.x) to:
//! FreeRADIUS directly; the sidecar (fast path, and user-space path) in front of it;
//! radsecproxy and FreeRADIUS-as-a-proxy in front of it; and, for ceilings, the project's
//! own batching responder directly, through the sidecar and through radsecproxy. Each row
//! gives answered requests/s, p50/p99, losses and the CPU (user + system, from /proc) the
//! proxy spent per request. Rounds are interleaved; each row is the median round by rate.
//! With `--baseline PATH` (another `radius-sidecar` binary, e.g. the previous build), the
//! sidecar rows are measured with both binaries in the same rounds, and the table gives the
//! ratios of the new build to the baseline.
//!
//! TLS rows: the same NASes on UDP, the proxy speaking RADIUS/TLS (RFC 6614, client
//! certificates from a test CA) to FreeRADIUS's `tls` site (the sidecar offers radius/1.1;
//! FreeRADIUS 3.2.1 answers RADIUS/TLS); and a handshake run, TLS clients with
//! certificates connecting to the proxy's TLS listener as fast as they can.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tests::{
    Daemon, FreeRadius, FreeRadiusSetup, NetNs,
    loadgen::{self, LoadResult, LoadSpec},
    responder::{Behaviour, Responder},
};

const NAS_SECRET: &str = "bench-nas-secret";
const UP_SECRET: &str = "bench-upstream-secret";
const FR_PORT: u16 = 11812;
const FR_PROXY_PORT: u16 = 21812;
const RADSEC_PORT: u16 = 31812;
const RESPONDER_PORT: u16 = 41812;
/// The responder NASes reach directly (their secret, not the upstream one).
const RESPONDER_DIRECT_PORT: u16 = 41912;
const SIDECAR_PORT: u16 = 1812;
/// FreeRADIUS's tls site, and the proxies' TLS listeners of the handshake run.
const FR_TLS_PORT: u16 = 2083;
const PROXY_TLS_PORT: u16 = 2183;
/// The UDP ports of the TLS rows' FreeRADIUS (unused but for its start-up).
const FR_TLS_UDP_PORT: u16 = 12812;
const RADSEC: &str = "radsec";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proxy {
    None,
    SidecarFast,
    /// The fast path with 10 000 realms (and wildcards and regexes) configured, every
    /// request routed by one of them and stripped, and rewrites both ways.
    SidecarRealms,
    SidecarUser,
    /// The same, with the `--baseline` binary.
    BaselineFast,
    BaselineUser,
    Radsecproxy,
    FreeRadiusHop,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::None => "direct",
            Proxy::SidecarFast => "radius-sidecar, fast path",
            Proxy::SidecarRealms => "radius-sidecar, fast path, 10 000 realms, rewrites",
            Proxy::SidecarUser => "radius-sidecar, user-space path",
            Proxy::BaselineFast => "baseline radius-sidecar, fast path",
            Proxy::BaselineUser => "baseline radius-sidecar, user-space path",
            Proxy::Radsecproxy => "radsecproxy 1.9",
            Proxy::FreeRadiusHop => "FreeRADIUS 3.2 as proxy",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    FreeRadius,
    /// The same FreeRADIUS, over RADIUS/TLS (its tls site).
    FreeRadiusTls,
    Responder,
}

impl Upstream {
    fn name(self) -> &'static str {
        match self {
            Upstream::FreeRadius => "FreeRADIUS 3.2.1",
            Upstream::FreeRadiusTls => "FreeRADIUS 3.2.1 over TLS",
            Upstream::Responder => "own responder",
        }
    }
    fn port(self) -> u16 {
        match self {
            Upstream::FreeRadius => FR_PORT,
            Upstream::FreeRadiusTls => FR_TLS_PORT,
            Upstream::Responder => RESPONDER_PORT,
        }
    }
    fn is_freeradius(self) -> bool {
        matches!(self, Upstream::FreeRadius | Upstream::FreeRadiusTls)
    }
}

struct Row {
    proxy: Proxy,
    upstream: Upstream,
    outstanding: usize,
    load: LoadResult,
    /// CPU the proxy process spent per answered request, microseconds.
    proxy_us: f64,
    /// CPU the upstream spent per answered request (FreeRADIUS only), microseconds.
    upstream_us: f64,
    rcvbuf_errors: u64,
}

struct Opts {
    seconds: u64,
    outstanding: usize,
    ceiling_outstanding: usize,
    sources: usize,
    rounds: usize,
    write: Option<String>,
    /// Only the rows whose proxy name contains this (and the direct rows).
    only: Option<String>,
    /// The sidecar's workers (0: its default, half the cores).
    workers: usize,
    /// Rows at 256, 1 000 and 4 000 outstanding, sidecar beside radsecproxy.
    sweep: bool,
    /// The failover run.
    failover: bool,
    /// Another radius-sidecar binary to measure beside this one.
    baseline: Option<std::path::PathBuf>,
    /// The TLS rows and the handshake run.
    tls: bool,
    /// Certificates of the TLS rows (tests::write_test_pki).
    pki: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let mut o = Opts {
        seconds: 5,
        outstanding: 64,
        ceiling_outstanding: 256,
        sources: 64,
        rounds: 3,
        write: None,
        only: None,
        workers: 0,
        sweep: true,
        failover: true,
        baseline: None,
        tls: true,
        pki: temp_dir("pki"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> anyhow::Result<u64> {
            args.next().context("a number")?.parse().context("a number")
        };
        match a.as_str() {
            "--seconds" => o.seconds = num()?,
            "--outstanding" => o.outstanding = num()? as usize,
            "--ceiling-outstanding" => o.ceiling_outstanding = num()? as usize,
            "--sources" => o.sources = num()?.clamp(1, 250) as usize,
            "--rounds" => o.rounds = num()?.max(1) as usize,
            "--write" => o.write = args.next(),
            "--only" => o.only = args.next(),
            "--workers" => o.workers = num()? as usize,
            "--no-sweep" => o.sweep = false,
            "--no-failover" => o.failover = false,
            "--no-tls" => o.tls = false,
            "--baseline" => o.baseline = Some(args.next().context("a binary")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("proxy-bench needs root (a network namespace and eBPF)");
    }
    for tool in ["freeradius", "radsecproxy"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            anyhow::bail!("{tool} is not installed (`cargo xtask bench proxy` installs it)");
        }
    }
    let ns = NetNs::new("pbench");
    tests::write_test_pki(&o.pki)?;
    let fr = FreeRadius::start_with(
        &ns,
        &FreeRadiusSetup {
            clients: &[("127.0.0.1", UP_SECRET), ("127.0.2.0/24", NAS_SECRET)],
            users: "bench Cleartext-Password := \"bench-pw\"\n",
            auth_port: FR_PORT,
            ..Default::default()
        },
    );
    // The TLS rows' FreeRADIUS is another instance: one that has just served a TLS row
    // holds its requests for cleanup_delay and spends twice its CPU per request on the
    // next row.
    let fr_tls = o.tls.then(|| {
        FreeRadius::start_with(
            &ns,
            &FreeRadiusSetup {
                clients: &[],
                users: "bench Cleartext-Password := \"bench-pw\"\n",
                auth_port: FR_TLS_UDP_PORT,
                tls: Some(tests::FreeRadiusTls {
                    port: FR_TLS_PORT,
                    certificate: &o.pki.join("server.pem"),
                    key: &o.pki.join("server.key"),
                    ca: &o.pki.join("ca.pem"),
                    clients: &["127.0.0.1"],
                }),
                ..Default::default()
            },
        )
    });
    let responders = ns.run(|| {
        let up: SocketAddr = ([127, 0, 0, 1], RESPONDER_PORT).into();
        let direct: SocketAddr = ([127, 0, 0, 1], RESPONDER_DIRECT_PORT).into();
        Ok::<_, std::io::Error>((
            Responder::start(up, UP_SECRET.as_bytes(), Behaviour::Correct)?,
            Responder::start(direct, NAS_SECRET.as_bytes(), Behaviour::Correct)?,
        ))
    })?;
    let plan: Vec<(Proxy, Upstream, usize)> = [
        (Proxy::None, Upstream::FreeRadius),
        (Proxy::SidecarFast, Upstream::FreeRadius),
        (Proxy::SidecarRealms, Upstream::FreeRadius),
        (Proxy::SidecarUser, Upstream::FreeRadius),
        (Proxy::Radsecproxy, Upstream::FreeRadius),
        (Proxy::FreeRadiusHop, Upstream::FreeRadius),
    ]
    .into_iter()
    .map(|(p, u)| (p, u, o.outstanding))
    .chain(
        [
            (Proxy::BaselineFast, Upstream::FreeRadius),
            (Proxy::BaselineUser, Upstream::FreeRadius),
        ]
        .into_iter()
        .filter(|_| o.baseline.is_some())
        .map(|(p, u)| (p, u, o.outstanding)),
    )
    .chain(
        [
            (Proxy::None, Upstream::Responder),
            (Proxy::SidecarFast, Upstream::Responder),
            (Proxy::SidecarRealms, Upstream::Responder),
            (Proxy::SidecarUser, Upstream::Responder),
            (Proxy::BaselineFast, Upstream::Responder),
            (Proxy::BaselineUser, Upstream::Responder),
            (Proxy::Radsecproxy, Upstream::Responder),
        ]
        .into_iter()
        .filter(|(p, _)| {
            o.baseline.is_some() || !matches!(p, Proxy::BaselineFast | Proxy::BaselineUser)
        })
        .map(|(p, u)| (p, u, o.ceiling_outstanding)),
    )
    .chain(
        [256usize, 1_000, 4_000]
            .into_iter()
            .filter(|_| o.sweep)
            .flat_map(|n| {
                [
                    (Proxy::SidecarFast, Upstream::FreeRadius, n),
                    (Proxy::Radsecproxy, Upstream::FreeRadius, n),
                ]
            }),
    )
    .chain(
        [
            (Proxy::SidecarFast, Upstream::FreeRadiusTls),
            (Proxy::SidecarUser, Upstream::FreeRadiusTls),
            (Proxy::Radsecproxy, Upstream::FreeRadiusTls),
        ]
        .into_iter()
        .filter(|_| o.tls)
        .map(|(p, u)| (p, u, o.outstanding)),
    )
    .filter(|(p, _, _)| {
        *p == Proxy::None
            || o.only
                .as_ref()
                .is_none_or(|w| p.name().contains(w.as_str()))
    })
    .collect();
    let mut runs: Vec<Vec<Row>> = plan.iter().map(|_| Vec::new()).collect();
    for round in 0..o.rounds {
        for (i, &(proxy, upstream, outstanding)) in plan.iter().enumerate() {
            let upstream_fr = match (upstream, &fr_tls) {
                (Upstream::FreeRadiusTls, Some(t)) => t,
                _ => &fr,
            };
            let row = measure(&ns, upstream_fr, &o, proxy, upstream, outstanding)
                .with_context(|| format!("{} -> {}", proxy.name(), upstream.name()))?;
            eprintln!(
                "round {round}: {:<32} -> {:<17} {:>4} out: {:>8.0} req/s, p50 {:.2} p99 {:.2} ms, lost {}, bad {}, proxy {:.1} us/req, upstream {:.1} us/req, generator {:.1} us/req, rcvbuf errors {}",
                row.proxy.name(),
                row.upstream.name(),
                row.outstanding,
                row.load.rate(),
                row.load.latency_ms(0.5),
                row.load.latency_ms(0.99),
                row.load.lost,
                row.load.bad,
                row.proxy_us,
                row.upstream_us,
                per_req_us(row.load.own_cpu, row.load.answered),
                row.rcvbuf_errors
            );
            runs[i].push(row);
        }
    }
    drop(responders);
    let mut handshakes = Vec::new();
    if o.tls {
        for round in 0..o.rounds {
            for proxy in [Proxy::SidecarUser, Proxy::Radsecproxy] {
                let h = handshake_run(&ns, &o, proxy)
                    .with_context(|| format!("handshakes with {}", proxy.name()))?;
                eprintln!(
                    "round {round}: handshakes with {:<32}: {:.0}/s, {:.0} us of proxy CPU each, {} failed",
                    proxy.name(),
                    h.rate(),
                    h.cpu_us(),
                    h.failed
                );
                handshakes.push((proxy, h));
            }
        }
    }
    let mut failovers = Vec::new();
    if o.failover {
        for proxy in [Proxy::SidecarFast, Proxy::Radsecproxy] {
            let f = failover_run(&ns, &o, proxy)
                .with_context(|| format!("failover through {}", proxy.name()))?;
            eprintln!(
                "failover {:<32}: per second {:?}, lost {}",
                proxy.name(),
                f.per_second,
                f.lost
            );
            failovers.push((proxy, f));
        }
    }
    let rows: Vec<Row> = runs
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.load.rate().total_cmp(&b.load.rate()));
            r.swap_remove(r.len() / 2)
        })
        .collect();
    let mut table = render(&rows, &o);
    if !handshakes.is_empty() {
        table.push_str(&render_handshakes(handshakes, o.rounds));
    }
    if !failovers.is_empty() {
        table.push_str(&render_failover(&failovers, o.outstanding));
    }
    println!("{table}");
    if let Some(path) = &o.write {
        // A comparison with a baseline build has a section of its own: it does not replace
        // the table of the peers.
        let (marker, heading) = if o.baseline.is_some() {
            (
                "proxy-baseline",
                "proxy: this build beside a baseline build (`--baseline-rev`)",
            )
        } else {
            (
                "proxy",
                "proxy: NAS -> proxy -> AAA server (`cargo xtask bench proxy`)",
            )
        };
        tests::splice_markdown(path, marker, heading, &table)?;
        eprintln!("written to {path}");
    }
    Ok(())
}

fn per_req_us(cpu: Duration, answered: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / (answered.max(1) as f64)
}

/// A proxy process under test, stopped on drop.
enum Running {
    None,
    Sidecar(Daemon),
    Process(Child, std::path::PathBuf),
    FreeRadius(FreeRadius),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::None => None,
            Running::Sidecar(d) => Some(d.child.id()),
            Running::Process(c, _) => Some(c.id()),
            Running::FreeRadius(f) => Some(f.child.id()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Process(c, dir) = self {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn start_proxy(
    ns: &NetNs,
    proxy: Proxy,
    upstream: Upstream,
    o: &Opts,
) -> anyhow::Result<(Running, u16)> {
    let up = upstream.port();
    let workers = o.workers;
    Ok(match proxy {
        Proxy::None if upstream == Upstream::Responder => (Running::None, RESPONDER_DIRECT_PORT),
        Proxy::None => (Running::None, up),
        Proxy::SidecarFast
        | Proxy::SidecarRealms
        | Proxy::SidecarUser
        | Proxy::BaselineFast
        | Proxy::BaselineUser => {
            let ebpf = if matches!(
                proxy,
                Proxy::SidecarFast | Proxy::SidecarRealms | Proxy::BaselineFast
            ) {
                "require"
            } else {
                "off"
            };
            let bin = match proxy {
                Proxy::BaselineFast | Proxy::BaselineUser => o.baseline.clone(),
                _ => None,
            };
            let over_tls = if upstream == Upstream::FreeRadiusTls {
                format!(
                    "transport = \"tls\"\ntls_ca = \"{dir}/ca.pem\"\n\
                     tls_certificate = \"{dir}/nas.pem\"\ntls_key = \"{dir}/nas.key\"\n",
                    dir = o.pki.display()
                )
            } else {
                String::new()
            };
            let secret = if upstream == Upstream::FreeRadiusTls {
                RADSEC
            } else {
                UP_SECRET
            };
            let toml = format!(
                r#"
[server]
listen = ["127.0.0.1:{SIDECAR_PORT}"]
iface = "lo"
ebpf = "{ebpf}"
metrics = "none"
workers = {workers}

[[upstream]]
name = "up"
auth = "127.0.0.1:{up}"
secret = "{secret}"
timeout_ms = 5000
{over_tls}
[[client]]
prefix = "127.0.2.0/24"
name = "bench-nases"
secret = "{NAS_SECRET}"
upstream = "up"
"#
            );
            let toml = if proxy == Proxy::SidecarRealms {
                toml + &realms_config()
            } else {
                toml
            };
            let d = tests::sidecar_with_config_of(ns, "pbench", &toml, bin.as_deref());
            (Running::Sidecar(d), SIDECAR_PORT)
        }
        Proxy::Radsecproxy if upstream == Upstream::FreeRadiusTls => (
            start_radsecproxy(
                ns,
                "radsecproxy-tls",
                &format!(
                    "tls default {{\n CACertificateFile {dir}/ca.pem\n CertificateFile {dir}/nas.pem\n \
                     CertificateKeyFile {dir}/nas.key\n}}\n\
                     server up {{\n host 127.0.0.1\n port {up}\n type tls\n tls default\n \
                     secret {RADSEC}\n CertificateNameCheck off\n}}\n\
                     realm * {{\n server up\n}}\n",
                    dir = o.pki.display()
                ),
            )?,
            RADSEC_PORT,
        ),
        Proxy::Radsecproxy => (
            start_radsecproxy(
                ns,
                "radsecproxy",
                &format!(
                    "server up {{\n host 127.0.0.1\n port {up}\n type udp\n secret {UP_SECRET}\n}}\n\
                     realm * {{\n server up\n}}\n"
                ),
            )?,
            RADSEC_PORT,
        ),
        Proxy::FreeRadiusHop => {
            let proxy_conf = format!(
                "proxy server {{\n default_fallback = no\n}}\n\
                 home_server up {{\n type = auth\n ipaddr = 127.0.0.1\n port = {up}\n secret = {UP_SECRET}\n \
                 response_window = 20\n status_check = none\n}}\n\
                 home_server_pool up_pool {{\n type = fail-over\n home_server = up\n}}\n\
                 realm bench_up {{\n auth_pool = up_pool\n nostrip\n}}\n"
            );
            let fr = FreeRadius::start_with(
                ns,
                &FreeRadiusSetup {
                    clients: &[("127.0.2.0/24", NAS_SECRET)],
                    users: "DEFAULT Proxy-To-Realm := \"bench_up\"\n",
                    auth_port: FR_PROXY_PORT,
                    proxy_conf: Some(&proxy_conf),
                    ..Default::default()
                },
            );
            (Running::FreeRadius(fr), FR_PROXY_PORT)
        }
    })
}

/// The realm whose users the realms row sends (one of 10 000 exact names).
const BENCH_REALM: &str = "realm7777.example.org";

/// The client's rewrites (its table is the last before this), then 10 000 exact realms, 20
/// wildcards and 5 regular expressions, all to the bench's upstream, stripped (so
/// FreeRADIUS sees the plain user).
fn realms_config() -> String {
    // Rewrites that leave the upstream's work as it was (nothing added towards it), so the
    // row measures what rewriting costs the sidecar, not what more attributes cost
    // FreeRADIUS: a keep_only and a vendor removal on requests, a removal and an addition
    // on replies.
    let mut c = String::from(
        "rewrite_in = \"from-nas\"\nrewrite_out = \"to-nas\"\n\n\
         [[rewrite]]\nname = \"from-nas\"\n\
         keep_only = [\"User-Name\", \"User-Password\", \"NAS-Port\", \"NAS-IP-Address\", \
         \"NAS-Identifier\", \"Called-Station-Id\", \"Calling-Station-Id\", \"Operator-Name\", \
         \"Chargeable-User-Identity\", \"EAP-Message\", \"State\"]\n\
         remove = [\"Cisco\"]\n\n\
         [[rewrite]]\nname = \"to-nas\"\nremove = [\"Filter-Id\"]\n\
         add_if_absent = [\"Idle-Timeout = 600\"]\n",
    );
    for i in 0..10_000 {
        c.push_str(&format!(
            "\n[[realm]]\nname = \"realm{i}.example.org\"\nauth = \"up\"\nstrip = true\n"
        ));
    }
    for i in 0..20 {
        c.push_str(&format!(
            "\n[[realm]]\nname = \"*.zone{i}.example.net\"\nauth = \"up\"\n"
        ));
    }
    for i in 0..5 {
        c.push_str(&format!(
            "\n[[realm]]\nname = \"~^dept{i}\\\\.\"\nauth = \"up\"\n"
        ));
    }
    c
}

/// radsecproxy on `RADSEC_PORT` for the bench's NASes, with `servers` (its server and realm
/// blocks); returns once it listens.
fn start_radsecproxy(ns: &NetNs, tag: &str, servers: &str) -> anyhow::Result<Running> {
    let dir = temp_dir(tag);
    let conf = dir.join("radsecproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "ListenUDP 127.0.0.1:{RADSEC_PORT}\nLogLevel 1\nLogDestination file://{}/log\n\
             client nases {{\n host 127.0.2.0/24\n type udp\n secret {NAS_SECRET}\n}}\n{servers}",
            dir.display()
        ),
    )?;
    let child = ns
        .command("radsecproxy")
        .args(["-f", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting radsecproxy")?;
    let r = Running::Process(child, dir);
    wait_udp_listening(ns, RADSEC_PORT)?;
    Ok(r)
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rs-pbench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

fn wait_udp_listening(ns: &NetNs, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = ns.command("ss").args(["-uln"]).output()?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on UDP port {port} after 10 s")
}

fn rcvbuf_errors(ns: &NetNs) -> u64 {
    let out = ns
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // Two "Udp:" lines: names, then values.
    let mut udp = out.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn measure(
    ns: &NetNs,
    fr: &FreeRadius,
    o: &Opts,
    proxy: Proxy,
    upstream: Upstream,
    outstanding: usize,
) -> anyhow::Result<Row> {
    let (running, port) = start_proxy(ns, proxy, upstream, o)?;
    let spec = LoadSpec {
        target: ([127, 0, 0, 1], port).into(),
        sources: (0..o.sources)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + i as u8)))
            .collect(),
        sockets_per_source: 1,
        outstanding,
        duration: Duration::from_secs(1),
        max_requests: 2_000_000,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: if proxy == Proxy::SidecarRealms {
            format!("bench@{BENCH_REALM}")
        } else {
            "bench".into()
        },
        password: "bench-pw".into(),
        timeout: Duration::from_secs(2),
        message_authenticator: std::env::var_os("BENCH_NO_MA").is_none(),
        rate: None,
    };
    // Warm-up: flows created, clients known, caches hot.
    let warm = spec.clone();
    ns.run(move || loadgen::run(&warm))?;
    let fr_pid = fr.child.id();
    let proxy_pid = running.pid();
    let before = (
        proxy_pid.map(loadgen::process_cpu),
        loadgen::process_cpu(fr_pid),
        rcvbuf_errors(ns),
    );
    let mut spec = spec;
    spec.duration = Duration::from_secs(o.seconds);
    let load = ns.run(move || loadgen::run(&spec))?;
    let after = (
        proxy_pid.map(loadgen::process_cpu),
        loadgen::process_cpu(fr_pid),
        rcvbuf_errors(ns),
    );
    let proxy_us = match (before.0, after.0) {
        (Some(b), Some(a)) => per_req_us(a.saturating_sub(b), load.answered),
        _ => 0.0,
    };
    let upstream_us = if upstream.is_freeradius() {
        per_req_us(after.1.saturating_sub(before.1), load.answered)
    } else {
        0.0
    };
    drop(running);
    Ok(Row {
        proxy,
        upstream,
        outstanding,
        load,
        proxy_us,
        upstream_us,
        rcvbuf_errors: after.2.saturating_sub(before.2),
    })
}

fn render(rows: &[Row], o: &Opts) -> String {
    let mut t = String::new();
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        t,
        "Machine: {cores} cores, Linux {uname}. Loopback in a private network namespace; the \
         generator, the proxy and the upstream share the cores. PAP Access-Requests from {} \
         NAS addresses (one flow each), closed loop, {} s per run after a 1 s warm-up; each \
         row is the median of {} interleaved rounds by rate. CPU per request: user + system \
         time of the proxy process (from /proc) over answered requests. The sidecar runs {}.\n",
        o.sources,
        o.seconds,
        o.rounds,
        match o.workers {
            0 => "its default workers (half the cores, at least one)".to_owned(),
            n => format!("{n} worker(s)"),
        }
    );
    let _ = writeln!(
        t,
        "| proxy | upstream | outstanding | answered req/s | vs direct | p50 ms | p99 ms | lost | bad | proxy CPU us/req | upstream CPU us/req | RcvbufErrors |"
    );
    let _ = writeln!(
        t,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        // TLS rows are held against FreeRADIUS reached directly on UDP.
        let direct_of = match r.upstream {
            Upstream::FreeRadiusTls => Upstream::FreeRadius,
            u => u,
        };
        let direct = rows
            .iter()
            .find(|d| d.proxy == Proxy::None && d.upstream == direct_of)
            .map_or(f64::NAN, |d| d.load.rate());
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {:.0} % | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.proxy.name(),
            r.upstream.name(),
            r.outstanding,
            r.load.rate(),
            100.0 * r.load.rate() / direct,
            r.load.latency_ms(0.5),
            r.load.latency_ms(0.99),
            r.load.lost,
            r.load.bad,
            if r.proxy == Proxy::None {
                "-".to_owned()
            } else {
                format!("{:.1}", r.proxy_us)
            },
            if r.upstream.is_freeradius() {
                format!("{:.1}", r.upstream_us)
            } else {
                "-".to_owned()
            },
            r.rcvbuf_errors
        );
    }
    let ratio = |p: Proxy, q: Proxy, u: Upstream| -> Option<(f64, f64)> {
        let a = rows.iter().find(|r| r.proxy == p && r.upstream == u)?;
        let b = rows.iter().find(|r| r.proxy == q && r.upstream == u)?;
        Some((
            a.load.rate() / b.load.rate(),
            b.proxy_us / a.proxy_us.max(1e-9),
        ))
    };
    let _ = writeln!(t);
    for (q, u) in [
        (Proxy::Radsecproxy, Upstream::FreeRadius),
        (Proxy::FreeRadiusHop, Upstream::FreeRadius),
        (Proxy::Radsecproxy, Upstream::FreeRadiusTls),
        (Proxy::Radsecproxy, Upstream::Responder),
    ] {
        if let Some((rate, cpu)) = ratio(Proxy::SidecarFast, q, u) {
            let _ = writeln!(
                t,
                "- sidecar (fast path) vs {} behind {}: {rate:.2}x the rate, {cpu:.2}x less CPU per request.",
                q.name(),
                u.name()
            );
        }
    }
    // Routing by realm and rewriting: what they cost per request, in the same rounds.
    for u in [Upstream::FreeRadius, Upstream::Responder] {
        if let Some((rate, cpu)) = ratio(Proxy::SidecarRealms, Proxy::SidecarFast, u) {
            let _ = writeln!(
                t,
                "- sidecar (fast path) with 10 000 realms and 4 rewrites vs none behind {}: {rate:.2}x the rate, {:+.1} % CPU per request.",
                u.name(),
                (1.0 / cpu - 1.0) * 100.0
            );
        }
    }
    // This build against the baseline binary, measured in the same rounds.
    for (p, q) in [
        (Proxy::SidecarFast, Proxy::BaselineFast),
        (Proxy::SidecarUser, Proxy::BaselineUser),
    ] {
        for u in [Upstream::FreeRadius, Upstream::Responder] {
            if let Some((rate, cpu)) = ratio(p, q, u) {
                let _ = writeln!(
                    t,
                    "- {} vs the baseline build behind {}: {rate:.2}x the rate, {:+.1} % CPU per request.",
                    p.name(),
                    u.name(),
                    (1.0 / cpu - 1.0) * 100.0
                );
            }
        }
    }
    t
}

const FO_A: u16 = 13812;
const FO_B: u16 = 14812;
const FO_SECONDS: u64 = 8;
const FO_STOP_AT: Duration = Duration::from_secs(3);

/// Two FreeRADIUS behind the proxy; the first is stopped `FO_STOP_AT` into the run.
fn failover_run(ns: &NetNs, o: &Opts, proxy: Proxy) -> anyhow::Result<LoadResult> {
    let setup = |port| FreeRadiusSetup {
        clients: &[("127.0.0.1", UP_SECRET)],
        users: "bench Cleartext-Password := \"bench-pw\"\n",
        auth_port: port,
        ..Default::default()
    };
    let fr_a = FreeRadius::start_with(ns, &setup(FO_A));
    let _fr_b = FreeRadius::start_with(ns, &setup(FO_B));
    let (running, port) = match proxy {
        Proxy::SidecarFast => {
            let toml = format!(
                r#"
[server]
listen = ["127.0.0.1:{SIDECAR_PORT}"]
iface = "lo"
ebpf = "require"
metrics = "none"
workers = {workers}

[[upstream]]
name = "a"
auth = "127.0.0.1:{FO_A}"
secret = "{UP_SECRET}"
retry_ms = 500
check_interval_ms = 500

[[upstream]]
name = "b"
auth = "127.0.0.1:{FO_B}"
secret = "{UP_SECRET}"
retry_ms = 500
check_interval_ms = 500

[[pool]]
name = "ab"
upstreams = ["a", "b"]

[[client]]
prefix = "127.0.2.0/24"
secret = "{NAS_SECRET}"
upstream = "ab"
"#,
                workers = o.workers
            );
            (
                Running::Sidecar(tests::sidecar_with_config(ns, "pbench-fo", &toml)),
                SIDECAR_PORT,
            )
        }
        _ => (
            start_radsecproxy(
                ns,
                "radsecproxy-fo",
                &format!(
                    "server a {{\n host 127.0.0.1\n port {FO_A}\n type udp\n secret {UP_SECRET}\n statusserver on\n}}\n\
                     server b {{\n host 127.0.0.1\n port {FO_B}\n type udp\n secret {UP_SECRET}\n statusserver on\n}}\n\
                     realm * {{\n server a\n server b\n}}\n"
                ),
            )?,
            RADSEC_PORT,
        ),
    };
    let spec = LoadSpec {
        target: ([127, 0, 0, 1], port).into(),
        sources: (0..o.sources)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + i as u8)))
            .collect(),
        sockets_per_source: 1,
        outstanding: o.outstanding,
        duration: Duration::from_secs(FO_SECONDS),
        max_requests: 5_000_000,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "bench".into(),
        password: "bench-pw".into(),
        // A NAS's usual patience (3 tries, 3 s apart, folded into one wait).
        timeout: Duration::from_secs(9),
        message_authenticator: true,
        rate: None,
    };
    let res = std::thread::scope(|sc| {
        let load = sc.spawn(|| ns.run(move || loadgen::run(&spec)));
        std::thread::sleep(FO_STOP_AT);
        drop(fr_a);
        load.join()
    });
    drop(running);
    let res = res.map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    Ok(res)
}

fn render_failover(rows: &[(Proxy, LoadResult)], outstanding: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nFailover: two FreeRADIUS behind the proxy (sidecar: a fail-over pool, retry_ms 500, \
         check_interval_ms 500; radsecproxy: two servers in one realm, statusserver on), {} \
         outstanding, {FO_SECONDS} s; the first FreeRADIUS is killed {} s in. A request counts \
         as lost after 9 s (a NAS's patience); answers per second of the run:\n",
        outstanding,
        FO_STOP_AT.as_secs()
    );
    let n = FO_SECONDS as usize;
    let _ = write!(t, "| proxy |");
    for i in 0..n {
        let _ = write!(t, " s{i} |");
    }
    let _ = writeln!(t, " lost |");
    let _ = write!(t, "| --- |");
    for _ in 0..n {
        let _ = write!(t, " ---: |");
    }
    let _ = writeln!(t, " ---: |");
    for (p, r) in rows {
        let _ = write!(t, "| {} |", p.name());
        for i in 0..n {
            let _ = write!(t, " {} |", r.per_second.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(t, " {} |", r.lost);
    }
    t
}

const HANDSHAKE_SECONDS: u64 = 3;
const HANDSHAKE_CLIENTS: usize = 4;

/// What a handshake run gave.
struct Handshakes {
    done: u64,
    failed: u64,
    elapsed: Duration,
    proxy_cpu: Duration,
}

impl Handshakes {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn cpu_us(&self) -> f64 {
        per_req_us(self.proxy_cpu, self.done)
    }
}

/// TLS clients (rustls, with the NAS certificate of the test CA) connect to the proxy's TLS
/// listener one after another, each finishing a full handshake (no resumption) and closing,
/// `HANDSHAKE_CLIENTS` at a time for `HANDSHAKE_SECONDS`.
fn handshake_run(ns: &NetNs, o: &Opts, proxy: Proxy) -> anyhow::Result<Handshakes> {
    let dir = o.pki.display().to_string();
    let running = match proxy {
        Proxy::Radsecproxy => {
            let tdir = temp_dir("radsecproxy-hs");
            let conf = tdir.join("radsecproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "ListenTLS 127.0.0.1:{PROXY_TLS_PORT}\nLogLevel 1\nLogDestination file://{}/log\n\
                     tls default {{\n CACertificateFile {dir}/ca.pem\n CertificateFile {dir}/server.pem\n \
                     CertificateKeyFile {dir}/server.key\n}}\n\
                     client nases {{\n host 127.0.0.0/8\n type tls\n tls default\n secret {RADSEC}\n \
                     CertificateNameCheck off\n}}\n\
                     server up {{\n host 127.0.0.1\n port {FR_PORT}\n type udp\n secret {UP_SECRET}\n}}\n\
                     realm * {{\n server up\n}}\n",
                    tdir.display()
                ),
            )?;
            let child = ns
                .command("radsecproxy")
                .args(["-f", "-c"])
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting radsecproxy")?;
            Running::Process(child, tdir)
        }
        _ => {
            let toml = format!(
                r#"
[server]
listen = ["127.0.0.1:{SIDECAR_PORT}"]
listen_tls = ["127.0.0.1:{PROXY_TLS_PORT}"]
iface = "none"
ebpf = "off"
metrics = "none"
workers = {workers}
max_connections_per_source = 1000

[tls]
certificate = "{dir}/server.pem"
key = "{dir}/server.key"
ca = "{dir}/ca.pem"

[[upstream]]
name = "up"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.0.0/8"
name = "nases"
secret = "{RADSEC}"
"#,
                workers = o.workers
            );
            Running::Sidecar(tests::sidecar_with_config(ns, "pbench-hs", &toml))
        }
    };
    wait_tcp_listening(ns, PROXY_TLS_PORT)?;
    let pid = running.pid().context("a proxy process")?;
    let cpu0 = loadgen::process_cpu(pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(HANDSHAKE_SECONDS);
    let pki = o.pki.clone();
    let counts: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..HANDSHAKE_CLIENTS)
            .map(|_| {
                let pki = pki.clone();
                sc.spawn(move || {
                    ns.run(move || {
                        let (mut done, mut failed) = (0u64, 0u64);
                        while Instant::now() < deadline && done + failed < 1_000_000 {
                            match handshake(&pki) {
                                Ok(()) => done += 1,
                                Err(_) => failed += 1,
                            }
                        }
                        (done, failed)
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or((0, 0)))
            .collect()
    });
    let elapsed = start.elapsed();
    let proxy_cpu = loadgen::process_cpu(pid).saturating_sub(cpu0);
    drop(running);
    Ok(Handshakes {
        done: counts.iter().map(|c| c.0).sum(),
        failed: counts.iter().map(|c| c.1).sum(),
        elapsed,
        proxy_cpu,
    })
}

/// One full handshake with the proxy's TLS listener, then close_notify.
fn handshake(pki: &std::path::Path) -> anyhow::Result<()> {
    let mut s = tests::tls_connect(pki, "nas", &format!("127.0.0.1:{PROXY_TLS_PORT}"))?;
    s.sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    s.conn.send_close_notify();
    let _ = s.conn.complete_io(&mut s.sock);
    Ok(())
}

fn wait_tcp_listening(ns: &NetNs, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = ns.command("ss").args(["-tln"]).output()?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on TCP port {port} after 10 s")
}

/// The handshake table: per proxy, the median round by rate.
fn render_handshakes(mut runs: Vec<(Proxy, Handshakes)>, rounds: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nTLS handshakes: {HANDSHAKE_CLIENTS} clients (rustls, ECDSA P-256 certificates of a test CA, a \
         client certificate each time, no resumption) connect to the proxy's TLS listener one \
         after another for {HANDSHAKE_SECONDS} s, each completing a handshake and closing; median of \
         {rounds} rounds by rate:\n"
    );
    let _ = writeln!(
        t,
        "| proxy | handshakes/s | proxy CPU us/handshake | failed |\n| --- | ---: | ---: | ---: |"
    );
    for p in [Proxy::SidecarUser, Proxy::Radsecproxy] {
        let mut mine: Vec<Handshakes> = Vec::new();
        let mut rest = Vec::new();
        for (q, h) in runs.drain(..) {
            if q == p {
                mine.push(h);
            } else {
                rest.push((q, h));
            }
        }
        runs = rest;
        mine.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        if mine.is_empty() {
            continue;
        }
        let h = mine.swap_remove(mine.len() / 2);
        let _ = writeln!(
            t,
            "| {} | {:.0} | {:.0} | {} |",
            if p == Proxy::SidecarUser {
                "radius-sidecar"
            } else {
                p.name()
            },
            h.rate(),
            h.cpu_us(),
            h.failed
        );
    }
    t
}
