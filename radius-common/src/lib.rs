//! Plain types shared by the eBPF programs (`radius-ebpf`) and user space (`radius-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, free of `bool` and of implicit padding,
//! so both sides agree on its bytes; `layout_tests` pins the sizes. Map names are constants
//! used by both sides. Addresses are always 16 bytes: IPv4 travels as `::ffff:a.b.c.d`, so
//! one key type serves both families. An [`Addr`] holds the address bytes in network order
//! (each `u32` is loaded from memory as is, exactly as the kernel hands them over).
#![no_std]

/// An IPv6 address, or an IPv4 address mapped into `::ffff:0:0/96`, as four words whose
/// in-memory bytes are the address bytes (network order).
pub type Addr = [u32; 4];

/// IP protocol numbers, as stored in [`FlowKey::proto`] and [`ServiceKey::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The smallest and largest RADIUS packets (RFC 2865 section 3, RFC 7930 aside).
pub const RADIUS_MIN_LEN: u16 = 20;
pub const RADIUS_MAX_LEN: u16 = 4096;

/// The 5-tuple of a flow as the server sees it: `remote` is the NAS (or its NAT), `local`
/// the address and port the NAS sent to. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub remote: Addr,
    pub local: Addr,
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Which ports the programs serve: key of [`SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// Host order.
    pub port: u16,
    pub proto: u8,
    /// `AF_INET` (2) or `AF_INET6` (10): a wildcard only takes its own family.
    pub family: u8,
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Where the wildcard sockets of a service sit in [`LISTENERS`]: slots
/// `first_listener .. first_listener + listeners`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub first_listener: u32,
    pub listeners: u32,
}

/// Per-flow counters kept by `guard` in [`FLOWS`] (per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Token bucket of one source that has no flow yet: value of [`RATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucket {
    pub tokens: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last refill.
    pub last_ns: u64,
}

/// `guard`'s settings: the single entry of [`GUARD_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GuardConfig {
    /// Packets per second allowed per source that has no flow yet; 0 disables the limit.
    pub rate_pps: u64,
    /// Bucket depth: the burst a new source may send at once.
    pub burst: u64,
}

/// Key data of [`BLOCKED`] (an LPM trie): prefix length counts from the first address bit,
/// so an IPv4 /24 is stored as /120 of its mapped address.
pub type BlockedKey = Addr;

/// Map names, used by the programs (as the static's name) and by the loader.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const CHILDREN: &str = "CHILDREN";
    pub const LISTENERS: &str = "LISTENERS";
    pub const FLOWS: &str = "FLOWS";
    pub const BLOCKED: &str = "BLOCKED";
    pub const NEGATIVE: &str = "NEGATIVE";
    pub const RATE: &str = "RATE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const GUARD_CONFIG: &str = "GUARD_CONFIG";
}

/// Program names in the object.
pub mod programs {
    pub const STEER: &str = "steer";
    pub const GUARD: &str = "guard";
    /// `guard` for TC ingress, where the driver has no native XDP.
    pub const GUARD_TC: &str = "guard_tc";
}

/// Default map sizes; user space may override them at load time.
pub mod sizes {
    pub const SERVICES: u32 = 64;
    pub const CHILDREN: u32 = 65_536;
    pub const LISTENERS: u32 = 1_024;
    pub const BLOCKED: u32 = 16_384;
    pub const NEGATIVE: u32 = 65_536;
    pub const RATE: u32 = 65_536;
}

