//! Prometheus metrics: counters built once and kept in [`Metrics`], labels from closed enums,
//! and the scrape endpoint (`GET /metrics`, HTTP/1.1 on hyper).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, text::encode},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use radius_common::Counter as KernelCounter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use radius_core::counters::{Count, Counters, LATENCY_BOUNDS_US, Latencies};
pub use radius_core::counters::{Refusal, Via};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViaLabel {
    /// "Child" or "Wildcard".
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// [`Refusal::as_str`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A stream transport ("tcp"), and why a connection was refused or closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub transport: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// What happened to a connection to an upstream: the protocol it opened with, or why it
/// closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamEventLabel {
    pub upstream: String,
    pub event: &'static str,
}

/// The protocol a listener's TLS connection agreed on (ALPN).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub transport: &'static str,
    pub protocol: &'static str,
}

/// A peer of the sidecar: an upstream or a client, by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// "upstream" or "client".
    pub peer: &'static str,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabel {
    pub event: &'static str,
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    pub packets: Family<ViaLabel, Counter>,
    /// Handles into `packets`, taken once: the per-packet path touches no lock.
    packets_child: Counter,
    packets_wildcard: Counter,
    pub flows_created: Counter,
    /// Flows taken over from the process this one upgraded (`radius-sidecar upgrade`).
    pub flows_adopted: Counter,
    pub flows_ended: Counter,
    pub flows_active: Gauge,
    /// Flows that have not proved their client's secret yet (see crate::admission).
    pub flows_provisional: Gauge,
    /// Flows that proved it (made proved, or turned so).
    pub flows_proved: Counter,
    /// Provisional flows ended to make room, by what was full.
    pub flows_evicted: Family<ReasonLabel, Counter>,
    pub refused: Family<RefusalLabel, Counter>,
    pub kernel: Family<KernelLabel, Counter>,
    pub misdelivered: Counter,
    /// Requests sent upstream and replies relayed to NASes.
    pub forwarded: Counter,
    pub relayed: Counter,
    /// Requests sent upstream and not yet answered, given up or moved.
    pub requests_in_flight: Gauge,
    /// Requests the dedup caches remember: in flight, or answered and kept for NAS
    /// retransmissions (all workers; updated once a second).
    pub dedup_entries: Gauge,
    /// Requests or replies not relayed, by reason (ProxyError::reason and the upstream's).
    pub proxy_drops: Family<ReasonLabel, Counter>,
    /// Requests the sidecar answered itself (Status-Server, retransmissions from the cache).
    pub local_answers: Family<ReasonLabel, Counter>,
    /// Requests sent upstream again, by cause (our timer, or a NAS retransmission).
    pub upstream_retransmits: Family<ReasonLabel, Counter>,
    /// CoA and Disconnect requests, by what became of them.
    pub coa: Family<ReasonLabel, Counter>,
    /// Copies of Accounting-Requests to replica servers, by outcome.
    pub replicas: Family<ReasonLabel, Counter>,
    /// Dynamic-client definitions, by outcome: defined, refused, unanswered (the
    /// directory was down, failed or timed out).
    pub definitions: Family<ReasonLabel, Counter>,
    /// Reloads of the configuration, by result: ok, failed (the running one stayed).
    pub reloads: Family<ResultLabel, Counter>,
    /// 0 alive, 1 zombie, 2 dead (see crate::upstream).
    pub upstream_state: Family<UpstreamLabel, Gauge>,
    /// BlastRADIUS: 1 when a peer's Access packets must carry a Message-Authenticator
    /// (configured `yes`, or learnt by `auto`), 0 when not (yet).
    pub message_authenticator_required: Family<PeerLabel, Gauge>,
    /// Connections of stream transports (RADIUS/TCP): open now, accepted, refused at accept
    /// and closed, by reason.
    pub connections_open: Family<TransportLabel, Gauge>,
    pub connections_accepted: Family<TransportLabel, Counter>,
    pub connections_refused: Family<ConnectionLabel, Counter>,
    pub connections_closed: Family<ConnectionLabel, Counter>,
    /// TLS connections of listeners, by the protocol their handshake agreed on.
    pub connections_protocol: Family<ProtocolLabel, Counter>,
    /// Connections to stream upstreams: opened (by protocol) and closed (by reason).
    pub upstream_connections: Family<UpstreamEventLabel, Counter>,
    pub open_files_limit: Gauge,
    pub max_flows: Gauge,
    pub fast_path: Gauge,
    /// The accounting spool: records and bytes waiting, and what befell records.
    pub spool_records: Gauge,
    pub spool_bytes: Gauge,
    pub spool_events: Family<ReasonLabel, Counter>,
    /// How long each upstream took to answer (`radius_upstream_latency_seconds`).
    upstream_latency: Arc<UpstreamLatency>,
}

