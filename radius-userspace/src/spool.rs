//! The accounting spool on disk, and its replay: the IO around `radius_core::spool`.
//!
//! Workers append the Accounting-Requests that no server of a spooled pool answers
//! ([`Spool::append`], through the engine's `Io::spool`), each to a segment file of its
//! own, synced as `spool.fsync` says before the NAS is answered. One replay thread sends
//! them, oldest first, to an alive server of their pool, a window at a time, and marks each
//! answered one in the segment's `.done` file (how many records from its start are
//! delivered); a segment fully delivered is deleted.
//!
//! Each process holds a lock file in the directory (`<pid>.<n>.lock`, flock) and names its
//! segments after it. Segments whose owner's lock is free belong to a process that is gone
//! (killed, stopped, or the one this process upgraded, once it has exited): the replay
//! thread adopts them at start and every 2 s ([`Spool::adopt_orphans`]). So the spool
//! survives a restart and a SIGKILL (what was written is in the page cache; an fsync makes
//! it survive a power loss too), and an upgrade never replays a record twice on purpose:
//! the old process replays its own segments until it exits, the new one takes over what is
//! left.
//!
//! Delivery is at least once. A record is sent twice when its answer was lost or came
//! after its retransmission, when the process stops between a delivery and the `.done`
//! file's update, or when records after an undelivered one were delivered (the `.done`
//! file counts a prefix).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{File, OpenOptions},
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::unix::fs::FileExt as _,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::fcntl::{Flock, FlockArg};
use tracing::{error, info, warn};

use crate::{
    metrics::{Metrics, ReasonLabel},
    pool::Pool,
    upstream::{State, Upstream},
};
use radius_core::spool::{self as record, Record, ReplayWindow};

/// When the spool's writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Before the NAS is answered (each record survives a power loss once answered).
    Always,
    /// Once a second, by the replay thread.
    Interval,
    /// When the kernel writes back (a record survives the process, not the machine).
    Never,
}

/// `[spool]`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Replayed requests out at once.
    pub window: usize,
    /// A replayed request without an answer is sent again after this long.
    pub retry: Duration,
}

/// A segment file grows to this size before a new one begins.
const SEGMENT_BYTES: u64 = 4 << 20;
/// A warning when the spool passes this share of max_bytes.
const NEAR_FULL: f64 = 0.8;

/// One segment file: records `0..written`, of which `done` are delivered (and any beyond
/// that prefix in `beyond`).
struct Segment {
    path: PathBuf,
    written: u32,
    done: u32,
    beyond: BTreeSet<u32>,
    bytes: u64,
    done_file: Option<File>,
}

/// A record's place in the queue: (arrival, order of spooling).
type Key = (u64, u64);

/// A record waiting for delivery.
struct Queued {
    segment: u64,
    index: u32,
    received_ms: u64,
    pool: String,
    upstream: String,
    packet: Vec<u8>,
    /// In the replay window now.
    out: bool,
}

#[derive(Default)]
struct SpoolState {
    segments: HashMap<u64, Segment>,
    /// The segment each worker appends to, and its file.
    open: HashMap<usize, (u64, File, u64)>,
    /// Waiting records, by (arrival, order of spooling): oldest first.
    queue: BTreeMap<(u64, u64), Queued>,
    next_seq: u64,
    next_segment: u64,
    bytes: u64,
    near_full: bool,
    last_refusal_log: Option<Instant>,
}

impl SpoolState {
    /// Puts a record at the end of the queue.
    fn enqueue(&mut self, q: Queued) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.insert((q.received_ms, seq), q);
    }
}

