//! The replica proper: one volume's chain of layer files in one directory.
//!
//! Invariants (checked by `tests/replica_model.rs` against a plain model):
//! - `State::view` maps every block to the topmost layer of the active chain
//!   holding it; blocks in no layer read as zeros.
//! - `State::extents[i]` is exactly the data extents of snapshot layer `i` of
//!   the active chain; the head's extents are the view's entries whose value is
//!   the head's index (nothing shadows the head).
//! - `State::lower` is the union of the snapshot layers' extents.
//! - Snapshot files never change content as seen through the chain; only
//!   `remove_snapshot` copies a parent's data into a child's holes, which does
//!   not change what the child's view reads.
//!
//! Crash safety: data is only acknowledged durable by [`Replica::flush`]
//! (fsync of the head). Every metadata change is a sequence of steps whose one
//! commit point is an atomic rename of `volume.meta` or a `.img.meta`; the
//! leftovers of an interrupted sequence are recognised and cleaned at open
//! (`State::load`). See `docs/format.md` for each operation's step list.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::extents::{ExtentSet, View, BLOCK_SIZE};
use super::layer::{self, Layer};
use super::meta::{self, DiskMeta, EngineRecord, VolumeMeta};
use super::{Error, Result};
use crate::units::{check_extent, ExtentError};

/// Chunk size of the per-extent checksums [`Replica::extents`] reports.
/// Chunks are aligned in volume space, so two replicas holding the same data
/// report the same chunk list whatever their files' fragmentation.
pub const CHECKSUM_CHUNK_BYTES: u64 = 1 << 20;

/// Most bytes of labels (keys plus values) one snapshot may carry; keeps
/// `list` answers small whatever users attach.
pub const MAX_LABEL_BYTES: usize = 4096;

/// Largest single copy `remove_snapshot` issues while merging layers.
const MERGE_COPY_BYTES: u64 = 1 << 20;

/// One replica of one volume, open for I/O.
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    state: RwLock<State>,
    /// Incremented by every write and unmap; persisted at each flush.
    revision: AtomicU64,
    /// Serialises writers of `revision.counter` and remembers what is on disk.
    persisted_revision: Mutex<u64>,
    /// Set when a commit's outcome is unknown; the replica then refuses
    /// everything until reopened.
    failed: Mutex<Option<String>>,
    /// The engine record as on disk (`shorthorn.engine`); the mutex also
    /// serialises its writers.
    engine: Mutex<EngineRecord>,
    /// Held, always before `state`, by the operations that could undo or
    /// race a merge into snapshot layers: remove, revert and the rebuild
    /// steps that reshape the chain or write its snapshots. It keeps them
    /// out while `remove_snapshot` merges into snapshot layers without
    /// `state`. Taking a snapshot and expanding need not wait: they touch
    /// only the head.
    structure: Mutex<()>,
    /// The volume this replica was started for, when its server was told
    /// (`--volume`); callers that name a volume are checked against it.
    volume: Option<String>,
}

mod rebuild;
pub use rebuild::SnapshotSpec;

#[derive(Debug)]
struct State {
    meta: VolumeMeta,
    /// Active chain, bottom first; the last entry is the head.
    chain: Vec<Arc<Layer>>,
    /// File names parallel to `chain`.
    names: Vec<String>,
    /// Data extents of each snapshot layer of the chain (`chain.len() - 1` entries).
    extents: Vec<ExtentSet>,
    /// Union of `extents`: blocks some snapshot below the head holds.
    lower: ExtentSet,
    view: Mutex<View>,
    /// Metadata of every layer file in the directory, on the chain or not.
    disks: BTreeMap<String, DiskMeta>,
    /// Sequence number for the next head file.
    next_head: u32,
}

/// A layer as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// Snapshot name, or the head's file name for the head.
    pub name: String,
    /// File name in the replica directory.
    pub file: String,
    /// Parent's file name; empty at the bottom.
    pub parent: String,
    /// Children's file names.
    pub children: Vec<String>,
    /// True for the live head.
    pub head: bool,
    /// True when the layer is on the active chain (reachable from the head).
    pub active: bool,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Created at a user's request.
    pub user_created: bool,
    /// A removal was started and did not finish (a crash); removing it
    /// again completes it.
    pub removed: bool,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
}

/// Summary of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaInfo {
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size recorded in `volume.meta`.
    pub sector_size: u64,
    /// Active chain file names, head first.
    pub chain: Vec<String>,
    /// Writes and unmaps applied since creation.
    pub revision: u64,
    /// Opened by a writer and not cleanly closed.
    pub dirty: bool,
    /// Marked as the target of an unfinished rebuild.
    pub rebuilding: bool,
    /// What the engine recorded here: epoch, members, write intent.
    pub engine: EngineRecord,
}

/// One checksummed chunk of a layer's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtentChecksum {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes (at most [`CHECKSUM_CHUNK_BYTES`], never crossing a chunk boundary).
    pub len: u64,
    /// CRC32C of the chunk's bytes in that layer.
    pub crc32c: u32,
}

/// A page of a layer's extents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtentPage {
    /// The chunks, in offset order.
    pub extents: Vec<ExtentChecksum>,
    /// Offset to ask for next, absent when the layer has no more data.
    pub next: Option<u64>,
}

fn io_err(file: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let file = file.into();
    move |cause| Error::LayerIo { file, cause }
}

fn meta_name(file: &str) -> String {
    format!("{file}.meta")
}

