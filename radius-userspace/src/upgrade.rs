//! Upgrade without loss (`radius-sidecar upgrade`): the running process starts the binary
//! at its own path again (a package upgrade has replaced the file by then), with the same
//! arguments, and hands it every NAS-facing socket over a private socket pair
//! ([`crate::handover`]): wildcards, the flows' child sockets with their clients, the
//! stream listeners, the CoA, metrics and control listeners, the dynamic definitions the
//! flows are on, and the packets waiting for one. The new process adopts each flow with its
//! own socket (no flow made again), attaches its eBPF programs beside the old ones (both
//! steer to the very same sockets; the newest choice wins), and says `Taken`; the old one
//! detaches its programs, answers what it still has in flight through its copies of the
//! sockets, and exits. Nothing is pinned in bpffs: the programs and maps of each process
//! live and die with it, so a process killed with SIGKILL leaves nothing behind but its
//! control socket's file, which the next start replaces and reports.
//!
//! Why a socket pair and not systemd's file-descriptor store: it works the same under
//! systemd, from a shell and in a container; the sockets go straight from the old process
//! to the new with what each one is, and no limit (`FileDescriptorStoreMax`) caps the
//! number of flows. Under systemd the old process hands the service over with `MAINPID=`
//! (the unit has `NotifyAccess=all`, so the new one's `READY=1` counts too).
//!
//! If anything fails before `Taken` (the new binary does not start, its configuration
//! does not check, it cannot take the fast path), the old process reads its sockets again
//! and goes on; the answer says why.

use std::{
    collections::HashMap,
    ffi::OsString,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixListener,
    },
    path::PathBuf,
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    handover::{
        Channel, ENTRIES_PER_MESSAGE, ENV_FD, FDS_PER_MESSAGE, Handed, HandedDefinition,
        HandoverError, Message,
    },
    shared::{HandedFront, Shared, ToWorker, lock},
    worker::Inherited,
};

/// How long the new process has to start, check its configuration and take over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

static INVOCATION: OnceLock<(PathBuf, Vec<OsString>)> = OnceLock::new();

/// Remembers how this process was started (its binary's path and arguments), for the
/// upgrade to start the same again. Called first thing in `main`.
pub fn remember_invocation() {
    if let Ok(exe) = std::env::current_exe() {
        let args = std::env::args_os().skip(1).collect();
        let _ = INVOCATION.set((exe, args));
    }
}

/// The handover channel this process was started with, when it was started by an upgrade
/// (taken out of the environment, so nothing it starts inherits it).
pub fn inherited_channel() -> Option<Channel> {
    let fd: RawFd = std::env::var(ENV_FD).ok()?.parse().ok()?;
    // SAFETY: called once at start, before any thread; the old process put its end of the
    // pair at this number for us and nothing else here uses it.
    unsafe { std::env::remove_var(ENV_FD) };
    // SAFETY: as above.
    match unsafe { Channel::inherited(fd) } {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "upgrade: the handover socket is unusable; starting afresh");
            None
        }
    }
}

// ------------------------------------------------------------------ the old process

/// Upgrades this process to the binary at its path: see the module's notes. Returns what
/// to tell the operator; on an error this process goes on serving.
pub(crate) async fn upgrade(shared: Arc<Shared>) -> anyhow::Result<String> {
    if shared.handed_over.load(Ordering::Acquire) {
        anyhow::bail!("this process has already handed over");
    }
    // One at a time: a second upgrade while one runs would start a second new process.
    static UNDER_WAY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Ok(_one) = UNDER_WAY.try_lock() else {
        anyhow::bail!("an upgrade is already under way");
    };
    let (exe, args) = INVOCATION
        .get()
        .context("the binary's path is unknown: cannot start it again")?;
    let (channel, theirs) = Channel::pair()?;
    channel.set_timeout(TAKEOVER_WAIT)?;
    let mut child =
        spawn(exe, args, theirs).with_context(|| format!("starting {}", exe.display()))?;
    let pid = child.id();
    info!(pid, binary = %exe.display(), "upgrade: new process started");
    let channel = Arc::new(channel);
    let started = Instant::now();
    let outcome = hand_over(&shared, &channel, pid).await;
    match outcome {
        Ok(flows) => {
            // systemd follows the new process from here (NotifyAccess=all lets it speak).
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(pid)]);
            // An interface takes one XDP program: ours goes so the new one's can go on
            // (it attaches once it serves, and waits for this). Not earlier: packets wait
            // for the new workers meanwhile, and guard drops nothing valid.
            if let Some(fp) = &shared.fastpath {
                let mut fp = lock(fp);
                fp.detach_guard();
                fp.detach_steer();
            }
            shared.handed_over.store(true, Ordering::Release);
            // The child outlives us; nothing is left to reap it for.
            std::mem::forget(child);
            let took = started.elapsed();
            info!(
                pid,
                flows,
                ms = took.as_millis() as u64,
                "upgrade: pid {pid} took over; this process finishes its requests in flight and exits"
            );
            shared.cancel.cancel();
            Ok(format!(
                "pid {pid} took over {flows} flow(s) in {} ms; this process finishes its \
                 requests in flight and exits",
                took.as_millis()
            ))
        }
        Err(e) => {
            resume(&shared);
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            warn!(error = %format!("{e:#}"), "upgrade failed: this process goes on serving");
            Err(e.context("upgrade failed; the running process goes on serving"))
        }
    }
}

