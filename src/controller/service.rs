//! The CSI Identity and Controller services, and the manager API, over
//! the store.
//!
//! Every handler validates its request completely before it reads or
//! writes state, so bad input changes nothing. Operations on one volume
//! are serialised by [`Busy`]: a second call for a volume with one in
//! flight gets ABORTED at once, as the CSI spec asks. Writes go through
//! conditional store commits, so even two controllers on one store could
//! not overwrite each other's decisions.

// Handlers answer with tonic's Status (the CSI boundary); the helpers they
// call build the same Status, which is large but returned only on the
// error path.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Code, Request, Response, Status};

use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as Rpc;
use crate::csi::volume_capability::access_mode::Mode;
use crate::store::{self, Expect, Store};

use super::model::{
    snapshot_id, volume_id, ContentSource, NodeRecord, ReplicaRecord, SnapshotRecord, VolumeRecord,
    VolumeState, NAMES, NODES, NODE_KEY, SNAPSHOTS, VOLUMES, ZONE_KEY,
};
use super::params::{FsType, VolumeParams};
use super::scheduler::{self, Candidate, Disk};
use super::snapshot::{check_snapshottable, csi_snapshot};
use crate::api::{agent, manager as mapi};
use tonic::transport::Channel;

/// Volume sizes are whole MiB (the engine needs 4 KiB multiples; MiB keeps
/// sizes readable).
pub const SIZE_STEP: u64 = 1 << 20;

/// Size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Over-provisioning percentage the scheduler allows on each disk.
pub const OVER_PROVISIONING: u64 = 200;

/// Controller RPCs this build implements (and so advertises).
const CAPABILITIES: [Rpc; 13] = [
    Rpc::CreateDeleteVolume,
    Rpc::PublishUnpublishVolume,
    Rpc::ListVolumes,
    Rpc::ListVolumesPublishedNodes,
    Rpc::GetCapacity,
    Rpc::GetVolume,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
    Rpc::ExpandVolume,
    Rpc::CreateDeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::CloneVolume,
    Rpc::ModifyVolume,
];

/// The controller's shared state.
#[derive(Debug)]
pub struct Controller {
    pub(super) store: Arc<dyn Store>,
    busy: Mutex<HashSet<String>>,
    /// What a StorageClass that names no parameter gets.
    defaults: VolumeParams,
}

/// Holds one volume's operation slot; frees it when dropped.
pub(super) struct Busy<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("poisoned").remove(&self.key);
    }
}

/// The clock in nanoseconds: a new record for a name gets a value no
/// earlier record of that name had.
fn nonce() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// A store failure as a gRPC status: a lost conditional write means a
/// concurrent change (ABORTED, retry); anything else is internal.
pub(super) fn store_status(e: store::Error) -> Status {
    match e {
        store::Error::Conflict { .. } => Status::aborted(format!("{e}; retry")),
        other => Status::internal(other.to_string()),
    }
}

/// Checks one capability: an access type, a single-node access mode, and
/// a filesystem NodeStage can make.
fn check_capability(c: &csi::VolumeCapability) -> Result<(), String> {
    use csi::volume_capability::AccessType;
    match &c.access_type {
        None => return Err("a volume capability names neither block nor mount".into()),
        Some(AccessType::Mount(m)) => {
            FsType::parse(&m.fs_type)?;
        }
        Some(AccessType::Block(_)) => {}
    }
    let mode = c
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        Mode::Unknown => Err("a volume capability has no access mode".into()),
        other => Err(format!(
            "access mode {} is not supported: a shorthorn volume attaches to one node at a time",
            other.as_str_name()
        )),
    }
}

fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities must not be empty"));
    }
    caps.iter().try_for_each(check_capability).map_err(invalid)
}

/// The size to provision for `range`: the required bytes rounded up to
/// [`SIZE_STEP`], or [`DEFAULT_SIZE`] (capped by the limit) when none is
/// required.
fn size_for(range: Option<&csi::CapacityRange>) -> Result<u64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::out_of_range("capacity bytes must not be negative"));
    }
    let (req, lim) = (req.unsigned_abs(), lim.unsigned_abs());
    if lim != 0 && req > lim {
        return Err(Status::out_of_range(format!(
            "required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let size = if req == 0 {
        if lim == 0 {
            DEFAULT_SIZE
        } else {
            (lim / SIZE_STEP * SIZE_STEP).min(DEFAULT_SIZE)
        }
    } else {
        req.div_ceil(SIZE_STEP) * SIZE_STEP
    };
    if size == 0 || (lim != 0 && size > lim) {
        return Err(Status::out_of_range(format!(
            "no size in whole MiB fits required_bytes {req} and limit_bytes {lim}"
        )));
    }
    Ok(size)
}

/// The size for a volume made from a source of `min` bytes: at least
/// that and what `range` requires, within its limit (else OUT_OF_RANGE).
fn size_over(range: Option<&csi::CapacityRange>, min: u64) -> Result<u64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let size = if req > 0 { size_for(range)? } else { 0 }.max(min);
    if lim > 0 && size > lim.unsigned_abs() {
        return Err(Status::out_of_range(format!(
            "the source holds {min} bytes, more than limit_bytes {lim}"
        )));
    }
    Ok(size)
}

/// The source named by a CreateVolume, checked for shape.
fn content_source(s: Option<&csi::VolumeContentSource>) -> Result<Option<ContentSource>, Status> {
    use csi::volume_content_source::Type;
    let Some(s) = s else { return Ok(None) };
    match &s.r#type {
        Some(Type::Snapshot(x)) if !x.snapshot_id.is_empty() => {
            Ok(Some(ContentSource::Snapshot(x.snapshot_id.clone())))
        }
        Some(Type::Volume(x)) if !x.volume_id.is_empty() => {
            Ok(Some(ContentSource::Volume(x.volume_id.clone())))
        }
        Some(Type::Snapshot(_)) => Err(invalid(
            "volume_content_source.snapshot.snapshot_id must not be empty",
        )),
        Some(Type::Volume(_)) => Err(invalid(
            "volume_content_source.volume.volume_id must not be empty",
        )),
        None => Err(invalid(
            "volume_content_source names neither a snapshot nor a volume",
        )),
    }
}

