//! Every map of the object and the read-only global `SCOPE_ID`: what the loader finds by name.
//! Names, key and value types and capacities are the pinned layout (`LAYOUT_VERSION` in
//! `interceptor-common`); pins made by an earlier build of the same layout are reused as they
//! are, so none of them changes without a version bump.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuHashMap, SockHash},
};
use interceptor_common::{
    capacity, CounterKey, InboundConfig, OrigDst, ScopeConfig, ScopeMeta, ScopedV4, ScopedV6,
    ScopedValue, SockKey, TupleKey,
};

/// Which scope this instance serves (the attached cgroup's id, or the network namespace's
/// scope id); 0 in an instance loaded for the root programs only.
#[no_mangle]
static SCOPE_ID: u64 = 0;

#[inline(always)]
pub(crate) fn scope_id() -> u64 {
    // SAFETY: a plain read of a read-only global that the loader sets before loading.
    unsafe { core::ptr::read_volatile(&SCOPE_ID) }
}

/// `LAYOUT_VERSION` of the pinned maps, written by the loader.
#[map(name = "ICP_LAYOUT")]
pub(crate) static ICP_LAYOUT: Array<u32> = Array::pinned(1, 0);

// Outbound settings, per scope (cgroup id).
#[map(name = "ICP_CONFIG")]
pub(crate) static ICP_CONFIG: HashMap<u64, ScopeConfig> = HashMap::pinned(capacity::SCOPES, 0);
/// The scope's path, for `status` and for `SO_ICP_WORKLOAD`.
#[map(name = "ICP_META")]
pub(crate) static ICP_META: HashMap<u64, ScopeMeta> = HashMap::pinned(capacity::SCOPES, 0);
#[map(name = "ICP_PORTS")]
pub(crate) static ICP_PORTS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::PORTS, 0);
#[map(name = "ICP_UIDS")]
pub(crate) static ICP_UIDS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::UIDS, 0);
#[map(name = "ICP_EXCL4")]
pub(crate) static ICP_EXCL4: LpmTrie<ScopedV4, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_EXCL6")]
pub(crate) static ICP_EXCL6: LpmTrie<ScopedV6, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_INCL4")]
pub(crate) static ICP_INCL4: LpmTrie<ScopedV4, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_INCL6")]
pub(crate) static ICP_INCL6: LpmTrie<ScopedV6, u8> = LpmTrie::pinned(capacity::CIDRS, 0);

// Records of redirected connections. Plain (preallocated) hashes, not LRU: an LRU map may
// evict a live record under churn before it is full, and a connection would then reach the
// proxy without its original destination. Records are removed explicitly when the client
// socket closes.
/// Socket cookie -> original destination, from `connect()` to the established hand-off.
#[map(name = "ICP_PENDING")]
pub(crate) static ICP_PENDING: HashMap<u64, OrigDst> = HashMap::pinned(capacity::PENDING, 0);
/// Connection 4-tuple -> original destination, until the client socket closes.
#[map(name = "ICP_HANDOFF")]
pub(crate) static ICP_HANDOFF: HashMap<TupleKey, OrigDst> = HashMap::pinned(capacity::HANDOFF, 0);
/// Decision counters per scope (see `counters`).
#[map(name = "ICP_COUNTERS")]
pub(crate) static ICP_COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::pinned(capacity::COUNTERS, 0);

// Inbound, per scope (network namespace).
#[map(name = "ICP_IN_CONFIG")]
pub(crate) static ICP_IN_CONFIG: HashMap<u64, InboundConfig> = HashMap::pinned(capacity::SCOPES, 0);
#[map(name = "ICP_IN_PORTS")]
pub(crate) static ICP_IN_PORTS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::PORTS, 0);
/// The proxy's inbound listener per scope and family, put in by `interceptor register`.
#[map(name = "ICP_IN_SOCKS")]
pub(crate) static ICP_IN_SOCKS: SockHash<SockKey> = SockHash::pinned(capacity::IN_SOCKS, 0);
