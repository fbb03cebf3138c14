//! The CSI Node service: stage (the engine's volume attached as a block
//! device, [`super::attach`]: an iSCSI login or a loop device over its
//! FUSE file; a filesystem made only on a blank device; mount), publish
//! (bind mounts, read-only, raw block device nodes), their inverses,
//! expansion and volume stats.
//!
//! Each call validates its request fully before touching the kernel, and
//! each step checks what is there first ([`super::mount`]), so a call
//! repeated after a crash of the node plugin half-way completes the work
//! rather than failing or doing it twice. Calls for one volume are
//! serialised: a concurrent one gets ABORTED, as the spec asks.

// Handlers answer with tonic's Status, the CSI boundary.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::attach::{self, Frontend, Served};
use super::{instances, mount, Node};
use crate::csi;
use crate::csi::volume_capability::AccessType;
use crate::csi::CTX_FRONTEND;

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

fn mount_status(e: &mount::Error) -> Status {
    Status::new(e.kind().grpc_code(), e.to_string())
}

/// Runs the kernel-side steps `f` off the async workers (they wait on
/// mount, mkfs, losetup).
async fn kernel<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, mount::Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| mount_status(&e))
}

fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, Status> {
    if v.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    Ok(v)
}

fn absolute(field: &str, v: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(required(field, v)?);
    if !p.is_absolute() {
        return Err(invalid(format!("{field} {v:?} must be an absolute path")));
    }
    Ok(p)
}

/// The `volume_path` of a stats or expand request: given, and naming a
/// place a volume can be published at (a relative path names none, so the
/// volume is NOT_FOUND there, as the spec words it).
fn published_path(v: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(required("volume_path", v)?);
    if !p.is_absolute() {
        return Err(Status::not_found(format!(
            "volume_path {v:?} is not an absolute path, so no volume is published there"
        )));
    }
    Ok(p)
}

/// What a capability asks the node to make of the device.
enum Access {
    Block,
    Mount { fs: String, flags: Vec<String> },
}

fn access(
    cap: Option<&csi::VolumeCapability>,
    context: &std::collections::HashMap<String, String>,
) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| invalid("volume_capability must be given"))?;
    match &cap.access_type {
        None => Err(invalid("volume_capability names neither block nor mount")),
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() {
                context
                    .get("fsType")
                    .cloned()
                    .unwrap_or_else(|| "ext4".into())
            } else {
                m.fs_type.clone()
            };
            if fs != "ext4" && fs != "xfs" {
                return Err(invalid(format!(
                    "fs_type {fs:?} is not supported: use ext4 or xfs"
                )));
            }
            Ok(Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            })
        }
    }
}

impl Node {
    /// Where the engine of `volume` serves it on this node; it must be
    /// there (the volume is published to this node) for a device to be
    /// attached.
    fn served(&self, volume: &str) -> Result<Served, Status> {
        let absent = || {
            Status::failed_precondition(format!(
                "volume {volume} has no engine serving on this node; ControllerPublishVolume it to this node first"
            ))
        };
        let served = self.instances.engine(volume).ok_or_else(absent)?.served();
        if let Served::Fuse { file } = &served {
            match mount::mounted_at(file).map_err(|e| mount_status(&e))? {
                Some(m) if m.fstype.starts_with("fuse") => {}
                _ => return Err(absent()),
            }
        }
        Ok(served)
    }

    /// Where the engine of `volume` would serve its FUSE file here, and
    /// the iSCSI target it would serve: what a device of the volume is
    /// attached from, whichever frontend served it.
    fn sources(&self, volume: &str) -> Result<(PathBuf, String), Status> {
        let file = self
            .instances
            .engine_file(volume)
            .map_err(|e| invalid(e.to_string()))?;
        Ok((file, instances::iqn(volume)))
    }

    fn begin(&self, volume: &str) -> Result<super::Busy<'_>, Status> {
        super::Busy::take(&self.busy, volume)
    }
}

