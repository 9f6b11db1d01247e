//! Kernel programs of the interceptor. One object, two kinds of instance:
//!
//! * Per scope (a workload cgroup): `redirect_connect4` / `redirect_connect6`, loaded with the
//!   read-only global `SCOPE_ID` set to the cgroup's id. They decide, per `connect()`, whether
//!   to redirect the socket to the proxy's outbound listener, and record the original
//!   destination under the socket's cookie.
//! * Once, at the cgroup2 root: `track_sockops` moves a record from the cookie to the
//!   connection's 4-tuple when the client's connection is established, and removes it when the
//!   socket closes; `answer_getsockopt` answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on
//!   the proxy's accepted socket from that record. They sit at the root because the proxy
//!   usually runs outside the workload's cgroup.
//!
//! All maps are shared between the instances and pinned by name.
#![no_std]
#![no_main]
// For the atomic add on counters: the bpf target's `AtomicU64` has no `fetch_add`.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::{
        bpf_sk_lookup, bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_sock_tuple, bpf_sockopt,
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_CURRENT_NETNS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use interceptor_common::{
    capacity, is_mapped_v4, mapped_v4, Counter, CounterKey, InboundConfig, OrigDst, ScopeConfig,
    ScopeMeta, ScopedV4, ScopedV6, ScopedValue, SockKey, TupleKey, AF_INET, AF_INET6,
    FLAG_FAIL_OPEN, FLAG_INCLUDE4, FLAG_INCLUDE6, FLAG_INCLUDE_PORTS, IN_PORT_EXCLUDED,
    IN_PORT_INCLUDED, LPM_SCOPE_BITS, META_PATH_LEN, SOL_IP, SOL_IPV6, SO_ICP_WORKLOAD,
    SO_ORIGINAL_DST,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Let the `connect()` go on (with or without a rewritten address).
const ALLOW: i32 = 1;

/// Which scope this instance serves (the attached cgroup's id); 0 in the root instance.
#[no_mangle]
static SCOPE_ID: u64 = 0;

#[map(name = "ICP_LAYOUT")]
static ICP_LAYOUT: Array<u32> = Array::pinned(1, 0);
#[map(name = "ICP_CONFIG")]
static ICP_CONFIG: HashMap<u64, ScopeConfig> = HashMap::pinned(capacity::SCOPES, 0);
#[map(name = "ICP_META")]
static ICP_META: HashMap<u64, ScopeMeta> = HashMap::pinned(capacity::SCOPES, 0);
#[map(name = "ICP_PORTS")]
static ICP_PORTS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::PORTS, 0);
#[map(name = "ICP_UIDS")]
static ICP_UIDS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::UIDS, 0);
#[map(name = "ICP_EXCL4")]
static ICP_EXCL4: LpmTrie<ScopedV4, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_EXCL6")]
static ICP_EXCL6: LpmTrie<ScopedV6, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_INCL4")]
static ICP_INCL4: LpmTrie<ScopedV4, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
#[map(name = "ICP_INCL6")]
static ICP_INCL6: LpmTrie<ScopedV6, u8> = LpmTrie::pinned(capacity::CIDRS, 0);
// Plain (preallocated) hashes, not LRU: an LRU map may evict a live record under churn
// before it is full, and a connection would then reach the proxy without its original
// destination. Records are removed explicitly when the client socket closes.
#[map(name = "ICP_PENDING")]
static ICP_PENDING: HashMap<u64, OrigDst> = HashMap::pinned(capacity::PENDING, 0);
#[map(name = "ICP_HANDOFF")]
static ICP_HANDOFF: HashMap<TupleKey, OrigDst> = HashMap::pinned(capacity::HANDOFF, 0);
#[map(name = "ICP_COUNTERS")]
static ICP_COUNTERS: PerCpuHashMap<CounterKey, u64> = PerCpuHashMap::pinned(capacity::COUNTERS, 0);

#[map(name = "ICP_IN_CONFIG")]
static ICP_IN_CONFIG: HashMap<u64, InboundConfig> = HashMap::pinned(capacity::SCOPES, 0);
#[map(name = "ICP_IN_PORTS")]
static ICP_IN_PORTS: HashMap<ScopedValue, u8> = HashMap::pinned(capacity::PORTS, 0);
#[map(name = "ICP_IN_SOCKS")]
static ICP_IN_SOCKS: SockHash<SockKey> = SockHash::pinned(capacity::IN_SOCKS, 0);

