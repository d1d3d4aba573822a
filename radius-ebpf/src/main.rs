//! radius-sidecar's kernel programs. They hold no policy: user space fills the maps, the
//! programs apply them.
//!
//! - `steer` (SK_LOOKUP, on the network namespace): a packet to a service port goes to its
//!   flow's child socket when the 5-tuple is in `CHILDREN`, else to one wildcard socket of the
//!   service from `LISTENERS`, picked by a flow hash so a flow stays on one worker.
//! - `guard` (XDP, on the NIC): for UDP to a service port, drops junk (runts, lying RADIUS
//!   length), blocked and refused sources, and floods of sources that have no flow yet;
//!   counts every verdict per CPU and every known flow's packets and bytes.
//! - `guard_tc` (TC ingress): the same checks on an skb, for interfaces whose driver has no
//!   native XDP (loopback among them). Generic XDP would do them too, but it reallocates
//!   every packet's head to give XDP its 256 bytes of headroom; TC reads the skb in place.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_sk_lookup, sk_action, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, sk_lookup, xdp},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash, SockMap,
        lpm_trie::Key,
    },
    programs::{SkLookupContext, TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use radius_common::{
    AF_INET, AF_INET6, Addr, BlockedKey, Counter, FlowKey, FlowStats, GuardConfig, PROTO_UDP,
    RADIUS_MAX_LEN, RADIUS_MIN_LEN, ServiceKey, ServiceValue, TokenBucket, flow_hash, sizes,
};

// The key layout both sides rely on (radius-common's layout tests check the user side).
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<ServiceKey>() == 4);

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(sizes::SERVICES, 0);
#[map]
static CHILDREN: SockHash<FlowKey> = SockHash::with_max_entries(sizes::CHILDREN, 0);
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(sizes::LISTENERS, 0);
#[map]
static FLOWS: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(sizes::CHILDREN, 0);
#[map]
static BLOCKED: LpmTrie<BlockedKey, u32> = LpmTrie::with_max_entries(sizes::BLOCKED, 0);
/// Refused sources and the CLOCK_MONOTONIC nanosecond at which the refusal ends.
#[map]
static NEGATIVE: LruHashMap<Addr, u64> = LruHashMap::with_max_entries(sizes::NEGATIVE, 0);
#[map]
static RATE: LruHashMap<Addr, TokenBucket> = LruHashMap::with_max_entries(sizes::RATE, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

/// `::ffff:a.b.c.d` for an IPv4 address given as a network-order word.
#[inline(always)]
fn mapped4(ip: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip]
}

// ---------------------------------------------------------------------------------------
// steer
// ---------------------------------------------------------------------------------------

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    try_steer(&ctx);
    // Never refuse: a miss falls through to the kernel's own lookup.
    sk_action::SK_PASS
}

#[inline(always)]
fn try_steer(ctx: &SkLookupContext) {
    // Every ctx field is read once, at its constant offset, before any branch: the verifier
    // rejects a load from a ctx pointer that LLVM computed from a branch (v4 vs v6 merge).
    let l = ctx.lookup;
    // SAFETY: the kernel hands a valid bpf_sk_lookup; volatile keeps each load separate.
    let (family, protocol, r4, r6, rport, l4, l6, lport) = unsafe {
        (
            core::ptr::read_volatile(&(*l).family),
            core::ptr::read_volatile(&(*l).protocol),
            core::ptr::read_volatile(&(*l).remote_ip4),
            read_ip6(l, true),
            core::ptr::read_volatile(&(*l).remote_port),
            core::ptr::read_volatile(&(*l).local_ip4),
            read_ip6(l, false),
            core::ptr::read_volatile(&(*l).local_port),
        )
    };
    let proto = protocol as u8;
    let local_port = lport as u16;
    let service = ServiceKey {
        port: local_port,
        proto,
        family: family as u8,
    };
    // SAFETY: plain value read from a hash map.
    let Some(svc) = (unsafe { SERVICES.get(&service) }).copied() else {
        return; // not our port: untouched
    };
    let (remote, local) = if family == 2 {
        (mapped4(r4), mapped4(l4))
    } else {
        (r6, l6)
    };
    let key = FlowKey {
        remote,
        local,
        remote_port: u16::from_be(rport),
        local_port,
        proto,
        _pad: [0; 3],
    };
    // BPF_SK_LOOKUP_F_NO_REUSEPORT: the socket chosen here is final; without it the kernel
    // re-runs reuseport selection and can hand the packet to another member of the group.
    // BPF_SK_LOOKUP_F_REPLACE: during an upgrade the old process's steer runs first; the
    // newest program's choice wins (both choose among the same handed-over sockets).
    const FLAGS: u64 = 2 | 1;
    match CHILDREN.redirect_sk_lookup(ctx, key, FLAGS) {
        Ok(()) => return count(Counter::SteerChild),
        Err(e) if e != -2 => {
            // Not ENOENT: a socket is there but cannot take the packet (e.g. closing).
            debug!(ctx, "steer: child assign failed: {}", e);
            count(Counter::SteerAssignError);
            return;
        }
        Err(_) => {}
    }
    if svc.listeners == 0 {
        return count(Counter::SteerNoListener);
    }
    let slot = svc.first_listener + flow_hash(&key) % svc.listeners;
    match LISTENERS.redirect_sk_lookup(ctx, slot, FLAGS) {
        Ok(()) => count(Counter::SteerListener),
        Err(-2) => count(Counter::SteerNoListener),
        Err(_) => count(Counter::SteerAssignError),
    }
}

