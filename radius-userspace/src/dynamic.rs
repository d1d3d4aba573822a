//! Dynamic clients: NASes in prefixes marked dynamic are defined at run time by a
//! *directory*: a TOML file reloaded when it changes, an HTTP or HTTPS endpoint (reqwest), or SQL (SQLite, or
//! PostgreSQL shared between sidecars) reading FreeRADIUS's own `nas` table as it is. Definitions are
//! cached for `lifetime`, refusals for `nak_lifetime`, and a directory that did not answer
//! (down, an error, its timeout) for `error_lifetime`; at most `max_concurrent` run at once
//! and at most `max_clients` are kept. The cache itself, and the rule of which source may
//! start a definition, are the core's (`radius_core::dynamic`); the engine keeps the packets
//! of a source being defined and injects them, in arrival order, once it is
//! (`radius_core::engine`, `radius_core::pending`).

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    client::{Client, SecretText},
    codec::auth::Secret,
    handover::HandedDefinition,
};

/// What a directory says about one source address.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub secret: SecretText,
    pub name: Option<String>,
    pub upstream: Option<String>,
    #[serde(default)]
    pub require_message_authenticator: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory file {path}: {message}")]
    File { path: String, message: String },
    #[error("HTTP directory: {0}")]
    Http(String),
    #[error("SQL directory: {0}")]
    Sql(String),
    #[error("the directory took longer than {0:?}")]
    Timeout(Duration),
}

/// Where definitions come from.
#[derive(Debug)]
pub enum Directory {
    /// A TOML file of `[[client]] prefix = "...", secret = "..."` entries.
    File(FileDirectory),
    /// `GET <url>?address=<ip>`: 200 with a JSON definition, 404 for a refusal.
    Http(HttpDirectory),
    /// FreeRADIUS's `nas` table (nasname as address or prefix, shortname, secret, server).
    Sql(SqlDirectory),
}

/// A connection pool, opened on first use (`sqlite:` or `postgres://` URL).
pub struct SqlDirectory {
    pub url: String,
    /// Upstream names: a row's `server` column picks one when it names one.
    upstreams: Vec<String>,
    pool: tokio::sync::OnceCell<SqlPool>,
}

#[derive(Debug)]
enum SqlPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl std::fmt::Debug for SqlDirectory {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlDirectory({})", redacted(&self.url))
    }
}

/// `url` without the password of its user part (`postgres://user:***@host/db`).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}/{path}")
        }
        None => url.to_owned(),
    }
}

type NasRow = (String, Option<String>, String, Option<String>);

impl SqlDirectory {
    pub fn new(url: String, upstreams: Vec<String>) -> Self {
        Self {
            url,
            upstreams,
            pool: tokio::sync::OnceCell::new(),
        }
    }

    async fn pool(&self) -> Result<&SqlPool, DirectoryError> {
        let e = |m: String| DirectoryError::Sql(m);
        self.pool
            .get_or_try_init(|| async {
                if self.url.starts_with("sqlite:") {
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(4)
                        .connect(&self.url)
                        .await
                        .map(SqlPool::Sqlite)
                        .map_err(|x| e(x.to_string()))
                } else if self.url.starts_with("postgres://")
                    || self.url.starts_with("postgresql://")
                {
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(4)
                        .connect(&self.url)
                        .await
                        .map(SqlPool::Postgres)
                        .map_err(|x| e(x.to_string()))
                } else {
                    Err(e("url must start with sqlite: or postgres://".into()))
                }
            })
            .await
    }

