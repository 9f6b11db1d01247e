//! Loader library of the interceptor: loads the kernel programs, keeps them pinned, attaches
//! them per cgroup and reads their state back. The `interceptor` CLI is a thin layer over it.
#![deny(unsafe_code)]
pub mod attach;
pub mod cgroup;
pub mod detach;
pub mod error;
pub mod maps;
pub mod object;
pub mod paths;
pub mod settings;
pub mod stats;
pub mod status;
mod sys;
pub mod system;

pub use attach::{attach, Attached};
pub use detach::{detach, detach_all, Detached};
pub use error::{Error, Result};
pub use interceptor_common::Counter;
pub use paths::PinLayout;
pub use settings::ScopeSettings;
pub use stats::{stats, Stats};
pub use status::{status, Status};
