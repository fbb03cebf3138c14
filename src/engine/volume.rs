//! `Volume`: one volume mirrored over its replicas (RAID-1 over the network).
//!
//! Invariants:
//! - A write, unmap or flush is acknowledged only when every replica in
//!   read-write mode acknowledged it. A replica that errs or times out is
//!   marked failed *and the surviving replicas have recorded the new
//!   membership epoch* before the acknowledgement, so an acknowledged write
//!   is on every replica an engine restarting after a crash would trust.
//! - Write-only replicas (being rebuilt) receive every write too; they serve
//!   no reads, and their failure fails no request.
//! - Before a write leaves the engine, the write-intent regions it touches
//!   are marked on every replica ([`super::intent`]); after an engine crash,
//!   only marked regions can differ and only they are resynced.
//! - Snapshots, expansion and rebuild start hold the I/O gate: new I/O
//!   waits, in-flight I/O drains, every replica sees the same sequence.
//! - Reads go to the read-write replica with the fewest reads in flight; a
//!   failing one is failed and the read retried on another.
//! - With no read-write replica left the volume is faulted and every request
//!   fails at once; nothing waits forever (each replica call has a timeout).
//! - Requests need only 512-byte alignment; a partial 4 KiB block is
//!   read-modify-written under an exclusive lock on the block
//!   ([`super::ranges`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use serde::Serialize;

use super::intent::{Intent, DEFAULT_REGION_BYTES};
use super::metrics::{Handles, Metrics, Op};
use super::ranges::{RangeGuard, RangeLocks};
use super::Error;
use crate::error::ErrorKind;
use crate::replica::chain::LayerInfo;
use crate::replica::client::{Client, ClientError};
use crate::replica::extents::BLOCK_SIZE;
use crate::units::{check_extent, ExtentError};

/// How long one replica request may take before the replica is failed. A
/// replica that stops answering (SIGSTOP, a hung disk) must not hang the
/// volume; a flush of a large head can legitimately take seconds.
pub const REPLICA_IO_TIMEOUT: Duration = Duration::from_secs(8);

/// How long one replica may take to merge snapshots away: a merge copies up
/// to a snapshot's whole data, so such calls go over connections of their own
/// with this timeout instead of [`REPLICA_IO_TIMEOUT`].
pub const MERGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Smallest unit of a request: the logical sector size.
pub const SECTOR_SIZE: u64 = 512;

/// Largest read, write or unmap one request may carry (frontends split
/// larger transfers; iSCSI announces it as the maximum transfer length).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// `[offset, offset+len)` as `(offset, len)` pieces of at most one request
/// each, in order: how frontends split what they receive.
pub fn request_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(MAX_REQUEST_BYTES)).map(move |i| {
        let at = i * MAX_REQUEST_BYTES;
        (offset + at, MAX_REQUEST_BYTES.min(len - at))
    })
}

/// I/O errors that blame the request, not the replica that reported them.
fn is_request_error(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::InvalidArgument | ErrorKind::OutOfRange)
}

/// Control-operation errors that refuse the request (a name taken or
/// unknown, a state that does not allow it) rather than blame the replica.
fn is_refusal(kind: ErrorKind) -> bool {
    is_request_error(kind)
        || matches!(
            kind,
            ErrorKind::AlreadyExists | ErrorKind::NotFound | ErrorKind::FailedPrecondition
        )
}

/// Tunables of a volume.
#[derive(Debug, Clone)]
pub struct Options {
    /// Per-request replica timeout.
    pub timeout: Duration,
    /// Connections opened to each replica (a replica serves each connection
    /// on one task, so more than one spreads its work over cores).
    pub connections: usize,
    /// Rebuild copy rate limit in bytes per second (0: unlimited).
    pub rebuild_bytes_per_sec: u64,
    /// Write-intent region size.
    pub region_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: REPLICA_IO_TIMEOUT,
            connections: 1,
            rebuild_bytes_per_sec: 200 << 20,
            region_bytes: DEFAULT_REGION_BYTES,
        }
    }
}

/// A replica's place in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Receives writes and serves reads.
    ReadWrite,
    /// Being rebuilt: receives writes, serves no reads.
    WriteOnly,
    /// Dropped after an error, or stale; receives nothing.
    Failed,
}

