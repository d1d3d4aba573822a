//! Test hosts for radius-sidecar's end-to-end tests: network namespaces joined by veth,
//! code run inside a namespace, the daemon binary, and a few socket helpers.
//!
//! Every namespace and veth is created by the test and deleted by a guard's `Drop`. Traffic
//! only flows between these namespaces (documentation prefixes 192.0.2.0/24,
//! 198.51.100.0/24, 2001:db8::/32) or on their own loopback.
//!
//! Privileged tests call [`require_root`]: without root they fail with the reason, unless
//! `RADIUS_SKIP_PRIVILEGED=1` is set, which a developer may do on a laptop (and which CI never
//! sets).

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Panics (fails the test) when not root, or returns false when the developer asked to skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("RADIUS_SKIP_PRIVILEGED").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: needs root (RADIUS_SKIP_PRIVILEGED=1 is set)");
        return false;
    }
    panic!(
        "{test} needs root (network namespaces, eBPF). Run it as root (`cargo xtask test` in \
         CI), or set RADIUS_SKIP_PRIVILEGED=1 to skip privileged tests on a laptop."
    );
}

/// Runs a command to completion; panics with its stderr when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub mod loadgen;
pub mod responder;
pub mod soak;
pub mod spray;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("rs{}-{}-{tag}", std::process::id(), n);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `f` on a thread that lives in this namespace. Sockets created there keep the
    /// namespace; eBPF programs attached there attach to it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Runs `f` on a new thread in this namespace and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: a valid namespace fd; affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// A command that runs in this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A sidecar host and two NAS hosts, each NAS on its own veth link.
///
/// | link | sidecar side | NAS side |
/// | --- | --- | --- |
/// | `sc1` / `nas` (nas1) | 192.0.2.1, 2001:db8:1::1 | 192.0.2.2, 2001:db8:1::2 |
/// | `sc2` / `nas` (nas2) | 198.51.100.1, 2001:db8:2::1 | 198.51.100.2, 2001:db8:2::2 |
pub struct Topology {
    pub sidecar: NetNs,
    pub nas1: NetNs,
    pub nas2: NetNs,
}

pub const SIDECAR1_V4: &str = "192.0.2.1";
pub const NAS1_V4: &str = "192.0.2.2";
pub const SIDECAR2_V4: &str = "198.51.100.1";
pub const NAS2_V4: &str = "198.51.100.2";
pub const SIDECAR1_V6: &str = "2001:db8:1::1";
pub const NAS1_V6: &str = "2001:db8:1::2";
pub const SIDECAR2_V6: &str = "2001:db8:2::1";
pub const NAS2_V6: &str = "2001:db8:2::2";

impl Topology {
    pub fn new() -> Self {
        let sidecar = NetNs::new("sc");
        let nas1 = NetNs::new("n1");
        let nas2 = NetNs::new("n2");
        for (nas, sc_if, sc4, nas4, sc6, nas6) in [
            (&nas1, "sc1", SIDECAR1_V4, NAS1_V4, SIDECAR1_V6, NAS1_V6),
            (&nas2, "sc2", SIDECAR2_V4, NAS2_V4, SIDECAR2_V6, NAS2_V6),
        ] {
            sh(&[
                "ip",
                "link",
                "add",
                sc_if,
                "netns",
                &sidecar.name,
                "type",
                "veth",
                "peer",
                "name",
                "nas",
                "netns",
                &nas.name,
            ]);
            sidecar.ip(&["addr", "add", &format!("{sc4}/24"), "dev", sc_if]);
            sidecar.ip(&["addr", "add", &format!("{sc6}/64"), "dev", sc_if, "nodad"]);
            sidecar.ip(&["link", "set", sc_if, "up"]);
            nas.ip(&["addr", "add", &format!("{nas4}/24"), "dev", "nas"]);
            nas.ip(&["addr", "add", &format!("{nas6}/64"), "dev", "nas", "nodad"]);
            nas.ip(&["link", "set", "nas", "up"]);
            nas.ip(&["route", "add", "default", "via", sc4]);
            nas.ip(&["-6", "route", "add", "default", "via", sc6]);
        }
        let t = Self {
            sidecar,
            nas1,
            nas2,
        };
        // Links come up asynchronously; wait until NAS1 reaches the sidecar.
        t.nas1.run(|| wait_link(NAS1_V4, SIDECAR1_V4));
        t.nas2.run(|| wait_link(NAS2_V4, SIDECAR2_V4));
        t
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until `from` reaches `to` over a link that may still be coming up (call inside
/// [`NetNs::run`]).
pub fn wait_link(from: &str, to: &str) {
    let s = UdpSocket::bind((from, 0)).expect("bind probe");
    let deadline = Instant::now() + Duration::from_secs(5);
    // A UDP send to a port nobody listens on fails only once the neighbour resolves;
    // send until the link carries it (ICMP port unreachable comes back as an error).
    s.connect((to, 9)).expect("connect probe");
    s.set_read_timeout(Some(Duration::from_millis(50))).ok();
    while Instant::now() < deadline {
        let _ = s.send(b"x");
        let mut b = [0u8; 1];
        if let Err(e) = s.recv(&mut b)
            && e.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return;
        }
    }
    panic!("link {from} -> {to} did not come up");
}

/// A NAS socket bound in the current namespace (call inside [`NetNs::run`]).
pub fn nas_socket(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip.parse::<IpAddr>().expect("ip"), 0)).expect("bind NAS socket");
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    s
}

