//! Crash tests with real processes: a `shorthorn replica` process is killed
//! with SIGKILL at random instants while a workload of writes, unmaps,
//! flushes and snapshot operations runs against it; it is restarted on the
//! same directory each time. After every restart:
//! - the chain opens;
//! - every acknowledged write and unmap is there (a SIGKILL keeps the page
//!   cache, so this is stronger than "what a flush covered"; losing data on
//!   power loss is what the flushes' fsyncs guard against);
//! - every request that was in flight at the kill left its block either old
//!   or new, never anything else;
//! - every acknowledged snapshot exists and shows exactly the volume as it
//!   was when taken.
//!
//! At the end the directory is opened in-process and its in-memory index is
//! compared with the files.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shorthorn::replica::client::Client;
use shorthorn::replica::Replica;

use cluster::{content, free_addr, Proc};

const BLOCKS: u64 = 2048;
const SIZE: u64 = BLOCKS * 4096;
const ROUNDS: usize = 24;

fn spawn_replica(dir: &Path, addr: &str) -> Proc {
    cluster::spawn_replica(dir, SIZE, addr)
}

async fn connect(addr: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("replica at {addr} never came up: {e}"),
        }
    }
}

/// What the test knows about the volume.
#[derive(Default)]
struct Model {
    /// block -> tag of its last acknowledged write (absent: zeros).
    blocks: HashMap<u64, u32>,
    /// block -> the values it may hold because a request was in flight.
    maybe: HashMap<u64, Vec<Option<u32>>>,
    /// Acknowledged snapshots and the volume each shows.
    snaps: BTreeMap<String, HashMap<u64, u32>>,
    /// A snapshot create (true) or remove (false) in flight at the kill.
    snap_in_flight: Option<(String, bool, HashMap<u64, u32>)>,
}

async fn verify_volume(c: &Client, m: &mut Model) {
    let data = c.read(0, SIZE).await.unwrap();
    for b in 0..BLOCKS {
        let got = &data[b as usize * 4096..(b as usize + 1) * 4096];
        let matches = |v: Option<u32>| match v {
            Some(t) => got == content(b, t).as_slice(),
            None => got.iter().all(|&x| x == 0),
        };
        let acked = m.blocks.get(&b).copied();
        if let Some(options) = m.maybe.remove(&b) {
            let hit = std::iter::once(acked)
                .chain(options)
                .find(|v| matches(*v))
                .unwrap_or_else(|| {
                    panic!("block {b} holds neither its old nor any in-flight value")
                });
            match hit {
                Some(t) => m.blocks.insert(b, t),
                None => m.blocks.remove(&b),
            };
        } else {
            assert!(
                matches(acked),
                "block {b}: acknowledged value {acked:?} lost"
            );
        }
    }
}

async fn resolve_snapshots(c: &Client, m: &mut Model) {
    let layers = c.list().await.unwrap();
    let names: Vec<String> = layers
        .iter()
        .filter(|l| !l.head)
        .map(|l| l.name.clone())
        .collect();
    if let Some((name, create, state)) = m.snap_in_flight.take() {
        let exists = names.contains(&name);
        match (create, exists) {
            (true, true) => {
                m.snaps.insert(name, state);
            }
            (false, true) => {
                // The removal was cut short; as an engine would, finish it.
                c.remove_snapshot(&name)
                    .await
                    .expect("retried removal succeeds");
                m.snaps.remove(&name);
                return Box::pin(resolve_snapshots(c, m)).await;
            }
            (false, false) => {
                m.snaps.remove(&name);
            }
            (true, false) => {}
        }
    }
    assert!(
        layers.iter().all(|l| !l.removed),
        "no removal is left half-done unless one was in flight"
    );
    for n in m.snaps.keys() {
        assert!(
            names.contains(n),
            "acknowledged snapshot {n} is gone; have {names:?}"
        );
    }
}

