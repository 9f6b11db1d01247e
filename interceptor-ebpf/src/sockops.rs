//! The established hand-off: `track_sockops`, attached once at the cgroup2 root. When a
//! redirected client socket (one with a record in its storage, `ICP_CONN`) is established,
//! its record is put under the connection's 4-tuple in `ICP_HANDOFF`; when the proxy's side
//! of that connection is established (before the proxy can accept it), the record moves into
//! the accepted socket's storage (`ICP_ACCEPTED`) and leaves `ICP_HANDOFF`. A client socket
//! that closes first takes its `ICP_HANDOFF` entry with it. Records in socket storage go with
//! their socket.
//!
//! Kernel forwarding: a socket the proxy asked it for (`ICP_KFWD`, see `forward.rs`) goes
//! into `ICP_FWD` and `ICP_FWD_STATE` when it is established (the only moment a sock_ops
//! program may insert it), and its `ICP_FWD_STATE` entry goes at its `TCP_CLOSE`.
use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use interceptor_common::{
    mapped_v4, Counter, FwdFlow, FwdState, TupleKey, AF_INET, KFWD_CLOSED, KFWD_IN_MAP,
};

use crate::{
    counters::count,
    ctx::rd,
    maps::{ICP_ACCEPTED, ICP_CONN, ICP_FWD, ICP_FWD_FLOW, ICP_FWD_STATE, ICP_HANDOFF, ICP_KFWD},
};

/// `BPF_NOEXIST`.
const NOEXIST: u64 = 1;

/// An established socket that asked for kernel forwarding goes into `ICP_FWD` under its
/// cookie, with a fresh `ICP_FWD_STATE` entry (nothing passed yet: no byte has arrived) and an
/// `ICP_FWD_FLOW` entry, and asks for state callbacks so that its close removes the entries,
/// and for RTT callbacks (one per acknowledgement that gives an RTT sample) that keep its
/// `ICP_FWD_FLOW` entry's `acked` current. When any of the maps is full it stays out (the proxy's arm
/// then fails and it copies that connection itself).
#[inline(always)]
fn kfwd_insert(ctx: &SockOpsContext, sk: *mut bpf_sock) {
    // SAFETY: `sk` is this context's full socket, checked non-null by the caller.
    let k = unsafe { ICP_KFWD.get(sk, false) };
    if k.is_null() {
        return;
    }
    // SAFETY: this socket's storage, valid for this program run.
    let k = unsafe { &mut *k };
    if k.want == 0 || k.inserted != 0 {
        return;
    }
    // SAFETY: the helper takes the sock_ops context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: a field of the kernel-provided context.
    let acked = unsafe { core::ptr::read_volatile(&(*ctx.ops).bytes_acked) };
    let flow = FwdFlow {
        acked,
        acked_base: acked,
        // SAFETY: as above.
        seq_base: unsafe { rd(&(*ctx.ops).rcv_nxt) },
        _pad: 0,
    };
    if ICP_FWD_FLOW.insert(cookie, flow, NOEXIST).is_err() {
        return;
    }
    if ICP_FWD_STATE
        .insert(cookie, FwdState::default(), NOEXIST)
        .is_err()
    {
        let _ = ICP_FWD_FLOW.remove(cookie);
        return;
    }
    // SAFETY: the context pointer is valid for this program run.
    let ops = unsafe { &mut *ctx.ops };
    if ICP_FWD.update(&mut cookie, ops, NOEXIST).is_err() {
        let _ = ICP_FWD_STATE.remove(cookie);
        let _ = ICP_FWD_FLOW.remove(cookie);
        return;
    }
    k.cookie = cookie;
    k.inserted = KFWD_IN_MAP;
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// At `TCP_CLOSE`: the socket's `ICP_FWD_STATE` entry goes, its counts kept in its storage
/// (the proxy may still be reading what was passed to it; the kernel removes the socket from
/// `ICP_FWD` when it is closed).
#[inline(always)]
fn kfwd_remove(sk: *mut bpf_sock) {
    // SAFETY: as in `kfwd_insert`.
    let k = unsafe { ICP_KFWD.get(sk, false) };
    if k.is_null() {
        return;
    }
    // SAFETY: as in `kfwd_insert`.
    let k = unsafe { &mut *k };
    if k.inserted == KFWD_IN_MAP {
        if let Some(st) = ICP_FWD_STATE.get_ptr(k.cookie) {
            // SAFETY: the value pointer is valid for this program run.
            unsafe {
                k.passed = (*st).passed;
                k.redirected = (*st).redirected;
                k.trimmed = (*st).trimmed;
                k.uncut = (*st).uncut;
                k.unchecked = (*st).unchecked;
            }
        }
        let _ = ICP_FWD_STATE.remove(k.cookie);
        let _ = ICP_FWD_FLOW.remove(k.cookie);
        k.inserted = KFWD_CLOSED;
    }
}

/// The 4-tuple of a sock_ops socket, as the client (the workload's socket) sees it: from the
/// client's own socket (`passive` false) or from the proxy's accepted socket (`passive` true).
///
/// Every field is read once, unconditionally, before the family decides which to use: with
/// reads inside the branches LLVM shares one load through a computed context pointer, which
/// the verifier rejects.
#[inline(always)]
fn tuple(ops: *mut bpf_sock_ops, passive: bool) -> TupleKey {
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
        let local_port = rd(&(*ops).local_port) as u16;
        let remote_port = u32::from_be(rd(&(*ops).remote_port)) as u16;
        let v4 = family == AF_INET as u32;
        let local = if v4 { mapped_v4(local4) } else { local6 };
        let remote = if v4 { mapped_v4(remote4) } else { remote6 };
        let netns = bpf_get_netns_cookie(ops.cast());
        if passive {
            TupleKey {
                netns,
                client_addr: remote,
                proxy_addr: local,
                client_port: remote_port,
                proxy_port: local_port,
                _pad: 0,
            }
        } else {
            TupleKey {
                netns,
                client_addr: local,
                proxy_addr: remote,
                client_port: local_port,
                proxy_port: remote_port,
                _pad: 0,
            }
        }
    }
}