/// The volume's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Every replica is read-write.
    Healthy,
    /// Some replicas are not read-write; at least one serves.
    Degraded,
    /// No replica serves; I/O fails.
    Faulted,
}

/// A rebuild as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildStatus {
    /// Bytes compared or copied so far.
    pub done_bytes: u64,
    /// Bytes the source's layers hold.
    pub total_bytes: u64,
    /// Bytes that differed and were copied.
    pub copied_bytes: u64,
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
    /// Progress of the replica's last rebuild (final once it is read-write).
    pub rebuild: Option<RebuildStatus>,
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
    /// Membership epoch recorded on the read-write replicas.
    pub epoch: u64,
    /// Write-intent regions marked.
    pub intent_regions: usize,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) addr: String,
    pub(super) conns: Vec<Client>,
    pub(super) mode: Mode,
    pub(super) error: Option<String>,
    pub(super) rebuild: Option<Arc<crate::replica::copy::Progress>>,
    pub(super) metrics: Arc<Handles>,
    /// Reads sent to it and not answered yet.
    pub(super) reads: Arc<AtomicUsize>,
    /// Taken out on request: failed, and no longer part of the volume's
    /// health or status (its index stays, so in-flight work that names
    /// slots by index is not confused).
    pub(super) removed: bool,
}

/// One read in flight on a replica; counted down when dropped.
struct ReadTicket(Arc<AtomicUsize>);

impl Drop for ReadTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slot {
    pub(super) fn new(
        addr: &str,
        conns: Vec<Client>,
        mode: Mode,
        error: Option<String>,
        metrics: &Metrics,
    ) -> Self {
        Self {
            addr: addr.to_owned(),
            conns,
            mode,
            error,
            rebuild: None,
            metrics: Arc::new(metrics.replica_handles(addr)),
            reads: Arc::default(),
            removed: false,
        }
    }

    fn client(&self, seq: usize) -> Client {
        self.conns[seq % self.conns.len()].clone()
    }

    pub(super) fn control(&self) -> Client {
        self.conns[0].clone()
    }
}

