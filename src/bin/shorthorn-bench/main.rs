//! `shorthorn-bench`: the benchmarks behind `scripts/bench`.
//!
//! Every figure is measured beside a baseline taken in the same run on the
//! same machine, and printed as a table or, with `--json`, as one JSON
//! object whose keys are stable (CI keeps them to diff).
//!
//! `engine` is in `engine.rs`, `frontends` in `frontends.rs`. `replica` measures, for a 1 TiB sparse replica: index memory (counted by
//! this binary's global allocator) after 1 GiB written sequentially and after
//! 100,000 random 4 KiB writes; the time to open a chain of 1,000 snapshots;
//! and 4 KiB random write/read IOPS at queue depth 16 and 1 MiB sequential
//! write MB/s through a real `shorthorn replica` process over loopback TCP,
//! beside the same pattern issued by 16 threads with `pwrite`/`pread` on a
//! file opened the way the replica opens its layers (buffered).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shorthorn::replica::client::Client;
use shorthorn::replica::Replica;

/// Counts live heap bytes so index memory is measured, not estimated.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator unchanged and only
// adjusts a counter; layouts and pointers pass through as given.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

mod engine;
mod frontends;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const MIB_BYTES: usize = 1 << 20;
const QD: usize = 16;
const SEQ_QD: usize = 4;
/// Connections the random-I/O client spreads its queue over.
const CONNECTIONS: usize = 2;

struct Opts {
    /// Phases to run (all when empty): index-seq, index-rand, open-chain,
    /// io. For profiling one part.
    only: Vec<String>,
    json: bool,
    quick: bool,
    dir: PathBuf,
    shorthorn: PathBuf,
}

