//! Test harness for the interceptor's privileged end-to-end tests.
//!
//! Everything here assumes it runs as root on Linux, one test at a time
//! (`--test-threads=1`). Each resource a test creates is owned by a guard whose
//! `Drop` removes it, also when the test panics:
//!
//! | guard | resource | removed by `Drop` |
//! |---|---|---|
//! | [`NetNs`] | `/run/netns/icpt-t-<test>` | kill its processes, `ip netns delete` |
//! | [`TestCgroup`] | `<cgroup2 root>/icpt-t-<test>` | `cgroup.kill`, wait empty, `rmdir` |
//! | [`PinDir`] | `/sys/fs/bpf/icpt-t-<test>` | `interceptor --pin-dir DIR detach --all`, `rm -r` |
//! | [`Proc`] | a spawned child (its own process group) | `SIGKILL` to the group, `wait` |
//! | [`ProbeServer`] | an in-process `icpt-probe` server thread set | stop flag, join |
//! | [`ScratchDir`] | `$TMPDIR/icpt-t-<test>-<pid>` | `rm -r` |
//!
//! Drop order matters: processes and servers should go first, then the pin dir
//! (detach), then the cgroup, then the namespace. Locals drop in *reverse*
//! declaration order, so declare `NetNs`, `TestCgroup`, `PinDir`, then `Proc`s.
//! Struct fields drop in declaration order, so in a struct list them the other
//! way round: `proxy`, `servers`, `pin`, `cg`, `ns`.
//!
//! All names start with [`PREFIX`] (`icpt-t-`), which is what
//! `cargo xtask clean-stale` removes after a crashed run.
//!
//! Safety rule of this harness: every connection goes to 127.0.0.0/8, `::1`, or
//! an address assigned to a veth inside a namespace the test created.

// Unsafe only where a module says why (`escape`: the interceptor's own socket options,
// which no crate knows).
#![deny(unsafe_code)]

mod bins;
mod bpffs;
mod cgroup;
pub mod chaos;
pub mod dubbo;
pub mod echo;
pub mod escape;
mod load;
mod names;
mod netns;
pub mod openmetrics;
pub mod probe;
mod process;
mod proxy;
mod scratch;
mod util;

pub use bins::{exec_bin, interceptor_bin, probe_bin, proxy_bin, set_helper_bins, workspace_dir};
pub use bpffs::{
    bpffs_mounted, bpftool_cgroup_progs, bpftool_cgroup_progs_effective, ensure_bpffs,
    AttachedProg, PinDir, BPFFS_ROOT,
};
pub use cgroup::{cgroup2_root, TestCgroup};
pub use load::{
    listen_drops, netstat_section, nginx_named_servers, Churn, Nginx, Wrk, WrkReport, NGINX_BODY,
};
pub use names::{resource_name, PREFIX, RUN_LOCK};
pub use netns::{enter_netns_current_thread, NetNs};
pub use probe::{
    BulkReport, ChurnReport, ClientOpts, ErrorKind as ProbeErrorKind, HelloReply, ProbeError,
    ProbeServer,
};
pub use process::{
    context_switches, exec_command, ping_rounds, probe_in, run_in, run_in_timeout, spawn_in,
    spawn_pinger, thread_context_switches, ConntrackEvents, Proc,
};
pub use proxy::{http_get_in, proxy_stats, start_proxy, wait_proxy_ready, DEFAULT_ADMIN};
pub use scratch::ScratchDir;
pub use util::{run_cmd, run_cmd_ok, wait_until};

/// Registers the paths of this package's helper binaries (`icpt-probe`,
/// `icpt-exec`) from an integration test, where cargo provides them at compile
/// time. Optional: without it the paths are found next to the test binary.
///
/// ```ignore
/// interceptor_tests::register_helper_bins!();
/// ```
#[macro_export]
macro_rules! register_helper_bins {
    () => {
        $crate::set_helper_bins(
            env!("CARGO_BIN_EXE_icpt-probe"),
            env!("CARGO_BIN_EXE_icpt-exec"),
        )
    };
}
