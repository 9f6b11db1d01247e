//! The contract between the kernel programs (`interceptor-ebpf`), the loader (`interceptor`)
//! and the proxy, written once: map and program names, map keys and values, counters, the
//! layout version, socket option numbers, the shared defaults and mark parsing.
//!
//! Every type is `#[repr(C)]`, `Copy` and free of implicit padding: where a field exists only
//! to fill a hole it is named `_pad` and the comment says so. Addresses are kept as four
//! `u32` words holding the bytes in network order (the layout of `struct in6_addr`); IPv4
//! addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so one key type serves both families.
//! Ports are in host byte order unless a field says otherwise.
#![no_std]

/// Version of the map layout below. Bump it whenever a key, a value or a map's meaning
/// changes: a loader refuses to reuse pinned maps that carry another version.
pub const LAYOUT_VERSION: u32 = 5;

/// Names of the maps, as pinned under `<pin dir>/maps/`.
pub mod maps {
    pub const LAYOUT: &str = "ICP_LAYOUT";
    pub const CONFIG: &str = "ICP_CONFIG";
    pub const META: &str = "ICP_META";
    pub const PORTS: &str = "ICP_PORTS";
    pub const UIDS: &str = "ICP_UIDS";
    pub const EXCL4: &str = "ICP_EXCL4";
    pub const EXCL6: &str = "ICP_EXCL6";
    pub const INCL4: &str = "ICP_INCL4";
    pub const INCL6: &str = "ICP_INCL6";
    /// Socket storage: the client socket's record.
    pub const CONN: &str = "ICP_CONN";
    /// Socket storage: the proxy's accepted socket's record.
    pub const ACCEPTED: &str = "ICP_ACCEPTED";
    pub const HANDOFF: &str = "ICP_HANDOFF";
    pub const COUNTERS: &str = "ICP_COUNTERS";
    pub const IN_CONFIG: &str = "ICP_IN_CONFIG";
    pub const IN_PORTS: &str = "ICP_IN_PORTS";
    pub const IN_SOCKS: &str = "ICP_IN_SOCKS";
    /// Socket storage (cloned into accepted sockets): the proxy asked for kernel forwarding
    /// on this socket (or on the listener it was accepted from), and its cookie once in `FWD`.
    pub const KFWD: &str = "ICP_KFWD";
    /// SOCKHASH socket cookie -> socket: the proxy's sockets that kernel forwarding may
    /// redirect to; its stream verdict program (`forward_verdict`) runs on their bytes.
    pub const FWD: &str = "ICP_FWD";
    /// Socket cookie -> `FwdState`: each socket of `FWD`, its peer and its counts.
    pub const FWD_STATE: &str = "ICP_FWD_STATE";
    /// Socket cookie -> `FwdFlow`: where each socket of `FWD` stands in its two byte streams
    /// (what its receiver acknowledged, where its received stream starts).
    pub const FWD_FLOW: &str = "ICP_FWD_FLOW";
    /// One `u32`, 1 once the loader has attached kernel forwarding's verdict to `FWD`: until
    /// then the programs refuse the proxy's `SO_ICP_KFWD` (a socket in `FWD` without a verdict
    /// would only cost a psock, its bytes copied by a proxy that believes the kernel carries
    /// them). A verdict attached to the map stays with it, so it is never set back to 0.
    pub const FWD_READY: &str = "ICP_FWD_READY";
    /// All pinned maps, for listing and removal.
    pub const ALL: &[&str] = &[
        LAYOUT, CONFIG, META, PORTS, UIDS, EXCL4, EXCL6, INCL4, INCL6, CONN, ACCEPTED, HANDOFF,
        COUNTERS, IN_CONFIG, IN_PORTS, IN_SOCKS, KFWD, FWD, FWD_STATE, FWD_FLOW, FWD_READY,
    ];
}

