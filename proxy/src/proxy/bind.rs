//! Binding: the routes loaded, the listeners taken over from the running process (with
//! `--upgrade`) or bound, the bypass mark checked. Nothing is accepted yet.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tracing::warn;

use super::{Proxy, ProxyError};
use crate::config::Config;
use crate::listener::bind_listener;
use crate::outbound::getsockopt_lookup;
use crate::routing::Routing;
use crate::stats::{Destinations, Stats};
use crate::upgrade::{self, ControlSocket, Inherited, UpgradeError};

impl Proxy {
    /// Checks the bypass mark and binds the outbound, inbound and admin listeners. Must
    /// be called inside a tokio runtime. Port 0 in an address picks a free port (see
    /// [`Proxy::outbound_addrs`], [`Proxy::inbound_addrs`]).
    ///
    /// With `--upgrade`, first takes over the listening sockets of the proxy serving
    /// upgrades on `--upgrade-socket` (see [`upgrade`]); listeners it does not pass are
    /// bound here. Nothing is accepted before [`Proxy::serve`].
    pub async fn bind(config: Config) -> Result<Proxy, ProxyError> {
        let routing = Arc::new(match &config.routes {
            Some(path) => Routing::load(path, config.protocol_detection_timeout)?,
            None => Routing::none(),
        });
        let (takeover, mut inherited) = match (&config.upgrade_socket, config.upgrade) {
            (Some(path), true) => {
                let (t, i) = upgrade::take_over(path).await?;
                (Some(t), i)
            }
            _ => (None, Inherited::default()),
        };
        let control = control_socket(&config, &mut inherited)?;
        check_bypass_mark(&config)?;
        let outbound = outbound_listeners(&config, &mut inherited)?;
        let inbound = config
            .inbound
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                listener(
                    &mut inherited,
                    &upgrade::inbound_id(i),
                    addr,
                    "inbound listener",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        kernel_forward(&config, outbound.iter().chain(&inbound));
        let admin = match config.admin {
            None => None,
            Some(addr) => Some({
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        admin = %addr,
                        "the admin listener is not on a loopback address: other hosts can read \
                         its counters and configuration (its POST endpoints still answer only \
                         loopback clients); use --admin 127.0.0.1:15000 unless that is intended"
                    );
                }
                listener(&mut inherited, upgrade::ADMIN_ID, addr, "admin listener")?
            }),
        };
        inherited.close_rest();
        let stats = Arc::new(Stats {
            destinations: Destinations::new(config.destination_stats, config.destination_limits),
            ..Stats::default()
        });
        Ok(Proxy {
            config,
            outbound,
            inbound,
            admin,
            control,
            takeover,
            routing,
            stats,
            ready: Arc::default(),
            lookup: getsockopt_lookup(),
        })
    }
}

/// The socket upgrades are served on: inherited (an upgrade must pass it), or bound.
fn control_socket(
    config: &Config,
    inherited: &mut Inherited,
) -> Result<Option<ControlSocket>, ProxyError> {
    let Some(path) = &config.upgrade_socket else {
        return Ok(None);
    };
    Ok(Some(match inherited.control(path)? {
        Some(c) => c,
        None if inherited.is_upgrade() => {
            return Err(UpgradeError::Protocol {
                path: path.clone(),
                reason: "the running proxy did not pass its upgrade socket".to_owned(),
            }
            .into())
        }
        None => ControlSocket::bind(path)?,
    }))
}

/// The outbound listeners, inherited or bound, each carrying the bypass mark: the connect
/// programs take only a marked listener on the outbound port for the proxy (a process of the
/// workload that listens there is not given its connections). With the default list, an
/// IPv6 one is skipped when the host has no IPv6.
fn outbound_listeners(
    config: &Config,
    inherited: &mut Inherited,
) -> Result<Vec<TcpListener>, ProxyError> {
    let mut outbound = Vec::with_capacity(config.outbound.len());
    for (i, &addr) in config.outbound.iter().enumerate() {
        let bound = match inherited.tcp_listener(&upgrade::outbound_id(i), addr) {
            // A listener from a process that did not mark it gets the mark now.
            Some(l) if config.bypass_mark != 0 => {
                SockRef::from(&l).set_mark(config.bypass_mark).map(|()| l)
            }
            Some(l) => Ok(l),
            None => bind_listener(addr, config.bypass_mark),
        };
        match bound.and_then(TcpListener::from_std) {
            Ok(l) => outbound.push(l),
            Err(e)
                if addr.is_ipv6() && config.outbound_ipv6_optional && is_ipv6_unavailable(&e) =>
            {
                warn!(listener = %addr, error = %e, "IPv6 unavailable on this host; skipping this outbound listener");
            }
            Err(error) => {
                return Err(ProxyError::Bind {
                    what: "outbound listener",
                    addr,
                    error,
                })
            }
        }
    }
    if outbound.is_empty() {
        return Err(ProxyError::NoOutboundListeners);
    }
    if config.bypass_mark == 0 {
        warn!(
            "--bypass-mark 0: the outbound listeners carry no mark, and scopes attached with \
             --proxy-listener marked (the default) send no connection to an unmarked listener; \
             attach them with --proxy-listener any"
        );
    }
    Ok(outbound)
}

/// The listener `id` on `addr`: inherited if the previous process passed a matching one,
/// else bound.
fn listener(
    inherited: &mut Inherited,
    id: &str,
    addr: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, ProxyError> {
    inherited
        .tcp_listener(id, addr)
        .map_or_else(|| bind_listener(addr, 0), Ok)
        .and_then(TcpListener::from_std)
        .map_err(|error| ProxyError::Bind { what, addr, error })
}

/// Fails unless this process may set the bypass mark: upstream connections would
/// otherwise be intercepted again.
fn check_bypass_mark(config: &Config) -> Result<(), ProxyError> {
    if config.bypass_mark == 0 {
        return Ok(());
    }
    let domain = if config.outbound[0].is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
        .and_then(|s| s.set_mark(config.bypass_mark))
        .map_err(|error| ProxyError::BypassMark {
            mark: config.bypass_mark,
            error,
        })?;
    Ok(())
}

fn is_ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

/// Turns kernel forwarding on (`--kernel-forward on` and the kernel answers) or off, and asks
/// for it on the listeners (their accepted sockets inherit it) or withdraws the request (a
/// listener inherited from a process that had it on).
fn kernel_forward<'a>(config: &Config, listeners: impl Iterator<Item = &'a TcpListener>) {
    let on = match crate::kforward::start(config.kernel_forward, config.bypass_mark) {
        Ok(on) => on,
        Err(e) if !crate::kforward::asks_again() => {
            tracing::info!(error = %e,
                "kernel forwarding unavailable: opaque TCP is copied by the proxy");
            false
        }
        Err(e) => {
            tracing::info!(error = %e,
                "kernel forwarding unavailable: opaque TCP is copied by the proxy; asked again \
                 at accepts, at most once a second");
            false
        }
    };
    for l in listeners {
        if let Err(e) = crate::kforward::request(l, on) {
            if on {
                tracing::warn!(listener = ?l.local_addr().ok(), error = %e,
                    "cannot ask for kernel forwarding on this listener: its connections are copied by the proxy");
            }
        }
    }
    if on {
        tracing::info!("kernel forwarding on: opaque TCP bytes flow in the kernel");
    }
}