/// Whether an existing volume satisfies a repeated CreateVolume.
fn compatible(v: &VolumeRecord, range: Option<&csi::CapacityRange>, p: &VolumeParams) -> bool {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes.max(0), r.limit_bytes.max(0)));
    v.size >= req.unsigned_abs() && (lim == 0 || v.size <= lim.unsigned_abs()) && v.params == *p
}

/// Where replicas of a volume that must be accessible from `req` may
/// live: the requisite topologies (or, without any, the preferred ones),
/// each without the per-node key. A volume is reached over the network
/// from any node, so naming nodes (as the external-provisioner lists every
/// candidate node, and csi-sanity the one it runs on) says where the
/// volume is used, not where its data must live; zones and other keys do
/// confine the data. Empty: anywhere.
fn placement_topology(req: Option<&csi::TopologyRequirement>) -> Vec<BTreeMap<String, String>> {
    let Some(req) = req else {
        return Vec::new();
    };
    let wanted = if req.requisite.is_empty() {
        &req.preferred
    } else {
        &req.requisite
    };
    let topology: Vec<BTreeMap<String, String>> = wanted
        .iter()
        .map(|t| {
            t.segments
                .iter()
                .filter(|(k, _)| k.as_str() != NODE_KEY)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .collect();
    // One topology that every node matches leaves the choice open.
    if topology.iter().any(BTreeMap::is_empty) {
        return Vec::new();
    }
    topology
}

/// Whether `r` names preferred topologies and no requisite ones.
fn only_preferred(r: &csi::CreateVolumeRequest) -> bool {
    r.accessibility_requirements
        .as_ref()
        .is_some_and(|t| t.requisite.is_empty() && !t.preferred.is_empty())
}

/// Whether node `n` reports every segment of `t` with the same value.
fn in_topology(n: &NodeRecord, t: &BTreeMap<String, String>) -> bool {
    t.iter()
        .all(|(k, v)| n.topology.get(k).is_some_and(|x| x == v))
}

/// Node ids `topology` allows (see [`placement_topology`]); `None` when it
/// does not constrain placement.
pub(super) fn allowed_nodes(
    topology: &[BTreeMap<String, String>],
    nodes: &[NodeRecord],
) -> Option<BTreeSet<String>> {
    if topology.is_empty() {
        return None;
    }
    Some(
        nodes
            .iter()
            .filter(|n| topology.iter().any(|t| in_topology(n, t)))
            .map(|n| n.id.clone())
            .collect(),
    )
}

impl Controller {
    /// A controller over `store`; volumes get `default_replicas` unless
    /// their StorageClass says otherwise.
    pub fn new(store: Arc<dyn Store>, default_replicas: u32) -> Self {
        Self {
            store,
            busy: Mutex::new(HashSet::new()),
            defaults: VolumeParams {
                replicas: default_replicas,
                ..VolumeParams::default()
            },
        }
    }

    fn params(&self, p: &HashMap<String, String>) -> Result<VolumeParams, Status> {
        VolumeParams::parse_over(self.defaults.clone(), p).map_err(invalid)
    }

    pub(super) fn begin(&self, key: &str) -> Result<Busy<'_>, Status> {
        let mut set = self.busy.lock().expect("poisoned");
        if !set.insert(key.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on volume {key:?} is in progress; retry"
            )));
        }
        Ok(Busy {
            set: &self.busy,
            key: key.to_owned(),
        })
    }

    pub(super) fn nodes(&self) -> Result<Vec<NodeRecord>, Status> {
        Ok(NODES
            .all(&*self.store)
            .map_err(store_status)?
            .into_iter()
            .map(|(_, v)| v.value)
            .collect())
    }

    /// Bytes scheduled per (node, disk) by every volume's replicas.
    pub(super) fn scheduled(&self) -> Result<BTreeMap<(String, String), u64>, Status> {
        let mut used = BTreeMap::new();
        for (_, v) in VOLUMES.all(&*self.store).map_err(store_status)? {
            for r in v.value.replicas.iter().chain(&v.value.retired) {
                *used.entry((r.node.clone(), r.disk.clone())).or_default() += v.value.size;
            }
        }
        Ok(used)
    }

    /// Volume `id` with its version, or NOT_FOUND.
    pub(super) fn existing(
        &self,
        id: &str,
    ) -> Result<crate::store::Versioned<VolumeRecord>, Status> {
        VOLUMES
            .get(&*self.store, id)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }

    pub(super) fn get_volume(&self, id: &str) -> Result<Option<VolumeRecord>, Status> {
        Ok(VOLUMES
            .get(&*self.store, id)
            .map_err(store_status)?
            .map(|v| v.value))
    }

    fn csi_volume(v: &VolumeRecord) -> csi::Volume {
        csi::Volume {
            capacity_bytes: i64::try_from(v.size).unwrap_or(i64::MAX),
            volume_id: v.id.clone(),
            volume_context: HashMap::from([
                ("numberOfReplicas".to_owned(), v.params.replicas.to_string()),
                (
                    "fsType".to_owned(),
                    match v.params.fs_type {
                        FsType::Ext4 => "ext4",
                        FsType::Xfs => "xfs",
                    }
                    .to_owned(),
                ),
            ]),
            content_source: v.source.as_ref().map(|s| {
                use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
                csi::VolumeContentSource {
                    r#type: Some(match s {
                        ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                            snapshot_id: id.clone(),
                        }),
                        ContentSource::Volume(id) => Type::Volume(VolumeSource {
                            volume_id: id.clone(),
                        }),
                    }),
                }
            }),
            accessible_topology: Vec::new(),
        }
    }

    fn condition(v: &VolumeRecord) -> csi::VolumeCondition {
        let abnormal = matches!(v.state, VolumeState::Degraded | VolumeState::Faulted);
        csi::VolumeCondition {
            abnormal,
            message: format!("volume is {:?}", v.state).to_lowercase(),
        }
    }

    /// A client for `node`'s agent.
    pub(super) async fn agent(
        &self,
        node: &str,
    ) -> Result<agent::agent_client::AgentClient<Channel>, Status> {
        self.agent_for(node, AGENT_CALL_TIMEOUT).await
    }

    /// A client for `node`'s agent whose calls may take up to `timeout`.
    pub(super) async fn agent_for(
        &self,
        node: &str,
        timeout: std::time::Duration,
    ) -> Result<agent::agent_client::AgentClient<Channel>, Status> {
        let rec = NODES
            .get(&*self.store, node)
            .map_err(store_status)?
            .ok_or_else(|| Status::unavailable(format!("node {node} is not registered")))?
            .value;
        let ch = Channel::from_shared(format!("http://{}", rec.agent_address))
            .map_err(|e| Status::internal(format!("node {node} agent address: {e}")))?
            .connect_timeout(AGENT_CONNECT_TIMEOUT)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "node {node}: agent at {} unreachable: {e}",
                    rec.agent_address
                ))
            })?;
        Ok(agent::agent_client::AgentClient::new(ch))
    }

    /// Asks each replica's node to create it, fills them from the
    /// volume's source if it has one, records where they serve, and marks
    /// the volume detached (ready). Any failure leaves the volume
    /// `Creating` for a retry to resume, and is answered with a code the
    /// CO treats as "still in progress" ([`resumable`]).
    async fn realize(&self, v: VolumeRecord, version: u64) -> Result<VolumeRecord, Status> {
        let id = v.id.clone();
        self.realize_steps(v, version)
            .await
            .map_err(|e| resumable(&id, &e))
    }

    async fn realize_steps(
        &self,
        mut v: VolumeRecord,
        version: u64,
    ) -> Result<VolumeRecord, Status> {
        let creations = v
            .replicas
            .iter()
            .map(|rep| self.create_replica(&v.id, v.size, rep));
        let results = futures_util::future::join_all(creations).await;
        for (rep, res) in v.replicas.iter_mut().zip(results) {
            rep.address = Some(res?);
        }
        if let Some(src) = v.source.clone() {
            self.fill(&v, &src).await?;
        }
        v.state = VolumeState::Detached;
        self.store
            .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
            .map_err(store_status)?;
        Ok(v)
    }

    /// Asks `rep`'s node to delete it (its process and directory).
    pub(super) async fn delete_replica(
        &self,
        volume: &str,
        rep: &ReplicaRecord,
    ) -> Result<(), Status> {
        delete_replica_via(self.agent(&rep.node).await?, volume, rep).await
    }

    /// Asks `rep`'s node to create it (or find it) at `size` bytes; the
    /// address it serves on.
    pub(super) async fn create_replica(
        &self,
        volume: &str,
        size: u64,
        rep: &ReplicaRecord,
    ) -> Result<String, Status> {
        self.agent(&rep.node)
            .await?
            .create_replica(agent::CreateReplicaRequest {
                volume_id: volume.to_owned(),
                replica_name: rep.name.clone(),
                disk_path: rep.disk.clone(),
                size_bytes: size,
            })
            .await
            .map(|r| r.into_inner().address)
            .map_err(|e| agent_failed(&rep.node, &e))
    }

    /// Whether every disk holding one of `v`'s replicas has room for it to
    /// grow to `size` within the over-provisioning limit.
    fn check_growth(&self, v: &VolumeRecord, size: u64) -> Result<(), Status> {
        let nodes = self.nodes()?;
        let scheduled = self.scheduled()?;
        let growth = size - v.size;
        for rep in &v.replicas {
            let disk = nodes
                .iter()
                .find(|n| n.id == rep.node)
                .and_then(|n| n.disks.iter().find(|d| d.path == rep.disk));
            let room = disk.map_or(0, |d| {
                scheduler::room_on(&rep.node, d, &scheduled, OVER_PROVISIONING)
            });
            if room < growth {
                return Err(Status::out_of_range(format!(
                    "replica {} on node {} ({}) has room to grow by {room} bytes, not {growth}",
                    rep.name, rep.node, rep.disk
                )));
            }
        }
        Ok(())
    }

    /// Where `req`'s replicas go among `nodes`, counting what every
    /// volume has scheduled already; RESOURCE_EXHAUSTED naming what
    /// excluded the nodes when they do not fit.
    pub(super) fn place(
        &self,
        req: &scheduler::Request,
        nodes: &[NodeRecord],
    ) -> Result<Vec<scheduler::Placement>, Status> {
        scheduler::place(
            req,
            &candidates(nodes),
            &self.scheduled()?,
            OVER_PROVISIONING,
        )
        .map_err(|e| Status::resource_exhausted(e.to_string()))
    }

    pub(super) fn scheduler_request(
        p: &VolumeParams,
        size: u64,
        allowed: Option<BTreeSet<String>>,
    ) -> scheduler::Request {
        scheduler::Request {
            size,
            count: p.replicas as usize,
            disk_selector: p.disk_selector.clone(),
            node_selector: p.node_selector.clone(),
            allowed,
            excluded: BTreeSet::new(),
            used_zones: BTreeSet::new(),
        }
    }
}

