//! The sockets of the data path: wildcards (one per worker, in one SO_REUSEPORT group) and
//! per-flow children, for both steering paths.
//!
//! - Fast path: `steer` picks the socket, so a child is an unconnected UDP socket bound to the
//!   exact address and port the NAS sent to (replies leave from it with `sendto`).
//! - User-space path: a child joins the wildcards' group, then `connect()`s to the NAS; the
//!   kernel then matches it before the group. Between `bind` and `connect` it sits in the
//!   group, so a classic BPF reuseport filter on the group always picks a wildcard: no packet
//!   of another NAS is stolen in that window.

use std::{
    io,
    mem::{self, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Which mechanism hands packets of a known flow to its child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteeringPath {
    /// `steer` (SK_LOOKUP) through the `CHILDREN` sockhash.
    Fast,
    /// `connect()`ed children and a reuseport filter, no eBPF.
    UserSpace,
}

impl SteeringPath {
    pub fn as_str(self) -> &'static str {
        match self {
            SteeringPath::Fast => "fast",
            SteeringPath::UserSpace => "user-space",
        }
    }
}

pub use radius_core::flows::flow_key;

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Binds `workers` wildcard sockets to `addr`, in one reuseport group whose filter sends
/// every packet the kernel's own lookup gives the group to a wildcard (never to a child in
/// its bind-connect window). Each wildcard reports the destination address of its datagrams.
pub fn bind_wildcards(
    addr: SocketAddr,
    workers: usize,
    rcvbuf: usize,
) -> io::Result<Vec<UdpSocket>> {
    let workers = workers.max(1);
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let s = udp_socket(addr)?;
        // SO_RCVBUFFORCE passes rmem_max with CAP_NET_ADMIN; fall back to the capped size.
        let force = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        if setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &force,
        )
        .is_err()
        {
            s.set_recv_buffer_size(rcvbuf)?;
        }
        set_pktinfo(&s, addr.is_ipv6())?;
        s.bind(&SockAddr::from(addr))?;
        out.push(UdpSocket::from(s));
    }
    // Wildcards are the first members of the group: indices 0..workers.
    attach_wildcard_filter(&out[0], workers as u32)?;
    Ok(out)
}

fn set_pktinfo(s: &Socket, v6: bool) -> io::Result<()> {
    let one: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    setsockopt(s.as_raw_fd(), level, name, &one)
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The classic BPF reuseport program: `return rxhash % workers` (0 with one worker).
fn attach_wildcard_filter(sock: &UdpSocket, workers: u32) -> io::Result<()> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SKF_AD_RXHASH: u32 = (-0x1000i32 + 32) as u32; // SKF_AD_OFF + SKF_AD_RXHASH
    let ins = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog: Vec<libc::sock_filter> = if workers <= 1 {
        vec![ins(RET_K, 0)]
    } else {
        vec![
            ins(LD_W_ABS, SKF_AD_RXHASH),
            ins(ALU_MOD_K, workers),
            ins(RET_A, 0),
        ]
    };
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    setsockopt(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &fprog,
    )
}

/// A RADIUS/TCP listening socket (RFC 6613), non-blocking.
pub fn bind_tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Receive buffer of a child: a NAS with a few hundred requests outstanding on one socket
/// (a BRAS at a burst) must not overflow it; only what is queued costs memory. Capped by
/// `net.core.rmem_max`.
const CHILD_RCVBUF: usize = 1 << 20;

/// Creates the child socket of a flow. `wildcard` is the address the wildcards are bound
/// to, `local` the address the NAS sent to, `remote` the NAS.
pub fn bind_child(
    path: SteeringPath,
    wildcard: SocketAddr,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<UdpSocket> {
    match path {
        SteeringPath::Fast => {
            let s = udp_socket(local)?;
            let _ = s.set_recv_buffer_size(CHILD_RCVBUF);
            s.bind(&SockAddr::from(local))?;
            Ok(s.into())
        }
        SteeringPath::UserSpace => {
            let s = udp_socket(wildcard)?;
            let _ = s.set_recv_buffer_size(CHILD_RCVBUF);
            s.bind(&SockAddr::from(wildcard))?;
            s.connect(&SockAddr::from(remote))?;
            // A later child's bind joins the group of the first reuseport socket it finds
            // on the port, newest first; if that were a connected child, it could land in a
            // group without the filter. Connected, this child needs no reuseport any more.
            s.set_reuse_port(false)?;
            let s = UdpSocket::from(s);
            // Bound to an any-address, connect() picks the source by route; if that is not
            // the address the NAS used, the child would never see the flow.
            let got = s.local_addr()?;
            if got.ip() != local.ip() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!(
                        "connected child got local address {got}, the NAS sent to {local}: \
                         bind the listener to {local} to serve it without eBPF"
                    ),
                ));
            }
            Ok(s)
        }
    }
}

