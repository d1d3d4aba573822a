//! The project's own RADIUS load generator: many NAS source addresses, many requests
//! outstanding, bounded in time and in count, and cheap per request (one thread, `poll` over
//! non-blocking sockets, `recvmmsg`/`sendmmsg` batches, one MD5 to hide the password and one
//! to check the reply), so that on two cores it leaves the CPU to what it measures.
//!
//! Closed loop: every slot (a socket and an Identifier) holds one request; its reply sends
//! the next one. With a `rate`, a free slot waits for its turn: requests go at that rate
//! (as long as the slots suffice), the way a soak holds a share of the maximum. A slot whose reply does not come within `timeout` counts as lost and sends
//! a fresh request (a new authenticator, never a retransmission). Every reply is verified
//! against its request's authenticator with the NAS secret; a reply that does not verify,
//! or is not an Access-Accept, counts as bad.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use radius_sidecar::codec::{Code, Packet, PacketMut, attr, auth, hide};

/// What to send, to whom, for how long.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// NAS addresses to send from (each gets `sockets_per_source` sockets: flows).
    pub sources: Vec<IpAddr>,
    pub sockets_per_source: usize,
    /// Requests outstanding at once, spread over the sockets (at most 256 per socket).
    pub outstanding: usize,
    pub duration: Duration,
    /// Stop after this many replies, whatever the time.
    pub max_requests: u64,
    pub secret: Vec<u8>,
    pub user: String,
    pub password: String,
    /// After this, a request counts as lost (and its slot sends a new one).
    pub timeout: Duration,
    /// Put a Message-Authenticator in every request, as NASes do since BlastRADIUS.
    pub message_authenticator: bool,
    /// Requests per second at most (None: as fast as the replies come).
    pub rate: Option<f64>,
}

/// What a run gave.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub sent: u64,
    pub answered: u64,
    /// Requests that got no reply within the timeout (including those still out at the end).
    pub lost: u64,
    /// Replies that failed verification, were not Access-Accept, or matched no request.
    pub bad: u64,
    pub elapsed: Duration,
    /// Latency of answered requests, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// The generator's own CPU time (user + system) over the run.
    pub own_cpu: Duration,
    /// Replies answered in each second of the run.
    pub per_second: Vec<u64>,
    /// The p50 and p99 latency (microseconds) of the replies of each second.
    pub per_second_latency: Vec<(u32, u32)>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// What a run gave, in one line: answered, rate, length, lost, bad, p50, p99, max.
    pub fn summary(&self) -> String {
        format!(
            "{} answered at {:.0} req/s over {:.1} s, lost {}, bad {}, p50 {:.2} ms, \
             p99 {:.2} ms, max {:.2} ms",
            self.answered,
            self.rate(),
            self.elapsed.as_secs_f64(),
            self.lost,
            self.bad,
            self.latency_ms(0.5),
            self.latency_ms(0.99),
            self.latency_ms(1.0),
        )
    }

    /// The `q`-quantile (0..=1) of the latency, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

struct Slot {
    id: u8,
    auth: [u8; 16],
    sent_at: Option<Instant>,
}

struct Flow {
    sock: UdpSocket,
    slots: Vec<Slot>,
    /// Identifier -> index into `slots`.
    by_id: [u8; 256],
}

const BATCH: usize = 64;

