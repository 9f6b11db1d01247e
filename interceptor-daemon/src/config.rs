//! The daemon's config file (`interceptor run --config FILE`), parsed and validated in one
//! place. Every error names the line, the column and the field, says what is wrong and what
//! to do about it. A config that fails to parse changes nothing (a reload keeps the running
//! one).
//!
//! ```toml
//! pin_dir = "/sys/fs/bpf/interceptor"   # default
//! listen = "127.0.0.1:15030"            # public: /healthz, /ready, /pods/NS/NAME/ready (the pods' gate)
//! admin_listen = "127.0.0.1:15031"      # loopback: all of those, /metrics and /scopes (they list every scope)
//! rescan_interval_ms = 100              # how often scopes are checked (a recreated cgroup)
//! detach_on_exit = false                # default: interception stays in place when the daemon exits
//! cgroup_root = "/sys/fs/cgroup"        # where unit and slice names resolve (default: the cgroup2 mount)
//! cgroup2_mount = "/host/sys/fs/cgroup" # the host's cgroup2 hierarchy (default: from /proc/self/mountinfo;
//!                                       # set it in a container with a private cgroup namespace)
//!
//! [[scope]]
//! name = "web"                          # optional label (default: the unit, slice or cgroup)
//! unit = "nginx.service"                # or slice = "app-web.slice", or cgroup = "/sys/fs/cgroup/..."
//! proxy_port = 15001
//! bypass_mark = "0x539"                 # or 1337
//! bypass_uids = [1337]
//! exclude_ports = [22]
//! exclude_cidrs = ["169.254.0.0/16"]
//! include_cidrs = []
//! on_proxy_down = "closed"              # or "open"
//! proxy_listener = "marked"             # or "any" (a proxy that cannot mark its listener)
//! netns = "/run/netns/web"              # optional: inbound interception of this namespace
//! inbound_port = 15006
//! exclude_inbound_ports = [15021]
//! include_inbound_ports = []
//! on_inbound_proxy_down = "closed"
//!
//! [kubernetes]                          # node agent mode (see `daemon::agent`)
//! node_name = "node-1"                  # default: $NODE_NAME (the downward API's spec.nodeName)
//! api_server = "https://10.0.0.1:443"   # default: in-cluster config, else $KUBECONFIG
//! cgroup_driver = "auto"                # "systemd", "cgroupfs" or "auto" (try both)
//! kubepods_parent = "/sys/fs/cgroup"    # the directory that holds kubepods(.slice); default the cgroup2 mount
//! inbound = true                        # also intercept the pods' inbound connections
//! ```
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use interceptor::{
    paths::DEFAULT_PIN_DIR,
    settings::{self, InboundSettings, ProxyDown, ScopeSettings},
};

use crate::error::{Error, Result};

/// Default address of the daemon's HTTP endpoints.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15030";
/// Default address of the endpoints that list every scope (`/metrics`, `/scopes`).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15031";
/// Default interval between two checks of every scope.
pub const DEFAULT_RESCAN: Duration = Duration::from_millis(100);

/// The daemon's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub pin_dir: PathBuf,
    /// Public endpoints: health, readiness, the per-pod gate.
    pub listen: SocketAddr,
    /// Every endpoint, including `/metrics` and `/scopes`; loopback unless the operator
    /// says otherwise (a non-loopback address is logged as a warning at start).
    pub admin_listen: SocketAddr,
    pub rescan_interval: Duration,
    pub detach_on_exit: bool,
    /// Where unit and slice names resolve; `None`: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup2 hierarchy to use instead of the one in /proc/self/mountinfo.
    pub cgroup2_mount: Option<PathBuf>,
    pub scopes: Vec<ScopeConfig>,
    pub kubernetes: Option<KubeConfig>,
}

/// What a configured scope names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A cgroup directory.
    Cgroup(PathBuf),
    /// A systemd unit (`nginx.service`, `session-1.scope`).
    Unit(String),
    /// A systemd slice (`app-web.slice`).
    Slice(String),
}

