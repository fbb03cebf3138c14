//! The replica protocol's frames: pure encode/decode over bytes, no I/O.
//!
//! One TCP connection carries a stream of requests and a stream of responses.
//! Every request has an id chosen by the client; responses carry the id back
//! and may come in any order, so a client keeps many requests in flight.
//! Headers and payloads are each protected by CRC32C. The byte layout is in
//! `docs/format.md`; [`REQUEST_HEADER_LEN`] and [`RESPONSE_HEADER_LEN`] fix it.

use crate::error::ErrorKind;

/// `"SHRQ"` read as a little-endian u32.
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"SHRQ");
/// `"SHRS"` read as a little-endian u32.
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"SHRS");
/// The only protocol version.
pub const VERSION: u8 = 1;
/// Bytes in a request header.
pub const REQUEST_HEADER_LEN: usize = 44;
/// Bytes in a response header.
pub const RESPONSE_HEADER_LEN: usize = 28;
/// Largest read or write one request may carry.
pub const MAX_IO_BYTES: u64 = 8 << 20;
/// Largest control request payload.
pub const MAX_CONTROL_BYTES: u32 = 1 << 20;
/// Largest JSON header of a [`Op::LayerWrite`] payload.
pub const MAX_LAYER_WRITE_HEADER: u32 = 4096;
/// Largest response payload a client accepts.
pub const MAX_RESPONSE_BYTES: u32 = 64 << 20;

/// Request operations. The values are wire format; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `length` bytes at `offset`.
    Read = 1,
    /// Write the payload at `offset` (`length` == payload length).
    Write = 2,
    /// Trim `length` bytes at `offset`.
    Unmap = 3,
    /// Make everything acknowledged so far durable.
    Flush = 4,
    /// Size, chain, revision, flags (optional JSON request naming the
    /// caller's volume, see [`InfoRequest`]; JSON response).
    Info = 16,
    /// Every layer with sizes and timestamps (JSON response).
    List = 17,
    /// Snapshot the head (JSON request).
    Snapshot = 18,
    /// Remove a snapshot (JSON request).
    RemoveSnapshot = 19,
    /// Revert to a snapshot (JSON request).
    Revert = 20,
    /// Grow the volume (JSON request).
    Expand = 21,
    /// One page of a layer's checksummed extents (JSON request and response).
    Extents = 22,
    /// Set or clear the rebuilding flag (JSON request).
    SetRebuilding = 23,
    /// Raw bytes of one layer (JSON request, raw response).
    LayerRead = 24,
    /// Write into a snapshot layer of a rebuilding replica (binary request,
    /// see [`encode_layer_write`]).
    LayerWrite = 25,
    /// Punch a hole in a snapshot layer of a rebuilding replica (JSON request).
    LayerPunch = 26,
    /// Reshape a rebuilding replica's chain (JSON request).
    SetChain = 27,
    /// Sync and clear the rebuilding flag.
    FinishRebuild = 28,
    /// Record the membership epoch (JSON request).
    SetEpoch = 29,
    /// Add and remove write-intent regions (JSON request).
    UpdateIntent = 30,
    /// CRC32C of a range of the volume's content (JSON request and response).
    Checksum = 31,
    /// Mark a snapshot removed, the first step of removing it (JSON request).
    MarkRemoved = 32,
}

impl Op {
    /// Decodes an op byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Unmap,
            4 => Self::Flush,
            16 => Self::Info,
            17 => Self::List,
            18 => Self::Snapshot,
            19 => Self::RemoveSnapshot,
            20 => Self::Revert,
            21 => Self::Expand,
            22 => Self::Extents,
            23 => Self::SetRebuilding,
            24 => Self::LayerRead,
            25 => Self::LayerWrite,
            26 => Self::LayerPunch,
            27 => Self::SetChain,
            28 => Self::FinishRebuild,
            29 => Self::SetEpoch,
            30 => Self::UpdateIntent,
            31 => Self::Checksum,
            32 => Self::MarkRemoved,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) >= 16
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Operation.
    pub op: Op,
    /// Client-chosen id, echoed in the response.
    pub id: u64,
    /// Byte offset in the volume (I/O ops), else 0.
    pub offset: u64,
    /// Byte length of the I/O (read, write, unmap), else 0.
    pub length: u64,
    /// Bytes of payload following the header.
    pub payload_len: u32,
    /// CRC32C of the payload (0 when there is none).
    pub payload_crc: u32,
}

/// A decoded response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// `None` for success, else the error's kind; the payload is then the
    /// UTF-8 message.
    pub status: Option<ErrorKind>,
    /// The request's id.
    pub id: u64,
    /// Bytes of payload following the header.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

