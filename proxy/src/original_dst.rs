//! The original destination of an intercepted connection, asked for the ordinary way.
//!
//! Exactly what Envoy and HAProxy do behind iptables REDIRECT: `getsockopt(SOL_IP,
//! SO_ORIGINAL_DST)` on an IPv4 socket, `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on an
//! IPv6 one. Behind the eBPF programs a `cgroup/getsockopt` program answers the call from
//! the record it kept at `connect()`; nothing here reads a BPF map.
//!
//! socket2 passes a `sockaddr_storage` buffer and reads back whichever family the kernel
//! wrote, which is what the IPv6 fallback needs: our kernel program answers `SOL_IP` on an
//! IPv6 socket with a `sockaddr_in6` when the buffer is big enough.

use std::io;
use std::net::SocketAddr;

use socket2::{SockAddr, SockRef};

/// Why there is no original destination.
#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    /// getsockopt failed (typically ENOENT/ENOPROTOOPT: the connection was not intercepted).
    #[error("getsockopt(SO_ORIGINAL_DST) failed: {0}")]
    Getsockopt(#[source] io::Error),
    /// getsockopt succeeded but returned something that is not an IP socket address.
    #[error("getsockopt(SO_ORIGINAL_DST) returned a non-IP address (family {0})")]
    NotInet(libc::sa_family_t),
    /// The accepted socket's own address could not be read.
    #[error("getsockname on the accepted socket failed: {0}")]
    LocalAddr(#[source] io::Error),
}

/// Returns the original destination of an accepted (redirected) connection.
///
/// On an IPv4 socket: `SOL_IP/SO_ORIGINAL_DST`. On an IPv6 socket:
/// `SOL_IPV6/IP6T_SO_ORIGINAL_DST`, falling back to `SOL_IP/SO_ORIGINAL_DST` and accepting
/// either address family in the answer. IPv4-mapped IPv6 answers are returned as IPv4.
pub fn original_dst<S: std::os::fd::AsFd>(socket: &S) -> Result<SocketAddr, OriginalDstError> {
    let sock = SockRef::from(socket);
    let local = sock.local_addr().map_err(OriginalDstError::LocalAddr)?;
    let answer = if local.is_ipv6() {
        match sock.original_dst_v6() {
            Ok(addr) => Ok(addr),
            Err(v6_err) => sock.original_dst_v4().map_err(|v4_err| {
                // Report the IPv6 error unless the fallback says something more specific.
                if v4_err.raw_os_error() == Some(libc::ENOPROTOOPT) {
                    v6_err
                } else {
                    v4_err
                }
            }),
        }
    } else {
        sock.original_dst_v4()
    };
    let addr = answer.map_err(OriginalDstError::Getsockopt)?;
    to_socket_addr(&addr)
}

fn to_socket_addr(addr: &SockAddr) -> Result<SocketAddr, OriginalDstError> {
    match addr.as_socket() {
        Some(SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => Ok(SocketAddr::new(v4.into(), v6.port())),
            None => Ok(SocketAddr::V6(v6)),
        },
        Some(v4) => Ok(v4),
        None => Err(OriginalDstError::NotInet(addr.family())),
    }
}

/// `getsockopt(SOL_IP, SO_ICP_WORKLOAD)`: the kernel programs answer it on an intercepted
/// connection with its calling workload (the cgroup path the workload's scope was attached
/// with). Linux defines no option with this number at SOL_IP.
pub const SO_ICP_WORKLOAD: libc::c_int = 0x4943;

/// The calling workload of an intercepted connection, as the kernel recorded it; `None`
/// when the kernel has no record for it.
pub fn calling_workload<S: std::os::fd::AsFd>(socket: &S) -> Option<String> {
    use std::os::fd::AsRawFd as _;
    // The kernel keeps up to 504 bytes of a scope's path.
    let mut buf = [0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes and `len` is a valid in/out length; the fd is
    // borrowed for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_IP,
            SO_ICP_WORKLOAD,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let bytes = &buf[..(len as usize).min(buf.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end])
        .ok()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(
            to_socket_addr(&SockAddr::from(mapped)).unwrap(),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:443".parse().unwrap();
        assert_eq!(to_socket_addr(&SockAddr::from(v6)).unwrap(), v6);
    }

    #[test]
    fn plain_sockets_have_no_original_dst() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(bind) else {
                continue;
            };
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, _) = l.accept().unwrap();
            assert!(
                matches!(original_dst(&a), Err(OriginalDstError::Getsockopt(_))),
                "{bind}"
            );
            drop(c);
        }
    }
}
