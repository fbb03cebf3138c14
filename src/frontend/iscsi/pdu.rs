//! iSCSI PDUs (RFC 7143 §11) as pure functions over bytes: the 48-byte
//! basic header segment, its length fields, digests, and the fields each
//! opcode carries. Nothing here does I/O; `conn.rs` reads and writes them.
//!
//! Layout of every PDU: BHS (48 bytes) · AHS (`TotalAHSLength` × 4 bytes) ·
//! header digest (4, if negotiated) · data segment (padded to 4) · data
//! digest (4, if negotiated and the segment is non-empty). Multi-byte fields
//! are big-endian; digests are CRC32C, sent least-significant byte first
//! (the byte order RFC 7143 Appendix A's examples and every initiator use).

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// The "no tag" value of task tags and target transfer tags.
pub const NO_TAG: u32 = 0xffff_ffff;

/// Opcodes an initiator sends.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RSP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TMF_RSP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RSP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RSP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RSP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error (e.g. a PDU out of sequence).
    pub const PROTOCOL: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// A basic header segment. Accessors name the fields of RFC 7143 §11; which
/// ones mean something depends on the opcode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs {{ opcode: {:#04x}, flags: {:#04x}, itt: {:#x}, dsl: {} }}",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_len()
        )
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

impl Bhs {
    /// A zeroed header with `opcode`.
    pub fn new(opcode: u8) -> Self {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode & 0x3f;
        Self(b)
    }

    /// The opcode (without the immediate bit).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The immediate-delivery bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the final bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// Additional header segments, in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    /// Data segment length, without padding.
    pub fn data_len(&self) -> usize {
        (usize::from(self.0[5]) << 16) | (usize::from(self.0[6]) << 8) | usize::from(self.0[7])
    }
    /// Bytes 8..16: the LUN field.
    pub fn lun_raw(&self) -> u64 {
        u64::from_be_bytes(self.0[8..16].try_into().expect("8 bytes"))
    }
    /// The LUN as a number, for the single-level and flat formats SAM-5
    /// names (what initiators send for LUNs below 16384).
    pub fn lun(&self) -> u64 {
        u64::from(u16::from_be_bytes([self.0[8], self.0[9]]) & 0x3fff)
    }
    /// Initiator task tag.
    pub fn itt(&self) -> u32 {
        be32(&self.0[16..])
    }
    /// The 32-bit field at `at` (20, 24, 28, ...).
    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.0[at..])
    }

    /// Sets the immediate bit.
    pub fn set_immediate(&mut self) {
        self.0[0] |= 0x40;
    }
    /// Sets byte 1.
    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }
    /// Sets the data segment length.
    pub fn set_data_len(&mut self, n: usize) {
        assert!(n < 1 << 24, "data segment of {n} bytes");
        let n = u32::try_from(n).expect("checked above");
        self.0[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
    }
    /// Sets the LUN field to LUN `lun` in the single-level format.
    pub fn set_lun(&mut self, lun: u64) {
        let l = u16::try_from(lun & 0x3fff).expect("masked");
        self.0[8..16].copy_from_slice(&[0; 8]);
        self.0[8..10].copy_from_slice(&l.to_be_bytes());
    }
    /// Copies the raw LUN field.
    pub fn set_lun_raw(&mut self, raw: u64) {
        self.0[8..16].copy_from_slice(&raw.to_be_bytes());
    }
    /// Sets the initiator task tag.
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v);
    }
    /// Sets the 32-bit field at `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
}

/// Field offsets shared by many opcodes.
pub mod at {
    /// Target transfer tag / expected data transfer length (SCSI command).
    pub const TTT: usize = 20;
    /// Expected data transfer length of a SCSI command.
    pub const EDTL: usize = 20;
    /// CmdSN (initiator PDUs) / StatSN (target PDUs).
    pub const CMDSN: usize = 24;
    /// StatSN in target PDUs.
    pub const STATSN: usize = 24;
    /// ExpStatSN (initiator) / ExpCmdSN (target).
    pub const EXPSTATSN: usize = 28;
    /// ExpCmdSN in target PDUs.
    pub const EXPCMDSN: usize = 28;
    /// MaxCmdSN in target PDUs.
    pub const MAXCMDSN: usize = 32;
    /// DataSN / R2TSN / ExpDataSN.
    pub const DATASN: usize = 36;
    /// Buffer offset of Data-In, Data-Out and R2T.
    pub const BUFFER_OFFSET: usize = 40;
    /// Residual count (SCSI Response, final Data-In) / desired length (R2T).
    pub const RESIDUAL: usize = 44;
}

