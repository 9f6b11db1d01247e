//! Reading the kernel's context structs the way the verifier accepts, and the kernel
//! constants and addresses the programs compare against.

/// `SOCK_STREAM`: only TCP sockets are intercepted.
pub(crate) const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP`, as `bpf_sk_lookup::protocol` and `bpf_sock_addr::protocol` give it.
pub(crate) const IPPROTO_TCP: u32 = 6;
/// A `cgroup_sock_addr` program's verdict: let the call go on (with or without a rewritten
/// address).
pub(crate) const ALLOW: i32 = 1;
/// A `cgroup_sock_addr` program's verdict: fail the call with `EPERM`.
pub(crate) const REFUSE: i32 = 0;

/// 127.0.0.1 in network order, as the context structs hold addresses.
pub(crate) const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 in network order.
pub(crate) const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Whether an IPv4 address (network order) is in 127.0.0.0/8.
#[inline(always)]
pub(crate) fn is_loopback4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

/// Reads a context field with a load of its own size at its own offset: the verifier rejects
/// context loads through a computed pointer, which LLVM would otherwise produce when it merges
/// the reads of two branches. For the same reason a program that needs fields of either
/// family reads every one of them once, unconditionally, before the family decides which to
/// use: with the reads inside the branches LLVM shares one load through a computed context
/// pointer.
#[inline(always)]
pub(crate) fn rd(p: *const u32) -> u32 {
    // SAFETY: `p` points at a readable field of the kernel-provided context.
    unsafe { core::ptr::read_volatile(p) }
}