/// Runs operations until the connection dies, recording acknowledgements.
async fn workload(c: Client, m: Arc<Mutex<Model>>, seed: u64, tag0: u32) {
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut tag = tag0;
    let mut nsnap = 0;
    loop {
        // A batch of concurrent single-block writes and small unmaps on distinct blocks.
        let mut batch = Vec::new();
        let mut used = std::collections::HashSet::new();
        for _ in 0..32 {
            let b = next() % BLOCKS;
            if !used.insert(b) {
                continue;
            }
            tag += 1;
            let t = tag;
            let unmap = next() % 8 == 0;
            m.lock()
                .unwrap()
                .maybe
                .entry(b)
                .or_default()
                .push(if unmap { None } else { Some(t) });
            let c = c.clone();
            let m = Arc::clone(&m);
            batch.push(tokio::spawn(async move {
                let r = if unmap {
                    c.unmap(b * 4096, 4096).await
                } else {
                    c.write(b * 4096, Bytes::from(content(b, t))).await
                };
                if r.is_ok() {
                    let mut g = m.lock().unwrap();
                    g.maybe.remove(&b);
                    if unmap {
                        g.blocks.remove(&b);
                    } else {
                        g.blocks.insert(b, t);
                    }
                }
                r.is_ok()
            }));
        }
        let mut all_ok = true;
        for t in batch {
            all_ok &= t.await.unwrap();
        }
        if !all_ok || c.flush().await.is_err() {
            return;
        }
        let roll = next() % 10;
        let done = if roll < 2 {
            nsnap += 1;
            let name = format!("s{seed:x}-{nsnap}");
            let state = m.lock().unwrap().blocks.clone();
            let op = c.snapshot(&name, Default::default());
            snapshot_op(&m, name.clone(), Some(state), op).await
        } else if roll == 2 {
            let victim = {
                let g = m.lock().unwrap();
                let n = g.snaps.len() as u64;
                (n > 0).then(|| g.snaps.keys().nth((next() % n) as usize).unwrap().clone())
            };
            match victim {
                Some(name) => snapshot_op(&m, name.clone(), None, c.remove_snapshot(&name)).await,
                None => true,
            }
        } else {
            true
        };
        if !done {
            return;
        }
    }
}

/// Runs a snapshot create (`state` is what it will show) or remove (`None`),
/// recording it as in flight until acknowledged. False if the replica died.
async fn snapshot_op(
    m: &Mutex<Model>,
    name: String,
    state: Option<HashMap<u64, u32>>,
    op: impl std::future::Future<Output = Result<(), shorthorn::replica::client::ClientError>>,
) -> bool {
    let create = state.is_some();
    let shown = state.unwrap_or_default();
    m.lock().unwrap().snap_in_flight = Some((name.clone(), create, shown.clone()));
    if op.await.is_err() {
        return false;
    }
    let mut g = m.lock().unwrap();
    g.snap_in_flight = None;
    if create {
        g.snaps.insert(name, shown);
    } else {
        g.snaps.remove(&name);
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_and_snapshot_operations_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica");
    let model = Arc::new(Mutex::new(Model::default()));
    for round in 0..ROUNDS {
        let addr = free_addr();
        let mut child = spawn_replica(&path, &addr);
        let c = connect(&addr).await;
        {
            let mut m = std::mem::take(&mut *model.lock().unwrap());
            verify_volume(&c, &mut m).await;
            resolve_snapshots(&c, &mut m).await;
            *model.lock().unwrap() = m;
        }
        let seed = 0x1234_5678_9abc_def1u64.wrapping_mul(round as u64 + 1);
        let work = tokio::spawn(workload(
            c.clone(),
            Arc::clone(&model),
            seed,
            (round as u32 + 1) * 1_000_000,
        ));
        let delay = 30 + (seed >> 7) % 400;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // Every call in flight fails promptly; none hangs.
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .expect("client calls return after the replica dies")
            .unwrap();
    }

    // Final check: head, then every acknowledged snapshot's view.
    let addr = free_addr();
    let mut child = spawn_replica(&path, &addr);
    let c = connect(&addr).await;
    let mut m = std::mem::take(&mut *model.lock().unwrap());
    verify_volume(&c, &mut m).await;
    resolve_snapshots(&c, &mut m).await;
    assert!(
        !m.snaps.is_empty() || ROUNDS < 3,
        "the workload took snapshots"
    );
    let snaps = m.snaps.clone();
    for (name, state) in &snaps {
        c.revert(name).await.unwrap();
        m.blocks = state.clone();
        verify_volume(&c, &mut m).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        child.0.wait().unwrap().success(),
        "clean shutdown on SIGTERM"
    );
    let vm =
        shorthorn::replica::meta::decode_volume(&std::fs::read(path.join("volume.meta")).unwrap())
            .unwrap();
    assert!(!vm.dirty, "a clean shutdown clears the dirty flag");
    let r = Replica::open(&path, None).unwrap();
    r.check_index().unwrap();
    eprintln!(
        "after {ROUNDS} kills: {} blocks hold data, {} snapshots verified, revision {}",
        m.blocks.len(),
        snaps.len(),
        r.revision()
    );
    assert!(
        r.revision() > 1000,
        "the workload made progress between kills"
    );
}
