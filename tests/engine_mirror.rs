//! The engine's mirroring core against real replica processes on loopback:
//! a verifying workload keeps writing while a replica is SIGKILLed or
//! SIGSTOPped; nothing acknowledged is lost, the volume reports degraded, the
//! surviving replicas end byte-identical, and with no replica left I/O fails
//! at once instead of hanging.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

mod cluster;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shorthorn::engine::{Health, Mode, Volume};
use shorthorn::replica::Replica;

use cluster::{content, signal, Proc};

const BLOCKS: u64 = 4096;
const SIZE: u64 = BLOCKS * 4096;

fn start_replica(dir: &Path) -> (Proc, String) {
    cluster::start_replica(dir, SIZE)
}

/// Writes `count` random single blocks from 8 tasks, never two at once to
/// the same block, recording acknowledged ones; calls `midway` once half
/// are done.
async fn workload(
    v: &Arc<Volume>,
    model: &Arc<Mutex<HashMap<u64, u32>>>,
    count: u32,
    tag0: u32,
    midway: impl FnOnce(),
) {
    let mut midway = Some(midway);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(tag0);
    let mut done = 0;
    while done < count {
        let mut used = std::collections::HashSet::new();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let b = rng % BLOCKS;
            if !used.insert(b) {
                continue;
            }
            done += 1;
            let tag = tag0 + done;
            let (v, m) = (Arc::clone(v), Arc::clone(model));
            tasks.push(tokio::spawn(async move {
                v.write(b * 4096, Bytes::from(content(b, tag)))
                    .await
                    .expect("a degraded volume still takes writes");
                m.lock().unwrap().insert(b, tag);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        if done >= count / 2 {
            if let Some(f) = midway.take() {
                f();
            }
        }
    }
}

async fn verify(v: &Volume, model: &HashMap<u64, u32>) {
    let chunk = 4u64 << 20;
    let mut all = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(chunk as usize) {
        all.extend(v.read(off, chunk.min(SIZE - off)).await.unwrap());
    }
    for b in 0..BLOCKS {
        let got = &all[(b * 4096) as usize..((b + 1) * 4096) as usize];
        match model.get(&b) {
            Some(&t) => assert!(
                got == content(b, t).as_slice(),
                "block {b}: acknowledged write {t} lost"
            ),
            None => assert!(got.iter().all(|&x| x == 0), "block {b} should be zeros"),
        }
    }
}

fn replica_bytes(dir: &Path) -> Vec<u8> {
    let r = Replica::open(dir, None).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    r.read(0, &mut buf).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_nothing_and_survivors_stay_identical() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..3).map(|i| root.path().join(format!("r{i}"))).collect();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for d in &dirs {
        let (p, a) = start_replica(d);
        procs.push(p);
        addrs.push(a);
    }
    let v = Arc::new(Volume::open("vol", SIZE, &addrs).await.unwrap());
    assert_eq!(v.status().health, Health::Healthy);
    let model = Arc::new(Mutex::new(HashMap::new()));
    let victim = procs.remove(1);
    workload(&v, &model, 3000, 0, move || drop(victim)).await;

    let st = v.status();
    assert_eq!(st.health, Health::Degraded);
    assert_eq!(st.replicas[1].mode, Mode::Failed);
    assert!(st.replicas[1].error.is_some());
    let m = model.lock().unwrap().clone();
    verify(&v, &m).await;
    v.flush().await.unwrap();

    // Stop the survivors cleanly and compare what each holds.
    for p in &procs {
        signal(&p.0, nix::sys::signal::Signal::SIGTERM);
    }
    for mut p in procs.drain(..) {
        assert!(p.0.wait().unwrap().success());
    }
    let a = replica_bytes(&dirs[0]);
    let b = replica_bytes(&dirs[2]);
    assert!(a == b, "surviving replicas differ");

    // No replica left: I/O fails at once, nothing hangs.
    let t = Instant::now();
    let e = v.write(0, Bytes::from(content(0, 1))).await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::Unavailable, "{e}");
    assert!(v.read(0, 4096).await.is_err());
    assert!(v.flush().await.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(v.status().health, Health::Faulted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_while_the_volume_is_idle_is_noticed_at_once() {
    let root = tempfile::tempdir().unwrap();
    let mut r = cluster::start_replicas(root.path(), 3, SIZE);
    let v = Volume::open("vol", SIZE, &r.addrs).await.unwrap();
    v.write(0, Bytes::from(content(0, 1))).await.unwrap();
    let epoch = v.status().epoch;
    drop(r.procs.remove(2));
    // No request is sent: the closed connection alone fails the replica,
    // and the survivors record the smaller membership.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = v.status();
        if st.health == Health::Degraded && st.epoch > epoch {
            assert_eq!(st.replicas[2].mode, Mode::Failed, "{st:?}");
            assert_eq!(st.replicas[0].mode, Mode::ReadWrite, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never noticed: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v.read(0, 4096).await.unwrap(), content(0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_dropped_within_the_timeout() {
    let root = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let (p, a) = start_replica(&root.path().join(format!("r{i}")));
        procs.push(p);
        addrs.push(a);
    }
    // Long enough that a healthy replica on a loaded CI machine never trips it.
    let timeout = Duration::from_secs(2);
    let v = Arc::new(
        Volume::open_with_timeout("vol", SIZE, &addrs, timeout)
            .await
            .unwrap(),
    );
    let model = Arc::new(Mutex::new(HashMap::new()));
    let hung = &procs[0].0;
    let started = Instant::now();
    workload(&v, &model, 800, 0, || {
        signal(hung, nix::sys::signal::Signal::SIGSTOP)
    })
    .await;
    // The whole run took at most a few timeouts longer than it would have.
    assert!(started.elapsed() < Duration::from_secs(20));
    let st = v.status();
    assert_eq!(st.health, Health::Degraded);
    assert_eq!(st.replicas[0].mode, Mode::Failed);
    let m = model.lock().unwrap().clone();
    verify(&v, &m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_without_failing_replicas() {
    let root = tempfile::tempdir().unwrap();
    let (_p, a) = start_replica(&root.path().join("r"));
    let v = Volume::open("vol", SIZE, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert!(v.write(100, Bytes::from(vec![0; 4096])).await.is_err());
    assert!(v.write(SIZE, Bytes::from(vec![0; 4096])).await.is_err());
    assert!(v.read(0, 0).await.is_err());
    assert_eq!(v.status().health, Health::Healthy);
    let e = Volume::open("vol", SIZE * 2, &[a]).await.unwrap_err();
    assert_eq!(e.kind(), shorthorn::error::ErrorKind::FailedPrecondition);
}
