//! A real `shorthorn replica` process crashes (aborts) at each crash point of
//! each multi-step operation; reopened, the replica must open, its index must
//! match its files, and it must show either the state before the operation
//! or the state after it, never a mix. The abort is checked too, so a point
//! that is never reached fails its test instead of passing silently.
//!
//! Needs the `failpoints` feature (`scripts/test` enables it).

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

mod cluster;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shorthorn::replica::client::Client;
use shorthorn::replica::Replica;

use cluster::{free_addr, Proc};

const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCKS * 4096;

fn content(block: u64, tag: u8) -> Vec<u8> {
    let mut b = vec![tag; 4096];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

/// The volume as a list of (block, tag) for blocks holding data.
type View = Vec<Option<u8>>;

fn view_of(r: &Replica, size: u64) -> View {
    let mut buf = vec![0u8; size as usize];
    r.read(0, &mut buf).unwrap();
    buf.chunks(4096)
        .enumerate()
        .map(|(i, b)| {
            if b.iter().all(|&x| x == 0) {
                None
            } else {
                assert_eq!(
                    &b[..8],
                    &(i as u64).to_le_bytes(),
                    "block {i} holds another block's data"
                );
                assert!(b[8..].iter().all(|&x| x == b[8]), "block {i} is torn");
                Some(b[8])
            }
        })
        .collect()
}

/// Base snapshot: blocks 0 and 1 (tag 1). Head on top: block 0 and 2 (tag 2).
fn setup(dir: &Path) -> (View, View) {
    let r = Replica::open(dir, Some(SIZE)).unwrap();
    r.write(0, &content(0, 1)).unwrap();
    r.write(4096, &content(1, 1)).unwrap();
    let base = view_of(&r, SIZE);
    r.snapshot("base", true, BTreeMap::new()).unwrap();
    r.write(0, &content(0, 2)).unwrap();
    r.write(8192, &content(2, 2)).unwrap();
    let head = view_of(&r, SIZE);
    r.close().unwrap();
    (base, head)
}

/// Starts the replica with `point` armed, runs `op` against it, and checks
/// the process died by SIGABRT at the point.
fn crash_during<F>(dir: &Path, point: &str, size: Option<u64>, op: F)
where
    F: FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
{
    let addr = free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
    cmd.args(["replica", "--listen", &addr, "--dir"]).arg(dir);
    if let Some(s) = size {
        cmd.args(["--size", &s.to_string()]);
    }
    let child = cmd
        .env("SHORTHORN_FAILPOINT", point)
        .env("SHORTHORN_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed if this test fails before the process died on its own, so no
    // replica outlives a failing test.
    let mut guard = Proc(child);
    let child = &mut guard.0;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return; // died before listening (the create point)
            }
            match Client::connect_with_timeout(&addr, Duration::from_secs(10)).await {
                Ok(c) => return op(c).await,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("replica never came up: {e}"),
            }
        }
    });
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "failpoint {point} was not hit (exit {status})"
    );
}

fn reopen(dir: &Path) -> Replica {
    let r = Replica::open(dir, None).expect("the replica opens after the crash");
    r.check_index().expect("index matches the files");
    r
}

fn snapshot_names(r: &Replica) -> Vec<(String, bool)> {
    r.list()
        .unwrap()
        .into_iter()
        .filter(|l| !l.head)
        .map(|l| (l.name, l.removed))
        .collect()
}

fn check_snapshot_point(point: &str) {
    let d = tempfile::tempdir().unwrap();
    let (_base, head) = setup(d.path());
    crash_during(d.path(), point, None, |c| {
        Box::pin(async move {
            assert!(c.snapshot("s2", BTreeMap::new()).await.is_err());
        })
    });
    let r = reopen(d.path());
    assert_eq!(
        view_of(&r, SIZE),
        head,
        "{point}: the head still shows its data"
    );
    let snaps = snapshot_names(&r);
    assert!(
        snaps.contains(&("base".into(), false)),
        "{point}: {snaps:?}"
    );
    if snaps.iter().any(|(n, _)| n == "s2") {
        // Committed: the new snapshot shows what the head showed.
        r.write(0, &content(0, 7)).unwrap();
        r.revert("s2").unwrap();
        assert_eq!(
            view_of(&r, SIZE),
            head,
            "{point}: s2 shows the head at snapshot time"
        );
    } else {
        // Not committed: taking it again works.
        r.snapshot("s2", true, BTreeMap::new()).unwrap();
    }
    r.check_index().unwrap();
}

