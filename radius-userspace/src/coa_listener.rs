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
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{net::UdpSocket, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    coa::{NasName, SESSION_CONTEXT_NOT_FOUND, nak},
    codec::{Code, Packet, auth},
    shared::{CoaJob, Shared, ToWorker},
    upstream::Upstream,
};

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
    let Some(at) = shared.current.load().common.nas_directory.find(&names) else {
        m.coa("nas_not_found");
        info!(upstream = %upstream.name, "CoA for a NAS with no flow: NAK");
        return nak(&p, &upstream, SESSION_CONTEXT_NOT_FOUND);
    };
    let answer = answer.clone();
    let job = CoaJob {
        key: at.key,
        origin_id: p.identifier(),
        origin_auth: *p.authenticator(),
        upstream,
        packet: data[..p.len()].to_vec(),
        answer: Box::new(move |a| answer.try_send((a, from)).is_ok()),
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
    let current = shared.current.load();
    let c = &current.common;
    // The configured upstreams (a retired link's server is no longer trusted).
    c.upstream_index
        .values()
        .filter_map(|&link| c.upstreams.get(link))
        .find(|u| u.auth.ip() == ip || u.acct.is_some_and(|a| a.ip() == ip))
        .cloned()
}
