//! Longhorn v1 replica metadata: `volume.meta`, `<layer>.img.meta` and
//! `revision.counter`, byte-compatible with what the Longhorn v1 engine writes
//! (see `docs/format.md`).
//!
//! Parsing and encoding are pure functions over bytes; the only I/O here is
//! [`write_atomic`], the one way metadata reaches the disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `volume.meta`: the volume's size and which layer is the live head.
///
/// Unknown fields written by newer Longhorn versions are tolerated on read
/// (this is a foreign format we must open), and dropped on our next write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeMeta {
    /// Volume size in bytes.
    pub size: u64,
    /// File name of the live head layer, e.g. `volume-head-002.img`.
    pub head: String,
    /// Set while a writer has the replica open; cleared by a clean close.
    #[serde(default)]
    pub dirty: bool,
    /// Set while the replica is the target of a rebuild: its content is incomplete.
    #[serde(default)]
    pub rebuilding: bool,
    /// Last error recorded against this replica, empty when healthy.
    #[serde(default)]
    pub error: String,
    /// File name of the head's parent snapshot, empty when the head is the only layer.
    #[serde(default)]
    pub parent: String,
    /// Logical sector size Longhorn recorded; always 512 for v1 replicas.
    #[serde(default = "default_sector_size")]
    pub sector_size: u64,
    /// Longhorn backing images are not supported; must be empty.
    #[serde(default)]
    pub backing_file_path: String,
    /// Longhorn's encrypted volumes are not supported; must be false.
    #[serde(default)]
    pub encrypted: bool,
}

fn default_sector_size() -> u64 {
    512
}

/// `<layer>.img.meta`: one layer's place in the snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DiskMeta {
    /// The name the layer had when it was created (Longhorn keeps the head's
    /// original name here after the head becomes a snapshot).
    pub name: String,
    /// File name of the parent layer, empty for the bottom of a chain.
    #[serde(default)]
    pub parent: String,
    /// Marked for removal; purged at open when nothing depends on it.
    #[serde(default)]
    pub removed: bool,
    /// Created by a user request (as opposed to a system snapshot).
    #[serde(default)]
    pub user_created: bool,
    /// Creation time, RFC 3339 in UTC with second precision.
    #[serde(default)]
    pub created: String,
    /// Free-form labels; Longhorn writes `null` when there are none.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Size of `revision.counter`: one 4 KiB block, as Longhorn writes it.
pub const REVISION_FILE_LEN: usize = 4096;

/// File name of the volume metadata.
pub const VOLUME_META: &str = "volume.meta";
/// File name of the revision counter.
pub const REVISION_COUNTER: &str = "revision.counter";
/// File name of the engine record (shorthorn's own; Longhorn ignores it).
pub const ENGINE_RECORD: &str = "shorthorn.engine";

/// `shorthorn.engine`: what the volume's engine last told this replica about
/// the volume as a whole. It lets an engine that restarts after a crash tell
/// a consistent replica from a stale one and find the regions that may
/// differ between replicas (see `engine::volume`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineRecord {
    /// Membership epoch: raised by the engine every time the set of
    /// read-write replicas changes, on every replica that stays in it.
    pub epoch: u64,
    /// Addresses of the read-write replicas at `epoch`.
    pub members: Vec<String>,
    /// Size in bytes of one write-intent region.
    pub region_bytes: u64,
    /// Write-intent regions: regions that may hold writes not yet flushed on
    /// every replica (region index = offset / `region_bytes`).
    pub intent: std::collections::BTreeSet<u64>,
}

/// Decodes `shorthorn.engine`.
pub fn decode_engine(bytes: &[u8]) -> Result<EngineRecord, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError {
        what: ENGINE_RECORD,
        reason: e.to_string(),
    })
}

/// Encodes `shorthorn.engine`.
pub fn encode_engine(r: &EngineRecord) -> Vec<u8> {
    let mut v = serde_json::to_vec(r).expect("EngineRecord always serializes");
    v.push(b'\n');
    v
}

/// Error from decoding a metadata file.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct DecodeError {
    /// Which file kind failed.
    pub what: &'static str,
    /// Why.
    pub reason: String,
}

/// Decodes `volume.meta`.
pub fn decode_volume(bytes: &[u8]) -> Result<VolumeMeta, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError {
        what: "volume.meta",
        reason: e.to_string(),
    })
}

/// Encodes `volume.meta` the way Longhorn does (compact JSON, newline).
pub fn encode_volume(m: &VolumeMeta) -> Vec<u8> {
    let mut v = serde_json::to_vec(m).expect("VolumeMeta always serializes");
    v.push(b'\n');
    v
}

/// Decodes a `.img.meta` file.
pub fn decode_disk(bytes: &[u8]) -> Result<DiskMeta, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError {
        what: "img.meta",
        reason: e.to_string(),
    })
}

/// Encodes a `.img.meta` file.
pub fn encode_disk(m: &DiskMeta) -> Vec<u8> {
    let mut v = serde_json::to_vec(m).expect("DiskMeta always serializes");
    v.push(b'\n');
    v
}

