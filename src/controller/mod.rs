//! `controller` will own the cluster's desired state: the CSI Identity and
//! Controller services, the scheduler that places each volume's replicas on
//! distinct nodes' disks, and the manager that replaces lost replicas
//! (issue 5).
//!
//! It talks to nodes over their gRPC agent API, never by calling
//! `crate::node` code, and must not import `crate::node` (enforced by
//! `tests/layering.rs`).