impl Replica {
    /// Opens the replica in `dir`. With `create_size`, creates an empty replica
    /// of that size when the directory holds none, and checks the size of an
    /// existing one.
    pub fn open(dir: &Path, create_size: Option<u64>) -> Result<Self> {
        let meta_path = dir.join(meta::VOLUME_META);
        let exists = meta_path.try_exists().map_err(|cause| Error::OpenReplica {
            dir: dir.to_path_buf(),
            cause,
        })?;
        if !exists {
            let size = create_size.ok_or_else(|| Error::NoReplica {
                dir: dir.to_path_buf(),
            })?;
            Self::create(dir, size)?;
        }
        let state = State::load(dir, true)?;
        if let Some(want) = create_size {
            if want != state.meta.size {
                return Err(Error::SizeMismatch {
                    dir: dir.to_path_buf(),
                    actual: state.meta.size,
                    requested: want,
                });
            }
        }
        let rev = read_revision(dir)?;
        let engine = rebuild::read_engine_record(dir)?;
        let r = Self {
            dir: dir.to_path_buf(),
            state: RwLock::new(state),
            revision: AtomicU64::new(rev),
            persisted_revision: Mutex::new(rev),
            failed: Mutex::new(None),
            engine: Mutex::new(engine),
            structure: Mutex::new(()),
            volume: None,
        };
        r.set_flags(|m| m.dirty = true)?;
        Ok(r)
    }

    /// Names the volume this replica serves, so that callers naming another
    /// one are refused ([`Self::check_volume`]).
    #[must_use]
    pub fn for_volume(mut self, volume: &str) -> Self {
        self.volume = Some(volume.to_owned());
        self
    }

    /// Refuses a caller working for another volume than this replica's.
    /// A replica not told its volume accepts every caller.
    pub fn check_volume(&self, asked: &str) -> Result<()> {
        match &self.volume {
            Some(serving) if serving != asked => Err(Error::WrongVolume {
                asked: asked.to_owned(),
                serving: serving.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn create(dir: &Path, size: u64) -> Result<()> {
        check_size(size)?;
        let open_err = |cause| Error::OpenReplica {
            dir: dir.to_path_buf(),
            cause,
        };
        fs::create_dir_all(dir).map_err(open_err)?;
        if let Some(parent) = crate::parent_dir(dir) {
            meta::sync_dir(parent).map_err(open_err)?;
        }
        let head = meta::head_file_name(0);
        // Without volume.meta, the only layer files we may find are those of
        // a creation that crashed before its commit: an unwritten first head.
        // Anything else is a replica that lost its volume.meta, and creating
        // over it would throw its data away.
        for e in fs::read_dir(dir).map_err(open_err)? {
            let name = e.map_err(open_err)?.file_name();
            let name = name.to_string_lossy();
            let leftover = name == head || name == meta_name(&head);
            if name.starts_with("volume-") && !leftover {
                return Err(Error::MetaCorrupt {
                    file: meta::VOLUME_META.into(),
                    reason: format!("missing, yet layer file {name} exists; refusing to create a new replica over it"),
                });
            }
        }
        if let Ok(l) = Layer::open(&dir.join(&head)) {
            if l.allocated_bytes().map_err(io_err(&head))? != 0 {
                return Err(Error::MetaCorrupt {
                    file: meta::VOLUME_META.into(),
                    reason: format!(
                        "missing, yet {head} holds data; refusing to create a new replica over it"
                    ),
                });
            }
        }
        create_head(dir, &head, "", size)?;
        write_meta(dir, meta::REVISION_COUNTER, &meta::encode_revision(0))?;
        let vm = VolumeMeta {
            size,
            head,
            dirty: false,
            rebuilding: false,
            error: String::new(),
            parent: String::new(),
            sector_size: 512,
            backing_file_path: String::new(),
            encrypted: false,
        };
        crate::failpoint!("create.before-commit");
        // volume.meta last: it is what makes the directory a replica.
        write_meta(dir, meta::VOLUME_META, &meta::encode_volume(&vm))
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.read_state().meta.size
    }

    /// The revision counter (writes and unmaps applied).
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock would be a bug elsewhere; the state
        // itself is only ever replaced whole, so it stays usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, shared, unless a snapshot operation holds it.
    fn try_read_state(&self) -> Option<std::sync::RwLockReadGuard<'_, State>> {
        match self.state.try_read() {
            Ok(st) => Some(st),
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        }
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `buf.len()` bytes at `offset` (both 4 KiB-aligned).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_ok()?;
        let st = self.read_state();
        read_in(&st, offset, buf, false).map(|_| ())
    }

    /// [`read`](Self::read) for callers that must not block (an async
    /// executor thread): `None` when it would have to wait, for the state
    /// lock (a snapshot operation under way) or for the disk (data not in the
    /// page cache); `buf` then holds nothing useful.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if let Err(e) = self.check_ok() {
            return Some(Err(e));
        }
        let st = self.try_read_state()?;
        match read_in(&st, offset, buf, true) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Writes `data` at `offset` (both 4 KiB-aligned) into the head.
    /// Durable once a later [`flush`](Self::flush) returns.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_ok()?;
        let st = self.read_state();
        self.write_in(&st, offset, data)
    }

    /// [`write`](Self::write) unless a snapshot operation holds the state
    /// lock, in which case `None` and nothing was written. The write itself
    /// goes to the page cache and may still wait on dirty-page throttling.
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        if let Err(e) = self.check_ok() {
            return Some(Err(e));
        }
        let st = self.try_read_state()?;
        Some(self.write_in(&st, offset, data))
    }

    fn write_in(&self, st: &State, offset: u64, data: &[u8]) -> Result<()> {
        let blocks = check_io(offset, data.len() as u64, st.meta.size)?;
        let h = st.chain.len() - 1;
        if let Err(e) = st.chain[h].write_at(data, offset) {
            // Part of the data may have landed; make the index say what the
            // file now holds before reporting the failure.
            st.resync_head(blocks);
            return Err(Error::LayerIo {
                file: st.names[h].clone(),
                cause: e,
            });
        }
        crate::failpoint!("write.data-written");
        lock(&st.view).insert(blocks, head_index(h));
        self.revision.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Trims `[offset, offset+len)`: it reads back as zeros afterwards. Where
    /// no snapshot holds data the head's space is given back (hole punched);
    /// where a snapshot does, the head shadows it with written zeros. While
    /// rebuilding, the snapshots below are still being filled, so the head
    /// always shadows with zeros.
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.check_ok()?;
        let st = self.write_state();
        let blocks = check_io(offset, len, st.meta.size)?;
        let h = st.chain.len() - 1;
        let head = &st.chain[h];
        let mut view = lock(&st.view);
        let shadow_all = st.meta.rebuilding;
        for (r, below) in st.lower.segments(blocks.clone()) {
            let (off, n) = (r.start * BLOCK_SIZE, (r.end - r.start) * BLOCK_SIZE);
            let done = if below.is_some() || shadow_all {
                write_zeros(head, off, n).map(|()| view.insert(r, head_index(h)))
            } else {
                head.punch_hole(off, n).map(|()| view.remove(r))
            };
            if let Err(e) = done {
                drop(view);
                st.resync_head(blocks);
                return Err(Error::LayerIo {
                    file: st.names[h].clone(),
                    cause: e,
                });
            }
        }
        self.revision.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every write and unmap that returned before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.check_ok()?;
        // Read before syncing: the counter saved must not claim a write that
        // finished during the sync and so may not be covered by it.
        let covered = self.revision.load(Ordering::SeqCst);
        {
            let st = self.read_state();
            let h = st.chain.len() - 1;
            st.chain[h].sync().map_err(io_err(&st.names[h]))?;
        }
        crate::failpoint!("flush.synced");
        self.persist_revision(covered)
    }

