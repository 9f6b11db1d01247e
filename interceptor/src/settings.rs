//! A scope's settings: what the user asks for at attach time, validated in one place.
use std::{collections::BTreeSet, fmt, net::IpAddr, str::FromStr};

use interceptor_common::{defaults, MARK_SYNTAX};
use ipnet::IpNet;
use serde::Serialize;

use crate::error::{Error, Result};

// The defaults are the contract's (`interceptor_common::defaults`), shared with the kernel
// programs and the proxy; these names are the loader's for them.
/// Default port of the proxy's outbound listener.
pub const DEFAULT_PROXY_PORT: u16 = defaults::OUTBOUND_PORT;
/// Default bypass socket mark (the proxy marks its upstream sockets with it).
pub const DEFAULT_BYPASS_MARK: u32 = defaults::BYPASS_MARK;
/// Default bypass uid (the proxy's user in sidecar deployments).
pub const DEFAULT_BYPASS_UID: u32 = defaults::BYPASS_UID;
/// Default port of the proxy's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = defaults::INBOUND_PORT;

/// What happens to a scope's traffic while no proxy listens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyDown {
    /// Connections are refused: nothing bypasses the proxy (the default, both directions).
    #[default]
    Closed,
    /// Connections go where they were going, unproxied, and are counted.
    Open,
}

impl FromStr for ProxyDown {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "closed" => Ok(ProxyDown::Closed),
            "open" => Ok(ProxyDown::Open),
            _ => Err(invalid(
                "proxy-down policy",
                s,
                "expected `closed` (refuse connections) or `open` (let them go direct)",
            )),
        }
    }
}

/// How the connect programs recognise the proxy's outbound listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyListener {
    /// Only a listener carrying the bypass mark (`SO_MARK`, which needs `CAP_NET_ADMIN` or
    /// `CAP_NET_RAW`) is the proxy; another process listening on the port gets no
    /// connection (the default; `interceptor-proxy` marks its outbound listeners).
    #[default]
    Marked,
    /// Any listener on the port is taken for the proxy (for a proxy that cannot mark its
    /// listening socket, e.g. HAProxy, or one without `CAP_NET_ADMIN`).
    Any,
}

impl FromStr for ProxyListener {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "marked" => Ok(ProxyListener::Marked),
            "any" => Ok(ProxyListener::Any),
            _ => Err(invalid(
                "proxy listener",
                s,
                "expected `marked` (only a listener with the bypass mark is the proxy) or `any`",
            )),
        }
    }
}

/// Settings of one inbound scope (a network namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InboundSettings {
    /// Port of the proxy's inbound listener; connections to it are never steered.
    pub inbound_port: u16,
    /// Local ports whose connections go straight to the workload (health probes, admin).
    pub exclude_ports: BTreeSet<u16>,
    /// When not empty, only these local ports are steered to the proxy.
    pub include_ports: BTreeSet<u16>,
    /// Policy while no inbound listener is registered.
    pub on_proxy_down: ProxyDown,
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            inbound_port: DEFAULT_INBOUND_PORT,
            exclude_ports: BTreeSet::new(),
            include_ports: BTreeSet::new(),
            on_proxy_down: ProxyDown::Closed,
        }
    }
}

impl InboundSettings {
    pub fn validate(&self) -> Result<()> {
        if self.inbound_port == 0 {
            return Err(invalid("inbound port", "0", "a port must be 1-65535"));
        }
        if self.exclude_ports.contains(&0) || self.include_ports.contains(&0) {
            return Err(invalid("inbound port", "0", "a port must be 1-65535"));
        }
        if let Some(p) = self.exclude_ports.intersection(&self.include_ports).next() {
            return Err(invalid(
                "inbound port",
                &p.to_string(),
                "is both excluded and included; give it in one list only",
            ));
        }
        Ok(())
    }
}

/// Settings of one scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeSettings {
    /// Port of the proxy's outbound listener on 127.0.0.1 and ::1.
    pub proxy_port: u16,
    /// Sockets with this SO_MARK are not redirected (0: no mark check).
    pub bypass_mark: u32,
    /// Sockets owned by these uids are not redirected.
    pub bypass_uids: BTreeSet<u32>,
    /// Destination ports that are not redirected.
    pub exclude_ports: BTreeSet<u16>,
    /// Destinations inside these networks are not redirected.
    pub exclude_cidrs: BTreeSet<IpNet>,
    /// When not empty, only destinations inside these networks (per family) are redirected.
    pub include_cidrs: BTreeSet<IpNet>,
    /// Policy while no proxy listens on the outbound port.
    pub on_proxy_down: ProxyDown,
    /// Which listener on the outbound port is the proxy.
    pub proxy_listener: ProxyListener,
}

impl Default for ScopeSettings {
    fn default() -> Self {
        ScopeSettings {
            proxy_port: DEFAULT_PROXY_PORT,
            bypass_mark: DEFAULT_BYPASS_MARK,
            bypass_uids: BTreeSet::from([DEFAULT_BYPASS_UID]),
            exclude_ports: BTreeSet::new(),
            exclude_cidrs: BTreeSet::new(),
            include_cidrs: BTreeSet::new(),
            on_proxy_down: ProxyDown::Closed,
            proxy_listener: ProxyListener::Marked,
        }
    }
}

