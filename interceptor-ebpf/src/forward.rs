//! Kernel forwarding of the proxy's opaque connections: the proxy still accepts, connects and
//! watches both sockets, but their bytes go from one to the other in the kernel.
//!
//! * The proxy asks for it with `setsockopt(SOL_IP, SO_ICP_KFWD, 1)` on its listeners and on
//!   each upstream socket before `connect()`; `answer_setsockopt` keeps the request in the
//!   socket's storage (`ICP_KFWD`, cloned into accepted sockets).
//! * `track_sockops` puts such a socket into `ICP_FWD` (a SOCKHASH keyed by socket cookie)
//!   when it is established: from then on every segment it receives runs `forward_verdict`.
//! * Once the upstream is connected, the proxy arms each socket with its peer's cookie and
//!   the bytes it has read from it (`SO_ICP_KFWD_ARM`, written to the peer before arming).
//! * `forward_verdict` redirects a segment to the peer's send side only when both sockets
//!   are armed with each other (the peer's owner agreed: no process can push bytes into a
//!   socket it does not hold) and every byte passed to the socket so far has been read
//!   (`armed - 1 == passed`); otherwise it passes the segment to the socket and counts it.
//!   So a redirected byte never overtakes one the proxy still had to copy: the proxy reads
//!   what was passed, writes it to the peer and arms again with the new total.
//!
//! The verdict and the `setsockopt` program of one socket never run at once: the first runs
//! with the socket locked (softirq or its backlog), the second under `lock_sock`.
use aya_ebpf::{
    bindings::{bpf_sockopt, sk_action},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{cgroup_sockopt, stream_verdict},
    programs::{SkBuffContext, SockoptContext},
};
use interceptor_common::{
    FwdArm, FwdState, KFWD_CLOSED, KFWD_IN_MAP, KFWD_MAX_UNACKED, SKB_CB_OFFSET, SOL_IP,
    SO_ICP_KFWD, SO_ICP_KFWD_ARM,
};

use crate::{
    ctx::SOCK_STREAM,
    maps::{ICP_FWD, ICP_FWD_FLOW, ICP_FWD_READY, ICP_FWD_STATE, ICP_KFWD},
};

/// A `cgroup/setsockopt` verdict: carry on (with `optlen` -1: the kernel's own handler is
/// skipped and the call returns 0).
const ALLOW: i32 = 1;
/// A `cgroup/setsockopt` verdict: fail the call with `EPERM`.
const REFUSE: i32 = 0;

#[stream_verdict]
pub fn forward_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper takes the skb; its socket is the receiving one.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = ctx.len() as u64;
    // A segment without data (a FIN alone) is dropped, neither redirected nor passed: the
    // socket reports its EOF anyway (the FIN has set `SOCK_DONE` and `RCV_SHUTDOWN` before
    // this runs), and an empty segment in the kernel's queues breaks the socket. Redirected,
    // the peer's send of 0 bytes counts as a broken pipe; passed while the socket's psock
    // still holds segments redirected to it (its queue is then the way in for passed ones
    // too), `sk_psock_backlog` takes the 0 bytes queued for its user for a hard error: it
    // reports EPIPE on the socket and stops its transmit, and from then on every segment
    // redirected to the socket or passed to its user is dropped.
    if len == 0 {
        return sk_action::SK_DROP;
    }
    let Some(st) = ICP_FWD_STATE.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: the value pointer is valid for this program run; only this socket's programs
    // write it, serialised by the socket's lock.
    let st = unsafe { &mut *st };
    // SAFETY: as above.
    let armed = unsafe { core::ptr::read_volatile(&st.armed) };
    // SAFETY: as above.
    let mut peer = unsafe { core::ptr::read_volatile(&st.peer) };
    // Decided before the cut below, whose loop leaves the verifier one state per pass: what
    // follows it stays short. The first new byte of the segment is the one after the last
    // byte the verdict saw (`next_seq`, before the cut updates it).
    let redirect = armed != 0 && {
        let agreed = match ICP_FWD_STATE.get_ptr(peer) {
            Some(p) => {
                // SAFETY: as above (read only).
                let peer_of_peer = unsafe { core::ptr::read_volatile(&(*p).peer) };
                peer_of_peer == cookie
            }
            None => false,
        };
        agreed && armed - 1 == st.passed && !behind(st, cookie, peer)
    };
    let len = cut_repeated(&ctx, st, len);
    if len == 0 {
        return sk_action::SK_DROP;
    }
    if redirect && ICP_FWD.redirect_skb(&ctx, &mut peer, 0) == sk_action::SK_PASS as i64 {
        st.redirected += len;
        return sk_action::SK_PASS;
    }
    st.passed += len;
    sk_action::SK_PASS
}

