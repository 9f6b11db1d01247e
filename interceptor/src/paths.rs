//! Every bpffs path the project owns, in one place.
//!
//! ```text
//! <pin dir>/                     default /sys/fs/bpf/interceptor
//!   maps/ICP_*                   shared maps, pinned by name
//!   root/sock_ops                link: track_sockops at the cgroup2 root
//!   root/getsockopt              link: answer_getsockopt at the cgroup2 root
//!   root/setsockopt              link: answer_setsockopt at the cgroup2 root
//!   scopes/<cgroup id>/connect4  link: redirect_connect4 on the scope's cgroup
//!   scopes/<cgroup id>/connect6  link: redirect_connect6 on the scope's cgroup
//!   scopes/<cgroup id>/getpeername4, getpeername6
//!                                links: restore_getpeername4/6 on the scope's cgroup
//!   scopes/<netns scope id>/sk_lookup
//!                                link: steer_inbound on the network namespace (the id is the
//!                                namespace's inode with bit 63 set)
//! ```
use std::path::{Path, PathBuf};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/interceptor";

/// The layout of one pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

/// The links pinned for one scope.
pub const SCOPE_LINKS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];
/// The link pinned for an inbound scope (a network namespace).
pub const INBOUND_LINK: &str = "sk_lookup";
/// The links pinned once, at the cgroup2 root.
pub const ROOT_LINKS: [&str; 3] = ["sock_ops", "getsockopt", "setsockopt"];

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn root_links_dir(&self) -> PathBuf {
        self.root.join("root")
    }

    pub fn root_link(&self, name: &str) -> PathBuf {
        self.root_links_dir().join(name)
    }

    pub fn scopes_dir(&self) -> PathBuf {
        self.root.join("scopes")
    }

    /// The directory of a scope's links: a cgroup id, or a network namespace's scope id.
    pub fn scope_dir(&self, scope: u64) -> PathBuf {
        self.scopes_dir().join(scope.to_string())
    }

    pub fn scope_link(&self, scope: u64, name: &str) -> PathBuf {
        self.scope_dir(scope).join(name)
    }
}

impl Default for PinLayout {
    fn default() -> Self {
        PinLayout::new(DEFAULT_PIN_DIR)
    }
}