/// Runs the load described by `spec` from the current network namespace.
pub fn run(spec: &LoadSpec) -> std::io::Result<LoadResult> {
    let nsock = spec.sources.len() * spec.sockets_per_source.max(1);
    let nsock = nsock.max(1);
    let mut flows = Vec::with_capacity(nsock);
    for i in 0..nsock {
        let src = spec.sources[i % spec.sources.len()];
        let sock = UdpSocket::bind(SocketAddr::new(src, 0))?;
        sock.connect(spec.target)?;
        sock.set_nonblocking(true)?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(4 << 20);
        let _ = s2.set_send_buffer_size(4 << 20);
        flows.push(Flow {
            sock,
            slots: Vec::new(),
            by_id: [u8::MAX; 256],
        });
    }
    for n in 0..spec.outstanding.min(nsock * 256) {
        let f = &mut flows[n % nsock];
        let id = f.slots.len() as u8;
        f.by_id[id as usize] = f.slots.len() as u8;
        f.slots.push(Slot {
            id,
            auth: [0; 16],
            sent_at: None,
        });
    }
    let mut nas = Generator {
        secret: spec.secret.clone(),
        user: spec.user.clone(),
        password: spec.password.clone(),
        message_authenticator: spec.message_authenticator,
        counter: 0,
        seed: auth::random_authenticator(),
    };
    let mut res = LoadResult::default();
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut out_bufs = vec![[0u8; 256]; BATCH];
    let mut out_lens = [0usize; BATCH];
    let mut in_bufs = vec![[0u8; 4096]; BATCH];
    let mut in_lens = [0usize; BATCH];

    // Free slots waiting for their turn (with a rate): (flow, slot).
    let mut idle: std::collections::VecDeque<(usize, usize)> = std::collections::VecDeque::new();
    // First volley: every slot sends (with a rate, every slot waits for its turn).
    for (fi, f) in flows.iter_mut().enumerate() {
        let n = f.slots.len();
        if spec.rate.is_some() {
            idle.extend((0..n).map(|s| (fi, s)));
            continue;
        }
        let mut k = 0;
        for s in 0..n {
            out_lens[k] = nas.request(&mut f.slots[s], &mut out_bufs[k]);
            k += 1;
            if k == BATCH || s + 1 == n {
                res.sent += send_batch(&f.sock, &out_bufs, &out_lens[..k]);
                k = 0;
            }
        }
    }
    // This second's latencies, summarised at each new second.
    let mut second: (usize, Vec<u32>) = (0, Vec::new());
    let mut pfds: Vec<libc::pollfd> = flows
        .iter()
        .map(|f| libc::pollfd {
            fd: f.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut lat = Vec::with_capacity(spec.max_requests.min(4_000_000) as usize);
    let mut last_sweep = Instant::now();
    let mut sending = true;
    let mut stopped_at = start;
    loop {
        let now = Instant::now();
        if sending && (now >= deadline || res.answered >= spec.max_requests) {
            sending = false;
            stopped_at = now;
            res.elapsed = now - start;
        }
        let outstanding: usize = flows
            .iter()
            .map(|f| f.slots.iter().filter(|s| s.sent_at.is_some()).count())
            .sum();
        if !sending && (outstanding == 0 || now >= stopped_at + spec.timeout) {
            res.lost += outstanding as u64;
            break;
        }
        if let Some(rate) = spec.rate.filter(|_| sending) {
            // The requests due by now, sent from free slots.
            let due = (now.duration_since(start).as_secs_f64() * rate) as u64;
            while res.sent < due {
                let Some((fi, si)) = idle.pop_front() else {
                    break;
                };
                let f = &mut flows[fi];
                out_lens[0] = nas.request(&mut f.slots[si], &mut out_bufs[0]);
                // Counted as sent even if the kernel refused it: the slot's timeout then
                // makes it a loss, and the pace does not speed up to make up for it.
                send_batch(&f.sock, &out_bufs, &out_lens[..1]);
                res.sent += 1;
            }
        }
        let wait = if spec.rate.is_some() { 1 } else { 10 };
        // SAFETY: pfds is a valid array of pollfd for its length.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let now = Instant::now();
        for (fi, pfd) in pfds.iter_mut().enumerate() {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            pfd.revents = 0;
            let f = &mut flows[fi];
            loop {
                let got = recv_batch(&f.sock, &mut in_bufs, &mut in_lens);
                if got == 0 {
                    break;
                }
                let mut k = 0;
                for i in 0..got {
                    let b = &in_bufs[i][..in_lens[i]];
                    let Some(si) = b
                        .get(1)
                        .map(|&id| f.by_id[id as usize] as usize)
                        .filter(|&si| si < f.slots.len())
                    else {
                        res.bad += 1;
                        continue;
                    };
                    let slot = &mut f.slots[si];
                    let Some(sent_at) = slot.sent_at else {
                        res.bad += 1; // late, after the slot gave up on it
                        continue;
                    };
                    if !nas.accept_ok(b, &slot.auth) {
                        res.bad += 1;
                        continue;
                    }
                    res.answered += 1;
                    let sec = now.duration_since(start).as_secs() as usize;
                    if res.per_second.len() <= sec {
                        res.per_second.resize(sec + 1, 0);
                    }
                    res.per_second[sec] += 1;
                    let us = now
                        .duration_since(sent_at)
                        .as_micros()
                        .min(u32::MAX as u128) as u32;
                    lat.push(us);
                    if sec != second.0 {
                        summarise(&mut res.per_second_latency, &mut second, sec);
                    }
                    second.1.push(us);
                    slot.sent_at = None;
                    if sending && spec.rate.is_some() {
                        idle.push_back((fi, si));
                    } else if sending {
                        out_lens[k] = nas.request(slot, &mut out_bufs[k]);
                        k += 1;
                    }
                }
                if k > 0 {
                    res.sent += send_batch(&f.sock, &out_bufs, &out_lens[..k]);
                }
                if got < BATCH {
                    break;
                }
            }
        }
        if now.duration_since(last_sweep) >= Duration::from_millis(50) {
            last_sweep = now;
            for (fi, f) in flows.iter_mut().enumerate() {
                let mut k = 0;
                for (si, slot) in f.slots.iter_mut().enumerate() {
                    if slot
                        .sent_at
                        .is_some_and(|t| now.duration_since(t) > spec.timeout)
                    {
                        res.lost += 1;
                        slot.sent_at = None;
                        if sending && spec.rate.is_some() {
                            idle.push_back((fi, si));
                        } else if sending && k < BATCH {
                            out_lens[k] = nas.request(slot, &mut out_bufs[k]);
                            k += 1;
                        }
                    }
                }
                if k > 0 {
                    res.sent += send_batch(&f.sock, &out_bufs, &out_lens[..k]);
                }
            }
        }
    }
    res.own_cpu = thread_cpu().saturating_sub(cpu0);
    let last = second.0 + 1;
    summarise(&mut res.per_second_latency, &mut second, last);
    lat.sort_unstable();
    res.latencies_us = lat;
    Ok(res)
}

/// Closes second `second.0`: its p50 and p99 go into `out` (zeros for seconds without a
/// reply), and `second` starts over at `next`.
fn summarise(out: &mut Vec<(u32, u32)>, second: &mut (usize, Vec<u32>), next: usize) {
    let v = &mut second.1;
    v.sort_unstable();
    let q = |q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    if out.len() <= second.0 {
        out.resize(second.0 + 1, (0, 0));
    }
    out[second.0] = (q(0.5), q(0.99));
    v.clear();
    second.0 = next;
}

struct Generator {
    secret: Vec<u8>,
    user: String,
    password: String,
    message_authenticator: bool,
    counter: u64,
    seed: [u8; 16],
}

impl Generator {
    /// Builds a fresh Access-Request for `slot` in `buf`; returns its length.
    fn request(&mut self, slot: &mut Slot, buf: &mut [u8; 256]) -> usize {
        // Distinct authenticators without a CSPRNG call per request: a per-run random seed
        // with a counter in it (the load is not an attack on anything).
        self.counter += 1;
        let mut a = self.seed;
        for (x, c) in a.iter_mut().zip(self.counter.to_le_bytes()) {
            *x ^= c;
        }
        let len = build_request(
            buf,
            slot.id,
            &a,
            &self.user,
            &self.password,
            &self.secret,
            self.message_authenticator,
        );
        slot.auth = a;
        slot.sent_at = Some(Instant::now());
        len
    }

    fn accept_ok(&self, b: &[u8], req_auth: &[u8; 16]) -> bool {
        let Ok(p) = Packet::parse(b) else {
            return false;
        };
        p.code() == Code::AccessAccept
            && auth::verify(&p, self.secret.as_slice(), Some(req_auth)).is_ok()
    }
}

/// A PAP Access-Request (Message-Authenticator when `ma`, User-Name, hidden User-Password,
/// NAS-Port); the authenticator is the caller's.
fn build_request(
    buf: &mut [u8; 256],
    id: u8,
    a: &[u8; 16],
    user: &str,
    password: &str,
    secret: &[u8],
    ma: bool,
) -> usize {
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(password.as_bytes(), secret, a, &mut h).unwrap_or(0);
    let Ok(mut p) = PacketMut::new(buf, Code::AccessRequest, id) else {
        return 0;
    };
    p.set_authenticator(a);
    if ma {
        let _ = p.message_authenticator_first();
    }
    let _ = p.push(attr::USER_NAME, user.as_bytes());
    let _ = p.push(attr::USER_PASSWORD, &h[..n]);
    let _ = p.push(attr::NAS_PORT, &u32::from(id).to_be_bytes());
    if ma {
        let _ = p.sign(secret, None);
    }
    p.len()
}

fn send_batch(sock: &UdpSocket, bufs: &[[u8; 256]], lens: &[usize]) -> u64 {
    let mut iov: Vec<libc::iovec> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| libc::iovec {
            iov_base: bufs[i].as_ptr() as *mut libc::c_void,
            iov_len: l,
        })
        .collect();
    // SAFETY: zeroed mmsghdr is valid (null name, no control).
    let mut msgs: Vec<libc::mmsghdr> = (0..lens.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut done = 0usize;
    while done < msgs.len() {
        // SAFETY: msgs[done..] points at valid iovecs over live buffers.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (msgs.len() - done) as u32,
                0,
            )
        };
        if rc <= 0 {
            // A full send buffer or ECONNREFUSED (nobody listening yet): the slot's timeout
            // turns it into a loss and a new request.
            break;
        }
        done += rc as usize;
    }
    done as u64
}

