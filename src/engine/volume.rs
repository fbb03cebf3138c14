//! `Volume`: one volume mirrored over its replicas (RAID-1 over the network).
//!
//! Invariants:
//! - A write, unmap or flush is acknowledged only when every replica in
//!   read-write mode acknowledged it. A replica that errs or times out is
//!   marked failed *before* the acknowledgement, so an acknowledged write is
//!   on every replica still in the set.
//! - Reads go to one read-write replica, rotating; a failing one is marked
//!   failed and the read is retried on the next.
//! - With no read-write replica left the volume is faulted and every request
//!   fails at once; nothing waits forever (each replica call has a timeout).
//!
//! Not yet here (issue 3 continues): sub-4 KiB requests, start-up consistency
//! checks, write-intent resync, rebuild, snapshots, the control API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use serde::Serialize;

use super::Error;
use crate::error::ErrorKind;
use crate::replica::client::{Client, ClientError};
use crate::replica::extents::BLOCK_SIZE;
use crate::units::{check_extent, ExtentError};

/// How long one replica request may take before the replica is failed. A
/// replica that stops answering (SIGSTOP, a hung disk) must not hang the
/// volume; a flush of a large head can legitimately take seconds.
pub const REPLICA_IO_TIMEOUT: Duration = Duration::from_secs(8);

/// Errors that blame the request, not the replica that reported them.
fn is_request_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::InvalidArgument | ErrorKind::OutOfRange)
}

/// A replica's place in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Receives writes and serves reads.
    ReadWrite,
    /// Dropped after an error; receives nothing.
    Failed,
}

/// The volume's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Every replica is read-write.
    Healthy,
    /// Some replicas failed; at least one serves.
    Degraded,
    /// No replica serves; I/O fails.
    Faulted,
}

/// One replica as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// `host:port`.
    pub addr: String,
    /// Current mode.
    pub mode: Mode,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Health.
    pub health: Health,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug)]
struct Slot {
    addr: String,
    client: Client,
    mode: Mode,
    error: Option<String>,
}

/// One volume, mirrored.
#[derive(Debug)]
pub struct Volume {
    name: String,
    size: u64,
    slots: Mutex<Vec<Slot>>,
    next_read: AtomicUsize,
}

impl Volume {
    /// Connects to every replica and checks each has the volume's size.
    /// Fails if any replica is unreachable or disagrees: a volume starts
    /// only from a complete, consistent set (start-up repair is to come).
    pub async fn open(name: &str, size: u64, addrs: &[String]) -> Result<Self, Error> {
        Self::open_with_timeout(name, size, addrs, REPLICA_IO_TIMEOUT).await
    }

    /// [`open`](Self::open) with a chosen per-request replica timeout.
    pub async fn open_with_timeout(
        name: &str,
        size: u64,
        addrs: &[String],
        timeout: Duration,
    ) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::NoReplicas);
        }
        let mut slots = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let client = Client::connect_with_timeout(addr, timeout)
                .await
                .map_err(|cause| Error::Replica {
                    addr: addr.clone(),
                    cause,
                })?;
            let info = client.info().await.map_err(|cause| Error::Replica {
                addr: addr.clone(),
                cause,
            })?;
            if info.size != size {
                return Err(Error::SizeMismatch {
                    addr: addr.clone(),
                    replica: info.size,
                    volume: size,
                });
            }
            slots.push(Slot {
                addr: addr.clone(),
                client,
                mode: Mode::ReadWrite,
                error: None,
            });
        }
        tracing::info!(volume.id = %name, replicas = addrs.len(), "volume open");
        Ok(Self {
            name: name.to_owned(),
            size,
            slots: Mutex::new(slots),
            next_read: AtomicUsize::new(0),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read-write replicas' clients, with their index.
    fn writable(&self) -> Vec<(usize, Client)> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mode == Mode::ReadWrite)
            .map(|(i, s)| (i, s.client.clone()))
            .collect()
    }

    fn fail(&self, i: usize, e: &ClientError) {
        let mut slots = self.slots();
        let s = &mut slots[i];
        if s.mode != Mode::Failed {
            tracing::error!(volume.id = %self.name, replica.addr = %s.addr, error = %e, "replica failed");
            s.mode = Mode::Failed;
            s.error = Some(e.to_string());
            // Stop talking to it at once; in-flight calls fail fast.
            s.client.shutdown();
        }
    }

    fn check_io(&self, offset: u64, len: u64) -> Result<(), Error> {
        check_extent(offset, len, self.size, BLOCK_SIZE).map_err(|e| match e {
            ExtentError::Misaligned => Error::Misaligned { offset, len },
            ExtentError::PastEnd => Error::OutOfRange {
                offset,
                len,
                size: self.size,
            },
        })
    }

    /// Sends the same request to every read-write replica at once and fails
    /// those that err. `Ok` only if at least one replica took it and none of
    /// the ones still read-write missed it.
    async fn mirror<F, Fut>(&self, op: F) -> Result<(), Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let targets = self.writable();
        if targets.is_empty() {
            return Err(Error::Faulted);
        }
        let results = join_all(targets.iter().map(|(_, c)| op(c.clone()))).await;
        let mut ok = 0;
        let mut last_invalid = None;
        for ((i, _), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => ok += 1,
                // The request itself is bad: every replica says so; do not
                // fail a healthy replica over it.
                Err(ClientError::Remote { kind, message }) if is_request_error(kind) => {
                    last_invalid = Some((kind, message));
                }
                Err(e) => self.fail(*i, &e),
            }
        }
        if let Some((kind, message)) = last_invalid {
            return Err(Error::Refused { kind, message });
        }
        if ok == 0 {
            return Err(Error::Faulted);
        }
        Ok(())
    }

    /// Writes `data` at `offset` (4 KiB-aligned) on every read-write replica.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), Error> {
        self.check_io(offset, data.len() as u64)?;
        self.mirror(|c| {
            let d = data.clone();
            async move { c.write(offset, d).await }
        })
        .await
    }

    /// Trims a range on every read-write replica.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.check_io(offset, len)?;
        self.mirror(|c| async move { c.unmap(offset, len).await })
            .await
    }

    /// Makes every acknowledged write durable on every read-write replica.
    pub async fn flush(&self) -> Result<(), Error> {
        self.mirror(|c| async move { c.flush().await }).await
    }

    /// Reads from one read-write replica, trying the next if it fails.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        self.check_io(offset, len)?;
        loop {
            let targets = self.writable();
            if targets.is_empty() {
                return Err(Error::Faulted);
            }
            let pick = self.next_read.fetch_add(1, Ordering::Relaxed) % targets.len();
            let (i, c) = &targets[pick];
            match c.read(offset, len).await {
                Ok(data) => return Ok(data),
                Err(ClientError::Remote { kind, message }) if is_request_error(kind) => {
                    return Err(Error::Refused { kind, message })
                }
                Err(e) => self.fail(*i, &e),
            }
        }
    }

    /// Health and every replica's mode.
    pub fn status(&self) -> VolumeStatus {
        let slots = self.slots();
        let rw = slots.iter().filter(|s| s.mode == Mode::ReadWrite).count();
        VolumeStatus {
            name: self.name.clone(),
            size: self.size,
            health: match rw {
                0 => Health::Faulted,
                n if n == slots.len() => Health::Healthy,
                _ => Health::Degraded,
            },
            replicas: slots
                .iter()
                .map(|s| ReplicaStatus {
                    addr: s.addr.clone(),
                    mode: s.mode,
                    error: s.error.clone(),
                })
                .collect(),
        }
    }
}