/// The spool: shared by the workers (which append) and the replay thread.
pub struct Spool {
    settings: SpoolSettings,
    state: Mutex<SpoolState>,
    wake: Condvar,
    metrics: Arc<Metrics>,
    /// This process's name in the directory (`<pid>.<instance>`), and its lock there.
    owner: String,
    _lock: Flock<File>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Spool {
    /// Opens the spool directory and takes this process's lock in it (its segments are
    /// its own while it lives). What other processes left is adopted by the replay thread
    /// once they are gone ([`Spool::adopt_orphans`]).
    pub fn open(settings: SpoolSettings, metrics: Arc<Metrics>) -> std::io::Result<Arc<Spool>> {
        static INSTANCE: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(&settings.dir)?;
        let owner = format!(
            "{}.{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let file = File::create(settings.dir.join(format!("{owner}.lock")))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        metrics.spool_records.set(0);
        metrics.spool_bytes.set(0);
        Ok(Arc::new(Spool {
            settings,
            state: Mutex::new(SpoolState {
                next_segment: now_ms() * 1000,
                ..SpoolState::default()
            }),
            wake: Condvar::new(),
            metrics,
            owner,
            _lock: lock,
        }))
    }

    /// Adopts the segments of processes that are gone (a killed one, the one this process
    /// upgraded once it has exited): their records not yet delivered join the queue, in
    /// the order they arrived. A live process's segments are left to it.
    pub fn adopt_orphans(&self) -> std::io::Result<usize> {
        let dir = &self.settings.dir;
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        names.sort();
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut found = Vec::new();
        let mut st = self.lock();
        for path in names {
            let Some((id, owner)) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split_once('-'))
                .and_then(|(id, owner)| Some((id.parse::<u64>().ok()?, owner.to_owned())))
            else {
                continue;
            };
            if owner == self.owner || st.segments.contains_key(&id) {
                continue;
            }
            let owner_alive = *alive.entry(owner.clone()).or_insert_with(|| {
                let lock = dir.join(format!("{owner}.lock"));
                match File::open(&lock).map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock)) {
                    // Its lock is free: the process is gone (its lock file goes with it).
                    Ok(Ok(_)) => {
                        let _ = std::fs::remove_file(&lock);
                        false
                    }
                    Ok(Err(_)) => true,
                    Err(_) => false,
                }
            });
            if owner_alive {
                continue;
            }
            st.next_segment = st.next_segment.max(id + 1);
            let bytes = std::fs::read(&path)?;
            let done_path = path.with_extension("done");
            let done = std::fs::read(&done_path)
                .ok()
                .and_then(|b| b.get(..4).and_then(|b| b.try_into().ok()))
                .map_or(0, u32::from_be_bytes);
            let (mut off, mut index) = (0usize, 0u32);
            loop {
                match Record::decode(&bytes[off..]) {
                    Ok(Some((r, n))) => {
                        if index >= done {
                            found.push(Queued {
                                segment: id,
                                index,
                                received_ms: r.received_ms,
                                pool: r.pool.to_owned(),
                                upstream: r.upstream.to_owned(),
                                packet: r.packet.to_vec(),
                                out: false,
                            });
                        }
                        off += n;
                        index += 1;
                    }
                    Ok(None) => {
                        if off < bytes.len() {
                            warn!(path = %path.display(), bytes = bytes.len() - off, "spool: a torn record at the end of a segment (its process was killed while writing it) is ignored");
                        }
                        break;
                    }
                    Err(e) => {
                        error!(path = %path.display(), offset = off, error = %e, "spool: a record cannot be read; the rest of this segment is skipped");
                        self.event("corrupt");
                        break;
                    }
                }
            }
            if done >= index {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&done_path);
                continue;
            }
            st.bytes += bytes.len() as u64;
            st.segments.insert(
                id,
                Segment {
                    path: path.clone(),
                    written: index,
                    done,
                    beyond: BTreeSet::new(),
                    bytes: bytes.len() as u64,
                    done_file: None,
                },
            );
        }
        let adopted = found.len();
        for q in found {
            st.enqueue(q);
        }
        if adopted > 0 {
            info!(
                records = adopted,
                dir = %dir.display(),
                "spool: accounting left by a process that is gone (killed, restarted or upgraded), to be replayed"
            );
            self.metrics
                .spool_events
                .get_or_create(&ReasonLabel {
                    reason: "recovered",
                })
                .inc_by(adopted as u64);
        }
        self.gauges(&mut st);
        Ok(adopted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, reason: &'static str) {
        self.metrics
            .spool_events
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Writes a record for worker `worker` (see `Io::spool`); false when it cannot.
    pub fn append(
        &self,
        worker: usize,
        pool: &str,
        upstream: &str,
        packet: &[u8],
        age: Duration,
    ) -> bool {
        let received_ms = now_ms().saturating_sub(age.as_millis() as u64);
        let mut bytes = Vec::with_capacity(packet.len() + 64);
        Record {
            received_ms,
            pool,
            upstream,
            packet,
        }
        .encode(&mut bytes);
        let mut st = self.lock();
        if st.bytes + bytes.len() as u64 > self.settings.max_bytes {
            self.refused(&mut st, "the spool is full (spool.max_bytes)");
            return false;
        }
        match self.write(&mut st, worker, &bytes) {
            Ok((segment, index)) => {
                st.enqueue(Queued {
                    segment,
                    index,
                    received_ms,
                    pool: pool.to_owned(),
                    upstream: upstream.to_owned(),
                    packet: packet.to_vec(),
                    out: false,
                });
                st.bytes += bytes.len() as u64;
                self.event("written");
                self.gauges(&mut st);
                drop(st);
                self.wake.notify_one();
                true
            }
            Err(e) => {
                self.refused(&mut st, &format!("cannot write: {e}"));
                false
            }
        }
    }

    fn refused(&self, st: &mut SpoolState, why: &str) {
        self.event("refused");
        if st
            .last_refusal_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            st.last_refusal_log = Some(Instant::now());
            error!(dir = %self.settings.dir.display(), "spool: accounting not spooled, its NAS is not answered: {why}");
        }
    }

    fn write(
        &self,
        st: &mut SpoolState,
        worker: usize,
        bytes: &[u8],
    ) -> std::io::Result<(u64, u32)> {
        let full = st
            .open
            .get(&worker)
            .is_none_or(|(_, _, size)| *size >= SEGMENT_BYTES);
        if full {
            st.open.remove(&worker);
            let id = st.next_segment;
            st.next_segment += 1;
            let path = self
                .settings
                .dir
                .join(format!("{id:020}-{}.spool", self.owner));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            if self.settings.fsync == Fsync::Always {
                // The new file's name must survive too.
                File::open(&self.settings.dir)?.sync_all()?;
            }
            st.segments.insert(
                id,
                Segment {
                    path,
                    written: 0,
                    done: 0,
                    beyond: BTreeSet::new(),
                    bytes: 0,
                    done_file: None,
                },
            );
            st.open.insert(worker, (id, file, 0));
        }
        let Some((id, file, size)) = st.open.get_mut(&worker) else {
            return Err(std::io::Error::other("no open segment"));
        };
        file.write_all(bytes)?;
        if self.settings.fsync == Fsync::Always {
            file.sync_data()?;
        }
        *size += bytes.len() as u64;
        let id = *id;
        let seg = st
            .segments
            .get_mut(&id)
            .ok_or_else(|| std::io::Error::other("segment lost"))?;
        seg.written += 1;
        seg.bytes += bytes.len() as u64;
        Ok((id, seg.written - 1))
    }

    fn gauges(&self, st: &mut SpoolState) {
        self.metrics.spool_records.set(st.queue.len() as i64);
        self.metrics.spool_bytes.set(st.bytes as i64);
        let near = st.bytes as f64 >= self.settings.max_bytes as f64 * NEAR_FULL;
        if near != st.near_full {
            st.near_full = near;
            if near {
                warn!(
                    bytes = st.bytes,
                    max_bytes = self.settings.max_bytes,
                    records = st.queue.len(),
                    "spool: past 80 % of spool.max_bytes; when full, accounting is no longer answered for its servers"
                );
            } else {
                info!(
                    bytes = st.bytes,
                    "spool: back under 80 % of spool.max_bytes"
                );
            }
        }
    }

    /// Record `seq` is delivered (or given up for its age): off the queue, into its
    /// segment's `.done` count; a segment fully delivered goes.
    fn delivered(&self, st: &mut SpoolState, seq: Key) {
        let Some(q) = st.queue.remove(&seq) else {
            return;
        };
        let sync = self.settings.fsync == Fsync::Always;
        let mut gone = None;
        if let Some(seg) = st.segments.get_mut(&q.segment) {
            seg.beyond.insert(q.index);
            let before = seg.done;
            while seg.beyond.remove(&seg.done) {
                seg.done += 1;
            }
            if seg.done != before {
                let done_path = seg.path.with_extension("done");
                if seg.done_file.is_none() {
                    seg.done_file = OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&done_path)
                        .ok();
                }
                if let Some(f) = &seg.done_file {
                    let _ = f.write_all_at(&seg.done.to_be_bytes(), 0);
                    if sync {
                        let _ = f.sync_data();
                    }
                }
            }
            if seg.done >= seg.written {
                gone = Some((q.segment, seg.path.clone(), seg.bytes));
            }
        }
        if let Some((id, path, bytes)) = gone {
            // Its writer starts a new segment next time.
            st.open.retain(|_, (s, _, _)| *s != id);
            st.segments.remove(&id);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("done"));
            st.bytes = st.bytes.saturating_sub(bytes);
        }
        self.gauges(st);
    }

    /// The replay thread: until `stop`, sends the spooled records to an alive server of
    /// their pool (`pools` finds the pools in force by name) and takes their answers.
    pub fn replay(
        self: Arc<Self>,
        pools: impl Fn() -> (Vec<Arc<Pool>>, Vec<Arc<Upstream>>),
        stop: impl Fn() -> bool,
    ) {
        let socket = match UdpSocket::bind(("0.0.0.0", 0)) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "spool: no socket to replay from: the spool is not replayed");
                return;
            }
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
        let mut window: ReplayWindow<Key> =
            ReplayWindow::new(self.settings.window, self.settings.retry);
        // What each request out was: its destination and upstream (for the answer).
        let mut out: HashMap<Key, (SocketAddr, Arc<Upstream>, Vec<u8>)> = HashMap::new();
        let mut last_adopt: Option<Instant> = None;
        let mut last_sync = Instant::now();
        let mut buf = [0u8; 4096];
        let mut replayed_logged = 0u64;
        while !stop() {
            let now = Instant::now();
            // What processes that are gone left: at start, and every 2 s (the process this
            // one upgraded exits after it finished its own requests).
            if last_adopt.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(2)) {
                last_adopt = Some(now);
                if let Err(e) = self.adopt_orphans() {
                    warn!(error = %e, dir = %self.settings.dir.display(), "spool: cannot read the spool directory");
                }
            }
            // Answers first.
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                let id = buf[1];
                let (Some(sent), Some(&seq)) = (window.sent_with(id), window.key(id)) else {
                    continue;
                };
                let good = out
                    .get(&seq)
                    .is_some_and(|(_, u, _)| record::is_answer(&buf[..n], sent, &u.secret));
                if !good {
                    // Not its answer (late, or forged): it stays out.
                    continue;
                }
                window.answered(id);
                out.remove(&seq);
                let mut st = self.lock();
                self.delivered(&mut st, seq);
                self.event("replayed");
                replayed_logged += 1;
            }
            for (_, seq) in window.due(now) {
                if let Some((to, _, wire)) = out.get(&seq) {
                    let _ = socket.send_to(wire, to);
                }
            }
            let (live_pools, upstreams) = pools();
            let mut st = self.lock();
            if self.settings.fsync == Fsync::Interval
                && now.duration_since(last_sync) >= Duration::from_secs(1)
            {
                last_sync = now;
                for (_, f, _) in st.open.values() {
                    let _ = f.sync_data();
                }
            }
            // Past its age: given up, counted and logged.
            let max_age_ms = self.settings.max_age.as_millis() as u64;
            let oldest_allowed = now_ms().saturating_sub(max_age_ms);
            let expired: Vec<Key> = st
                .queue
                .iter()
                .take_while(|(_, q)| q.received_ms < oldest_allowed)
                .filter(|(_, q)| !q.out)
                .map(|(s, _)| *s)
                .collect();
            if !expired.is_empty() {
                warn!(
                    records = expired.len(),
                    "spool: accounting older than spool.max_age dropped undelivered"
                );
                for seq in expired {
                    self.delivered(&mut st, seq);
                    self.event("expired");
                }
            }
            // New sends, oldest first, while the window has room.
            let waiting: Vec<Key> = st
                .queue
                .iter()
                .filter(|(_, q)| !q.out)
                .map(|(s, _)| *s)
                .take(self.settings.window.saturating_sub(window.len()))
                .collect();
            for seq in waiting {
                let Some(q) = st.queue.get_mut(&seq) else {
                    continue;
                };
                let target = alive_server(&live_pools, &upstreams, &q.pool, &q.upstream);
                let Some(u) = target else {
                    // Its servers are down: everything after it waits too (order).
                    break;
                };
                let Some(to) = u.acct else {
                    break;
                };
                let Some(id) = window.next_id() else {
                    break;
                };
                let mut wire = vec![0u8; 4096];
                let len = q.packet.len().min(wire.len());
                wire[..len].copy_from_slice(&q.packet[..len]);
                let waited = Duration::from_millis(now_ms().saturating_sub(q.received_ms));
                match record::prepare_replay(&mut wire, len, waited, id, &u.secret) {
                    Ok((n, auth)) => {
                        wire.truncate(n);
                        let _ = socket.send_to(&wire, to);
                        window.sent(id, seq, auth, now);
                        q.out = true;
                        out.insert(seq, (to, u.clone(), wire));
                    }
                    Err(e) => {
                        warn!(error = %e, "spool: a record cannot be replayed; dropped");
                        self.delivered(&mut st, seq);
                        self.event("corrupt");
                    }
                }
            }
            // A server that went down with requests out: they go back to waiting.
            let dead: Vec<Key> = out
                .iter()
                .filter(|(_, (_, u, _))| u.health.state() != State::Alive)
                .map(|(s, _)| *s)
                .collect();
            if !dead.is_empty() {
                for seq in window.clear() {
                    out.remove(&seq);
                    if let Some(q) = st.queue.get_mut(&seq) {
                        q.out = false;
                    }
                }
            }
            if replayed_logged > 0 && st.queue.is_empty() {
                info!(records = replayed_logged, "spool: replayed, now empty");
                replayed_logged = 0;
            }
            // Nothing to send, or nothing out to wait for: sleep until a record comes.
            if st.queue.is_empty() || window.is_empty() {
                let _ = self
                    .wake
                    .wait_timeout(st, Duration::from_millis(100))
                    .map(drop);
            }
        }
    }
}

