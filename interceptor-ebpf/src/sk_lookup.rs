//! Inbound interception: `steer_inbound`, attached to the workload's network namespace,
//! steers new TCP connections into the proxy's inbound listener at socket lookup.
use aya_ebpf::{
    bindings::{
        bpf_sk_lookup,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::sk_lookup,
    programs::SkLookupContext,
};
use interceptor_common::{
    defaults, is_mapped_v4, mapped_v4, Counter, ScopedValue, SockKey, AF_INET, AF_INET6,
    FLAG_FAIL_OPEN, FLAG_INCLUDE_PORTS, IN_PORT_EXCLUDED, IN_PORT_INCLUDED,
};

use crate::{
    counters::count,
    ctx::{is_loopback4, rd, IPPROTO_TCP, LOOPBACK6},
    maps::{scope_id, ICP_IN_CONFIG, ICP_IN_PORTS, ICP_IN_SOCKS},
};

/// Steers new inbound TCP connections of a network namespace into the proxy's inbound
/// listener (`ICP_IN_SOCKS`), rewriting nothing: the accepted socket's local address is the
/// destination the peer dialled. Connections from loopback sources (the proxy forwarding from
/// 127.0.0.6 or ::1, or the workload itself), to the proxy's own port, to excluded ports or to
/// ports outside the include list go where they were going.
// The proxy's hop to the workload passes because its source is a loopback address.
const _: () = assert!(
    defaults::INBOUND_SOURCE4[0] == 127,
    "the proxy's inbound source must be in 127.0.0.0/8, which steer_inbound lets through"
);

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let l: *mut bpf_sk_lookup = ctx.lookup;
    // SAFETY: every field is read once, unconditionally, from the kernel-provided context
    // (see `ctx::rd` for why).
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
    // By reference, as clippy would not have it: passing the key by value here costs the
    // program 11 more instructions (a copy of it on the stack).
    // SAFETY: read-only use of the value for this program run.
    #[allow(clippy::needless_borrows_for_generic_args)]
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