#[inline(always)]
fn scope_id() -> u64 {
    // SAFETY: a plain read of a read-only global that the loader sets before loading.
    unsafe { core::ptr::read_volatile(&SCOPE_ID) }
}

/// `lock *(u64 *)v += 1`: the verifier accepts atomic adds on map values.
///
/// # Safety
/// `v` must point at a u64 in a map value.
#[inline(always)]
unsafe fn atomic_inc(v: *mut u64) {
    // SAFETY: per the contract above.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            v, 1,
        );
    }
}

/// Counts one decision, and logs it (with its scope) at debug level: `interceptor logs` prints the lines of
/// programs loaded with `--kernel-log debug` (others are loaded with logging off, where the
/// log statement costs one load and one compare).
#[inline(always)]
fn count(scope: u64, counter: Counter) {
    // Not for scope 0: the root programs see every socket of the host, most of them not ours.
    if scope != 0 {
        debug!(&(), "scope {} {}", scope, counter.name());
    }
    let key = CounterKey {
        scope,
        counter: counter as u32,
        _pad: 0,
    };
    match ICP_COUNTERS.get_ptr_mut(key) {
        // An atomic add even on a per-CPU value: a program running in process context can be
        // preempted on its CPU by another run of a program, and a plain `+= 1` would then
        // lose a count.
        // SAFETY: the value is a valid, aligned u64 for this program run.
        Some(v) => unsafe { atomic_inc(v) },
        None => {
            if ICP_COUNTERS.insert(key, 1, BPF_NOEXIST as u64).is_err() {
                // Another run created it in between: count on the entry it made.
                if let Some(v) = ICP_COUNTERS.get_ptr_mut(key) {
                    // SAFETY: as above.
                    unsafe { atomic_inc(v) };
                }
            }
        }
    }
}

const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[inline(always)]
fn is_loopback4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

/// Why a connect is left alone, or `None` to redirect it.
#[inline(always)]
fn exemption(
    scope: u64,
    cfg: &ScopeConfig,
    sk: *mut bpf_sock,
    family: u16,
    addr: &[u32; 4],
    port: u16,
) -> Option<Counter> {
    if cfg.bypass_mark != 0 && !sk.is_null() {
        // SAFETY: `sk` is the kernel's full socket for this connect (checked non-null).
        let mark = unsafe { (*sk).mark };
        if mark == cfg.bypass_mark {
            return Some(Counter::BypassMark);
        }
    }
    let uid = bpf_get_current_uid_gid() as u32;
    let uid_key = ScopedValue {
        scope,
        value: uid,
        _pad: 0,
    };
    if ICP_UIDS.get_ptr(uid_key).is_some() {
        return Some(Counter::BypassUid);
    }
    let loopback = if family == AF_INET {
        is_loopback4(addr[3])
    } else {
        *addr == LOOPBACK6
    };
    if loopback && port == cfg.proxy_port {
        return Some(Counter::ToProxy);
    }
    let port_key = ScopedValue {
        scope,
        value: port as u32,
        _pad: 0,
    };
    if ICP_PORTS.get_ptr(port_key).is_some() {
        return Some(Counter::ExcludedPort);
    }
    let scope_be = scope.to_be_bytes();
    if family == AF_INET {
        let key = Key::new(
            LPM_SCOPE_BITS + 32,
            ScopedV4 {
                scope: scope_be,
                addr: addr[3].to_ne_bytes(),
            },
        );
        if ICP_EXCL4.get(&key).is_some() {
            return Some(Counter::ExcludedCidr);
        }
        if cfg.flags & FLAG_INCLUDE4 != 0 && ICP_INCL4.get(&key).is_none() {
            return Some(Counter::NotIncluded);
        }
    } else {
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = addr[i].to_ne_bytes();
            bytes[i * 4] = w[0];
            bytes[i * 4 + 1] = w[1];
            bytes[i * 4 + 2] = w[2];
            bytes[i * 4 + 3] = w[3];
            i += 1;
        }
        let key = Key::new(
            LPM_SCOPE_BITS + 128,
            ScopedV6 {
                scope: scope_be,
                addr: bytes,
            },
        );
        if ICP_EXCL6.get(&key).is_some() {
            return Some(Counter::ExcludedCidr);
        }
        if cfg.flags & FLAG_INCLUDE6 != 0 && ICP_INCL6.get(&key).is_none() {
            return Some(Counter::NotIncluded);
        }
    }
    None
}

