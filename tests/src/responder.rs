//! A minimal RADIUS upstream of the project's own: answers every Access-Request with an
//! Access-Accept and every Accounting-Request with an Accounting-Response, echoing
//! Proxy-State, signed with its secret. One thread, `recvmmsg`/`sendmmsg` batches: it measures
//! the ceiling of whatever sits in front of it, and, with [`Behaviour`], plays a broken or
//! hostile AAA server for the tests.

use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use radius_sidecar::codec::{Code, Packet, PacketMut, attr, auth};

/// How the responder signs its Access replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Message-Authenticator first, then the Response Authenticator: a correct server.
    Correct,
    /// No Message-Authenticator (as FreeRADIUS 3.2.1 on PAP).
    NoMessageAuthenticator,
    /// A Message-Authenticator that does not verify, under a valid Response Authenticator
    /// (what a BlastRADIUS forger can produce).
    ForgedMessageAuthenticator,
    /// Correct, but only for a request seen before: the first copy of each is ignored, as
    /// if lost (to test retransmission).
    IgnoreFirstCopy,
    /// A two-step conversation: a request without State gets an Access-Challenge with a
    /// State naming this responder; a request with that State an Access-Accept, with any
    /// other State an Access-Reject (as an EAP server that never saw the conversation).
    Challenge,
}

impl Behaviour {
    const ALL: [Behaviour; 5] = [
        Behaviour::Correct,
        Behaviour::NoMessageAuthenticator,
        Behaviour::ForgedMessageAuthenticator,
        Behaviour::IgnoreFirstCopy,
        Behaviour::Challenge,
    ];
}

