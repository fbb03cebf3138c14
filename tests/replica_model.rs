//! Property test: random sequences of replica operations, including
//! close-and-reopen, checked against a plain in-memory model of the volume.
//! After every step the whole volume is read back and compared, and the
//! in-memory index is compared with one rebuilt from the files.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::collections::BTreeMap;

use proptest::prelude::*;
use shorthorn::replica::Replica;

mod common;

use common::{content, run_in, Op, BLOCK, BLOCKS, SIZE};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..BLOCKS, 1..8u64).prop_map(|(block, n)| Op::Write { block, count: n.min(BLOCKS - block) }),
        3 => (0..BLOCKS, 1..12u64).prop_map(|(block, n)| Op::Unmap { block, count: n.min(BLOCKS - block) }),
        2 => Just(Op::Snapshot),
        1 => (0..8usize).prop_map(Op::Remove),
        1 => (0..8usize).prop_map(Op::Mark),
        1 => (0..8usize).prop_map(Op::Revert),
        1 => Just(Op::Reopen),
        1 => Just(Op::Flush),
    ]
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    run_in(dir.path(), ops);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn replica_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn unmap_reads_zero_over_snapshot_data_and_frees_unshared_space() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    r.write(0, &content(0, 1)).unwrap();
    r.snapshot("base", true, BTreeMap::new()).unwrap();
    r.write(4 * BLOCK as u64, &vec![7u8; 4 * BLOCK]).unwrap();
    r.flush().unwrap();
    let head_before = r.list().unwrap()[0].allocated_bytes;
    assert!(head_before >= 4 * BLOCK as u64);
    r.unmap(0, 8 * BLOCK as u64).unwrap();
    r.flush().unwrap();
    let mut buf = vec![1u8; 8 * BLOCK];
    r.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Only the block that shadows the snapshot's data stays allocated.
    let head_after = r.list().unwrap()[0].allocated_bytes;
    assert_eq!(
        head_after, BLOCK as u64,
        "head keeps one zero block, frees the rest"
    );
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    use shorthorn::error::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    r.write(0, &content(0, 1)).unwrap();
    let rev = r.revision();
    assert_eq!(
        r.write(512, &[0u8; 4096]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        r.write(0, &[0u8; 100]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        r.write(SIZE, &[0u8; 4096]).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        r.unmap(SIZE - 4096, 8192).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        r.unmap(0, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        r.snapshot("a/b", true, BTreeMap::new()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(r.revert("missing").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        r.remove_snapshot("missing").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        r.expand(SIZE - 4096).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        r.expand(SIZE + 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    assert_eq!(
        r.snapshot("a", true, BTreeMap::new()).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(r.revision(), rev);
    let mut buf = vec![0u8; BLOCK];
    r.read(0, &mut buf).unwrap();
    assert_eq!(buf, content(0, 1));
    drop(r);
    assert_eq!(
        Replica::open(dir.path(), Some(SIZE * 2))
            .unwrap_err()
            .kind(),
        ErrorKind::FailedPrecondition
    );
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        Replica::open(empty.path(), None).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn expand_keeps_data_and_new_space_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    r.write(0, &content(0, 9)).unwrap();
    r.snapshot("before", true, BTreeMap::new()).unwrap();
    r.expand(SIZE * 4).unwrap();
    assert_eq!(r.size(), SIZE * 4);
    r.write(SIZE * 3, &content(BLOCKS * 3, 10)).unwrap();
    let mut buf = vec![0u8; BLOCK];
    r.read(SIZE * 2, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    r.close().unwrap();
    drop(r);
    let r = Replica::open(dir.path(), None).unwrap();
    assert_eq!(r.size(), SIZE * 4);
    r.read(0, &mut buf).unwrap();
    assert_eq!(buf, content(0, 9));
    r.read(SIZE * 3, &mut buf).unwrap();
    assert_eq!(buf, content(BLOCKS * 3, 10));
    r.check_index().unwrap();
}

#[test]
fn a_failed_snapshot_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    r.write(0, &content(0, 1)).unwrap();
    // A directory where the next head file must go makes the snapshot fail
    // after its first steps.
    std::fs::create_dir(dir.path().join("volume-head-001.img")).unwrap();
    assert!(r.snapshot("s", true, BTreeMap::new()).is_err());
    assert!(!dir.path().join("volume-snap-s.img").exists());
    assert!(!dir.path().join("volume-snap-s.img.meta").exists());
    assert_eq!(r.list().unwrap().len(), 1);
    // Writes still land in the head, and the same name works once the obstacle is gone.
    r.write(4096, &content(1, 2)).unwrap();
    std::fs::remove_dir(dir.path().join("volume-head-001.img")).unwrap();
    r.snapshot("s", true, BTreeMap::new()).unwrap();
    r.write(0, &content(0, 3)).unwrap();
    r.revert("s").unwrap();
    let mut buf = vec![0u8; 2 * BLOCK];
    r.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..BLOCK], content(0, 1).as_slice());
    assert_eq!(&buf[BLOCK..], content(1, 2).as_slice());
    r.check_index().unwrap();
}

#[test]
fn a_replica_that_lost_its_volume_meta_is_not_recreated_over() {
    use shorthorn::error::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::open(dir.path(), Some(SIZE)).unwrap();
    r.write(0, &content(0, 1)).unwrap();
    r.close().unwrap();
    drop(r);
    std::fs::remove_file(dir.path().join("volume.meta")).unwrap();
    let e = Replica::open(dir.path(), Some(SIZE)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(dir.path().join("volume-head-000.img").exists());
}
