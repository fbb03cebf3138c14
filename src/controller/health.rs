//! Attached volumes' health, as the controller keeps it: every interval it
//! asks each published volume's node for its engine's status, records the
//! state an operator sees (attached, degraded, faulted), and looks after
//! each replica in the volume's record:
//! - one the engine has failed, or does not know (an engine restarted
//!   from its original command line), is added back: a replica process its
//!   node restarted, or a node back from a partition, rejoins, and the
//!   engine rebuilds only the extents that differ; one taken back
//!   `MAX_REJOINS` times without ever becoming read-write again (its
//!   rebuilds keep failing) is not taken back again, and counts as away;
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
//! slot is held to record a changed state, while a replica is replaced, and
//! while a retired replica is deleted (its node already connected).

// The helpers answer with tonic's Status, like the service they share.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tonic::Status;

use super::model::{ReplicaRecord, VolumeRecord, VolumeState, MAX_REJOINS, VOLUMES, ZONE_KEY};
use super::params::DataLocality;
use super::service::{allowed_nodes, delete_replica_via, now, Controller};
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
    // Side by side: a node that does not answer costs its volumes the
    // connect timeout, and must not hold up every other volume's check.
    futures_util::stream::iter(volumes)
        .for_each_concurrent(CHECKS_AT_ONCE, |(id, v)| async move {
            if !v.value.retired.is_empty() {
                delete_retired(ctl, &id, &v.value.retired).await;
            }
            let watched = v.value.state.serving();
            let Some(node) = v.value.published_node.clone().filter(|_| watched) else {
                return;
            };
            if let Err(e) = check(ctl, &id, &node).await {
                tracing::debug!(volume.id = %id, error = %e, "health check failed");
            }
        })
        .await;
}

/// Volumes checked at once in a round.
const CHECKS_AT_ONCE: usize = 16;

/// What became of one replica of the record in this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The engine has it read-write.
    Current,
    /// The engine has it and is rebuilding it, or has it queued for that.
    Serving,
    /// Failed (or unknown to the engine) and taken back now: a rebuild
    /// starts.
    Rejoined,
    /// Failed or unknown to the engine, and not reachable, or failed too
    /// often to be taken back again.
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
    let Some(v) = ctl.get_volume(id)? else {
        return Ok(());
    };
    // Healthy means as many replicas as asked for, all in the engine and
    // read-write: the engine knows its members, the record the rest.
    let rw = |rep: &ReplicaRecord| {
        st.replicas
            .iter()
            .any(|r| Some(r.address.as_str()) == rep.address.as_deref() && r.mode == "read_write")
    };
    let all_rw = v.replicas.iter().all(rw);
    // Replicas are replaced, added or retired only while one of the
    // volume's own replicas serves current data: with none, the ones away
    // may be the only good copies, and must never be swapped for empty
    // ones (and then deleted).
    let any_rw = v.replicas.iter().any(rw);
    let state = match st.health.as_str() {
        "healthy" | "degraded" if all_rw && v.replicas.len() >= v.params.replicas as usize => {
            VolumeState::Attached
        }
        "healthy" | "degraded" => VolumeState::Degraded,
        _ => VolumeState::Faulted,
    };
    let mut seen = Vec::with_capacity(v.replicas.len());
    for rep in &v.replicas {
        let Some(addr) = rep.address.as_deref() else {
            seen.push(Seen::Away);
            continue;
        };
        let known = st.replicas.iter().find(|r| r.address == addr);
        if known.is_some_and(|r| r.mode == "read_write") {
            seen.push(Seen::Current);
            continue;
        }
        if known.is_some_and(|r| r.mode != "failed") {
            seen.push(Seen::Serving);
            continue;
        }
        if rep.rejoins >= MAX_REJOINS {
            tracing::debug!(volume.id = %id, replica.addr = %addr, rejoins = rep.rejoins, "replica failed every rebuild; left out until replaced");
            seen.push(Seen::Away);
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
                tracing::info!(volume.id = %id, replica.addr = %addr, rejoins = rep.rejoins + 1, "replica serves again; rebuilding it");
                seen.push(Seen::Rejoined);
            }
            // The replica answered the engine's probe, but another one is
            // being rebuilt: it is not away, only waiting its turn.
            Err(e) if e.code() == tonic::Code::Aborted => {
                tracing::debug!(volume.id = %id, replica.addr = %addr, "replica back, waiting for another rebuild to end");
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
            Seen::Current | Seen::Serving | Seen::Rejoined => None,
            Seen::Away => Some(rep.failed_since.unwrap_or(t)),
        };
        let rejoins = match s {
            Seen::Current => 0,
            Seen::Rejoined => rep.rejoins.saturating_add(1),
            Seen::Serving | Seen::Away => rep.rejoins,
        };
        if since != rep.failed_since || rejoins != rep.rejoins {
            rep.failed_since = since;
            rep.rejoins = rejoins;
            changed = true;
        }
        if any_rw && since.is_some_and(|f| t.saturating_sub(f) >= timeout) {
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
        match grow(ctl, &mut a, v, version, None, Some(i)).await {
            Ok((nv, ver)) => (v, version) = (nv, ver),
            Err(e) => {
                tracing::warn!(volume.id = %id, error = %e.message(), "cannot replace a stale replica yet");
                return Ok(());
            }
        }
    }
    // The engine's membership follows the record: a replica it still has
    // that the record no longer names (retired, or surplus) goes.
    for r in &st.replicas {
        let named = v
            .replicas
            .iter()
            .any(|x| x.address.as_deref() == Some(r.address.as_str()));
        if !named {
            let _ = a
                .engine_remove_replica(agent::EngineRemoveReplicaRequest {
                    volume_id: id.to_owned(),
                    address: r.address.clone(),
                })
                .await;
        }
    }
    if !any_rw {
        return Ok(());
    }
    if let Err(e) = reconcile(ctl, &mut a, v, version, &st, node).await {
        tracing::debug!(volume.id = %id, error = %e.message(), "replica count or locality not reconciled yet");
    }
    Ok(())
}

