//! `cargo xtask bench steer`: packets per second delivered to the right child socket with
//! 10, 1 000 and 15 000 registered flows, on the eBPF fast path and on the user-space path,
//! measured in one run, with memory per flow. Root only: it works in a network namespace of
//! its own, on that namespace's loopback.
//!
//! A sender thread writes IPv4/UDP datagrams through a raw socket (so one socket can speak
//! for 15 000 source ports), 16 in a row per flow, with at most `WINDOW` datagrams not yet
//! read; a receiver thread reads the children through epoll and `recvmmsg`, and checks that
//! each datagram belongs to the child that got it. Loopback delivers in the sender's
//! context, so the sender thread's CPU time holds the kernel's whole receive path, steering
//! included; the table gives it and the process total, per datagram.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use radius_common::PROTO_UDP;
use radius_sidecar::{
    fastpath::{FastPath, FastPathOptions},
    socket::{SteeringPath, bind_child, bind_wildcards, flow_key, raise_nofile_limit},
};
use tests::NetNs;

const BURST_PER_FLOW: usize = 16;
const PACKETS: u64 = 1_000_000;
const MAX_TIME: Duration = Duration::from_secs(15);
const PAYLOAD: usize = 64;
const SERVICE_PORT: u16 = 1812;
/// The secret of the embedded configuration's client (127.0.0.0/8).
const DEFAULT_CLIENT_SECRET: &str = "testing123";
const FIRST_PORT: u16 = 20_000;

struct Row {
    flows: usize,
    path: SteeringPath,
    delivered: u64,
    lost: u64,
    wrong: u64,
    secs: f64,
    sender_ns: f64,
    total_ns: f64,
    slab_bytes_per_flow: f64,
    map_bytes_per_flow: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let mut flows = vec![10usize, 1_000, 15_000];
    let mut write: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--flows" => {
                flows = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|f| f.parse())
                    .collect::<Result<_, _>>()?
            }
            "--write" => write = args.next(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("steer-bench needs root (a network namespace and eBPF)");
    }
    let nofile = raise_nofile_limit()?;
    let ns = NetNs::new("bench");
    // Three rounds, paths interleaved so drift hits both alike; each row is the median
    // round by CPU per packet.
    const ROUNDS: usize = 3;
    let mut runs: Vec<Vec<Row>> = (0..flows.len() * 2).map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        let mut k = 0;
        for &n in &flows {
            for path in [SteeringPath::Fast, SteeringPath::UserSpace] {
                let row = ns.run(move || measure(n, path))?;
                eprintln!(
                    "{:>6} flows {:>10}: {:>9.0} pkt/s, {:>6.0} ns/pkt (sender+stack {:>5.0}), wrong {}, lost {}",
                    row.flows,
                    row.path.as_str(),
                    row.delivered as f64 / row.secs,
                    row.total_ns,
                    row.sender_ns,
                    row.wrong,
                    row.lost
                );
                runs[k].push(row);
                k += 1;
            }
        }
    }
    let rows: Vec<Row> = runs
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.total_ns.total_cmp(&b.total_ns));
            r.swap_remove(r.len() / 2)
        })
        .collect();
    let mut daemon_rows = Vec::new();
    if let Some(&n) = flows.iter().max() {
        for path in [SteeringPath::Fast, SteeringPath::UserSpace] {
            let (user, slab) = daemon_memory(&ns, n, path)?;
            eprintln!(
                "daemon, {n} flows, {}: {user:.0} B/flow RSS, {slab:.0} B/flow slab",
                path.as_str()
            );
            daemon_rows.push((n, path, user, slab));
        }
    }
    let mut table = render(&rows, nofile);
    let _ = writeln!(
        table,
        "\nThe daemon itself (`radius-sidecar` on its embedded configuration, one worker; each \
         flow made by one signed Access-Request, in flight upstream while measured):\n\n| flows | path | daemon RSS bytes/flow | kernel slab bytes/flow |\n| ---: | --- | ---: | ---: |"
    );
    for (n, path, user, slab) in &daemon_rows {
        let _ = writeln!(table, "| {n} | {} | {user:.0} | {slab:.0} |", path.as_str());
    }
    println!("{table}");
    if let Some(path) = write {
        tests::splice_markdown(
            &path,
            "steer",
            "steer: packets to the right child (`cargo xtask bench steer`)",
            &table,
        )?;
        eprintln!("written to {path}");
    }
    Ok(())
}

