//! Opening a volume: which replicas may serve, and bringing them back to
//! identical content after an engine crash.
//!
//! 1. Every replica is asked for its info: chain, rebuilding flag, and the
//!    engine record (epoch, members, write intent). A replica started for
//!    another volume refuses, and is never written to.
//! 2. A replica marked rebuilding is incomplete: it is rebuilt.
//! 3. The highest epoch's member list names the replicas that held every
//!    acknowledged write when the last engine stopped. All of them must be
//!    reachable (one that is not may hold writes the others miss... or the
//!    reverse; the engine cannot tell, so it refuses to guess). A member one
//!    epoch behind missed only the recording of the last epoch (a crash
//!    half-way through it), not data.
//! 4. A snapshot removal an engine crash cut short is finished on every
//!    member still holding the snapshot (`finish_removals`); a member that
//!    cannot finish keeps the marked snapshot, which chains are compared
//!    without. Then members whose chain differs from the longest one only
//!    by its last snapshot missed the end of a snapshot; they take it now.
//!    Any other difference makes a replica stale: it is rebuilt.
//! 5. The union of the members' write-intent regions is compared region by
//!    region (CRC32C of the content) and the regions that differ are copied
//!    from one member to the others; then everything is flushed and the
//!    marks are cleared.
//! 6. A new epoch naming the serving members is recorded; stale replicas
//!    are rebuilt in the background.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;

use super::metrics::Metrics;
use super::volume::{over_fresh, Mode, Options, Slot, Volume, MERGE_TIMEOUT};
use super::Error;
use crate::replica::chain::ReplicaInfo;
use crate::replica::client::{Client, ClientError};
use crate::replica::meta;
use crate::replica::wire::MAX_IO_BYTES;

struct Probe {
    addr: String,
    conns: Vec<Client>,
    info: ReplicaInfo,
}

/// Opens `n` connections to `addr` and asks for its info, which a replica
/// started for another volume than `volume` refuses.
pub(super) async fn probe(
    volume: &str,
    addr: &str,
    opts: &Options,
) -> Result<(Vec<Client>, ReplicaInfo), ClientError> {
    let mut conns = Vec::with_capacity(opts.connections.max(1));
    for _ in 0..opts.connections.max(1) {
        conns.push(Client::connect_with_timeout(addr, opts.timeout).await?);
    }
    let info = conns[0].info_of(volume).await?;
    Ok((conns, info))
}

/// Snapshot file names below the head, bottom first, but for those marked
/// removed (`marked`): they change nothing a reader sees, and a member may
/// keep one that it could not finish removing.
fn snapshots(info: &ReplicaInfo, marked: &BTreeSet<String>) -> Vec<String> {
    info.chain
        .iter()
        .skip(1)
        .rev()
        .filter(|f| !marked.contains(*f))
        .cloned()
        .collect()
}