/// One `[[scope]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeConfig {
    pub name: String,
    pub target: Target,
    pub settings: ScopeSettings,
    /// Inbound interception of a network namespace file, with its settings.
    pub inbound: Option<(PathBuf, InboundSettings)>,
}

/// How the kubelet names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
    /// Try the systemd names, then the cgroupfs ones.
    Auto,
}

/// `[kubernetes]`: node agent mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeConfig {
    pub node_name: String,
    pub api_server: Option<String>,
    pub cgroup_driver: CgroupDriver,
    pub kubepods_parent: Option<PathBuf>,
    pub inbound: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    pin_dir: Option<PathBuf>,
    listen: Option<String>,
    admin_listen: Option<String>,
    rescan_interval_ms: Option<u64>,
    detach_on_exit: Option<bool>,
    cgroup_root: Option<PathBuf>,
    cgroup2_mount: Option<PathBuf>,
    #[serde(default)]
    scope: Vec<RawScope>,
    kubernetes: Option<RawKube>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MarkValue {
    Number(u32),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    name: Option<String>,
    cgroup: Option<PathBuf>,
    unit: Option<String>,
    slice: Option<String>,
    proxy_port: Option<u16>,
    bypass_mark: Option<MarkValue>,
    bypass_uids: Option<Vec<u32>>,
    exclude_ports: Option<Vec<u16>>,
    exclude_cidrs: Option<Vec<String>>,
    include_cidrs: Option<Vec<String>>,
    on_proxy_down: Option<String>,
    proxy_listener: Option<String>,
    netns: Option<PathBuf>,
    inbound_port: Option<u16>,
    exclude_inbound_ports: Option<Vec<u16>>,
    include_inbound_ports: Option<Vec<u16>>,
    on_inbound_proxy_down: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKube {
    node_name: Option<String>,
    api_server: Option<String>,
    cgroup_driver: Option<String>,
    kubepods_parent: Option<PathBuf>,
    inbound: Option<bool>,
}

/// Where a problem is: the file's text, to turn byte offsets and field names into lines.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn err_at(&self, offset: usize, field: &str, problem: &str, fix: &str) -> Error {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        Error::Config {
            file: self.file.into(),
            line,
            column,
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Byte offset of the line that sets `key` inside the table that starts at `section`
    /// (a byte offset), or of the section itself when the key is not found.
    fn key_offset(&self, section: usize, key: &str) -> usize {
        let mut offset = section;
        let mut first = true;
        for line in self.text[section..].split_inclusive('\n') {
            let t = line.trim_start();
            if !first && t.starts_with('[') {
                break;
            }
            first = false;
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return offset + (line.len() - t.len());
                }
            }
            offset += line.len();
        }
        section
    }

    /// Byte offsets of the `n`-th `[[scope]]` header and of the `[kubernetes]` header.
    fn table_offset(&self, header: &str, n: usize) -> usize {
        let mut offset = 0;
        let mut seen = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            let compact: String = t.chars().filter(|c| !c.is_whitespace()).collect();
            if compact.starts_with(header) {
                if seen == n {
                    return offset;
                }
                seen += 1;
            }
            offset += line.len();
        }
        0
    }
}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
    parse(path, &text)
}