    fn persist_revision(&self, now: u64) -> Result<()> {
        let mut on_disk = lock(&self.persisted_revision);
        if *on_disk < now {
            write_meta(
                &self.dir,
                meta::REVISION_COUNTER,
                &meta::encode_revision(now),
            )?;
            *on_disk = now;
        }
        Ok(())
    }

    /// Writes `volume.meta`, a commit point. If that fails we cannot know
    /// whether the rename reached the disk, so the in-memory state may no
    /// longer match it: the replica refuses all further requests until it is
    /// reopened from what is on disk.
    fn commit_volume_meta(&self, vm: &VolumeMeta) -> Result<()> {
        write_meta(&self.dir, meta::VOLUME_META, &meta::encode_volume(vm))
            .map_err(|e| self.poison(e))
    }

    /// Replaces the in-memory state with one loaded from the directory after
    /// a committed change; failing to, the replica is poisoned.
    fn reload(&self, st: &mut State) -> Result<()> {
        match State::load(&self.dir, false) {
            Ok(fresh) => {
                *st = fresh;
                Ok(())
            }
            Err(e) => Err(self.poison(e)),
        }
    }

    /// Marks the replica failed; every later request gets [`Error::Failed`].
    fn poison(&self, e: Error) -> Error {
        tracing::error!(error = %e, "replica state no longer trusted; reopen it");
        *lock(&self.failed) = Some(e.to_string());
        e
    }

    fn check_ok(&self) -> Result<()> {
        match &*lock(&self.failed) {
            None => Ok(()),
            Some(reason) => Err(Error::Failed {
                reason: reason.clone(),
            }),
        }
    }

    /// Turns the head into the immutable snapshot `name` and starts a new,
    /// empty head on top of it. Waits for in-flight I/O (they hold the state
    /// lock shared) and holds new I/O until done.
    pub fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.check_ok()?;
        meta::validate_snapshot_name(name).map_err(Error::InvalidName)?;
        let label_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        if label_bytes > MAX_LABEL_BYTES {
            return Err(Error::LabelsTooLarge {
                bytes: label_bytes,
                max: MAX_LABEL_BYTES,
            });
        }
        let mut st = self.write_state();
        let snap = meta::snap_file_name(name);
        if st.disks.contains_key(&snap) || self.dir.join(&snap).exists() {
            return Err(Error::SnapshotExists { name: name.into() });
        }
        let h = st.chain.len() - 1;
        let old_head = st.names[h].clone();
        st.chain[h].sync().map_err(io_err(&old_head))?;
        self.persist_revision(self.revision())?;

