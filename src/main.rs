//! The `shorthorn` binary: one executable, one subcommand per mode.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use shorthorn::error::ErrorKind;
use shorthorn::replica::client::{Client, ClientError};
use shorthorn::replica::{self, Replica};
use shorthorn::units::parse_size;

#[derive(Parser, Debug)]
#[command(
    name = "shorthorn",
    version,
    about = "Replicated block storage for Kubernetes"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "compact",
        env = "SHORTHORN_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Compact,
    Json,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Serve one replica of one volume from a directory.
    Replica(ReplicaArgs),
    /// Drive a running replica: I/O, snapshots, info.
    ReplicaCtl(ReplicaCtlArgs),
}

#[derive(Parser, Debug)]
struct ReplicaArgs {
    /// Replica directory (created when missing).
    #[arg(long, env = "SHORTHORN_REPLICA_DIR")]
    dir: PathBuf,
    /// Volume size, e.g. 1073741824, 512Mi, 1Gi, 1Ti. Required to create a
    /// replica; checked against an existing one.
    #[arg(long, value_parser = parse_size, env = "SHORTHORN_REPLICA_SIZE")]
    size: Option<u64>,
    /// host:port to listen on.
    #[arg(long, env = "SHORTHORN_REPLICA_LISTEN")]
    listen: String,
    /// Volume name, for logs.
    #[arg(long, default_value = "", env = "SHORTHORN_VOLUME")]
    volume: String,
}

#[derive(Parser, Debug)]
struct ReplicaCtlArgs {
    /// host:port of the replica.
    #[arg(long, env = "SHORTHORN_REPLICA_ADDR")]
    addr: String,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Size, chain, revision, flags (JSON).
    Info,
    /// Every layer with sizes and timestamps (JSON).
    List,
    /// Write bytes at an offset: a repeated byte (--pattern) or stdin.
    Write {
        /// Byte offset (4 KiB-aligned; quantities like 1Mi accepted).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// Length (4 KiB multiple) when writing a pattern.
        #[arg(long, value_parser = parse_size)]
        len: Option<u64>,
        /// Byte value to fill with, e.g. 0xab or 171; without it, stdin is written.
        #[arg(long, value_parser = parse_byte)]
        pattern: Option<u8>,
    },
    /// Read bytes at an offset to stdout.
    Read {
        /// Byte offset (4 KiB-aligned).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// Length (4 KiB multiple).
        #[arg(long, value_parser = parse_size)]
        len: u64,
    },
    /// Trim a range: it reads back as zeros.
    Unmap {
        /// Byte offset (4 KiB-aligned).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// Length (4 KiB multiple).
        #[arg(long, value_parser = parse_size)]
        len: u64,
    },
    /// Make all acknowledged writes durable.
    Flush,
    /// Snapshot the head.
    Snapshot {
        /// Snapshot name.
        name: String,
        /// Labels, key=value.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Remove a snapshot (its data merges into its child).
    RemoveSnapshot {
        /// Snapshot name.
        name: String,
    },
    /// Revert the head to a snapshot.
    Revert {
        /// Snapshot name.
        name: String,
    },
    /// Grow the volume.
    Expand {
        /// New size, e.g. 2Gi.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// List a layer's data extents with CRC32C checksums (JSON).
    Extents {
        /// Snapshot name or `head`.
        layer: String,
    },
}

fn parse_byte(s: &str) -> Result<u8, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a byte value (0-255 or 0x00-0xff)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be key=value"))?;
    Ok((k.into(), v.into()))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHORTHORN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Compact => b.compact().init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shorthorn: {e:#}");
            std::process::ExitCode::from(kind_of(&e).map_or(1, ErrorKind::exit_code))
        }
    }
}

/// The kind of the first layer error found in the chain, if any.
fn kind_of(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain().find_map(|c| {
        c.downcast_ref::<ClientError>()
            .map(ClientError::kind)
            .or_else(|| c.downcast_ref::<replica::Error>().map(replica::Error::kind))
    })
}

fn run(cli: Cli) -> Result<()> {
    init_logging(cli.log_format);
    shorthorn::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Replica(a) => run_replica(a).await,
            Mode::ReplicaCtl(a) => run_ctl(a).await,
        }
    })
}

async fn run_replica(a: ReplicaArgs) -> Result<()> {
    let span = tracing::info_span!("replica", volume.id = %a.volume, replica.addr = %a.listen);
    let _g = span.enter();
    let dir = a.dir.clone();
    let size = a.size;
    let r = tokio::task::spawn_blocking(move || Replica::open(&dir, size))
        .await?
        .with_context(|| format!("opening replica in {}", a.dir.display()))?;
    let r = Arc::new(r);
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let info = r.info();
    tracing::info!(size = info.size, revision = info.revision, chain = ?info.chain, "serving");
    let server = tokio::spawn(replica::server::serve(listener, Arc::clone(&r)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        res = server => { res??; }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    tokio::task::spawn_blocking(move || r.close()).await??;
    Ok(())
}

async fn run_ctl(a: ReplicaCtlArgs) -> Result<()> {
    let c = Client::connect(&a.addr).await?;
    let mut out = std::io::stdout().lock();
    match a.cmd {
        CtlCmd::Info => writeln!(out, "{}", serde_json::to_string_pretty(&c.info().await?)?)?,
        CtlCmd::List => writeln!(out, "{}", serde_json::to_string_pretty(&c.list().await?)?)?,
        CtlCmd::Write {
            offset,
            len,
            pattern,
        } => {
            let data = match (pattern, len) {
                (Some(p), Some(l)) => vec![p; usize::try_from(l)?],
                (Some(_), None) => bail!("--pattern needs --len"),
                (None, _) => {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    v
                }
            };
            let max = usize::try_from(replica::wire::MAX_IO_BYTES)?;
            for (i, chunk) in data.chunks(max).enumerate() {
                c.write(offset + (i * max) as u64, Bytes::copy_from_slice(chunk))
                    .await?;
            }
            c.flush().await?;
        }
        CtlCmd::Read { offset, len } => {
            let max = replica::wire::MAX_IO_BYTES;
            let mut done = 0;
            while done < len {
                let n = (len - done).min(max);
                out.write_all(&c.read(offset + done, n).await?)?;
                done += n;
            }
        }
        CtlCmd::Unmap { offset, len } => c.unmap(offset, len).await?,
        CtlCmd::Flush => c.flush().await?,
        CtlCmd::Snapshot { name, labels } => {
            c.snapshot(&name, labels.into_iter().collect::<BTreeMap<_, _>>())
                .await?
        }
        CtlCmd::RemoveSnapshot { name } => c.remove_snapshot(&name).await?,
        CtlCmd::Revert { name } => c.revert(&name).await?,
        CtlCmd::Expand { size } => c.expand(size).await?,
        CtlCmd::Extents { layer } => {
            let mut from = 0;
            let mut all = Vec::new();
            loop {
                let page = c.extents(&layer, from, 4096).await?;
                all.extend(page.extents);
                match page.next {
                    Some(n) => from = n,
                    None => break,
                }
            }
            writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        }
    }
    Ok(())
}
