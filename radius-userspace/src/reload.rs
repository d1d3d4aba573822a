//! Reload: the configuration read again while traffic flows, on SIGHUP or a `reload` over
//! the control socket (`crate::control`). The new file is checked whole before anything
//! changes; one that does not check leaves the running configuration alone and the answer
//! names file, line and key. Then a new [`Current`] is built (unchanged upstreams keep their `Arc`, link and
//! health; changed ones get new links, see `radius_core::engine::Common::reloaded`), stored
//! for the tokio side and handed to every worker, whose engine re-binds its flows. What a
//! reload cannot change (listeners, workers, the fast path, the metrics and CoA addresses,
//! flow bounds) is kept and named in the answer: it takes a restart.

use std::{collections::HashMap, sync::Arc};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    config::{Config, DaemonConfig, Running},
    dedup::DedupTimers,
    engine::Settings,
    shared::{Current, Shared, ToWorker},
    tls::UpstreamTlsFiles,
    upstream::Upstream,
    upstream_conn::Transport,
};

/// Reads the configuration the way the daemon was started (file and command-line flags),
/// reusing the running upstreams that are written the same way.
pub type Loader = Arc<dyn Fn(&Running<'_>) -> anyhow::Result<Config> + Send + Sync>;

/// Called after each reload that took effect (the daemon starts and stops upstream
/// watchers).
pub(crate) type OnReloaded = Box<dyn FnMut(&Current) + Send>;

/// How `u` is reached.
pub fn transport(
    u: &Upstream,
    tls: &HashMap<String, UpstreamTlsFiles>,
) -> anyhow::Result<Transport> {
    Ok(match tls.get(&u.name) {
        Some(files) => Transport::Tls(
            crate::tls::client_config(files)
                .with_context(|| format!("upstream {}: TLS files", u.name))?,
        ),
        None if u.stream => Transport::Tcp,
        None => Transport::Udp,
    })
}

/// How long a provisional flow lives: never less than its cached replies (RFC 5080
/// retransmissions hit the cache).
pub fn provisional_idle(d: &DaemonConfig) -> std::time::Duration {
    d.provisional_idle_timeout.max(d.cleanup_delay)
}

pub fn dedup_timers(d: &DaemonConfig) -> DedupTimers {
    DedupTimers {
        cleanup_delay: d.cleanup_delay,
        ..Default::default()
    }
}

/// The `[server]` settings that differ and that a reload cannot apply.
fn needs_restart(running: &DaemonConfig, new: &DaemonConfig) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut check = |differs: bool, name: &'static str| {
        if differs {
            v.push(name);
        }
    };
    check(running.listen != new.listen, "listen");
    check(running.listen_tcp != new.listen_tcp, "listen_tcp");
    check(running.listen_tls != new.listen_tls, "listen_tls");
    check(running.workers != new.workers, "workers");
    check(running.iface != new.iface, "iface");
    check(running.ebpf != new.ebpf, "ebpf");
    check(running.max_flows != new.max_flows, "max_flows");
    check(
        running.max_provisional_flows != new.max_provisional_flows,
        "max_provisional_flows",
    );
    check(
        running.wildcard_rcvbuf != new.wildcard_rcvbuf,
        "wildcard_rcvbuf",
    );
    check(
        running.new_source_pps != new.new_source_pps,
        "new_source_pps",
    );
    check(
        running.new_source_burst != new.new_source_burst,
        "new_source_burst",
    );
    check(running.metrics_listen != new.metrics_listen, "metrics");
    check(running.coa_listen != new.coa_listen, "coa_listen");
    check(running.control != new.control, "control");
    check(running.tcp_timeout != new.tcp_timeout, "tcp_timeout");
    check(
        running.max_connections != new.max_connections,
        "max_connections",
    );
    check(
        running.max_connections_per_source != new.max_connections_per_source,
        "max_connections_per_source",
    );
    v
}

