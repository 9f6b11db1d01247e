//! `icpt-exec [--cgroup DIR] [--netns PATH] [--uid N [--gid N]] -- CMD ARGS...`
//!
//! Joins the cgroup (writes its own pid to DIR/cgroup.procs), then enters the
//! network namespace with setns(CLONE_NEWNET), then drops to uid/gid, then execs
//! CMD (PATH lookup). Unlike `ip netns exec` it does not remount /sys, so the
//! cgroup2 mount stays visible to CMD.
//!
//! Exit status: that of CMD; 125 if a step before exec fails, 126 if CMD cannot
//! be executed, 127 if it is not found.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;

use clap::Parser;
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::unistd::{execvp, setgid, setgroups, setuid, Gid, Uid};

#[derive(Parser, Debug)]
#[command(about = "Run a command inside a cgroup and network namespace (test helper)")]
struct Args {
    /// cgroup v2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace file to enter (e.g. /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Run as this uid (supplementary groups are dropped).
    #[arg(long)]
    uid: Option<u32>,
    /// Run as this gid (default: the uid's number when --uid is given).
    #[arg(long)]
    gid: Option<u32>,
    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

fn fail(msg: String) -> ! {
    eprintln!("icpt-exec: {msg}");
    exit(125)
}

fn main() {
    let a = Args::parse();
    if let Some(cg) = &a.cgroup {
        let procs = cg.join("cgroup.procs");
        let res = OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()));
        if let Err(e) = res {
            fail(format!(
                "cannot join cgroup {}: write {}: {e}",
                cg.display(),
                procs.display()
            ));
        }
    }
    if let Some(ns) = &a.netns {
        let f = File::open(ns)
            .unwrap_or_else(|e| fail(format!("cannot open netns {}: {e}", ns.display())));
        if let Err(e) = setns(&f, CloneFlags::CLONE_NEWNET) {
            fail(format!("setns({}, CLONE_NEWNET): {e}", ns.display()));
        }
    }
    if a.uid.is_some() || a.gid.is_some() {
        let gid = Gid::from_raw(a.gid.or(a.uid).unwrap());
        if let Err(e) = setgroups(&[gid]) {
            fail(format!("setgroups([{gid}]): {e}"));
        }
        if let Err(e) = setgid(gid) {
            fail(format!("setgid({gid}): {e}"));
        }
        if let Some(uid) = a.uid {
            if let Err(e) = setuid(Uid::from_raw(uid)) {
                fail(format!("setuid({uid}): {e}"));
            }
        }
    }
    let args: Vec<CString> = a
        .cmd
        .iter()
        .map(|s| {
            CString::new(s.as_str())
                .unwrap_or_else(|_| fail(format!("argument {s:?} contains a NUL byte")))
        })
        .collect();
    let err = execvp(&args[0], &args).unwrap_err();
    eprintln!("icpt-exec: cannot execute {}: {err}", a.cmd[0]);
    exit(if err == Errno::ENOENT { 127 } else { 126 })
}
