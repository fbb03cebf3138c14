//! The records the controller keeps in the store, and how CSI names map
//! to volume ids.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::{Kind, Typed};

use super::params::VolumeParams;
use super::scheduler::Disk;

/// Volumes, keyed by volume id.
pub const VOLUMES: Typed<VolumeRecord> = Typed::new(Kind::Volume);
/// Nodes, keyed by node id.
pub const NODES: Typed<NodeRecord> = Typed::new(Kind::Node);
/// CSI volume names, keyed by name, holding the volume id.
pub const NAMES: Typed<String> = Typed::new(Kind::Name);
/// Snapshots, keyed by snapshot id.
pub const SNAPSHOTS: Typed<SnapshotRecord> = Typed::new(Kind::Snapshot);

/// Where a volume is in its life, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Replicas are being made.
    Creating,
    /// No engine runs; replicas rest.
    Detached,
    /// An engine is starting on the published node.
    Attaching,
    /// Serving, every replica healthy.
    Attached,
    /// Serving with fewer healthy replicas than asked for.
    Degraded,
    /// No healthy replica: I/O fails.
    Faulted,
    /// Being removed.
    Deleting,
}

impl VolumeState {
    /// Whether an engine serves the volume (its health is watched).
    pub fn serving(self) -> bool {
        matches!(self, Self::Attached | Self::Degraded | Self::Faulted)
    }
}

/// Where one replica is, and how it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    /// Unique within the volume; names its directory on the disk.
    pub name: String,
    /// The node holding it.
    pub node: String,
    /// The disk's path on that node.
    pub disk: String,
    /// host:port its process serves on, once the node started it.
    #[serde(default)]
    pub address: Option<String>,
    /// Unix seconds since when the engine has had it failed and it has
    /// not come back; after the volume's `staleReplicaTimeout` it is
    /// replaced on another node.
    #[serde(default)]
    pub failed_since: Option<u64>,
    /// Times the engine took it back after it failed, since it last served
    /// read-write: a replica whose rebuild keeps failing (a bad disk, a
    /// process that dies on every write) stops being taken back after
    /// [`MAX_REJOINS`], so it counts as away and is replaced.
    #[serde(default)]
    pub rejoins: u32,
}

/// Rebuilds a failed replica may start without finishing before it is
/// left out and, after `staleReplicaTimeout`, replaced.
pub const MAX_REJOINS: u32 = 5;

/// A volume, as stored under [`VOLUMES`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    /// The CSI volume id.
    pub id: String,
    /// The CSI name it was created under (idempotency key).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Settings from the StorageClass (and later VolumeAttributesClass).
    pub params: VolumeParams,
    /// Life-cycle state.
    pub state: VolumeState,
    /// Where each replica lives.
    pub replicas: Vec<ReplicaRecord>,
    /// The node the volume is published to, if any.
    #[serde(default)]
    pub published_node: Option<String>,
    /// What the volume's data was made from: a retried create finishes
    /// the copy from it, and CSI reports it.
    #[serde(default)]
    pub source: Option<ContentSource>,
    /// Replaced replicas whose deletion waits for their node to answer.
    #[serde(default)]
    pub retired: Vec<ReplicaRecord>,
    /// Where its replicas may live: a node qualifies when it matches every
    /// segment of one of these (from CreateVolume's accessibility
    /// requirements, the per-node key left out); empty, anywhere. Kept so
    /// replicas added later obey it as the first ones did.
    #[serde(default)]
    pub topology: Vec<BTreeMap<String, String>>,
    /// For a clone: the nonce of its transient snapshot's name
    /// ([`clone_snapshot`]).
    #[serde(default)]
    pub clone_nonce: u64,
}

/// A volume's initial content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    /// Restored from this snapshot id.
    Snapshot(String),
    /// Cloned from this volume id.
    Volume(String),
}

/// A snapshot of a volume, as stored under [`SNAPSHOTS`]. Its data lives
/// in every replica of the source volume as a chain layer named by `id`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRecord {
    /// The CSI snapshot id, also the layer name on the replicas.
    pub id: String,
    /// The CSI name it was created under (idempotency key).
    pub name: String,
    /// The source volume's id.
    pub volume: String,
    /// The volume's size when it was taken: the smallest restore.
    pub size: u64,
    /// When it was taken: Unix seconds and nanoseconds.
    pub created_secs: i64,
    /// Nanoseconds past `created_secs`.
    pub created_nanos: i32,
    /// Every replica holds it (false while it is being taken, or after a
    /// failed attempt a retry completes).
    pub ready: bool,
}

/// The name of the transient snapshot a clone into volume `target` is
/// copied from; `nonce` is drawn when the clone's record is made, so a
/// layer an abandoned clone of the same name left on its source is never
/// taken for this one's. The '.' keeps it apart from every snapshot id.
pub fn clone_snapshot(target: &str, nonce: u64) -> String {
    format!("clone.{target}.{nonce:x}")
}

/// A node, as stored under [`NODES`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    /// The node id (CSI `node_id`).
    pub id: String,
    /// host:port of its agent.
    pub agent_address: String,
    /// Its disks.
    pub disks: Vec<Disk>,
    /// Tags `nodeSelector` matches.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Topology segments.
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
    /// Attached volumes allowed at once; 0 means no limit.
    #[serde(default)]
    pub max_volumes: u32,
    /// Unix seconds of its last registration or heartbeat.
    pub last_seen: u64,
}

/// The topology key naming a node's zone.
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// The topology key every node reports with its own id: it tells the CO
/// which node a plugin runs on. It never confines replicas (a volume is
/// reached from any node); zones do.
pub const NODE_KEY: &str = "shorthorn.io/node";

/// The volume id for CSI name `name`: the name itself when it is a DNS
/// label (as the external-provisioner's `pvc-<uid>` names are), which
/// keeps ids recognisable in logs, target names and directories;
/// otherwise `v-` and a digest of the name.
pub fn volume_id(name: &str) -> String {
    object_id(name, "v-")
}

/// The snapshot id for CSI snapshot name `name`, formed as [`volume_id`]
/// forms volume ids (digests start `s-`). It names the snapshot's layer
/// on the replicas, so it must be a valid layer name: a DNS label is.
pub fn snapshot_id(name: &str) -> String {
    object_id(name, "s-")
}

fn object_id(name: &str, prefix: &str) -> String {
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with(prefix);
    if label {
        return name.to_owned();
    }
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_labels_and_never_collide_between_the_two_forms() {
        assert_eq!(volume_id("pvc-0a1b"), "pvc-0a1b");
        let odd = volume_id("My Volume/1");
        assert!(odd.starts_with("v-") && odd.len() == 26, "{odd}");
        assert_eq!(odd, volume_id("My Volume/1"), "deterministic");
        // A name shaped like a digest id is itself digested, so it cannot
        // take another name's id.
        assert_ne!(volume_id(&odd), odd);
        assert!(volume_id(&"a".repeat(64)).starts_with("v-"));
        assert_eq!(snapshot_id("snapshot-0a1b"), "snapshot-0a1b");
        assert!(snapshot_id("Snap 1").starts_with("s-"));
        let s = snapshot_id("Snap 1");
        assert!(crate::replica::meta::validate_snapshot_name(&s).is_ok());
        assert!(
            crate::replica::meta::validate_snapshot_name(&clone_snapshot(&odd, u64::MAX)).is_ok()
        );
    }
}
