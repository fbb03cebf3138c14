//! `replica` owns one copy of one volume on one node's disk: the chain of
//! sparse layer files in Longhorn v1's directory layout, the extent index that
//! says which layer holds each block, and the TCP protocol that serves them.
//!
//! It knows nothing of the engine, the frontends, CSI or Kubernetes, and must
//! not import `crate::engine`, `crate::frontend`, `crate::controller` or
//! `crate::node` (enforced by `tests/layering.rs`).
//!
//! Map:
//! - [`meta`]: Longhorn's metadata files, pure encode/decode plus atomic write.
//! - [`extents`]: the block index (pure, property-tested).
//! - [`layer`]: one sparse file: positional I/O, hole punching, extent scan.
//! - [`chain`]: [`Replica`], the chain of layers and every operation on it.
//! - [`wire`]: the frame format (pure, property-tested).
//! - [`server`] / [`client`]: the protocol over TCP.
//! - [`copy`]: filling one replica's layers from another's (rebuild, restore).

pub mod chain;
pub mod client;
pub mod copy;
pub mod extents;
pub mod layer;
pub mod meta;
pub mod server;
pub mod wire;

use std::io;
use std::path::PathBuf;

use crate::error::ErrorKind;

pub use chain::{ExtentChecksum, ExtentPage, LayerInfo, Replica, ReplicaInfo};

/// Errors of the replica layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory holds no `volume.meta` and no size was given to create one.
    #[error("no replica in {dir}: volume.meta is missing (pass --size to create one)")]
    NoReplica {
        /// The directory.
        dir: PathBuf,
    },
    /// The replica directory could not be read or created.
    #[error("opening replica directory {dir}: {cause}")]
    OpenReplica {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        cause: io::Error,
    },
    /// An existing replica has another size than the one asked for.
    #[error("replica in {dir} has size {actual} bytes but {requested} was requested; use expand to grow it")]
    SizeMismatch {
        /// The directory.
        dir: PathBuf,
        /// Size recorded in volume.meta.
        actual: u64,
        /// Size requested.
        requested: u64,
    },
    /// I/O on a layer file failed.
    #[error("i/o on layer {file}: {cause}")]
    LayerIo {
        /// Layer file name.
        file: String,
        /// Cause.
        cause: io::Error,
    },
    /// Reading or writing a metadata file failed.
    #[error("metadata file {file}: {cause}")]
    MetaIo {
        /// Metadata file name.
        file: String,
        /// Cause.
        cause: io::Error,
    },
    /// A metadata file does not decode.
    #[error("metadata file {file} is corrupt: {reason}")]
    MetaCorrupt {
        /// Metadata file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer names a parent that does not exist.
    #[error("snapshot chain is broken: {layer} names parent {parent}, which does not exist")]
    ChainBroken {
        /// The child layer.
        layer: String,
        /// The missing parent.
        parent: String,
    },
    /// An I/O request is not 4 KiB-aligned or is empty.
    #[error("request offset {offset} length {len} must be non-empty multiples of 4096 bytes")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// An I/O request reaches past the end of the volume.
    #[error("request offset {offset} length {len} reaches past the volume size {size}")]
    ExtentOutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A volume size is zero or not a multiple of 4 KiB.
    #[error("volume size {size} must be a non-zero multiple of 4096 bytes")]
    BadSize {
        /// The size given.
        size: u64,
    },
    /// Expansion was asked to make the volume smaller.
    #[error("cannot shrink the volume from {size} to {requested} bytes")]
    Shrink {
        /// Current size.
        size: u64,
        /// Requested size.
        requested: u64,
    },
    /// No snapshot of that name.
    #[error("snapshot {name:?} not found")]
    SnapshotNotFound {
        /// Snapshot name.
        name: String,
    },
    /// A snapshot of that name exists.
    #[error("snapshot {name:?} already exists")]
    SnapshotExists {
        /// Snapshot name.
        name: String,
    },
    /// The snapshot's removal was started and did not finish.
    #[error("snapshot {name:?} is being removed; remove it again to finish")]
    SnapshotRemoving {
        /// Snapshot name.
        name: String,
    },
    /// Merging a snapshot away would need more disk space than is free.
    #[error("removing snapshot {name:?} needs {needed} bytes of free disk space to merge it into its children; the disk has {free}: free space on it, or remove snapshots below it first")]
    NoRoomToMerge {
        /// Snapshot name.
        name: String,
        /// Bytes its children do not hold yet.
        needed: u64,
        /// Bytes free for this process on the replica's filesystem.
        free: u64,
    },
    /// Snapshot labels beyond the size limit.
    #[error("snapshot labels take {bytes} bytes; at most {max} are allowed")]
    LabelsTooLarge {
        /// Bytes of keys and values given.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A snapshot name that cannot become a file name.
    #[error("{0}")]
    InvalidName(String),
    /// An earlier commit's outcome is unknown; the replica must be reopened.
    #[error("replica failed and must be reopened: {reason}")]
    Failed {
        /// The error that made it fail.
        reason: String,
    },
    /// A rebuild-only operation on a replica that is not being rebuilt.
    #[error("{op} is only allowed on a replica marked as rebuilding")]
    NotRebuilding {
        /// The operation refused.
        op: &'static str,
    },
    /// A layer name that is not a snapshot of the active chain.
    #[error("{layer:?} is not a snapshot on the active chain")]
    NotChainSnapshot {
        /// The name given.
        layer: String,
    },
    /// A chain given to `set_chain` that does not fit this replica.
    #[error("bad chain: {0}")]
    BadChain(String),
    /// The replica serves another volume than the one its caller works for
    /// (a stale address, a port reused by another volume's replica).
    #[error("this replica serves volume {serving:?}, not {asked:?}")]
    WrongVolume {
        /// The volume the caller named.
        asked: String,
        /// The volume this replica was started for.
        serving: String,
    },
    /// A Longhorn feature shorthorn does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    /// The kind a boundary maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoReplica { .. } | Self::SnapshotNotFound { .. } => ErrorKind::NotFound,
            Self::SnapshotExists { .. } => ErrorKind::AlreadyExists,
            Self::Misaligned { .. }
            | Self::BadSize { .. }
            | Self::InvalidName(_)
            | Self::LabelsTooLarge { .. }
            | Self::Shrink { .. } => ErrorKind::InvalidArgument,
            Self::ExtentOutOfRange { .. } => ErrorKind::OutOfRange,
            Self::SizeMismatch { .. }
            | Self::Unsupported(_)
            | Self::SnapshotRemoving { .. }
            | Self::NoRoomToMerge { .. }
            | Self::WrongVolume { .. }
            | Self::NotRebuilding { .. } => ErrorKind::FailedPrecondition,
            Self::NotChainSnapshot { .. } => ErrorKind::NotFound,
            Self::BadChain(_) => ErrorKind::InvalidArgument,
            Self::MetaCorrupt { .. } | Self::ChainBroken { .. } => ErrorKind::Corrupt,
            Self::OpenReplica { .. }
            | Self::LayerIo { .. }
            | Self::MetaIo { .. }
            | Self::Failed { .. } => ErrorKind::Io,
        }
    }
}

/// Reads exactly `n` bytes into a new vector without zero-filling it first
/// (payloads arrive at every request; filling a buffer only to overwrite it
/// showed up in profiles).
pub(crate) async fn read_vec<R>(rd: &mut R, n: usize) -> io::Result<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let want = n - v.len();
        if rd.read_buf(&mut (&mut v).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(v)
}

/// Result of replica operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
