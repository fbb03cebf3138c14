//! Real replica processes for the engine tests: start, signal, stop, and
//! compare what their directories hold.

#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shorthorn::replica::Replica;

#[path = "../common/mod.rs"]
pub mod common;
pub mod csi;
pub use common::content;

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves no replica behind holding its pipes.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        signal(&self.0, nix::sys::signal::Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM and wait: the replica closes cleanly.
    pub fn stop(mut self) {
        signal(&self.0, nix::sys::signal::Signal::SIGTERM);
        let st = self.0.wait().unwrap();
        assert!(st.success(), "replica exited with {st}");
    }
}

pub fn signal(c: &Child, s: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap()),
        s,
    );
}

/// A free loopback address.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Starts a replica of `size` bytes in `dir` listening on `addr`.
pub fn spawn_replica(dir: &Path, size: u64, addr: &str) -> Proc {
    spawn_replica_of(dir, size, addr, None)
}

/// [`spawn_replica`], told which volume it serves when `volume` is given.
pub fn spawn_replica_of(dir: &Path, size: u64, addr: &str, volume: Option<&str>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
    cmd.args(["replica", "--size", &size.to_string(), "--listen", addr]);
    if let Some(v) = volume {
        cmd.args(["--volume", v]);
    }
    let child = cmd
        .arg("--dir")
        .arg(dir)
        .env("SHORTHORN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn shorthorn replica");
    Proc(child)
}

/// [`spawn_replica`], then waits until it accepts connections.
pub fn start_replica_at(dir: &Path, size: u64, addr: &str) -> Proc {
    let p = spawn_replica(dir, size, addr);
    wait_listening(addr);
    p
}

/// A replica of volume `volume` on a free address, up.
pub fn start_replica_of(dir: &Path, size: u64, volume: &str) -> (Proc, String) {
    let addr = free_addr();
    let p = spawn_replica_of(dir, size, &addr, Some(volume));
    wait_listening(&addr);
    (p, addr)
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing ever listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`start_replica_at`] on a free address.
pub fn start_replica(dir: &Path, size: u64) -> (Proc, String) {
    let addr = free_addr();
    (start_replica_at(dir, size, &addr), addr)
}

/// `n` replicas of `size` bytes in `root/r0`, `root/r1`, ..., each up.
pub fn start_replicas(root: &Path, n: usize, size: u64) -> Replicas {
    let mut r = Replicas::default();
    for i in 0..n {
        let dir = root.join(format!("r{i}"));
        let (p, a) = start_replica(&dir, size);
        r.procs.push(p);
        r.dirs.push(dir);
        r.addrs.push(a);
    }
    r
}

/// What [`start_replicas`] started, index by index.
#[derive(Default)]
pub struct Replicas {
    /// The processes.
    pub procs: Vec<Proc>,
    /// Their directories.
    pub dirs: Vec<std::path::PathBuf>,
    /// Their addresses.
    pub addrs: Vec<String>,
}

/// The tag of a block written by [`content`], `Some(0)` for zeros, `None`
/// for anything else (torn or misplaced data).
pub fn tag_of(block: u64, data: &[u8]) -> Option<u32> {
    if data.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let tag = u32::from_le_bytes(data[8..12].try_into().unwrap());
    (data == content(block, tag).as_slice()).then_some(tag)
}

/// SHA-256 of everything a (stopped) replica directory's volume reads as.
pub fn replica_digest(dir: &Path, size: u64) -> Vec<u8> {
    use sha2::Digest;
    let r = Replica::open(dir, None).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        r.read(off, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().to_vec()
}

/// Flushes, closes the (in-process) engine, stops the replicas cleanly and
/// checks they all hold the same volume.
pub async fn stop_and_compare(
    v: shorthorn::engine::Volume,
    procs: Vec<Proc>,
    dirs: &[std::path::PathBuf],
    size: u64,
    what: &str,
) {
    v.flush().await.unwrap();
    drop(v);
    for p in procs {
        p.stop();
    }
    let d: Vec<_> = dirs.iter().map(|d| replica_digest(d, size)).collect();
    assert!(d.windows(2).all(|w| w[0] == w[1]), "{what}");
}

/// `shorthorn engine-ctl --addr control ARGS...`.
pub fn ctl(control: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(["engine-ctl", "--addr", control])
        .args(args)
        .output()
        .unwrap()
}

/// [`ctl`], which must succeed, its JSON output parsed.
pub fn ctl_json(control: &str, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "engine-ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// GET `path` over plain HTTP/1.1; the whole response, headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