/// Reads `remote_ip6` or `local_ip6` word by word at constant offsets.
#[inline(always)]
unsafe fn read_ip6(l: *mut bpf_sk_lookup, remote: bool) -> Addr {
    // SAFETY: see try_steer.
    unsafe {
        if remote {
            [
                core::ptr::read_volatile(&(*l).remote_ip6[0]),
                core::ptr::read_volatile(&(*l).remote_ip6[1]),
                core::ptr::read_volatile(&(*l).remote_ip6[2]),
                core::ptr::read_volatile(&(*l).remote_ip6[3]),
            ]
        } else {
            [
                core::ptr::read_volatile(&(*l).local_ip6[0]),
                core::ptr::read_volatile(&(*l).local_ip6[1]),
                core::ptr::read_volatile(&(*l).local_ip6[2]),
                core::ptr::read_volatile(&(*l).local_ip6[3]),
            ]
        }
    }
}

// ---------------------------------------------------------------------------------------
// guard
// ---------------------------------------------------------------------------------------

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const UDP_HLEN: usize = 8;

/// What guard reads of a packet: the linear bytes in `[start, end)` and the whole length.
trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The packet's length, with what an skb holds outside its linear area.
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// What guard decides; each hook says it in its own return codes.
#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Drop,
}

#[xdp]
pub fn guard(ctx: XdpContext) -> u32 {
    match try_guard(&ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// The headers guard reads: Ethernet, the longest IPv4 header, UDP, RADIUS's first 4 bytes.
const HEADERS_LEN: usize = ETH_HLEN + 60 + UDP_HLEN + 4;

#[classifier]
pub fn guard_tc(ctx: TcContext) -> i32 {
    // An skb may hold its headers outside the linear area (GRO, some drivers): pull them
    // in when they are, so guard judges what it can read. Loopback's are always linear.
    let linear = ctx.data_end() - ctx.data();
    let whole = TcContext::len(&ctx) as usize;
    if linear < HEADERS_LEN && whole > linear {
        let _ = ctx.pull_data(whole.min(HEADERS_LEN) as u32);
    }
    match try_guard(&ctx) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// A pointer to `T` at `off`, or `None` when it would pass the end of the linear bytes.
#[inline(always)]
fn ptr_at<T>(ctx: &impl Frame, off: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn try_guard<F: Frame>(ctx: &F) -> Verdict {
    let pass = Verdict::Pass;
    let drop = Verdict::Drop;
    let Some(eth_type) = ptr_at::<[u8; 2]>(ctx, 12) else {
        return pass;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth_type = u16::from_be_bytes(unsafe { *eth_type });
    let (family, src, dst, udp_off) = match eth_type {
        ETH_P_IP => {
            let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
                return pass;
            };
            // SAFETY: bounds checked.
            let ip = unsafe { &*ip };
            if ip[9] != PROTO_UDP {
                return pass;
            }
            // Fragments other than the first carry no UDP header; the first one does, but
            // its payload is incomplete: leave both to the stack (which reassembles).
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                count(Counter::GuardPassFragment);
                return pass;
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return pass;
            }
            let s = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
            let d = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
            (AF_INET, mapped4(s), mapped4(d), ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<[u32; 10]>(ctx, ETH_HLEN) else {
                return pass;
            };
            // SAFETY: bounds checked.
            let ip = unsafe { &*ip };
            let next_header = ip[1].to_ne_bytes()[2];
            if next_header != PROTO_UDP {
                // Extension headers (hop-by-hop, routing, fragment, destination options)
                // are passed, never dropped: walking them is not worth the risk.
                if matches!(next_header, 0 | 43 | 44 | 60) {
                    count(Counter::GuardPassUnparsed);
                }
                return pass;
            }
            (
                AF_INET6,
                [ip[2], ip[3], ip[4], ip[5]],
                [ip[6], ip[7], ip[8], ip[9]],
                ETH_HLEN + 40,
            )
        }
        _ => return pass,
    };
    // Variable IHL: bound the offset so the verifier sees a finite range.
    if udp_off > ETH_HLEN + 60 {
        return pass;
    }
    let Some(udp) = ptr_at::<[u8; UDP_HLEN]>(ctx, udp_off) else {
        return pass;
    };
    // SAFETY: bounds checked.
    let udp = unsafe { *udp };
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    let service = ServiceKey {
        port: dport,
        proto: PROTO_UDP,
        family,
    };
    // SAFETY: plain value read.
    if unsafe { SERVICES.get(&service) }.is_none() {
        return pass; // not ours: no look at all
    }

    // No log event per drop: a flood would fill the ring buffer; the counters tell.
    if BLOCKED.get(Key::new(128, src)).is_some() {
        count(Counter::DropBlocked);
        return drop;
    }
    // SAFETY: plain value read.
    if let Some(&until) = unsafe { NEGATIVE.get(&src) } {
        // SAFETY: helper without arguments.
        if unsafe { bpf_ktime_get_ns() } < until {
            count(Counter::DropNegative);
            return drop;
        }
        // Expired: forget it so the source is asked about again.
        let _ = NEGATIVE.remove(&src);
    }

    // Length checks. The UDP length field is what the sender claims; trailing bytes past it
    // (Ethernet padding) are not payload.
    let arrived = ctx.len();
    if udp_len < UDP_HLEN || udp_off + udp_len > arrived {
        count(Counter::DropTruncated);
        return drop;
    }
    let payload = udp_len - UDP_HLEN;
    if payload < RADIUS_MIN_LEN as usize {
        count(Counter::DropRunt);
        return drop;
    }
    let Some(hdr) = ptr_at::<[u8; 4]>(ctx, udp_off + UDP_HLEN) else {
        count(Counter::DropRunt);
        return drop;
    };
    // SAFETY: bounds checked.
    let hdr = unsafe { *hdr };
    let radius_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    if radius_len < RADIUS_MIN_LEN || radius_len > RADIUS_MAX_LEN || radius_len as usize > payload {
        count(Counter::DropBadLength);
        return drop;
    }

    let key = FlowKey {
        remote: src,
        local: dst,
        remote_port: sport,
        local_port: dport,
        proto: PROTO_UDP,
        _pad: [0; 3],
    };
    if let Some(stats) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += payload as u64;
        }
        count(Counter::GuardPassFlow);
        return pass;
    }
    if rate_limited(&src) {
        count(Counter::DropRateLimited);
        return drop;
    }
    count(Counter::GuardPassNew);
    pass
}

/// Token bucket per source that has no flow yet. Refills at `rate_pps`, holds `burst`.
#[inline(always)]
fn rate_limited(src: &Addr) -> bool {
    let Some(cfg) = GUARD_CONFIG.get(0) else {
        return false;
    };
    let (rate, burst) = (cfg.rate_pps, cfg.burst);
    if rate == 0 {
        return false;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(b) = RATE.get_ptr_mut(src) else {
        let fresh = TokenBucket {
            tokens: burst.saturating_sub(1),
            last_ns: now,
        };
        let _ = RATE.insert(src, &fresh, 0);
        return burst == 0;
    };
    // SAFETY: map value; a racing CPU may lose an update, which only loosens the limit a
    // little.
    let b = unsafe { &mut *b };
    // Cap the idle time so the product below cannot overflow.
    let elapsed = now.saturating_sub(b.last_ns).min(10_000_000_000);
    let add = elapsed * rate / 1_000_000_000;
    if add > 0 {
        let tokens = b.tokens + add;
        if tokens >= burst {
            b.tokens = burst;
            b.last_ns = now;
        } else {
            b.tokens = tokens;
            b.last_ns += add * 1_000_000_000 / rate;
        }
    }
    if b.tokens == 0 {
        return true;
    }
    b.tokens -= 1;
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
