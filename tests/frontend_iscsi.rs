//! The iSCSI target against independent initiators: libiscsi's tools and
//! conformance suite (`iscsi-inq`, `iscsi-readcapacity16`, `iscsi-ls`,
//! `iscsi-test-cu`) and qemu's iSCSI client (`qemu-io`), each talking to a
//! real engine process over real replica processes on loopback.
//! `scripts/test` installs libiscsi-bin and qemu-block-extra.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

mod cluster;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster::{free_addr, replica_digest, signal, start_replicas, Proc};

const SIZE: u64 = 256 << 20;
const VOLUME: &str = "vol-iscsi";

struct Target {
    _dir: tempfile::TempDir,
    dirs: Vec<std::path::PathBuf>,
    replicas: Vec<Proc>,
    engine: Option<Proc>,
    portal: String,
}

impl Target {
    fn start(n: usize, env: &[(&str, &str)]) -> Self {
        Self::start_with(n, env, &[])
    }

    fn start_with(n: usize, env: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = start_replicas(dir.path(), n, SIZE);
        let (replicas, dirs, addrs) = (r.procs, r.dirs, r.addrs);
        let portal = free_addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shorthorn"));
        cmd.args(["engine", "--volume", VOLUME, "--size", &SIZE.to_string()])
            .args(["--control", &free_addr()])
            .args(["--frontend", "iscsi", "--portal", &portal])
            .args(args)
            .envs(env.iter().copied())
            .env("SHORTHORN_LOG", "warn")
            .stdout(Stdio::null());
        for a in &addrs {
            cmd.args(["--replica", a]);
        }
        let engine = Proc(cmd.spawn().unwrap());
        cluster::wait_listening(&portal);
        Self {
            _dir: dir,
            dirs,
            replicas,
            engine: Some(engine),
            portal,
        }
    }

    fn url(&self, lun: u32) -> String {
        format!(
            "iscsi://{}/iqn.2026-11.io.shorthorn:{VOLUME}/{lun}",
            self.portal
        )
    }

    fn stop_engine(&mut self) {
        let mut e = self.engine.take().unwrap();
        signal(&e.0, nix::sys::signal::Signal::SIGTERM);
        assert!(e.0.wait().unwrap().success());
    }
}

fn tool(cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    output_within(c, Duration::from_secs(120))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = tool(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn libiscsi_tools_discover_inquire_and_size_the_volume() {
    let t = Target::start(1, &[]);
    let ls = ok("iscsi-ls", &[&format!("iscsi://{}", t.portal)]);
    assert!(
        ls.contains(&format!(
            "Target:iqn.2026-11.io.shorthorn:{VOLUME} Portal:{},1",
            t.portal
        )),
        "{ls}"
    );
    let inq = ok("iscsi-inq", &[&t.url(1)]);
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    assert!(inq.contains("CmdQue:1"), "{inq}");
    let pages = ok("iscsi-inq", &["-e", "1", "-c", "0", &t.url(1)]);
    for p in ["0x80", "0x83", "0xb0", "0xb1", "0xb2"] {
        assert!(pages.contains(&format!("Page:{p}")), "{pages}");
    }
    let cap = ok("iscsi-readcapacity16", &[&t.url(1)]);
    assert!(
        cap.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            SIZE / 512 - 1
        )),
        "{cap}"
    );
    assert!(cap.contains("LBPME:1 LBPRZ:1"), "{cap}");
    assert!(cap.contains(&format!("Total size:{SIZE}")), "{cap}");
    // LUN 0 answers as a controller.
    let inq0 = ok("iscsi-inq", &[&t.url(0)]);
    assert!(!inq0.contains("DIRECT_ACCESS"), "{inq0}");
}

#[test]
fn qemu_writes_a_pattern_every_replica_stores_and_reads_it_back() {
    let mut t = Target::start(3, &[]);
    let url = t.url(1);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 1M 3M",
            "-c",
            "write -P 0x3c 1031k 9k",
            &url,
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xa5 1M 7k",
            "-c",
            "read -P 0x3c 1031k 9k",
            "-c",
            "read -P 0xa5 1040k 3056k",
            &url,
        ],
    );
    // A wrong pattern is reported, so the checks above can fail.
    let bad = tool("qemu-io", &["-f", "raw", "-c", "read -P 0x00 1M 4k", &url]);
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"),
        "{bad:?}"
    );
    t.stop_engine();
    for r in t.replicas.drain(..) {
        r.stop();
    }
    let d: Vec<_> = t.dirs.iter().map(|d| replica_digest(d, SIZE)).collect();
    assert!(d[0] == d[1] && d[1] == d[2], "replicas differ");
}

