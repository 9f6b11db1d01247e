//! Scratch directories for a test's files (configs, logs, sockets of real peers).

use std::path::{Path, PathBuf};

use crate::util::leaked;

/// `$TMPDIR/icpt-t-<test>-<pid>`, created empty (a stale one of the same name is removed
/// first) and removed when dropped, also when the test fails.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(test: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!(
            "{}-{}",
            crate::names::resource_name(test),
            std::process::id()
        ));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                panic!("stale scratch dir {}: {e}", dir.display());
            }
        }
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                leaked(format!("scratch dir {}: {e}", self.0.display()));
            }
        }
    }
}
