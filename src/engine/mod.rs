//! `engine` will own one attached volume: it mirrors every write, unmap and
//! flush to all read-write replicas through [`crate::replica::client`], reads
//! from one healthy replica, drops failed replicas and rebuilds them online
//! (issue 3).
//!
//! It may use `crate::replica` (the client and the wire types) and nothing
//! above it: not `crate::frontend`, `crate::controller` or `crate::node`
//! (enforced by `tests/layering.rs`). Frontends call into the engine, never
//! the other way round.
