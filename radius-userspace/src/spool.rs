//! The accounting spool on disk, and its replay: the IO around `radius_core::spool`.
//!
//! Workers append the Accounting-Requests that no server of a spooled pool answers
//! ([`Spool::append`], through the engine's `Io::spool`), each to a segment file of its
//! own, synced as `spool.fsync` says before the NAS is answered. One replay thread sends
//! them, oldest first, to an alive server of their pool, a window at a time, and marks each
//! answered one in the segment's `.done` file (how many records from its start are
//! delivered); a segment fully delivered is deleted. At start the files are read again, so
//! the spool survives a restart and a SIGKILL (what was written is in the page cache; an
//! fsync makes it survive a power loss too).
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
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

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
    /// Waiting records, oldest first.
    queue: BTreeMap<u64, Queued>,
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
        self.queue.insert(seq, q);
    }
}

/// The spool: shared by the workers (which append) and the replay thread.
pub struct Spool {
    settings: SpoolSettings,
    state: Mutex<SpoolState>,
    wake: Condvar,
    metrics: Arc<Metrics>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Spool {
    /// Opens the spool directory and reads what a previous process left in it.
    pub fn open(settings: SpoolSettings, metrics: Arc<Metrics>) -> std::io::Result<Arc<Spool>> {
        std::fs::create_dir_all(&settings.dir)?;
        let mut st = SpoolState {
            next_segment: now_ms() * 1000,
            ..SpoolState::default()
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(&settings.dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        names.sort();
        let mut found = Vec::new();
        for path in names {
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
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
                            found.push((
                                r.received_ms,
                                id,
                                index,
                                r.pool.to_owned(),
                                r.upstream.to_owned(),
                                r.packet.to_vec(),
                            ));
                        }
                        off += n;
                        index += 1;
                    }
                    Ok(None) => {
                        if off < bytes.len() {
                            warn!(path = %path.display(), bytes = bytes.len() - off, "spool: a torn record at the end of a segment (the process was killed while writing it) is ignored");
                        }
                        break;
                    }
                    Err(e) => {
                        error!(path = %path.display(), offset = off, error = %e, "spool: a record cannot be read; the rest of this segment is skipped");
                        metrics
                            .spool_events
                            .get_or_create(&ReasonLabel { reason: "corrupt" })
                            .inc();
                        break;
                    }
                }
            }
            let seg = Segment {
                path: path.clone(),
                written: index,
                done: done.min(index),
                beyond: BTreeSet::new(),
                bytes: bytes.len() as u64,
                done_file: None,
            };
            if seg.done >= seg.written {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&done_path);
                continue;
            }
            st.bytes += seg.bytes;
            st.segments.insert(id, seg);
        }
        // Oldest first, whichever worker wrote them.
        found.sort_by_key(|f| (f.0, f.1, f.2));
        let recovered = found.len();
        for (received_ms, segment, index, pool, upstream, packet) in found {
            st.enqueue(Queued {
                segment,
                index,
                received_ms,
                pool,
                upstream,
                packet,
                out: false,
            });
        }
        if recovered > 0 {
            info!(
                records = recovered,
                dir = %settings.dir.display(),
                "spool: accounting left by the previous process, to be replayed"
            );
            metrics
                .spool_events
                .get_or_create(&ReasonLabel {
                    reason: "recovered",
                })
                .inc_by(recovered as u64);
        }
        metrics.spool_records.set(st.queue.len() as i64);
        metrics.spool_bytes.set(st.bytes as i64);
        Ok(Arc::new(Spool {
            settings,
            state: Mutex::new(st),
            wake: Condvar::new(),
            metrics,
        }))
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
            let path = self.settings.dir.join(format!("{id:020}.spool"));
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
    fn delivered(&self, st: &mut SpoolState, seq: u64) {
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
        let mut window: ReplayWindow<u64> =
            ReplayWindow::new(self.settings.window, self.settings.retry);
        // What each request out was: its destination and upstream (for the answer).
        let mut out: HashMap<u64, (SocketAddr, Arc<Upstream>, Vec<u8>)> = HashMap::new();
        let mut last_sync = Instant::now();
        let mut buf = [0u8; 4096];
        let mut replayed_logged = 0u64;
        while !stop() {
            let now = Instant::now();
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
            let expired: Vec<u64> = st
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
            let waiting: Vec<u64> = st
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
            let dead: Vec<u64> = out
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
            let idle = st.queue.is_empty() || (window.is_empty() && !st.queue.is_empty());
            if idle {
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
