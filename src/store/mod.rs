//! `store` owns the cluster's persistent state: volumes, nodes, snapshots,
//! as versioned records behind one interface, [`Store`].
//!
//! The model is the one Kubernetes and etcd use, so a Kubernetes-backed
//! store can implement the same trait later: every record carries the
//! store revision that last wrote it, and a transaction is a list of
//! writes each conditioned on the version the caller read ([`Expect`]).
//! Either every condition holds and every write commits, atomically and
//! durably, or nothing changes and the first failed condition is
//! reported ([`Error::Conflict`]). Callers read, decide, and write back
//! with the versions they read; a concurrent writer makes them retry
//! instead of being overwritten.
//!
//! [`Db`] is the embedded default: one redb file, each commit fsynced
//! before it returns, so a controller killed at any instant reopens to the
//! last acknowledged commit.
//!
//! This layer knows nothing of CSI, engines or replicas: records are bytes
//! here (with a serde helper, [`Typed`]); it must not import any other
//! layer of shorthorn.

mod db;

pub use db::Db;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::ErrorKind;

/// The kinds of record; each is its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// A volume: its parameters, replicas, state.
    Volume = 1,
    /// A node: its agent address, disks, labels, heartbeat.
    Node = 2,
    /// A snapshot of a volume.
    Snapshot = 3,
    /// A name reserved for an object being created (CSI names → ids).
    Name = 4,
}

/// A record as stored: its bytes and the revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The store revision of the commit that last wrote this record; it
    /// only grows.
    pub version: u64,
    /// The record.
    pub value: T,
}

/// The condition a write holds on the record it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The record must not exist (create).
    Absent,
    /// The record must exist at exactly this version (update, delete).
    Version(u64),
    /// No condition.
    Any,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces `key` of `kind` with `value`.
    Put {
        /// Key space.
        kind: Kind,
        /// Record key.
        key: String,
        /// New bytes.
        value: Vec<u8>,
        /// Condition on the current record.
        expect: Expect,
    },
    /// Removes `key` of `kind` (absent already is fine only with
    /// [`Expect::Any`]).
    Delete {
        /// Key space.
        kind: Kind,
        /// Record key.
        key: String,
        /// Condition on the current record.
        expect: Expect,
    },
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A condition of the transaction did not hold; nothing was written.
    #[error(
        "{kind:?} {key:?} changed concurrently (expected {expected:?}, found version {found:?})"
    )]
    Conflict {
        /// Key space of the failed condition.
        kind: Kind,
        /// Key of the failed condition.
        key: String,
        /// What the caller expected.
        expected: Expect,
        /// The version found, `None` when absent.
        found: Option<u64>,
    },
    /// The database file cannot be opened, read or written.
    #[error("store {path}: {cause}")]
    Backend {
        /// The database file.
        path: String,
        /// What the backend reported.
        cause: String,
    },
    /// A record's bytes do not decode as the type asked for.
    #[error("{kind:?} {key:?} does not decode: {cause}")]
    Decode {
        /// Key space.
        kind: Kind,
        /// Record key.
        key: String,
        /// The decoder's message.
        cause: String,
    },
}

impl Error {
    /// The kind a boundary maps: a conflict is "try again" (CSI ABORTED is
    /// chosen by the caller, which knows it was a concurrent operation).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Conflict { .. } => ErrorKind::FailedPrecondition,
            Self::Backend { .. } => ErrorKind::Io,
            Self::Decode { .. } => ErrorKind::Corrupt,
        }
    }
}

/// Result of this layer.
pub type Result<T> = std::result::Result<T, Error>;

/// The cluster state's persistence, as the controller sees it.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The record `key` of `kind`, if any.
    fn get(&self, kind: Kind, key: &str) -> Result<Option<Versioned<Vec<u8>>>>;

    /// Up to `limit` records of `kind` with keys greater than `after` (all
    /// keys when `None`), in key order.
    fn list(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned<Vec<u8>>)>>;

    /// Applies `ops` atomically and durably if every condition holds, and
    /// returns the new revision; otherwise changes nothing and returns the
    /// first [`Error::Conflict`].
    fn commit(&self, ops: Vec<Op>) -> Result<u64>;
}

/// Serde access to one kind of record (JSON bytes, so records stay
/// readable with a generic tool and tolerant of added fields).
#[derive(Debug, Clone, Copy)]
pub struct Typed<T> {
    kind: Kind,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Typed<T> {
    /// Records of `kind` as `T`.
    pub const fn new(kind: Kind) -> Self {
        Self {
            kind,
            _t: std::marker::PhantomData,
        }
    }

    /// The key space.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Reads and decodes `key`.
    pub fn get(&self, s: &dyn Store, key: &str) -> Result<Option<Versioned<T>>> {
        s.get(self.kind, key)?
            .map(|v| {
                Ok(Versioned {
                    version: v.version,
                    value: self.decode(key, &v.value)?,
                })
            })
            .transpose()
    }

    /// Reads and decodes a page of records (see [`Store::list`]).
    pub fn list(
        &self,
        s: &dyn Store,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned<T>)>> {
        s.list(self.kind, after, limit)?
            .into_iter()
            .map(|(k, v)| {
                let value = self.decode(&k, &v.value)?;
                Ok((
                    k,
                    Versioned {
                        version: v.version,
                        value,
                    },
                ))
            })
            .collect()
    }

    /// Every record of this kind, in key order.
    pub fn all(&self, s: &dyn Store) -> Result<Vec<(String, Versioned<T>)>> {
        self.list(s, None, usize::MAX)
    }

    /// A conditional put of `value` at `key`.
    pub fn put(&self, key: &str, value: &T, expect: Expect) -> Op {
        Op::Put {
            kind: self.kind,
            key: key.to_owned(),
            value: serde_json::to_vec(value).expect("records serialize"),
            expect,
        }
    }

    /// A conditional delete of `key`.
    pub fn delete(&self, key: &str, expect: Expect) -> Op {
        Op::Delete {
            kind: self.kind,
            key: key.to_owned(),
            expect,
        }
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            kind: self.kind,
            key: key.to_owned(),
            cause: e.to_string(),
        })
    }
}
