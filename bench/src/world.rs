//! Modes and the world each one runs in: a fresh network namespace with nginx and an
//! iperf3 server, a workload cgroup for the clients, a cgroup for the proxy (so its CPU
//! can be read), the interception (none, iptables REDIRECT or the eBPF programs) and the
//! proxy (none, interceptor-proxy or HAProxy). Everything is owned by the harness guards
//! (`icpt-t-bench-*`), removed on drop, and by `cargo xtask clean-stale` after a crash.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use interceptor::{Counter, PinLayout, ProxyListener, ScopeSettings};
use interceptor_tests::{
    exec_command, http_get_in, proxy_bin, proxy_stats, wait_proxy_ready, wait_until, NetNs, PinDir,
    Proc, TestCgroup,
};

/// Every client runs as this uid: the iptables rule matches it, the proxies (root) are
/// not redirected.
pub const CLIENT_UID: u32 = 2000;
pub const NGINX_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
pub const HOLD_PORT: u16 = 9090;
pub const PROXY_PORT: u16 = 15001;
pub const ADMIN: &str = "127.0.0.1:15000";
/// Body nginx returns: 64 bytes.
pub const BODY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";

static NOFILE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Records the RLIMIT_NOFILE every process of the bench inherits (HAProxy's maxconn is
/// sized from it).
pub fn set_nofile(n: u64) {
    let _ = NOFILE.set(n);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Intercept {
    None,
    Iptables,
    Ebpf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProxyKind {
    None,
    Ours,
    Haproxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum Mode {
    D,
    I,
    E,
    EK,
    H,
    EH,
}

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::D, Mode::I, Mode::E, Mode::EK, Mode::H, Mode::EH];

    pub fn name(self) -> &'static str {
        match self {
            Mode::D => "D",
            Mode::I => "I",
            Mode::E => "E",
            Mode::EK => "EK",
            Mode::H => "H",
            Mode::EH => "EH",
        }
    }

    pub fn intercept(self) -> Intercept {
        match self {
            Mode::D => Intercept::None,
            Mode::I | Mode::H => Intercept::Iptables,
            Mode::E | Mode::EK | Mode::EH => Intercept::Ebpf,
        }
    }

    pub fn proxy(self) -> ProxyKind {
        match self {
            Mode::D => ProxyKind::None,
            Mode::I | Mode::E | Mode::EK => ProxyKind::Ours,
            Mode::H | Mode::EH => ProxyKind::Haproxy,
        }
    }

    /// Whether the proxy is started `--kernel-forward on` (the bytes of its opaque
    /// connections carried by the kernel's sockmap programs once both sockets are armed).
    pub fn kernel_forward(self) -> bool {
        self == Mode::EK
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::D => "direct: client -> nginx, nothing in between",
            Mode::I => "iptables nat OUTPUT REDIRECT -> interceptor-proxy",
            Mode::E => "eBPF interception -> interceptor-proxy (copies the bytes)",
            Mode::EK => {
                "eBPF interception -> interceptor-proxy --kernel-forward on (sockmap carries the bytes)"
            }
            Mode::H => "iptables nat OUTPUT REDIRECT -> HAProxy",
            Mode::EH => "eBPF interception -> HAProxy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Worker threads of the proxy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Threads {
    /// `--workers 1` / `nbthread 1`.
    One,
    /// Our default (`--workers` unset = one per CPU) / HAProxy `nbthread 2`.
    Default,
}

impl Threads {
    pub fn key(self) -> &'static str {
        match self {
            Threads::One => "t1",
            Threads::Default => "default",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Threads::One => "1 thread each: interceptor-proxy --workers 1, HAProxy nbthread 1",
            Threads::Default => {
                "defaults: interceptor-proxy without --workers (one per CPU), HAProxy nbthread 2"
            }
        }
    }
}

/// A scratch directory for configs and logs, world-readable so uid 2000 can run the
/// bench binary copied into it; removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("icpt-t-{name}-{}", std::process::id()));
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let d = self.0.join(name);
        fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        Ok(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One mode's world. Fields drop in declaration order: processes, then the programs
/// (pin dir), the cgroups, the namespace.
pub struct World {
    pub mode: Mode,
    pub threads: Threads,
    pub proxy: Option<Proc>,
    pub servers: Vec<Proc>,
    pub pin: Option<PinDir>,
    pub client_cg: TestCgroup,
    pub proxy_cg: TestCgroup,
    pub server_cg: TestCgroup,
    pub ns: NetNs,
    pub dir: PathBuf,
    /// The bench binary, copied where uid 2000 may execute it.
    pub client_bin: PathBuf,
}

impl World {
    /// Builds a fresh world for `mode`; `tag` makes the resource names
    /// (`icpt-t-bench-<tag>`) and the scratch subdirectory.
    pub fn new(
        mode: Mode,
        threads: Threads,
        tag: &str,
        scratch: &Scratch,
        client_bin: &Path,
    ) -> Result<World> {
        let base = format!("bench-{tag}");
        let ns = NetNs::new(&base);
        let server_cg = TestCgroup::new(&format!("{base}-srv"));
        let proxy_cg = TestCgroup::new(&format!("{base}-proxy"));
        let client_cg = TestCgroup::new(&format!("{base}-client"));
        let dir = scratch.subdir(tag)?;
        let mut w = World {
            mode,
            threads,
            proxy: None,
            servers: Vec::new(),
            pin: None,
            client_cg,
            proxy_cg,
            server_cg,
            ns,
            dir,
            client_bin: client_bin.to_path_buf(),
        };
        w.start_nginx()?;
        w.start_iperf()?;
        // The proxy probes kernel forwarding once at start (the root programs answer its
        // setsockopt): in EK the programs are attached first. The other modes keep the
        // order of a proxy that is up before its interception.
        if !mode.kernel_forward() {
            w.start_proxy()?;
        }
        w.intercept(&base)?;
        if mode.kernel_forward() {
            w.start_proxy()?;
        }
        Ok(w)
    }

    fn start_proxy(&mut self) -> Result<()> {
        match self.mode.proxy() {
            ProxyKind::None => Ok(()),
            ProxyKind::Ours => self.start_our_proxy(),
            ProxyKind::Haproxy => self.start_haproxy(),
        }
    }

    /// Sets up the mode's interception: none, the iptables rule, or the eBPF programs on
    /// the client cgroup (a pin dir named after `base`).
    fn intercept(&mut self, base: &str) -> Result<()> {
        let (mode, w) = (self.mode, self);
        match mode.intercept() {
            Intercept::None => {}
            Intercept::Iptables => w.add_redirect_rule()?,
            Intercept::Ebpf => {
                let pin = PinDir::new(base);
                // HAProxy cannot put the bypass mark on its listener: any listener is
                // the proxy there.
                let settings = ScopeSettings {
                    proxy_listener: match mode.proxy() {
                        ProxyKind::Haproxy => ProxyListener::Any,
                        _ => ProxyListener::Marked,
                    },
                    ..ScopeSettings::default()
                };
                interceptor::attach(&PinLayout::new(pin.path()), w.client_cg.path(), &settings)
                    .map_err(|e| anyhow!("attach {}: {e}", w.client_cg.path().display()))?;
                w.pin = Some(pin);
            }
        }
        Ok(())
    }

    /// Spawns `cmd` in the namespace and `cg` (root), output to the harness's log files.
    fn spawn(&self, cg: &TestCgroup, cmd: &[&str]) -> Proc {
        let label = Path::new(cmd[0])
            .file_name()
            .map_or(cmd[0].to_string(), |f| f.to_string_lossy().into_owned());
        Proc::spawn(&label, exec_command(Some(&self.ns), Some(cg), None, cmd))
    }

    /// A command run as the workload: in the client cgroup and the namespace, as uid 2000.
    pub fn client_command(&self, cmd: &[&str]) -> Command {
        exec_command(Some(&self.ns), Some(&self.client_cg), Some(CLIENT_UID), cmd)
    }

    /// `interceptor-bench <role args>` as the workload.
    pub fn bench_client(&self, args: &[&str]) -> Command {
        let bin = self.client_bin.to_str().expect("UTF-8 path");
        let mut cmd = vec![bin];
        cmd.extend_from_slice(args);
        self.client_command(&cmd)
    }

    /// Waits until something listens on 127.0.0.1:`port` in the namespace (`ss`, so
    /// nothing connects: a connection to HAProxy's listener without an original
    /// destination would loop back to itself).
    pub fn wait_listening(&self, port: u16, what: &str, proc_: Option<&mut Proc>) -> Result<()> {
        let filter = format!("sport = :{port}");
        let ok = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let out = self.ns.run(&["ss", "-Hltn", &filter]);
            out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        });
        if !ok {
            let log = proc_.map(|p| p.stderr()).unwrap_or_default();
            bail!(
                "{what} did not listen on port {port} in {}: {log}",
                self.ns.name()
            );
        }
        Ok(())
    }

    fn start_nginx(&mut self) -> Result<()> {
        let d = self.dir.display();
        let conf = self.dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 65536;\n\
                 pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log crit;\n\
                 events {{ worker_connections 32768; multi_accept on; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 100000;\n  keepalive_timeout 300s;\n\
                 \x20 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
                 \x20 uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 \x20 server {{\n    listen 127.0.0.1:{NGINX_PORT} backlog=4096;\n\
                 \x20   location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                body = BODY.trim_end().to_string() + "\\n",
            ),
        )?;
        let conf_s = conf.to_str().expect("UTF-8 path").to_string();
        let mut p = self.spawn(&self.server_cg, &["nginx", "-c", &conf_s]);
        let res = self.wait_listening(NGINX_PORT, "nginx", Some(&mut p));
        self.servers.push(p);
        res.map_err(|e| {
            let log = fs::read_to_string(self.dir.join("nginx-error.log")).unwrap_or_default();
            anyhow!("{e}\nnginx error log: {log}")
        })
    }

    fn start_iperf(&mut self) -> Result<()> {
        let port = IPERF_PORT.to_string();
        let mut p = self.spawn(
            &self.server_cg,
            &["iperf3", "-s", "-B", "127.0.0.1", "-p", &port],
        );
        let res = self.wait_listening(IPERF_PORT, "iperf3 -s", Some(&mut p));
        self.servers.push(p);
        res
    }

    /// Starts the idle server (`interceptor-bench hold`) for the idle-connection workload.
    pub fn start_hold_server(&self) -> Result<Proc> {
        let bin = self.client_bin.to_str().expect("UTF-8 path");
        let listen = format!("127.0.0.1:{HOLD_PORT}");
        let mut p = self.spawn(&self.server_cg, &[bin, "hold", "--listen", &listen]);
        self.wait_listening(HOLD_PORT, "idle server", Some(&mut p))?;
        Ok(p)
    }

    fn start_our_proxy(&mut self) -> Result<()> {
        let bin = proxy_bin();
        let bin = bin.to_str().expect("UTF-8 path");
        let outbound = format!("127.0.0.1:{PROXY_PORT}");
        // Explicit either way, so E stays the copying proxy whatever the default becomes.
        let kf = if self.mode.kernel_forward() {
            "on"
        } else {
            "off"
        };
        let mut cmd = vec![
            bin,
            "--outbound",
            &outbound,
            "--admin",
            ADMIN,
            "--kernel-forward",
            kf,
        ];
        if self.threads == Threads::One {
            cmd.extend_from_slice(&["--workers", "1"]);
        }
        let mut p = self.spawn(&self.proxy_cg, &cmd);
        wait_proxy_ready(&self.ns, &mut p, ADMIN, Duration::from_secs(10))
            .map_err(|e| anyhow!("interceptor-proxy not ready: {e}\n{}", p.stderr()))?;
        self.proxy = Some(p);
        Ok(())
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let nbthread = match self.threads {
            Threads::One => 1,
            Threads::Default => 2,
        };
        // Two descriptors per proxied connection; HAProxy refuses nothing, it would only
        // warn, so keep maxconn within the descriptor limit it inherits.
        let maxconn = (NOFILE.get().copied().unwrap_or(20_000).saturating_sub(100) / 2).min(30_000);
        let cfg = self.dir.join("haproxy.cfg");
        fs::write(
            &cfg,
            format!(
                "global\n  nbthread {nbthread}\n  maxconn {maxconn}\n\
                 defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n\
                 frontend outbound\n  bind 127.0.0.1:{PROXY_PORT}\n  default_backend original\n\
                 backend original\n  server s 0.0.0.0:0\n"
            ),
        )?;
        let cfg_s = cfg.to_str().expect("UTF-8 path").to_string();
        let mut p = self.spawn(&self.proxy_cg, &["haproxy", "-db", "-f", &cfg_s]);
        self.wait_listening(PROXY_PORT, "haproxy", Some(&mut p))?;
        self.proxy = Some(p);
        Ok(())
    }

    fn add_redirect_rule(&self) -> Result<()> {
        let uid = CLIENT_UID.to_string();
        let port = PROXY_PORT.to_string();
        // Every TCP connection of uid 2000 to 127.0.0.1 (like the eBPF scope: all ports).
        let out = self.ns.run(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1/32",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]);
        if !out.status.success() {
            bail!(
                "iptables REDIRECT rule: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Packets that hit the REDIRECT rule (first rule of nat OUTPUT), if there is one.
    pub fn redirect_rule_packets(&self) -> Option<u64> {
        if self.mode.intercept() != Intercept::Iptables {
            return None;
        }
        let out = self.ns.run(&[
            "iptables", "-w", "-t", "nat", "-L", "OUTPUT", "-v", "-x", "-n",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("REDIRECT"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    }

    /// eBPF decision counter for the client cgroup.
    pub fn ebpf_counter(&self, c: Counter) -> Option<u64> {
        let pin = self.pin.as_ref()?;
        let stats = interceptor::stats(&PinLayout::new(pin.path())).ok()?;
        Some(stats.get(self.client_cg.id(), c))
    }

    /// A counter of interceptor-proxy's `GET /stats`.
    pub fn proxy_counter(&self, name: &str) -> Option<u64> {
        if self.mode.proxy() != ProxyKind::Ours {
            return None;
        }
        let v = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            proxy_stats(&self.ns, ADMIN)
        }))
        .ok()?;
        v[name].as_u64()
    }

    /// interceptor-proxy's `GET /runtime` (settings in force and the kernel-forwarding
    /// counts), if it answers.
    pub fn proxy_runtime(&self) -> Option<serde_json::Value> {
        if self.mode.proxy() != ProxyKind::Ours {
            return None;
        }
        let addr = ADMIN.parse().ok()?;
        let (code, body) = http_get_in(&self.ns, addr, "/runtime", Duration::from_secs(5)).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// `usage_usec` of the proxy's cgroup (all its threads).
    pub fn proxy_cpu_usec(&self) -> Option<u64> {
        if self.mode.proxy() == ProxyKind::None {
            return None;
        }
        cpu_usec(self.proxy_cg.path())
    }

    /// `usage_usec` of the servers' cgroup (nginx, iperf3, idle server).
    pub fn server_cpu_usec(&self) -> Option<u64> {
        cpu_usec(self.server_cg.path())
    }

    /// Voluntary context switches of all the proxy's threads (`/proc/PID/task/*/status`):
    /// how often it went to sleep waiting, i.e. was woken.
    pub fn proxy_wakeups(&self) -> Option<u64> {
        let pid = self.proxy.as_ref()?.pid();
        interceptor_tests::thread_context_switches(pid).map(|(voluntary, _)| voluntary)
    }

    /// The proxy's (Pss, Rss) in bytes from /proc/PID/smaps_rollup.
    pub fn proxy_memory(&self) -> Option<(u64, u64)> {
        process_memory(self.proxy.as_ref()?.pid())
    }

    /// Fails if the proxy or a server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(p) = self.proxy.as_mut() {
            if let Some(st) = p.try_status() {
                bail!("{} exited ({st}): {}", p.name(), p.stderr());
            }
        }
        for p in &mut self.servers {
            if let Some(st) = p.try_status() {
                bail!("{} exited ({st}): {}", p.name(), p.stderr());
            }
        }
        Ok(())
    }
}

fn cpu_usec(cg: &Path) -> Option<u64> {
    let text = fs::read_to_string(cg.join("cpu.stat")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Whole-machine busy CPU time (every CPU's user, nice, system, irq, softirq and steal
/// time of `/proc/stat`), in microseconds: catches work done outside the proxy's and the
/// servers' cgroups, e.g. the kernel's sockmap workqueue (kworker threads) that sends the
/// bytes kernel forwarding redirects. Includes whatever else runs on the machine.
pub fn host_busy_usec() -> Option<u64> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    if v.len() < 8 {
        return None;
    }
    let ticks = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    // USER_HZ: /proc/stat counts in 1/100 s on every Linux architecture (the ABI fixes it).
    Some(ticks * 10_000)
}

/// Whole-machine memory in use (MemTotal - MemAvailable), bytes: catches memory a proxy
/// holds in the kernel (socket buffers, pipes), which Pss does not show. Noisy.
pub fn system_used_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("MemTotal:")? - field("MemAvailable:")?) * 1024)
}

/// (Pss, Rss) of a process in bytes, from /proc/PID/smaps_rollup.
pub fn process_memory(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("Pss:")?, field("Rss:")?))
}