/// One volume, mirrored.
#[derive(Debug, Clone)]
pub struct Volume {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) name: String,
    pub(super) size: AtomicU64,
    pub(super) opts: Options,
    pub(super) slots: Mutex<Vec<Slot>>,
    /// Held shared by every request, exclusively by operations that need
    /// the replicas quiet (snapshot, expand, rebuild start and promotion).
    pub(super) gate: tokio::sync::RwLock<()>,
    /// Bumped by every membership change; `epoch_done` is the generation
    /// the replicas have recorded.
    pub(super) generation: AtomicU64,
    pub(super) epoch_done: AtomicU64,
    /// The epoch last recorded on the members; `epoch_lock` serialises
    /// recording the next one.
    epoch: AtomicU64,
    epoch_lock: tokio::sync::Mutex<()>,
    pub(super) intent: Mutex<Intent>,
    /// Serialises intent updates on the replicas.
    pub(super) intent_io: tokio::sync::Mutex<()>,
    pub(super) ranges: RangeLocks,
    next_read: AtomicUsize,
    next_conn: AtomicUsize,
    pub(super) metrics: Arc<Metrics>,
    io_metrics: Handles,
    /// Held while a rebuild runs (at most one at a time).
    pub(super) rebuilding: Arc<tokio::sync::Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Volume {
    /// Opens a volume over `addrs` with default options; see
    /// [`open_with`](Self::open_with).
    pub async fn open(name: &str, size: u64, addrs: &[String]) -> Result<Self, Error> {
        Self::open_with(name, size, addrs, Options::default()).await
    }

    /// [`open`](Self::open) with a chosen per-request replica timeout.
    pub async fn open_with_timeout(
        name: &str,
        size: u64,
        addrs: &[String],
        timeout: Duration,
    ) -> Result<Self, Error> {
        let opts = Options {
            timeout,
            ..Options::default()
        };
        Self::open_with(name, size, addrs, opts).await
    }

    pub(super) fn new(
        name: &str,
        size: u64,
        opts: Options,
        slots: Vec<Slot>,
        epoch: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let region = opts.region_bytes;
        let io_metrics = metrics.volume_handles();
        let n = slots.len();
        let v = Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                size: AtomicU64::new(size),
                opts,
                slots: Mutex::new(slots),
                gate: tokio::sync::RwLock::new(()),
                generation: AtomicU64::new(0),
                epoch_done: AtomicU64::new(0),
                epoch: AtomicU64::new(epoch),
                epoch_lock: tokio::sync::Mutex::new(()),
                intent: Mutex::new(Intent::new(region)),
                intent_io: tokio::sync::Mutex::new(()),
                ranges: RangeLocks::default(),
                next_read: AtomicUsize::new(0),
                next_conn: AtomicUsize::new(0),
                rebuilding: Arc::new(tokio::sync::Mutex::new(())),
                metrics,
                io_metrics,
            }),
        };
        for i in 0..n {
            v.inner.watch(i);
        }
        v
    }

    /// Volume name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
    }

    fn check_io(&self, offset: u64, len: u64, align: u64) -> Result<(), Error> {
        if len > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge {
                len,
                max: MAX_REQUEST_BYTES,
            });
        }
        let size = self.size();
        check_extent(offset, len, size, align).map_err(|e| match e {
            ExtentError::Misaligned => Error::Misaligned { offset, len },
            ExtentError::PastEnd => Error::OutOfRange { offset, len, size },
        })
    }

    /// The volume's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.encode(&self.status())
    }

    async fn timed<T>(
        &self,
        op: Op,
        bytes: u64,
        f: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let t = Instant::now();
        let r = f.await;
        self.inner
            .io_metrics
            .op(op)
            .record(bytes, t.elapsed(), r.is_ok());
        r
    }

    /// Writes `data` at `offset` (512-byte aligned) on every replica.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        self.timed(Op::write, len, self.write_inner(offset, data, SECTOR_SIZE))
            .await
    }

    /// [`Volume::write`] at any byte offset and length, for frontends that
    /// serve the volume as a file, where the kernel passes byte ranges
    /// through (unaligned `O_DIRECT`, write-through page cache). The
    /// partial blocks go through the same locked read-modify-write.
    pub async fn write_bytes(&self, offset: u64, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        self.timed(Op::write, len, self.write_inner(offset, data, 1))
            .await
    }

    async fn write_inner(&self, offset: u64, data: Bytes, align: u64) -> Result<(), Error> {
        self.check_io(offset, data.len() as u64, align)?;
        let _g = self.inner.gate.read().await;
        let (aligned, _l) = self.inner.lock_blocks(offset, data.len() as u64).await;
        if aligned {
            self.inner.write_blocks(offset, data).await
        } else {
            self.inner.merge_write(offset, &data).await
        }
    }

    /// Trims `[offset, offset+len)` (512-byte aligned) on every replica: it
    /// reads back as zeros. Whole blocks are unmapped; the parts of partial
    /// blocks are written with zeros by read-modify-write.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.timed(Op::unmap, len, self.unmap_inner(offset, len, SECTOR_SIZE))
            .await
    }

    /// [`Volume::unmap`] at any byte offset and length (see
    /// [`Volume::write_bytes`]).
    pub async fn unmap_bytes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.timed(Op::unmap, len, self.unmap_inner(offset, len, 1))
            .await
    }

    async fn unmap_inner(&self, offset: u64, len: u64, align: u64) -> Result<(), Error> {
        self.check_io(offset, len, align)?;
        let _g = self.inner.gate.read().await;
        let (aligned, _l) = self.inner.lock_blocks(offset, len).await;
        if aligned {
            return self.inner.unmap_blocks(offset, len).await;
        }
        let end = offset + len;
        // The whole blocks inside the range, and the partial pieces around.
        let (ia, ib) = (
            offset.next_multiple_of(BLOCK_SIZE),
            end / BLOCK_SIZE * BLOCK_SIZE,
        );
        let pieces = if ia >= ib {
            vec![(offset, end)]
        } else {
            vec![(offset, ia), (ib, end)]
        };
        for (from, to) in pieces.into_iter().filter(|(f, t)| f < t) {
            let zeros = vec![0u8; usize::try_from(to - from).expect("under two blocks")];
            self.inner.merge_write(from, &zeros).await?;
        }
        if ia < ib {
            self.inner.unmap_blocks(ia, ib - ia).await?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable on every replica.
    pub async fn flush(&self) -> Result<(), Error> {
        self.timed(Op::flush, 0, async {
            let _g = self.inner.gate.read().await;
            self.inner.flush_all().await
        })
        .await
    }

    /// Reads `len` bytes at `offset` (512-byte aligned).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        self.timed(Op::read, len, self.read_inner(offset, len, SECTOR_SIZE))
            .await
    }

    /// [`Volume::read`] at any byte offset and length (see
    /// [`Volume::write_bytes`]).
    pub async fn read_bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        self.timed(Op::read, len, self.read_inner(offset, len, 1))
            .await
    }

    async fn read_inner(&self, offset: u64, len: u64, align: u64) -> Result<Vec<u8>, Error> {
        self.check_io(offset, len, align)?;
        let _g = self.inner.gate.read().await;
        let (a, b) = block_bounds(offset, len);
        let data = self.inner.read_blocks(a, b - a).await?;
        if a == offset && b == offset + len {
            return Ok(data);
        }
        let at = usize::try_from(offset - a).expect("inside one block");
        Ok(data[at..at + usize::try_from(len).expect("bounded by the protocol")].to_vec())
    }

    /// Each replica's revision counter (writes and unmaps it applied), as
    /// it reports it now; `None` for a failed or silent one.
    pub async fn revisions(&self) -> Vec<Option<u64>> {
        let clients: Vec<Option<Client>> = self
            .inner
            .slots()
            .iter()
            .map(|s| (s.mode != Mode::Failed).then(|| s.control()))
            .collect();
        join_all(clients.into_iter().map(|c| async move {
            match c {
                Some(c) => c.info().await.ok().map(|i| i.revision),
                None => None,
            }
        }))
        .await
    }

    /// Health and every replica's mode.
    pub fn status(&self) -> VolumeStatus {
        let all = self.inner.slots();
        let slots: Vec<&Slot> = all.iter().filter(|s| !s.removed).collect();
        let rw = slots.iter().filter(|s| s.mode == Mode::ReadWrite).count();
        VolumeStatus {
            name: self.inner.name.clone(),
            size: self.size(),
            health: match rw {
                0 => Health::Faulted,
                n if n == slots.len() => Health::Healthy,
                _ => Health::Degraded,
            },
            epoch: self.inner.epoch.load(Ordering::SeqCst),
            intent_regions: lock(&self.inner.intent).marked_count(),
            replicas: slots
                .iter()
                .map(|s| ReplicaStatus {
                    addr: s.addr.clone(),
                    mode: s.mode,
                    error: s.error.clone(),
                    rebuild: s.rebuild.as_ref().map(|p| RebuildStatus {
                        done_bytes: p.done.load(Ordering::Relaxed),
                        total_bytes: p.total.load(Ordering::Relaxed),
                        copied_bytes: p.copied.load(Ordering::Relaxed),
                    }),
                })
                .collect(),
        }
    }

    /// Snapshots every replica as `name`, crash-consistently: new I/O waits,
    /// in-flight I/O drains, then every replica snapshots at the same point.
    /// A replica that fails to is failed (and later rebuilt), so the
    /// replicas left never disagree about the chain.
    pub async fn snapshot(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let _g = self.inner.gate.write().await;
        self.inner.snapshot_all(name, true, labels).await
    }

    /// The snapshots and head of the volume, as a read-write replica lists
    /// them (active chain first, head down).
    pub async fn list_snapshots(&self) -> Result<Vec<LayerInfo>, Error> {
        loop {
            let (i, c, _, _) = self.inner.pick_reader()?;
            match c.list().await {
                Ok(l) => return Ok(l),
                Err(e) => self.inner.fail(i, &e),
            }
        }
    }

    /// Removes snapshot `name` on every replica
    /// ([`Inner::remove_snapshots`]). Refused during a rebuild.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), Error> {
        let _r = self.inner.no_rebuild()?;
        self.inner.remove_snapshots(&[name.to_owned()]).await
    }

    /// Reverts every replica to snapshot `name`. The volume must not be in
    /// use by a frontend: its content changes under it. Refused during a
    /// rebuild.
    pub async fn revert(&self, name: &str) -> Result<(), Error> {
        let _r = self.inner.no_rebuild()?;
        let _g = self.inner.gate.write().await;
        self.inner
            .control_all(|c| {
                let n = name.to_owned();
                async move { c.revert(&n).await }
            })
            .await
    }

    /// Grows the volume to `size` bytes, online.
    pub async fn expand(&self, size: u64) -> Result<(), Error> {
        let _g = self.inner.gate.write().await;
        if size < self.size() {
            return Err(Error::Shrink {
                size: self.size(),
                requested: size,
            });
        }
        self.inner
            .control_all(|c| async move { c.expand(size).await })
            .await?;
        self.inner.size.store(size, Ordering::SeqCst);
        Ok(())
    }
}

