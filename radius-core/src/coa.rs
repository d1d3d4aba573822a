//! Dynamic Authorization (RFC 5176) bookkeeping, sans-IO: how a CoA-Request names its NAS
//! ([`NasName`]), which flow carries each NAS ([`NasDirectory`], proved flows first), and the
//! NAK the sidecar sends itself when there is no such NAS ([`nak`]). The daemon's CoA
//! listener and its workers move the packets.

use std::{
    collections::HashMap,
    hash::Hash,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use radius_common::FlowKey;

use crate::{
    codec::{Code, Packet, PacketMut, attr},
    upstream::Upstream,
};

/// RFC 5176 Error-Cause 503: Session-Context-Not-Found.
pub const SESSION_CONTEXT_NOT_FOUND: u32 = 503;
/// RFC 8559: Operator-NAS-Identifier is the extended attribute 241.8 (octets).
const EXT_OPERATOR_NAS_IDENTIFIER: u8 = 8;

/// Where a NAS's flow lives: its worker and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowHandle {
    pub worker: usize,
    pub key: FlowKey,
}

/// Hands a NAS's answer (signed for the upstream) back to the CoA listener; false when it
/// is too busy to take it.
pub type Answer = Box<dyn FnOnce(Vec<u8>) -> bool + Send>;

/// A CoA or Disconnect request on its way to a NAS's flow.
pub struct CoaJob {
    pub key: FlowKey,
    /// The upstream's Identifier and authenticator: what the answer is signed against.
    pub origin_id: u8,
    pub origin_auth: [u8; 16],
    pub upstream: Arc<Upstream>,
    pub packet: Vec<u8>,
    pub answer: Answer,
}

impl std::fmt::Debug for CoaJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoaJob")
            .field("origin_id", &self.origin_id)
            .field("upstream", &self.upstream.name)
            .field("len", &self.packet.len())
            .finish_non_exhaustive()
    }
}

/// How a NAS is named in a CoA-Request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum NasName {
    Identifier(Vec<u8>),
    IpAddress(Ipv4Addr),
    Operator(Vec<u8>),
}

impl NasName {
    /// The names a packet gives its NAS.
    pub fn of(p: &Packet<'_>) -> Vec<NasName> {
        let mut v = Vec::new();
        if let Some(a) = p.get(attr::NAS_IDENTIFIER) {
            v.push(NasName::Identifier(a.value.to_vec()));
        }
        if let Some(ip) = p
            .get(attr::NAS_IP_ADDRESS)
            .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        {
            v.push(NasName::IpAddress(Ipv4Addr::from(ip)));
        }
        for a in p.get_all(attr::EXTENDED_1) {
            if let Some((EXT_OPERATOR_NAS_IDENTIFIER, value)) = a.extended() {
                v.push(NasName::Operator(value.to_vec()));
            }
        }
        v
    }
}

/// The NASes seen on flows, by name; `H` says where a flow is (the driver's handle). Written once per flow (its first request that names
/// its NAS, and again when the flow proves itself), read once per CoA-Request: never per
/// packet. A name held by a proved flow is not taken by a provisional one, so spoofed
/// requests cannot divert a NAS's CoA.
#[derive(Debug)]
pub struct NasDirectory<H> {
    inner: Mutex<Names<H>>,
}

#[derive(Debug)]
struct Names<H> {
    /// Name -> (flow, whether that flow has proved itself).
    map: HashMap<NasName, (H, bool)>,
    /// Flow -> the names it registered: forgetting a flow costs its own names only.
    by_flow: HashMap<H, Vec<NasName>>,
}

impl<H> Default for NasDirectory<H> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Names {
                map: HashMap::new(),
                by_flow: HashMap::new(),
            }),
        }
    }
}

impl<H: Copy + Eq + Hash> NasDirectory<H> {
    pub fn register(&self, names: Vec<NasName>, at: H, proved: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Names { map, by_flow } = &mut *g;
        for n in names {
            if let Some((holder, true)) = map.get(&n)
                && !proved
                && *holder != at
            {
                continue;
            }
            if let Some((old, _)) = map.insert(n.clone(), (at, proved))
                && old != at
                && let Some(v) = by_flow.get_mut(&old)
            {
                v.retain(|x| *x != n);
            }
            let mine = by_flow.entry(at).or_default();
            if !mine.contains(&n) {
                mine.push(n);
            }
        }
    }