fn measure(n: usize, path: SteeringPath) -> anyhow::Result<Row> {
    let lo = Ipv4Addr::LOCALHOST;
    let service = SocketAddr::from((lo, SERVICE_PORT));
    let wildcards = bind_wildcards(service, 1, 4 << 20)?;
    let mut fastpath = match path {
        SteeringPath::Fast => {
            let mut fp = FastPath::load(&FastPathOptions {
                max_flows: (n as u32).max(16),
                ..FastPathOptions::default()
            })?;
            fp.attach_steer()?;
            fp.add_service(PROTO_UDP, service, &wildcards)?;
            Some(fp)
        }
        SteeringPath::UserSpace => None,
    };

    let slab0 = meminfo_kb("Slab:") * 1024;
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let remote = SocketAddr::from((lo, FIRST_PORT + i as u16));
        let c = bind_child(path, service, service, remote)?;
        if let Some(fp) = &mut fastpath {
            fp.register_child(&flow_key(remote, service), c.as_raw_fd())?;
        }
        children.push(c);
    }
    let slab_bytes_per_flow = (meminfo_kb("Slab:") * 1024).saturating_sub(slab0) as f64 / n as f64;
    let map_bytes_per_flow = fastpath.as_ref().map(|_| map_bytes_per_entry());

    let received = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_ns(libc::RUSAGE_SELF);
    let start = Instant::now();
    let receiver = {
        let (received, wrong, done) = (received.clone(), wrong.clone(), done.clone());
        std::thread::spawn(move || receive(children, received, wrong, done))
    };
    // At most ~64 unread per child: well inside a child's default receive buffer.
    let window = (n as u64 * 64).clamp(1024, 8192);
    let (sent, sender_ns) = send(n, &received, window);
    // Let the last window arrive (bounded).
    let deadline = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let children = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let total_cpu = cpu_ns(libc::RUSAGE_SELF) - cpu0;
    let delivered = received.load(Ordering::Relaxed);
    drop(children);
    drop(fastpath);
    drop(wildcards);
    Ok(Row {
        flows: n,
        path,
        delivered,
        lost: sent.saturating_sub(delivered),
        wrong: wrong.load(Ordering::Relaxed),
        secs,
        sender_ns: sender_ns / delivered.max(1) as f64,
        total_ns: total_cpu / delivered.max(1) as f64,
        slab_bytes_per_flow,
        map_bytes_per_flow,
    })
}

/// Sends PACKETS datagrams (or for MAX_TIME), BURST_PER_FLOW per flow in turn, keeping at
/// most `window` unread. Returns what was sent and the sender thread's CPU nanoseconds.
fn send(n: usize, received: &AtomicU64, window: u64) -> (u64, f64) {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let cpu0 = cpu_ns(libc::RUSAGE_THREAD);
    let start = Instant::now();
    let dst = loopback();
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 28 + PAYLOAD]; BATCH];
    let mut sent = 0u64;
    let mut flow = 0usize;
    let mut in_burst = 0usize;
    while sent < PACKETS && start.elapsed() < MAX_TIME {
        if sent.saturating_sub(received.load(Ordering::Relaxed)) > window {
            std::hint::spin_loop();
            continue;
        }
        for b in bufs.iter_mut() {
            datagram(b, FIRST_PORT + flow as u16, flow as u32);
            in_burst += 1;
            if in_burst == BURST_PER_FLOW {
                in_burst = 0;
                flow = (flow + 1) % n;
            }
        }
        let (_iov, mut msgs) = mmsg(&mut bufs, Some(&dst));
        // SAFETY: msgs point at live buffers.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if r > 0 {
            sent += r as u64;
        }
    }
    let ns = cpu_ns(libc::RUSAGE_THREAD) - cpu0;
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    (sent, ns)
}

/// The raw socket's destination: 127.0.0.1.
fn loopback() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Headers for sendmmsg/recvmmsg over `bufs` (the iovecs must outlive the headers).
fn mmsg<const N: usize>(
    bufs: &mut [[u8; N]],
    name: Option<&libc::sockaddr_in>,
) -> (Vec<libc::iovec>, Vec<libc::mmsghdr>) {
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: N,
        })
        .collect();
    let msgs = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: zeroed mmsghdr is valid.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(name) = name {
                m.msg_hdr.msg_name = name as *const _ as *mut _;
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            }
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    (iov, msgs)
}

/// An IPv4 + UDP header and a payload naming the flow, from 127.0.0.1:`sport`.
fn datagram(b: &mut [u8; 28 + PAYLOAD], sport: u16, flow: u32) {
    udp_header(b, sport, PAYLOAD);
    b[28] = 1;
    b[30..32].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    b[32..36].copy_from_slice(&flow.to_be_bytes());
}

