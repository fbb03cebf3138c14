//! Copying snapshot layers from one replica to another over the protocol:
//! the engine's online rebuild and a volume restored from a snapshot (or
//! cloned) both fill a target replica marked rebuilding this way.
//!
//! The copy is resumable: per layer, the per-chunk CRC32Cs of source and
//! target are compared and only chunks that differ are punched and copied,
//! so a target that was filled half-way before a crash copies only the
//! rest, and a stale replica copies only what changed while it was away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::chain::{ExtentChecksum, SnapshotSpec, CHECKSUM_CHUNK_BYTES};
use super::client::{Client, ClientError};
use super::LayerInfo;

/// Chunks asked for per `Extents` page.
const EXTENTS_PAGE: u32 = 4096;

/// How far a copy got, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes compared or copied so far.
    pub done: AtomicU64,
    /// Bytes the source's layers hold.
    pub total: AtomicU64,
    /// Bytes actually sent (the rest already matched).
    pub copied: AtomicU64,
}

/// Every checksummed extent of `layer` on `c`.
pub async fn all_extents(c: &Client, layer: &str) -> Result<Vec<ExtentChecksum>, ClientError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = c.extents(layer, from, EXTENTS_PAGE).await?;
        out.extend(page.extents);
        match page.next {
            Some(n) => from = n,
            None => return Ok(out),
        }
    }
}

fn by_chunk(es: Vec<ExtentChecksum>) -> BTreeMap<u64, Vec<ExtentChecksum>> {
    let mut m: BTreeMap<u64, Vec<ExtentChecksum>> = BTreeMap::new();
    for e in es {
        m.entry(e.offset / CHECKSUM_CHUNK_BYTES)
            .or_default()
            .push(e);
    }
    m
}

fn spec(l: &LayerInfo) -> SnapshotSpec {
    SnapshotSpec {
        name: l.name.clone(),
        created: l.created.clone(),
        user_created: l.user_created,
        labels: l.labels.clone(),
    }
}

/// The snapshots below `layers`' head on its active chain, bottom first.
pub fn active_chain(layers: &[LayerInfo]) -> Vec<SnapshotSpec> {
    layers
        .iter()
        .filter(|l| l.active && !l.head)
        .rev()
        .map(spec)
        .collect()
}

/// The chain of snapshot `name` in `layers`, bottom first and ending with
/// `name` itself, following parent links (so a snapshot left off the
/// active chain by a revert is found too). `None` when there is no such
/// snapshot or its removal was started.
pub fn chain_to(layers: &[LayerInfo], name: &str) -> Option<Vec<SnapshotSpec>> {
    let by_file: BTreeMap<&str, &LayerInfo> = layers.iter().map(|l| (l.file.as_str(), l)).collect();
    let mut cur = layers.iter().find(|l| l.name == name && !l.head)?;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    loop {
        if cur.removed || !seen.insert(cur.file.as_str()) {
            return None;
        }
        out.push(spec(cur));
        if cur.parent.is_empty() {
            break;
        }
        cur = by_file.get(cur.parent.as_str())?;
    }
    out.reverse();
    Some(out)
}