fn recv_batch(sock: &UdpSocket, bufs: &mut [[u8; 4096]], lens: &mut [usize]) -> usize {
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..bufs.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: msgs point at valid iovecs over live, writable buffers.
    let rc = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc <= 0 {
        return 0;
    }
    for (i, m) in msgs.iter().take(rc as usize).enumerate() {
        lens[i] = m.msg_len as usize;
    }
    rc as usize
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu() -> Duration {
    // SAFETY: a valid timespec out-pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system, all threads) of process `pid`, from `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let t = ticks(11) + ticks(12);
    // SAFETY: no arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(t * 1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_password_for_the_secret_and_distinct_authenticators() {
        let mut g = Generator {
            secret: b"s3cret".to_vec(),
            user: "bench".into(),
            password: "pw".into(),
            message_authenticator: true,
            counter: 0,
            seed: [7; 16],
        };
        let mut slot = Slot {
            id: 9,
            auth: [0; 16],
            sent_at: None,
        };
        let mut b = [0u8; 256];
        let n = g.request(&mut slot, &mut b);
        let first = slot.auth;
        let p = Packet::parse(&b[..n]).expect("a valid request");
        assert_eq!((p.code(), p.identifier()), (Code::AccessRequest, 9));
        auth::verify(&p, b"s3cret".as_slice(), None)
            .expect("a Message-Authenticator that verifies");
        let mut pw = [0u8; 128];
        let k = hide::reveal_user_password(
            p.get(attr::USER_PASSWORD).expect("password").value,
            b"s3cret",
            &first,
            &mut pw,
        )
        .expect("reveal");
        assert_eq!(&pw[..k], b"pw");
        g.request(&mut slot, &mut b);
        assert_ne!(slot.auth, first);
    }
}
