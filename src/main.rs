//! The `shorthorn` binary: one executable, one subcommand per mode.

mod csi_cli;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use shorthorn::engine::{self, control};
use shorthorn::error::ErrorKind;
use shorthorn::frontend;
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
    /// Serve one volume mirrored over its replicas, with its control API.
    Engine(EngineArgs),
    /// Drive a running engine through its control API.
    EngineCtl(EngineCtlArgs),
    /// Serve the CSI Identity and Controller services and the manager API.
    Controller(ControllerArgs),
    /// Serve one node: CSI Identity and Node, the agent API, its instances.
    Node(NodeArgs),
    /// Start replica and engine processes for `shorthorn node --launcher`,
    /// from a container of its own.
    Launcher(LauncherArgs),
    /// Run a controller and N nodes on this machine behind one CSI socket
    /// serving Identity, Controller and Node (for trying shorthorn out and
    /// for csi-sanity). Needs root for attaching and mounting.
    Dev(DevArgs),
    /// A CSI client: one subcommand per RPC of a volume's life, answers as
    /// JSON (try it against `shorthorn dev`).
    Csi(csi_cli::CsiArgs),
}

#[derive(Parser, Debug)]
struct DevArgs {
    /// Directory for everything: controller state, node disks, sockets.
    #[arg(long)]
    data_dir: PathBuf,
    /// CSI endpoint, unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    csi_endpoint: String,
    /// Nodes to run (each on its own loopback address 127.0.0.N); volumes
    /// get min(3, N) replicas unless their parameters say otherwise.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
    /// How volumes reach the kernel (as `shorthorn node --frontend`).
    #[arg(long, value_enum, env = "SHORTHORN_FRONTEND", default_value = "auto")]
    frontend: NodeFrontend,
    /// Volumes each node may have attached at once (as `shorthorn node
    /// --max-volumes`); 0 means no limit.
    #[arg(long, default_value_t = 0)]
    max_volumes: u32,
}

#[derive(Parser, Debug)]
struct NodeArgs {
    /// CSI node id (unique in the cluster; usually the Kubernetes node name).
    #[arg(long, env = "SHORTHORN_NODE_ID")]
    node_id: String,
    /// CSI endpoint, unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    csi_endpoint: String,
    /// ip:port of this node's agent API; replicas listen on the same IP.
    #[arg(long, env = "SHORTHORN_AGENT_LISTEN")]
    agent_listen: std::net::SocketAddr,
    /// host:port of the controller's manager API.
    #[arg(long, env = "SHORTHORN_CONTROLLER")]
    controller: String,
    /// A disk for replicas: PATH, PATH:tag,tag, optionally =SIZE to cap
    /// what may be scheduled there (default: the filesystem's size). Repeat
    /// for more disks.
    #[arg(long = "disk", required = true)]
    disks: Vec<shorthorn::node::DiskSpec>,
    /// Tags a StorageClass nodeSelector matches (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// This node's zone (topology.kubernetes.io/zone).
    #[arg(long, env = "SHORTHORN_ZONE")]
    zone: Option<String>,
    /// Volumes this node may have attached at once; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    max_volumes: u32,
    /// Directory for the node's own files (each attached volume's FUSE
    /// file lives under it).
    #[arg(long, default_value = "/var/lib/shorthorn/node")]
    state_dir: PathBuf,
    /// How volumes reach this node's kernel: iscsi (open-iscsi logs in to
    /// the engine's target), fuse (a loop device over the engine's FUSE
    /// file), or auto: iscsi where the kernel has an initiator.
    #[arg(long, value_enum, env = "SHORTHORN_FRONTEND", default_value = "auto")]
    frontend: NodeFrontend,
    /// Start replicas and engines through the `shorthorn launcher` serving
    /// this unix socket (its own container in the node pod, so that a node
    /// plugin container restart leaves the volumes serving) instead of as
    /// this process's children.
    #[arg(long, env = "SHORTHORN_LAUNCHER")]
    launcher: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct LauncherArgs {
    /// The unix socket to serve (mode 0600; a stale one is replaced).
    #[arg(long, env = "SHORTHORN_LAUNCHER")]
    socket: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NodeFrontend {
    /// iscsi where the kernel has an iSCSI initiator and iscsiadm runs,
    /// fuse otherwise.
    Auto,
    /// Always iscsi; the node refuses to start without an initiator.
    Iscsi,
    /// Always fuse.
    Fuse,
}

impl NodeFrontend {
    fn choice(self) -> Option<shorthorn::node::attach::Frontend> {
        use shorthorn::node::attach::Frontend;
        match self {
            Self::Auto => None,
            Self::Iscsi => Some(Frontend::Iscsi),
            Self::Fuse => Some(Frontend::Fuse),
        }
    }
}

#[derive(Parser, Debug)]
struct ControllerArgs {
    /// CSI endpoint, unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    csi_endpoint: String,
    /// host:port where node agents and `shorthorn ctl` reach the manager API.
    #[arg(
        long,
        env = "SHORTHORN_CONTROLLER_LISTEN",
        default_value = "0.0.0.0:9530"
    )]
    listen: std::net::SocketAddr,
    /// Directory of the controller's state (state.redb).
    #[arg(long, env = "SHORTHORN_DATA_DIR")]
    data_dir: PathBuf,
    /// Replicas per volume when the StorageClass names no numberOfReplicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    default_replicas: u32,
    /// Seconds between checks of attached volumes' health (which also
    /// brings back failed replicas that serve again).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    health_interval_secs: u64,
}

