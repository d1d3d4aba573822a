//! The wire of an upgrade (`radius-sidecar upgrade`): what the running process hands the
//! process that takes its place, over a `SOCK_SEQPACKET` socket pair the old one made when
//! it started the new one. Sockets travel as `SCM_RIGHTS` (the very same kernel sockets,
//! so the flows' 5-tuples, the eBPF SOCKHASH entries that point at them and what waits in
//! their receive queues all carry over); what they are travels beside them as JSON. A
//! message holds at most [`FDS_PER_MESSAGE`] sockets and [`MAX_MESSAGE`] bytes, so any
//! number of flows goes over in as many messages as it takes.
//!
//! The order: the new process says `Hello`; the old one stops reading what it hands over
//! and sends `Sockets` (with their fds), `Definitions` (dynamic clients the flows are on),
//! `Pending` (packets waiting for a definition) and `Done`; the new one answers `Taken`
//! once it serves, or `Refused` (and the old one goes on as if nothing happened).

use std::{
    io::{IoSlice, IoSliceMut},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, setsockopt, sockopt,
};
use serde::{Deserialize, Serialize};

/// Sockets per message (the kernel's SCM_MAX_FD is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// Bytes of JSON per message, at most.
pub const MAX_MESSAGE: usize = 192 * 1024;
/// Entries per `Definitions` or `Pending` message.
pub const ENTRIES_PER_MESSAGE: usize = 200;

/// The environment variable that tells a new process which fd is its end of the pair.
pub const ENV_FD: &str = "RADIUS_SIDECAR_UPGRADE_FD";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("handover socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("the other process closed the handover socket")]
    Closed,
    #[error("a handover message that does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("a handover message with {got} sockets where {want} were described")]
    Fds { got: usize, want: usize },
    #[error("the other process refused: {0}")]
    Refused(String),
    #[error("unexpected handover message `{0}`")]
    Unexpected(&'static str),
}

/// What one handed-over socket is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Handed {
    /// Worker `index`'s wildcard of the UDP listener bound to `listen`.
    Wildcard {
        listen: SocketAddr,
        index: usize,
    },
    /// A proved flow's child socket, of that worker, with its client's name.
    Flow {
        listen: SocketAddr,
        index: usize,
        remote: SocketAddr,
        local: SocketAddr,
        client: String,
    },
    /// A RADIUS/TCP or RADIUS/TLS listener (its connections stay with the old process).
    StreamListener {
        listen: SocketAddr,
    },
    Coa {
        listen: SocketAddr,
    },
    Metrics {
        listen: SocketAddr,
    },
    Control {
        path: PathBuf,
    },
}

/// A dynamic client the old process had defined, for what it has left.
#[derive(Serialize, Deserialize)]
pub struct HandedDefinition {
    pub ip: IpAddr,
    pub name: String,
    /// The secret's bytes (this socket pair is private to the two processes).
    pub secret: Vec<u8>,
    pub pool: String,
    pub require_message_authenticator: bool,
    pub left_ms: u64,
}

/// A packet of a source being defined when the old process stopped reading.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandedPacket {
    pub listen: SocketAddr,
    pub index: usize,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub data: Vec<u8>,
}

/// One message; `Sockets` comes with one fd per entry, in order.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    Hello {
        pid: u32,
    },
    Sockets {
        sockets: Vec<Handed>,
    },
    Definitions {
        list: Vec<HandedDefinition>,
    },
    Pending {
        packets: Vec<HandedPacket>,
    },
    /// Everything is over; `fast`: the old process steers with eBPF (the children are
    /// unconnected sockets, which only the fast path can serve).
    Done {
        fast: bool,
    },
    Taken,
    Refused {
        why: String,
    },
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Sockets { .. } => "sockets",
            Message::Definitions { .. } => "definitions",
            Message::Pending { .. } => "pending",
            Message::Done { .. } => "done",
            Message::Taken => "taken",
            Message::Refused { .. } => "refused",
        }
    }

    /// For a message that was not the one expected.
    pub fn unexpected(&self) -> HandoverError {
        match self {
            Message::Refused { why } => HandoverError::Refused(why.clone()),
            other => HandoverError::Unexpected(other.name()),
        }
    }
}

