//! Forwarding, sans-IO: what happens to a NAS's request on its way to an upstream, and to
//! the upstream's reply on its way back. Drivers only move the bytes.
//!
//! - [`prepare_request`]: parse, verify with the client's secret, apply its BlastRADIUS
//!   switches, strip a realm, add an Operator-Name, apply the client's and the upstream's
//!   rewrites, add our Proxy-State, put a Message-Authenticator first, give an
//!   Access-Request a fresh authenticator and re-hide its User-Password for the upstream.
//! - [`finalize_request`] (whoever owns the Identifier space): set the Identifier and sign
//!   with the upstream's secret.
//! - [`process_reply`]: verify with the upstream's secret and the authenticator we sent,
//!   apply the upstream's BlastRADIUS switch, strip our Proxy-State, apply the upstream's
//!   and the client's rewrites, restore the NAS's Identifier, re-hide Tunnel-Password and
//!   MPPE keys for the NAS, sign with the client's secret.
//! - [`IdPool`]: the 256 Identifiers of one upstream socket, and [`InFlight`], what is
//!   kept of a request while it is out.
//!
//! Either side may be a RADIUS/1.1 hop (RFC 9765, [`Hops`]): TLS protects it, so nothing
//! is verified or signed there, no Message-Authenticator is sent, hidden types travel plain
//! (revealed from, or hidden for, the other side's secret), and a Token stands where the
//! Identifier and authenticator were.

use std::sync::Arc;

use crate::{
    blastradius::YesNoAuto,
    client::Client,
    codec::{
        Code, EditError, Packet, PacketMut, ParseError, attr,
        auth::{self, SharedSecret, VerifyError},
    },
    upstream::Upstream,
};

/// Why a packet is not relayed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed: {0}")]
    Parse(#[from] ParseError),
    #[error("signature: {0}")]
    Verify(#[from] VerifyError),
    #[error("the client requires a Message-Authenticator and the request has none")]
    MissingMessageAuthenticator,
    #[error("Proxy-State without a Message-Authenticator from a client that is no proxy")]
    ProxyStateWithoutMessageAuthenticator,
    #[error("{code:?} is not forwarded")]
    NotForwarded { code: Code },
    #[error("edit: {0}")]
    Edit(#[from] EditError),
    #[error("the reply lacks our Proxy-State")]
    NoProxyState,
    #[error("an Access reply without a Message-Authenticator from an upstream that must send one")]
    UpstreamWithoutMessageAuthenticator,
    #[error("a RADIUS/1.1 reply whose Token is not the request's")]
    TokenMismatch,
}

impl ProxyError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Parse(_) => "malformed",
            ProxyError::Verify(_) => "bad_signature",
            ProxyError::MissingMessageAuthenticator => "no_message_authenticator",
            ProxyError::ProxyStateWithoutMessageAuthenticator => {
                "proxy_state_without_message_authenticator"
            }
            ProxyError::NotForwarded { .. } => "not_forwarded",
            ProxyError::Edit(_) => "too_big",
            ProxyError::NoProxyState => "no_proxy_state",
            ProxyError::UpstreamWithoutMessageAuthenticator => "upstream_no_message_authenticator",
            ProxyError::TokenMismatch => "token_mismatch",
        }
    }
}

/// Which sides of a request's trip speak RADIUS/1.1 (RFC 9765).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hops {
    pub nas_v11: bool,
    pub upstream_v11: bool,
}

/// What [`prepare_request`] learnt, and what the reply will need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub len: usize,
    pub code: Code,
    /// The NAS's Identifier (from a RADIUS/1.1 NAS, its Token's last byte: the key of its
    /// flow's dedup entry).
    pub nas_id: u8,
    /// The NAS's authenticator (from a RADIUS/1.1 NAS, its Token then zeros: the header
    /// of the reply).
    pub nas_auth: [u8; 16],
    pub nas_v11: bool,
    /// This request taught the client's `auto` switch that it signs its requests.
    pub learnt_client_signs: bool,
}