#[derive(Parser, Debug)]
struct EngineArgs {
    /// Volume name.
    #[arg(long, env = "SHORTHORN_VOLUME")]
    volume: String,
    /// Volume size, e.g. 10Gi; every replica must have it (or be smaller
    /// and get rebuilt).
    #[arg(long, value_parser = parse_size, env = "SHORTHORN_VOLUME_SIZE")]
    size: u64,
    /// host:port of a replica; repeat for each.
    #[arg(long = "replica", required = true)]
    replicas: Vec<String>,
    /// host:port for the gRPC control API.
    #[arg(long, env = "SHORTHORN_ENGINE_CONTROL")]
    control: String,
    /// host:port for the Prometheus endpoint (GET /metrics).
    #[arg(long, env = "SHORTHORN_ENGINE_METRICS")]
    metrics: Option<String>,
    /// Rebuild copy rate limit per second, e.g. 100Mi (0: unlimited).
    #[arg(long, value_parser = parse_size, default_value = "200Mi")]
    rebuild_rate: u64,
    /// Seconds a replica may take to answer before it is failed.
    #[arg(long, default_value_t = 8)]
    replica_timeout_secs: u64,
    /// How the volume reaches the kernel; without it, the volume is served
    /// only through the control API's operations.
    #[arg(
        long,
        value_enum,
        requires_if("fuse", "path"),
        requires_if("iscsi", "portal")
    )]
    frontend: Option<FrontendKind>,
    /// File the FUSE frontend serves the volume as (created if missing);
    /// put a loop device over it to get a block device.
    #[arg(long, env = "SHORTHORN_FUSE_PATH", requires = "frontend")]
    path: Option<PathBuf>,
    /// ip:port the iSCSI target listens on (3260 is the standard port).
    #[arg(long, env = "SHORTHORN_ISCSI_PORTAL", requires = "frontend")]
    portal: Option<String>,
    /// Seconds an iSCSI initiator may stay silent before the target pings
    /// it (NOP-In), and again before it drops the connection; 0: never.
    #[arg(long, default_value_t = frontend::iscsi::DEFAULT_NOP.as_secs())]
    iscsi_nop_secs: u64,
    /// CHAP: the name initiators must log in with (with --chap-secret).
    #[arg(long, env = "SHORTHORN_CHAP_USER", requires = "chap_secret")]
    chap_user: Option<String>,
    /// CHAP: the initiators' secret; pass it through the environment so it
    /// does not show in the process list.
    #[arg(
        long,
        env = "SHORTHORN_CHAP_SECRET",
        hide_env_values = true,
        requires = "chap_user"
    )]
    chap_secret: Option<String>,
    /// Mutual CHAP: the name the target answers with.
    #[arg(long, env = "SHORTHORN_CHAP_TARGET_USER", requires_all = ["chap_target_secret", "chap_user"])]
    chap_target_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    #[arg(
        long,
        env = "SHORTHORN_CHAP_TARGET_SECRET",
        hide_env_values = true,
        requires = "chap_target_user"
    )]
    chap_target_secret: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FrontendKind {
    /// One regular file through FUSE (`--path`), for kernels without an
    /// iSCSI initiator.
    Fuse,
    /// An iSCSI target on `--portal`, the volume as LUN 1.
    Iscsi,
}

