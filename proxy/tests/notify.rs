//! systemd's notify protocol against a stand-in notify socket: the binary, started as
//! systemd starts it (`$NOTIFY_SOCKET` set), says `MAINPID=<its pid>` and `READY=1` once
//! it accepts; a new process started with `--upgrade` (as `systemctl reload` starts it)
//! says the same with its own pid once the running one has released its listeners, and
//! the old one then exits by itself. So under `Type=notify` + `NotifyAccess=all` the new
//! process becomes the unit's main process and the old one's exit is not the service's.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_interceptor-proxy");

fn start(dir: &Path, notify: &Path, upgrade: bool) -> Child {
    let socket = dir.join("proxy.sock");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--bypass-mark",
        "0",
    ])
    .args(["--drain-timeout", "2s", "--upgrade-socket"])
    .arg(&socket)
    .env("NOTIFY_SOCKET", notify)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.spawn().expect("start interceptor-proxy")
}

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification within 30 s");
    // States are newline-separated (sd_notify ends each with one).
    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "pid {} still runs", child.id());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_and_main_pid_at_start_and_from_the_new_process_at_an_upgrade() {
    let dir = std::env::temp_dir().join(format!("icpt-t-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let notify = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut old = Running(start(&dir, &notify, false));
    assert_eq!(next(&sock), format!("MAINPID={}\nREADY=1", old.id()));
    let mut new = Running(start(&dir, &notify, true));
    assert_eq!(
        next(&sock),
        format!("MAINPID={}\nREADY=1", new.id()),
        "the new process names itself the main process"
    );
    let status = wait_exit(&mut old, Duration::from_secs(30));
    assert!(status.success(), "the old process: {status}");
    assert!(new.try_wait().unwrap().is_none(), "the new process runs on");
    let term = Command::new("kill")
        .args(["-TERM", &new.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_exit(&mut new, Duration::from_secs(30));
    assert!(status.success(), "the new process: {status}");
}

/// A proxy process, killed on drop if it still runs (a failing test).
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Removes the scratch directory on drop (a failing test too).
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
