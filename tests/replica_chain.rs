//! A chain of 1,000 snapshots: it works, it reopens, and reading a block
//! that lives in the bottom layer touches that one layer once (the index
//! resolves it in one lookup instead of probing the layers above).

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::collections::BTreeMap;
use std::time::Instant;

use shorthorn::replica::Replica;

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
