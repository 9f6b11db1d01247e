//! Names of test resources: `icpt-t-<test name>`, sanitised and bounded.

/// Prefix of every resource the harness creates (netns, cgroup, bpffs pin dir).
/// `cargo xtask clean-stale` removes leftovers with this prefix only.
pub const PREFIX: &str = "icpt-t-";

/// Lock file shared by test processes (shared lock, held for the life of the
/// process once it creates a resource) and `cargo xtask clean-stale` (exclusive,
/// non-blocking: it cleans nothing while a test run is alive).
pub const RUN_LOCK: &str = "/run/icpt-t.lock";

/// Takes the shared run lock once per process (blocks while clean-stale runs). Panics if it
/// cannot: without it, `cargo xtask clean-stale` could remove this run's live resources.
pub(crate) fn hold_run_lock() {
    use nix::fcntl::{Flock, FlockArg};
    static LOCK: std::sync::OnceLock<Flock<std::fs::File>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(RUN_LOCK)
            .unwrap_or_else(|e| panic!("open the run lock {RUN_LOCK}: {e}"));
        Flock::lock(f, FlockArg::LockShared)
            .unwrap_or_else(|(_, e)| panic!("take the run lock {RUN_LOCK} shared: {e}"))
    });
}

/// Longest name used for cgroups and pin directories.
pub(crate) const NAME_MAX: usize = 64;
/// Longest netns name (a file under /run/netns; kept short so `ip` output and
/// error messages stay readable).
pub(crate) const NETNS_NAME_MAX: usize = 40;

/// `ICPT_TEST_TAG`, when set, goes between the prefix and the test's name
/// (`icpt-t-<tag>-<test>`), so two runs of the suite from two checkouts on one machine do
/// not share a namespace, cgroup or pin dir. Only `[A-Za-z0-9]` of it are kept.
fn run_tag() -> String {
    let tag: String = std::env::var("ICPT_TEST_TAG")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    if tag.is_empty() {
        tag
    } else {
        format!("{tag}-")
    }
}

/// `icpt-t-<test>`: characters other than `[A-Za-z0-9_.-]` become `-`; a name
/// longer than 64 characters is cut and given a hash suffix so that two long
/// test names stay distinct.
pub fn resource_name(test: &str) -> String {
    bounded_name(test, NAME_MAX)
}

pub(crate) fn bounded_name(test: &str, max: usize) -> String {
    let clean: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    let clean = clean.strip_prefix(PREFIX).unwrap_or(clean);
    let full = format!("{PREFIX}{}{clean}", run_tag());
    if full.len() <= max {
        return full;
    }
    // FNV-1a of the full name keeps truncated names unique.
    let mut h: u32 = 0x811c_9dc5;
    for b in full.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let suffix = format!("-{h:08x}");
    format!("{}{}", &full[..max - suffix.len()], suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_bounded() {
        let tag = run_tag();
        assert_eq!(
            resource_name("outbound_v4"),
            format!("icpt-t-{tag}outbound_v4")
        );
        assert_eq!(resource_name("icpt-t-x"), format!("icpt-t-{tag}x"));
        assert_eq!(resource_name("a b/c"), format!("icpt-t-{tag}a-b-c"));
        let long = "x".repeat(200);
        let a = bounded_name(&long, NETNS_NAME_MAX);
        let b = bounded_name(&format!("{long}y"), NETNS_NAME_MAX);
        assert_eq!(a.len(), NETNS_NAME_MAX);
        assert!(a.starts_with(PREFIX));
        assert_ne!(a, b);
    }
}
