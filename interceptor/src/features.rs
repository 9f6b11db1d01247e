//! What the running kernel offers of what the programs use: every hook (program type with
//! its attach type), every helper per hook, every map type, bpf_link creation per hook and
//! BPF_LINK_UPDATE. `interceptor check` prints it; `attach` refuses, before it changes
//! anything, when a required feature is missing.
//!
//! How each is asked (the kernel is asked, never its version, because distributions
//! backport):
//! - a hook: BPF_PROG_LOAD of `r0 = 1; exit` with the hook's program type and expected
//!   attach type (the exact pair `attach` uses; aya's `is_program_supported` takes only the
//!   program type, and for `cgroup/*` only the connect4 attach type);
//! - a helper: BPF_PROG_LOAD of a program of that hook calling it, libbpf's way: refused with
//!   "unknown func", "invalid func" or "program of this type cannot use helper" in the
//!   verifier's log means missing; loaded, or refused for its (deliberately empty)
//!   arguments, means the kernel knows it for that hook;
//! - a map type: aya's `is_map_supported` (a map of that type is created and closed);
//! - a link: BPF_LINK_CREATE of the hook's probe program against target fd -1 (EBADF: the
//!   kernel went as far as looking the target up, so it can make the link; EINVAL: it
//!   cannot); BPF_LINK_UPDATE of link fd -1 the same way.
//!
//! Nothing is attached and nothing stays loaded: every probe program is closed at once.

use std::sync::OnceLock;

use aya::{maps::MapType, sys::is_map_supported};
use serde::Serialize;

use crate::sys::{self, ProgType};

/// The oldest kernel the interception is supported and tested on (Debian 12's 6.1; the
/// kernel matrix shows Debian 11's 5.10 lacking required helpers).
pub const MIN_KERNEL: &str = "6.1";

/// What kind of kernel feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Hook,
    Helper,
    Map,
    Link,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Hook => "hook",
            Kind::Helper => "helper",
            Kind::Map => "map",
            Kind::Link => "link",
        }
    }
}

/// One feature and whether this kernel has it.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    pub kind: Kind,
    /// E.g. `cgroup/connect4`, `bpf_get_netns_cookie in sock_ops`, `LPM trie`.
    pub name: String,
    /// The programs (or the later feature) that use it.
    pub used_by: &'static str,
    /// Required: `attach` refuses without it. Optional: a feature that degrades.
    pub required: bool,
    pub present: bool,
    /// How the probe answered when the feature is missing (errno, the verifier's line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Feature {
    /// `hook cgroup/connect4`, `helper bpf_get_netns_cookie in sock_ops`, ...
    pub fn label(&self) -> String {
        format!("{} {}", self.kind.as_str(), self.name)
    }
}

/// The result of probing the running kernel.
#[derive(Clone, Debug, Serialize)]
pub struct Features {
    /// `uname -r`.
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl Features {
    /// The required features this kernel lacks.
    pub fn missing_required(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| f.required && !f.present)
    }

    /// The optional features this kernel lacks.
    pub fn missing_optional(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| !f.required && !f.present)
    }
}

/// A hook the programs attach to.
struct Hook {
    name: &'static str,
    prog_type: ProgType,
    /// `expected_attach_type` at load (0 where the type takes none).
    expected: u32,
    /// The attach type of its bpf_link, when `attach` makes one.
    link: Option<u32>,
    used_by: &'static str,
    required: bool,
    /// (helper id, helper name) the programs of this hook call.
    helpers: &'static [(i32, &'static str)],
}