/// A well-formed RADIUS-shaped datagram of `len` bytes (>= 20) whose payload says who sent
/// it: code 1, Identifier `seq`, length field `len`, then `tag` and `seq` in the
/// authenticator.
pub fn packet(tag: u32, seq: u32, len: usize) -> Vec<u8> {
    assert!((20..=4096).contains(&len));
    let mut p = vec![0u8; len];
    p[0] = 1;
    p[1] = seq as u8;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..8].copy_from_slice(&tag.to_be_bytes());
    p[8..12].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p.iter_mut().enumerate().skip(20) {
        *b = (i as u32 ^ tag ^ seq) as u8;
    }
    p
}

/// `(tag, seq)` of a datagram made by [`packet`].
pub fn tag_of(p: &[u8]) -> (u32, u32) {
    let t = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    let s = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
    (t, s)
}

/// Everything that is queued on `sockets` until `quiet` passes with nothing new: (index of
/// the socket, source, bytes).
pub fn drain(sockets: &[&UdpSocket], quiet: Duration) -> Vec<(usize, SocketAddr, Vec<u8>)> {
    for s in sockets {
        s.set_nonblocking(true).expect("nonblocking");
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut last = Instant::now();
    let hard_stop = Instant::now() + Duration::from_secs(30);
    while last.elapsed() < quiet && Instant::now() < hard_stop {
        let mut got = false;
        for (i, s) in sockets.iter().enumerate() {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                out.push((i, from, buf[..n].to_vec()));
                got = true;
            }
        }
        if got {
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    out
}

/// The daemon binary next to the test executables (built by `cargo xtask test`, or by
/// `cargo build` of radius-userspace in the same profile).
pub fn sidecar_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RADIUS_SIDECAR_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Tests live in target/<profile>/deps, binaries in target/<profile>.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("radius-sidecar"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "radius-sidecar is missing near {}: build it first (`cargo xtask test` does)",
                exe.display()
            )
        })
}

