//! Attached volumes' health, as the controller keeps it: every interval it
//! asks each published volume's node for its engine's status, records the
//! state an operator sees (attached, degraded, faulted), and looks after
//! each replica in the volume's record:
//! - one the engine has failed, or does not know (an engine restarted
//!   from its original command line), is added back: a replica process its
//!   node restarted, or a node back from a partition, rejoins, and the
//!   engine rebuilds only the extents that differ;
//! - one that stays unreachable is marked with the time it was first
//!   found so (`failed_since`, in the record, so a controller restart does
//!   not reset the clock); after the volume's `staleReplicaTimeout` it is
//!   replaced: a new replica is placed on a node holding none of the
//!   volume's, created, and added to the engine (which rebuilds it), and
//!   the old one is taken out of the engine and retired;
//! - retired replicas are deleted once their node answers (every volume,
//!   published or not).
//!
//! The engine is asked without holding the volume's operation slot, so a
//! CSI call is never turned away (ABORTED) because of a routine check; the
//! slot is held to record a changed state and while a replica is replaced.

// The helpers answer with tonic's Status, like the service they share.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::model::{ReplicaRecord, VolumeRecord, VolumeState, VOLUMES};
use super::scheduler;
use super::service::{candidates, now, Controller, OVER_PROVISIONING};
use crate::api::agent;
use crate::store::Expect;

/// Checks every published volume now and then every `every`.
pub async fn watch(ctl: Arc<Controller>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        check_all(&ctl).await;
    }
}

/// One round over every volume.
pub async fn check_all(ctl: &Controller) {
    let volumes = match VOLUMES.all(&*ctl.store) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "health check cannot read volumes");
            return;
        }
    };
    for (id, v) in volumes {
        if !v.value.retired.is_empty() {
            delete_retired(ctl, &id, &v.value.retired).await;
        }
        let watched = v.value.state.serving();
        let Some(node) = v.value.published_node.clone().filter(|_| watched) else {
            continue;
        };
        if let Err(e) = check(ctl, &id, &node).await {
            tracing::debug!(volume.id = %id, error = %e, "health check failed");
        }
    }
}

/// What became of one replica of the record in this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The engine has it (read-write or rebuilding), or took it back now.
    Serving,
    /// Failed or unknown to the engine, and not reachable.
    Away,
}

