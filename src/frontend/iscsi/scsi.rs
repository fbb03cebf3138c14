//! The SCSI command set of the logical units the iSCSI target exports, over
//! [`crate::engine::Volume`]: LUN 1 is the volume as a thin-provisioned SBC
//! direct-access block device (512-byte logical blocks, 4 KiB physical),
//! LUN 0 a storage-array controller that only answers the commands an
//! initiator needs to find LUN 1.
//!
//! It owns CDB decoding, the data-in an initiator reads (INQUIRY and its VPD
//! pages, READ CAPACITY, MODE SENSE, REPORT LUNS, REPORT SUPPORTED OPERATION
//! CODES), sense data, unit attentions, and the SPC-2 and SPC-4 persistent
//! reservation state, all in memory. The transport (PDUs, login, sessions)
//! calls [`LogicalUnits::execute`] with a CDB and the data-out it collected
//! and sends back the [`Response`].
//!
//! It must not import the iSCSI transport files next to it (the dependency
//! runs the other way), nor anything from `crate::controller` or
//! `crate::node`; its only I/O is through the volume.
//!
//! Invariants:
//! - No request reaches the engine unless its LBA range lies inside the
//!   volume and is at most `MAX_REQUEST_BYTES` long; the engine's range
//!   errors are therefore bugs, not initiator mistakes.
//! - The state mutex is never held across an `.await`.
//! - COMPARE AND WRITE holds `atomic` exclusively and every other write-type
//!   command holds it shared, so nothing this target issues lands between a
//!   COMPARE AND WRITE's read and its write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tracing::warn;

use crate::engine::volume::{request_pieces as pieces, MAX_REQUEST_BYTES};
use crate::engine::{self, Volume};
use crate::error::ErrorKind;

/// Logical block size: the engine's sector, and what every initiator
/// handles without surprises.
const BLOCK_BYTES: u64 = 512;
const BLOCK_USIZE: usize = 512;
/// 2^3 logical blocks per physical block: replicas store 4 KiB blocks, so
/// smaller writes cost a read-modify-write and aligned ones do not.
const PHYSICAL_EXPONENT: u8 = 3;
/// 32 MiB, split into engine requests on the way down. Initiators and
/// libiscsi's conformance tests move 65536 blocks in one command.
const MAX_TRANSFER_BLOCKS: u32 = 65536;
/// 1 MiB. Linux turns it into `io_opt`, which mkfs reads as a stripe width:
/// it divides the engine's 4 MiB request and intent-region size, so
/// filesystem allocation units never straddle a region, and it is small
/// enough not to look like a wide RAID stripe.
const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;
/// One physical block.
const OPTIMAL_GRANULARITY_BLOCKS: u16 = 8;
/// 512 MiB per UNMAP: 128 engine requests, well under an initiator's
/// command timeout, and few commands for an fstrim (libiscsi's conformance
/// suite calls anything above 2^20 blocks insane).
const MAX_UNMAP_BLOCKS: u32 = 1024 * 1024;
/// As many descriptors as a 16-bit parameter list can carry.
const MAX_UNMAP_DESCRIPTORS: u32 = 4095;
const MAX_WRITE_SAME_BLOCKS: u64 = 2 * 1024 * 1024;
/// 64 KiB: COMPARE AND WRITE holds every other writer off while it reads
/// and writes, so it stays short; users of it (VMware ATS, cluster locks)
/// compare one block.
const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 128;

const VENDOR: &[u8; 8] = b"SHORTHRN";
const REVISION: &[u8; 4] = b"0001";
/// A made-up IEEE company ID for the NAA identifiers; the low nibble of its
/// first byte is 1010b, the CID range, so it is no manufacturer's OUI.
const COMPANY_ID: u64 = 0x5A_5348;
/// Longest volume name kept in the serial number and T10 designator, so
/// every designator fits its one-byte length.
const MAX_SERIAL_BYTES: usize = 200;
const MAX_NAME_STRING_BYTES: usize = 252;

/// SAM status codes.
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;

/// Sense keys.
const NO_SENSE: u8 = 0x00;
const MEDIUM_ERROR: u8 = 0x03;
const HARDWARE_ERROR: u8 = 0x04;
const ILLEGAL_REQUEST: u8 = 0x05;
const UNIT_ATTENTION: u8 = 0x06;
const MISCOMPARE: u8 = 0x0E;

/// Unit attention conditions this target raises (ASC, ASCQ).
const UA_RESET: (u8, u8) = (0x29, 0x00);
const UA_CAPACITY_CHANGED: (u8, u8) = (0x2A, 0x09);
const UA_RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
const UA_RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
const UA_REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);

/// Operation codes.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PR_IN: u8 = 0x5E;
    pub const PR_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;

    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    pub const SA_REPORT_OPCODES: u8 = 0x0C;
}

// ---------------------------------------------------------------------------
// Sense data

/// Where in the CDB or parameter list an ILLEGAL REQUEST points, so the
/// initiator's log names the offending field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldPointer {
    in_cdb: bool,
    byte: u16,
}

/// One sense condition; built by constructors named after the condition
/// so the standard's wording can be grepped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    key: u8,
    asc: u8,
    ascq: u8,
    information: Option<u32>,
    field: Option<FieldPointer>,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// Nothing to report: what REQUEST SENSE returns on a healthy unit.
    pub const fn no_sense() -> Self {
        Self::new(NO_SENSE, 0x00, 0x00)
    }

    /// The command addresses blocks past the last LBA (21h/00h).
    pub const fn lba_out_of_range() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// The target does not implement this operation code (20h/00h).
    pub const fn invalid_opcode() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x20, 0x00)
    }

    /// A CDB field holds a value the unit does not support (24h/00h);
    /// `byte` is the offending CDB byte.
    pub fn invalid_field_in_cdb(byte: usize) -> Self {
        Self {
            field: Some(FieldPointer {
                in_cdb: true,
                byte: u16::try_from(byte).unwrap_or(u16::MAX),
            }),
            ..Self::new(ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }

    /// A parameter-list field holds an unsupported value (26h/00h); `byte`
    /// is its offset in the data-out.
    pub fn invalid_field_in_parameter_list(byte: usize) -> Self {
        Self {
            field: Some(FieldPointer {
                in_cdb: false,
                byte: u16::try_from(byte).unwrap_or(u16::MAX),
            }),
            ..Self::new(ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }

    /// The parameter list is shorter than its own headers say, or the
    /// initiator sent less than the CDB announced (1Ah/00h).
    pub const fn parameter_list_length_error() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// The initiator sent less write data than the CDB's transfer length
    /// needs. SBC has no dedicated code for a short data-out of a write; the
    /// CDB and the transfer disagree, and the CDB is what the unit judges,
    /// so this is INVALID FIELD IN CDB without a field pointer (24h/00h).
    pub const fn data_out_mismatch() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x24, 0x00)
    }

    /// The addressed LUN does not exist (25h/00h).
    pub const fn lun_not_supported() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// MODE SENSE asked for saved values; nothing is saved (39h/00h).
    pub const fn saving_parameters_not_supported() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x39, 0x00)
    }

    /// A persistent-reservation RELEASE named another type (26h/04h).
    pub const fn invalid_release_of_persistent_reservation() -> Self {
        Self::new(ILLEGAL_REQUEST, 0x26, 0x04)
    }

    /// VERIFY or COMPARE AND WRITE found different data (1Dh/00h);
    /// `offset` is the data-out offset of the first differing byte.
    pub const fn miscompare(offset: u32) -> Self {
        Self {
            information: Some(offset),
            ..Self::new(MISCOMPARE, 0x1D, 0x00)
        }
    }

    /// The engine could not read (11h/00h).
    pub const fn unrecovered_read_error() -> Self {
        Self::new(MEDIUM_ERROR, 0x11, 0x00)
    }

    /// The engine could not write, unmap or flush (0Ch/00h).
    pub const fn write_error() -> Self {
        Self::new(MEDIUM_ERROR, 0x0C, 0x00)
    }

    /// No replica can serve the volume (44h/00h).
    pub const fn internal_target_failure() -> Self {
        Self::new(HARDWARE_ERROR, 0x44, 0x00)
    }

    /// A pending unit attention with its ASC/ASCQ.
    pub const fn unit_attention((asc, ascq): (u8, u8)) -> Self {
        Self::new(UNIT_ATTENTION, asc, ascq)
    }

    /// The sense key.
    pub fn key(&self) -> u8 {
        self.key
    }

    /// Additional sense code and qualifier.
    pub fn asc_ascq(&self) -> (u8, u8) {
        (self.asc, self.ascq)
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn to_fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        if let Some(info) = self.information {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            s[15] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        s
    }

    /// Descriptor-format sense data (SPC-4 4.5.2), for REQUEST SENSE with
    /// DESC=1: the header, plus an information descriptor when there is one.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.information {
            s.extend([0x00, 0x0A, 0x80, 0x00]);
            s.extend(u64::from(info).to_be_bytes());
            s[7] = 12;
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Responses

/// The outcome of one command, ready for the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// SAM status: 0x00 GOOD, 0x02 CHECK CONDITION, 0x18 RESERVATION CONFLICT.
    pub status: u8,
    /// Data-in, already cut to the CDB's ALLOCATION LENGTH (the transport
    /// additionally cuts to the initiator's expected length and reports
    /// residuals).
    pub data: Vec<u8>,
    /// Fixed-format sense data (response code 0x70, 18 bytes) when status
    /// is CHECK CONDITION; empty otherwise.
    pub sense: Vec<u8>,
}

impl Response {
    fn good(data: Vec<u8>) -> Self {
        Self {
            status: GOOD,
            data,
            sense: Vec::new(),
        }
    }

    /// CHECK CONDITION with `sense`; the transport may use it for its own
    /// refusals so they read like the unit's.
    pub fn check(sense: Sense) -> Self {
        Self {
            status: CHECK_CONDITION,
            data: Vec::new(),
            sense: sense.to_fixed(),
        }
    }

    /// TASK SET FULL: the transport holds as much write data as it
    /// allows; the initiator retries the command later (SAM-5 5.3.1).
    pub fn task_set_full() -> Self {
        Self {
            status: 0x28,
            data: Vec::new(),
            sense: Vec::new(),
        }
    }

    fn conflict() -> Self {
        Self {
            status: RESERVATION_CONFLICT,
            data: Vec::new(),
            sense: Vec::new(),
        }
    }
}

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Refusal {
    fn from(s: Sense) -> Self {
        Self::Check(s)
    }
}

impl From<Refusal> for Response {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Check(s) => Response::check(s),
            Refusal::Conflict => Response::conflict(),
        }
    }
}

type Outcome = Result<Vec<u8>, Refusal>;

// ---------------------------------------------------------------------------
// CDB decoding

/// VERIFY's BYTCHK: what the data-out is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteCheck {
    /// No data-out: only the range is checked.
    None,
    /// One block of data-out per block verified.
    Full,
    /// One block of data-out compared with every block (SBC-4 BYTCHK=11b).
    Same,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModeSenseCdb {
    ten: bool,
    dbd: bool,
    llbaa: bool,
    page: u8,
    subpage: u8,
    pc: u8,
    alloc: usize,
}

/// A decoded CDB. Fields are already range-checked against the CDB's own
/// rules; checks that need the volume (LBA ranges) happen when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: usize,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: usize,
    },
    ReportLuns {
        select: u8,
        alloc: usize,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: usize,
    },
    GetLbaStatus {
        lba: u64,
        alloc: usize,
    },
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Verify {
        lba: u64,
        blocks: u32,
        check: ByteCheck,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
        /// Offset of NUMBER OF LOGICAL BLOCKS, for the field pointer.
        len_at: usize,
    },
    Unmap {
        param_len: usize,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        fua: bool,
    },
    ModeSense(ModeSenseCdb),
    ModeSelect {
        ten: bool,
        param_len: usize,
    },
    StartStopUnit,
    AllowMediumRemoval,
    Reserve6,
    Release6,
    PrIn {
        action: u8,
        alloc: usize,
    },
    PrOut {
        action: u8,
        scope: u8,
        kind: u8,
        param_len: usize,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: usize,
    },
}

/// How a command interacts with reservations (SPC-4 5.13.1 tables, SBC-4
/// 4.17): which reservation types make it conflict for a non-holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Never conflicts, not even with an SPC-2 reservation.
    Free,
    /// Allowed under persistent reservations; conflicts with SPC-2 ones.
    Status,
    /// Conflicts with the Exclusive Access types.
    Read,
    /// Conflicts with every type.
    Write,
    /// RESERVE(6): conflicts whenever persistent-reservation state exists.
    Reserve6,
    /// RELEASE(6): a no-op for non-holders of an SPC-2 reservation.
    Release6,
}

impl Command {
    fn access(&self) -> Access {
        match self {
            Self::Inquiry { .. }
            | Self::ReportLuns { .. }
            | Self::RequestSense { .. }
            | Self::ReportOpcodes { .. }
            | Self::AllowMediumRemoval => Access::Free,
            Self::TestUnitReady
            | Self::ReadCapacity10
            | Self::ReadCapacity16 { .. }
            | Self::StartStopUnit
            | Self::PrIn { .. }
            | Self::PrOut { .. } => Access::Status,
            Self::Read { .. }
            | Self::Verify { .. }
            | Self::PreFetch { .. }
            | Self::GetLbaStatus { .. }
            | Self::ModeSense(_) => Access::Read,
            Self::Write { .. }
            | Self::WriteSame { .. }
            | Self::Unmap { .. }
            | Self::CompareAndWrite { .. }
            | Self::SyncCache { .. }
            | Self::ModeSelect { .. } => Access::Write,
            Self::Reserve6 => Access::Reserve6,
            Self::Release6 => Access::Release6,
        }
    }
}

