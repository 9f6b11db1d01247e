//! Load generators for tests that change something under traffic (upgrades, restarts):
//! [`Wrk`] (the real `wrk`, keep-alive or one connection per request), [`Churn`] (a
//! duration-bounded stream of new `icpt-probe` connections), [`Nginx`] (an HTTP server
//! for wrk to hit), and [`listen_drops`] (the namespace's accept-queue drop counters).
//!
//! All of them run inside a test network namespace, and the clients optionally inside a
//! test cgroup so that their connections are intercepted. Every wait is bounded.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::bins::probe_bin;
use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::probe::ChurnReport;
use crate::process::{spawn_in, Proc};
use crate::util::wait_until;

/// How long past its nominal duration a load generator may take to exit before
/// `finish` kills it and panics.
const FINISH_GRACE: Duration = Duration::from_secs(30);

/// A running `wrk` (Debian's wrk 4.1, installed by `cargo xtask setup`).
///
/// Drop without [`finish`](Self::finish): the process is killed (its [`Proc`] guard).
pub struct Wrk {
    proc: Proc,
    duration: Duration,
    url: String,
}

/// What `wrk` reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrkReport {
    /// Completed requests (`N requests in ...`).
    pub requests: u64,
    /// `Non-2xx or 3xx responses: N` (0 when wrk printed no such line).
    pub non_2xx_3xx: u64,
    /// `Socket errors: connect C, read R, write W, timeout T` (0 when not printed).
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    /// wrk's whole stdout, for messages.
    pub output: String,
}

impl WrkReport {
    /// Every failure wrk counts: bad statuses, connect/read/write errors and timeouts.
    pub fn errors(&self) -> u64 {
        self.non_2xx_3xx
            + self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeouts
    }

    /// Parses wrk's stdout. `None` unless it has the `N requests in ...` line.
    pub fn parse(output: &str) -> Option<WrkReport> {
        let mut r = WrkReport {
            output: output.to_string(),
            ..WrkReport::default()
        };
        let mut saw_requests = false;
        for line in output.lines().map(str::trim) {
            if let Some(i) = line.find(" requests in ") {
                r.requests = line[..i].trim().parse().ok()?;
                saw_requests = true;
            } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx_3xx = rest.trim().parse().ok()?;
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                // "connect 0, read 5, write 0, timeout 0"
                for part in rest.split(',') {
                    let mut w = part.split_whitespace();
                    let (Some(what), Some(n)) = (w.next(), w.next()) else {
                        return None;
                    };
                    let n: u64 = n.parse().ok()?;
                    match what {
                        "connect" => r.connect_errors = n,
                        "read" => r.read_errors = n,
                        "write" => r.write_errors = n,
                        "timeout" => r.timeouts = n,
                        _ => return None,
                    }
                }
            }
        }
        saw_requests.then_some(r)
    }
}

impl Wrk {
    /// Starts `wrk -t T -c CONNECTIONS -d DURATION --timeout 10s URL` inside `ns` (and
    /// inside `cgroup`, if given, so its connections are intercepted). With
    /// `close_each_request` every request carries `Connection: close`, so each one is a
    /// new connection; otherwise connections are kept alive. The duration is rounded up
    /// to whole seconds (wrk's unit), at least 1 s. T is min(2, CONNECTIONS).
    pub fn start(
        ns: &NetNs,
        cgroup: Option<&TestCgroup>,
        url: &str,
        connections: u32,
        duration: Duration,
        close_each_request: bool,
    ) -> Wrk {
        assert!(connections > 0, "wrk needs at least one connection");
        let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
        let secs = secs.max(1);
        let threads = connections.min(2).to_string();
        let conns = connections.to_string();
        let dur = format!("{secs}s");
        let mut cmd = vec![
            "wrk",
            "-t",
            &threads,
            "-c",
            &conns,
            "-d",
            &dur,
            "--timeout",
            "10s",
        ];
        if close_each_request {
            cmd.extend_from_slice(&["-H", "Connection: close"]);
        }
        cmd.push(url);
        Wrk {
            proc: spawn_in(ns, cgroup, &cmd),
            duration: Duration::from_secs(secs),
            url: url.to_string(),
        }
    }

    /// The process, e.g. to check it is still running.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Waits for wrk to end (its duration plus 30 s at most) and parses its report.
    /// Panics with wrk's stdout and stderr if it does not end, fails, or prints no report.
    pub fn finish(mut self) -> WrkReport {
        let status = self.proc.wait_timeout(self.duration + FINISH_GRACE);
        let (out, err) = (self.proc.stdout(), self.proc.stderr());
        let Some(status) = status else {
            self.proc.kill();
            panic!(
                "wrk {} did not end within {:?} of its {:?}\n---- stdout ----\n{out}\n---- stderr ----\n{err}",
                self.url, FINISH_GRACE, self.duration
            );
        };
        if !status.success() {
            panic!(
                "wrk {} failed ({status})\n---- stdout ----\n{out}\n---- stderr ----\n{err}",
                self.url
            );
        }
        WrkReport::parse(&out).unwrap_or_else(|| {
            panic!(
                "cannot parse wrk {} output\n---- stdout ----\n{out}\n---- stderr ----\n{err}",
                self.url
            )
        })
    }
}