fn check_remove_point(point: &str) {
    let d = tempfile::tempdir().unwrap();
    let (_base, head) = setup(d.path());
    crash_during(d.path(), point, None, |c| {
        Box::pin(async move {
            assert!(c.remove_snapshot("base").await.is_err());
        })
    });
    let r = reopen(d.path());
    assert_eq!(
        view_of(&r, SIZE),
        head,
        "{point}: removal never changes what the head shows"
    );
    if !snapshot_names(&r).is_empty() {
        // Cut short: removing it again finishes the job.
        r.remove_snapshot("base").unwrap();
    }
    assert!(snapshot_names(&r).is_empty());
    assert_eq!(view_of(&r, SIZE), head);
    r.check_index().unwrap();
}

/// As [`check_remove_point`], for a snapshot whose child is a snapshot
/// (the merge that runs without holding I/O): neither the head nor the
/// child snapshot shows anything different, whatever the crash point.
fn check_remove_below_point(point: &str) {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let (mid, head) = {
        let r = reopen(d.path());
        r.snapshot("mid", true, BTreeMap::new()).unwrap();
        let mid = view_of(&r, SIZE);
        r.write(12288, &content(3, 3)).unwrap();
        r.write(4096, &content(1, 3)).unwrap();
        let head = view_of(&r, SIZE);
        r.close().unwrap();
        (mid, head)
    };
    crash_during(d.path(), point, None, |c| {
        Box::pin(async move {
            assert!(c.remove_snapshot("base").await.is_err());
        })
    });
    let r = reopen(d.path());
    assert_eq!(view_of(&r, SIZE), head, "{point}: the head shows the same");
    if snapshot_names(&r).iter().any(|(n, _)| n == "base") {
        r.remove_snapshot("base").unwrap();
    }
    assert_eq!(
        snapshot_names(&r)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["mid"]
    );
    assert_eq!(view_of(&r, SIZE), head);
    r.check_index().unwrap();
    r.revert("mid").unwrap();
    assert_eq!(
        view_of(&r, SIZE),
        mid,
        "{point}: the child snapshot shows the same"
    );
}

fn check_revert_point(point: &str) {
    let d = tempfile::tempdir().unwrap();
    let (base, head) = setup(d.path());
    crash_during(d.path(), point, None, |c| {
        Box::pin(async move {
            assert!(c.revert("base").await.is_err());
        })
    });
    let r = reopen(d.path());
    let v = view_of(&r, SIZE);
    assert!(
        v == head || v == base,
        "{point}: neither before nor after: {v:?}"
    );
    assert_eq!(snapshot_names(&r), vec![("base".to_string(), false)]);
}

#[test]
fn crash_points_in_snapshot() {
    for p in [
        "snapshot.linked",
        "snapshot.meta-written",
        "snapshot.head-created",
        "snapshot.committed",
    ] {
        check_snapshot_point(p);
    }
}

#[test]
fn crash_points_in_remove_snapshot() {
    for p in [
        "remove.marked",
        "remove.copied",
        "remove.child-committed",
        "remove.unlinked",
    ] {
        check_remove_point(p);
        check_remove_below_point(p);
    }
}

#[test]
fn crash_points_in_revert() {
    for p in ["revert.head-created", "revert.committed"] {
        check_revert_point(p);
    }
}