/// Names of the programs in the object.
pub mod programs {
    pub const CONNECT4: &str = "redirect_connect4";
    pub const CONNECT6: &str = "redirect_connect6";
    pub const GETPEERNAME4: &str = "restore_getpeername4";
    pub const GETPEERNAME6: &str = "restore_getpeername6";
    pub const SOCK_OPS: &str = "track_sockops";
    pub const GETSOCKOPT: &str = "answer_getsockopt";
    pub const SK_LOOKUP: &str = "steer_inbound";
    /// `cgroup/setsockopt` at the cgroup2 root: the proxy's kernel-forwarding requests.
    pub const SETSOCKOPT: &str = "answer_setsockopt";
    /// `sk_skb/stream_verdict` attached to the `ICP_FWD` map: redirects an armed socket's bytes.
    pub const VERDICT: &str = "forward_verdict";
}

/// Name of the read-only global that tells a loaded instance of the scope programs which
/// scope it serves: the attached cgroup's id, or a network namespace's inode with
/// `INBOUND_SCOPE_BIT` set.
pub const SCOPE_ID_GLOBAL: &str = "SCOPE_ID";

/// Set in the scope id of an inbound scope (a network namespace), so that its id never equals
/// a cgroup id in the maps both kinds share (`ICP_META`, `ICP_COUNTERS`).
pub const INBOUND_SCOPE_BIT: u64 = 1 << 63;

/// Capacities of the maps.
pub mod capacity {
    pub const SCOPES: u32 = 1024;
    pub const PORTS: u32 = 16384;
    pub const UIDS: u32 = 4096;
    pub const CIDRS: u32 = 16384;
    /// Connections between the client's established callback and the proxy's (entries move
    /// into the accepted socket's storage then, or go with the client socket's close). When
    /// full, the connection reaches the proxy without a record and is closed there, counted
    /// as `handoff_failed`.
    pub const HANDOFF: u32 = 262144;
    pub const COUNTERS: u32 = 16384;
    /// Inbound listener sockets: one per family per inbound scope.
    pub const IN_SOCKS: u32 = 2048;
    /// Sockets under kernel forwarding at once (two per connection, `ICP_FWD` and
    /// `ICP_FWD_STATE`). When full, a new socket is not put in, and the proxy copies that
    /// connection's bytes itself (counted there).
    pub const FWD: u32 = 131072;
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `ScopeConfig::flags`: an include list of IPv4 CIDRs is set (destinations outside it pass).
pub const FLAG_INCLUDE4: u32 = 1 << 0;
/// `ScopeConfig::flags`: an include list of IPv6 CIDRs is set.
pub const FLAG_INCLUDE6: u32 = 1 << 1;

/// `ScopeConfig::flags` and `InboundConfig::flags`: when no proxy listens, let traffic go
/// direct (fail open) instead of refusing it (fail closed, the default).
pub const FLAG_FAIL_OPEN: u32 = 1 << 2;
/// `InboundConfig::flags`: an include list of inbound ports is set.
pub const FLAG_INCLUDE_PORTS: u32 = 1 << 3;
/// `ScopeConfig::flags`: the proxy's outbound listener carries the bypass mark (`SO_MARK`,
/// which only `CAP_NET_ADMIN` can set); a listener on the outbound port without it is not
/// the proxy and gets no connection (the scope's policy decides, as with no listener).
pub const FLAG_PROXY_MARKED: u32 = 1 << 4;

/// `ICP_IN_PORTS` values.
pub const IN_PORT_EXCLUDED: u8 = 1;
pub const IN_PORT_INCLUDED: u8 = 2;

/// Settings of one inbound scope (a network namespace), keyed by its scope id in
/// `ICP_IN_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundConfig {
    /// Port of the proxy's inbound listener, host order; connections to it are never steered.
    pub inbound_port: u16,
    /// Fills the hole before `flags`.
    pub _pad: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// Key of `ICP_IN_SOCKS`: the proxy's inbound listener of one family for one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockKey {
    pub scope: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Fills the struct to a multiple of 8 bytes.
    pub _pad: u32,
}