        let new_head = meta::head_file_name(st.next_head);
        let prepared = (|| -> Result<(Layer, DiskMeta, DiskMeta)> {
            // 1. The snapshot is a second name for the head's inode, with its
            //    meta. Until step 3 commits, open() treats it as garbage (same
            //    inode as the head).
            fs::hard_link(self.dir.join(&old_head), self.dir.join(&snap)).map_err(io_err(&snap))?;
            crate::failpoint!("snapshot.linked");
            let parent = st
                .disks
                .get(&old_head)
                .map_or_else(|| st.meta.parent.clone(), |m| m.parent.clone());
            let snap_meta = DiskMeta {
                name: old_head.clone(),
                parent,
                removed: false,
                user_created,
                created: meta::now_rfc3339(),
                labels: (!labels.is_empty()).then_some(labels),
            };
            write_meta(&self.dir, &meta_name(&snap), &meta::encode_disk(&snap_meta))?;
            crate::failpoint!("snapshot.meta-written");
            // 2. A new, empty head whose parent is the snapshot.
            let (layer, head_meta) = create_head(&self.dir, &new_head, &snap, st.meta.size)?;
            crate::failpoint!("snapshot.head-created");
            Ok((layer, snap_meta, head_meta))
        })();
        let (layer, snap_meta, head_meta) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Nothing committed: take back what was made so that the
                // directory holds no half-made snapshot.
                let _ = remove_layer_files(&self.dir, &snap);
                let _ = remove_layer_files(&self.dir, &new_head);
                return Err(e);
            }
        };

        // 3. Commit: volume.meta names the new head.
        let mut vm = st.meta.clone();
        vm.head = new_head.clone();
        vm.parent = snap.clone();
        self.commit_volume_meta(&vm)?;
        crate::failpoint!("snapshot.committed");

        // In memory: the head's extents become the snapshot's.
        let head_set = st.head_extents();
        for r in head_set.ranges() {
            st.lower.add(r);
        }
        st.extents.push(head_set);
        st.names[h] = snap.clone();
        st.chain.push(Arc::new(layer));
        st.names.push(new_head.clone());
        st.disks.remove(&old_head);
        st.disks.insert(snap, snap_meta);
        st.disks.insert(new_head, head_meta);
        st.meta = vm;
        st.next_head += 1;
        drop(st);
        // 4. Drop the old head's names; the snapshot name keeps the inode.
        //    Failing here leaves only leftovers that open() removes.
        if let Err(e) = remove_layer_files(&self.dir, &old_head) {
            tracing::warn!(error = %e, "old head left behind; removed at next open");
        }
        Ok(())
    }

    /// Marks snapshot `name` removed, the first step of its removal. The
    /// engine marks a snapshot on every replica before it removes it on any
    /// (`engine::volume`), so that a removal cut short anywhere leaves a mark
    /// on every replica whose chain still holds the snapshot, and the next
    /// engine finishes the removal instead of taking those replicas for stale.
    pub fn mark_removed(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        self.mark_removed_locked(&mut st, name).map(drop)
    }

    fn mark_removed_locked(&self, st: &mut State, name: &str) -> Result<DiskMeta> {
        let snap = meta::snap_file_name(name);
        let Some(mut smeta) = st.disks.get(&snap).cloned() else {
            return Err(Error::SnapshotNotFound { name: name.into() });
        };
        if !smeta.removed {
            smeta.removed = true;
            write_meta(&self.dir, &meta_name(&snap), &meta::encode_disk(&smeta))?;
            st.disks.insert(snap, smeta.clone());
        }
        crate::failpoint!("remove.marked");
        Ok(smeta)
    }

    /// Removes snapshot `name`: its data is merged into each child's holes so
    /// that nothing any child shows changes, then its files are deleted.
    ///
    /// I/O waits only for one step of a merge into the head and while the
    /// chain's shape changes. A merge into a child snapshot runs without the
    /// state lock: a reader resolves blocks top-down and already sees,
    /// through each child's holes, exactly the bytes copied into them, and
    /// `structure` keeps out every operation that could change a snapshot
    /// layer or the set of children meanwhile. A merge into the head goes
    /// 1 MiB at a time ([`Self::merge_into_head`]).
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let (src, src_set) = self.merge_source(name)?;
        let mut st = self.write_state();
        // 1. Mark it removed: if we crash after re-parenting the children,
        //    open() finishes the job instead of resurrecting it.
        let smeta = self.mark_removed_locked(&mut st, name)?;
        let snap = meta::snap_file_name(name);
        let size = st.meta.size;
        let children = children_of(&st, &snap);
        let head = st.meta.head.clone();
        let head_layer = Arc::clone(st.chain.last().expect("chain has a head"));
        drop(st);
        // 2. Copy what each child does not shadow, then make it durable.
        let mut buf = Vec::new();
        for child in &children {
            let dst = if *child == head {
                self.merge_into_head(&src, &src_set, &head_layer, &mut buf)
                    .map_err(io_err(child))?;
                Arc::clone(&head_layer)
            } else {
                let dst = Arc::new(Layer::open(&self.dir.join(child)).map_err(io_err(child))?);
                let dst_set = dst.scan_extents(size).map_err(io_err(child))?;
                for r in src_set.ranges() {
                    copy_holes(&src, r, &dst, &dst_set, &mut buf).map_err(io_err(child))?;
                }
                dst
            };
            dst.sync().map_err(io_err(child))?;
            crate::failpoint!("remove.copied");
        }
        let mut st = self.write_state();
        // A snapshot taken during the merge renamed the head the merge wrote
        // into (same inode, so merged and synced all the same): the children
        // are read again under the lock.
        let children = children_of(&st, &snap);
        // 3. Commit, child by child: it now descends from our parent.
        for child in &children {
            let mut cm = st.disks[child].clone();
            cm.parent = smeta.parent.clone();
            if let Err(e) = write_meta(&self.dir, &meta_name(child), &meta::encode_disk(&cm)) {
                return Err(self.poison(e));
            }
            if *child == st.meta.head {
                let mut vm = st.meta.clone();
                vm.parent = smeta.parent.clone();
                self.commit_volume_meta(&vm)?;
            }
            crate::failpoint!("remove.child-committed");
        }
        // 4. Nothing refers to it any more.
        if let Err(e) = remove_layer_files(&self.dir, &snap) {
            tracing::warn!(error = %e, "removed snapshot's files left behind; removed at next open");
        }
        crate::failpoint!("remove.unlinked");
        self.reload(&mut st)
    }

    /// Snapshot `name`'s layer and extents, for merging it into its
    /// children; refused when they lack more of its blocks than the disk
    /// has free. A merge that ran out of space half way would fail all the
    /// same, after taking the last free bytes from the volume's own writes.
    /// The head's share is counted as it is now; writes meanwhile only
    /// shrink it. Called with `structure` held, so the snapshot and its
    /// children stay as they are.
    fn merge_source(&self, name: &str) -> Result<(Layer, ExtentSet)> {
        let snap = meta::snap_file_name(name);
        let (children, head, head_layer, size) = {
            let st = self.read_state();
            if !st.disks.contains_key(&snap) {
                return Err(Error::SnapshotNotFound { name: name.into() });
            }
            let head_layer = Arc::clone(st.chain.last().expect("chain has a head"));
            (
                children_of(&st, &snap),
                st.meta.head.clone(),
                head_layer,
                st.meta.size,
            )
        };
        let src = Layer::open(&self.dir.join(&snap)).map_err(io_err(&snap))?;
        let src_set = src.scan_extents(size).map_err(io_err(&snap))?;
        let mut needed = 0;
        for child in &children {
            let child_set = if *child == head {
                head_layer.scan_extents(size)
            } else {
                Layer::open(&self.dir.join(child)).and_then(|l| l.scan_extents(size))
            }
            .map_err(io_err(child))?;
            let holes: u64 = src_set
                .ranges()
                .flat_map(|r| child_set.holes(r))
                .map(|h| h.end - h.start)
                .sum();
            needed += holes * BLOCK_SIZE;
        }
        if needed == 0 {
            return Ok((src, src_set));
        }
        let fs = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| io_err(self.dir.display().to_string())(e.into()))?;
        let free = fs.blocks_available() * fs.fragment_size();
        if needed > free {
            return Err(Error::NoRoomToMerge {
                name: name.into(),
                needed,
                free,
            });
        }
        Ok((src, src_set))
    }

    /// Copies what `src` holds into the holes of `head`, 1 MiB at a time.
    /// Each step reads `src` (a snapshot: it does not change) without the
    /// state lock, then, under it, looks afresh at which blocks the head
    /// holds and writes only the holes, so nothing written meanwhile is
    /// overwritten. I/O waits for one step's writes, never for the merge,
    /// and the unlocked read between steps lets waiting I/O in (re-taking
    /// the lock at once would starve it). Until the removal commits, reads
    /// of copied blocks still resolve to `src`: the same bytes.
    fn merge_into_head(
        &self,
        src: &Layer,
        src_set: &ExtentSet,
        head: &Layer,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        let step = MERGE_COPY_BYTES / BLOCK_SIZE;
        let at = |block: u64| usize::try_from(block * BLOCK_SIZE).expect("<= 1 MiB");
        for r in src_set.ranges() {
            let mut b = r.start;
            while b < r.end {
                let e = r.end.min(b + step);
                buf.resize(at(e - b), 0);
                src.read_at(buf, b * BLOCK_SIZE)?;
                let _st = self.write_state();
                let held = head.scan_extents_in(b * BLOCK_SIZE..e * BLOCK_SIZE)?;
                for hole in held.holes(b..e) {
                    head.write_at(
                        &buf[at(hole.start - b)..at(hole.end - b)],
                        hole.start * BLOCK_SIZE,
                    )?;
                }
                b = e;
            }
        }
        Ok(())
    }

    /// Discards the head and starts a new, empty one on top of snapshot
    /// `name`. Snapshots newer than `name` stay, off the active chain.
    pub fn revert(&self, name: &str) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        let snap = meta::snap_file_name(name);
        match st.disks.get(&snap) {
            Some(m) if m.removed => return Err(Error::SnapshotRemoving { name: name.into() }),
            Some(_) => {}
            None => return Err(Error::SnapshotNotFound { name: name.into() }),
        }
        // The chain below the target must be whole before we commit to it.
        walk_chain(&st.disks, &snap)?;
        let old_head = st.meta.head.clone();
        let new_head = meta::head_file_name(st.next_head);
        if let Err(e) = create_head(&self.dir, &new_head, &snap, st.meta.size) {
            let _ = remove_layer_files(&self.dir, &new_head);
            return Err(e);
        }
        crate::failpoint!("revert.head-created");
        let mut vm = st.meta.clone();
        vm.head = new_head;
        vm.parent = snap;
        self.commit_volume_meta(&vm)?;
        crate::failpoint!("revert.committed");
        if let Err(e) = remove_layer_files(&self.dir, &old_head) {
            tracing::warn!(error = %e, "old head left behind; removed at next open");
        }
        self.reload(&mut st)?;
        self.revision.fetch_add(1, Ordering::SeqCst);
        drop(st);
        self.persist_revision(self.revision())
    }

    /// Grows the volume to `new_size` bytes. Shrinking is refused.
    pub fn expand(&self, new_size: u64) -> Result<()> {
        self.check_ok()?;
        check_size(new_size)?;
        let mut st = self.write_state();
        if new_size < st.meta.size {
            return Err(Error::Shrink {
                size: st.meta.size,
                requested: new_size,
            });
        }
        if new_size == st.meta.size {
            return Ok(());
        }
        let h = st.chain.len() - 1;
        st.chain[h]
            .set_len(new_size)
            .map_err(io_err(&st.names[h]))?;
        st.chain[h].sync().map_err(io_err(&st.names[h]))?;
        let mut vm = st.meta.clone();
        vm.size = new_size;
        crate::failpoint!("expand.resized");
        self.commit_volume_meta(&vm)?;
        st.meta = vm;
        Ok(())
    }

    /// Sets or clears the `rebuilding` flag (durably).
    pub fn set_rebuilding(&self, rebuilding: bool) -> Result<()> {
        self.set_flags(|m| m.rebuilding = rebuilding)
    }

    fn set_flags(&self, f: impl FnOnce(&mut VolumeMeta)) -> Result<()> {
        self.check_ok()?;
        let mut st = self.write_state();
        let mut vm = st.meta.clone();
        f(&mut vm);
        if vm != st.meta {
            self.commit_volume_meta(&vm)?;
            st.meta = vm;
        }
        Ok(())
    }

    /// Flushes and marks the replica cleanly closed.
    pub fn close(&self) -> Result<()> {
        self.flush()?;
        self.set_flags(|m| m.dirty = false)
    }

    /// Size, chain, revision and flags.
    pub fn info(&self) -> ReplicaInfo {
        let st = self.read_state();
        ReplicaInfo {
            size: st.meta.size,
            sector_size: st.meta.sector_size,
            chain: st.names.iter().rev().cloned().collect(),
            revision: self.revision(),
            dirty: st.meta.dirty,
            rebuilding: st.meta.rebuilding,
            engine: lock(&self.engine).clone(),
        }
    }

    /// Every layer in the directory, active chain first (head down), then the
    /// off-chain snapshots by name.
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        self.check_ok()?;
        let st = self.read_state();
        let mut order: Vec<String> = st.names.iter().rev().cloned().collect();
        order.extend(st.disks.keys().filter(|f| !st.names.contains(f)).cloned());
        let mut out = Vec::with_capacity(order.len());
        for file in order {
            let Some(m) = st.disks.get(&file) else {
                continue;
            };
            let allocated = fs::metadata(self.dir.join(&file))
                .map(|md| layer::allocated_bytes(&md))
                .map_err(io_err(&file))?;
            out.push(LayerInfo {
                name: meta::parse_snap_file_name(&file)
                    .map(str::to_owned)
                    .unwrap_or_else(|| file.clone()),
                parent: m.parent.clone(),
                children: st
                    .disks
                    .iter()
                    .filter(|(_, c)| c.parent == file)
                    .map(|(f, _)| f.clone())
                    .collect(),
                head: file == st.meta.head,
                active: st.names.contains(&file),
                created: m.created.clone(),
                user_created: m.user_created,
                removed: m.removed,
                allocated_bytes: allocated,
                labels: m.labels.clone().unwrap_or_default(),
                file,
            });
        }
        Ok(out)
    }

    /// The data extents of one layer (a snapshot name, or `head`), cut into
    /// chunk-aligned pieces with a CRC32C each, starting at byte `from`, at
    /// most `max` pieces.
    pub fn extents(&self, layer: &str, from: u64, max: usize) -> Result<ExtentPage> {
        self.check_ok()?;
        let st = self.read_state();
        let (handle, file, set) = self.layer_in(&st, layer)?;
        let chunk = CHECKSUM_CHUNK_BYTES / BLOCK_SIZE;
        let start = from / BLOCK_SIZE;
        let mut page = ExtentPage {
            extents: Vec::new(),
            next: None,
        };
        let mut buf = Vec::new();
        for r in set.ranges() {
            let mut b = r.start.max(start);
            while b < r.end {
                if page.extents.len() >= max {
                    page.next = Some(b * BLOCK_SIZE);
                    return Ok(page);
                }
                let e = r.end.min((b / chunk + 1) * chunk);
                let len = (e - b) * BLOCK_SIZE;
                buf.resize(usize::try_from(len).expect("chunk fits memory"), 0);
                handle
                    .read_at(&mut buf, b * BLOCK_SIZE)
                    .map_err(io_err(&file))?;
                page.extents.push(ExtentChecksum {
                    offset: b * BLOCK_SIZE,
                    len,
                    crc32c: crc32c::crc32c(&buf),
                });
                b = e;
            }
        }
        Ok(page)
    }

    /// One layer by name (a snapshot name, or `head`): its handle, file name
    /// and data extents. Off-chain snapshots are opened and scanned.
    fn layer_in(&self, st: &State, layer: &str) -> Result<(Arc<Layer>, String, ExtentSet)> {
        let file = if layer == "head" {
            st.meta.head.clone()
        } else {
            meta::snap_file_name(layer)
        };
        if let Some(i) = st.names.iter().position(|n| *n == file) {
            let set = if i + 1 == st.chain.len() {
                st.head_extents()
            } else {
                st.extents[i].clone()
            };
            Ok((Arc::clone(&st.chain[i]), file, set))
        } else if st.disks.contains_key(&file) {
            let l = Layer::open(&self.dir.join(&file)).map_err(io_err(&file))?;
            let s = l.scan_extents(st.meta.size).map_err(io_err(&file))?;
            Ok((Arc::new(l), file, s))
        } else {
            Err(Error::SnapshotNotFound { name: layer.into() })
        }
    }

    /// Reads served by each layer of the active chain (bottom first) since
    /// it was opened.
    pub fn layer_reads(&self) -> Vec<u64> {
        self.read_state()
            .chain
            .iter()
            .map(|l| l.read_count())
            .collect()
    }

    /// Rebuilds the index from the layer files and compares it with the one
    /// kept in memory; `Err` describes the first difference. An online fsck
    /// for the index, used by the tests after every operation.
    pub fn check_index(&self) -> Result<(), String> {
        let st = self.read_state();
        let files = build_index(&st.chain, &st.names, st.meta.size).map_err(|e| e.to_string())?;
        if let Some(i) = (0..files.extents.len()).find(|&i| files.extents[i] != st.extents[i]) {
            return Err(format!("extents of {} differ from its file", st.names[i]));
        }
        if files.lower != st.lower {
            return Err("union of snapshot extents is stale".into());
        }
        let mem = lock(&st.view);
        if *mem != files.view {
            let a: Vec<_> = mem.iter().collect();
            let b: Vec<_> = files.view.iter().collect();
            return Err(format!("view differs: memory {a:?} files {b:?}"));
        }
        Ok(())
    }

    /// Number of entries in the merged block index.
    pub fn index_entries(&self) -> usize {
        lock(&self.read_state().view).len()
    }
}