/// Checks a NAS's request (in `buf[..len]`) and rewrites it for `upstream`, but for the
/// Identifier and the signature. `fresh` is the new Request Authenticator of an
/// Access-Request to a RADIUS/UDP, TCP or TLS upstream (random, drawn by the caller: RFC
/// 2865 asks it unpredictable).
#[expect(clippy::too_many_arguments, reason = "one request's whole preparation")]
pub fn prepare_request(
    client: &Client,
    upstream: &Upstream,
    hops: Hops,
    proxy_state: &[u8],
    fresh: &[u8; 16],
    buf: &mut [u8],
    len: usize,
    user_name: Option<std::ops::Range<usize>>,
) -> Result<Prepared, ProxyError> {
    let (code, nas_id, nas_auth, has_ma, has_ps, has_eap, chap_without_challenge, has_operator) = {
        let p = if hops.nas_v11 {
            Packet::parse_v11(&buf[..len])?
        } else {
            Packet::parse(&buf[..len])?
        };
        let code = p.code();
        if !matches!(code, Code::AccessRequest | Code::AccountingRequest) {
            return Err(ProxyError::NotForwarded { code });
        }
        let (nas_id, nas_auth) = if hops.nas_v11 {
            let mut token = [0u8; 16];
            token[..4].copy_from_slice(&p.authenticator()[..4]);
            (token[3], token)
        } else {
            auth::verify(&p, &client.secret, None)?;
            (p.identifier(), *p.authenticator())
        };
        (
            code,
            nas_id,
            nas_auth,
            p.message_authenticator_offset().is_some(),
            p.get(attr::PROXY_STATE).is_some(),
            p.get(attr::EAP_MESSAGE).is_some(),
            !hops.nas_v11
                && p.get(attr::CHAP_PASSWORD).is_some()
                && p.get(attr::CHAP_CHALLENGE).is_none(),
            p.get(attr::OPERATOR_NAME).is_some(),
        )
    };
    let mut learnt_client_signs = false;
    if code == Code::AccessRequest && !hops.nas_v11 {
        let b = client.blastradius(has_ma, has_ps, has_eap);
        if b.require_message_authenticator && !has_ma {
            return Err(ProxyError::MissingMessageAuthenticator);
        }
        if b.limit_proxy_state && has_ps && !has_ma {
            return Err(ProxyError::ProxyStateWithoutMessageAuthenticator);
        }
        learnt_client_signs = b.learnt;
    }
    // A realm stripped: User-Name becomes the user part, bytes `user_name` of the NAS's
    // packet (checked above, before anything changed).
    let stripped: [u8; 253];
    let user = match user_name.filter(|r| r.end <= len && r.len() <= 253) {
        Some(r) => {
            let mut b = [0u8; 253];
            b[..r.len()].copy_from_slice(&buf[r.clone()]);
            stripped = b;
            Some(&stripped[..r.len()])
        }
        None => None,
    };
    let mut m = PacketMut::from_datagram(buf, len)?;
    if let Some(user) = user {
        m.replace_first(attr::USER_NAME, user)?;
    }
    // RFC 5580: the operator the NAS did not name, as configured for its client.
    if let Some(op) = &client.operator_name
        && !has_operator
    {
        m.push(attr::OPERATOR_NAME, op)?;
    }
    // Rewrites see the request as verified, before what this hop adds for itself; what
    // they leave is signed and re-hidden below like anything else.
    if let Some(r) = &client.rewrite.inbound {
        r.apply(&mut m)?;
    }
    if let Some(r) = &upstream.options.rewrite.outbound {
        r.apply(&mut m)?;
    }
    m.add_proxy_state(proxy_state)?;
    if hops.upstream_v11 {
        m.remove_all(attr::MESSAGE_AUTHENTICATOR);
    } else {
        m.message_authenticator_first()?;
    }
    if code == Code::AccessRequest {
        // CHAP without CHAP-Challenge uses the Request Authenticator as its challenge
        // (RFC 2865 2.2): it must survive the new authenticator.
        if chap_without_challenge {
            m.push(attr::CHAP_CHALLENGE, &nas_auth)?;
        }
        match (hops.nas_v11, hops.upstream_v11) {
            (false, false) => {
                m.set_authenticator(fresh);
                m.rehide(
                    (client.secret.bytes(), &nas_auth),
                    (upstream.secret.bytes(), fresh),
                )?;
            }
            (false, true) => {
                m.reveal_all(client.secret.bytes(), &nas_auth)?;
            }
            (true, false) => {
                m.set_authenticator(fresh);
                m.hide_all(upstream.secret.bytes(), fresh)?;
            }
            (true, true) => {}
        }
    }
    Ok(Prepared {
        len: m.len(),
        code,
        nas_id,
        nas_auth,
        nas_v11: hops.nas_v11,
        learnt_client_signs,
    })
}

