//! A StorageClass's parameters (CreateVolume `parameters`) and a
//! VolumeAttributesClass's (`mutable_parameters`), parsed strictly: an
//! unknown key or a bad value is INVALID_ARGUMENT naming the key and what
//! it accepts, so a typo in a StorageClass fails the first PVC loudly
//! instead of provisioning something else.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Where a volume's data may live relative to its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataLocality {
    /// Replicas go wherever the scheduler finds room.
    Disabled,
    /// One replica is kept on the node running the engine when it has room.
    BestEffort,
}

/// Filesystems NodeStage can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// `mkfs.ext4`, grown with `resize2fs`.
    Ext4,
    /// `mkfs.xfs`, grown with `xfs_growfs`.
    Xfs,
}

impl FsType {
    /// Parses a CSI `fs_type` / `fsType` value; empty means the default.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "ext4" => Ok(Self::Ext4),
            "xfs" => Ok(Self::Xfs),
            other => Err(format!(
                "fsType {other:?} is not supported: use ext4 or xfs"
            )),
        }
    }
}

/// How strongly replicas avoid sharing a failure domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    /// Never two replicas on one node; zones spread when possible.
    Node,
    /// Never two replicas in one zone (so at most one per node too).
    Zone,
}

/// The most replicas a volume may have.
pub const MAX_REPLICAS: u32 = 16;

/// A volume's settings, as stored with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeParams {
    /// Copies kept (`numberOfReplicas`, default 3).
    pub replicas: u32,
    /// Filesystem for mount volumes when the capability names none.
    pub fs_type: FsType,
    /// How long a failed replica may stay away before it is replaced
    /// elsewhere (`staleReplicaTimeout`, default 30 minutes).
    #[serde(with = "secs")]
    pub stale_replica_timeout: Duration,
    /// `dataLocality`.
    pub data_locality: DataLocality,
    /// `replicaAntiAffinity`.
    pub anti_affinity: AntiAffinity,
    /// `diskSelector`: tags every replica's disk must carry.
    pub disk_selector: BTreeSet<String>,
    /// `nodeSelector`: tags every replica's node must carry.
    pub node_selector: BTreeSet<String>,
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(serde::Deserialize::deserialize(d)?))
    }
}

impl Default for VolumeParams {
    fn default() -> Self {
        Self {
            replicas: 3,
            fs_type: FsType::Ext4,
            stale_replica_timeout: Duration::from_secs(30 * 60),
            data_locality: DataLocality::Disabled,
            anti_affinity: AntiAffinity::Node,
            disk_selector: BTreeSet::new(),
            node_selector: BTreeSet::new(),
        }
    }
}

/// Keys the CSI sidecars reserve; they may reach us and mean nothing here.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

/// Keys a VolumeAttributesClass may change on a live volume.
pub const MUTABLE: [&str; 2] = ["numberOfReplicas", "dataLocality"];

impl VolumeParams {
    /// Parses CreateVolume `parameters` over the defaults.
    pub fn parse(p: &HashMap<String, String>) -> Result<Self, String> {
        Self::parse_over(Self::default(), p)
    }

    /// Parses CreateVolume `parameters` over `base` (the controller's
    /// defaults).
    pub fn parse_over(base: Self, p: &HashMap<String, String>) -> Result<Self, String> {
        let mut v = base;
        let mut keys: Vec<_> = p.keys().collect();
        keys.sort();
        for k in keys {
            v.set(k, &p[k], false)?;
        }
        Ok(v)
    }

    /// Applies ModifyVolume / CreateVolume `mutable_parameters`: only the
    /// [`MUTABLE`] keys are accepted.
    pub fn apply_mutable(&mut self, p: &HashMap<String, String>) -> Result<(), String> {
        let mut keys: Vec<_> = p.keys().collect();
        keys.sort();
        let mut next = self.clone();
        for k in keys {
            next.set(k, &p[k], true)?;
        }
        *self = next;
        Ok(())
    }