/// Whether a datagram read from a flow's child came from the flow's own NAS.
///
/// On the user-space path the kernel can, rarely, give a connecting child a datagram of
/// another peer behind the same address: UDP lookup scores the child on its remote address
/// before it reads the socket's state, and `connect()` sets the address before the state
/// (measured here: 0 to 2 of ~3 000 datagrams sent by 20 peers while 200 children connect). The child's
/// reader checks the source with this and hands foreign datagrams back to the listener, so
/// nothing is lost or misattributed. On the fast path a child only gets what `steer` gives.
pub fn is_own_datagram(flow_remote: SocketAddr, from: SocketAddr) -> bool {
    flow_remote == from
}

/// One datagram and both its ends.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub remote: SocketAddr,
    /// The address and port the NAS sent to.
    pub local: SocketAddr,
}

/// `recvmsg` on a wildcard: the datagram, its source, and (from IP_PKTINFO /
/// IPV6_PKTINFO) its destination. `bound` is the wildcard's own address, used for the port
/// and when no control message came.
pub fn recv_from_to(
    sock: &impl AsRawFd,
    buf: &mut [u8],
    bound: SocketAddr,
) -> io::Result<Received> {
    let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16]; // 128 bytes, aligned for cmsghdr
    // SAFETY: zeroed msghdr is valid; every pointer below outlives the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cbuf);
    // SAFETY: see above.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the name (zeroed beforehand).
    let name = unsafe { name.assume_init() };
    let remote =
        sockaddr_to_std(&name).ok_or_else(|| io::Error::other("datagram without an IP source"))?;
    let mut local_ip = bound.ip();
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    local_ip = IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    local_ip = IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let local = match local_ip {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, bound.port())),
        IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, bound.port(), 0, 0)),
    };
    Ok(Received {
        len: n as usize,
        remote,
        local,
    })
}

/// Datagrams read by one `recvmmsg` from a socket: up to [`RecvBatch::DATAGRAMS`] of up
/// to [`RecvBatch::SIZE`] bytes each, and their sources. A worker keeps one and reuses it:
/// one call takes what a socket holds, and a short batch says the socket is empty without
/// the extra call that would fail with EAGAIN.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    /// Headers pointing into the vectors above, once: their heap buffers never move (the
    /// vectors are never resized), whatever moves the batch itself.
    msgs: Vec<libc::mmsghdr>,
    /// Headers the last `recv` filled.
    used: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        let n = Self::DATAGRAMS;
        // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr.
        let mut b = Self {
            bufs: vec![0u8; n * Self::SIZE],
            names: (0..n).map(|_| unsafe { mem::zeroed() }).collect(),
            iov: (0..n).map(|_| unsafe { mem::zeroed() }).collect(),
            msgs: (0..n).map(|_| unsafe { mem::zeroed() }).collect(),
            used: 0,
        };
        for i in 0..n {
            b.iov[i] = libc::iovec {
                iov_base: b.bufs[i * Self::SIZE..].as_mut_ptr().cast(),
                iov_len: Self::SIZE,
            };
            let h = &mut b.msgs[i].msg_hdr;
            h.msg_iov = &mut b.iov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
        }
        b.rearm(n);
        b
    }
}

impl RecvBatch {
    pub const DATAGRAMS: usize = 32;
    /// RFC 2865's largest packet is 4 096 bytes.
    pub const SIZE: usize = 4096;

