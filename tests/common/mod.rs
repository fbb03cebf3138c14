//! The model-checked replica workload shared by `tests/replica_model.rs`
//! (random operation sequences from proptest) and `tests/e2e` (the same
//! checks on real ext4 and XFS filesystems).

#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use shorthorn::replica::Replica;

pub const BLOCK: usize = 4096;
pub const BLOCKS: u64 = 48;
pub const SIZE: u64 = BLOCKS * BLOCK as u64;

/// What one block holds in the model: zeros, or the content of write `tag`.
pub type Model = HashMap<u64, u32>;

/// The bytes a write with `tag` puts in `block`: unique per (block, tag) so a
/// misplaced or stale block cannot pass for the right one.
pub fn content(block: u64, tag: u32) -> Vec<u8> {
    let mut b = vec![(tag % 251) as u8 + 1; BLOCK];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..12].copy_from_slice(&tag.to_le_bytes());
    b
}

#[derive(Debug, Clone)]
pub enum Op {
    Write {
        block: u64,
        count: u64,
    },
    Unmap {
        block: u64,
        count: u64,
    },
    Snapshot,
    Remove(usize),
    /// The first step of a removal only (an engine that died after it).
    Mark(usize),
    Revert(usize),
    Reopen,
    Flush,
}

pub fn check(r: &Replica, model: &Model) {
    let mut buf = vec![0u8; SIZE as usize];
    r.read(0, &mut buf).expect("read");
    for b in 0..BLOCKS {
        let got = &buf[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        match model.get(&b) {
            Some(&tag) => assert!(
                got == content(b, tag).as_slice(),
                "block {b}: expected write {tag}"
            ),
            None => assert!(got.iter().all(|&x| x == 0), "block {b}: expected zeros"),
        }
    }
    // A single-block read of each block agrees with the full read.
    for b in [0, BLOCKS / 2, BLOCKS - 1] {
        let mut one = vec![0u8; BLOCK];
        r.read(b * BLOCK as u64, &mut one).expect("read one");
        assert_eq!(one, buf[b as usize * BLOCK..(b as usize + 1) * BLOCK]);
    }
    r.check_index().expect("index matches the files");
}

/// Runs `ops` on a new replica in `parent/replica`, checking every step.
pub fn run_in(parent: &Path, ops: Vec<Op>) {
    let path = parent.join("replica");
    let mut r = Replica::open(&path, Some(SIZE)).expect("create");
    let mut model = Model::new();
    let mut snaps: BTreeMap<String, Model> = BTreeMap::new();
    let mut marked = std::collections::BTreeSet::new();
    let mut tag = 0u32;
    let mut nsnap = 0u32;
    for op in ops {
        match op {
            Op::Write { block, count } => {
                let mut data = Vec::with_capacity(count as usize * BLOCK);
                for b in block..block + count {
                    tag += 1;
                    data.extend(content(b, tag));
                    model.insert(b, tag);
                }
                r.write(block * BLOCK as u64, &data).expect("write");
            }
            Op::Unmap { block, count } => {
                r.unmap(block * BLOCK as u64, count * BLOCK as u64)
                    .expect("unmap");
                for b in block..block + count {
                    model.remove(&b);
                }
            }
            Op::Snapshot => {
                nsnap += 1;
                let name = format!("s{nsnap}");
                r.snapshot(&name, true, BTreeMap::new()).expect("snapshot");
                snaps.insert(name, model.clone());
            }
            Op::Remove(i) => {
                let Some(name) = snaps.keys().nth(i % snaps.len().max(1)).cloned() else {
                    continue;
                };
                r.remove_snapshot(&name).expect("remove");
                snaps.remove(&name);
                marked.remove(&name);
            }
            Op::Mark(i) => {
                let Some(name) = snaps.keys().nth(i % snaps.len().max(1)).cloned() else {
                    continue;
                };
                r.mark_removed(&name).expect("mark removed");
                marked.insert(name);
            }
            Op::Revert(i) => {
                let live: Vec<_> = snaps.iter().filter(|(n, _)| !marked.contains(*n)).collect();
                let Some((name, m)) = live.get(i % live.len().max(1)) else {
                    continue;
                };
                r.revert(name).expect("revert");
                model = (*m).clone();
            }
            Op::Reopen => {
                r.close().expect("close");
                drop(r);
                r = Replica::open(&path, Some(SIZE)).expect("reopen");
            }
            Op::Flush => r.flush().expect("flush"),
        }
        forget_finished(&r, &mut snaps, &mut marked);
        check(&r, &model);
    }
    // A marked snapshot is removed all the same when asked again. Finishing
    // one removal reloads the chain, which may purge other marked snapshots
    // that nothing depends on any more: those are not asked for again.
    while let Some(name) = marked.pop_first() {
        r.remove_snapshot(&name).expect("finishing a removal");
        snaps.remove(&name);
        forget_finished(&r, &mut snaps, &mut marked);
        check(&r, &model);
    }
    // Every snapshot still present shows exactly what it showed when taken,
    // whatever was removed or reverted in between.
    for (name, m) in &snaps {
        r.revert(name).expect("revert to check");
        check(&r, m);
    }
    let listed: Vec<String> = r
        .list()
        .expect("list")
        .into_iter()
        .filter(|l| !l.head)
        .map(|l| l.name)
        .collect();
    let mut want: Vec<String> = snaps.keys().cloned().collect();
    let mut got = listed;
    want.sort();
    got.sort();
    assert_eq!(got, want, "listed snapshots");
}

/// Reloading the chain (at open, after a revert or a removal) finishes the
/// removal of marked snapshots nothing depends on; only marked ones may be
/// gone.
fn forget_finished(
    r: &Replica,
    snaps: &mut BTreeMap<String, Model>,
    marked: &mut std::collections::BTreeSet<String>,
) {
    let listed: Vec<String> = r
        .list()
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    snaps.retain(|name, _| {
        let kept = listed.contains(name);
        assert!(
            kept || marked.contains(name),
            "unmarked snapshot {name} vanished"
        );
        kept
    });
    marked.retain(|name| snaps.contains_key(name));
}

/// A tmpfs of a given size on a new temporary directory, unmounted when
/// dropped: a disk that really fills up (mounting needs root).
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={bytes}").as_str()),
        )
        .expect("mounting a tmpfs (tests run as root)");
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> std::path::PathBuf {
        self.path().join("filler")
    }

    /// Takes all but `keep` bytes of the free space, with a file of its own.
    pub fn fill_leaving(&self, keep: u64) {
        let st = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        let free = st.blocks_available() * st.fragment_size();
        assert!(free > keep, "only {free} bytes free");
        let f = std::fs::File::create(self.filler()).expect("filler");
        nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FallocateFlags::empty(),
            0,
            i64::try_from(free - keep).expect("fits"),
        )
        .expect("fallocate filler");
    }

    /// Gives back what [`Self::fill_leaving`] took.
    pub fn unfill(&self) {
        std::fs::remove_file(self.filler()).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