/// Whether the peer is behind in sending this direction's bytes: more than
/// `KFWD_MAX_UNACKED` bytes before this segment are not acknowledged by its receiver
/// (`ICP_FWD_FLOW`). The segment is then passed to the proxy instead of being queued for the
/// peer: sockmap queues a redirected segment whatever the peer's backlog (and the source's
/// TCP counts it as read), while the proxy writes it only when the peer has room, and the
/// source's receive buffer holds its sender back meanwhile, as with the proxy's own copy.
///
/// The segment's offset comes from the sequence number of its first new byte (`next_seq`,
/// once the verdict has read one from a segment); without it, from the counts (which miss bytes the
/// proxy read past the verdict). A peer without an entry (put into the map by programs from
/// before `ICP_FWD_FLOW`) is never behind.
#[inline(always)]
fn behind(st: &FwdState, cookie: u64, peer: u64) -> bool {
    let Some(p) = ICP_FWD_FLOW.get_ptr(peer) else {
        return false;
    };
    // SAFETY: the value pointer is valid for this program run; `acked` is written by the
    // peer's own sock_ops program, so it is read once.
    let acked = unsafe { core::ptr::read_volatile(&(*p).acked).wrapping_sub((*p).acked_base) };
    if st.seq_known != 0 {
        if let Some(me) = ICP_FWD_FLOW.get_ptr(cookie) {
            // SAFETY: as above; `seq_base` is written once, at the insert.
            let offset = st.next_seq.wrapping_sub(unsafe { (*me).seq_base });
            // Within 2 GiB either way (what TCP and this limit keep in flight), so the
            // difference of the two 32-bit positions is the signed distance.
            let outstanding = offset.wrapping_sub(acked as u32) as i32;
            return outstanding > KFWD_MAX_UNACKED as i32;
        }
    }
    (st.passed + st.redirected).saturating_sub(acked) > KFWD_MAX_UNACKED
}

/// Most bytes one `bpf_skb_adjust_room` call cuts from a segment's front.
const CUT_STEP: u32 = 0xfff;
/// Calls enough to cut 1 MiB, more than a segment TCP queues can hold (coalesced segments
/// reach about 600 KiB: 17 page fragments of up to 32 KiB).
const CUT_CALLS: u32 = 256;

/// Cuts from the front of the segment the bytes the verdict has already handed on, and
/// returns how many bytes are left (0: all of them were repeats).
///
/// TCP queues a retransmitted segment that partly overlaps bytes it had already received (a
/// sender that retransmits after its segments were dropped under receive-memory pressure)
/// whole, with its own starting sequence number: `tcp_recvmsg` skips the overlap by the
/// socket's `copied_seq`, but `tcp_read_skb`, sockmap's reader, hands the whole segment to
/// this verdict, so without this cut the overlap would be forwarded twice. The verdict keeps
/// the sequence number after the last byte it saw (`FwdState::next_seq`; it sees every byte
/// from the first, the socket being in `ICP_FWD` from its establishment) and reads the
/// segment's own from TCP's control block in the skb (`SKB_CB_OFFSET`). It trusts that read
/// only when the block's `end_seq - seq` is the segment's length (plus one for a FIN); if
/// not (a kernel whose layout differs) it cuts nothing.
#[inline(always)]
fn cut_repeated(ctx: &SkBuffContext, st: &mut FwdState, len: u64) -> u64 {
    let cb = (ctx.skb.skb as *const u8).wrapping_add(SKB_CB_OFFSET);
    // SAFETY: a read of kernel memory through the helper, which fails cleanly on a bad
    // address; the context is the kernel's `struct sk_buff`.
    let Ok([seq, end_seq]) = (unsafe { bpf_probe_read_kernel(cb as *const [u32; 2]) }) else {
        return len;
    };
    let span = u64::from(end_seq.wrapping_sub(seq));
    if span != len && span != len + 1 {
        st.unchecked += 1;
        return len;
    }
    let data_end = seq.wrapping_add(len as u32);
    if st.seq_known == 0 {
        st.seq_known = 1;
        st.next_seq = data_end;
        return len;
    }
    let overlap = st.next_seq.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        st.next_seq = data_end;
        return len;
    }
    let overlap = overlap as u64;
    if overlap >= len {
        st.trimmed += len;
        return 0;
    }
    let mut left = overlap as u32;
    // The overlap made linear at once (one copy), so that each cut below only moves the
    // skb's data pointer instead of pulling 4 KiB from its fragments each time.
    if left > CUT_STEP {
        let _ = ctx.pull_data(left);
    }
    let mut calls = 0;
    while left > 0 && calls < CUT_CALLS {
        let step = if left > CUT_STEP { CUT_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
        calls += 1;
    }
    let cut = overlap - u64::from(left);
    st.trimmed += cut;
    st.uncut += u64::from(left);
    st.next_seq = data_end;
    len - cut
}