#[derive(Parser, Debug)]
struct EngineCtlArgs {
    /// host:port of the engine's control API.
    #[arg(long, env = "SHORTHORN_ENGINE_CONTROL")]
    addr: String,
    #[command(subcommand)]
    cmd: EngineCmd,
}

#[derive(Subcommand, Debug)]
enum EngineCmd {
    /// Health, replicas and their modes, rebuild progress (JSON).
    Status,
    /// Add a replica (empty or stale); it rebuilds online.
    AddReplica {
        /// host:port of the replica.
        address: String,
    },
    /// Take a replica out of the volume.
    RemoveReplica {
        /// host:port of the replica.
        address: String,
    },
    /// List the volume's snapshots (JSON).
    Snapshots,
    #[command(flatten)]
    Snap(SnapCmd),
}

/// Snapshot commands both `replica-ctl` and `engine-ctl` take (the engine
/// runs them on every replica, crash-consistently).
#[derive(Subcommand, Debug)]
enum SnapCmd {
    /// Take a snapshot.
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
    /// Revert to a snapshot (the volume must not be in use).
    Revert {
        /// Snapshot name.
        name: String,
    },
    /// Grow the volume (online).
    Expand {
        /// New size, e.g. 2Gi.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
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
    /// Volume name: logged, and an engine working for another volume is
    /// refused (without it, every engine is served).
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
    #[command(flatten)]
    Snap(SnapCmd),
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
            .or_else(|| c.downcast_ref::<engine::Error>().map(engine::Error::kind))
            .or_else(|| {
                c.downcast_ref::<frontend::Error>()
                    .map(frontend::Error::kind)
            })
            .or_else(|| {
                c.downcast_ref::<shorthorn::controller::Error>()
                    .map(shorthorn::controller::Error::kind)
            })
            .or_else(|| {
                c.downcast_ref::<shorthorn::node::Error>()
                    .map(shorthorn::node::Error::kind)
            })
            .or_else(|| {
                c.downcast_ref::<shorthorn::dev::Error>()
                    .map(shorthorn::dev::Error::kind)
            })
            .or_else(|| c.downcast_ref::<Remote>().and_then(|r| r.kind))
            .or_else(|| {
                c.downcast_ref::<tonic::transport::Error>()
                    .map(|_| ErrorKind::Unavailable)
            })
    })
}

