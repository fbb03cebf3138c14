//! Online rebuild: bringing an empty or stale replica into the volume while
//! it serves I/O.
//!
//! 1. The replica is marked rebuilding (durably): until step 6 nothing
//!    trusts its content, whatever crashes.
//! 2. Under the I/O gate, every replica, the new one included, snapshots
//!    under one system name; the new replica joins write-only. From here on
//!    it receives every write in its new head, so only the layers below the
//!    head have to be copied, and they no longer change.
//! 3. Its chain is reshaped to the source's (`Replica::set_chain`), keeping
//!    the layers it already has under the same names.
//! 4. Layer by layer, bottom up, the per-chunk CRC32Cs (`Extents`) of source
//!    and target are compared; chunks that differ are punched and copied,
//!    within the bandwidth limit. A stale replica that was away briefly
//!    copies only what changed.
//! 5. `finish_rebuild` syncs its layers and clears the flag.
//! 6. It turns read-write and a new epoch records it as a member.
//! 7. Rebuild snapshots older than the newest snapshot are merged away on
//!    every replica, so at most one is left below the head.
//!
//! A failure at any step fails the new replica; a kill of any process
//! leaves it flagged rebuilding, and the next engine rebuilds it again
//! (step 4 then copies only what is still missing).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::startup::probe;
use super::volume::{Inner, Mode, Slot, Volume};
use super::Error;
use crate::replica::client::Client;
use crate::replica::copy::{self, Progress};

impl Volume {
    /// Adds replica `addr` (empty, or a stale copy of this volume) and
    /// starts rebuilding it in the background; `status` shows its progress.
    /// Rebuilds run one at a time: while one runs, this probes `addr` and
    /// then answers [`Error::RebuildQueued`] (the replica answers; ask
    /// again later), so a caller is never held for a whole rebuild and
    /// can tell a replica that is away from one that waits its turn.
    pub async fn add_replica(&self, addr: &str) -> Result<(), Error> {
        self.add(addr, false).await
    }

    /// [`add_replica`](Self::add_replica), waiting for an earlier rebuild
    /// to end instead of refusing (the engine's own start-up queues its
    /// stale replicas this way).
    pub(super) async fn add_replica_queued(&self, addr: &str) -> Result<(), Error> {
        self.add(addr, true).await
    }

    async fn add(&self, addr: &str, wait: bool) -> Result<(), Error> {
        let inner = &self.inner;
        {
            let slots = inner.slots();
            if slots
                .iter()
                .any(|s| s.addr == addr && s.mode != Mode::Failed)
            {
                return Err(Error::AlreadyMember { addr: addr.into() });
            }
        }
        let err = |cause| Error::Replica {
            addr: addr.into(),
            cause,
        };
        let (conns, info) = probe(&inner.name, addr, &inner.opts).await.map_err(err)?;
        let guard = match Arc::clone(&inner.rebuilding).try_lock_owned() {
            Ok(g) => g,
            Err(_) if wait => Arc::clone(&inner.rebuilding).lock_owned().await,
            Err(_) => return Err(Error::RebuildQueued { addr: addr.into() }),
        };
        // Another add of the same replica may have won the wait.
        if inner
            .slots()
            .iter()
            .any(|s| s.addr == addr && s.mode != Mode::Failed)
        {
            return Err(Error::AlreadyMember { addr: addr.into() });
        }
        let size = self.size();
        if info.size > size {
            return Err(Error::SizeMismatch {
                addr: addr.into(),
                replica: info.size,
                volume: size,
            });
        }
        let target = conns[0].clone();
        target.set_rebuilding(true).await.map_err(err)?;
        if info.size < size {
            target.expand(size).await.map_err(err)?;
        }
        let progress = Arc::new(Progress::default());
        let snap = format!("{REBUILD_PREFIX}{:x}", unique());
        let idx = {
            let _g = inner.gate.write().await;
            inner.snapshot_all(&snap, false, BTreeMap::new()).await?;
            target
                .snapshot_as(&snap, false, BTreeMap::new())
                .await
                .map_err(err)?;
            let mut slots = inner.slots();
            let mut slot = Slot::new(addr, conns, Mode::WriteOnly, None, &inner.metrics);
            slot.rebuild = Some(Arc::clone(&progress));
            if let Some(i) = slots.iter().position(|s| s.addr == addr) {
                slots[i] = slot;
                i
            } else {
                slots.push(slot);
                slots.len() - 1
            }
        };
        inner.watch(idx);
        tracing::info!(volume.id = %inner.name, replica.addr = %addr, snapshot = %snap, "rebuild started");
        let inner = Arc::clone(inner);
        tokio::spawn(async move {
            let _guard = guard;
            let started = Instant::now();
            match copy_layers(&inner, &target, &progress).await {
                Ok(()) => {
                    {
                        let mut slots = inner.slots();
                        if slots[idx].mode == Mode::WriteOnly {
                            slots[idx].mode = Mode::ReadWrite;
                            inner.generation.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    if let Err(e) = inner.settle_epoch().await {
                        tracing::error!(volume.id = %inner.name, error = %e, "cannot record the rebuilt replica");
                    }
                    tracing::info!(
                        volume.id = %inner.name,
                        replica.addr = %inner.slots()[idx].addr,
                        copied_bytes = progress.done.load(Ordering::Relaxed),
                        seconds = started.elapsed().as_secs_f64(),
                        "rebuild done"
                    );
                    // Still holding the rebuild slot: no other rebuild, and
                    // no snapshot removal or revert through the engine, runs
                    // meanwhile.
                    match prune_rebuild_snapshots(&inner).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(volume.id = %inner.name, merged = n, "older rebuild snapshots merged away")
                        }
                        Err(e) => {
                            tracing::warn!(volume.id = %inner.name, error = %e, "older rebuild snapshots left for the next rebuild")
                        }
                    }
                }
                Err(e) => inner.fail(idx, &format!("rebuild failed: {e}")),
            }
        });
        Ok(())
    }

