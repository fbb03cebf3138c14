//! `shorthorn csi`: a CSI client on the command line, one subcommand per
//! RPC a CO makes in a volume's life, printing each answer as JSON. It is
//! what the README's walk-through uses against `shorthorn dev`, and a way
//! to poke any CSI driver's socket by hand. Part of the binary, not the
//! library.

use std::collections::HashMap;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Status;

use shorthorn::csi;
use shorthorn::csi::volume_capability::access_mode::Mode;
use shorthorn::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// The driver's CSI socket, unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    #[command(subcommand)]
    cmd: CsiCmd,
}

/// How the volume is consumed: a filesystem (`--fs`) or a raw block
/// device (`--block`).
#[derive(Args, Debug, Clone)]
struct Access {
    /// Filesystem to make (on a blank volume) and mount.
    #[arg(long, default_value = "ext4", conflicts_with = "block")]
    fs: String,
    /// Mount options.
    #[arg(long = "mount-flag")]
    mount_flags: Vec<String>,
    /// A raw block volume instead of a filesystem.
    #[arg(long)]
    block: bool,
}

impl Access {
    fn capability(&self) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs.clone(),
                    mount_flags: self.mount_flags.clone(),
                    volume_mount_group: String::new(),
                })
            }),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Subcommand, Debug)]
enum CsiCmd {
    /// The plugin's name, version, capabilities, readiness and node info.
    Info,
    /// CreateVolume.
    Create {
        /// The volume's name (as a PVC's would be).
        name: String,
        /// Capacity, e.g. 1Gi [default: 1Gi, or the source's size].
        #[arg(long, value_parser = shorthorn::units::parse_size)]
        size: Option<u64>,
        /// A StorageClass parameter, KEY=VALUE; repeat for each.
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// Restore this snapshot id into the new volume.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume id into the new volume.
        #[arg(long)]
        from_volume: Option<String>,
        #[command(flatten)]
        access: Access,
    },
    /// CreateSnapshot of a volume, attached or not.
    Snapshot {
        /// The snapshot's name (as a VolumeSnapshot's would be).
        name: String,
        /// Source volume id.
        #[arg(long)]
        volume: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot {
        /// Snapshot id.
        snapshot: String,
    },
    /// ListSnapshots (every page).
    Snapshots {
        /// Only this volume's.
        #[arg(long)]
        volume: Option<String>,
    },
    /// DeleteVolume.
    Delete {
        /// Volume id.
        volume: String,
    },
    /// ListVolumes (every page).
    List,
    /// ControllerPublishVolume: attach the volume to a node (its engine
    /// starts there); prints the publish context `stage` needs.
    Publish {
        /// Volume id.
        volume: String,
        /// Node id (see `info`).
        #[arg(long)]
        node: String,
        #[command(flatten)]
        access: Access,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
    },
    /// ControllerUnpublishVolume.
    Unpublish {
        /// Volume id.
        volume: String,
        /// Node id; without it, every node.
        #[arg(long, default_value = "")]
        node: String,
    },
    /// NodeStageVolume: the device, formatted if blank, mounted at the
    /// staging path.
    Stage {
        /// Volume id.
        volume: String,
        /// Staging directory.
        #[arg(long)]
        staging_path: String,
        /// Publish context from `publish`, KEY=VALUE; repeat for each.
        #[arg(long = "context", value_parser = key_value)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        access: Access,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// Volume id.
        volume: String,
        /// Staging directory.
        #[arg(long)]
        staging_path: String,
    },
    /// NodePublishVolume: bind the staged volume at a target path.
    Mount {
        /// Volume id.
        volume: String,
        /// Staging directory.
        #[arg(long)]
        staging_path: String,
        /// Where the workload sees it.
        #[arg(long)]
        target: String,
        #[command(flatten)]
        access: Access,
        /// Mount read-only.
        #[arg(long)]
        readonly: bool,
    },
    /// NodeUnpublishVolume.
    Umount {
        /// Volume id.
        volume: String,
        /// The target path.
        #[arg(long)]
        target: String,
    },
    /// ControllerExpandVolume, then NodeExpandVolume when `--path` names
    /// where the volume is published (its device and filesystem grow
    /// online).
    Expand {
        /// Volume id.
        volume: String,
        /// The new capacity, e.g. 2Gi.
        #[arg(long, value_parser = shorthorn::units::parse_size)]
        size: u64,
        /// A target path it is published at.
        #[arg(long)]
        path: Option<String>,
        #[command(flatten)]
        access: Access,
    },
    /// NodeGetVolumeStats.
    Stats {
        /// Volume id.
        volume: String,
        /// A target path it is published at.
        #[arg(long)]
        path: String,
    },
}

async fn channel(endpoint: &str) -> Result<Channel, Status> {
    let path = csi::unix_endpoint(endpoint).ok_or_else(|| {
        Status::invalid_argument(format!(
            "--endpoint {endpoint:?} must be unix:///absolute/path"
        ))
    })?;
    csi::connect_unix(&path)
        .await
        .map_err(|e| Status::unavailable(format!("connecting to {endpoint}: {e}")))
}

fn volume_json(v: &csi::Volume) -> Value {
    use csi::volume_content_source::Type;
    let source = v
        .content_source
        .as_ref()
        .and_then(|s| s.r#type.as_ref())
        .map(|t| match t {
            Type::Snapshot(s) => json!({ "snapshot_id": s.snapshot_id }),
            Type::Volume(v) => json!({ "volume_id": v.volume_id }),
        });
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": source,
    })
}