/// Starts `exe` with `args` and the handover socket at `ENV_FD`.
fn spawn(
    exe: &PathBuf,
    args: &[OsString],
    theirs: OwnedFd,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).env(ENV_FD, fd.to_string());
    // SAFETY: only fcntl between fork and exec (async-signal-safe): the new process keeps
    // its end of the pair across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(theirs);
    child
}

/// The old side of the protocol, up to `Taken`. Returns how many flows went over.
async fn hand_over(
    shared: &Arc<Shared>,
    channel: &Arc<Channel>,
    pid: u32,
) -> anyhow::Result<usize> {
    let (hello, _) = blocking(channel, |c| c.recv())
        .await
        .with_context(|| format!("the new process (pid {pid}) did not start; its log says why"))?;
    match hello {
        Message::Hello { .. } => {}
        other => return Err(other.unexpected().into()),
    }
    // From here the workers stop reading what they hand over: packets wait in the sockets'
    // queues for the new process.
    let mut fronts = Vec::new();
    for inbox in &shared.defined {
        let (tx, rx) = tokio::sync::oneshot::channel();
        inbox.send(ToWorker::HandOver(tx));
        fronts.push(rx);
    }
    let mut sockets: Vec<(Handed, OwnedFd)> = Vec::new();
    let mut pending = Vec::new();
    for rx in fronts {
        let HandedFront {
            sockets: s,
            pending: p,
        } = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .context("a worker did not hand its sockets over in 5 s")?
            .context("a worker stopped")?;
        sockets.extend(s);
        pending.extend(p);
    }
    for (what, fd) in shared.handoff().iter() {
        sockets.push((what.clone(), fd.try_clone()?));
    }
    let flows = sockets
        .iter()
        .filter(|(h, _)| matches!(h, Handed::Flow { .. }))
        .count();
    let definitions = shared
        .current
        .load()
        .dynamic
        .as_ref()
        .map(|d| d.hand_over(Instant::now()))
        .unwrap_or_default();
    let fast = shared.fastpath.is_some();
    blocking(channel, move |c| {
        send_all(c, &sockets, definitions, pending, fast)
    })
    .await?;
    match blocking(channel, |c| c.recv()).await? {
        (Message::Taken, _) => Ok(flows),
        (other, _) => Err(other.unexpected().into()),
    }
}

fn send_all(
    c: &Channel,
    sockets: &[(Handed, OwnedFd)],
    definitions: Vec<HandedDefinition>,
    pending: Vec<crate::handover::HandedPacket>,
    fast: bool,
) -> Result<(), HandoverError> {
    for chunk in sockets.chunks(FDS_PER_MESSAGE) {
        let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let list = chunk.iter().map(|(h, _)| h.clone()).collect();
        c.send(&Message::Sockets { sockets: list }, &fds)?;
    }
    let mut definitions = definitions.into_iter().peekable();
    while definitions.peek().is_some() {
        let list = definitions.by_ref().take(ENTRIES_PER_MESSAGE).collect();
        c.send(&Message::Definitions { list }, &[])?;
    }
    let mut pending = pending.into_iter().peekable();
    while pending.peek().is_some() {
        // Packets are at most 4 KiB: a message stays within its bound.
        let packets = pending.by_ref().take(ENTRIES_PER_MESSAGE / 8).collect();
        c.send(&Message::Pending { packets }, &[])?;
    }
    c.send(&Message::Done { fast }, &[])
}

/// The upgrade failed: the workers read their sockets again, guard goes back on.
fn resume(shared: &Shared) {
    for inbox in &shared.defined {
        inbox.send(ToWorker::Resume);
    }
    if let Some(fp) = &shared.fastpath {
        let mut fp = lock(fp);
        if fp.guard_attached().is_none()
            && let Some(iface) = shared.current.load().daemon.iface.clone()
            && let Err(e) = fp.attach_guard(&iface)
        {
            warn!(iface, error = %e, "upgrade failed and guard could not go back on");
        }
    }
}

async fn blocking<T: Send + 'static>(
    channel: &Arc<Channel>,
    f: impl FnOnce(&Channel) -> Result<T, HandoverError> + Send + 'static,
) -> Result<T, HandoverError> {
    let c = channel.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| HandoverError::Io(std::io::Error::other(e)))?
}