/// Whether a TCP socket listens on the proxy's port, on 127.0.0.1 (`v6` false) or ::1, in the
/// network namespace of the connecting socket.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, v6: bool, port: u16) -> bool {
    // SAFETY: a zeroed tuple is valid; the helper gets its exact size for the family, and a
    // socket it returns is released before returning.
    unsafe {
        let mut tuple: bpf_sock_tuple = core::mem::zeroed();
        let size = if v6 {
            tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK6;
            tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv6)
        } else {
            tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4;
            tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv4)
        };
        let sk = bpf_sk_lookup_tcp(
            ctx.sock_addr.cast(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
        true
    }
}

/// What to do with a connect while no proxy listens.
enum ProxyDown {
    /// A proxy listens: redirect and record as usual.
    No,
    /// Fail open: leave the connect alone.
    Direct,
    /// Fail closed: send it to the proxy's port, where it is refused; nothing to record.
    Refuse,
}

/// With no proxy listening, the scope's policy decides.
#[inline(always)]
fn proxy_down(ctx: &SockAddrContext, cfg: &ScopeConfig, v6: bool) -> ProxyDown {
    if proxy_listening(ctx, v6, cfg.proxy_port) {
        ProxyDown::No
    } else if cfg.flags & FLAG_FAIL_OPEN != 0 {
        ProxyDown::Direct
    } else {
        ProxyDown::Refuse
    }
}

/// Records the original destination under the socket's cookie. False if it could not.
#[inline(always)]
fn record(ctx: &SockAddrContext, scope: u64, family: u16, addr: [u32; 4], port: u16) -> bool {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let dst = OrigDst {
        addr,
        port,
        family,
        _pad: 0,
        scope,
    };
    ICP_PENDING.insert(cookie, dst, 0).is_ok()
}