/// Sets the upstream Identifier and signs; returns the authenticator the reply must be
/// verified against. To a RADIUS/1.1 upstream, `token` goes where the authenticator was
/// (its last byte is `id`, by which the reply is found), the rest of the header is zero,
/// and nothing is signed; the header's 16 bytes are returned.
pub fn finalize_request(
    buf: &mut [u8],
    len: usize,
    id: u8,
    upstream: &Upstream,
    token: Option<u32>,
) -> Result<[u8; 16], ProxyError> {
    let mut m = PacketMut::from_datagram(buf, len)?;
    if let Some(token) = token {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&((token << 8) | u32::from(id)).to_be_bytes());
        m.set_identifier(0);
        m.set_authenticator(&header);
        return Ok(header);
    }
    m.set_identifier(id);
    m.sign(&upstream.secret, None)?;
    Ok(m.authenticator())
}

/// What a worker keeps of a request in flight upstream.
#[derive(Debug)]
pub struct InFlight<T> {
    pub client: Arc<Client>,
    pub prepared: Prepared,
    pub up_auth: [u8; 16],
    pub sent_at: std::time::Instant,
    /// When it went to the server it is on now (its first sending, or its move there):
    /// what that server's `response_window` counts from.
    pub sent_here: std::time::Instant,
    /// Where the finished reply goes (the flow).
    pub reply_to: T,
    /// The signed upstream copy, for retransmissions.
    pub wire: Vec<u8>,
    /// Resends so far, and when the next is due on our own timer.
    pub retries: u32,
    pub next_retry: std::time::Instant,
    /// The NAS's request as received, to prepare it again for another server of the pool
    /// (empty for a pool of one).
    pub nas_packet: Vec<u8>,
    /// The pool its realm chose; None: its client's.
    pub pool: Option<Arc<crate::pool::Pool>>,
    /// Its realm is stripped: User-Name becomes these bytes of `nas_packet`.
    pub user_name: Option<std::ops::Range<usize>>,
    /// A copy for an accounting replica: its answer ends it, and nothing reaches the NAS.
    pub replica: bool,
}

impl<T> InFlight<T> {
    /// The pool the request is served from: its realm's, else its client's.
    pub fn pool(&self) -> &Arc<crate::pool::Pool> {
        self.pool.as_ref().unwrap_or(&self.client.pool)
    }
}

/// A reply rewritten for the NAS by [`process_reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub len: usize,
    /// This reply taught the upstream's `auto` switch that it signs its replies.
    pub learnt_upstream_signs: bool,
}