fn snapshot_json(s: &csi::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time_unix": s.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": s.ready_to_use,
    })
}

/// Runs one subcommand; its answer as JSON.
pub async fn run(a: CsiArgs) -> Result<Value, Status> {
    use csi::controller_client::ControllerClient;
    use csi::identity_client::IdentityClient;
    use csi::node_client::NodeClient;
    let ch = channel(&a.endpoint).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    Ok(match a.cmd {
        CsiCmd::Info => {
            let mut id = IdentityClient::new(ch);
            let info = id
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await?
                .into_inner();
            let ready = id.probe(csi::ProbeRequest {}).await?.into_inner().ready;
            let node_info = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await
                .ok()
                .map(|r| {
                    let r = r.into_inner();
                    json!({
                        "node_id": r.node_id,
                        "max_volumes_per_node": r.max_volumes_per_node,
                        "topology": r.accessible_topology.map(|t| t.segments),
                    })
                });
            json!({
                "name": info.name,
                "vendor_version": info.vendor_version,
                "ready": ready,
                "node": node_info,
            })
        }
        CsiCmd::Create {
            name,
            size,
            params,
            from_snapshot,
            from_volume,
            access,
        } => {
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            // With a source, no size means the source's.
            let size = size.unwrap_or(if source.is_some() { 0 } else { 1 << 30 });
            let v = ctl
                .create_volume(csi::CreateVolumeRequest {
                    name,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: i64::try_from(size).unwrap_or(i64::MAX),
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![access.capability()],
                    parameters: params.into_iter().collect(),
                    volume_content_source: source
                        .map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            volume_json(&v)
        }
        CsiCmd::Delete { volume } => {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume,
                secrets: HashMap::new(),
            })
            .await?;
            json!({})
        }
        CsiCmd::Snapshot { name, volume } => {
            let s = ctl
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: volume,
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            snapshot_json(&s)
        }
        CsiCmd::DeleteSnapshot { snapshot } => {
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot,
                secrets: HashMap::new(),
            })
            .await?;
            json!({})
        }
        CsiCmd::Snapshots { volume } => {
            let mut out = Vec::new();
            let mut token = String::new();
            loop {
                let page = ctl
                    .list_snapshots(csi::ListSnapshotsRequest {
                        max_entries: 100,
                        starting_token: token,
                        source_volume_id: volume.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                out.extend(
                    page.entries
                        .iter()
                        .map(|e| snapshot_json(&e.snapshot.clone().unwrap_or_default())),
                );
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            json!(out)
        }
        CsiCmd::List => {
            let mut out = Vec::new();
            let mut token = String::new();
            loop {
                let page = ctl
                    .list_volumes(csi::ListVolumesRequest {
                        max_entries: 100,
                        starting_token: token,
                    })
                    .await?
                    .into_inner();
                for e in page.entries {
                    let mut v = volume_json(&e.volume.unwrap_or_default());
                    if let Some(st) = e.status {
                        v["published_node_ids"] = json!(st.published_node_ids);
                        v["abnormal"] = json!(st.volume_condition.as_ref().map(|c| c.abnormal));
                        v["condition"] = json!(st.volume_condition.map(|c| c.message));
                    }
                    out.push(v);
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            json!(out)
        }
        CsiCmd::Publish {
            volume,
            node: node_id,
            access,
            readonly,
        } => {
            let r = ctl
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: volume,
                    node_id,
                    volume_capability: Some(access.capability()),
                    readonly,
                    ..Default::default()
                })
                .await?
                .into_inner();
            json!({ "publish_context": r.publish_context })
        }
        CsiCmd::Unpublish { volume, node: n } => {
            ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume,
                node_id: n,
                secrets: HashMap::new(),
            })
            .await?;
            json!({})
        }
        CsiCmd::Stage {
            volume,
            staging_path,
            context,
            access,
        } => {
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume,
                publish_context: context.into_iter().collect(),
                staging_target_path: staging_path,
                volume_capability: Some(access.capability()),
                ..Default::default()
            })
            .await?;
            json!({})
        }
        CsiCmd::Unstage {
            volume,
            staging_path,
        } => {
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume,
                staging_target_path: staging_path,
            })
            .await?;
            json!({})
        }
        CsiCmd::Mount {
            volume,
            staging_path,
            target,
            access,
            readonly,
        } => {
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: volume,
                staging_target_path: staging_path,
                target_path: target,
                volume_capability: Some(access.capability()),
                readonly,
                ..Default::default()
            })
            .await?;
            json!({})
        }
        CsiCmd::Umount { volume, target } => {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume,
                target_path: target,
            })
            .await?;
            json!({})
        }
        CsiCmd::Expand {
            volume,
            size,
            path,
            access,
        } => {
            let bytes = i64::try_from(size)
                .map_err(|_| Status::invalid_argument(format!("--size {size} is too large")))?;
            let range = || csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            };
            let c = ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume.clone(),
                    capacity_range: Some(range()),
                    volume_capability: Some(access.capability()),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut out = json!({
                "capacity_bytes": c.capacity_bytes,
                "node_expansion_required": c.node_expansion_required,
            });
            if let Some(path) = path {
                let n = node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: volume,
                        volume_path: path,
                        capacity_range: Some(range()),
                        volume_capability: Some(access.capability()),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                out["node_capacity_bytes"] = json!(n.capacity_bytes);
            }
            out
        }
        CsiCmd::Stats { volume, path } => {
            let r = node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: volume,
                    volume_path: path,
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            let usage: Vec<Value> = r
                .usage
                .iter()
                .map(|u| {
                    json!({
                        "unit": csi::volume_usage::Unit::try_from(u.unit)
                            .map_or("unknown", |x| x.as_str_name())
                            .to_lowercase(),
                        "total": u.total,
                        "used": u.used,
                        "available": u.available,
                    })
                })
                .collect();
            json!({
                "usage": usage,
                "abnormal": r.volume_condition.as_ref().map(|c| c.abnormal),
                "condition": r.volume_condition.map(|c| c.message),
            })
        }
    })
}
