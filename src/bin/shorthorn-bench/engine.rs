//! `engine`: the same I/O patterns on a file directly, then through
//! `engine::Volume` (the engine's own Rust API, in this process) over one
//! and over three `shorthorn replica` processes on loopback. Frontends are
//! not involved, so their overhead stays visible in their own benchmark.
//!
//! Each configuration gets fresh replica directories; file, r1 and r3 run
//! in turn `reps` times and the medians are reported, so noise on this
//! shared machine hits all three.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use shorthorn::engine::{Options, Volume};

use super::{
    async_random, async_seq, cpu_seconds, file_random, file_seq, fill, machine_ticks, median,
    BoxError, Opts, ReplicaProc, Report, Rng, Scratch, GIB, MIB, MIB_BYTES,
};

/// Configurations, in the order they run and print.
const CONFIGS: [&str; 3] = ["file", "r1", "r3"];

/// The figures each configuration reports (as `<config>_<key>`).
const KEYS: [&str; 5] = [
    "randwrite_4k_qd16_iops",
    "randread_4k_qd16_iops",
    "randwrite_4k_qd1_p50_us",
    "randwrite_4k_qd1_p99_us",
    "seqwrite_1m_mbps",
];

/// Writes timed one at a time for the latency percentiles.
const QD1_OPS: usize = 4000;