/// Decodes `revision.counter`: ASCII decimal, padded with NUL bytes.
pub fn decode_revision(bytes: &[u8]) -> Result<u64, DecodeError> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| DecodeError {
        what: "revision.counter",
        reason: "not ASCII".into(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse().map_err(|_| DecodeError {
        what: "revision.counter",
        reason: format!("{text:?} is not a decimal counter"),
    })
}

/// Encodes `revision.counter` as one NUL-padded 4 KiB block.
pub fn encode_revision(rev: u64) -> Vec<u8> {
    let mut v = vec![0u8; REVISION_FILE_LEN];
    let s = rev.to_string();
    v[..s.len()].copy_from_slice(s.as_bytes());
    v
}

/// File name of the head layer with sequence number `n`.
pub fn head_file_name(n: u32) -> String {
    format!("volume-head-{n:03}.img")
}

/// File name of the snapshot called `name`.
pub fn snap_file_name(name: &str) -> String {
    format!("volume-snap-{name}.img")
}

/// The sequence number of a head file name, if it is one.
pub fn parse_head_file_name(file: &str) -> Option<u32> {
    file.strip_prefix("volume-head-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

/// The snapshot name inside a snapshot file name, if it is one.
pub fn parse_snap_file_name(file: &str) -> Option<&str> {
    let name = file.strip_prefix("volume-snap-")?.strip_suffix(".img")?;
    (!name.is_empty()).then_some(name)
}

/// Checks a user-given snapshot name: it becomes part of a file name, so it
/// must be a short, plain token.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "snapshot name {name:?} must be 1 to 200 characters long"
        ));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok || name.starts_with('.') {
        return Err(format!(
            "snapshot name {name:?} may only hold letters, digits, '-', '_' and '.', and must not start with '.'"
        ));
    }
    Ok(())
}

/// The current time as Longhorn stamps it in `Created`.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    now.format(&f).unwrap_or_default()
}

/// Replaces `dir/name` with `bytes` atomically: write a temporary file, fsync
/// it, rename it over the target and fsync the directory. A crash at any
/// instant leaves either the old or the new content, never a mix.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes directory entry changes (create, rename, unlink) in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn longhorn_volume_meta_parses() {
        let raw = br#"{"Size":268435456,"Head":"volume-head-002.img","Dirty":true,"Rebuilding":false,"Error":"","Parent":"volume-snap-snap-b.img","SectorSize":512,"BackingFilePath":"","Encrypted":false}"#;
        let m = decode_volume(raw).unwrap();
        assert_eq!(m.size, 256 << 20);
        assert_eq!(m.head, "volume-head-002.img");
        assert_eq!(m.parent, "volume-snap-snap-b.img");
        assert!(m.dirty);
        assert_eq!(decode_volume(&encode_volume(&m)).unwrap(), m);
    }

    #[test]
    fn longhorn_disk_meta_parses() {
        let raw = br#"{"Name":"volume-head-001.img","Parent":"volume-snap-snap-a.img","Removed":false,"UserCreated":true,"Created":"2026-11-24T15:45:12Z","Labels":null}"#;
        let m = decode_disk(raw).unwrap();
        assert_eq!(m.parent, "volume-snap-snap-a.img");
        assert!(m.user_created);
        assert_eq!(m.labels, None);
    }

    #[test]
    fn revision_counter_is_nul_padded_decimal() {
        let mut raw = vec![0u8; 4096];
        raw[0] = b'4';
        assert_eq!(decode_revision(&raw).unwrap(), 4);
        assert_eq!(decode_revision(&[]).unwrap(), 0);
        assert!(decode_revision(b"x1\0").is_err());
        assert_eq!(encode_revision(1234).len(), REVISION_FILE_LEN);
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_head_file_name(&head_file_name(7)), Some(7));
        assert_eq!(
            parse_snap_file_name(&snap_file_name("snap-a")),
            Some("snap-a")
        );
        assert_eq!(parse_snap_file_name("volume-snap-.img"), None);
        assert_eq!(parse_head_file_name("volume-snap-a.img"), None);
    }

    #[test]
    fn snapshot_names_are_checked() {
        assert!(validate_snapshot_name("snap-1.daily_x").is_ok());
        assert!(validate_snapshot_name("").is_err());
        assert!(validate_snapshot_name("../x").is_err());
        assert!(validate_snapshot_name("a/b").is_err());
        assert!(validate_snapshot_name(".hidden").is_err());
    }

    proptest! {
        #[test]
        fn revision_round_trips(r in any::<u64>()) {
            prop_assert_eq!(decode_revision(&encode_revision(r)).unwrap(), r);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_volume(&bytes);
            let _ = decode_disk(&bytes);
            let _ = decode_revision(&bytes);
            let _ = decode_engine(&bytes);
        }

        #[test]
        fn engine_record_round_trips(epoch: u64, members in proptest::collection::vec("[a-z0-9.:]{1,20}", 0..4), region_bytes: u64, intent in proptest::collection::btree_set(any::<u64>(), 0..20)) {
            let r = EngineRecord { epoch, members, region_bytes, intent };
            prop_assert_eq!(decode_engine(&encode_engine(&r)).unwrap(), r);
        }

        #[test]
        fn disk_meta_round_trips(name in "[a-z0-9-]{1,20}", parent in "[a-z0-9-]{0,20}", removed: bool, user: bool) {
            let m = DiskMeta { name, parent, removed, user_created: user, created: now_rfc3339(), labels: None };
            prop_assert_eq!(decode_disk(&encode_disk(&m)).unwrap(), m);
        }
    }
}