/// Parses the text of a config file (`file` names it in errors).
pub fn parse(file: &Path, text: &str) -> Result<Config> {
    let src = Source { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&src, &e))?;
    let top = |key: &str| src.key_offset(0, key);
    let listen = match &raw.listen {
        None => DEFAULT_LISTEN.parse().expect("valid default"),
        Some(l) => l.parse().map_err(|_| {
            src.err_at(
                top("listen"),
                "listen",
                &format!("{l:?} is not an address"),
                "give IP:PORT, e.g. \"127.0.0.1:15030\"",
            )
        })?,
    };
    let admin_listen: SocketAddr = match &raw.admin_listen {
        None => DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
        Some(l) => l.parse().map_err(|_| {
            src.err_at(
                top("admin_listen"),
                "admin_listen",
                &format!("{l:?} is not an address"),
                "give a loopback IP:PORT, e.g. \"127.0.0.1:15031\"",
            )
        })?,
    };
    if admin_listen == listen
        || (admin_listen.port() == listen.port()
            && (admin_listen.ip().is_unspecified() || listen.ip().is_unspecified()))
    {
        return Err(src.err_at(
            top("admin_listen"),
            "admin_listen",
            &format!("{admin_listen} is also `listen` ({listen})"),
            "give the admin endpoints a port of their own, e.g. \"127.0.0.1:15031\"",
        ));
    }
    let rescan_interval = match raw.rescan_interval_ms {
        None => DEFAULT_RESCAN,
        Some(ms) if (10..=10_000).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(src.err_at(
                top("rescan_interval_ms"),
                "rescan_interval_ms",
                &format!("{ms} is out of range"),
                "give 10 to 10000 (milliseconds)",
            ))
        }
    };
    let pin_dir = raw.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into());
    if !pin_dir.is_absolute() {
        return Err(src.err_at(
            top("pin_dir"),
            "pin_dir",
            "must be an absolute path",
            "give a directory under /sys/fs/bpf",
        ));
    }
    if let Some(root) = &raw.cgroup_root {
        if !root.is_absolute() {
            return Err(src.err_at(
                top("cgroup_root"),
                "cgroup_root",
                "must be an absolute path",
                "give the cgroup2 mount (or leave it out to find it in /proc/self/mountinfo)",
            ));
        }
    }
    if let Some(m) = &raw.cgroup2_mount {
        if !m.is_absolute() {
            return Err(src.err_at(
                top("cgroup2_mount"),
                "cgroup2_mount",
                "must be an absolute path",
                "give where the host's cgroup2 hierarchy is mounted, e.g. \"/host/sys/fs/cgroup\"",
            ));
        }
    }
    let mut scopes = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in raw.scope.into_iter().enumerate() {
        let at = src.table_offset("[[scope]]", i);
        let scope = scope(&src, at, i, s)?;
        if !names.insert(scope.name.clone()) {
            return Err(src.err_at(
                at,
                &format!("scope[{i}]"),
                &format!("a second scope named {:?}", scope.name),
                "give each scope its own `name` (or target)",
            ));
        }
        scopes.push(scope);
    }
    let kubernetes = match raw.kubernetes {
        None => None,
        Some(k) => Some(kube(&src, src.table_offset("[kubernetes]", 0), k)?),
    };
    Ok(Config {
        pin_dir,
        listen,
        admin_listen,
        rescan_interval,
        detach_on_exit: raw.detach_on_exit.unwrap_or(false),
        cgroup_root: raw.cgroup_root,
        cgroup2_mount: raw.cgroup2_mount,
        scopes,
        kubernetes,
    })
}