/// Settings of one attached scope (a cgroup), keyed by the cgroup id in `ICP_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeConfig {
    /// Port of the proxy's outbound listener (127.0.0.1 and ::1), host order.
    pub proxy_port: u16,
    /// Fills the hole before `bypass_mark`.
    pub _pad: u16,
    /// Sockets with this SO_MARK are never redirected. 0 disables the check.
    pub bypass_mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Fills the struct to a multiple of 8 bytes.
    pub _pad2: u32,
}

/// Longest cgroup path kept for `status`.
pub const META_PATH_LEN: usize = 504;

/// What the loader remembers of a scope, for `status`; the kernel reads it only to answer
/// `SO_ICP_WORKLOAD` with the path.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ScopeMeta {
    /// Length of `path` in bytes.
    pub path_len: u32,
    /// Fills the hole before `path`.
    pub _pad: u32,
    /// The cgroup (or network namespace) path as given at attach time, made absolute (UTF-8,
    /// not NUL-terminated).
    pub path: [u8; META_PATH_LEN],
}

/// Key of the per-scope port and uid sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopedValue {
    pub scope: u64,
    pub value: u32,
    /// Fills the struct to a multiple of 8 bytes.
    pub _pad: u32,
}

/// Data part of an IPv4 LPM key: the scope's 64 bits come first, so the prefix length of a
/// CIDR `a.b.c.d/n` is `64 + n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopedV4 {
    /// Scope id, big-endian bytes so it sorts as a prefix.
    pub scope: [u8; 8],
    /// Address bytes in network order.
    pub addr: [u8; 4],
}

/// Data part of an IPv6 LPM key (prefix length `64 + n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopedV6 {
    pub scope: [u8; 8],
    pub addr: [u8; 16],
}

/// Prefix bits taken by the scope in an LPM key.
pub const LPM_SCOPE_BITS: u32 = 64;

/// The original destination of an intercepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address in network order; IPv4 as IPv4-mapped when `family` is `AF_INET`.
    pub addr: [u32; 4],
    /// Port, host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the original destination.
    pub family: u16,
    /// Fills the hole before `scope`.
    pub _pad: u32,
    /// The scope (cgroup id) whose program redirected the connection.
    pub scope: u64,
}

/// The connection between workload and proxy, as both ends see it, in its network
/// namespace. The client's socket fills it at the established hand-off; the proxy's
/// accepted socket looks it up. Without the namespace, two pods' connections from
/// 127.0.0.1:P to their own proxies at 127.0.0.1:15001 would share one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleKey {
    /// `bpf_get_netns_cookie` of the namespace both sockets live in.
    pub netns: u64,
    /// Client (workload) address, IPv4-mapped for IPv4.
    pub client_addr: [u32; 4],
    /// Proxy listener address, IPv4-mapped for IPv4.
    pub proxy_addr: [u32; 4],
    /// Client port, host order.
    pub client_port: u16,
    /// Proxy port, host order.
    pub proxy_port: u16,
    /// Fills the hole before the 8-byte alignment; always 0.
    pub _pad: u32,
}

/// Key of the per-CPU decision counters. Scope 0 holds what belongs to no scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub scope: u64,
    pub counter: u32,
    /// Fills the struct to a multiple of 8 bytes.
    pub _pad: u32,
}

