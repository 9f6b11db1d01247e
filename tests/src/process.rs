//! Spawned child processes with captured output.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::bins::exec_bin;
use crate::cgroup::TestCgroup;
use crate::netns::NetNs;
use crate::util::{run_cmd, wait_until};

/// Default bound for [`run_in`].
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A child process that is SIGKILLed (with its whole process group) and reaped
/// when dropped. Its stdout and stderr go to files read by [`stdout`](Self::stdout)
/// and [`stderr`](Self::stderr); if the test is panicking, Drop prints their tails.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    dir: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` in a new process group, stdin from /dev/null, output to files.
    /// `name` labels the process in messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        static N: AtomicU64 = AtomicU64::new(0);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = std::env::temp_dir().join("icpt-t-logs").join(format!(
            "{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            safe
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let out = File::create(dir.join("stdout")).expect("create stdout log");
        let err = File::create(dir.join("stderr")).expect("create stderr log");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            let _ = fs::remove_dir_all(&dir);
            panic!("cannot spawn {name} ({:?}): {e}", cmd)
        });
        Proc {
            child,
            name: name.to_string(),
            dir,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything written to stdout so far (panics if the log cannot be read: an empty
    /// string would pass for "printed nothing").
    pub fn stdout(&self) -> String {
        read_log(&self.stdout_path())
    }

    /// Everything written to stderr so far (panics if the log cannot be read).
    pub fn stderr(&self) -> String {
        read_log(&self.stderr_path())
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join("stdout")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr")
    }

    /// Exit status if it has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // An error here is no "still running": it means the child cannot be waited for.
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` until stdout contains `needle`; false if it exits first
    /// or time runs out.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return true;
            }
            if self.try_status().is_some() {
                return self.stdout().contains(needle);
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to the process group (no-op once it has been reaped).
    pub fn signal(&mut self, sig: Signal) {
        if self.try_status().is_none() {
            let _ = killpg(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_timeout(grace) {
            Some(s) => s,
            None => self.kill(),
        }
    }

    /// SIGKILL the process group and reap the process.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let _ = killpg(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let s = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(9));
        self.status = Some(s);
        s
    }

    /// Panics (showing stderr) unless the process is still running.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_status() {
            panic!(
                "{} exited unexpectedly ({s}); stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Kill the group even if the leader exited: it may have left children.
        let _ = killpg(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        self.kill();
        if std::thread::panicking() {
            for (what, text) in [("stdout", self.stdout()), ("stderr", self.stderr())] {
                if !text.is_empty() {
                    eprintln!(
                        "---- {} {what} (tail) ----\n{}",
                        self.name,
                        tail(&text, 4000)
                    );
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn read_log(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Builds the command that runs `cmd` through `icpt-exec`: first into `cgroup`
/// (if any), then into `ns` (if any), then as `uid` (if any; gid = uid), then
/// exec. With neither, it is just `cmd`.
pub fn exec_command(
    ns: Option<&NetNs>,
    cgroup: Option<&TestCgroup>,
    uid: Option<u32>,
    cmd: &[&str],
) -> Command {
    exec_in(ns.map(NetNs::path), cgroup.map(TestCgroup::path), uid, cmd)
}

/// [`exec_command`] for any cgroup path, also one no [`TestCgroup`] owns (e.g. a
/// kubelet-named cgroup a test builds).
fn exec_in(ns: Option<&Path>, cgroup: Option<&Path>, uid: Option<u32>, cmd: &[&str]) -> Command {
    assert!(!cmd.is_empty(), "empty command");
    if ns.is_none() && cgroup.is_none() && uid.is_none() {
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..]);
        return c;
    }
    let mut c = Command::new(exec_bin());
    if let Some(cg) = cgroup {
        c.arg("--cgroup").arg(cg);
    }
    if let Some(ns) = ns {
        c.arg("--netns").arg(ns);
    }
    if let Some(uid) = uid {
        c.arg("--uid").arg(uid.to_string());
    }
    c.arg("--").args(cmd);
    c
}

/// Runs `icpt-probe ARGS` inside `ns`, in the cgroup at `cgroup` (if any) and as `uid` (if
/// any), and returns the JSON of its last output line. Bounded by 300 s; panics with its
/// output when it prints no JSON.
pub fn probe_in(
    ns: &NetNs,
    cgroup: Option<&Path>,
    uid: Option<u32>,
    args: &[&str],
) -> serde_json::Value {
    let bin = crate::bins::probe_bin();
    let mut cmd = vec![bin.to_str().expect("UTF-8 path")];
    cmd.extend_from_slice(args);
    let mut c = exec_in(Some(ns.path()), cgroup, uid, &cmd);
    let out = run_cmd(&mut c, Duration::from_secs(300)).expect("run icpt-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "icpt-probe {args:?}: not JSON ({e}); stdout {stdout:?} stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn label(cmd: &[&str]) -> String {
    cmd.first()
        .map(|c| {
            Path::new(c)
                .file_name()
                .map_or(c.to_string(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}

impl NetNs {
    /// Spawns `cmd` in this namespace (not in any test cgroup): `spawn_in(self, None, cmd)`.
    /// (Here rather than in `netns.rs`, so that the namespace guard does not import the
    /// process module back.)
    pub fn spawn(&self, cmd: &[&str]) -> Proc {
        spawn_in(self, None, cmd)
    }

    /// Starts recording the TCP connections conntrack begins to track in this namespace
    /// (see [`ConntrackEvents`]); conntrack must be active here (a stateful rule).
    pub fn conntrack_events(&self) -> ConntrackEvents<'_> {
        ConntrackEvents::start(self)
    }
}

/// The TCP connections conntrack began to track in a namespace between [`NetNs::conntrack_events`]
/// and [`ConntrackEvents::finish`]: one `[NEW]` line of `conntrack -E` each.
///
/// Counting these, not the table's entries, counts connections: on loopback the kernel may
/// give a new connection the 4-tuple of one in `TIME_WAIT` (`net.ipv4.tcp_tw_reuse` is 2 by
/// default), and conntrack then replaces that entry by the new one, so a table listed after
/// 200 connections may hold 195 entries. Each end is marked by a refused connection from the
/// harness to 127.0.0.1 port 1 (start) or 2 (end), waited for in the event stream, so no
/// event of the phase is missed at the start or taken after its end.
pub struct ConntrackEvents<'a> {
    ns: &'a NetNs,
    conntrack: Proc,
    /// The line of the first event after the start mark.
    from: usize,
}

impl<'a> ConntrackEvents<'a> {
    const START_PORT: u16 = 1;
    const END_PORT: u16 = 2;

    fn start(ns: &'a NetNs) -> Self {
        let conntrack = ns.spawn(&["conntrack", "-E", "-e", "NEW", "-p", "tcp", "-b", "8388608"]);
        let mut ev = ConntrackEvents {
            ns,
            conntrack,
            from: 0,
        };
        ev.from = ev.mark(Self::START_PORT) + 1;
        ev
    }

    /// The index of the last event line for a connection to `port`.
    fn line_of(&self, port: u16) -> Option<usize> {
        let needle = format!(" dport={port} ");
        let out = self.conntrack.stdout();
        let lines: Vec<&str> = out.lines().collect();
        lines.iter().rposition(|l| l.contains(&needle))
    }

    /// Connects to 127.0.0.1:`port` from the harness until conntrack reports it; returns
    /// the line of that event.
    fn mark(&mut self, port: u16) -> usize {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            self.conntrack.assert_running();
            // Nothing listens there: the connection is refused once its SYN is tracked.
            let _ = self
                .ns
                .in_ns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
            if wait_until(
                Duration::from_millis(500),
                Duration::from_millis(10),
                || self.line_of(port).is_some(),
            ) {
                return self.line_of(port).expect("seen");
            }
        }
        panic!(
            "conntrack -E in netns {} reported no connection to {addr} within 10 s: \
             conntrack must be active there (a stateful rule) and net.netfilter.nf_conntrack_events not 0",
            self.ns.name()
        );
    }

    /// Ends the recording; returns the `[NEW]` lines between its start and now.
    pub fn finish(mut self) -> Vec<String> {
        let end = self.mark(Self::END_PORT);
        self.conntrack.kill();
        let stderr = self.conntrack.stderr();
        assert!(
            !stderr.contains("ENOBUFS"),
            "conntrack -E in netns {} lost events: {stderr}",
            self.ns.name()
        );
        let marks = [Self::START_PORT, Self::END_PORT].map(|p| format!(" dport={p} "));
        self.conntrack
            .stdout()
            .lines()
            .take(end)
            .skip(self.from)
            .filter(|l| l.contains("[NEW]") && !marks.iter().any(|m| l.contains(m)))
            .map(str::to_string)
            .collect()
    }
}

/// Spawns `cmd` inside `ns`, and inside `cgroup` if given (via `icpt-exec`, which
/// joins the cgroup before entering the namespace).
pub fn spawn_in(ns: &NetNs, cgroup: Option<&TestCgroup>, cmd: &[&str]) -> Proc {
    Proc::spawn(&label(cmd), exec_command(Some(ns), cgroup, None, cmd))
}

/// Runs `cmd` to completion inside `ns` (and `cgroup`), bounded by 120 s
/// (killed after that). Panics only if it cannot be started.
pub fn run_in(ns: &NetNs, cgroup: Option<&TestCgroup>, cmd: &[&str]) -> Output {
    run_in_timeout(ns, cgroup, cmd, RUN_TIMEOUT)
}

/// [`run_in`] with an explicit bound.
pub fn run_in_timeout(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    cmd: &[&str],
    timeout: Duration,
) -> Output {
    let mut c = exec_command(Some(ns), cgroup, None, cmd);
    run_cmd(&mut c, timeout).unwrap_or_else(|e| panic!("cannot run {:?}: {e}", c))
}

/// The context switches of every thread of process `pid` so far: (voluntary: it went to
/// sleep waiting and was woken, not voluntary: it was preempted), from
/// `/proc/PID/task/*/status`; `None` when the process is gone.
pub fn thread_context_switches(pid: u32) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let count = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        total.0 += count("voluntary_ctxt_switches:");
        total.1 += count("nonvoluntary_ctxt_switches:");
    }
    Some(total)
}

/// The context switches of every thread of process `pid` so far (voluntary and not): how
/// often its threads were woken.
pub fn context_switches(pid: u32) -> u64 {
    let (voluntary, preempted) = thread_context_switches(pid)
        .unwrap_or_else(|| panic!("/proc/{pid}/task: the process is gone"));
    voluntary + preempted
}

/// `icpt-probe ping ADDR` in `ns` (and `cgroup`): `n` connections, a round every `every_ms`
/// (0: back to back), until the file `stop` exists.
pub fn spawn_pinger(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    addr: &str,
    n: u64,
    every_ms: u64,
    stop: &std::path::Path,
) -> Proc {
    spawn_in(
        ns,
        cgroup,
        &[
            crate::probe_bin().to_str().expect("UTF-8 path"),
            "ping",
            addr,
            "--count",
            &n.to_string(),
            "--every-ms",
            &every_ms.to_string(),
            "--stop",
            stop.to_str().expect("UTF-8 path"),
        ],
    )
}

/// The last full round (`{"round": N}`) an `icpt-probe ping` printed so far; 0 before one.
pub fn ping_rounds(p: &Proc) -> u64 {
    p.stdout()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["round"].as_u64())
        .unwrap_or(0)
}