fn candidates(nodes: &[NodeRecord]) -> Vec<Candidate<'_>> {
    nodes
        .iter()
        .map(|n| Candidate {
            node: &n.id,
            zone: n.topology.get(ZONE_KEY).map(String::as_str),
            tags: &n.tags,
            disks: &n.disks,
        })
        .collect()
}

/// Where a list call starts and how many entries it may return, from its
/// `max_entries` (0: no limit) and `starting_token`.
fn page_args(max_entries: i32, token: &str) -> Result<(Option<&str>, usize), Status> {
    if max_entries < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries.unsigned_abs() as usize
    };
    Ok((parse_token(token)?, limit))
}

/// Page tokens are `p1:` and the last id returned; anything else is a
/// token this controller never issued.
fn parse_token(t: &str) -> Result<Option<&str>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    t.strip_prefix("p1:")
        .filter(|id| !id.is_empty())
        .map(Some)
        .ok_or_else(|| {
            Status::aborted(format!(
                "starting_token {t:?} was not issued by this controller"
            ))
        })
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Arc<Controller> {
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
        use csi::plugin_capability::{service::Type as S, volume_expansion, Type};
        let mut caps =
            csi::plugin_services(&[S::ControllerService, S::VolumeAccessibilityConstraints]);
        caps.capabilities.push(csi::PluginCapability {
            r#type: Some(Type::VolumeExpansion(
                csi::plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(caps))
    }

    async fn probe(
        &self,
        _r: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the store answers a read.
        let ready = self.store.list(store::Kind::Node, None, 1).is_ok();
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Arc<Controller> {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.name.is_empty() {
            return Err(invalid("name must not be empty"));
        }
        check_capabilities(&r.volume_capabilities)?;
        let size = size_for(r.capacity_range.as_ref())?;
        let mut params = self.params(&r.parameters)?;
        params
            .apply_mutable(&r.mutable_parameters)
            .map_err(invalid)?;
        let source = content_source(r.volume_content_source.as_ref())?;
        let id = volume_id(&r.name);
        let _busy = self.begin(&id)?;
        if let Some(found) = VOLUMES.get(&*self.store, &id).map_err(store_status)? {
            let v = found.value;
            if v.name != r.name {
                return Err(Status::already_exists(format!(
                    "volume id {id} belongs to another name ({:?})",
                    v.name
                )));
            }
            if !compatible(&v, r.capacity_range.as_ref(), &params) || v.source != source {
                return Err(Status::already_exists(format!(
                    "volume {:?} exists with size {} and other parameters or source than asked",
                    r.name, v.size
                )));
            }
            // A create that stopped half-way (a node failed) resumes.
            let v = if v.state == VolumeState::Creating {
                self.realize(v, found.version).await?
            } else {
                v
            };
            return Ok(Response::new(csi::CreateVolumeResponse {
                volume: Some(Controller::csi_volume(&v)),
            }));
        }
        let size = match &source {
            Some(src) => size_over(r.capacity_range.as_ref(), self.source_size(src)?)?,
            None => size,
        };
        let nodes = self.nodes()?;
        let mut topology = placement_topology(r.accessibility_requirements.as_ref());
        let allowed = allowed_nodes(&topology, &nodes);
        let placed = match self.place(
            &Controller::scheduler_request(&params, size, allowed),
            &nodes,
        ) {
            // Only preferred topologies: a wish, not a limit. Where they
            // cannot hold the replicas, any node may, and the volume
            // records no topology to keep its replacements to.
            Err(e) if e.code() == Code::ResourceExhausted && only_preferred(&r) => {
                topology = Vec::new();
                self.place(&Controller::scheduler_request(&params, size, None), &nodes)?
            }
            placed => placed?,
        };
        let replicas = placed
            .into_iter()
            .enumerate()
            .map(|(i, p)| ReplicaRecord {
                name: format!("r{i}"),
                node: p.node,
                disk: p.disk,
                address: None,
                failed_since: None,
                rejoins: 0,
            })
            .collect::<Vec<_>>();
        let v = VolumeRecord {
            id: id.clone(),
            name: r.name.clone(),
            size,
            params,
            state: VolumeState::Creating,
            replicas,
            published_node: None,
            source,
            retired: Vec::new(),
            topology,
            clone_nonce: nonce(),
        };
        // The placement is recorded before any node acts on it, so a crash
        // or a failed node leaves a record a retry resumes, never replicas
        // nobody knows of.
        let version = self
            .store
            .commit(vec![
                VOLUMES.put(&id, &v, Expect::Absent),
                NAMES.put(&r.name, &id, Expect::Absent),
            ])
            .map_err(store_status)?;
        let v = self.realize(v, version).await?;
        tracing::info!(volume.id = %id, size, replicas = v.replicas.len(), "volume created");
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(Controller::csi_volume(&v)),
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        let _busy = self.begin(&r.volume_id)?;
        let Some(cur) = VOLUMES
            .get(&*self.store, &r.volume_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        };
        if let Some(n) = &cur.value.published_node {
            return Err(Status::failed_precondition(format!(
                "volume {} is published to node {n}; unpublish it first",
                r.volume_id
            )));
        }
        // Snapshots live in the volume's replicas, so they go first (the
        // spec's answer for snapshots that are not independent entities).
        let snaps: Vec<String> = SNAPSHOTS
            .all(&*self.store)
            .map_err(store_status)?
            .into_iter()
            .filter(|(_, s)| s.value.volume == r.volume_id)
            .map(|(id, _)| id)
            .collect();
        if !snaps.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {} has snapshots ({}); delete them first",
                r.volume_id,
                snaps.join(", ")
            )));
        }
        let cloning = self.filling_from(&ContentSource::Volume(r.volume_id.clone()))?;
        if !cloning.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {} is being cloned into {}; let that finish or delete it first",
                r.volume_id,
                cloning.join(", ")
            )));
        }
        // A clone that never finished may have left its transient
        // snapshot on the source.
        if matches!(
            cur.value.state,
            VolumeState::Creating | VolumeState::Deleting
        ) {
            self.drop_clone_snapshot(&cur.value).await;
        }
        // Deleting is recorded first, so a retry after a failure here
        // finishes the job instead of resurrecting the volume.
        let mut rec = cur.value.clone();
        let mut version = cur.version;
        if rec.state != VolumeState::Deleting {
            rec.state = VolumeState::Deleting;
            version = self
                .store
                .commit(vec![VOLUMES.put(
                    &r.volume_id,
                    &rec,
                    Expect::Version(version),
                )])
                .map_err(store_status)?;
        }
        for rep in &rec.retired {
            // A replaced replica's node may never come back; its copy is
            // stale and unused, so the volume does not wait for it.
            if let Err(e) = self.delete_replica(&rec.id, rep).await {
                tracing::warn!(volume.id = %rec.id, replica = %rep.name, node.id = %rep.node, error = %e.message(), "replaced replica left on its node");
            }
        }
        let deletions = rec
            .replicas
            .iter()
            .map(|rep| self.delete_replica(&rec.id, rep));
        for res in futures_util::future::join_all(deletions).await {
            res?;
        }
        let cur = crate::store::Versioned {
            version,
            value: rec,
        };
        let name = NAMES
            .get(&*self.store, &cur.value.name)
            .map_err(store_status)?;
        let mut ops = vec![VOLUMES.delete(&r.volume_id, Expect::Version(cur.version))];
        if let Some(n) = name.filter(|n| n.value == r.volume_id) {
            ops.push(NAMES.delete(&cur.value.name, Expect::Version(n.version)));
        }
        self.store.commit(ops).map_err(store_status)?;
        tracing::info!(volume.id = %r.volume_id, "volume deleted");
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        if r.node_id.is_empty() {
            return Err(invalid("node_id must not be empty"));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability must be given"))?;
        check_capability(cap).map_err(invalid)?;
        let _busy = self.begin(&r.volume_id)?;
        let cur = self.existing(&r.volume_id)?;
        let node = NODES
            .get(&*self.store, &r.node_id)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("node {} is not registered", r.node_id)))?
            .value;
        let mut v = cur.value;
        match v.state {
            VolumeState::Creating | VolumeState::Deleting => {
                return Err(Status::failed_precondition(format!(
                    "volume {} is {}; it cannot be published now",
                    v.id,
                    format!("{:?}", v.state).to_lowercase()
                )))
            }
            _ => {}
        }
        match &v.published_node {
            Some(n) if *n != r.node_id => {
                return Err(Status::failed_precondition(format!(
                    "volume {} is published to node {n}; a shorthorn volume attaches to one node at a time",
                    v.id
                )))
            }
            Some(_) => {}
            None => {
                if node.max_volumes > 0 {
                    let attached = VOLUMES
                        .all(&*self.store)
                        .map_err(store_status)?
                        .iter()
                        .filter(|(_, o)| o.value.published_node.as_deref() == Some(&r.node_id))
                        .count();
                    if attached >= node.max_volumes as usize {
                        return Err(Status::resource_exhausted(format!(
                            "node {} has {attached} volumes attached, its limit",
                            r.node_id
                        )));
                    }
                }
            }
        }
        let mut version = cur.version;
        if v.published_node.is_none() {
            // Recorded before the node acts, so a crash here leaves the
            // volume claimed by this node until a retry or an unpublish.
            v.published_node = Some(r.node_id.clone());
            v.state = VolumeState::Attaching;
            version = self
                .store
                .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
                .map_err(store_status)?;
        }
        let addresses = v
            .replicas
            .iter()
            .filter_map(|rep| rep.address.clone())
            .collect::<Vec<_>>();
        let started = self
            .agent(&r.node_id)
            .await?
            .start_engine(agent::StartEngineRequest {
                volume_id: v.id.clone(),
                size_bytes: v.size,
                replica_addresses: addresses,
            })
            .await
            .map_err(|e| agent_failed(&r.node_id, &e))?
            .into_inner();
        if v.state == VolumeState::Attaching {
            v.state = VolumeState::Attached;
            self.store
                .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
                .map_err(store_status)?;
        }
        tracing::info!(volume.id = %v.id, node.id = %r.node_id, "volume published");
        let mut publish_context = HashMap::from([(csi::CTX_FRONTEND.to_owned(), started.frontend)]);
        for (k, v) in [
            (csi::CTX_ISCSI_PORTAL, started.iscsi_portal),
            (csi::CTX_ISCSI_TARGET, started.iscsi_target),
        ] {
            if !v.is_empty() {
                publish_context.insert(k.to_owned(), v);
            }
        }
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        let _busy = self.begin(&r.volume_id)?;
        // A volume or node that is gone is, as the spec says, unpublished.
        let Some(cur) = VOLUMES
            .get(&*self.store, &r.volume_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}));
        };
        let mut v = cur.value;
        let Some(node) = v.published_node.clone() else {
            return Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}));
        };
        if !r.node_id.is_empty() && r.node_id != node {
            return Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}));
        }
        // A node removed from the cluster runs no engine to stop.
        if NODES
            .get(&*self.store, &node)
            .map_err(store_status)?
            .is_some()
        {
            self.agent(&node)
                .await?
                .stop_engine(agent::StopEngineRequest {
                    volume_id: v.id.clone(),
                })
                .await
                .map_err(|e| agent_failed(&node, &e))?;
        }
        v.published_node = None;
        v.state = VolumeState::Detached;
        self.store
            .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(cur.version))])
            .map_err(store_status)?;
        tracing::info!(volume.id = %v.id, node.id = %node, "volume unpublished");
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities must not be empty"));
        }
        self.existing(&r.volume_id)?;
        let bad: Vec<String> = r
            .volume_capabilities
            .iter()
            .filter_map(|c| check_capability(c).err())
            .collect();
        Ok(Response::new(if bad.is_empty() {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            }
        } else {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: bad.join("; "),
            }
        }))
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        let (after, limit) = page_args(r.max_entries, &r.starting_token)?;
        // One more than asked tells whether another page follows.
        let mut page = VOLUMES
            .list(&*self.store, after, limit.saturating_add(1))
            .map_err(store_status)?;
        let next_token = if page.len() > limit {
            page.truncate(limit);
            format!("p1:{}", page.last().expect("limit >= 1").0)
        } else {
            String::new()
        };
        let entries = page
            .into_iter()
            .map(|(_, v)| {
                let v = v.value;
                csi::list_volumes_response::Entry {
                    volume: Some(Controller::csi_volume(&v)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: v.published_node.iter().cloned().collect(),
                        volume_condition: Some(Controller::condition(&v)),
                    }),
                }
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        r: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = r.into_inner();
        if !r.volume_capabilities.is_empty() {
            check_capabilities(&r.volume_capabilities)?;
        }
        let params = self.params(&r.parameters)?;
        let nodes = self.nodes()?;
        let allowed = allowed_nodes(
            &placement_topology(
                r.accessible_topology
                    .as_ref()
                    .map(|t| csi::TopologyRequirement {
                        requisite: vec![t.clone()],
                        preferred: Vec::new(),
                    })
                    .as_ref(),
            ),
            &nodes,
        );
        let req = Controller::scheduler_request(&params, SIZE_STEP, allowed);
        let room = scheduler::largest(
            &req,
            &candidates(&nodes),
            &self.scheduled()?,
            OVER_PROVISIONING,
        );
        let largest = room / SIZE_STEP * SIZE_STEP;
        let bytes = i64::try_from(largest).unwrap_or(i64::MAX);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: bytes,
            maximum_volume_size: Some(bytes),
            minimum_volume_size: Some(SIZE_STEP as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc as R, Type};
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(R { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = r.into_inner();
        if r.name.is_empty() {
            return Err(invalid("name must not be empty"));
        }
        if r.source_volume_id.is_empty() {
            return Err(invalid("source_volume_id must not be empty"));
        }
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(invalid(format!(
                "snapshot parameter {k:?} is not known; snapshots take none"
            )));
        }
        let id = snapshot_id(&r.name);
        let _busy = self.begin(&r.source_volume_id)?;
        let found = SNAPSHOTS.get(&*self.store, &id).map_err(store_status)?;
        if let Some(f) = &found {
            if f.value.name != r.name || f.value.volume != r.source_volume_id {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists, of volume {}",
                    f.value.name, f.value.volume
                )));
            }
        }
        let v = self.existing(&r.source_volume_id)?.value;
        let (mut rec, version) = match found {
            Some(f) if f.value.ready => {
                return Ok(Response::new(csi::CreateSnapshotResponse {
                    snapshot: Some(csi_snapshot(&f.value)),
                }))
            }
            Some(f) => (f.value, f.version),
            None => {
                check_snapshottable(&v)?;
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let rec = SnapshotRecord {
                    id: id.clone(),
                    name: r.name.clone(),
                    volume: v.id.clone(),
                    size: v.size,
                    created_secs: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                    created_nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
                    ready: false,
                };
                // Recorded before any replica takes it: a failure part-way
                // leaves a record that a retry completes or a delete
                // cleans up, never layers nobody knows of.
                let version = self
                    .store
                    .commit(vec![SNAPSHOTS.put(&id, &rec, Expect::Absent)])
                    .map_err(store_status)?;
                (rec, version)
            }
        };
        self.snapshot_volume(&v, &id, false).await?;
        rec.ready = true;
        self.store
            .commit(vec![SNAPSHOTS.put(&id, &rec, Expect::Version(version))])
            .map_err(store_status)?;
        tracing::info!(volume.id = %v.id, snapshot.id = %id, "snapshot taken");
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&rec)),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(invalid("snapshot_id must not be empty"));
        }
        let Some(found) = SNAPSHOTS
            .get(&*self.store, &r.snapshot_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        };
        let _busy = self.begin(&found.value.volume)?;
        // Read again under the volume's slot: it may have changed since.
        let Some(found) = SNAPSHOTS
            .get(&*self.store, &r.snapshot_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        };
        let restoring = self.filling_from(&ContentSource::Snapshot(r.snapshot_id.clone()))?;
        if !restoring.is_empty() {
            return Err(Status::failed_precondition(format!(
                "snapshot {} is being restored into {}",
                r.snapshot_id,
                restoring.join(", ")
            )));
        }
        if let Some(v) = self.get_volume(&found.value.volume)? {
            self.snapshot_volume(&v, &r.snapshot_id, true).await?;
        }
        self.store
            .commit(vec![
                SNAPSHOTS.delete(&r.snapshot_id, Expect::Version(found.version))
            ])
            .map_err(store_status)?;
        tracing::info!(volume.id = %found.value.volume, snapshot.id = %r.snapshot_id, "snapshot deleted");
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let (after, limit) = page_args(r.max_entries, &r.starting_token)?;
        let mut page: Vec<SnapshotRecord> = SNAPSHOTS
            .all(&*self.store)
            .map_err(store_status)?
            .into_iter()
            .map(|(_, s)| s.value)
            .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.volume == r.source_volume_id)
            .filter(|s| after.is_none_or(|a| s.id.as_str() > a))
            .take(limit.saturating_add(1))
            .collect();
        let next_token = if page.len() > limit {
            page.truncate(limit);
            format!("p1:{}", page.last().expect("limit >= 1").id)
        } else {
            String::new()
        };
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        _r: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(not_advertised("GET_SNAPSHOT"))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range must be given"))?;
        let size = size_for(Some(range))?;
        if let Some(c) = &r.volume_capability {
            check_capability(c).map_err(invalid)?;
        }
        // A raw block volume has no filesystem to grow; a published one
        // still needs its node to see the new size.
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        );
        let _busy = self.begin(&r.volume_id)?;
        let cur = self.existing(&r.volume_id)?;
        let mut v = cur.value;
        let answer = |v: &VolumeRecord| csi::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(v.size).unwrap_or(i64::MAX),
            node_expansion_required: !block || v.published_node.is_some(),
        };
        if size <= v.size {
            return Ok(Response::new(answer(&v)));
        }
        if !matches!(
            v.state,
            VolumeState::Detached | VolumeState::Attached | VolumeState::Degraded
        ) {
            return Err(Status::failed_precondition(format!(
                "volume {} is {}; it cannot grow now",
                v.id,
                format!("{:?}", v.state).to_lowercase()
            )));
        }
        self.check_growth(&v, size)?;
        if let Some(node) = v.published_node.clone() {
            self.agent(&node)
                .await?
                .expand_engine(agent::ExpandEngineRequest {
                    volume_id: v.id.clone(),
                    size_bytes: size,
                })
                .await
                .map_err(|e| agent_failed(&node, &e))?;
        }
        // Detached: each replica grows on its node. Attached: the engine
        // grew them; this brings each node's record of the size along
        // (growing to the current size changes nothing).
        for rep in &v.replicas {
            self.agent(&rep.node)
                .await?
                .expand_replica(agent::ExpandReplicaRequest {
                    volume_id: v.id.clone(),
                    replica_name: rep.name.clone(),
                    size_bytes: size,
                })
                .await
                .map_err(|e| agent_failed(&rep.node, &e))?;
        }
        v.size = size;
        self.store
            .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(cur.version))])
            .map_err(store_status)?;
        tracing::info!(volume.id = %v.id, size, "volume expanded");
        Ok(Response::new(answer(&v)))
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        let v = self.existing(&r.volume_id)?.value;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(Controller::csi_volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.published_node.iter().cloned().collect(),
                volume_condition: Some(Controller::condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id must not be empty"));
        }
        let _busy = self.begin(&r.volume_id)?;
        let cur = self.existing(&r.volume_id)?;
        let mut v = cur.value;
        let mut params = v.params.clone();
        params
            .apply_mutable(&r.mutable_parameters)
            .map_err(invalid)?;
        if params.replicas > v.params.replicas {
            // Room for the extra replicas, on nodes holding none yet.
            let nodes = self.nodes()?;
            let allowed = allowed_nodes(&v.topology, &nodes);
            let mut req = Controller::scheduler_request(&params, v.size, allowed);
            req.count = (params.replicas - v.params.replicas) as usize;
            req.excluded = v.replicas.iter().map(|x| x.node.clone()).collect();
            self.place(&req, &nodes)?;
        }
        if params != v.params {
            tracing::info!(volume.id = %v.id, replicas = params.replicas, locality = ?params.data_locality, "volume modified");
            v.params = params;
            self.store
                .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(cur.version))])
                .map_err(store_status)?;
        }
        // The health watch brings the replicas to the new count (and
        // place) while the volume is published.
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}

