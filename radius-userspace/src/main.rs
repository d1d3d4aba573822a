//! `radius-sidecar`: the daemon's command line. Flags map onto [`DaemonConfig`]; SIGINT and
//! SIGTERM drain and detach the eBPF programs before exit.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use radius_sidecar::daemon::{self, DaemonConfig, EbpfMode};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "radius-sidecar",
    version,
    about = "A RADIUS proxy beside your AAA server, with an eBPF fast path"
)]
struct Cli {
    /// UDP address to serve (repeat for several). Default: 127.0.0.1:1812 and 127.0.0.1:1813.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Wildcard sockets (workers) per listen address. Default: one per core.
    #[arg(long)]
    workers: Option<usize>,
    /// NIC to attach the XDP guard to ("none" for no XDP).
    #[arg(long, default_value = "lo")]
    iface: String,
    /// Never load the eBPF programs: steer in user space.
    #[arg(long, conflicts_with = "require_ebpf")]
    no_ebpf: bool,
    /// Refuse to start when the eBPF fast path cannot be set up.
    #[arg(long)]
    require_ebpf: bool,
    /// Seconds without a packet after which a flow ends.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Most flows at once (also bounded by the open-file limit).
    #[arg(long)]
    max_flows: Option<usize>,
    /// Packets per second allowed per source that has no flow yet, in XDP (0: no limit).
    #[arg(long, default_value_t = 2000)]
    new_source_pps: u64,
    /// Burst allowed per source that has no flow yet.
    #[arg(long, default_value_t = 4000)]
    new_source_burst: u64,
    /// Address of the Prometheus endpoint ("none" to disable).
    #[arg(long, default_value = "127.0.0.1:9812")]
    metrics: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut config = DaemonConfig::default();
    if !cli.listen.is_empty() {
        config.listen = cli.listen;
    }
    if let Some(w) = cli.workers {
        config.workers = w.max(1);
    }
    config.iface = (cli.iface != "none").then_some(cli.iface);
    config.ebpf = if cli.no_ebpf {
        EbpfMode::Off
    } else if cli.require_ebpf {
        EbpfMode::Require
    } else {
        EbpfMode::Auto
    };
    config.idle_timeout = Duration::from_secs(cli.idle_timeout.max(1));
    config.max_flows = cli.max_flows;
    config.new_source_pps = cli.new_source_pps;
    config.new_source_burst = cli.new_source_burst;
    config.metrics_listen = if cli.metrics == "none" {
        None
    } else {
        Some(
            cli.metrics
                .parse()
                .with_context(|| format!("--metrics: `{}` is not an address:port", cli.metrics))?,
        )
    };

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
        daemon::run(config, cancel).await
    })
}