/// A running `icpt-probe churn --for-ms`: new connections, one `HELLO` each, from
/// `parallel` threads, for a duration.
pub struct Churn {
    proc: Proc,
    duration: Duration,
}

impl Churn {
    /// Starts `icpt-probe churn ADDR --for-ms MS --parallel P` inside `ns` (and `cgroup`).
    pub fn start(
        ns: &NetNs,
        cgroup: Option<&TestCgroup>,
        addr: &str,
        parallel: u32,
        duration: Duration,
    ) -> Churn {
        let bin = probe_bin();
        let ms = duration.as_millis().max(1).to_string();
        let par = parallel.to_string();
        let cmd = [
            bin.to_str().expect("probe path is UTF-8"),
            "churn",
            addr,
            "--for-ms",
            &ms,
            "--parallel",
            &par,
        ];
        Churn {
            proc: spawn_in(ns, cgroup, &cmd),
            duration,
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Waits for the run to end (its duration plus 30 s at most) and parses its JSON
    /// report. Panics with the output if it does not end or prints no report.
    pub fn finish(mut self) -> ChurnReport {
        let status = self.proc.wait_timeout(self.duration + FINISH_GRACE);
        let (out, err) = (self.proc.stdout(), self.proc.stderr());
        if status.is_none() {
            self.proc.kill();
            panic!(
                "icpt-probe churn did not end within {:?} of its {:?}\n---- stdout ----\n{out}\n---- stderr ----\n{err}",
                FINISH_GRACE, self.duration
            );
        }
        let line = out.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "icpt-probe churn: no report ({e}), exit {status:?}\n---- stdout ----\n{out}\n---- stderr ----\n{err}"
            )
        })
    }
}

/// `TcpExt` `ListenDrops` and `ListenOverflows` of the namespace (connections dropped
/// because an accept queue was full or a listener refused them), from `/proc/net/netstat`
/// read inside it.
pub fn listen_drops(ns: &NetNs) -> (u64, u64) {
    let text = ns.run_ok(&["cat", "/proc/net/netstat"]);
    let tcp_ext = netstat_section(&text, "TcpExt")
        .unwrap_or_else(|| panic!("no TcpExt section in /proc/net/netstat of {}", ns.name()));
    let get = |name: &str| {
        tcp_ext
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no TcpExt {name} in /proc/net/netstat of {}", ns.name()))
    };
    (get("ListenDrops"), get("ListenOverflows"))
}