/// How long the controller waits to reach a node's agent.
const AGENT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one agent call may take (starting a replica process included).
const AGENT_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A failure of a CreateVolume whose record already exists, as a code the
/// CO counts as not final (external-provisioner: CANCELLED,
/// DEADLINE_EXCEEDED, UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED). With a
/// final code it would take the volume for never created and, once the
/// claim is gone, never call again: the record, its replicas and any hold
/// on its source (a clone's) would be left behind for good. Kept in
/// progress, the CO retries until the create finishes, and deletes the
/// volume then if the claim went away.
fn resumable(volume: &str, e: &Status) -> Status {
    match e.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unavailable
        | Code::ResourceExhausted
        | Code::Aborted => e.clone(),
        _ => Status::unavailable(format!(
            "volume {volume} is still being created (a retry resumes it): {}",
            e.message()
        )),
    }
}

/// Asks `rep`'s node, through its connected `agent`, to delete it (its
/// process and directory).
pub(super) async fn delete_replica_via(
    mut agent: agent::agent_client::AgentClient<Channel>,
    volume: &str,
    rep: &ReplicaRecord,
) -> Result<(), Status> {
    agent
        .delete_replica(agent::DeleteReplicaRequest {
            volume_id: volume.to_owned(),
            replica_name: rep.name.clone(),
            disk_path: rep.disk.clone(),
        })
        .await
        .map(drop)
        .map_err(|e| agent_failed(&rep.node, &e))
}