fn toml_error(src: &Source<'_>, e: &toml::de::Error) -> Error {
    let offset = e.span().map_or(0, |s| s.start);
    // The field is the key on the line of the error (or the table header there).
    let line_start = src.text[..offset.min(src.text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = src.text[line_start..].lines().next().unwrap_or("").trim();
    let field = match line.split_once('=') {
        Some((k, _)) if !line.starts_with('[') => k.trim().to_string(),
        _ if line.starts_with('[') => line.to_string(),
        _ => "(file)".to_string(),
    };
    let problem = e.message().trim().to_string();
    let fix = if problem.contains("unknown field") {
        "remove it or correct its spelling (see the example config in deploy/systemd/config.toml)"
    } else if problem.contains("invalid type") || problem.contains("invalid value") {
        "give a value of the expected type"
    } else {
        "fix the TOML syntax there"
    };
    src.err_at(offset, &field, &problem, fix)
}

fn scope(src: &Source<'_>, at: usize, i: usize, s: RawScope) -> Result<ScopeConfig> {
    let label = s
        .name
        .clone()
        .or_else(|| s.unit.clone())
        .or_else(|| s.slice.clone())
        .or_else(|| s.cgroup.as_ref().map(|c| c.display().to_string()))
        .unwrap_or_else(|| format!("scope[{i}]"));
    let err = |key: &str, problem: String, fix: &str| {
        src.err_at(
            src.key_offset(at, key),
            &format!("{label}.{key}"),
            &problem,
            fix,
        )
    };
    let target = match (&s.cgroup, &s.unit, &s.slice) {
        (Some(c), None, None) => {
            if !c.is_absolute() {
                return Err(err(
                    "cgroup",
                    format!("{} is not an absolute path", c.display()),
                    "give a directory under the cgroup2 mount",
                ));
            }
            Target::Cgroup(c.clone())
        }
        (None, Some(u), None) => {
            if !(u.ends_with(".service") || u.ends_with(".scope")) || u.contains('/') {
                return Err(err(
                    "unit",
                    format!("{u:?} is not a service or scope unit name"),
                    "give a unit such as \"nginx.service\" (for a slice use `slice`)",
                ));
            }
            Target::Unit(u.clone())
        }
        (None, None, Some(sl)) => {
            if !sl.ends_with(".slice") || sl.contains('/') {
                return Err(err(
                    "slice",
                    format!("{sl:?} is not a slice name"),
                    "give a slice such as \"app-web.slice\"",
                ));
            }
            Target::Slice(sl.clone())
        }
        _ => {
            return Err(src.err_at(
                at,
                &label,
                "needs exactly one of `cgroup`, `unit` or `slice`",
                "name the scope's cgroup one way",
            ))
        }
    };
    let name = s.name.clone().unwrap_or_else(|| match &target {
        Target::Cgroup(p) => p.display().to_string(),
        Target::Unit(u) | Target::Slice(u) => u.clone(),
    });
    let mut st = ScopeSettings::default();
    if let Some(p) = s.proxy_port {
        if p == 0 {
            return Err(err("proxy_port", "0 is not a port".into(), "give 1-65535"));
        }
        st.proxy_port = p;
    }
    if let Some(m) = &s.bypass_mark {
        st.bypass_mark = match m {
            MarkValue::Number(n) => *n,
            MarkValue::Text(t) => settings::parse_mark(t).map_err(|_| {
                err(
                    "bypass_mark",
                    format!("{t:?} is not a mark"),
                    "give a 32-bit number, hex (\"0x539\") or decimal (1337)",
                )
            })?,
        };
    }
    if let Some(u) = &s.bypass_uids {
        st.bypass_uids = u.iter().copied().collect();
    }
    if let Some(p) = &s.exclude_ports {
        st.exclude_ports = ports(p).map_err(|m| err("exclude_ports", m, "give ports 1-65535"))?;
    }
    st.exclude_cidrs = cidrs(&s.exclude_cidrs)
        .map_err(|m| err("exclude_cidrs", m, "give networks such as \"10.0.0.0/8\""))?;
    st.include_cidrs = cidrs(&s.include_cidrs)
        .map_err(|m| err("include_cidrs", m, "give networks such as \"10.0.0.0/8\""))?;
    if let Some(p) = &s.on_proxy_down {
        st.on_proxy_down = policy(p).map_err(|m| err("on_proxy_down", m, POLICY_FIX))?;
    }
    if let Some(l) = &s.proxy_listener {
        st.proxy_listener = l.parse().map_err(|_| {
            err(
                "proxy_listener",
                format!("{l:?} is not a listener kind"),
                "give \"marked\" (only a listener with the bypass mark is the proxy) or \"any\"",
            )
        })?;
    }
    let inbound_keys = s.inbound_port.is_some()
        || s.exclude_inbound_ports.is_some()
        || s.include_inbound_ports.is_some()
        || s.on_inbound_proxy_down.is_some();
    let inbound = match &s.netns {
        None if inbound_keys => {
            return Err(src.err_at(
                at,
                &format!("{label}.netns"),
                "inbound settings are given but no `netns`",
                "add `netns = \"/run/netns/NAME\"` or remove the inbound settings",
            ))
        }
        None => None,
        Some(ns) => {
            let mut ib = InboundSettings::default();
            if let Some(p) = s.inbound_port {
                if p == 0 {
                    return Err(err(
                        "inbound_port",
                        "0 is not a port".into(),
                        "give 1-65535",
                    ));
                }
                ib.inbound_port = p;
            }
            if let Some(p) = &s.exclude_inbound_ports {
                ib.exclude_ports =
                    ports(p).map_err(|m| err("exclude_inbound_ports", m, "give ports 1-65535"))?;
            }
            if let Some(p) = &s.include_inbound_ports {
                ib.include_ports =
                    ports(p).map_err(|m| err("include_inbound_ports", m, "give ports 1-65535"))?;
            }
            if let Some(p) = &s.on_inbound_proxy_down {
                ib.on_proxy_down =
                    policy(p).map_err(|m| err("on_inbound_proxy_down", m, POLICY_FIX))?;
            }
            ib.validate().map_err(|e| {
                err(
                    "include_inbound_ports",
                    e.to_string(),
                    "give each port in one list only",
                )
            })?;
            Some((ns.clone(), ib))
        }
    };
    st.validate()
        .map_err(|e| err("exclude_ports", e.to_string(), "correct the value"))?;
    Ok(ScopeConfig {
        name,
        target,
        settings: st,
        inbound,
    })
}

const POLICY_FIX: &str = "give \"closed\" (refuse connections) or \"open\" (let them go direct)";

fn policy(p: &str) -> std::result::Result<ProxyDown, String> {
    p.parse::<ProxyDown>()
        .map_err(|_| format!("{p:?} is not a policy"))
}

fn ports(p: &[u16]) -> std::result::Result<BTreeSet<u16>, String> {
    if p.contains(&0) {
        return Err("0 is not a port".into());
    }
    Ok(p.iter().copied().collect())
}

fn cidrs(v: &Option<Vec<String>>) -> std::result::Result<BTreeSet<IpNet>, String> {
    let mut out = BTreeSet::new();
    for c in v.iter().flatten() {
        out.insert(settings::parse_cidr(c).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn kube(src: &Source<'_>, at: usize, k: RawKube) -> Result<KubeConfig> {
    let err = |key: &str, problem: String, fix: &str| {
        src.err_at(
            src.key_offset(at, key),
            &format!("kubernetes.{key}"),
            &problem,
            fix,
        )
    };
    let node_name = match k.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
        Some(n) if !n.trim().is_empty() => n.trim().to_string(),
        _ => {
            return Err(err(
                "node_name",
                "not set, and $NODE_NAME is empty".into(),
                "set `node_name`, or NODE_NAME from the downward API (fieldRef spec.nodeName)",
            ))
        }
    };
    let cgroup_driver = match k.cgroup_driver.as_deref() {
        None | Some("auto") => CgroupDriver::Auto,
        Some("systemd") => CgroupDriver::Systemd,
        Some("cgroupfs") => CgroupDriver::Cgroupfs,
        Some(other) => {
            return Err(err(
                "cgroup_driver",
                format!("{other:?} is not a cgroup driver"),
                "give \"systemd\", \"cgroupfs\" or \"auto\" (the kubelet's cgroupDriver)",
            ))
        }
    };
    if let Some(a) = &k.api_server {
        if !(a.starts_with("http://") || a.starts_with("https://")) {
            return Err(err(
                "api_server",
                format!("{a:?} is not an http(s) URL"),
                "give e.g. \"https://10.0.0.1:443\", or leave it out to use the in-cluster config",
            ));
        }
    }
    Ok(KubeConfig {
        node_name,
        api_server: k.api_server,
        cgroup_driver,
        kubepods_parent: k.kubepods_parent,
        inbound: k.inbound.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config> {
        parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn full_config() {
        let c = p(r#"
pin_dir = "/sys/fs/bpf/x"
listen = "127.0.0.1:9999"
rescan_interval_ms = 50

[[scope]]
unit = "nginx.service"
exclude_ports = [22, 53]
exclude_cidrs = ["169.254.0.0/16"]
bypass_mark = "0x10"
on_proxy_down = "open"

[[scope]]
name = "app"
slice = "app-web.slice"
netns = "/run/netns/app"
exclude_inbound_ports = [15021]

[[scope]]
cgroup = "/sys/fs/cgroup/unified/x"
bypass_mark = 7

[kubernetes]
node_name = "n1"
cgroup_driver = "systemd"
"#)
        .unwrap();
        assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(c.rescan_interval, Duration::from_millis(50));
        assert_eq!(c.scopes.len(), 3);
        let web = &c.scopes[0];
        assert_eq!(web.name, "nginx.service");
        assert_eq!(web.target, Target::Unit("nginx.service".into()));
        assert_eq!(web.settings.exclude_ports, BTreeSet::from([22, 53]));
        assert_eq!(web.settings.bypass_mark, 0x10);
        assert_eq!(web.settings.on_proxy_down, ProxyDown::Open);
        assert_eq!(web.settings.bypass_uids, BTreeSet::from([1337]));
        let app = &c.scopes[1];
        let (ns, ib) = app.inbound.as_ref().unwrap();
        assert_eq!(ns, Path::new("/run/netns/app"));
        assert_eq!(ib.exclude_ports, BTreeSet::from([15021]));
        assert_eq!(c.scopes[2].settings.bypass_mark, 7);
        let k = c.kubernetes.unwrap();
        assert_eq!(k.node_name, "n1");
        assert_eq!(k.cgroup_driver, CgroupDriver::Systemd);
        assert!(k.inbound);
    }

    #[test]
    fn defaults() {
        let c = p("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.pin_dir, Path::new(DEFAULT_PIN_DIR));
        assert!(!c.detach_on_exit);
        assert!(c.scopes.is_empty());
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let e = err(
            "listen = \"127.0.0.1:1\"\n\n[[scope]]\nunit = \"a.service\"\nproxy_port = \"x\"\n",
        );
        assert!(e.starts_with("test.toml: line 5, column"), "{e}");
        assert!(e.contains("proxy_port"), "{e}");
        let e = err("[[scope]]\nunit = \"a.service\"\nexclude_cidrs = [\"10.1.2.3/8\"]\n");
        assert!(
            e.contains("line 3, column 1: a.service.exclude_cidrs"),
            "{e}"
        );
        assert!(e.contains("10.0.0.0/8"), "{e}");
        let e = err("[[scope]]\nunit = \"a.service\"\nexclude_port = [1]\n");
        assert!(e.contains("line 3") && e.contains("unknown field"), "{e}");
        assert!(e.contains("exclude_port"), "{e}");
        let e = err("[[scope]]\nname = \"x\"\n");
        assert!(
            e.contains("line 1, column 1: x: needs exactly one of"),
            "{e}"
        );
        let e = err("[[scope]]\nunit = \"nginx\"\n");
        assert!(e.contains("line 2") && e.contains("unit"), "{e}");
        let e = err("[[scope]]\nunit = \"a.service\"\n[[scope]]\nunit = \"a.service\"\n");
        assert!(e.contains("line 3") && e.contains("second scope"), "{e}");
        let e = err("[[scope]]\nunit = \"a.service\"\non_proxy_down = \"maybe\"\n");
        assert!(e.contains("line 3") && e.contains("\"closed\""), "{e}");
        let e = err("[[scope]]\nunit = \"a.service\"\nexclude_inbound_ports = [1]\n");
        assert!(e.contains("no `netns`"), "{e}");
        let e = err("rescan_interval_ms = 1\n");
        assert!(e.contains("line 1, column 1: rescan_interval_ms"), "{e}");
        let e = err("[kubernetes]\nnode_name = \"n\"\ncgroup_driver = \"x\"\n");
        assert!(
            e.contains("line 3") && e.contains("kubernetes.cgroup_driver"),
            "{e}"
        );
        let e = err("[[scope]\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("listen = \"0.0.0.0:15030\"\nadmin_listen = \"127.0.0.1:15030\"\n");
        assert!(
            e.contains("line 2, column 1: admin_listen") && e.contains("port of their own"),
            "{e}"
        );
        let e = err("admin_listen = \"loopback\"\n");
        assert!(
            e.contains("admin_listen") && e.contains("not an address"),
            "{e}"
        );
    }
}
