//! The engine against real replica processes: online rebuild of a fresh and
//! of a stale replica under a verifying workload, an engine killed mid-
//! workload and restarted, snapshots, expansion and revert across replicas,
//! and sub-block (512-byte) requests.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shorthorn::engine::{Health, Mode, Options, Volume};

use cluster::{
    content, replica_digest, start_replica, start_replica_at, stop_and_compare, tag_of, Proc,
};

const SIZE: u64 = 64 << 20;
const BLOCKS: u64 = SIZE / 4096;

type Model = Arc<Mutex<HashMap<u64, u32>>>;

/// Writes batches of 8 distinct random blocks (within `span` blocks) until
/// `stop`, recording each acknowledged write; every write must succeed.
fn spawn_workload(
    v: &Volume,
    model: &Model,
    span: u64,
    seed: u64,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    let (v, model, stop) = (v.clone(), Arc::clone(model), Arc::clone(stop));
    tokio::spawn(async move {
        let mut rng = seed | 1;
        let mut tag = (seed as u32) << 20;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut used = std::collections::HashSet::new();
            let mut batch = Vec::new();
            for _ in 0..8 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let b = rng % span;
                if used.insert(b) {
                    tag += 1;
                    let v = v.clone();
                    let t = tag;
                    batch.push(tokio::spawn(async move {
                        v.write(b * 4096, Bytes::from(content(b, t)))
                            .await
                            .map(|()| (b, t))
                    }));
                }
            }
            for t in batch {
                let (b, t) = t.await.unwrap().expect("the volume keeps taking writes");
                model.lock().unwrap().insert(b, t);
                n += 1;
            }
        }
        n
    })
}

async fn verify(v: &Volume, model: &HashMap<u64, u32>) {
    let chunk = 4u64 << 20;
    for off in (0..SIZE).step_by(chunk as usize) {
        let data = v.read(off, chunk).await.unwrap();
        for i in 0..chunk / 4096 {
            let b = off / 4096 + i;
            let got = &data[(i * 4096) as usize..((i + 1) * 4096) as usize];
            let want = model.get(&b).copied().unwrap_or(0);
            assert_eq!(
                tag_of(b, got),
                Some(want),
                "block {b}: acknowledged write {want} lost"
            );
        }
    }
}

