//! Snapshot chains: a chain of 1,000 snapshots works, reopens, and reading a
//! block that lives in the bottom layer touches that one layer once (the
//! index resolves it in one lookup instead of probing the layers above);
//! removing a snapshot holds no I/O and is refused when the disk lacks room
//! to merge it.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::collections::BTreeMap;
use std::time::Instant;

use shorthorn::replica::Replica;

mod common;

const SNAPSHOTS: u64 = 1000;
const SIZE: u64 = 64 << 20;

fn content(block: u64) -> Vec<u8> {
    let mut b = vec![(block % 253) as u8 + 1; 4096];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

#[test]
fn a_thousand_snapshots_deep_chain() {
    shorthorn::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    // Layer i holds block i: block 0 sits at the very bottom.
    let t = Instant::now();
    for i in 0..SNAPSHOTS {
        r.write(i * 4096, &content(i)).unwrap();
        r.snapshot(&format!("s{i}"), true, BTreeMap::new()).unwrap();
    }
    eprintln!("{SNAPSHOTS} snapshots taken in {:?}", t.elapsed());
    assert_eq!(r.info().chain.len() as u64, SNAPSHOTS + 1);
    // Blocks 0..1000 were written one per layer, adjacent: in the merged index
    // they are distinct entries (different layers), never one per layer probe.
    assert_eq!(r.index_entries() as u64, SNAPSHOTS);

    let before = r.layer_reads();
    let mut buf = vec![0u8; 4096];
    r.read(0, &mut buf).unwrap();
    assert_eq!(buf, content(0));
    let after = r.layer_reads();
    let touched: Vec<(usize, u64)> = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| (i, a - b))
        .collect();
    assert_eq!(touched, vec![(0, 1)], "only the bottom layer is read, once");

    // A read spanning every layer reads each snapshot layer once, in one pass,
    // and not the (empty) head.
    let before = r.layer_reads();
    let mut all = vec![0u8; (SNAPSHOTS * 4096) as usize];
    r.read(0, &mut all).unwrap();
    let per_layer: Vec<u64> = r
        .layer_reads()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert!(
        per_layer[..SNAPSHOTS as usize].iter().all(|&n| n == 1),
        "each snapshot layer read once"
    );
    assert_eq!(
        per_layer[SNAPSHOTS as usize], 0,
        "the empty head is not read"
    );
    for i in 0..SNAPSHOTS {
        assert_eq!(
            &all[(i * 4096) as usize..((i + 1) * 4096) as usize],
            content(i).as_slice()
        );
    }

    // Reopen: the index is rebuilt from 1,001 files.
    r.close().unwrap();
    drop(r);
    let t = Instant::now();
    let r = Replica::open(dir.path(), None).unwrap();
    eprintln!(
        "reopened a {}-layer chain in {:?}",
        SNAPSHOTS + 1,
        t.elapsed()
    );
    r.check_index().unwrap();
    let mut again = vec![0u8; all.len()];
    r.read(0, &mut again).unwrap();
    assert_eq!(again, all);

    // Removing snapshots in the middle and at the bottom changes nothing visible.
    for name in ["s500", "s0", "s999", "s1"] {
        r.remove_snapshot(name).unwrap();
    }
    r.read(0, &mut again).unwrap();
    assert_eq!(again, all);
    assert_eq!(r.info().chain.len() as u64, SNAPSHOTS + 1 - 4);
    r.check_index().unwrap();
}

/// Removing a snapshot whose children are all snapshots merges it into
/// them while writes and reads go on: they are not held for the copy. The
/// merged chain reads back exactly as before, and the head's writes made
/// during the merge are all there.
#[test]
fn removing_a_snapshot_below_another_does_not_hold_io() {
    io_goes_on_while_a_snapshot_merges(false);
}

/// Removing the head's parent merges it into the head a step at a time:
/// I/O waits for one step, not for the merge, and no write made meanwhile
/// is overwritten by the snapshot's older data.
#[test]
fn removing_the_newest_snapshot_does_not_hold_io_nor_undo_writes() {
    io_goes_on_while_a_snapshot_merges(true);
}

