//! Attached volumes' health, as the controller keeps it: every interval it
//! asks each published volume's node for its engine's status, records the
//! state an operator sees (attached, degraded, faulted), and brings back
//! replicas that failed but serve again (a replica process its node
//! restarted, a node back from a partition): the engine re-adds such a
//! replica and rebuilds only the extents that differ, then turns it
//! read-write.
//!
//! A volume with a CSI call in flight is skipped that round (the call
//! holds its operation slot), and a check holds the slot itself, so a
//! publish or delete never races it.

// The helpers answer with tonic's Status, like the service they share.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::model::{VolumeState, VOLUMES};
use super::service::Controller;
use crate::api::agent;
use crate::store::Expect;

/// Checks every published volume now and then every `every`.
pub async fn watch(ctl: Arc<Controller>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        check_all(&ctl).await;
    }
}

/// One round over every published volume.
pub async fn check_all(ctl: &Controller) {
    let volumes = match VOLUMES.all(&*ctl.store) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "health check cannot read volumes");
            return;
        }
    };
    for (id, v) in volumes {
        let watched = matches!(
            v.value.state,
            VolumeState::Attached | VolumeState::Degraded | VolumeState::Faulted
        );
        if v.value.published_node.is_none() || !watched {
            continue;
        }
        let Ok(_busy) = ctl.begin(&id) else {
            continue;
        };
        if let Err(e) = check(ctl, &id).await {
            tracing::debug!(volume.id = %id, error = %e, "health check failed");
        }
    }
}

/// Checks one volume (its operation slot held by the caller).
async fn check(ctl: &Controller, id: &str) -> Result<(), Status> {
    let Some(cur) = VOLUMES
        .get(&*ctl.store, id)
        .map_err(|e| Status::internal(e.to_string()))?
    else {
        return Ok(());
    };
    let mut v = cur.value;
    let Some(node) = v.published_node.clone() else {
        return Ok(());
    };
    let mut a = ctl.agent(&node).await?;
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
    if state != v.state {
        tracing::info!(volume.id = %id, from = ?v.state, to = ?state, "volume health changed");
        v.state = state;
        ctl.store
            .commit(vec![VOLUMES.put(id, &v, Expect::Version(cur.version))])
            .map_err(|e| Status::aborted(e.to_string()))?;
    }
    for r in st.replicas.iter().filter(|r| r.mode == "failed") {
        // Only the volume's own replicas come back; one removed on purpose
        // is not in the record.
        if !v
            .replicas
            .iter()
            .any(|x| x.address.as_deref() == Some(r.address.as_str()))
        {
            continue;
        }
        match a
            .engine_add_replica(agent::EngineAddReplicaRequest {
                volume_id: id.to_owned(),
                address: r.address.clone(),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(volume.id = %id, replica.addr = %r.address, "failed replica serves again; rebuilding it");
            }
            Err(e) => {
                tracing::debug!(volume.id = %id, replica.addr = %r.address, error = %e.message(), "failed replica not back yet");
            }
        }
    }
    Ok(())
}
