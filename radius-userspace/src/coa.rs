//! Dynamic Authorization (RFC 5176): CoA-Request and Disconnect-Request from an upstream to
//! a NAS, through the NAS's own flow.
//!
//! The upstream sends to the sidecar's `coa_listen` socket; [`listen`] checks the request
//! with that upstream's secret (the origin is the upstream whose address it comes from),
//! finds the NAS by NAS-Identifier, NAS-IP-Address or Operator-NAS-Identifier among the
//! flows that carried them ([`NasDirectory`]), and hands the job to the flow's worker. The
//! worker re-signs it for the NAS and sends it from the flow's address and port to the NAS's
//! (so it crosses the NAS's NAT like any reply); the NAS's ACK or NAK comes back on the flow,
//! is checked with the NAS's secret, re-signed for the upstream and sent back from here.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use radius_common::FlowKey;
use tokio::{net::UdpSocket, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    codec::{Code, Packet, PacketMut, attr, auth},
    daemon::Shared,
    upstream::Upstream,
    worker::ToWorker,
};

/// RFC 5176 Error-Cause 503: Session-Context-Not-Found.
const SESSION_CONTEXT_NOT_FOUND: u32 = 503;
/// RFC 8559: Operator-NAS-Identifier is the extended attribute 241.8 (octets).
const EXT_OPERATOR_NAS_IDENTIFIER: u8 = 8;

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

/// Where a NAS's flow lives: its worker and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowHandle {
    pub worker: usize,
    pub key: FlowKey,
}

/// The NASes seen on flows, by name. Written once per flow (its first request that names
/// its NAS, and again when the flow proves itself), read once per CoA-Request: never per
/// packet. A name held by a proved flow is not taken by a provisional one, so spoofed
/// requests cannot divert a NAS's CoA.
#[derive(Debug, Default)]
pub struct NasDirectory {
    inner: Mutex<Names>,
}

#[derive(Debug, Default)]
struct Names {
    /// Name -> (flow, whether that flow has proved itself).
    map: HashMap<NasName, (FlowHandle, bool)>,
    /// Flow -> the names it registered: forgetting a flow costs its own names only.
    by_flow: HashMap<FlowHandle, Vec<NasName>>,
}

impl NasDirectory {
    pub fn register(&self, names: Vec<NasName>, at: FlowHandle, proved: bool) {
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
    pub fn forget(&self, at: FlowHandle) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Names { map, by_flow } = &mut *g;
        for n in by_flow.remove(&at).unwrap_or_default() {
            if map.get(&n).is_some_and(|(h, _)| *h == at) {
                map.remove(&n);
            }
        }
    }

    pub fn find(&self, names: &[NasName]) -> Option<FlowHandle> {
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

/// A CoA or Disconnect request on its way to a NAS's flow.
#[derive(Debug)]
pub(crate) struct CoaJob {
    pub key: FlowKey,
    /// Where the answer goes, and what it must be signed against.
    pub origin: SocketAddr,
    pub origin_id: u8,
    pub origin_auth: [u8; 16],
    pub upstream: Arc<Upstream>,
    pub packet: Vec<u8>,
    /// The channel back to [`listen`]: (answer, origin).
    pub answer: mpsc::Sender<(Vec<u8>, SocketAddr)>,
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

/// Serves the CoA listener until cancelled.
pub(crate) async fn listen(shared: Arc<Shared>, sock: UdpSocket) {
    let (answer_tx, mut answers) = mpsc::channel::<(Vec<u8>, SocketAddr)>(1024);
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if let Some(reply) = on_request(&shared, &buf[..n], from, &answer_tx) {
                    let _ = sock.send_to(&reply, from).await;
                }
            }
            Some((answer, to)) = answers.recv() => {
                if sock.send_to(&answer, to).await.is_ok() {
                    shared.metrics.coa("answered");
                }
            }
            () = shared.cancel.cancelled() => return,
        }
    }
}

/// Checks a request from an upstream and hands it to the NAS's worker; returns an
/// immediate answer (a NAK) when there is no such NAS.
fn on_request(
    shared: &Shared,
    data: &[u8],
    from: SocketAddr,
    answer: &mpsc::Sender<(Vec<u8>, SocketAddr)>,
) -> Option<Vec<u8>> {
    let m = &shared.metrics;
    let Some(upstream) = origin(shared, from.ip()) else {
        m.coa("unknown_origin");
        debug!(%from, "CoA from an address that is no upstream: dropped");
        return None;
    };
    let Ok(p) = Packet::parse(data) else {
        m.coa("malformed");
        return None;
    };
    if !matches!(p.code(), Code::CoaRequest | Code::DisconnectRequest) {
        m.coa("not_coa");
        return None;
    }
    if auth::verify(&p, &upstream.secret, None).is_err() {
        m.coa("bad_signature");
        warn!(upstream = %upstream.name, "CoA request that does not verify: dropped");
        return None;
    }
    let names = NasName::of(&p);
    let Some(at) = shared.nas_directory.find(&names) else {
        m.coa("nas_not_found");
        info!(upstream = %upstream.name, "CoA for a NAS with no flow: NAK");
        return nak(&p, &upstream, SESSION_CONTEXT_NOT_FOUND);
    };
    let job = CoaJob {
        key: at.key,
        origin: from,
        origin_id: p.identifier(),
        origin_auth: *p.authenticator(),
        upstream,
        packet: data[..p.len()].to_vec(),
        answer: answer.clone(),
    };
    match shared.defined.get(at.worker) {
        Some(inbox) => {
            inbox.send(ToWorker::Coa(job));
            m.coa("to_nas");
        }
        None => m.coa("nas_not_found"),
    }
    None
}

/// The upstream a CoA comes from: the one whose address it is.
fn origin(shared: &Shared, ip: IpAddr) -> Option<Arc<Upstream>> {
    shared
        .upstreams
        .iter()
        .find(|u| u.auth.ip() == ip || u.acct.is_some_and(|a| a.ip() == ip))
        .cloned()
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
        let at = FlowHandle {
            worker: 1,
            key: crate::socket::flow_key(
                "192.0.2.7:5000".parse().unwrap(),
                "192.0.2.1:1812".parse().unwrap(),
            ),
        };
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
        let handle = |port: u16| FlowHandle {
            worker: 0,
            key: crate::socket::flow_key(
                SocketAddr::from(([192, 0, 2, 7], port)),
                "192.0.2.1:1812".parse().unwrap(),
            ),
        };
        let (real, spoofed, later) = (handle(1000), handle(2000), handle(3000));
        let name = || vec![NasName::Identifier(b"ap-1".to_vec())];
        let d = NasDirectory::default();
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
