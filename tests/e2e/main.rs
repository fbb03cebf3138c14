//! End-to-end tests that need root: they make real filesystems on loop
//! devices (`truncate`, `losetup`, `mkfs.*`, `mount`). `scripts/test` runs
//! them as root after installing xfsprogs; without root or the tools they
//! fail with a message saying what is missing, never skip.
//!
//! The replica trusts `SEEK_DATA`/`SEEK_HOLE` to report exactly the 4 KiB
//! blocks it wrote. Kubernetes nodes keep replicas on ext4 or XFS, with
//! various block and cluster sizes, so the model-checked workload of
//! `tests/replica_model.rs` runs here on each of them, and a chain of
//! snapshots is reopened from each.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

#[path = "../cluster/mod.rs"]
mod cluster;
mod csi;
mod fuse;

use std::path::{Path, PathBuf};
use std::process::Command;

use cluster::common::{self, run_in, Op, BLOCKS};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is needed by the e2e tests ({e}); run scripts/test, which installs it")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn require_root() {
    assert!(
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "the e2e tests need root (losetup, mount); run scripts/test as root"
    );
}

/// A filesystem made on a loop device over a sparse image, mounted at
/// `mnt`; unmounted and detached when dropped.
struct Fs {
    _dir: tempfile::TempDir,
    dev: String,
    mnt: PathBuf,
}

impl Fs {
    fn make(mkfs: &str, args: &[&str]) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run("truncate", &["-s", "2G", img.to_str().unwrap()]);
        let dev = run("losetup", &["-f", "--show", img.to_str().unwrap()]);
        let mut a: Vec<&str> = args.to_vec();
        a.push(&dev);
        run(mkfs, &a);
        run("mount", &[&dev, mnt.to_str().unwrap()]);
        Self {
            _dir: dir,
            dev,
            mnt,
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A fixed pseudo-random workload over every operation, long enough to
/// cross snapshots, removals, reverts and reopens many times.
fn workload(seed: u64, len: usize) -> Vec<Op> {
    let mut x = seed;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    (0..len)
        .map(|_| match next(17) {
            0..=7 => {
                let block = next(BLOCKS);
                Op::Write {
                    block,
                    count: (1 + next(8)).min(BLOCKS - block),
                }
            }
            8..=10 => {
                let block = next(BLOCKS);
                Op::Unmap {
                    block,
                    count: (1 + next(12)).min(BLOCKS - block),
                }
            }
            11 | 12 => Op::Snapshot,
            13 => Op::Remove(next(8) as usize),
            14 => Op::Revert(next(8) as usize),
            15 => Op::Reopen,
            _ => Op::Flush,
        })
        .collect()
}

fn replica_on(mkfs: &str, args: &[&str]) {
    let fs = Fs::make(mkfs, args);
    for seed in 1..=4u64 {
        let dir = fs.mnt.join(format!("run{seed}"));
        std::fs::create_dir(&dir).unwrap();
        run_in(&dir, workload(seed * 0x9e37_79b9, 150));
    }
    chain_reopens(&fs.mnt);
}

/// 100 snapshots, each holding one block, reopened: every block back.
fn chain_reopens(parent: &Path) {
    use shorthorn::replica::Replica;
    let dir = parent.join("chain");
    let size = 4u64 << 20;
    let r = Replica::open(&dir, Some(size)).unwrap();
    for i in 0..100u64 {
        r.write(i * 4096, &common::content(i, i as u32 + 1))
            .unwrap();
        r.snapshot(&format!("s{i}"), true, Default::default())
            .unwrap();
    }
    r.close().unwrap();
    drop(r);
    let r = Replica::open(&dir, None).unwrap();
    r.check_index().unwrap();
    let mut buf = vec![0u8; 100 * 4096];
    r.read(0, &mut buf).unwrap();
    for i in 0..100u64 {
        assert_eq!(
            &buf[(i * 4096) as usize..((i + 1) * 4096) as usize],
            common::content(i, i as u32 + 1).as_slice()
        );
    }
}

#[test]
fn replica_on_ext4() {
    replica_on("mkfs.ext4", &["-q", "-F"]);
}

#[test]
fn replica_on_ext4_with_1k_blocks() {
    replica_on("mkfs.ext4", &["-q", "-F", "-b", "1024"]);
}

#[test]
fn replica_on_ext4_bigalloc_64k_clusters() {
    replica_on("mkfs.ext4", &["-q", "-F", "-O", "bigalloc", "-C", "65536"]);
}

#[test]
fn replica_on_xfs() {
    replica_on("mkfs.xfs", &["-q", "-f"]);
}