// ------------------------------------------------------------------ the new process

/// What the new process took over, sorted for the daemon's start-up to use in place of
/// binding.
#[derive(Default)]
pub(crate) struct Takeover {
    /// UDP wildcards by listener address, by worker index.
    pub wildcards: HashMap<SocketAddr, Vec<(usize, UdpSocket)>>,
    /// Flows and waiting packets by listener address and worker index.
    pub workers: HashMap<(SocketAddr, usize), Inherited>,
    pub streams: HashMap<SocketAddr, TcpListener>,
    pub coa: Option<UdpSocket>,
    pub metrics: Option<TcpListener>,
    pub control: Option<(UnixListener, PathBuf)>,
    pub definitions: Vec<HandedDefinition>,
    /// The old process steered with eBPF.
    pub fast: bool,
}

impl Takeover {
    /// The wildcards of the listener configured at `addr` (a port 0 matches its address's
    /// listener), in worker order.
    pub fn take_wildcards(&mut self, addr: SocketAddr) -> Option<(SocketAddr, Vec<UdpSocket>)> {
        let key = self.listener_key(addr, self.wildcards.keys().copied())?;
        let mut list = self.wildcards.remove(&key)?;
        list.sort_by_key(|(i, _)| *i);
        Some((key, list.into_iter().map(|(_, s)| s).collect()))
    }

    /// How many wildcards (workers) the listener configured at `addr` had.
    pub fn wildcard_count(&self, addr: SocketAddr) -> Option<usize> {
        let key = self.listener_key(addr, self.wildcards.keys().copied())?;
        self.wildcards.get(&key).map(Vec::len)
    }

    pub fn take_stream(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let key = self.listener_key(addr, self.streams.keys().copied())?;
        self.streams.remove(&key)
    }

    fn listener_key(
        &self,
        addr: SocketAddr,
        mut keys: impl Iterator<Item = SocketAddr>,
    ) -> Option<SocketAddr> {
        keys.find(|k| *k == addr || (addr.port() == 0 && k.ip() == addr.ip()))
    }

    /// The flows and packets of worker `index` of the listener bound at `listen`.
    pub fn take_worker(&mut self, listen: SocketAddr, index: usize) -> Inherited {
        self.workers.remove(&(listen, index)).unwrap_or_default()
    }
}

/// The new side of the protocol: says hello and takes everything the old process hands
/// over (blocking; at start-up, before anything is bound).
pub(crate) fn take_over(channel: &Channel) -> Result<Takeover, HandoverError> {
    channel.send(
        &Message::Hello {
            pid: std::process::id(),
        },
        &[],
    )?;
    let mut t = Takeover::default();
    loop {
        let (m, fds) = channel.recv()?;
        match m {
            Message::Sockets { sockets } => {
                for (what, fd) in sockets.into_iter().zip(fds) {
                    t.add(what, fd);
                }
            }
            Message::Definitions { list } => t.definitions.extend(list),
            Message::Pending { packets } => {
                for p in packets {
                    t.workers
                        .entry((p.listen, p.index))
                        .or_default()
                        .pending
                        .push((p.remote, p.local, p.data));
                }
            }
            Message::Done { fast } => {
                t.fast = fast;
                return Ok(t);
            }
            other => return Err(other.unexpected()),
        }
    }
}

impl Takeover {
    fn add(&mut self, what: Handed, fd: OwnedFd) {
        match what {
            Handed::Wildcard { listen, index } => self
                .wildcards
                .entry(listen)
                .or_default()
                .push((index, UdpSocket::from(fd))),
            Handed::Flow {
                listen,
                index,
                remote,
                local,
                client,
            } => self
                .workers
                .entry((listen, index))
                .or_default()
                .flows
                .push((remote, local, client, UdpSocket::from(fd))),
            Handed::StreamListener { listen } => {
                self.streams.insert(listen, TcpListener::from(fd));
            }
            Handed::Coa { .. } => self.coa = Some(UdpSocket::from(fd)),
            Handed::Metrics { .. } => self.metrics = Some(TcpListener::from(fd)),
            Handed::Control { path } => self.control = Some((UnixListener::from(fd), path)),
        }
    }
}

/// Tells the old process this one serves now (it detaches and drains), or why it cannot.
pub(crate) fn confirm(channel: Channel, outcome: Result<(), String>) {
    let m = match outcome {
        Ok(()) => Message::Taken,
        Err(why) => Message::Refused { why },
    };
    if let Err(e) = channel.send(&m, &[]) {
        warn!(error = %e, "upgrade: cannot tell the old process");
    }
    // Our end closes here; the old process needs nothing more.
}

/// The new process cannot start (its configuration does not check): the old one is told
/// why, and goes on.
pub fn refuse(channel: Channel, why: String) {
    confirm(channel, Err(why));
}