/// The CDB length of each implemented operation code; `None` for the rest.
fn cdb_len(opcode: u8) -> Option<usize> {
    use op::*;
    match opcode {
        TEST_UNIT_READY | REQUEST_SENSE | READ_6 | WRITE_6 | INQUIRY | MODE_SELECT_6
        | RESERVE_6 | RELEASE_6 | MODE_SENSE_6 | START_STOP_UNIT | PREVENT_ALLOW => Some(6),
        READ_CAPACITY_10 | READ_10 | WRITE_10 | WRITE_VERIFY_10 | VERIFY_10 | PRE_FETCH_10
        | SYNC_CACHE_10 | WRITE_SAME_10 | UNMAP | MODE_SELECT_10 | MODE_SENSE_10 | PR_IN
        | PR_OUT => Some(10),
        REPORT_LUNS | MAINTENANCE_IN | READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => Some(12),
        READ_16 | COMPARE_AND_WRITE | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | PRE_FETCH_16
        | SYNC_CACHE_16 | WRITE_SAME_16 | SERVICE_ACTION_IN_16 => Some(16),
        _ => None,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn to_usize(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// LBA and length of the READ/WRITE/VERIFY-style CDBs of each size.
fn lba_and_len(cdb: &[u8]) -> (u64, u32, usize) {
    match cdb.len() {
        6 => {
            let lba = (u64::from(cdb[1] & 0x1F) << 16) | u64::from(be16(cdb, 2));
            // SBC-4 5.14: in the 6-byte CDBs a TRANSFER LENGTH of 0 means 256.
            let len = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, len, 4)
        }
        10 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)), 7),
        12 => (u64::from(be32(cdb, 2)), be32(cdb, 6), 6),
        _ => (be64(cdb, 2), be32(cdb, 10), 10),
    }
}

/// Decodes one CDB without looking at the volume. Never panics: a CDB
/// shorter than its operation code needs is INVALID FIELD IN CDB, pointing
/// at the first missing byte.
fn decode(cdb: &[u8]) -> Result<Command, Sense> {
    use op::*;
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::invalid_opcode());
    };
    let Some(len) = cdb_len(opcode) else {
        return Err(Sense::invalid_opcode());
    };
    if cdb.len() < len {
        return Err(Sense::invalid_field_in_cdb(cdb.len()));
    }
    let cdb = &cdb[..len];
    let protect = cdb[1] >> 5;
    let cmd = match opcode {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => Command::RequestSense {
            desc: cdb[1] & 0x01 != 0,
            alloc: usize::from(cdb[4]),
        },
        INQUIRY => {
            let evpd = cdb[1] & 0x01 != 0;
            // CMDDT is obsolete since SPC-3.
            if cdb[1] & 0x02 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            if !evpd && cdb[2] != 0 {
                return Err(Sense::invalid_field_in_cdb(2));
            }
            Command::Inquiry {
                evpd,
                page: cdb[2],
                alloc: usize::from(be16(cdb, 3)),
            }
        }
        REPORT_LUNS => {
            let select = cdb[2];
            if select > 2 {
                return Err(Sense::invalid_field_in_cdb(2));
            }
            let alloc = be32(cdb, 6);
            // SPC-4 6.33: an allocation length under 16 is an error.
            if alloc < 16 {
                return Err(Sense::invalid_field_in_cdb(6));
            }
            Command::ReportLuns {
                select,
                alloc: to_usize(alloc),
            }
        }
        READ_CAPACITY_10 => {
            // SBC-3: without PMI the LOGICAL BLOCK ADDRESS must be zero.
            if cdb[8] & 0x01 == 0 && be32(cdb, 2) != 0 {
                return Err(Sense::invalid_field_in_cdb(2));
            }
            Command::ReadCapacity10
        }
        SERVICE_ACTION_IN_16 => match cdb[1] & 0x1F {
            SA_READ_CAPACITY_16 => Command::ReadCapacity16 {
                alloc: to_usize(be32(cdb, 10)),
            },
            SA_GET_LBA_STATUS => Command::GetLbaStatus {
                lba: be64(cdb, 2),
                alloc: to_usize(be32(cdb, 10)),
            },
            _ => return Err(Sense::invalid_field_in_cdb(1)),
        },
        READ_6 | READ_10 | READ_12 | READ_16 => {
            if protect != 0 && opcode != READ_6 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let (lba, blocks, len_at) = lba_and_len(cdb);
            if blocks > MAX_TRANSFER_BLOCKS {
                return Err(Sense::invalid_field_in_cdb(len_at));
            }
            Command::Read { lba, blocks }
        }
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10 | WRITE_VERIFY_12
        | WRITE_VERIFY_16 => {
            let fua = match opcode {
                WRITE_6 => false,
                WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
                    // BYTCHK 1xb is reserved; 0 and 1 both just write (the
                    // replicas acknowledge only what they stored).
                    if cdb[1] & 0x04 != 0 {
                        return Err(Sense::invalid_field_in_cdb(1));
                    }
                    false
                }
                _ => cdb[1] & 0x08 != 0,
            };
            if protect != 0 && opcode != WRITE_6 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let (lba, blocks, len_at) = lba_and_len(cdb);
            if blocks > MAX_TRANSFER_BLOCKS {
                return Err(Sense::invalid_field_in_cdb(len_at));
            }
            Command::Write { lba, blocks, fua }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            if protect != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let check = match (cdb[1] >> 1) & 0x03 {
                0 => ByteCheck::None,
                1 => ByteCheck::Full,
                3 => ByteCheck::Same,
                _ => return Err(Sense::invalid_field_in_cdb(1)),
            };
            let (lba, blocks, len_at) = lba_and_len(cdb);
            if check == ByteCheck::Full && blocks > MAX_TRANSFER_BLOCKS {
                return Err(Sense::invalid_field_in_cdb(len_at));
            }
            Command::Verify { lba, blocks, check }
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            let (lba, blocks, _) = lba_and_len(cdb);
            Command::PreFetch { lba, blocks }
        }
        SYNC_CACHE_10 | SYNC_CACHE_16 => {
            let (lba, blocks, _) = lba_and_len(cdb);
            Command::SyncCache { lba, blocks }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            // PBDATA and LBDATA need protection information.
            if protect != 0 || cdb[1] & 0x06 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            // ANCHOR: anchored-but-unmapped blocks are not offered (ANC_SUP=0).
            if cdb[1] & 0x10 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let unmap = cdb[1] & 0x08 != 0;
            let ndob = opcode == WRITE_SAME_16 && cdb[1] & 0x01 != 0;
            let (lba, blocks, len_at) = lba_and_len(cdb);
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
                len_at,
            }
        }
        UNMAP => {
            if cdb[1] & 0x01 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            Command::Unmap {
                param_len: usize::from(be16(cdb, 7)),
            }
        }
        COMPARE_AND_WRITE => {
            if protect != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let blocks = cdb[13];
            if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
                return Err(Sense::invalid_field_in_cdb(13));
            }
            Command::CompareAndWrite {
                lba: be64(cdb, 2),
                blocks,
                fua: cdb[1] & 0x08 != 0,
            }
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = opcode == MODE_SENSE_10;
            let pc = cdb[2] >> 6;
            if pc == 3 {
                return Err(Sense::saving_parameters_not_supported());
            }
            Command::ModeSense(ModeSenseCdb {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                page: cdb[2] & 0x3F,
                subpage: cdb[3],
                pc,
                alloc: if ten {
                    usize::from(be16(cdb, 7))
                } else {
                    usize::from(cdb[4])
                },
            })
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            // SP: nothing is ever saved.
            if cdb[1] & 0x01 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let ten = opcode == MODE_SELECT_10;
            Command::ModeSelect {
                ten,
                param_len: if ten {
                    usize::from(be16(cdb, 7))
                } else {
                    usize::from(cdb[4])
                },
            }
        }
        START_STOP_UNIT => {
            // LOEJ on a non-removable medium (SBC-4 5.25).
            if cdb[4] & 0x02 != 0 {
                return Err(Sense::invalid_field_in_cdb(4));
            }
            Command::StartStopUnit
        }
        PREVENT_ALLOW => {
            // SBC-4 5.13: a device whose medium cannot be removed does not
            // support PREVENT; ALLOW is trivially true.
            if cdb[4] & 0x03 != 0 {
                return Err(Sense::invalid_field_in_cdb(4));
            }
            Command::AllowMediumRemoval
        }
        RESERVE_6 | RELEASE_6 => {
            // Third-party and extent reservations are obsolete.
            if cdb[1] & 0x11 != 0 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            if opcode == RESERVE_6 {
                Command::Reserve6
            } else {
                Command::Release6
            }
        }
        PR_IN => {
            let action = cdb[1] & 0x1F;
            if action > 3 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            Command::PrIn {
                action,
                alloc: usize::from(be16(cdb, 7)),
            }
        }
        PR_OUT => {
            let action = cdb[1] & 0x1F;
            if action > 6 {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            Command::PrOut {
                action,
                scope: cdb[2] >> 4,
                kind: cdb[2] & 0x0F,
                param_len: to_usize(be32(cdb, 5)),
            }
        }
        MAINTENANCE_IN => {
            if cdb[1] & 0x1F != SA_REPORT_OPCODES {
                return Err(Sense::invalid_field_in_cdb(1));
            }
            let options = cdb[2] & 0x07;
            if options > 2 {
                return Err(Sense::invalid_field_in_cdb(2));
            }
            Command::ReportOpcodes {
                rctd: cdb[2] & 0x80 != 0,
                options,
                opcode: cdb[3],
                sa: be16(cdb, 4),
                alloc: to_usize(be32(cdb, 6)),
            }
        }
        _ => unreachable!("cdb_len lists exactly the opcodes decoded here"),
    };
    Ok(cmd)
}

// ---------------------------------------------------------------------------
// Data-in builders (pure)

/// Which logical unit a LUN names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Controller,
    Disk,
    Absent,
}

impl Unit {
    fn of(lun: u64) -> Self {
        match lun {
            0 => Self::Controller,
            1 => Self::Disk,
            _ => Self::Absent,
        }
    }

    /// Byte 0 of INQUIRY data: qualifier and peripheral device type.
    fn peripheral(self) -> u8 {
        match self {
            Self::Disk => 0x00,
            Self::Controller => 0x0C,
            Self::Absent => 0x7F,
        }
    }

    /// Index of the unit's unit-attention queue.
    fn index(self) -> usize {
        match self {
            Self::Disk => 1,
            _ => 0,
        }
    }
}

/// What the identification pages say about the unit.
#[derive(Debug, Clone)]
struct Identity {
    target: String,
    serial: String,
    naa: [u8; 16],
}

impl Identity {
    fn new(volume_name: &str, target: &str) -> Self {
        let mut serial: String = volume_name
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(MAX_SERIAL_BYTES)
            .collect();
        if serial.is_empty() {
            serial.push('0');
        }
        Self {
            target: target.to_owned(),
            serial,
            naa: naa_identifier(volume_name),
        }
    }
}

/// NAA type 6 (IEEE Registered Extended): 4-bit NAA, 24-bit company ID,
/// 36-bit vendor-specific id and a 64-bit extension, the last 100 bits
/// from CRC32C chains over the volume name, so the same volume always gets
/// the same WWN (Linux names /dev/disk/by-id/wwn-* after it) whichever node
/// serves it.
fn naa_identifier(name: &str) -> [u8; 16] {
    let a = crc32c::crc32c(name.as_bytes());
    let b = crc32c::crc32c_append(a ^ 0x5bd1_e995, name.as_bytes());
    let c = crc32c::crc32c_append(b ^ 0x9e37_79b9, name.as_bytes());
    let vendor = (u64::from(a) << 4) | u64::from(b >> 28);
    let high = (6u64 << 60) | (COMPANY_ID << 36) | vendor;
    let ext = (u64::from(b) << 32) | u64::from(c);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high.to_be_bytes());
    out[8..].copy_from_slice(&ext.to_be_bytes());
    out
}

fn cut(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

fn pad(text: &[u8], width: usize) -> Vec<u8> {
    let mut v = text[..text.len().min(width)].to_vec();
    v.resize(width, b' ');
    v
}

/// Standard INQUIRY data (SPC-4 6.6.2), 96 bytes with version descriptors.
fn standard_inquiry(unit: Unit) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = unit.peripheral();
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 96 - 5;
    d[7] = 0x02; // CMDQUE: the initiator may queue
    d[8..16].copy_from_slice(VENDOR);
    let product: &[u8] = if unit == Unit::Controller {
        b"CONTROLLER"
    } else {
        b"VOLUME"
    };
    d[16..32].copy_from_slice(&pad(product, 16));
    d[32..36].copy_from_slice(REVISION);
    // SAM-5, iSCSI, SPC-4, and SBC-3 for the disk.
    let mut versions = vec![0x00A0u16, 0x0960, 0x0460];
    if unit == Unit::Disk {
        versions.push(0x04C0);
    }
    for (i, v) in versions.into_iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn vpd_page(unit: Unit, code: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![unit.peripheral(), code];
    p.extend(
        u16::try_from(body.len())
            .expect("VPD pages are small")
            .to_be_bytes(),
    );
    p.extend_from_slice(body);
    p
}

fn supported_vpd_pages(unit: Unit) -> &'static [u8] {
    match unit {
        Unit::Disk => &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2],
        _ => &[0x00, 0x83],
    }
}

fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    out.extend([
        proto_codeset,
        piv_assoc_type,
        0,
        u8::try_from(value.len()).expect("designators are capped below 256 bytes"),
    ]);
    out.extend_from_slice(value);
}

