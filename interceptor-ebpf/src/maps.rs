//! Every map of the object and the read-only global `SCOPE_ID`: what the loader finds by name.
//! Names, key and value types and capacities are the pinned layout (`LAYOUT_VERSION` in
//! `interceptor-common`); pins made by an earlier build of the same layout are reused as they
//! are, so none of them changes without a version bump.
use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, BPF_F_CLONE, BPF_F_NO_PREALLOC,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuHashMap, SockHash},
};
use interceptor_common::{
    capacity, CounterKey, FwdFlow, FwdState, InboundConfig, KfwdSock, OrigDst, ScopeConfig,
    ScopeMeta, ScopedV4, ScopedV6, ScopedValue, SockKey, TupleKey,
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

// Records of redirected connections. A record lives in the socket's own storage
// (`BPF_MAP_TYPE_SK_STORAGE`): the kernel frees it with the socket, so no failing path of
// `connect()` (unreachable, no port left, a 4-tuple in use, ...) can leave one behind, and
// there is no capacity one scope could use up for another. Only the short step from the
// client's established callback to the proxy's goes through a keyed map, `ICP_HANDOFF`.
/// The client (workload) socket's record: its original destination, from `connect()` on.
#[btf_map(name = "ICP_CONN")]
pub(crate) static ICP_CONN: SkStorage<OrigDst> = SkStorage::new();
/// The proxy's accepted socket's record, moved here from `ICP_HANDOFF` when it is
/// established; `SO_ORIGINAL_DST` and `SO_ICP_WORKLOAD` are answered from it.
#[btf_map(name = "ICP_ACCEPTED")]
pub(crate) static ICP_ACCEPTED: SkStorage<OrigDst> = SkStorage::new();
/// Connection 4-tuple -> original destination, from the client's established callback to the
/// proxy's (or the client's close, if the proxy's side never completes). A plain
/// (preallocated) hash, not LRU: an LRU map may evict a live entry under churn.
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

// Kernel forwarding (see `forward.rs`).
/// Whether the proxy asked for kernel forwarding of a socket, and its cookie once it is in
/// `ICP_FWD`. Cloned into accepted sockets (`BPF_F_CLONE`), so asking on a listener asks for
/// every connection it accepts.
#[btf_map(name = "ICP_KFWD")]
pub(crate) static ICP_KFWD: SkStorage<KfwdSock, { (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize }> =
    SkStorage::new();
/// The proxy's sockets under kernel forwarding, by socket cookie; `forward_verdict` is
/// attached to this map and redirects into it. The kernel removes a socket when it closes.
#[map(name = "ICP_FWD")]
pub(crate) static ICP_FWD: SockHash<u64> = SockHash::pinned(capacity::FWD, 0);
/// Socket cookie -> pairing and counts of each socket in `ICP_FWD`; removed at its close
/// (`track_sockops`, `TCP_CLOSE`).
#[map(name = "ICP_FWD_STATE")]
pub(crate) static ICP_FWD_STATE: HashMap<u64, FwdState> = HashMap::pinned(capacity::FWD, 0);
/// Socket cookie -> `FwdFlow` (`track_sockops`): how far behind each socket of `ICP_FWD` is in
/// sending, for the verdicts; with the `ICP_FWD_STATE` entry.
#[map(name = "ICP_FWD_FLOW")]
pub(crate) static ICP_FWD_FLOW: HashMap<u64, FwdFlow> = HashMap::pinned(capacity::FWD, 0);
/// 1 once the loader has attached `forward_verdict` to `ICP_FWD` (see
/// `interceptor_common::maps::FWD_READY`); `answer_setsockopt` refuses requests until then.
#[map(name = "ICP_FWD_READY")]
pub(crate) static ICP_FWD_READY: Array<u32> = Array::pinned(1, 0);

/// A `BPF_MAP_TYPE_SK_STORAGE` map, declared with BTF (the kernel requires BTF for its key and
/// value) and pinned by name like the others. The fields are never read: the loader takes the
/// map's type, key, value, flags and pinning from their BTF types.
/// `FLAGS` are the map flags (`BPF_F_NO_PREALLOC`, which the kernel requires, by default).
#[repr(C)]
pub(crate) struct SkStorage<T, const FLAGS: usize = { BPF_F_NO_PREALLOC as usize }> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; FLAGS],
    /// `LIBBPF_PIN_BY_NAME`.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are null placeholders the loader reads as BTF; nothing dereferences them.
unsafe impl<T, const FLAGS: usize> Sync for SkStorage<T, FLAGS> {}

impl<T, const FLAGS: usize> SkStorage<T, FLAGS> {
    pub(crate) const fn new() -> Self {
        SkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The record of `sk`, created (zeroed) when `create` and it has none. Null when there is
    /// none, or it could not be created.
    ///
    /// # Safety
    /// `sk` must be a full socket the program's context gave it (checked non-null).
    #[inline(always)]
    pub(crate) unsafe fn get(&self, sk: *mut bpf_sock, create: bool) -> *mut T {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // SAFETY: per the contract above; the map pointer is this map's definition.
        unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                sk.cast(),
                core::ptr::null_mut(),
                flags,
            )
            .cast()
        }
    }

    /// Removes the record of `sk`, if it has one.
    ///
    /// # Safety
    /// As for [`SkStorage::get`].
    #[inline(always)]
    pub(crate) unsafe fn delete(&self, sk: *mut bpf_sock) {
        // SAFETY: per the contract above.
        unsafe {
            bpf_sk_storage_delete(core::ptr::from_ref(self).cast_mut().cast(), sk.cast());
        }
    }
}
