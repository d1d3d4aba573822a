//! `radius-sidecar`: the daemon's command line. A TOML file (`--config`, or the embedded
//! default) gives the configuration; flags given on the command line override it.
//! `radius-sidecar check-config` checks a file and names file, line and key on error.
//! `radius-sidecar reload` (or SIGHUP) makes the running daemon read its file again.
//! SIGINT and SIGTERM drain and detach the eBPF programs before exit.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use radius_sidecar::{
    config::{self, Config, EbpfMode, Listener, OrNone, Running},
    daemon,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "radius-sidecar",
    version,
    about = "A RADIUS proxy beside your AAA server, with an eBPF fast path"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Configuration file (TOML). Default: the embedded one (loopback, see config/default.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log lines as text (for people) or as one JSON object each (for log shippers: fields
    /// such as the flow and client stay fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// `reload`: the daemon's control socket (default: `server.control` of the
    /// configuration).
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,
    /// UDP address to serve (repeat for several); replaces `server.listen`. A suffix gives
    /// its role for Status-Server: `/auth`, `/acct` (default: by port, 1813 and 1646 acct).
    #[arg(long = "listen", value_name = "ADDR:PORT[/ROLE]")]
    listen: Vec<Listener>,
    /// RADIUS/TCP address to serve (RFC 6613; repeat for several); replaces
    /// `server.listen_tcp`. The same suffixes as `--listen`.
    #[arg(long = "listen-tcp", value_name = "ADDR:PORT[/ROLE]")]
    listen_tcp: Vec<Listener>,
    /// Wildcard sockets (workers) per listen address.
    #[arg(long)]
    workers: Option<usize>,
    /// NIC to attach the XDP guard to ("none" for no XDP).
    #[arg(long, value_name = "NIC|none")]
    iface: Option<OrNone<String>>,
    /// Never load the eBPF programs: steer in user space.
    #[arg(long, conflicts_with = "require_ebpf")]
    no_ebpf: bool,
    /// Refuse to start when the eBPF fast path cannot be set up.
    #[arg(long)]
    require_ebpf: bool,
    /// Seconds without a packet after which a flow ends.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Most flows at once (also bounded by the open-file limit).
    #[arg(long)]
    max_flows: Option<usize>,
    /// Packets per second allowed per source that has no flow yet, in XDP (0: no limit).
    #[arg(long)]
    new_source_pps: Option<u64>,
    /// Burst allowed per source that has no flow yet.
    #[arg(long)]
    new_source_burst: Option<u64>,
    /// Address of the Prometheus endpoint ("none" to disable).
    #[arg(long, value_name = "ADDR:PORT|none")]
    metrics: Option<OrNone<std::net::SocketAddr>>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the configuration and exit (non-zero with file:line: key: problem on error).
    CheckConfig,
    /// Make the running daemon read its configuration again (as SIGHUP does), and say
    /// what changed; a file that does not check changes nothing, and the error names file,
    /// line and key. Talks to the control socket of the configuration (`server.control`).
    Reload,
    /// Upgrade the running daemon without loss: it starts its binary again (as installed
    /// now), hands the new process its sockets, flows and dynamic clients, finishes its
    /// requests in flight and exits. If the new one cannot take over, the old one goes on
    /// and the error says why.
    Upgrade,
    /// Show what the running daemon holds now: flows by client, upstreams' health and
    /// requests in flight, dynamic clients, the fast path and its counters.
    Status {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Write the man page (radius-sidecar.8) and shell completions (bash, zsh, fish) into
    /// DIR, from this command line (the package ships them).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

/// The man page and completions, generated from the clap definition so they never drift.
fn generate_assets(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    use clap_complete::Shell;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)
        .context("rendering the man page")?;
    std::fs::write(dir.join("radius-sidecar.8"), page).context("writing the man page")?;
    // The pages the main one points to (SEE ALSO): one per command.
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("radius-sidecar-{}", sub.get_name());
        let mut page = Vec::new();
        let sub = sub
            .clone()
            .display_name(name.clone())
            .bin_name(name.clone());
        clap_mangen::Man::new(sub)
            .section("8")
            .render(&mut page)
            .with_context(|| format!("rendering {name}(8)"))?;
        std::fs::write(dir.join(format!("{name}.8")), page)
            .with_context(|| format!("writing {name}(8)"))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "radius-sidecar", dir)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    Ok(())
}

fn load(cli: &Cli, running: &Running<'_>) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(path) => Config::load_over(path, running)?,
        None => Config::from_toml_over(config::DEFAULT, "<embedded default>", running)?,
    };
    let d = &mut c.daemon;
    if !cli.listen.is_empty() {
        d.listen = cli.listen.clone();
    }
    if !cli.listen_tcp.is_empty() {
        d.listen_tcp = cli.listen_tcp.clone();
    }
    if let Some(w) = cli.workers {
        d.workers = w.max(1);
    }
    if let Some(OrNone(i)) = &cli.iface {
        d.iface = i.clone();
    }
    if cli.no_ebpf {
        d.ebpf = EbpfMode::Off;
    } else if cli.require_ebpf {
        d.ebpf = EbpfMode::Require;
    }
    if let Some(t) = cli.idle_timeout {
        d.idle_timeout = Duration::from_secs(t.max(1));
    }
    if cli.max_flows.is_some() {
        d.max_flows = cli.max_flows;
    }
    if let Some(p) = cli.new_source_pps {
        d.new_source_pps = p;
    }
    if let Some(b) = cli.new_source_burst {
        d.new_source_burst = b;
    }
    if let Some(OrNone(m)) = cli.metrics {
        d.metrics_listen = m;
    }
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    radius_sidecar::upgrade::remember_invocation();
    let successor = radius_sidecar::upgrade::inherited_channel();
    let cli = Cli::parse();
    if let Some(Cmd::GenerateAssets { dir }) = &cli.cmd {
        return generate_assets(dir);
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    let command = match &cli.cmd {
        Some(Cmd::Reload) => Some("reload"),
        Some(Cmd::Upgrade) => Some("upgrade"),
        Some(Cmd::Status { json: false }) => Some("status"),
        Some(Cmd::Status { json: true }) => Some("status json"),
        _ => None,
    };
    if let Some(command) = command {
        // The daemon reads the file itself; without --control the file must check here
        // first, to say where the socket is.
        let path = match &cli.control {
            Some(p) => p.clone(),
            None => load(&cli, &Running::default())
                .context("the configuration does not check (the daemon was not asked)")?
                .daemon
                .control
                .context(
                    "the configuration has no control socket (server.control = \"none\"): \
                     send SIGHUP to reload",
                )?,
        };
        println!("{}", radius_sidecar::control::ask(&path, command)?);
        return Ok(());
    }
    let config = match load(&cli, &Running::default()) {
        Ok(c) => c,
        Err(e) => {
            // Started by an upgrade: the running process answers why, and goes on.
            if let Some(channel) = successor {
                radius_sidecar::upgrade::refuse(channel, format!("{e:#}"));
            }
            return Err(e);
        }
    };
    if let Some(Cmd::CheckConfig) = cli.cmd {
        // Every certificate and key: readable, parsed, within its dates, the key the
        // certificate's.
        if let Some(files) = &config.daemon.tls {
            radius_sidecar::tls::server_config(files)?;
        }
        for files in config.upstream_tls.values() {
            radius_sidecar::tls::client_config(files)?;
        }
        println!(
            "configuration OK: {} listener(s), {} upstream(s), {} client(s)",
            config.daemon.listen.len()
                + config.daemon.listen_tcp.len()
                + config.daemon.listen_tls.len(),
            config.upstreams.len(),
            config.clients.len()
        );
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            signals.cancel();
        });
        let loader: radius_sidecar::reload::Loader =
            std::sync::Arc::new(move |running| load(&cli, running));
        daemon::run(config, loader, cancel, successor).await
    })
}
