//! radius-sidecar's core, sans-IO: plain structs fed with bytes and the time, tested on a
//! virtual clock. The daemon (`radius-userspace`) drives them from its sockets; nothing here
//! opens, reads or writes one (the crate has no IO dependency to do it with).
//!
//! Layers, lowest first (a module imports only those above it in this list):
//! - [`codec`]: the only RADIUS parser and signer.
//! - [`rewrite`]: attribute rewriting compiled from dictionary names, applied in place.
//! - [`spool`]: the accounting spool's records, replays and their window.
//! - [`stream`]: RADIUS packets cut out of a TCP or TLS byte stream.
//! - [`counters`]: what the engine counts, as events the daemon turns into metrics.
//! - [`blastradius`]: the yes/no/auto switches of CVE-2024-3596.
//! - [`dedup`]: RFC 5080 duplicate detection of one flow.
//! - [`admission`]: which flows have not proved themselves, and which makes room.
//! - [`pending`]: packets of sources being defined: kept in order, bounded, handed back.
//! - [`upstream`]: AAA servers, their policy and health.
//! - [`pool`]: groups of upstreams, and where a request (or an EAP conversation) goes.
//! - [`realm`]: the realm of a User-Name, and the realm (its pools, its answers) it picks.
//! - [`client`]: who may talk to the sidecar: the client table, proofs, NAT entries.
//! - [`dynamic`]: dynamic clients: their prefixes, the shared cache of definitions.
//! - [`proxy`]: forwarding: a request prepared for an upstream, a reply for the NAS.
//! - [`answers`]: what the sidecar answers itself (Status-Server, Protocol-Error, a
//!   realm's Access-Reject or Accounting-Response).
//! - [`requests`]: a worker's requests in flight upstream: Identifier spaces, timers.
//! - [`coa`]: CoA bookkeeping: NAS names, which flow carries each NAS, the sidecar's NAK.
//! - [`flows`]: a worker's flow table.
//! - [`engine`]: the state machine of one worker, fed events and the time; asked what to
//!   send and when to wake.
pub mod admission;
pub mod answers;
pub mod blastradius;
pub mod client;
pub mod coa;
pub mod codec;
pub mod counters;
pub mod dedup;
pub mod dynamic;
pub mod engine;
pub mod flows;
pub mod pending;
pub mod pool;
pub mod proxy;
pub mod realm;
pub mod requests;
pub mod rewrite;
pub mod spool;
pub mod stream;
pub mod upstream;
