//! The FUSE frontend as a node uses it: an engine process over replica
//! processes serves the volume as a file, a loop device (`--direct-io=on`)
//! over it becomes a block device, and real filesystem tools run on it:
//! mkfs, mount, a verifying fio job, fstrim, fsck, remount.

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{ctl_json, free_addr, http_get, signal, start_replicas, Proc};
use super::{require_root, run};

const SIZE: u64 = 512 << 20;

/// Replicas and an engine serving the volume as `dir/vol`.
struct Volume {
    dir: tempfile::TempDir,
    replicas: Vec<Proc>,
    replica_dirs: Vec<PathBuf>,
    engine: Option<Proc>,
    control: String,
    metrics: String,
}

impl Volume {
    fn start(n: usize) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let r = start_replicas(dir.path(), n, SIZE);
        let addrs = r.addrs;
        let mut v = Self {
            dir,
            replicas: r.procs,
            replica_dirs: r.dirs,
            engine: None,
            control: free_addr(),
            metrics: free_addr(),
        };
        v.engine = Some(v.spawn_engine(&addrs));
        v.wait_mounted();
        v
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("vol")
    }

    fn addrs(&self) -> Vec<String> {
        // The engine's status lists its replicas in the order given.
        ctl_json(&self.control, &["status"])["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap().to_owned())
            .collect()
    }

    fn spawn_engine(&self, addrs: &[String]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
        cmd.args(["engine", "--volume", "fusevol", "--size", &SIZE.to_string()])
            .args(["--control", &self.control, "--metrics", &self.metrics])
            .args(["--frontend", "fuse", "--path"])
            .arg(self.path())
            .env("SHORTHORN_LOG", "warn")
            .stdout(Stdio::null());
        for a in addrs {
            cmd.args(["--replica", a]);
        }
        Proc(cmd.spawn().unwrap())
    }

    /// Waits until the file is served: mounted, answering (a mount left by
    /// a killed engine is listed too, but cannot be opened), with the
    /// volume's size.
    fn wait_mounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(is_fuse_mount(&self.path())
            && std::fs::File::open(self.path())
                .is_ok_and(|f| f.metadata().is_ok_and(|m| m.len() == SIZE)))
        {
            assert!(
                Instant::now() < deadline,
                "the engine never mounted {}",
                self.path().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM the engine; it must exit cleanly and leave nothing mounted.
    fn stop_engine(&mut self) {
        let mut e = self.engine.take().unwrap();
        signal(&e.0, nix::sys::signal::Signal::SIGTERM);
        let st = e.0.wait().unwrap();
        assert!(st.success(), "engine exited with {st}");
        assert!(
            !is_fuse_mount(&self.path()),
            "{} is still mounted",
            self.path().display()
        );
    }

    /// Volume-level requests of `op` the engine counted.
    fn volume_requests(&self, op: &str) -> u64 {
        let m = http_get(&self.metrics, "/metrics");
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("shorthorn_volume_requests_total{")
                    && l.contains(&format!("op=\"{op}\""))
            })
            .unwrap_or_else(|| panic!("no {op} counter in {m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // An engine killed by a failing test leaves a dead FUSE mount;
        // detach it so the temporary directory can go.
        drop(self.engine.take());
        if is_fuse_mount(&self.path()) {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

fn is_fuse_mount(path: &Path) -> bool {
    let want = path.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| {
            let mut f = l.split(' ');
            let (_, at, kind) = (f.next(), f.next(), f.next());
            at == Some(want) && kind.is_some_and(|k| k.starts_with("fuse"))
        })
}

/// Bytes a directory's files occupy on disk.
fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn over(file: &Path) -> Self {
        Self(run(
            "losetup",
            &["-f", "--show", "--direct-io=on", file.to_str().unwrap()],
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mounted filesystem, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn at(dev: &str, mnt: &Path) -> Self {
        std::fs::create_dir_all(mnt).unwrap();
        run("mount", &[dev, mnt.to_str().unwrap()]);
        Self(mnt.to_owned())
    }

    fn unmount(self) {
        run("umount", &[self.0.to_str().unwrap()]);
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The verifying fio job: 4 KiB random writes at queue depth 16 with
/// direct I/O, each block carrying a CRC32C header checked on read-back.
fn fio(mnt: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("fio");
    c.args([
        "--name=verify",
        "--size=48M",
        "--bs=4k",
        "--rw=randwrite",
        "--ioengine=libaio",
        "--iodepth=16",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=7",
        "--verify_state_save=0",
    ])
    .arg(format!("--filename={}", mnt.join("fio.dat").display()))
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn fio_ok(c: &mut Command) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("fio is needed ({e}); run scripts/test, which installs it"));
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn digests(v: &Volume, which: &[usize]) -> Vec<Vec<u8>> {
    which
        .iter()
        .map(|&i| super::cluster::replica_digest(&v.replica_dirs[i], SIZE))
        .collect()
}

#[test]
fn ext4_on_the_fuse_file_survives_fio_verify_trim_fsck_and_remount() {
    let mut v = Volume::start(3);
    let mnt = v.dir.path().join("mnt");
    let lo = Loop::over(&v.path());
    run("mkfs.ext4", &["-q", &lo.0]);
    let fs = Mounted::at(&lo.0, &mnt);
    let flushes = v.volume_requests("flush");
    fio_ok(&mut fio(&mnt, &["--do_verify=1"]));

    // Trim frees the replicas' space: write 32 MiB, delete it, fstrim.
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", mnt.join("junk").display()),
            "bs=1M",
            "count=32",
            "conv=fsync",
            "status=none",
        ],
    );
    run("sync", &[]);
    let before: Vec<u64> = v.replica_dirs.iter().map(|d| allocated(d)).collect();
    std::fs::remove_file(mnt.join("junk")).unwrap();
    run("sync", &[]);
    let out = run("fstrim", &["-v", mnt.to_str().unwrap()]);
    assert!(!out.contains(" 0 B "), "fstrim trimmed nothing: {out}");
    for (d, b) in v.replica_dirs.iter().zip(&before) {
        let after = allocated(d);
        assert!(
            after + (24 << 20) <= *b,
            "{}: {b} bytes before the trim, {after} after",
            d.display()
        );
    }
    assert!(
        v.volume_requests("flush") > flushes,
        "the filesystem's flushes never reached the engine"
    );

    fs.unmount();
    run("e2fsck", &["-fn", &lo.0]);
    let fs = Mounted::at(&lo.0, &mnt);
    fio_ok(&mut fio(&mnt, &["--verify_only"]));
    fs.unmount();
    drop(lo);
    v.stop_engine();
    let d = digests(&v, &[0, 1, 2]);
    assert!(d[0] == d[1] && d[1] == d[2], "replicas differ");
}

#[test]
fn xfs_on_the_fuse_file_keeps_every_write_when_a_replica_is_killed() {
    let mut v = Volume::start(3);
    let addrs = v.addrs();
    let mnt = v.dir.path().join("mnt");
    let lo = Loop::over(&v.path());
    run("mkfs.xfs", &["-q", &lo.0]);
    let fs = Mounted::at(&lo.0, &mnt);
    let job = fio(&mnt, &["--do_verify=1"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    signal(&v.replicas[1].0, nix::sys::signal::Signal::SIGKILL);
    let out = job.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed after a replica was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = ctl_json(&v.control, &["status"]);
    assert_eq!(st["health"], "degraded", "{st}");
    let failed: Vec<&str> = st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["mode"] == "failed")
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(failed, [addrs[1].as_str()], "{st}");

    fs.unmount();
    run("xfs_repair", &["-n", &lo.0]);
    let fs = Mounted::at(&lo.0, &mnt);
    fio_ok(&mut fio(&mnt, &["--verify_only"]));
    fs.unmount();
    drop(lo);
    v.stop_engine();
    let d = digests(&v, &[0, 2]);
    assert!(d[0] == d[1], "the surviving replicas differ");
}

/// Opens the served file with `flags` (e.g. `O_DIRECT`).
fn open(path: &Path, flags: i32) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .unwrap()
}

fn fallocate(f: &std::fs::File, mode: i32, offset: i64, len: i64) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) };
    nix::errno::Errno::result(r).map(drop)
}

/// A 4 KiB-aligned buffer for `O_DIRECT`.
fn aligned(fill: u8) -> Box<[u8]> {
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    let p = Box::new(Page([fill; 4096]));
    // SAFETY: Page is exactly 4096 initialised bytes.
    unsafe { Box::from_raw(Box::into_raw(p).cast::<[u8; 4096]>()) }
}

#[test]
fn the_fuse_file_maps_direct_io_fsync_trim_and_refuses_what_it_cannot_do() {
    let mut v = Volume::start(2);
    let path = v.path();

    // O_DIRECT writes and reads, and byte-granular buffered writes.
    let f = open(&path, libc::O_DIRECT);
    let page = aligned(0xab);
    f.write_all_at(&page, 1 << 20).unwrap();
    let mut back = aligned(0);
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(back, page);
    let g = open(&path, 0);
    g.write_all_at(b"shorthorn", (1 << 20) + 100).unwrap();
    let flushes = v.volume_requests("flush");
    g.sync_all().unwrap();
    assert!(v.volume_requests("flush") > flushes, "fsync did not flush");
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(&back[100..109], b"shorthorn");
    assert!(back[..100].iter().chain(&back[109..]).all(|&b| b == 0xab));

    // Punching a hole reads back as zeros; preallocating is refused.
    fallocate(
        &g,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        (1 << 20) + 512,
        1024,
    )
    .unwrap();
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert!(back[512..1536].iter().all(|&b| b == 0));
    assert_eq!(back[511], 0xab);
    assert_eq!(back[1536], 0xab);
    assert_eq!(
        fallocate(&g, 0, 0, 4096),
        Err(nix::errno::Errno::EOPNOTSUPP)
    );
    // The size is the volume's: truncating and writing past it fail.
    let e = g.set_len(SIZE / 2).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = g.write_all_at(b"x", SIZE).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG)),
        "{e}"
    );
    drop((f, g));

    // A second engine cannot take a path that one serves.
    let out = Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(["engine", "--volume", "x", "--size", &SIZE.to_string()])
        .args(["--control", &free_addr(), "--replica", "127.0.0.1:1"])
        .args(["--frontend", "fuse", "--path"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("already served"), "{err}");

    // An engine killed outright leaves a dead mount; the next one on the
    // same path clears it and serves the data that was flushed.
    let addrs = v.addrs();
    let mut e = v.engine.take().unwrap();
    e.0.kill().unwrap();
    e.0.wait().unwrap();
    let err = std::fs::File::open(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    v.engine = Some(v.spawn_engine(&addrs));
    v.wait_mounted();
    let f = open(&path, libc::O_DIRECT);
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(&back[100..109], b"shorthorn");

    // Stopping the engine while a loop device holds the file detaches it;
    // I/O through the orphaned loop device then fails instead of hanging.
    drop(f);
    let lo = Loop::over(&path);
    v.stop_engine();
    let dev = open(Path::new(&lo.0), libc::O_DIRECT);
    let e = dev.read_exact_at(&mut back, 0).unwrap_err();
    assert!(e.raw_os_error().is_some(), "{e}");
}