    /// The row whose nasname (an address, or a prefix) holds `ip` most specifically.
    async fn lookup(&self, ip: IpAddr) -> Result<Option<Definition>, DirectoryError> {
        let e = |x: sqlx::Error| DirectoryError::Sql(x.to_string());
        // Exact addresses through the index; prefixes are few and matched here.
        let rows: Vec<NasRow> = match self.pool().await? {
            SqlPool::Sqlite(p) => sqlx::query_as(
                "SELECT nasname, shortname, secret, server FROM nas \
                 WHERE nasname = ?1 OR nasname LIKE '%/%'",
            )
            .bind(ip.to_string())
            .fetch_all(p)
            .await
            .map_err(e)?,
            SqlPool::Postgres(p) => sqlx::query_as(
                "SELECT nasname, shortname, secret, server FROM nas \
                 WHERE nasname = $1 OR nasname LIKE '%/%'",
            )
            .bind(ip.to_string())
            .fetch_all(p)
            .await
            .map_err(e)?,
        };
        let best = rows
            .into_iter()
            .filter_map(|r| {
                let net =
                    r.0.parse::<IpNet>()
                        .ok()
                        .or_else(|| r.0.parse::<IpAddr>().ok().map(IpNet::from))?;
                net.contains(&ip).then_some((net.prefix_len(), r))
            })
            .max_by_key(|(len, _)| *len);
        Ok(best.map(|(_, (_, shortname, secret, server))| Definition {
            secret: SecretText::new(secret),
            name: shortname.filter(|s| !s.is_empty()),
            // FreeRADIUS's `server` is a virtual server; it picks an upstream only when one
            // has that name.
            upstream: server.filter(|s| self.upstreams.contains(s)),
            require_message_authenticator: false,
        }))
    }
}

/// The entries of a directory file, most specific prefix first, and the file's mtime.
type Loaded = (SystemTime, Vec<(IpNet, Definition)>);

#[derive(Debug)]
pub struct FileDirectory {
    pub path: PathBuf,
    loaded: Mutex<Option<Loaded>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntries {
    #[serde(default)]
    client: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    prefix: IpNet,
    #[serde(flatten)]
    def: Definition,
}

impl FileDirectory {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            loaded: Mutex::new(None),
        }
    }

    /// The most specific entry holding `ip`; the file is re-read when its mtime changes.
    fn lookup(&self, ip: IpAddr) -> Result<Option<Definition>, DirectoryError> {
        let err = |message: String| DirectoryError::File {
            path: self.path.display().to_string(),
            message,
        };
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| err(e.to_string()))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.as_ref().is_none_or(|(t, _)| *t != mtime) {
            let text = std::fs::read_to_string(&self.path).map_err(|e| err(e.to_string()))?;
            let entries: FileEntries = toml::from_str(&text).map_err(|e| {
                let line = e.span().map_or(0, |s| {
                    text[..s.start.min(text.len())].matches('\n').count() + 1
                });
                err(format!("line {line}: {}", e.message()))
            })?;
            let mut v: Vec<(IpNet, Definition)> = entries
                .client
                .into_iter()
                .map(|e| (e.prefix.trunc(), e.def))
                .collect();
            v.sort_by_key(|(p, _)| std::cmp::Reverse(p.prefix_len()));
            *loaded = Some((mtime, v));
        }
        Ok(loaded
            .as_ref()
            .and_then(|(_, v)| v.iter().find(|(p, _)| p.contains(&ip)))
            .map(|(_, d)| d.clone()))
    }
}

impl Directory {
    /// Asks the directory about `ip`: `Ok(None)` is a refusal.
    pub async fn define(&self, ip: IpAddr) -> Result<Option<Definition>, DirectoryError> {
        match self {
            Directory::File(f) => f.lookup(ip),
            Directory::Http(http) => http.define(ip).await,
            Directory::Sql(sql) => sql.lookup(ip).await,
        }
    }
}

/// Answers to a definition larger than this are refused (a directory answers a few lines).
const MAX_HTTP_BODY: usize = 64 * 1024;

/// An HTTP or HTTPS directory: `GET <url>?address=<ip>` on reqwest (a keep-alive pool of
/// connections, host names, bodies of any framing: length, chunked or to the close) over
/// the same rustls (ring) the TLS transports use. HTTPS trusts `ca` (a PEM file) or, by
/// default, the system's bundle.
pub struct HttpDirectory {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpDirectory {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpDirectory({})", redacted(self.url.as_str()))
    }
}