/// Indices into the per-CPU [`COUNTERS`] array. Every drop in `guard` has its own.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// steer: assigned to the flow's child socket.
    SteerChild = 0,
    /// steer: assigned to a wildcard socket (new flow).
    SteerListener = 1,
    /// steer: a service port with no wildcard registered; left to the normal lookup.
    SteerNoListener = 2,
    /// steer: `bpf_sk_assign` failed; left to the normal lookup.
    SteerAssignError = 3,
    /// guard: passed, belongs to a known flow.
    GuardPassFlow = 4,
    /// guard: passed, new source within its rate.
    GuardPassNew = 5,
    /// guard: passed without a look, IPv6 with extension headers (walking them is not worth
    /// the risk; MLD reports land here too).
    GuardPassUnparsed = 6,
    /// guard: UDP payload shorter than a RADIUS header.
    DropRunt = 7,
    /// guard: RADIUS length field < 20, > 4096 or past the payload.
    DropBadLength = 8,
    /// guard: source in BLOCKED.
    DropBlocked = 9,
    /// guard: source in NEGATIVE and not yet expired.
    DropNegative = 10,
    /// guard: source without a flow over its token bucket.
    DropRateLimited = 11,
    /// guard: UDP length field larger than what arrived.
    DropTruncated = 12,
    /// guard: passed without a look, an IPv4 fragment (the stack reassembles it).
    GuardPassFragment = 13,
}

impl Counter {
    pub const COUNT: u32 = 14;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::SteerChild,
        Counter::SteerListener,
        Counter::SteerNoListener,
        Counter::SteerAssignError,
        Counter::GuardPassFlow,
        Counter::GuardPassNew,
        Counter::GuardPassUnparsed,
        Counter::DropRunt,
        Counter::DropBadLength,
        Counter::DropBlocked,
        Counter::DropNegative,
        Counter::DropRateLimited,
        Counter::DropTruncated,
        Counter::GuardPassFragment,
    ];

    /// A stable name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SteerChild => "steer_child",
            Counter::SteerListener => "steer_listener",
            Counter::SteerNoListener => "steer_no_listener",
            Counter::SteerAssignError => "steer_assign_error",
            Counter::GuardPassFlow => "guard_pass_flow",
            Counter::GuardPassNew => "guard_pass_new",
            Counter::GuardPassUnparsed => "guard_pass_unparsed",
            Counter::DropRunt => "drop_runt",
            Counter::DropBadLength => "drop_bad_length",
            Counter::DropBlocked => "drop_blocked",
            Counter::DropNegative => "drop_negative",
            Counter::DropRateLimited => "drop_rate_limited",
            Counter::DropTruncated => "drop_truncated",
            Counter::GuardPassFragment => "guard_pass_fragment",
        }
    }
}

/// A cheap, deterministic mix of a flow key, used by `steer` to pick one wildcard per flow
/// (so a flow always lands on one worker) and by tests to predict it.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        h = mix(h, key.remote[i]);
        h = mix(h, key.local[i]);
        i += 1;
    }
    h = mix(h, ((key.remote_port as u32) << 16) | key.local_port as u32);
    mix(h, key.proto as u32)
}

#[inline(always)]
const fn mix(h: u32, v: u32) -> u32 {
    let x = (h ^ v).wrapping_mul(0x85eb_ca6b);
    x ^ (x >> 13)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding (see layout_tests).
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for GuardConfig {}
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn map_types_have_the_sizes_the_kernel_side_assumes() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(align_of::<FlowKey>(), 4);
        assert_eq!(core::mem::offset_of!(FlowKey, remote_port), 32);
        assert_eq!(core::mem::offset_of!(FlowKey, proto), 36);
        assert_eq!(size_of::<ServiceKey>(), 4);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<FlowStats>(), 16);
        assert_eq!(size_of::<TokenBucket>(), 16);
        assert_eq!(size_of::<GuardConfig>(), 16);
    }

    #[test]
    fn counter_indices_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey {
            remote: [1, 2, 3, 4],
            local: [5, 6, 7, 8],
            remote_port: 1000,
            local_port: 1812,
            proto: PROTO_UDP,
            _pad: [0; 3],
        };
        let h = flow_hash(&base);
        let mut k = base;
        k.remote_port = 1001;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.remote[3] = 9;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.local[0] = 9;
        assert_ne!(flow_hash(&k), h);
    }
}