/// The decisions the programs count. The discriminant is the `counter` field of `CounterKey`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() rewritten to the proxy.
    Redirected = 0,
    /// Socket mark equal to the bypass mark.
    BypassMark = 1,
    /// Socket owner's uid in the bypass set.
    BypassUid = 2,
    /// Destination port excluded.
    ExcludedPort = 3,
    /// Destination inside an excluded CIDR.
    ExcludedCidr = 4,
    /// Destination outside the include list.
    NotIncluded = 5,
    /// Destination is the proxy's own listener.
    ToProxy = 6,
    /// getsockopt(SO_ORIGINAL_DST) answered from a record.
    OrigDstAnswered = 7,
    /// getsockopt(SO_ORIGINAL_DST) asked for a socket without a record (left as the kernel said).
    OrigDstMissing = 8,
    /// A record could not be stored; the scope's policy decided (closed: the connect failed
    /// with `EPERM`; open: it went direct).
    RecordFailed = 9,
    /// No proxy listened on the outbound port: connect refused (fail closed).
    ProxyDownRefused = 10,
    /// No proxy listened on the outbound port: connect went direct (fail open).
    ProxyDownDirect = 11,
    /// Inbound connection steered into the proxy's inbound listener.
    InboundRedirected = 12,
    /// Inbound connection from a loopback source (the proxy forwarding, or the workload
    /// itself) left to the workload.
    InboundLoopback = 13,
    /// Inbound connection to an excluded port left to the workload.
    InboundExcludedPort = 14,
    /// Inbound connection to a port outside the include list left to the workload.
    InboundNotIncluded = 15,
    /// No inbound listener registered: connection refused (fail closed).
    InboundProxyDownRefused = 16,
    /// No inbound listener registered: connection went to the workload directly (fail open).
    InboundProxyDownDirect = 17,
    /// A redirected connection's record could not be handed to the proxy's side
    /// (`ICP_HANDOFF` full, or no storage on the accepted socket): the proxy gets no original
    /// destination and closes the connection.
    HandoffFailed = 18,
    /// getsockopt(SO_ORIGINAL_DST or SO_ICP_WORKLOAD) on a redirected connection by a process
    /// that is not the proxy (neither root nor a bypass uid of the scope): not answered.
    OrigDstNotProxy = 19,
    /// A socket that is not the proxy's listens on the outbound port (its listener lacks the
    /// bypass mark): no connection is sent there; the scope's policy decided (closed: the
    /// connect failed with `EPERM`; open: it went direct).
    ListenerNotProxy = 20,
}

impl Counter {
    pub const ALL: [Counter; 21] = [
        Counter::Redirected,
        Counter::BypassMark,
        Counter::BypassUid,
        Counter::ExcludedPort,
        Counter::ExcludedCidr,
        Counter::NotIncluded,
        Counter::ToProxy,
        Counter::OrigDstAnswered,
        Counter::OrigDstMissing,
        Counter::RecordFailed,
        Counter::ProxyDownRefused,
        Counter::ProxyDownDirect,
        Counter::InboundRedirected,
        Counter::InboundLoopback,
        Counter::InboundExcludedPort,
        Counter::InboundNotIncluded,
        Counter::InboundProxyDownRefused,
        Counter::InboundProxyDownDirect,
        Counter::HandoffFailed,
        Counter::OrigDstNotProxy,
        Counter::ListenerNotProxy,
    ];

    /// The counters of an outbound (cgroup) scope.
    pub const OUTBOUND: [Counter; 15] = [
        Counter::Redirected,
        Counter::BypassMark,
        Counter::BypassUid,
        Counter::ExcludedPort,
        Counter::ExcludedCidr,
        Counter::NotIncluded,
        Counter::ToProxy,
        Counter::OrigDstAnswered,
        Counter::OrigDstMissing,
        Counter::RecordFailed,
        Counter::ProxyDownRefused,
        Counter::ProxyDownDirect,
        Counter::HandoffFailed,
        Counter::OrigDstNotProxy,
        Counter::ListenerNotProxy,
    ];

    /// The counters of an inbound (network namespace) scope.
    pub const INBOUND: [Counter; 6] = [
        Counter::InboundRedirected,
        Counter::InboundLoopback,
        Counter::InboundExcludedPort,
        Counter::InboundNotIncluded,
        Counter::InboundProxyDownRefused,
        Counter::InboundProxyDownDirect,
    ];