/// Another target `source` (a staging mount, or a device node) is
/// published at, besides `target`.
fn published_elsewhere(source: &Path, target: &Path) -> Result<Option<PathBuf>, mount::Error> {
    let anchor = match mount::mounted_at(source)? {
        Some(m) => m,
        None => {
            // A device node: its publications are binds of that file of
            // the /dev filesystem.
            let dev = Path::new("/dev");
            let real = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_owned());
            let (Some(mut m), Ok(rel)) = (mount::mounted_at(dev)?, real.strip_prefix(dev)) else {
                return Ok(None);
            };
            m.root = Path::new("/").join(rel);
            m.target = real.clone();
            m
        }
    };
    // Published here already: a repeat is the same publication, whatever
    // else shows it (kubelet binds a block volume's target once more).
    if mount::mounted_at(target)?.is_some_and(|m| m.dev == anchor.dev && m.root == anchor.root) {
        return Ok(None);
    }
    Ok(mount::also_mounted(&anchor, &[target])?.into_iter().next())
}

#[tonic::async_trait]
impl csi::node_server::Node for Arc<Node> {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let access = access(r.volume_capability.as_ref(), &r.volume_context)?;
        let asked = match r.publish_context.get(CTX_FRONTEND).map(String::as_str) {
            Some(f @ ("fuse" | "iscsi")) => f.to_owned(),
            Some(other) => {
                return Err(invalid(format!(
                    "publish_context {CTX_FRONTEND}={other:?} is not a frontend this node attaches"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "publish_context lacks {CTX_FRONTEND}: was the volume published by ControllerPublishVolume?"
                )))
            }
        };
        let _busy = self.begin(volume)?;
        let served = self.served(volume)?;
        let serves = match &served {
            Served::Fuse { .. } => Frontend::Fuse,
            Served::Iscsi { .. } => Frontend::Iscsi,
        };
        if serves.as_str() != asked {
            return Err(Status::failed_precondition(format!(
                "volume {volume} was published with frontend {asked}, but its engine on this node serves {}; unpublish and publish it again",
                serves.as_str()
            )));
        }
        let node = self.clone();
        let volume = volume.to_owned();
        kernel(move || {
            let dev = served.attach()?;
            if let Access::Mount { fs, flags } = access {
                let made = mount::format_if_blank(&dev, &fs)?;
                let mounted = mount::mounted_at(&staging)?.is_some();
                // A volume grown while detached: its filesystem grows now.
                if !made && !mounted && fs == "ext4" {
                    mount::grow_ext4_offline(&dev)?;
                }
                // A restored or cloned xfs shares its source's UUID, which
                // xfs refuses to mount twice on one kernel without nouuid.
                let mut flags = flags;
                if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
                    flags.push("nouuid".to_owned());
                }
                mount::mount_fs(&dev, &fs, &staging, &flags)?;
                if !made && !mounted && fs == "xfs" {
                    mount::grow_fs(&dev, &staging)?;
                }
            }
            tracing::info!(volume.id = %volume, device = %dev.display(), node.id = %node.cfg.node_id, "volume staged");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let (file, iqn) = self.sources(volume)?;
        let _busy = self.begin(volume)?;
        let volume = volume.to_owned();
        kernel(move || {
            // Unmounting flushes the filesystem through the device to the
            // engine; only then is the device let go.
            mount::unmount(&staging)?;
            attach::detach(&file, &iqn)?;
            tracing::info!(volume.id = %volume, "volume unstaged");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let staging = absolute("staging_target_path", &r.staging_target_path)?;
        let target = absolute("target_path", &r.target_path)?;
        let access = access(r.volume_capability.as_ref(), &r.volume_context)?;
        let (file, iqn) = self.sources(volume)?;
        let _busy = self.begin(volume)?;
        let source = match &access {
            Access::Mount { .. } => {
                if mount::mounted_at(&staging)
                    .map_err(|e| mount_status(&e))?
                    .is_none()
                {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume} is not staged at {}; NodeStageVolume it first",
                        staging.display()
                    )));
                }
                staging
            }
            Access::Block => attach::attached(&file, &iqn)
                .map_err(|e| mount_status(&e))?
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "volume {volume} has no device on this node; NodeStageVolume it first"
                    ))
                })?,
        };
        let flags = match access {
            Access::Mount { flags, .. } => flags,
            Access::Block => Vec::new(),
        };
        let single_writer = r
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_mode.as_ref())
            .is_some_and(|m| {
                m.mode == csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32
            });
        let (ro, volume) = (r.readonly, volume.to_owned());
        kernel(move || {
            if single_writer {
                if let Some(other) = published_elsewhere(&source, &target)? {
                    return Err(mount::Error::SingleWriter {
                        volume,
                        other: other.display().to_string(),
                    });
                }
            }
            mount::bind(&source, &target, ro, &flags)?;
            tracing::info!(volume.id = %volume, target = %target.display(), read_only = ro, "volume published");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let target = absolute("target_path", &r.target_path)?;
        let _busy = self.begin(volume)?;
        let volume = volume.to_owned();
        kernel(move || {
            mount::unmount_and_remove(&target)?;
            tracing::info!(volume.id = %volume, target = %target.display(), "volume unpublished");
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let path = published_path(&r.volume_path)?;
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Status::not_found(format!("volume_path {} does not exist", path.display()))
            } else {
                Status::internal(format!("{}: {e}", path.display()))
            }
        })?;
        if mount::mounted_at(&path)
            .map_err(|e| mount_status(&e))?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "volume {volume} is not published at {}",
                path.display()
            )));
        }
        let usage = if meta.is_dir() {
            let s = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let frag = s.fragment_size();
            let bytes = |blocks: u64| i64::try_from(blocks * frag).unwrap_or(i64::MAX);
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            vec![
                csi::VolumeUsage {
                    available: bytes(s.blocks_available()),
                    total: bytes(s.blocks()),
                    used: bytes(s.blocks() - s.blocks_free()),
                    unit: csi::volume_usage::Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: n(s.files_available()),
                    total: n(s.files()),
                    used: n(s.files() - s.files_free()),
                    unit: csi::volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let size = mount::device_size(&path).map_err(|e| mount_status(&e))?;
            vec![csi::VolumeUsage {
                available: 0,
                total: i64::try_from(size).unwrap_or(i64::MAX),
                used: 0,
                unit: csi::volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(self.condition(volume).await),
        }))
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let volume = required("volume_id", &r.volume_id)?;
        let path = published_path(&r.volume_path)?;
        let want = r
            .capacity_range
            .as_ref()
            .map_or(0, |c| c.required_bytes.max(0).unsigned_abs());
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        let _busy = self.begin(volume)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        let served = self.served(volume)?;
        let Some(dev) = served.device().map_err(|e| mount_status(&e))? else {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is not staged on this node"
            )));
        };
        let volume = volume.to_owned();
        let size = kernel(move || {
            let size = served.refresh(want)?;
            if !block && path.is_dir() {
                mount::grow_fs(&dev, &path)?;
            }
            tracing::info!(volume.id = %volume, size, "volume expanded on the node");
            Ok(size)
        })
        .await?;
        if size < want {
            return Err(Status::out_of_range(format!(
                "the device has {size} bytes, fewer than the {want} asked; grow the volume first (ControllerExpandVolume)"
            )));
        }
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as T};
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(T::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: i64::from(self.cfg.max_volumes),
            accessible_topology: Some(csi::Topology {
                segments: self.topology(),
            }),
        }))
    }
}

impl Node {
    /// The volume's condition as its engine here reports it.
    async fn condition(&self, volume: &str) -> csi::VolumeCondition {
        use crate::engine::control::pb;
        if self.instances.engine(volume).is_none() {
            return csi::VolumeCondition {
                abnormal: true,
                message: "no engine runs for this volume on this node".into(),
            };
        }
        let status = self
            .instances
            .engine_status(volume)
            .await
            .map_err(|e| e.to_string());
        match status {
            Ok(s) => {
                let h = pb::Health::try_from(s.health).unwrap_or(pb::Health::Unspecified);
                let failed = s
                    .replicas
                    .iter()
                    .filter(|r| r.mode != pb::ReplicaMode::ReadWrite as i32)
                    .count();
                csi::VolumeCondition {
                    abnormal: h != pb::Health::Healthy,
                    message: format!(
                        "{}; {} of {} replicas not read-write",
                        h.as_str_name().trim_start_matches("HEALTH_").to_lowercase(),
                        failed,
                        s.replicas.len()
                    ),
                }
            }
            Err(e) => csi::VolumeCondition {
                abnormal: true,
                message: format!("the engine does not answer: {e}"),
            },
        }
    }
}
