//! Command line and [`Config`]: parsed and validated in one place.
//!
//! Every validation error names the setting, the value that was given and what to do
//! about it, so an operator can fix a unit file or a pod spec without reading code.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use crate::stats::DestinationLimits;
use std::time::Duration;

use clap::Parser;

/// Default outbound listeners (the workload's `connect()` is redirected here).
pub const DEFAULT_OUTBOUND: [&str; 2] = ["127.0.0.1:15001", "[::1]:15001"];
/// Default admin listener (`/ready`, `/stats`, `/metrics`).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Default bypass mark: the kernel programs let sockets carrying it through.
pub const DEFAULT_BYPASS_MARK: u32 = 0x539;
/// Default source address of forwarded inbound connections to IPv4 destinations.
pub const DEFAULT_INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Default source address of forwarded inbound connections to IPv6 destinations.
pub const DEFAULT_INBOUND_SOURCE6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Command line of `interceptor-proxy`. Values are kept as text here and validated by
/// [`Config::from_cli`], so every error has the same shape.
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
        default_value = "127.0.0.6"
    )]
    pub inbound_source: String,

    /// Source address bound before connecting to the workload for IPv6 inbound connections.
    #[arg(long = "inbound-source6", value_name = "ADDR6", default_value = "::1")]
    pub inbound_source6: String,

    /// SO_MARK set on upstream sockets so interception lets them through
    /// (hex 0x539 or decimal 1337; 0 = set no mark).
    #[arg(long = "bypass-mark", value_name = "MARK", default_value = "0x539")]
    pub bypass_mark: String,

    /// Upstream connect timeout (e.g. 5s, 500ms, 1m; a bare number is seconds).
    #[arg(
        long = "connect-timeout",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub connect_timeout: String,

    /// Admin HTTP listener (GET /ready, /stats, /metrics); "" or "off" disables it.
    #[arg(long = "admin", value_name = "ADDR", default_value = DEFAULT_ADMIN)]
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

    /// Take over the listening sockets and counters of the proxy serving --upgrade-socket,
    /// become ready, then let it drain and exit. Nothing is refused meanwhile.
    #[arg(long = "upgrade", requires = "upgrade_socket")]
    pub upgrade: bool,
}

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
    /// Per-destination stats on at start.
    pub destination_stats: bool,
    /// Cap and idle time of per-destination stats.
    pub destination_limits: DestinationLimits,
    /// Routing file.
    pub routes: Option<PathBuf>,
    /// Detection time of AUTO ports.
    pub protocol_detection_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            outbound: DEFAULT_OUTBOUND
                .iter()
                .map(|a| a.parse().expect("default outbound address parses"))
                .collect(),
            outbound_ipv6_optional: true,
            inbound: Vec::new(),
            inbound_source: DEFAULT_INBOUND_SOURCE,
            inbound_source6: DEFAULT_INBOUND_SOURCE6,
            bypass_mark: DEFAULT_BYPASS_MARK,
            connect_timeout: Duration::from_secs(5),
            admin: Some(DEFAULT_ADMIN.parse().expect("default admin address parses")),
            workers: default_workers(),
            log_format: LogFormat::Text,
            drain_timeout: Duration::from_secs(5),
            upgrade_socket: None,
            upgrade: false,
            destination_stats: false,
            destination_limits: DestinationLimits::default(),
            routes: None,
            protocol_detection_timeout: Duration::from_millis(100),
        }
    }
}

/// A setting that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting} {value:?}: {problem}; {hint}")]
pub struct ConfigError {
    /// The command line flag, e.g. `--bypass-mark`.
    pub setting: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
    /// What to do about it.
    pub hint: &'static str,
}

impl ConfigError {
    fn new(
        setting: &'static str,
        value: &str,
        problem: impl Into<String>,
        hint: &'static str,
    ) -> Self {
        ConfigError {
            setting,
            value: value.to_owned(),
            problem: problem.into(),
            hint,
        }
    }
}

