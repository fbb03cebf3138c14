//! The controller's store survives SIGKILL at any instant: a child
//! process commits transactions (each moving a "balance" between two
//! records and bumping a counter record, conditioned on the versions it
//! read) and reports each acknowledged commit on stdout; it is killed at
//! a random moment, the store is reopened, and it must hold at least
//! every acknowledged commit, with every transaction all-or-nothing (the
//! balances always sum to the same total).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shorthorn::store::{Db, Expect, Kind, Op, Store};

const ACCOUNTS: u64 = 8;
const TOTAL: u64 = ACCOUNTS * 1000;

fn read_u64(s: &dyn Store, kind: Kind, key: &str) -> Option<(u64, u64)> {
    s.get(kind, key).unwrap().map(|v| {
        (
            v.version,
            u64::from_le_bytes(v.value.as_slice().try_into().unwrap()),
        )
    })
}

fn setup(s: &dyn Store) {
    if read_u64(s, Kind::Node, "counter").is_some() {
        return;
    }
    let mut ops: Vec<Op> = (0..ACCOUNTS)
        .map(|i| Op::Put {
            kind: Kind::Volume,
            key: format!("acct-{i}"),
            value: 1000u64.to_le_bytes().to_vec(),
            expect: Expect::Absent,
        })
        .collect();
    ops.push(Op::Put {
        kind: Kind::Node,
        key: "counter".into(),
        value: 0u64.to_le_bytes().to_vec(),
        expect: Expect::Absent,
    });
    s.commit(ops).unwrap();
}

fn check(s: &dyn Store) -> u64 {
    let sum: u64 = (0..ACCOUNTS)
        .map(|i| read_u64(s, Kind::Volume, &format!("acct-{i}")).unwrap().1)
        .sum();
    assert_eq!(sum, TOTAL, "a transaction was applied in part");
    read_u64(s, Kind::Node, "counter").unwrap().1
}

/// Commits transfers until killed, printing the counter after each
/// acknowledged commit. Not a test by itself.
#[test]
#[ignore = "a child process of commits_survive_sigkill_at_any_instant"]
fn store_child() {
    let path = std::env::var("SHORTHORN_TEST_STORE_CHILD")
        .expect("run by commits_survive_sigkill_at_any_instant");
    let db = Db::open(Path::new(&path)).unwrap();
    setup(&db);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(std::process::id());
    loop {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (a, b) = (rng % ACCOUNTS, (rng >> 8) % ACCOUNTS);
        if a == b {
            continue;
        }
        let (ka, kb) = (format!("acct-{a}"), format!("acct-{b}"));
        let (va, xa) = read_u64(&db, Kind::Volume, &ka).unwrap();
        let (vb, xb) = read_u64(&db, Kind::Volume, &kb).unwrap();
        let (vc, n) = read_u64(&db, Kind::Node, "counter").unwrap();
        let amount = (rng >> 16) % (xa + 1);
        db.commit(vec![
            Op::Put {
                kind: Kind::Volume,
                key: ka,
                value: (xa - amount).to_le_bytes().to_vec(),
                expect: Expect::Version(va),
            },
            Op::Put {
                kind: Kind::Volume,
                key: kb,
                value: (xb + amount).to_le_bytes().to_vec(),
                expect: Expect::Version(vb),
            },
            Op::Put {
                kind: Kind::Node,
                key: "counter".into(),
                value: (n + 1).to_le_bytes().to_vec(),
                expect: Expect::Version(vc),
            },
        ])
        .unwrap();
        println!("acked {}", n + 1);
    }
}

#[test]
fn commits_survive_sigkill_at_any_instant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut last_acked = 0;
    for round in 0..12u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SHORTHORN_TEST_STORE_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        // Read acknowledgements on a thread; kill after a varying number.
        let want = 5 + round * 7;
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = 0;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("acked ") {
                    acked = n.trim().parse::<u64>().unwrap();
                    let _ = tx.send(acked);
                }
            }
            acked
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < last_acked + want {
            seen = rx
                .recv_timeout(deadline - Instant::now())
                .expect("child made progress");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        let db = Db::open(&path).unwrap();
        let counter = check(&db);
        assert!(
            counter >= acked,
            "round {round}: {acked} commits acknowledged, store holds {counter}"
        );
        last_acked = counter;
    }
}