/// One end of the handover's socket pair.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair: this process's end (receives wait until `set_timeout`), and the
    /// one the new process inherits.
    pub fn pair() -> Result<(Channel, OwnedFd), HandoverError> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, b))
    }

    /// The end this process inherited (`ENV_FD`).
    ///
    /// # Safety
    /// `fd` must be an open socket this process owns and nothing else uses.
    pub unsafe fn inherited(fd: RawFd) -> Result<Channel, HandoverError> {
        // SAFETY: the caller's promise.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let me = Channel { fd };
        me.set_timeout(Duration::from_secs(30))?;
        Ok(me)
    }

    /// How long a receive waits before it fails.
    pub fn set_timeout(&self, d: Duration) -> Result<(), HandoverError> {
        let tv = nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        setsockopt(&self.fd, sockopt::SendTimeout, &tv)?;
        Ok(())
    }

    pub fn send(&self, m: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
        let json = serde_json::to_vec(m)?;
        if json.len() > MAX_MESSAGE || fds.len() > FDS_PER_MESSAGE {
            return Err(std::io::Error::other("a handover message over its bounds").into());
        }
        let iov = [IoSlice::new(&json)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
        Ok(())
    }

    /// The next message and the sockets that came with it.
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let (n, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return Err(HandoverError::Closed);
        }
        let m: Message = serde_json::from_slice(&buf[..n])?;
        if let Message::Sockets { sockets } = &m
            && sockets.len() != fds.len()
        {
            return Err(HandoverError::Fds {
                got: fds.len(),
                want: sockets.len(),
            });
        }
        Ok((m, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_travel_with_what_they_are() -> Result<(), HandoverError> {
        let (a, b) = Channel::pair()?;
        // SAFETY: `b` is ours, handed to the other end once.
        let b = unsafe { Channel::inherited(std::os::fd::IntoRawFd::into_raw_fd(b))? };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let bound = udp.local_addr()?;
        let handed = Handed::Wildcard {
            listen: bound,
            index: 3,
        };
        a.send(
            &Message::Sockets {
                sockets: vec![handed.clone()],
            },
            &[udp.as_raw_fd()],
        )?;
        let (m, fds) = b.recv()?;
        let Message::Sockets { sockets } = m else {
            return Err(m.unexpected());
        };
        assert_eq!(sockets, vec![handed]);
        let got = std::net::UdpSocket::from(fds.into_iter().next().ok_or(HandoverError::Closed)?);
        assert_eq!(got.local_addr()?, bound, "the very same socket");
        // What waits in its queue is there for the new owner.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0")?;
        peer.send_to(b"queued", bound)?;
        let mut buf = [0u8; 16];
        let (n, _) = got.recv_from(&mut buf)?;
        assert_eq!(&buf[..n], b"queued");
        drop(a);
        assert!(matches!(b.recv(), Err(HandoverError::Closed)));
        Ok(())
    }

    #[test]
    fn a_message_that_lies_about_its_sockets_is_refused() -> Result<(), HandoverError> {
        let (a, b) = Channel::pair()?;
        // SAFETY: as above.
        let b = unsafe { Channel::inherited(std::os::fd::IntoRawFd::into_raw_fd(b))? };
        let sockets = vec![Handed::Coa {
            listen: "127.0.0.1:3799".parse().map_err(std::io::Error::other)?,
        }];
        a.send(&Message::Sockets { sockets }, &[])?;
        assert!(matches!(
            b.recv(),
            Err(HandoverError::Fds { got: 0, want: 1 })
        ));
        Ok(())
    }
}
