//! Snapshots, and volumes made from them (restore) or from another volume
//! (clone), as the controller drives them through the nodes' agents.
//!
//! A snapshot is a chain layer named by the snapshot id on every replica
//! of its volume. A published volume takes it through its engine, which
//! holds I/O so every replica snapshots the same content; a detached one
//! on each replica directly (nothing writes to them). A restore fills
//! each new replica, on its own node, from one replica of the source that
//! holds the snapshot and is current ([`crate::replica::copy::pick_source`]:
//! every target copies from the same one); a clone is a
//! restore from a transient snapshot of the source volume, removed after.
//!
//! Every step is idempotent, so a CO retry after any failure finishes the
//! job: a snapshot record exists (not ready) before any replica is touched,
//! and a new volume keeps its source in its record while it is `Creating`.

#![allow(clippy::result_large_err)]

use std::collections::HashMap;

use tonic::Status;

use super::model::{ContentSource, SnapshotRecord, VolumeRecord, VolumeState, SNAPSHOTS, VOLUMES};
use super::service::{agent_failed, store_status, Controller};
use crate::api::agent;

/// How long a node may take to fill one replica of a restored volume.
const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// What one round of `ReplicaSnapshot` calls does on every replica of a
/// detached volume.
#[derive(Debug, Clone, Copy)]
enum Round {
    Take,
    MarkRemoved,
    Remove,
}

impl Controller {
    /// Takes (or with `remove`, removes) snapshot `snapshot` on every
    /// replica of `v`: through its engine when published, else on each
    /// replica. Done already counts as success.
    pub(super) async fn snapshot_volume(
        &self,
        v: &VolumeRecord,
        snapshot: &str,
        remove: bool,
    ) -> Result<(), Status> {
        if let Some(node) = &v.published_node {
            return self
                .agent(node)
                .await?
                .engine_snapshot(agent::EngineSnapshotRequest {
                    volume_id: v.id.clone(),
                    snapshot: snapshot.to_owned(),
                    remove,
                    labels: HashMap::new(),
                })
                .await
                .map(drop)
                .map_err(|e| agent_failed(node, &e));
        }
        // Every replica must take part: one left without the layer would
        // have a chain the others do not share. A removal first marks the
        // layer removed on all of them and merges it away on none until
        // every one is marked: cut short, it leaves either nothing removed
        // or a mark on every replica still holding the layer, which the
        // next engine (or a retry) finishes.
        if remove {
            self.on_every_replica(v, snapshot, Round::MarkRemoved)
                .await?;
            return self.on_every_replica(v, snapshot, Round::Remove).await;
        }
        self.on_every_replica(v, snapshot, Round::Take).await
    }

    /// One `ReplicaSnapshot` call per replica of `v`, side by side.
    async fn on_every_replica(
        &self,
        v: &VolumeRecord,
        snapshot: &str,
        round: Round,
    ) -> Result<(), Status> {
        let (remove, mark_only) = match round {
            Round::Take => (false, false),
            Round::MarkRemoved => (true, true),
            Round::Remove => (true, false),
        };
        let calls = v.replicas.iter().map(|rep| async move {
            self.agent(&rep.node)
                .await?
                .replica_snapshot(agent::ReplicaSnapshotRequest {
                    volume_id: v.id.clone(),
                    replica_name: rep.name.clone(),
                    snapshot: snapshot.to_owned(),
                    remove,
                    labels: HashMap::new(),
                    mark_only,
                })
                .await
                .map(drop)
                .map_err(|e| agent_failed(&rep.node, &e))
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
    }

    /// Snapshot `id`, or NOT_FOUND.
    fn existing_snapshot(&self, id: &str) -> Result<SnapshotRecord, Status> {
        SNAPSHOTS
            .get(&*self.store, id)
            .map_err(store_status)?
            .map(|s| s.value)
            .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))
    }