impl Volume {
    /// Connects to the replicas, decides which may serve (see the module
    /// documentation), resyncs them, and starts rebuilding the others.
    pub async fn open_with(
        name: &str,
        size: u64,
        addrs: &[String],
        opts: Options,
    ) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::NoReplicas);
        }
        let mut seen = BTreeSet::new();
        for a in addrs {
            if !seen.insert(a) {
                return Err(Error::DuplicateReplica { addr: a.clone() });
            }
        }
        let metrics = Arc::new(Metrics::new(name));
        let results = join_all(addrs.iter().map(|a| probe(name, a, &opts))).await;
        let mut probes = Vec::new();
        let mut slots = Vec::new();
        for (addr, r) in addrs.iter().zip(results) {
            match r {
                Ok((conns, info)) => {
                    if info.size > size {
                        return Err(Error::SizeMismatch {
                            addr: addr.clone(),
                            replica: info.size,
                            volume: size,
                        });
                    }
                    probes.push(Probe {
                        addr: addr.clone(),
                        conns,
                        info,
                    });
                }
                Err(e) => {
                    tracing::warn!(volume.id = %name, replica.addr = %addr, error = %e, "replica unusable at open");
                    slots.push(Slot::new(
                        addr,
                        Vec::new(),
                        Mode::Failed,
                        Some(format!("at open: {e}")),
                        &metrics,
                    ));
                }
            }
        }
        // A replica smaller than the volume missed an expansion and is
        // rebuilt; but if none has the size asked for, the caller is wrong.
        if let (Some(p), true) = (probes.first(), probes.iter().all(|p| p.info.size != size)) {
            return Err(Error::SizeMismatch {
                addr: p.addr.clone(),
                replica: p.info.size,
                volume: size,
            });
        }
        let usable = |p: &Probe| !p.info.rebuilding && p.info.size == size;
        let top = probes
            .iter()
            .filter(|p| usable(p))
            .map(|p| p.info.engine.epoch)
            .max()
            .unwrap_or(0);
        let mut member = vec![false; probes.len()];
        if top == 0 {
            // No engine has recorded anything: a new volume.
            for (i, p) in probes.iter().enumerate() {
                member[i] = usable(p);
            }
        } else {
            let rec = &probes
                .iter()
                .find(|p| usable(p) && p.info.engine.epoch == top)
                .expect("top comes from a usable probe")
                .info
                .engine;
            let missing: Vec<String> = rec
                .members
                .iter()
                .filter(|m| !probes.iter().any(|p| p.addr == **m))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(Error::MembersUnavailable { missing });
            }
            for (i, p) in probes.iter().enumerate() {
                member[i] =
                    usable(p) && rec.members.contains(&p.addr) && p.info.engine.epoch + 1 >= top;
            }
        }
        let marked = finish_removals(name, &mut probes, &mut member).await;
        // Chains: the longest wins; one snapshot short is completed, taken
        // the way the others took it (at a user's request or not, labels).
        let longest = probes
            .iter()
            .enumerate()
            .filter(|(i, _)| member[*i])
            .max_by_key(|(_, p)| snapshots(&p.info, &marked).len())
            .map(|(i, _)| i)
            .ok_or(Error::NoConsistentReplica)?;
        let canonical = snapshots(&probes[longest].info, &marked);
        let mut taken_as = None;
        for (i, p) in probes.iter().enumerate() {
            if !member[i] {
                continue;
            }
            let chain = snapshots(&p.info, &marked);
            if chain == canonical {
                continue;
            }
            let last = canonical.last().and_then(|f| meta::parse_snap_file_name(f));
            let short_by_one = chain.len() + 1 == canonical.len() && canonical.starts_with(&chain);
            let completed = match last {
                Some(snap) if short_by_one => {
                    if taken_as.is_none() {
                        taken_as = probes[longest].conns[0]
                            .list()
                            .await
                            .ok()
                            .and_then(|l| l.into_iter().find(|l| l.name == snap))
                            .map(|l| (l.user_created, l.labels));
                    }
                    match &taken_as {
                        Some((user_created, labels)) => {
                            tracing::warn!(volume.id = %name, replica.addr = %p.addr, snapshot = snap, "completing an interrupted snapshot");
                            p.conns[0]
                                .snapshot_as(snap, *user_created, labels.clone())
                                .await
                                .is_ok()
                        }
                        None => false,
                    }
                }
                _ => false,
            };
            if !completed {
                member[i] = false;
            }
        }
        let source = member
            .iter()
            .position(|m| *m)
            .ok_or(Error::NoConsistentReplica)?;
        resync(name, size, &probes, &member, source).await?;

        let mut stale = Vec::new();
        for (i, p) in probes.into_iter().enumerate() {
            if !member[i] {
                stale.push(p.addr.clone());
            }
            let (mode, error) = if member[i] {
                (Mode::ReadWrite, None)
            } else {
                (Mode::Failed, Some("stale: to be rebuilt".to_owned()))
            };
            slots.push(Slot::new(&p.addr, p.conns, mode, error, &metrics));
        }
        // Keep the caller's order.
        slots.sort_by_key(|s| addrs.iter().position(|a| *a == s.addr));
        let v = Volume::new(name, size, opts, slots, top, metrics);
        v.inner.generation.fetch_add(1, Ordering::SeqCst);
        v.inner.settle_epoch().await?;
        tracing::info!(volume.id = %name, replicas = addrs.len(), stale = stale.len(), "volume open");
        for addr in stale {
            let v2 = v.clone();
            tokio::spawn(async move {
                if let Err(e) = v2.add_replica_queued(&addr).await {
                    tracing::error!(volume.id = %v2.name(), replica.addr = %addr, error = %e, "cannot rebuild stale replica");
                }
            });
        }
        Ok(v)
    }
}

