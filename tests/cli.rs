//! The command line says what is wrong and exits with the documented code.

use std::process::Command;

fn shorthorn(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(args)
        .env("SHORTHORN_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_size_is_refused_with_what_to_write_instead() {
    let (code, err) = shorthorn(&[
        "replica",
        "--dir",
        "/nonexistent",
        "--listen",
        "127.0.0.1:0",
        "--size",
        "1Gb",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown suffix") && err.contains("Gi"),
        "{err}"
    );
}

#[test]
fn a_missing_replica_without_size_is_not_found() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, err) = shorthorn(&["replica", "--dir", dir, "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("pass --size"), "{err}");
}

#[test]
fn an_unreachable_replica_is_unavailable() {
    // Port 1 on loopback: nothing listens there.
    let (code, err) = shorthorn(&["replica-ctl", "--addr", "127.0.0.1:1", "info"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.starts_with("shorthorn: connecting to replica 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn a_misaligned_write_is_an_invalid_argument() {
    let d = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(["replica", "--size", "1Mi", "--listen", &addr, "--dir"])
        .arg(d.path())
        .env("SHORTHORN_LOG", "off")
        .spawn()
        .unwrap();
    let mut result = None;
    for _ in 0..200 {
        let (code, err) = shorthorn(&[
            "replica-ctl",
            "--addr",
            &addr,
            "write",
            "--offset",
            "1000",
            "--len",
            "4Ki",
            "--pattern",
            "1",
        ]);
        if code != 5 {
            result = Some((code, err));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    let (code, err) = result.expect("replica came up");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("multiples of 4096"), "{err}");
}

#[test]
fn a_replica_directory_may_be_a_bare_relative_name() {
    let d = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(["replica", "--dir", "r1", "--size", "1Mi"])
        .args(["--listen", &addr.to_string()])
        .current_dir(d.path())
        .env("SHORTHORN_LOG", "off")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("replica exited with {st}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica never came up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(d.path().join("r1/volume.meta").exists());
}
