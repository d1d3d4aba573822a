//! A spoofing sprayer for tests: raw IPv4/UDP datagrams from many forged (address, port)
//! pairs inside a /16, paced to a rate and bounded in count and time. It stands for what an
//! attacker inside an allowed prefix can send for the price of a UDP packet. Its socket is
//! made inside the test's namespace (raw sockets need root), and it only sends to the
//! address the test gives, an address of that test's own namespaces.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// What to spray.
#[derive(Clone, Debug)]
pub struct Spray {
    /// Where every datagram goes (the sidecar's listener).
    pub to: SocketAddrV4,
    /// The first two octets of the forged sources: `a.b.0.0/16`.
    pub prefix: [u8; 2],
    /// Distinct forged (address, port) pairs, cycled through.
    pub pairs: u32,
    /// Datagrams per second, and for how long (both bound the run).
    pub rate: u32,
    pub duration: Duration,
    /// Addresses of the /16 never forged (the test's real NASes).
    pub skip: Vec<Ipv4Addr>,
}

/// A raw socket for [`run`]; call inside the namespace to send from.
pub fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh, valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The forged source of pair `i`: one address of the /16 each, and a port of its own.
pub fn source(spec: &Spray, i: u32) -> SocketAddrV4 {
    let host = 1 + (i % 65_533);
    let ip = Ipv4Addr::new(
        spec.prefix[0],
        spec.prefix[1],
        (host >> 8) as u8,
        host as u8,
    );
    SocketAddrV4::new(ip, 10_000 + (i % 50_000) as u16)
}

/// Sprays `spec` from `sock`; `payload(n, buf)` writes the RADIUS payload of datagram `n`
/// into `buf`. Returns how many datagrams the kernel took.
pub fn run(
    sock: &OwnedFd,
    spec: &Spray,
    mut payload: impl FnMut(u64, &mut Vec<u8>),
) -> io::Result<u64> {
    let total = u64::from(spec.rate) * spec.duration.as_millis() as u64 / 1000;
    let start = Instant::now();
    let deadline = start + spec.duration + Duration::from_secs(2);
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*spec.to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (mut sent, mut n, mut pair) = (0u64, 0u64, 0u32);
    let mut body = Vec::with_capacity(512);
    let mut dgram = Vec::with_capacity(600);
    while n < total && Instant::now() < deadline {
        // Pace: datagram n is due at n / rate seconds.
        let due = start + Duration::from_micros(n * 1_000_000 / u64::from(spec.rate.max(1)));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(2)));
            continue;
        }
        let mut src = source(spec, pair % spec.pairs.max(1));
        while spec.skip.contains(src.ip()) {
            pair = pair.wrapping_add(1);
            src = source(spec, pair % spec.pairs.max(1));
        }
        pair = pair.wrapping_add(1);
        body.clear();
        payload(n, &mut body);
        ipv4_udp(&mut dgram, src, spec.to, &body);
        // SAFETY: dgram and dst outlive the call; lengths are theirs.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                dgram.as_ptr().cast(),
                dgram.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc >= 0 {
            sent += 1;
        }
        n += 1;
    }
    Ok(sent)
}

/// An IPv4 header (the kernel fills in its checksum and identification) and a UDP header
/// without checksum (allowed on IPv4), then `body`.
fn ipv4_udp(out: &mut Vec<u8>, src: SocketAddrV4, dst: SocketAddrV4, body: &[u8]) {
    let udp_len = 8 + body.len();
    let total = 20 + udp_len;
    out.clear();
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    out.extend_from_slice(&src.ip().octets());
    out.extend_from_slice(&dst.ip().octets());
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_distinct_inside_the_prefix_and_headers_add_up() {
        let spec = Spray {
            to: "192.0.2.1:1812".parse().unwrap(),
            prefix: [198, 18],
            pairs: 60_000,
            rate: 1,
            duration: Duration::from_secs(1),
            skip: vec![],
        };
        let all: std::collections::HashSet<SocketAddrV4> =
            (0..spec.pairs).map(|i| source(&spec, i)).collect();
        assert_eq!(all.len(), 60_000);
        assert!(all.iter().all(|s| s.ip().octets()[..2] == [198, 18]));
        let mut d = Vec::new();
        ipv4_udp(&mut d, source(&spec, 7), spec.to, b"radius");
        assert_eq!(d.len(), 20 + 8 + 6);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 34);
        assert_eq!(u16::from_be_bytes([d[22], d[23]]), 1812);
        assert_eq!(u16::from_be_bytes([d[24], d[25]]), 14);
    }
}
