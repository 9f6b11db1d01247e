//! Value parsers: each turns one setting's text into its value, or into a [`ConfigError`]
//! that names the setting, the value and what to write instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use interceptor_common::MARK_SYNTAX;

use super::error::ConfigError;
use super::settings::LogFormat;

pub(super) fn parse_addr(setting: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        ConfigError::new(
            setting,
            s,
            "not an IP:port socket address",
            "write it as 127.0.0.1:15001 or [::1]:15001 (host names are not resolved)",
        )
    })
}

pub(super) fn parse_source4(s: &str) -> Result<Ipv4Addr, ConfigError> {
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

pub(super) fn parse_source6(s: &str) -> Result<Ipv6Addr, ConfigError> {
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

/// Parses a socket mark as the loader does (`interceptor_common::parse_mark`): `0x539`
/// (hex) or `1337` (decimal). 0 means "set no mark".
pub fn parse_mark(s: &str) -> Result<u32, ConfigError> {
    interceptor_common::parse_mark(s).map_err(|_| {
        ConfigError::new(
            "--bypass-mark",
            s,
            format!("not {MARK_SYNTAX}"),
            "give the mark the interception programs exempt (interceptor attach --bypass-mark); 0 sets no mark",
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

/// `--admin`: an address, or `""`/`off`/`none` for no admin server.
pub(super) fn parse_admin(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    match s.trim() {
        "" | "off" | "none" => Ok(None),
        t => parse_addr("--admin", t).map(Some),
    }
}

/// `--upgrade-socket`: a path, or nothing/`""`/`off` for none.
pub(super) fn parse_upgrade_socket(s: Option<&str>) -> Result<Option<PathBuf>, ConfigError> {
    match s.map(str::trim) {
        None | Some("" | "off") => Ok(None),
        Some(p) => parse_socket_path(p).map(Some),
    }
}

/// `--connect-timeout`: a duration greater than zero.
pub(super) fn parse_connect_timeout(s: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration("--connect-timeout", s)?;
    if d.is_zero() {
        return Err(ConfigError::new(
            "--connect-timeout",
            s,
            "must be greater than zero",
            "use e.g. 5s or 500ms",
        ));
    }
    Ok(d)
}

/// `--workers`: 1 to 1024 runtime threads.
pub(super) fn parse_workers(s: &str) -> Result<usize, ConfigError> {
    match s.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(ConfigError::new(
            "--workers",
            s,
            "not a whole number of at least 1",
            "pass the number of runtime threads, e.g. --workers 2, or leave it out to use one per CPU",
        )),
        Ok(n) if n > 1024 => Err(ConfigError::new(
            "--workers",
            s,
            "more than 1024 threads",
            "use at most one thread per CPU",
        )),
        Ok(n) => Ok(n),
    }
}

/// `--log-format`: text or json.
pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ConfigError::new(
            "--log-format",
            s,
            "unknown format",
            "use text or json",
        )),
    }
}

/// `--destination-stats-cap`: up to 10,000,000 destinations.
pub(super) fn parse_destination_cap(s: &str) -> Result<usize, ConfigError> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= 10_000_000 => Ok(n),
        _ => Err(ConfigError::new(
            "--destination-stats-cap",
            s,
            "not a whole number up to 10000000",
            "give the most destinations to track, e.g. 10000",
        )),
    }
}

/// `--destination-stats-idle`: a duration of at least 1s.
pub(super) fn parse_destination_idle(s: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration("--destination-stats-idle", s)?;
    if d < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "--destination-stats-idle",
            s,
            "shorter than 1s",
            "give e.g. 5m",
        ));
    }
    Ok(d)
}

/// `--max-connections`: 1 to 10,000,000.
pub(super) fn parse_max_connections(s: &str) -> Result<usize, ConfigError> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            "--max-connections",
            s,
            "not a whole number from 1 to 10000000",
            "give the most connections open at once over all listeners, e.g. 100000",
        )),
    }
}

/// `--dubbo-max-body`: bytes, plain or with a `KiB`/`MiB` suffix, 1 KiB to 2 GiB - 1.
pub(super) fn parse_dubbo_max_body(s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let (num, unit) = if let Some(n) = t.strip_suffix("MiB") {
        (n, 1u64 << 20)
    } else if let Some(n) = t.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (t, 1)
    };
    match num
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
    {
        Some(n) if (1024..=i32::MAX as u64).contains(&n) => Ok(n as u32),
        _ => Err(ConfigError::new(
            "--dubbo-max-body",
            s,
            "not a size from 1KiB to 2047MiB",
            "give the largest Dubbo frame body in bytes or with KiB/MiB, e.g. 8MiB",
        )),
    }
}

/// A timeout where 0 means none (`--tcp-idle-timeout`, `--http-idle-timeout`).
pub(super) fn parse_optional_timeout(
    setting: &'static str,
    s: &str,
) -> Result<Option<Duration>, ConfigError> {
    let d = parse_duration(setting, s)?;
    Ok((!d.is_zero()).then_some(d))
}

/// `--http-header-timeout`: a duration greater than zero.
pub(super) fn parse_header_timeout(s: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration("--http-header-timeout", s)?;
    if d.is_zero() {
        return Err(ConfigError::new(
            "--http-header-timeout",
            s,
            "must be greater than zero",
            "give how long a client may take to send a request's headers, e.g. 10s",
        ));
    }
    Ok(d)
}