    /// Reads what `sock` holds (non-blocking), up to a batch; returns how many.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.rearm(self.used);
        // SAFETY: every header points at live buffers of this batch, of the sizes given.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                Self::DATAGRAMS as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.used = 0;
            return Err(io::Error::last_os_error());
        }
        self.used = rc as usize;
        Ok(self.used)
    }

    /// Makes room again for a full address in the headers the last `recv` used (the kernel
    /// shortens each name's length to the address it wrote).
    fn rearm(&mut self, used: usize) {
        for m in &mut self.msgs[..used] {
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
    }

    /// Datagram `i` of the last `recv`.
    pub fn data(&self, i: usize) -> &[u8] {
        let len = (self.msgs[i].msg_len as usize).min(Self::SIZE);
        &self.bufs[i * Self::SIZE..i * Self::SIZE + len]
    }

    /// The source of datagram `i` of the last `recv`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to_std(&self.names[i])
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Raises the soft open-file limit to the hard limit; returns the limit in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_reports_where_a_datagram_was_sent() {
        let bound: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let w = bind_wildcards(bound, 1, 1 << 16).unwrap();
        let bound = w[0].local_addr().unwrap();
        let nas = UdpSocket::bind("127.0.0.1:0").unwrap();
        nas.send_to(b"hello", bound).unwrap();
        w[0].set_nonblocking(false).unwrap();
        let mut buf = [0u8; 64];
        // recv_from_to uses MSG_DONTWAIT; wait for readability first.
        let mut peek = [0u8; 1];
        w[0].peek_from(&mut peek).unwrap();
        let r = recv_from_to(&w[0], &mut buf, bound).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.remote, nas.local_addr().unwrap());
        assert_eq!(r.local, bound);
    }

    #[test]
    fn a_connected_child_receives_its_flow_and_the_wildcard_the_rest() {
        let w = bind_wildcards("127.0.0.1:0".parse().unwrap(), 2, 1 << 16).unwrap();
        let bound = w[0].local_addr().unwrap();
        let nas_a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let nas_b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let child = bind_child(
            SteeringPath::UserSpace,
            bound,
            bound,
            nas_a.local_addr().unwrap(),
        )
        .unwrap();
        nas_a.send_to(b"a", bound).unwrap();
        nas_b.send_to(b"b", bound).unwrap();
        child.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 8];
        let n = child.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"a");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let got: Vec<u8> = w
            .iter()
            .filter_map(|s| s.recv(&mut buf).ok().map(|_| buf[0]))
            .collect();
        assert_eq!(got, vec![b'b']);
    }

    #[test]
    fn the_nofile_limit_is_raised_to_the_hard_limit() {
        let got = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        assert_eq!(got, lim.rlim_max);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}

