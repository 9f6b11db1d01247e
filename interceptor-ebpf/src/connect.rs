//! Outbound interception at `connect()`: `redirect_connect4` and `redirect_connect6`, attached
//! to the workload's cgroup, and the decision they share. A connect is left alone when it is
//! exempt (bypass mark or uid, the proxy itself, an excluded port or CIDR, outside the include
//! list); otherwise it is rewritten to the proxy's outbound listener and its original
//! destination recorded in the socket's own storage (`ICP_CONN`), or, with no proxy listening
//! (nobody, or with `FLAG_PROXY_MARKED` a listener without the bypass mark) or no record
//! possible, the scope's policy decides (refuse or go direct). Only TCP sockets are considered.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_get_current_uid_gid, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use interceptor_common::{
    is_mapped_v4, mapped_v4, Counter, OrigDst, ScopeConfig, ScopedV4, ScopedV6, ScopedValue,
    AF_INET, AF_INET6, FLAG_FAIL_OPEN, FLAG_INCLUDE4, FLAG_INCLUDE6, FLAG_PROXY_MARKED,
    LPM_SCOPE_BITS,
};

use crate::{
    counters::count,
    ctx::{is_loopback4, rd, ALLOW, IPPROTO_TCP, LOOPBACK4, LOOPBACK6, REFUSE, SOCK_STREAM},
    maps::{
        scope_id, ICP_CONFIG, ICP_CONN, ICP_EXCL4, ICP_EXCL6, ICP_INCL4, ICP_INCL6, ICP_PORTS,
        ICP_UIDS,
    },
};

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

/// Who listens on the proxy's outbound port.
enum Listener {
    /// Nobody.
    None,
    /// The proxy (with `FLAG_PROXY_MARKED`: a listener carrying the bypass mark).
    Proxy,
    /// A socket without the bypass mark: not the proxy, whoever owns it.
    Other,
}

/// Who listens on the proxy's port, on 127.0.0.1 (`v6` false) or ::1, in the network
/// namespace of the connecting socket. With `FLAG_PROXY_MARKED` only a listener whose
/// `SO_MARK` is the bypass mark (which needs `CAP_NET_ADMIN` or `CAP_NET_RAW` to set) is the proxy.
#[inline(always)]
fn listener(ctx: &SockAddrContext, cfg: &ScopeConfig, v6: bool) -> Listener {
    // SAFETY: a zeroed tuple is valid; the helper gets its exact size for the family, and a
    // socket it returns is read (a `bpf_sock` field) and released before returning.
    unsafe {
        let mut tuple: bpf_sock_tuple = core::mem::zeroed();
        let size = if v6 {
            tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK6;
            tuple.__bindgen_anon_1.ipv6.dport = cfg.proxy_port.to_be();
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv6)
        } else {
            tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4;
            tuple.__bindgen_anon_1.ipv4.dport = cfg.proxy_port.to_be();
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
            return Listener::None;
        }
        let marked = (*sk).mark == cfg.bypass_mark;
        bpf_sk_release(sk.cast());
        if cfg.flags & FLAG_PROXY_MARKED == 0 || marked {
            Listener::Proxy
        } else {
            Listener::Other
        }
    }
}

/// What to do with a connect while no proxy listens.
enum ProxyDown {
    /// A proxy listens: redirect and record as usual.
    No,
    /// Fail open: leave the connect alone.
    Direct,
    /// Fail closed, nobody listening: send it to the proxy's port, where it is refused;
    /// nothing to record.
    Refuse,
    /// Fail closed, a socket that is not the proxy listening there: fail the connect.
    RefuseHere,
}

/// With no proxy listening, the scope's policy decides.
#[inline(always)]
fn proxy_down(ctx: &SockAddrContext, scope: u64, cfg: &ScopeConfig, v6: bool) -> ProxyDown {
    let open = cfg.flags & FLAG_FAIL_OPEN != 0;
    match listener(ctx, cfg, v6) {
        Listener::Proxy => ProxyDown::No,
        Listener::None if open => ProxyDown::Direct,
        Listener::None => ProxyDown::Refuse,
        Listener::Other => {
            count(scope, Counter::ListenerNotProxy);
            if open {
                ProxyDown::Direct
            } else {
                ProxyDown::RefuseHere
            }
        }
    }
}

