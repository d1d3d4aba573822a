//! The configuration model: one TOML file (`--config`), or the embedded default. Every
//! error names the file, the line and the key. Parsing is separate from the daemon so
//! `radius-sidecar check-config` and the tests cover it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    blastradius::YesNoAuto,
    client::{Client, ClientTable, NasKey, SecretText},
    codec::auth::Secret,
    dynamic::{Directory, DynamicClients, FileDirectory, Lifetimes, SqlDirectory},
    pool::{Policy, Pool},
    upstream::{Health, HealthPolicy, Upstream, UpstreamOptions},
};

/// The configuration `cargo xtask run` uses when no file is given.
pub const DEFAULT: &str = include_str!("../config/default.toml");

/// Where the control socket is unless the configuration says otherwise (the unit's
/// RuntimeDirectory).
pub const DEFAULT_CONTROL: &str = "/run/radius-sidecar/control.sock";

/// A value that "none" switches off: a NIC, an address. Read from the file and from flags
/// by one parser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrNone<T>(pub Option<T>);

impl<T: std::str::FromStr> std::str::FromStr for OrNone<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|v| Self(Some(v)))
            .map_err(|e| format!("`{s}`: {e} (or \"none\")"))
    }
}

impl<'de, T: std::str::FromStr> Deserialize<'de> for OrNone<T>
where
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Whether to use the eBPF fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Use it when it loads; otherwise say why and run the user-space path.
    Auto,
    /// Never load it (`--no-ebpf`).
    Off,
    /// Refuse to start without it (`--require-ebpf`).
    Require,
}

/// What a listener serves, which decides how a NAS's Status-Server is answered (RFC 5997:
/// Access-Accept on an authentication port, Accounting-Response on an accounting port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    Auth,
    Acct,
    /// By port number: 1813 and 1646 are accounting, any other authentication.
    #[default]
    Auto,
}

impl Role {
    /// Whether a listener of this role on `port` is an accounting one.
    pub fn is_accounting(self, port: u16) -> bool {
        match self {
            Role::Auth => false,
            Role::Acct => true,
            Role::Auto => matches!(port, 1813 | 1646),
        }
    }
}

/// A UDP address NASes send to, and its role: written `ADDR:PORT` (role by port) or
/// `ADDR:PORT/auth`, `ADDR:PORT/acct`, `ADDR:PORT/auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub role: Role,
}

impl From<SocketAddr> for Listener {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            role: Role::Auto,
        }
    }
}

impl std::str::FromStr for Listener {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, role) = match s.rsplit_once('/') {
            Some((a, r)) => (a, r),
            None => (s, "auto"),
        };
        let role = match role {
            "auth" => Role::Auth,
            "acct" => Role::Acct,
            "auto" => Role::Auto,
            other => {
                return Err(format!(
                    "`{other}`: a listener's role is \"auth\", \"acct\" or \"auto\""
                ));
            }
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an address:port"))?;
        Ok(Self { addr, role })
    }
}

/// What the run loop needs, from the TOML file (or the embedded default) and the flags.
/// Its `Default` is the one source of every default.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonConfig {
    /// UDP services to listen on (address and port of the wildcards), with their roles.
    pub listen: Vec<Listener>,
    /// Wildcard sockets (worker tasks) per listen address.
    pub workers: usize,
    /// NIC for `guard`; none: no XDP.
    pub iface: Option<String>,
    pub ebpf: EbpfMode,
    /// A flow with no packet for this long ends and closes its child.
    pub idle_timeout: Duration,
    /// How long a reply is kept to answer NAS retransmissions (RFC 5080).
    pub cleanup_delay: Duration,
    /// Upper bound on flows; the open-file limit may lower it.
    pub max_flows: Option<usize>,
    /// Most flows that have not proved their client's secret (none: as many as
    /// `max_flows`). They hold no socket.
    pub max_provisional_flows: Option<usize>,
    /// A provisional flow with no packet for this long ends (at least `cleanup_delay`).
    pub provisional_idle_timeout: Duration,
    /// Receive buffer of each wildcard, bytes.
    pub wildcard_rcvbuf: usize,
    /// `guard`'s limit for sources without a flow: packets per second and burst (0: off).
    pub new_source_pps: u64,
    pub new_source_burst: u64,
    /// Where to serve `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where upstreams send CoA and Disconnect requests (RFC 5176); none: no listener.
    pub coa_listen: Option<SocketAddr>,
    /// The control socket (`radius-sidecar reload`), a Unix socket only its owner may use.
    pub control: Option<PathBuf>,
    /// RADIUS/TCP services (RFC 6613), with their roles; one worker thread each.
    pub listen_tcp: Vec<Listener>,
    /// RADIUS/TLS services (RFC 6614), with their roles; one worker thread each.
    pub listen_tls: Vec<Listener>,
    /// Their certificate files (`[tls]`).
    pub tls: Option<crate::tls::TlsFiles>,
    /// A connection's first packet, and the rest of a packet begun, must come within this.
    pub tcp_timeout: Duration,
    /// Most connections per RADIUS/TCP listener (none: as many as `max_flows`), and from
    /// one source address.
    pub max_connections: Option<usize>,
    pub max_connections_per_source: usize,
}

/// Half the cores, at least one: the sidecar runs beside the AAA server, which needs the
/// rest. Measured on 2 cores behind FreeRADIUS at 64 outstanding: one worker spends 14 us of
/// CPU per request where two spend 18-20 us (each wakes for fewer datagrams and competes
/// with FreeRADIUS for its core), with 24 % more answered; against a server that costs
/// nothing, one worker answers as many as two (BENCHMARKS.md).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 1812)).into(),
                SocketAddr::from(([127, 0, 0, 1], 1813)).into(),
            ],
            workers: default_workers(),
            iface: Some("lo".into()),
            ebpf: EbpfMode::Auto,
            idle_timeout: Duration::from_secs(300),
            cleanup_delay: Duration::from_secs(5),
            max_flows: None,
            max_provisional_flows: None,
            provisional_idle_timeout: Duration::from_secs(10),
            wildcard_rcvbuf: 4 << 20,
            new_source_pps: 2_000,
            new_source_burst: 4_000,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9812))),
            coa_listen: None,
            control: Some(PathBuf::from(DEFAULT_CONTROL)),
            listen_tcp: Vec::new(),
            listen_tls: Vec::new(),
            tls: None,
            tcp_timeout: Duration::from_secs(10),
            max_connections: None,
            max_connections_per_source: 16,
        }
    }
}

/// A configuration error: where and what.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<Server>,
    #[serde(default, rename = "upstream")]
    upstreams: Vec<Spanned<UpstreamSection>>,
    #[serde(default, rename = "pool")]
    pools: Vec<Spanned<PoolSection>>,
    #[serde(default, rename = "client")]
    clients: Vec<Spanned<ClientSection>>,
    #[serde(default, rename = "realm")]
    realms: Vec<Spanned<RealmSection>>,
    #[serde(default, rename = "rewrite")]
    rewrites: Vec<Spanned<RewriteSection>>,
    dynamic: Option<Spanned<DynamicSection>>,
    tls: Option<Spanned<TlsSection>>,
    spool: Option<Spanned<SpoolSection>>,
}

/// `[spool]`: where the Accounting-Requests of the named pools go when none of their
/// servers answers, until one does (see `crate::spool`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpoolSection {
    /// Pools (or upstreams) whose accounting is spooled.
    pools: Vec<Spanned<String>>,
    /// The spool's directory (relative paths from the configuration file's folder).
    #[serde(default = "d_spool_dir")]
    dir: PathBuf,
    /// "always" (before the NAS is answered), "interval" (once a second) or "never".
    #[serde(default = "d_spool_fsync")]
    fsync: crate::spool::Fsync,
    /// Most bytes on disk; past them, accounting is not answered (the NAS retries).
    #[serde(default = "d_spool_max_bytes")]
    max_bytes: u64,
    /// Seconds a record is kept undelivered before it is dropped (counted, logged).
    #[serde(default = "d_spool_max_age")]
    max_age: u64,
    /// Replayed requests out at once.
    #[serde(default = "d_spool_window")]
    window: usize,
    /// Milliseconds before a replayed request without an answer is sent again.
    #[serde(default = "d_spool_retry_ms")]
    retry_ms: u64,
}

fn d_spool_dir() -> PathBuf {
    "/var/spool/radius-sidecar".into()
}
fn d_spool_fsync() -> crate::spool::Fsync {
    crate::spool::Fsync::Always
}
fn d_spool_max_bytes() -> u64 {
    1 << 30
}
fn d_spool_max_age() -> u64 {
    7 * 24 * 3600
}
fn d_spool_window() -> usize {
    32
}
fn d_spool_retry_ms() -> u64 {
    2_000
}

