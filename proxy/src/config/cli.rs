//! The command line of `interceptor-proxy`, as clap parses it.

use clap::Parser;

use super::settings::{
    DEFAULT_ADMIN, DEFAULT_BYPASS_MARK, DEFAULT_INBOUND_SOURCE, DEFAULT_INBOUND_SOURCE6,
};

/// Command line of `interceptor-proxy`. Values are kept as text here and validated by
/// [`Config::from_cli`](super::Config::from_cli), so every error has the same shape.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "interceptor-proxy",
    version,
    about = "Proxy behind the eBPF interception programs: outbound, learns each connection's \
             original destination with getsockopt(SO_ORIGINAL_DST) and forwards to it; \
             inbound, forwards each steered connection to its local address."
)]
pub struct Cli {
    /// Outbound listener address (repeatable). Default: 127.0.0.1:15001 and [::1]:15001.
    #[arg(long = "outbound", value_name = "ADDR")]
    pub outbound: Vec<String>,

    /// Inbound listener address (repeatable; default: none). Connections the kernel's
    /// sk_lookup program steers here are forwarded to their (unchanged) local address.
    /// Typically 0.0.0.0:15006 and [::]:15006.
    #[arg(long = "inbound", value_name = "ADDR")]
    pub inbound: Vec<String>,

