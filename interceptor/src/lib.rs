//! Loader library of the interceptor: loads the kernel programs, keeps them pinned, attaches
//! them per cgroup and network namespace, and reads their state back. The `interceptor` CLI
//! (`interceptor-cli`) and the daemon (`interceptor-daemon`) are layers over it.
#![deny(unsafe_code)]
pub mod attach;
pub mod cgroup;
pub mod detach;
pub mod error;
pub mod features;
pub mod kernel_log;
mod links;
mod lock;
pub mod maps;
pub mod netns;
pub mod object;
pub mod paths;
mod programs;
pub mod register;
pub mod settings;
pub mod stats;
pub mod status;
mod sys;
pub mod system;
mod test_hook;
pub mod upgrade;

pub use attach::{attach, attach_inbound, Attached, AttachedInbound};
pub use detach::{detach, detach_all, detach_id, Detached};
pub use error::{Error, Result};
/// How many scopes (outbound cgroups and inbound namespaces together) the maps hold.
pub use interceptor_common::capacity::SCOPES as SCOPE_TABLE_LIMIT;
pub use interceptor_common::{Counter, AF_INET, AF_INET6};
pub use paths::PinLayout;
pub use register::register;
pub use settings::{InboundSettings, ProxyDown, ProxyListener, ScopeSettings};
pub use stats::{stats, stats_unlocked, Stats};
pub use status::{status, Status};
pub use upgrade::{upgrade, Upgraded};