/// `[[realm]]`: where requests go by the realm of their User-Name (see
/// `radius_core::realm` for how names are matched).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RealmSection {
    /// `example.org`, `*.example.org`, `~regular expression`, `DEFAULT` or `NULL` (names
    /// without a realm).
    name: String,
    /// The pool (or upstream) of its Access-Requests; without one they are refused here.
    auth: Option<Spanned<String>>,
    /// The pool (or upstream) of its Accounting-Requests.
    acct: Option<Spanned<String>>,
    /// Pools (or upstreams) that get a copy of each of its Accounting-Requests.
    #[serde(default)]
    acct_replicas: Vec<Spanned<String>>,
    /// The realm goes from User-Name before the request is forwarded.
    #[serde(default)]
    strip: bool,
    /// The Reply-Message of the Access-Reject of a realm without `auth`.
    reject_message: Option<String>,
    /// Without `acct`: answer Accounting-Requests here (else they are dropped, counted).
    #[serde(default)]
    answer_accounting: bool,
}

/// `[[rewrite]]`: edits of attributes, named by clients and upstreams (`rewrite_in`,
/// `rewrite_out`); attributes and values are the dictionary's (see `radius_core::rewrite`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewriteSection {
    name: String,
    /// Only these attributes (or vendors) stay; Proxy-State and Message-Authenticator
    /// always do.
    #[serde(default)]
    keep_only: Vec<Spanned<String>>,
    /// Attributes, or vendors for all their attributes, removed.
    #[serde(default)]
    remove: Vec<Spanned<String>>,
    /// Regular expression replacements in text attributes.
    #[serde(default)]
    modify: Vec<Spanned<ModifySection>>,
    /// `Attribute = value`: the value of every instance present.
    #[serde(default)]
    replace: Vec<Spanned<String>>,
    /// `Attribute = value`: added.
    #[serde(default)]
    add: Vec<Spanned<String>>,
    /// `Attribute = value`: added when the packet has none.
    #[serde(default)]
    add_if_absent: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModifySection {
    attribute: String,
    regex: String,
    replacement: String,
}

/// `[tls]`: the certificate files of RADIUS/TLS listeners (PEM). Relative paths are taken
/// from the configuration file's folder.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    /// The listeners' certificate chain, leaf first.
    certificate: PathBuf,
    /// Its private key.
    key: PathBuf,
    /// CA certificates that NASes' client certificates must chain to.
    ca: PathBuf,
    /// ALPN (RFC 9765), in the order of preference: "radius/1.1" (no MD5 inside TLS),
    /// "radius/1.0" (RADIUS/TLS; also what a peer without ALPN gets). Default: both, 1.1
    /// first; without "radius/1.0", RADIUS/1.1 is required.
    alpn: Option<Spanned<Vec<String>>>,
}

/// Which kind of directory defines dynamic clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DirectoryKind {
    File,
    Http,
    Sql,
}

/// `[dynamic]`: prefixes whose NASes are defined at run time by a directory.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DynamicSection {
    prefixes: Vec<IpNet>,
    /// "file", "http" or "sql".
    directory: DirectoryKind,
    /// For "file": a TOML file of `[[client]]` entries (relative to this file).
    file: Option<String>,
    /// For "http": `GET <url>?address=<ip>`, JSON answer, 404 to refuse. For "sql":
    /// `sqlite:///path/radius.db` or `postgres://user:pass@host/radius` (FreeRADIUS's `nas`
    /// table).
    url: Option<String>,
    /// For an https URL: a PEM file of the CAs to trust (relative to this file); without
    /// it, the system's bundle.
    ca: Option<String>,
    #[serde(default = "d_timeout")]
    timeout_ms: u64,
    /// Seconds a definition is kept.
    #[serde(default = "d_lifetime")]
    lifetime: u64,
    /// Seconds a refusal is kept (also the XDP negative entry).
    #[serde(default = "d_nak")]
    nak_lifetime: u64,
    /// Seconds a directory that did not answer (down, an error, its timeout) is not asked
    /// again about that source.
    #[serde(default = "d_error_lifetime")]
    error_lifetime: u64,
    #[serde(default = "d_max_clients")]
    max_clients: usize,
    #[serde(default = "d_concurrent")]
    max_concurrent: usize,
    /// Packets kept per flow, and in all, while sources are being defined.
    #[serde(default = "d_per_flow")]
    max_pending_per_flow: usize,
    #[serde(default = "d_pending")]
    max_pending_packets: usize,
    /// As a `[[client]]`'s, for every client the directory defines.
    operator_name: Option<String>,
    rewrite_in: Option<String>,
    rewrite_out: Option<String>,
}

fn d_timeout() -> u64 {
    2_000
}
fn d_lifetime() -> u64 {
    3_600
}
fn d_nak() -> u64 {
    60
}
fn d_error_lifetime() -> u64 {
    5
}
fn d_max_clients() -> usize {
    10_000
}
fn d_concurrent() -> usize {
    16
}
fn d_per_flow() -> usize {
    256
}
fn d_pending() -> usize {
    10_000
}

/// `[server]`: listeners and the data path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Server {
    /// UDP addresses to serve (auth and acct): "ADDR:PORT", or "ADDR:PORT/auth",
    /// "ADDR:PORT/acct" to give the role (default: by port, 1813 and 1646 are accounting).
    listen: Vec<Spanned<String>>,
    /// Wildcard sockets per address; 0 = half the cores (at least one).
    workers: usize,
    /// NIC for the XDP guard; "none" for no XDP.
    iface: OrNone<String>,
    /// "auto", "off" or "require".
    ebpf: EbpfMode,
    /// Seconds without a packet after which a flow ends.
    idle_timeout: u64,
    /// Seconds a reply is kept to answer NAS retransmissions (RFC 5080; FreeRADIUS's
    /// `cleanup_delay`).
    cleanup_delay: u64,
    /// Most flows (also bounded by the open-file limit); 0 = that limit.
    max_flows: usize,
    /// Most flows not yet proved by a signed request (they hold no socket); 0 = as many as
    /// max_flows.
    max_provisional_flows: usize,
    /// Seconds without a packet after which a flow not yet proved ends.
    provisional_idle_timeout: u64,
    /// Packets per second and burst allowed per source without a flow (XDP).
    new_source_pps: u64,
    new_source_burst: u64,
    /// Prometheus endpoint, or "none".
    metrics: OrNone<SocketAddr>,
    /// Where upstreams send CoA and Disconnect requests (RFC 5176), or "none".
    coa_listen: OrNone<SocketAddr>,
    control: OrNone<PathBuf>,
    /// RADIUS/TCP addresses to serve (RFC 6613), written as `listen`'s.
    listen_tcp: Vec<Spanned<String>>,
    /// RADIUS/TLS addresses to serve (RFC 6614, port 2083), written as `listen`'s; their
    /// certificates are `[tls]`'s.
    listen_tls: Vec<Spanned<String>>,
    /// Seconds a connection has for its first packet, and for the rest of a packet begun.
    tcp_timeout: u64,
    /// Most connections per RADIUS/TCP listener; 0 = max_flows.
    max_connections: usize,
    /// Most connections from one source address.
    max_connections_per_source: usize,
    /// A FreeRADIUS dictionary (its top file, e.g. /usr/share/freeradius/dictionary) for
    /// the attribute names of debug logs; default: the built-in one.
    dictionary: Option<Spanned<String>>,
    /// The realm follows the last of these characters in User-Name (`user@realm`).
    realm_suffix: String,
    /// Else it precedes the first of these (`realm/user`, `realm\user`).
    realm_prefix: String,
}

// One source of defaults: the file's are DaemonConfig's (0 and "none" stand for None).
impl Default for Server {
    fn default() -> Self {
        let d = DaemonConfig::default();
        Self {
            listen: Vec::new(),
            workers: 0,
            iface: OrNone(d.iface),
            ebpf: d.ebpf,
            idle_timeout: d.idle_timeout.as_secs(),
            cleanup_delay: d.cleanup_delay.as_secs(),
            max_flows: 0,
            max_provisional_flows: 0,
            provisional_idle_timeout: d.provisional_idle_timeout.as_secs(),
            new_source_pps: d.new_source_pps,
            new_source_burst: d.new_source_burst,
            metrics: OrNone(d.metrics_listen),
            coa_listen: OrNone(d.coa_listen),
            control: OrNone(d.control),
            listen_tcp: Vec::new(),
            listen_tls: Vec::new(),
            tcp_timeout: d.tcp_timeout.as_secs(),
            max_connections: 0,
            max_connections_per_source: d.max_connections_per_source,
            dictionary: None,
            realm_suffix: "@".into(),
            realm_prefix: "/\\".into(),
        }
    }
}