pub(crate) fn bench_engine(o: &Opts) -> Result<(), BoxError> {
    shorthorn::raise_fd_limit();
    let mut rep = Report::default();
    let region = if o.quick { 256 * MIB } else { GIB };
    let rand_ops = if o.quick { 20_000 } else { 100_000 };
    let seq_bytes = if o.quick { 256 * MIB } else { GIB };
    let reps = if o.quick { 1 } else { 3 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-engine")
        .enable_all()
        .build()?;
    let mut samples: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut push = |k: String, v: f64| samples.entry(k).or_default().push(v);
    for _ in 0..reps {
        for cfg in CONFIGS {
            let s = Scratch::new(&o.dir, cfg)?;
            let r = match cfg {
                "file" => run_file(&s, region, rand_ops, seq_bytes)?,
                _ => {
                    let n = if cfg == "r1" { 1 } else { 3 };
                    rt.block_on(run_volume(o, &s, n, region, rand_ops, seq_bytes))?
                }
            };
            for (k, v) in r {
                push(format!("{cfg}_{k}"), v);
            }
        }
    }
    for cfg in CONFIGS {
        for k in KEYS {
            let key = format!("{cfg}_{k}");
            let unit = super::unit_of(k);
            rep.add(&key, median(samples.remove(&key).unwrap_or_default()), unit);
        }
    }
    // The key is the mirrored case; r1's is printed beside it.
    for (key, sample) in [
        ("r1_engine_cpu_us_per_io", "r1_engine_cpu_us_per_io"),
        ("engine_cpu_us_per_io", "r3_engine_cpu_us_per_io"),
        ("r1_replicas_cpu_us_per_io", "r1_replicas_cpu_us_per_io"),
        ("r3_replicas_cpu_us_per_io", "r3_replicas_cpu_us_per_io"),
    ] {
        rep.add(
            key,
            median(samples.remove(sample).unwrap_or_default()),
            "us",
        );
    }
    for cfg in ["r1", "r3"] {
        let key = format!("{cfg}_machine_busy_pct");
        rep.add(&key, median(samples.remove(&key).unwrap_or_default()), "%");
    }
    print_engine(o, &rep);
    Ok(())
}

fn percentile(sorted: &[f64], per_mille: usize) -> f64 {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

fn new_file(path: &std::path::Path) -> std::io::Result<Arc<std::fs::File>> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map(Arc::new)
}

fn run_file(
    s: &Scratch,
    region: u64,
    rand_ops: usize,
    seq_bytes: u64,
) -> Result<Vec<(&'static str, f64)>, BoxError> {
    let f = new_file(&s.0.join("file.img"))?;
    f.set_len(64 * GIB)?;
    let mut out = vec![(
        "randwrite_4k_qd16_iops",
        file_random(&f, 0, region, rand_ops, true)?,
    )];
    f.sync_all()?;
    let mut lat = Vec::with_capacity(QD1_OPS);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let buf = vec![0x66u8; 4096];
    for _ in 0..QD1_OPS {
        let off = region + (rng.next() % (region / 4096)) * 4096;
        let t = Instant::now();
        std::os::unix::fs::FileExt::write_all_at(&*f, &buf, off)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    out.push(("randwrite_4k_qd1_p50_us", percentile(&lat, 500)));
    out.push(("randwrite_4k_qd1_p99_us", percentile(&lat, 990)));
    fill(&f, region)?;
    out.push((
        "randread_4k_qd16_iops",
        file_random(&f, 0, region, rand_ops, false)?,
    ));
    let f2 = new_file(&s.0.join("seq.img"))?;
    out.push(("seqwrite_1m_mbps", file_seq(&f2, seq_bytes)?));
    Ok(out)
}

async fn run_volume(
    o: &Opts,
    s: &Scratch,
    n: usize,
    region: u64,
    rand_ops: usize,
    seq_bytes: u64,
) -> Result<Vec<(&'static str, f64)>, BoxError> {
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..n {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        procs.push(ReplicaProc::start(
            &o.shorthorn,
            &s.0.join(format!("r{i}")),
            &addr,
        )?);
        super::connect(&addr).await?;
        addrs.push(addr);
    }
    let v = Volume::open_with("bench", 1 << 40, &addrs, Options::default()).await?;
    let me = std::process::id();
    let replicas_cpu =
        || -> Result<f64, BoxError> { procs.iter().map(|p| cpu_seconds(p.pid())).sum() };
    let (cpu0, rcpu0, (busy0, total0)) = (cpu_seconds(me)?, replicas_cpu()?, machine_ticks()?);
    let mut out = vec![(
        "randwrite_4k_qd16_iops",
        vol_random(&v, 0, region, rand_ops, true).await?,
    )];
    let per_io = |secs: f64| secs * 1e6 / rand_ops as f64;
    out.push(("engine_cpu_us_per_io", per_io(cpu_seconds(me)? - cpu0)));
    out.push(("replicas_cpu_us_per_io", per_io(replicas_cpu()? - rcpu0)));
    let (busy1, total1) = machine_ticks()?;
    out.push((
        "machine_busy_pct",
        100.0 * (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
    ));
    v.flush().await?;
    let mut lat = Vec::with_capacity(QD1_OPS);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let buf = Bytes::from(vec![0x66u8; 4096]);
    for _ in 0..QD1_OPS {
        let off = region + (rng.next() % (region / 4096)) * 4096;
        let t = Instant::now();
        v.write(off, buf.clone()).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    out.push(("randwrite_4k_qd1_p50_us", percentile(&lat, 500)));
    out.push(("randwrite_4k_qd1_p99_us", percentile(&lat, 990)));
    let chunk = Bytes::from(vec![0x3cu8; MIB_BYTES]);
    let mut off = 0;
    while off < region {
        v.write(off, chunk.clone()).await?;
        off += MIB;
    }
    v.flush().await?;
    out.push((
        "randread_4k_qd16_iops",
        vol_random(&v, 0, region, rand_ops, false).await?,
    ));
    out.push((
        "seqwrite_1m_mbps",
        vol_seq(&v, 2 * GIB + region, seq_bytes).await?,
    ));
    drop(v);
    drop(procs);
    Ok(out)
}

async fn vol_random(
    v: &Volume,
    base: u64,
    region: u64,
    ops: usize,
    write: bool,
) -> Result<f64, BoxError> {
    let v = v.clone();
    let buf = Bytes::from(vec![0x77u8; 4096]);
    async_random(base, region, ops, move |_, off| {
        let (v, buf) = (v.clone(), buf.clone());
        async move {
            if write {
                v.write(off, buf).await
            } else {
                v.read(off, 4096).await.map(drop)
            }
        }
    })
    .await
}

async fn vol_seq(v: &Volume, base: u64, total: u64) -> Result<f64, BoxError> {
    let buf = Bytes::from(vec![0x42u8; MIB_BYTES]);
    let v2 = v.clone();
    let t = Instant::now();
    async_seq(total, move |off| {
        let (v, buf) = (v2.clone(), buf.clone());
        async move { v.write(base + off, buf).await }
    })
    .await?;
    v.flush().await?;
    Ok(total as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

fn print_engine(o: &Opts, rep: &Report) {
    let ratio = rep.get("r3_randwrite_4k_qd16_iops") / rep.get("r1_randwrite_4k_qd16_iops");
    if o.json {
        println!(
            "{}",
            rep.json(&[("r3_over_r1_randwrite_4k_qd16", ratio)], o.quick)
        );
        return;
    }
    println!(
        "shorthorn engine benchmark (engine API, no frontend){}",
        if o.quick {
            " (--quick: reduced sizes, not comparable)"
        } else {
            ""
        }
    );
    println!(
        "{:<26} {:>12} {:>12} {:>12}",
        "metric", CONFIGS[0], CONFIGS[1], CONFIGS[2]
    );
    for k in KEYS {
        let v: Vec<f64> = CONFIGS
            .iter()
            .map(|c| rep.get(&format!("{c}_{k}")))
            .collect();
        println!("{k:<26} {:>12.1} {:>12.1} {:>12.1}", v[0], v[1], v[2]);
    }
    println!();
    println!(
        "engine CPU per 4 KiB write at QD16 (this process: engine + load generator): r1 {:.1} us, r3 {:.1} us",
        rep.get("r1_engine_cpu_us_per_io"),
        rep.get("engine_cpu_us_per_io")
    );
    println!(
        "replica processes' CPU per 4 KiB write at QD16 (all replicas): r1 {:.1} us, r3 {:.1} us",
        rep.get("r1_replicas_cpu_us_per_io"),
        rep.get("r3_replicas_cpu_us_per_io")
    );
    println!(
        "machine CPU busy during that phase ({} cores): r1 {:.0}%, r3 {:.0}%",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rep.get("r1_machine_busy_pct"),
        rep.get("r3_machine_busy_pct")
    );
    println!(
        "4 KiB randwrite QD16, r3/r1: {ratio:.2} ({} target >= 0.60)",
        if ratio >= 0.6 { "meets" } else { "MISSES" }
    );
}