#[test]
fn crash_point_in_expand() {
    let d = tempfile::tempdir().unwrap();
    let (_base, head) = setup(d.path());
    crash_during(d.path(), "expand.resized", None, |c| {
        Box::pin(async move {
            assert!(c.expand(SIZE * 2).await.is_err());
        })
    });
    let r = reopen(d.path());
    assert!(r.size() == SIZE || r.size() == SIZE * 2);
    let v = view_of(&r, r.size());
    assert_eq!(v[..BLOCKS as usize], head[..]);
    assert!(v[BLOCKS as usize..].iter().all(Option::is_none));
    r.expand(SIZE * 2).unwrap();
    r.check_index().unwrap();
}

#[test]
fn crash_point_between_data_and_index() {
    let d = tempfile::tempdir().unwrap();
    let (_base, head) = setup(d.path());
    crash_during(d.path(), "write.data-written", None, |c| {
        Box::pin(async move {
            assert!(c.write(3 * 4096, Bytes::from(content(3, 9))).await.is_err());
        })
    });
    let r = reopen(d.path());
    let v = view_of(&r, SIZE);
    assert!(
        v[3].is_none() || v[3] == Some(9),
        "unacknowledged write is old or new"
    );
    let mut rest = v.clone();
    rest[3] = None;
    assert_eq!(rest, head);
}

#[test]
fn crash_point_in_flush_keeps_acknowledged_writes() {
    let d = tempfile::tempdir().unwrap();
    let (_base, mut head) = setup(d.path());
    crash_during(d.path(), "flush.synced", None, |c| {
        Box::pin(async move {
            c.write(3 * 4096, Bytes::from(content(3, 9))).await.unwrap();
            assert!(c.flush().await.is_err());
        })
    });
    let r = reopen(d.path());
    head[3] = Some(9);
    assert_eq!(view_of(&r, SIZE), head);
}

#[test]
fn crash_point_in_create() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("new");
    crash_during(&dir, "create.before-commit", Some(SIZE), |_| {
        Box::pin(async {})
    });
    assert!(
        Replica::open(&dir, None).is_err(),
        "no volume.meta: not a replica yet"
    );
    let r = Replica::open(&dir, Some(SIZE)).expect("creation after the crash succeeds");
    assert!(view_of(&r, SIZE).iter().all(Option::is_none));
    r.check_index().unwrap();
}

const VSIZE: u64 = 32 << 20;

/// Three replicas under `root` with snapshots s1 and s2, and an engine that
/// died removing s1 after marking it removed on every replica, when only the
/// first replica had merged it away. Returns the replicas and what the
/// volume reads.
async fn engine_died_removing_s1(root: &Path) -> (cluster::Replicas, Vec<u8>) {
    use shorthorn::engine::Volume;

    let r = cluster::start_replicas(root, 3, VSIZE);
    let v = Volume::open("vol", VSIZE, &r.addrs).await.unwrap();
    for i in 0..8u8 {
        v.write(u64::from(i) << 20, Bytes::from(vec![i + 1; 1 << 20]))
            .await
            .unwrap();
    }
    v.snapshot("s1", BTreeMap::new()).await.unwrap();
    v.write(0, Bytes::from(vec![0x40; 2 << 20])).await.unwrap();
    v.snapshot("s2", BTreeMap::new()).await.unwrap();
    v.write(8 << 20, Bytes::from(vec![0x80; 1 << 20]))
        .await
        .unwrap();
    v.flush().await.unwrap();
    let want = read_all(&v, VSIZE).await;
    drop(v);

    let control = free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
    cmd.args(["engine", "--volume", "vol", "--size", "32Mi"])
        .args(["--control", &control])
        .env("SHORTHORN_FAILPOINT", "engine.remove.marked")
        .env("SHORTHORN_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for a in &r.addrs {
        cmd.args(["--replica", a]);
    }
    let mut engine = Proc(cmd.spawn().unwrap());
    cluster::wait_listening(&control);
    let out = cluster::ctl(&control, &["remove-snapshot", "s1"]);
    assert!(!out.status.success(), "the engine should have died");
    let status = engine.0.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "failpoint not hit ({status})"
    );
    for a in &r.addrs {
        let l = layers(a).await;
        let s1 = l.iter().find(|l| l.name == "s1").expect("s1 still there");
        assert!(s1.removed, "{a}: s1 not marked removed");
    }
    // The first replica had finished its part before the engine died.
    Client::connect(&r.addrs[0])
        .await
        .unwrap()
        .remove_snapshot("s1")
        .await
        .unwrap();
    (r, want)
}