/// What the lengths in a header say follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Whether a 4-byte header digest follows the header segments.
    pub header_digest: bool,
    /// Whether a 4-byte data digest follows a non-empty data segment.
    pub data_digest: bool,
}

impl Framing {
    /// Bytes that follow the BHS before the data segment: AHS and header
    /// digest.
    pub fn after_bhs(&self, bhs: &Bhs) -> usize {
        bhs.ahs_len() + if self.header_digest { 4 } else { 0 }
    }

    /// Bytes of the data segment on the wire: padding and digest included.
    pub fn data_wire_len(&self, bhs: &Bhs) -> usize {
        let n = bhs.data_len();
        if n == 0 {
            return 0;
        }
        n.next_multiple_of(4) + if self.data_digest { 4 } else { 0 }
    }
}

/// The iSCSI digest of `parts` concatenated.
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let mut c = 0;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c.to_le_bytes()
}

/// Why a received PDU cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header digest does not match: the lengths cannot be trusted, so
    /// the connection must close (RFC 7143 §7.8).
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest does not match: the PDU is rejected.
    #[error("data digest mismatch")]
    DataDigest,
    /// The data segment is longer than this side declared it can receive.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks the header digest of a received PDU: `head` is BHS + AHS, `got`
/// the 4 bytes after them.
pub fn check_header_digest(head: &[u8], got: &[u8]) -> Result<(), FrameError> {
    if digest(&[head]) == got[..4] {
        Ok(())
    } else {
        Err(FrameError::HeaderDigest)
    }
}

/// Splits a received data segment (as on the wire, padding and digest
/// included) into its payload, checking the digest.
pub fn open_data<'a>(bhs: &Bhs, wire: &'a [u8], framing: Framing) -> Result<&'a [u8], FrameError> {
    let n = bhs.data_len();
    if n == 0 {
        return Ok(&[]);
    }
    let padded = n.next_multiple_of(4);
    if framing.data_digest && digest(&[&wire[..padded]]) != wire[padded..padded + 4] {
        return Err(FrameError::DataDigest);
    }
    Ok(&wire[..n])
}

/// Encodes a PDU (BHS, no AHS) with `data` as its data segment, padding and
/// digests as `framing` says. Sets the data segment length.
pub fn encode(mut bhs: Bhs, data: &[u8], framing: Framing) -> Vec<u8> {
    bhs.0[4] = 0;
    bhs.set_data_len(data.len());
    let mut out = Vec::with_capacity(BHS_LEN + 8 + data.len() + 4);
    out.extend_from_slice(&bhs.0);
    if framing.header_digest {
        out.extend_from_slice(&digest(&[&bhs.0]));
    }
    if !data.is_empty() {
        let start = out.len();
        out.extend_from_slice(data);
        out.resize(start + data.len().next_multiple_of(4), 0);
        if framing.data_digest {
            let d = digest(&[&out[start..]]);
            out.extend_from_slice(&d);
        }
    }
    out
}

/// Serial number arithmetic (RFC 1982, 32 bits), which CmdSN, StatSN and
/// DataSN follow: `a < b` across wrap-around.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digest_matches_the_rfc_example() {
        // The CRC32C examples of RFC 3720 Appendix B.4, bytes as sent.
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[&[0xffu8; 32]]), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn serial_numbers_compare_across_wraparound() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fffe, 1));
        assert!(!sn_lt(1, 0xffff_fffe));
        assert!(sn_le(5, 5));
    }

    proptest! {
        #[test]
        fn encoded_pdus_open_to_their_data(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            hd in any::<bool>(),
            dd in any::<bool>(),
            itt in any::<u32>(),
        ) {
            let framing = Framing { header_digest: hd, data_digest: dd };
            let mut h = Bhs::new(op::NOP_IN);
            h.set_itt(itt);
            let wire = encode(h, &data, framing);
            let bhs = Bhs(wire[..BHS_LEN].try_into().unwrap());
            prop_assert_eq!(bhs.itt(), itt);
            prop_assert_eq!(bhs.data_len(), data.len());
            let after = framing.after_bhs(&bhs);
            if hd {
                check_header_digest(&wire[..BHS_LEN], &wire[BHS_LEN..]).unwrap();
            }
            let body = &wire[BHS_LEN + after..];
            prop_assert_eq!(body.len(), framing.data_wire_len(&bhs));
            prop_assert_eq!(open_data(&bhs, body, framing).unwrap(), &data[..]);
            if dd && !data.is_empty() {
                let mut bad = body.to_vec();
                bad[0] ^= 1;
                prop_assert_eq!(open_data(&bhs, &bad, framing), Err(FrameError::DataDigest));
            }
        }
    }
}
