//! The daemon's config file (`interceptor run --config`): TOML parsed and validated as a
//! start or a SIGHUP does (`interceptor_daemon::config::parse`). Never panics; a refusal
//! names the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = interceptor_daemon::config::parse(Path::new("fuzz.toml"), text) {
        assert!(
            e.to_string().contains("fuzz.toml"),
            "error without the file: {e}"
        );
    }
});