/// Copies each of `chain`'s layers (already shaped on `target` with
/// `set_chain`) from `src`, bottom up, only the chunks whose checksums
/// differ, at most `bytes_per_sec` (0: no limit). `size` gives the volume
/// size at each step (it may grow while a rebuild runs).
pub async fn copy_layers(
    src: &Client,
    target: &Client,
    chain: &[SnapshotSpec],
    size: impl Fn() -> u64,
    bytes_per_sec: u64,
    progress: &Progress,
) -> Result<(), String> {
    let mut plan = Vec::with_capacity(chain.len());
    for l in chain {
        let s = all_extents(src, &l.name)
            .await
            .map_err(|e| format!("source extents of {}: {e}", l.name))?;
        progress
            .total
            .fetch_add(s.iter().map(|e| e.len).sum(), Ordering::Relaxed);
        plan.push((l.name.clone(), s));
    }
    let started = Instant::now();
    let mut copied = 0u64;
    for (layer, s) in plan {
        let d = all_extents(target, &layer)
            .await
            .map_err(|e| format!("target extents of {layer}: {e}"))?;
        let (s, d) = (by_chunk(s), by_chunk(d));
        let chunks: BTreeSet<u64> = s.keys().chain(d.keys()).copied().collect();
        for chunk in chunks {
            let empty = Vec::new();
            let (sv, dv) = (
                s.get(&chunk).unwrap_or(&empty),
                d.get(&chunk).unwrap_or(&empty),
            );
            let bytes: u64 = sv.iter().map(|e| e.len).sum();
            if sv != dv {
                if !dv.is_empty() {
                    let off = chunk * CHECKSUM_CHUNK_BYTES;
                    let len = CHECKSUM_CHUNK_BYTES.min(size().saturating_sub(off));
                    target
                        .layer_punch(&layer, off, len)
                        .await
                        .map_err(|e| format!("target punch in {layer}: {e}"))?;
                }
                for e in sv {
                    let data = src
                        .layer_read(&layer, e.offset, e.len)
                        .await
                        .map_err(|x| format!("source read of {layer}: {x}"))?;
                    target
                        .layer_write(&layer, e.offset, &data)
                        .await
                        .map_err(|x| format!("target write to {layer}: {x}"))?;
                }
                copied += bytes;
                progress.copied.fetch_add(bytes, Ordering::Relaxed);
                // A copy that dies here leaves a target flagged rebuilding
                // with part of a layer: the next attempt must finish it.
                crate::failpoint!("copy.chunk-copied");
                if bytes_per_sec > 0 {
                    // Never ahead of the allowed rate.
                    let due = Duration::from_secs_f64(copied as f64 / bytes_per_sec as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            progress.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The replica among `sources` to copy snapshot `snapshot` from: one
/// that answers, is not itself being rebuilt, holds the snapshot, and is
/// a member of the newest membership epoch any of them records (a replica
/// failed out of the volume may hold an older layer under the same name).
/// The first such one in `sources` order, so every target of one restore
/// given the same list copies the same bytes; with its address and the
/// snapshot's chain.
pub async fn pick_source(
    sources: &[String],
    snapshot: &str,
) -> Result<(Client, String, Vec<SnapshotSpec>), String> {
    let mut found = Vec::new();
    let mut why = Vec::new();
    for addr in sources {
        let c = match Client::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                why.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let probe = async {
            let info = c.info().await?;
            let layers = c.list().await?;
            Ok::<_, ClientError>((info, layers))
        };
        match probe.await {
            Ok((info, _)) if info.rebuilding => why.push(format!("{addr}: being rebuilt")),
            Ok((info, layers)) => match chain_to(&layers, snapshot) {
                Some(chain) => found.push((c, addr.clone(), info.engine, chain)),
                None => why.push(format!("{addr}: holds no snapshot {snapshot:?}")),
            },
            Err(e) => why.push(format!("{addr}: {e}")),
        }
    }
    let newest = found.iter().map(|f| f.2.epoch).max().unwrap_or(0);
    let mut pick = None;
    for (c, addr, rec, chain) in found {
        // Epoch 0: no engine ever ran, every replica is as current.
        let current = newest == 0 || (rec.epoch == newest && rec.members.contains(&addr));
        if pick.is_none() && current {
            pick = Some((c, addr, chain));
        } else {
            if !current {
                why.push(format!("{addr}: not a member of epoch {newest}"));
            }
            c.shutdown();
        }
    }
    pick.ok_or_else(|| format!("no source replica can be copied: {}", why.join("; ")))
}

/// Makes resting replica `target` (no engine uses it) hold snapshot
/// `snapshot` of the volume whose replicas are `sources` (see
/// [`pick_source`]) and the chain below it, with an empty head on top: a
/// volume restored from that snapshot. `target` is flagged rebuilding
/// throughout, so an engine never serves a half-filled copy; a call after
/// a crash picks up where the last one stopped, and a call on a finished
/// target does nothing. Returns the bytes copied.
pub async fn restore(sources: &[String], target: &Client, snapshot: &str) -> Result<u64, String> {
    let t_info = target
        .info()
        .await
        .map_err(|e| format!("target info: {e}"))?;
    let t_layers = target
        .list()
        .await
        .map_err(|e| format!("target list: {e}"))?;
    let has_top = t_layers.iter().any(|l| l.name == snapshot && !l.head);
    if has_top && !t_info.rebuilding {
        return Ok(0);
    }
    let (src, addr, chain) = pick_source(sources, snapshot).await?;
    let r = fill(&src, target, &chain, has_top, t_info.size).await;
    src.shutdown();
    r.map_err(|e| format!("from {addr}: {e}"))
}

async fn fill(
    src: &Client,
    target: &Client,
    chain: &[SnapshotSpec],
    has_top: bool,
    size: u64,
) -> Result<u64, String> {
    // The source may have grown since the snapshot; the layers up to it
    // hold nothing past the snapshot's size, which the caller checked
    // against the target's.
    target
        .set_rebuilding(true)
        .await
        .map_err(|e| format!("target flag: {e}"))?;
    if !has_top {
        let top = chain.last().expect("chain_to ends with the snapshot");
        target
            .snapshot_as(&top.name, top.user_created, top.labels.clone())
            .await
            .map_err(|e| format!("target snapshot: {e}"))?;
    }
    target
        .set_chain(chain.to_vec())
        .await
        .map_err(|e| format!("target set chain: {e}"))?;
    let progress = Progress::default();
    copy_layers(src, target, chain, || size, 0, &progress).await?;
    // A source its engine began rebuilding while we read it may have
    // served layers half rewritten: the target stays flagged, and the
    // retry picks a source again.
    let s_info = src.info().await.map_err(|e| format!("source info: {e}"))?;
    if s_info.rebuilding {
        return Err("the source began being rebuilt during the copy; retry".into());
    }
    target
        .finish_rebuild()
        .await
        .map_err(|e| format!("target finish: {e}"))?;
    Ok(progress.copied.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, parent: &str, active: bool) -> LayerInfo {
        LayerInfo {
            name: name.into(),
            file: format!("f-{name}"),
            parent: if parent.is_empty() {
                String::new()
            } else {
                format!("f-{parent}")
            },
            children: Vec::new(),
            head: name == "head",
            active,
            created: String::new(),
            user_created: true,
            removed: false,
            allocated_bytes: 0,
            labels: BTreeMap::new(),
        }
    }

    fn names(c: &[SnapshotSpec]) -> Vec<&str> {
        c.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_snapshot_chain_follows_parents_even_off_the_active_chain() {
        // a <- b <- c (left by a revert to b), b <- d <- head
        let ls = vec![
            layer("head", "d", true),
            layer("d", "b", true),
            layer("c", "b", false),
            layer("b", "a", true),
            layer("a", "", true),
        ];
        assert_eq!(names(&active_chain(&ls)), ["a", "b", "d"]);
        assert_eq!(names(&chain_to(&ls, "c").unwrap()), ["a", "b", "c"]);
        assert_eq!(names(&chain_to(&ls, "a").unwrap()), ["a"]);
        assert!(chain_to(&ls, "head").is_none(), "the head is no snapshot");
        assert!(chain_to(&ls, "zz").is_none());
        let mut gone = ls.clone();
        gone[3].removed = true;
        assert!(chain_to(&gone, "d").is_none(), "a removal half-done below");
        let mut cyc = ls;
        cyc[4].parent = "f-d".into();
        assert!(chain_to(&cyc, "d").is_none(), "a cycle ends the walk");
    }
}
