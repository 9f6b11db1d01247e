//! Resolving the network namespaces that inbound scopes name.
use std::{
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use interceptor_common::INBOUND_SCOPE_BIT;

use crate::{
    error::{Error, Result},
    sys,
};

/// A network namespace an inbound scope is attached to.
#[derive(Debug)]
pub struct Netns {
    /// Absolute path as given (e.g. /run/netns/NAME or /proc/PID/ns/net).
    pub path: PathBuf,
    /// Inode of the namespace.
    pub ino: u64,
    /// The namespace, open.
    pub file: fs::File,
}

impl Netns {
    /// The scope id of the namespace in the maps.
    pub fn scope_id(&self) -> u64 {
        scope_id(self.ino)
    }
}

/// The scope id of the network namespace with inode `ino`.
pub fn scope_id(ino: u64) -> u64 {
    ino | INBOUND_SCOPE_BIT
}

/// Whether a scope id is an inbound (network namespace) scope.
pub fn is_inbound(scope: u64) -> bool {
    scope & INBOUND_SCOPE_BIT != 0
}

/// Opens `path` and checks that it is a network namespace.
pub fn resolve(path: &Path) -> Result<Netns> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.into());
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NetnsMissing { path: path.into() })
        }
        Err(e) => {
            return Err(Error::io(
                format!("network namespace {}", path.display()),
                e,
            ))
        }
    };
    if !sys::is_netns(file.as_fd()) {
        return Err(Error::NotNetns { path: path.into() });
    }
    let ino = file
        .metadata()
        .map_err(|e| Error::io(format!("network namespace {}", path.display()), e))?
        .ino();
    Ok(Netns {
        path: abs,
        ino,
        file,
    })
}
