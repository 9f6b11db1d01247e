//! The open-file limit: raised to its hard limit at start, and the connection maximum
//! fitted to it, so that the proxy runs out of its own connection budget (refusing cleanly,
//! counted) before it runs out of descriptors.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::{info, warn};

/// Descriptors kept aside from connections: listeners, the admin server, the upgrade
/// socket, the routing file watcher, logs, the runtime's own.
pub const RESERVED_FDS: u64 = 256;

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs the result (a warning when it
/// cannot be raised). Returns the limits, or `None` when they cannot even be read.
pub fn raise_open_file_limit() -> Option<OpenFileLimit> {
    let (before, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    let soft = if before < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(error = %e, soft = before, hard, "cannot raise the open-file soft limit to the hard limit");
                before
            }
        }
    } else {
        before
    };
    info!(
        soft_before = before,
        soft, hard, "open-file limit (RLIMIT_NOFILE)"
    );
    Some(OpenFileLimit { before, soft, hard })
}

/// The connection maximum that fits `soft` descriptors: two per connection (client and
/// upstream) after [`RESERVED_FDS`], at least 1; never more than `configured`.
pub fn fit_max_connections(configured: usize, soft: u64) -> usize {
    let fits = (soft.saturating_sub(RESERVED_FDS) / 2).max(1);
    configured.min(usize::try_from(fits).unwrap_or(usize::MAX))
}

/// [`fit_max_connections`] with the current soft limit, logging when it lowers the maximum.
pub fn effective_max_connections(configured: usize) -> usize {
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return configured;
    };
    let max = fit_max_connections(configured, soft);
    if max < configured {
        warn!(
            max_connections = configured,
            open_file_limit = soft,
            effective = max,
            "--max-connections lowered to fit the open-file limit (two descriptors per connection); raise the hard limit (e.g. LimitNOFILE=) to allow more"
        );
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_two_descriptors_per_connection() {
        assert_eq!(fit_max_connections(100_000, 1_048_576), 100_000);
        assert_eq!(fit_max_connections(100_000, 1024), 384);
        assert_eq!(fit_max_connections(100_000, 100), 1);
        assert_eq!(fit_max_connections(10, 65536), 10);
    }
}