/// An IPv4/UDP datagram from 127.0.0.1:`sport` to the service port carrying `payload`.
fn udp_datagram(b: &mut [u8], sport: u16, payload: &[u8]) {
    udp_header(b, sport, payload.len());
    b[28..28 + payload.len()].copy_from_slice(payload);
}

/// The IPv4 and UDP headers (`b[..28]`) of a datagram from 127.0.0.1:`sport` to the
/// service port with `len` bytes of payload.
fn udp_header(b: &mut [u8], sport: u16, len: usize) {
    b[0] = 0x45;
    b[2..4].copy_from_slice(&((28 + len) as u16).to_be_bytes());
    b[8] = 64;
    b[9] = 17;
    b[12..16].copy_from_slice(&[127, 0, 0, 1]);
    b[16..20].copy_from_slice(&[127, 0, 0, 1]);
    b[20..22].copy_from_slice(&sport.to_be_bytes());
    b[22..24].copy_from_slice(&SERVICE_PORT.to_be_bytes());
    b[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    b[26..28].copy_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
}

/// Reads every child through epoll; counts datagrams and those on the wrong child.
fn receive(
    children: Vec<UdpSocket>,
    received: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> Vec<UdpSocket> {
    // SAFETY: plain epoll_create1.
    let ep = unsafe { libc::epoll_create1(0) };
    assert!(ep >= 0);
    for (i, c) in children.iter().enumerate() {
        c.set_nonblocking(true).expect("nonblocking");
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: valid fds and event.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
        assert_eq!(rc, 0);
    }
    const VLEN: usize = BURST_PER_FLOW;
    let mut bufs = vec![[0u8; 256]; VLEN];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    while !done.load(Ordering::Relaxed) {
        // SAFETY: events buffer is live.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 10) };
        for ev in events.iter().take(n.max(0) as usize) {
            let idx = ev.u64 as usize;
            let fd = children[idx].as_raw_fd();
            loop {
                let (_iov, mut msgs) = mmsg(&mut bufs, None);
                // SAFETY: msgs point at live buffers.
                let r = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        VLEN as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if r <= 0 {
                    break;
                }
                let mut bad = 0;
                for b in bufs.iter().take(r as usize) {
                    let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
                    if flow != idx {
                        bad += 1;
                    }
                }
                wrong.fetch_add(bad, Ordering::Relaxed);
                received.fetch_add(r as u64, Ordering::Relaxed);
                if (r as usize) < VLEN {
                    break;
                }
            }
        }
    }
    // SAFETY: our fd.
    unsafe { libc::close(ep) };
    children
}

/// Starts the daemon in `ns`, makes `n` flows (one datagram each), and returns its RSS and
/// the kernel's slab growth per flow.
fn daemon_memory(ns: &NetNs, n: usize, path: SteeringPath) -> anyhow::Result<(f64, f64)> {
    const METRICS: &str = "127.0.0.1:9812";
    let mut args = vec![
        "--listen",
        "127.0.0.1:1812",
        "--workers",
        "1",
        "--iface",
        "none",
        "--metrics",
        METRICS,
    ];
    if path == SteeringPath::UserSpace {
        args.push("--no-ebpf");
    }
    let mut d = tests::Daemon::start(ns, None, &args);
    anyhow::ensure!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "the daemon did not start"
    );
    let pid = d.child.id();
    let rss = || {
        field_kb(
            &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
            "VmRSS:",
        ) * 1024
    };
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, slab0) = (rss(), meminfo_kb("Slab:") * 1024);
    // A signed Access-Request (Message-Authenticator, the embedded default client's secret):
    // it proves its source, so each makes a flow with its own socket (an unsigned one makes
    // only a provisional flow, without one). The same bytes from every source port.
    let (request, _) = tests::pap_request(7, "bench", "bench-pw", DEFAULT_CLIENT_SECRET, &[]);
    ns.run(move || {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        let dst = loopback();
        let mut b = vec![0u8; 28 + request.len()];
        for i in 0..n {
            udp_datagram(&mut b, FIRST_PORT + i as u16, &request);
            // SAFETY: valid buffer and address.
            unsafe {
                libc::sendto(
                    fd,
                    b.as_ptr().cast(),
                    b.len(),
                    0,
                    (&dst as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            // ~10 000 new flows per second: a burst of 15 000 in 0.1 s overflows the 4 MB
            // wildcard buffer while children are being made (seen: 11 603 of 15 000 made).
            if i % 64 == 63 {
                std::thread::sleep(Duration::from_millis(6));
            }
        }
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while tests::metric(ns, METRICS, "radius_flows_active") < n as u64 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let made = tests::metric(ns, METRICS, "radius_flows_active");
    anyhow::ensure!(made == n as u64, "only {made} of {n} flows were made");
    std::thread::sleep(Duration::from_millis(300));
    let (rss1, slab1) = (rss(), meminfo_kb("Slab:") * 1024);
    d.stop(libc::SIGTERM, Duration::from_secs(10));
    Ok((
        rss1.saturating_sub(rss0) as f64 / n as f64,
        slab1.saturating_sub(slab0) as f64 / n as f64,
    ))
}

fn cpu_ns(who: i32) -> f64 {
    // SAFETY: valid out-pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e9 + tv.tv_usec as f64 * 1e3;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn field_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn meminfo_kb(key: &str) -> u64 {
    field_kb(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        key,
    )
}

/// Kernel memory of CHILDREN + FLOWS per entry of capacity (both are preallocated), from
/// the memlock line of each map's fdinfo.
fn map_bytes_per_entry() -> f64 {
    let names: HashMap<u32, String> = aya::maps::loaded_maps()
        .filter_map(|m| m.ok())
        .filter_map(|m| Some((m.id(), m.name_as_str()?.to_owned())))
        .collect();
    let mut per_entry = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0.0;
    };
    let mut seen = std::collections::HashSet::new();
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let id = field_kb(&text, "map_id:") as u32;
        if id == 0 || !seen.insert(id) {
            continue;
        }
        let name = names.get(&id).map(String::as_str).unwrap_or("");
        if name == "CHILDREN" || name == "FLOWS" {
            let memlock = field_kb(&text, "memlock:") as f64;
            let max = field_kb(&text, "max_entries:").max(1) as f64;
            per_entry += memlock / max;
        }
    }
    per_entry
}

fn render(rows: &[Row], nofile: u64) -> String {
    let mut t = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        t,
        "Machine: {cpu}, {cores} cores, Linux {}, open-file limit {nofile}.",
        kernel.trim()
    );
    let _ = writeln!(
        t,
        "Loopback in a private network namespace; raw-socket sender, {BURST_PER_FLOW} datagrams \
         per flow in turn, at most 64 unread per flow (1 024 to 8 192 in all); up to {PACKETS} datagrams or {}s per run; each row is the median of 3 runs (by CPU per packet), paths interleaved.\n",
        MAX_TIME.as_secs()
    );
    let _ = writeln!(
        t,
        "| flows | path | delivered pkt/s | CPU ns/pkt (all) | sender + kernel ns/pkt | on a wrong child | lost | fast vs user-space (ns/pkt) |"
    );
    let _ = writeln!(
        t,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        let ratio = match r.path {
            SteeringPath::Fast => rows
                .iter()
                .find(|o| o.flows == r.flows && o.path == SteeringPath::UserSpace)
                .map(|o| format!("{:.2}x", r.total_ns / o.total_ns))
                .unwrap_or_default(),
            SteeringPath::UserSpace => String::new(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.flows,
            r.path.as_str(),
            r.delivered as f64 / r.secs,
            r.total_ns,
            r.sender_ns,
            r.wrong,
            r.lost,
            ratio
        );
    }
    let fast: Vec<&Row> = rows
        .iter()
        .filter(|r| r.path == SteeringPath::Fast)
        .collect();
    if let (Some(first), Some(last)) = (fast.first(), fast.last()) {
        let change = (last.total_ns / first.total_ns - 1.0) * 100.0;
        let _ = writeln!(
            t,
            "\nFast path, cost per packet from {} to {} flows: {change:+.1} % (target: within 15 %: {}).",
            first.flows,
            last.flows,
            if change.abs() <= 15.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let _ = writeln!(
        t,
        "\nMemory per flow in the benchmark's own process (sockets only):\n\n| flows | path | kernel slab bytes/flow (socket, psock) | CHILDREN + FLOWS map bytes/flow |"
    );
    let _ = writeln!(t, "| ---: | --- | ---: | ---: |");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {} |",
            r.flows,
            r.path.as_str(),
            r.slab_bytes_per_flow,
            r.map_bytes_per_flow
                .map_or("-".into(), |b| format!("{b:.0} (preallocated per slot)"))
        );
    }
    t
}
