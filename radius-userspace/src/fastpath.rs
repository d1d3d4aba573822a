//! The kernel fast path: one type, [`FastPath`], owns every kernel object (the loaded object,
//! its maps, the `steer` and `guard` links) and offers typed operations on them. `guard`
//! runs as XDP in the driver where the driver has it, else at TC ingress ([`GuardHook`]). Dropping it
//! detaches both programs (the links are file descriptors, so even a killed daemon leaves
//! nothing attached).
//!
//! When loading or attaching fails, [`FastPathError::unavailable_reason`] says why in one line
//! (missing privileges told apart from a verifier rejection, whose log it carries) and the
//! daemon runs the user-space path of [`crate::socket`] instead.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, RawFd},
    time::Duration,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        SockHash, SockMap, lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, SkLookup, TcAttachType, Xdp, XdpMode,
        tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use ipnet::IpNet;
use radius_common::{
    Addr, BlockedKey, Counter, FlowKey, FlowStats, GuardConfig, ServiceKey, ServiceValue, maps,
    programs,
};

/// The object built by `build.rs` from `radius-ebpf` (empty when built with the stub).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/radius"));

/// The reader of the programs' `aya-log` events, writing into the `log` facade.
pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Why the fast path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("this build embeds no eBPF object (built with RADIUS_EBPF_STUB=1)")]
    NoObject,
    #[error("loading the eBPF object failed: {source}")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("program `{program}` is missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("map `{map}` is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map `{map}` does not match its user-space type: {source}")]
    MapType {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program `{program}`: {action} failed: {source}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening this thread's network namespace failed: {source}")]
    Netns {
        #[source]
        source: io::Error,
    },
    #[error("map `{map}`: {action} failed: {source}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "a second listener for port {port} of the same family: steer serves one address per \
         (family, port); listen on the any-address instead"
    )]
    DuplicateService { port: u16 },
    #[error("map `{map}` is full ({capacity} entries)")]
    Full { map: &'static str, capacity: u32 },
    #[error("reading the CPU count failed: {source}")]
    Cpus {
        #[source]
        source: io::Error,
    },
}

impl FastPathError {
    /// The first OS error in the source chain (aya keeps EPERM/EACCES only there).
    pub fn errno(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && let Some(code) = io.raw_os_error()
            {
                return Some(code);
            }
            cur = e.source();
        }
        None
    }

    /// The verifier's log, when the kernel rejected a program.
    pub fn verifier_log(&self) -> Option<String> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(ProgramError::LoadError { verifier_log, .. }) =
                e.downcast_ref::<ProgramError>()
            {
                return Some(verifier_log.to_string());
            }
            cur = e.source();
        }
        None
    }

    /// One line for the log: why the daemon runs without the fast path.
    pub fn unavailable_reason(&self) -> String {
        match (self.errno(), self.verifier_log()) {
            (_, Some(_)) if self.errno() == Some(libc::EACCES) => {
                format!("the kernel verifier rejected a program ({self})")
            }
            (Some(libc::EPERM), _) => format!(
                "missing privileges: CAP_BPF and CAP_NET_ADMIN are needed (EPERM from {self})"
            ),
            (Some(libc::EACCES), _) => {
                format!("permission denied (EACCES): {self}")
            }
            (Some(libc::EINVAL), _) | (Some(libc::EOPNOTSUPP), _) => {
                format!("the kernel does not support what the programs need: {self}")
            }
            (Some(libc::ENODEV), _) => format!("no such network interface: {self}"),
            _ => self.to_string(),
        }
    }
}

/// Sizes and knobs chosen at load time.
#[derive(Clone, Debug)]
pub struct FastPathOptions {
    /// Capacity of `CHILDREN` and `FLOWS`: the most flows the fast path can steer.
    pub max_flows: u32,
    /// `guard`'s limit for sources without a flow (packets per second, 0 = off) and burst.
    pub rate_pps: u64,
    pub burst: u64,
}

