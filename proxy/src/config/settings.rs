//! The validated configuration, its defaults, and how `GET /config` shows it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::time::Duration;

use interceptor_common::defaults;

use crate::stats::DestinationLimits;

/// Default outbound listeners (the workload's `connect()` is redirected here): the port the
/// kernel programs redirect to by default, on 127.0.0.1 and \[::1\].
pub const DEFAULT_OUTBOUND: [SocketAddr; 2] = [
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        defaults::OUTBOUND_PORT,
    )),
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::LOCALHOST,
        defaults::OUTBOUND_PORT,
        0,
        0,
    )),
];
/// Default admin listener (`/ready`, `/stats`, `/metrics`).
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, defaults::ADMIN_PORT));
/// Default bypass mark: the kernel programs let sockets carrying it through.
pub const DEFAULT_BYPASS_MARK: u32 = defaults::BYPASS_MARK;
/// Default source address of forwarded inbound connections to IPv4 destinations.
pub const DEFAULT_INBOUND_SOURCE: Ipv4Addr = {
    let [a, b, c, d] = defaults::INBOUND_SOURCE4;
    Ipv4Addr::new(a, b, c, d)
};
/// Default source address of forwarded inbound connections to IPv6 destinations.
pub const DEFAULT_INBOUND_SOURCE6: Ipv6Addr = Ipv6Addr::from_octets(defaults::INBOUND_SOURCE6);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated proxy configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Outbound listener addresses.
    pub outbound: Vec<SocketAddr>,
    /// When true (the outbound list is the default), an IPv6 listener that cannot bind
    /// because IPv6 is unavailable on this host is skipped with a warning instead of
    /// failing start-up. Addresses given explicitly are always required.
    pub outbound_ipv6_optional: bool,
    /// Inbound listener addresses (none: no inbound listener).
    pub inbound: Vec<SocketAddr>,
    /// Source address of forwarded inbound connections to IPv4 destinations.
    pub inbound_source: Ipv4Addr,
    /// Source address of forwarded inbound connections to IPv6 destinations.
    pub inbound_source6: Ipv6Addr,
    /// SO_MARK for upstream sockets; 0 = set no mark.
    pub bypass_mark: u32,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Admin listener; `None` disables the admin server.
    pub admin: Option<SocketAddr>,
    /// Tokio worker threads (used by the binary to build the runtime).
    pub workers: usize,
    /// Log format (used by the binary to set up tracing).
    pub log_format: LogFormat,
    /// How long open connections may finish after shutdown was requested or the
    /// listeners were handed to a new process.
    pub drain_timeout: Duration,
    /// Unix socket serving hot upgrades; `None`: off.
    pub upgrade_socket: Option<PathBuf>,
    /// Take over from the proxy serving `upgrade_socket`.
    pub upgrade: bool,
    /// What a SIGUSR2 starts as the successor; `None`: this process's own binary.
    pub upgrade_binary: Option<PathBuf>,
    /// Per-destination stats on at start.
    pub destination_stats: bool,
    /// Cap and idle time of per-destination stats.
    pub destination_limits: DestinationLimits,
    /// Routing file.
    pub routes: Option<PathBuf>,
    /// Detection time of AUTO ports.
    pub protocol_detection_timeout: Duration,
    /// Largest Dubbo frame body, in bytes.
    pub dubbo_max_body: u32,
    /// Most connections open at once (before fitting to the open-file limit).
    pub max_connections: usize,
    /// Idle timeout of opaque TCP connections; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// Forward opaque TCP in the kernel where available (`--kernel-forward`).
    pub kernel_forward: bool,
    /// Routed HTTP: time allowed for a request's headers.
    pub http_header_timeout: Duration,
    /// Routed HTTP: idle timeout of a connection without a request in progress.
    pub http_idle_timeout: Option<Duration>,
}

/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default `--tcp-idle-timeout` and `--http-idle-timeout` (Envoy's).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `--dubbo-max-body`: 8 MiB, Dubbo's own default `payload`.
pub const DEFAULT_DUBBO_MAX_BODY: u32 = 8 << 20;
/// Default `--http-header-timeout`.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Config {
    fn default() -> Self {
        Config {
            outbound: DEFAULT_OUTBOUND.to_vec(),
            outbound_ipv6_optional: true,
            inbound: Vec::new(),
            inbound_source: DEFAULT_INBOUND_SOURCE,
            inbound_source6: DEFAULT_INBOUND_SOURCE6,
            bypass_mark: DEFAULT_BYPASS_MARK,
            connect_timeout: Duration::from_secs(5),
            admin: Some(DEFAULT_ADMIN),
            workers: default_workers(),
            log_format: LogFormat::Text,
            drain_timeout: Duration::from_secs(5),
            upgrade_socket: None,
            upgrade: false,
            upgrade_binary: None,
            destination_stats: false,
            destination_limits: DestinationLimits::default(),
            routes: None,
            protocol_detection_timeout: Duration::from_millis(100),
            dubbo_max_body: DEFAULT_DUBBO_MAX_BODY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tcp_idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            kernel_forward: false,
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            http_idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

impl Config {
    /// The running configuration as `GET /config` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_millis() as u64;
        serde_json::json!({
            "outbound": self.outbound.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "inbound": self.inbound.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "inbound_source": self.inbound_source.to_string(),
            "inbound_source6": self.inbound_source6.to_string(),
            "bypass_mark": format!("{:#x}", self.bypass_mark),
            "connect_timeout_ms": ms(self.connect_timeout),
            "admin": self.admin.map(|a| a.to_string()),
            "workers": self.workers,
            "log_format": match self.log_format { LogFormat::Text => "text", LogFormat::Json => "json" },
            "drain_timeout_ms": ms(self.drain_timeout),
            "upgrade_socket": self.upgrade_socket.as_ref().map(|p| p.display().to_string()),
            "upgrade_binary": self.upgrade_binary.as_ref().map(|p| p.display().to_string()),
            "routes": self.routes.as_ref().map(|p| p.display().to_string()),
            "protocol_detection_timeout_ms": ms(self.protocol_detection_timeout),
            "dubbo_max_body": self.dubbo_max_body,
            "destination_stats": self.destination_stats,
            "kernel_forward": self.kernel_forward,
            "destination_stats_cap": self.destination_limits.cap,
            "destination_stats_idle_ms": ms(self.destination_limits.idle),
            "max_connections": self.max_connections,
            "tcp_idle_timeout_ms": self.tcp_idle_timeout.map(ms),
            "http_header_timeout_ms": ms(self.http_header_timeout),
            "http_idle_timeout_ms": self.http_idle_timeout.map(ms),
        })
    }
}

/// One runtime thread per CPU.
pub(super) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