/// Device identification (SPC-4 7.8.6): for the disk an NAA and a T10
/// vendor designator of the logical unit; for both units the relative port
/// and the target's SCSI name string.
fn device_identification(unit: Unit, id: &Identity) -> Vec<u8> {
    let mut body = Vec::new();
    if unit == Unit::Disk {
        designator(&mut body, 0x01, 0x03, &id.naa);
        let mut t10 = VENDOR.to_vec();
        t10.extend_from_slice(id.serial.as_bytes());
        designator(&mut body, 0x02, 0x01, &t10);
    }
    // iSCSI, binary; PIV, target port, relative target port 1.
    designator(&mut body, 0x51, 0x94, &[0, 0, 0, 1]);
    // iSCSI, UTF-8; PIV, target device, SCSI name string: null-terminated
    // and padded to a multiple of four.
    let mut name = id.target.as_bytes()[..id.target.len().min(MAX_NAME_STRING_BYTES - 4)].to_vec();
    name.push(0);
    name.resize(name.len().next_multiple_of(4), 0);
    designator(&mut body, 0x53, 0xA8, &name);
    vpd_page(unit, 0x83, &body)
}

/// Block limits (SBC-4 6.6.3).
fn block_limits() -> Vec<u8> {
    let mut b = vec![0u8; 60];
    b[0] = 0x01; // WSNZ: WRITE SAME needs a block count
    b[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
    b[2..4].copy_from_slice(&OPTIMAL_GRANULARITY_BLOCKS.to_be_bytes());
    b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
    b[8..12].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
    b[12..16].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes()); // prefetch
    b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    b[24..28].copy_from_slice(&u32::from(OPTIMAL_GRANULARITY_BLOCKS).to_be_bytes());
    b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    vpd_page(Unit::Disk, 0xB0, &b)
}

/// Block device characteristics (SBC-4 6.6.2): not rotating.
fn block_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 60];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    vpd_page(Unit::Disk, 0xB1, &b)
}

/// Logical block provisioning (SBC-4 6.6.4): thin, unmapped blocks read
/// zero, and both UNMAP and WRITE SAME with UNMAP deallocate.
fn logical_block_provisioning() -> Vec<u8> {
    // LBPU, LBPWS, LBPWS10, LBPRZ=001b; provisioning type 2 (thin).
    vpd_page(Unit::Disk, 0xB2, &[0x00, 0xE4, 0x02, 0x00])
}

fn inquiry(unit: Unit, id: &Identity, evpd: bool, page: u8) -> Result<Vec<u8>, Sense> {
    if !evpd {
        return Ok(standard_inquiry(unit));
    }
    if unit == Unit::Absent {
        return Err(Sense::lun_not_supported());
    }
    if !supported_vpd_pages(unit).contains(&page) {
        return Err(Sense::invalid_field_in_cdb(2));
    }
    Ok(match page {
        0x00 => vpd_page(unit, 0x00, supported_vpd_pages(unit)),
        0x80 => vpd_page(unit, 0x80, id.serial.as_bytes()),
        0x83 => device_identification(unit, id),
        0xB0 => block_limits(),
        0xB1 => block_characteristics(),
        _ => logical_block_provisioning(),
    })
}

fn report_luns(select: u8) -> Vec<u8> {
    // SELECT REPORT 1 asks for well-known LUNs only; there are none.
    let luns: &[u8] = if select == 1 { &[] } else { &[0, 1] };
    let mut d = vec![0u8; 8];
    d[0..4].copy_from_slice(&(u32::try_from(luns.len() * 8).expect("two LUNs")).to_be_bytes());
    for &l in luns {
        // Single-level, peripheral device addressing.
        d.extend([0, l, 0, 0, 0, 0, 0, 0]);
    }
    d
}

fn read_capacity10(blocks: u64) -> Vec<u8> {
    let last = u32::try_from(blocks.saturating_sub(1)).unwrap_or(u32::MAX);
    let mut d = last.to_be_bytes().to_vec();
    d.extend(512u32.to_be_bytes());
    d
}

fn read_capacity16(blocks: u64) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&512u32.to_be_bytes());
    d[13] = PHYSICAL_EXPONENT;
    d[14] = 0xC0; // LBPME, LBPRZ; lowest aligned LBA 0
    d
}

/// GET LBA STATUS: the engine has no extent query, so the range from `lba`
/// to the end is reported as one mapped extent (SBC-4 allows reporting
/// deallocated blocks as mapped).
fn lba_status(lba: u64, blocks: u64) -> Vec<u8> {
    let mut d = vec![0u8; 24];
    d[0..4].copy_from_slice(&20u32.to_be_bytes());
    d[8..16].copy_from_slice(&lba.to_be_bytes());
    let count = u32::try_from(blocks - lba).unwrap_or(u32::MAX);
    d[16..20].copy_from_slice(&count.to_be_bytes());
    d
}

// Mode pages (SPC-4 7.5, SBC-4 6.5).

const MODE_PAGES: [u8; 3] = [0x08, 0x0A, 0x1C];

/// A mode page's current (= default) value, or its changeable mask: no
/// field is changeable.
fn mode_page(code: u8, changeable: bool) -> Vec<u8> {
    let mut p = match code {
        0x08 => vec![0u8; 20],
        _ => vec![0u8; 12],
    };
    p[0] = code;
    p[1] = u8::try_from(p.len() - 2).expect("short page");
    if changeable {
        return p;
    }
    match code {
        // Caching: WCE, since only SYNCHRONIZE CACHE or FUA makes a write
        // durable on every replica; RCD=0.
        0x08 => p[2] = 0x04,
        // Control: GLTSD (no log parameters are saved), D_SENSE=0, queue
        // algorithm modifier 1 (unrestricted reordering), QERR=0,
        // busy timeout unlimited.
        0x0A => {
            p[2] = 0x02;
            p[3] = 0x10;
            p[8] = 0xFF;
            p[9] = 0xFF;
        }
        // Informational exceptions: DEXCPT, none are reported.
        _ => p[2] = 0x08,
    }
    p
}

