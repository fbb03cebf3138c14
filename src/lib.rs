//! shorthorn: replicated block storage for Kubernetes.
//!
//! Layers, bottom up (each may use only those below it; `tests/layering.rs`
//! enforces it):
//! - [`replica`]: one copy of a volume on one disk, served over TCP.
//! - [`engine`]: mirrors a volume over its replicas (issue 3).
//! - [`frontend`]: how a volume reaches a kernel: a FUSE block file and
//!   an iSCSI target (issue 4).
//! - [`store`]: the cluster state's persistence (versioned records,
//!   conditional transactions; embedded redb by default).
//! - [`controller`], [`node`]: the CSI driver (issue 5), over [`csi`];
//!   [`dev`] runs both behind one socket.
//!
//! See ARCHITECTURE.md for how a write travels through them.

#![warn(missing_docs)]

pub mod api;
pub mod controller;
pub mod csi;
pub mod dev;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod frontend;
pub mod node;
pub mod replica;
pub mod store;
pub mod units;

/// Raises this process's open-file limit to its hard limit: a replica keeps
/// one descriptor per layer, and chains of thousands of snapshots are allowed.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The directory holding `path`, for syncing or checking it: `.` for a
/// bare relative name (whose `parent()` is empty), `None` for `/`.
pub fn parent_dir(path: &std::path::Path) -> Option<&std::path::Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(std::path::Path::new(".")),
        p => p,
    }
}