impl State {
    /// The head's data extents: the view's entries that name the head
    /// (nothing shadows the head, so they are exactly its data).
    fn head_extents(&self) -> ExtentSet {
        let h = self.chain.len() - 1;
        let mut set = ExtentSet::new();
        for (r, l) in lock(&self.view).iter() {
            if l as usize == h {
                set.add(r);
            }
        }
        set
    }

    /// Re-reads which blocks of `blocks` the head file holds and makes the
    /// view agree, after a failed write or unmap left the file's content
    /// unknown. If even that fails the view keeps its old entries for the
    /// range and the error is logged; `check_index` would report it.
    fn resync_head(&self, blocks: Range<u64>) {
        let h = self.chain.len() - 1;
        let found =
            self.chain[h].scan_extents_in(blocks.start * BLOCK_SIZE..blocks.end * BLOCK_SIZE);
        match found {
            Ok(set) => {
                let mut view = lock(&self.view);
                view.remove(blocks.clone());
                // The snapshots bottom up, then whatever the head holds on top.
                for (i, es) in self.extents.iter().enumerate() {
                    for (r, ()) in es.overlapping(blocks.clone()) {
                        view.insert(r, head_index(i));
                    }
                }
                for r in set.ranges() {
                    view.insert(r, head_index(h));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot re-read head extents after a failed write")
            }
        }
    }

    /// Reads the directory, finishes or discards whatever an interrupted
    /// operation left, and builds the index from the layer files.
    fn load(dir: &Path, at_open: bool) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<u8>> {
            fs::read(dir.join(name)).map_err(|cause| Error::MetaIo {
                file: name.into(),
                cause,
            })
        };
        let vm =
            meta::decode_volume(&read(meta::VOLUME_META)?).map_err(|e| Error::MetaCorrupt {
                file: meta::VOLUME_META.into(),
                reason: e.to_string(),
            })?;
        if !vm.backing_file_path.is_empty() || vm.encrypted {
            return Err(Error::Unsupported(
                "Longhorn backing images and encrypted replicas are not supported".into(),
            ));
        }
        check_filesystem(dir)?;
        let head = Layer::open(&dir.join(&vm.head)).map_err(io_err(&vm.head))?;
        let head_id = head.identity().map_err(io_err(&vm.head))?;
        // Every layer file is opened once, here, and the chain takes its
        // handles from this map.
        let mut opened: HashMap<String, Layer> = HashMap::new();

        let mut files: Vec<String> = Vec::new();
        let entries = fs::read_dir(dir).map_err(|cause| Error::OpenReplica {
            dir: dir.to_path_buf(),
            cause,
        })?;
        for e in entries {
            let e = e.map_err(|cause| Error::OpenReplica {
                dir: dir.to_path_buf(),
                cause,
            })?;
            if let Some(n) = e.file_name().to_str() {
                files.push(n.to_owned());
            }
        }
        let mut changed = false;
        let mut next_head = 0u32;
        let mut disks = BTreeMap::new();
        for f in &files {
            if f.starts_with('.') && f.ends_with(".tmp") {
                if !at_open {
                    // Possibly a concurrent flush's revision.counter in the making.
                    continue;
                }
                // An atomic write that never reached its rename.
                let _ = fs::remove_file(dir.join(f));
                changed = true;
                continue;
            }
            if let Some(n) = meta::parse_head_file_name(f) {
                next_head = next_head.max(n + 1);
                if *f != vm.head {
                    // A head superseded by a snapshot or revert that committed,
                    // or a new head whose operation never committed.
                    remove_layer_files(dir, f)?;
                    changed = true;
                }
                continue;
            }
            if meta::parse_snap_file_name(f).is_some() {
                let l = Layer::open(&dir.join(f)).map_err(io_err(f))?;
                if l.identity().map_err(io_err(f))? == head_id {
                    // A snapshot whose creation never committed.
                    remove_layer_files(dir, f)?;
                    changed = true;
                    continue;
                }
                match fs::read(dir.join(meta_name(f))) {
                    Ok(bytes) => {
                        let m = meta::decode_disk(&bytes).map_err(|e| Error::MetaCorrupt {
                            file: meta_name(f),
                            reason: e.to_string(),
                        })?;
                        disks.insert(f.clone(), m);
                        opened.insert(f.clone(), l);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        tracing::warn!(file = %f, "snapshot file without metadata ignored");
                    }
                    Err(cause) => {
                        return Err(Error::MetaIo {
                            file: meta_name(f),
                            cause,
                        })
                    }
                }
            }
        }
        let head_meta = match fs::read(dir.join(meta_name(&vm.head))) {
            Ok(b) => meta::decode_disk(&b).map_err(|e| Error::MetaCorrupt {
                file: meta_name(&vm.head),
                reason: e.to_string(),
            })?,
            Err(_) => DiskMeta {
                name: vm.head.clone(),
                parent: vm.parent.clone(),
                removed: false,
                user_created: false,
                created: String::new(),
                labels: None,
            },
        };
        disks.insert(vm.head.clone(), head_meta);
        opened.insert(vm.head.clone(), head);

        // Finish interrupted removals: removed snapshots nothing depends on.
        loop {
            let orphan = disks
                .iter()
                .find(|(f, m)| m.removed && !disks.values().any(|c| c.parent == **f));
            let Some((f, _)) = orphan else { break };
            let f = f.clone();
            remove_layer_files(dir, &f)?;
            disks.remove(&f);
            changed = true;
        }

        // The active chain, bottom first.
        let mut names = walk_chain(&disks, &vm.head)?;
        names.reverse();
        let mut chain = Vec::with_capacity(names.len());
        for n in &names {
            let layer = opened.remove(n).ok_or_else(|| Error::ChainBroken {
                layer: vm.head.clone(),
                parent: n.clone(),
            })?;
            chain.push(Arc::new(layer));
        }
        let size = vm.size;
        let Index {
            extents,
            lower,
            view,
        } = build_index(&chain, &names, size)?;
        let h = chain.last().expect("chain has a head");
        if h.file_len().map_err(io_err(&vm.head))? < size {
            // An expansion whose volume.meta commit happened but not the resize
            // is impossible (resize first); this covers files copied sparsely short.
            h.set_len(size).map_err(io_err(&vm.head))?;
        }
        if changed {
            meta::sync_dir(dir).map_err(|cause| Error::MetaIo {
                file: ".".into(),
                cause,
            })?;
        }
        Ok(Self {
            meta: vm,
            chain,
            names,
            extents,
            lower,
            view: Mutex::new(view),
            disks,
            next_head,
        })
    }
}

