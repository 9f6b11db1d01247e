//! `getpeername()` on a redirected socket: `restore_getpeername4` and `restore_getpeername6`,
//! attached to the workload's cgroup, report the original destination from the connection's
//! record, as `getpeername()` does behind iptables REDIRECT.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use interceptor_common::{mapped_v4, OrigDst, TupleKey, AF_INET};

use crate::{
    ctx::{rd, ALLOW},
    maps::ICP_HANDOFF,
};

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