/// An agent's refusal or failure, naming the node; its code passes
/// through (a node's INVALID_ARGUMENT is still the caller's).
pub(super) fn agent_failed(node: &str, e: &Status) -> Status {
    Status::new(e.code(), format!("node {node}: {}", e.message()))
}

fn not_advertised(cap: &str) -> Status {
    Status::new(
        Code::Unimplemented,
        format!("{cap} is not advertised by this build"),
    )
}

#[tonic::async_trait]
impl mapi::manager_server::Manager for Arc<Controller> {
    async fn register_node(
        &self,
        r: Request<mapi::RegisterNodeRequest>,
    ) -> Result<Response<mapi::RegisterNodeResponse>, Status> {
        let r = r.into_inner();
        if r.node_id.is_empty() {
            return Err(invalid("node_id must not be empty"));
        }
        if r.agent_address.is_empty() {
            return Err(invalid("agent_address must not be empty"));
        }
        let mut paths = BTreeSet::new();
        for d in &r.disks {
            if !d.path.starts_with('/') {
                return Err(invalid(format!("disk path {:?} must be absolute", d.path)));
            }
            if d.capacity_bytes == 0 {
                return Err(invalid(format!("disk {} reports no capacity", d.path)));
            }
            if !paths.insert(&d.path) {
                return Err(invalid(format!("disk {} is listed twice", d.path)));
            }
        }
        let rec = NodeRecord {
            id: r.node_id.clone(),
            agent_address: r.agent_address,
            disks: r
                .disks
                .into_iter()
                .map(|d| Disk {
                    path: d.path,
                    capacity: d.capacity_bytes,
                    tags: d.tags.into_iter().collect(),
                })
                .collect(),
            tags: r.tags.into_iter().collect(),
            topology: r.topology.into_iter().collect(),
            max_volumes: r.max_volumes,
            last_seen: now(),
        };
        self.store
            .commit(vec![NODES.put(&r.node_id, &rec, Expect::Any)])
            .map_err(store_status)?;
        tracing::debug!(node.id = %r.node_id, "node registered");
        Ok(Response::new(mapi::RegisterNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _r: Request<mapi::ListNodesRequest>,
    ) -> Result<Response<mapi::ListNodesResponse>, Status> {
        let nodes_json = self
            .nodes()?
            .iter()
            .map(|n| serde_json::to_string(n).expect("records serialize"))
            .collect();
        Ok(Response::new(mapi::ListNodesResponse { nodes_json }))
    }

    async fn get_volume(
        &self,
        r: Request<mapi::GetVolumeRequest>,
    ) -> Result<Response<mapi::GetVolumeResponse>, Status> {
        let id = r.into_inner().volume_id;
        let v = self.existing(&id)?.value;
        Ok(Response::new(mapi::GetVolumeResponse {
            volume_json: serde_json::to_string(&v).expect("records serialize"),
        }))
    }
}