/// `radius-sidecar ARGS` (the binary at `bin`) run to its end inside `ns`: whether it
/// succeeded, and what it printed (stdout, then stderr).
pub fn sidecar_cli(ns: &NetNs, bin: &Path, args: &[&str]) -> (bool, String) {
    let out = ns
        .command(bin.to_str().expect("utf-8 path"))
        .args(args)
        .output()
        .expect("run radius-sidecar");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A running daemon whose stderr is collected; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    /// Starts `radius-sidecar` in `ns` with `args`, as `user` (None: root), logging at
    /// `RADIUS_SIDECAR_FILTER` (default `info`; `debug` to follow a failing test).
    pub fn start<S: AsRef<std::ffi::OsStr>>(ns: &NetNs, user: Option<&str>, args: &[S]) -> Self {
        let filter = std::env::var("RADIUS_SIDECAR_FILTER").unwrap_or_else(|_| "info".into());
        Self::start_logging(ns, user, args, &filter)
    }

    /// As [`Daemon::start`], with `RUST_LOG` set to `filter` (e.g. "trace").
    pub fn start_logging<S: AsRef<std::ffi::OsStr>>(
        ns: &NetNs,
        user: Option<&str>,
        args: &[S],
        filter: &str,
    ) -> Self {
        Self::start_binary(&sidecar_bin(), ns, user, args, filter)
    }

    /// As [`Daemon::start_logging`], running the daemon binary at `bin` (another build, for
    /// benchmarks).
    pub fn start_binary<S: AsRef<std::ffi::OsStr>>(
        bin: &std::path::Path,
        ns: &NetNs,
        user: Option<&str>,
        args: &[S],
        filter: &str,
    ) -> Self {
        let mut cmd = match user {
            None => ns.command(bin.to_str().expect("utf-8 path")),
            Some(u) => {
                let mut c = ns.command("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={u}"),
                    "--clear-groups",
                    "--inh-caps=-all",
                    bin.to_str().expect("utf-8 path"),
                ]);
                c
            }
        };
        cmd.args(args).env("RUST_LOG", filter);
        Self::spawn(cmd)
    }

    /// Runs `cmd` (the daemon, or a wrapper that execs it: `setpriv`, `sh -c`), its log
    /// captured.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn radius-sidecar");
        let mut err = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        // Tests echo the daemon's log (captured by libtest); the demo turns it off.
        let echo = std::env::var("RADIUS_SIDECAR_LOG").map_or(true, |v| v != "0");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]).to_string();
                if echo {
                    eprint!("[sidecar] {s}");
                }
                sink.lock().expect("log").push_str(&s);
            }
        });
        Self { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until the log contains `needle` (or the daemon exits, or `timeout`).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return self.log().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends `signal` and waits up to `timeout` for the exit status.
    pub fn stop(&mut self, signal: i32, timeout: Duration) -> Option<std::process::ExitStatus> {
        // `ip netns exec` execs the program, so the pid is the daemon's.
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /metrics` from inside `ns`: the whole text ("" when nothing answers).
pub fn metrics_text(ns: &NetNs, addr: &str) -> String {
    let addr = addr.to_owned();
    ns.run(move || {
        let Ok(mut c) = TcpStream::connect(&addr) else {
            return String::new();
        };
        let _ = c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut body = String::new();
        let _ = c.read_to_string(&mut body);
        body
    })
}

/// `GET /metrics` from inside `ns`; returns the value of one sample line
/// (e.g. `radius_flows_created_total`), 0 when absent.
pub fn metric(ns: &NetNs, addr: &str, sample: &str) -> u64 {
    metrics_text(ns, addr)
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

/// Whether any loaded eBPF program has this name (the kernel truncates names to 15 bytes).
pub fn program_loaded(name: &str) -> bool {
    aya::programs::loaded_programs().any(|p| {
        p.ok()
            .and_then(|p| p.name_as_str().map(|n| n == name))
            .unwrap_or(false)
    })
}

/// A FreeRADIUS virtual server's text without its `listen { ... }` sections (they hold no
/// nested braces).
fn without_listen(text: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim();
        if !skipping && t.starts_with("listen") && t.ends_with('{') {
            skipping = true;
        } else if skipping {
            skipping = t != "}";
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What a private FreeRADIUS is given on top of Debian's configuration.
#[derive(Clone, Copy, Default)]
pub struct FreeRadiusSetup<'a> {
    /// (address or prefix, secret).
    pub clients: &'a [(&'a str, &'a str)],
    /// The `files` module's authorize file.
    pub users: &'a str,
    /// Loopback ports `auth_port` (auth) and `auth_port + 1` (acct).
    pub auth_port: u16,
    /// A whole `proxy.conf` (home servers, pools, realms), for FreeRADIUS as a proxy.
    pub proxy_conf: Option<&'a str>,
    /// A RadSec listener (its `tls` site) beside the UDP ones.
    pub tls: Option<FreeRadiusTls<'a>>,
    /// The IPv4 address its UDP listeners bind (default 127.0.0.1).
    pub address: Option<&'a str>,
    /// Unlang put first in the default site's `authorize` section (e.g. to answer slowly).
    pub authorize: Option<&'a str>,
    /// Files written into its configuration directory: (relative path, content), e.g. a
    /// module in `mods-enabled/`.
    pub files: &'a [(&'a str, &'a str)],
}

/// FreeRADIUS as a RADIUS/TLS server (RFC 6614): a `proto = tcp` listener with a `tls`
/// block on 127.0.0.1, whose clients must present a certificate of `ca` and use the
/// secret `radsec`.
#[derive(Clone, Copy)]
pub struct FreeRadiusTls<'a> {
    pub port: u16,
    pub certificate: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
    /// Addresses or prefixes allowed to connect.
    pub clients: &'a [&'a str],
}

/// A private FreeRADIUS (Debian's package) in a namespace: the packaged configuration copied
/// to a temporary directory, with our clients, users and no reject delay. Killed on drop.
pub struct FreeRadius {
    pub child: Child,
    pub dir: PathBuf,
}

impl FreeRadius {
    /// `clients`: (address or prefix, secret). `users`: the `files` module's authorize file.
    /// Listens on the namespace's loopback, ports 1812 and 1813.
    pub fn start(ns: &NetNs, clients: &[(&str, &str)], users: &str) -> Self {
        Self::start_on(ns, clients, users, 1812)
    }

    /// As [`FreeRadius::start`], on loopback ports `auth_port` and `auth_port + 1`.
    pub fn start_on(ns: &NetNs, clients: &[(&str, &str)], users: &str, auth_port: u16) -> Self {
        Self::start_with(
            ns,
            &FreeRadiusSetup {
                clients,
                users,
                auth_port,
                ..Default::default()
            },
        )
    }

    /// The general form: [`FreeRadiusSetup`] says what differs from Debian's configuration.
    /// Every listener gets an 8 MB receive buffer, so that bursts are not lost in the kernel.
    /// With `FREERADIUS_DEBUG` set, it logs at `-xx` (to follow a failing test).
    pub fn start_with(ns: &NetNs, setup: &FreeRadiusSetup<'_>) -> Self {
        let FreeRadiusSetup {
            clients,
            users,
            auth_port,
            proxy_conf,
            tls,
            address,
            authorize,
            files,
        } = *setup;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rs-freeradius-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sh(&[
            "cp",
            "-a",
            "/etc/freeradius/3.0",
            dir.to_str().expect("utf-8"),
        ]);
        let conf = dir.join("radiusd.conf");
        let text = std::fs::read_to_string(&conf).expect("radiusd.conf");
        let text = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("user = ") || t.starts_with("group = ") {
                    format!("#{l}")
                } else if t.starts_with("reject_delay = ") {
                    "\treject_delay = 0".to_owned()
                } else if t.starts_with("logdir = ") {
                    format!("logdir = {}/log", dir.display())
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&conf, text).expect("write radiusd.conf");
        std::fs::create_dir_all(dir.join("log/radacct")).expect("log dir");
        // Loopback only, on our ports: the listen blocks are auth, acct, auth (v6), acct (v6).
        let site = dir.join("sites-enabled/default");
        let text = std::fs::read_to_string(&site).expect("sites-enabled/default");
        let mut ports = [auth_port, auth_port + 1, auth_port, auth_port + 1].into_iter();
        let text = text
            .lines()
            .map(|l| match l.trim() {
                "ipaddr = *" => format!(
                    "\tipaddr = {}\n\trecv_buff = 8388608",
                    address.unwrap_or("127.0.0.1")
                ),
                "authorize {" => format!("authorize {{\n{}", authorize.unwrap_or_default()),
                t if t.starts_with("ipv6addr = ::") => {
                    "\tipv6addr = ::1\n\trecv_buff = 8388608".to_owned()
                }
                "port = 0" => format!("\tport = {}", ports.next().unwrap_or(auth_port)),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&site, text).expect("write site");
        // The inner tunnel's own loopback listener (Debian: 18120, for testing the tunnel
        // by hand) goes: EAP reaches the inner tunnel without it, and a port of its own per
        // instance could meet another instance's ephemeral socket (it did, in CI).
        let inner = dir.join("sites-enabled/inner-tunnel");
        let text = std::fs::read_to_string(&inner).expect("sites-enabled/inner-tunnel");
        std::fs::write(&inner, without_listen(&text)).expect("write inner-tunnel");
        let mut c = String::new();
        for (i, (addr, secret)) in clients.iter().enumerate() {
            c.push_str(&format!(
                "client c{i} {{\n ipaddr = {addr}\n secret = {secret}\n require_message_authenticator = no\n}}\n"
            ));
        }
        std::fs::write(dir.join("clients.conf"), c).expect("clients.conf");
        std::fs::write(dir.join("mods-config/files/authorize"), users).expect("users");
        if let Some(p) = proxy_conf {
            std::fs::write(dir.join("proxy.conf"), p).expect("proxy.conf");
        }
        if let Some(t) = tls {
            std::fs::write(dir.join("sites-enabled/tls"), tls_site(&t)).expect("tls site");
        }
        for (path, content) in files {
            std::fs::write(dir.join(path), content).expect("a configuration file");
        }
        let log = File::create(dir.join("stdout.log")).expect("log file");
        let child = ns
            .command("freeradius")
            .args(["-f", "-l", "stdout", "-d", dir.to_str().expect("utf-8")])
            .args(std::env::var("FREERADIUS_DEBUG").ok().map(|_| "-xx"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start freeradius");
        let fr = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fr.log().contains("Ready to process requests") {
            assert!(
                Instant::now() < deadline,
                "FreeRADIUS did not start: {}",
                fr.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fr
    }

    /// How many records of session `session` its detail file holds (accounting from
    /// 127.0.0.1).
    pub fn detail_records(&self, session: &str) -> usize {
        let dir = self.dir.join("log/radacct/127.0.0.1");
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .map(|t| {
                        t.matches(&format!("Acct-Session-Id = \"{session}\""))
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The detail file's record of session `session` (accounting from 127.0.0.1), as
    /// FreeRADIUS wrote it: one attribute a line.
    pub fn detail_record(&self, session: &str) -> Option<String> {
        let dir = self.dir.join("log/radacct/127.0.0.1");
        let needle = format!("Acct-Session-Id = \"{session}\"");
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .flat_map(|t| t.split("\n\n").map(str::to_owned).collect::<Vec<_>>())
            .find(|r| r.contains(&needle))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }
}

/// The `tls` site of [`FreeRadiusTls`], after Debian's `sites-available/tls`.
fn tls_site(t: &FreeRadiusTls<'_>) -> String {
    let mut clients = String::new();
    for (i, c) in t.clients.iter().enumerate() {
        clients.push_str(&format!(
            " client radsec{i} {{\n  ipaddr = {c}\n  proto = tls\n  secret = radsec\n }}\n"
        ));
    }
    format!(
        "listen {{\n ipaddr = 127.0.0.1\n port = {port}\n type = auth+acct\n proto = tcp\n \
         virtual_server = default\n clients = radsec\n \
         limit {{\n  max_connections = 64\n  lifetime = 0\n  idle_timeout = 30\n }}\n \
         tls {{\n  private_key_file = {key}\n  certificate_file = {cert}\n  ca_file = {ca}\n  \
         fragment_size = 8192\n  cipher_list = \"DEFAULT\"\n  tls_min_version = \"1.2\"\n  \
         tls_max_version = \"1.3\"\n  require_client_cert = yes\n }}\n}}\n\
         clients radsec {{\n{clients}}}\n",
        port = t.port,
        key = t.key.display(),
        cert = t.certificate.display(),
        ca = t.ca.display(),
    )
}

impl Drop for FreeRadius {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the sidecar in `ns` on the configuration `toml` (written to a temporary file) and
/// waits until it listens.
pub fn sidecar_with_config(ns: &NetNs, tag: &str, toml: &str) -> Daemon {
    sidecar_with_config_of(ns, tag, toml, None)
}

/// As [`sidecar_with_config`], with the daemon binary at `bin` (None: this build's).
pub fn sidecar_with_config_of(
    ns: &NetNs,
    tag: &str,
    toml: &str,
    bin: Option<&std::path::Path>,
) -> Daemon {
    let path = std::env::temp_dir().join(format!("rs-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, toml).expect("write the configuration");
    let args = ["--config", path.to_str().expect("utf-8")];
    let mut d = match bin {
        Some(b) => Daemon::start_binary(b, ns, None, &args, "info"),
        None => Daemon::start(ns, None, &args),
    };
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "the sidecar starts on {}",
        path.display()
    );
    d
}

/// A PAP Access-Request built by the codec: Message-Authenticator first, User-Name,
/// User-Password hidden with `secret`, then `extra` attributes; signed. Returns the bytes and
/// the Request Authenticator a reply verifies against.
pub fn pap_request(
    id: u8,
    user: &str,
    password: &str,
    secret: &str,
    extra: &[(u8, &[u8])],
) -> (Vec<u8>, [u8; 16]) {
    use radius_sidecar::codec::{Code, PacketMut, attr, auth, hide};
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).expect("header");
    let a = auth::random_authenticator();
    p.set_authenticator(&a);
    p.message_authenticator_first().expect("room");
    p.push(attr::USER_NAME, user.as_bytes()).expect("room");
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(password.as_bytes(), secret.as_bytes(), &a, &mut h)
        .expect("a short password");
    p.push(attr::USER_PASSWORD, &h[..n]).expect("room");
    for (t, v) in extra {
        p.push(*t, v).expect("room");
    }
    p.sign(secret.as_bytes(), None).expect("sign");
    (p.as_bytes().to_vec(), a)
}

/// One PAP Access-Request for alice (password "alice-pw") from `from` (any port) to `to`,
/// signed with `secret`: whether a verified Access-Accept came back within `patience`. Run
/// it inside the NAS's namespace.
pub fn pap_accepted(from: &str, to: (&str, u16), secret: &str, patience: Duration) -> bool {
    use radius_sidecar::codec::{Code, Packet, auth};
    let s = UdpSocket::bind((from, 0)).expect("a NAS socket");
    s.set_read_timeout(Some(patience)).ok();
    let (req, a) = pap_request(1, "alice", "alice-pw", secret, &[]);
    s.send_to(&req, to).expect("send");
    let mut b = [0u8; 4096];
    let Ok(len) = s.recv(&mut b) else {
        return false;
    };
    Packet::parse(&b[..len]).is_ok_and(|p| {
        p.code() == Code::AccessAccept && auth::verify(&p, secret.as_bytes(), Some(&a)).is_ok()
    })
}

/// Starts radclient in `ns` with `args`, writes `input` (its attribute list) to its stdin and
/// returns the running child; stdout and stderr are piped.
pub fn spawn_radclient(ns: &NetNs, args: &[&str], input: &str) -> Child {
    let mut child = ns
        .command("radclient")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("radclient (package freeradius-utils)");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .expect("radclient's stdin");
    }
    child
}

/// Runs radclient in `ns` (as [`spawn_radclient`]) to its end: whether it succeeded, and
/// what it printed (stdout, then stderr).
pub fn run_radclient(ns: &NetNs, args: &[&str], input: &str) -> (bool, String) {
    let out = spawn_radclient(ns, args, input)
        .wait_with_output()
        .expect("radclient ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Replaces the text between the `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` lines
/// of the Markdown file `path` with `table`, or appends a section titled `heading`.
pub fn splice_markdown(
    path: &str,
    marker: &str,
    heading: &str,
    table: &str,
) -> std::io::Result<()> {
    let begin = format!("<!-- {marker}:begin -->");
    let end = format!("<!-- {marker}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{begin}\n{table}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], block, &old[e + end.len()..]),
        _ => format!("{}\n\n## {heading}\n\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new)
}

/// Certificates for RADIUS/TLS tests, made by rcgen and written as PEM files in `dir`:
/// `ca.pem`; `server.pem`/`server.key` (SAN: DNS `sidecar`, the sidecar's addresses);
/// `nas.pem`/`nas.key` (a NAS's client certificate from the same CA); `rogue.pem`/`rogue.key`
/// (from a CA nobody trusts); `expired.pem`/`expired.key` (the right CA, expired in 2021).
pub fn write_test_pki(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };
    std::fs::create_dir_all(dir)?;
    let ca_params = |name: &str| -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ok(p)
    };
    let ca =
        CertifiedIssuer::self_signed(ca_params("radius-sidecar test CA")?, KeyPair::generate()?)?;
    let rogue_ca =
        CertifiedIssuer::self_signed(ca_params("a CA nobody trusts")?, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let leaf = |name: &str,
                file: &str,
                ips: &[&str],
                issuer: &CertifiedIssuer<'_, KeyPair>,
                expired: bool|
     -> anyhow::Result<()> {
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        for ip in ips {
            p.subject_alt_names.push(SanType::IpAddress(ip.parse()?));
        }
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, issuer)?;
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem())?;
        Ok(())
    };
    leaf(
        "sidecar",
        "server",
        &[SIDECAR1_V4, SIDECAR2_V4, "127.0.0.1"],
        &ca,
        false,
    )?;
    leaf("nas1", "nas", &[NAS1_V4], &ca, false)?;
    leaf("nas1", "rogue", &[NAS1_V4], &rogue_ca, false)?;
    leaf("nas1", "expired", &[NAS1_V4], &ca, true)?;
    Ok(())
}

/// A RADIUS/TLS client of the tests: a blocking TLS stream to `to` (an address:port)
/// presenting the client certificate `cert` (`{cert}.pem`, `{cert}.key` in `pki`) and
/// trusting `pki/ca.pem`. Call it inside [`NetNs::run`] to connect from that namespace.
pub fn tls_connect(
    pki: &Path,
    cert: &str,
    to: &str,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.pem"))? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(pki.join(format!("{cert}.pem")))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.join(format!("{cert}.key")))?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(ring_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let addr: SocketAddr = to.parse()?;
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::IpAddress(addr.ip().into()),
    )?;
    let sock = TcpStream::connect(addr)?;
    Ok(rustls::StreamOwned::new(conn, sock))
}

#[expect(
    deprecated,
    reason = "the daemon's provider: ring, without post-quantum groups"
)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A private PostgreSQL in a namespace, from Debian's package, with FreeRADIUS's schema and
/// the `nas` rows given; it can be stopped and started again (the fault tests); stopped on
/// drop.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    ns: String,
}

impl Postgres {
    pub const PORT: u16 = 15432;

    /// `rows`: SQL that fills the `nas` table.
    pub fn start(ns: &NetNs, rows: &str) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL (package postgresql)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!(
            "rs-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("PostgreSQL's directory");
        sh(&["chown", "postgres:postgres", dir.to_str().expect("utf-8")]);
        let pg = Self {
            dir,
            bin,
            ns: ns.name.clone(),
        };
        let data = pg.dir.join("data");
        pg.run(&[
            pg.bin.join("initdb").to_str().expect("utf-8"),
            "-D",
            data.to_str().expect("utf-8"),
            "--auth=trust",
            "-U",
            "postgres",
        ]);
        pg.resume();
        // FreeRADIUS's own schema, copied where the postgres user may read it.
        let schema = pg.dir.join("schema.sql");
        std::fs::copy(
            "/etc/freeradius/3.0/mods-config/sql/main/postgresql/schema.sql",
            &schema,
        )
        .expect("FreeRADIUS's PostgreSQL schema (package freeradius)");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&schema, std::fs::Permissions::from_mode(0o644))
            .expect("chmod schema");
        let port = Self::PORT.to_string();
        let psql = [
            "psql",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
        ];
        pg.run(&[&psql[..], &["-f", schema.to_str().expect("utf-8")]].concat());
        pg.run(&[&psql[..], &["-c", rows]].concat());
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", Self::PORT)
    }

    fn run(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.ns, "runuser", "-u", "postgres", "--"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("runuser");
        assert!(st.success(), "{args:?}");
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let ctl = self.bin.join("pg_ctl");
        let base = [
            ctl.to_str().expect("utf-8"),
            "-D",
            data.to_str().expect("utf-8"),
            "-w",
        ];
        self.run(&[&base[..], args].concat());
    }

    /// Stops the server (fast shutdown: connections are closed).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }

    /// Starts it (again), and waits until it accepts connections.
    pub fn resume(&self) {
        let log = self.dir.join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            Self::PORT,
            self.dir.display()
        );
        self.pg_ctl(&["-l", log.to_str().expect("utf-8"), "-o", &opts, "start"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "runuser", "-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid of the new process in what `radius-sidecar upgrade` answered.
pub fn upgraded_pid(said: &str) -> i32 {
    said.split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("the new process's pid in the answer")
}

/// Stops a process that is not our child (SIGTERM, then SIGKILL) when dropped.
pub struct StopOnDrop(pub i32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on a pid this test started (through an upgrade).
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(self.0, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        if unsafe { libc::kill(self.0, 0) } == 0 {
            // SAFETY: plain kill(2), as above.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}
