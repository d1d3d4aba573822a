//! RADIUS over a stream (RFC 6613 TCP, RFC 6614 TLS), sans-IO: packets cut out of the bytes
//! a connection delivers, by RADIUS's own Length field. A length outside 20..=4096 cannot be
//! resynchronised on a stream, so it ends the connection (RFC 6613 section 2.6.4); a packet
//! begun and never finished is the driver's to time out ([`Deframer::partial_since`]).

use std::time::Instant;

use crate::codec::{HEADER_LEN, MAX_PACKET_LEN};

/// Why a connection's stream cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("a packet length of {0} (RADIUS allows 20 to 4096)")]
    BadLength(usize),
}

impl StreamError {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            StreamError::BadLength(_) => "bad_length",
        }
    }
}

/// The packets of one connection's byte stream.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Where the unread bytes start in `buf`.
    start: usize,
    /// When the first byte of the packet not yet complete arrived.
    partial_since: Option<Instant>,
    last_push: Option<Instant>,
}

impl Deframer {
    /// Bytes read from the connection at `now`.
    pub fn push(&mut self, bytes: &[u8], now: Instant) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if !bytes.is_empty() && self.partial_since.is_none() {
            self.partial_since = Some(now);
        }
        self.last_push = Some(now);
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete packet, if there is one. After an error the connection must end.
    pub fn next_packet(&mut self) -> Result<Option<&[u8]>, StreamError> {
        let rest = &self.buf[self.start..];
        if rest.len() < 4 {
            if rest.is_empty() {
                self.partial_since = None;
            }
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if !(HEADER_LEN..=MAX_PACKET_LEN).contains(&len) {
            return Err(StreamError::BadLength(len));
        }
        if rest.len() < len {
            return Ok(None);
        }
        let at = self.start;
        self.start += len;
        // The next packet's clock starts with the read that brought its first bytes.
        self.partial_since = if self.start == self.buf.len() {
            None
        } else {
            self.last_push
        };
        Ok(Some(&self.buf[at..at + len]))
    }

    /// Drops what was handed out, keeping a partial packet.
    pub fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.capacity() > 4 * MAX_PACKET_LEN && self.buf.len() < MAX_PACKET_LEN {
            self.buf.shrink_to(MAX_PACKET_LEN);
        }
    }

    /// Since when a packet has been waiting for the rest of its bytes (none: nothing is
    /// pending).
    pub fn partial_since(&self) -> Option<Instant> {
        self.partial_since
    }

    /// Bytes held (a partial packet, or packets not yet taken).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn packet(id: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 1;
        p[1] = id;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p
    }

    #[test]
    fn packets_are_cut_at_their_length_whatever_the_reads() {
        let t = Instant::now();
        let mut stream = packet(1, 20);
        stream.extend(packet(2, 100));
        stream.extend(packet(3, 4096));
        for chunk in [1, 3, 7, 19, 20, 64, 5000] {
            let mut d = Deframer::default();
            let mut ids = Vec::new();
            for part in stream.chunks(chunk) {
                d.push(part, t);
                while let Some(p) = d.next_packet().unwrap() {
                    ids.push((p[1], p.len()));
                }
                d.compact();
            }
            assert_eq!(
                ids,
                [(1, 20), (2, 100), (3, 4096)],
                "reads of {chunk} bytes"
            );
            assert_eq!(d.buffered(), 0);
            assert_eq!(d.partial_since(), None);
        }
    }

    #[test]
    fn a_length_radius_does_not_allow_ends_the_stream() {
        let t = Instant::now();
        for bad in [0usize, 19, 4097, 65535] {
            let mut d = Deframer::default();
            let mut p = packet(1, 20);
            p[2..4].copy_from_slice(&(bad as u16).to_be_bytes());
            d.push(&p, t);
            assert_eq!(d.next_packet(), Err(StreamError::BadLength(bad)));
        }
    }

    #[test]
    fn a_partial_packet_says_since_when_it_waits() {
        let t = Instant::now();
        let mut d = Deframer::default();
        let p = packet(9, 50);
        d.push(&p[..10], t);
        assert_eq!(d.next_packet(), Ok(None));
        assert_eq!(d.partial_since(), Some(t));
        d.push(&p[10..], t + Duration::from_secs(1));
        assert_eq!(d.next_packet().unwrap().map(<[u8]>::len), Some(50));
        assert_eq!(d.partial_since(), None);
    }
}