/// Reads the configuration again and puts it in force; the answer says what changed.
/// On error nothing has changed.
pub(crate) fn reload(shared: &Shared, loader: &Loader) -> anyhow::Result<String> {
    let cur = shared.current.load_full();
    let c = &cur.common;
    let configured: Vec<Arc<Upstream>> = c
        .upstream_index
        .values()
        .filter_map(|&link| c.upstreams.get(link).cloned())
        .collect();
    // Retired UDP links too: an upstream that comes back as it was takes its old link
    // again, so a configuration that goes back and forth makes no new ones. (Stream
    // upstreams only reuse configured links: the TLS files in force are known for those.)
    let candidates: Vec<Arc<Upstream>> = configured
        .iter()
        .cloned()
        .chain(
            (0..c.upstreams.len())
                .filter(|&l| !c.is_configured(l))
                .filter_map(|l| c.upstreams.get(l).filter(|u| !u.stream).cloned()),
        )
        .collect();
    let config = loader(&Running {
        upstreams: &candidates,
        upstream_tls: Some(&cur.upstream_tls),
    })?;
    let restart = needs_restart(&cur.daemon, &config.daemon);
    let upstreams_kept = config.upstreams.len() == configured.len()
        && config
            .upstreams
            .iter()
            .all(|u| configured.iter().any(|r| Arc::ptr_eq(r, u)));
    // A directory whose definitions could name what changed starts again, cache and all.
    let keep_directory = config.directory_key == cur.directory_key && upstreams_kept;
    let (dynamic, core_dynamic) = if keep_directory {
        (cur.dynamic.clone(), c.dynamic.clone())
    } else {
        let d = config.dynamic.map(Arc::new);
        let core = d.as_ref().map(|d| d.core.clone());
        (d, core)
    };
    let mut daemon = cur.daemon.clone();
    daemon.tls = config.daemon.tls.clone();
    daemon.idle_timeout = config.daemon.idle_timeout;
    daemon.cleanup_delay = config.daemon.cleanup_delay;
    daemon.provisional_idle_timeout = config.daemon.provisional_idle_timeout;
    let (n_clients, n_upstreams) = (config.clients.len(), config.upstreams.len());
    let clients = config.clients;
    for client in clients.iter() {
        shared.metrics.set_message_authenticator_required(
            "client",
            &client.name,
            client.requires_message_authenticator(),
        );
    }
    // Series of what left the configuration go too (a dashboard would show them forever).
    for gone in c.clients.iter() {
        if !clients.iter().any(|n| n.name == gone.name) {
            shared.metrics.forget_peer("client", &gone.name);
        }
    }
    for gone in &configured {
        if !config.upstreams.iter().any(|n| n.name == gone.name) {
            shared.metrics.forget_peer("upstream", &gone.name);
        }
    }
    let common = c.reloaded(Settings {
        clients,
        dynamic: core_dynamic,
        upstreams: config.upstreams,
        idle_timeout: daemon.idle_timeout,
        provisional_idle: provisional_idle(&daemon),
        dedup: dedup_timers(&daemon),
        dictionary: config.dictionary,
        realms: config.realms,
    });
    // The TLS files are read again even when their paths did not change: a rotated
    // certificate or CA is in force for the next connection, each way.
    let tls_server = match &config.daemon.tls {
        Some(files) if !cur.daemon.listen_tls.is_empty() => Some(crate::tls::server_config(files)?),
        _ => None,
    };
    let mut upstream_transports = cur.upstream_transports.clone();
    for u in &common.upstreams[upstream_transports.len()..] {
        upstream_transports.push(transport(u, &config.upstream_tls)?);
    }
    for &link in common.upstream_index.values() {
        if let (Some(u), Some(t)) = (
            common.upstreams.get(link),
            upstream_transports.get_mut(link),
        ) && u.stream
        {
            *t = transport(u, &config.upstream_tls)?;
        }
    }
    let added = (0..common.upstreams.len())
        .filter(|&l| common.is_configured(l) && !c.is_configured(l))
        .count();
    let retired = (0..c.upstreams.len())
        .filter(|&l| c.is_configured(l) && !common.is_configured(l))
        .count();
    let current = Arc::new(Current {
        common: Arc::new(common),
        dynamic,
        upstream_transports,
        upstream_tls: config.upstream_tls,
        directory_key: config.directory_key,
        daemon,
        tls_server,
        spool_pools: config.spool_pools,
        spool_settings: cur.spool_settings.clone(),
    });
    let spool_changed = config.spool != cur.spool_settings;
    shared.current.store(current.clone());
    for inbox in &shared.defined {
        inbox.send(ToWorker::Reload(current.clone()));
    }
    let mut answer = format!(
        "reloaded: {n_clients} client(s), {n_upstreams} upstream(s) ({added} new or \
         changed, {retired} retired)"
    );
    match (&current.dynamic, keep_directory) {
        (None, _) => {}
        (Some(_), true) => answer.push_str("; dynamic clients: directory and cache kept"),
        (Some(_), false) => answer.push_str("; dynamic clients: directory renewed, cache emptied"),
    }
    if spool_changed {
        answer.push_str("; [spool]'s directory and bounds: not applied until a restart");
    }
    if !restart.is_empty() {
        answer.push_str(&format!(
            "; not applied until a restart: server.{}",
            restart.join(", server.")
        ));
    }
    Ok(answer)
}

/// A reload asked over the control socket: the answer goes back on it.
pub(crate) type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// Serves reloads until the daemon is cancelled: SIGHUP (the answer is logged), and
/// `requests` from the control socket (the answer goes back).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    loader: Loader,
    mut on_reloaded: OnReloaded,
    mut rx: mpsc::Receiver<ReloadRequest>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .inspect_err(|e| warn!("no SIGHUP handler ({e}): reload only over the control socket"))
        .ok();
    loop {
        let sighup = async {
            match &mut hup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let reply = tokio::select! {
            _ = sighup => None,
            Some(reply) = rx.recv() => Some(reply),
            () = shared.cancel.cancelled() => return,
        };
        let mut notify = vec![sd_notify::NotifyState::Reloading];
        notify.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        let _ = sd_notify::notify(false, &notify);
        let outcome = reload(&shared, &loader);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let result = match &outcome {
            Ok(answer) => {
                info!("{answer}");
                on_reloaded(&shared.current.load());
                "ok"
            }
            Err(e) => {
                warn!("reload refused, the running configuration stays: {e:#}");
                "failed"
            }
        };
        shared.metrics.reload(result);
        if let Some(reply) = reply {
            let _ = reply.send(outcome.map_err(|e| format!("{e:#}")));
        }
    }
}