/// One step toward the replicas `v`'s parameters ask for (ModifyVolume
/// changes them on a live volume): too few, and one is added and rebuilt;
/// too many, and once every replica is read-write one is retired; with
/// best-effort `dataLocality`, a replica is added on the engine's node
/// `node` when it holds none (the surplus then goes elsewhere). Only a
/// published volume is reconciled: its engine says which replicas hold
/// current data, so a surplus replica removed is never the only fresh one.
async fn reconcile(
    ctl: &Controller,
    a: &mut Agent,
    v: VolumeRecord,
    version: u64,
    st: &agent::EngineStatusResponse,
    node: &str,
) -> Result<(), Status> {
    let rw = |rep: &ReplicaRecord| {
        rep.address.as_deref().is_some_and(|addr| {
            st.replicas
                .iter()
                .any(|r| r.address == addr && r.mode == "read_write")
        })
    };
    // A replica placed but never created (its node failed the call).
    if let Some(i) = v.replicas.iter().position(|r| r.address.is_none()) {
        let mut v = v;
        let addr = ctl.create_replica(&v.id, v.size, &v.replicas[i]).await?;
        v.replicas[i].address = Some(addr.clone());
        ctl.store
            .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
            .map_err(|e| Status::aborted(e.to_string()))?;
        a.engine_add_replica(agent::EngineAddReplicaRequest {
            volume_id: v.id.clone(),
            address: addr,
        })
        .await?;
        return Ok(());
    }
    let all_rw = v.replicas.iter().all(rw);
    let want = v.params.replicas as usize;
    let locality = v.params.data_locality == DataLocality::BestEffort;
    let has_local = v.replicas.iter().any(|r| r.node == node);
    let have = v.replicas.len();
    if have < want {
        let here = (locality && !has_local).then(|| BTreeSet::from([node.to_owned()]));
        match grow(ctl, a, v.clone(), version, here.clone(), None).await {
            // No room on the engine's node: placed anywhere instead.
            Err(_) if here.is_some() => grow(ctl, a, v, version, None, None).await.map(drop),
            r => r.map(drop),
        }
    } else if locality && !has_local && have == want && all_rw {
        grow(
            ctl,
            a,
            v,
            version,
            Some(BTreeSet::from([node.to_owned()])),
            None,
        )
        .await
        .map(drop)
    } else if have > want && all_rw {
        // The last one that is not the engine's local copy (when locality
        // keeps that one).
        let i = v
            .replicas
            .iter()
            .rposition(|r| !(locality && r.node == node))
            .unwrap_or(have - 1);
        retire(ctl, a, v, version, i).await
    } else {
        Ok(())
    }
}

/// Takes replica `i` out of `v` (published; its engine reached through
/// `a`): recorded as retired first, then removed from the engine; the
/// next rounds delete it.
async fn retire(
    ctl: &Controller,
    a: &mut Agent,
    mut v: VolumeRecord,
    version: u64,
    i: usize,
) -> Result<(), Status> {
    let old = v.replicas.remove(i);
    v.retired.push(old.clone());
    ctl.store
        .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
        .map_err(|e| Status::aborted(e.to_string()))?;
    tracing::info!(volume.id = %v.id, replica = %old.name, node.id = %old.node, "surplus replica retired");
    if let Some(addr) = &old.address {
        a.engine_remove_replica(agent::EngineRemoveReplicaRequest {
            volume_id: v.id.clone(),
            address: addr.clone(),
        })
        .await?;
    }
    Ok(())
}