    /// Stable name used in `stats` output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::BypassMark => "bypass_mark",
            Counter::BypassUid => "bypass_uid",
            Counter::ExcludedPort => "excluded_port",
            Counter::ExcludedCidr => "excluded_cidr",
            Counter::NotIncluded => "not_included",
            Counter::ToProxy => "to_proxy",
            Counter::OrigDstAnswered => "orig_dst_answered",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::RecordFailed => "record_failed",
            Counter::ProxyDownRefused => "proxy_down_refused",
            Counter::ProxyDownDirect => "proxy_down_direct",
            Counter::InboundRedirected => "inbound_redirected",
            Counter::InboundLoopback => "inbound_loopback",
            Counter::InboundExcludedPort => "inbound_excluded_port",
            Counter::InboundNotIncluded => "inbound_not_included",
            Counter::InboundProxyDownRefused => "inbound_proxy_down_refused",
            Counter::InboundProxyDownDirect => "inbound_proxy_down_direct",
            Counter::HandoffFailed => "handoff_failed",
            Counter::OrigDstNotProxy => "orig_dst_not_proxy",
            Counter::ListenerNotProxy => "listener_not_proxy",
        }
    }

    pub fn from_u32(v: u32) -> Option<Counter> {
        Counter::ALL.get(v as usize).copied()
    }
}

