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
}

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

/// The topology key every node reports with its own id, so a volume can
/// be pinned to nodes by CSI topology even without zones.
pub const NODE_KEY: &str = "shorthorn.io/node";

/// The volume id for CSI name `name`: the name itself when it is a DNS
/// label (as the external-provisioner's `pvc-<uid>` names are), which
/// keeps ids recognisable in logs, target names and directories;
/// otherwise `v-` and a digest of the name.
pub fn volume_id(name: &str) -> String {
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with("v-");
    if label {
        return name.to_owned();
    }
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("v-{hex}")
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
    }
}