impl Config {
    /// Parses a command line (first item is the program name) and validates it.
    ///
    /// Clap's own errors (unknown flag, `--help`, `--version`) are returned as
    /// [`clap::Error`] so the caller can `exit()` with clap's formatting.
    pub fn try_from_args<I, T>(args: I) -> Result<Config, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(CliError::Clap)?;
        Config::from_cli(cli).map_err(CliError::Invalid)
    }

    /// Validates a parsed command line.
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let (outbound, outbound_ipv6_optional) = if cli.outbound.is_empty() {
            (Config::default().outbound, true)
        } else {
            let addrs = cli
                .outbound
                .iter()
                .map(|s| parse_addr("--outbound", s))
                .collect::<Result<Vec<_>, _>>()?;
            (addrs, false)
        };
        for (i, a) in outbound.iter().enumerate() {
            if a.port() != 0 && outbound[..i].contains(a) {
                return Err(ConfigError::new(
                    "--outbound",
                    &a.to_string(),
                    "given more than once",
                    "list each listener address once",
                ));
            }
        }

        let admin = match cli.admin.trim() {
            "" | "off" | "none" => None,
            s => Some(parse_addr("--admin", s)?),
        };
        if let Some(admin) = admin {
            if admin.port() != 0 && outbound.contains(&admin) {
                return Err(ConfigError::new(
                    "--admin",
                    &cli.admin,
                    "same address as an --outbound listener",
                    "give the admin server its own port (default 127.0.0.1:15000)",
                ));
            }
        }

        let inbound = cli
            .inbound
            .iter()
            .map(|s| parse_addr("--inbound", s))
            .collect::<Result<Vec<_>, _>>()?;
        check_inbound_overlaps(&inbound, &outbound, admin)?;
        let inbound_source = parse_source4(&cli.inbound_source)?;
        let inbound_source6 = parse_source6(&cli.inbound_source6)?;

        let connect_timeout = parse_duration("--connect-timeout", &cli.connect_timeout)?;
        if connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "--connect-timeout",
                &cli.connect_timeout,
                "must be greater than zero",
                "use e.g. 5s or 500ms",
            ));
        }

        let workers = match &cli.workers {
            None => default_workers(),
            Some(s) => match s.trim().parse::<usize>() {
                Ok(0) | Err(_) => {
                    return Err(ConfigError::new(
                        "--workers",
                        s,
                        "not a whole number of at least 1",
                        "pass the number of runtime threads, e.g. --workers 2, or leave it out to use one per CPU",
                    ))
                }
                Ok(n) if n > 1024 => {
                    return Err(ConfigError::new(
                        "--workers",
                        s,
                        "more than 1024 threads",
                        "use at most one thread per CPU",
                    ))
                }
                Ok(n) => n,
            },
        };

        let log_format = match cli.log_format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                return Err(ConfigError::new(
                    "--log-format",
                    &cli.log_format,
                    "unknown format",
                    "use text or json",
                ))
            }
        };

        Ok(Config {
            outbound,
            outbound_ipv6_optional,
            inbound,
            inbound_source,
            inbound_source6,
            bypass_mark: parse_mark(&cli.bypass_mark)?,
            connect_timeout,
            admin,
            workers,
            log_format,
            drain_timeout: parse_duration("--drain-timeout", &cli.drain_timeout)?,
            upgrade_socket: match cli.upgrade_socket.as_deref().map(str::trim) {
                None | Some("" | "off") => None,
                Some(p) => Some(parse_socket_path(p)?),
            },
            upgrade: cli.upgrade,
            routes: cli.routes.as_deref().map(PathBuf::from),
            protocol_detection_timeout: parse_duration(
                "--protocol-detection-timeout",
                &cli.protocol_detection_timeout,
            )?,
            destination_stats: parse_switch("--destination-stats", &cli.destination_stats)?,
            destination_limits: DestinationLimits {
                cap: match cli.destination_stats_cap.trim().parse::<usize>() {
                    Ok(n) if n <= 10_000_000 => n,
                    _ => {
                        return Err(ConfigError::new(
                            "--destination-stats-cap",
                            &cli.destination_stats_cap,
                            "not a whole number up to 10000000",
                            "give the most destinations to track, e.g. 10000",
                        ))
                    }
                },
                idle: {
                    let d =
                        parse_duration("--destination-stats-idle", &cli.destination_stats_idle)?;
                    if d < Duration::from_secs(1) {
                        return Err(ConfigError::new(
                            "--destination-stats-idle",
                            &cli.destination_stats_idle,
                            "shorter than 1s",
                            "give e.g. 5m",
                        ));
                    }
                    d
                },
            },
        })
    }
}

/// Error from [`Config::try_from_args`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Clap rejected the command line (or printed help/version).
    #[error(transparent)]
    Clap(clap::Error),
    /// A value failed validation.
    #[error(transparent)]
    Invalid(ConfigError),
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `on`/`off` (also true/false, 1/0, yes/no).
pub fn parse_switch(setting: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::new(
            setting,
            s,
            "not a switch",
            "use on or off",
        )),
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
            "routes": self.routes.as_ref().map(|p| p.display().to_string()),
            "protocol_detection_timeout_ms": ms(self.protocol_detection_timeout),
            "destination_stats": self.destination_stats,
            "destination_stats_cap": self.destination_limits.cap,
            "destination_stats_idle_ms": ms(self.destination_limits.idle),
        })
    }
}