/// The full socket of a sock_ops context, or null.
#[inline(always)]
fn full_sock(ops: *mut bpf_sock_ops) -> *mut bpf_sock {
    // SAFETY: `sk` is an 8-byte field of the context, read whole; the kernel gives null for a
    // request or time-wait socket.
    unsafe { core::ptr::read_volatile(&(*ops).__bindgen_anon_2.sk) }
}

/// An RTT sample of a socket under kernel forwarding (it asked for these callbacks when it
/// went into `ICP_FWD`): its `bytes_acked` into its `ICP_FWD_FLOW` entry. Nothing else is looked up, so
/// that a callback per acknowledgement costs a cookie and one hash lookup.
#[inline(always)]
fn kfwd_acked(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if let Some(v) = ICP_FWD_FLOW.get_ptr_mut(cookie) {
        // SAFETY: a field of the kernel-provided context; the value pointer is valid for this
        // program run (written under the socket's lock, read by the peer's verdict).
        unsafe {
            let acked = core::ptr::read_volatile(&(*ctx.ops).bytes_acked);
            core::ptr::write_volatile(&mut (*v).acked, acked);
        }
    }
}

#[sock_ops]
pub fn track_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_RTT_CB {
        kfwd_acked(&ctx);
        return 1;
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && !(op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE)
    {
        return 1;
    }
    let sk = full_sock(ctx.ops);
    if sk.is_null() {
        return 1;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        kfwd_insert(&ctx, sk);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        kfwd_remove(sk);
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // The proxy's side of a redirected connection (or any other accepted socket).
        let key = tuple(ctx.ops, true);
        let Some(dst) = ICP_HANDOFF.get_ptr(key) else {
            return 1;
        };
        // SAFETY: the value pointer is valid for this program run.
        let dst = unsafe { *dst };
        let _ = ICP_HANDOFF.remove(key);
        // SAFETY: `sk` is this context's full socket, checked non-null.
        let rec = unsafe { ICP_ACCEPTED.get(sk, true) };
        if rec.is_null() {
            count(dst.scope, Counter::HandoffFailed);
        } else {
            // SAFETY: this socket's record, valid for this program run.
            unsafe { *rec = dst };
        }
        return 1;
    }
    // The other callbacks concern the client's socket: only one with a record.
    // SAFETY: as above.
    let rec = unsafe { ICP_CONN.get(sk, false) };
    if rec.is_null() {
        return 1;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Be told when this socket closes, to drop its hand-off entry.
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: this socket's record, valid for this program run.
        let dst = unsafe { *rec };
        if ICP_HANDOFF.insert(tuple(ctx.ops, false), dst, 0).is_err() {
            // The proxy's side will find no record and close the connection.
            count(dst.scope, Counter::HandoffFailed);
        }
    } else {
        // TCP_CLOSE of a client socket: an entry the proxy's side never took goes too.
        let _ = ICP_HANDOFF.remove(tuple(ctx.ops, false));
    }
    1
}
