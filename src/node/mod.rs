//! `node` will own one machine's share of the work: the CSI Node service
//! (stage, publish, format, mount) and the instance manager that runs this
//! node's replica and engine processes (issue 5).
//!
//! It starts replicas and engines as separate processes of this binary and
//! must not import `crate::controller` (enforced by `tests/layering.rs`).