/// `old` holds 192 MiB, with 64 blocks overwritten above it (in the head,
/// or in a snapshot `newer` when not `into_head`); `old` is removed while
/// this thread writes 16 MiB of it over and over and reads the rest.
fn io_goes_on_while_a_snapshot_merges(into_head: bool) {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;

    const BIG: u64 = 256 << 20;
    const OLD_BLOCKS: u64 = (192 << 20) / 4096;
    // Written during the merge, over and over: blocks of `old` that the
    // merge reaches after the first writes (it goes bottom up). Few, long
    // extents, so that reloading the index at the end stays quick.
    const WRITTEN: std::ops::Range<u64> = (64 << 20) / 4096..(80 << 20) / 4096;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Replica::open(dir.path(), Some(BIG)).unwrap());
    let chunk = vec![0x5au8; 1 << 20];
    for m in 0..192u64 {
        r.write(m << 20, &chunk).unwrap();
    }
    r.snapshot("old", false, BTreeMap::new()).unwrap();
    for b in 0..64u64 {
        r.write(b * 4096 * 7, &content(b)).unwrap();
    }
    if !into_head {
        r.snapshot("newer", true, BTreeMap::new()).unwrap();
    }
    r.flush().unwrap();
    let before = |b: u64| -> Vec<u8> {
        if b % 7 == 0 && b / 7 < 64 {
            content(b / 7)
        } else if b < OLD_BLOCKS {
            vec![0x5a; 4096]
        } else {
            vec![0; 4096]
        }
    };

    // Where the merge copies to: its allocated size grows as the copy goes,
    // so I/O that completes at a size strictly between the start and the
    // end happened during the copy. The writes below add at most
    // WRITTEN's 16 MiB to the head, which the window leaves out.
    let dst = {
        let layers = r.list().unwrap();
        let l = layers
            .iter()
            .find(|l| if into_head { l.head } else { l.name == "newer" })
            .unwrap();
        dir.path().join(&l.file)
    };
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&dst).unwrap().blocks() * 512
    };
    let slack = (WRITTEN.end - WRITTEN.start) * 4096;
    let at_start = allocated();
    let mut seen = std::collections::BTreeSet::new();

    let started = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let remover = {
        let (r, started, done) = (r.clone(), started.clone(), done.clone());
        std::thread::spawn(move || {
            started.store(true, SeqCst);
            let t = Instant::now();
            let res = r.remove_snapshot("old");
            let took = t.elapsed();
            done.store(true, SeqCst);
            res.map(|()| took)
        })
    };
    while !started.load(SeqCst) {
        std::thread::yield_now();
    }
    let mut written = HashSet::new();
    let mut during = 0u64;
    let mut slowest = std::time::Duration::ZERO;
    let mut buf = vec![0u8; 4096];
    while !done.load(SeqCst) {
        let t = Instant::now();
        let w = WRITTEN.start + during % (WRITTEN.end - WRITTEN.start);
        r.write(w * 4096, &content(w)).unwrap();
        written.insert(w);
        let b = (during * 13) % WRITTEN.start;
        r.read(b * 4096, &mut buf).unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(buf, before(b), "block {b} during the merge");
        seen.insert(allocated());
        during += 1;
    }
    let took = remover.join().unwrap().unwrap();
    let at_end = allocated();
    let amid = seen
        .iter()
        .filter(|a| **a > at_start + slack && **a + slack < at_end)
        .count();
    eprintln!(
        "into_head={into_head}: merge took {took:?}; {during} writes and reads meanwhile, the slowest {slowest:?}; \
         I/O completed at {amid} distinct points of the copy"
    );
    // Held for the copy, I/O would wait for all of it: at most one look at
    // the size could fall inside the copy (between an I/O and the next).
    assert!(
        amid >= 3,
        "I/O was held for the copy: it completed at {amid} points of it"
    );
    let names: Vec<String> = r.list().unwrap().into_iter().map(|l| l.name).collect();
    assert!(!names.contains(&"old".to_owned()), "{names:?}");
    let expect = |b: u64| {
        if written.contains(&b) {
            content(b)
        } else {
            before(b)
        }
    };
    let check = |r: &Replica, when: &str| {
        let mut buf = vec![0u8; 4096];
        for b in (0..OLD_BLOCKS).step_by(97).chain(written.iter().copied()) {
            r.read(b * 4096, &mut buf).unwrap();
            assert_eq!(buf, expect(b), "block {b} {when}");
        }
    };
    check(&r, "after the merge");
    r.check_index().unwrap();
    drop(r);
    let r = Replica::open(dir.path(), None).unwrap();
    check(&r, "after reopening");
}

/// A snapshot whose merge would not fit on the disk is not removed, and the
/// attempt takes nothing: no byte of the disk's free space, no mark, no
/// change to what any layer shows. With room made, the same removal goes.
#[test]
fn removing_a_snapshot_without_room_to_merge_it_is_refused_and_changes_nothing() {
    use shorthorn::error::ErrorKind;
    use shorthorn::replica::Error;

    let disk = common::SmallDisk::new(24 << 20);
    let r = Replica::open(disk.path(), Some(SIZE)).unwrap();
    // "old": 6 MiB; "newer": 2 MiB over it; the head: 1 MiB beside that.
    r.write(0, &vec![1u8; 6 << 20]).unwrap();
    r.snapshot("old", true, BTreeMap::new()).unwrap();
    r.write(0, &vec![2u8; 2 << 20]).unwrap();
    r.snapshot("newer", true, BTreeMap::new()).unwrap();
    r.write(2 << 20, &vec![3u8; 1 << 20]).unwrap();
    r.flush().unwrap();
    let read_all = || {
        let mut buf = vec![0u8; 8 << 20];
        r.read(0, &mut buf).unwrap();
        buf
    };
    let want = read_all();
    disk.fill_leaving(1 << 20);
    let free = || {
        nix::sys::statvfs::statvfs(disk.path())
            .unwrap()
            .blocks_available()
    };
    let layers = || -> Vec<(String, u64, bool)> {
        r.list()
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.allocated_bytes, l.removed))
            .collect()
    };
    // Merging "old" into "newer" needs the 4 MiB "newer" lacks; merging
    // "newer" into the head the 2 MiB the head lacks. 1 MiB is free.
    for (name, needs) in [("old", 4u64 << 20), ("newer", 2 << 20)] {
        let (before, free_before) = (layers(), free());
        match r.remove_snapshot(name) {
            Err(e @ Error::NoRoomToMerge { needed, .. }) => {
                assert_eq!(needed, needs, "{e}");
                assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
                assert!(e.to_string().contains("free disk space"), "{e}");
            }
            other => panic!("removing {name}: {other:?}"),
        }
        assert_eq!(
            layers(),
            before,
            "the refused removal of {name} changed a layer"
        );
        assert_eq!(
            free(),
            free_before,
            "the refused removal of {name} took space"
        );
        assert_eq!(read_all(), want);
    }
    // The volume's own writes still find the space left.
    r.write(4 << 20, &vec![4u8; 256 << 10]).unwrap();
    r.flush().unwrap();
    let want = read_all();
    disk.unfill();
    for name in ["old", "newer"] {
        r.remove_snapshot(name).unwrap();
        assert_eq!(read_all(), want, "after removing {name}");
    }
    assert_eq!(layers().len(), 1, "only the head is left: {:?}", layers());
    r.check_index().unwrap();
}
