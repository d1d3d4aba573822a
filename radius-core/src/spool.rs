//! The accounting spool, sans-IO: the record format of its files, a spooled request made
//! ready for its replay (Acct-Delay-Time, Identifier, signature), and the replay's window of
//! requests out. The daemon writes and reads the files and moves the datagrams.
//!
//! A record is self-delimiting and checksummed, so that recovery after a kill stops at a
//! torn tail instead of replaying garbage:
//! `magic (4) | length of the rest (4) | CRC-32 of the rest (4) | received, Unix ms (8) |
//! pool name (1 + n) | upstream name (1 + n) | the request (prepared for that upstream,
//! without the proxy's Proxy-State)`.

use std::time::{Duration, Instant};

use crate::codec::{
    Code, EditError, Packet, PacketMut,
    auth::{self, SharedSecret},
};

const MAGIC: [u8; 4] = *b"RSP1";
const HEAD: usize = 12;

/// Acct-Delay-Time (RFC 2866 5.2).
pub const ACCT_DELAY_TIME: u8 = 41;

/// One spooled Accounting-Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// When the sidecar received it from the NAS (Unix time, ms).
    pub received_ms: u64,
    /// The pool it was for, and the upstream it was prepared for.
    pub pool: &'a str,
    pub upstream: &'a str,
    pub packet: &'a [u8],
}

/// What recovery found where a record should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a spool record (bad magic)")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("record fields out of bounds")]
    Bounds,
}

impl Record<'_> {
    /// Appends the record's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&self.received_ms.to_be_bytes());
        for name in [self.pool, self.upstream] {
            let n = &name.as_bytes()[..name.len().min(255)];
            out.push(n.len() as u8);
            out.extend_from_slice(n);
        }
        out.extend_from_slice(self.packet);
        let rest = &out[start + HEAD..];
        let (len, crc) = (rest.len() as u32, crc32fast::hash(rest));
        out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
        out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
    }

    /// The record at the start of `bytes` and its length; `Ok(None)` when `bytes` ends
    /// before it does (a tail being written, or torn by a kill).
    pub fn decode(bytes: &[u8]) -> Result<Option<(Record<'_>, usize)>, RecordError> {
        if bytes.len() < HEAD {
            return Ok(None);
        }
        if bytes[..4] != MAGIC {
            return Err(RecordError::Magic);
        }
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let crc = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let Some(rest) = bytes.get(HEAD..HEAD + len) else {
            return Ok(None);
        };
        if crc32fast::hash(rest) != crc {
            return Err(RecordError::Checksum);
        }
        let received_ms = u64::from_be_bytes(
            rest.get(..8)
                .and_then(|s| s.try_into().ok())
                .ok_or(RecordError::Bounds)?,
        );
        let mut off = 8;
        let mut name = || -> Result<&str, RecordError> {
            let n = usize::from(*rest.get(off).ok_or(RecordError::Bounds)?);
            let s = rest.get(off + 1..off + 1 + n).ok_or(RecordError::Bounds)?;
            off += 1 + n;
            std::str::from_utf8(s).map_err(|_| RecordError::Bounds)
        };
        let (pool, upstream) = (name()?, name()?);
        Ok(Some((
            Record {
                received_ms,
                pool,
                upstream,
                packet: &rest[off..],
            },
            HEAD + len,
        )))
    }
}

/// Makes the spooled request in `buf[..len]` ready to send: Acct-Delay-Time raised by
/// `waited` (RFC 2866: how long the record has been trying to get through), Identifier
/// `id`, signed with `secret`. Returns its length and authenticator (what the answer is
/// verified against).
pub fn prepare_replay<S: SharedSecret + ?Sized>(
    buf: &mut [u8],
    len: usize,
    waited: Duration,
    id: u8,
    secret: &S,
) -> Result<(usize, [u8; 16]), EditError> {
    let mut m = PacketMut::from_datagram(buf, len)?;
    let before = m
        .view()?
        .get(ACCT_DELAY_TIME)
        .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        .map_or(0, u32::from_be_bytes);
    let delay = before.saturating_add(u32::try_from(waited.as_secs()).unwrap_or(u32::MAX));
    m.replace_first(ACCT_DELAY_TIME, &delay.to_be_bytes())?;
    m.set_identifier(id);
    m.sign(secret, None)?;
    Ok((m.len(), m.authenticator()))
}

/// Whether `reply` is the signed Accounting-Response to the request sent with
/// authenticator `sent`.
pub fn is_answer<S: SharedSecret + ?Sized>(reply: &[u8], sent: &[u8; 16], secret: &S) -> bool {
    Packet::parse(reply).is_ok_and(|p| {
        p.code() == Code::AccountingResponse && auth::verify(&p, secret, Some(sent)).is_ok()
    })
}

/// One replayed request out.
#[derive(Debug)]
struct Out<K> {
    key: K,
    auth: [u8; 16],
    sent: Instant,
}

/// The replay's requests out to one upstream: at most `window` at once, each with its own
/// Identifier, sent again every `retry` until answered. Nothing is ever given up here: a
/// record stays spooled until an answer, and the daemon stops replaying when the server is
/// no longer alive.
#[derive(Debug)]
pub struct ReplayWindow<K> {
    out: Vec<Option<Out<K>>>,
    window: usize,
    retry: Duration,
    next: usize,
    used: usize,
}

impl<K: Clone> ReplayWindow<K> {
    pub fn new(window: usize, retry: Duration) -> Self {
        Self {
            out: (0..256).map(|_| None).collect(),
            window: window.clamp(1, 256),
            retry,
            next: 0,
            used: 0,
        }
    }

