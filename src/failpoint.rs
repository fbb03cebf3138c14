//! Crash points for tests.
//!
//! `failpoint!("name")` marks an instant where a crash must leave the replica
//! openable with either the old or the new state. Built with the
//! `failpoints` feature, the process aborts at the point named by the
//! `SHORTHORN_FAILPOINT` environment variable, which lets
//! `tests/failpoints.rs` crash a real process at each one. Without the
//! feature (every release build) the macro expands to nothing.

/// Aborts the process if `name` is the armed failpoint.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("SHORTHORN_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint hit: aborting");
        std::process::abort();
    }
}

/// Marks a crash point; see the module documentation.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    }};
}