fn mode_sense(req: &ModeSenseCdb, blocks: u64) -> Result<Vec<u8>, Sense> {
    let pages: Vec<u8> = match (req.page, req.subpage) {
        (0x3F, 0x00 | 0xFF) => MODE_PAGES.to_vec(),
        (p, 0x00 | 0xFF) if MODE_PAGES.contains(&p) => vec![p],
        (p, _) if p == 0x3F || MODE_PAGES.contains(&p) => {
            return Err(Sense::invalid_field_in_cdb(3))
        }
        _ => return Err(Sense::invalid_field_in_cdb(2)),
    };
    let mut body = Vec::new();
    let long = req.ten && req.llbaa;
    if !req.dbd {
        if long {
            body.extend(blocks.to_be_bytes());
            body.extend([0u8; 4]);
            body.extend(512u32.to_be_bytes());
        } else {
            body.extend(u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            body.extend(512u32.to_be_bytes());
        }
    }
    let bd_len = body.len();
    for p in pages {
        body.extend(mode_page(p, req.pc == 1));
    }
    // Device-specific parameter: WP=0, DPOFUA=1.
    let mut d = if req.ten {
        let mut h = vec![0u8; 8];
        h[3] = 0x10;
        h[4] = u8::from(long && bd_len > 0);
        h[6..8].copy_from_slice(&u16::try_from(bd_len).expect("small").to_be_bytes());
        h
    } else {
        vec![0, 0, 0x10, u8::try_from(bd_len).expect("small")]
    };
    d.extend(body);
    if req.ten {
        let n = u16::try_from(d.len() - 2).expect("small");
        d[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        d[0] = u8::try_from(d.len() - 1).expect("small");
    }
    Ok(cut(d, req.alloc))
}

/// MODE SELECT: nothing is changeable, so a parameter list is accepted
/// only when it restates the current values.
fn mode_select(ten: bool, params: &[u8], blocks: u64) -> Result<(), Sense> {
    if params.is_empty() {
        return Ok(());
    }
    let header = if ten { 8 } else { 4 };
    if params.len() < header {
        return Err(Sense::parameter_list_length_error());
    }
    let (bd_len, long) = if ten {
        (usize::from(be16(params, 6)), params[4] & 0x01 != 0)
    } else {
        (usize::from(params[3]), false)
    };
    let descriptor = if long { 16 } else { 8 };
    if bd_len % descriptor != 0 {
        let at = if ten { 6 } else { 3 };
        return Err(Sense::invalid_field_in_parameter_list(at));
    }
    if params.len() < header + bd_len {
        return Err(Sense::parameter_list_length_error());
    }
    let mut at = header;
    while at < header + bd_len {
        let d = &params[at..at + descriptor];
        let (count, len) = if long {
            (be64(d, 0), be32(d, 12))
        } else {
            (u64::from(be32(d, 0)), be32(d, 4) & 0x00FF_FFFF)
        };
        if len != 512 {
            return Err(Sense::invalid_field_in_parameter_list(at + descriptor - 3));
        }
        if count != 0 && count != blocks.min(if long { u64::MAX } else { 0xFFFF_FFFF }) {
            return Err(Sense::invalid_field_in_parameter_list(at));
        }
        at += descriptor;
    }
    while at < params.len() {
        if params.len() < at + 2 {
            return Err(Sense::parameter_list_length_error());
        }
        let code = params[at] & 0x3F;
        // SPF: no subpages exist.
        if params[at] & 0x40 != 0 || !MODE_PAGES.contains(&code) {
            return Err(Sense::invalid_field_in_parameter_list(at));
        }
        let len = usize::from(params[at + 1]);
        if params.len() < at + 2 + len {
            return Err(Sense::parameter_list_length_error());
        }
        let current = mode_page(code, false);
        if len != current.len() - 2 {
            return Err(Sense::invalid_field_in_parameter_list(at + 1));
        }
        let given = &params[at + 2..at + 2 + len];
        if let Some(i) = first_difference(given, &current[2..]) {
            return Err(Sense::invalid_field_in_parameter_list(at + 2 + i));
        }
        at += 2 + len;
    }
    Ok(())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// UNMAP parameter list (SBC-4 5.31.2) to (LBA, blocks) ranges.
fn parse_unmap(params: &[u8]) -> Result<Vec<(u64, u32)>, Sense> {
    // A zero PARAMETER LIST LENGTH is not an error: nothing to unmap.
    if params.is_empty() {
        return Ok(Vec::new());
    }
    if params.len() < 8 {
        return Err(Sense::parameter_list_length_error());
    }
    let desc_len = usize::from(be16(params, 2));
    if desc_len > params.len() - 8 {
        return Err(Sense::parameter_list_length_error());
    }
    // A length that is not a multiple of 16 has its tail ignored.
    let count = desc_len / 16;
    if count > to_usize(MAX_UNMAP_DESCRIPTORS) {
        return Err(Sense::invalid_field_in_parameter_list(2));
    }
    let mut ranges = Vec::with_capacity(count);
    let mut total = 0u64;
    for i in 0..count {
        let d = &params[8 + 16 * i..8 + 16 * (i + 1)];
        let blocks = be32(d, 8);
        total += u64::from(blocks);
        if total > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::invalid_field_in_parameter_list(8 + 16 * i + 8));
        }
        ranges.push((be64(d, 0), blocks));
    }
    Ok(ranges)
}

// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).

/// One implemented command: opcode, service action, and the CDB usage
/// map (first byte the opcode, service action bits as the value, other
/// bits set where the unit looks at them).
struct OpInfo {
    sa: Option<u8>,
    usage: &'static [u8],
}

const FF: u8 = 0xFF;

/// Implemented commands of the disk, ordered by opcode and service action.
#[rustfmt::skip]
const SUPPORTED: &[OpInfo] = &[
    OpInfo { sa: None, usage: &[0x00, 0, 0, 0, 0, 0] },
    OpInfo { sa: None, usage: &[0x03, 0x01, 0, 0, FF, 0] },
    OpInfo { sa: None, usage: &[0x08, 0x1F, FF, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x0A, 0x1F, FF, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x12, 0x01, FF, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x15, 0x11, 0, 0, FF, 0] },
    OpInfo { sa: None, usage: &[0x16, 0, 0, 0, 0, 0] },
    OpInfo { sa: None, usage: &[0x17, 0, 0, 0, 0, 0] },
    OpInfo { sa: None, usage: &[0x1A, 0x08, FF, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x1B, 0x01, 0, 0x0F, 0xF7, 0] },
    OpInfo { sa: None, usage: &[0x1E, 0, 0, 0, 0x03, 0] },
    OpInfo { sa: None, usage: &[0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, 0] },
    OpInfo { sa: None, usage: &[0x28, 0xF8, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x2A, 0xF8, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x2E, 0xF6, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x2F, 0xF6, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x34, 0x02, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x35, 0x02, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x41, 0xFE, FF, FF, FF, FF, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x42, 0x01, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x5A, 0x18, FF, FF, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: Some(0), usage: &[0x5E, 0x00, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: Some(1), usage: &[0x5E, 0x01, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: Some(2), usage: &[0x5E, 0x02, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { sa: Some(0), usage: &[0x5F, 0x00, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(1), usage: &[0x5F, 0x01, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(2), usage: &[0x5F, 0x02, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(3), usage: &[0x5F, 0x03, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(4), usage: &[0x5F, 0x04, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(5), usage: &[0x5F, 0x05, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: Some(6), usage: &[0x5F, 0x06, FF, 0, 0, FF, FF, FF, FF, 0] },
    OpInfo { sa: None, usage: &[0x88, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x89, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x8A, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x8E, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x8F, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0x93, 0xFF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: Some(0x10), usage: &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: Some(0x12), usage: &[0x9E, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0xA0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: Some(0x0C), usage: &[0xA3, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0xA8, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0xAA, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0xAE, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
    OpInfo { sa: None, usage: &[0xAF, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0] },
];

/// A command timeouts descriptor saying "no timeout specified".
const TIMEOUTS: [u8; 12] = [0, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn report_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    if options == 0 {
        let mut d = vec![0u8; 4];
        for info in SUPPORTED {
            let len = u16::try_from(info.usage.len()).expect("short");
            let flags = u8::from(info.sa.is_some()) | if rctd { 0x02 } else { 0 };
            d.extend([info.usage[0], 0, 0, info.sa.unwrap_or(0), 0, flags]);
            d.extend(len.to_be_bytes());
            if rctd {
                d.extend(TIMEOUTS);
            }
        }
        let n = u32::try_from(d.len() - 4).expect("small");
        d[0..4].copy_from_slice(&n.to_be_bytes());
        return Ok(d);
    }
    let has_sa = SUPPORTED
        .iter()
        .any(|i| i.usage[0] == opcode && i.sa.is_some());
    let known = SUPPORTED.iter().any(|i| i.usage[0] == opcode);
    // Option 1 names an opcode without service actions, option 2 one with.
    if known && (options == 1) == has_sa {
        return Err(Sense::invalid_field_in_cdb(2));
    }
    let found = SUPPORTED
        .iter()
        .find(|i| i.usage[0] == opcode && (options == 1 || i.sa.map(u16::from) == Some(sa)));
    let Some(info) = found else {
        // SUPPORT 001b: not supported.
        return Ok(vec![0, 0x01, 0, 0]);
    };
    let len = u16::try_from(info.usage.len()).expect("short");
    let mut d = vec![0, 0x03 | if rctd { 0x80 } else { 0 }];
    d.extend(len.to_be_bytes());
    d.extend_from_slice(info.usage);
    if rctd {
        d.extend(TIMEOUTS);
    }
    Ok(d)
}

/// Data-out bytes a CDB announces, parsed leniently: even a CDB the unit
/// will refuse may come with data the transport has to drain.
fn data_out_bytes(cdb: &[u8]) -> u64 {
    use op::*;
    let Some(&opcode) = cdb.first() else {
        return 0;
    };
    if cdb_len(opcode).is_none_or(|n| cdb.len() < n) {
        return 0;
    }
    match opcode {
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10 | WRITE_VERIFY_12
        | WRITE_VERIFY_16 => {
            u64::from(lba_and_len(&cdb[..cdb_len(opcode).unwrap_or(6)]).1) * BLOCK_BYTES
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            let n = cdb_len(opcode).unwrap_or(10);
            match (cdb[1] >> 1) & 0x03 {
                1 => u64::from(lba_and_len(&cdb[..n]).1) * BLOCK_BYTES,
                3 => BLOCK_BYTES,
                _ => 0,
            }
        }
        WRITE_SAME_10 => BLOCK_BYTES,
        WRITE_SAME_16 => {
            if cdb[1] & 0x01 != 0 {
                0
            } else {
                BLOCK_BYTES
            }
        }
        COMPARE_AND_WRITE => 2 * u64::from(cdb[13]) * BLOCK_BYTES,
        UNMAP | MODE_SELECT_10 => u64::from(be16(cdb, 7)),
        MODE_SELECT_6 => u64::from(cdb[4]),
        PR_OUT => u64::from(be32(cdb, 5)),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Reservations (pure state machine)

/// Persistent reservation types (SPC-4 6.16.2, table 171).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 3,
            Self::WriteExclusiveRegistrantsOnly => 5,
            Self::ExclusiveAccessRegistrantsOnly => 6,
            Self::WriteExclusiveAllRegistrants => 7,
            Self::ExclusiveAccessAllRegistrants => 8,
        }
    }

    fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants share access (the Registrants Only and All Registrants
    /// types).
    fn registrants_allowed(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Persistent {
    /// The nexus that reserved; for the All Registrants types every
    /// registrant holds the reservation and this is only informative.
    holder: String,
    kind: PrType,
}

/// A unit attention for another nexus, produced by a reservation change.
type Notice = (String, (u8, u8));

/// SPC-2 and persistent reservation state of the disk, kept in memory
/// only (APTPL is refused).
#[derive(Debug, Default)]
struct Reservations {
    /// The nexus holding a RESERVE(6) reservation.
    legacy: Option<String>,
    generation: u32,
    keys: BTreeMap<String, u64>,
    persistent: Option<Persistent>,
}

/// PERSISTENT RESERVE OUT service actions.
mod pr {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
}

impl Reservations {
    fn holds(&self, nexus: &str) -> bool {
        match &self.persistent {
            Some(p) if p.kind.all_registrants() => self.keys.contains_key(nexus),
            Some(p) => p.holder == nexus,
            None => false,
        }
    }

    /// Whether `access` from `nexus` conflicts with a reservation.
    fn conflicts(&self, nexus: &str, access: Access) -> bool {
        if let Some(h) = &self.legacy {
            if h != nexus && !matches!(access, Access::Free | Access::Release6) {
                return true;
            }
        }
        if matches!(access, Access::Reserve6 | Access::Release6) {
            // SPC-4 5.13.3: RESERVE/RELEASE(6) are refused while any
            // persistent registration or reservation exists.
            return !self.keys.is_empty() || self.persistent.is_some();
        }
        let Some(p) = &self.persistent else {
            return false;
        };
        if self.holds(nexus) {
            return false;
        }
        let registered_ok = p.kind.registrants_allowed() && self.keys.contains_key(nexus);
        match access {
            Access::Read => p.kind.exclusive_access() && !registered_ok,
            Access::Write => !registered_ok,
            _ => false,
        }
    }

    fn reserve6(&mut self, nexus: &str) -> Result<(), Refusal> {
        match &self.legacy {
            Some(h) if h != nexus => Err(Refusal::Conflict),
            _ => {
                self.legacy = Some(nexus.to_owned());
                Ok(())
            }
        }
    }

    fn release6(&mut self, nexus: &str) {
        if self.legacy.as_deref() == Some(nexus) {
            self.legacy = None;
        }
    }

    /// Every registrant other than `except`, for notices.
    fn others(&self, except: &str, ua: (u8, u8)) -> Vec<Notice> {
        self.keys
            .keys()
            .filter(|n| n.as_str() != except)
            .map(|n| (n.clone(), ua))
            .collect()
    }

    /// Drops `nexus`'s registration and the reservation it alone held.
    fn unregister(&mut self, nexus: &str) -> Vec<Notice> {
        self.keys.remove(nexus);
        let mut notices = Vec::new();
        if let Some(p) = self.persistent.clone() {
            if p.kind.all_registrants() {
                if self.keys.is_empty() {
                    self.persistent = None;
                }
            } else if p.holder == nexus {
                self.persistent = None;
                if p.kind.registrants_allowed() {
                    notices = self.others(nexus, UA_RESERVATIONS_RELEASED);
                }
            }
        }
        notices
    }

    /// Removes every registration with `key` except the preempting nexus;
    /// returns the removed nexuses.
    fn remove_key(&mut self, key: u64, except: &str) -> Vec<String> {
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(n, k)| **k == key && n.as_str() != except)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            self.keys.remove(n);
        }
        gone
    }

    /// PERSISTENT RESERVE OUT (SPC-4 5.13.4-5.13.11); returns the unit
    /// attentions to queue for other nexuses.
    fn pr_out(
        &mut self,
        nexus: &str,
        action: u8,
        scope: u8,
        kind: u8,
        params: &[u8],
    ) -> Result<Vec<Notice>, Refusal> {
        if params.len() != 24 {
            return Err(Sense::parameter_list_length_error().into());
        }
        let key = be64(params, 0);
        let sa_key = be64(params, 8);
        let flags = params[20];
        // SPEC_I_PT is not offered (SIP_C=0), nor persistence (PTPL_C=0).
        // ALL_TG_PT is harmless: there is one target port.
        if flags & 0x08 != 0 || flags & 0x01 != 0 {
            return Err(Sense::invalid_field_in_parameter_list(20).into());
        }
        let registered = self.keys.get(nexus).copied();
        match action {
            pr::REGISTER | pr::REGISTER_AND_IGNORE => {
                if action == pr::REGISTER && registered.unwrap_or(0) != key {
                    return Err(Refusal::Conflict);
                }
                let notices = if sa_key == 0 {
                    if registered.is_none() {
                        return Ok(Vec::new());
                    }
                    self.unregister(nexus)
                } else {
                    self.keys.insert(nexus.to_owned(), sa_key);
                    Vec::new()
                };
                self.generation = self.generation.wrapping_add(1);
                return Ok(notices);
            }
            _ => {}
        }
        if registered != Some(key) {
            return Err(Refusal::Conflict);
        }
        let typed = || -> Result<PrType, Refusal> {
            if scope != 0 {
                return Err(Sense::invalid_field_in_cdb(2).into());
            }
            PrType::from_code(kind).ok_or(Sense::invalid_field_in_cdb(2).into())
        };
        match action {
            pr::RESERVE => {
                let kind = typed()?;
                match &self.persistent {
                    Some(p) if self.holds(nexus) && p.kind == kind => Ok(Vec::new()),
                    Some(_) => Err(Refusal::Conflict),
                    None => {
                        self.persistent = Some(Persistent {
                            holder: nexus.to_owned(),
                            kind,
                        });
                        Ok(Vec::new())
                    }
                }
            }
            pr::RELEASE => {
                let Some(p) = self.persistent.clone() else {
                    return Ok(Vec::new());
                };
                if !self.holds(nexus) {
                    return Ok(Vec::new());
                }
                if scope != 0 || kind != p.kind.code() {
                    return Err(Sense::invalid_release_of_persistent_reservation().into());
                }
                self.persistent = None;
                Ok(if p.kind.registrants_allowed() {
                    self.others(nexus, UA_RESERVATIONS_RELEASED)
                } else {
                    Vec::new()
                })
            }
            pr::CLEAR => {
                let notices = self.others(nexus, UA_RESERVATIONS_PREEMPTED);
                self.keys.clear();
                self.persistent = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(notices)
            }
            pr::PREEMPT | pr::PREEMPT_AND_ABORT => {
                let kind = typed()?;
                let gone = match self.persistent.clone() {
                    Some(p) if p.kind.all_registrants() && sa_key == 0 => {
                        let gone: Vec<String> =
                            self.keys.keys().filter(|n| *n != nexus).cloned().collect();
                        self.keys.retain(|n, _| n == nexus);
                        self.persistent = Some(Persistent {
                            holder: nexus.to_owned(),
                            kind,
                        });
                        gone
                    }
                    Some(p)
                        if !p.kind.all_registrants()
                            && self.keys.get(&p.holder) == Some(&sa_key) =>
                    {
                        let gone = self.remove_key(sa_key, nexus);
                        self.persistent = Some(Persistent {
                            holder: nexus.to_owned(),
                            kind,
                        });
                        gone
                    }
                    _ => {
                        if sa_key == 0 {
                            return Err(Sense::invalid_field_in_parameter_list(8).into());
                        }
                        let gone = self.remove_key(sa_key, nexus);
                        if gone.is_empty() {
                            return Err(Refusal::Conflict);
                        }
                        gone
                    }
                };
                self.generation = self.generation.wrapping_add(1);
                Ok(gone
                    .into_iter()
                    .map(|n| (n, UA_REGISTRATIONS_PREEMPTED))
                    .collect())
            }
            _ => Err(Sense::invalid_field_in_cdb(1).into()),
        }
    }

    /// PERSISTENT RESERVE IN (SPC-4 6.15).
    fn pr_in(&self, action: u8) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match action {
            0 => {
                let n = u32::try_from(self.keys.len() * 8).unwrap_or(u32::MAX);
                d.extend(n.to_be_bytes());
                for k in self.keys.values() {
                    d.extend(k.to_be_bytes());
                }
            }
            1 => match &self.persistent {
                None => d.extend(0u32.to_be_bytes()),
                Some(p) => {
                    d.extend(16u32.to_be_bytes());
                    let key = if p.kind.all_registrants() {
                        0
                    } else {
                        self.keys.get(&p.holder).copied().unwrap_or(0)
                    };
                    d.extend(key.to_be_bytes());
                    d.extend([0, 0, 0, 0, 0, p.kind.code(), 0, 0]);
                }
            },
            2 => {
                // REPORT CAPABILITIES: CRH, ATP_C; TMV with every type.
                d = vec![0, 8, 0x14, 0x80, 0xEA, 0x01, 0, 0];
            }
            _ => {
                // READ FULL STATUS (SPC-4 6.14.5): one descriptor per
                // registrant, naming its I_T nexus by an iSCSI TransportID
                // of the initiator-port form ("name,i,0xISID").
                let mut body = Vec::new();
                for (nexus, key) in &self.keys {
                    let holder = self
                        .persistent
                        .as_ref()
                        .filter(|p| p.kind.all_registrants() || &p.holder == nexus);
                    let mut id = nexus.as_bytes().to_vec();
                    id.push(0);
                    id.resize((id.len() + 4).next_multiple_of(4).max(24) - 4, 0);
                    body.extend(key.to_be_bytes());
                    body.extend([0u8; 4]);
                    body.push(u8::from(holder.is_some()));
                    body.push(holder.map_or(0, |p| p.kind.code()));
                    body.extend([0u8; 4]);
                    body.extend(1u16.to_be_bytes());
                    let tid_len = u32::try_from(id.len() + 4).unwrap_or(u32::MAX);
                    body.extend(tid_len.to_be_bytes());
                    // Format 01b (with ISID), protocol 5 (iSCSI).
                    body.extend([0x45, 0]);
                    body.extend(u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
                    body.extend(id);
                }
                d.extend(u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
                d.extend(body);
            }
        }
        d
    }
}

// ---------------------------------------------------------------------------
// The logical units

/// Per-nexus state: pending unit attentions of LUN 0 and LUN 1.
type Attentions = [VecDeque<(u8, u8)>; 2];

#[derive(Debug, Default)]
struct State {
    nexuses: HashMap<String, Attentions>,
    reservations: Reservations,
}

impl State {
    fn queue(&mut self, nexus: &str, unit: usize, ua: (u8, u8)) {
        if let Some(q) = self.nexuses.get_mut(nexus) {
            if !q[unit].contains(&ua) {
                q[unit].push_back(ua);
            }
        }
    }

    fn take_attention(&mut self, nexus: &str, unit: usize) -> Option<(u8, u8)> {
        self.nexuses.get_mut(nexus)?[unit].pop_front()
    }
}

/// Engine operations, for mapping their failures to sense data.
#[derive(Debug, Clone, Copy)]
enum Io {
    Read,
    Write,
    Unmap,
    Flush,
}

/// The one place engine failures become sense data.
fn engine_sense(io: Io, err: &engine::Error) -> Sense {
    warn!(error = %err, op = ?io, "volume I/O failed");
    if err.kind() == ErrorKind::Unavailable {
        return Sense::internal_target_failure();
    }
    match io {
        Io::Read => Sense::unrecovered_read_error(),
        Io::Write | Io::Unmap | Io::Flush => Sense::write_error(),
    }
}

fn bytes_of(blocks: u64) -> usize {
    usize::try_from(blocks * BLOCK_BYTES).expect("bounded transfer lengths fit memory")
}

/// The logical units the target exports: LUN 0, a storage-array controller
/// (peripheral type 0Ch) that answers INQUIRY, REPORT LUNS, TEST UNIT
/// READY and REQUEST SENSE; and LUN 1, the volume.
#[derive(Debug)]
pub struct LogicalUnits {
    volume: Volume,
    id: Identity,
    /// The size last reported, to raise CAPACITY DATA HAS CHANGED once
    /// after an online expand.
    reported_size: AtomicU64,
    state: Mutex<State>,
    /// Shared by writes, exclusive for COMPARE AND WRITE.
    atomic: tokio::sync::RwLock<()>,
}

impl LogicalUnits {
    /// `target_name` is the iSCSI target IQN (the SCSI name string of the
    /// device identification page); the volume's name gives the unit serial
    /// number and the NAA identifier.
    pub fn new(volume: Volume, target_name: &str) -> Self {
        let id = Identity::new(volume.name(), target_name);
        Self {
            reported_size: AtomicU64::new(volume.size()),
            volume,
            id,
            state: Mutex::new(State::default()),
            atomic: tokio::sync::RwLock::new(()),
        }
    }

    /// Data-out bytes the command in `cdb` will transfer according to its
    /// CDB; 0 for commands without data-out and unknown opcodes.
    pub fn data_out_len(cdb: &[u8]) -> u64 {
        data_out_bytes(cdb)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one command for the I_T nexus `nexus` on `lun` (the plain LUN
    /// number, 0 or 1 for units that exist) with the data-out the initiator
    /// sent. Pass all the data-out received: a short one is refused, and
    /// WRITE SAME also refuses a long one.
    pub async fn execute(&self, nexus: &str, lun: u64, cdb: &[u8], data_out: &[u8]) -> Response {
        let unit = Unit::of(lun);
        let cmd = match self.admit(nexus, unit, cdb) {
            Ok(cmd) => cmd,
            Err(r) => return r.into(),
        };
        let outcome = match unit {
            Unit::Disk => self.run_disk(nexus, cmd, data_out).await,
            _ => self.run_other(nexus, unit, cmd),
        };
        match outcome {
            Ok(data) => Response::good(data),
            Err(r) => r.into(),
        }
    }

    /// Everything before a command may run: nexus bookkeeping, the
    /// capacity check, unit attentions, decoding and reservation conflicts.
    fn admit(&self, nexus: &str, unit: Unit, cdb: &[u8]) -> Result<Command, Refusal> {
        let mut st = self.lock();
        st.nexuses.entry(nexus.to_owned()).or_default();
        let size = self.volume.size();
        if self.reported_size.swap(size, Ordering::SeqCst) != size {
            let all: Vec<String> = st.nexuses.keys().cloned().collect();
            for n in all {
                st.queue(&n, 1, UA_CAPACITY_CHANGED);
            }
        }
        let opcode = cdb.first().copied();
        let exempt = matches!(
            opcode,
            Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        );
        if !exempt {
            if unit == Unit::Absent {
                return Err(Sense::lun_not_supported().into());
            }
            if let Some(ua) = st.take_attention(nexus, unit.index()) {
                return Err(Sense::unit_attention(ua).into());
            }
        }
        let cmd = decode(cdb)?;
        match unit {
            Unit::Disk => {
                if st.reservations.conflicts(nexus, cmd.access()) {
                    return Err(Refusal::Conflict);
                }
            }
            _ => {
                if !matches!(
                    cmd,
                    Command::Inquiry { .. }
                        | Command::ReportLuns { .. }
                        | Command::TestUnitReady
                        | Command::RequestSense { .. }
                ) {
                    return Err(Sense::invalid_opcode().into());
                }
            }
        }
        Ok(cmd)
    }

    /// The commands of LUN 0 and of LUNs that do not exist; `admit` let
    /// only these four through.
    fn run_other(&self, nexus: &str, unit: Unit, cmd: Command) -> Outcome {
        match cmd {
            Command::Inquiry { evpd, page, alloc } => {
                Ok(cut(inquiry(unit, &self.id, evpd, page)?, alloc))
            }
            Command::ReportLuns { select, alloc } => Ok(cut(report_luns(select), alloc)),
            Command::RequestSense { desc, alloc } => {
                let sense = if unit == Unit::Absent {
                    Sense::lun_not_supported()
                } else {
                    self.lock()
                        .take_attention(nexus, unit.index())
                        .map_or(Sense::no_sense(), Sense::unit_attention)
                };
                Ok(cut(sense_data(&sense, desc), alloc))
            }
            _ => Ok(Vec::new()),
        }
    }

    fn blocks(&self) -> u64 {
        self.volume.size() / BLOCK_BYTES
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    async fn run_disk(&self, nexus: &str, cmd: Command, data_out: &[u8]) -> Outcome {
        match cmd {
            Command::TestUnitReady | Command::StartStopUnit | Command::AllowMediumRemoval => {
                Ok(Vec::new())
            }
            Command::Inquiry { evpd, page, alloc } => {
                Ok(cut(inquiry(Unit::Disk, &self.id, evpd, page)?, alloc))
            }
            Command::ReportLuns { select, alloc } => Ok(cut(report_luns(select), alloc)),
            Command::RequestSense { desc, alloc } => {
                let sense = self
                    .lock()
                    .take_attention(nexus, Unit::Disk.index())
                    .map_or(Sense::no_sense(), Sense::unit_attention);
                Ok(cut(sense_data(&sense, desc), alloc))
            }
            Command::ReadCapacity10 => Ok(read_capacity10(self.blocks())),
            Command::ReadCapacity16 { alloc } => Ok(cut(read_capacity16(self.blocks()), alloc)),
            Command::GetLbaStatus { lba, alloc } => {
                let blocks = self.blocks();
                if lba >= blocks {
                    return Err(Sense::lba_out_of_range().into());
                }
                Ok(cut(lba_status(lba, blocks), alloc))
            }
            Command::Read { lba, blocks } => {
                self.check_range(lba, u64::from(blocks))?;
                Ok(self.read(lba, u64::from(blocks)).await?)
            }
            Command::Write { lba, blocks, fua } => {
                self.check_range(lba, u64::from(blocks))?;
                // The transport may deliver less than the CDB asks when the
                // initiator expected a shorter transfer (RFC 7143 §11.4.5.2:
                // it reports the residual overflow). The blocks that arrived
                // whole are written; the rest are not touched.
                let whole = (data_out.len() / BLOCK_USIZE).min(blocks as usize);
                let data = &data_out[..whole * BLOCK_USIZE];
                if whole > 0 {
                    let _shared = self.atomic.read().await;
                    self.write(lba, data).await?;
                }
                if fua && whole > 0 {
                    self.flush().await?;
                }
                Ok(Vec::new())
            }
            Command::Verify { lba, blocks, check } => {
                self.check_range(lba, u64::from(blocks))?;
                self.verify(lba, blocks, check, data_out).await
            }
            Command::PreFetch { lba, blocks } => {
                self.check_range(lba, u64::from(blocks))?;
                Ok(Vec::new())
            }
            Command::SyncCache { lba, blocks } => {
                self.check_range(lba, u64::from(blocks))?;
                self.flush().await?;
                Ok(Vec::new())
            }
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
                len_at,
            } => {
                self.write_same(lba, blocks, unmap, ndob, len_at, data_out)
                    .await
            }
            Command::Unmap { param_len } => {
                let ranges = parse_unmap(take_params(data_out, param_len)?)?;
                for &(lba, blocks) in &ranges {
                    self.check_range(lba, u64::from(blocks))?;
                }
                let _shared = self.atomic.read().await;
                for (lba, blocks) in ranges {
                    self.unmap(lba, u64::from(blocks)).await?;
                }
                Ok(Vec::new())
            }
            Command::CompareAndWrite { lba, blocks, fua } => {
                self.compare_and_write(lba, blocks, fua, data_out).await
            }
            Command::ModeSense(req) => Ok(mode_sense(&req, self.blocks())?),
            Command::ModeSelect { ten, param_len } => {
                mode_select(ten, take_params(data_out, param_len)?, self.blocks())?;
                Ok(Vec::new())
            }
            Command::Reserve6 => {
                self.lock().reservations.reserve6(nexus)?;
                Ok(Vec::new())
            }
            Command::Release6 => {
                self.lock().reservations.release6(nexus);
                Ok(Vec::new())
            }
            Command::PrIn { action, alloc } => {
                Ok(cut(self.lock().reservations.pr_in(action), alloc))
            }
            Command::PrOut {
                action,
                scope,
                kind,
                param_len,
            } => {
                let params = take_params(data_out, param_len)?;
                let mut st = self.lock();
                let notices = st.reservations.pr_out(nexus, action, scope, kind, params)?;
                for (n, ua) in notices {
                    st.queue(&n, Unit::Disk.index(), ua);
                }
                Ok(Vec::new())
            }
            Command::ReportOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => Ok(cut(report_opcodes(rctd, options, opcode, sa)?, alloc)),
        }
    }

    async fn verify(&self, lba: u64, blocks: u32, check: ByteCheck, data_out: &[u8]) -> Outcome {
        if check == ByteCheck::None || blocks == 0 {
            return Ok(Vec::new());
        }
        let expected = match check {
            ByteCheck::Same => take_data(data_out, BLOCK_USIZE)?,
            _ => take_data(data_out, bytes_of(u64::from(blocks)))?,
        };
        // Same-block checks can cover more blocks than one transfer: read
        // them a request at a time.
        let mut at = 0u64;
        for (offset, len) in pieces(lba * BLOCK_BYTES, u64::from(blocks) * BLOCK_BYTES) {
            let got = self.read(offset / BLOCK_BYTES, len / BLOCK_BYTES).await?;
            let diff = match check {
                ByteCheck::Same => got
                    .chunks(BLOCK_USIZE)
                    .enumerate()
                    .find_map(|(i, b)| first_difference(b, expected).map(|d| (i, d)))
                    .map(|(i, d)| i * BLOCK_USIZE + d),
                _ => {
                    let from = usize::try_from(at).expect("bounded");
                    first_difference(&got, &expected[from..from + got.len()])
                }
            };
            if let Some(d) = diff {
                let offset = at + u64::try_from(d).expect("bounded");
                return Err(Sense::miscompare(u32::try_from(offset).unwrap_or(u32::MAX)).into());
            }
            at += len;
        }
        Ok(Vec::new())
    }

    async fn write_same(
        &self,
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
        len_at: usize,
        data_out: &[u8],
    ) -> Outcome {
        let blocks = u64::from(blocks);
        // Range first: an LBA past the end is reported even with zero blocks.
        self.check_range(lba, blocks)?;
        // WSNZ=1: a count of zero ("to the end of the medium") is refused.
        if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(Sense::invalid_field_in_cdb(len_at).into());
        }
        let block: Vec<u8> = if ndob {
            vec![0; BLOCK_USIZE]
        } else {
            // Exactly one block: a longer data-out means the initiator and
            // the CDB disagree about what is being written.
            if data_out.len() != BLOCK_USIZE {
                return Err(Sense::data_out_mismatch().into());
            }
            data_out.to_vec()
        };
        let _shared = self.atomic.read().await;
        if unmap && block.iter().all(|&b| b == 0) {
            // LBPRZ=1: unmapped blocks read as the zeros asked for.
            self.unmap(lba, blocks).await?;
            return Ok(Vec::new());
        }
        let per_piece = MAX_REQUEST_BYTES / BLOCK_BYTES;
        let pattern = Bytes::from(block.repeat(bytes_of(blocks.min(per_piece)) / BLOCK_USIZE));
        for (offset, len) in pieces(lba * BLOCK_BYTES, blocks * BLOCK_BYTES) {
            let len = usize::try_from(len).expect("one request");
            self.volume
                .write(offset, pattern.slice(..len))
                .await
                .map_err(|e| engine_sense(Io::Write, &e))?;
        }
        Ok(Vec::new())
    }

    async fn compare_and_write(&self, lba: u64, blocks: u8, fua: bool, data_out: &[u8]) -> Outcome {
        let blocks = u64::from(blocks);
        self.check_range(lba, blocks)?;
        let len = bytes_of(blocks);
        // The data-out must be exactly the verify and write data: with
        // any other length the initiator and the CDB disagree (a count of
        // 256 wraps to 0 in this one-byte field, for one).
        if data_out.len() != 2 * len {
            return Err(Sense::invalid_field_in_cdb(13).into());
        }
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let data = data_out;
        let (expected, new) = data.split_at(len);
        let _exclusive = self.atomic.write().await;
        let current = self.read(lba, blocks).await?;
        if let Some(d) = first_difference(&current, expected) {
            let offset = u32::try_from(d).expect("CAW is at most 128 blocks");
            return Err(Sense::miscompare(offset).into());
        }
        self.write(lba, new).await?;
        if fua {
            self.flush().await?;
        }
        Ok(Vec::new())
    }

    async fn read(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, Sense> {
        let mut out = Vec::with_capacity(bytes_of(blocks));
        for (offset, len) in pieces(lba * BLOCK_BYTES, blocks * BLOCK_BYTES) {
            let data = self
                .volume
                .read(offset, len)
                .await
                .map_err(|e| engine_sense(Io::Read, &e))?;
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    async fn write(&self, lba: u64, data: &[u8]) -> Result<(), Sense> {
        let data = Bytes::copy_from_slice(data);
        let len = u64::try_from(data.len()).expect("usize fits u64");
        for (offset, n) in pieces(lba * BLOCK_BYTES, len) {
            let from = usize::try_from(offset - lba * BLOCK_BYTES).expect("bounded");
            let to = from + usize::try_from(n).expect("one request");
            self.volume
                .write(offset, data.slice(from..to))
                .await
                .map_err(|e| engine_sense(Io::Write, &e))?;
        }
        Ok(())
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        for (offset, len) in pieces(lba * BLOCK_BYTES, blocks * BLOCK_BYTES) {
            self.volume
                .unmap(offset, len)
                .await
                .map_err(|e| engine_sense(Io::Unmap, &e))?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), Sense> {
        self.volume
            .flush()
            .await
            .map_err(|e| engine_sense(Io::Flush, &e))
    }

    /// LOGICAL UNIT RESET task management: clears the SPC-2 reservation
    /// (persistent ones survive resets, SPC-4 5.13.1) and raises POWER ON,
    /// RESET, OR BUS DEVICE RESET OCCURRED for every other nexus.
    pub fn reset(&self, lun: u64, nexus: &str) {
        let unit = Unit::of(lun);
        if unit == Unit::Absent {
            return;
        }
        let mut st = self.lock();
        if unit == Unit::Disk {
            st.reservations.legacy = None;
        }
        let others: Vec<String> = st
            .nexuses
            .keys()
            .filter(|n| n.as_str() != nexus)
            .cloned()
            .collect();
        for n in others {
            st.queue(&n, unit.index(), UA_RESET);
        }
    }

    /// A nexus went away (session closed): forget its unit attentions and
    /// release its RESERVE(6) reservation. Persistent registrations stay:
    /// they outlive the nexus by design (SPC-4 5.13.4).
    pub fn nexus_gone(&self, nexus: &str) {
        let mut st = self.lock();
        st.nexuses.remove(nexus);
        st.reservations.release6(nexus);
    }
}

fn sense_data(sense: &Sense, desc: bool) -> Vec<u8> {
    if desc {
        sense.to_descriptor()
    } else {
        sense.to_fixed()
    }
}

/// The write data a command needs, refusing a short data-out.
fn take_data(data_out: &[u8], need: usize) -> Result<&[u8], Sense> {
    data_out.get(..need).ok_or(Sense::data_out_mismatch())
}

/// A parameter list of `len` bytes (SPC-4: less than announced is a
/// PARAMETER LIST LENGTH ERROR).
fn take_params(data_out: &[u8], len: usize) -> Result<&[u8], Sense> {
    data_out
        .get(..len)
        .ok_or(Sense::parameter_list_length_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: &str = "iqn.2026-01.test:a,i,0x230000000001";
    const M: &str = "iqn.2026-01.test:b,i,0x230000000002";

    fn cdb10(opcode: u8, flags: u8, lba: u32, len: u16) -> Vec<u8> {
        let mut c = vec![0u8; 10];
        c[0] = opcode;
        c[1] = flags;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn cdb16(opcode: u8, flags: u8, lba: u64, len: u32) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = opcode;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn identity() -> Identity {
        Identity::new("pvc-1234", "iqn.2026-11.io.shorthorn:pvc-1234")
    }

    // --- sense

    // SPC-4 4.5.3: fixed format, response code 70h, additional length 10.
    #[test]
    fn spc4_4_5_3_lba_out_of_range_fixed_sense() {
        let s = Sense::lba_out_of_range().to_fixed();
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x21, 0x00));
        assert_eq!(s[15], 0, "no sense-key specific data");
    }

    #[test]
    fn spc4_4_5_2_4_invalid_field_points_at_cdb_byte() {
        let s = Sense::invalid_field_in_cdb(7).to_fixed();
        assert_eq!((s[2], s[12], s[13]), (0x05, 0x24, 0x00));
        assert_eq!(s[15], 0xC0, "SKSV and C/D");
        assert_eq!(&s[16..18], &[0, 7]);
        let p = Sense::invalid_field_in_parameter_list(20).to_fixed();
        assert_eq!((p[12], p[15], p[17]), (0x26, 0x80, 20));
    }

    #[test]
    fn spc4_invalid_opcode_sense() {
        let r = Response::check(Sense::invalid_opcode());
        assert_eq!(r.status, 0x02);
        assert_eq!((r.sense[2], r.sense[12], r.sense[13]), (0x05, 0x20, 0x00));
    }

    // SBC-4 5.3: MISCOMPARE with the offset of the first differing byte.
    #[test]
    fn sbc4_5_3_miscompare_sets_information() {
        let s = Sense::miscompare(0x1234).to_fixed();
        assert_eq!(s[0], 0xF0, "VALID bit");
        assert_eq!(s[2], 0x0E);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((s[12], s[13]), (0x1D, 0x00));
        let d = Sense::miscompare(5).to_descriptor();
        assert_eq!((d[0], d[1], d[2], d[7]), (0x72, 0x0E, 0x1D, 12));
    }

    // --- decoding

    // SBC-4 5.14: a TRANSFER LENGTH of 0 in READ(6)/WRITE(6) means 256.
    #[test]
    fn sbc4_5_14_read6_zero_length_means_256() {
        let c = decode(&[0x08, 0x1F, 0xFF, 0xFE, 0, 0]).unwrap();
        assert_eq!(
            c,
            Command::Read {
                lba: 0x1F_FFFE,
                blocks: 256
            }
        );
        let w = decode(&[0x0A, 0, 0, 9, 3, 0]).unwrap();
        assert_eq!(
            w,
            Command::Write {
                lba: 9,
                blocks: 3,
                fua: false
            }
        );
        assert_eq!(
            LogicalUnits::data_out_len(&[0x0A, 0, 0, 0, 0, 0]),
            256 * 512
        );
    }

    #[test]
    fn decode_read_write_10_12_16() {
        assert_eq!(
            decode(&cdb10(0x28, 0x18, 77, 8)).unwrap(),
            Command::Read { lba: 77, blocks: 8 }
        );
        assert_eq!(
            decode(&cdb10(0x2A, 0x08, 5, 1)).unwrap(),
            Command::Write {
                lba: 5,
                blocks: 1,
                fua: true
            }
        );
        let mut c12 = vec![0xA8, 0, 0, 0, 1, 0, 0, 0, 0, 4, 0, 0];
        assert_eq!(
            decode(&c12).unwrap(),
            Command::Read {
                lba: 256,
                blocks: 4
            }
        );
        c12[0] = 0xAA;
        assert_eq!(LogicalUnits::data_out_len(&c12), 4 * 512);
        assert_eq!(
            decode(&cdb16(0x88, 0, 1 << 40, 16)).unwrap(),
            Command::Read {
                lba: 1 << 40,
                blocks: 16
            }
        );
        assert_eq!(LogicalUnits::data_out_len(&cdb16(0x8A, 0, 0, 16)), 16 * 512);
        // Zero blocks decode (and later complete as a no-op).
        assert_eq!(
            decode(&cdb10(0x28, 0, 0, 0)).unwrap(),
            Command::Read { lba: 0, blocks: 0 }
        );
    }

    // SBC-4 5.16: RDPROTECT without protection information is refused.
    #[test]
    fn sbc4_5_16_rdprotect_is_invalid_field() {
        for op in [0x28u8, 0x2A, 0x2F, 0x41] {
            let e = decode(&cdb10(op, 0x20, 0, 1)).unwrap_err();
            assert_eq!(e, Sense::invalid_field_in_cdb(1), "opcode {op:#x}");
        }
        let e = decode(&cdb16(0x88, 0xE0, 0, 1)).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(1));
    }

    #[test]
    fn decode_transfer_over_limit_is_invalid_field() {
        let e = decode(&cdb16(0x88, 0, 0, MAX_TRANSFER_BLOCKS + 1)).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(10));
        assert!(decode(&cdb16(0x88, 0, 0, MAX_TRANSFER_BLOCKS)).is_ok());
    }

    #[test]
    fn decode_write_same_flags_and_data_out() {
        let c = decode(&cdb16(0x93, 0x09, 10, 100)).unwrap();
        assert_eq!(
            c,
            Command::WriteSame {
                lba: 10,
                blocks: 100,
                unmap: true,
                ndob: true,
                len_at: 10
            }
        );
        assert_eq!(LogicalUnits::data_out_len(&cdb16(0x93, 0x09, 10, 100)), 0);
        assert_eq!(LogicalUnits::data_out_len(&cdb16(0x93, 0x08, 10, 100)), 512);
        assert_eq!(LogicalUnits::data_out_len(&cdb10(0x41, 0, 10, 100)), 512);
        // ANCHOR, PBDATA, LBDATA.
        for flags in [0x10u8, 0x04, 0x02] {
            assert_eq!(
                decode(&cdb10(0x41, flags, 0, 1)).unwrap_err(),
                Sense::invalid_field_in_cdb(1)
            );
        }
    }

    #[test]
    fn decode_compare_and_write_and_verify() {
        let mut c = cdb16(0x89, 0x08, 3, 0);
        c[13] = 2;
        assert_eq!(
            decode(&c).unwrap(),
            Command::CompareAndWrite {
                lba: 3,
                blocks: 2,
                fua: true
            }
        );
        assert_eq!(LogicalUnits::data_out_len(&c), 2 * 2 * 512);
        c[13] = MAX_COMPARE_AND_WRITE_BLOCKS + 1;
        assert_eq!(decode(&c).unwrap_err(), Sense::invalid_field_in_cdb(13));
        assert_eq!(
            decode(&cdb10(0x2F, 0x02, 1, 4)).unwrap(),
            Command::Verify {
                lba: 1,
                blocks: 4,
                check: ByteCheck::Full
            }
        );
        assert_eq!(LogicalUnits::data_out_len(&cdb10(0x2F, 0x02, 1, 4)), 2048);
        assert_eq!(LogicalUnits::data_out_len(&cdb10(0x2F, 0x06, 1, 4)), 512);
        assert_eq!(LogicalUnits::data_out_len(&cdb10(0x2F, 0x00, 1, 4)), 0);
        assert!(decode(&cdb10(0x2F, 0x04, 1, 4)).is_err());
    }

    #[test]
    fn decode_parameter_list_commands() {
        let mut unmap = cdb10(0x42, 0, 0, 24);
        assert_eq!(decode(&unmap).unwrap(), Command::Unmap { param_len: 24 });
        assert_eq!(LogicalUnits::data_out_len(&unmap), 24);
        unmap[1] = 1;
        assert_eq!(decode(&unmap).unwrap_err(), Sense::invalid_field_in_cdb(1));
        let pr = [0x5F, 0x01, 0x03, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(LogicalUnits::data_out_len(&pr), 24);
        assert_eq!(
            decode(&pr).unwrap(),
            Command::PrOut {
                action: 1,
                scope: 0,
                kind: 3,
                param_len: 24
            }
        );
        assert_eq!(LogicalUnits::data_out_len(&[0x15, 0x10, 0, 0, 28, 0]), 28);
        assert_eq!(LogicalUnits::data_out_len(&[0x00, 0, 0, 0, 0, 0]), 0);
        assert_eq!(LogicalUnits::data_out_len(&[0xC7, 1, 2]), 0);
    }

    #[test]
    fn decode_unknown_and_truncated() {
        assert_eq!(decode(&[]).unwrap_err(), Sense::invalid_opcode());
        assert_eq!(decode(&[0xC0; 16]).unwrap_err(), Sense::invalid_opcode());
        assert_eq!(
            decode(&[0x28, 0, 0]).unwrap_err(),
            Sense::invalid_field_in_cdb(3)
        );
        assert_eq!(
            decode(&[0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err(),
            Sense::invalid_field_in_cdb(1)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(cdb in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = decode(&cdb);
            let _ = LogicalUnits::data_out_len(&cdb);
        }

        #[test]
        fn truncated_cdb_is_invalid_field_or_opcode(
            cdb in proptest::collection::vec(any::<u8>(), 1..32),
        ) {
            if let Some(need) = cdb_len(cdb[0]) {
                let short = &cdb[..cdb.len().min(need - 1)];
                let e = decode(short).unwrap_err();
                prop_assert_eq!(e, Sense::invalid_field_in_cdb(short.len()));
            } else {
                prop_assert_eq!(decode(&cdb).unwrap_err(), Sense::invalid_opcode());
            }
        }
    }

    // --- INQUIRY

    // SPC-4 6.6.2: standard INQUIRY data.
    #[test]
    fn spc4_6_6_2_standard_inquiry() {
        let d = standard_inquiry(Unit::Disk);
        assert_eq!(d[0], 0x00);
        assert_eq!(d[2], 0x06);
        assert_eq!(d[3], 0x12, "HISUP, response data format 2");
        assert_eq!(usize::from(d[4]) + 5, d.len());
        assert_eq!(d[5], 0, "no 3PC, no TPGS");
        assert_eq!(d[7] & 0x02, 0x02, "CMDQUE");
        assert_eq!(&d[8..16], b"SHORTHRN");
        assert_eq!(&d[16..32], b"VOLUME          ");
        assert_eq!(
            &d[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        assert_eq!(standard_inquiry(Unit::Controller)[0], 0x0C);
        assert_eq!(standard_inquiry(Unit::Absent)[0], 0x7F);
    }

    #[test]
    fn spc4_6_6_evpd_zero_page_code_nonzero_is_invalid() {
        assert_eq!(
            decode(&[0x12, 0, 0x80, 0, 255, 0]).unwrap_err(),
            Sense::invalid_field_in_cdb(2)
        );
        assert_eq!(
            inquiry(Unit::Disk, &identity(), true, 0x99).unwrap_err(),
            Sense::invalid_field_in_cdb(2)
        );
    }

    #[test]
    fn spc4_7_8_vpd_supported_pages_and_serial() {
        let id = identity();
        let p = inquiry(Unit::Disk, &id, true, 0).unwrap();
        assert_eq!(&p[..4], &[0, 0, 0, 6]);
        assert_eq!(&p[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
        let s = inquiry(Unit::Disk, &id, true, 0x80).unwrap();
        assert_eq!(&s[..4], &[0, 0x80, 0, 8]);
        assert_eq!(&s[4..], b"pvc-1234");
    }

    #[test]
    fn spc4_7_8_6_device_identification() {
        let id = identity();
        let p = inquiry(Unit::Disk, &id, true, 0x83).unwrap();
        assert_eq!(usize::from(be16(&p, 2)) + 4, p.len());
        // First designator: NAA, binary, LU association, 16 bytes, type 6.
        assert_eq!(&p[4..8], &[0x01, 0x03, 0, 16]);
        assert_eq!(p[8] >> 4, 6);
        assert_eq!(naa_identifier("pvc-1234"), id.naa);
        assert_ne!(naa_identifier("pvc-1235"), id.naa);
        // Walk the designators and find the SCSI name string.
        let mut at = 4;
        let mut found = false;
        while at < p.len() {
            let len = usize::from(p[at + 3]);
            if p[at + 1] & 0x0F == 8 {
                let name = &p[at + 4..at + 4 + len];
                assert_eq!(len % 4, 0);
                assert!(name.starts_with(b"iqn.2026-11.io.shorthorn:pvc-1234\0"));
                found = true;
            }
            at += 4 + len;
        }
        assert_eq!(at, p.len());
        assert!(found);
    }

    // SBC-4 6.6.3: block limits, as Linux sd reads them.
    #[test]
    fn sbc4_6_6_3_block_limits() {
        let p = inquiry(Unit::Disk, &identity(), true, 0xB0).unwrap();
        assert_eq!(p.len(), 64);
        assert_eq!(be16(&p, 2), 0x3C);
        assert_eq!(p[4] & 1, 1, "WSNZ");
        assert_eq!(p[5], MAX_COMPARE_AND_WRITE_BLOCKS);
        assert_eq!(be16(&p, 6), 8);
        assert_eq!(be32(&p, 8), MAX_TRANSFER_BLOCKS);
        assert_eq!(be32(&p, 12), 2048);
        assert_eq!(be32(&p, 20), MAX_UNMAP_BLOCKS);
        assert_eq!(be32(&p, 24), MAX_UNMAP_DESCRIPTORS);
        assert_eq!(be32(&p, 28), 8);
        assert_eq!(be64(&p, 36), MAX_WRITE_SAME_BLOCKS);
    }

    #[test]
    fn sbc4_6_6_2_and_6_6_4_characteristics_and_provisioning() {
        let c = inquiry(Unit::Disk, &identity(), true, 0xB1).unwrap();
        assert_eq!((be16(&c, 2), be16(&c, 4)), (0x3C, 1));
        let p = inquiry(Unit::Disk, &identity(), true, 0xB2).unwrap();
        assert_eq!(be16(&p, 2), 4);
        assert_eq!(p[5] & 0x80, 0x80, "LBPU");
        assert_eq!(p[5] & 0x60, 0x60, "LBPWS, LBPWS10");
        assert_eq!((p[5] >> 2) & 0x07, 1, "LBPRZ");
        assert_eq!(p[6] & 0x07, 2, "thin");
    }

    #[test]
    fn allocation_length_truncates() {
        let c = decode(&[0x12, 0, 0, 0, 5, 0]).unwrap();
        let Command::Inquiry { alloc, .. } = c else {
            panic!("{c:?}")
        };
        let d = cut(inquiry(Unit::Disk, &identity(), false, 0).unwrap(), alloc);
        assert_eq!(d.len(), 5);
        assert_eq!(d[4], 91, "ADDITIONAL LENGTH still says the full length");
    }

    // --- capacity, LUNs

    // SBC-4 5.20.2: READ CAPACITY(16) parameter data.
    #[test]
    fn sbc4_5_20_2_read_capacity16() {
        let d = read_capacity16(2048);
        assert_eq!(d.len(), 32);
        assert_eq!(be64(&d, 0), 2047);
        assert_eq!(be32(&d, 8), 512);
        assert_eq!(d[13] & 0x0F, 3);
        assert_eq!(d[14], 0xC0, "LBPME, LBPRZ");
        assert_eq!(d[15], 0);
    }

    #[test]
    fn sbc4_5_19_read_capacity10_saturates() {
        assert_eq!(read_capacity10(1 << 33)[..4], [0xFF; 4]);
        assert_eq!(be32(&read_capacity10(2048), 0), 2047);
        assert_eq!(
            decode(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err(),
            Sense::invalid_field_in_cdb(2)
        );
    }

    #[test]
    fn spc4_6_33_report_luns() {
        let d = report_luns(0);
        assert_eq!(&d[..4], &[0, 0, 0, 16]);
        assert_eq!(&d[8..10], &[0, 0]);
        assert_eq!(&d[16..18], &[0, 1]);
        assert_eq!(report_luns(1), vec![0u8; 8]);
        let mut c = vec![0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0];
        assert_eq!(decode(&c).unwrap_err(), Sense::invalid_field_in_cdb(6));
        c[9] = 16;
        c[2] = 3;
        assert_eq!(decode(&c).unwrap_err(), Sense::invalid_field_in_cdb(2));
    }

    // --- mode pages

    fn mode_cdb(ten: bool, dbd: bool, llbaa: bool, page: u8, pc: u8) -> ModeSenseCdb {
        ModeSenseCdb {
            ten,
            dbd,
            llbaa,
            page,
            subpage: 0,
            pc,
            alloc: 255,
        }
    }

    // SPC-4 7.5.4/7.5.5: mode parameter headers and block descriptors.
    #[test]
    fn spc4_7_5_mode_sense6_headers() {
        let with = mode_sense(&mode_cdb(false, false, false, 0x08, 0), 1000).unwrap();
        assert_eq!(usize::from(with[0]) + 1, with.len());
        assert_eq!(with[2], 0x10, "DPOFUA, not write-protected");
        assert_eq!(with[3], 8);
        assert_eq!(be32(&with, 4), 1000);
        assert_eq!(be32(&with, 8) & 0xFF_FFFF, 512);
        assert_eq!(&with[12..15], &[0x08, 0x12, 0x04], "caching page, WCE");
        let without = mode_sense(&mode_cdb(false, true, false, 0x08, 0), 1000).unwrap();
        assert_eq!(without[3], 0);
        assert_eq!(without.len(), 4 + 20);
        let all = mode_sense(&mode_cdb(false, true, false, 0x3F, 0), 1000).unwrap();
        assert_eq!(all.len(), 4 + 20 + 12 + 12);
        let changeable = mode_sense(&mode_cdb(false, true, false, 0x0A, 1), 1000).unwrap();
        assert!(changeable[6..].iter().all(|&b| b == 0));
        let control = mode_sense(&mode_cdb(false, true, false, 0x0A, 0), 1000).unwrap();
        assert_eq!(control[6] & 0x04, 0, "D_SENSE=0");
    }

    #[test]
    fn spc4_7_5_mode_sense10_llbaa() {
        let d = mode_sense(&mode_cdb(true, false, true, 0x0A, 0), 1 << 33).unwrap();
        assert_eq!(usize::from(be16(&d, 0)) + 2, d.len());
        assert_eq!(d[3], 0x10);
        assert_eq!(d[4] & 1, 1, "LONGLBA");
        assert_eq!(be16(&d, 6), 16);
        assert_eq!(be64(&d, 8), 1 << 33);
        assert_eq!(be32(&d, 20), 512);
        let short = mode_sense(&mode_cdb(true, false, false, 0x0A, 0), 1 << 33).unwrap();
        assert_eq!(be16(&short, 6), 8);
        assert_eq!(be32(&short, 8), u32::MAX);
    }

    #[test]
    fn spc4_mode_sense_errors() {
        assert_eq!(
            decode(&[0x1A, 0, 0xC8, 0, 255, 0]).unwrap_err(),
            Sense::saving_parameters_not_supported()
        );
        assert_eq!(
            mode_sense(&mode_cdb(false, true, false, 0x19, 0), 1).unwrap_err(),
            Sense::invalid_field_in_cdb(2)
        );
        let mut sub = mode_cdb(false, true, false, 0x08, 0);
        sub.subpage = 1;
        assert_eq!(
            mode_sense(&sub, 1).unwrap_err(),
            Sense::invalid_field_in_cdb(3)
        );
    }

    #[test]
    fn spc4_6_11_mode_select_accepts_only_current_values() {
        let current = mode_sense(&mode_cdb(false, false, false, 0x08, 0), 1000).unwrap();
        let mut params = current.clone();
        params[0] = 0;
        assert_eq!(mode_select(false, &params, 1000), Ok(()));
        params[14] = 0; // clear WCE
        assert_eq!(
            mode_select(false, &params, 1000),
            Err(Sense::invalid_field_in_parameter_list(14))
        );
        assert_eq!(
            mode_select(false, &params[..2], 1000),
            Err(Sense::parameter_list_length_error())
        );
        assert_eq!(mode_select(false, &[], 1000), Ok(()));
    }

    // --- UNMAP

    fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
        let mut p = vec![0u8; 8];
        for &(lba, n) in ranges {
            p.extend(lba.to_be_bytes());
            p.extend(n.to_be_bytes());
            p.extend([0u8; 4]);
        }
        let d = u16::try_from(ranges.len() * 16).unwrap();
        p[0..2].copy_from_slice(&(d + 6).to_be_bytes());
        p[2..4].copy_from_slice(&d.to_be_bytes());
        p
    }

    // SBC-4 5.31.2: UNMAP parameter list.
    #[test]
    fn sbc4_5_31_2_unmap_parameter_list() {
        let p = unmap_list(&[(0, 8), (100, 1)]);
        assert_eq!(parse_unmap(&p).unwrap(), vec![(0, 8), (100, 1)]);
        assert_eq!(parse_unmap(&[]).unwrap(), vec![]);
        assert_eq!(
            parse_unmap(&p[..5]).unwrap_err(),
            Sense::parameter_list_length_error()
        );
        // Descriptor data length larger than what was sent.
        assert_eq!(
            parse_unmap(&p[..24]).unwrap_err(),
            Sense::parameter_list_length_error()
        );
        // A partial trailing descriptor is ignored.
        let mut odd = p.clone();
        odd[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse_unmap(&odd).unwrap(), vec![(0, 8)]);
        let big = unmap_list(&[(0, MAX_UNMAP_BLOCKS), (0, 1)]);
        assert_eq!(
            parse_unmap(&big).unwrap_err(),
            Sense::invalid_field_in_parameter_list(32)
        );
    }

    // --- reservations

    fn pr_params(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    fn register(r: &mut Reservations, n: &str, key: u64) {
        r.pr_out(n, pr::REGISTER, 0, 0, &pr_params(0, key)).unwrap();
    }

    fn reserve(r: &mut Reservations, n: &str, key: u64, kind: u8) -> Result<Vec<Notice>, Refusal> {
        r.pr_out(n, pr::RESERVE, 0, kind, &pr_params(key, 0))
    }

    // SPC-4 5.13.1: Write Exclusive lets others read, not write.
    #[test]
    fn spc4_5_13_1_write_exclusive_conflicts() {
        let mut r = Reservations::default();
        register(&mut r, N, 1);
        reserve(&mut r, N, 1, 1).unwrap();
        assert!(!r.conflicts(N, Access::Write));
        assert!(!r.conflicts(M, Access::Read));
        assert!(r.conflicts(M, Access::Write));
        assert!(!r.conflicts(M, Access::Status));
        register(&mut r, M, 2);
        assert!(r.conflicts(M, Access::Write), "registration is not enough");
    }

    #[test]
    fn spc4_5_13_1_exclusive_access_and_registrants_only() {
        let mut r = Reservations::default();
        register(&mut r, N, 1);
        reserve(&mut r, N, 1, 3).unwrap();
        assert!(r.conflicts(M, Access::Read));
        assert!(!r.conflicts(M, Access::Free));
        r.pr_out(N, pr::RELEASE, 0, 3, &pr_params(1, 0)).unwrap();
        reserve(&mut r, N, 1, 6).unwrap();
        assert!(r.conflicts(M, Access::Read));
        register(&mut r, M, 2);
        assert!(!r.conflicts(M, Access::Read));
        assert!(!r.conflicts(M, Access::Write));
        // The holder unregistering releases a Registrants Only reservation.
        let notices = r.pr_out(N, pr::REGISTER, 0, 0, &pr_params(1, 0)).unwrap();
        assert_eq!(notices, vec![(M.to_owned(), UA_RESERVATIONS_RELEASED)]);
        assert!(r.persistent.is_none());
    }

    #[test]
    fn spc4_5_13_all_registrants_survive_reserver_leaving() {
        let mut r = Reservations::default();
        register(&mut r, N, 1);
        register(&mut r, M, 2);
        reserve(&mut r, N, 1, 7).unwrap();
        reserve(&mut r, M, 2, 7).unwrap();
        assert!(!r.conflicts(M, Access::Write));
        r.pr_out(N, pr::REGISTER, 0, 0, &pr_params(1, 0)).unwrap();
        assert!(r.persistent.is_some());
        assert!(r.conflicts(N, Access::Write));
        assert!(!r.conflicts(N, Access::Read));
        let d = r.pr_in(1);
        assert_eq!(be64(&d, 8), 0, "All Registrants reports key 0");
        assert_eq!(d[21], 7);
    }

    #[test]
    fn spc4_5_13_register_and_reserve_errors() {
        let mut r = Reservations::default();
        assert_eq!(reserve(&mut r, N, 0, 1), Err(Refusal::Conflict));
        assert_eq!(
            r.pr_out(N, pr::REGISTER, 0, 0, &pr_params(5, 6)),
            Err(Refusal::Conflict),
            "unregistered with a non-zero key"
        );
        register(&mut r, N, 1);
        assert_eq!(
            r.pr_out(N, pr::REGISTER, 0, 0, &pr_params(2, 3)),
            Err(Refusal::Conflict)
        );
        r.pr_out(N, pr::REGISTER_AND_IGNORE, 0, 0, &pr_params(0, 9))
            .unwrap();
        assert_eq!(r.keys[N], 9);
        assert_eq!(
            reserve(&mut r, N, 1, 1),
            Err(Refusal::Conflict),
            "wrong key"
        );
        assert_eq!(
            reserve(&mut r, N, 9, 2),
            Err(Sense::invalid_field_in_cdb(2).into())
        );
        reserve(&mut r, N, 9, 1).unwrap();
        reserve(&mut r, N, 9, 1).unwrap();
        assert_eq!(reserve(&mut r, N, 9, 3), Err(Refusal::Conflict));
        register(&mut r, M, 2);
        assert_eq!(reserve(&mut r, M, 2, 1), Err(Refusal::Conflict));
        assert_eq!(
            r.pr_out(N, pr::RELEASE, 0, 3, &pr_params(9, 0)),
            Err(Sense::invalid_release_of_persistent_reservation().into())
        );
        let mut aptpl = pr_params(9, 0);
        aptpl[20] = 1;
        assert_eq!(
            r.pr_out(N, pr::RESERVE, 0, 1, &aptpl),
            Err(Sense::invalid_field_in_parameter_list(20).into())
        );
        assert_eq!(
            r.pr_out(N, pr::RESERVE, 0, 1, &aptpl[..20]),
            Err(Sense::parameter_list_length_error().into())
        );
        let keys = r.pr_in(0);
        assert_eq!(be32(&keys, 4), 16);
        assert_eq!(r.generation, 3);
    }

    #[test]
    fn spc4_5_13_preempt_and_clear() {
        let mut r = Reservations::default();
        register(&mut r, N, 1);
        register(&mut r, M, 2);
        reserve(&mut r, N, 1, 3).unwrap();
        let notices = r.pr_out(M, pr::PREEMPT, 0, 1, &pr_params(2, 1)).unwrap();
        assert_eq!(notices, vec![(N.to_owned(), UA_REGISTRATIONS_PREEMPTED)]);
        assert_eq!(
            r.persistent,
            Some(Persistent {
                holder: M.to_owned(),
                kind: PrType::WriteExclusive
            })
        );
        assert!(!r.keys.contains_key(N));
        assert_eq!(
            r.pr_out(M, pr::PREEMPT, 0, 1, &pr_params(2, 77)),
            Err(Refusal::Conflict)
        );
        register(&mut r, N, 5);
        let cleared = r.pr_out(M, pr::CLEAR, 0, 0, &pr_params(2, 0)).unwrap();
        assert_eq!(cleared, vec![(N.to_owned(), UA_RESERVATIONS_PREEMPTED)]);
        assert!(r.keys.is_empty() && r.persistent.is_none());
    }

    // SPC-4 6.14.5: READ FULL STATUS names each registrant's nexus and
    // marks the holder with the reservation's type.
    #[test]
    fn spc4_6_14_5_read_full_status() {
        let mut r = Reservations::default();
        register(&mut r, N, 1);
        register(&mut r, M, 2);
        reserve(&mut r, N, 1, 3).unwrap();
        let d = r.pr_in(3);
        let total = usize::try_from(be32(&d, 4)).unwrap();
        assert_eq!(d.len(), 8 + total);
        let mut at = 8;
        let mut seen = Vec::new();
        while at < d.len() {
            let key = u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
            let holder = d[at + 12] & 1 == 1;
            let tid_len = usize::try_from(be32(&d, at + 20)).unwrap();
            let tid = &d[at + 24..at + 24 + tid_len];
            assert_eq!(tid[0], 0x45, "iSCSI TransportID with ISID");
            assert_eq!(tid_len % 4, 0);
            assert!(tid_len >= 24);
            let name_len = usize::from(be16(tid, 2));
            let name = &tid[4..4 + name_len];
            let nexus = std::str::from_utf8(&name[..name.iter().position(|&b| b == 0).unwrap()])
                .unwrap()
                .to_owned();
            seen.push((nexus, key, holder, d[at + 13]));
            at += 24 + tid_len;
        }
        seen.sort();
        let mut want = vec![
            (N.to_owned(), 1, true, PrType::ExclusiveAccess.code()),
            (M.to_owned(), 2, false, 0),
        ];
        want.sort();
        assert_eq!(seen, want);
    }

    // SPC-2 7.21: RESERVE(6) shuts out every other nexus but for a few
    // commands; SPC-4 5.13.3: not while persistent state exists.
    #[test]
    fn spc2_7_21_reserve6_conflicts() {
        let mut r = Reservations::default();
        r.reserve6(N).unwrap();
        r.reserve6(N).unwrap();
        assert_eq!(r.reserve6(M), Err(Refusal::Conflict));
        assert!(r.conflicts(M, Access::Status));
        assert!(r.conflicts(M, Access::Read));
        assert!(!r.conflicts(M, Access::Free));
        assert!(!r.conflicts(M, Access::Release6));
        r.release6(M);
        assert!(r.legacy.is_some());
        r.release6(N);
        assert!(!r.conflicts(M, Access::Write));
        register(&mut r, N, 1);
        assert!(r.conflicts(N, Access::Reserve6));
    }

    #[test]
    fn spc4_6_35_report_supported_opcodes() {
        let all = report_opcodes(false, 0, 0, 0).unwrap();
        assert_eq!(usize::try_from(be32(&all, 0)).unwrap(), SUPPORTED.len() * 8);
        let with_timeouts = report_opcodes(true, 0, 0, 0).unwrap();
        assert_eq!(with_timeouts.len(), 4 + SUPPORTED.len() * 20);
        let one = report_opcodes(false, 1, 0x28, 0).unwrap();
        assert_eq!(&one[..4], &[0, 3, 0, 10]);
        assert_eq!(one[4], 0x28);
        assert_eq!(report_opcodes(false, 1, 0xC1, 0).unwrap(), vec![0, 1, 0, 0]);
        assert_eq!(
            report_opcodes(false, 1, 0x9E, 0).unwrap_err(),
            Sense::invalid_field_in_cdb(2)
        );
        let rc16 = report_opcodes(false, 2, 0x9E, 0x10).unwrap();
        assert_eq!(&rc16[..6], &[0, 3, 0, 16, 0x9E, 0x10]);
        assert_eq!(report_opcodes(false, 2, 0x9E, 0x1F).unwrap()[1], 1);
        for info in SUPPORTED {
            assert_eq!(cdb_len(info.usage[0]), Some(info.usage.len()));
        }
    }

    // --- end to end over a one-replica volume on an in-process server

    async fn units(dir: &std::path::Path, size: u64) -> LogicalUnits {
        let replica = std::sync::Arc::new(
            crate::replica::Replica::open(dir, Some(size)).expect("create replica"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(crate::replica::server::serve(listener, replica));
        let volume = Volume::open("vol-e2e", size, &[addr]).await.expect("open");
        LogicalUnits::new(volume, "iqn.2026-11.io.shorthorn:vol-e2e")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sbc4_end_to_end_over_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16u64 << 20;
        let lu = units(dir.path(), size).await;
        let blocks = size / 512;

        let rc = lu.execute(N, 1, &cdb16(0x9E, 0x10, 0, 32), &[]).await;
        assert_eq!(rc.status, 0);
        assert_eq!(be64(&rc.data, 0), blocks - 1);

        let data: Vec<u8> = (0..8 * 512)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let w = lu.execute(N, 1, &cdb10(0x2A, 0x08, 16, 8), &data).await;
        assert_eq!(w, Response::good(vec![]));
        let r = lu.execute(N, 1, &cdb10(0x28, 0, 16, 8), &[]).await;
        assert_eq!(r.data, data);

        // Write data cut short by the initiator's expected length: the
        // whole blocks that came are written, the rest keep their data.
        let other = vec![0x5au8; 8 * 512];
        let short = lu
            .execute(N, 1, &cdb10(0x2A, 0, 16, 8), &other[..1100])
            .await;
        assert_eq!(short, Response::good(vec![]));
        let r = lu.execute(N, 1, &cdb10(0x28, 0, 16, 8), &[]).await;
        assert_eq!(&r.data[..1024], &other[..1024]);
        assert_eq!(&r.data[1024..], &data[1024..]);
        // Past the end.
        let oob = lu
            .execute(
                N,
                1,
                &cdb10(0x28, 0, u32::try_from(blocks).unwrap(), 1),
                &[],
            )
            .await;
        assert_eq!((oob.sense[2], oob.sense[12]), (0x05, 0x21));

        // COMPARE AND WRITE: match, then a miscompare at byte 3.
        let mut caw = cdb16(0x89, 0, 16, 0);
        caw[13] = 1;
        let mut out = other[..512].to_vec();
        out.extend(vec![0xAB; 512]);
        assert_eq!(lu.execute(N, 1, &caw, &out).await.status, 0);
        let again = lu.execute(N, 1, &caw, &out).await;
        assert_eq!(again.status, 2);
        assert_eq!((again.sense[2], again.sense[12]), (0x0E, 0x1D));
        assert_eq!(be32(&again.sense, 3), 0);
        let r = lu.execute(N, 1, &cdb10(0x28, 0, 16, 1), &[]).await;
        assert_eq!(r.data, vec![0xAB; 512]);

        // VERIFY with BYTCHK=1 against what is there.
        let v = lu
            .execute(N, 1, &cdb10(0x2F, 0x02, 17, 1), &other[512..1024])
            .await;
        assert_eq!(v.status, 0);
        let mut bad = other[512..1024].to_vec();
        bad[7] ^= 1;
        let v = lu.execute(N, 1, &cdb10(0x2F, 0x02, 17, 1), &bad).await;
        assert_eq!((v.sense[2], be32(&v.sense, 3)), (0x0E, 7));

        // WRITE SAME with a pattern over more than one engine request.
        let ws = lu
            .execute(N, 1, &cdb16(0x93, 0, 100, 9000), &[0x5A; 512])
            .await;
        assert_eq!(ws.status, 0);
        let r = lu.execute(N, 1, &cdb16(0x88, 0, 9099, 1), &[]).await;
        assert_eq!(r.data, vec![0x5A; 512]);
        // WRITE SAME with UNMAP and zeros reads back zeros.
        let ws = lu
            .execute(N, 1, &cdb16(0x93, 0x08, 100, 10), &[0; 512])
            .await;
        assert_eq!(ws.status, 0);
        let r = lu.execute(N, 1, &cdb16(0x88, 0, 100, 11), &[]).await;
        assert_eq!(&r.data[..5120], &[0u8; 5120][..]);
        assert_eq!(&r.data[5120..], &[0x5A; 512][..]);

        // UNMAP the written range; it reads zeros (LBPRZ).
        let list = unmap_list(&[(16, 8)]);
        let u = lu
            .execute(
                N,
                1,
                &cdb10(0x42, 0, 0, u16::try_from(list.len()).unwrap()),
                &list,
            )
            .await;
        assert_eq!(u.status, 0);
        let r = lu.execute(N, 1, &cdb10(0x28, 0, 16, 8), &[]).await;
        assert_eq!(r.data, vec![0; 4096]);

        let sync = lu.execute(N, 1, &cdb10(0x35, 0, 0, 0), &[]).await;
        assert_eq!(sync.status, 0);

        // Unit attentions: a LUN reset from N reaches M, once.
        assert_eq!(lu.execute(M, 1, &[0, 0, 0, 0, 0, 0], &[]).await.status, 0);
        lu.reset(1, N);
        let ua = lu.execute(M, 1, &[0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!((ua.status, ua.sense[2], ua.sense[12]), (2, 0x06, 0x29));
        assert_eq!(lu.execute(M, 1, &[0, 0, 0, 0, 0, 0], &[]).await.status, 0);
        assert_eq!(lu.execute(N, 1, &[0, 0, 0, 0, 0, 0], &[]).await.status, 0);

        // RESERVE(6) by N shuts M out until N's nexus goes away.
        assert_eq!(
            lu.execute(N, 1, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
            0
        );
        let c = lu.execute(M, 1, &cdb10(0x28, 0, 0, 1), &[]).await;
        assert_eq!((c.status, c.sense.len()), (0x18, 0));
        assert_eq!(
            lu.execute(M, 1, &[0x12, 0, 0, 0, 36, 0], &[]).await.status,
            0
        );
        lu.nexus_gone(N);
        assert_eq!(lu.execute(M, 1, &cdb10(0x28, 0, 0, 1), &[]).await.status, 0);

        // An online expand raises CAPACITY DATA HAS CHANGED once.
        lu.volume.expand(size * 2).await.unwrap();
        let ua = lu.execute(M, 1, &[0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(
            (ua.sense[2], ua.sense[12], ua.sense[13]),
            (0x06, 0x2A, 0x09)
        );
        let rc = lu.execute(M, 1, &cdb16(0x9E, 0x10, 0, 32), &[]).await;
        assert_eq!(be64(&rc.data, 0), 2 * blocks - 1);

        // LUN 0 and absent LUNs.
        let inq = lu.execute(M, 0, &[0x12, 0, 0, 0, 36, 0], &[]).await;
        assert_eq!((inq.data[0], inq.data.len()), (0x0C, 36));
        let rd = lu.execute(M, 0, &cdb10(0x28, 0, 0, 1), &[]).await;
        assert_eq!(rd.sense[12], 0x20);
        let absent = lu.execute(M, 7, &[0x12, 0, 0, 0, 36, 0], &[]).await;
        assert_eq!(absent.data[0], 0x7F);
        let absent = lu.execute(M, 7, &[0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(absent.sense[12], 0x25);
    }
}
