//! Bad input to `interceptor attach`: each case gets an error that names the input and what to
//! do, and leaves nothing attached and nothing pinned.
use std::{path::Path, process::Command, time::Duration};

use interceptor_tests::{
    bpftool_cgroup_progs, exec_command, interceptor_bin, run_cmd, PinDir, TestCgroup,
};

/// The programs `attach` puts on a workload cgroup, sorted by name.
const SCOPE_PROGRAMS: [&str; 4] = [
    "redirect_connect4",
    "redirect_connect6",
    "restore_getpeername4",
    "restore_getpeername6",
];

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cli(mut cmd: Command) -> Outcome {
    let out = run_cmd(&mut cmd, Duration::from_secs(60)).expect("run interceptor");
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn attach(pin: &Path, args: &[&str]) -> Outcome {
    let mut c = Command::new(interceptor_bin());
    c.arg("--pin-dir").arg(pin).arg("attach").args(args);
    cli(c)
}

/// Asserts the attach failed with a message holding every `needles`, and left nothing behind.
fn assert_refused(o: &Outcome, needles: &[&str], cg: &TestCgroup, pin: &PinDir) {
    assert!(!o.ok, "attach should fail: {} {}", o.stdout, o.stderr);
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "error should mention {n:?}: {}",
            o.stderr
        );
    }
    assert!(
        bpftool_cgroup_progs(cg.path()).is_empty(),
        "a failed attach attached something: {:?}",
        bpftool_cgroup_progs(cg.path())
    );
    let links: Vec<_> = pin
        .pinned()
        .into_iter()
        .filter(|p| !p.starts_with("maps"))
        .collect();
    assert!(links.is_empty(), "a failed attach pinned links: {links:?}");
}

#[test]
fn bad_input_is_refused_clearly_and_attaches_nothing() {
    let cg = TestCgroup::new("badinput");
    let pin = PinDir::new("badinput");
    let cgs = cg.path().to_str().unwrap();
    let p = pin.path();

    let missing = format!("{cgs}-does-not-exist");
    let o = attach(p, &["--cgroup", &missing]);
    assert_refused(&o, &[&missing, "no such directory"], &cg, &pin);

    let o = attach(p, &["--cgroup", "/tmp"]);
    assert_refused(&o, &["/tmp", "not a cgroup2 directory"], &cg, &pin);

    for (flag, value, words) in [
        ("--exclude-cidr", "10.0.0.0/33", "CIDR"),
        ("--include-cidr", "300.1.2.3/8", "CIDR"),
        ("--exclude-cidr", "10.1.2.3/8", "10.0.0.0/8"),
        ("--exclude-port", "0", "1-65535"),
        ("--exclude-port", "65536", "1-65535"),
        ("--proxy-port", "0", "1-65535"),
        ("--bypass-mark", "0xnope", "hex"),
    ] {
        let o = attach(p, &["--cgroup", cgs, flag, value]);
        // The value quoted as the error quotes it, not a bare "0" that any message contains.
        let quoted = format!("{value:?}");
        assert_refused(&o, &[flag, &quoted, words], &cg, &pin);
    }

    // Inbound: a namespace path that does not exist, and a file that is not a namespace.
    let o = attach(p, &["--netns", "/run/netns/icpt-t-does-not-exist"]);
    assert_refused(
        &o,
        &["/run/netns/icpt-t-does-not-exist", "no such file"],
        &cg,
        &pin,
    );
    let o = attach(p, &["--netns", "/proc/self/ns/mnt"]);
    assert_refused(
        &o,
        &["/proc/self/ns/mnt", "not a network namespace"],
        &cg,
        &pin,
    );
    let o = attach(p, &["--cgroup", cgs, "--netns", "/proc/self/ns/net"]);
    assert_refused(&o, &["--netns"], &cg, &pin);
    let o = attach(
        p,
        &["--netns", "/proc/self/ns/net", "--on-proxy-down", "maybe"],
    );
    assert_refused(&o, &["maybe", "closed"], &cg, &pin);

    // Not root: the same command as an unprivileged user.
    let bin = interceptor_bin();
    let c = exec_command(
        None,
        Some(&cg),
        Some(65534),
        &[
            bin.to_str().unwrap(),
            "--pin-dir",
            pin.as_str(),
            "attach",
            "--cgroup",
            cgs,
        ],
    );
    let o = cli(c);
    assert_refused(&o, &["not privileged", "root"], &cg, &pin);

    // A pin dir that is not on a bpf filesystem.
    let o = attach(Path::new("/tmp/icpt-t-not-bpffs"), &["--cgroup", cgs]);
    assert_refused(&o, &["/tmp/icpt-t-not-bpffs", "bpf filesystem"], &cg, &pin);
    assert!(!Path::new("/tmp/icpt-t-not-bpffs").exists());

    // No bpffs mounted and none can be: a private mount namespace without /sys/fs/bpf, and a
    // process that has CAP_BPF and CAP_NET_ADMIN but not CAP_SYS_ADMIN (as a hardened unit).
    let script = format!(
        "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; \
         exec capsh --drop=cap_sys_admin -- -c '{} --pin-dir {} attach --cgroup {cgs}'",
        bin.display(),
        pin.as_str()
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "sh", "-c", &script]);
    let o = cli(c);
    assert_refused(
        &o,
        &["mounting one failed", "mount -t bpf bpf /sys/fs/bpf"],
        &cg,
        &pin,
    );
}