    /// An Identifier for the next request, if the window has room.
    pub fn next_id(&mut self) -> Option<u8> {
        if self.used >= self.window {
            return None;
        }
        for _ in 0..256 {
            let id = self.next;
            self.next = (self.next + 1) % 256;
            if self.out[id].is_none() {
                return Some(id as u8);
            }
        }
        None
    }

    /// Request `key` went with Identifier `id` and authenticator `auth`.
    pub fn sent(&mut self, id: u8, key: K, auth: [u8; 16], now: Instant) {
        if self.out[usize::from(id)]
            .replace(Out {
                key,
                auth,
                sent: now,
            })
            .is_none()
        {
            self.used += 1;
        }
    }

    /// The authenticator request `id` was sent with.
    pub fn sent_with(&self, id: u8) -> Option<&[u8; 16]> {
        self.out[usize::from(id)].as_ref().map(|o| &o.auth)
    }

    /// The key of request `id`, if it is out.
    pub fn key(&self, id: u8) -> Option<&K> {
        self.out[usize::from(id)].as_ref().map(|o| &o.key)
    }

    /// Request `id` is answered: its key, and its Identifier is free.
    pub fn answered(&mut self, id: u8) -> Option<K> {
        let o = self.out[usize::from(id)].take()?;
        self.used -= 1;
        Some(o.key)
    }

    /// Requests due to be sent again (their clock restarts).
    pub fn due(&mut self, now: Instant) -> Vec<(u8, K)> {
        let retry = self.retry;
        self.out
            .iter_mut()
            .enumerate()
            .filter_map(|(id, o)| {
                let o = o.as_mut().filter(|o| now.duration_since(o.sent) >= retry)?;
                o.sent = now;
                Some((id as u8, o.key.clone()))
            })
            .collect()
    }

    /// Forgets every request out (the server went away: they are sent again later, from
    /// the spool); their keys.
    pub fn clear(&mut self) -> Vec<K> {
        self.used = 0;
        self.out
            .iter_mut()
            .filter_map(|o| o.take().map(|o| o.key))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{attr, auth::Secret};

    fn accounting(delay: Option<u32>) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        let mut m = PacketMut::new(&mut buf, Code::AccountingRequest, 9).unwrap();
        m.push(attr::ACCT_SESSION_ID, b"s-1").unwrap();
        if let Some(d) = delay {
            m.push(ACCT_DELAY_TIME, &d.to_be_bytes()).unwrap();
        }
        m.sign(&Secret::new(b"nas"), None).unwrap();
        m.as_bytes().to_vec()
    }

    #[test]
    fn records_round_trip_and_a_torn_or_corrupt_tail_is_told_apart() {
        let p = accounting(None);
        let r = Record {
            received_ms: 1_796_665_993_000,
            pool: "acct",
            upstream: "acct-1",
            packet: &p,
        };
        let mut file = Vec::new();
        r.encode(&mut file);
        r.encode(&mut file);
        let (first, n) = Record::decode(&file).unwrap().unwrap();
        assert_eq!(first, r);
        assert_eq!(Record::decode(&file[n..]).unwrap().unwrap().1, n);
        // A tail cut anywhere is incomplete, never an error or a record.
        for cut in 0..n {
            assert_eq!(Record::decode(&file[n..n + cut]), Ok(None), "cut at {cut}");
        }
        let mut bad = file.clone();
        bad[n - 1] ^= 1;
        assert_eq!(Record::decode(&bad), Err(RecordError::Checksum));
        bad[0] = b'X';
        assert_eq!(Record::decode(&bad), Err(RecordError::Magic));
    }

    #[test]
    fn a_replay_adds_the_time_waited_to_acct_delay_time_and_signs_for_the_upstream() {
        let up = Secret::new(b"upstream");
        for (before, want) in [(None, 30), (Some(5), 35)] {
            let mut buf = [0u8; 4096];
            let p = accounting(before);
            buf[..p.len()].copy_from_slice(&p);
            let (len, auth) =
                prepare_replay(&mut buf, p.len(), Duration::from_millis(30_900), 77, &up).unwrap();
            let sent = Packet::parse(&buf[..len]).unwrap();
            assert_eq!(sent.identifier(), 77);
            assert_eq!(
                sent.get(ACCT_DELAY_TIME).unwrap().value,
                &(want as u32).to_be_bytes()
            );
            assert!(auth::verify(&sent, &up, None).is_ok());
            // The upstream's answer verifies against what was sent; another does not.
            let mut rb = [0u8; 64];
            let answer = crate::codec::edit::accounting_response(&mut rb, &sent, &up)
                .unwrap()
                .as_bytes()
                .to_vec();
            assert!(is_answer(&answer, &auth, &up));
            assert!(!is_answer(&answer, &[0; 16], &up));
            assert!(!is_answer(&answer, &auth, &Secret::new(b"other")));
        }
    }

    #[test]
    fn the_window_bounds_requests_out_and_resends_the_unanswered_on_time() {
        let t0 = Instant::now();
        let mut w: ReplayWindow<u32> = ReplayWindow::new(2, Duration::from_secs(1));
        let a = w.next_id().unwrap();
        w.sent(a, 10, [1; 16], t0);
        let b = w.next_id().unwrap();
        w.sent(b, 11, [2; 16], t0);
        assert_ne!(a, b);
        assert_eq!(w.next_id(), None, "the window is full");
        assert!(w.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(w.answered(a), Some(10));
        assert_eq!(w.answered(a), None, "an answer counts once");
        assert_eq!(w.due(t0 + Duration::from_secs(1)), vec![(b, 11)]);
        assert!(w.due(t0 + Duration::from_millis(1500)).is_empty());
        assert!(w.next_id().is_some());
        assert_eq!(w.clear(), vec![11]);
        assert!(w.is_empty());
    }
}