#[test]
fn chap_admits_the_right_secret_only() {
    let env = [
        ("SHORTHORN_CHAP_USER", "alice"),
        ("SHORTHORN_CHAP_SECRET", "s3cret-s3cret"),
    ];
    let t = Target::start(1, &env);
    let good = t.url(1).replace("iscsi://", "iscsi://alice%s3cret-s3cret@");
    ok("iscsi-inq", &[&good]);
    let bad = t.url(1).replace("iscsi://", "iscsi://alice%wrong-wrong-1@");
    assert!(!tool("iscsi-inq", &[&bad]).status.success());
    assert!(!tool("iscsi-inq", &[&t.url(1)]).status.success());
}

#[test]
fn mutual_chap_proves_the_target_to_the_initiator() {
    let env = [
        ("SHORTHORN_CHAP_USER", "alice"),
        ("SHORTHORN_CHAP_SECRET", "s3cret-s3cret"),
        ("SHORTHORN_CHAP_TARGET_USER", "tgt"),
        ("SHORTHORN_CHAP_TARGET_SECRET", "t4rget-t4rget"),
    ];
    let t = Target::start(1, &env);
    let base = t.url(1).replace("iscsi://", "iscsi://alice%s3cret-s3cret@");
    ok(
        "iscsi-inq",
        &[&format!(
            "{base}?target_user=tgt&target_password=t4rget-t4rget"
        )],
    );
    // The initiator refuses a target that does not know its secret.
    let wrong = format!("{base}?target_user=tgt&target_password=other-secret");
    assert!(!tool("iscsi-inq", &[&wrong]).status.success());
}

#[test]
fn hostile_bytes_are_dropped_without_touching_the_volume() {
    let t = Target::start(1, &[]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 64k", &t.url(1)],
    );
    let attempts: [Vec<u8>; 3] = [
        // Garbage where a login should be.
        (0..48u8).map(|i| i.wrapping_mul(7)).collect(),
        // A SCSI command before any login.
        {
            let mut h = vec![0u8; 48];
            h[0] = 0x01;
            h[1] = 0xa0;
            h[32] = 0x2a;
            h
        },
        // A login announcing a data segment far beyond what was declared.
        {
            let mut h = vec![0u8; 48];
            h[0] = 0x43;
            h[1] = 0x87;
            h[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
            h
        },
    ];
    for bytes in attempts {
        let mut s = std::net::TcpStream::connect(&t.portal).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut buf = Vec::new();
        // The target answers with a refusal or just closes; it never hangs.
        let _ = s.read_to_end(&mut buf);
    }
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 0 64k", &t.url(1)],
    );
}

