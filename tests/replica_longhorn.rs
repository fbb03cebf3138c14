//! A replica directory written by the real Longhorn v1 engine opens in
//! shorthorn and reads back, at the head and at each snapshot, the exact bytes
//! Longhorn's engine read (SHA-256 over the whole volume).

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use shorthorn::replica::Replica;

const HEAD: &str = "eb23efeb67ece599f76c71519d600465134d047491826d7e1b848c2204a5a33e";
const SNAP_A: &str = "f0aa68cc4194825b24371a4f12b7d8d8ab342b38b6d7de4b97666ec1ad141a1a";
const SNAP_B: &str = "2ec66d7b25549cbfee41ea209327d79b9f9048310d08034907881795a8019aae";

fn unpack(dest: &Path) {
    let tarball =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/longhorn-v1-replica.tar.gz");
    let st = Command::new("tar")
        .arg("--sparse")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(dest)
        .status()
        .expect("tar is needed to unpack the fixture");
    assert!(st.success(), "unpacking {}", tarball.display());
}

fn volume_sha256(r: &Replica) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < r.size() {
        r.read(off, &mut buf).expect("read");
        h.update(&buf);
        off += buf.len() as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn longhorn_v1_replica_reads_back_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    unpack(dir.path());
    let r = Replica::open(dir.path(), None).expect("open Longhorn replica");
    assert_eq!(r.size(), 256 << 20);
    let info = r.info();
    assert_eq!(
        info.chain,
        vec![
            "volume-head-002.img",
            "volume-snap-snap-b.img",
            "volume-snap-snap-a.img"
        ]
    );
    assert_eq!(info.revision, 4);
    r.check_index().unwrap();
    assert_eq!(volume_sha256(&r), HEAD, "head view");

    // Reopening after our own clean close still reads the same.
    r.close().unwrap();
    drop(r);
    let r = Replica::open(dir.path(), Some(256 << 20)).unwrap();
    assert_eq!(volume_sha256(&r), HEAD, "head view after reopen");

    r.revert("snap-b").unwrap();
    assert_eq!(volume_sha256(&r), SNAP_B, "snap-b view");
    r.revert("snap-a").unwrap();
    assert_eq!(volume_sha256(&r), SNAP_A, "snap-a view");
}

#[test]
fn longhorn_v1_snapshot_removal_keeps_the_head_view() {
    let dir = tempfile::tempdir().unwrap();
    unpack(dir.path());
    let r = Replica::open(dir.path(), None).unwrap();
    r.remove_snapshot("snap-b").unwrap();
    assert_eq!(volume_sha256(&r), HEAD);
    r.remove_snapshot("snap-a").unwrap();
    assert_eq!(volume_sha256(&r), HEAD);
    assert_eq!(r.info().chain, vec!["volume-head-002.img"]);
    r.check_index().unwrap();
}
