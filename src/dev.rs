//! `shorthorn dev`: the whole driver on one machine behind one CSI socket,
//! for trying shorthorn out and for conformance suites (csi-sanity) that
//! expect a single endpoint serving Identity, Controller and Node.
//!
//! It runs a controller and N nodes in this process, exactly as the
//! `controller` and `node` modes run them (each on its own internal unix
//! socket, nodes on their own loopback addresses 127.0.0.1, .2, ...), and
//! serves the public socket by forwarding each gRPC call unchanged:
//! Identity and Controller to the controller, Node to node 0 (the node the
//! caller is taken to be on). Forwarding at the HTTP/2 level keeps the two
//! paths identical: the dev socket answers exactly what the real plugins
//! answer.
//!
//! It composes the controller and node layers and is imported by neither.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::body::BoxBody;
use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::transport::Channel;

use crate::{controller, csi, node};

/// What `shorthorn dev` is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where everything lives: the controller's state, each node's disk
    /// and state, the internal sockets.
    pub data_dir: PathBuf,
    /// The public CSI socket.
    pub socket: PathBuf,
    /// How many nodes (1 to 16).
    pub nodes: usize,
    /// How volumes reach the kernel; `None`: iSCSI where it can.
    pub frontend: Option<node::attach::Frontend>,
    /// Volumes each node may have attached at once; 0: no limit.
    pub max_volumes: u32,
}

/// What can stop the dev cluster from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A part did not come up or could not be served.
    #[error("{0}")]
    Start(String),
    /// The controller failed.
    #[error(transparent)]
    Controller(#[from] controller::Error),
    /// A node failed.
    #[error(transparent)]
    Node(#[from] node::Error),
}

impl Error {
    /// The kind the CLI maps to an exit status.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Controller(e) => e.kind(),
            Self::Node(e) => e.kind(),
            Self::Start(_) => crate::error::ErrorKind::Unavailable,
        }
    }
}

/// Names the CSI service a [`Forward`] stands in for.
trait Named: Send + Sync + 'static {
    const NAME: &'static str;
}

#[derive(Debug)]
struct Identity;
impl Named for Identity {
    const NAME: &'static str = "csi.v1.Identity";
}

#[derive(Debug)]
struct ControllerSvc;
impl Named for ControllerSvc {
    const NAME: &'static str = "csi.v1.Controller";
}

#[derive(Debug)]
struct NodeSvc;
impl Named for NodeSvc {
    const NAME: &'static str = "csi.v1.Node";
}

/// Passes every call of service `S` to `channel` and its answer back.
#[derive(Debug)]
struct Forward<S> {
    channel: Channel,
    _s: PhantomData<S>,
}

impl<S> Clone for Forward<S> {
    fn clone(&self) -> Self {
        Self {
            channel: self.channel.clone(),
            _s: PhantomData,
        }
    }
}

impl<S: Named> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: Named> Service<http::Request<BoxBody>> for Forward<S> {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let mut ch = self.channel.clone();
        Box::pin(async move {
            let answer = async {
                futures_util::future::poll_fn(|cx| ch.poll_ready(cx)).await?;
                ch.call(req).await
            }
            .await;
            Ok(answer.unwrap_or_else(|e| {
                tonic::Status::unavailable(format!("{} is not answering: {e}", S::NAME)).into_http()
            }))
        })
    }
}

/// A channel over the unix socket at `path`, once it answers.
async fn unix_channel(path: &Path, deadline: Instant) -> Result<Channel, Error> {
    loop {
        match csi::connect_unix(path).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(Error::Start(format!(
                    "{} never answered: {e}",
                    path.display()
                )))
            }
        }
    }
}

fn free_port(ip: [u8; 4]) -> Result<u16, Error> {
    std::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Start(format!("no free port on {ip:?}: {e}")))
}

/// Runs the dev cluster until `shutdown` resolves; then stops the nodes
/// (and their engines and replicas) and the controller.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if !(1..=16).contains(&cfg.nodes) {
        return Err(Error::Start(format!(
            "--nodes {} must be 1 to 16",
            cfg.nodes
        )));
    }
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Start(format!("data directory {}: {e}", dir.display())))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let manager = std::net::SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1])?));
    let ctl_cfg = controller::Config {
        csi_socket: dir.join("controller.sock"),
        listen: manager,
        data_dir: dir.join("controller"),
        default_replicas: u32::try_from(cfg.nodes.min(3)).expect("at most 3"),
        health_interval: Duration::from_secs(5),
    };
    let ctl_socket = ctl_cfg.csi_socket.clone();
    let ctl = tokio::spawn(controller::run(ctl_cfg, stopped(stop_rx.clone())));
    let mut nodes = Vec::new();
    let mut node_sockets = Vec::new();
    for i in 0..cfg.nodes {
        let ip = [127, 0, 0, u8::try_from(i + 1).expect("at most 16 nodes")];
        let home = dir.join(format!("node-{i}"));
        let disk = home.join("disk");
        std::fs::create_dir_all(&disk)
            .map_err(|e| Error::Start(format!("node disk {}: {e}", disk.display())))?;
        let ncfg = node::Config {
            node_id: format!("dev-{i}"),
            agent_listen: std::net::SocketAddr::from((ip, free_port(ip)?)),
            controller: manager.to_string(),
            disks: vec![node::DiskSpec {
                path: disk,
                tags: Vec::new(),
                capacity: None,
            }],
            tags: Vec::new(),
            zone: None,
            max_volumes: cfg.max_volumes,
            state_dir: home.join("state"),
            frontend: cfg.frontend,
            launcher: None,
        };
        let sock = home.join("csi.sock");
        node_sockets.push(sock.clone());
        let stop = stopped(stop_rx.clone());
        nodes.push(tokio::spawn(
            async move { node::run(ncfg, &sock, stop).await },
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let ctl_ch = unix_channel(&ctl_socket, deadline).await?;
    let node_ch = unix_channel(&node_sockets[0], deadline).await?;
    let public = csi::bind_unix(&cfg.socket)
        .map_err(|e| Error::Start(format!("CSI socket {}: {e}", cfg.socket.display())))?;
    tracing::info!(csi = %cfg.socket.display(), nodes = cfg.nodes, "dev cluster serving");
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let served = tonic::transport::Server::builder()
        .add_service(Forward::<Identity> {
            channel: ctl_ch.clone(),
            _s: PhantomData,
        })
        .add_service(Forward::<ControllerSvc> {
            channel: ctl_ch,
            _s: PhantomData,
        })
        .add_service(Forward::<NodeSvc> {
            channel: node_ch,
            _s: PhantomData,
        })
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(public),
            stopped(stop_rx.clone()),
        );
    tokio::select! {
        r = served => r.map_err(|e| Error::Start(format!("CSI server: {e}")))?,
        () = async {
            stopped(stop_rx).await;
            tokio::time::sleep(controller::SHUTDOWN_GRACE).await;
        } => {}
    }
    let _ = std::fs::remove_file(&cfg.socket);
    for n in nodes {
        n.await
            .map_err(|e| Error::Start(format!("node task: {e}")))??;
    }
    ctl.await
        .map_err(|e| Error::Start(format!("controller task: {e}")))??;
    Ok(())
}