/// Checks the upstream's reply (in `buf[..len]`) and rewrites it for the NAS.
/// `upstream_v11`: it came over a RADIUS/1.1 connection.
pub fn process_reply<T>(
    buf: &mut [u8],
    len: usize,
    upstream: &Upstream,
    upstream_v11: bool,
    inflight: &InFlight<T>,
    proxy_state: &[u8],
) -> Result<Reply, ProxyError> {
    let mut learnt_upstream_signs = false;
    let code = {
        let p = if upstream_v11 {
            Packet::parse_v11(&buf[..len])?
        } else {
            Packet::parse(&buf[..len])?
        };
        let code = p.code();
        if upstream_v11 {
            if p.authenticator()[..4] != inflight.up_auth[..4] {
                return Err(ProxyError::TokenMismatch);
            }
        } else {
            // Checks the Message-Authenticator too, when there is one.
            auth::verify(&p, &upstream.secret, Some(&inflight.up_auth))?;
            if matches!(
                code,
                Code::AccessAccept | Code::AccessReject | Code::AccessChallenge
            ) {
                use std::sync::atomic::Ordering::Relaxed;
                let o = &upstream.options;
                if p.message_authenticator_offset().is_some() {
                    // Verified above. EAP replies must carry one (RFC 3579): only a reply
                    // without EAP-Message shows that this server signs what it need not.
                    if p.get(attr::EAP_MESSAGE).is_none()
                        && o.require_message_authenticator == YesNoAuto::Auto
                    {
                        learnt_upstream_signs = !o.seen_message_authenticator.swap(true, Relaxed);
                    }
                } else if o.requires_message_authenticator() {
                    return Err(ProxyError::UpstreamWithoutMessageAuthenticator);
                }
            }
        }
        code
    };
    let client = &inflight.client;
    let prepared = &inflight.prepared;
    let mut m = PacketMut::from_datagram(buf, len)?;
    if !m.strip_proxy_state(proxy_state) {
        return Err(ProxyError::NoProxyState);
    }
    if let Some(r) = &upstream.options.rewrite.inbound {
        r.apply(&mut m)?;
    }
    if let Some(r) = &client.rewrite.outbound {
        r.apply(&mut m)?;
    }
    let access = matches!(
        code,
        Code::AccessAccept | Code::AccessReject | Code::AccessChallenge
    );
    match (upstream_v11, prepared.nas_v11) {
        (false, false) => m
            .rehide(
                (upstream.secret.bytes(), &inflight.up_auth),
                (client.secret.bytes(), &prepared.nas_auth),
            )
            .map(drop)?,
        (false, true) => m
            .reveal_all(upstream.secret.bytes(), &inflight.up_auth)
            .map(drop)?,
        (true, false) => m
            .hide_all(client.secret.bytes(), &prepared.nas_auth)
            .map(drop)?,
        (true, true) => {}
    }
    if prepared.nas_v11 {
        // RFC 9765: Reserved-1 zero, the request's Token, Reserved-2 zero, unsigned.
        m.remove_all(attr::MESSAGE_AUTHENTICATOR);
        m.set_identifier(0);
        m.set_authenticator(&prepared.nas_auth);
    } else {
        m.set_identifier(prepared.nas_id);
        if upstream_v11 {
            m.remove_all(attr::MESSAGE_AUTHENTICATOR);
        }
        if access {
            // The NAS gets a Message-Authenticator on every Access reply (BlastRADIUS).
            m.message_authenticator_first()?;
        }
        m.sign(&client.secret, Some(&prepared.nas_auth))?;
    }
    Ok(Reply {
        len: m.len(),
        learnt_upstream_signs,
    })
}

/// The 256 Identifiers of one upstream socket.
#[derive(Debug)]
pub struct IdPool<T> {
    slots: Vec<Option<T>>,
    next: usize,
    used: usize,
    /// Identifiers `0..limit` are given out (the rest are reserved).
    limit: usize,
}

impl<T> Default for IdPool<T> {
    fn default() -> Self {
        Self {
            slots: (0..256).map(|_| None).collect(),
            next: 0,
            used: 0,
            limit: 256,
        }
    }
}