    /// Takes replica `addr` out of the volume: it receives nothing more and
    /// no longer counts toward the volume's health (adding it back later
    /// rebuilds it like any stale replica).
    pub async fn remove_replica(&self, addr: &str) -> Result<(), Error> {
        let i = self
            .inner
            .slots()
            .iter()
            .position(|s| s.addr == addr)
            .ok_or_else(|| Error::UnknownReplica { addr: addr.into() })?;
        self.inner.fail(i, &"removed by request");
        self.inner.slots()[i].removed = true;
        self.inner.settle_epoch().await
    }
}

/// Names of the system snapshots a rebuild takes start with this.
pub const REBUILD_PREFIX: &str = "rebuild-";

/// Merges away every rebuild snapshot of the active chain except the
/// newest snapshot (the head's parent), on every replica, so rebuilds do not
/// pile up layers ([`Inner::remove_snapshots`]: merges into child snapshots
/// never hold I/O, and long ones never look like a dead replica). Returns
/// how many were merged.
async fn prune_rebuild_snapshots(inner: &Inner) -> Result<usize, String> {
    let src = source(inner).map_err(|e| e.to_string())?;
    let layers = src.list().await.map_err(|e| format!("source list: {e}"))?;
    let chain = copy::active_chain(&layers);
    let Some((_, older)) = chain.split_last() else {
        return Ok(0);
    };
    let stale: Vec<String> = older
        .iter()
        .filter(|s| !s.user_created && s.name.starts_with(REBUILD_PREFIX))
        .map(|s| s.name.clone())
        .collect();
    if !stale.is_empty() {
        inner
            .remove_snapshots(&stale)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(stale.len())
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The source: the first read-write replica.
fn source(inner: &Inner) -> Result<Client, Error> {
    inner
        .slots()
        .iter()
        .find(|s| s.mode == Mode::ReadWrite)
        .map(super::volume::Slot::control)
        .ok_or(Error::Faulted)
}

/// Steps 3 to 5.
async fn copy_layers(inner: &Inner, target: &Client, progress: &Progress) -> Result<(), String> {
    let src = source(inner).map_err(|e| e.to_string())?;
    let layers = src.list().await.map_err(|e| format!("source list: {e}"))?;
    let chain = copy::active_chain(&layers);
    target
        .set_chain(chain.clone())
        .await
        .map_err(|e| format!("target set chain: {e}"))?;
    copy::copy_layers(
        &src,
        target,
        &chain,
        || inner.size.load(Ordering::SeqCst),
        inner.opts.rebuild_bytes_per_sec,
        progress,
    )
    .await?;
    target
        .finish_rebuild()
        .await
        .map_err(|e| format!("target finish: {e}"))
}
