//! `engine` owns one attached volume: it mirrors every write, unmap and
//! flush to all replicas through [`crate::replica::client`], reads from one
//! healthy replica, drops replicas that fail, rebuilds them online, keeps the
//! replicas consistent across its own crashes (membership epochs and write
//! intent), runs snapshots across them, and serves its control API and
//! metrics. ARCHITECTURE.md ("The engine") walks through the mechanisms.
//!
//! It may use `crate::replica` (the client and the wire types) and nothing
//! above it: not `crate::frontend`, `crate::controller` or `crate::node`
//! (enforced by `tests/layering.rs`). Frontends call into the engine, never
//! the other way round.

pub mod control;
pub mod intent;
pub mod metrics;
pub mod ranges;
mod rebuild;
mod startup;
pub mod volume;

use crate::error::ErrorKind;
use crate::replica::client::ClientError;

pub use volume::{Health, Mode, Options, Volume, VolumeStatus};

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume needs at least one replica.
    #[error("a volume needs at least one replica")]
    NoReplicas,
    /// Talking to a replica failed while opening the volume.
    #[error("replica {addr}: {cause}")]
    Replica {
        /// The replica.
        addr: String,
        /// Cause.
        cause: ClientError,
    },
    /// A replica holds a volume of another size.
    #[error("replica {addr} has size {replica} but the volume is {volume} bytes")]
    SizeMismatch {
        /// The replica.
        addr: String,
        /// Its size.
        replica: u64,
        /// The volume's size.
        volume: u64,
    },
    /// The same replica was named twice.
    #[error("replica {addr} is named twice")]
    DuplicateReplica {
        /// The replica.
        addr: String,
    },
    /// The replica is already serving this volume.
    #[error("replica {addr} is already in the volume")]
    AlreadyMember {
        /// The replica.
        addr: String,
    },
    /// No replica of that address in the volume.
    #[error("replica {addr} is not in the volume")]
    UnknownReplica {
        /// The replica.
        addr: String,
    },
    /// Replicas the last engine recorded as holding every acknowledged
    /// write cannot be reached; starting without them could serve old data.
    #[error("replicas {missing:?} held the volume's latest data when its engine last ran and are not reachable; bring them back (or remove them from the volume) before starting it")]
    MembersUnavailable {
        /// Their addresses.
        missing: Vec<String>,
    },
    /// Every reachable replica is stale or being rebuilt.
    #[error("no replica holds a consistent copy of the volume")]
    NoConsistentReplica,
    /// The operation cannot run while a rebuild is under way.
    #[error("a replica is being rebuilt; retry when it is done")]
    RebuildInProgress,
    /// Replicas are rebuilt one at a time, and one is being rebuilt now.
    #[error("replica {addr} answers, but another replica is being rebuilt; add it again when that is done")]
    RebuildQueued {
        /// The replica asked for.
        addr: String,
    },
    /// Expansion was asked to make the volume smaller.
    #[error("cannot shrink the volume from {size} to {requested} bytes")]
    Shrink {
        /// Current size.
        size: u64,
        /// Requested size.
        requested: u64,
    },
    /// The request is not 512-byte aligned or is empty.
    #[error("request offset {offset} length {len} must be non-empty multiples of 512 bytes")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// The request is larger than one request may be.
    #[error("request of {len} bytes exceeds the {max}-byte limit; split it")]
    TooLarge {
        /// Byte length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The request reaches past the end of the volume.
    #[error("request offset {offset} length {len} reaches past the volume size {size}")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// The replicas refused the request itself.
    #[error("replicas refused the request: {message}")]
    Refused {
        /// Their error kind.
        kind: ErrorKind,
        /// Their message.
        message: String,
    },
    /// No replica is left to serve.
    #[error("volume is faulted: no replica left")]
    Faulted,
}

impl Error {
    /// The kind a boundary maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoReplicas
            | Self::Misaligned { .. }
            | Self::DuplicateReplica { .. }
            | Self::Shrink { .. }
            | Self::TooLarge { .. } => ErrorKind::InvalidArgument,
            Self::AlreadyMember { .. } => ErrorKind::AlreadyExists,
            Self::UnknownReplica { .. } => ErrorKind::NotFound,
            Self::MembersUnavailable { .. } | Self::NoConsistentReplica => ErrorKind::Unavailable,
            Self::RebuildInProgress => ErrorKind::FailedPrecondition,
            Self::RebuildQueued { .. } => ErrorKind::Busy,
            Self::Replica { cause, .. } => cause.kind(),
            Self::SizeMismatch { .. } => ErrorKind::FailedPrecondition,
            Self::OutOfRange { .. } => ErrorKind::OutOfRange,
            Self::Refused { kind, .. } => *kind,
            Self::Faulted => ErrorKind::Unavailable,
        }
    }
}