// `enum bpf_func_id` values of the helpers the programs call.
const GET_CURRENT_UID_GID: (i32, &str) = (15, "bpf_get_current_uid_gid");
const SOCK_OPS_CB_FLAGS_SET: (i32, &str) = (59, "bpf_sock_ops_cb_flags_set");
const SOCK_HASH_UPDATE: (i32, &str) = (70, "bpf_sock_hash_update");
const SK_REDIRECT_HASH: (i32, &str) = (72, "bpf_sk_redirect_hash");
const GET_SOCKET_COOKIE: (i32, &str) = (46, "bpf_get_socket_cookie");
const SKB_PULL_DATA: (i32, &str) = (39, "bpf_skb_pull_data");
const SKB_ADJUST_ROOM: (i32, &str) = (50, "bpf_skb_adjust_room");
const PROBE_READ_KERNEL: (i32, &str) = (113, "bpf_probe_read_kernel");
const SK_LOOKUP_TCP: (i32, &str) = (84, "bpf_sk_lookup_tcp");
const SK_RELEASE: (i32, &str) = (86, "bpf_sk_release");
const SK_STORAGE_GET: (i32, &str) = (107, "bpf_sk_storage_get");
const SK_STORAGE_DELETE: (i32, &str) = (108, "bpf_sk_storage_delete");
const GET_NETNS_COOKIE: (i32, &str) = (122, "bpf_get_netns_cookie");
const SK_ASSIGN: (i32, &str) = (124, "bpf_sk_assign");
/// aya-log's ring buffer (`--kernel-log debug`), in every program.
const RINGBUF_RESERVE: (i32, &str) = (131, "bpf_ringbuf_reserve");

const HOOKS: &[Hook] = &[
    Hook {
        name: "cgroup/connect4",
        prog_type: ProgType::CgroupSockAddr,
        expected: sys::AttachType::Inet4Connect as u32,
        link: Some(sys::AttachType::Inet4Connect as u32),
        used_by: "redirect_connect4",
        required: true,
        helpers: &[
            GET_CURRENT_UID_GID,
            SK_LOOKUP_TCP,
            SK_RELEASE,
            SK_STORAGE_GET,
            SK_STORAGE_DELETE,
            RINGBUF_RESERVE,
        ],
    },
    Hook {
        name: "cgroup/connect6",
        prog_type: ProgType::CgroupSockAddr,
        expected: sys::AttachType::Inet6Connect as u32,
        link: Some(sys::AttachType::Inet6Connect as u32),
        used_by: "redirect_connect6",
        required: true,
        helpers: &[
            GET_CURRENT_UID_GID,
            SK_LOOKUP_TCP,
            SK_RELEASE,
            SK_STORAGE_GET,
            SK_STORAGE_DELETE,
        ],
    },
    Hook {
        name: "cgroup/getpeername4",
        prog_type: ProgType::CgroupSockAddr,
        expected: sys::AttachType::Inet4Getpeername as u32,
        link: Some(sys::AttachType::Inet4Getpeername as u32),
        used_by: "restore_getpeername4",
        required: true,
        helpers: &[SK_STORAGE_GET],
    },
    Hook {
        name: "cgroup/getpeername6",
        prog_type: ProgType::CgroupSockAddr,
        expected: sys::AttachType::Inet6Getpeername as u32,
        link: Some(sys::AttachType::Inet6Getpeername as u32),
        used_by: "restore_getpeername6",
        required: true,
        helpers: &[SK_STORAGE_GET],
    },
    Hook {
        name: "sock_ops",
        prog_type: ProgType::SockOps,
        expected: 0,
        link: Some(sys::AttachType::SockOps as u32),
        used_by: "track_sockops",
        required: true,
        helpers: &[
            GET_NETNS_COOKIE,
            SOCK_OPS_CB_FLAGS_SET,
            SK_STORAGE_GET,
            GET_SOCKET_COOKIE,
            SOCK_HASH_UPDATE,
        ],
    },
    Hook {
        name: "cgroup/getsockopt",
        prog_type: ProgType::CgroupSockopt,
        expected: sys::AttachType::CgroupGetsockopt as u32,
        link: Some(sys::AttachType::CgroupGetsockopt as u32),
        used_by: "answer_getsockopt",
        required: true,
        helpers: &[GET_CURRENT_UID_GID, SK_STORAGE_GET],
    },
    Hook {
        name: "sk_lookup",
        prog_type: ProgType::SkLookup,
        expected: sys::AttachType::SkLookup as u32,
        link: Some(sys::AttachType::SkLookup as u32),
        used_by: "steer_inbound",
        required: true,
        helpers: &[SK_ASSIGN, SK_RELEASE],
    },
    // Kernel forwarding: the proxy's sockets put into a SOCKHASH from sock_ops, their bytes
    // redirected by a stream verdict program; the proxy's requests taken by a
    // cgroup/setsockopt program. Optional: without them the proxy copies the bytes itself.
    Hook {
        name: "sk_skb/stream_verdict",
        prog_type: ProgType::SkSkb,
        expected: sys::AttachType::SkSkbStreamVerdict as u32,
        link: None,
        used_by: "kernel forwarding (optional)",
        required: false,
        // The last three cut the repeated front of a retransmitted segment (forward.rs).
        helpers: &[
            SK_REDIRECT_HASH,
            GET_SOCKET_COOKIE,
            SKB_PULL_DATA,
            SKB_ADJUST_ROOM,
            PROBE_READ_KERNEL,
        ],
    },
    Hook {
        name: "cgroup/setsockopt",
        prog_type: ProgType::CgroupSockopt,
        expected: sys::AttachType::CgroupSetsockopt as u32,
        link: Some(sys::AttachType::CgroupSetsockopt as u32),
        used_by: "kernel forwarding (optional)",
        required: false,
        helpers: &[SK_STORAGE_GET],
    },
];