    /// Forgets the names that point at a flow that ended.
    pub fn forget(&self, at: H) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Names { map, by_flow } = &mut *g;
        for n in by_flow.remove(&at).unwrap_or_default() {
            if map.get(&n).is_some_and(|(h, _)| *h == at) {
                map.remove(&n);
            }
        }
    }

    pub fn find(&self, names: &[NasName]) -> Option<H> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        names.iter().find_map(|n| g.map.get(n).map(|(h, _)| *h))
    }

    /// Names registered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the NAK the sidecar itself sends when it cannot deliver `req` (no such NAS).
pub fn nak(req: &Packet<'_>, upstream: &Upstream, cause: u32) -> Option<Vec<u8>> {
    let code = match req.code() {
        Code::CoaRequest => Code::CoaNak,
        Code::DisconnectRequest => Code::DisconnectNak,
        _ => return None,
    };
    let mut buf = [0u8; 512];
    let mut m = PacketMut::new(&mut buf, code, req.identifier()).ok()?;
    m.push(attr::ERROR_CAUSE, &cause.to_be_bytes()).ok()?;
    for ps in req.get_all(attr::PROXY_STATE) {
        m.push(attr::PROXY_STATE, ps.value).ok()?;
    }
    m.message_authenticator_first().ok()?;
    m.sign(&upstream.secret, Some(req.authenticator())).ok()?;
    Some(m.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_names_its_nas_in_every_way_it_can() {
        let mut b = [0u8; 256];
        let mut m = PacketMut::new(&mut b, Code::CoaRequest, 1).unwrap();
        m.push(attr::NAS_IDENTIFIER, b"ap-1").unwrap();
        m.push(attr::NAS_IP_ADDRESS, &[192, 0, 2, 7]).unwrap();
        m.push(attr::EXTENDED_1, &[EXT_OPERATOR_NAS_IDENTIFIER, b'o', b'p'])
            .unwrap();
        let p = Packet::parse(m.as_bytes()).unwrap();
        let names = NasName::of(&p);
        assert_eq!(
            names,
            vec![
                NasName::Identifier(b"ap-1".to_vec()),
                NasName::IpAddress(Ipv4Addr::new(192, 0, 2, 7)),
                NasName::Operator(b"op".to_vec()),
            ]
        );
        let d = NasDirectory::default();
        let at = 7u32;
        d.register(
            vec![NasName::IpAddress(Ipv4Addr::new(192, 0, 2, 7))],
            at,
            true,
        );
        assert_eq!(d.find(&names), Some(at));
        d.forget(at);
        assert_eq!(d.find(&names), None);
        assert!(d.is_empty());
    }

    #[test]
    fn a_provisional_flow_cannot_take_a_proved_flows_name() {
        let (real, spoofed, later) = (1000u32, 2000, 3000);
        let name = || vec![NasName::Identifier(b"ap-1".to_vec())];
        let d = NasDirectory::<u32>::default();
        d.register(name(), real, true);
        d.register(name(), spoofed, false);
        assert_eq!(
            d.find(&name()),
            Some(real),
            "spoofed requests divert no CoA"
        );
        d.forget(spoofed);
        assert_eq!(d.find(&name()), Some(real));
        // A proved flow of the same NAS (it moved port) takes the name over.
        d.register(name(), later, true);
        assert_eq!(d.find(&name()), Some(later));
        d.forget(real);
        assert_eq!(
            d.find(&name()),
            Some(later),
            "forgetting the old flow keeps the new"
        );
        d.forget(later);
        assert!(d.is_empty());
        // Between provisional flows (NASes that sign nothing), the latest wins.
        d.register(name(), spoofed, false);
        d.register(name(), real, false);
        assert_eq!(d.find(&name()), Some(real));
    }
}