fn run(cli: Cli) -> Result<()> {
    init_logging(cli.log_format);
    shorthorn::raise_fd_limit();
    // Threads named after the mode, so `top -H` and profiles tell a
    // replica's work from an engine's on a shared node.
    let thread_name = match &cli.mode {
        Mode::Replica(_) => "sh-replica",
        Mode::Engine(_) => "sh-engine",
        Mode::Controller(_) => "sh-controller",
        Mode::Node(_) => "sh-node",
        Mode::Launcher(_) => "sh-launcher",
        Mode::Dev(_) => "sh-dev",
        Mode::Csi(_) => "sh-ctl",
        Mode::ReplicaCtl(_) | Mode::EngineCtl(_) => "sh-ctl",
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name(thread_name)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Replica(a) => run_replica(a).await,
            Mode::ReplicaCtl(a) => run_ctl(a).await,
            Mode::Engine(a) => run_engine(a).await,
            Mode::EngineCtl(a) => run_engine_ctl(a).await,
            Mode::Controller(a) => run_controller(a).await,
            Mode::Node(a) => run_node(a).await,
            Mode::Launcher(a) => {
                let exe = std::env::current_exe().context("finding this executable")?;
                shorthorn::node::launcher::serve(&a.socket, exe, terminated()).await?;
                Ok(())
            }
            Mode::Dev(a) => run_dev(a).await,
            Mode::Csi(a) => {
                let out = csi_cli::run(a).await.map_err(remote)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(())
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run_controller(a: ControllerArgs) -> Result<()> {
    let cfg = shorthorn::controller::Config {
        csi_socket: shorthorn::controller::unix_endpoint(&a.csi_endpoint)?,
        listen: a.listen,
        data_dir: a.data_dir,
        default_replicas: a.default_replicas,
        health_interval: std::time::Duration::from_secs(a.health_interval_secs),
    };
    shorthorn::controller::run(cfg, terminated()).await?;
    Ok(())
}

async fn run_node(a: NodeArgs) -> Result<()> {
    let socket = shorthorn::csi::unix_endpoint(&a.csi_endpoint)
        .ok_or_else(|| shorthorn::controller::Error::Endpoint(a.csi_endpoint.clone()))?;
    let cfg = shorthorn::node::Config {
        node_id: a.node_id,
        agent_listen: a.agent_listen,
        controller: a.controller,
        disks: a.disks,
        tags: a.tags,
        zone: a.zone,
        max_volumes: a.max_volumes,
        state_dir: a.state_dir,
        frontend: a.frontend.choice(),
        launcher: a.launcher,
    };
    shorthorn::node::run(cfg, &socket, terminated()).await?;
    Ok(())
}

async fn run_dev(a: DevArgs) -> Result<()> {
    let cfg = shorthorn::dev::Config {
        data_dir: a.data_dir,
        socket: shorthorn::controller::unix_endpoint(&a.csi_endpoint)?,
        nodes: usize::from(a.nodes),
        frontend: a.frontend.choice(),
        max_volumes: a.max_volumes,
    };
    shorthorn::dev::run(cfg, terminated()).await?;
    Ok(())
}

async fn run_replica(a: ReplicaArgs) -> Result<()> {
    let span = tracing::info_span!("replica", volume.id = %a.volume, replica.addr = %a.listen);
    let _g = span.enter();
    let dir = a.dir.clone();
    let size = a.size;
    let r = tokio::task::spawn_blocking(move || Replica::open(&dir, size))
        .await?
        .with_context(|| format!("opening replica in {}", a.dir.display()))?;
    let r = if a.volume.is_empty() {
        r
    } else {
        r.for_volume(&a.volume)
    };
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
        CtlCmd::Snap(SnapCmd::Snapshot { name, labels }) => {
            c.snapshot(&name, labels.into_iter().collect::<BTreeMap<_, _>>())
                .await?
        }
        CtlCmd::Snap(SnapCmd::RemoveSnapshot { name }) => c.remove_snapshot(&name).await?,
        CtlCmd::Snap(SnapCmd::Revert { name }) => c.revert(&name).await?,
        CtlCmd::Snap(SnapCmd::Expand { size }) => c.expand(size).await?,
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

async fn run_engine(a: EngineArgs) -> Result<()> {
    let span = tracing::info_span!("engine", volume.id = %a.volume);
    let _g = span.enter();
    let opts = engine::Options {
        timeout: std::time::Duration::from_secs(a.replica_timeout_secs.max(1)),
        rebuild_bytes_per_sec: a.rebuild_rate,
        ..engine::Options::default()
    };
    // Bind first: a taken port is reported before any replica is touched.
    let control_listener = control::bind(&a.control)
        .await
        .with_context(|| format!("listening on {}", a.control))?;
    let metrics_listener = match &a.metrics {
        Some(m) => Some(
            control::bind(m)
                .await
                .with_context(|| format!("listening on {m}"))?,
        ),
        None => None,
    };
    if let (Some(FrontendKind::Fuse), Some(path)) = (a.frontend, &a.path) {
        frontend::fuse::prepare(path)?;
    }
    if a.frontend == Some(FrontendKind::Iscsi) {
        frontend::iscsi::target_name(&a.volume)?;
    }
    let iscsi_listener = match (a.frontend, &a.portal) {
        (Some(FrontendKind::Iscsi), Some(p)) => Some(
            control::bind(p)
                .await
                .with_context(|| format!("listening on {p}"))?,
        ),
        _ => None,
    };
    let chap = a
        .chap_user
        .clone()
        .zip(a.chap_secret.clone())
        .map(|(user, secret)| frontend::iscsi::Chap {
            user,
            secret: secret.into_bytes(),
            mutual: a
                .chap_target_user
                .clone()
                .zip(a.chap_target_secret.clone())
                .map(|(u, s)| (u, s.into_bytes())),
        });
    let volume = engine::Volume::open_with(&a.volume, a.size, &a.replicas, opts)
        .await
        .with_context(|| format!("opening volume {}", a.volume))?;
    let st = volume.status();
    tracing::info!(health = ?st.health, epoch = st.epoch, control = %a.control, "engine serving");
    if let Some(l) = metrics_listener {
        let v = volume.clone();
        tokio::spawn(async move {
            if let Err(e) = control::serve_metrics(v, l).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let fuse = match (a.frontend, &a.path) {
        (Some(FrontendKind::Fuse), Some(path)) => Some(
            frontend::fuse::serve(volume.clone(), path, tokio::runtime::Handle::current())
                .with_context(|| format!("serving volume {} on {}", a.volume, path.display()))?,
        ),
        _ => None,
    };
    let iscsi = match iscsi_listener {
        Some(l) => {
            let nop =
                (a.iscsi_nop_secs > 0).then(|| std::time::Duration::from_secs(a.iscsi_nop_secs));
            let target = frontend::iscsi::Target::new(volume.clone(), chap, nop)?;
            tracing::info!(target = target.name(), portal = ?a.portal, "iSCSI target serving");
            Some(tokio::spawn(target.serve(l, std::future::pending())))
        }
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    control::ControlService::new(volume.clone())
        .serve(control_listener, shutdown)
        .await?;
    tracing::info!("shutting down");
    // Unmount first: once it succeeds no request can arrive, so the flush
    // after it covers every write the frontend acknowledged.
    if let Some(f) = fuse {
        f.stop().await?;
    }
    if let Some(t) = iscsi {
        t.abort();
    }
    volume.flush().await?;
    Ok(())
}

/// An error a server answered with: its message, and the kind its gRPC
/// code stands for (which sets the exit status).
#[derive(Debug)]
struct Remote {
    kind: Option<ErrorKind>,
    message: String,
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Remote {}

fn remote(s: tonic::Status) -> Remote {
    Remote {
        kind: ErrorKind::from_grpc(s.code()),
        message: if s.message().is_empty() {
            s.code().to_string()
        } else {
            s.message().to_owned()
        },
    }
}

async fn run_engine_ctl(a: EngineCtlArgs) -> Result<()> {
    use control::pb;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", a.addr))
        .with_context(|| format!("{:?} is not a host:port address", a.addr))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let mut c = control::EngineClient::new(
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the engine at {}", a.addr))?,
    );
    let status_json = |s: pb::StatusResponse| {
        let health = pb::Health::try_from(s.health).map_or("unknown", |h| h.as_str_name());
        serde_json::json!({
            "volume": s.volume,
            "size_bytes": s.size_bytes,
            "health": health.trim_start_matches("HEALTH_").to_lowercase(),
            "epoch": s.epoch,
            "intent_regions": s.intent_regions,
            "replicas": s.replicas.into_iter().map(|r| serde_json::json!({
                "address": r.address,
                "mode": pb::ReplicaMode::try_from(r.mode)
                    .map_or("unknown", |m| m.as_str_name())
                    .trim_start_matches("REPLICA_MODE_")
                    .to_lowercase(),
                "error": r.error,
                "revision": r.revision,
                "rebuild": r.rebuild,
            })).collect::<Vec<_>>(),
        })
    };
    let out = match a.cmd {
        EngineCmd::Status => status_json(
            c.status(pb::StatusRequest {})
                .await
                .map_err(remote)?
                .into_inner(),
        ),
        EngineCmd::AddReplica { address } => status_json(
            c.add_replica(pb::ReplicaRequest { address })
                .await
                .map_err(remote)?
                .into_inner(),
        ),
        EngineCmd::RemoveReplica { address } => status_json(
            c.remove_replica(pb::ReplicaRequest { address })
                .await
                .map_err(remote)?
                .into_inner(),
        ),
        EngineCmd::Snap(SnapCmd::Expand { size }) => status_json(
            c.expand(pb::ExpandRequest { size_bytes: size })
                .await
                .map_err(remote)?
                .into_inner(),
        ),
        EngineCmd::Snap(SnapCmd::Snapshot { name, labels }) => serde_json::to_value(
            c.snapshot(pb::SnapshotRequest {
                name,
                labels: labels.into_iter().collect(),
            })
            .await
            .map_err(remote)?
            .into_inner(),
        )?,
        EngineCmd::Snapshots => serde_json::to_value(
            c.list_snapshots(pb::ListSnapshotsRequest {})
                .await
                .map_err(remote)?
                .into_inner(),
        )?,
        EngineCmd::Snap(SnapCmd::RemoveSnapshot { name }) => serde_json::to_value(
            c.remove_snapshot(pb::SnapshotNameRequest { name })
                .await
                .map_err(remote)?
                .into_inner(),
        )?,
        EngineCmd::Snap(SnapCmd::Revert { name }) => serde_json::to_value(
            c.revert(pb::SnapshotNameRequest { name })
                .await
                .map_err(remote)?
                .into_inner(),
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