impl Default for FastPathOptions {
    fn default() -> Self {
        Self {
            max_flows: radius_common::sizes::CHILDREN,
            rate_pps: 2_000,
            burst: 4_000,
        }
    }
}

/// Kernel counters summed over CPUs, indexed like [`Counter::ALL`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

/// Where `guard` runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardHook {
    /// XDP in the driver: before the kernel builds an skb.
    XdpDriver,
    /// TC ingress (TCX on Linux 6.6+): for drivers without native XDP, loopback included.
    TcIngress,
}

impl std::fmt::Display for GuardHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuardHook::XdpDriver => "xdp",
            GuardHook::TcIngress => "tc",
        })
    }
}

enum GuardLink {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// Owner of every kernel object of the fast path.
pub struct FastPath {
    // Field order is drop order: maps first, then the object with its links.
    children: SockHash<MapData, FlowKey>,
    listeners: SockMap<MapData>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    blocked: LpmTrie<MapData, BlockedKey, u32>,
    negative: HashMap<MapData, Addr, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// What we put in `CHILDREN`: the kernel cannot read a SOCKHASH back (ENOSPC).
    registered: HashSet<FlowKey>,
    logger: Option<EbpfLogger>,
    next_listener_slot: u32,
    max_flows: u32,
    nr_cpus: usize,
    steer_link: Option<aya::programs::sk_lookup::SkLookupLinkId>,
    guard_attached: Option<(String, GuardHook)>,
    guard_link: Option<GuardLink>,
    ebpf: Ebpf,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FastPathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(FastPathError::MissingMap { map: name })?;
    T::try_from(map).map_err(|source| FastPathError::MapType { map: name, source })
}

impl FastPath {
    /// Loads the object and both programs into the kernel, without attaching them. Map key
    /// and value sizes are checked against the user-space types here.
    pub fn load(opts: &FastPathOptions) -> Result<Self, FastPathError> {
        if OBJECT.is_empty() {
            return Err(FastPathError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::CHILDREN, opts.max_flows)
            .map_max_entries(maps::FLOWS, opts.max_flows)
            .load(OBJECT)
            .map_err(|source| FastPathError::Load { source })?;
        {
            let steer: &mut SkLookup = prog(&mut ebpf, programs::STEER)?;
            steer.load().map_err(|source| FastPathError::Program {
                program: programs::STEER,
                action: "load",
                source,
            })?;
        }
        {
            let guard: &mut Xdp = prog(&mut ebpf, programs::GUARD)?;
            guard.load().map_err(|source| FastPathError::Program {
                program: programs::GUARD,
                action: "load",
                source,
            })?;
        }
        {
            let guard: &mut SchedClassifier = prog(&mut ebpf, programs::GUARD_TC)?;
            guard.load().map_err(|source| FastPathError::Program {
                program: programs::GUARD_TC,
                action: "load",
                source,
            })?;
        }
        // After the programs are loaded: the logger takes the ring buffer map, and the
        // programs must have been relocated against it first.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                // Without log events the fast path still works.
                tracing::debug!(error = %e, "eBPF log events unavailable");
                None
            }
        };
        let mut config: Array<MapData, GuardConfig> = take(&mut ebpf, maps::GUARD_CONFIG)?;
        config
            .set(
                0,
                GuardConfig {
                    rate_pps: opts.rate_pps,
                    burst: opts.burst,
                },
                0,
            )
            .map_err(|source| FastPathError::Map {
                map: maps::GUARD_CONFIG,
                action: "set",
                source,
            })?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, source)| FastPathError::Cpus { source })?;
        Ok(Self {
            children: take(&mut ebpf, maps::CHILDREN)?,
            listeners: take(&mut ebpf, maps::LISTENERS)?,
            services: take(&mut ebpf, maps::SERVICES)?,
            flows: take(&mut ebpf, maps::FLOWS)?,
            blocked: take(&mut ebpf, maps::BLOCKED)?,
            negative: take(&mut ebpf, maps::NEGATIVE)?,
            counters: take(&mut ebpf, maps::COUNTERS)?,
            registered: HashSet::new(),
            logger,
            next_listener_slot: 0,
            max_flows: opts.max_flows,
            nr_cpus,
            steer_link: None,
            guard_attached: None,
            guard_link: None,
            ebpf,
        })
    }

    /// Attaches `steer` to the calling thread's network namespace.
    pub fn attach_steer(&mut self) -> Result<(), FastPathError> {
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|source| FastPathError::Netns { source })?;
        let steer: &mut SkLookup = prog(&mut self.ebpf, programs::STEER)?;
        let link = steer
            .attach(netns.as_fd())
            .map_err(|source| FastPathError::Program {
                program: programs::STEER,
                action: "attach to the network namespace",
                source,
            })?;
        self.steer_link = Some(link);
        Ok(())
    }

    /// Detaches `steer` now (an upgrade: the new process's steer, attached beside it,
    /// takes every packet from here on).
    pub fn detach_steer(&mut self) {
        if let (Some(link), Ok(steer)) = (
            self.steer_link.take(),
            prog::<SkLookup>(&mut self.ebpf, programs::STEER),
        ) && let Err(e) = steer.detach(link)
        {
            tracing::warn!(error = %e, "cannot detach steer");
        }
    }

    /// Detaches `guard` now, and returns the interface it was on: an interface takes one
    /// XDP program, so an upgrade's new process can attach its own only once this one is
    /// off (until then packets pass unguarded; nothing is dropped).
    pub fn detach_guard(&mut self) -> Option<String> {
        let (iface, _) = self.guard_attached.take()?;
        let detached = match self.guard_link.take() {
            Some(GuardLink::Xdp(link)) => {
                prog::<Xdp>(&mut self.ebpf, programs::GUARD).and_then(|p| {
                    p.detach(link).map_err(|source| FastPathError::Program {
                        program: programs::GUARD,
                        action: "detach",
                        source,
                    })
                })
            }
            Some(GuardLink::Tc(link)) => {
                prog::<SchedClassifier>(&mut self.ebpf, programs::GUARD_TC).and_then(|p| {
                    p.detach(link).map_err(|source| FastPathError::Program {
                        program: programs::GUARD_TC,
                        action: "detach",
                        source,
                    })
                })
            }
            None => Ok(()),
        };
        if let Err(e) = detached {
            tracing::warn!(error = %e, iface, "cannot detach guard");
        }
        Some(iface)
    }

    /// Attaches `guard` to `iface`: XDP in the driver where it has native XDP, else at TC
    /// ingress. Generic (skb) XDP is never used: it copies each packet's head to make XDP's
    /// headroom, which costs more than the checks themselves. Another XDP program on the
    /// interface (an upgrade's old process) is an error, for the caller to retry once it
    /// has left, so the new process takes the same hook as the old one.
    pub fn attach_guard(&mut self, iface: &str) -> Result<GuardHook, FastPathError> {
        match self.attach_guard_on(iface, GuardHook::XdpDriver) {
            Ok(hook) => Ok(hook),
            Err(e) if matches!(e.errno(), Some(libc::EBUSY | libc::EEXIST)) => Err(e),
            Err(native) => {
                tracing::debug!(iface, error = %native, "no native XDP; guard goes on TC ingress");
                self.attach_guard_on(iface, GuardHook::TcIngress)
            }
        }
    }

    /// Attaches `guard` to `iface` on the given hook (tests run both).
    pub fn attach_guard_on(
        &mut self,
        iface: &str,
        hook: GuardHook,
    ) -> Result<GuardHook, FastPathError> {
        let link = match hook {
            GuardHook::XdpDriver => {
                let guard: &mut Xdp = prog(&mut self.ebpf, programs::GUARD)?;
                let link = guard.attach(iface, XdpMode::Driver).map_err(|source| {
                    FastPathError::Program {
                        program: programs::GUARD,
                        action: "attach to the interface",
                        source,
                    }
                })?;
                GuardLink::Xdp(link)
            }
            GuardHook::TcIngress => {
                let guard: &mut SchedClassifier = prog(&mut self.ebpf, programs::GUARD_TC)?;
                // TCX (Linux 6.6+) needs no qdisc; older kernels attach through clsact.
                use aya::util::KernelVersion;
                let tcx = KernelVersion::current()
                    .is_ok_and(|v| v.code() >= KernelVersion::new(6, 6, 0).code());
                if !tcx {
                    let _ = aya::programs::tc::qdisc_add_clsact(iface);
                }
                let link = guard
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(|source| FastPathError::Program {
                        program: programs::GUARD_TC,
                        action: "attach to the interface's TC ingress",
                        source,
                    })?;
                GuardLink::Tc(link)
            }
        };
        self.guard_attached = Some((iface.to_owned(), hook));
        self.guard_link = Some(link);
        Ok(hook)
    }

    /// The reader of the programs' log events, for the daemon to poll (its fd turns
    /// readable) and `flush()` into `tracing`.
    pub fn take_logger(&mut self) -> Option<EbpfLogger> {
        self.logger.take()
    }

    pub fn steer_attached(&self) -> bool {
        self.steer_link.is_some()
    }

    pub fn guard_attached(&self) -> Option<&(String, GuardHook)> {
        self.guard_attached.as_ref()
    }

    /// Declares a service (proto, port) and its wildcard sockets, one per worker. `steer`
    /// hands every new flow of that port to one of them, the same one for a flow's life.
    pub fn add_service<S: AsRawFd>(
        &mut self,
        proto: u8,
        addr: std::net::SocketAddr,
        wildcards: &[S],
    ) -> Result<(), FastPathError> {
        let key = ServiceKey {
            port: addr.port(),
            proto,
            family: if addr.is_ipv4() {
                radius_common::AF_INET
            } else {
                radius_common::AF_INET6
            },
        };
        if self.services.get(&key, 0).is_ok() {
            return Err(FastPathError::DuplicateService { port: key.port });
        }
        let first = self.next_listener_slot;
        for (i, s) in wildcards.iter().enumerate() {
            self.listeners
                .set(first + i as u32, s, 0)
                .map_err(|source| FastPathError::Map {
                    map: maps::LISTENERS,
                    action: "set",
                    source,
                })?;
        }
        self.next_listener_slot += wildcards.len() as u32;
        let value = ServiceValue {
            first_listener: first,
            listeners: wildcards.len() as u32,
        };
        self.services
            .insert(key, value, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::SERVICES,
                action: "insert",
                source,
            })
    }

    /// Hands every later packet of `key` to `child` (an unconnected UDP socket) and starts
    /// counting the flow in `guard`.
    pub fn register_child(&mut self, key: &FlowKey, child: RawFd) -> Result<(), FastPathError> {
        if !self.registered.contains(key) && self.registered.len() >= self.max_flows as usize {
            return Err(FastPathError::Full {
                map: maps::CHILDREN,
                capacity: self.max_flows,
            });
        }
        let zero =
            PerCpuValues::try_from(vec![FlowStats::default(); self.nr_cpus]).map_err(|e| {
                FastPathError::Cpus {
                    source: io::Error::other(e.to_string()),
                }
            })?;
        self.flows
            .insert(key, zero, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::FLOWS,
                action: "insert",
                source,
            })?;
        self.children
            .insert(key, child, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::CHILDREN,
                action: "insert",
                source,
            })?;
        self.registered.insert(*key);
        Ok(())
    }

    /// Forgets a flow. Closing its child socket removes it from `CHILDREN` by itself; this
    /// also drops its counters and covers a child that stays open.
    pub fn unregister_child(&mut self, key: &FlowKey) {
        if self.registered.remove(key) {
            // ENOENT when the socket was closed first: expected.
            let _ = self.children.remove(key);
        }
        let _ = self.flows.remove(key);
    }

    pub fn registered_children(&self) -> usize {
        self.registered.len()
    }

    /// Packets and bytes `guard` saw for a flow, summed over CPUs.
    pub fn flow_stats(&self, key: &FlowKey) -> Option<FlowStats> {
        let per_cpu = self.flows.get(key, 0).ok()?;
        Some(per_cpu.iter().fold(FlowStats::default(), |a, s| FlowStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
        }))
    }

    /// Drops every packet from `prefix` in `guard`.
    pub fn block(&mut self, prefix: IpNet) -> Result<(), FastPathError> {
        let key = lpm_key(prefix);
        self.blocked
            .insert(&key, 1, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::BLOCKED,
                action: "insert",
                source,
            })
    }

    pub fn unblock(&mut self, prefix: IpNet) -> Result<(), FastPathError> {
        self.blocked
            .remove(&lpm_key(prefix))
            .map_err(|source| FastPathError::Map {
                map: maps::BLOCKED,
                action: "remove",
                source,
            })
    }

    /// Drops packets from `source` in `guard` for `ttl` (a refused unknown NAS).
    pub fn add_negative(&mut self, source: IpAddr, ttl: Duration) -> Result<(), FastPathError> {
        let until = monotonic_ns().saturating_add(ttl.as_nanos() as u64);
        self.negative
            .insert(addr(source), until, 0)
            .map_err(|source| FastPathError::Map {
                map: maps::NEGATIVE,
                action: "insert",
                source,
            })
    }

    pub fn remove_negative(&mut self, source: IpAddr) {
        let _ = self.negative.remove(&addr(source));
    }

    /// Whether `source` has a negative entry that has not expired.
    pub fn is_negative(&self, source: IpAddr) -> bool {
        self.negative
            .get(&addr(source), 0)
            .is_ok_and(|until| until > monotonic_ns())
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, FastPathError> {
        let mut out = Counters::default();
        for c in Counter::ALL {
            let per_cpu =
                self.counters
                    .get(&(c as u32), 0)
                    .map_err(|source| FastPathError::Map {
                        map: maps::COUNTERS,
                        action: "read",
                        source,
                    })?;
            out.0[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Detaches both programs now (dropping does the same).
    pub fn detach(self) {
        drop(self);
    }
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, FastPathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(FastPathError::MissingProgram { program: name })?;
    p.try_into().map_err(|source| FastPathError::Program {
        program: name,
        action: "type check",
        source,
    })
}

/// 16-byte form of an address: IPv4 as `::ffff:a.b.c.d`.
pub fn addr(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    words(v6)
}

fn words(v6: Ipv6Addr) -> Addr {
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The LPM key of a prefix; IPv4 prefixes live at /96 + len in the mapped space.
pub fn lpm_key(prefix: IpNet) -> Key<BlockedKey> {
    let prefix = prefix.trunc();
    let len = match prefix {
        IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    Key::new(len, addr(prefix.addr()))
}

/// The clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_addresses_are_mapped_into_ipv6() {
        let a = addr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        let bytes: Vec<u8> = a.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&bytes[12..], &[192, 0, 2, 7]);
    }

    #[test]
    fn ipv4_prefixes_live_past_the_mapped_prefix() {
        let k = lpm_key("192.0.2.77/24".parse().unwrap());
        let len = k.prefix_len();
        assert_eq!(len, 120);
        assert_eq!(k.data(), addr("192.0.2.0".parse().unwrap()));
        let k6 = lpm_key("2001:db8::1/48".parse().unwrap());
        assert_eq!(k6.prefix_len(), 48);
    }
}
