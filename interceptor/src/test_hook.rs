//! Hooks for the end-to-end tests; without their environment variables they do nothing.

/// Test-only hook: with `INTERCEPTOR_TEST_PAUSE_MS=N` in the environment, `attach` and
/// `upgrade` sleep N ms after each step that changes the pinned state (maps created and
/// stamped, settings written, each link pinned or swapped), so the end-to-end tests can kill
/// the loader between any two steps (tests/tests/upgrade_programs.rs). Unset, it does nothing.
pub(crate) fn test_pause() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("INTERCEPTOR_TEST_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}
