//! What the engine needs beyond plain I/O to rebuild and resync replicas:
//! raw access to one snapshot layer, reshaping a rebuilding replica's chain
//! to a healthy one's, view checksums, and the engine record.
//!
//! Filling layers is only allowed while the replica is marked rebuilding
//! (`volume.meta`'s `Rebuilding`): its content is then known incomplete, the
//! engine reads nothing from it, and a crash at any step leaves a replica
//! that opens and is simply rebuilt again. The flag is cleared by
//! [`Replica::finish_rebuild`] only after every layer is synced to disk.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    check_io, head_index, io_err, lock, meta, meta_name, read_in, remove_layer_files, write_meta,
    DiskMeta, EngineRecord, Error, ExtentSet, Layer, Replica, Result, State, BLOCK_SIZE,
    CHECKSUM_CHUNK_BYTES,
};

/// A snapshot as the rebuild source describes it to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Snapshot name.
    pub name: String,
    /// Creation time (RFC 3339), copied from the source.
    pub created: String,
    /// Created at a user's request.
    pub user_created: bool,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub(super) fn read_engine_record(dir: &Path) -> Result<EngineRecord> {
    match std::fs::read(dir.join(meta::ENGINE_RECORD)) {
        Ok(b) => meta::decode_engine(&b).map_err(|e| Error::MetaCorrupt {
            file: meta::ENGINE_RECORD.into(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EngineRecord::default()),
        Err(cause) => Err(Error::MetaIo {
            file: meta::ENGINE_RECORD.into(),
            cause,
        }),
    }
}

impl Replica {
    fn check_rebuilding(st: &State, op: &'static str) -> Result<()> {
        if st.meta.rebuilding {
            Ok(())
        } else {
            Err(Error::NotRebuilding { op })
        }
    }

    /// Position in the chain of snapshot `layer` (never the head).
    fn chain_snapshot(st: &State, layer: &str) -> Result<usize> {
        let file = meta::snap_file_name(layer);
        st.names[..st.names.len() - 1]
            .iter()
            .position(|n| *n == file)
            .ok_or_else(|| Error::NotChainSnapshot {
                layer: layer.into(),
            })
    }

    /// The bytes one layer (a snapshot name or `head`) itself holds at
    /// `offset`, holes and the part past a shorter file reading as zeros.
    pub fn layer_read(&self, layer: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_ok()?;
        let st = self.read_state();
        check_io(offset, buf.len() as u64, st.meta.size)?;
        let (handle, file, _) = self.layer_in(&st, layer)?;
        let len = handle.file_len().map_err(io_err(&file))?;
        let have = usize::try_from(len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        handle
            .read_at(&mut buf[..have], offset)
            .map_err(io_err(&file))?;
        buf[have..].fill(0);
        Ok(())
    }

    /// Writes `data` into snapshot `layer` of a rebuilding replica.
    pub fn layer_write(&self, layer: &str, offset: u64, data: &[u8]) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        Self::check_rebuilding(&st, "layer write")?;
        let blocks = check_io(offset, data.len() as u64, st.meta.size)?;
        let i = Self::chain_snapshot(&st, layer)?;
        let done = st.chain[i].write_at(data, offset);
        st.refresh_layer(i, blocks)?;
        done.map_err(io_err(&st.names[i]))
    }

    /// Punches `[offset, offset+len)` out of snapshot `layer` of a
    /// rebuilding replica.
    pub fn layer_punch(&self, layer: &str, offset: u64, len: u64) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        Self::check_rebuilding(&st, "layer punch")?;
        let blocks = check_io(offset, len, st.meta.size)?;
        let i = Self::chain_snapshot(&st, layer)?;
        let done = st.chain[i].punch_hole(offset, len);
        st.refresh_layer(i, blocks)?;
        done.map_err(io_err(&st.names[i]))
    }

    /// Reshapes a rebuilding replica's chain so that its snapshots below the
    /// head are exactly `want` (bottom first) by name. The last entry must
    /// be the head's current parent: the engine snapshots source and target
    /// together before calling this. Layers that are kept keep their data
    /// (the layer-by-layer diff then copies little); missing ones are created
    /// empty; every other snapshot in the directory is deleted.
    ///
    /// Each step is one atomic metadata write or an unlink of a layer off the
    /// active chain, so a crash between steps leaves a replica that opens;
    /// calling this again finishes the job.
    pub fn set_chain(&self, want: &[SnapshotSpec]) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        Self::check_rebuilding(&st, "set chain")?;
        for s in want {
            meta::validate_snapshot_name(&s.name).map_err(Error::InvalidName)?;
        }
        let want_files: Vec<String> = want.iter().map(|s| meta::snap_file_name(&s.name)).collect();
        let h = st.names.len() - 1;
        let Some(top) = want_files.last() else {
            return Err(Error::BadChain(
                "a rebuild chain has at least one snapshot".into(),
            ));
        };
        if h == 0 || st.names[h - 1] != *top {
            return Err(Error::BadChain(format!(
                "the head's parent is {:?}, not {top:?}",
                st.names.get(h.wrapping_sub(1)).map_or("", String::as_str)
            )));
        }
        let mut uniq = want_files.clone();
        uniq.sort();
        uniq.dedup();
        if uniq.len() != want_files.len() {
            return Err(Error::BadChain("a snapshot appears twice".into()));
        }
        let top_file = top.clone();
        let keep = st.names[..h - 1]
            .iter()
            .zip(&want_files)
            .take_while(|(a, b)| a == b)
            .count();
        let base = if keep == 0 {
            String::new()
        } else {
            want_files[keep - 1].clone()
        };
        let steps = (|| -> Result<()> {
            let needs_reshape = keep != want_files.len() - 1 || h - 1 != keep;
            if needs_reshape {
                // 1. Hang the top snapshot directly on the kept base: every layer
                //    between them leaves the active chain.
                self.reparent(&st, &top_file, &base)?;
            }
            // 2. Delete every layer not on the (new) active chain.
            let on_chain: Vec<String> = st.names[..keep]
                .iter()
                .cloned()
                .chain([top_file.clone(), st.meta.head.clone()])
                .collect();
            for f in st.disks.keys() {
                if !on_chain.contains(f) {
                    remove_layer_files(&self.dir, f)?;
                }
            }
            let mut parent = st.disks[&top_file].parent.clone();
            if needs_reshape {
                // 3. Create the missing layers as a branch off the base, bottom up.
                parent = base.clone();
                for (spec, file) in want[keep..want.len() - 1]
                    .iter()
                    .zip(&want_files[keep..want.len() - 1])
                {
                    let _ = std::fs::remove_file(self.dir.join(file));
                    Layer::create(&self.dir.join(file), st.meta.size).map_err(io_err(file))?;
                    let m = DiskMeta {
                        name: file.clone(),
                        parent: parent.clone(),
                        removed: false,
                        user_created: spec.user_created,
                        created: spec.created.clone(),
                        labels: (!spec.labels.is_empty()).then(|| spec.labels.clone()),
                    };
                    write_meta(&self.dir, &meta_name(file), &meta::encode_disk(&m))?;
                    parent = file.clone();
                }
            }
            // 4. Commit: the top snapshot sits on the new branch, with the
            //    source's creation time and labels.
            let spec = want.last().expect("checked non-empty");
            let mut tm = st.disks[&top_file].clone();
            tm.parent = parent;
            tm.created = spec.created.clone();
            tm.user_created = spec.user_created;
            tm.labels = (!spec.labels.is_empty()).then(|| spec.labels.clone());
            write_meta(&self.dir, &meta_name(&top_file), &meta::encode_disk(&tm))?;
            Ok(())
        })();
        // Whatever happened on disk, the state is re-read from it.
        let reloaded = self.reload(&mut st);
        steps.and(reloaded)
    }

    fn reparent(&self, st: &State, file: &str, parent: &str) -> Result<()> {
        let mut m = st.disks[file].clone();
        m.parent = parent.to_owned();
        write_meta(&self.dir, &meta_name(file), &meta::encode_disk(&m))
    }

    /// Ends a rebuild: syncs every layer of the chain, rebuilds the index
    /// from the files, then clears the rebuilding flag (the commit).
    pub fn finish_rebuild(&self) -> Result<()> {
        self.check_ok()?;
        let _shape = lock(&self.structure);
        let mut st = self.write_state();
        Self::check_rebuilding(&st, "finish rebuild")?;
        for (l, n) in st.chain.iter().zip(&st.names) {
            l.sync().map_err(io_err(n))?;
        }
        self.reload(&mut st)?;
        let mut vm = st.meta.clone();
        vm.rebuilding = false;
        self.commit_volume_meta(&vm)?;
        st.meta = vm;
        Ok(())
    }

    /// CRC32C of the volume's content (what reads return) over
    /// `[offset, offset+len)`.
    pub fn checksum(&self, offset: u64, len: u64) -> Result<u32> {
        self.check_ok()?;
        let st = self.read_state();
        check_io(offset, len, st.meta.size)?;
        let mut crc = 0;
        let mut buf = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(CHECKSUM_CHUNK_BYTES);
            buf.resize(usize::try_from(n).expect("chunk fits memory"), 0);
            read_in(&st, at, &mut buf, false)?;
            crc = crc32c::crc32c_append(crc, &buf);
            at += n;
        }
        Ok(crc)
    }

    /// Records a new membership epoch (durably).
    pub fn set_epoch(&self, epoch: u64, members: Vec<String>) -> Result<()> {
        self.update_engine_record(|r| {
            r.epoch = epoch;
            r.members = members;
        })
    }

    /// Adds and removes write-intent regions (durably). A changed region
    /// size replaces the whole set.
    pub fn update_intent(&self, region_bytes: u64, add: &[u64], remove: &[u64]) -> Result<()> {
        self.update_engine_record(|r| {
            if r.region_bytes != region_bytes {
                r.intent.clear();
                r.region_bytes = region_bytes;
            }
            for x in remove {
                r.intent.remove(x);
            }
            r.intent.extend(add.iter().copied());
        })
    }

    fn update_engine_record(&self, f: impl FnOnce(&mut EngineRecord)) -> Result<()> {
        self.check_ok()?;
        let mut cur = lock(&self.engine);
        let mut next = cur.clone();
        f(&mut next);
        if next != *cur {
            write_meta(&self.dir, meta::ENGINE_RECORD, &meta::encode_engine(&next))?;
            *cur = next;
        }
        Ok(())
    }
}

