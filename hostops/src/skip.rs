//! Skips that are reported, never silent: a test (or a part of one) that cannot run on this
//! machine calls [`report`], which prints it and appends it to the file named by
//! `ICPT_SKIP_LOG` when set. `cargo xtask test` sets it and counts each line as skipped in the
//! suite's closing line (libtest itself counts such a test as passed).

use std::io::Write as _;

/// The environment variable naming the skip log.
pub const SKIP_LOG_ENV: &str = "ICPT_SKIP_LOG";

/// Reports that `what` (a test, or a named part of it) did not run, and why.
pub fn report(what: &str, reason: &str) {
    eprintln!("SKIPPED {what}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!("{what}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot record the skip of {what} in {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

/// Whether IPv6 loopback works here; when it does not, `what` is reported as skipped.
pub fn ipv6(what: &str) -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        report(what, "no IPv6 loopback on this host");
    }
    ok
}

/// Whether this process has root's privileges (for SO_MARK, namespaces, BPF); when it does
/// not, `what` is reported as skipped.
pub fn root(what: &str) -> bool {
    let ok = nix::unistd::geteuid().is_root();
    if !ok {
        report(what, "not running as root");
    }
    ok
}

/// The lines of a skip log (each `what: reason`), empty if it does not exist.
pub fn read_log(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_skip_lands_in_the_log() {
        let path = std::env::temp_dir().join(format!("icpt-skip-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::env::set_var(SKIP_LOG_ENV, &path);
        report("a test: its IPv6 half", "no IPv6 loopback on this host");
        report("another", "not running as root");
        std::env::remove_var(SKIP_LOG_ENV);
        let lines = read_log(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            lines,
            [
                "a test: its IPv6 half: no IPv6 loopback on this host",
                "another: not running as root"
            ]
        );
        assert!(
            read_log(&path).unwrap().is_empty(),
            "a missing log is empty"
        );
    }
}