/// The answered requests' latency per upstream, a histogram: the workers time their
/// answers themselves (the core's [`Latencies`]) and add what they timed here once a
/// second, so no request touches a lock or memory shared between cores.
#[derive(Debug, Default)]
struct UpstreamLatency(Mutex<BTreeMap<String, Latencies>>);

impl UpstreamLatency {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Latencies>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collector for UpstreamLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let map = self.map();
        if map.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "upstream_latency_seconds",
            "Time from a request's first sending to its answer, by the upstream that answered",
            None,
            MetricType::Histogram,
        )?;
        for (upstream, l) in map.iter() {
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                .iter()
                .map(|&b| b as f64 / 1e6)
                .chain([f64::MAX])
                .zip(l.buckets)
                .collect();
            let label = UpstreamLabel {
                upstream: upstream.clone(),
            };
            family.encode_family(&label)?.encode_histogram::<NoLabels>(
                l.sum_us as f64 / 1e6,
                l.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// No exemplar labels.
type NoLabels = Vec<(String, String)>;

impl Metrics {
    /// What a worker timed of `upstream`'s answers since it last said.
    pub fn add_latencies(&self, upstream: &str, l: &Latencies) {
        let mut map = self.upstream_latency.map();
        match map.get_mut(upstream) {
            Some(m) => m.merge(l),
            None => {
                map.insert(upstream.to_owned(), l.clone());
            }
        }
    }

    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("radius");
        let packets = Family::<ViaLabel, Counter>::default();
        registry.register(
            "packets",
            "Packets handed to their flows, by how they arrived",
            packets.clone(),
        );
        let flows_created = Counter::default();
        registry.register("flows_created", "Flows created", flows_created.clone());
        let flows_adopted = Counter::default();
        registry.register(
            "flows_adopted",
            "Flows taken over with their sockets from the process this one upgraded",
            flows_adopted.clone(),
        );
        let flows_ended = Counter::default();
        registry.register(
            "flows_ended",
            "Flows ended (idle or shutdown)",
            flows_ended.clone(),
        );
        let flows_active = Gauge::default();
        registry.register("flows_active", "Flows alive now", flows_active.clone());
        let flows_provisional = Gauge::default();
        registry.register(
            "flows_provisional",
            "Flows alive now that have not proved their client's secret",
            flows_provisional.clone(),
        );
        let flows_proved = Counter::default();
        registry.register(
            "flows_proved",
            "Flows that proved their client's secret (a signed request)",
            flows_proved.clone(),
        );
        let flows_evicted = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "flows_evicted",
            "Provisional flows ended to make room, by what was full",
            flows_evicted.clone(),
        );
        let refused = Family::<RefusalLabel, Counter>::default();
        registry.register("refused", "Packets not taken, by reason", refused.clone());
        let kernel = Family::<KernelLabel, Counter>::default();
        registry.register(
            "fastpath_events",
            "Verdicts of the eBPF programs (steer, guard), by event",
            kernel.clone(),
        );
        let misdelivered = Counter::default();
        registry.register(
            "misdelivered",
            "Datagrams a connecting child got from another peer, handed back to the listener",
            misdelivered.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "forwarded",
            "Requests sent to an upstream",
            forwarded.clone(),
        );
        let relayed = Counter::default();
        registry.register("relayed", "Replies relayed to a NAS", relayed.clone());
        let dedup_entries = Gauge::default();
        registry.register(
            "dedup_entries",
            "Requests the dedup caches remember (in flight, or answered and kept for NAS retransmissions), updated once a second",
            dedup_entries.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests sent to an upstream and not yet answered or given up",
            requests_in_flight.clone(),
        );
        let proxy_drops = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "proxy_drops",
            "Requests and replies not relayed, by reason",
            proxy_drops.clone(),
        );
        let local_answers = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "local_answers",
            "Requests answered by the sidecar itself, by kind",
            local_answers.clone(),
        );
        let upstream_retransmits = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "upstream_retransmits",
            "Requests sent to an upstream again, by cause",
            upstream_retransmits.clone(),
        );
        let coa = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "coa",
            "CoA and Disconnect requests from upstreams, by outcome",
            coa.clone(),
        );
        let replicas = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "accounting_replicas",
            "Copies of Accounting-Requests sent to replica servers, by outcome (answered, \
             timeout, not_sent); never shown to the NAS",
            replicas.clone(),
        );
        let definitions = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dynamic_definitions",
            "Dynamic-client definitions, by outcome (defined, refused, unanswered)",
            definitions.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Reloads of the configuration, by result (ok; failed: the running one stayed)",
            reloads.clone(),
        );
        let upstream_state = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "upstream_state",
            "Health of each upstream: 0 alive, 1 zombie, 2 dead",
            upstream_state.clone(),
        );
        let message_authenticator_required = Family::<PeerLabel, Gauge>::default();
        registry.register(
            "message_authenticator_required",
            "1 when an upstream's replies or a client's Access-Requests must carry a \
             Message-Authenticator (configured, or learnt by auto)",
            message_authenticator_required.clone(),
        );
        let connections_open = Family::<TransportLabel, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections of stream transports open now",
            connections_open.clone(),
        );
        let connections_accepted = Family::<TransportLabel, Counter>::default();
        registry.register(
            "connections_accepted",
            "Connections of stream transports accepted",
            connections_accepted.clone(),
        );
        let connections_refused = Family::<ConnectionLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept, by reason (max_connections, per_source, \
             unknown_client)",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ConnectionLabel, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections closed after accept, by reason (peer, idle, silent, partial, \
             bad_length, slow_reader, error, shutdown)",
            connections_closed.clone(),
        );
        let connections_protocol = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "connections_protocol",
            "TLS connections accepted, by the protocol their handshake agreed on (ALPN: \
             radius/1.1, else radius/1.0)",
            connections_protocol.clone(),
        );
        let upstream_connections = Family::<UpstreamEventLabel, Counter>::default();
        registry.register(
            "upstream_connections",
            "Connections to TCP and TLS upstreams, by event: opened speaking tcp, radius/1.0 \
             or radius/1.1; or closed, by reason (closed, error, connect_failed, \
             alpn_refused, a TLS failure such as unknown_ca or name_mismatch)",
            upstream_connections.clone(),
        );
        let open_files_limit = Gauge::default();
        registry.register(
            "open_files_limit",
            "RLIMIT_NOFILE in force (one socket per flow)",
            open_files_limit.clone(),
        );
        let max_flows = Gauge::default();
        registry.register(
            "max_flows",
            "Most flows this process takes",
            max_flows.clone(),
        );
        let fast_path = Gauge::default();
        registry.register(
            "fast_path",
            "1 when the eBPF fast path steers packets, 0 on the user-space path",
            fast_path.clone(),
        );
        let spool_records = Gauge::default();
        registry.register(
            "spool_records",
            "Accounting-Requests in the spool, waiting for a server of their pool",
            spool_records.clone(),
        );
        let spool_bytes = Gauge::default();
        registry.register(
            "spool_bytes",
            "Bytes of the spool's files (bounded by spool.max_bytes)",
            spool_bytes.clone(),
        );
        let spool_events = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "spool",
            "Spooled Accounting-Requests, by event: written, replayed (answered by a server), \
             recovered (found at start), expired (past spool.max_age), refused (full or a \
             write error), corrupt (a record recovery could not read)",
            spool_events.clone(),
        );
        let packets_child = packets.get_or_create(&ViaLabel { via: "Child" }).clone();
        let packets_wildcard = packets.get_or_create(&ViaLabel { via: "Wildcard" }).clone();
        let upstream_latency = Arc::new(UpstreamLatency::default());
        registry.register_collector(Box::new(upstream_latency.clone()));
        Arc::new(Self {
            upstream_latency,
            registry,
            packets,
            packets_child,
            packets_wildcard,
            flows_created,
            flows_adopted,
            flows_ended,
            flows_active,
            flows_provisional,
            flows_proved,
            flows_evicted,
            refused,
            kernel,
            misdelivered,
            forwarded,
            relayed,
            requests_in_flight,
            dedup_entries,
            spool_records,
            spool_bytes,
            spool_events,
            proxy_drops,
            local_answers,
            upstream_retransmits,
            coa,
            replicas,
            definitions,
            reloads,
            upstream_state,
            message_authenticator_required,
            connections_open,
            connections_accepted,
            connections_refused,
            connections_closed,
            connections_protocol,
            upstream_connections,
            open_files_limit,
            max_flows,
            fast_path,
        })
    }

    pub fn packet(&self, via: Via) {
        match via {
            Via::Child => self.packets_child.inc(),
            Via::Wildcard => self.packets_wildcard.inc(),
        };
    }

    pub fn proxy_drop(&self, reason: &'static str) {
        self.proxy_drops
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn local_answer(&self, reason: &'static str) {
        self.local_answers
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn upstream_retransmit(&self, reason: &'static str) {
        self.upstream_retransmits
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn coa(&self, reason: &'static str) {
        self.coa.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn replica(&self, reason: &'static str) {
        self.replicas.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn definition(&self, outcome: &'static str) {
        self.definitions
            .get_or_create(&ReasonLabel { reason: outcome })
            .inc();
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn set_upstream_state(&self, upstream: &str, state: i64) {
        self.upstream_state
            .get_or_create(&UpstreamLabel {
                upstream: upstream.to_owned(),
            })
            .set(state);
    }

    /// Whether `peer` ("upstream" or "client") `name` must sign its Access packets now.
    pub fn set_message_authenticator_required(&self, peer: &'static str, name: &str, on: bool) {
        self.message_authenticator_required
            .get_or_create(&PeerLabel {
                peer,
                name: name.to_owned(),
            })
            .set(i64::from(on));
    }

    /// Drops the series of a client or an upstream (`peer`) a reload removed.
    pub fn forget_peer(&self, peer: &'static str, name: &str) {
        let label = PeerLabel {
            peer,
            name: name.to_owned(),
        };
        self.message_authenticator_required.remove(&label);
        if peer == "upstream" {
            self.upstream_state.remove(&UpstreamLabel {
                upstream: name.to_owned(),
            });
            self.upstream_latency.map().remove(name);
        }
    }

    pub fn flow_evicted(&self, reason: &'static str) {
        self.flows_evicted
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn refuse(&self, reason: Refusal) {
        self.refused
            .get_or_create(&RefusalLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Copies the kernel's counters (already monotonic) into the registry.
    pub fn set_kernel(&self, counters: &crate::fastpath::Counters) {
        for c in KernelCounter::ALL {
            let m = self.kernel.get_or_create(&KernelLabel { event: c.name() });
            m.inner()
                .store(counters.get(c), std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The engine's counts, as metrics.
impl Counters for Metrics {
    fn count(&self, c: Count) {
        match c {
            Count::Packet(via) => self.packet(via),
            Count::Refused(r) => self.refuse(r),
            Count::Dropped(reason) => self.proxy_drop(reason),
            Count::LocalAnswer(reason) => self.local_answer(reason),
            Count::UpstreamRetransmit(cause) => self.upstream_retransmit(cause),
            Count::Coa(what) => self.coa(what),
            Count::Replica(what) => self.replica(what),
            Count::FlowCreated { proved } => {
                self.flows_created.inc();
                self.flows_active.inc();
                if proved {
                    self.flows_proved.inc();
                } else {
                    self.flows_provisional.inc();
                }
            }
            Count::FlowAdopted => {
                self.flows_adopted.inc();
                self.flows_active.inc();
                self.flows_proved.inc();
            }
            Count::FlowProved => {
                self.flows_provisional.dec();
                self.flows_proved.inc();
            }
            Count::FlowEnded { proved } => {
                self.flows_ended.inc();
                self.flows_active.dec();
                if !proved {
                    self.flows_provisional.dec();
                }
            }
            Count::FlowEvicted(reason) => self.flow_evicted(reason),
            Count::RequestBegun => {
                self.requests_in_flight.inc();
            }
            Count::RequestEnded => {
                self.requests_in_flight.dec();
            }
            Count::DedupEntries(delta) => {
                self.dedup_entries.inc_by(delta);
            }
        }
    }

    fn signs(&self, peer: &'static str, name: &str) {
        self.set_message_authenticator_required(peer, name, true);
    }
}

/// Serves `GET /metrics` (HTTP/1.1 on hyper, keep-alive as the scraper wants) until
/// cancelled. Anything else gets 404; a connection that sends no request head within 5 s
/// is closed.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use hyper::{Method, Response, StatusCode, body::Incoming, header};
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // EMFILE and the like: the endpoint waits, the daemon goes on.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return Ok(()),
        };
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let found = req.method() == Method::GET && req.uri().path() == "/metrics";
            let (status, body) = if found {
                (StatusCode::OK, metrics.render())
            } else {
                (StatusCode::NOT_FOUND, String::from("not found\n"))
            };
            let resp = Response::builder()
                .status(status)
                .header(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(http_body_util::Full::new(bytes::Bytes::from(body)));
            async move { resp }
        });
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5));
            let served = http.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            tokio::select! {
                _ = served => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names an exposition declares (`# TYPE name kind`).
    fn declared(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_grafana_dashboard_shows_only_metrics_the_daemon_exports() {
        // Families show in the exposition once they have a series: give each one.
        let m = Metrics::new();
        m.reload("ok");
        m.refuse(Refusal::MaxFlows);
        m.proxy_drop("x");
        m.local_answer("x");
        m.upstream_retransmit("x");
        m.coa("x");
        m.definition("defined");
        m.flow_evicted("x");
        m.set_upstream_state("u", 0);
        m.packet(Via::Child);
        m.kernel.get_or_create(&KernelLabel { event: "x" }).inc();
        m.connections_open
            .get_or_create(&TransportLabel { transport: "tcp" })
            .set(0);
        m.add_latencies("u", &Latencies::default());
        let names = declared(&m.render());
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../packaging/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut used = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a PromQL expression");
                // Every radius_ name in the expression, with the suffixes Prometheus adds.
                for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                    if !word.starts_with("radius_") {
                        continue;
                    }
                    let base = ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|x| word.strip_suffix(x))
                        .unwrap_or(word);
                    assert!(
                        names.iter().any(|n| n == base || n == word),
                        "panel {:?} uses {word}, which the daemon does not export",
                        panel["title"]
                    );
                    used += 1;
                }
            }
        }
        assert!(used >= 10, "the dashboard covers the main series");
    }

    #[test]
    fn latencies_are_a_histogram_per_upstream_summed_over_workers() {
        let m = Metrics::new();
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        a.observe(700);
        b.observe(700);
        b.observe(30_000);
        m.add_latencies("fr1", &a);
        m.add_latencies("fr1", &b);
        let text = m.render();
        for line in [
            "# TYPE radius_upstream_latency_seconds histogram",
            "radius_upstream_latency_seconds_count{upstream=\"fr1\"} 3",
            "radius_upstream_latency_seconds_bucket{le=\"0.0005\",upstream=\"fr1\"} 0",
            "radius_upstream_latency_seconds_bucket{le=\"0.001\",upstream=\"fr1\"} 2",
            "radius_upstream_latency_seconds_bucket{le=\"0.05\",upstream=\"fr1\"} 3",
            "radius_upstream_latency_seconds_bucket{le=\"+Inf\",upstream=\"fr1\"} 3",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn a_removed_peer_leaves_no_series() {
        let m = Metrics::new();
        m.set_message_authenticator_required("client", "gone", true);
        m.set_message_authenticator_required("upstream", "old", false);
        m.set_upstream_state("old", 1);
        let mut l = Latencies::default();
        l.observe(700);
        m.add_latencies("old", &l);
        m.set_message_authenticator_required("client", "kept", true);
        m.forget_peer("client", "gone");
        m.forget_peer("upstream", "old");
        let text = m.render();
        assert!(
            !text.contains("\"gone\"") && !text.contains("\"old\""),
            "{text}"
        );
        assert!(text.contains("name=\"kept\""), "{text}");
    }
}
