//! `getpeername()` on a redirected socket: `restore_getpeername4` and `restore_getpeername6`,
//! attached to the workload's cgroup, report the original destination from the connection's
//! record (the socket's own storage), as `getpeername()` does behind iptables REDIRECT.
use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{OrigDst, AF_INET};

use crate::{ctx::ALLOW, maps::ICP_CONN};

/// The record of a redirected client socket (its own storage, `ICP_CONN`).
#[inline(always)]
fn record(sa: *mut bpf_sock_addr) -> Option<OrigDst> {
    // SAFETY: a read of the kernel-provided context; `sk` is checked before use.
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let rec = ICP_CONN.get(sk, false);
        if rec.is_null() {
            None
        } else {
            Some(*rec)
        }
    }
}

/// `getpeername()` on a redirected socket reports the original destination, as it does
/// behind iptables REDIRECT, so the workload never sees the proxy's address.
#[cgroup_sock_addr(getpeername4)]
pub fn restore_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context the kernel passed; fields are read and written whole.
    unsafe {
        if let Some(dst) = record(sa) {
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
        if let Some(dst) = record(sa) {
            (*sa).user_ip6[0] = dst.addr[0];
            (*sa).user_ip6[1] = dst.addr[1];
            (*sa).user_ip6[2] = dst.addr[2];
            (*sa).user_ip6[3] = dst.addr[3];
            (*sa).user_port = u16::to_be(dst.port) as u32;
        }
    }
    ALLOW
}