impl<T> IdPool<T> {
    /// Keeps Identifiers `limit..256` out of [`IdPool::allocate`]'s reach.
    pub fn reserve_from(&mut self, limit: u8) {
        self.limit = usize::from(limit);
    }

    /// Takes a free Identifier for `v`, or gives `v` back when all are in flight.
    pub fn allocate(&mut self, v: T) -> Result<u8, T> {
        if self.used >= self.limit {
            return Err(v);
        }
        // Round-robin: a reused Identifier is as old as possible.
        for _ in 0..self.limit {
            let id = self.next % self.limit;
            self.next = (id + 1) % self.limit;
            if self.slots[id].is_none() {
                self.slots[id] = Some(v);
                self.used += 1;
                return Ok(id as u8);
            }
        }
        Err(v)
    }

    pub fn get(&self, id: u8) -> Option<&T> {
        self.slots[id as usize].as_ref()
    }

    pub fn get_mut(&mut self, id: u8) -> Option<&mut T> {
        self.slots[id as usize].as_mut()
    }

    pub fn take(&mut self, id: u8) -> Option<T> {
        let v = self.slots[id as usize].take();
        if v.is_some() {
            self.used -= 1;
        }
        v
    }

    pub fn in_flight(&self) -> usize {
        self.used
    }