/// The index trusts `SEEK_DATA` to report exactly the 4 KiB blocks written.
/// A filesystem allocating in larger units would report data where none was
/// written, hiding older snapshots' blocks; refuse it rather than misread.
fn check_filesystem(dir: &Path) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| Error::OpenReplica {
        dir: dir.to_path_buf(),
        cause: e.into(),
    })?;
    let unit = st.fragment_size();
    if unit == 0 || unit > BLOCK_SIZE || BLOCK_SIZE % unit != 0 {
        return Err(Error::Unsupported(format!(
            "the filesystem under {} allocates in units of {unit} bytes; shorthorn needs 4096 or a divisor of it",
            dir.display()
        )));
    }
    Ok(())
}

/// Resolves `[offset, offset+len)` through the view and reads each segment
/// from the layer holding it. With `nowait`, returns `Ok(false)` as soon as a
/// segment is not in the page cache.
fn read_in(st: &State, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool> {
    let blocks = check_io(offset, buf.len() as u64, st.meta.size)?;
    let segs = lock(&st.view).segments(blocks.clone());
    for (r, layer) in segs {
        let lo = usize::try_from((r.start - blocks.start) * BLOCK_SIZE).expect("fits buf");
        let hi = usize::try_from((r.end - blocks.start) * BLOCK_SIZE).expect("fits buf");
        let Some(i) = layer else {
            buf[lo..hi].fill(0);
            continue;
        };
        let i = i as usize;
        let at = r.start * BLOCK_SIZE;
        if nowait {
            if !st.chain[i]
                .read_cached(&mut buf[lo..hi], at)
                .map_err(io_err(&st.names[i]))?
            {
                return Ok(false);
            }
        } else {
            st.chain[i]
                .read_at(&mut buf[lo..hi], at)
                .map_err(io_err(&st.names[i]))?;
        }
    }
    Ok(true)
}

/// The layer `start` and its ancestors, `start` first, following the parent
/// links in `disks`; fails on a missing parent or a cycle.
fn walk_chain(disks: &BTreeMap<String, DiskMeta>, start: &str) -> Result<Vec<String>> {
    let mut names = vec![start.to_owned()];
    let mut cur = disks
        .get(start)
        .map(|m| m.parent.clone())
        .unwrap_or_default();
    while !cur.is_empty() {
        if names.len() > disks.len() {
            return Err(Error::MetaCorrupt {
                file: meta_name(start),
                reason: "the parent links form a cycle".into(),
            });
        }
        let Some(m) = disks.get(&cur) else {
            return Err(Error::ChainBroken {
                layer: names.last().cloned().unwrap_or_default(),
                parent: cur,
            });
        };
        names.push(cur.clone());
        cur = m.parent.clone();
    }
    Ok(names)
}

/// The index of a chain, read from its files.
struct Index {
    /// Data extents of each snapshot layer (all but the head).
    extents: Vec<ExtentSet>,
    /// Their union.
    lower: ExtentSet,
    /// Block -> topmost layer holding it.
    view: View,
}

/// Scans every layer of `chain` (bottom first) with SEEK_DATA and builds
/// its index; `names` are the layers' file names, for errors.
fn build_index(chain: &[Arc<Layer>], names: &[String], size: u64) -> Result<Index> {
    if u32::try_from(chain.len()).is_err() {
        return Err(Error::Unsupported("chain too long".into()));
    }
    let mut index = Index {
        extents: Vec::with_capacity(chain.len()),
        lower: ExtentSet::new(),
        view: View::new(),
    };
    for (i, (layer, name)) in chain.iter().zip(names).enumerate() {
        let set = layer.scan_extents(size).map_err(io_err(name))?;
        for r in set.ranges() {
            index.view.insert(r, head_index(i));
        }
        if i + 1 < chain.len() {
            for r in set.ranges() {
                index.lower.add(r);
            }
            index.extents.push(set);
        }
    }
    Ok(index)
}

fn head_index(h: usize) -> u32 {
    u32::try_from(h).expect("chain length is bounded by u32 at load")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % BLOCK_SIZE != 0 {
        return Err(Error::BadSize { size });
    }
    Ok(())
}

/// Validates an I/O request and returns its block range.
fn check_io(offset: u64, len: u64, size: u64) -> Result<Range<u64>> {
    match check_extent(offset, len, size, BLOCK_SIZE) {
        Ok(()) => Ok(offset / BLOCK_SIZE..(offset + len) / BLOCK_SIZE),
        Err(ExtentError::Misaligned) => Err(Error::Misaligned { offset, len }),
        Err(ExtentError::PastEnd) => Err(Error::ExtentOutOfRange { offset, len, size }),
    }
}

fn read_revision(dir: &Path) -> Result<u64> {
    match fs::read(dir.join(meta::REVISION_COUNTER)) {
        Ok(b) => meta::decode_revision(&b).map_err(|e| Error::MetaCorrupt {
            file: meta::REVISION_COUNTER.into(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(cause) => Err(Error::MetaIo {
            file: meta::REVISION_COUNTER.into(),
            cause,
        }),
    }
}

fn write_meta(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    meta::write_atomic(dir, name, bytes).map_err(|cause| Error::MetaIo {
        file: name.into(),
        cause,
    })
}

/// Creates an empty head file `name` of `size` bytes whose parent is
/// `parent`, and its `.meta`, both durable. Not yet a commit: nothing names it.
fn create_head(dir: &Path, name: &str, parent: &str, size: u64) -> Result<(Layer, DiskMeta)> {
    // A file of this name can only be a leftover of an attempt that failed
    // before its commit.
    let _ = fs::remove_file(dir.join(name));
    let layer = Layer::create(&dir.join(name), size).map_err(io_err(name))?;
    let m = DiskMeta {
        name: name.to_owned(),
        parent: parent.to_owned(),
        removed: false,
        user_created: false,
        created: meta::now_rfc3339(),
        labels: None,
    };
    write_meta(dir, &meta_name(name), &meta::encode_disk(&m))?;
    Ok((layer, m))
}

/// Deletes a layer file and its `.meta`, then makes the deletion durable.
fn remove_layer_files(dir: &Path, file: &str) -> Result<()> {
    for f in [file.to_owned(), meta_name(file)] {
        match fs::remove_file(dir.join(&f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(cause) => return Err(Error::MetaIo { file: f, cause }),
        }
    }
    meta::sync_dir(dir).map_err(|cause| Error::MetaIo {
        file: ".".into(),
        cause,
    })
}

fn write_zeros(layer: &Layer, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        layer.write_at(
            &ZEROS[..usize::try_from(n).expect("<= 64 KiB")],
            offset + done,
        )?;
        done += n;
    }
    Ok(())
}

/// Copies the blocks of `r` (block numbers) that `dst_set` lacks from `src`
/// into `dst`, at most [`MERGE_COPY_BYTES`] per read, through `buf`.
fn copy_holes(
    src: &Layer,
    r: Range<u64>,
    dst: &Layer,
    dst_set: &ExtentSet,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let step = MERGE_COPY_BYTES / BLOCK_SIZE;
    for hole in dst_set.holes(r) {
        let mut b = hole.start;
        while b < hole.end {
            let e = hole.end.min(b + step);
            buf.resize(usize::try_from((e - b) * BLOCK_SIZE).expect("<= 1 MiB"), 0);
            src.read_at(buf, b * BLOCK_SIZE)?;
            dst.write_at(buf, b * BLOCK_SIZE)?;
            b = e;
        }
    }
    Ok(())
}

/// File names of the layers whose parent is `snap`.
fn children_of(st: &State, snap: &str) -> Vec<String> {
    st.disks
        .iter()
        .filter(|(_, m)| m.parent == snap)
        .map(|(f, _)| f.clone())
        .collect()
}