    fn set(&mut self, key: &str, value: &str, mutable_only: bool) -> Result<(), String> {
        if key.starts_with(RESERVED_PREFIX) && !mutable_only {
            return Ok(());
        }
        if mutable_only && !MUTABLE.contains(&key) {
            return Err(format!(
                "parameter {key:?} cannot be changed on a volume; mutable parameters are {}",
                MUTABLE.join(", ")
            ));
        }
        match key {
            "numberOfReplicas" => {
                self.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_REPLICAS).contains(n))
                    .ok_or_else(|| {
                        format!("numberOfReplicas {value:?} must be a whole number from 1 to {MAX_REPLICAS}")
                    })?;
            }
            "fsType" => self.fs_type = FsType::parse(value)?,
            "staleReplicaTimeout" => {
                self.stale_replica_timeout = parse_timeout(value).ok_or_else(|| {
                    format!(
                        "staleReplicaTimeout {value:?} must be minutes (\"30\") or a duration (\"90s\", \"5m\", \"2h\"), at least 1s"
                    )
                })?;
            }
            "dataLocality" => {
                self.data_locality = match value {
                    "disabled" => DataLocality::Disabled,
                    "best-effort" => DataLocality::BestEffort,
                    _ => {
                        return Err(format!(
                            "dataLocality {value:?} must be disabled or best-effort"
                        ))
                    }
                }
            }
            "replicaAntiAffinity" => {
                self.anti_affinity = match value {
                    "node" => AntiAffinity::Node,
                    "zone" => AntiAffinity::Zone,
                    _ => {
                        return Err(format!(
                            "replicaAntiAffinity {value:?} must be node (zones soft) or zone (zones hard)"
                        ))
                    }
                }
            }
            "diskSelector" => self.disk_selector = tags(key, value)?,
            "nodeSelector" => self.node_selector = tags(key, value)?,
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; known: numberOfReplicas, fsType, staleReplicaTimeout, dataLocality, replicaAntiAffinity, diskSelector, nodeSelector"
                ))
            }
        }
        Ok(())
    }
}

/// Minutes as a bare number (Longhorn's convention), or a number with a
/// unit s, m or h.
fn parse_timeout(v: &str) -> Option<Duration> {
    let (num, mult) = match v.char_indices().last()? {
        (i, 's') => (&v[..i], 1),
        (i, 'm') => (&v[..i], 60),
        (i, 'h') => (&v[..i], 3600),
        _ => (v, 60),
    };
    let n: u64 = num.parse().ok()?;
    let secs = n.checked_mul(mult)?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A comma-separated tag list; tags are non-empty `[A-Za-z0-9._-]`.
fn tags(key: &str, v: &str) -> Result<BTreeSet<String>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                Ok(t.to_owned())
            } else {
                Err(format!(
                    "{key} tag {t:?} may use only letters, digits, '.', '_' and '-'"
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_and_every_key() {
        assert_eq!(
            VolumeParams::parse(&map(&[])).unwrap(),
            VolumeParams::default()
        );
        let p = VolumeParams::parse(&map(&[
            ("numberOfReplicas", "2"),
            ("fsType", "xfs"),
            ("staleReplicaTimeout", "90s"),
            ("dataLocality", "best-effort"),
            ("replicaAntiAffinity", "zone"),
            ("diskSelector", "ssd, fast"),
            ("nodeSelector", "storage"),
            ("csi.storage.k8s.io/pv/name", "pvc-1"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, 2);
        assert_eq!(p.fs_type, FsType::Xfs);
        assert_eq!(p.stale_replica_timeout, Duration::from_secs(90));
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        assert_eq!(p.anti_affinity, AntiAffinity::Zone);
        assert_eq!(p.disk_selector, ["fast", "ssd"].map(String::from).into());
        assert_eq!(p.node_selector, ["storage"].map(String::from).into());
        let minutes = VolumeParams::parse(&map(&[("staleReplicaTimeout", "45")])).unwrap();
        assert_eq!(minutes.stale_replica_timeout, Duration::from_secs(45 * 60));
    }

    #[test]
    fn bad_values_name_the_key_and_what_it_accepts() {
        for (k, v, says) in [
            ("numberOfReplicas", "0", "from 1 to 16"),
            ("numberOfReplicas", "three", "whole number"),
            ("fsType", "btrfs", "ext4 or xfs"),
            ("staleReplicaTimeout", "0", "at least 1s"),
            ("staleReplicaTimeout", "5d", "duration"),
            ("dataLocality", "strict", "disabled or best-effort"),
            ("replicaAntiAffinity", "rack", "node"),
            ("diskSelector", "a b", "letters"),
            ("numberofreplicas", "3", "unknown parameter"),
        ] {
            let e = VolumeParams::parse(&map(&[(k, v)])).unwrap_err();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn only_mutable_keys_change_and_a_refusal_changes_nothing() {
        let mut p = VolumeParams::default();
        p.apply_mutable(&map(&[
            ("numberOfReplicas", "5"),
            ("dataLocality", "best-effort"),
        ]))
        .unwrap();
        assert_eq!((p.replicas, p.data_locality), (5, DataLocality::BestEffort));
        let before = p.clone();
        let e = p
            .apply_mutable(&map(&[("numberOfReplicas", "2"), ("fsType", "xfs")]))
            .unwrap_err();
        assert!(e.contains("cannot be changed"), "{e}");
        assert_eq!(p, before);
    }
}