    /// Visits every entry in flight.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(u8, &mut T)) {
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if let Some(v) = slot {
                f(id as u8, v);
            }
        }
    }

    /// Removes the entries `stale` says are stale; returns them.
    pub fn expire(&mut self, mut stale: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(&mut stale)
                && let Some(v) = slot.take()
            {
                out.push(v);
            }
        }
        self.used -= out.len();
        out
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn identifiers_past_a_reservation_are_never_given() {
        let mut ids = IdPool::<u32>::default();
        ids.reserve_from(255);
        let mut got = Vec::new();
        for v in 0..300 {
            match ids.allocate(v) {
                Ok(id) => got.push(id),
                Err(_) => break,
            }
        }
        assert_eq!(got.len(), 255);
        assert!(!got.contains(&255), "the watchdog's Identifier stays free");
        assert!(ids.take(7).is_some());
        assert_eq!(ids.allocate(1000), Ok(7));
    }

    use super::*;
    use crate::{codec::auth::Secret, codec::hide, upstream::UpstreamOptions};
    use std::time::Duration;

    fn client() -> Client {
        Client {
            name: "nas".into(),
            prefix: "192.0.2.0/24".parse().unwrap(),
            secret: Secret::new(b"nas-secret"),
            pool: Arc::new(crate::pool::Pool::single(Arc::new(Upstream {
                name: "up".into(),
                auth: "127.0.0.1:1".parse().unwrap(),
                acct: None,
                secret: Secret::new(b"upstream-secret"),
                timeout: Duration::from_secs(1),
                options: UpstreamOptions::default(),
                health: Default::default(),
                stream: false,
            }))),
            require_message_authenticator: YesNoAuto::No,
            limit_proxy_state: YesNoAuto::Auto,
            learned: Default::default(),
            nas_key: None,
            certificate: Default::default(),
            operator_name: None,
            rewrite: Default::default(),
            acct_pool: None,
            acct_replicas: Default::default(),
        }
    }

    fn nas_request(c: &Client) -> (Vec<u8>, [u8; 16]) {
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 42).unwrap();
        let a = auth::random_authenticator();
        p.set_authenticator(&a);
        p.push(attr::USER_NAME, b"alice").unwrap();
        let mut h = [0u8; 128];
        let n = hide::hide_user_password(b"pw", c.secret.bytes(), &a, &mut h).unwrap();
        p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
        p.sign(&c.secret, None).unwrap();
        (p.as_bytes().to_vec(), a)
    }

    #[test]
    fn a_request_and_its_reply_cross_the_proxy_with_each_sides_secret() {
        let c = Arc::new(client());
        let (req, nas_auth) = nas_request(&c);
        let mut buf = [0u8; 4096];
        buf[..req.len()].copy_from_slice(&req);
        let prep = prepare_request(
            &c,
            &c.pool.members[0],
            Hops::default(),
            b"ps",
            &auth::random_authenticator(),
            &mut buf,
            req.len(),
            None,
        )
        .unwrap();
        assert_eq!((prep.nas_id, prep.nas_auth), (42, nas_auth));
        let up_auth = finalize_request(&mut buf, prep.len, 7, &c.pool.members[0], None).unwrap();
        let up = Packet::parse(&buf[..prep.len]).unwrap();
        assert_eq!(up.identifier(), 7);
        auth::verify(&up, &c.pool.members[0].secret, None).unwrap();
        let mut pw = [0u8; 128];
        let n = hide::reveal_user_password(
            up.get(attr::USER_PASSWORD).unwrap().value,
            b"upstream-secret",
            &up_auth,
            &mut pw,
        )
        .unwrap();
        assert_eq!(&pw[..n], b"pw");

        // The upstream answers (echoing Proxy-State, as RFC 2865 requires).
        let mut rbuf = [0u8; 4096];
        let mut r = PacketMut::new(&mut rbuf, Code::AccessAccept, 7).unwrap();
        r.push(attr::REPLY_MESSAGE, b"ok").unwrap();
        r.add_proxy_state(b"ps").unwrap();
        r.sign(&c.pool.members[0].secret, Some(&up_auth)).unwrap();
        let rlen = r.len();
        let inflight = InFlight {
            client: c.clone(),
            prepared: prep,
            up_auth,
            sent_at: std::time::Instant::now(),
            sent_here: std::time::Instant::now(),
            reply_to: (),
            wire: Vec::new(),
            retries: 0,
            next_retry: std::time::Instant::now(),
            nas_packet: Vec::new(),
            pool: None,
            user_name: None,
            replica: false,
        };
        let n = process_reply(&mut rbuf, rlen, &c.pool.members[0], false, &inflight, b"ps")
            .unwrap()
            .len;
        let back = Packet::parse(&rbuf[..n]).unwrap();
        assert_eq!(back.identifier(), 42);
        assert!(back.get(attr::PROXY_STATE).is_none());
        assert_eq!(back.message_authenticator_offset(), Some(20));
        auth::verify(&back, &c.secret, Some(&nas_auth)).unwrap();
    }

    /// An upstream reply to `inflight`, with or without EAP-Message and Message-Authenticator,
    /// in a buffer with room for what the proxy adds; and its length.
    fn upstream_reply(
        up: &Upstream,
        inflight: &InFlight<()>,
        code: Code,
        eap: bool,
        ma: bool,
    ) -> ([u8; 4096], usize) {
        let mut rbuf = [0u8; 4096];
        let mut r = PacketMut::new(&mut rbuf, code, 7).unwrap();
        if ma {
            r.message_authenticator_first().unwrap();
        }
        if eap {
            r.push(attr::EAP_MESSAGE, &[3, 1, 0, 4]).unwrap();
        }
        r.add_proxy_state(b"ps").unwrap();
        r.sign(&up.secret, Some(&inflight.up_auth)).unwrap();
        let n = r.len();
        (rbuf, n)
    }

    #[test]
    fn auto_learns_that_an_upstream_signs_only_from_replies_without_eap() {
        let c = Arc::new(client());
        let up = c.pool.members[0].clone();
        let (req, _) = nas_request(&c);
        let mut buf = [0u8; 4096];
        buf[..req.len()].copy_from_slice(&req);
        let prep = prepare_request(
            &c,
            &up,
            Hops::default(),
            b"ps",
            &auth::random_authenticator(),
            &mut buf,
            req.len(),
            None,
        )
        .unwrap();
        let up_auth = finalize_request(&mut buf, prep.len, 7, &up, None).unwrap();
        let inflight = InFlight {
            client: c.clone(),
            prepared: prep,
            up_auth,
            sent_at: std::time::Instant::now(),
            sent_here: std::time::Instant::now(),
            reply_to: (),
            wire: Vec::new(),
            retries: 0,
            next_retry: std::time::Instant::now(),
            nas_packet: Vec::new(),
            pool: None,
            user_name: None,
            replica: false,
        };
        let relay = |code, eap, ma| {
            let (mut r, n) = upstream_reply(&up, &inflight, code, eap, ma);
            process_reply(&mut r, n, &up, false, &inflight, b"ps")
        };
        // FreeRADIUS 3.2.1: signed EAP replies, unsigned PAP ones. Both keep flowing.
        assert!(
            !relay(Code::AccessChallenge, true, true)
                .unwrap()
                .learnt_upstream_signs
        );
        assert!(
            !relay(Code::AccessAccept, true, true)
                .unwrap()
                .learnt_upstream_signs
        );
        assert!(relay(Code::AccessAccept, false, false).is_ok());
        assert!(!up.options.requires_message_authenticator());
        // A signed PAP reply: learnt once, and from then on an unsigned one is a forgery.
        assert!(
            relay(Code::AccessReject, false, true)
                .unwrap()
                .learnt_upstream_signs
        );
        assert!(
            !relay(Code::AccessAccept, false, true)
                .unwrap()
                .learnt_upstream_signs
        );
        assert!(up.options.requires_message_authenticator());
        assert!(matches!(
            relay(Code::AccessAccept, false, false),
            Err(ProxyError::UpstreamWithoutMessageAuthenticator)
        ));
    }

    #[test]
    fn forged_or_unsigned_packets_are_refused() {
        let mut c = client();
        let (mut req, _) = nas_request(&c);
        let mut buf = [0u8; 4096];
        // A NAS that signs with another secret: its Message-Authenticator fails... it has
        // none here, so require one.
        c.require_message_authenticator = YesNoAuto::Yes;
        buf[..req.len()].copy_from_slice(&req);
        assert!(matches!(
            prepare_request(
                &c,
                &c.pool.members[0],
                Hops::default(),
                b"ps",
                &auth::random_authenticator(),
                &mut buf,
                req.len(),
                None,
            ),
            Err(ProxyError::MissingMessageAuthenticator)
        ));
        // Accounting with a wrong authenticator.
        let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, 1).unwrap();
        p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
        p.sign(b"wrong", None).unwrap();
        let n = p.len();
        assert!(matches!(
            prepare_request(
                &c,
                &c.pool.members[0],
                Hops::default(),
                b"ps",
                &auth::random_authenticator(),
                &mut buf,
                n,
                None,
            ),
            Err(ProxyError::Verify(VerifyError::BadAuthenticator))
        ));
        req[0] = 12; // Status-Server: answered by the sidecar itself, later
        buf[..req.len()].copy_from_slice(&req);
        assert!(matches!(
            prepare_request(
                &c,
                &c.pool.members[0],
                Hops::default(),
                b"ps",
                &auth::random_authenticator(),
                &mut buf,
                req.len(),
                None,
            ),
            Err(ProxyError::NotForwarded { .. })
        ));
    }

    #[test]
    fn identifiers_are_reused_oldest_first_and_never_twice_at_once() {
        let mut pool = IdPool::default();
        let ids: Vec<u8> = (0..256).map(|i| pool.allocate(i).unwrap()).collect();
        assert_eq!(ids.len(), 256);
        assert_eq!(pool.allocate(999), Err(999));
        assert_eq!(pool.take(10), Some(10));
        assert_eq!(pool.allocate(1000), Ok(10));
        let stale = pool.expire(|v| *v < 5);
        assert_eq!(stale, vec![0, 1, 2, 3, 4]);
        assert_eq!(pool.in_flight(), 251);
    }
}