/// The whole decision for one connect, shared by both families: `None` when the connect is
/// left alone (its reason already counted), else the counter of the rewrite to the proxy's
/// port (`Redirected` with a record stored, or `ProxyDownRefused` without one).
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    scope: u64,
    cfg: &ScopeConfig,
    sk: *mut bpf_sock,
    family: u16,
    addr: [u32; 4],
    port: u16,
) -> Option<Counter> {
    if let Some(why) = exemption(scope, cfg, sk, family, &addr, port) {
        count(scope, why);
        return None;
    }
    match proxy_down(ctx, cfg, family == AF_INET6) {
        ProxyDown::Direct => {
            count(scope, Counter::ProxyDownDirect);
            None
        }
        ProxyDown::Refuse => Some(Counter::ProxyDownRefused),
        ProxyDown::No if record(ctx, scope, family, addr, port) => Some(Counter::Redirected),
        ProxyDown::No => {
            count(scope, Counter::RecordFailed);
            None
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed; fields are read and written whole.
    unsafe {
        if (*sa).type_ != SOCK_STREAM {
            return ALLOW;
        }
        let scope = scope_id();
        let Some(cfg) = ICP_CONFIG.get(scope) else {
            return ALLOW;
        };
        let ip = (*sa).user_ip4;
        let port = u16::from_be((*sa).user_port as u16);
        let addr = mapped_v4(ip);
        let sk = (*sa).__bindgen_anon_1.sk;
        let Some(outcome) = decide(&ctx, scope, cfg, sk, AF_INET, addr, port) else {
            return ALLOW;
        };
        (*sa).user_ip4 = LOOPBACK4;
        (*sa).user_port = u16::to_be(cfg.proxy_port) as u32;
        count(scope, outcome);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `redirect_connect4`; `user_ip6` is read and written one word at a time.
    unsafe {
        if (*sa).type_ != SOCK_STREAM {
            return ALLOW;
        }
        let scope = scope_id();
        let Some(cfg) = ICP_CONFIG.get(scope) else {
            return ALLOW;
        };
        let addr = [
            rd(&(*sa).user_ip6[0]),
            rd(&(*sa).user_ip6[1]),
            rd(&(*sa).user_ip6[2]),
            rd(&(*sa).user_ip6[3]),
        ];
        let port = u16::from_be((*sa).user_port as u16);
        let family = if is_mapped_v4(&addr) {
            AF_INET
        } else {
            AF_INET6
        };
        let sk = (*sa).__bindgen_anon_1.sk;
        let Some(outcome) = decide(&ctx, scope, cfg, sk, family, addr, port) else {
            return ALLOW;
        };
        if family == AF_INET {
            // An IPv4-mapped destination stays IPv4 on the wire: send it to 127.0.0.1.
            (*sa).user_ip6[2] = u32::to_be(0x0000_ffff);
            (*sa).user_ip6[3] = LOOPBACK4;
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = LOOPBACK6[3];
        }
        (*sa).user_port = u16::to_be(cfg.proxy_port) as u32;
        count(scope, outcome);
    }
    ALLOW
}

/// Reads a context field with a load of its own size at its own offset: the verifier rejects
/// context loads through a computed pointer, which LLVM would otherwise produce when it merges
/// the reads of two branches.
#[inline(always)]
fn rd(p: *const u32) -> u32 {
    // SAFETY: `p` points at a readable field of the kernel-provided context.
    unsafe { core::ptr::read_volatile(p) }
}

/// The 4-tuple of a sock_ops socket, seen from the client (the workload's socket).
///
/// Every field is read once, unconditionally, before the family decides which to use: with
/// reads inside the branches LLVM shares one load through a computed context pointer, which
/// the verifier rejects.
#[inline(always)]
fn client_tuple(ops: *mut bpf_sock_ops) -> TupleKey {
    // SAFETY: field addresses of the kernel-provided context; read with `rd`.
    unsafe {
        let family = rd(&(*ops).family);
        let local4 = rd(&(*ops).local_ip4);
        let remote4 = rd(&(*ops).remote_ip4);
        let local6 = [
            rd(&(*ops).local_ip6[0]),
            rd(&(*ops).local_ip6[1]),
            rd(&(*ops).local_ip6[2]),
            rd(&(*ops).local_ip6[3]),
        ];
        let remote6 = [
            rd(&(*ops).remote_ip6[0]),
            rd(&(*ops).remote_ip6[1]),
            rd(&(*ops).remote_ip6[2]),
            rd(&(*ops).remote_ip6[3]),
        ];
        let local_port = rd(&(*ops).local_port);
        let remote_port = rd(&(*ops).remote_port);
        let v4 = family == AF_INET as u32;
        TupleKey {
            netns: bpf_get_netns_cookie(ops.cast()),
            client_addr: if v4 { mapped_v4(local4) } else { local6 },
            proxy_addr: if v4 { mapped_v4(remote4) } else { remote6 },
            client_port: local_port as u16,
            proxy_port: u32::from_be(remote_port) as u16,
            _pad: 0,
        }
    }
}

#[sock_ops]
pub fn track_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if ICP_PENDING.get_ptr(cookie).is_some() {
            // Be told when this socket closes, to drop its records.
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(dst) = ICP_PENDING.get_ptr(cookie) {
            // SAFETY: the value pointer is valid for this program run.
            let dst = unsafe { *dst };
            let key = client_tuple(ctx.ops);
            let _ = ICP_HANDOFF.insert(key, dst, 0);
            let _ = ICP_PENDING.remove(cookie);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        let _ = ICP_PENDING.remove(cookie);
        let key = client_tuple(ctx.ops);
        let _ = ICP_HANDOFF.remove(key);
    }
    1
}

/// The record of a redirected client socket, found from the socket and its current peer
/// (the proxy), as `getpeername()` sees them.
#[inline(always)]
fn record_for_peer(sa: *mut bpf_sock_addr, peer: [u32; 4]) -> Option<OrigDst> {
    // SAFETY: reads of the kernel-provided context; `sk` is checked before use.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let family = rd(&(*sk).family);
        let src4 = rd(&(*sk).src_ip4);
        let src6 = [
            rd(&(*sk).src_ip6[0]),
            rd(&(*sk).src_ip6[1]),
            rd(&(*sk).src_ip6[2]),
            rd(&(*sk).src_ip6[3]),
        ];
        let src_port = rd(&(*sk).src_port);
        let peer_port = u16::from_be(rd(&(*sa).user_port) as u16);
        let key = TupleKey {
            netns: bpf_get_netns_cookie(sa.cast()),
            client_addr: if family == AF_INET as u32 {
                mapped_v4(src4)
            } else {
                src6
            },
            proxy_addr: peer,
            client_port: src_port as u16,
            proxy_port: peer_port,
            _pad: 0,
        };
        ICP_HANDOFF.get_ptr(key).map(|d| *d)
    }
}

/// `getpeername()` on a redirected socket reports the original destination, as it does
/// behind iptables REDIRECT, so the workload never sees the proxy's address.
#[cgroup_sock_addr(getpeername4)]
pub fn restore_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context the kernel passed; fields are read and written whole.
    unsafe {
        let peer = mapped_v4(rd(&(*sa).user_ip4));
        if let Some(dst) = record_for_peer(sa, peer) {
            if dst.family == AF_INET {
                (*sa).user_ip4 = dst.addr[3];
                (*sa).user_port = u16::to_be(dst.port) as u32;
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `restore_getpeername4`; `user_ip6` is read and written one word at a time.
    unsafe {
        let peer = [
            rd(&(*sa).user_ip6[0]),
            rd(&(*sa).user_ip6[1]),
            rd(&(*sa).user_ip6[2]),
            rd(&(*sa).user_ip6[3]),
        ];
        if let Some(dst) = record_for_peer(sa, peer) {
            (*sa).user_ip6[0] = dst.addr[0];
            (*sa).user_ip6[1] = dst.addr[1];
            (*sa).user_ip6[2] = dst.addr[2];
            (*sa).user_ip6[3] = dst.addr[3];
            (*sa).user_port = u16::to_be(dst.port) as u32;
        }
    }
    ALLOW
}

/// Writes `sockaddr_in` (16 bytes) or `sockaddr_in6` (28 bytes) for `dst` into the option
/// buffer and reports success, or leaves everything as it was and returns false.
#[inline(always)]
fn write_sockaddr(sopt: *mut bpf_sockopt, dst: &OrigDst, as_v6: bool) -> bool {
    // SAFETY: every store is bounds-checked against `optval_end` first, as the verifier requires.
    unsafe {
        let start = (*sopt).__bindgen_anon_2.optval as *mut u8;
        let end = (*sopt).__bindgen_anon_3.optval_end as *mut u8;
        let port = dst.port.to_be_bytes();
        if !as_v6 {
            if start.add(16) > end || (*sopt).optlen < 16 {
                return false;
            }
            let family = AF_INET.to_ne_bytes();
            *start = family[0];
            *start.add(1) = family[1];
            *start.add(2) = port[0];
            *start.add(3) = port[1];
            let a = dst.addr[3].to_ne_bytes();
            *start.add(4) = a[0];
            *start.add(5) = a[1];
            *start.add(6) = a[2];
            *start.add(7) = a[3];
            let mut i = 8;
            while i < 16 {
                *start.add(i) = 0;
                i += 1;
            }
            write_result(sopt, 16);
        } else {
            if start.add(28) > end || (*sopt).optlen < 28 {
                return false;
            }
            let family = AF_INET6.to_ne_bytes();
            *start = family[0];
            *start.add(1) = family[1];
            *start.add(2) = port[0];
            *start.add(3) = port[1];
            // sin6_flowinfo
            *start.add(4) = 0;
            *start.add(5) = 0;
            *start.add(6) = 0;
            *start.add(7) = 0;
            let mut w = 0;
            while w < 4 {
                let b = dst.addr[w].to_ne_bytes();
                *start.add(8 + w * 4) = b[0];
                *start.add(9 + w * 4) = b[1];
                *start.add(10 + w * 4) = b[2];
                *start.add(11 + w * 4) = b[3];
                w += 1;
            }
            // sin6_scope_id
            *start.add(24) = 0;
            *start.add(25) = 0;
            *start.add(26) = 0;
            *start.add(27) = 0;
            write_result(sopt, 28);
        }
    }
    true
}

/// Answers `SO_ICP_WORKLOAD` with the scope's cgroup path (as many bytes as fit), or leaves
/// the kernel's answer when the scope has no metadata.
#[inline(always)]
fn write_workload(sopt: *mut bpf_sockopt, scope: u64) {
    let Some(meta) = (unsafe { ICP_META.get(&scope) }) else {
        return;
    };
    // SAFETY: every store is bounds-checked against `optval_end` first.
    unsafe {
        let start = (*sopt).__bindgen_anon_2.optval as *mut u8;
        let end = (*sopt).__bindgen_anon_3.optval_end as *mut u8;
        let want = meta.path_len as usize;
        let mut i = 0usize;
        while i < META_PATH_LEN && i < want {
            if start.add(i + 1) > end {
                break;
            }
            *start.add(i) = meta.path[i];
            i += 1;
        }
        write_result(sopt, i as i32);
    }
}

/// `optlen` and `retval` are written with two separate 4-byte stores: LLVM would otherwise
/// merge them into one 8-byte store, which the verifier rejects.
#[inline(always)]
fn write_result(sopt: *mut bpf_sockopt, len: i32) {
    // SAFETY: both fields are writable in cgroup/getsockopt programs.
    unsafe {
        core::ptr::write_volatile(&mut (*sopt).optlen, len);
        core::ptr::write_volatile(&mut (*sopt).retval, 0);
    }
}

#[cgroup_sockopt(getsockopt)]
pub fn answer_getsockopt(ctx: SockoptContext) -> i32 {
    let sopt: *mut bpf_sockopt = ctx.sockopt;
    // SAFETY: reads of the kernel-provided context; `sk` is checked before use.
    unsafe {
        let level = (*sopt).level;
        let optname = (*sopt).optname;
        let workload = optname == SO_ICP_WORKLOAD && level == SOL_IP;
        if !workload && (optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6)) {
            return 1;
        }
        let sk = (*sopt).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).type_ != SOCK_STREAM {
            return 1;
        }
        // Every field is read before the family is looked at (see `client_tuple`).
        let family = rd(&(*sk).family);
        let src4 = rd(&(*sk).src_ip4);
        let dst4 = rd(&(*sk).dst_ip4);
        let src6 = [
            rd(&(*sk).src_ip6[0]),
            rd(&(*sk).src_ip6[1]),
            rd(&(*sk).src_ip6[2]),
            rd(&(*sk).src_ip6[3]),
        ];
        let dst6 = [
            rd(&(*sk).dst_ip6[0]),
            rd(&(*sk).dst_ip6[1]),
            rd(&(*sk).dst_ip6[2]),
            rd(&(*sk).dst_ip6[3]),
        ];
        let src_port = rd(&(*sk).src_port);
        let dst_port = core::ptr::read_volatile(&(*sk).dst_port);
        let (local, remote) = if family == AF_INET as u32 {
            (mapped_v4(src4), mapped_v4(dst4))
        } else if family == AF_INET6 as u32 {
            (src6, dst6)
        } else {
            return 1;
        };
        let key = TupleKey {
            netns: bpf_get_netns_cookie(sopt.cast()),
            client_addr: remote,
            proxy_addr: local,
            client_port: u16::from_be(dst_port),
            proxy_port: src_port as u16,
            _pad: 0,
        };
        let Some(dst) = ICP_HANDOFF.get_ptr(key) else {
            count(0, Counter::OrigDstMissing);
            return 1;
        };
        let dst = *dst;
        if workload {
            write_workload(sopt, dst.scope);
            return 1;
        }
        // SOL_IP on an AF_INET socket: sockaddr_in. SOL_IPV6: sockaddr_in6 (IPv4-mapped for
        // an IPv4 destination). SOL_IP on an AF_INET6 socket (HAProxy asks this way):
        // sockaddr_in for an IPv4 destination, sockaddr_in6 for an IPv6 one.
        let as_v6 = level == SOL_IPV6 || dst.family == AF_INET6;
        if level == SOL_IP && family == AF_INET as u32 && dst.family == AF_INET6 {
            count(dst.scope, Counter::OrigDstMissing);
            return 1;
        }
        if write_sockaddr(sopt, &dst, as_v6) {
            count(dst.scope, Counter::OrigDstAnswered);
        } else {
            count(dst.scope, Counter::OrigDstMissing);
        }
    }
    1
}

/// Steers new inbound TCP connections of a network namespace into the proxy's inbound
/// listener (`ICP_IN_SOCKS`), rewriting nothing: the accepted socket's local address is the
/// destination the peer dialled. Connections from loopback sources (the proxy forwarding from
/// 127.0.0.6 or ::1, or the workload itself), to the proxy's own port, to excluded ports or to
/// ports outside the include list go where they were going.
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let l: *mut bpf_sk_lookup = ctx.lookup;
    // SAFETY: every field is read once, unconditionally, from the kernel-provided context
    // (see `client_tuple` for why).
    let (family, protocol, remote4, remote6, local4, local6, local_port) = unsafe {
        (
            rd(&(*l).family),
            rd(&(*l).protocol),
            rd(&(*l).remote_ip4),
            [
                rd(&(*l).remote_ip6[0]),
                rd(&(*l).remote_ip6[1]),
                rd(&(*l).remote_ip6[2]),
                rd(&(*l).remote_ip6[3]),
            ],
            rd(&(*l).local_ip4),
            [
                rd(&(*l).local_ip6[0]),
                rd(&(*l).local_ip6[1]),
                rd(&(*l).local_ip6[2]),
                rd(&(*l).local_ip6[3]),
            ],
            rd(&(*l).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let scope = scope_id();
    // SAFETY: read-only use of the value for this program run.
    let Some(cfg) = (unsafe { ICP_IN_CONFIG.get(&scope) }) else {
        return SK_PASS;
    };
    let port = local_port as u16;
    if port == cfg.inbound_port {
        return SK_PASS;
    }
    let v4 = family == AF_INET as u32;
    let (remote, local) = if v4 {
        (mapped_v4(remote4), mapped_v4(local4))
    } else {
        (remote6, local6)
    };
    // A lookup without a peer (the outbound programs' own check for a listener) is no
    // connection: leave it alone, uncounted.
    if remote[0] | remote[1] | remote[3] == 0 && (remote[2] == 0 || is_mapped_v4(&remote)) {
        return SK_PASS;
    }
    let key = ScopedValue {
        scope,
        value: port as u32,
        _pad: 0,
    };
    // A plain byte, not an Option: the verifier rejects the read of an Option's undefined
    // payload that LLVM emits for the `None` case.
    let rule: u8 = match ICP_IN_PORTS.get_ptr(key) {
        // SAFETY: the value pointer is valid for this program run.
        Some(v) => unsafe { *v },
        None => 0,
    };
    if rule == IN_PORT_EXCLUDED {
        count(scope, Counter::InboundExcludedPort);
        return SK_PASS;
    }
    if cfg.flags & FLAG_INCLUDE_PORTS != 0 && rule != IN_PORT_INCLUDED {
        count(scope, Counter::InboundNotIncluded);
        return SK_PASS;
    }
    let loopback = |a: &[u32; 4]| {
        if is_mapped_v4(a) {
            is_loopback4(a[3])
        } else {
            *a == LOOPBACK6
        }
    };
    if loopback(&remote) || loopback(&local) {
        count(scope, Counter::InboundLoopback);
        return SK_PASS;
    }
    let sock = SockKey {
        scope,
        family: if v4 { AF_INET as u32 } else { AF_INET6 as u32 },
        _pad: 0,
    };
    if ICP_IN_SOCKS.redirect_sk_lookup(&ctx, sock, 0).is_ok() {
        count(scope, Counter::InboundRedirected);
        return SK_PASS;
    }
    if cfg.flags & FLAG_FAIL_OPEN != 0 {
        count(scope, Counter::InboundProxyDownDirect);
        SK_PASS
    } else {
        count(scope, Counter::InboundProxyDownRefused);
        SK_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
