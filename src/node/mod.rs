//! `node` owns one machine's share of the work: the instance manager that
//! runs this node's replica and engine processes ([`instances`]), the
//! agent API the controller drives it through (`proto/agent.proto`), the
//! heartbeat that registers the node and its disks with the controller,
//! and the CSI Identity and Node services ([`csi_node`], with the kernel
//! side in [`mount`]).
//!
//! Replicas and engines are started, supervised and stopped on the
//! controller's request. Volumes are attached ([`attach`]) through the
//! engine's iSCSI target and the kernel's initiator (`iscsiadm`) where the
//! kernel has one, otherwise through its FUSE file and a loop device; then
//! formatted when blank, mounted, bind-published and grown. A node plugin
//! that is killed leaves its instances serving; when it starts again it
//! adopts them. A SIGTERMed one stops those it started itself and starts
//! them again when it comes back; those a launcher started stay running.
//!
//! It starts replicas and engines as separate processes of this binary
//! (itself, or through a [`launcher`] in another container, so that they
//! outlive the node plugin's container) and
//! must not import `crate::controller` (enforced by `tests/layering.rs`).

pub mod attach;
pub mod csi_node;
pub mod instances;
pub mod launcher;
pub mod mount;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::api::{agent, manager};
use crate::csi;
use instances::{Instances, SnapshotOp};