/// `[[upstream]]`: an AAA server the sidecar forwards to.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    name: String,
    /// "udp" (the default), "tcp" (RFC 6613) or "tls" (RFC 6614, with the tls_* keys).
    #[serde(default)]
    transport: UpstreamTransport,
    /// Over TLS: CA certificates its certificate must chain to, the sidecar's client
    /// certificate and key (PEM; relative paths from the configuration file's folder), and
    /// the name (DNS or IP) its certificate must hold (default: the address of `auth`).
    tls_ca: Option<PathBuf>,
    tls_certificate: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_name: Option<String>,
    /// Over TLS, ALPN as in `[tls]`: offered in this order; default both, 1.1 first.
    alpn: Option<Spanned<Vec<String>>>,
    /// Where Access-Requests go.
    auth: SocketAddr,
    /// Where Accounting-Requests go.
    acct: Option<SocketAddr>,
    secret: SecretText,
    /// Milliseconds before a request without an answer is given up.
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    /// Milliseconds before a request without an answer is sent again (with up to 25 %
    /// jitter); NAS retransmissions also cause a resend, at most one a second.
    #[serde(default = "default_retry_ms")]
    retry_ms: u64,
    /// Resends per request on the sidecar's own timer.
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    /// Milliseconds a request may wait for an answer from a server that answers nothing
    /// else before the server turns zombie and its requests move (FreeRADIUS's
    /// `response_window`).
    #[serde(default = "default_response_window_ms")]
    response_window_ms: u64,
    /// BlastRADIUS: must Access replies carry a Message-Authenticator? "yes", "no", or
    /// "auto" (once this upstream has sent one).
    require_message_authenticator: Option<Spanned<Switch>>,
    /// Milliseconds between Status-Server probes of a zombie or dead server.
    #[serde(default = "default_check_interval_ms")]
    check_interval_ms: u64,
    /// Milliseconds a zombie may go without answering a probe before it is dead.
    #[serde(default = "default_zombie_period_ms")]
    zombie_period_ms: u64,
    /// Probe answers in a row that bring a dead server back.
    #[serde(default = "default_answers_to_alive")]
    answers_to_alive: u32,
    /// The `[[rewrite]]` applied to its replies.
    rewrite_in: Option<Spanned<String>>,
    /// The `[[rewrite]]` applied to the requests it is sent.
    rewrite_out: Option<Spanned<String>>,
}

/// How an upstream is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum UpstreamTransport {
    #[default]
    Udp,
    Tcp,
    Tls,
}

/// `[[pool]]`: upstreams a client may name together (FreeRADIUS's home_server_pool).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    name: String,
    /// `[[upstream]]` names, in order.
    upstreams: Vec<String>,
    /// "fail-over" (the first usable, in order) or "load-balance" (by flow).
    #[serde(default)]
    policy: Policy,
}

fn default_check_interval_ms() -> u64 {
    1_000
}
fn default_zombie_period_ms() -> u64 {
    10_000
}
fn default_answers_to_alive() -> u32 {
    3
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_retry_ms() -> u64 {
    2_000
}
fn default_max_retries() -> u32 {
    2
}
/// The sidecar runs next to its AAA server, whose answers take milliseconds: a second of
/// silence with requests out is a server that stopped, and failover comes within it.
fn default_response_window_ms() -> u64 {
    1_000
}

/// RFC 6614's shared secret for RADIUS/TLS.
const RADSEC_SECRET: &str = "radsec";

/// `[[client]]`: NASes allowed to talk to the sidecar.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSection {
    /// An address or prefix ("192.0.2.0/24", "2001:db8::/48").
    prefix: Spanned<String>,
    /// Required, but for a client named by its certificate (certificate_names or
    /// certificate_fingerprints), whose default is "radsec" (RFC 6614 section 2.3).
    secret: Option<SecretText>,
    /// Short name for logs and metrics (default: the prefix).
    name: Option<String>,
    /// Upstream name (default: the first upstream).
    upstream: Option<Spanned<String>>,
    /// BlastRADIUS: drop Access-Requests without a Message-Authenticator: true/"yes",
    /// false/"no", or "auto" (once the client has sent one; the default).
    require_message_authenticator: Option<Spanned<Switch>>,
    /// BlastRADIUS: drop Access-Requests with Proxy-State and no Message-Authenticator:
    /// "yes", "no", or "auto" (unless the client's first request had such Proxy-State: it
    /// is a proxy; the default).
    limit_proxy_state: Option<Spanned<Switch>>,
    /// NAT: several NASes share `prefix`, each entry with its own secret and one of these;
    /// a flow learns its NAS from its first request whose Message-Authenticator proves it.
    nas_identifier: Option<String>,
    nas_ip_address: Option<std::net::Ipv4Addr>,
    /// Over TLS: names (DNS or IP) one of which its certificate's subjectAltNames must
    /// hold.
    #[serde(default)]
    certificate_names: Vec<String>,
    /// Over TLS: SHA-256 fingerprints its certificate must have one of, written
    /// "sha256:" and 64 hex digits (colons allowed).
    #[serde(default)]
    certificate_fingerprints: Vec<Spanned<String>>,
    /// The pool (or upstream) of its Accounting-Requests, when not `upstream`'s.
    acct_upstream: Option<Spanned<String>>,
    /// Pools (or upstreams) that get a copy of each of its Accounting-Requests.
    #[serde(default)]
    acct_replicas: Vec<Spanned<String>>,
    /// RFC 5580 Operator-Name added to this client's requests that carry none, namespace
    /// digit first ("1example.org": the operator's realm, as eduroam asks).
    operator_name: Option<Spanned<String>>,
    /// The `[[rewrite]]` applied to its requests.
    rewrite_in: Option<Spanned<String>>,
    /// The `[[rewrite]]` applied to the replies it is sent.
    rewrite_out: Option<Spanned<String>>,
}

/// A yes/no/auto switch, written as a boolean or a word.
#[derive(Deserialize)]
#[serde(untagged)]
enum Switch {
    Bool(bool),
    Word(String),
}

/// The switch at `key`, or `default` when absent.
fn switch(
    v: Option<Spanned<Switch>>,
    default: YesNoAuto,
    key: &str,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<YesNoAuto, ConfigError> {
    let Some(v) = v else {
        return Ok(default);
    };
    let span = v.span();
    match v.into_inner() {
        Switch::Bool(true) => Ok(YesNoAuto::Yes),
        Switch::Bool(false) => Ok(YesNoAuto::No),
        Switch::Word(w) => match w.as_str() {
            "yes" => Ok(YesNoAuto::Yes),
            "no" => Ok(YesNoAuto::No),
            "auto" => Ok(YesNoAuto::Auto),
            other => Err(err(
                span,
                key,
                format!("`{other}`: expected true, false, \"yes\", \"no\" or \"auto\""),
            )),
        },
    }
}

/// An RFC 5580 Operator-Name as written: a namespace digit, then the name.
fn operator_name(v: &str) -> Result<Vec<u8>, String> {
    let b = v.as_bytes();
    if b.len() < 2 || b.len() > 253 || !(b'0'..=b'3').contains(&b[0]) {
        return Err(
            "a namespace digit (0 TADIG, 1 realm, 2 E.212, 3 ICC) then the name, at \
                    most 253 bytes: e.g. \"1example.org\""
                .into(),
        );
    }
    Ok(b.to_vec())
}

/// A loaded, checked configuration.
pub struct Config {
    pub daemon: DaemonConfig,
    pub upstreams: Vec<Arc<Upstream>>,
    /// The TLS files of upstreams reached over TLS, by upstream name.
    pub upstream_tls: std::collections::HashMap<String, crate::tls::UpstreamTlsFiles>,
    pub clients: ClientTable,
    pub dynamic: Option<DynamicClients>,
    /// What the dynamic clients' definitions depend on: equal across a reload, the
    /// directory and its cache are kept.
    pub directory_key: DirectoryKey,
    /// Attribute names for debug logs (`server.dictionary`, or the built-in one).
    pub dictionary: Arc<crate::codec::dict::Dictionary>,
    /// `[[realm]]`s, indexed; None without any.
    pub realms: Option<Arc<crate::realm::Realms>>,
    /// `[spool]`, and the pools it spools (each with `spool` set).
    pub spool: Option<crate::spool::SpoolSettings>,
    pub spool_pools: Vec<Arc<Pool>>,
}

/// The built-in dictionary, shared by every configuration that names none.
fn builtin_dictionary() -> Arc<crate::codec::dict::Dictionary> {
    static D: std::sync::OnceLock<Arc<crate::codec::dict::Dictionary>> = std::sync::OnceLock::new();
    D.get_or_init(|| Arc::new(crate::codec::dict::Dictionary::builtin().clone()))
        .clone()
}

/// The `[dynamic]` section and the pools, as written (see [`Config::directory_key`]).
#[derive(Clone, PartialEq)]
pub struct DirectoryKey(Option<DynamicSection>, Vec<PoolSection>);

/// The upstreams of a running configuration, for a reload: an upstream written the same
/// way again is the running one (same `Arc`, so it keeps its link and its health).
#[derive(Default)]
pub struct Running<'a> {
    pub upstreams: &'a [Arc<Upstream>],
    pub upstream_tls: Option<&'a std::collections::HashMap<String, crate::tls::UpstreamTlsFiles>>,
}

