//! The proxy's questions about an accepted socket: `answer_getsockopt`, attached once at the
//! cgroup2 root, answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)`,
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` and `getsockopt(SOL_IP, SO_ICP_WORKLOAD)`
//! from the accepted socket's record (`ICP_ACCEPTED`, put there when the connection was
//! established), so a proxy that works behind iptables REDIRECT works unchanged. Sockets
//! without a record get the kernel's own answer.
use aya_ebpf::{
    bindings::bpf_sockopt, helpers::bpf_get_current_uid_gid, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use interceptor_common::{
    Counter, OrigDst, ScopedValue, AF_INET, AF_INET6, KFWD_CLOSED, KFWD_IN_MAP, META_PATH_LEN,
    SOL_IP, SOL_IPV6, SO_ICP_KFWD_ARM, SO_ICP_WORKLOAD, SO_ORIGINAL_DST,
};

use crate::{
    counters::count,
    ctx::{rd, SOCK_STREAM},
    maps::{ICP_ACCEPTED, ICP_FWD_STATE, ICP_KFWD, ICP_META, ICP_UIDS},
};

/// `getsockopt(SOL_IP, SO_ICP_KFWD_ARM)`: the socket's own kernel-forwarding state
/// (`FwdState`'s peer, armed, passed, redirected and trimmed: 40 bytes), to whoever holds the socket; the kernel's answer when it is not
/// under kernel forwarding.
#[inline(always)]
fn write_fwd_state(sopt: *mut bpf_sockopt, sk: *mut aya_ebpf::bindings::bpf_sock) {
    // SAFETY: `sk` is the context's full socket, checked non-null by the caller; every store
    // is bounds-checked against `optval_end` first.
    unsafe {
        let k = ICP_KFWD.get(sk, false);
        if k.is_null() {
            return;
        }
        let words = if (*k).inserted == KFWD_IN_MAP {
            let Some(st) = ICP_FWD_STATE.get_ptr((*k).cookie) else {
                return;
            };
            [
                (*st).peer,
                (*st).armed,
                (*st).passed,
                (*st).redirected,
                (*st).trimmed,
                (*st).uncut,
                (*st).unchecked,
            ]
        } else if (*k).inserted == KFWD_CLOSED {
            // Closed (TCP_CLOSE): the counts it had then.
            [
                0,
                0,
                (*k).passed,
                (*k).redirected,
                (*k).trimmed,
                (*k).uncut,
                (*k).unchecked,
            ]
        } else {
            return;
        };
        let start = (*sopt).__bindgen_anon_2.optval as *mut u8;
        let end = (*sopt).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(56) > end || (*sopt).optlen < 56 {
            return;
        }
        let mut w = 0;
        while w < 7 {
            let b = words[w].to_ne_bytes();
            let mut i = 0;
            while i < 8 {
                *start.add(w * 8 + i) = b[i];
                i += 1;
            }
            w += 1;
        }
        write_result(sopt, 56);
    }
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
    // SAFETY: a read-only use of the map value for this program run.
    let Some(meta) = (unsafe { ICP_META.get(scope) }) else {
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

/// Whether the calling process may learn a connection's destination and workload: root, or a
/// bypass uid of the scope that redirected it (the proxy's user, 1337 by default). Any other
/// process that accepted the connection (a listener started on the proxy's port while no
/// proxy ran) gets the kernel's own answer, as for a socket without a record.
#[inline(always)]
fn caller_is_proxy(scope: u64) -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    uid == 0
        || ICP_UIDS
            .get_ptr(ScopedValue {
                scope,
                value: uid,
                _pad: 0,
            })
            .is_some()
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
        if level == SOL_IP && optname == SO_ICP_KFWD_ARM {
            let sk = (*sopt).__bindgen_anon_1.sk;
            if !sk.is_null() && (*sk).type_ == SOCK_STREAM {
                write_fwd_state(sopt, sk);
            }
            return 1;
        }
        let workload = optname == SO_ICP_WORKLOAD && level == SOL_IP;
        if !workload && (optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6)) {
            return 1;
        }
        let sk = (*sopt).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).type_ != SOCK_STREAM {
            return 1;
        }
        let family = rd(&(*sk).family);
        if family != AF_INET as u32 && family != AF_INET6 as u32 {
            return 1;
        }
        let dst = ICP_ACCEPTED.get(sk, false);
        if dst.is_null() {
            count(0, Counter::OrigDstMissing);
            return 1;
        }
        let dst = *dst;
        if !caller_is_proxy(dst.scope) {
            count(dst.scope, Counter::OrigDstNotProxy);
            return 1;
        }
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
