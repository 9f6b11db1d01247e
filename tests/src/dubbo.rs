//! The Dubbo 2 client and test provider of `tests/tests/dubbo.rs`: Python scripts in
//! `tests/python/` run by the venv that `cargo xtask setup` makes in `target/dubbo-venv`
//! with dubbo-ssl-python 0.9.6 from PyPI (a Dubbo client with its own Hessian 2 codec).

use std::path::PathBuf;

use crate::bins::{target_dir, workspace_dir};

/// The venv's Python; panics with the command that makes it when it is missing.
pub fn dubbo_python() -> PathBuf {
    let venv = target_dir().join("dubbo-venv");
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup`, or `/usr/bin/python3 -m venv {v} && {v}/bin/pip install dubbo-ssl-python==0.9.6`",
        python.display(),
        v = venv.display()
    );
    python
}

/// `tests/python/NAME`.
pub fn python_script(name: &str) -> PathBuf {
    workspace_dir().join("tests/python").join(name)
}
