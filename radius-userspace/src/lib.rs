//! radius-sidecar: a RADIUS proxy beside an AAA server, with an eBPF fast path.
//!
//! - [`codec`]: the only RADIUS parser and signer (sans-IO).
//! - [`fastpath`]: the kernel objects (`steer`, `guard`, their maps) behind one owner.
//! - [`socket`]: wildcard and per-flow child sockets for both steering paths.
//! - [`daemon`]: start-up, the steering path, listeners and shutdown (the thin tokio driver).
//! - [`worker`]: one wildcard's flows and upstream sockets, driven from one epoll set.
//! - [`metrics`]: Prometheus counters and the scrape endpoint.
//! - [`coa`]: CoA and Disconnect requests from upstreams to NASes, through their flows.
//! - [`config`], [`client`], [`dynamic`], [`proxy`], [`dedup`], [`pool`], [`admission`]:
//!   the configuration model, static and dynamic clients, forwarding, RFC 5080 duplicate
//!   detection, upstream pools and health, provisional flows (sans-IO).
pub mod admission;
pub mod client;
pub mod coa;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod dedup;
pub mod dynamic;
pub mod fastpath;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod socket;
pub mod worker;
