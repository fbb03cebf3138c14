//! `frontend` owns how an engine's volume reaches a kernel: the FUSE block
//! file ([`fuse`]) for nodes whose kernel has no iSCSI initiator, and the
//! iSCSI target ([`iscsi`]) that a node with an initiator logs in to.
//!
//! A frontend calls into [`crate::engine::Volume`] and nothing above it: it
//! must not import `crate::controller` or `crate::node` (enforced by
//! `tests/layering.rs`). The node decides which frontend an engine runs and
//! turns what it exposes into a block device.

pub mod fuse;
pub mod iscsi;

use crate::error::ErrorKind;

/// Errors of the frontend layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path a FUSE frontend was asked to serve on is unusable.
    #[error("{path}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong with it, said so the caller can fix it.
        reason: String,
    },
    /// A name that cannot be used where it is needed.
    #[error("{name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another live process already serves a volume on that path.
    #[error("{path} is already served by a running FUSE filesystem; stop that engine first")]
    Busy {
        /// The path.
        path: String,
    },
    /// The operating system refused a mount, unmount or file operation.
    #[error("{what} {path}: {cause}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },
}

impl Error {
    /// The kind a boundary maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadPath { .. } | Self::BadName { .. } => ErrorKind::InvalidArgument,
            Self::Busy { .. } => ErrorKind::AlreadyExists,
            Self::Os { .. } => ErrorKind::Io,
        }
    }
}