async fn wait_for(v: &Volume, what: &str, cond: impl Fn(&shorthorn::engine::VolumeStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = v.status();
        if cond(&st) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_three(root: &Path) -> (Vec<PathBuf>, Vec<Proc>, Vec<String>) {
    let dirs: Vec<_> = (0..3).map(|i| root.join(format!("r{i}"))).collect();
    let (mut procs, mut addrs) = (Vec::new(), Vec::new());
    for d in &dirs {
        let (p, a) = start_replica(d, SIZE);
        procs.push(p);
        addrs.push(a);
    }
    (dirs, procs, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_rebuilds_while_the_volume_serves() {
    let root = tempfile::tempdir().unwrap();
    let (mut dirs, mut procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let model: Model = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = spawn_workload(&v, &model, BLOCKS, 7, &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    drop(procs.remove(1));
    wait_for(&v, "degraded", |s| s.health == Health::Degraded).await;
    dirs.remove(1);
    // A snapshot while degraded: the rebuild must carry it over too.
    v.snapshot("before-rebuild", Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fresh = root.path().join("fresh");
    let (p, a) = start_replica(&fresh, SIZE);
    procs.push(p);
    dirs.push(fresh);
    v.add_replica(&a).await.unwrap();
    let mut saw_progress = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = v.status();
        let r = st.replicas.iter().find(|r| r.addr == a).unwrap();
        if let Some(p) = &r.rebuild {
            saw_progress |= p.total_bytes > 0;
        }
        if r.mode == Mode::ReadWrite {
            break;
        }
        assert_ne!(r.mode, Mode::Failed, "rebuild failed: {st:?}");
        assert!(Instant::now() < deadline, "rebuild never finished: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_progress, "rebuild progress was never visible");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = w.await.unwrap();
    assert!(
        writes > 100,
        "workload too small to mean anything: {writes}"
    );
    let st = v.status();
    assert_eq!(
        st.replicas
            .iter()
            .filter(|r| r.mode == Mode::ReadWrite)
            .count(),
        3,
        "{st:?}"
    );

    let m = model.lock().unwrap().clone();
    verify(&v, &m).await;
    v.flush().await.unwrap();
    let snaps = v.list_snapshots().await.unwrap();
    assert!(snaps.iter().any(|l| l.name == "before-rebuild"));
    drop(v);
    for p in procs {
        p.stop();
    }
    let digests: Vec<_> = dirs.iter().map(|d| replica_digest(d, SIZE)).collect();
    assert_eq!(digests[0], digests[1], "replica r0 and r2 differ");
    assert_eq!(digests[0], digests[2], "the rebuilt replica differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_add_during_a_rebuild_is_answered_busy_at_once() {
    let root = tempfile::tempdir().unwrap();
    let (mut dirs, mut procs, addrs) = start_three(root.path());
    // 4 MiB/s: the 16 MiB written below take four seconds to copy, room
    // for the second add on a loaded machine.
    let opts = Options {
        rebuild_bytes_per_sec: 4 << 20,
        ..Options::default()
    };
    let v = Volume::open_with("vol", SIZE, &addrs, opts).await.unwrap();
    for b in (0..(16 << 20) / 4096).step_by(64) {
        let data: Vec<u8> = (b..b + 64).flat_map(|x| content(x, 1)).collect();
        v.write(b * 4096, Bytes::from(data)).await.unwrap();
    }
    drop(procs.remove(1));
    // The next write finds it gone.
    v.write(0, Bytes::from(content(0, 2))).await.unwrap();
    wait_for(&v, "degraded", |s| s.health == Health::Degraded).await;
    let (p1, first) = start_replica(&root.path().join("f1"), SIZE);
    let (p2, second) = start_replica(&root.path().join("f2"), SIZE);
    procs.extend([p1, p2]);
    v.add_replica(&first).await.unwrap();
    let t = Instant::now();
    let e = v.add_replica(&second).await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::Busy, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "held {:?}",
        t.elapsed()
    );
    assert!(
        v.status().replicas.iter().all(|r| r.addr != second),
        "a refused replica must not join"
    );
    // An address that does not answer is away, not busy.
    let e = v.add_replica("127.0.0.1:1").await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::Unavailable, "{e}");
    wait_for(&v, "first rebuilt", |s| {
        s.replicas
            .iter()
            .any(|r| r.addr == first && r.mode == Mode::ReadWrite)
    })
    .await;
    // The first rebuild's slot is freed once its epoch is recorded and its
    // older snapshots merged, a moment after it turns read-write: busy
    // until then, as the answer says, so ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match v.add_replica(&second).await {
            Ok(()) => break,
            Err(e) if e.kind() == shorthorn::error::ErrorKind::Busy => {
                assert!(Instant::now() < deadline, "busy for good: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("second add: {e}"),
        }
    }
    wait_for(&v, "second rebuilt", |s| {
        s.replicas
            .iter()
            .any(|r| r.addr == second && r.mode == Mode::ReadWrite)
    })
    .await;

    // Two rebuilds took two snapshots; the older is merged away on every
    // replica, and only the newest stays below the head.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for r in v
            .status()
            .replicas
            .iter()
            .filter(|r| r.mode == Mode::ReadWrite)
        {
            let c = shorthorn::replica::client::Client::connect(&r.addr)
                .await
                .unwrap();
            let layers = c.list().await.unwrap();
            c.shutdown();
            left.push(
                layers
                    .iter()
                    .filter(|l| l.name.starts_with("rebuild-"))
                    .count(),
            );
        }
        if left.len() == 4 && left.iter().all(|n| *n == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rebuild snapshots per replica: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf_ok = 0;
    for b in (0..(16 << 20) / 4096).step_by(61) {
        let got = v.read(b * 4096, 4096).await.unwrap();
        let want = content(b, if b == 0 { 2 } else { 1 });
        assert_eq!(&got[..], &want[..], "block {b} after the merge");
        buf_ok += 1;
    }
    assert!(buf_ok > 60);
    dirs.remove(1);
    dirs.extend([root.path().join("f1"), root.path().join("f2")]);
    stop_and_compare(v, procs, &dirs, SIZE, "replicas differ after the merge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_that_comes_back_copies_little() {
    let root = tempfile::tempdir().unwrap();
    let (dirs, mut procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    // Fill a quarter of the volume, then lose replica 1.
    for b in (0..BLOCKS / 4).step_by(64) {
        let data: Vec<u8> = (b..b + 64).flat_map(|x| content(x, 1)).collect();
        v.write(b * 4096, Bytes::from(data)).await.unwrap();
    }
    let victim = procs.remove(1);
    drop(victim);
    // Writes while it is away touch only the first MiB.
    let model: Model = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = spawn_workload(&v, &model, 256, 3, &stop);
    wait_for(&v, "degraded", |s| s.health == Health::Degraded).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let back = start_replica_at(&dirs[1], SIZE, &addrs[1]);
    procs.insert(1, back);
    v.add_replica(&addrs[1]).await.unwrap();
    wait_for(&v, "rebuilt", |s| s.health == Health::Healthy).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let st = v.status();
    let r = st.replicas[1]
        .rebuild
        .as_ref()
        .expect("rebuild progress kept");
    // Compared everything the source holds, copied at most the one chunk
    // written while away.
    assert!(r.total_bytes >= SIZE / 4, "{r:?}");
    assert!(r.copied_bytes <= 1 << 20, "a brief absence copied {r:?}");

    let mut m: HashMap<u64, u32> = (0..BLOCKS / 4).map(|b| (b, 1)).collect();
    m.extend(model.lock().unwrap().iter());
    verify(&v, &m).await;
    stop_and_compare(v, procs, &dirs, SIZE, "replicas differ after rebuild").await;
}

/// The engine's child side of `an_engine_killed_mid_workload_restarts_consistent`,
/// which runs this binary again for it: writes batches and flushes, and logs
/// each flushed batch to a file until it is killed. Not a test by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of an_engine_killed_mid_workload_restarts_consistent"]
async fn engine_child() {
    let cfg = std::env::var("SHORTHORN_TEST_ENGINE_CHILD")
        .expect("run by an_engine_killed_mid_workload_restarts_consistent");
    let mut parts = cfg.split(';');
    let log = PathBuf::from(parts.next().unwrap());
    let round: u32 = parts.next().unwrap().parse().unwrap();
    let addrs: Vec<String> = parts.map(str::to_owned).collect();
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    // Tags grow across rounds: a later write always has a larger tag.
    let mut tag = round << 20;
    let mut unflushed = Vec::new();
    for batch_no in 1u64.. {
        let mut used = std::collections::HashSet::new();
        let mut batch = Vec::new();
        for _ in 0..16 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let b = rng % BLOCKS;
            if used.insert(b) {
                tag += 1;
                let (v, t) = (v.clone(), tag);
                batch.push(tokio::spawn(async move {
                    v.write(b * 4096, Bytes::from(content(b, t))).await.unwrap();
                    (b, t)
                }));
            }
        }
        for t in batch {
            unflushed.push(t.await.unwrap());
        }
        // Mostly writes, a flush now and then: a kill lands mid-write more
        // often than mid-flush.
        if batch_no % 4 == 0 {
            v.flush().await.unwrap();
            let lines: String = unflushed
                .drain(..)
                .map(|(b, t)| format!("{b} {t}\n"))
                .collect();
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)
                .unwrap();
            f.write_all(lines.as_bytes()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_workload_restarts_consistent() {
    let root = tempfile::tempdir().unwrap();
    let (dirs, mut procs, addrs) = start_three(root.path());
    let log = root.path().join("flushed.log");
    for round in 0..5u32 {
        let cfg = format!("{};{round};{}", log.display(), addrs.join(";"));
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "engine_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SHORTHORN_TEST_ENGINE_CHILD", cfg)
            .env("SHORTHORN_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let engine = Proc(child);
        let want = 200 * (round as usize + 1);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&log).map_or(0, |s| s.lines().count()) < want {
            assert!(
                Instant::now() < deadline,
                "the engine child made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Make the replicas differ the way a crash of the engine's node
        // would: one replica stops reading, the engine keeps sending writes
        // the others apply, then both die. The stopped replica's socket
        // buffer, holding those writes, dies with it.
        let r = round as usize % 3;
        cluster::signal(&procs[r].0, nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(engine);
        // SIGKILL while stopped: no chance to read what is queued.
        cluster::signal(&procs[r].0, nix::sys::signal::Signal::SIGKILL);
        procs[r].0.wait().unwrap();
        procs[r] = start_replica_at(&dirs[r], SIZE, &addrs[r]);
    }
    let flushed: HashMap<u64, u32> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split(' ').map(|x| x.parse::<u64>().unwrap());
            (it.next().unwrap(), it.next().unwrap() as u32)
        })
        .collect();
    // Restart: every flushed write is there (or a newer one for the block).
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    assert_eq!(v.status().health, Health::Healthy);
    let mut data = Vec::new();
    for off in (0..SIZE).step_by(4 << 20) {
        data.extend(v.read(off, 4 << 20).await.unwrap());
    }
    for (b, t) in &flushed {
        let got = tag_of(*b, &data[(*b * 4096) as usize..((*b + 1) * 4096) as usize]);
        assert!(
            matches!(got, Some(g) if g >= *t),
            "block {b}: flushed write {t} lost, found {got:?}"
        );
    }
    stop_and_compare(
        v,
        procs,
        &dirs,
        SIZE,
        "replicas did not converge after the engine crash",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_expand_and_revert_act_on_every_replica() {
    let root = tempfile::tempdir().unwrap();
    let (dirs, procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let model: Model = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = spawn_workload(&v, &model, 512, 11, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    v.snapshot("s1", [("k".to_owned(), "v".to_owned())].into())
        .await
        .unwrap();
    let at_snapshot = model.lock().unwrap().clone();
    // Writes after it, and an online expansion under load.
    stop.store(false, Ordering::Relaxed);
    let w = spawn_workload(&v, &model, 512, 12, &stop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    v.expand(SIZE * 2).await.unwrap();
    assert_eq!(v.size(), SIZE * 2);
    v.write(SIZE * 2 - 4096, Bytes::from(content(0, 9)))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();

    // The writes were counted, per volume and per replica.
    let m = v.metrics_text();
    let count = |series: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("no {series} in\n{m}"))
    };
    let writes = count("shorthorn_volume_requests_total{volume=\"vol\",op=\"write\"}");
    assert!(writes > 10, "{writes} writes counted");
    let on_replica = format!(
        "shorthorn_replica_requests_total{{volume=\"vol\",replica=\"{}\",op=\"write\"}}",
        addrs[1]
    );
    assert!(
        count(&on_replica) >= writes,
        "every write reaches every replica"
    );
    // Intent marks are counted as such, not as flushes (none was asked).
    let series = |op: &str| {
        format!(
            "shorthorn_replica_requests_total{{volume=\"vol\",replica=\"{}\",op=\"{op}\"}}",
            addrs[1]
        )
    };
    assert_eq!(count(&series("flush")), 0);
    assert!(count(&series("intent")) >= 1);

    let e = v.snapshot("s1", Default::default()).await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        v.status().health,
        Health::Healthy,
        "a refused snapshot failed a replica"
    );
    let e = v.expand(SIZE).await.unwrap_err();
    assert_eq!(
        e.kind(),
        shorthorn::error::ErrorKind::InvalidArgument,
        "{e}"
    );

    v.revert("s1").await.unwrap();
    // The snapshot's content, the block written past the old end gone.
    for (b, t) in &at_snapshot {
        let got = v.read(b * 4096, 4096).await.unwrap();
        assert_eq!(tag_of(*b, &got), Some(*t), "block {b} after revert");
    }
    assert!(v
        .read(SIZE * 2 - 4096, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    let snaps = v.list_snapshots().await.unwrap();
    let s1 = snaps.iter().find(|l| l.name == "s1").unwrap();
    assert_eq!(s1.labels.get("k").map(String::as_str), Some("v"));
    v.remove_snapshot("s1").await.unwrap();
    let e = v.remove_snapshot("s1").await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::NotFound, "{e}");
    assert_eq!(v.status().health, Health::Healthy);
    stop_and_compare(v, procs, &dirs, SIZE * 2, "replicas differ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sector_sized_requests_read_modify_write_without_losing_updates() {
    let root = tempfile::tempdir().unwrap();
    let (_dirs, _procs, addrs) = start_three(root.path());
    let opts = Options::default();
    let v = Volume::open_with("vol", SIZE, &addrs, opts).await.unwrap();
    // Eight tasks each own one sector of the same 4 blocks and write it
    // over and over: with a racing read-modify-write, sectors would revert.
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            for round in 1..=20u8 {
                for blk in 0..4u64 {
                    let off = blk * 4096 + s * 512;
                    v.write(off, Bytes::from(vec![round; 512])).await.unwrap();
                }
            }
        }));
    }
    // Aligned writes to a neighbouring block at the same time.
    let v2 = v.clone();
    tasks.push(tokio::spawn(async move {
        for round in 0..40u32 {
            v2.write(4 * 4096, Bytes::from(content(4, round)))
                .await
                .unwrap();
        }
    }));
    for t in tasks {
        t.await.unwrap();
    }
    let all = v.read(0, 4 * 4096).await.unwrap();
    assert!(all.iter().all(|&x| x == 20), "a sector lost its last write");
    let neighbour = v.read(4 * 4096, 4096).await.unwrap();
    assert_eq!(
        tag_of(4, &neighbour),
        Some(39),
        "the aligned writes' last one"
    );
    // Unaligned read and a write spanning blocks, and an unaligned unmap.
    v.write(3 * 512, Bytes::from(vec![7u8; 4096 + 1024]))
        .await
        .unwrap();
    let got = v.read(512, 8 * 512).await.unwrap();
    assert_eq!(&got[..1024], &[20u8; 1024][..]);
    assert!(got[1024..].iter().all(|&x| x == 7));
    v.unmap(1024, 4096 * 2).await.unwrap();
    let got = v.read(0, 4 * 4096).await.unwrap();
    assert!(got[..1024].iter().all(|&x| x == 20));
    assert!(got[1024..1024 + 8192].iter().all(|&x| x == 0));
    assert!(got[1024 + 8192..].iter().all(|&x| x == 20));
    // Misaligned requests are refused and fail nothing.
    assert!(v.write(100, Bytes::from(vec![0; 512])).await.is_err());
    assert!(v.read(0, 100).await.is_err());
    assert_eq!(v.status().health, Health::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dropped_before_an_engine_restart_is_rebuilt_not_trusted() {
    let root = tempfile::tempdir().unwrap();
    let (dirs, mut procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    for b in 0..64 {
        v.write(b * 4096, Bytes::from(content(b, 1))).await.unwrap();
    }
    cluster::signal(&procs[2].0, nix::sys::signal::Signal::SIGKILL);
    procs[2].0.wait().unwrap();
    // Acknowledged only by replicas 0 and 1.
    for b in 0..64 {
        v.write(b * 4096, Bytes::from(content(b, 2))).await.unwrap();
    }
    assert_eq!(v.status().replicas[2].mode, Mode::Failed);
    v.flush().await.unwrap();
    drop(v);

    // Replica 2 comes back with old data; a new engine must not serve it.
    procs[2] = start_replica_at(&dirs[2], SIZE, &addrs[2]);
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let st = v.status();
    assert_ne!(st.replicas[2].mode, Mode::ReadWrite, "{st:?}");
    wait_for(&v, "stale replica rebuilt", |s| s.health == Health::Healthy).await;
    let m: HashMap<u64, u32> = (0..64).map(|b| (b, 2)).collect();
    verify(&v, &m).await;
    v.flush().await.unwrap();
    drop(v);

    // Without replicas 0 and 1 (the last members), an engine refuses to start.
    procs[0].0.kill().unwrap();
    procs[0].0.wait().unwrap();
    let e = Volume::open("vol", SIZE, &addrs).await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains(&addrs[0]), "{e}");
    procs.remove(0);
    for p in procs {
        p.stop();
    }
    assert_eq!(
        replica_digest(&dirs[1], SIZE),
        replica_digest(&dirs[2], SIZE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_intent_is_marked_before_writes_and_cleared_when_idle() {
    let root = tempfile::tempdir().unwrap();
    let (_dirs, _procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let c = shorthorn::replica::client::Client::connect(&addrs[1])
        .await
        .unwrap();
    let intent = || async { c.info().await.unwrap().engine.intent };
    assert!(intent().await.is_empty());
    // Regions 0 and 2 (4 MiB each) are marked on the replica by the time
    // the writes are acknowledged.
    v.write(4096, Bytes::from(content(1, 1))).await.unwrap();
    v.write(9 << 20, Bytes::from(content(2304, 1)))
        .await
        .unwrap();
    assert_eq!(intent().await.into_iter().collect::<Vec<_>>(), [0, 2]);
    // A flush right after covers the writes, but the regions were busy in
    // the window just closed: still marked. Once idle for a window, cleared.
    v.flush().await.unwrap();
    assert_eq!(intent().await.len(), 2);
    v.flush().await.unwrap();
    v.flush().await.unwrap();
    assert!(intent().await.is_empty(), "idle regions stay marked");
    // A new write marks its region again.
    v.write(0, Bytes::from(content(0, 2))).await.unwrap();
    assert_eq!(intent().await.into_iter().collect::<Vec<_>>(), [0]);
    assert_eq!(v.status().intent_regions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_copies_from_a_current_replica_never_a_stale_one() {
    use shorthorn::replica::client::Client;
    use shorthorn::replica::copy;
    let root = tempfile::tempdir().unwrap();
    let (_dirs, _procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    v.write(0, Bytes::from(content(0, 1))).await.unwrap();
    v.flush().await.unwrap();
    // Replica 0 leaves the volume; a write goes on without it.
    v.remove_replica(&addrs[0]).await.unwrap();
    v.write(0, Bytes::from(content(0, 2))).await.unwrap();
    v.flush().await.unwrap();
    drop(v);
    // Detached, each replica takes the snapshot on its own, the stale one
    // too: two versions of one snapshot name.
    for a in &addrs {
        let c = Client::connect(a).await.unwrap();
        c.snapshot("s", std::collections::BTreeMap::new())
            .await
            .unwrap();
        c.shutdown();
    }
    // Given the stale one first, a restore still copies current data.
    let (_tp, taddr) = start_replica(&root.path().join("t"), SIZE);
    let target = Client::connect(&taddr).await.unwrap();
    let (_, picked, _) = copy::pick_source(&addrs, "s").await.unwrap();
    assert_eq!(picked, addrs[1], "the first current member");
    assert!(copy::restore(&addrs, &target, "s").await.unwrap() > 0);
    let got = target.read(0, 4096).await.unwrap();
    assert_eq!(
        tag_of(0, &got),
        Some(2),
        "the stale replica's block was copied"
    );
    assert!(!target.info().await.unwrap().rebuilding);
    assert_eq!(copy::restore(&addrs, &target, "s").await.unwrap(), 0);
    let e = copy::pick_source(&addrs, "nope").await.unwrap_err();
    assert!(e.contains("holds no snapshot"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_volume_is_refused_and_left_untouched() {
    use shorthorn::replica::client::Client;

    let root = tempfile::tempdir().unwrap();
    let (p0, a0) = start_replica(&root.path().join("r0"), SIZE);
    let (p1, a1) = start_replica(&root.path().join("r1"), SIZE);
    // The address of a replica serving another volume (a stale address, a
    // port reused by another volume's replica) in this volume's list.
    let (other, a2) = cluster::start_replica_of(&root.path().join("r2"), SIZE, "other");
    let o = Volume::open("other", SIZE, std::slice::from_ref(&a2))
        .await
        .unwrap();
    o.write(0, Bytes::from(content(0, 7))).await.unwrap();
    o.flush().await.unwrap();
    drop(o);
    let c = Client::connect(&a2).await.unwrap();
    let before = c.info().await.unwrap();

    let addrs = vec![a0, a1, a2.clone()];
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let st = v.status();
    assert_eq!(st.health, Health::Degraded, "{st:?}");
    assert_eq!(st.replicas[2].mode, Mode::Failed, "{st:?}");
    let why = st.replicas[2].error.clone().unwrap_or_default();
    assert!(why.contains("serves volume \"other\""), "{why}");
    v.write(0, Bytes::from(content(0, 1))).await.unwrap();
    v.flush().await.unwrap();
    let e = v.add_replica(&a2).await.unwrap_err();
    assert!(e.to_string().contains("serves volume \"other\""), "{e}");
    drop(v);

    // Nothing reached it: not the writes, not the membership records.
    let after = c.info().await.unwrap();
    assert_eq!(before, after);
    let o = Volume::open("other", SIZE, &[a2]).await.unwrap();
    let got = o.read(0, 4096).await.unwrap();
    assert_eq!(tag_of(0, &got), Some(7));
    drop(o);
    for p in [p0, p1, other] {
        p.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_removal_slower_than_the_io_timeout_fails_no_replica() {
    let root = tempfile::tempdir().unwrap();
    let (dirs, procs, addrs) = start_three(root.path());
    let v = Volume::open_with_timeout("vol", SIZE, &addrs, Duration::from_secs(1))
        .await
        .unwrap();
    for b in 0..64 {
        v.write(b * 4096, Bytes::from(content(b, 1))).await.unwrap();
    }
    v.snapshot("s1", BTreeMap::new()).await.unwrap();
    v.write(0, Bytes::from(content(0, 2))).await.unwrap();
    v.snapshot("s2", BTreeMap::new()).await.unwrap();
    // A replica that takes three I/O timeouts over its merge (stopped here;
    // a merge of a large snapshot on a busy disk in life).
    cluster::signal(&procs[2].0, nix::sys::signal::Signal::SIGSTOP);
    let v2 = v.clone();
    let removal = tokio::spawn(async move { v2.remove_snapshot("s1").await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster::signal(&procs[2].0, nix::sys::signal::Signal::SIGCONT);
    removal.await.unwrap().unwrap();
    let st = v.status();
    assert_eq!(st.health, Health::Healthy, "{st:?}");
    assert!(
        st.replicas.iter().all(|r| r.mode == Mode::ReadWrite),
        "{st:?}"
    );
    let names: Vec<String> = v
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(!names.contains(&"s1".to_owned()), "{names:?}");
    for b in 0..64 {
        let got = v.read(b * 4096, 4096).await.unwrap();
        assert_eq!(
            tag_of(b, &got),
            Some(if b == 0 { 2 } else { 1 }),
            "block {b}"
        );
    }
    stop_and_compare(v, procs, &dirs, SIZE, "replicas differ after the removal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_an_engine_crash_cut_short_is_completed_as_it_was_taken() {
    use shorthorn::replica::client::Client;

    let root = tempfile::tempdir().unwrap();
    let (dirs, procs, addrs) = start_three(root.path());
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    for b in 0..16 {
        v.write(b * 4096, Bytes::from(content(b, 1))).await.unwrap();
    }
    v.flush().await.unwrap();
    drop(v);
    // The engine died after two of the three replicas took a system
    // snapshot with labels.
    let labels: BTreeMap<String, String> = [("backup".to_owned(), "nightly".to_owned())].into();
    for a in &addrs[..2] {
        let c = Client::connect(a).await.unwrap();
        c.snapshot_as("s1", false, labels.clone()).await.unwrap();
    }
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let st = v.status();
    assert!(
        st.replicas.iter().all(|r| r.mode == Mode::ReadWrite),
        "{st:?}"
    );
    let c = Client::connect(&addrs[2]).await.unwrap();
    let s1 = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.name == "s1")
        .expect("the third replica took the snapshot");
    assert!(!s1.user_created, "{s1:?}");
    assert_eq!(s1.labels, labels);
    stop_and_compare(v, procs, &dirs, SIZE, "replicas differ").await;
}