    /// Volumes still being made from `src` (restored or cloned, not yet
    /// filled): the source must stay until they are.
    pub(super) fn filling_from(&self, src: &ContentSource) -> Result<Vec<String>, Status> {
        Ok(VOLUMES
            .all(&*self.store)
            .map_err(store_status)?
            .into_iter()
            .filter(|(_, v)| {
                v.value.state == VolumeState::Creating && v.value.source.as_ref() == Some(src)
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// Removes the transient snapshot a clone `v` that never finished
    /// left on its source volume. Best effort: the clone is being deleted
    /// either way, and a layer left behind costs only space.
    pub(super) async fn drop_clone_snapshot(&self, v: &VolumeRecord) {
        let Some(ContentSource::Volume(src)) = &v.source else {
            return;
        };
        let snapshot = super::model::clone_snapshot(&v.id, v.clone_nonce);
        let removed = async {
            let _busy = self.begin(src)?;
            match self.get_volume(src)? {
                Some(source) => self.snapshot_volume(&source, &snapshot, true).await,
                None => Ok(()),
            }
        };
        if let Err(e) = removed.await {
            tracing::warn!(volume.id = %v.id, source = %src, snapshot = %snapshot, error = %e.message(), "clone's transient snapshot left on its source");
        }
    }

    /// The size a volume made from `src` must have at least, checking
    /// that the source exists (NOT_FOUND) and can be copied now.
    pub(super) fn source_size(&self, src: &ContentSource) -> Result<u64, Status> {
        match src {
            ContentSource::Snapshot(id) => {
                let s = self.existing_snapshot(id)?;
                if !s.ready {
                    return Err(Status::unavailable(format!(
                        "snapshot {id} is not ready yet; retry"
                    )));
                }
                Ok(s.size)
            }
            ContentSource::Volume(id) => {
                let v = self.existing(id)?.value;
                check_snapshottable(&v)?;
                Ok(v.size)
            }
        }
    }

    /// Fills every replica of new volume `v` (created, resting) from `src`.
    pub(super) async fn fill(&self, v: &VolumeRecord, src: &ContentSource) -> Result<(), Status> {
        let (volume, snapshot, transient) = match src {
            ContentSource::Snapshot(id) => (self.existing_snapshot(id)?.volume, id.clone(), false),
            ContentSource::Volume(id) => (
                id.clone(),
                super::model::clone_snapshot(&v.id, v.clone_nonce),
                true,
            ),
        };
        // While `v` is creating, neither the source volume nor its
        // snapshot can be deleted (`filling_from`), so the source volume's
        // slot is held only to take the transient snapshot and to remove
        // it: the source can be published or unpublished meanwhile (the
        // copy reads a snapshot layer, which writes never touch).
        let source = {
            let _busy = self.begin(&volume)?;
            let source = self.existing(&volume)?.value;
            if transient {
                check_snapshottable(&source)?;
                self.snapshot_volume(&source, &snapshot, false).await?;
            }
            source
        };
        let sources: Vec<String> = source
            .replicas
            .iter()
            .filter_map(|r| r.address.clone())
            .collect();
        let fills = v.replicas.iter().map(|rep| {
            let req = agent::RestoreReplicaRequest {
                volume_id: v.id.clone(),
                replica_name: rep.name.clone(),
                source_addresses: sources.clone(),
                snapshot: snapshot.clone(),
            };
            async move {
                let r = self
                    .agent_for(&rep.node, RESTORE_TIMEOUT)
                    .await?
                    .restore_replica(req)
                    .await
                    .map_err(|e| agent_failed(&rep.node, &e))?;
                tracing::info!(volume.id = %v.id, replica = %rep.name,
                    copied_bytes = r.into_inner().copied_bytes, "replica filled");
                Ok::<(), Status>(())
            }
        });
        futures_util::future::join_all(fills)
            .await
            .into_iter()
            .collect::<Result<(), Status>>()?;
        if transient {
            let _busy = self.begin(&volume)?;
            // Published or unpublished since: remove it where it is now.
            let source = self.existing(&volume)?.value;
            self.snapshot_volume(&source, &snapshot, true).await?;
        }
        Ok(())
    }
}

/// Whether `v` is in a state a snapshot can be taken in.
pub(super) fn check_snapshottable(v: &VolumeRecord) -> Result<(), Status> {
    use super::model::VolumeState as S;
    if matches!(v.state, S::Detached | S::Attached | S::Degraded) {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "volume {} is {}; it cannot be snapshotted or copied now",
            v.id,
            format!("{:?}", v.state).to_lowercase()
        )))
    }
}

/// `s` as CSI reports it.
pub(super) fn csi_snapshot(s: &SnapshotRecord) -> crate::csi::Snapshot {
    crate::csi::Snapshot {
        size_bytes: i64::try_from(s.size).unwrap_or(i64::MAX),
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_secs,
            nanos: s.created_nanos,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}