#[cgroup_sockopt(setsockopt)]
pub fn answer_setsockopt(ctx: SockoptContext) -> i32 {
    let sopt: *mut bpf_sockopt = ctx.sockopt;
    // SAFETY: reads of the kernel-provided context; `sk` is checked before use, every optval
    // access is bounds-checked against `optval_end` first.
    unsafe {
        let level = (*sopt).level;
        let optname = (*sopt).optname;
        if level != SOL_IP || (optname != SO_ICP_KFWD && optname != SO_ICP_KFWD_ARM) {
            return ALLOW;
        }
        let sk = (*sopt).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).type_ != SOCK_STREAM {
            return REFUSE;
        }
        let start = (*sopt).__bindgen_anon_2.optval as *const u8;
        let end = (*sopt).__bindgen_anon_3.optval_end as *const u8;
        if optname == SO_ICP_KFWD {
            if start.add(4) > end {
                return REFUSE;
            }
            let want = u32::from_ne_bytes([*start, *start.add(1), *start.add(2), *start.add(3)]);
            // Only from a socket carrying a mark: setting `SO_MARK` takes `CAP_NET_ADMIN` or
            // `CAP_NET_RAW`, which the proxy has (it marks its upstream sockets, and a
            // listener while it asks), and a workload that has them needs no trick (a marked
            // socket is not intercepted). Taken from anyone, a workload's sockets would fill
            // `ICP_FWD`, which the whole node shares, and every proxy's connections would be
            // copied. No verdict on `ICP_FWD` (the kernel refused it): nothing would carry
            // the socket's bytes, so the request is refused and the proxy copies them. A
            // withdrawal is always taken.
            if want != 0 && ((*sk).mark == 0 || ICP_FWD_READY.get(0).copied() != Some(1)) {
                return REFUSE;
            }
            let k = ICP_KFWD.get(sk, true);
            if k.is_null() {
                return REFUSE;
            }
            (*k).want = (want != 0) as u32;
        } else {
            if start.add(16) > end {
                return REFUSE;
            }
            let arm: FwdArm = core::ptr::read_unaligned(start.cast());
            let k = ICP_KFWD.get(sk, false);
            if k.is_null() {
                return REFUSE;
            }
            if (*k).inserted == KFWD_CLOSED {
                // Closed (`TCP_CLOSE`) since it was put into the map: it receives nothing
                // more, so there is nothing left to redirect; the arm is a no-op, not a
                // failure (the proxy reads what was passed to it and sees EOF).
                core::ptr::write_volatile(&mut (*sopt).optlen, -1);
                return ALLOW;
            }
            if (*k).inserted != KFWD_IN_MAP {
                return REFUSE;
            }
            let Some(st) = ICP_FWD_STATE.get_ptr_mut((*k).cookie) else {
                return REFUSE;
            };
            if arm.peer == 0 {
                core::ptr::write_volatile(&mut (*st).armed, 0);
                core::ptr::write_volatile(&mut (*st).peer, 0);
            } else {
                // The peer first: the verdict reads `armed`, then `peer`.
                core::ptr::write_volatile(&mut (*st).peer, arm.peer);
                core::ptr::write_volatile(&mut (*st).armed, arm.read + 1);
            }
        }
        core::ptr::write_volatile(&mut (*sopt).optlen, -1);
    }
    ALLOW
}