/// Runs `op` over a new connection to `addr` with `timeout`, once the
/// replica has shown that it serves `volume`; the connection is closed after.
pub(super) async fn over_fresh<T, F, Fut>(
    volume: &str,
    addr: &str,
    timeout: Duration,
    op: F,
) -> Result<T, ClientError>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let c = Client::connect_with_timeout(addr, timeout).await?;
    let r = match c.info_of(volume).await {
        Ok(_) => op(c.clone()).await,
        Err(e) => Err(e),
    };
    c.shutdown();
    r
}

/// A replica a write goes to.
struct Target {
    index: usize,
    client: Client,
    read_write: bool,
    metrics: Arc<Handles>,
}

/// The 4 KiB-aligned bounds around `[offset, offset+len)`.
fn block_bounds(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / BLOCK_SIZE * BLOCK_SIZE,
        (offset + len).next_multiple_of(BLOCK_SIZE),
    )
}

impl Inner {
    pub(super) fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        lock(&self.slots)
    }

    /// Every replica that receives writes.
    fn targets(&self) -> Vec<Target> {
        let seq = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mode != Mode::Failed)
            .map(|(i, s)| Target {
                index: i,
                client: s.client(seq),
                read_write: s.mode == Mode::ReadWrite,
                metrics: Arc::clone(&s.metrics),
            })
            .collect()
    }

    /// The read-write replica with the fewest reads in flight (the fastest
    /// one drains its queue soonest and so gets the most), ties broken in
    /// turn.
    fn pick_reader(&self) -> Result<(usize, Client, Arc<Handles>, ReadTicket), Error> {
        let seq = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let slots = self.slots();
        let n = slots.len();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        let i = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| slots[i].mode == Mode::ReadWrite)
            .min_by_key(|&i| slots[i].reads.load(Ordering::Relaxed))
            .ok_or(Error::Faulted)?;
        let s = &slots[i];
        s.reads.fetch_add(1, Ordering::Relaxed);
        let ticket = ReadTicket(Arc::clone(&s.reads));
        Ok((i, s.client(seq), Arc::clone(&s.metrics), ticket))
    }

    /// Fails replica `i` as soon as one of its connections closes, so a
    /// replica that goes away is noticed (and the volume reports itself
    /// degraded) even while no request is under way. Watches the slot's
    /// current connections; a slot filled anew is watched again.
    pub(super) fn watch(self: &Arc<Self>, i: usize) {
        let watches: Vec<_> = self.slots()[i]
            .conns
            .iter()
            .map(Client::close_watch)
            .collect();
        for w in watches {
            let inner = Arc::downgrade(self);
            tokio::spawn(async move {
                w.closed().await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let failed = {
                    // Checked and failed under one lock: a slot filled
                    // anew in between must not be failed for its
                    // predecessor's connection.
                    let mut slots = inner.slots();
                    let s = &mut slots[i];
                    let current = s.conns.iter().any(|c| w.is(c));
                    if current {
                        inner.fail_slot(s, &"connection to replica lost");
                    }
                    current
                };
                if failed {
                    // Record the smaller membership now rather than at the
                    // next write; errors are the next request's to report.
                    let _ = inner.settle_epoch().await;
                }
            });
        }
    }

    /// Takes replica `i` out of the volume.
    pub(super) fn fail(&self, i: usize, e: &dyn std::fmt::Display) {
        self.fail_slot(&mut self.slots()[i], e);
    }

    /// [`fail`](Self::fail) on a slot the caller holds locked.
    fn fail_slot(&self, s: &mut Slot, e: &dyn std::fmt::Display) {
        if s.mode != Mode::Failed {
            tracing::error!(volume.id = %self.name, replica.addr = %s.addr, error = %e, "replica failed");
            let was_member = s.mode == Mode::ReadWrite;
            s.mode = Mode::Failed;
            s.error = Some(e.to_string());
            s.rebuild = None;
            // Stop talking to it at once; in-flight calls fail fast.
            for c in &s.conns {
                c.shutdown();
            }
            if was_member {
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Before acknowledging anything: if the membership changed, the
    /// replicas still in it record a new epoch naming exactly them, so that
    /// a failed replica can never be taken for a current one after a crash.
    pub(super) async fn settle_epoch(&self) -> Result<(), Error> {
        while self.epoch_done.load(Ordering::SeqCst) < self.generation.load(Ordering::SeqCst) {
            let _serial = self.epoch_lock.lock().await;
            let gen = self.generation.load(Ordering::SeqCst);
            if self.epoch_done.load(Ordering::SeqCst) >= gen {
                break;
            }
            let (members, clients): (Vec<String>, Vec<(usize, Client)>) = {
                let slots = self.slots();
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.mode == Mode::ReadWrite)
                    .map(|(i, s)| (s.addr.clone(), (i, s.control())))
                    .unzip()
            };
            if clients.is_empty() {
                return Err(Error::Faulted);
            }
            let next = self.epoch.load(Ordering::SeqCst) + 1;
            let results = join_all(
                clients
                    .iter()
                    .map(|(_, c)| c.set_epoch(next, members.clone())),
            )
            .await;
            for ((i, _), r) in clients.iter().zip(results) {
                if let Err(e) = r {
                    self.fail(*i, &e);
                }
            }
            self.epoch.store(next, Ordering::SeqCst);
            tracing::info!(volume.id = %self.name, epoch = next, members = ?members, "membership recorded");
            self.epoch_done.fetch_max(gen, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Sends the same request to every replica that takes writes, fails
    /// those that err, and settles the epoch. `Ok` only if at least one
    /// read-write replica took it and none still read-write missed it.
    async fn mirror<F, Fut>(&self, kind: Op, bytes: u64, op: F) -> Result<(), Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let targets = self.targets();
        if !targets.iter().any(|t| t.read_write) {
            return Err(Error::Faulted);
        }
        let results = join_all(targets.iter().map(|t| {
            let f = op(t.client.clone());
            async move {
                let start = Instant::now();
                let r = f.await;
                t.metrics.op(kind).record(bytes, start.elapsed(), r.is_ok());
                r
            }
        }))
        .await;
        let mut ok = 0;
        let mut refused = None;
        for (t, r) in targets.iter().zip(results) {
            let (i, rw) = (&t.index, &t.read_write);
            match r {
                Ok(()) => ok += usize::from(*rw),
                // The request itself is bad: every replica says so; do not
                // fail a healthy replica over it.
                Err(ClientError::Remote { kind, message }) if is_request_error(kind) => {
                    refused = Some((kind, message));
                }
                Err(e) => self.fail(*i, &e),
            }
        }
        self.settle_epoch().await?;
        if let Some((kind, message)) = refused {
            return Err(Error::Refused { kind, message });
        }
        if ok == 0 || self.slots().iter().all(|s| s.mode != Mode::ReadWrite) {
            return Err(Error::Faulted);
        }
        Ok(())
    }

    /// Like `mirror`, for control operations: a request error from every
    /// replica is the caller's; from only some, those replicas disagree with
    /// the rest and are failed.
    async fn control_all<F, Fut>(&self, op: F) -> Result<(), Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        self.control_all_over(None, op).await
    }

    /// [`control_all`](Self::control_all); with `fresh`, each replica's call
    /// goes over a new connection with that timeout ([`over_fresh`]), so
    /// that a call far longer than I/O may take never looks like a dead
    /// replica to the I/O path.
    async fn control_all_over<F, Fut>(&self, fresh: Option<Duration>, op: F) -> Result<(), Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let targets: Vec<(usize, Client, String, bool)> = {
            let slots = self.slots();
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.mode != Mode::Failed)
                .map(|(i, s)| (i, s.control(), s.addr.clone(), s.mode == Mode::ReadWrite))
                .collect()
        };
        if !targets.iter().any(|t| t.3) {
            return Err(Error::Faulted);
        }
        let results = join_all(targets.iter().map(|(_, c, addr, _)| {
            let op = &op;
            async move {
                match fresh {
                    None => op(c.clone()).await,
                    Some(t) => over_fresh(&self.name, addr, t, op).await,
                }
            }
        }))
        .await;
        let refusal = |r: &Result<(), ClientError>| match r {
            Err(ClientError::Remote { kind, message }) if is_refusal(*kind) => {
                Some((*kind, message.clone()))
            }
            _ => None,
        };
        if results.iter().all(|r| refusal(r).is_some()) {
            let (kind, message) = refusal(&results[0]).expect("all refused");
            return Err(Error::Refused { kind, message });
        }
        for ((i, ..), r) in targets.iter().zip(results) {
            if let Err(e) = r {
                self.fail(*i, &e);
            }
        }
        self.settle_epoch().await?;
        if self.slots().iter().all(|s| s.mode != Mode::ReadWrite) {
            return Err(Error::Faulted);
        }
        Ok(())
    }

    /// Removes the snapshots `names` (in that order) on every replica: marks
    /// them removed on all, then merges them away on all, each call over a
    /// fresh connection with [`MERGE_TIMEOUT`]. A removal cut short then
    /// leaves a mark on every replica still holding a snapshot, and the next
    /// engine finishes it at open (`startup`) rather than taking replicas
    /// whose chains differ for stale.
    pub(super) async fn remove_snapshots(&self, names: &[String]) -> Result<(), Error> {
        self.control_all_over(Some(MERGE_TIMEOUT), |c| async move {
            for n in names {
                c.mark_removed(n).await?;
            }
            Ok(())
        })
        .await?;
        crate::failpoint!("engine.remove.marked");
        self.control_all_over(Some(MERGE_TIMEOUT), |c| async move {
            for n in names {
                c.remove_snapshot(n).await?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn snapshot_all(
        &self,
        name: &str,
        user_created: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.control_all(|c| {
            let (n, l) = (name.to_owned(), labels.clone());
            async move { c.snapshot_as(&n, user_created, l).await }
        })
        .await
    }

    fn no_rebuild(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        self.rebuilding
            .try_lock()
            .map_err(|_| Error::RebuildInProgress)
    }

    /// Marks the write-intent regions of `[offset, offset+len)` on every
    /// replica (if not marked yet), runs `op`, and ends the regions' use.
    async fn with_intent<T>(
        &self,
        offset: u64,
        len: u64,
        op: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let (rs, unmarked) = {
            let mut it = lock(&self.intent);
            let rs = it.regions(offset, len);
            let unmarked = it.begin(rs.clone());
            (rs, unmarked)
        };
        // While this write is in flight its regions cannot be cleared, so
        // marked here means marked until it ends.
        let marked = if unmarked {
            self.mark_intent(rs.clone()).await
        } else {
            Ok(())
        };
        let r = match marked {
            Ok(()) => op.await,
            Err(e) => Err(e),
        };
        lock(&self.intent).end(rs);
        r
    }

    async fn mark_intent(&self, rs: std::ops::Range<u64>) -> Result<(), Error> {
        loop {
            if lock(&self.intent).all_marked(rs.clone()) {
                return Ok(());
            }
            let _io = self.intent_io.lock().await;
            let (region, add) = {
                let mut it = lock(&self.intent);
                if it.all_marked(rs.clone()) {
                    return Ok(());
                }
                // Our regions may have been taken by a writer whose marking
                // failed; ask again.
                it.want(&rs.clone().collect::<Vec<_>>());
                (it.region_bytes(), it.take_wanted())
            };
            let res = self
                .mirror(Op::intent, 0, |c| {
                    let a = add.clone();
                    async move { c.update_intent(region, a, Vec::new()).await }
                })
                .await;
            let mut it = lock(&self.intent);
            match res {
                Ok(()) => it.marked(&add),
                Err(e) => {
                    it.want(&add);
                    return Err(e);
                }
            }
        }
    }

    pub(super) async fn write_blocks(&self, offset: u64, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        // One checksum for every replica's copy of the frame.
        let crc = crate::replica::wire::payload_crc(&data);
        self.with_intent(offset, len, async {
            self.mirror(Op::write, len, |c| {
                let d = data.clone();
                async move { c.write_crc(offset, d, crc).await }
            })
            .await
        })
        .await
    }

    async fn unmap_blocks(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.with_intent(offset, len, async {
            self.mirror(
                Op::unmap,
                len,
                |c| async move { c.unmap(offset, len).await },
            )
            .await
        })
        .await
    }

    pub(super) async fn flush_all(&self) -> Result<(), Error> {
        let f = lock(&self.intent).start_flush();
        self.mirror(Op::flush, 0, |c| async move { c.flush().await })
            .await?;
        if lock(&self.intent).marked_count() == 0 {
            return Ok(());
        }
        // Hold the intent lock from choosing the regions to clear until the
        // replicas have cleared them: a writer that needs one of them again
        // must re-mark it *after* this clear reaches the replicas, not before.
        let _io = self.intent_io.lock().await;
        let clear = lock(&self.intent).take_clearable(f);
        if !clear.is_empty() {
            let region = lock(&self.intent).region_bytes();
            // A failed clear leaves extra marks: a resync would compare a
            // region more than needed, nothing worse.
            let targets = self.targets();
            let results = join_all(
                targets
                    .iter()
                    .map(|t| t.client.update_intent(region, Vec::new(), clear.clone())),
            )
            .await;
            for e in results.into_iter().filter_map(Result::err) {
                tracing::warn!(volume.id = %self.name, error = %e, "cannot clear write intent");
            }
        }
        Ok(())
    }

    /// Reads whole blocks from one read-write replica, trying the next if
    /// one fails.
    pub(super) async fn read_blocks(&self, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        loop {
            let (i, c, m, _ticket) = self.pick_reader()?;
            let start = Instant::now();
            let r = c.read(offset, len).await;
            m.op(Op::read).record(len, start.elapsed(), r.is_ok());
            match r {
                Ok(data) => return Ok(data),
                Err(ClientError::Remote { kind, message }) if is_request_error(kind) => {
                    return Err(Error::Refused { kind, message })
                }
                Err(e) => self.fail(i, &e),
            }
        }
    }

    /// Holds the blocks `[offset, offset+len)` touches: shared when the
    /// request covers them exactly, exclusive when it covers part of one
    /// (a read-modify-write must not interleave with any write to it).
    /// Returns whether the request is block-aligned.
    async fn lock_blocks(&self, offset: u64, len: u64) -> (bool, RangeGuard<'_>) {
        let (a, b) = block_bounds(offset, len);
        let aligned = a == offset && b == offset + len;
        let guard = self
            .ranges
            .lock(a / BLOCK_SIZE..b / BLOCK_SIZE, !aligned)
            .await;
        (aligned, guard)
    }

    /// Writes `data` at an offset that is not block-aligned: reads the
    /// first and last blocks it touches, merges, and writes whole blocks.
    /// The caller holds those blocks exclusively.
    async fn merge_write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let (a, b) = block_bounds(offset, data.len() as u64);
        let mut buf = BytesMut::zeroed(usize::try_from(b - a).expect("bounded request"));
        let first = self.read_blocks(a, BLOCK_SIZE).await?;
        buf[..first.len()].copy_from_slice(&first);
        if b - a > BLOCK_SIZE {
            let last = self.read_blocks(b - BLOCK_SIZE, BLOCK_SIZE).await?;
            let n = buf.len();
            buf[n - last.len()..].copy_from_slice(&last);
        }
        let at = usize::try_from(offset - a).expect("inside one block");
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_blocks(a, buf.freeze()).await
    }
}
