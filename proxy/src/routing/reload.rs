//! The routes in force: loaded at start, reloaded when the file changes (checked every
//! second) or on `POST /routes/reload`. A file that does not read, parse or compile is
//! refused and the routes in force stay.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use super::compile::{compile, CompileError};
use super::file::RoutingFile;
use super::stats::RoutingStats;
use super::table::Table;

/// Why a routing file was refused.
#[derive(Debug, thiserror::Error)]
#[error("routes {}: {problem}", path.display())]
pub struct RoutesError {
    pub path: PathBuf,
    pub problem: RoutesProblem,
}

/// What was wrong with a refused routing file.
#[derive(Debug, thiserror::Error)]
pub enum RoutesProblem {
    /// The file could not be read.
    #[error("cannot read it: {0}")]
    Read(io::Error),
    /// It is not YAML of the expected shape (the parser's message, with line and column).
    #[error("{0}")]
    Parse(String),
    /// It parsed, but does not compile (names the field).
    #[error(transparent)]
    Invalid(CompileError),
}

/// Parses and compiles the text of a routing file (what `reload` does with the file it
/// read; also the entry point of the routes fuzz target). The error names the field.
pub fn parse(text: &str, stats: &RoutingStats) -> Result<Table, RoutesProblem> {
    let file = serde_saphyr::from_str::<RoutingFile>(text)
        .map_err(|e| RoutesProblem::Parse(e.to_string()))?;
    compile(&file, stats).map_err(RoutesProblem::Invalid)
}

/// The routes in force, reloadable.
#[derive(Debug)]
pub struct Routing {
    path: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    pub stats: Arc<RoutingStats>,
    /// (mtime, len) of the file last loaded.
    seen: Mutex<Option<(SystemTime, u64)>>,
    pub detection_timeout: Duration,
    pub version: AtomicU64,
}

impl Routing {
    /// No routes: every destination is opaque TCP.
    pub fn none() -> Routing {
        Routing {
            path: None,
            table: RwLock::new(Arc::new(Table::default())),
            stats: Arc::default(),
            seen: Mutex::new(None),
            detection_timeout: Duration::from_millis(100),
            version: AtomicU64::new(0),
        }
    }

    /// Loads `path`; an error names the file and the field.
    pub fn load(path: &Path, detection_timeout: Duration) -> Result<Routing, RoutesError> {
        let r = Routing {
            path: Some(path.to_owned()),
            detection_timeout,
            ..Routing::none()
        };
        r.reload()?;
        Ok(r)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn current(&self) -> Arc<Table> {
        self.table.read().expect("routes lock").clone()
    }

    /// Reads, parses and compiles the file; on success it replaces the table, on failure
    /// nothing changes.
    pub fn reload(&self) -> Result<(), RoutesError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |problem: RoutesProblem| RoutesError {
            path: path.clone(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(RoutesProblem::Read(e)))?;
        let text = std::fs::read_to_string(path).map_err(|e| err(RoutesProblem::Read(e)))?;
        let result = parse(&text, &self.stats).map_err(err);
        *self.seen.lock().expect("seen") = Some((
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        ));
        match result {
            Ok(t) => {
                *self.table.write().expect("routes lock") = Arc::new(t);
                self.version.fetch_add(1, Relaxed);
                self.stats.reloads.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.reload_errors.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Whether the file changed since it was last read.
    fn changed(&self) -> bool {
        let Some(path) = &self.path else { return false };
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let now = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        *self.seen.lock().expect("seen") != Some(now)
    }
}

/// Reloads the routes when the file changes, until the runtime ends.
pub async fn watch(routing: Arc<Routing>) {
    if routing.path().is_none() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if routing.changed() {
            match routing.reload() {
                Ok(()) => {
                    tracing::info!(routes = %routing.path().unwrap().display(), "routes reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "routes not reloaded; the previous ones stay")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::compile::tests::GOOD;

    #[test]
    fn a_refused_reload_keeps_the_routes() {
        let dir = std::env::temp_dir().join(format!("icpt-routes-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let r = Routing::load(&path, Duration::from_millis(100)).unwrap();
        let before = r.current();
        std::fs::write(&path, GOOD.replace("subset: v2}}]", "subset: v9}}]")).unwrap();
        let e = r.reload().unwrap_err();
        assert!(e.to_string().contains("v9"), "{e}");
        assert!(
            Arc::ptr_eq(&before, &r.current()),
            "the routes in force stay"
        );
        assert_eq!(r.stats.reload_errors.load(Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
