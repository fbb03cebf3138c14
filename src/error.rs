//! The error vocabulary shared by every layer.
//!
//! Each layer has its own `thiserror` enum with the context it knows; each of
//! those enums maps itself onto one [`ErrorKind`]. Boundaries (the replica wire
//! protocol today, gRPC status codes and SCSI sense data later) translate the
//! kind exactly once, so the same failure always reaches the user the same way.

use std::fmt;

/// The small, stable classification a boundary matches on.
///
/// The numeric values are part of the replica wire protocol (the status byte of
/// a response, see `docs/format.md`); never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// The named object (snapshot, layer, file) does not exist.
    NotFound = 1,
    /// An object with that name exists already.
    AlreadyExists = 2,
    /// The request itself is malformed: misaligned, empty, bad name.
    InvalidArgument = 3,
    /// The peer or the resource cannot serve right now; retrying may help.
    Unavailable = 4,
    /// The request addresses bytes beyond the end of the volume.
    OutOfRange = 5,
    /// Stored or received data failed a consistency check.
    Corrupt = 6,
    /// The operating system reported an I/O failure.
    Io = 7,
    /// The request is well formed but the state does not allow it now.
    FailedPrecondition = 8,
    /// Another operation on the same object is under way; retrying once it
    /// is done will work.
    Busy = 9,
}

impl ErrorKind {
    /// The process exit status the CLI reports for this kind (documented in
    /// the README); 1 is left for errors without a kind.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::InvalidArgument => 2,
            Self::NotFound => 3,
            Self::AlreadyExists => 4,
            Self::Unavailable => 5,
            Self::OutOfRange => 6,
            Self::Corrupt => 7,
            Self::Io => 8,
            Self::FailedPrecondition => 9,
            Self::Busy => 10,
        }
    }

    /// The gRPC status code this kind is reported as (the CSI spec's codes
    /// for the same situations).
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::NotFound => tonic::Code::NotFound,
            Self::AlreadyExists => tonic::Code::AlreadyExists,
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::OutOfRange => tonic::Code::OutOfRange,
            Self::Corrupt => tonic::Code::DataLoss,
            Self::Io => tonic::Code::Internal,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::Busy => tonic::Code::Aborted,
        }
    }

    /// The kind a gRPC status code stands for, on the client side.
    pub fn from_grpc(code: tonic::Code) -> Option<Self> {
        Some(match code {
            tonic::Code::NotFound => Self::NotFound,
            tonic::Code::AlreadyExists => Self::AlreadyExists,
            tonic::Code::InvalidArgument => Self::InvalidArgument,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Self::Unavailable,
            tonic::Code::OutOfRange => Self::OutOfRange,
            tonic::Code::DataLoss => Self::Corrupt,
            tonic::Code::Internal => Self::Io,
            tonic::Code::FailedPrecondition => Self::FailedPrecondition,
            tonic::Code::Aborted => Self::Busy,
            _ => return None,
        })
    }

    /// Decodes a kind from its wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::NotFound,
            2 => Self::AlreadyExists,
            3 => Self::InvalidArgument,
            4 => Self::Unavailable,
            5 => Self::OutOfRange,
            6 => Self::Corrupt,
            7 => Self::Io,
            8 => Self::FailedPrecondition,
            9 => Self::Busy,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::NotFound => "not found",
            Self::AlreadyExists => "already exists",
            Self::InvalidArgument => "invalid argument",
            Self::Unavailable => "unavailable",
            Self::OutOfRange => "out of range",
            Self::Corrupt => "corrupt",
            Self::Io => "i/o error",
            Self::FailedPrecondition => "failed precondition",
            Self::Busy => "busy",
        };
        f.write_str(s)
    }
}