/// Helpers of optional features called from a required hook: (hook, helper, used by).
/// (None now: `track_sockops` inserts into `ICP_FWD` itself, so its helpers are required.)
const OPTIONAL_HELPERS: &[(&str, (i32, &str), &str)] = &[];

/// The map types of `interceptor-ebpf/src/maps.rs` (and aya-log's ring buffer).
const MAPS: &[(MapType, &str, &str)] = &[
    (MapType::Hash, "hash", "ICP_CONFIG, ICP_HANDOFF, ..."),
    (
        MapType::SkStorage,
        "socket storage",
        "ICP_CONN, ICP_ACCEPTED (connection records)",
    ),
    (MapType::Array, "array", "ICP_LAYOUT, read-only globals"),
    (MapType::LpmTrie, "LPM trie", "ICP_EXCL4/6, ICP_INCL4/6"),
    (MapType::PerCpuHash, "per-CPU hash", "ICP_COUNTERS"),
    (MapType::SockHash, "sockhash", "ICP_IN_SOCKS, ICP_FWD"),
    (MapType::RingBuf, "ring buffer", "AYA_LOGS (kernel log)"),
];

// Raw instructions (`struct bpf_insn`, little endian: code, dst | src << 4, off, imm).
const fn insn(code: u8, regs: u8, imm: i32) -> u64 {
    (code as u64) | ((regs as u64) << 8) | ((imm as u32 as u64) << 32)
}
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
/// `r0 = 1; exit`: allowed as the return value of every hook here.
const TRIVIAL: [u64; 2] = [insn(MOV64_IMM, 0, 1), insn(EXIT, 0, 0)];

/// Verifier messages of a helper the kernel does not offer to a program type (libbpf's list).
const UNKNOWN_HELPER: [&str; 3] = [
    "unknown func ",
    "invalid func ",
    "program of this type cannot use helper ",
];

fn errno(e: &std::io::Error) -> String {
    format!("{e}")
}

/// The first line of the verifier's log that names the problem.
fn log_line(log: &[u8], needle: &str) -> Option<String> {
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    String::from_utf8_lossy(&log[..end])
        .lines()
        .find(|l| l.contains(needle))
        .map(|l| l.trim().to_string())
}

/// Loads the trivial program of `hook`; `Err` says why not.
fn load_hook(hook: &Hook) -> Result<std::os::fd::OwnedFd, String> {
    let mut log = vec![0u8; 4096];
    sys::prog_load(hook.prog_type, hook.expected, &TRIVIAL, &mut log).map_err(|e| {
        let line = log_line(&log, "");
        match line {
            Some(l) if !l.is_empty() => format!("{}: {l}", errno(&e)),
            _ => errno(&e),
        }
    })
}