/// An alive server for a record of pool `pool` prepared for `upstream`: that upstream if
/// it is alive, else the first alive member of its pool.
fn alive_server(
    pools: &[Arc<Pool>],
    upstreams: &[Arc<Upstream>],
    pool: &str,
    upstream: &str,
) -> Option<Arc<Upstream>> {
    let alive = |u: &&Arc<Upstream>| u.health.state() == State::Alive && u.acct.is_some();
    upstreams
        .iter()
        .filter(|u| u.name == upstream)
        .find(alive)
        .or_else(|| {
            pools
                .iter()
                .find(|p| p.name == pool)
                .and_then(|p| p.members.iter().find(alive))
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use radius_core::codec::{Code, PacketMut, attr, auth::Secret};

    fn settings(dir: &std::path::Path) -> SpoolSettings {
        SpoolSettings {
            dir: dir.to_owned(),
            fsync: Fsync::Always,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
            window: 8,
            retry: Duration::from_secs(1),
        }
    }

    fn accounting(session: &str) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let mut m = PacketMut::new(&mut buf, Code::AccountingRequest, 1).unwrap();
        m.push(attr::ACCT_SESSION_ID, session.as_bytes()).unwrap();
        m.sign(&Secret::new(b"s"), None).unwrap();
        m.as_bytes().to_vec()
    }

    fn sessions(s: &Spool) -> Vec<String> {
        s.lock()
            .queue
            .values()
            .map(|q| {
                let p = radius_core::codec::Packet::parse(&q.packet).unwrap();
                String::from_utf8_lossy(p.get(attr::ACCT_SESSION_ID).unwrap().value).into_owned()
            })
            .collect()
    }

    #[test]
    fn a_live_processs_segments_are_its_own_and_adopted_once_it_is_gone() {
        let dir = std::env::temp_dir().join(format!("spool-unit-{}-a", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Spool::open(settings(&dir), Metrics::new()).unwrap();
        for (i, age) in [(0, 3), (1, 2), (2, 1)] {
            let p = accounting(&format!("s-{i}"));
            assert!(a.append(0, "pool", "up", &p, Duration::from_secs(age)));
        }
        let b = Spool::open(settings(&dir), Metrics::new()).unwrap();
        assert_eq!(b.adopt_orphans().unwrap(), 0, "its owner lives");
        drop(a);
        assert_eq!(b.adopt_orphans().unwrap(), 3, "its owner is gone");
        assert_eq!(b.adopt_orphans().unwrap(), 0, "adopted once");
        assert_eq!(sessions(&b), ["s-0", "s-1", "s-2"], "oldest first");
        // Delivered out of order: the segment goes once all are.
        let keys: Vec<Key> = b.lock().queue.keys().copied().collect();
        let files = || std::fs::read_dir(&dir).unwrap().flatten().count();
        for k in [keys[1], keys[0]] {
            let mut st = b.lock();
            b.delivered(&mut st, k);
        }
        assert_eq!(files(), 3, "its segment, its .done count and b's lock");
        let mut st = b.lock();
        b.delivered(&mut st, keys[2]);
        drop(st);
        assert_eq!(files(), 1, "only b's lock is left");
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_and_delivered_records_are_not_replayed() {
        let dir = std::env::temp_dir().join(format!("spool-unit-{}-b", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A process killed while writing its fourth record, after its first was delivered.
        let mut bytes = Vec::new();
        for i in 0..4 {
            let p = accounting(&format!("t-{i}"));
            Record {
                received_ms: 1_000 + i,
                pool: "pool",
                upstream: "up",
                packet: &p,
            }
            .encode(&mut bytes);
        }
        bytes.truncate(bytes.len() - 5);
        std::fs::write(dir.join("00000000000000000001-999.0.spool"), &bytes).unwrap();
        std::fs::write(
            dir.join("00000000000000000001-999.0.done"),
            1u32.to_be_bytes(),
        )
        .unwrap();
        let s = Spool::open(settings(&dir), Metrics::new()).unwrap();
        assert_eq!(s.adopt_orphans().unwrap(), 2);
        assert_eq!(sessions(&s), ["t-1", "t-2"]);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