/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`) share 80.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `getsockopt(SOL_IP, SO_ICP_WORKLOAD)` on the proxy's accepted socket: the calling
/// workload of an intercepted connection (its scope's cgroup path, as given at attach).
/// Linux defines no option with this number at `SOL_IP`.
pub const SO_ICP_WORKLOAD: i32 = 0x4943;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// `setsockopt(SOL_IP, SO_ICP_KFWD, &u32)`: 1 asks for kernel forwarding of this socket (a
/// listener's accepted sockets inherit it; an upstream socket asks before `connect()`), 0
/// withdraws the request. The root `cgroup/setsockopt` program answers it (the kernel itself
/// has no option with this number: `ENOPROTOOPT` means the programs are not attached, which
/// is how the proxy probes). A socket that asked is put into `ICP_FWD` when established.
pub const SO_ICP_KFWD: i32 = 0x4944;
/// `setsockopt(SOL_IP, SO_ICP_KFWD_ARM, &FwdArm)` on a socket in `ICP_FWD`: pair it with the
/// socket `peer` (0: disarm) once its user has read `read` bytes of it. `ENOENT`: the socket
/// is not in `ICP_FWD` (the proxy copies itself).
pub const SO_ICP_KFWD_ARM: i32 = 0x4945;

/// Most bytes of one direction that the verdict lets be outstanding (handed to the peer
/// socket or queued for it, not yet acknowledged by the peer's receiver) and still redirects
/// more. Beyond it the verdict passes the source's bytes to the proxy, which writes them once
/// the peer has room, and the source's own receive buffer holds its sender back: sockmap
/// queues redirected bytes for a socket without any limit of its own and the source's TCP
/// counts them as read, so a sender faster than the peer's sending (a slow receiver, or the
/// kernel worker that sends the queue falling behind) made the kernel hold gigabytes for one
/// connection. 16 MiB: the peer's send buffer (4 MiB at most by default, `tcp_wmem`) and as
/// much again three times over queued for it; with 4 MiB a 1 GiB download to a client that
/// only counted its bytes went over it all the time and the proxy copied 43 % of it, with
/// 16 MiB 12 to 15 %.
pub const KFWD_MAX_UNACKED: u64 = 16 << 20;

/// Value of `ICP_FWD_FLOW`, keyed by socket cookie: written by `track_sockops` when the socket
/// goes into `ICP_FWD` and at each of its RTT samples, read by the verdict of its peer (`acked`)
/// and by its own (`seq_base`).
///
/// A connection's two sockets carry the same byte stream each way (the proxy forwards every
/// byte and adds none), so a segment's offset in the stream its source receives
/// (`seq - seq_base`) is also its offset in the stream its peer sends, and
/// `offset - (acked - acked_base)` is how many bytes before it the peer's receiver has not
/// acknowledged yet: wherever they are (read by the proxy or not, written or not, queued by
/// the kernel, in flight).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdFlow {
    /// `bytes_acked` at the socket's last RTT sample.
    pub acked: u64,
    /// `bytes_acked` when it went into the map (its handshake).
    pub acked_base: u64,
    /// `rcv_nxt` when it went into the map: the sequence number of the first byte it receives.
    pub seq_base: u32,
    pub _pad: u32,
}

/// The value of `SO_ICP_KFWD_ARM`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdArm {
    /// Socket cookie (`SO_COOKIE`) of the peer socket; 0 disarms.
    pub peer: u64,
    /// Bytes the caller has read from this socket since it was established (and written to
    /// the peer before arming).
    pub read: u64,
}

/// Value of `ICP_FWD_STATE`, keyed by socket cookie. Written by the `setsockopt` program
/// (`peer`, `armed`) and the verdict program (`passed`, `redirected`), both under the
/// socket's lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdState {
    /// Cookie of the peer socket; 0 while not armed.
    pub peer: u64,
    /// `FwdArm::read + 1` of the last arm; 0 while not armed. The verdict redirects only
    /// while `armed - 1 == passed`: every byte it passed to the socket has been read by its
    /// user (and written to the peer), so a redirected byte never overtakes one of them.
    pub armed: u64,
    /// Bytes the verdict passed to the socket (for its user to read).
    pub passed: u64,
    /// Bytes the verdict redirected to the peer.
    pub redirected: u64,
    /// TCP sequence number just after the last data byte the verdict has seen (valid once
    /// `seq_known` is 1): a segment that starts before it repeats bytes already handed on.
    pub next_seq: u32,
    /// 1 once `next_seq` holds a sequence number.
    pub seq_known: u32,
    /// Bytes the verdict cut from the front of segments because they repeated bytes already
    /// handed on (a retransmitted segment partly overlapping what had been received).
    pub trimmed: u64,
    /// Repeated bytes the verdict found but could not cut (`bpf_skb_adjust_room` failed).
    pub uncut: u64,
    /// Segments whose TCP control block did not read as expected (nothing cut in them).
    pub unchecked: u64,
}

/// Offset of `cb` in the kernel's `struct sk_buff`, where TCP keeps a received segment's
/// `struct tcp_skb_cb` (`seq` at 0, `end_seq` at 4). The same on every 64-bit kernel the
/// project supports (`next`, `prev`, `dev`, `sk`, `tstamp` before it); the verdict checks it on
/// every segment (`end_seq - seq` must be the segment's length) and trims nothing otherwise.
pub const SKB_CB_OFFSET: usize = 40;

/// Value of `ICP_KFWD` (socket storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KfwdSock {
    /// 1: kernel forwarding asked for (`SO_ICP_KFWD`).
    pub want: u32,
    /// `KFWD_IN_MAP`: the socket is in `ICP_FWD` (and `ICP_FWD_STATE`) under `cookie`;
    /// `KFWD_CLOSED`: it was, until it reached `TCP_CLOSE` (its counts are kept below, for
    /// the proxy that still holds it and reads what the kernel passed it).
    pub inserted: u32,
    /// The socket's cookie, once inserted.
    pub cookie: u64,
    /// `FwdState::passed`, `FwdState::redirected` and `FwdState::trimmed` when it reached
    /// `TCP_CLOSE`.
    pub passed: u64,
    pub redirected: u64,
    pub trimmed: u64,
    pub uncut: u64,
    pub unchecked: u64,
}

/// `KfwdSock::inserted` values.
pub const KFWD_IN_MAP: u32 = 1;
pub const KFWD_CLOSED: u32 = 2;

/// Defaults of the conventions that the kernel programs, the loader and the proxy share
/// (DESIGN.md's port and mark table). Each side takes them from here.
pub mod defaults {
    /// The proxy's outbound listener port (on 127.0.0.1 and ::1).
    pub const OUTBOUND_PORT: u16 = 15001;
    /// The proxy's inbound listener port (on 0.0.0.0 and ::).
    pub const INBOUND_PORT: u16 = 15006;
    /// The proxy's admin port (on 127.0.0.1).
    pub const ADMIN_PORT: u16 = 15000;
    /// Socket mark that the programs exempt and the proxy sets on its upstream sockets.
    pub const BYPASS_MARK: u32 = 0x539;
    /// Uid whose sockets the programs exempt (the proxy's user in sidecar deployments).
    pub const BYPASS_UID: u32 = 1337;
    /// Source address of the proxy's inbound hop to the workload (IPv4).
    pub const INBOUND_SOURCE4: [u8; 4] = [127, 0, 0, 6];
    /// Source address of the proxy's inbound hop to the workload (IPv6): ::1, which the
    /// inbound program lets through like every loopback source.
    pub const INBOUND_SOURCE6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
}

/// Why a socket mark did not parse (see [`parse_mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMark;