/// Whether `hook`'s programs may call `helper`; `Err` carries the verifier's line.
fn probe_helper(hook: &Hook, helper: (i32, &str)) -> Result<(), String> {
    // r1 is the context on entry; r2..r5 = 0; call; r0 = 1; exit.
    let prog = [
        insn(MOV64_IMM, 2, 0),
        insn(MOV64_IMM, 3, 0),
        insn(MOV64_IMM, 4, 0),
        insn(MOV64_IMM, 5, 0),
        insn(CALL, 0, helper.0),
        insn(MOV64_IMM, 0, 1),
        insn(EXIT, 0, 0),
    ];
    let mut log = vec![0u8; 64 * 1024];
    match sys::prog_load(hook.prog_type, hook.expected, &prog, &mut log) {
        Ok(_fd) => Ok(()),
        Err(e) => match UNKNOWN_HELPER.iter().find_map(|n| log_line(&log, n)) {
            Some(line) => Err(line),
            // The verifier knew the helper and refused something else (its arguments).
            None if log.iter().any(|b| *b != 0) => Ok(()),
            None => Err(errno(&e)),
        },
    }
}

/// Probes the running kernel (once per process; the answer cannot change while it runs).
pub fn probe() -> &'static Features {
    static PROBED: OnceLock<Features> = OnceLock::new();
    PROBED.get_or_init(probe_now)
}

