//! From the command line to a [`Config`]: every setting parsed, then checked against the
//! others (listeners that would share a port, ...).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use super::cli::Cli;
use super::error::ConfigError;
use super::parse::{
    parse_addr, parse_admin, parse_connect_timeout, parse_destination_cap, parse_destination_idle,
    parse_dubbo_max_body, parse_duration, parse_header_timeout, parse_log_format, parse_mark,
    parse_max_connections, parse_optional_timeout, parse_source4, parse_source6, parse_switch,
    parse_upgrade_socket, parse_workers,
};
use super::settings::{default_workers, Config};
use crate::stats::DestinationLimits;

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

        let admin = parse_admin(&cli.admin)?;
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
        let connect_timeout = parse_connect_timeout(&cli.connect_timeout)?;
        let workers = match &cli.workers {
            None => default_workers(),
            Some(s) => parse_workers(s)?,
        };
        let log_format = parse_log_format(&cli.log_format)?;

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
            upgrade_socket: parse_upgrade_socket(cli.upgrade_socket.as_deref())?,
            upgrade: cli.upgrade,
            upgrade_binary: match cli.upgrade_binary.as_deref() {
                None => None,
                Some("") => {
                    return Err(ConfigError::new(
                        "--upgrade-binary",
                        "",
                        "empty",
                        "give the path of the new interceptor-proxy binary, or leave the option out to start this one's own binary",
                    ))
                }
                Some(p) => Some(PathBuf::from(p)),
            },
            routes: cli.routes.as_deref().map(PathBuf::from),
            protocol_detection_timeout: parse_duration(
                "--protocol-detection-timeout",
                &cli.protocol_detection_timeout,
            )?,
            dubbo_max_body: parse_dubbo_max_body(&cli.dubbo_max_body)?,
            destination_stats: parse_switch("--destination-stats", &cli.destination_stats)?,
            destination_limits: DestinationLimits {
                cap: parse_destination_cap(&cli.destination_stats_cap)?,
                idle: parse_destination_idle(&cli.destination_stats_idle)?,
            },
            max_connections: parse_max_connections(&cli.max_connections)?,
            tcp_idle_timeout: parse_optional_timeout("--tcp-idle-timeout", &cli.tcp_idle_timeout)?,
            kernel_forward: parse_switch("--kernel-forward", &cli.kernel_forward)?,
            http_header_timeout: parse_header_timeout(&cli.http_header_timeout)?,
            http_idle_timeout: parse_optional_timeout(
                "--http-idle-timeout",
                &cli.http_idle_timeout,
            )?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::LogFormat;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

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
    fn dubbo_max_body_sizes() {
        assert_eq!(parse(&[]).unwrap().dubbo_max_body, 8 << 20);
        for (v, want) in [("65536", 65536), ("64KiB", 65536), ("16MiB", 16 << 20)] {
            assert_eq!(
                parse(&["--dubbo-max-body", v]).unwrap().dubbo_max_body,
                want
            );
        }
        for v in ["1", "8MB", "2048MiB", "1.5MiB", ""] {
            let e = invalid(&["--dubbo-max-body", v]);
            assert_eq!((e.setting, e.value.as_str()), ("--dubbo-max-body", v));
            assert!(e.to_string().contains("e.g. 8MiB"), "{e}");
        }
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
    fn connection_limit_and_timeouts() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.tcp_idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        let c = parse(&[
            "--max-connections",
            "5",
            "--tcp-idle-timeout",
            "0",
            "--http-idle-timeout",
            "30s",
            "--http-header-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(c.max_connections, 5);
        assert_eq!(c.tcp_idle_timeout, None);
        assert_eq!(c.http_idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.http_header_timeout, Duration::from_millis(500));
        for bad in ["0", "-1", "many", "10000001"] {
            let e = invalid(&[&format!("--max-connections={bad}")]);
            assert_eq!((e.setting, e.value.as_str()), ("--max-connections", bad));
        }
        assert_eq!(
            invalid(&["--http-header-timeout", "0"]).setting,
            "--http-header-timeout"
        );
        assert_eq!(
            invalid(&["--tcp-idle-timeout", "soon"]).setting,
            "--tcp-idle-timeout"
        );
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
