//! `cargo xtask demo`: interception end to end in a throwaway network namespace.
//!
//! Creates netns `icpt-demo`, cgroup `<cgroup2 root>/icpt-demo` and pin dir
//! `/sys/fs/bpf/icpt-demo`; runs a probe server on 127.0.0.1:8080 and
//! interceptor-proxy (admin 127.0.0.1:15000) in the netns, attaches the
//! interceptor to the cgroup, and shows a client in the cgroup reaching the
//! server through the proxy; then detaches and shows a direct connection.
//! Everything is removed at the end by guards, also on error or Ctrl-C.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::stale::{netns_list, remove_cgroup, remove_netns, remove_pin_dir};
use crate::util::{cgroup2_root, run_capture, run_ok, Bins, BPFFS};

const NAME: &str = "icpt-demo";
const SERVER: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:15000";
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

fn install_signal_handlers() {
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // The demo checks the flag between its steps and cleans up.
        let _ = signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED));
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(msg: &str) -> Result<()> {
    check_interrupt()?;
    println!("\n==> {msg}");
    Ok(())
}

// ------------------------------------------------------------------ guards

struct NetnsGuard(String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        remove_netns(&self.0);
        println!("    removed netns {}", self.0);
    }
}

struct CgroupGuard(PathBuf);
impl Drop for CgroupGuard {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
        println!("    removed cgroup {}", self.0.display());
    }
}

struct PinGuard {
    dir: PathBuf,
    interceptor: PathBuf,
}
impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.dir.exists() {
            remove_pin_dir(&self.dir, Some(&self.interceptor));
            println!(
                "    detached (--all) and removed pin dir {}",
                self.dir.display()
            );
        }
    }
}

/// A background child in its own process group; killed and reaped on drop.
struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}
impl ChildGuard {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<ChildGuard> {
        let f = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(ChildGuard { name, child, log })
    }
    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("    stopped {}", self.name);
    }
}

struct LogDir(PathBuf);
impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Fields drop in declaration order: processes, then pin dir (detach), cgroup, netns, logs.
#[derive(Default)]
struct Demo {
    proxy: Option<ChildGuard>,
    server: Option<ChildGuard>,
    pin: Option<PinGuard>,
    cgroup: Option<CgroupGuard>,
    netns: Option<NetnsGuard>,
    logs: Option<LogDir>,
}

impl Demo {
    fn print_logs(&self) {
        for c in [&self.server, &self.proxy].into_iter().flatten() {
            let out = c.output();
            let tail: Vec<&str> = out.lines().rev().take(30).collect();
            println!("---- {} output (last {} lines) ----", c.name, tail.len());
            for l in tail.iter().rev() {
                println!("{l}");
            }
        }
    }
}

pub fn demo() -> Result<()> {
    install_signal_handlers();
    let mut d = Demo::default();
    let res = run(&mut d);
    if res.is_err() {
        d.print_logs();
    }
    println!("\n==> cleaning up");
    drop(d);
    match &res {
        Ok(()) => println!("\ndemo: done"),
        Err(e) => println!("\ndemo: FAILED: {e:#}"),
    }
    res
}

struct Ctx<'a> {
    b: &'a Bins,
    ns_path: String,
    cg: PathBuf,
    pin: PathBuf,
}

impl Ctx<'_> {
    /// `icpt-exec [--cgroup CG] --netns NS -- ARGS...`
    fn in_ns(&self, cgroup: bool, args: &[&str]) -> Command {
        let mut c = Command::new(&self.b.exec);
        if cgroup {
            c.arg("--cgroup").arg(&self.cg);
        }
        c.args(["--netns", &self.ns_path, "--"]).args(args);
        c
    }

    fn probe(&self) -> &str {
        self.b.probe.to_str().expect("UTF-8 path")
    }

    fn interceptor(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.b.interceptor);
        c.arg("--pin-dir")
            .arg(&self.pin)
            .args(args)
            .env("NO_COLOR", "1");
        println!(
            "    $ interceptor --pin-dir {} {}",
            self.pin.display(),
            args.join(" ")
        );
        let out = run_capture(&mut c, CMD_TIMEOUT)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for l in text.lines() {
            println!("      {l}");
        }
        if !out.status.success() {
            bail!("interceptor {} failed ({})", args.join(" "), out.status);
        }
        Ok(text)
    }

    /// One HELLO from a client in the cgroup; returns whether it went through the proxy.
    fn hello(&self, label: &str) -> Result<bool> {
        check_interrupt()?;
        let out = run_capture(
            &mut self.in_ns(true, &[self.probe(), "hello", SERVER]),
            CMD_TIMEOUT,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
            anyhow!(
                "client printed no JSON ({e}): {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(err) = v.get("error") {
            bail!("client {label}: {} ({})", err, v["kind"]);
        }
        let proxied = v["proxied"].as_bool().unwrap_or(false);
        println!(
            "    client {label}: local {:<17} -> {}   server saw peer {:<17} {}",
            v["local"].as_str().unwrap_or("?"),
            v["remote"].as_str().unwrap_or("?"),
            v["peer_seen_by_server"].as_str().unwrap_or("?"),
            if proxied {
                "(a different socket: via the proxy)"
            } else {
                "(the client itself: direct)"
            }
        );
        Ok(proxied)
    }

    fn http_get(&self, path: &str) -> Result<String> {
        let target = format!("{ADMIN}{path}");
        let out = run_capture(
            &mut self.in_ns(
                false,
                &[self.probe(), "http-get", &target, "--timeout-ms", "1000"],
            ),
            CMD_TIMEOUT,
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("GET {target}: {}", text.trim());
        }
        Ok(text)
    }
}

