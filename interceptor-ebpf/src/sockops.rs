//! The established hand-off: `track_sockops`, attached once at the cgroup2 root. When a
//! redirected client socket (one with a record in `ICP_PENDING`) is established, its record
//! moves to the connection's 4-tuple in `ICP_HANDOFF`, where the proxy's side finds it; when
//! the client socket closes, its records are removed.
use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use interceptor_common::{mapped_v4, TupleKey, AF_INET};

use crate::{
    ctx::rd,
    maps::{ICP_HANDOFF, ICP_PENDING},
};

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