/// How long in-flight calls may finish once the node is told to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often the node re-registers with the controller.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A disk this node offers, with the tags a `diskSelector` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Absolute path of the directory replicas go under.
    pub path: PathBuf,
    /// Tags.
    pub tags: Vec<String>,
    /// Bytes the scheduler may count on; `None` means the filesystem's
    /// size.
    pub capacity: Option<u64>,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH:tag,tag`, either followed by `=SIZE`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "PATH, PATH:tag,tag, optionally followed by =SIZE";
        let (rest, capacity) = match s.rsplit_once('=') {
            Some((r, size)) => (
                r,
                Some(
                    crate::units::parse_size(size)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            format!("disk {s:?}: size {size:?} is not a size like 100Gi ({usage})")
                        })?,
                ),
            ),
            None => (s, None),
        };
        let (path, tags) = rest.split_once(':').unwrap_or((rest, ""));
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!("disk {s:?}: the path must be absolute ({usage})"));
        }
        Ok(Self {
            path,
            tags: tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            capacity,
        })
    }
}

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CSI node id.
    pub node_id: String,
    /// Where the agent API listens (its IP is also where replicas listen).
    pub agent_listen: SocketAddr,
    /// The controller's manager API, host:port.
    pub controller: String,
    /// Disks replicas may use.
    pub disks: Vec<DiskSpec>,
    /// Tags a `nodeSelector` matches.
    pub tags: Vec<String>,
    /// The node's zone, if any.
    pub zone: Option<String>,
    /// Volumes this node may have attached at once (0: no limit).
    pub max_volumes: u32,
    /// Where the node keeps its own files (engines' FUSE files).
    pub state_dir: PathBuf,
    /// How engines here serve volumes to the kernel; `None`: iSCSI where
    /// the kernel has an initiator, FUSE otherwise ([`attach::choose`]).
    pub frontend: Option<attach::Frontend>,
    /// A [`launcher`] socket to start replicas and engines through;
    /// `None`: they are this process's own children.
    pub launcher: Option<PathBuf>,
}

/// What can stop the node from serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or directory cannot be set up or served.
    #[error("{what}: {cause}")]
    Serve {
        /// Which.
        what: String,
        /// Why.
        cause: String,
    },
}

impl Error {
    /// The kind the CLI maps to an exit status.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Unavailable
    }
}

fn serve_err(what: impl Into<String>) -> impl FnOnce(String) -> Error {
    let what = what.into();
    move |cause| Error::Serve { what, cause }
}

/// The agent and CSI services of one node.
#[derive(Debug)]
pub struct Node {
    cfg: Config,
    instances: Instances,
    /// What has a call in flight: volume ids (CSI node calls) and
    /// [`replica_key`]s (agent calls on one replica at rest).
    busy: Mutex<HashSet<String>>,
}

/// Holds one operation slot of [`Node::busy`]; frees it when dropped.
struct Busy<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl<'a> Busy<'a> {
    /// Takes `key`'s slot, or ABORTED if a call holds it.
    #[allow(clippy::result_large_err)]
    fn take(set: &'a Mutex<HashSet<String>>, key: &str) -> Result<Self, Status> {
        if !set.lock().expect("poisoned").insert(key.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on {key} is in progress on this node; retry"
            )));
        }
        Ok(Self {
            set,
            key: key.to_owned(),
        })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("poisoned").remove(&self.key);
    }
}

/// The operation slot of one replica on this node: a restore into it, a
/// snapshot of it at rest and its deletion exclude each other.
fn replica_key(volume: &str, replica: &str) -> String {
    format!("replica {replica} of volume {volume}")
}

/// Volume sizes the agent accepts: positive multiples of 4 KiB.
#[allow(clippy::result_large_err)]
fn check_size(size: u64) -> Result<(), Status> {
    if size == 0 || size % 4096 != 0 {
        return Err(Status::invalid_argument(format!(
            "size_bytes {size} must be a positive multiple of 4096"
        )));
    }
    Ok(())
}

/// Snapshot names the agent accepts: valid layer names.
#[allow(clippy::result_large_err)]
fn check_snapshot_name(name: &str) -> Result<(), Status> {
    crate::replica::meta::validate_snapshot_name(name).map_err(Status::invalid_argument)
}

fn status(e: &instances::Error) -> Status {
    Status::new(e.kind().grpc_code(), e.to_string())
}

impl Node {
    /// The topology this node reports: its id, and its zone when set.
    fn topology(&self) -> HashMap<String, String> {
        let mut t = HashMap::from([("shorthorn.io/node".to_owned(), self.cfg.node_id.clone())]);
        if let Some(z) = &self.cfg.zone {
            t.insert("topology.kubernetes.io/zone".to_owned(), z.clone());
        }
        t
    }

    fn registration(&self) -> manager::RegisterNodeRequest {
        manager::RegisterNodeRequest {
            node_id: self.cfg.node_id.clone(),
            agent_address: self.cfg.agent_listen.to_string(),
            disks: self
                .cfg
                .disks
                .iter()
                .map(|d| manager::Disk {
                    path: d.path.display().to_string(),
                    capacity_bytes: d.capacity.unwrap_or_else(|| {
                        nix::sys::statvfs::statvfs(&d.path)
                            .map_or(0, |s| s.blocks() * s.fragment_size())
                    }),
                    tags: d.tags.clone(),
                })
                .collect(),
            tags: self.cfg.tags.clone(),
            topology: self.topology(),
            max_volumes: self.cfg.max_volumes,
        }
    }
}

#[tonic::async_trait]
impl agent::agent_server::Agent for Arc<Node> {
    async fn create_replica(
        &self,
        r: Request<agent::CreateReplicaRequest>,
    ) -> Result<Response<agent::CreateReplicaResponse>, Status> {
        let r = r.into_inner();
        check_size(r.size_bytes)?;
        let address = self
            .instances
            .create_replica(&r.volume_id, &r.replica_name, &r.disk_path, r.size_bytes)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::CreateReplicaResponse { address }))
    }

    async fn delete_replica(
        &self,
        r: Request<agent::DeleteReplicaRequest>,
    ) -> Result<Response<agent::DeleteReplicaResponse>, Status> {
        let r = r.into_inner();
        let _busy = Busy::take(&self.busy, &replica_key(&r.volume_id, &r.replica_name))?;
        self.instances
            .delete_replica(&r.volume_id, &r.replica_name, &r.disk_path)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::DeleteReplicaResponse {}))
    }

    async fn start_engine(
        &self,
        r: Request<agent::StartEngineRequest>,
    ) -> Result<Response<agent::StartEngineResponse>, Status> {
        let r = r.into_inner();
        check_size(r.size_bytes)?;
        if r.replica_addresses.is_empty() {
            return Err(Status::invalid_argument(
                "replica_addresses must name at least one replica",
            ));
        }
        let e = self
            .instances
            .start_engine(&r.volume_id, r.size_bytes, &r.replica_addresses)
            .await
            .map_err(|e| status(&e))?;
        let mut out = agent::StartEngineResponse {
            control_address: e.spec.addr.clone(),
            ..Default::default()
        };
        match e.served() {
            attach::Served::Fuse { file } => {
                out.frontend = attach::Frontend::Fuse.as_str().into();
                out.path = file.display().to_string();
            }
            attach::Served::Iscsi { portal, iqn } => {
                out.frontend = attach::Frontend::Iscsi.as_str().into();
                out.iscsi_portal = portal;
                out.iscsi_target = iqn;
            }
        }
        Ok(Response::new(out))
    }

    async fn stop_engine(
        &self,
        r: Request<agent::StopEngineRequest>,
    ) -> Result<Response<agent::StopEngineResponse>, Status> {
        let r = r.into_inner();
        let file = self
            .instances
            .engine_file(&r.volume_id)
            .map_err(|e| status(&e))?;
        // A device left attached (a node plugin that died before
        // NodeUnstage finished) would turn the engine's clean unmount into
        // a lazy detach, or leave the initiator retrying a portal that is
        // gone; the CO unstaged already, so it is let go here.
        let iqn = instances::iqn(&r.volume_id);
        tokio::task::spawn_blocking(move || attach::detach(&file, &iqn))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::new(e.kind().grpc_code(), e.to_string()))?;
        self.instances
            .stop_engine(&r.volume_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::StopEngineResponse {}))
    }

    async fn expand_replica(
        &self,
        r: Request<agent::ExpandReplicaRequest>,
    ) -> Result<Response<agent::ExpandReplicaResponse>, Status> {
        let r = r.into_inner();
        check_size(r.size_bytes)?;
        self.instances
            .expand_replica(&r.volume_id, &r.replica_name, r.size_bytes)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::ExpandReplicaResponse {}))
    }

    async fn expand_engine(
        &self,
        r: Request<agent::ExpandEngineRequest>,
    ) -> Result<Response<agent::ExpandEngineResponse>, Status> {
        let r = r.into_inner();
        check_size(r.size_bytes)?;
        self.instances
            .expand_engine(&r.volume_id, r.size_bytes)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::ExpandEngineResponse {}))
    }

    async fn engine_status(
        &self,
        r: Request<agent::EngineStatusRequest>,
    ) -> Result<Response<agent::EngineStatusResponse>, Status> {
        use crate::engine::control::pb;
        let r = r.into_inner();
        let s = self
            .instances
            .engine_status(&r.volume_id)
            .await
            .map_err(|e| status(&e))?;
        let name = |n: &str, prefix: &str| n.trim_start_matches(prefix).to_lowercase();
        Ok(Response::new(agent::EngineStatusResponse {
            health: name(
                pb::Health::try_from(s.health)
                    .unwrap_or(pb::Health::Unspecified)
                    .as_str_name(),
                "HEALTH_",
            ),
            replicas: s
                .replicas
                .into_iter()
                .map(|x| agent::EngineReplica {
                    address: x.address,
                    mode: name(
                        pb::ReplicaMode::try_from(x.mode)
                            .unwrap_or(pb::ReplicaMode::Unspecified)
                            .as_str_name(),
                        "REPLICA_MODE_",
                    ),
                    error: x.error,
                })
                .collect(),
        }))
    }

    async fn engine_add_replica(
        &self,
        r: Request<agent::EngineAddReplicaRequest>,
    ) -> Result<Response<agent::EngineAddReplicaResponse>, Status> {
        let r = r.into_inner();
        self.instances
            .engine_add_replica(&r.volume_id, &r.address)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::EngineAddReplicaResponse {}))
    }

    async fn engine_snapshot(
        &self,
        r: Request<agent::EngineSnapshotRequest>,
    ) -> Result<Response<agent::EngineSnapshotResponse>, Status> {
        let r = r.into_inner();
        check_snapshot_name(&r.snapshot)?;
        self.instances
            .engine_snapshot(&r.volume_id, &r.snapshot, r.remove, r.labels)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::EngineSnapshotResponse {}))
    }

    async fn replica_snapshot(
        &self,
        r: Request<agent::ReplicaSnapshotRequest>,
    ) -> Result<Response<agent::ReplicaSnapshotResponse>, Status> {
        let r = r.into_inner();
        check_snapshot_name(&r.snapshot)?;
        let _busy = Busy::take(&self.busy, &replica_key(&r.volume_id, &r.replica_name))?;
        self.instances
            .replica_snapshot(
                &r.volume_id,
                &r.replica_name,
                &r.snapshot,
                match (r.remove, r.mark_only) {
                    (false, _) => SnapshotOp::Take(r.labels.into_iter().collect()),
                    (true, true) => SnapshotOp::MarkRemoved,
                    (true, false) => SnapshotOp::Remove,
                },
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::ReplicaSnapshotResponse {}))
    }

    async fn restore_replica(
        &self,
        r: Request<agent::RestoreReplicaRequest>,
    ) -> Result<Response<agent::RestoreReplicaResponse>, Status> {
        let r = r.into_inner();
        check_snapshot_name(&r.snapshot)?;
        if r.source_addresses.is_empty() {
            return Err(Status::invalid_argument(
                "source_addresses must not be empty",
            ));
        }
        // A second restore of the same replica (a controller that restarted
        // and retried) must not reshape the chain under the first one.
        let _busy = Busy::take(&self.busy, &replica_key(&r.volume_id, &r.replica_name))?;
        let copied_bytes = self
            .instances
            .restore_replica(
                &r.volume_id,
                &r.replica_name,
                &r.source_addresses,
                &r.snapshot,
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::RestoreReplicaResponse {
            copied_bytes,
        }))
    }

    async fn engine_remove_replica(
        &self,
        r: Request<agent::EngineRemoveReplicaRequest>,
    ) -> Result<Response<agent::EngineRemoveReplicaResponse>, Status> {
        let r = r.into_inner();
        self.instances
            .engine_remove_replica(&r.volume_id, &r.address)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(agent::EngineRemoveReplicaResponse {}))
    }

    async fn list_instances(
        &self,
        _r: Request<agent::ListInstancesRequest>,
    ) -> Result<Response<agent::ListInstancesResponse>, Status> {
        let instances = self
            .instances
            .list()
            .into_iter()
            .map(|i| agent::Instance {
                kind: match i.spec.kind {
                    instances::Kind::Replica => "replica",
                    instances::Kind::Engine => "engine",
                }
                .into(),
                volume_id: i.spec.volume,
                name: i.spec.name,
                address: i.spec.addr,
                running: i.running,
                path: i.spec.path.display().to_string(),
            })
            .collect();
        Ok(Response::new(agent::ListInstancesResponse { instances }))
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Arc<Node> {
    async fn get_plugin_info(
        &self,
        _r: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::plugin_info()))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::service::Type as S;
        Ok(Response::new(csi::plugin_services(&[
            S::VolumeAccessibilityConstraints,
        ])))
    }

    async fn probe(
        &self,
        _r: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

/// Registers with the controller now and every [`HEARTBEAT`]; a failed
/// attempt is logged and retried after a second (so a node that starts
/// before its controller joins as soon as the controller answers).
async fn heartbeat(node: Arc<Node>) {
    let mut client: Option<manager::manager_client::ManagerClient<tonic::transport::Channel>> =
        None;
    loop {
        if client.is_none() {
            let ep =
                tonic::transport::Channel::from_shared(format!("http://{}", node.cfg.controller));
            if let Ok(ep) = ep {
                if let Ok(ch) = ep.connect_timeout(Duration::from_secs(5)).connect().await {
                    client = Some(manager::manager_client::ManagerClient::new(ch));
                }
            }
        }
        let registered = match client.as_mut() {
            Some(c) => match c.register_node(node.registration()).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(node.id = %node.cfg.node_id, error = %e, "registration with the controller failed");
                    client = None;
                    false
                }
            },
            None => {
                tracing::warn!(node.id = %node.cfg.node_id, controller = %node.cfg.controller, "controller unreachable");
                false
            }
        };
        tokio::time::sleep(if registered {
            HEARTBEAT
        } else {
            Duration::from_secs(1)
        })
        .await;
    }
}

/// Runs the node: the agent API on `cfg.agent_listen`, CSI Identity and
/// Node on `csi_socket`, the heartbeat; returns when `shutdown` resolves,
/// after stopping its instances.
pub async fn run(
    cfg: Config,
    csi_socket: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    for d in &cfg.disks {
        std::fs::create_dir_all(d.path.join("replicas"))
            .map_err(|e| serve_err(format!("disk {}", d.path.display()))(e.to_string()))?;
    }
    let exe = std::env::current_exe().map_err(|e| serve_err("own executable")(e.to_string()))?;
    std::fs::create_dir_all(cfg.state_dir.join("engines")).map_err(|e| {
        serve_err(format!("state directory {}", cfg.state_dir.display()))(e.to_string())
    })?;
    // Checked now so that a node told to use iSCSI where it cannot fails at
    // start; each engine start chooses again (iscsid may come up later).
    let frontend = attach::choose(cfg.frontend).map_err(serve_err("the iSCSI frontend"))?;
    tracing::info!(
        frontend = frontend.as_str(),
        "engines started now would serve volumes this way"
    );
    let starter = match &cfg.launcher {
        Some(socket) => instances::Starter::Launcher(socket.clone()),
        None => instances::Starter::Fork(exe),
    };
    let instances = Instances::new(
        starter,
        cfg.agent_listen.ip(),
        cfg.disks.iter().map(|d| d.path.clone()).collect(),
        cfg.state_dir.clone(),
        cfg.frontend,
    );
    // Before serving: the processes a previous run of this node left (or
    // that died with the machine) are found or started again.
    let (adopted, started) = instances
        .recover()
        .map_err(|e| serve_err("recovering instances")(e.to_string()))?;
    if adopted + started > 0 {
        tracing::info!(adopted, started, "instances recovered");
    }
    let node = Arc::new(Node {
        cfg,
        instances,
        busy: Mutex::new(HashSet::new()),
    });
    let tcp = tokio::net::TcpListener::bind(node.cfg.agent_listen)
        .await
        .map_err(|e| serve_err(format!("agent API on {}", node.cfg.agent_listen))(e.to_string()))?;
    let uds = csi::bind_unix(csi_socket)
        .map_err(|e| serve_err(format!("CSI socket {}", csi_socket.display()))(e.to_string()))?;
    let beat = tokio::spawn(heartbeat(node.clone()));
    tracing::info!(node.id = %node.cfg.node_id, agent = %node.cfg.agent_listen, "node serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let agent_server = tonic::transport::Server::builder()
        .add_service(agent::agent_server::AgentServer::new(node.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(tcp),
            stopped(stop_rx.clone()),
        );
    let csi_server = tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(node.clone()))
        .add_service(csi::node_server::NodeServer::new(node.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            stopped(stop_rx.clone()),
        );
    let stop_grace = stop_rx;
    // Clients (kubelet, the controller) keep connections open; past a
    // short grace the servers stop without waiting for them.
    let servers = async { tokio::join!(agent_server, csi_server) };
    let (a, b) = tokio::select! {
        r = servers => r,
        () = async {
            stopped(stop_grace).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => (Ok(()), Ok(())),
    };
    beat.abort();
    node.instances.stop_all().await;
    let _ = std::fs::remove_file(csi_socket);
    a.map_err(|e| serve_err("agent server")(e.to_string()))?;
    b.map_err(|e| serve_err("CSI server")(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse_paths_tags_and_caps() {
        let d: DiskSpec = "/data/a:ssd,fast=100Gi".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/data/a"));
        assert_eq!(d.tags, ["ssd", "fast"]);
        assert_eq!(d.capacity, Some(100 << 30));
        let plain: DiskSpec = "/data/b".parse().unwrap();
        assert_eq!((plain.tags.len(), plain.capacity), (0, None));
        for bad in ["data/rel", "/d=lots", "/d=0"] {
            let e = bad.parse::<DiskSpec>().unwrap_err();
            assert!(e.contains("PATH"), "{bad}: {e}");
        }
    }
}