fn run(d: &mut Demo) -> Result<()> {
    let b = Bins::locate(true);
    for p in [&b.interceptor, &b.proxy, &b.probe, &b.exec] {
        b.require(p)?;
    }
    let cg_path = cgroup2_root()?.join(NAME);
    let pin = Path::new(BPFFS).join(NAME);
    let ctx = Ctx {
        b: &b,
        ns_path: format!("/run/netns/{NAME}"),
        cg: cg_path.clone(),
        pin: pin.clone(),
    };

    // Leftovers of an earlier interrupted demo.
    if pin.exists() || cg_path.exists() || netns_list().iter().any(|n| n == NAME) {
        step("removing leftovers of an earlier demo")?;
        remove_pin_dir(&pin, Some(&b.interceptor));
        remove_cgroup(&cg_path);
        remove_netns(NAME);
    }

    let logs = std::env::temp_dir().join(format!("{NAME}-logs-{}", std::process::id()));
    fs::create_dir_all(&logs)?;
    d.logs = Some(LogDir(logs.clone()));

    step(&format!("creating network namespace {NAME} (lo up)"))?;
    run_ok("ip", &["netns", "add", NAME])?;
    d.netns = Some(NetnsGuard(NAME.into()));
    run_ok("ip", &["-n", NAME, "link", "set", "lo", "up"])?;

    step(&format!("creating cgroup {}", cg_path.display()))?;
    fs::create_dir(&cg_path).with_context(|| format!("mkdir {}", cg_path.display()))?;
    d.cgroup = Some(CgroupGuard(cg_path.clone()));
    println!("    pin dir will be {}", pin.display());
    d.pin = Some(PinGuard {
        dir: pin.clone(),
        interceptor: b.interceptor.clone(),
    });

    step(&format!(
        "starting the demo server (icpt-probe serve --listen {SERVER}) in the netns"
    ))?;
    let mut srv = ChildGuard::spawn(
        "server",
        ctx.in_ns(false, &[ctx.probe(), "serve", "--listen", SERVER]),
        logs.join("server.log"),
    )?;
    wait_for("server", Duration::from_secs(10), &mut srv, |c| {
        c.output().contains("listening")
    })?;
    println!("    {}", srv.output().trim());
    d.server = Some(srv);

    step(&format!(
        "starting interceptor-proxy --admin {ADMIN} in the netns (not in the cgroup)"
    ))?;
    let proxy_bin = b.proxy.to_str().expect("UTF-8 path");
    let mut proxy = ChildGuard::spawn(
        "proxy",
        ctx.in_ns(false, &[proxy_bin, "--admin", ADMIN]),
        logs.join("proxy.log"),
    )?;
    wait_for("proxy /ready", Duration::from_secs(10), &mut proxy, |_| {
        ctx.http_get("/ready").is_ok()
    })?;
    println!(
        "    GET {ADMIN}/ready: {}",
        ctx.http_get("/ready").unwrap_or_default().trim()
    );
    d.proxy = Some(proxy);

    step("attaching the interceptor to the cgroup")?;
    ctx.interceptor(&["attach", "--cgroup", cg_path.to_str().expect("UTF-8 path")])?;

    step(&format!("three clients in the cgroup connect to {SERVER}"))?;
    let mut proxied = 0;
    for i in 1..=3 {
        proxied += usize::from(ctx.hello(&i.to_string())?);
    }

    step("interceptor stats")?;
    ctx.interceptor(&["stats"])?;

    step(&format!("proxy stats (GET {ADMIN}/stats)"))?;
    match ctx.http_get("/stats") {
        Ok(t) => match serde_json::from_str::<Value>(t.trim()) {
            Ok(v) => println!("{}", indent(&serde_json::to_string_pretty(&v)?)),
            Err(_) => println!("{}", indent(t.trim())),
        },
        Err(e) => println!("    {e}"),
    }

    step("detaching the interceptor from the cgroup")?;
    ctx.interceptor(&["detach", "--cgroup", cg_path.to_str().expect("UTF-8 path")])?;

    step("one more client, now without interception")?;
    let direct_proxied = ctx.hello("4")?;

    println!(
        "\n==> result: {proxied}/3 connections went through the proxy while attached; after detach the connection was {}",
        if direct_proxied { "STILL PROXIED" } else { "direct" }
    );
    if proxied != 3 || direct_proxied {
        bail!("interception did not behave as expected");
    }
    Ok(())
}

fn wait_for(
    what: &str,
    timeout: Duration,
    c: &mut ChildGuard,
    mut ok: impl FnMut(&ChildGuard) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        if ok(c) {
            return Ok(());
        }
        if let Some(st) = c.exited() {
            bail!("{} exited ({st}) before {what}:\n{}", c.name, c.output());
        }
        if Instant::now() >= deadline {
            bail!("{what} not ready after {timeout:?}:\n{}", c.output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