fn parse_socket_path(s: &str) -> Result<PathBuf, ConfigError> {
    const SETTING: &str = "--upgrade-socket";
    const HINT: &str =
        "give an absolute path of at most 107 bytes, e.g. /run/interceptor/proxy.sock";
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(ConfigError::new(SETTING, s, "not an absolute path", HINT));
    }
    if s.len() > 107 {
        return Err(ConfigError::new(
            SETTING,
            s,
            "longer than a Unix socket address allows",
            HINT,
        ));
    }
    if s.ends_with('/') {
        return Err(ConfigError::new(SETTING, s, "names a directory", HINT));
    }
    Ok(path)
}

fn parse_addr(setting: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        ConfigError::new(
            setting,
            s,
            "not an IP:port socket address",
            "write it as 127.0.0.1:15001 or [::1]:15001 (host names are not resolved)",
        )
    })
}

/// Whether listeners bound to `a` and `b` would take the same port: same family and port
/// (not 0), and the same address or either one the wildcard.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Every --inbound listener needs a port of its own: not another inbound listener's, not
/// an outbound or the admin listener's (on the same or the wildcard address).
fn check_inbound_overlaps(
    inbound: &[SocketAddr],
    outbound: &[SocketAddr],
    admin: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    const HINT: &str = "give each inbound listener its own port, e.g. --inbound 0.0.0.0:15006 --inbound [::]:15006";
    for (i, &a) in inbound.iter().enumerate() {
        let value = a.to_string();
        if let Some(&b) = inbound[..i].iter().find(|&&b| overlap(a, b)) {
            let problem = if a == b {
                "given more than once".to_owned()
            } else {
                format!("overlaps the --inbound listener {b} (same port)")
            };
            return Err(ConfigError::new("--inbound", &value, problem, HINT));
        }
        if let Some(&b) = outbound.iter().find(|&&b| overlap(a, b)) {
            return Err(ConfigError::new(
                "--inbound",
                &value,
                format!("overlaps the --outbound listener {b} (same port)"),
                HINT,
            ));
        }
        if let Some(b) = admin.filter(|&b| overlap(a, b)) {
            return Err(ConfigError::new(
                "--inbound",
                &value,
                format!("overlaps the --admin listener {b} (same port)"),
                HINT,
            ));
        }
    }
    Ok(())
}

fn parse_source4(s: &str) -> Result<Ipv4Addr, ConfigError> {
    const SETTING: &str = "--inbound-source";
    const HINT: &str = "give an IPv4 address without a port that the interception lets through, e.g. 127.0.0.6 (the default)";
    let ip = match s.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip,
        Ok(IpAddr::V6(_)) => {
            return Err(ConfigError::new(
                SETTING,
                s,
                "an IPv6 address; this is the IPv4 source",
                "set the IPv6 source with --inbound-source6, and an IPv4 address such as 127.0.0.6 here",
            ))
        }
        Err(_) => return Err(ConfigError::new(SETTING, s, "not an IPv4 address", HINT)),
    };
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(ConfigError::new(
            SETTING,
            s,
            "cannot be a connection's source address",
            HINT,
        ));
    }
    Ok(ip)
}

fn parse_source6(s: &str) -> Result<Ipv6Addr, ConfigError> {
    const SETTING: &str = "--inbound-source6";
    const HINT: &str = "give an IPv6 address without a port that the interception lets through, e.g. ::1 (the default)";
    let t = s.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(t);
    let ip =
        match t.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => ip,
            Ok(IpAddr::V4(_)) => return Err(ConfigError::new(
                SETTING,
                s,
                "an IPv4 address; this is the IPv6 source",
                "set the IPv4 source with --inbound-source, and an IPv6 address such as ::1 here",
            )),
            Err(_) => return Err(ConfigError::new(SETTING, s, "not an IPv6 address", HINT)),
        };
    if ip.is_unspecified() || ip.is_multicast() || ip.to_ipv4_mapped().is_some() {
        return Err(ConfigError::new(
            SETTING,
            s,
            "cannot be the source address of an IPv6 connection",
            HINT,
        ));
    }
    Ok(ip)
}

