//! Connects that fail after the outbound program has seen them (`icpt-probe escape`): the
//! paths by which a workload could once make the kernel keep a record for a socket that never
//! connected, until the record map was full and every scope went unproxied
//! (`tests/escape.rs`). Each attempt is one socket, one `connect()`, one close; the report
//! counts the outcomes by errno.
use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `IPPROTO_SCTP`: a `SOCK_STREAM` socket that is not TCP.
const IPPROTO_SCTP: i32 = 132;

/// Most connections `port-exhaust` holds open before it expects `EADDRNOTAVAIL`.
const MAX_HELD: usize = 256;

/// The failure paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EscapeKind {
    /// An `AF_INET6` socket with `IPV6_V6ONLY=1` connecting to `::ffff:ADDR`: the redirected
    /// address is IPv4-mapped too, so the connect fails (`ENETUNREACH`).
    V6only,
    /// Connections to ADDR (redirected to the proxy) held open until the namespace's
    /// ephemeral ports toward the proxy are used up; then each further connect fails
    /// (`EADDRNOTAVAIL`). The test narrows `net.ipv4.ip_local_port_range` first.
    PortExhaust,
    /// A connected socket with `SO_REUSEADDR` bound to 127.0.0.1:P, then sockets bound to the
    /// same address and port with `SO_REUSEADDR` connecting to ADDR: after the redirect their
    /// 4-tuple is the first one's, so the connect fails (`EADDRNOTAVAIL`).
    Reuseaddr,
    /// `SOCK_STREAM` sockets of protocol SCTP (non-blocking connect, then close).
    Sctp,
    /// TCP sockets that ask the interceptor's programs for kernel forwarding
    /// (`setsockopt(SOL_IP, SO_ICP_KFWD, 1)`, the proxy's request) before connecting to ADDR;
    /// the outcomes are the request's. The connections are held until each was asked
    /// whether the kernel put it into its forwarding map (`in_kernel_map`): a workload's
    /// socket there takes a place the proxy's connections need, and its bytes run the
    /// kernel's verdict.
    KernelForward,
}

/// What `escape` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscapeReport {
    /// Failing connects attempted (the connections held open are not counted).
    pub attempts: u64,
    /// Outcomes of the attempts by errno name (`ENETUNREACH`, ...), `connected` for a connect
    /// that succeeded and `in_progress` for a non-blocking one under way.
    pub outcomes: BTreeMap<String, u64>,
    /// Connections held open during the attempts (`port-exhaust`, `reuseaddr`).
    pub held: u64,
    /// The socket type is not supported by this kernel (SCTP without its module): nothing ran.
    pub unsupported: Option<String>,
    /// `kernel-forward`: held connections the kernel put into its forwarding map (its
    /// `getsockopt(SOL_IP, SO_ICP_KFWD_ARM)` answers with their counts).
    #[serde(default)]
    pub in_kernel_map: u64,
    pub elapsed_ms: u64,
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", nix::errno::Errno::from_raw(n)),
        None => format!("{:?}", e.kind()),
    }
}

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "connected".to_string(),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => "in_progress".to_string(),
        Err(e) => errno_name(&e),
    }
}

/// `setsockopt(SOL_IP, SO_ICP_KFWD, 1)`: the request the proxy makes on its sockets.
fn ask_kernel_forward(s: &Socket) -> io::Result<()> {
    let on: u32 = 1;
    // SAFETY: `on` is valid for reads of its size for the call; the fd is the socket's own.
    // The option is the interceptor's (no crate knows it), so the raw call it is.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            interceptor_common::SOL_IP,
            interceptor_common::SO_ICP_KFWD,
            (&on as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the kernel holds `s` in its forwarding map: the programs then answer
/// `getsockopt(SOL_IP, SO_ICP_KFWD_ARM)` with the socket's counts; otherwise the kernel
/// does (`ENOPROTOOPT`).
fn in_kernel_map(s: &Socket) -> bool {
    let mut buf = [0u8; 64];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for writes of `len` bytes and `len` for a write of its own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            interceptor_common::SOL_IP,
            interceptor_common::SO_ICP_KFWD_ARM,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    rc == 0 && len > 0
}

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("escape needs an IPv4 destination, got {addr}"),
        )),
    }
}

fn tcp4_reuse() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    Ok(s)
}

/// `count` failing connects of `kind` toward `addr` (an IPv4 address, redirected to the
/// proxy by the scope the caller runs in). Bounded: blocking connects only where the kernel
/// fails them at once, and each held connection has a 5 s connect timeout.
pub fn escape(kind: EscapeKind, addr: SocketAddr, count: u64) -> io::Result<EscapeReport> {
    let dst = v4(addr)?;
    let start = Instant::now();
    let mut r = EscapeReport::default();
    let mut held: Vec<Socket> = Vec::new();
    let tally = |r: &mut EscapeReport, o: String| {
        r.attempts += 1;
        *r.outcomes.entry(o).or_default() += 1;
    };
    match kind {
        EscapeKind::V6only => {
            let mapped = SocketAddrV6::new(dst.ip().to_ipv6_mapped(), dst.port(), 0, 0);
            for _ in 0..count {
                let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
                s.set_only_v6(true)?;
                tally(&mut r, outcome(s.connect(&SockAddr::from(mapped))));
            }
        }
        EscapeKind::PortExhaust => {
            loop {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                match s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(5)) {
                    Ok(()) => held.push(s),
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => break,
                    Err(e) => return Err(e),
                }
                if held.len() >= MAX_HELD {
                    return Err(io::Error::other(format!(
                        "{MAX_HELD} connections to {dst} and still no EADDRNOTAVAIL: \
                         is ip_local_port_range narrowed?"
                    )));
                }
            }
            for _ in 0..count {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                tally(&mut r, outcome(s.connect(&SockAddr::from(dst))));
            }
        }
        EscapeKind::Reuseaddr => {
            let first = tcp4_reuse()?;
            first.bind(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))?;
            let local = first
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no address"))?;
            first.connect_timeout(&SockAddr::from(dst), Duration::from_secs(5))?;
            held.push(first);
            for _ in 0..count {
                let s = tcp4_reuse()?;
                s.bind(&SockAddr::from(local))?;
                tally(&mut r, outcome(s.connect(&SockAddr::from(dst))));
            }
        }
        EscapeKind::Sctp => {
            let proto = Some(Protocol::from(IPPROTO_SCTP));
            match Socket::new(Domain::IPV4, Type::STREAM, proto) {
                Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
                    r.unsupported = Some(format!("SCTP sockets: {e}"));
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    for _ in 0..count {
                        let s = Socket::new(Domain::IPV4, Type::STREAM, proto)?;
                        s.set_nonblocking(true)?;
                        tally(&mut r, outcome(s.connect(&SockAddr::from(dst))));
                    }
                }
            }
        }
        EscapeKind::KernelForward => {
            for _ in 0..count {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                let asked = ask_kernel_forward(&s);
                tally(
                    &mut r,
                    asked.map_or_else(|e| errno_name(&e), |()| "asked".into()),
                );
                s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(5))?;
                held.push(s);
            }
            // Established sockets are put into the map by the sock_ops program at once;
            // asked after every connect, each had time.
            r.in_kernel_map = held.iter().filter(|s| in_kernel_map(s)).count() as u64;
        }
    }
    r.held = held.len() as u64;
    drop(held);
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(r)
}
