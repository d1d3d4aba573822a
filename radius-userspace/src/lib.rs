//! radius-sidecar: a RADIUS proxy beside an AAA server, with an eBPF fast path. This crate
//! is the IO side; the decisions live in the sans-IO core ([`radius_core`], re-exported here
//! under the same names: [`codec`], [`client`], [`upstream`], [`pool`], [`proxy`],
//! [`dedup`], [`admission`], [`blastradius`], [`coa`], [`pending`], [`requests`],
//! [`answers`], [`flows`], [`counters`], and the worker's state machine, [`engine`]).
//!
//! - [`fastpath`]: the kernel objects (`steer`, `guard`, their maps) behind one owner.
//! - [`socket`]: wildcard and per-flow child sockets for both steering paths, the TCP
//!   listener, the epoll set.
//! - [`tcp`]: RADIUS/TCP (RFC 6613) and RADIUS/TLS (RFC 6614) connections in front of a
//!   worker's engine.
//! - [`tls`]: the certificate files of TLS listeners and upstreams, read into rustls
//!   configurations.
//! - [`upstream_conn`]: upstreams over RADIUS/TCP or RADIUS/TLS: connections, reconnected
//!   with backoff.
//! - [`daemon`]: start-up, the steering path, listeners and shutdown (the thin tokio driver).
//! - [`worker`]: UDP's driver of one engine: a wildcard, its flows' children and upstream
//!   sockets in one epoll set.
//! - [`reload`]: the configuration read again while traffic flows (SIGHUP, the control
//!   socket of `radius-sidecar reload`).
//! - [`control`]: the control socket: `reload`, `upgrade`, and `status` (flows, dynamic
//!   clients, upstreams, the fast path).
//! - [`upgrade`]: a new copy of the binary takes the sockets, flows and dynamic clients
//!   over from the running one, which finishes its requests in flight; [`handover`] is
//!   the wire between them (SCM_RIGHTS).
//! - [`metrics`]: Prometheus counters and the scrape endpoint.
//! - [`spool`]: the accounting spool's files (appended by workers, read again at start)
//!   and its replay thread.
//! - [`coa_listener`]: CoA and Disconnect requests from upstreams, handed to the worker of
//!   the NAS's flow.
//! - [`shared`]: what the threads share, and how the tokio side reaches a worker.
//! - [`dynamic`]: dynamic clients: the directories (file, HTTP, SQL) and their cache.
//! - [`config`]: the configuration model (TOML, with file:line:key errors).
pub use radius_core::{
    admission, answers, blastradius, client, coa, codec, counters, dedup, engine, flows, pending,
    pool, proxy, realm, requests, rewrite, stream, upstream,
};
pub mod coa_listener;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dynamic;
pub mod fastpath;
pub mod handover;
pub mod metrics;
pub mod reload;
pub mod shared;
pub mod socket;
pub mod spool;
pub mod tcp;
pub mod tls;
pub mod upgrade;
pub mod upstream_conn;
pub mod worker;
