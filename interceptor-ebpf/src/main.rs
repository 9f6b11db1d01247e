//! Kernel programs of the interceptor: one object, loaded once per scope (the loader sets the
//! read-only global `SCOPE_ID` to the scope's id before each load), every map shared by all
//! loads and pinned by name under `<pin dir>/maps/`.
//!
//! Outbound, per scope (a workload cgroup):
//! * `redirect_connect4` / `redirect_connect6` ([`connect`]) decide, per `connect()`, whether
//!   to send the socket to the proxy's outbound listener, and record the original destination
//!   in the socket's own storage (`ICP_CONN`).
//! * `restore_getpeername4` / `restore_getpeername6` ([`getpeername`]) make `getpeername()` on
//!   a redirected socket report the original destination, so the workload never sees the
//!   proxy's address.
//!
//! Outbound, once at the cgroup2 root (the proxy usually runs outside the workload's cgroup):
//! * `track_sockops` ([`sockops`]) puts a record under the connection's 4-tuple
//!   (`ICP_HANDOFF`) when the client's connection is established, and moves it into the
//!   proxy's accepted socket's storage (`ICP_ACCEPTED`) when that side is.
//! * `answer_getsockopt` ([`getsockopt`]) answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`
//!   and `SO_ICP_WORKLOAD` on the proxy's accepted socket from that record.
//!
//! Kernel forwarding, for the proxy's opaque connections ([`forward`]):
//! * `answer_setsockopt` (`cgroup/setsockopt` at the cgroup2 root) takes the proxy's request
//!   (`SO_ICP_KFWD`) and its arming of a pair (`SO_ICP_KFWD_ARM`);
//! * `forward_verdict` (`sk_skb/stream_verdict` on the `ICP_FWD` map) redirects an armed
//!   socket's bytes to its peer.
//!
//! Inbound, per scope (a network namespace):
//! * `steer_inbound` ([`sk_lookup`]) steers new connections into the proxy's inbound listener
//!   (`ICP_IN_SOCKS`), rewriting nothing.
//!
//! Shared pieces: the maps and the `SCOPE_ID` global ([`maps`]), the decision counters and
//! their debug log lines ([`counters`]), context reads and kernel constants ([`ctx`]). The
//! map layout and the names the loader looks up live in `interceptor-common`.
#![no_std]
#![no_main]
// For the atomic add on counters: the bpf target's `AtomicU64` has no `fetch_add`.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Kernel programs read and write the kernel's context structures through raw pointers, call
// BPF helpers (all `unsafe fn`) and export symbols (`no_mangle`, `link_section`): unsafe is
// their medium, so it is allowed in this crate; each block says why it is sound.
#![allow(unsafe_code)]

mod connect;
mod counters;
mod ctx;
mod forward;
mod getpeername;
mod getsockopt;
mod maps;
mod sk_lookup;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