/// Checks one volume published to `node`.
async fn check(ctl: &Controller, id: &str, node: &str) -> Result<(), Status> {
    let mut a = ctl.agent(node).await?;
    let st = a
        .engine_status(agent::EngineStatusRequest {
            volume_id: id.to_owned(),
        })
        .await?
        .into_inner();
    let state = match st.health.as_str() {
        "healthy" => VolumeState::Attached,
        "degraded" => VolumeState::Degraded,
        _ => VolumeState::Faulted,
    };
    let Some(v) = ctl.get_volume(id)? else {
        return Ok(());
    };
    let mut seen = Vec::with_capacity(v.replicas.len());
    for rep in &v.replicas {
        let Some(addr) = rep.address.as_deref() else {
            seen.push(Seen::Away);
            continue;
        };
        let known = st.replicas.iter().find(|r| r.address == addr);
        if known.is_some_and(|r| r.mode != "failed") {
            seen.push(Seen::Serving);
            continue;
        }
        let added = a
            .engine_add_replica(agent::EngineAddReplicaRequest {
                volume_id: id.to_owned(),
                address: addr.to_owned(),
            })
            .await;
        match added {
            Ok(_) => {
                tracing::info!(volume.id = %id, replica.addr = %addr, "replica serves again; rebuilding it");
                seen.push(Seen::Serving);
            }
            Err(e) => {
                tracing::debug!(volume.id = %id, replica.addr = %addr, error = %e.message(), "failed replica not back yet");
                seen.push(Seen::Away);
            }
        }
    }
    let Ok(_busy) = ctl.begin(id) else {
        // A CSI call holds the volume; the next round records.
        return Ok(());
    };
    let Some(cur) = VOLUMES
        .get(&*ctl.store, id)
        .map_err(|e| Status::internal(e.to_string()))?
    else {
        return Ok(());
    };
    let mut v = cur.value;
    let still = v.published_node.as_deref() == Some(node)
        && v.state.serving()
        && v.replicas.len() == seen.len();
    if !still {
        return Ok(());
    }
    let t = now();
    let mut changed = state != v.state;
    if changed {
        tracing::info!(volume.id = %id, from = ?v.state, to = ?state, "volume health changed");
        v.state = state;
    }
    let timeout = v.params.stale_replica_timeout.as_secs();
    let mut stale = Vec::new();
    for (i, (rep, s)) in v.replicas.iter_mut().zip(&seen).enumerate() {
        let since = match s {
            Seen::Serving => None,
            Seen::Away => Some(rep.failed_since.unwrap_or(t)),
        };
        if since != rep.failed_since {
            rep.failed_since = since;
            changed = true;
        }
        if since.is_some_and(|f| t.saturating_sub(f) >= timeout) {
            stale.push(i);
        }
    }
    let mut version = cur.version;
    if changed {
        version = ctl
            .store
            .commit(vec![VOLUMES.put(id, &v, Expect::Version(version))])
            .map_err(|e| Status::aborted(e.to_string()))?;
    }
    for i in stale {
        match replace(ctl, &mut a, v, version, i).await {
            Ok((nv, ver)) => (v, version) = (nv, ver),
            Err(e) => {
                tracing::warn!(volume.id = %id, error = %e.message(), "cannot replace a stale replica yet");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Replaces replica `i` of `v` (published, its engine reached through
/// `a`) with a new one on a node holding none of the volume's replicas.
/// The new placement and the retirement are recorded before any node acts,
/// so a failure part-way leaves a record the next round carries on from.
async fn replace(
    ctl: &Controller,
    a: &mut agent::agent_client::AgentClient<tonic::transport::Channel>,
    mut v: VolumeRecord,
    mut version: u64,
    i: usize,
) -> Result<(VolumeRecord, u64), Status> {
    let nodes = ctl.nodes()?;
    let mut req = Controller::scheduler_request(&v.params, v.size, None);
    req.count = 1;
    req.excluded = v
        .replicas
        .iter()
        .chain(&v.retired)
        .map(|r| r.node.clone())
        .collect::<BTreeSet<_>>();
    let placed = scheduler::place(
        &req,
        &candidates(&nodes),
        &ctl.scheduled()?,
        OVER_PROVISIONING,
    )
    .map_err(|e| Status::resource_exhausted(e.to_string()))?;
    let p = placed
        .into_iter()
        .next()
        .ok_or_else(|| Status::resource_exhausted("the scheduler placed nothing"))?;
    let taken: BTreeSet<&str> = v
        .replicas
        .iter()
        .chain(&v.retired)
        .map(|r| r.name.as_str())
        .collect();
    let name = (0..)
        .map(|k| format!("r{k}"))
        .find(|n| !taken.contains(n.as_str()))
        .expect("a free name");
    let new = ReplicaRecord {
        name,
        node: p.node,
        disk: p.disk,
        address: None,
        failed_since: None,
    };
    let old = std::mem::replace(&mut v.replicas[i], new.clone());
    v.retired.push(old.clone());
    version = ctl
        .store
        .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
        .map_err(|e| Status::aborted(e.to_string()))?;
    tracing::warn!(volume.id = %v.id, replica = %old.name, node.id = %old.node, to = %new.node,
        "replica stale past staleReplicaTimeout; replacing it");
    let addr = ctl.create_replica(&v.id, v.size, &new).await?;
    v.replicas[i].address = Some(addr.clone());
    version = ctl
        .store
        .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
        .map_err(|e| Status::aborted(e.to_string()))?;
    if let Some(old_addr) = &old.address {
        a.engine_remove_replica(agent::EngineRemoveReplicaRequest {
            volume_id: v.id.clone(),
            address: old_addr.clone(),
        })
        .await?;
    }
    a.engine_add_replica(agent::EngineAddReplicaRequest {
        volume_id: v.id.clone(),
        address: addr.clone(),
    })
    .await?;
    tracing::info!(volume.id = %v.id, replica = %new.name, replica.addr = %addr, "replacement replica rebuilding");
    Ok((v, version))
}

/// Deletes the volume's retired replicas whose nodes answer, and forgets
/// them.
async fn delete_retired(ctl: &Controller, id: &str, retired: &[ReplicaRecord]) {
    let mut gone = Vec::new();
    for rep in retired {
        match ctl.delete_replica(id, rep).await {
            Ok(()) => {
                tracing::info!(volume.id = %id, replica = %rep.name, node.id = %rep.node, "replaced replica deleted");
                gone.push(rep.name.clone());
            }
            Err(e) => {
                tracing::debug!(volume.id = %id, replica = %rep.name, error = %e.message(), "replaced replica not deleted yet");
            }
        }
    }
    if gone.is_empty() {
        return;
    }
    let Ok(_busy) = ctl.begin(id) else { return };
    let Ok(Some(cur)) = VOLUMES.get(&*ctl.store, id) else {
        return;
    };
    let mut v = cur.value;
    v.retired.retain(|r| !gone.contains(&r.name));
    if let Err(e) = ctl
        .store
        .commit(vec![VOLUMES.put(id, &v, Expect::Version(cur.version))])
    {
        tracing::debug!(volume.id = %id, error = %e, "retired replicas recorded next round");
    }
}