async fn layers(addr: &str) -> Vec<shorthorn::replica::chain::LayerInfo> {
    Client::connect(addr).await.unwrap().list().await.unwrap()
}

/// The volume opened on `addrs` serves every replica read-write, none
/// rebuilt, and reads `want`.
async fn open_healthy(addrs: &[String], want: &[u8]) -> shorthorn::engine::Volume {
    use shorthorn::engine::{Health, Mode, Volume};

    let v = Volume::open("vol", VSIZE, addrs).await.unwrap();
    let st = v.status();
    assert_eq!(st.health, Health::Healthy, "{st:?}");
    assert!(
        st.replicas
            .iter()
            .all(|r| r.mode == Mode::ReadWrite && r.rebuild.is_none()),
        "a replica is rebuilt: {st:?}"
    );
    assert!(read_all(&v, VSIZE).await == want, "content changed");
    v
}

/// An engine dies in the middle of removing a snapshot: it had marked the
/// snapshot removed on every replica, and one replica had already merged it
/// away. The next engine finishes the removal on the others; it does not
/// take the replica whose chain differs for stale and rebuild it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_removal_is_finished_at_open_not_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let (r, want) = engine_died_removing_s1(root.path()).await;

    let v = open_healthy(&r.addrs, &want).await;
    for a in &r.addrs {
        let names: Vec<String> = layers(a).await.into_iter().map(|l| l.name).collect();
        assert!(!names.contains(&"s1".to_owned()), "{a}: {names:?}");
        assert!(names.contains(&"s2".to_owned()), "{a}: {names:?}");
    }
    cluster::stop_and_compare(v, r.procs, &r.dirs, VSIZE, "replicas differ").await;
}

/// The same, but the disk is too full to finish the removal at open: the
/// volume opens all the same, the replicas still holding the snapshot
/// serving with it marked, none rebuilt (a marked snapshot changes nothing a
/// reader sees, so their chains agree with the first one's). Once there is
/// room, the next open finishes the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_removal_no_disk_has_room_to_finish_leaves_the_volume_serving() {
    let disk = cluster::common::SmallDisk::new(64 << 20);
    let (r, want) = engine_died_removing_s1(disk.path()).await;
    disk.fill_leaving(1 << 20);

    let v = open_healthy(&r.addrs, &want).await;
    for a in &r.addrs[1..] {
        let l = layers(a).await;
        assert!(l.iter().any(|l| l.name == "s1" && l.removed), "{a}: {l:?}");
    }
    v.write(16 << 20, Bytes::from(vec![0x33; 64 << 10]))
        .await
        .unwrap();
    v.flush().await.unwrap();
    let want = read_all(&v, VSIZE).await;
    drop(v);

    disk.unfill();
    let v = open_healthy(&r.addrs, &want).await;
    for a in &r.addrs {
        let names: Vec<String> = layers(a).await.into_iter().map(|l| l.name).collect();
        assert_eq!(
            names.iter().filter(|n| *n == "s1").count(),
            0,
            "{a}: {names:?}"
        );
    }
    cluster::stop_and_compare(v, r.procs, &r.dirs, VSIZE, "replicas differ").await;
}

async fn read_all(v: &shorthorn::engine::Volume, size: u64) -> Vec<u8> {
    let mut all = Vec::new();
    for off in (0..size).step_by(4 << 20) {
        all.extend(v.read(off, 4 << 20).await.unwrap());
    }
    all
}