/// Whether `a` and `b` are the same server, reached and treated the same way.
fn same_upstream(a: &Upstream, b: &Upstream) -> bool {
    use crate::codec::auth::SharedSecret as _;
    let (o, p) = (&a.options, &b.options);
    a.name == b.name
        && a.auth == b.auth
        && a.acct == b.acct
        && a.secret.bytes() == b.secret.bytes()
        && a.timeout == b.timeout
        && a.stream == b.stream
        && o.retry == p.retry
        && o.max_retries == p.max_retries
        && o.response_window == p.response_window
        && o.require_message_authenticator == p.require_message_authenticator
        && o.check_interval == p.check_interval
        && o.health == p.health
        && o.rewrite == p.rewrite
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key written on the line at `offset`, with its table (`upstream.secret`), for errors
/// the TOML parser reports without one; "-" when the line holds no key. Never the value.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return "-".into();
    };
    let key = key.trim().trim_matches('"');
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    }
}

impl Config {
    /// Reads the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_over(path, &Running::default())
    }

    /// Reads the file at `path` for a reload of `running` (see [`Running`]).
    pub fn load_over(path: &Path, running: &Running<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        let mut c = Self::from_toml_over(&text, &path.display().to_string(), running)?;
        // A relative directory file is relative to the configuration file.
        if let Some(DynamicClients {
            directory: Directory::File(f),
            ..
        }) = &mut c.dynamic
            && f.path.is_relative()
            && let Some(dir) = path.parent()
        {
            *f = FileDirectory::new(dir.join(&f.path));
        }
        Ok(c)
    }

    /// Parses `text` as if read from `file`.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        Self::from_toml_over(text, file, &Running::default())
    }

    /// [`Config::from_toml`], for a reload of `running`.
    pub fn from_toml_over(
        text: &str,
        file: &str,
        running: &Running<'_>,
    ) -> Result<Config, ConfigError> {
        let err = |span: std::ops::Range<usize>, key: &str, message: String| ConfigError {
            file: file.to_owned(),
            line: line_of(text, span.start),
            key: key.to_owned(),
            message,
        };
        let f: File = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            // The message alone (toml's Display would quote the line, secret and all); never
            // empty (the fuzzer found `""=`, which toml refuses without a word).
            let key = key_at(text, span.start);
            let key = if key.is_empty() { "(top level)" } else { &key };
            let message = match e.message().trim() {
                "" => "not valid TOML here".to_owned(),
                m => m.to_owned(),
            };
            err(span, key, message)
        })?;
        let server = f.server.unwrap_or_default();
        let mut daemon = DaemonConfig::default();
        let listeners = |list: &[Spanned<String>], key: &str| {
            list.iter()
                .map(|l| {
                    l.get_ref()
                        .parse::<Listener>()
                        .map_err(|m| err(l.span(), key, m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let alpn = |list: &Option<Spanned<Vec<String>>>, key: &str| match list {
            None => Ok(crate::tls::default_alpn()),
            Some(l) => crate::tls::check_alpn(l.get_ref())
                .map(|()| l.get_ref().clone())
                .map_err(|m| err(l.span(), key, m)),
        };
        if !server.listen.is_empty() {
            daemon.listen = listeners(&server.listen, "server.listen")?;
        }
        daemon.listen_tcp = listeners(&server.listen_tcp, "server.listen_tcp")?;
        daemon.listen_tls = listeners(&server.listen_tls, "server.listen_tls")?;
        // Relative certificate paths are the configuration file's neighbours.
        let folder = std::path::Path::new(file)
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        daemon.tls = match f.tls.as_ref() {
            None => None,
            Some(t) => {
                let t = t.get_ref();
                Some(crate::tls::TlsFiles {
                    certificate: folder.join(&t.certificate),
                    key: folder.join(&t.key),
                    ca: folder.join(&t.ca),
                    alpn: alpn(&t.alpn, "tls.alpn")?,
                })
            }
        };
        if let Some(first) = server.listen_tls.first()
            && daemon.tls.is_none()
        {
            return Err(err(
                first.span(),
                "server.listen_tls",
                "a TLS listener needs a [tls] section (certificate, key, ca)".into(),
            ));
        }
        daemon.tcp_timeout = Duration::from_secs(server.tcp_timeout.max(1));
        daemon.max_connections = (server.max_connections > 0).then_some(server.max_connections);
        daemon.max_connections_per_source = server.max_connections_per_source.max(1);
        if server.workers > 0 {
            daemon.workers = server.workers;
        }
        daemon.iface = server.iface.0;
        daemon.ebpf = server.ebpf;
        daemon.idle_timeout = Duration::from_secs(server.idle_timeout.max(1));
        daemon.cleanup_delay = Duration::from_secs(server.cleanup_delay);
        daemon.max_flows = (server.max_flows > 0).then_some(server.max_flows);
        daemon.max_provisional_flows =
            (server.max_provisional_flows > 0).then_some(server.max_provisional_flows);
        daemon.provisional_idle_timeout =
            Duration::from_secs(server.provisional_idle_timeout.max(1));
        daemon.new_source_pps = server.new_source_pps;
        daemon.new_source_burst = server.new_source_burst;
        daemon.metrics_listen = server.metrics.0;
        daemon.coa_listen = server.coa_listen.0;
        daemon.control = server.control.0.map(|p| folder.join(p));
        let (realm_suffix, realm_prefix) = (server.realm_suffix, server.realm_prefix);
        let dictionary = match &server.dictionary {
            None => builtin_dictionary(),
            Some(path) => {
                let at = folder.join(path.get_ref());
                let d = crate::codec::dict::Dictionary::load(&at)
                    .map_err(|e| err(path.span(), "server.dictionary", e.to_string()))?;
                Arc::new(d)
            }
        };

        let mut rewrites: Vec<Arc<crate::rewrite::Rewrite>> = Vec::new();
        for r in f.rewrites {
            let span = r.span();
            let r = r.into_inner();
            if rewrites.iter().any(|x| x.name == r.name) {
                return Err(err(
                    span,
                    "rewrite.name",
                    format!("`{}` defined twice", r.name),
                ));
            }
            let d = &*dictionary;
            let targets = |list: &[Spanned<String>], key: &str| {
                list.iter()
                    .map(|x| {
                        crate::rewrite::target(d, x.get_ref())
                            .map_err(|e| err(x.span(), key, e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let assignments = |list: &[Spanned<String>], key: &str| {
                list.iter()
                    .map(|x| {
                        crate::rewrite::assignment(d, x.get_ref())
                            .map_err(|e| err(x.span(), key, e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let rewrite = crate::rewrite::Rewrite {
                keep_only: targets(&r.keep_only, "rewrite.keep_only")?,
                remove: targets(&r.remove, "rewrite.remove")?,
                modify: r
                    .modify
                    .iter()
                    .map(|m| {
                        let x = m.get_ref();
                        crate::rewrite::modify(d, &x.attribute, &x.regex, &x.replacement)
                            .map_err(|e| err(m.span(), "rewrite.modify", e.to_string()))
                    })
                    .collect::<Result<_, _>>()?,
                replace: assignments(&r.replace, "rewrite.replace")?,
                add: assignments(&r.add, "rewrite.add")?,
                add_if_absent: assignments(&r.add_if_absent, "rewrite.add_if_absent")?,
                name: r.name,
            };
            rewrites.push(Arc::new(rewrite));
        }
        let rewrite_named = |name: &Option<Spanned<String>>, key: &str| match name {
            None => Ok(None),
            Some(n) => rewrites
                .iter()
                .find(|r| r.name == *n.get_ref())
                .cloned()
                .map(Some)
                .ok_or_else(|| {
                    err(
                        n.span(),
                        key,
                        format!("no [[rewrite]] named `{}`", n.get_ref()),
                    )
                }),
        };

        let mut upstreams = Vec::new();
        let mut upstream_tls = std::collections::HashMap::new();
        for u in f.upstreams {
            let span = u.span();
            let u = u.into_inner();
            if u.transport == UpstreamTransport::Tls {
                let need = |p: &Option<PathBuf>, key: &str| {
                    p.as_ref().map(|p| folder.join(p)).ok_or_else(|| {
                        err(
                            span.clone(),
                            key,
                            "required with transport = \"tls\"".into(),
                        )
                    })
                };
                upstream_tls.insert(
                    u.name.clone(),
                    crate::tls::UpstreamTlsFiles {
                        ca: need(&u.tls_ca, "upstream.tls_ca")?,
                        certificate: need(&u.tls_certificate, "upstream.tls_certificate")?,
                        key: need(&u.tls_key, "upstream.tls_key")?,
                        name: u
                            .tls_name
                            .clone()
                            .unwrap_or_else(|| u.auth.ip().to_string()),
                        alpn: alpn(&u.alpn, "upstream.alpn")?,
                    },
                );
            }
            if u.secret.is_empty() {
                return Err(err(span, "upstream.secret", "must not be empty".into()));
            }
            if upstreams.iter().any(|x: &Arc<Upstream>| x.name == u.name) {
                return Err(err(
                    span,
                    "upstream.name",
                    format!("`{}` defined twice", u.name),
                ));
            }
            let require_message_authenticator = switch(
                u.require_message_authenticator,
                YesNoAuto::Auto,
                "upstream.require_message_authenticator",
                &err,
            )?;
            let upstream = Upstream {
                name: u.name,
                auth: u.auth,
                acct: u.acct,
                secret: Secret::new(u.secret.as_bytes()),
                timeout: Duration::from_millis(u.timeout_ms.max(1)),
                options: UpstreamOptions {
                    retry: Duration::from_millis(u.retry_ms.max(10)),
                    max_retries: u.max_retries,
                    response_window: Duration::from_millis(u.response_window_ms.max(10)),
                    require_message_authenticator,
                    seen_message_authenticator: false.into(),
                    check_interval: Duration::from_millis(u.check_interval_ms.max(10)),
                    health: HealthPolicy {
                        zombie_period_ms: u.zombie_period_ms,
                        answers_to_alive: u.answers_to_alive.max(1),
                    },
                    rewrite: crate::rewrite::Rewrites {
                        inbound: rewrite_named(&u.rewrite_in, "upstream.rewrite_in")?,
                        outbound: rewrite_named(&u.rewrite_out, "upstream.rewrite_out")?,
                    },
                },
                health: Health::default(),
                stream: u.transport != UpstreamTransport::Udp,
            };
            let tls_of = |m: Option<&std::collections::HashMap<_, _>>| {
                m.and_then(|m| m.get(&upstream.name)).cloned()
            };
            let reused = running
                .upstreams
                .iter()
                .find(|r| {
                    same_upstream(r, &upstream)
                        && tls_of(running.upstream_tls) == tls_of(Some(&upstream_tls))
                })
                .cloned();
            upstreams.push(reused.unwrap_or_else(|| Arc::new(upstream)));
        }

        let directory_key = DirectoryKey(
            f.dynamic.as_ref().map(|d| d.get_ref().clone()),
            f.pools.iter().map(|p| p.get_ref().clone()).collect(),
        );
        // Every upstream is a pool of one, under its own name; [[pool]]s add groups.
        let mut pools: Vec<Arc<Pool>> = upstreams
            .iter()
            .map(|u| Arc::new(Pool::single(u.clone())))
            .collect();
        for p in f.pools {
            let span = p.span();
            let p = p.into_inner();
            if pools.iter().any(|x| x.name == p.name) {
                return Err(err(
                    span,
                    "pool.name",
                    format!("`{}` is already an upstream or a pool", p.name),
                ));
            }
            let mut members = Vec::new();
            for m in &p.upstreams {
                let u = upstreams.iter().find(|u| u.name == *m).ok_or_else(|| {
                    err(
                        span.clone(),
                        "pool.upstreams",
                        format!("no [[upstream]] named `{m}`"),
                    )
                })?;
                members.push(u.clone());
            }
            if members.is_empty() {
                return Err(err(span, "pool.upstreams", "must not be empty".into()));
            }
            let policy = p.policy;
            pools.push(Arc::new(Pool {
                name: p.name,
                members,
                policy,
                spool: false,
            }));
        }

        // Spooled pools are marked before anyone holds them.
        let (spool, spool_pools) = match f.spool {
            None => (None, Vec::new()),
            Some(sp) => {
                let span = sp.span();
                let sp = sp.into_inner();
                let mut marked = Vec::new();
                for name in &sp.pools {
                    let Some(i) = pools.iter().position(|p| p.name == *name.get_ref()) else {
                        return Err(err(
                            name.span(),
                            "spool.pools",
                            format!("no [[upstream]] or [[pool]] named `{}`", name.get_ref()),
                        ));
                    };
                    let p = &pools[i];
                    if p.members.iter().any(|u| u.acct.is_none()) {
                        return Err(err(
                            name.span(),
                            "spool.pools",
                            format!("every upstream of `{}` needs an `acct` address", p.name),
                        ));
                    }
                    if p.members.iter().any(|u| u.stream) {
                        return Err(err(
                            name.span(),
                            "spool.pools",
                            format!(
                                "`{}` has a TCP or TLS upstream: the spool replays over UDP only",
                                p.name
                            ),
                        ));
                    }
                    let spooled = Arc::new(Pool {
                        name: p.name.clone(),
                        members: p.members.clone(),
                        policy: p.policy,
                        spool: true,
                    });
                    pools[i] = spooled.clone();
                    marked.push(spooled);
                }
                if sp.max_bytes < 65_536 {
                    return Err(err(span, "spool.max_bytes", "at least 65536".into()));
                }
                (
                    Some(crate::spool::SpoolSettings {
                        dir: folder.join(&sp.dir),
                        fsync: sp.fsync,
                        max_bytes: sp.max_bytes,
                        max_age: Duration::from_secs(sp.max_age.max(1)),
                        window: sp.window.clamp(1, 256),
                        retry: Duration::from_millis(sp.retry_ms.max(10)),
                    }),
                    marked,
                )
            }
        };
        let pool_named = |name: &Spanned<String>, key: &'static str| {
            pools
                .iter()
                .find(|p| p.name == *name.get_ref())
                .cloned()
                .ok_or_else(|| {
                    err(
                        name.span(),
                        key,
                        format!("no [[upstream]] or [[pool]] named `{}`", name.get_ref()),
                    )
                })
        };
        let mut realms = Vec::new();
        let mut first_realm = None;
        for r in f.realms {
            let span = r.span();
            first_realm.get_or_insert(span.clone());
            let r = r.into_inner();
            realms.push(crate::realm::Realm {
                auth: r
                    .auth
                    .as_ref()
                    .map(|n| pool_named(n, "realm.auth"))
                    .transpose()?,
                acct: r
                    .acct
                    .as_ref()
                    .map(|n| pool_named(n, "realm.acct"))
                    .transpose()?,
                acct_replicas: r
                    .acct_replicas
                    .iter()
                    .map(|n| pool_named(n, "realm.acct_replicas"))
                    .collect::<Result<_, _>>()?,
                name: r.name,
                reject_message: r.reject_message,
                answer_accounting: r.answer_accounting,
                strip: r.strip,
            });
        }
        let realms = match first_realm {
            None => None,
            Some(span) => {
                let delimiters = crate::realm::Delimiters {
                    suffix: realm_suffix.into_bytes(),
                    prefix: realm_prefix.into_bytes(),
                };
                Some(Arc::new(
                    crate::realm::Realms::new(realms, delimiters)
                        .map_err(|e| err(span, "realm.name", e.to_string()))?,
                ))
            }
        };

        let mut clients = ClientTable::default();
        for c in f.clients {
            let span = c.span();
            let mut c = c.into_inner();
            let prefix_span = c.prefix.span();
            let prefix: IpNet = match c.prefix.get_ref().parse::<IpNet>() {
                Ok(p) => p.trunc(),
                Err(_) => match c.prefix.get_ref().parse::<std::net::IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(err(
                            prefix_span,
                            "client.prefix",
                            format!("`{}` is not an address or prefix", c.prefix.get_ref()),
                        ));
                    }
                },
            };
            let by_certificate =
                !c.certificate_names.is_empty() || !c.certificate_fingerprints.is_empty();
            let secret = match c.secret.take() {
                Some(s) => s,
                None if by_certificate => SecretText::new(RADSEC_SECRET.to_owned()),
                None => {
                    return Err(err(
                        span,
                        "client.secret",
                        "required (only a client named by its certificate may leave it out: \
                         then it is \"radsec\")"
                            .into(),
                    ));
                }
            };
            if secret.is_empty() {
                return Err(err(span, "client.secret", "must not be empty".into()));
            }
            let pool = match &c.upstream {
                Some(name) => pools
                    .iter()
                    .find(|u| u.name == *name.get_ref())
                    .cloned()
                    .ok_or_else(|| {
                        err(
                            name.span(),
                            "client.upstream",
                            format!("no [[upstream]] or [[pool]] named `{}`", name.get_ref()),
                        )
                    })?,
                None => pools.first().cloned().ok_or_else(|| {
                    err(
                        span.clone(),
                        "client.upstream",
                        "no [[upstream]] is defined".into(),
                    )
                })?,
            };
            let default_name = match (&c.nas_identifier, &c.nas_ip_address) {
                (Some(id), _) => format!("{prefix}/{id}"),
                (None, Some(ip)) => format!("{prefix}/{ip}"),
                (None, None) => prefix.to_string(),
            };
            let mut fingerprints = Vec::new();
            for f in &c.certificate_fingerprints {
                let fp = crate::tls::parse_fingerprint(f.get_ref())
                    .map_err(|m| err(f.span(), "client.certificate_fingerprints", m))?;
                fingerprints.push(fp);
            }
            let certificate = crate::client::CertificateMatch {
                names: c.certificate_names.clone(),
                fingerprints,
            };
            let client = Client {
                name: c.name.unwrap_or(default_name),
                prefix,
                secret: Secret::new(secret.as_bytes()),
                pool,
                // NAT entries are told apart by a proven Message-Authenticator.
                require_message_authenticator: if c.nas_identifier.is_some()
                    || c.nas_ip_address.is_some()
                {
                    YesNoAuto::Yes
                } else {
                    switch(
                        c.require_message_authenticator,
                        YesNoAuto::Auto,
                        "client.require_message_authenticator",
                        &err,
                    )?
                },
                limit_proxy_state: switch(
                    c.limit_proxy_state,
                    YesNoAuto::Auto,
                    "client.limit_proxy_state",
                    &err,
                )?,
                learned: Default::default(),
                certificate,
                acct_pool: c
                    .acct_upstream
                    .as_ref()
                    .map(|n| pool_named(n, "client.acct_upstream"))
                    .transpose()?,
                acct_replicas: c
                    .acct_replicas
                    .iter()
                    .map(|n| pool_named(n, "client.acct_replicas"))
                    .collect::<Result<_, _>>()?,
                operator_name: c
                    .operator_name
                    .as_ref()
                    .map(|o| {
                        operator_name(o.get_ref())
                            .map_err(|m| err(o.span(), "client.operator_name", m))
                    })
                    .transpose()?,
                rewrite: crate::rewrite::Rewrites {
                    inbound: rewrite_named(&c.rewrite_in, "client.rewrite_in")?,
                    outbound: rewrite_named(&c.rewrite_out, "client.rewrite_out")?,
                },
                nas_key: match (c.nas_identifier, c.nas_ip_address) {
                    (Some(id), None) => Some(NasKey::Identifier(id)),
                    (None, Some(ip)) => Some(NasKey::IpAddress(ip)),
                    (None, None) => None,
                    (Some(_), Some(_)) => {
                        return Err(err(
                            span,
                            "client.nas_identifier",
                            "give nas_identifier or nas_ip_address, not both".into(),
                        ));
                    }
                },
            };
            if !clients.insert(client) {
                return Err(err(
                    prefix_span,
                    "client.prefix",
                    format!(
                        "{prefix} is defined twice (several NASes behind one address: give \
                         each entry its own nas_identifier or nas_ip_address)"
                    ),
                ));
            }
        }
        let dynamic = match f.dynamic {
            None => None,
            Some(d) => {
                let span = d.span();
                let d = d.into_inner();
                let directory = match d.directory {
                    DirectoryKind::File => Directory::File(FileDirectory::new(
                        d.file
                            .ok_or_else(|| {
                                err(
                                    span.clone(),
                                    "dynamic.file",
                                    "required for directory = \"file\"".into(),
                                )
                            })?
                            .into(),
                    )),
                    DirectoryKind::Http => {
                        let url = d.url.as_deref().ok_or_else(|| {
                            err(
                                span.clone(),
                                "dynamic.url",
                                "required for directory = \"http\"".into(),
                            )
                        })?;
                        // A relative CA file is relative to the configuration file.
                        let ca = d.ca.as_deref().map(|ca| {
                            let ca = Path::new(ca);
                            match Path::new(file).parent() {
                                Some(dir) if ca.is_relative() => dir.join(ca),
                                _ => ca.to_path_buf(),
                            }
                        });
                        let timeout = Duration::from_millis(d.timeout_ms.max(1));
                        let http = crate::dynamic::HttpDirectory::new(url, ca.as_deref(), timeout)
                            .map_err(|(key, message)| err(span.clone(), key, message))?;
                        Directory::Http(http)
                    }
                    DirectoryKind::Sql => Directory::Sql(SqlDirectory::new(
                        d.url.ok_or_else(|| {
                            err(
                                span.clone(),
                                "dynamic.url",
                                "required for directory = \"sql\"".into(),
                            )
                        })?,
                        pools.iter().map(|p| p.name.clone()).collect(),
                    )),
                };
                if upstreams.is_empty() {
                    return Err(err(span, "dynamic", "no [[upstream]] is defined".into()));
                }
                let named = |name: &Option<String>, key: &str| match name {
                    None => Ok(None),
                    Some(n) => rewrites
                        .iter()
                        .find(|r| r.name == *n)
                        .cloned()
                        .map(Some)
                        .ok_or_else(|| {
                            err(span.clone(), key, format!("no [[rewrite]] named `{n}`"))
                        }),
                };
                let template = crate::dynamic::ClientTemplate {
                    operator_name: d
                        .operator_name
                        .as_deref()
                        .map(operator_name)
                        .transpose()
                        .map_err(|m| err(span.clone(), "dynamic.operator_name", m))?,
                    rewrite: crate::rewrite::Rewrites {
                        inbound: named(&d.rewrite_in, "dynamic.rewrite_in")?,
                        outbound: named(&d.rewrite_out, "dynamic.rewrite_out")?,
                    },
                };
                let mut clients = DynamicClients::new(
                    d.prefixes.into_iter().map(|p| p.trunc()).collect(),
                    directory,
                    Lifetimes {
                        defined: Duration::from_secs(d.lifetime.max(1)),
                        refused: Duration::from_secs(d.nak_lifetime.max(1)),
                        unanswered: Duration::from_secs(d.error_lifetime.max(1)),
                    },
                    d.max_clients,
                    d.max_concurrent,
                    Duration::from_millis(d.timeout_ms.max(1)),
                    d.max_pending_per_flow.max(1),
                    d.max_pending_packets.max(1),
                    pools.clone(),
                );
                clients.template = template;
                Some(clients)
            }
        };
        Ok(Config {
            daemon,
            upstreams,
            upstream_tls,
            clients,
            dynamic,
            directory_key,
            dictionary,
            realms,
            spool,
            spool_pools,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_file_says_what_the_built_in_defaults_are() {
        let file = Config::from_toml(DEFAULT, "default.toml").unwrap().daemon;
        let built_in = Config::from_toml("", "empty.toml").unwrap().daemon;
        assert_eq!(file, built_in);
        assert_eq!(built_in, DaemonConfig::default());
    }

    #[test]
    fn rewrites_are_named_by_clients_and_upstreams_and_bad_entries_named_with_their_line() {
        let up = "[[upstream]]\nname = \"home\"\nauth = \"127.0.0.1:1812\"\nsecret = \"s\"\nrewrite_out = \"to-home\"\n";
        let rw = |body: &str| {
            format!(
                "{up}[[rewrite]]\nname = \"to-home\"\n{body}\n[[client]]\nprefix = \"10.0.0.0/8\"\nsecret = \"x\"\nrewrite_out = \"to-home\"\n"
            )
        };
        let good = rw(
            "remove = [\"Class\", \"Cisco\"]\nadd_if_absent = [\"Operator-Name = 1example.org\"]\nreplace = [\"Session-Timeout = 3600\"]\nmodify = [{ attribute = \"User-Name\", regex = '^(.*)@old$', replacement = '$1@new' }]\nadd = [\"Tunnel-Type:1 = VLAN\"]\nkeep_only = []\n",
        );
        let c = Config::from_toml(&good, "f.toml").unwrap();
        let r = c.upstreams[0].options.rewrite.outbound.clone().unwrap();
        assert_eq!((r.remove.len(), r.modify.len(), r.add.len()), (2, 1, 1));
        let client = c.clients.iter().next().unwrap();
        assert!(client.rewrite.outbound.is_some() && client.rewrite.inbound.is_none());
        for (body, line, key, says) in [
            (
                "remove = [\"No-Such-Attribute\"]",
                8,
                "rewrite.remove",
                "No-Such-Attribute",
            ),
            ("add = [\"User-Password = x\"]", 8, "rewrite.add", "hidden"),
            (
                "replace = [\"Session-Timeout = soon\"]",
                8,
                "rewrite.replace",
                "soon",
            ),
            (
                "add_if_absent = [\"Proxy-State = x\"]",
                8,
                "rewrite.add_if_absent",
                "proxy",
            ),
            ("keep_only = [\"Nope\"]", 8, "rewrite.keep_only", "Nope"),
            (
                "modify = [{ attribute = \"Session-Timeout\", regex = \"1\", replacement = \"2\" }]",
                8,
                "rewrite.modify",
                "text",
            ),
        ] {
            let e = Config::from_toml(&rw(body), "f.toml").err().unwrap();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let e = Config::from_toml(
            &format!("{up}[[client]]\nprefix = \"10.0.0.0/8\"\nsecret = \"x\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (5, "upstream.rewrite_out"), "{e}");
        // A dictionary of the operator's own names its attributes.
        let dir = std::env::temp_dir().join(format!("rw-dict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("dictionary"),
            "VENDOR Example 32473\nBEGIN-VENDOR Example\nATTRIBUTE Example-Zone 1 string\nEND-VENDOR Example\n",
        )
        .unwrap();
        let text = format!(
            "[server]\ndictionary = \"dictionary\"\n{}",
            rw("add = [\"Example-Zone = blue\"]")
        );
        let c = Config::from_toml(&text, dir.join("f.toml").to_str().unwrap()).unwrap();
        let r = c.upstreams[0].options.rewrite.outbound.clone().unwrap();
        assert_eq!(
            r.add[0].target,
            crate::rewrite::Target::VendorAttr {
                vendor: 32473,
                ty: 1
            }
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_spool_names_pools_whose_servers_take_accounting() {
        let up = |acct: &str| {
            format!("[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1812\"\n{acct}secret = \"s\"\n")
        };
        let c = Config::from_toml(
            &format!(
                "{}[spool]\npools = [\"a\"]\ndir = \"spool\"\nfsync = \"interval\"\n",
                up("acct = \"127.0.0.1:1813\"\n")
            ),
            "/etc/rs/f.toml",
        )
        .unwrap();
        let s = c.spool.unwrap();
        assert_eq!(s.dir, std::path::Path::new("/etc/rs/spool"));
        assert_eq!(s.fsync, crate::spool::Fsync::Interval);
        assert!(c.spool_pools[0].spool && c.spool_pools[0].name == "a");
        assert!(c.clients.is_empty());
        for (file, line, key) in [
            (
                format!(
                    "{}[spool]\npools = [\"b\"]\n",
                    up("acct = \"127.0.0.1:1813\"\n")
                ),
                7,
                "spool.pools",
            ),
            (
                format!("{}[spool]\npools = [\"a\"]\n", up("")),
                6,
                "spool.pools",
            ),
            (
                format!(
                    "{}[spool]\npools = [\"a\"]\n",
                    up("acct = \"127.0.0.1:1813\"\ntransport = \"tcp\"\n")
                ),
                8,
                "spool.pools",
            ),
            (
                format!(
                    "{}[spool]\npools = [\"a\"]\nfsync = \"sometimes\"\n",
                    up("acct = \"127.0.0.1:1813\"\n")
                ),
                8,
                "spool.fsync",
            ),
        ] {
            let e = Config::from_toml(&file, "f.toml").err().unwrap();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
        }
    }

    #[test]
    fn the_readmes_rewrite_and_spool_examples_check() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("### Rewriting attributes")
            .expect("the README documents rewrites")..];
        let start = section.find("```toml\n").expect("an example") + 8;
        let example = &section[start..start + section[start..].find("```").expect("its end")];
        let c = Config::from_toml(example, "README.md").unwrap_or_else(|e| panic!("{e}"));
        let client = c.clients.iter().next().expect("its client");
        let out = client.rewrite.outbound.clone().expect("bras-out");
        assert_eq!(out.add.len(), 3);
        assert!(c.upstreams[0].options.rewrite.inbound.is_some());
        let section = &readme[readme
            .find("### Accounting that is never lost")
            .expect("the README documents the spool")..];
        let start = section.find("```toml\n").expect("an example") + 8;
        let example = &section[start..start + section[start..].find("```").expect("its end")];
        let c = Config::from_toml(example, "README.md").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.spool.expect("[spool]").max_bytes, 1 << 30);
    }

    #[test]
    fn none_and_typed_values_are_read_by_one_parser_with_their_line() {
        let c = Config::from_toml(
            "[server]\niface = \"none\"\nmetrics = \"none\"\ncoa_listen = \"127.0.0.1:3799\"\nebpf = \"off\"\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.daemon.iface, None);
        assert_eq!(c.daemon.metrics_listen, None);
        assert_eq!(c.daemon.coa_listen, Some("127.0.0.1:3799".parse().unwrap()));
        assert_eq!(c.daemon.ebpf, EbpfMode::Off);
        let e = Config::from_toml("[server]\nworkers = 1\nmetrics = \"localhost\"\n", "f.toml")
            .err()
            .unwrap();
        assert_eq!((e.line, e.key.as_str()), (3, "server.metrics"), "{e}");
        let e = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\nrequire_message_authenticator = \"maybe\"\n",
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!(e.key, "upstream.require_message_authenticator", "{e}");
        assert_eq!(
            "none".parse::<OrNone<SocketAddr>>().unwrap(),
            OrNone(None),
            "flags use the same parser"
        );
    }

    #[test]
    fn realms_name_their_pools_and_a_bad_one_is_named_with_its_line() {
        let up = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n";
        let c = Config::from_toml(
            &format!(
                "{up}[[realm]]\nname = \"example.org\"\nauth = \"a\"\nstrip = true\n\
                 [[realm]]\nname = \"DEFAULT\"\nreject_message = \"no\"\n"
            ),
            "f.toml",
        )
        .unwrap();
        let realms = c.realms.expect("realms");
        assert_eq!(realms.len(), 2);
        let r = realms.route(b"x@EXAMPLE.org").expect("routed");
        assert!(r.realm.strip && r.realm.auth.as_ref().is_some_and(|p| p.name == "a"));
        let r = realms.route(b"x@other").expect("DEFAULT");
        assert_eq!(r.realm.reject_message.as_deref(), Some("no"));
        assert!(Config::from_toml(up, "f.toml").unwrap().realms.is_none());
        let e = Config::from_toml(
            &format!("{up}[[realm]]\nname = \"x\"\nauth = \"nope\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (7, "realm.auth"), "{e}");
        let e = Config::from_toml(&format!("{up}[[realm]]\nname = \"~(\"\n"), "f.toml")
            .err()
            .unwrap();
        assert_eq!(e.key, "realm.name", "{e}");
    }

    #[test]
    fn an_operator_name_needs_its_namespace_and_accounting_may_go_elsewhere() {
        let up = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n";
        let client = |op: &str| {
            format!(
                "{up}[[client]]\nprefix = \"10.0.0.0/8\"\nsecret = \"x\"\noperator_name = \"{op}\"\n"
            )
        };
        let c = Config::from_toml(&client("1example.org"), "f.toml").unwrap();
        let op = c
            .clients
            .iter()
            .next()
            .and_then(|c| c.operator_name.clone());
        assert_eq!(op.as_deref(), Some(&b"1example.org"[..]));
        let c = Config::from_toml(
            &format!("{}acct_upstream = \"a\"\n", client("1example.org")),
            "f.toml",
        )
        .unwrap();
        let acct = c.clients.iter().next().and_then(|c| c.acct_pool.clone());
        assert_eq!(acct.map(|p| p.name.clone()).as_deref(), Some("a"));
        let e = Config::from_toml(&client("example.org"), "f.toml")
            .err()
            .unwrap();
        assert_eq!((e.line, e.key.as_str()), (8, "client.operator_name"), "{e}");
    }

    #[test]
    fn clients_a_directory_defines_take_dynamics_operator_name_and_rewrites() {
        let up = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n\
                  [[rewrite]]\nname = \"edu\"\nremove = [\"Class\"]\n";
        let dynamic = |rest: &str| {
            format!(
                "{up}[dynamic]\nprefixes = [\"10.0.0.0/8\"]\ndirectory = \"file\"\nfile = \"nas.toml\"\n{rest}"
            )
        };
        let c = Config::from_toml(
            &dynamic("operator_name = \"1example.org\"\nrewrite_out = \"edu\"\n"),
            "f.toml",
        )
        .unwrap();
        let d = c.dynamic.expect("[dynamic]");
        let client = d
            .client("10.1.1.1".parse().unwrap(), None, b"secret", None, false)
            .unwrap();
        assert_eq!(client.operator_name.as_deref(), Some(&b"1example.org"[..]));
        assert!(client.rewrite.outbound.is_some() && client.rewrite.inbound.is_none());
        for (rest, key) in [
            ("operator_name = \"example.org\"\n", "dynamic.operator_name"),
            ("rewrite_in = \"nope\"\n", "dynamic.rewrite_in"),
        ] {
            let e = Config::from_toml(&dynamic(rest), "f.toml").err().unwrap();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn an_http_directory_names_a_bad_url_or_ca_file_with_its_key() {
        let up = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n";
        let dynamic = |rest: &str| {
            format!("{up}[dynamic]\nprefixes = [\"10.0.0.0/8\"]\ndirectory = \"http\"\n{rest}")
        };
        let ok = Config::from_toml(
            &dynamic("url = \"https://nas.example.net/nas\"\n"),
            "f.toml",
        );
        assert!(ok.is_ok(), "a host name over https: {:?}", ok.err());
        let e = Config::from_toml(&dynamic("url = \"ftp://x/nas\"\n"), "f.toml")
            .err()
            .unwrap();
        assert_eq!(e.key, "dynamic.url", "{e}");
        let e = Config::from_toml(
            &dynamic("url = \"https://x/nas\"\nca = \"/nonexistent/ca.pem\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!(e.key, "dynamic.ca", "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn word_values_are_typed_and_a_wrong_one_names_its_key_and_line() {
        let up = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n";
        let c = Config::from_toml(
            &format!(
                "{up}[[pool]]\nname = \"p\"\nupstreams = [\"a\"]\npolicy = \"load-balance\"\n"
            ),
            "f.toml",
        )
        .unwrap();
        assert!(c.clients.is_empty());
        let e = Config::from_toml(
            &format!("{up}[[pool]]\nname = \"p\"\nupstreams = [\"a\"]\npolicy = \"round-robin\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (8, "pool.policy"), "{e}");
        assert!(e.message.contains("load-balance"), "{e}");
        let e = Config::from_toml(
            &format!("{up}[dynamic]\nprefixes = [\"10.0.0.0/8\"]\ndirectory = \"ldap\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (7, "dynamic.directory"), "{e}");
    }

    #[test]
    fn the_embedded_default_loads() {
        let c = Config::from_toml(DEFAULT, "default.toml").unwrap();
        assert_eq!(c.daemon.listen.len(), 2);
        assert_eq!(c.upstreams.len(), 1);
        assert!(c.clients.lookup("127.0.0.1".parse().unwrap()).is_some());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let bad = "[server]\nlisten = [\"127.0.0.1:1812\"]\n\n[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n\n[[client]]\nprefix = \"10.0.0.300/8\"\nsecret = \"x\"\n";
        let e = Config::from_toml(bad, "sidecar.toml").err().unwrap();
        assert_eq!((e.line, e.key.as_str()), (10, "client.prefix"));
        assert!(
            e.to_string().starts_with("sidecar.toml:10: client.prefix:"),
            "{e}"
        );

        let e = Config::from_toml("[server]\nworkerz = 2\n", "f.toml")
            .err()
            .unwrap();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unknown field `workerz`"), "{e}");

        let e = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n[[client]]\nprefix = \"10.0.0.0/8\"\nsecret = \"x\"\nupstream = \"b\"\n",
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (8, "client.upstream"));

        let e = Config::from_toml("[server]\nebpf = \"sometimes\"\n", "f.toml")
            .err()
            .unwrap();
        assert_eq!(e.key, "server.ebpf");
    }

    #[test]
    fn a_listener_says_its_role_or_takes_it_from_its_port() {
        use super::Role;
        let c = Config::from_toml(
            "[server]\nlisten = [\"127.0.0.1:1813\", \"[::1]:1700/acct\", \"0.0.0.0:1646/auth\"]\n",
            "f.toml",
        )
        .unwrap();
        let roles: Vec<(u16, bool)> = c
            .daemon
            .listen
            .iter()
            .map(|l| (l.addr.port(), l.role.is_accounting(l.addr.port())))
            .collect();
        assert_eq!(roles, vec![(1813, true), (1700, true), (1646, false)]);
        assert_eq!(c.daemon.listen[0].role, Role::Auto);
        let e = Config::from_toml(
            "[server]\nworkers = 1\nlisten = [\"127.0.0.1:1812/accounting\"]\n",
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (3, "server.listen"));
        assert!(e.message.contains("accounting"), "{e}");
    }

    #[test]
    fn a_clients_certificate_pins_are_read_and_bad_ones_named() {
        let base = "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"s\"\n\n[[client]]\nprefix = \"192.0.2.0/24\"\nsecret = \"radsec\"\ncertificate_names = [\"nas1.example.org\"]\n";
        let good = format!(
            "{base}certificate_fingerprints = [\"sha256:{}\"]\n",
            "0a".repeat(32)
        );
        let c = Config::from_toml(&good, "f.toml").unwrap();
        let client = c.clients.iter().next().unwrap();
        assert_eq!(client.certificate.names, ["nas1.example.org"]);
        assert_eq!(client.certificate.fingerprints, [[0x0a; 32]]);
        let bad = format!("{base}certificate_fingerprints = [\"md5:1234\"]\n");
        let e = Config::from_toml(&bad, "f.toml").err().unwrap();
        assert_eq!(
            (e.line, e.key.as_str()),
            (10, "client.certificate_fingerprints")
        );
    }

    #[test]
    fn toml_that_says_nothing_of_its_error_is_still_named() {
        // Found by the config fuzz target.
        let e = Config::from_toml("\"\"=", "f.toml").err().unwrap();
        assert_eq!((e.file.as_str(), e.line), ("f.toml", 1));
        assert!(!e.message.is_empty() && !e.key.is_empty(), "{e}");
    }

    #[test]
    fn a_client_named_by_its_certificate_has_the_radsec_secret_by_default() {
        use crate::codec::auth::SharedSecret as _;
        let up = "[[upstream]]\nname = \"u\"\nauth = \"192.0.2.9:1812\"\nsecret = \"s\"\n";
        let c = Config::from_toml(
            &format!("{up}[[client]]\nprefix = \"192.0.2.0/24\"\ncertificate_names = [\"nas1\"]\n"),
            "f.toml",
        )
        .unwrap();
        let client = c.clients.lookup("192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(client.secret.bytes(), b"radsec");
        let e = Config::from_toml(
            &format!("{up}[[client]]\nprefix = \"192.0.2.0/24\"\n"),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (5, "client.secret"));
    }

    #[test]
    fn an_upstream_over_tls_needs_its_files_and_is_a_stream() {
        let base = "[[upstream]]\nname = \"home\"\nauth = \"192.0.2.9:2083\"\nsecret = \"radsec\"\ntransport = \"tls\"\n";
        let e = Config::from_toml(base, "/etc/sidecar/f.toml")
            .err()
            .unwrap();
        assert_eq!((e.line, e.key.as_str()), (1, "upstream.tls_ca"));
        let full = format!(
            "{base}tls_ca = \"ca.pem\"\ntls_certificate = \"me.pem\"\ntls_key = \"me.key\"\n"
        );
        let c = Config::from_toml(&full, "/etc/sidecar/f.toml").unwrap();
        assert!(c.upstreams[0].stream);
        let files = &c.upstream_tls["home"];
        assert_eq!(files.ca, std::path::Path::new("/etc/sidecar/ca.pem"));
        assert_eq!(
            files.name, "192.0.2.9",
            "verified against its address by default"
        );
        assert_eq!(files.alpn, ["radius/1.1", "radius/1.0"], "RFC 9765's allow");
        let e = Config::from_toml(
            &format!(
                "{base}tls_ca = \"ca.pem\"\ntls_certificate = \"me.pem\"\ntls_key = \"me.key\"\n\
                 alpn = [\"radius/2\"]\n"
            ),
            "f.toml",
        )
        .err()
        .unwrap();
        assert_eq!((e.line, e.key.as_str()), (9, "upstream.alpn"));
        let tcp = Config::from_toml(&base.replace("\"tls\"", "\"tcp\""), "f.toml").unwrap();
        assert!(tcp.upstreams[0].stream && tcp.upstream_tls.is_empty());
    }

    #[test]
    fn tcp_listeners_and_their_bounds_are_read_with_defaults() {
        let c = Config::from_toml(
            "[server]
listen_tcp = [\"0.0.0.0:1812\", \"[::]:1813/acct\"]\ntcp_timeout = 3\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.daemon.listen_tcp.len(), 2);
        assert!(c.daemon.listen_tcp[1].role.is_accounting(1813));
        assert_eq!(c.daemon.tcp_timeout, Duration::from_secs(3));
        assert_eq!(c.daemon.max_connections, None, "as many as max_flows");
        assert_eq!(
            c.daemon.max_connections_per_source,
            DaemonConfig::default().max_connections_per_source
        );
        assert!(
            Config::from_toml("", "f.toml")
                .unwrap()
                .daemon
                .listen_tcp
                .is_empty()
        );
        let e = Config::from_toml("[server]\nlisten_tcp = [\"nowhere\"]\n", "f.toml")
            .err()
            .unwrap();
        assert_eq!((e.line, e.key.as_str()), (2, "server.listen_tcp"));
    }

    #[test]
    fn syntax_errors_name_the_key_and_never_quote_a_secret() {
        for (text, line, key) in [
            (
                "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = hunter2-bare\n",
                4,
                "upstream.secret",
            ),
            (
                "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"hunter2-open\n",
                4,
                "upstream.secret",
            ),
            (
                "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = 20242025\n",
                4,
                "upstream.secret",
            ),
            ("[server]\nworkers = \"two\"\n", 2, "server.workers"),
        ] {
            let e = Config::from_toml(text, "f.toml").err().unwrap();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{e}");
            let shown = e.to_string();
            assert!(
                !shown.contains("hunter2") && !shown.contains("20242025"),
                "{shown}"
            );
        }
    }

    #[test]
    fn secrets_never_reach_an_error_message() {
        let e = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nauth = \"nonsense\"\nsecret = \"hunter2-very-secret\"\n",
            "f.toml",
        )
        .err()
        .unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_reload_keeps_the_running_upstream_written_the_same_way_and_only_that() {
        let text = |secret: &str| {
            format!(
                "[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1812\"\nsecret = \"{secret}\"\n\
                 [[upstream]]\nname = \"b\"\nauth = \"127.0.0.1:1912\"\nsecret = \"s\"\n\
                 [[client]]\nprefix = \"10.0.0.0/8\"\nsecret = \"c\"\nupstream = \"b\"\n"
            )
        };
        let running = Config::from_toml(&text("one"), "f.toml").unwrap();
        let again = Config::from_toml_over(
            &text("two"),
            "f.toml",
            &Running {
                upstreams: &running.upstreams,
                upstream_tls: Some(&running.upstream_tls),
            },
        )
        .unwrap();
        assert!(
            !Arc::ptr_eq(&running.upstreams[0], &again.upstreams[0]),
            "a changed secret makes a new upstream"
        );
        assert!(
            Arc::ptr_eq(&running.upstreams[1], &again.upstreams[1]),
            "an unchanged one is the running one"
        );
        let client = again.clients.iter().next().unwrap();
        assert!(
            Arc::ptr_eq(&client.pool.members[0], &running.upstreams[1]),
            "pools hold the running upstream too"
        );
    }
}