/// An agent client.
type Agent = agent::agent_client::AgentClient<tonic::transport::Channel>;

/// Adds a replica to `v` (published, its engine reached through `a`) on a
/// node holding none of the volume's replicas (and among `allowed`, if
/// given), in place of replica `swap` (which is retired) or beside the
/// others. The placement (and the retirement) is recorded before any node
/// acts, so a failure part-way leaves a record the next round carries on
/// from.
async fn grow(
    ctl: &Controller,
    a: &mut Agent,
    mut v: VolumeRecord,
    mut version: u64,
    allowed: Option<BTreeSet<String>>,
    swap: Option<usize>,
) -> Result<(VolumeRecord, u64), Status> {
    let nodes = ctl.nodes()?;
    // Within the volume's own topology, as its first replicas were.
    let allowed = match (allowed, allowed_nodes(&v.topology, &nodes)) {
        (Some(a), Some(t)) => Some(a.intersection(&t).cloned().collect()),
        (a, t) => a.or(t),
    };
    let mut req = Controller::scheduler_request(&v.params, v.size, allowed);
    req.count = 1;
    req.excluded = v
        .replicas
        .iter()
        .chain(&v.retired)
        .map(|r| r.node.clone())
        .collect::<BTreeSet<_>>();
    // Away from the zones the replicas that stay are in.
    req.used_zones = v
        .replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != swap)
        .filter_map(|(_, r)| nodes.iter().find(|n| n.id == r.node))
        .filter_map(|n| n.topology.get(ZONE_KEY).cloned())
        .collect();
    let p = ctl
        .place(&req, &nodes)?
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
        rejoins: 0,
    };
    let (i, old) = match swap {
        Some(i) => {
            let old = std::mem::replace(&mut v.replicas[i], new.clone());
            v.retired.push(old.clone());
            tracing::warn!(volume.id = %v.id, replica = %old.name, node.id = %old.node, to = %new.node,
                "replica stale past staleReplicaTimeout; replacing it");
            (i, Some(old))
        }
        None => {
            v.replicas.push(new.clone());
            tracing::info!(volume.id = %v.id, replica = %new.name, node.id = %new.node,
                replicas = v.replicas.len(), "adding a replica");
            (v.replicas.len() - 1, None)
        }
    };
    version = ctl
        .store
        .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
        .map_err(|e| Status::aborted(e.to_string()))?;
    let addr = ctl.create_replica(&v.id, v.size, &new).await?;
    v.replicas[i].address = Some(addr.clone());
    version = ctl
        .store
        .commit(vec![VOLUMES.put(&v.id, &v, Expect::Version(version))])
        .map_err(|e| Status::aborted(e.to_string()))?;
    if let Some(old_addr) = old.as_ref().and_then(|o| o.address.as_ref()) {
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
    for rep in retired {
        // Connected first, without the volume's slot: a node that is down
        // costs its connect timeout here, not CSI calls turned away.
        let agent = match ctl.agent_for(&rep.node, RETIRED_DELETE_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(volume.id = %id, replica = %rep.name, error = %e.message(), "replaced replica's node not reachable yet");
                continue;
            }
        };
        // Under the slot, and only if the current record still lists it as
        // retired: the list came from a read made before, and since then
        // the volume may have been deleted and created again under the same
        // id, with a replica of the same name in the same directory.
        let Ok(_busy) = ctl.begin(id) else { return };
        let Ok(Some(cur)) = VOLUMES.get(&*ctl.store, id) else {
            return;
        };
        if !cur.value.retired.contains(rep) {
            continue;
        }
        if let Err(e) = delete_replica_via(agent, id, rep).await {
            tracing::debug!(volume.id = %id, replica = %rep.name, error = %e.message(), "replaced replica not deleted yet");
            continue;
        }
        tracing::info!(volume.id = %id, replica = %rep.name, node.id = %rep.node, "replaced replica deleted");
        let mut v = cur.value;
        v.retired.retain(|r| r != rep);
        if let Err(e) = ctl
            .store
            .commit(vec![VOLUMES.put(id, &v, Expect::Version(cur.version))])
        {
            tracing::debug!(volume.id = %id, error = %e, "retired replicas recorded next round");
        }
    }
}

/// How long deleting one retired replica may hold its volume's slot.
const RETIRED_DELETE_TIMEOUT: Duration = Duration::from_secs(10);