    /// Source address bound before connecting to the workload for IPv4 inbound
    /// connections; interception must let it through (loopback sources are).
    #[arg(
        long = "inbound-source",
        value_name = "ADDR4",
        default_value_t = DEFAULT_INBOUND_SOURCE.to_string()
    )]
    pub inbound_source: String,

    /// Source address bound before connecting to the workload for IPv6 inbound connections.
    #[arg(
        long = "inbound-source6",
        value_name = "ADDR6",
        default_value_t = DEFAULT_INBOUND_SOURCE6.to_string()
    )]
    pub inbound_source6: String,

    /// SO_MARK set on upstream sockets so interception lets them through
    /// (hex 0x539 or decimal 1337; 0 = set no mark).
    #[arg(
        long = "bypass-mark",
        value_name = "MARK",
        default_value_t = format!("{DEFAULT_BYPASS_MARK:#x}")
    )]
    pub bypass_mark: String,

    /// Upstream connect timeout (e.g. 5s, 500ms, 1m; a bare number is seconds).
    #[arg(
        long = "connect-timeout",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub connect_timeout: String,

    /// Admin HTTP listener (GET /ready, /stats, /metrics, /listeners, /config, /runtime,
    /// /routes); "" or "off" disables it.
    #[arg(long = "admin", value_name = "ADDR", default_value_t = DEFAULT_ADMIN.to_string())]
    pub admin: String,

    /// Tokio worker threads (default: number of CPUs; 1 = single-threaded runtime).
    #[arg(long = "workers", value_name = "N")]
    pub workers: Option<String>,

    /// Log output format: text or json. The filter comes from RUST_LOG (default info).
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text")]
    pub log_format: String,

    /// On SIGTERM/SIGINT, or after handing the listeners to a new process, how long open
    /// connections may finish before they are closed.
    #[arg(long = "drain-timeout", value_name = "DURATION", default_value = "5s")]
    pub drain_timeout: String,

    /// Unix socket on which this proxy hands its listening sockets to a new process
    /// (hot upgrade), e.g. /run/interceptor/proxy.sock; created mode 0600. Default: off.
    #[arg(long = "upgrade-socket", value_name = "PATH")]
    pub upgrade_socket: Option<String>,

    /// Per-destination counters (destination IP and port) at start: on or off. Switch at
    /// run time with `POST /runtime?destination_stats=on|off` on the admin listener.
    #[arg(
        long = "destination-stats",
        value_name = "on|off",
        default_value = "off"
    )]
    pub destination_stats: String,

    /// Most destinations tracked at once by per-destination stats; more count in the
    /// `destination="other"` series.
    #[arg(
        long = "destination-stats-cap",
        value_name = "N",
        default_value = "10000"
    )]
    pub destination_stats_cap: String,

    /// A destination without traffic for this long leaves the per-destination series (its
    /// counts move to `destination="other"`).
    #[arg(
        long = "destination-stats-idle",
        value_name = "DURATION",
        default_value = "5m"
    )]
    pub destination_stats_idle: String,

    /// Routing file (YAML: serviceEntries, virtualServices, destinationRules). Connections to
    /// its service addresses are routed per request (HTTP, gRPC) or by SNI (TLS); it is
    /// reloaded when it changes. Default: none (every connection opaque TCP).
    #[arg(long = "routes", value_name = "FILE")]
    pub routes: Option<String>,

    /// How long an AUTO port waits for the client's first bytes before it treats the
    /// connection as opaque TCP (server-first protocols).
    #[arg(
        long = "protocol-detection-timeout",
        value_name = "DURATION",
        default_value = "100ms"
    )]
    pub protocol_detection_timeout: String,

    /// Largest body of a Dubbo frame (bytes, or with KiB/MiB). A frame announcing more, or
    /// one without Dubbo's magic, closes the connection and is counted.
    #[arg(long = "dubbo-max-body", value_name = "SIZE", default_value = "8MiB")]
    pub dubbo_max_body: String,

    /// Most connections open at once over all listeners (both directions). One more is
    /// accepted and closed at once (a reset) and counted in `connections_refused_limit`;
    /// the open ones keep being served. Lowered at start when the open-file limit cannot
    /// hold two descriptors per connection.
    #[arg(long = "max-connections", value_name = "N", default_value = "100000")]
    pub max_connections: String,

    /// An opaque TCP connection with no byte in either direction for this long is closed
    /// (Envoy's default: 1h). 0 = never.
    #[arg(
        long = "tcp-idle-timeout",
        value_name = "DURATION",
        default_value = "1h"
    )]
    pub tcp_idle_timeout: String,

    /// Opaque TCP: forward the bytes in the kernel (sockmap programs of the interceptor)
    /// instead of copying them here. `on` uses it where the kernel and the attached programs
    /// offer it (probed at start; otherwise the proxy copies, and says so; a proxy started
    /// before the programs were attached asks again at accepts), `off` (the default) never:
    /// the proxy copies every byte itself, and the CPU of forwarding stays in its cgroup.
    /// Off by default since the kernel's backlog for a peer is bounded: the kernel then
    /// carries only part of a bulk stream, and the full benchmark puts bulk and new
    /// connections below the proxy's own copy (see ARCHITECTURE.md "Kernel forwarding").
    /// Needs the bypass mark (the programs take the request only from a marked socket).
    #[arg(long = "kernel-forward", value_name = "on|off", default_value = "off")]
    pub kernel_forward: String,

    /// Routed HTTP: how long a client may take to send a request's headers; a slower one
    /// (slowloris) is disconnected.
    #[arg(
        long = "http-header-timeout",
        value_name = "DURATION",
        default_value = "10s"
    )]
    pub http_header_timeout: String,

    /// Routed HTTP: a connection with no request in progress for this long is closed
    /// (Envoy's default: 1h). 0 = never.
    #[arg(
        long = "http-idle-timeout",
        value_name = "DURATION",
        default_value = "1h"
    )]
    pub http_idle_timeout: String,

    /// Take over the listening sockets and counters of the proxy serving --upgrade-socket,
    /// become ready, then let it drain and exit. Nothing is refused meanwhile.
    #[arg(long = "upgrade", requires = "upgrade_socket")]
    pub upgrade: bool,

    /// The binary a SIGUSR2 starts as this proxy's successor (with this process's arguments
    /// plus --upgrade), e.g. a new version copied into the container. Default: this
    /// process's own binary (/proc/self/exe).
    #[arg(
        long = "upgrade-binary",
        value_name = "PATH",
        requires = "upgrade_socket"
    )]
    pub upgrade_binary: Option<String>,

    /// Do not serve: send SIGUSR2 to the proxy with process id PID (in its container: 1), so
    /// that it starts its successor (hot upgrade), then exit. For images without `kill`:
    /// `kubectl exec POD -c proxy -- interceptor-proxy --signal-upgrade 1`.
    #[arg(long = "signal-upgrade", value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub signal_upgrade: Option<i32>,
}