/// Why a frame was refused. After any of these the connection is closed:
/// the stream can no longer be trusted to be in step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not the expected magic.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Unknown protocol version.
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    /// The header's CRC32C does not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Reserved bytes are not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// Unknown op code (the id is known since the header checksum held).
    #[error("unknown op {op} in request {id}")]
    UnknownOp {
        /// The op byte.
        op: u8,
        /// The request id.
        id: u64,
    },
    /// Unknown response status byte.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// Lengths that do not fit the op or exceed the limits.
    #[error("request {id}: {reason}")]
    BadLength {
        /// The request id.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// The payload's CRC32C does not match: corrupted in transit.
    #[error("request {id}: payload checksum mismatch")]
    PayloadChecksum {
        /// The request id.
        id: u64,
    },
}

impl FrameError {
    /// The request id, when the header was intact enough to know it.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::UnknownOp { id, .. }
            | Self::BadLength { id, .. }
            | Self::PayloadChecksum { id } => Some(*id),
            _ => None,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl RequestHeader {
    /// A request header for `op` whose payload is `payload`.
    pub fn new(op: Op, id: u64, offset: u64, length: u64, payload: &[u8]) -> Self {
        Self::with_crc(op, id, offset, length, payload.len(), payload_crc(payload))
    }

    /// [`new`](Self::new) for a payload of `len` bytes whose CRC
    /// ([`payload_crc`]) is already known: the engine sends one write to
    /// several replicas and checksums it once.
    pub fn with_crc(op: Op, id: u64, offset: u64, length: u64, len: usize, crc: u32) -> Self {
        Self {
            op,
            id,
            offset,
            length,
            payload_len: u32::try_from(len).expect("payload bounded by MAX_IO_BYTES"),
            payload_crc: crc,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.length.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, version, checksum, op, and that
    /// the lengths fit the op and the limits.
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if crc32c::crc32c(&b[..40]) != u32_at(b, 40) {
            return Err(FrameError::HeaderChecksum);
        }
        if b[4] != VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let id = u64_at(b, 8);
        let op = Op::from_u8(b[5]).ok_or(FrameError::UnknownOp { op: b[5], id })?;
        let h = Self {
            op,
            id,
            offset: u64_at(b, 16),
            length: u64_at(b, 24),
            payload_len: u32_at(b, 32),
            payload_crc: u32_at(b, 36),
        };
        h.check_lengths()?;
        Ok(h)
    }

    fn check_lengths(&self) -> Result<(), FrameError> {
        let bad = |reason: String| FrameError::BadLength {
            id: self.id,
            reason,
        };
        let payload = u64::from(self.payload_len);
        match self.op {
            Op::Read => {
                if payload != 0 {
                    return Err(bad("a read carries no payload".into()));
                }
                if self.length > MAX_IO_BYTES {
                    return Err(bad(format!(
                        "read of {} bytes exceeds {MAX_IO_BYTES}",
                        self.length
                    )));
                }
            }
            Op::Write => {
                if payload != self.length {
                    return Err(bad(format!(
                        "write length {} differs from payload length {payload}",
                        self.length
                    )));
                }
                if payload > MAX_IO_BYTES {
                    return Err(bad(format!(
                        "write of {payload} bytes exceeds {MAX_IO_BYTES}"
                    )));
                }
            }
            Op::Unmap | Op::Flush => {
                if payload != 0 {
                    return Err(bad(format!("{:?} carries no payload", self.op)));
                }
            }
            Op::LayerWrite => {
                if payload > MAX_IO_BYTES + u64::from(MAX_LAYER_WRITE_HEADER) {
                    return Err(bad(format!(
                        "layer write of {payload} bytes exceeds {MAX_IO_BYTES} plus its header"
                    )));
                }
            }
            _ => {
                debug_assert!(self.op.is_control());
                if self.payload_len > MAX_CONTROL_BYTES {
                    return Err(bad(format!(
                        "control payload of {payload} bytes exceeds {MAX_CONTROL_BYTES}"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl ResponseHeader {
    /// A response header for `payload`.
    pub fn new(id: u64, status: Option<ErrorKind>, payload: &[u8]) -> Self {
        Self {
            status,
            id,
            payload_len: u32::try_from(payload.len()).expect("response payload bounded"),
            payload_crc: if payload.is_empty() {
                0
            } else {
                crc32c::crc32c(payload)
            },
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[0..4].copy_from_slice(&RESPONSE_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.status.map_or(0, |k| k as u8);
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a response header.
    pub fn decode(b: &[u8; RESPONSE_HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = u32_at(b, 0);
        if magic != RESPONSE_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if crc32c::crc32c(&b[..24]) != u32_at(b, 24) {
            return Err(FrameError::HeaderChecksum);
        }
        if b[4] != VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let status = match b[5] {
            0 => None,
            s => Some(ErrorKind::from_u8(s).ok_or(FrameError::UnknownStatus(s))?),
        };
        let h = Self {
            status,
            id: u64_at(b, 8),
            payload_len: u32_at(b, 16),
            payload_crc: u32_at(b, 20),
        };
        if h.payload_len > MAX_RESPONSE_BYTES {
            return Err(FrameError::BadLength {
                id: h.id,
                reason: format!(
                    "response payload of {} bytes exceeds {MAX_RESPONSE_BYTES}",
                    h.payload_len
                ),
            });
        }
        Ok(h)
    }
}

/// Checks a received payload against the CRC its header announced.
pub fn verify_payload(id: u64, expected_crc: u32, payload: &[u8]) -> Result<(), FrameError> {
    let actual = if payload.is_empty() {
        0
    } else {
        crc32c::crc32c(payload)
    };
    if actual == expected_crc {
        Ok(())
    } else {
        Err(FrameError::PayloadChecksum { id })
    }
}

/// The CRC32C a header carries for `payload` (0 when empty).
pub fn payload_crc(payload: &[u8]) -> u32 {
    if payload.is_empty() {
        0
    } else {
        crc32c::crc32c(payload)
    }
}

/// JSON body of [`Op::Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Snapshot name.
    pub name: String,
    /// Created at a user's request.
    #[serde(default)]
    pub user_created: bool,
    /// Labels to record.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// JSON body of [`Op::Info`]; an empty body asks no question.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfoRequest {
    /// The caller's volume: a replica started for another one refuses the
    /// request (`FailedPrecondition`).
    pub volume: String,
}

/// JSON body of [`Op::RemoveSnapshot`], [`Op::MarkRemoved`] and [`Op::Revert`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRequest {
    /// Snapshot name.
    pub name: String,
}

/// JSON body of [`Op::Expand`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandRequest {
    /// New size in bytes.
    pub size: u64,
}

/// JSON body of [`Op::Extents`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtentsRequest {
    /// Snapshot name, or `head`.
    pub layer: String,
    /// Byte offset to start from.
    #[serde(default)]
    pub from: u64,
    /// Most chunks to return (the server caps it).
    pub max: u32,
}

/// JSON body of [`Op::SetRebuilding`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildingRequest {
    /// New value of the flag.
    pub rebuilding: bool,
}

/// JSON body of [`Op::LayerRead`] and [`Op::LayerPunch`]; the JSON header of
/// [`Op::LayerWrite`] (whose `len` is the data length).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRange {
    /// Snapshot name, or `head` (reads only).
    pub layer: String,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// Lays out a [`Op::LayerWrite`] payload: the JSON header's length (u32
/// little-endian), the JSON header, then the data.
pub fn encode_layer_write(layer: &str, offset: u64, data: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(&LayerRange {
        layer: layer.into(),
        offset,
        len: data.len() as u64,
    })
    .expect("LayerRange always serializes");
    let mut v = Vec::with_capacity(4 + head.len() + data.len());
    v.extend_from_slice(
        &u32::try_from(head.len())
            .expect("short header")
            .to_le_bytes(),
    );
    v.extend_from_slice(&head);
    v.extend_from_slice(data);
    v
}

/// Splits a [`Op::LayerWrite`] payload into its header and data.
pub fn decode_layer_write(payload: &[u8]) -> Result<(LayerRange, &[u8]), String> {
    let n = payload
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or("layer write payload shorter than its length field")?;
    if n > MAX_LAYER_WRITE_HEADER {
        return Err(format!(
            "layer write header of {n} bytes exceeds {MAX_LAYER_WRITE_HEADER}"
        ));
    }
    let end = 4 + n as usize;
    let head = payload
        .get(4..end)
        .ok_or("layer write payload shorter than its header")?;
    let q: LayerRange =
        serde_json::from_slice(head).map_err(|e| format!("malformed layer write header: {e}"))?;
    let data = &payload[end..];
    if q.len != data.len() as u64 {
        return Err(format!(
            "layer write header says {} bytes but {} follow",
            q.len,
            data.len()
        ));
    }
    Ok((q, data))
}

/// JSON body of [`Op::SetChain`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetChainRequest {
    /// The snapshots below the head, bottom first.
    pub chain: Vec<super::chain::SnapshotSpec>,
}

/// JSON body of [`Op::SetEpoch`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRequest {
    /// The new epoch.
    pub epoch: u64,
    /// Read-write replicas at that epoch.
    pub members: Vec<String>,
}

/// JSON body of [`Op::UpdateIntent`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentRequest {
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Regions to add.
    #[serde(default)]
    pub add: Vec<u64>,
    /// Regions to remove.
    #[serde(default)]
    pub remove: Vec<u64>,
}

/// JSON body of [`Op::Checksum`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumRequest {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Read),
            Just(Op::Write),
            Just(Op::Unmap),
            Just(Op::Flush),
            Just(Op::Info),
            Just(Op::List),
            Just(Op::Snapshot),
            Just(Op::RemoveSnapshot),
            Just(Op::Revert),
            Just(Op::Expand),
            Just(Op::Extents),
            Just(Op::SetRebuilding),
            Just(Op::LayerRead),
            Just(Op::LayerWrite),
            Just(Op::LayerPunch),
            Just(Op::SetChain),
            Just(Op::FinishRebuild),
            Just(Op::SetEpoch),
            Just(Op::UpdateIntent),
            Just(Op::Checksum),
            Just(Op::MarkRemoved),
        ]
    }

    fn valid_request() -> impl Strategy<Value = RequestHeader> {
        (
            op(),
            any::<u64>(),
            any::<u64>(),
            0..MAX_IO_BYTES,
            any::<u32>(),
        )
            .prop_map(|(op, id, offset, len, crc)| {
                let (length, payload_len) = match op {
                    Op::Read => (len, 0),
                    Op::Write => (len, u32::try_from(len).unwrap()),
                    Op::Unmap => (len << 8, 0),
                    Op::Flush => (0, 0),
                    _ => (0, u32::try_from(len).unwrap() % MAX_CONTROL_BYTES),
                };
                RequestHeader {
                    op,
                    id,
                    offset,
                    length,
                    payload_len,
                    payload_crc: if payload_len == 0 { 0 } else { crc },
                }
            })
    }

    proptest! {
        #[test]
        fn request_round_trips(h in valid_request()) {
            prop_assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn response_round_trips(id: u64, status in 0u8..=8, len in 0..MAX_RESPONSE_BYTES, crc: u32) {
            let h = ResponseHeader { status: ErrorKind::from_u8(status), id, payload_len: len, payload_crc: crc };
            prop_assert_eq!(ResponseHeader::decode(&h.encode()), Ok(h));
        }

        /// Any single corrupted byte of a valid header is caught (CRC32C
        /// detects every single-byte error).
        #[test]
        fn corrupted_header_is_refused(h in valid_request(), at in 0..REQUEST_HEADER_LEN, flip in 1u8..=255) {
            let mut b = h.encode();
            b[at] ^= flip;
            prop_assert!(RequestHeader::decode(&b).is_err());
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform12(any::<u8>())) {
            let mut r = [0u8; REQUEST_HEADER_LEN];
            r[..32].copy_from_slice(&b);
            r[32..].copy_from_slice(&tail);
            let _ = RequestHeader::decode(&r);
            let mut s = [0u8; RESPONSE_HEADER_LEN];
            s.copy_from_slice(&r[..RESPONSE_HEADER_LEN]);
            let _ = ResponseHeader::decode(&s);
        }
    }

    #[test]
    fn oversized_write_is_refused_before_its_payload_is_read() {
        let h = RequestHeader {
            op: Op::Write,
            id: 7,
            offset: 0,
            length: MAX_IO_BYTES + 4096,
            payload_len: u32::try_from(MAX_IO_BYTES + 4096).unwrap(),
            payload_crc: 1,
        };
        assert!(matches!(
            RequestHeader::decode(&h.encode()),
            Err(FrameError::BadLength { id: 7, .. })
        ));
    }

    proptest! {
        #[test]
        fn layer_write_round_trips(layer in "[a-z0-9-]{1,40}", offset: u64, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = encode_layer_write(&layer, offset, &data);
            let (q, d) = decode_layer_write(&p).unwrap();
            prop_assert_eq!(q, LayerRange { layer, offset, len: data.len() as u64 });
            prop_assert_eq!(d, &data[..]);
        }

        #[test]
        fn layer_write_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_layer_write(&b);
        }
    }

    #[test]
    fn payload_checksum_catches_corruption() {
        let data = vec![0xab; 4096];
        let h = RequestHeader::new(Op::Write, 1, 0, 4096, &data);
        let mut bad = data.clone();
        bad[100] ^= 1;
        assert!(verify_payload(1, h.payload_crc, &data).is_ok());
        assert_eq!(
            verify_payload(1, h.payload_crc, &bad),
            Err(FrameError::PayloadChecksum { id: 1 })
        );
    }
}
