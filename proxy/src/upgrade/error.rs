//! Why an upgrade, or serving upgrades, failed.

use std::io;
use std::path::PathBuf;

/// Why an upgrade, or serving upgrades, failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "--upgrade-socket {}: a running proxy serves upgrades there; pass --upgrade to take \
         over from it, or give this proxy another --upgrade-socket",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("--upgrade-socket {}: {what}: {error}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        error: io::Error,
    },
    #[error(
        "--upgrade --upgrade-socket {}: no running proxy serves upgrades there ({error}); start \
         without --upgrade, or point --upgrade-socket at the running proxy's socket",
        path.display()
    )]
    NoPredecessor { path: PathBuf, error: io::Error },
    #[error("upgrade through {}: the running proxy refused: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error("upgrade through {}: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
}
