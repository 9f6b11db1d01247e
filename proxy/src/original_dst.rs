//! The original destination of an intercepted connection, asked for the ordinary way, and
//! its calling workload.
//!
//! Exactly what Envoy and HAProxy do behind iptables REDIRECT: `getsockopt(SOL_IP,
//! SO_ORIGINAL_DST)` on an IPv4 socket, `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on an
//! IPv6 one. Behind the eBPF programs a `cgroup/getsockopt` program answers the call from
//! the record it kept at `connect()`; nothing here reads a BPF map. The levels, option
//! numbers and address families are the contract with those programs, taken from
//! `interceptor-common`.
//!
//! The answer is read into a `sockaddr_storage`-sized buffer and decoded by its family,
//! which is what the IPv6 fallback needs: our kernel program answers `SOL_IP` on an IPv6
//! socket with a `sockaddr_in6` when the buffer is big enough.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsFd;

use interceptor_common::{
    AF_INET, AF_INET6, META_PATH_LEN, SOL_IP, SOL_IPV6, SO_ICP_WORKLOAD, SO_ORIGINAL_DST,
};

/// Why there is no original destination.
#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    /// getsockopt failed (typically ENOENT/ENOPROTOOPT: the connection was not intercepted).
    #[error("getsockopt(SO_ORIGINAL_DST) failed: {0}")]
    Getsockopt(#[source] io::Error),
    /// getsockopt succeeded but returned something that is not an IP socket address.
    #[error("getsockopt(SO_ORIGINAL_DST) returned a non-IP address (family {0})")]
    NotInet(libc::sa_family_t),
}

/// Returns the original destination of an accepted (redirected) connection; `peer` is the
/// address `accept` returned with it, which has the socket's family (an IPv6 socket's IPv4
/// peer is IPv4-mapped), so no `getsockname` is needed.
///
/// On an IPv4 socket: `SOL_IP/SO_ORIGINAL_DST`. On an IPv6 socket:
/// `SOL_IPV6/IP6T_SO_ORIGINAL_DST`, falling back to `SOL_IP/SO_ORIGINAL_DST` and accepting
/// either address family in the answer. IPv4-mapped IPv6 answers are returned as IPv4.
pub fn original_dst<S: AsFd>(socket: &S, peer: SocketAddr) -> Result<SocketAddr, OriginalDstError> {
    let mut buf = [0u8; SOCKADDR_STORAGE_LEN];
    let answer = if peer.is_ipv6() {
        match getsockopt(socket, SOL_IPV6, SO_ORIGINAL_DST, &mut buf) {
            Ok(n) => Ok(n),
            Err(v6_err) => {
                getsockopt(socket, SOL_IP, SO_ORIGINAL_DST, &mut buf).map_err(|v4_err| {
                    // Report the IPv6 error unless the fallback says something more specific.
                    if v4_err.raw_os_error() == Some(libc::ENOPROTOOPT) {
                        v6_err
                    } else {
                        v4_err
                    }
                })
            }
        }
    } else {
        getsockopt(socket, SOL_IP, SO_ORIGINAL_DST, &mut buf)
    };
    let len = answer.map_err(OriginalDstError::Getsockopt)?;
    to_socket_addr(&buf[..len])
}

/// `sizeof(struct sockaddr_storage)`: room for any address the kernel answers with.
const SOCKADDR_STORAGE_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// Decodes a `sockaddr_in` or `sockaddr_in6` as the kernel writes it: the family in host
/// order, the port and the address in network order.
fn to_socket_addr(sa: &[u8]) -> Result<SocketAddr, OriginalDstError> {
    let family = match sa {
        [a, b, ..] => u16::from_ne_bytes([*a, *b]),
        _ => 0,
    };
    let port = |sa: &[u8]| u16::from_be_bytes([sa[2], sa[3]]);
    let word =
        |sa: &[u8], at: usize| u32::from_ne_bytes([sa[at], sa[at + 1], sa[at + 2], sa[at + 3]]);
    match family {
        AF_INET if sa.len() >= 8 => {
            let ip = Ipv4Addr::new(sa[4], sa[5], sa[6], sa[7]);
            Ok(SocketAddr::new(ip.into(), port(sa)))
        }
        AF_INET6 if sa.len() >= 28 => {
            let octets: [u8; 16] = sa[8..24].try_into().expect("16 bytes");
            let ip = Ipv6Addr::from(octets);
            Ok(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), port(sa)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port(sa), word(sa, 4), word(sa, 24))),
            })
        }
        other => Err(OriginalDstError::NotInet(other as libc::sa_family_t)),
    }
}

/// The calling workload of an intercepted connection, as the kernel recorded it
/// (`getsockopt(SOL_IP, SO_ICP_WORKLOAD)`: the cgroup path the workload's scope was
/// attached with); `None` when the kernel has no record for it.
pub fn calling_workload<S: AsFd>(socket: &S) -> Option<String> {
    // The kernel answers with at most this many bytes of the path.
    let mut buf = [0u8; META_PATH_LEN];
    let len = getsockopt(socket, SOL_IP, SO_ICP_WORKLOAD, &mut buf).ok()?;
    let bytes = &buf[..len.min(buf.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end])
        .ok()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// `getsockopt(level, name)` into `buf`; returns how many bytes the kernel wrote. The one
/// system call of this crate without a safe wrapper: the options are the kernel programs'
/// (socket2, nix and rustix know only Linux's own), so the raw call it is.
pub(crate) fn getsockopt<S: AsFd>(
    socket: &S,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let mut len = libc::socklen_t::try_from(buf.len()).map_err(io::Error::other)?;
    // SAFETY: `buf` is valid for writes of `len` bytes and `len` is a valid in/out length;
    // the fd is borrowed for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((len as usize).min(buf.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `addr` laid out as the kernel program writes it (`write_sockaddr`).
    fn sockaddr(addr: SocketAddr) -> Vec<u8> {
        let mut b = Vec::new();
        match addr {
            SocketAddr::V4(a) => {
                b.extend(AF_INET.to_ne_bytes());
                b.extend(a.port().to_be_bytes());
                b.extend(a.ip().octets());
                b.extend([0; 8]);
            }
            SocketAddr::V6(a) => {
                b.extend(AF_INET6.to_ne_bytes());
                b.extend(a.port().to_be_bytes());
                b.extend(a.flowinfo().to_ne_bytes());
                b.extend(a.ip().octets());
                b.extend(a.scope_id().to_ne_bytes());
            }
        }
        b
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(
            to_socket_addr(&sockaddr(mapped)).unwrap(),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:443".parse().unwrap();
        assert_eq!(to_socket_addr(&sockaddr(v6)).unwrap(), v6);
    }

    #[test]
    fn plain_sockets_have_no_original_dst() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            if bind.starts_with('[')
                && !hostops::skip::ipv6("plain_sockets_have_no_original_dst: its IPv6 socket")
            {
                continue;
            }
            let l = std::net::TcpListener::bind(bind).unwrap();
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (a, peer) = l.accept().unwrap();
            assert!(
                matches!(original_dst(&a, peer), Err(OriginalDstError::Getsockopt(_))),
                "{bind}"
            );
            drop(c);
        }
    }
}