#[test]
fn attach_failing_half_way_rolls_back() {
    let cg = TestCgroup::new("halfway");
    let pin = PinDir::new("halfway");
    let cgs = cg.path().to_str().unwrap();
    // Something else occupies the path where the second link would be pinned, so the attach
    // fails after connect4 is attached and pinned.
    let blocker = pin
        .path()
        .join("scopes")
        .join(cg.id().to_string())
        .join("connect6");
    std::fs::create_dir_all(&blocker).unwrap();

    let o = attach(pin.path(), &["--cgroup", cgs]);
    assert_refused(&o, &["connect6", "pinning"], &cg, &pin);
    let st = Command::new(interceptor_bin())
        .args(["--pin-dir", pin.as_str(), "status", "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["scopes"].as_array().map(Vec::len), Some(0), "{st}");

    // With the obstacle gone the same attach succeeds: the rollback left no stale state.
    std::fs::remove_dir(&blocker).unwrap();
    let o = attach(pin.path(), &["--cgroup", cgs]);
    assert!(o.ok, "{}", o.stderr);
    let mut names: Vec<String> = bpftool_cgroup_progs(cg.path())
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    assert_eq!(names, SCOPE_PROGRAMS);
}

/// Scopes cannot be nested (nested, the outer scope's connect program removes the inner
/// one's records and the proxy resets every connection): a cgroup inside an attached one, or
/// above one, is refused naming both and what to do, and nothing is attached to it; the
/// scope already attached keeps its programs.
#[test]
fn nested_scopes_are_refused_both_ways() {
    let cg = TestCgroup::new("nested");
    let inner = cg.child("inner");
    let (outer_s, inner_s) = (cg.path().to_str().unwrap(), inner.to_str().unwrap());
    let scopes = |pin: &PinDir| -> usize {
        let st = Command::new(interceptor_bin())
            .args(["--pin-dir", pin.as_str(), "status", "--json"])
            .output()
            .unwrap();
        let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        st["scopes"].as_array().map_or(0, Vec::len)
    };

    let pin = PinDir::new("nested-a");
    assert!(attach(pin.path(), &["--cgroup", outer_s]).ok);
    let o = attach(pin.path(), &["--cgroup", inner_s]);
    assert!(
        !o.ok,
        "the inner cgroup is refused: {} {}",
        o.stdout, o.stderr
    );
    for n in [
        inner_s,
        "is inside the attached cgroup",
        outer_s,
        "nothing was attached",
        "detach",
    ] {
        assert!(
            o.stderr.contains(n),
            "error should mention {n:?}: {}",
            o.stderr
        );
    }
    assert!(
        bpftool_cgroup_progs(&inner).is_empty(),
        "nothing on the inner cgroup"
    );
    assert_eq!(bpftool_cgroup_progs(cg.path()).len(), SCOPE_PROGRAMS.len());
    assert_eq!(scopes(&pin), 1, "only the outer scope");
    drop(pin);

    let pin = PinDir::new("nested-b");
    assert!(attach(pin.path(), &["--cgroup", inner_s]).ok);
    let o = attach(pin.path(), &["--cgroup", outer_s]);
    assert!(
        !o.ok,
        "the outer cgroup is refused: {} {}",
        o.stdout, o.stderr
    );
    assert!(
        o.stderr.contains("is above the attached cgroup") && o.stderr.contains(inner_s),
        "{}",
        o.stderr
    );
    assert!(
        bpftool_cgroup_progs(cg.path()).is_empty(),
        "nothing on the outer cgroup"
    );
    assert_eq!(bpftool_cgroup_progs(&inner).len(), SCOPE_PROGRAMS.len());
    assert_eq!(scopes(&pin), 1, "only the inner scope");
}

/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Runs a Python snippet as `nobody` (outside any test namespace) and returns its stdout.
fn python_as_nobody(script: &str) -> String {
    let mut c = exec_command(
        None,
        None,
        Some(NOBODY),
        &["/usr/bin/python3", "-c", script],
    );
    let out = run_cmd(&mut c, Duration::from_secs(30)).expect("run python3 as nobody");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn pin_dir_is_root_only_and_nobody_else_can_hold_its_lock() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let cg = TestCgroup::new("pindir");
    let pin = PinDir::new("pindir");
    let cgs = cg.path().to_str().unwrap();
    let p = pin.path();
    let set_mode = |mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };

    // A pre-existing pin dir others may write to: refused, naming it and the fix.
    pin.create();
    set_mode(0o777);
    let o = attach(p, &["--cgroup", cgs]);
    assert_refused(
        &o,
        &[pin.as_str(), "writable by group or others", "chmod 0700"],
        &cg,
        &pin,
    );

    // One owned by another user: refused.
    set_mode(0o700);
    std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    let o = attach(p, &["--cgroup", cgs]);
    assert_refused(
        &o,
        &[pin.as_str(), "owned by uid 65534", "not by root", "rm -r"],
        &cg,
        &pin,
    );
    std::fs::remove_dir(p).unwrap();

    // A symbolic link in its place: refused, never followed.
    let target = p.with_file_name(format!(
        "{}-target",
        p.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, p).unwrap();
    let o = attach(p, &["--cgroup", cgs]);
    std::fs::remove_file(p).unwrap();
    let target_used = std::fs::read_dir(&target).unwrap().count();
    std::fs::remove_dir(&target).unwrap();
    assert_refused(&o, &[pin.as_str(), "not a directory"], &cg, &pin);
    assert_eq!(target_used, 0, "nothing was pinned through the link");

    // `nobody` holds a lock on the bpffs directory above the pin dir (what attach used to
    // lock): attach does not wait for it. Without the change it waited 30 s, then failed.
    let parent = p.parent().unwrap().to_str().unwrap().to_string();
    let holder_script = format!(
        "import fcntl, os, time\n\
         fd = os.open('{parent}', os.O_RDONLY | os.O_DIRECTORY)\n\
         fcntl.flock(fd, fcntl.LOCK_EX)\n\
         print('locked', flush=True)\n\
         time.sleep(60)\n"
    );
    let mut holder = interceptor_tests::Proc::spawn(
        "nobody-lock-holder",
        exec_command(
            None,
            None,
            Some(NOBODY),
            &["/usr/bin/python3", "-c", &holder_script],
        ),
    );
    assert!(
        holder.wait_for_stdout("locked", Duration::from_secs(10)),
        "nobody could not lock {parent}: {}",
        holder.stderr()
    );
    let o = attach(p, &["--cgroup", cgs]);
    holder.kill();
    assert!(o.ok, "attach while nobody locks {parent}: {}", o.stderr);

    // The pin dir attach created is root's alone, and `nobody` cannot open it to lock it.
    let meta = std::fs::metadata(p).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o700, "pin dir mode");
    assert_eq!(meta.uid(), 0, "pin dir owner");
    let tried = python_as_nobody(&format!(
        "import os\n\
         try:\n    os.open('{}', os.O_RDONLY | os.O_DIRECTORY)\n    print('opened')\n\
         except PermissionError:\n    print('denied')\n",
        pin.as_str()
    ));
    assert_eq!(tried, "denied", "nobody opening the pin dir");
}