/// A running responder; stops on drop.
pub struct Responder {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    behaviour: Arc<AtomicU8>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    /// Binds `addr` in the current namespace and answers on a thread of its own.
    pub fn start(addr: SocketAddr, secret: &[u8], behaviour: Behaviour) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(addr)?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(8 << 20);
        let _ = s2.set_send_buffer_size(8 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let b = Arc::new(AtomicU8::new(behaviour as u8));
        let counters = Counters {
            stop: stop.clone(),
            answered: answered.clone(),
            received: received.clone(),
            behaviour: b.clone(),
        };
        let secret = secret.to_vec();
        let thread = std::thread::spawn(move || serve(&sock, &secret, &counters));
        Ok(Self {
            addr,
            stop,
            answered,
            received,
            behaviour: b,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Datagrams received so far (answered or not).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Changes how the following requests are answered.
    pub fn set_behaviour(&self, b: Behaviour) {
        self.behaviour.store(b as u8, Ordering::Relaxed);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const BATCH: usize = 64;

struct Counters {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    behaviour: Arc<AtomicU8>,
}

fn serve(sock: &UdpSocket, secret: &[u8], c: &Counters) {
    let me = sock.local_addr().map_or(0, |a| a.port());
    let (stop, answered) = (&c.stop, &c.answered);
    let mut seen: HashSet<(Vec<u8>, [u8; 16])> = HashSet::new();
    let mut inb = vec![[0u8; 4096]; BATCH];
    let mut outb = vec![[0u8; 4096]; BATCH];
    let mut names: Vec<libc::sockaddr_storage> =
        // SAFETY: sockaddr_storage is plain data.
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    while !stop.load(Ordering::Relaxed) {
        let mut iov: Vec<libc::iovec> = inb
            .iter_mut()
            .map(|x| libc::iovec {
                iov_base: x.as_mut_ptr().cast(),
                iov_len: x.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every pointer refers to live buffers of the given sizes. MSG_WAITFORONE:
        // block for the first datagram (up to the read timeout), then take what is queued.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc <= 0 {
            continue;
        }
        let got = rc as usize;
        c.received.fetch_add(got as u64, Ordering::Relaxed);
        let b =
            Behaviour::ALL[usize::from(c.behaviour.load(Ordering::Relaxed)) % Behaviour::ALL.len()];
        let mut out_iov = Vec::with_capacity(got);
        let mut out_names = Vec::with_capacity(got);
        for i in 0..got {
            let len = msgs[i].msg_len as usize;
            if b == Behaviour::IgnoreFirstCopy && len >= 20 {
                // Keyed by the source's address bytes, the Identifier and the authenticator.
                let name = names[i];
                // SAFETY: sockaddr_storage is plain data of this size.
                let raw = unsafe {
                    std::slice::from_raw_parts(
                        (&name as *const libc::sockaddr_storage).cast::<u8>(),
                        msgs[i].msg_hdr.msg_namelen as usize,
                    )
                };
                let mut key = raw.to_vec();
                key.push(inb[i][1]);
                let mut a = [0u8; 16];
                a.copy_from_slice(&inb[i][4..20]);
                if seen.insert((key, a)) {
                    continue;
                }
            }
            if let Some(n) = answer(&inb[i][..len], secret, b, me, &mut outb[i]) {
                out_iov.push(libc::iovec {
                    iov_base: outb[i].as_mut_ptr().cast(),
                    iov_len: n,
                });
                out_names.push((names[i], msgs[i].msg_hdr.msg_namelen));
            }
        }
        // SAFETY: zeroed mmsghdr is valid.
        let mut out: Vec<libc::mmsghdr> = (0..out_iov.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, m) in out.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut out_iov[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut out_names[i].0 as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = out_names[i].1;
        }
        let mut done = 0;
        while done < out.len() {
            // SAFETY: as above.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    out[done..].as_mut_ptr(),
                    (out.len() - done) as u32,
                    0,
                )
            };
            if rc <= 0 {
                break;
            }
            done += rc as usize;
        }
        answered.fetch_add(done as u64, Ordering::Relaxed);
    }
}

/// The reply to `req` from the responder on port `me`, in `out`; `None` for what it does
/// not answer.
pub fn answer(req: &[u8], secret: &[u8], b: Behaviour, me: u16, out: &mut [u8]) -> Option<usize> {
    let p = Packet::parse(req).ok()?;
    let own_state = format!("conversation-on-{me}");
    let mut code = match p.code() {
        Code::AccessRequest | Code::StatusServer => Code::AccessAccept,
        Code::AccountingRequest => Code::AccountingResponse,
        _ => return None,
    };
    let mut challenge = false;
    if b == Behaviour::Challenge && p.code() == Code::AccessRequest {
        match p.get(attr::STATE) {
            None => {
                code = Code::AccessChallenge;
                challenge = true;
            }
            Some(st) if st.value == own_state.as_bytes() => {}
            Some(_) => code = Code::AccessReject,
        }
    }
    let req_auth = *p.authenticator();
    let mut m = PacketMut::new(out, code, p.identifier()).ok()?;
    let access = matches!(
        code,
        Code::AccessAccept | Code::AccessChallenge | Code::AccessReject
    );
    if access
        && matches!(
            b,
            Behaviour::Correct | Behaviour::IgnoreFirstCopy | Behaviour::Challenge
        )
    {
        m.message_authenticator_first().ok()?;
    }
    if code == Code::AccessAccept && p.code() == Code::AccessRequest {
        m.push(attr::REPLY_MESSAGE, b"ok").ok()?;
    }
    if challenge {
        m.push(attr::STATE, own_state.as_bytes()).ok()?;
    }
    for ps in p.get_all(attr::PROXY_STATE) {
        m.push(attr::PROXY_STATE, ps.value).ok()?;
    }
    if access && b == Behaviour::ForgedMessageAuthenticator {
        // A wrong MAC under a correct Response Authenticator.
        m.push(attr::MESSAGE_AUTHENTICATOR, &[0x5a; 16]).ok()?;
        let n = m.len();
        let a = auth::response_authenticator(&out[..n], &req_auth, secret);
        out[4..20].copy_from_slice(&a);
        return Some(n);
    }
    m.sign(secret, Some(&req_auth)).ok()?;
    Some(m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(secret: &[u8]) -> Vec<u8> {
        let mut b = [0u8; 4096];
        let mut p = PacketMut::new(&mut b, Code::AccessRequest, 3).expect("header");
        p.set_authenticator(&[1; 16]);
        p.push(attr::USER_NAME, b"u").expect("room");
        p.add_proxy_state(b"px").expect("room");
        p.sign(secret, None).expect("sign");
        p.as_bytes().to_vec()
    }

    #[test]
    fn answers_verify_or_fail_as_their_behaviour_says() {
        let req = request(b"s");
        for b in [
            Behaviour::Correct,
            Behaviour::NoMessageAuthenticator,
            Behaviour::ForgedMessageAuthenticator,
        ] {
            let mut out = [0u8; 4096];
            let n = answer(&req, b"s", b, 1, &mut out).expect("an answer");
            let r = Packet::parse(&out[..n]).expect("parses");
            assert_eq!(r.identifier(), 3);
            assert_eq!(r.get(attr::PROXY_STATE).map(|a| a.value), Some(&b"px"[..]));
            let ok = auth::verify(&r, b"s".as_slice(), Some(&[1; 16])).is_ok();
            assert_eq!(ok, b != Behaviour::ForgedMessageAuthenticator, "{b:?}");
            assert_eq!(
                r.message_authenticator_offset().is_some(),
                b != Behaviour::NoMessageAuthenticator
            );
        }
    }
}