impl State {
    /// After layer `i` changed within `blocks`: re-reads which blocks it now
    /// holds there and brings its extent set, the union below the head and
    /// the view back in line with the files.
    fn refresh_layer(&mut self, i: usize, blocks: Range<u64>) -> Result<()> {
        let found = self.chain[i]
            .scan_extents_in(blocks.start * BLOCK_SIZE..blocks.end * BLOCK_SIZE)
            .map_err(io_err(&self.names[i]))?;
        self.extents[i].remove(blocks.clone());
        for r in found.ranges() {
            self.extents[i].add(r);
        }
        let mut lower = ExtentSet::new();
        for es in &self.extents {
            for (r, ()) in es.overlapping(blocks.clone()) {
                lower.add(r);
            }
        }
        self.lower.remove(blocks.clone());
        for r in lower.ranges() {
            self.lower.add(r);
        }
        let h = self.chain.len() - 1;
        let mut view = lock(&self.view);
        let head: Vec<Range<u64>> = view
            .overlapping(blocks.clone())
            .into_iter()
            .filter(|(_, l)| *l as usize == h)
            .map(|(r, _)| r)
            .collect();
        view.remove(blocks.clone());
        for (j, es) in self.extents.iter().enumerate() {
            for (r, ()) in es.overlapping(blocks.clone()) {
                view.insert(r, head_index(j));
            }
        }
        for r in head {
            view.insert(r, head_index(h));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests {
    use super::*;

    fn block(tag: u8) -> Vec<u8> {
        vec![tag; BLOCK_SIZE as usize]
    }

    fn spec(name: &str) -> SnapshotSpec {
        SnapshotSpec {
            name: name.into(),
            created: meta::now_rfc3339(),
            user_created: true,
            labels: BTreeMap::new(),
        }
    }

    fn active_snapshots(r: &Replica) -> Vec<String> {
        let mut v: Vec<String> = r
            .list()
            .unwrap()
            .into_iter()
            .filter(|l| l.active && !l.head)
            .map(|l| l.name)
            .collect();
        v.reverse();
        v
    }

    /// A stale replica whose chain shares only its bottom with the source's
    /// is reshaped, filled layer by layer the way the engine does it, and
    /// then reads exactly like the source, layers included.
    #[test]
    fn a_reshaped_and_filled_chain_matches_the_source() {
        let size = 64 * BLOCK_SIZE;
        let (sd, dd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let src = Replica::open(sd.path(), Some(size)).unwrap();
        let dst = Replica::open(dd.path(), Some(size)).unwrap();
        src.write(0, &block(1)).unwrap();
        dst.write(0, &block(1)).unwrap();
        src.snapshot("a", true, BTreeMap::new()).unwrap();
        dst.snapshot("a", true, BTreeMap::new()).unwrap();
        src.write(BLOCK_SIZE, &block(2)).unwrap();
        src.snapshot("b", true, BTreeMap::new()).unwrap();
        dst.write(2 * BLOCK_SIZE, &block(9)).unwrap();
        dst.snapshot("x", true, BTreeMap::new()).unwrap();
        src.write(0, &block(3)).unwrap();
        src.snapshot("c", true, BTreeMap::new()).unwrap();
        dst.snapshot("c", true, BTreeMap::new()).unwrap();
        // Live writes after the rebuild snapshot land in both heads.
        src.write(5 * BLOCK_SIZE, &block(5)).unwrap();
        dst.set_rebuilding(true).unwrap();
        dst.write(5 * BLOCK_SIZE, &block(5)).unwrap();

        assert!(matches!(
            src.set_chain(&[spec("a"), spec("b"), spec("c")]),
            Err(Error::NotRebuilding { .. })
        ));
        assert!(matches!(
            dst.set_chain(&[spec("a")]),
            Err(Error::BadChain(_))
        ));
        dst.set_chain(&[spec("a"), spec("b"), spec("c")]).unwrap();
        assert_eq!(active_snapshots(&dst), ["a", "b", "c"]);
        assert!(!dd.path().join(meta::snap_file_name("x")).exists());
        // Idempotent: a repeat after a crash finds nothing to do.
        dst.set_chain(&[spec("a"), spec("b"), spec("c")]).unwrap();

        for name in ["a", "b", "c"] {
            dst.layer_punch(name, 0, size).unwrap();
            let page = src.extents(name, 0, usize::MAX).unwrap();
            for e in page.extents {
                let mut buf = vec![0u8; e.len as usize];
                src.layer_read(name, e.offset, &mut buf).unwrap();
                dst.layer_write(name, e.offset, &buf).unwrap();
            }
            assert_eq!(
                src.extents(name, 0, usize::MAX).unwrap(),
                dst.extents(name, 0, usize::MAX).unwrap(),
                "layer {name}"
            );
        }
        dst.check_index().unwrap();
        dst.finish_rebuild().unwrap();
        assert!(!dst.info().rebuilding);
        let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        assert!(a == b, "rebuilt replica reads differently");
        drop(dst);
        let reopened = Replica::open(dd.path(), None).unwrap();
        reopened.read(0, &mut b).unwrap();
        assert!(a == b, "rebuilt replica reads differently after reopen");
    }

    #[test]
    fn unmap_while_rebuilding_shadows_layers_still_to_fill() {
        let size = 16 * BLOCK_SIZE;
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path(), Some(size)).unwrap();
        r.snapshot("s", false, BTreeMap::new()).unwrap();
        r.set_rebuilding(true).unwrap();
        r.unmap(0, BLOCK_SIZE).unwrap();
        // The snapshot below gets its data only now.
        r.layer_write("s", 0, &block(7)).unwrap();
        let mut buf = block(1);
        r.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "trimmed block shows old data");
        r.check_index().unwrap();
    }
}
