//! Attached volumes' health, as the controller keeps it: every interval it
//! asks each published volume's node for its engine's status, records the
//! state an operator sees (attached, degraded, faulted), and brings back
//! replicas that failed but serve again (a replica process its node
//! restarted, a node back from a partition): the engine re-adds such a
//! replica and rebuilds only the extents that differ, then turns it
//! read-write.
//!
//! The engine is asked without holding the volume's operation slot, so a
//! CSI call is never turned away (ABORTED) because of a check; the slot is
//! held only for the moment a changed state is recorded.

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
        let watched = v.value.state.serving();
        let Some(node) = v.value.published_node.clone().filter(|_| watched) else {
            continue;
        };
        if let Err(e) = check(ctl, &id, &node).await {
            tracing::debug!(volume.id = %id, error = %e, "health check failed");
        }
    }
}

/// Checks one volume published to `node`. The engine is asked without
/// holding the volume's operation slot (a CSI call on the volume is never
/// turned away for it); the slot is taken only to record a new state, and
/// if a call holds it the state waits for the next round.
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
    let v = {
        let Ok(_busy) = ctl.begin(id) else {
            return Ok(());
        };
        let Some(cur) = VOLUMES
            .get(&*ctl.store, id)
            .map_err(|e| Status::internal(e.to_string()))?
        else {
            return Ok(());
        };
        let mut v = cur.value;
        let still = v.published_node.as_deref() == Some(node) && v.state.serving();
        if !still {
            return Ok(());
        }
        if state != v.state {
            tracing::info!(volume.id = %id, from = ?v.state, to = ?state, "volume health changed");
            v.state = state;
            ctl.store
                .commit(vec![VOLUMES.put(id, &v, Expect::Version(cur.version))])
                .map_err(|e| Status::aborted(e.to_string()))?;
        }
        v
    };
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
