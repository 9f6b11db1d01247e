//! Commands bounded in time.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long the pipes of a finished or killed command may stay open (a grandchild that keeps
/// them) before their reading is given up.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Runs `cmd` in a process group of its own with stdout and stderr captured, and SIGKILLs the
/// group if it runs longer than `timeout` (the output then has the signal's status).
/// Errors: the command cannot be started, waited for, or its output read.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel::<(bool, io::Result<Vec<u8>>)>();
    let pipes: [(bool, Option<Box<dyn Read + Send>>); 2] = [
        (true, child.stdout.take().map(|p| Box::new(p) as _)),
        (false, child.stderr.take().map(|p| Box::new(p) as _)),
    ];
    for (is_out, pipe) in pipes {
        if let Some(mut p) = pipe {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let res = p.read_to_end(&mut buf).map(|_| buf);
                let _ = tx.send((is_out, res));
            });
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = killpg(pid, Signal::SIGKILL);
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let grace = Instant::now() + PIPE_GRACE;
    for _ in 0..2 {
        match rx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            Ok((true, b)) => stdout = b?,
            Ok((false, b)) => stderr = b?,
            // Both readers done, or a grandchild holds a pipe: what was read is kept.
            Err(_) => break,
        }
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `prog args` bounded by `timeout`; its stdout if it exits 0, else an error with the
/// command line, its status and its stderr.
pub fn run_ok(prog: &str, args: &[&str], timeout: Duration) -> io::Result<String> {
    let out = run_bounded(Command::new(prog).args(args), timeout).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `{prog} {}`: {e}", args.join(" ")),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{prog} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_both_streams_and_the_status() {
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn kills_the_whole_group_at_the_timeout() {
        let t = Instant::now();
        let out = run_bounded(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(
            out.status.code(),
            None,
            "killed by a signal: {:?}",
            out.status
        );
    }

    #[test]
    fn run_ok_names_the_command_that_failed() {
        let e = run_ok(
            "sh",
            &["-c", "echo nope >&2; exit 1"],
            Duration::from_secs(10),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`sh -c echo nope >&2; exit 1` failed"), "{e}");
        assert!(e.contains("nope"), "{e}");
        assert!(run_ok("/nonexistent/prog", &[], Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("cannot run `/nonexistent/prog"));
    }
}