fn probe_now() -> Features {
    // Before 5.11 every probe program and map is charged to RLIMIT_MEMLOCK until the kernel
    // frees it (after an RCU grace period): with the 64 KiB default the later probes fail
    // with EPERM and a present feature reads as missing (seen on 5.10 in the kernel matrix).
    if let Err(e) = sys::raise_memlock() {
        tracing::debug!(error = %e, "cannot raise RLIMIT_MEMLOCK");
    }
    let mut features = Vec::new();
    let mut push = |kind, name: String, used_by, required, r: Result<(), String>| {
        features.push(Feature {
            kind,
            name,
            used_by,
            required,
            present: r.is_ok(),
            detail: r.err(),
        })
    };
    for hook in HOOKS {
        let loaded = load_hook(hook);
        let hook_ok = loaded.as_ref().map(|_| ()).map_err(Clone::clone);
        push(
            Kind::Hook,
            hook.name.to_string(),
            hook.used_by,
            hook.required,
            hook_ok,
        );
        for helper in hook.helpers {
            let r = match &loaded {
                Ok(_) => probe_helper(hook, *helper),
                Err(_) => Err(format!("no {} hook", hook.name)),
            };
            push(
                Kind::Helper,
                format!("{} in {}", helper.1, hook.name),
                hook.used_by,
                hook.required,
                r,
            );
        }
        if let Some(attach) = hook.link {
            let r = match &loaded {
                Ok(fd) => {
                    use std::os::fd::AsFd as _;
                    match sys::link_create_probe(fd.as_fd(), attach) {
                        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
                        Err(e) => Err(errno(&e)),
                        // A link on no target cannot be; were it made, it is closed already.
                        Ok(()) => Ok(()),
                    }
                }
                Err(_) => Err(format!("no {} hook", hook.name)),
            };
            push(
                Kind::Link,
                format!("bpf_link on {}", hook.name),
                hook.used_by,
                hook.required,
                r,
            );
        }
    }
    for (hook_name, helper, used_by) in OPTIONAL_HELPERS {
        let hook = HOOKS
            .iter()
            .find(|h| h.name == *hook_name)
            .expect("hook of an optional helper is listed");
        let r = load_hook(hook).and_then(|_| probe_helper(hook, *helper));
        push(
            Kind::Helper,
            format!("{} in {}", helper.1, hook.name),
            used_by,
            false,
            r,
        );
    }
    let update = match sys::link_update_probe() {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
        Err(e) => Err(errno(&e)),
        Ok(()) => Ok(()),
    };
    push(
        Kind::Link,
        "BPF_LINK_UPDATE".to_string(),
        "upgrade, attach of an attached scope",
        true,
        update,
    );
    for (map, name, used_by) in MAPS {
        let r = match is_map_supported(*map) {
            Ok(true) => Ok(()),
            Ok(false) => Err("map creation refused".to_string()),
            Err(e) => Err(e.to_string()),
        };
        push(Kind::Map, name.to_string(), used_by, true, r);
    }
    Features {
        kernel: kernel_release(),
        features,
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Refuses (naming every missing feature and the minimum kernel) when a required feature is
/// missing; logs each missing optional feature once, as the feature it turns off.
pub fn require() -> crate::Result<()> {
    let f = probe();
    let missing: Vec<String> = f
        .missing_required()
        .map(|m| format!("{} (used by {})", m.label(), m.used_by))
        .collect();
    if !missing.is_empty() {
        return Err(crate::Error::KernelLacks {
            kernel: f.kernel.clone(),
            missing: missing.join(", "),
            minimum: MIN_KERNEL,
        });
    }
    static LOGGED: OnceLock<()> = OnceLock::new();
    LOGGED.get_or_init(|| {
        for m in f.missing_optional() {
            tracing::info!(
                kernel = %f.kernel,
                feature = %m.label(),
                detail = m.detail.as_deref().unwrap_or(""),
                "optional kernel feature missing: {} is off on this kernel (the proxy forwards the bytes itself)",
                m.used_by
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Against the running kernel (root): the probes say "present" for what this kernel has
    //! and "missing" for what no kernel has, so neither answer is a constant.
    use super::*;

    fn root(what: &str) -> bool {
        hostops::skip::root(what)
    }

    fn hook(name: &str) -> &'static Hook {
        HOOKS.iter().find(|h| h.name == name).expect("listed hook")
    }

    #[test]
    fn this_kernel_has_every_required_feature() {
        if !root("features::this_kernel_has_every_required_feature") {
            return;
        }
        let f = probe();
        let missing: Vec<String> = f.missing_required().map(Feature::label).collect();
        assert!(missing.is_empty(), "missing on {}: {missing:?}", f.kernel);
        assert!(
            f.features.len() > 30,
            "{} features probed",
            f.features.len()
        );
        require().expect("attach would go ahead");
    }

    #[test]
    fn a_helper_the_kernel_does_not_offer_is_missing() {
        if !root("features::a_helper_the_kernel_does_not_offer_is_missing") {
            return;
        }
        // bpf_sk_assign exists, but not for sock_ops; id 100000 exists nowhere.
        let e = probe_helper(hook("sock_ops"), (124, "bpf_sk_assign")).unwrap_err();
        assert!(e.contains("#124"), "{e}");
        assert!(probe_helper(hook("sk_lookup"), (124, "bpf_sk_assign")).is_ok());
        let e = probe_helper(hook("cgroup/connect4"), (100_000, "none")).unwrap_err();
        assert!(e.contains("func #100000") || e.contains("#100000"), "{e}");
    }

    #[test]
    fn a_hook_the_kernel_does_not_offer_is_missing() {
        if !root("features::a_hook_the_kernel_does_not_offer_is_missing") {
            return;
        }
        let bogus = Hook {
            name: "cgroup/none",
            prog_type: ProgType::CgroupSockAddr,
            expected: 4000,
            link: None,
            used_by: "",
            required: true,
            helpers: &[],
        };
        assert!(load_hook(&bogus).is_err());
        let real = load_hook(hook("cgroup/getsockopt")).expect("loads");
        use std::os::fd::AsFd as _;
        // The right attach type reaches the target lookup (EBADF); a wrong one does not.
        let e = sys::link_create_probe(real.as_fd(), sys::AttachType::CgroupGetsockopt as u32)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        let e = sys::link_create_probe(real.as_fd(), sys::AttachType::SkLookup as u32).unwrap_err();
        assert_ne!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }
}