/// Step 4, first half: a snapshot removal cut short by an engine crash
/// left the snapshot marked removed on every member whose chain still holds
/// it (`Inner::remove_snapshots` marks on all before removing on any). Such
/// removals are finished on every member holding the snapshot, so that the
/// chains agree again. Returns the file names of every marked snapshot.
///
/// A member that answers but cannot finish (its disk is full, say) stays a
/// member: a marked snapshot changes nothing the volume reads, so its data
/// is as good as the others', and the chains are compared without marked
/// snapshots. Demoting it instead would leave no member at all when every
/// disk is full, and the volume could not attach. The removal is tried
/// again at the next open or when the snapshot is removed again. A member
/// that does not answer, or fails a flush afterwards, is rebuilt.
async fn finish_removals(
    volume: &str,
    probes: &mut [Probe],
    member: &mut [bool],
) -> BTreeSet<String> {
    let mut failed = Vec::new();
    let lists = join_all(probes.iter().zip(member.iter()).map(|(p, m)| async move {
        match m {
            true => Some(p.conns[0].list().await),
            false => None,
        }
    }))
    .await;
    let mut layers = vec![Vec::new(); probes.len()];
    for (i, list) in lists.into_iter().enumerate() {
        match list {
            Some(Ok(l)) => layers[i] = l,
            Some(Err(e)) => failed.push((i, format!("listing snapshots: {e}"))),
            None => {}
        }
    }
    let marked: BTreeSet<&str> = layers
        .iter()
        .flatten()
        .filter(|l| l.removed)
        .map(|l| l.name.as_str())
        .collect();
    let work = layers.iter().enumerate().filter_map(|(i, l)| {
        let held: Vec<&str> = l
            .iter()
            .filter(|l| !l.head && marked.contains(l.name.as_str()))
            .map(|l| l.name.as_str())
            .collect();
        if held.is_empty() {
            return None;
        }
        let addr = &probes[i].addr;
        tracing::warn!(volume.id = %volume, replica.addr = %addr, snapshots = ?held, "finishing an interrupted snapshot removal");
        Some(async move {
            let done = over_fresh(volume, addr, MERGE_TIMEOUT, |c| async move {
                let mut refused = Vec::new();
                for n in held {
                    match c.remove_snapshot(n).await {
                        Ok(()) => {}
                        Err(ClientError::Remote { message, .. }) => {
                            refused.push(format!("{n}: {message}"));
                        }
                        Err(e) => return Err(e),
                    }
                }
                if !refused.is_empty() {
                    c.flush().await?;
                }
                Ok((c.info_of(volume).await?, refused))
            })
            .await;
            (i, done)
        })
    });
    for (i, done) in join_all(work).await {
        match done {
            Ok((info, refused)) => {
                probes[i].info = info;
                if !refused.is_empty() {
                    tracing::warn!(volume.id = %volume, replica.addr = %probes[i].addr, refused = ?refused, "cannot finish a snapshot removal; the replica serves with the snapshot still marked");
                }
            }
            Err(e) => failed.push((i, e.to_string())),
        }
    }
    for (i, why) in failed {
        tracing::warn!(volume.id = %volume, replica.addr = %probes[i].addr, error = %why, "cannot finish a snapshot removal; the replica is rebuilt");
        member[i] = false;
    }
    marked.into_iter().map(meta::snap_file_name).collect()
}

/// Step 5: compare and copy the members' write-intent regions.
async fn resync(
    name: &str,
    size: u64,
    probes: &[Probe],
    member: &[bool],
    source: usize,
) -> Result<(), Error> {
    let members: Vec<&Probe> = probes
        .iter()
        .zip(member)
        .filter(|(_, m)| **m)
        .map(|(p, _)| p)
        .collect();
    let mut ranges = BTreeSet::new();
    for p in &members {
        let rec = &p.info.engine;
        for r in &rec.intent {
            let start = r.saturating_mul(rec.region_bytes);
            if start < size {
                ranges.insert((start, (start + rec.region_bytes).min(size)));
            }
        }
    }
    let err = |p: &Probe| {
        let addr = p.addr.clone();
        move |cause| Error::Replica { addr, cause }
    };
    let src = &probes[source];
    let mut copied = 0u64;
    for (start, end) in &ranges {
        let len = end - start;
        let want = src.conns[0].checksum(*start, len).await.map_err(err(src))?;
        for p in &members {
            if std::ptr::eq(*p, src) {
                continue;
            }
            let have = p.conns[0].checksum(*start, len).await.map_err(err(p))?;
            if have == want {
                continue;
            }
            let mut at = *start;
            while at < *end {
                let n = (end - at).min(MAX_IO_BYTES);
                let data = src.conns[0].read(at, n).await.map_err(err(src))?;
                p.conns[0]
                    .write(at, Bytes::from(data))
                    .await
                    .map_err(err(p))?;
                at += n;
            }
            copied += len;
        }
    }
    for p in &members {
        p.conns[0].flush().await.map_err(err(p))?;
        let rec = &p.info.engine;
        let all: Vec<u64> = rec.intent.iter().copied().collect();
        if !all.is_empty() {
            p.conns[0]
                .update_intent(rec.region_bytes, Vec::new(), all)
                .await
                .map_err(err(p))?;
        }
    }
    if !ranges.is_empty() {
        tracing::info!(volume.id = %name, regions = ranges.len(), copied_bytes = copied, "resynced write-intent regions");
    }
    Ok(())
}