/// The `(name, value)` pairs of one section of `/proc/net/netstat` (or `/proc/net/snmp`):
/// a header line `Section: name...` followed by a value line `Section: value...`.
pub fn netstat_section(text: &str, section: &str) -> Option<Vec<(String, u64)>> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let names = names[prefix.len()..].split_whitespace();
    let values = values[prefix.len()..].split_whitespace();
    Some(
        names
            .zip(values)
            .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// nginx serving a small static page inside a namespace (master process off, one worker,
/// no access log), from a scratch directory of its own.
///
/// Drop: kills nginx, removes the directory.
pub struct Nginx {
    proc: Option<Proc>,
    dir: PathBuf,
}

/// The body nginx serves at `/`.
pub const NGINX_BODY: &str = "hello from nginx\n";

impl Nginx {
    /// Starts nginx in `ns` listening on each of `listen` (e.g. `127.0.0.1:8088`,
    /// `[::1]:8088`) and waits (up to 10 s) until the first one accepts. Keep-alive
    /// connections are never closed by nginx for their number of requests.
    pub fn start(ns: &NetNs, listen: &[&str]) -> Nginx {
        Nginx::start_with(
            ns,
            listen,
            "keepalive_requests 100000000; keepalive_timeout 300s;",
        )
    }

    /// Like [`Nginx::start`], with nginx's stock keep-alive settings (a connection is
    /// closed after 1,000 requests or 75 s idle), as users run it: a kept-alive client
    /// opens new connections all along.
    pub fn start_stock(ns: &NetNs, listen: &[&str]) -> Nginx {
        Nginx::start_with(ns, listen, "")
    }

    fn start_with(ns: &NetNs, listen: &[&str], keepalive: &str) -> Nginx {
        static N: AtomicU64 = AtomicU64::new(0);
        assert!(!listen.is_empty(), "nginx needs an address");
        let dir = std::env::temp_dir().join(format!(
            "icpt-t-nginx-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www")).expect("nginx scratch dir");
        let mut nginx = Nginx { proc: None, dir };
        fs::write(nginx.dir.join("www/index.html"), NGINX_BODY).expect("nginx index");
        let d = nginx.dir.display();
        let listens: String = listen.iter().map(|a| format!("listen {a}; ")).collect();
        fs::write(
            nginx.dir.join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 worker_rlimit_nofile 16384;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{ access_log off; {keepalive}\n\
                 client_body_temp_path {d}; proxy_temp_path {d};\n\
                 fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 server {{ {listens} root {d}/www; }} }}\n"
            ),
        )
        .expect("nginx.conf");
        let conf = nginx.dir.join("nginx.conf");
        nginx.proc = Some(spawn_in(
            ns,
            None,
            &["nginx", "-c", conf.to_str().expect("UTF-8 path")],
        ));
        let first: std::net::SocketAddr = listen[0]
            .parse()
            .unwrap_or_else(|e| panic!("bad nginx address {:?}: {e}", listen[0]));
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            ns.in_ns(|| {
                std::net::TcpStream::connect_timeout(&first, Duration::from_millis(200)).is_ok()
            })
        });
        if !up {
            panic!(
                "nginx in {} did not start listening on {first}: {}",
                ns.name(),
                fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default()
            );
        }
        nginx
    }

    /// The scratch directory (config, error log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Panics (with nginx's error log) unless nginx is still running.
    pub fn assert_running(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            if !p.is_running() {
                panic!(
                    "nginx exited: {}",
                    fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                );
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// nginx in `ns` (files under `dir`) with one server per `(address, name)`, each answering
/// every request 200 with `body` (nginx `return` text, variables allowed) where `{name}` is
/// replaced by the server's name; waits (up to 10 s) until every server listens on `port`.
pub fn nginx_named_servers(
    ns: &NetNs,
    dir: &std::path::Path,
    servers: &[(&str, &str)],
    body: &str,
    port: u16,
) -> Proc {
    std::fs::create_dir_all(dir).expect("nginx directory");
    let ds = dir.display();
    let mut conf = String::new();
    for (addr, name) in servers {
        let text = body.replace("{name}", name);
        conf.push_str(&format!(
            "server {{ listen {addr}; location / {{ add_header x-upstream {name}; return 200 \"{text}\\n\"; }} }}\n"
        ));
    }
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {ds}/nginx.pid;\nerror_log {ds}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 100000; client_body_temp_path {ds};\n\
             proxy_temp_path {ds}; fastcgi_temp_path {ds}; uwsgi_temp_path {ds}; scgi_temp_path {ds};\n\
             {conf} }}\n"
        ),
    )
    .expect("nginx.conf");
    let conf = dir.join("nginx.conf");
    let p = crate::spawn_in(
        ns,
        None,
        &["nginx", "-c", conf.to_str().expect("UTF-8 path")],
    );
    let filter = format!("sport = :{port}");
    assert!(
        crate::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            let out = ns.run(&["ss", "-Hltn", &filter]);
            String::from_utf8_lossy(&out.stdout).lines().count() == servers.len()
        }),
        "nginx did not start: {}",
        p.stderr()
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:8088/\n  2 threads and 8 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.00ms  0.50ms  10.00ms   90.00%\n    \
            Req/Sec     5.00k   100.00     6.00k    70.00%\n  20011 requests in 2.00s, 4.00MB read\n  \
            Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\n\
            Requests/sec:  10005.50\nTransfer/sec:      2.00MB\n";
        let r = WrkReport::parse(out).unwrap();
        assert_eq!(r.requests, 20011);
        assert_eq!(
            (
                r.connect_errors,
                r.read_errors,
                r.write_errors,
                r.timeouts,
                r.non_2xx_3xx
            ),
            (1, 2, 3, 4, 5)
        );
        assert_eq!(r.errors(), 15);
        let clean = "  300 requests in 1.00s, 1.00KB read\nRequests/sec: 300\n";
        let r = WrkReport::parse(clean).unwrap();
        assert_eq!((r.requests, r.errors()), (300, 0));
        assert!(WrkReport::parse("unable to connect to 127.0.0.1:1 Connection refused").is_none());
    }

    #[test]
    fn parses_netstat() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\n\
                    IpExt: InNoRoutes\nIpExt: 3\n";
        let s = netstat_section(text, "TcpExt").unwrap();
        assert_eq!(s[1], ("ListenOverflows".to_string(), 7));
        assert_eq!(s[2], ("ListenDrops".to_string(), 9));
        assert_eq!(netstat_section(text, "IpExt").unwrap()[0].1, 3);
        assert!(netstat_section(text, "Nope").is_none());
    }
}