#[test]
fn iscsi_test_cu_passes_at_least_as_many_tests_as_tgt() {
    // No NOP-In pings: libiscsi's synchronous API reads a connection only
    // while a call on it runs, and the suite leaves contexts idle for over
    // a minute (its first one, extra sessions), so it cannot answer them.
    // Dropped for silence, such a context is later reconnected or logged
    // out, and libiscsi can block forever on that (a CI run hung for an
    // hour right after two such drops; sahlberg/libiscsi#185). tgt sends
    // no pings either; a_silent_initiator_is_pinged_then_dropped_and_one_
    // that_answers_stays tests them.
    let t = Target::start_with(1, &[], &["--iscsi-nop-secs", "0"]);
    // The suite provokes the target into dropping connections (bad
    // DataSN, ...) and libiscsi then reconnects; a write that races such
    // a drop gets EPIPE, and with SIGPIPE at its default (which Rust
    // restores for children) the whole suite would die of it. Real
    // initiators ignore SIGPIPE; so does the suite here.
    let run = || {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new("iscsi-test-cu");
        c.args(["--dataloss", "-s", &t.url(1)]);
        // SAFETY: only async-signal-safe signal(2) runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                Ok(())
            });
        }
        output_within(c, SUITE_DEADLINE)
    };
    let summary = |out: &Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.trim_start().starts_with("tests "))
            .map(str::to_owned)
    };
    let mut out = run();
    if summary(&out).is_none() {
        // Should it stop (or be stopped at the deadline) without a summary,
        // that is reported with the test it was in, and the suite is run
        // once more; a second such stop fails the test.
        let tail: Vec<_> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(8)
            .map(str::to_owned)
            .collect();
        eprintln!(
            "iscsi-test-cu stopped without a summary ({}); stderr: {}; last lines: {tail:?}; running it again",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out = run();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = summary(&out).unwrap_or_else(|| {
        panic!(
            "no summary ({}; stderr: {}) in:\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let (total, passed) = (n[0], n[2]);
    eprintln!("iscsi-test-cu: {passed} of {total} passed");
    assert!(passed >= MIN_PASSED, "{passed} of {total} passed:\n{text}");
}

/// A whole suite run took 72 to 101 s here; one that has not ended in this
/// long is stuck (a CI run once waited on it for over an hour).
const SUITE_DEADLINE: Duration = Duration::from_secs(360);

/// Runs `c` to its end, or kills it at `limit`, and returns what it printed
/// either way.
fn output_within(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{c:?} is needed ({e}); run scripts/test"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            eprintln!("{c:?} still running after {limit:?}; killing it");
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The floor the conformance run must keep. The issue asks for tgt's
/// figure (tgt 1.0.85 passes 598 of 615 on this machine); this target
/// passed 610 when the floor was last raised, and the floor sits two below
/// that for timing-sensitive tests. The README lists the 5 it fails.
const MIN_PASSED: u32 = 608;

/// A minimal initiator over a raw socket, for what the real ones will not
/// do on purpose.
struct Raw {
    s: std::net::TcpStream,
    cmd_sn: u32,
}

impl Raw {
    fn login(portal: &str, keys: &[(&str, &str)]) -> Self {
        use shorthorn::frontend::iscsi::pdu::{at, encode, op, Bhs, Framing};
        let mut s = std::net::TcpStream::connect(portal).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut h = Bhs::new(op::LOGIN_REQ);
        h.set_immediate();
        h.set_flags(0x87);
        // A fresh ISID per session: the same one would reinstate (end)
        // the previous session.
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        h.0[8..14].copy_from_slice(&[0x23, 0xd0, 0, 0, 0, n]);
        h.set_itt(1);
        h.set_u32(at::CMDSN, 1);
        let target = format!("iqn.2026-11.io.shorthorn:{VOLUME}");
        let mut all = vec![
            ("InitiatorName", "iqn.2026-11.test:raw"),
            ("TargetName", target.as_str()),
        ];
        all.extend_from_slice(keys);
        let plain = Framing {
            header_digest: false,
            data_digest: false,
        };
        s.write_all(&encode(
            h,
            &shorthorn::frontend::iscsi::text::encode(&all),
            plain,
        ))
        .unwrap();
        let mut r = Self { s, cmd_sn: 1 };
        let (rsp, _) = r.read();
        assert_eq!((rsp.0[36], rsp.0[37]), (0, 0), "login refused");
        r
    }

    fn read(&mut self) -> (shorthorn::frontend::iscsi::pdu::Bhs, Vec<u8>) {
        let mut h = [0u8; 48];
        self.s.read_exact(&mut h).unwrap();
        let bhs = shorthorn::frontend::iscsi::pdu::Bhs(h);
        let mut d = vec![0u8; bhs.data_len().next_multiple_of(4)];
        self.s.read_exact(&mut d).unwrap();
        d.truncate(bhs.data_len());
        (bhs, d)
    }

    fn write16(&mut self, itt: u32, lba: u64, blocks: u32) {
        use shorthorn::frontend::iscsi::pdu::{at, encode, op, Bhs, Framing};
        let mut h = Bhs::new(op::SCSI_CMD);
        h.set_flags(0xa0);
        h.set_lun(1);
        h.set_itt(itt);
        h.set_u32(at::EDTL, blocks * 512);
        h.set_u32(at::CMDSN, self.cmd_sn);
        self.cmd_sn += 1;
        h.0[32] = 0x8a;
        h.0[34..42].copy_from_slice(&lba.to_be_bytes());
        h.0[42..46].copy_from_slice(&blocks.to_be_bytes());
        let plain = Framing {
            header_digest: false,
            data_digest: false,
        };
        self.s.write_all(&encode(h, &[], plain)).unwrap();
    }
}

#[test]
fn an_initiator_announcing_more_write_data_than_it_sends_is_held_to_a_budget() {
    let t = Target::start(1, &[]);
    let mut r = Raw::login(&t.portal, &[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
    // Nine 32 MiB writes whose data never comes: the target solicits the
    // first eight (256 MiB, its per-connection budget) and answers the
    // ninth with TASK SET FULL instead of buffering it.
    for itt in 1..=9 {
        r.write16(itt, u64::from(itt) * 65536, 65536);
    }
    let mut r2t = 0;
    loop {
        let (h, _) = r.read();
        match h.opcode() {
            0x31 => r2t += 1,
            0x21 => {
                assert_eq!((h.itt(), h.0[3]), (9, 0x28), "{h:?}");
                break;
            }
            o => panic!("unexpected opcode {o:#x}"),
        }
    }
    assert_eq!(r2t, 8);
    drop(r);
    ok("iscsi-inq", &[&t.url(1)]);
}

#[test]
fn random_pdus_after_login_never_take_the_target_down() {
    use shorthorn::frontend::iscsi::pdu::{encode, Bhs, Framing};
    let mut t = Target::start(1, &[]);
    let plain = Framing {
        header_digest: false,
        data_digest: false,
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20 {
        let mut r = Raw::login(&t.portal, &[]);
        r.s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for _ in 0..50 {
            let mut h = Bhs([0u8; 48]);
            for chunk in h.0.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes()[..chunk.len()]);
            }
            // Initiator opcodes and a few that only targets send.
            let ops = [0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10, 0x21, 0x3f, 0x1c];
            h.0[0] = ops[next() as usize % ops.len()] | (h.0[0] & 0x40);
            h.0[4] = 0;
            let data: Vec<u8> = (0..next() % 2048).map(|_| next() as u8).collect();
            if r.s.write_all(&encode(h, &data, plain)).is_err() {
                break;
            }
        }
        // Drain what the target answered until it closes or goes quiet.
        let mut buf = [0u8; 4096];
        while let Ok(1..) = r.s.read(&mut buf) {}
    }
    let engine = t.engine.as_mut().unwrap();
    assert!(engine.0.try_wait().unwrap().is_none(), "the engine died");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
            &t.url(1),
        ],
    );
}

#[test]
fn a_silent_initiator_is_pinged_then_dropped_and_one_that_answers_stays() {
    use shorthorn::frontend::iscsi::pdu::{at, encode, op, Bhs, Framing, NO_TAG};
    let t = Target::start_with(1, &[], &["--iscsi-nop-secs", "1"]);
    let mut silent = Raw::login(&t.portal, &[]);
    let mut lively = Raw::login(&t.portal, &[]);
    // The lively one answers every ping for four seconds, then is still
    // served.
    let lively = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            let (ping, _) = lively.read();
            assert_eq!(ping.opcode(), op::NOP_IN);
            let mut h = Bhs::new(op::NOP_OUT);
            h.set_immediate();
            h.set_flags(0x80);
            h.set_itt(NO_TAG);
            h.set_u32(at::TTT, ping.u32_at(at::TTT));
            h.set_u32(at::CMDSN, lively.cmd_sn);
            let plain = Framing {
                header_digest: false,
                data_digest: false,
            };
            lively.s.write_all(&encode(h, &[], plain)).unwrap();
        }
        lively.write16(1, 0, 0);
        let (rsp, _) = lively.read();
        assert_eq!((rsp.opcode(), rsp.itt(), rsp.0[3]), (op::SCSI_RSP, 1, 0));
    });
    // The silent one gets a ping, then the connection ends.
    let start = Instant::now();
    let (ping, _) = silent.read();
    assert_eq!(
        (ping.opcode(), ping.itt()),
        (op::NOP_IN, NO_TAG),
        "{ping:?}"
    );
    let mut rest = Vec::new();
    silent.s.read_to_end(&mut rest).unwrap();
    let dropped = start.elapsed();
    assert!(
        dropped < Duration::from_secs(5),
        "dropped after {dropped:?}"
    );
    lively.join().unwrap();
}