/// The system's CA bundle (Debian's ca-certificates).
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

impl HttpDirectory {
    /// Errors say what is wrong with the URL or the CA file (for `dynamic.url`, `dynamic.ca`).
    pub fn new(
        url: &str,
        ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, (&'static str, String)> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ("dynamic.url", format!("`{}`: {e}", redacted(url))))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err((
                "dynamic.url",
                format!("`{}`: http:// or https:// only", redacted(url)),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        let (file, key) = match ca {
            Some(p) => (Some(p.to_path_buf()), "dynamic.ca"),
            None => (
                Some(std::path::PathBuf::from(SYSTEM_CAS)).filter(|p| p.exists()),
                "dynamic.url",
            ),
        };
        if let Some(file) = &file {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| (key, format!("{}: {e}", file.display())))?;
            for c in certs {
                let c = c.map_err(|e| (key, format!("{}: {e}", file.display())))?;
                // A bundle may hold certificates rustls does not take; the others still count.
                let _ = roots.add(c);
            }
            if roots.is_empty() && ca.is_some() {
                return Err((key, format!("{}: no CA certificate in it", file.display())));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ("dynamic.url", e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ("dynamic.url", e.to_string()))?;
        Ok(Self {
            url: parsed,
            client,
        })
    }

    async fn define(&self, ip: IpAddr) -> Result<Option<Definition>, DirectoryError> {
        let e = |m: String| DirectoryError::Http(m);
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("address", &ip.to_string());
        // reqwest's errors name the URL; ours may carry a password.
        let what = |x: reqwest::Error| e(x.without_url().to_string());
        let mut resp = self.client.get(url).send().await.map_err(what)?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(what)? {
            if body.len() + chunk.len() > MAX_HTTP_BODY {
                return Err(e(format!("an answer over {MAX_HTTP_BODY} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        match status {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|x| e(format!("JSON answer: {x}"))),
            404 | 403 => Ok(None),
            s => Err(e(format!("status {s}"))),
        }
    }
}

pub use radius_core::dynamic::{Dynamic, Entry, Lifetimes, NotDefined, Resolution};

/// Why a source was not defined, and how long that is remembered (the refusal cache's and
/// the XDP negative entry's life).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: String,
    pub why: NotDefined,
    pub remembered: Duration,
}

/// Dynamic clients: the sans-IO settings and cache the workers share ([`Dynamic`], which
/// this derefs to), and what answers: the directory, bounded in concurrency and time.
#[derive(Debug)]
pub struct DynamicClients {
    pub core: Arc<Dynamic>,
    pub directory: Directory,
    pub timeout: Duration,
    /// Pools (and single upstreams) a definition may name; the first is the default.
    pub pools: Vec<Arc<crate::pool::Pool>>,
    pub concurrency: tokio::sync::Semaphore,
    /// The concurrency's bound (the semaphore's permits when none is taken).
    max_concurrent: usize,
    /// What every client the directory defines gets from the configuration.
    pub template: ClientTemplate,
}

/// `[dynamic]`'s settings for the clients it defines: an Operator-Name (RFC 5580) and
/// rewrites, as a `[[client]]` would have.
#[derive(Clone, Debug, Default)]
pub struct ClientTemplate {
    pub operator_name: Option<Vec<u8>>,
    pub rewrite: crate::rewrite::Rewrites,
}

impl std::ops::Deref for DynamicClients {
    type Target = Dynamic;
    fn deref(&self) -> &Dynamic {
        &self.core
    }
}

impl DynamicClients {
    #[expect(
        clippy::too_many_arguments,
        reason = "built once from the configuration"
    )]
    pub fn new(
        prefixes: Vec<IpNet>,
        directory: Directory,
        lifetimes: Lifetimes,
        max_clients: usize,
        max_concurrent: usize,
        timeout: Duration,
        max_pending_per_flow: usize,
        max_pending_packets: usize,
        pools: Vec<Arc<crate::pool::Pool>>,
    ) -> Self {
        Self {
            core: Arc::new(Dynamic::new(
                prefixes,
                lifetimes,
                max_clients,
                timeout,
                (max_pending_per_flow, max_pending_packets),
            )),
            directory,
            timeout,
            pools,
            concurrency: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            max_concurrent: max_concurrent.max(1),
            template: ClientTemplate::default(),
        }
    }

    /// Definitions asking the directory now.
    pub fn running(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.concurrency.available_permits())
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// Runs the directory for `ip` (bounded in concurrency and time) and records the
    /// outcome: the client, or why not and for how long that is remembered.
    pub async fn define(&self, ip: IpAddr) -> Result<Arc<Client>, Refusal> {
        let _permit = self.concurrency.acquire().await;
        let answer = match tokio::time::timeout(self.timeout, self.directory.define(ip)).await {
            Ok(r) => r,
            Err(_) => Err(DirectoryError::Timeout(self.timeout)),
        };
        let outcome = match answer {
            Ok(Some(d)) => self
                .client_of(ip, d)
                .map_err(|reason| (reason, NotDefined::Refused)),
            Ok(None) => Err(("refused by the directory".to_owned(), NotDefined::Refused)),
            Err(e) => Err((e.to_string(), NotDefined::Unanswered)),
        };
        let remembered = self.core.record(
            ip,
            outcome.as_ref().map_err(|(_, why)| *why),
            Instant::now(),
        );
        outcome.map_err(|(reason, why)| Refusal {
            reason,
            why,
            remembered,
        })
    }

    fn client_of(&self, ip: IpAddr, d: Definition) -> Result<Arc<Client>, String> {
        self.client(
            ip,
            d.name,
            d.secret.as_bytes(),
            d.upstream.as_deref(),
            d.require_message_authenticator,
        )
    }

    /// A client as a directory's definition makes it.
    pub fn client(
        &self,
        ip: IpAddr,
        name: Option<String>,
        secret: &[u8],
        upstream: Option<&str>,
        require_message_authenticator: bool,
    ) -> Result<Arc<Client>, String> {
        if secret.is_empty() {
            return Err("the directory gave an empty secret".into());
        }
        let pool = match upstream {
            Some(name) => self.pools.iter().find(|p| p.name == name).cloned(),
            None => self.pools.first().cloned(),
        }
        .ok_or_else(|| format!("the directory named an unknown upstream {upstream:?}"))?;
        Ok(Arc::new(Client {
            name: name.unwrap_or_else(|| ip.to_string()),
            prefix: IpNet::from(ip),
            secret: Secret::new(secret),
            pool,
            // The directory's `true` forces it; otherwise FreeRADIUS 3.2.5's default, auto.
            require_message_authenticator: if require_message_authenticator {
                crate::blastradius::YesNoAuto::Yes
            } else {
                crate::blastradius::YesNoAuto::Auto
            },
            limit_proxy_state: crate::blastradius::YesNoAuto::Auto,
            learned: Default::default(),
            nas_key: None,
            certificate: Default::default(),
            operator_name: self.template.operator_name.clone(),
            rewrite: self.template.rewrite.clone(),
            acct_pool: None,
            acct_replicas: Default::default(),
        }))
    }

    /// The live definitions, as an upgrade hands them to the new process.
    pub fn hand_over(&self, now: Instant) -> Vec<HandedDefinition> {
        use radius_core::codec::auth::SharedSecret as _;
        self.core
            .definitions(now)
            .into_iter()
            .filter(|(ip, c, _)| {
                self.core.prefixes.iter().any(|p| p.contains(ip)) && !c.name.is_empty()
            })
            .map(|(ip, c, left)| HandedDefinition {
                ip,
                name: c.name.clone(),
                secret: c.secret.bytes().to_vec(),
                pool: c.pool.name.clone(),
                require_message_authenticator: c.require_message_authenticator
                    == crate::blastradius::YesNoAuto::Yes,
                left_ms: left.as_millis() as u64,
            })
            .collect()
    }

    /// A definition the process this one upgrades had made: cached for what it had left,
    /// unless its source is no longer dynamic or its pool is gone (then it is defined
    /// again when it next sends).
    pub fn adopt(&self, d: &HandedDefinition, now: Instant) -> bool {
        if !self.core.prefixes.iter().any(|p| p.contains(&d.ip)) {
            return false;
        }
        match self.client(
            d.ip,
            Some(d.name.clone()),
            &d.secret,
            Some(&d.pool),
            d.require_message_authenticator,
        ) {
            Ok(c) => {
                self.core
                    .adopt(d.ip, c, Duration::from_millis(d.left_ms), now);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstream;

    fn upstream() -> Arc<Upstream> {
        Arc::new(Upstream {
            name: "u".into(),
            auth: "127.0.0.1:1".parse().unwrap(),
            acct: None,
            secret: Secret::new(b"u"),
            timeout: Duration::from_secs(1),
            options: Default::default(),
            health: Default::default(),
            stream: false,
        })
    }

    fn dynamic(path: PathBuf, max_clients: usize) -> DynamicClients {
        DynamicClients::new(
            vec!["203.0.113.0/24".parse().unwrap()],
            Directory::File(FileDirectory::new(path)),
            Lifetimes {
                defined: Duration::from_secs(60),
                refused: Duration::from_secs(5),
                unanswered: Duration::from_secs(1),
            },
            max_clients,
            4,
            Duration::from_secs(1),
            16,
            100,
            vec![Arc::new(crate::pool::Pool::single(upstream()))],
        )
    }

    #[tokio::test]
    async fn a_file_directory_defines_refuses_and_is_reloaded() {
        let path = std::env::temp_dir().join(format!("rs-dir-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[[client]]\nprefix = \"203.0.113.0/28\"\nsecret = \"s1\"\nname = \"ap\"\n",
        )
        .unwrap();
        let d = dynamic(path.clone(), 10);
        let now = Instant::now();
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        assert!(matches!(
            d.resolve("192.0.2.1".parse().unwrap(), now),
            Resolution::NotDynamic
        ));
        assert!(matches!(
            d.resolve(ip, now),
            Resolution::Defining { start: true }
        ));
        assert!(matches!(
            d.resolve(ip, now),
            Resolution::Defining { start: false }
        ));
        let c = d.define(ip).await.unwrap();
        assert_eq!(c.name, "ap");
        assert!(matches!(
            d.resolve(ip, Instant::now()),
            Resolution::Client(_)
        ));
        let other: IpAddr = "203.0.113.200".parse().unwrap();
        assert!(matches!(
            d.resolve(other, now),
            Resolution::Defining { start: true }
        ));
        assert!(d.define(other).await.is_err());
        assert!(matches!(
            d.resolve(other, Instant::now()),
            Resolution::Refused
        ));
        // After the refusal expires, a changed file is read again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(
            &path,
            "[[client]]\nprefix = \"203.0.113.0/24\"\nsecret = \"s2\"\n",
        )
        .unwrap();
        let later = Instant::now() + Duration::from_secs(6);
        assert!(matches!(
            d.resolve(other, later),
            Resolution::Defining { start: true }
        ));
        assert!(d.define(other).await.is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn max_clients_bounds_the_cache() {
        let path = std::env::temp_dir().join(format!("rs-dir2-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[[client]]\nprefix = \"203.0.113.0/24\"\nsecret = \"s\"\n",
        )
        .unwrap();
        let d = dynamic(path.clone(), 1);
        let (a, b): (IpAddr, IpAddr) = (
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        );
        assert!(matches!(
            d.resolve(a, Instant::now()),
            Resolution::Defining { start: true }
        ));
        d.define(a).await.unwrap();
        assert!(matches!(d.resolve(b, Instant::now()), Resolution::Refused));
        let _ = std::fs::remove_file(&path);
    }
}