/// Parses a socket mark: `0x539` (hex) or `1337` (decimal). 0 means "set no mark".
pub fn parse_mark(s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else {
        t.parse::<u32>()
    };
    parsed.map_err(|e| {
        ConfigError::new(
            "--bypass-mark",
            s,
            format!("not a 32-bit mark ({e})"),
            "write it as hex (0x539) or decimal (1337), matching the mark the interception programs exempt; 0 sets no mark",
        )
    })
}

/// Parses a duration: `5s`, `500ms`, `1.5s`, `2m`, `100us`; a bare number is seconds.
pub fn parse_duration(setting: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let bad = |problem: &str| {
        ConfigError::new(
            setting,
            s,
            problem,
            "write it as a number with a unit: 500ms, 5s, 1m",
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad("unknown unit")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 86_400.0 * 365.0 {
        return Err(bad("too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, CliError> {
        Config::try_from_args(std::iter::once("interceptor-proxy").chain(args.iter().copied()))
    }

    fn invalid(args: &[&str]) -> ConfigError {
        match parse(args) {
            Err(CliError::Invalid(e)) => e,
            other => panic!("expected a validation error for {args:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.outbound,
            vec![
                "127.0.0.1:15001".parse().unwrap(),
                "[::1]:15001".parse().unwrap()
            ]
        );
        assert!(c.outbound_ipv6_optional);
        assert_eq!(c.bypass_mark, 0x539);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.admin, Some("127.0.0.1:15000".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.workers >= 1);
        assert!(c.inbound.is_empty(), "no inbound listener unless asked for");
        assert_eq!(c.inbound_source, Ipv4Addr::new(127, 0, 0, 6));
        assert_eq!(c.inbound_source6, Ipv6Addr::LOCALHOST);
        assert_eq!(
            c,
            Config {
                workers: c.workers,
                ..Config::default()
            }
        );
    }

    #[test]
    fn inbound_repeatable_and_validated() {
        let c = parse(&["--inbound", "0.0.0.0:15006", "--inbound", "[::]:15006"]).unwrap();
        assert_eq!(
            c.inbound,
            vec![
                "0.0.0.0:15006".parse().unwrap(),
                "[::]:15006".parse().unwrap()
            ]
        );
        // Port 0 (pick one) may be given more than once.
        let c = parse(&["--inbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"]).unwrap();
        assert_eq!(c.inbound.len(), 2);

        let e = invalid(&["--inbound", "15006"]);
        assert_eq!((e.setting, e.value.as_str()), ("--inbound", "15006"));
        assert!(e.to_string().contains("IP:port"), "{e}");
        let e = invalid(&["--inbound", "0.0.0.0:15006", "--inbound", "0.0.0.0:15006"]);
        assert!(e.to_string().contains("more than once"), "{e}");
        let e = invalid(&["--inbound", "0.0.0.0:15006", "--inbound", "127.0.0.1:15006"]);
        assert!(
            e.to_string()
                .contains("overlaps the --inbound listener 0.0.0.0:15006"),
            "{e}"
        );
        // The default outbound and admin listeners count too, through the wildcard.
        let e = invalid(&["--inbound", "0.0.0.0:15001"]);
        assert_eq!(e.setting, "--inbound");
        assert!(
            e.to_string()
                .contains("overlaps the --outbound listener 127.0.0.1:15001"),
            "{e}"
        );
        let e = invalid(&["--inbound", "[::]:15001"]);
        assert!(
            e.to_string().contains("--outbound listener [::1]:15001"),
            "{e}"
        );
        let e = invalid(&["--inbound", "127.0.0.1:15000"]);
        assert!(
            e.to_string().contains("overlaps the --admin listener"),
            "{e}"
        );
        assert!(parse(&["--inbound", "0.0.0.0:15000", "--admin", "off"]).is_ok());
        // Other family, same port: fine (the IPv6 listener is IPv6-only).
        assert!(parse(&["--inbound", "[::]:15000"]).is_ok());
    }

    #[test]
    fn inbound_sources() {
        let c = parse(&[
            "--inbound-source",
            "127.0.0.7",
            "--inbound-source6",
            "fd00::6",
        ])
        .unwrap();
        assert_eq!(c.inbound_source, Ipv4Addr::new(127, 0, 0, 7));
        assert_eq!(c.inbound_source6, "fd00::6".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            parse(&["--inbound-source6", "[::6]"])
                .unwrap()
                .inbound_source6,
            "::6".parse::<Ipv6Addr>().unwrap()
        );
        for bad in [
            "127.0.0.6:0",
            "localhost",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "",
        ] {
            let e = invalid(&["--inbound-source", bad]);
            assert_eq!((e.setting, e.value.as_str()), ("--inbound-source", bad));
            assert!(e.to_string().contains("127.0.0.6"), "{e}");
        }
        let e = invalid(&["--inbound-source", "::1"]);
        assert!(e.to_string().contains("--inbound-source6"), "{e}");
        for bad in ["::", "ff02::1", "::ffff:127.0.0.6", "[::1]:0", "x"] {
            let e = invalid(&["--inbound-source6", bad]);
            assert_eq!((e.setting, e.value.as_str()), ("--inbound-source6", bad));
        }
        let e = invalid(&["--inbound-source6", "127.0.0.6"]);
        assert!(e.to_string().contains("--inbound-source"), "{e}");
    }

    #[test]
    fn marks_hex_and_decimal() {
        assert_eq!(
            parse(&["--bypass-mark", "0x539"]).unwrap().bypass_mark,
            1337
        );
        assert_eq!(parse(&["--bypass-mark", "0X1f"]).unwrap().bypass_mark, 31);
        assert_eq!(parse(&["--bypass-mark", "1337"]).unwrap().bypass_mark, 1337);
        assert_eq!(parse(&["--bypass-mark", "0"]).unwrap().bypass_mark, 0);
        assert_eq!(
            parse(&["--bypass-mark", "0xffffffff"]).unwrap().bypass_mark,
            u32::MAX
        );
    }

    #[test]
    fn bad_marks_name_setting_value_and_fix() {
        for bad in ["0xzz", "-1", "4294967296", "0x1_0000_0000", "", "mark"] {
            let e = invalid(&[&format!("--bypass-mark={bad}")]);
            assert_eq!(e.setting, "--bypass-mark");
            assert_eq!(e.value, bad);
            let msg = e.to_string();
            assert!(
                msg.contains("--bypass-mark") && msg.contains("0x539"),
                "{msg}"
            );
        }
    }

    #[test]
    fn outbound_repeatable_and_validated() {
        let c = parse(&["--outbound", "127.0.0.1:1", "--outbound", "[::1]:2"]).unwrap();
        assert_eq!(
            c.outbound,
            vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()]
        );
        assert!(!c.outbound_ipv6_optional);
        let e = invalid(&["--outbound", "localhost:15001"]);
        assert_eq!(e.setting, "--outbound");
        assert!(e.to_string().contains("localhost:15001"));
        let e = invalid(&["--outbound", "127.0.0.1:9", "--outbound", "127.0.0.1:9"]);
        assert!(e.to_string().contains("more than once"));
    }

    #[test]
    fn admin_off_and_errors() {
        assert_eq!(parse(&["--admin", ""]).unwrap().admin, None);
        assert_eq!(parse(&["--admin", "off"]).unwrap().admin, None);
        assert_eq!(
            parse(&["--admin", "[::1]:9901"]).unwrap().admin,
            Some("[::1]:9901".parse().unwrap())
        );
        assert_eq!(invalid(&["--admin", "15000"]).setting, "--admin");
        let e = invalid(&["--outbound", "127.0.0.1:7000", "--admin", "127.0.0.1:7000"]);
        assert!(e.to_string().contains("own port"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "5s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("x", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("x", "3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("x", "0").unwrap(), Duration::ZERO);
        for bad in ["", "s", "5 parsecs", "1e999", "-1s", "1.2.3s"] {
            assert!(parse_duration("x", bad).is_err(), "{bad:?} should fail");
        }
        let e = invalid(&["--connect-timeout", "0s"]);
        assert_eq!(e.setting, "--connect-timeout");
        assert!(e.to_string().contains("greater than zero"));
        let e = invalid(&["--drain-timeout", "soon"]);
        assert_eq!(e.setting, "--drain-timeout");
        assert!(e.to_string().contains("\"soon\""));
    }

    #[test]
    fn workers_and_log_format() {
        assert_eq!(parse(&["--workers", "3"]).unwrap().workers, 3);
        assert_eq!(invalid(&["--workers", "0"]).setting, "--workers");
        assert_eq!(invalid(&["--workers", "many"]).setting, "--workers");
        assert_eq!(
            parse(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        let e = invalid(&["--log-format", "xml"]);
        assert!(e.to_string().contains("text or json"));
    }

    #[test]
    fn unknown_flag_is_a_clap_error() {
        assert!(matches!(parse(&["--nope"]), Err(CliError::Clap(_))));
    }
}
