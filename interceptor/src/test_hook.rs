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

/// Test-only hook: with `INTERCEPTOR_TEST_REFUSE_VERDICT=1` in the environment, attaching
/// kernel forwarding's verdict fails as a kernel that refuses it would (a verifier that
/// rejects it, a kernel without sockmap's stream verdicts), so the end-to-end tests can show
/// what the proxy then gets (tests/tests/kernel_forward.rs). Unset, it does nothing.
pub(crate) fn refuse_verdict() -> Option<crate::error::Error> {
    (std::env::var_os("INTERCEPTOR_TEST_REFUSE_VERDICT").as_deref()
        == Some(std::ffi::OsStr::new("1")))
    .then(|| {
        crate::error::Error::io(
            "attaching the kernel-forwarding verdict",
            std::io::Error::other("refused by INTERCEPTOR_TEST_REFUSE_VERDICT=1"),
        )
    })
}
