//! `controller` owns the cluster's desired state: the CSI Identity and
//! Controller services ([`service`]), the scheduler that places each
//! volume's replicas on distinct nodes' disks ([`scheduler`]), the
//! StorageClass parameters ([`params`]), the records kept in the store
//! ([`model`]), snapshots, restores and clones ([`snapshot`]) and the
//! watch over attached volumes' health ([`health`]).
//! Nodes register through the manager API (`proto/manager.proto`).
//!
//! Status (issue 5, in progress): volumes are created, published (engine
//! on the node), grown, snapshotted, restored, cloned and deleted through
//! the nodes' agents ([`snapshot`] holds the snapshot paths); failed
//! replicas that serve again are rebuilt, and one away for longer than
//! `staleReplicaTimeout` is replaced on another node, and a live volume's
//! replica count and locality follow ModifyVolume ([`health`]).
//!
//! It talks to nodes over their gRPC agent API, never by calling
//! `crate::node` code, and must not import `crate::node` (enforced by
//! `tests/layering.rs`).

pub mod health;
pub mod model;
pub mod params;
pub mod scheduler;
pub mod service;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;

use crate::csi;
use crate::store::{Db, Store};

use crate::api::manager as manager_api;

/// How long in-flight calls may finish once the controller is told to
/// stop.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What can stop the controller from serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CSI endpoint is not a `unix://` URL.
    #[error("CSI endpoint {0:?} must be unix:///absolute/path")]
    Endpoint(String),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// A socket cannot be bound or served.
    #[error("{what}: {cause}")]
    Serve {
        /// Which socket.
        what: String,
        /// Why.
        cause: String,
    },
}

impl Error {
    /// The kind the CLI maps to an exit status.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Endpoint(_) => crate::error::ErrorKind::InvalidArgument,
            Self::Store(e) => e.kind(),
            Self::Serve { .. } => crate::error::ErrorKind::Unavailable,
        }
    }
}

/// The socket path of a `unix://` CSI endpoint.
pub fn unix_endpoint(endpoint: &str) -> Result<PathBuf, Error> {
    csi::unix_endpoint(endpoint).ok_or_else(|| Error::Endpoint(endpoint.to_owned()))
}

/// What a controller is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where CSI Identity + Controller are served.
    pub csi_socket: PathBuf,
    /// Where the manager API listens.
    pub listen: std::net::SocketAddr,
    /// The directory of `state.redb`.
    pub data_dir: PathBuf,
    /// Replicas a volume gets when its StorageClass names no count.
    pub default_replicas: u32,
    /// How often attached volumes' engines are asked for their health.
    pub health_interval: std::time::Duration,
}

/// Runs the controller: CSI Identity + Controller on `cfg.csi_socket`,
/// the manager API on `cfg.listen`, state in `cfg.data_dir/state.redb`;
/// returns when `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (csi_socket, listen, data_dir) = (&*cfg.csi_socket, cfg.listen, &*cfg.data_dir);
    std::fs::create_dir_all(data_dir).map_err(|e| Error::Serve {
        what: format!("data directory {}", data_dir.display()),
        cause: e.to_string(),
    })?;
    let store: Arc<dyn Store> = Arc::new(Db::open(&data_dir.join("state.redb"))?);
    let ctl = Arc::new(service::Controller::new(store, cfg.default_replicas));
    let watcher = tokio::spawn(health::watch(ctl.clone(), cfg.health_interval));
    let uds = csi::bind_unix(csi_socket).map_err(|e| Error::Serve {
        what: format!("CSI socket {}", csi_socket.display()),
        cause: e.to_string(),
    })?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Serve {
            what: format!("manager API on {listen}"),
            cause: e.to_string(),
        })?;
    tracing::info!(csi = %csi_socket.display(), manager = %listen, "controller serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let csi_server = tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(ctl.clone()))
        .add_service(csi::controller_server::ControllerServer::new(ctl.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            stopped(stop_rx.clone()),
        );
    let manager_server = tonic::transport::Server::builder()
        .add_service(manager_api::manager_server::ManagerServer::new(ctl))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(tcp),
            stopped(stop_rx.clone()),
        );
    // Clients (the CSI sidecars, node agents) keep connections open; past
    // a short grace the servers stop without waiting for them.
    let servers = async { tokio::join!(csi_server, manager_server) };
    let (a, b) = tokio::select! {
        r = servers => r,
        () = async {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => (Ok(()), Ok(())),
    };
    watcher.abort();
    for (what, r) in [("CSI", a), ("manager", b)] {
        r.map_err(|e| Error::Serve {
            what: format!("{what} server"),
            cause: e.to_string(),
        })?;
    }
    let _ = std::fs::remove_file(csi_socket);
    Ok(())
}