/// A level-triggered epoll set: a worker's wildcard, its flows' children, its upstream
/// sockets and its [`Wake`]. The worker thread blocks in one `epoll_wait` and gets every
/// ready socket at once: one wake-up serves many flows, where a task per flow would cost a
/// wake-up (and often a cross-thread unpark) per packet. Level-triggered, so one read per
/// ready socket per round is enough: what is left is reported again, and no read is spent
/// on `EAGAIN`.
#[derive(Debug)]
pub struct Poller {
    fd: std::os::fd::OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(Self {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for input; `token` comes back with its events.
    pub fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: a valid event for the duration of the call.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` (added with `token`) for output too, or no longer.
    pub fn watch_writable(&self, fd: &impl AsRawFd, token: u64, on: bool) -> io::Result<()> {
        let events = if on {
            libc::EPOLLIN | libc::EPOLLOUT
        } else {
            libc::EPOLLIN
        };
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: a valid event for the duration of the call.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                fd.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (closing it does the same).
    pub fn remove(&self, fd: &impl AsRawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Waits up to `timeout` for ready sockets; their tokens go to `out` (empty on timeout).
    pub fn wait(
        &self,
        out: &mut Vec<u64>,
        max: usize,
        timeout: std::time::Duration,
    ) -> io::Result<()> {
        const N: usize = 256;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; N];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: evs has room for max.min(N) events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                evs.as_mut_ptr(),
                max.clamp(1, N) as i32,
                ms,
            )
        };
        out.clear();
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        out.extend(evs[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd that wakes a worker blocked in [`Poller::wait`] (put it in the set).
#[derive(Debug)]
pub struct Wake {
    fd: std::os::fd::OwnedFd,
}

impl Wake {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(Self {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
        })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) is still awake.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter, so the set stops reporting it.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// One datagram of a batch: where to, from which local address (`Some` when the socket is
/// bound to an any-address and the source must be set with IP_PKTINFO / IPV6_PKTINFO),
/// and its bytes.
pub struct Outgoing<'a> {
    pub to: Option<SocketAddr>,
    pub from: Option<IpAddr>,
    pub data: &'a [u8],
}

/// 64 bytes of control data: room for one in6_pktinfo header and payload.
const CMSG_WORDS: usize = 8;

/// The arrays `sendmmsg` needs, kept by a worker and refilled at each [`send_batch`], so
/// that a round's sends allocate nothing. Their pointers are only valid during a call.
#[derive(Default)]
pub struct SendArrays {
    names: Vec<Option<SockAddr>>,
    froms: Vec<Option<IpAddr>>,
    iov: Vec<libc::iovec>,
    cbufs: Vec<[u64; CMSG_WORDS]>,
    msgs: Vec<libc::mmsghdr>,
}

/// `sendmmsg`: sends `batch`; a datagram the kernel refuses is passed to `failed` (with its
/// index) and the rest still go. Returns how many were sent.
pub fn send_batch<'a>(
    sock: &impl AsRawFd,
    batch: impl IntoIterator<Item = Outgoing<'a>>,
    arrays: &mut SendArrays,
    mut failed: impl FnMut(usize, io::Error),
) -> usize {
    let SendArrays {
        names,
        froms,
        iov,
        cbufs,
        msgs,
    } = arrays;
    names.clear();
    froms.clear();
    iov.clear();
    for o in batch {
        names.push(o.to.map(SockAddr::from));
        froms.push(o.from);
        // The bytes outlive the call ('a); the kernel only reads them.
        iov.push(libc::iovec {
            iov_base: o.data.as_ptr() as *mut libc::c_void,
            iov_len: o.data.len(),
        });
    }
    let n = iov.len();
    if n == 0 {
        return 0;
    }
    cbufs.clear();
    cbufs.resize(n, [0u64; CMSG_WORDS]);
    msgs.clear();
    // SAFETY: zeroed mmsghdr is valid (no name, no control).
    msgs.extend((0..n).map(|_| unsafe { mem::zeroed::<libc::mmsghdr>() }));
    for i in 0..n {
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
        if let Some(name) = &names[i] {
            h.msg_name = name.as_ptr() as *mut libc::c_void;
            h.msg_namelen = name.len();
        }
        if let Some(from) = froms[i] {
            h.msg_control = cbufs[i].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of_val(&cbufs[i]);
            // SAFETY: the control buffer is large and aligned enough for one pktinfo.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                match from {
                    IpAddr::V4(a) => {
                        (*c).cmsg_level = libc::IPPROTO_IP;
                        (*c).cmsg_type = libc::IP_PKTINFO;
                        (*c).cmsg_len =
                            libc::CMSG_LEN(mem::size_of::<libc::in_pktinfo>() as u32) as _;
                        let info = libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr {
                                s_addr: u32::from(a).to_be(),
                            },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        };
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                        h.msg_controllen =
                            libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32) as _;
                    }
                    IpAddr::V6(a) => {
                        (*c).cmsg_level = libc::IPPROTO_IPV6;
                        (*c).cmsg_type = libc::IPV6_PKTINFO;
                        (*c).cmsg_len =
                            libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                        let info = libc::in6_pktinfo {
                            ipi6_addr: libc::in6_addr {
                                s6_addr: a.octets(),
                            },
                            ipi6_ifindex: 0,
                        };
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                        h.msg_controllen =
                            libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                    }
                }
            }
        }
    }
    let (mut done, mut sent) = (0, 0);
    while done < n {
        // SAFETY: every header points at live names, iovecs and control buffers.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (n - done) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if rc <= 0 {
            // The datagram at `done` failed: report it and go on with the next.
            failed(done, io::Error::last_os_error());
            done += 1;
        } else {
            done += rc as usize;
            sent += rc as usize;
        }
    }
    sent
}