impl Opts {
    fn runs(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: shorthorn-bench PART [--json] [--quick] [--dir DIR] [--shorthorn PATH] [--only PHASE,..]\n\
         parts: replica, engine, frontends"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let part = args.next().unwrap_or_else(|| usage());
    let mut o = Opts {
        only: Vec::new(),
        json: false,
        quick: false,
        dir: std::env::temp_dir(),
        shorthorn: std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("shorthorn")))
            .unwrap_or_else(|| PathBuf::from("shorthorn")),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--quick" => o.quick = true,
            "--only" => {
                o.only = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--dir" => o.dir = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--shorthorn" => {
                o.shorthorn = args.next().map(PathBuf::from).unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let result = match part.as_str() {
        "replica" => bench_replica(&o),
        "engine" => engine::bench_engine(&o),
        "frontends" => frontends::bench_frontends(&o),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("shorthorn-bench: {e}");
        std::process::exit(1);
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(base: &Path, name: &str) -> Result<Self, BoxError> {
        let p = base.join(format!("shorthorn-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64: reproducible offsets without pulling a RNG crate into the binary.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, f64, String)>,
}

impl Report {
    fn add(&mut self, key: &str, value: f64, unit: &str) {
        self.rows.push((key.to_owned(), value, unit.to_owned()));
    }
    /// One JSON object: every row, then `extra`, then whether the run
    /// was quick.
    fn json(&self, extra: &[(&str, f64)], quick: bool) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v, _) in &self.rows {
            m.insert(k.clone(), serde_json::json!(v));
        }
        for (k, v) in extra {
            m.insert((*k).to_owned(), serde_json::json!(v));
        }
        m.insert("quick".into(), serde_json::json!(quick));
        serde_json::Value::Object(m)
    }
    fn get(&self, key: &str) -> f64 {
        self.rows
            .iter()
            .find(|r| r.0 == key)
            .map_or(f64::NAN, |r| r.1)
    }
}

fn bench_replica(o: &Opts) -> Result<(), BoxError> {
    shorthorn::raise_fd_limit();
    let mut rep = Report::default();
    let scale = if o.quick { 10 } else { 1 };

    // --- index memory, sequential
    if o.runs("index-seq") {
        let s = Scratch::new(&o.dir, "seq")?;
        let r = Replica::open(&s.0, Some(TIB))?;
        let buf = vec![0x5au8; MIB_BYTES];
        let total = if o.quick { 128 * MIB } else { GIB };
        let before = LIVE_BYTES.load(Ordering::SeqCst);
        let mut off = 0;
        while off < total {
            r.write(off, &buf)?;
            off += MIB;
        }
        let after = LIVE_BYTES.load(Ordering::SeqCst);
        rep.add(
            "index_bytes_sequential_1gib",
            after.saturating_sub(before) as f64,
            "bytes",
        );
        rep.add(
            "index_entries_sequential_1gib",
            r.index_entries() as f64,
            "entries",
        );
    }
    // --- index memory, random 4 KiB writes over 1 TiB
    if o.runs("index-rand") {
        let s = Scratch::new(&o.dir, "rand")?;
        let r = Replica::open(&s.0, Some(TIB))?;
        let buf = vec![0xa5u8; 4096];
        let n = 100_000 / scale;
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let before = LIVE_BYTES.load(Ordering::SeqCst);
        for _ in 0..n {
            let block = rng.next() % (TIB / 4096);
            r.write(block * 4096, &buf)?;
        }
        let after = LIVE_BYTES.load(Ordering::SeqCst);
        let entries = r.index_entries();
        rep.add("index_entries_random", entries as f64, "entries");
        rep.add(
            "index_bytes_per_extent_random",
            after.saturating_sub(before) as f64 / entries as f64,
            "bytes",
        );
    }
    // --- open time with 1,000 snapshots
    if o.runs("open-chain") {
        let s = Scratch::new(&o.dir, "chain")?;
        let snaps = 1000 / scale;
        {
            let r = Replica::open(&s.0, Some(TIB))?;
            let buf = vec![1u8; 4096];
            for i in 0..snaps {
                r.write(i as u64 * 4096, &buf)?;
                r.snapshot(&format!("s{i}"), true, BTreeMap::new())?;
            }
            r.close()?;
        }
        let t = Instant::now();
        let r = Replica::open(&s.0, None)?;
        rep.add(
            "open_seconds_1000_snapshots",
            t.elapsed().as_secs_f64(),
            "s",
        );
        drop(r);
    }
    // --- I/O: direct on a file vs through a replica process
    let region = if o.quick { 256 * MIB } else { GIB };
    let rand_ops = 100_000 / scale;
    let seq_bytes = if o.quick { 256 * MIB } else { 2 * GIB };
    if o.runs("io") {
        let reps = if o.quick { 1 } else { 3 };
        let s = Scratch::new(&o.dir, "io")?;
        let open = |name: &str| -> std::io::Result<Arc<std::fs::File>> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(s.0.join(name))?;
            f.set_len(TIB)?;
            Ok(Arc::new(f))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let proc_ = ReplicaProc::start(&o.shorthorn, &s.0.join("r"), &addr)?;
        let pid = proc_.0.id();
        let conns = rt.block_on(async {
            let mut conns = Vec::new();
            for _ in 0..CONNECTIONS {
                conns.push(connect(&addr).await?);
            }
            Ok::<_, BoxError>(conns)
        })?;
        // File and replica alternate, `reps` times each, and the medians are
        // reported, so a burst of noise on this shared machine hits both.
        let f = open("file.img")?;
        let (mut fw, mut rw, mut fr, mut rr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut cpu_per_write = Vec::new();
        // Each write repetition goes to a fresh, never-written region, so
        // every one measures the same thing: writes into a sparse volume.
        for i in 0..reps {
            let base = (i as u64 + 1) * 4 * GIB;
            // Start each measurement with no dirty pages left from the last
            // one, so neither side pays for the other's writeback.
            settle(&f, &rt, &conns[0])?;
            fw.push(file_random(&f, base, region, rand_ops, true)?);
            settle(&f, &rt, &conns[0])?;
            let cpu0 = cpu_seconds(pid)?;
            rw.push(rt.block_on(net_random(&conns, base, region, rand_ops, true))?);
            cpu_per_write.push((cpu_seconds(pid)? - cpu0) * 1e6 / rand_ops as f64);
        }
        rep.add(
            "replica_cpu_us_per_randwrite_4k",
            median(cpu_per_write),
            "us",
        );
        fill(&f, region)?;
        rt.block_on(net_fill(&conns[0], region))?;
        for _ in 0..reps {
            fr.push(file_random(&f, 0, region, rand_ops, false)?);
            rr.push(rt.block_on(net_random(&conns, 0, region, rand_ops, false))?);
        }
        rep.add("randwrite_4k_qd16_iops_file", median(fw), "IOPS");
        rep.add("randwrite_4k_qd16_iops_replica", median(rw), "IOPS");
        rep.add("randread_4k_qd16_iops_file", median(fr), "IOPS");
        rep.add("randread_4k_qd16_iops_replica", median(rr), "IOPS");
        // Sequential writes go to fresh space on both sides: a new file, and
        // a new head after a snapshot.
        let f2 = open("seq.img")?;
        rep.add("seqwrite_1m_mbps_file", file_seq(&f2, seq_bytes)?, "MB/s");
        let seq = rt.block_on(async {
            conns[0].snapshot("before-seq", BTreeMap::new()).await?;
            net_seq(&conns[0], seq_bytes).await
        })?;
        rep.add("seqwrite_1m_mbps_replica", seq, "MB/s");
        // For context only (the replica writes through the page cache): the
        // same random writes with O_DIRECT, as `fio --direct=1` issues them.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let fd = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                    .open(s.0.join("direct.img"))?,
            );
            fd.set_len(region)?;
            fill(&fd, region)?;
            let iops = file_random(&fd, 0, region, rand_ops, true)?;
            rep.add("randwrite_4k_qd16_iops_file_odirect", iops, "IOPS");
        }
    }
    print_replica(o, &rep);
    Ok(())
}

/// A zero-filled buffer aligned to 4 KiB, as O_DIRECT requires.
struct Aligned(Vec<u8>, usize);

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let mut v = vec![fill; len + 4096];
        let skip = v.as_ptr().align_offset(4096);
        v.truncate(skip + len);
        Self(v, skip)
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.0[self.1..]
    }
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').ok_or("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Busy and total CPU ticks of the whole machine so far, from `/proc/stat`
/// (busy: everything but idle and iowait).
fn machine_ticks() -> Result<(u64, u64), BoxError> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Writes back everything dirty on both sides (untimed).
fn settle(f: &std::fs::File, rt: &tokio::runtime::Runtime, c: &Client) -> Result<(), BoxError> {
    f.sync_all()?;
    rt.block_on(c.flush())?;
    Ok(())
}

/// The unit a figure's key ends in.
fn unit_of(key: &str) -> &'static str {
    if key.ends_with("iops") {
        "IOPS"
    } else if key.ends_with("us") {
        "us"
    } else {
        "MB/s"
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fill(f: &std::fs::File, region: u64) -> std::io::Result<()> {
    let mut a = Aligned::new(MIB_BYTES, 0x3c);
    let buf = a.buf();
    let mut off = 0;
    while off < region {
        f.write_all_at(buf, off)?;
        off += MIB;
    }
    Ok(())
}

/// `ops` random 4 KiB writes or reads within `base..base + region`, 16 threads.
fn file_random(
    f: &Arc<std::fs::File>,
    base: u64,
    region: u64,
    ops: usize,
    write: bool,
) -> Result<f64, BoxError> {
    let left = Arc::new(AtomicU64::new(ops as u64));
    let t = Instant::now();
    let threads: Vec<_> = (0..QD)
        .map(|i| {
            let f = Arc::clone(f);
            let left = Arc::clone(&left);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
                let mut a = Aligned::new(4096, 0x77);
                let buf = a.buf();
                while left.fetch_sub(1, Ordering::Relaxed) as i64 > 0 {
                    let off = base + (rng.next() % (region / 4096)) * 4096;
                    if write {
                        f.write_all_at(buf, off)?;
                    } else {
                        f.read_exact_at(buf, off)?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for th in threads {
        th.join().map_err(|_| "worker panicked")??;
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

/// `total` bytes of 1 MiB sequential writes, 4 in flight, then fsync (the
/// replica path ends with a flush too).
fn file_seq(f: &Arc<std::fs::File>, total: u64) -> Result<f64, BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let threads: Vec<_> = (0..SEQ_QD)
        .map(|_| {
            let f = Arc::clone(f);
            let next = Arc::clone(&next);
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x42u8; MIB_BYTES];
                loop {
                    let off = next.fetch_add(MIB, Ordering::Relaxed);
                    if off >= total {
                        return Ok(());
                    }
                    f.write_all_at(&buf, off)?;
                }
            })
        })
        .collect();
    for th in threads {
        th.join().map_err(|_| "worker panicked")??;
    }
    f.sync_all()?;
    Ok(total as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

struct ReplicaProc(Child);

impl ReplicaProc {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn start(bin: &Path, dir: &Path, addr: &str) -> Result<Self, BoxError> {
        let child = Command::new(bin)
            .args(["replica", "--size", "1Ti", "--listen", addr, "--dir"])
            .arg(dir)
            .env("SHORTHORN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(Self(child))
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(addr: &str) -> Result<Client, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn net_fill(c: &Client, region: u64) -> Result<(), BoxError> {
    let buf = bytes::Bytes::from(vec![0x3cu8; MIB_BYTES]);
    let mut off = 0;
    while off < region {
        c.write(off, buf.clone()).await?;
        off += MIB;
    }
    c.flush().await?;
    Ok(())
}

async fn net_random(
    conns: &[Client],
    base: u64,
    region: u64,
    ops: usize,
    write: bool,
) -> Result<f64, BoxError> {
    let conns = conns.to_vec();
    let buf = bytes::Bytes::from(vec![0x77u8; 4096]);
    async_random(base, region, ops, move |i, off| {
        let (c, buf) = (conns[i % conns.len()].clone(), buf.clone());
        async move {
            if write {
                c.write(off, buf).await
            } else {
                c.read(off, 4096).await.map(drop)
            }
        }
    })
    .await
}

/// `ops` random 4 KiB requests within `base..base + region` from `QD`
/// tasks; `io(task, offset)` issues one. Returns requests per second.
async fn async_random<F, Fut, E>(base: u64, region: u64, ops: usize, io: F) -> Result<f64, BoxError>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Into<BoxError> + Send + 'static,
{
    let left = Arc::new(AtomicU64::new(ops as u64));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..QD {
        let (io, left) = (io.clone(), Arc::clone(&left));
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            while left.fetch_sub(1, Ordering::Relaxed) as i64 > 0 {
                io(i, base + (rng.next() % (region / 4096)) * 4096).await?;
            }
            Ok::<_, E>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(Into::into)?;
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

/// `total` bytes of 1 MiB sequential writes, `SEQ_QD` in flight;
/// `io(offset)` issues one.
async fn async_seq<F, Fut, E>(total: u64, io: F) -> Result<(), BoxError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Into<BoxError> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SEQ_QD {
        let (io, next) = (io.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let off = next.fetch_add(MIB, Ordering::Relaxed);
                if off >= total {
                    return Ok::<_, E>(());
                }
                io(off).await?;
            }
        }));
    }
    for t in tasks {
        t.await?.map_err(Into::into)?;
    }
    Ok(())
}

async fn net_seq(c: &Client, total: u64) -> Result<f64, BoxError> {
    let buf = bytes::Bytes::from(vec![0x42u8; MIB_BYTES]);
    let c2 = c.clone();
    let t = Instant::now();
    async_seq(total, move |off| {
        let (c, buf) = (c2.clone(), buf.clone());
        async move { c.write(off, buf).await }
    })
    .await?;
    c.flush().await?;
    Ok(total as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

fn print_replica(o: &Opts, rep: &Report) {
    let ratio = |a: &str, b: &str| rep.get(a) / rep.get(b);
    let w_ratio = ratio(
        "randwrite_4k_qd16_iops_replica",
        "randwrite_4k_qd16_iops_file",
    );
    let r_ratio = ratio(
        "randread_4k_qd16_iops_replica",
        "randread_4k_qd16_iops_file",
    );
    let s_ratio = ratio("seqwrite_1m_mbps_replica", "seqwrite_1m_mbps_file");
    if o.json {
        let mut m = serde_json::Map::new();
        for (k, v, _) in &rep.rows {
            m.insert(k.clone(), serde_json::json!(v));
        }
        m.insert("randwrite_4k_qd16_ratio".into(), serde_json::json!(w_ratio));
        m.insert("randread_4k_qd16_ratio".into(), serde_json::json!(r_ratio));
        m.insert("seqwrite_1m_ratio".into(), serde_json::json!(s_ratio));
        m.insert("quick".into(), serde_json::json!(o.quick));
        println!("{}", serde_json::Value::Object(m));
        return;
    }
    println!(
        "shorthorn replica benchmark{}",
        if o.quick {
            " (--quick: reduced sizes, not comparable)"
        } else {
            ""
        }
    );
    println!("{:<34} {:>16} {:<8}", "metric", "value", "unit");
    for (k, v, u) in &rep.rows {
        let prec = if *v < 10.0 { 4 } else { 1 };
        println!("{k:<34} {v:>16.prec$} {u:<8}");
    }
    println!();
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let seq = rep.get("index_bytes_sequential_1gib");
    let per = rep.get("index_bytes_per_extent_random");
    println!(
        "index after 1 GiB sequential: {seq:.0} B ({} target < 1 MiB)",
        verdict(seq < MIB as f64)
    );
    println!(
        "index per random extent: {per:.1} B ({} target < 64 B)",
        verdict(per < 64.0)
    );
    println!(
        "4 KiB randwrite QD16, replica/file: {w_ratio:.2} ({} target >= 0.50)",
        verdict(w_ratio >= 0.5)
    );
    println!("4 KiB randread  QD16, replica/file: {r_ratio:.2}");
    let od = ratio(
        "randwrite_4k_qd16_iops_replica",
        "randwrite_4k_qd16_iops_file_odirect",
    );
    println!("4 KiB randwrite QD16, replica/file with O_DIRECT (context, not the target): {od:.2}");
    println!("1 MiB seqwrite, replica/file:       {s_ratio:.2}");
}
