//! `shorthorn engine` and `shorthorn engine-ctl` as a user runs them: an
//! engine process over three replica processes, driven through its gRPC
//! control API by the CLI, with its Prometheus endpoint scraped over HTTP.

mod cluster;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{ctl, ctl_json, free_addr, http_get, start_replica, start_replicas, Proc};

const SIZE: u64 = 32 << 20;

fn start_engine(replicas: &[String], control: &str, metrics: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
    cmd.args(["engine", "--volume", "vol", "--size", "32Mi"])
        .args(["--control", control, "--metrics", metrics])
        .env("SHORTHORN_LOG", "warn")
        .stdout(Stdio::null());
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    let p = Proc(cmd.spawn().unwrap());
    cluster::wait_listening(control);
    p
}

#[test]
fn the_engine_is_driven_through_its_control_api_and_exports_metrics() {
    let root = tempfile::tempdir().unwrap();
    let r = start_replicas(root.path(), 3, SIZE);
    let (_procs, addrs) = (r.procs, r.addrs);
    let (control, metrics) = (free_addr(), free_addr());
    let _engine = start_engine(&addrs, &control, &metrics);

    let st = ctl_json(&control, &["status"]);
    assert_eq!(st["health"], "healthy", "{st}");
    assert_eq!(st["size_bytes"], SIZE);
    assert_eq!(st["replicas"].as_array().unwrap().len(), 3);
    assert!(st["replicas"][0]["revision"].is_u64(), "{st}");

    let snaps = ctl_json(&control, &["snapshot", "daily", "--label", "tier=gold"]);
    let daily = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "daily")
        .unwrap()
        .clone();
    assert_eq!(daily["labels"]["tier"], "gold");

    // A replica taken out is forgotten (the volume's health is its
    // remaining members'); put back, it rebuilds and serves again.
    let st = ctl_json(&control, &["remove-replica", &addrs[2]]);
    assert_eq!(st["health"], "healthy", "{st}");
    let listed: Vec<&str> = st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [&addrs[0], &addrs[1]], "{st}");
    ctl_json(&control, &["add-replica", &addrs[2]]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = ctl_json(&control, &["status"]);
        if st["health"] == "healthy" {
            assert!(st["replicas"][2]["rebuild"].is_object(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "never healed: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = ctl_json(&control, &["expand", "64Mi"]);
    assert_eq!(st["size_bytes"], 64u64 << 20);

    let m = http_get(&metrics, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("shorthorn_volume_health{volume=\"vol\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("shorthorn_volume_size_bytes{volume=\"vol\"} 67108864"),
        "{m}"
    );
    let mode = format!(
        "shorthorn_replica_mode{{volume=\"vol\",replica=\"{}\",mode=\"read_write\"}} 1",
        addrs[2]
    );
    assert!(m.contains(&mode), "{m}");
    assert!(m.contains("shorthorn_volume_request_seconds_bucket"), "{m}");

    // Errors: the exact kind, as the exit status, and a one-line message.
    let out = ctl(&control, &["snapshot", "daily"]);
    assert_eq!(out.status.code(), Some(4), "already exists");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        ctl(&control, &["remove-snapshot", "nope"]).status.code(),
        Some(3)
    );
    assert_eq!(
        ctl(&control, &["add-replica", &addrs[0]]).status.code(),
        Some(4)
    );
    assert_eq!(ctl(&control, &["expand", "16Mi"]).status.code(), Some(2));
    assert_eq!(ctl(&control, &["snapshot", "a/b"]).status.code(), Some(2));
    let unused = free_addr();
    assert_eq!(ctl(&unused, &["status"]).status.code(), Some(5));
    let st = ctl_json(&control, &["status"]);
    assert_eq!(
        st["health"], "healthy",
        "a refused request changed the volume: {st}"
    );
}

#[test]
fn an_engine_with_bad_arguments_says_what_to_fix() {
    let root = tempfile::tempdir().unwrap();
    let (_p, a) = start_replica(&root.path().join("r"), SIZE);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shorthorn"))
            .arg("engine")
            .args(args)
            .env("SHORTHORN_LOG", "off")
            .output()
            .unwrap()
    };
    let control = free_addr();
    let base = ["--volume", "vol", "--control", &control];
    let out = run(&[
        &base[..],
        &["--size", "32Mi", "--replica", &a, "--replica", &a],
    ]
    .concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("named twice"));
    let out = run(&[&base[..], &["--size", "64Mi", "--replica", &a]].concat());
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[&base[..], &["--size", "32Mi", "--replica", &free_addr()]].concat());
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_interrupted_by_an_engine_kill_is_redone_not_promoted() {
    use bytes::Bytes;
    use shorthorn::engine::{Health, Mode, Volume};

    let root = tempfile::tempdir().unwrap();
    let r = start_replicas(root.path(), 3, SIZE);
    let (procs, dirs, addrs) = (r.procs, r.dirs, r.addrs);
    // 16 MiB of data on replicas 0 and 1.
    let v = Volume::open("vol", SIZE, &addrs[..2]).await.unwrap();
    for i in 0..16u8 {
        let data = Bytes::from(vec![i + 1; 1 << 20]);
        v.write(u64::from(i) << 20, data).await.unwrap();
    }
    v.flush().await.unwrap();
    drop(v);

    // An engine process rebuilds replica 2 at 2 MiB/s and is killed midway.
    let (control, metrics) = (free_addr(), free_addr());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
    cmd.args([
        "engine",
        "--volume",
        "vol",
        "--size",
        "32Mi",
        "--rebuild-rate",
        "2Mi",
    ])
    .args(["--control", &control, "--metrics", &metrics])
    .args(["--replica", &addrs[0], "--replica", &addrs[1]])
    .env("SHORTHORN_LOG", "warn");
    let engine = Proc(cmd.spawn().unwrap());
    cluster::wait_listening(&control);
    ctl_json(&control, &["add-replica", &addrs[2]]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = ctl_json(&control, &["status"]);
        let r = &st["replicas"][2];
        assert_eq!(r["mode"], "write_only", "{st}");
        if r["rebuild"]["done_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "rebuild never started: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(engine); // SIGKILL

    // The next engine sees an incomplete replica: it serves from the other
    // two, rebuilds the third, and only then is the volume healthy.
    let v = Volume::open("vol", SIZE, &addrs).await.unwrap();
    let st = v.status();
    assert_ne!(st.replicas[2].mode, Mode::ReadWrite, "{st:?}");
    assert_eq!(st.health, Health::Degraded);
    let deadline = Instant::now() + Duration::from_secs(60);
    while v.status().health != Health::Healthy {
        assert!(Instant::now() < deadline, "never rebuilt: {:?}", v.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster::stop_and_compare(
        v,
        procs,
        &dirs,
        SIZE,
        "replicas differ after the redone rebuild",
    )
    .await;
}