/// The accepted spellings of a mark, for error messages.
pub const MARK_SYNTAX: &str = "a 32-bit number, hex (0x539) or decimal (1337)";

/// Parses a socket mark as the loader and the proxy both accept it: hex (`0x539`, `0X539`)
/// or decimal (`1337`), surrounding whitespace ignored.
pub fn parse_mark(s: &str) -> Result<u32, BadMark> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| BadMark)
}

/// Builds the IPv4-mapped form of an IPv4 address given in network order.
#[inline(always)]
pub const fn mapped_v4(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::to_be(0x0000_ffff), ip4_be]
}

/// Whether a network-order address is IPv4-mapped.
#[inline(always)]
pub const fn is_mapped_v4(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::to_be(0x0000_ffff)
}

/// `aya::Pod` for the map types, so the loader can read and write them (feature `user`).
#[cfg(feature = "user")]
#[allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait: it promises a plain, fully initialised byte layout"
)]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: the type is #[repr(C)] and Copy, of integers and integer arrays only,
            // with no implicit padding (explicit `_pad` fields where needed; the test
            // `sizes_have_no_implicit_padding` checks every size).
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        ScopeConfig,
        ScopeMeta,
        ScopedValue,
        ScopedV4,
        ScopedV6,
        OrigDst,
        TupleKey,
        CounterKey,
        InboundConfig,
        SockKey,
        FwdState,
        KfwdSock,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<ScopeConfig>(), 16);
        assert_eq!(size_of::<ScopeMeta>(), 8 + META_PATH_LEN);
        assert_eq!(size_of::<ScopedValue>(), 16);
        assert_eq!(size_of::<ScopedV4>(), 12);
        assert_eq!(size_of::<ScopedV6>(), 24);
        assert_eq!(size_of::<OrigDst>(), 32);
        assert_eq!(size_of::<TupleKey>(), 48);
        assert_eq!(size_of::<CounterKey>(), 16);
        assert_eq!(size_of::<InboundConfig>(), 8);
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(size_of::<FwdArm>(), 16);
        assert_eq!(size_of::<FwdState>(), 64);
        assert_eq!(size_of::<KfwdSock>(), 56);
    }

    #[test]
    fn mapped_v4_round_trip() {
        let ip = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let m = mapped_v4(ip);
        assert!(is_mapped_v4(&m));
        assert!(!is_mapped_v4(&[0, 0, 0, u32::to_be(1)]));
        let bytes: [u8; 4] = m[2].to_ne_bytes();
        assert_eq!(bytes, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn marks_parse_in_hex_and_decimal() {
        assert_eq!(parse_mark("0x539"), Ok(0x539));
        assert_eq!(parse_mark(" 0X539 "), Ok(1337));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert_eq!(parse_mark("0"), Ok(0));
        assert_eq!(parse_mark("0x1_0000_0000"), Err(BadMark));
        assert_eq!(parse_mark("4294967296"), Err(BadMark));
        assert_eq!(parse_mark("mark"), Err(BadMark));
        assert_eq!(parse_mark(""), Err(BadMark));
    }

    #[test]
    fn counters_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            assert_eq!(Counter::from_u32(i as u32), Some(*c));
        }
    }
}
