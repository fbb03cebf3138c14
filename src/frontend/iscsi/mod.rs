//! The iSCSI target (RFC 7143): the engine's volume as LUN 1 of target
//! `iqn.2026-11.io.shorthorn:<volume>` (LUN 0 answers as a storage-array
//! controller, as tgt's does), on one TCP portal.
//!
//! - [`pdu`]: PDU headers, lengths and digests, pure.
//! - [`text`]: `key=value` segments and parameter negotiation, pure.
//! - [`login`]: the login state machine with CHAP, pure.
//! - `conn`: one connection's full feature phase (tokio tasks).
//! - [`scsi`]: the SCSI command set over [`crate::engine::Volume`].
//!
//! One connection per session (MaxConnections=1), error recovery level 0:
//! a broken connection ends its session and the initiator logs in again.

mod conn;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod text;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::engine::Volume;
pub use login::Chap;
use login::TargetConfig;
use scsi::LogicalUnits;

/// How long an initiator may stay silent before it is pinged, and again
/// before it is dropped. Generous: initiators built on synchronous
/// libraries (libiscsi's sync calls) answer only when their program next
/// calls in; a dead peer must not hold its session and reservations
/// forever either.
pub const DEFAULT_NOP: std::time::Duration = std::time::Duration::from_secs(30);

/// The naming authority of shorthorn's target names.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.shorthorn";

/// The target name of `volume`, or why the volume name cannot be one (an
/// IQN allows lowercase letters, digits, `-`, `.` and `:`).
pub fn target_name(volume: &str) -> Result<String, super::Error> {
    let ok = !volume.is_empty()
        && volume
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
    if ok {
        Ok(format!("{IQN_PREFIX}:{volume}"))
    } else {
        Err(super::Error::BadName {
            name: volume.to_owned(),
            reason: "an iSCSI target name takes lowercase letters, digits, '-', '.' and ':' only",
        })
    }
}

/// One volume's target: its logical units and sessions.
#[derive(Debug)]
pub struct Target {
    cfg: TargetConfig,
    lus: Arc<LogicalUnits>,
    sessions: conn::Sessions,
    tsih: AtomicU16,
    /// Idle time before a NOP-In ping, and again before the connection is
    /// dropped; `None` never pings.
    nop: Option<std::time::Duration>,
}

impl Target {
    /// The target for `volume`, requiring `chap` when given, pinging idle
    /// initiators after `nop` (see [`DEFAULT_NOP`]).
    pub fn new(
        volume: Volume,
        chap: Option<Chap>,
        nop: Option<std::time::Duration>,
    ) -> Result<Arc<Self>, super::Error> {
        let name = target_name(volume.name())?;
        Ok(Arc::new(Self {
            lus: Arc::new(LogicalUnits::new(volume, &name)),
            cfg: TargetConfig {
                name,
                chap,
                limits: text::Limits::default(),
            },
            sessions: conn::Sessions::default(),
            tsih: AtomicU16::new(1),
            nop,
        }))
    }

    /// The target's IQN.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn next_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Accepts connections on `listener` until `shutdown` resolves; each
    /// connection runs as its own task.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        tokio::spawn(conn::serve(self.clone(), stream));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off, retry.
                        tracing::warn!(error = %e, "iSCSI accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}