impl ScopeSettings {
    /// Checks what the types cannot: ports are 1-65535 and networks are normalised.
    pub fn validate(&self) -> Result<()> {
        if self.proxy_port == 0 {
            return Err(invalid("proxy port", "0", "a port must be 1-65535"));
        }
        if self.exclude_ports.contains(&0) {
            return Err(invalid("excluded port", "0", "a port must be 1-65535"));
        }
        if self.proxy_listener == ProxyListener::Marked && self.bypass_mark == 0 {
            return Err(invalid(
                "proxy listener",
                "marked",
                "the proxy's listener is recognised by the bypass mark, and the bypass mark is 0; \
                 give a bypass mark, or `any` to take any listener on the port for the proxy",
            ));
        }
        for net in self.exclude_cidrs.iter().chain(&self.include_cidrs) {
            if net.trunc() != *net {
                return Err(invalid(
                    "CIDR",
                    &net.to_string(),
                    &format!("host bits are set; did you mean {}?", net.trunc()),
                ));
            }
        }
        Ok(())
    }

    pub fn includes_v4(&self) -> bool {
        self.include_cidrs.iter().any(|n| matches!(n, IpNet::V4(_)))
    }

    pub fn includes_v6(&self) -> bool {
        self.include_cidrs.iter().any(|n| matches!(n, IpNet::V6(_)))
    }
}

fn invalid(setting: &'static str, value: &str, reason: &str) -> Error {
    Error::InvalidSetting {
        setting,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses a TCP port, 1-65535.
pub fn parse_port(s: &str) -> Result<u16> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| invalid("port", s, "expected a number 1-65535"))?;
    if v == 0 || v > 65535 {
        return Err(invalid("port", s, "out of range; a port must be 1-65535"));
    }
    Ok(v as u16)
}

/// Parses a socket mark, in hex (`0x539`) or decimal (`1337`), as the proxy does
/// (`interceptor_common::parse_mark`).
pub fn parse_mark(s: &str) -> Result<u32> {
    interceptor_common::parse_mark(s)
        .map_err(|_| invalid("mark", s, &format!("expected {MARK_SYNTAX}")))
}

/// Parses a uid.
pub fn parse_uid(s: &str) -> Result<u32> {
    s.trim()
        .parse()
        .map_err(|_| invalid("uid", s, "expected a numeric user id such as 1337"))
}

/// Parses a network `ADDR/PREFIX`; a bare address means a single host (/32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let t = s.trim();
    let net = if t.contains('/') {
        IpNet::from_str(t).map_err(|_| {
            invalid(
                "CIDR",
                s,
                "expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8 (prefix at most 32 for IPv4, 128 for IPv6)",
            )
        })?
    } else {
        let ip = IpAddr::from_str(t).map_err(|_| {
            invalid(
                "CIDR",
                s,
                "expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8",
            )
        })?;
        IpNet::from(ip)
    };
    if net.trunc() != net {
        return Err(invalid(
            "CIDR",
            s,
            &format!("host bits are set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// Shows a mark the way operators write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(pub u32);

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port("15001").unwrap(), 15001);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "-1", "x", ""] {
            let e = parse_port(bad).unwrap_err().to_string();
            assert!(e.contains("port") && e.contains("1-65535"), "{bad}: {e}");
        }
    }

    #[test]
    fn marks() {
        assert_eq!(parse_mark("0x539").unwrap(), 1337);
        assert_eq!(parse_mark("1337").unwrap(), 1337);
        assert!(parse_mark("0xfffffffff").is_err());
        let e = parse_mark("mark").unwrap_err().to_string();
        assert_eq!(
            e,
            "mark \"mark\": expected a 32-bit number, hex (0x539) or decimal (1337)"
        );
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(parse_cidr("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        let e = parse_cidr("10.1.2.3/8").unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/8"), "{e}");
        for bad in ["10.0.0.0/33", "300.1.1.1/8", "fd00::/129", "nonsense"] {
            let e = parse_cidr(bad).unwrap_err().to_string();
            assert!(e.contains("CIDR") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_validate() {
        let mut s = ScopeSettings::default();
        s.validate().unwrap();
        s.proxy_port = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn a_marked_proxy_listener_needs_a_bypass_mark() {
        let mut s = ScopeSettings {
            bypass_mark: 0,
            ..ScopeSettings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("proxy listener") && e.contains("any"), "{e}");
        s.proxy_listener = ProxyListener::Any;
        s.validate().unwrap();
        assert_eq!("any".parse::<ProxyListener>().unwrap(), ProxyListener::Any);
        assert_eq!(
            " marked".parse::<ProxyListener>().unwrap(),
            ProxyListener::Marked
        );
        let e = "mark".parse::<ProxyListener>().unwrap_err().to_string();
        assert!(e.contains("mark") && e.contains("any"), "{e}");
    }
}