/// Records the original destination in the socket's own storage (`ICP_CONN`), which the
/// kernel frees with the socket. False if it could not.
#[inline(always)]
fn record(sk: *mut bpf_sock, scope: u64, family: u16, addr: [u32; 4], port: u16) -> bool {
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the connecting socket, checked non-null.
    let rec = unsafe { ICP_CONN.get(sk, true) };
    if rec.is_null() {
        return false;
    }
    // SAFETY: a valid pointer to this socket's record for this program run.
    unsafe {
        *rec = OrigDst {
            addr,
            port,
            family,
            _pad: 0,
            scope,
        };
    }
    true
}

/// What the connect programs do with one connect.
enum Verdict {
    /// Leave the address alone (the reason is counted).
    Leave,
    /// Rewrite the address to the proxy's port, counting this.
    ToProxy(Counter),
    /// Fail the connect (`EPERM`): the scope is fail-closed and no record could be kept, or a
    /// socket that is not the proxy listens on its port.
    Refuse,
}

/// The whole decision for one connect, shared by both families.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    scope: u64,
    cfg: &ScopeConfig,
    sk: *mut bpf_sock,
    family: u16,
    addr: [u32; 4],
    port: u16,
) -> Verdict {
    let verdict = decide_inner(ctx, scope, cfg, sk, family, addr, port);
    if !matches!(verdict, Verdict::ToProxy(Counter::Redirected)) && !sk.is_null() {
        // A TCP socket may connect again after a failed connect: a record of an earlier
        // redirected attempt must not outlive this decision.
        // SAFETY: `sk` is the connecting socket, checked non-null.
        unsafe { ICP_CONN.delete(sk) };
    }
    verdict
}

#[inline(always)]
fn decide_inner(
    ctx: &SockAddrContext,
    scope: u64,
    cfg: &ScopeConfig,
    sk: *mut bpf_sock,
    family: u16,
    addr: [u32; 4],
    port: u16,
) -> Verdict {
    if let Some(why) = exemption(scope, cfg, sk, family, &addr, port) {
        count(scope, why);
        return Verdict::Leave;
    }
    match proxy_down(ctx, scope, cfg, family == AF_INET6) {
        ProxyDown::Direct => {
            count(scope, Counter::ProxyDownDirect);
            Verdict::Leave
        }
        ProxyDown::Refuse => Verdict::ToProxy(Counter::ProxyDownRefused),
        ProxyDown::RefuseHere => {
            count(scope, Counter::ProxyDownRefused);
            Verdict::Refuse
        }
        ProxyDown::No if record(sk, scope, family, addr, port) => {
            Verdict::ToProxy(Counter::Redirected)
        }
        ProxyDown::No => {
            // No record, no silent bypass: the scope's policy decides.
            count(scope, Counter::RecordFailed);
            if cfg.flags & FLAG_FAIL_OPEN != 0 {
                Verdict::Leave
            } else {
                Verdict::Refuse
            }
        }
    }
}

/// Whether the outbound programs consider this socket at all: TCP only (a `SOCK_STREAM`
/// socket may be SCTP or another protocol, which the proxy cannot take).
///
/// # Safety
/// `sa` is the program's context.
#[inline(always)]
unsafe fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: per the contract above.
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed; fields are read and written whole.
    unsafe {
        if !is_tcp(sa) {
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
        let outcome = match decide(&ctx, scope, cfg, sk, AF_INET, addr, port) {
            Verdict::Leave => return ALLOW,
            Verdict::Refuse => return REFUSE,
            Verdict::ToProxy(c) => c,
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
        if !is_tcp(sa) {
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
        let outcome = match decide(&ctx, scope, cfg, sk, family, addr, port) {
            Verdict::Leave => return ALLOW,
            Verdict::Refuse => return REFUSE,
            Verdict::ToProxy(c) => c,
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
