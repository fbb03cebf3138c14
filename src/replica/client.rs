//! A pipelined client for the replica protocol.
//!
//! Any number of tasks may call a [`Client`] at once: each call takes a fresh
//! request id, registers where its answer should go, and hands its frame to
//! one writer task that batches frames into socket writes. One reader task
//! matches responses to waiting calls by id, in whatever order they arrive.
//! When the connection breaks every waiting call fails with
//! [`ClientError::Disconnected`]; later calls fail at once.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::chain::{ExtentPage, LayerInfo, ReplicaInfo, SnapshotSpec};
use super::wire::{
    self, ChecksumRequest, EpochRequest, ExpandRequest, ExtentsRequest, FrameError, InfoRequest,
    IntentRequest, LayerRange, NameRequest, Op, RebuildingRequest, RequestHeader, ResponseHeader,
    SetChainRequest, SnapshotRequest, RESPONSE_HEADER_LEN,
};
use crate::error::ErrorKind;

const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// How long one call may wait for its answer before the connection is
/// declared dead. Generous: a flush of a large, cold head can take seconds.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive and user-timeout settings: a peer that vanished without a
/// FIN or RST (power loss, partition) is noticed within about this long even
/// when no call is waiting.
const KEEPALIVE_IDLE_SECS: u32 = 5;
const KEEPALIVE_INTERVAL_SECS: u32 = 2;
const KEEPALIVE_PROBES: u32 = 3;
const TCP_USER_TIMEOUT_MS: u32 = 15_000;

/// Errors a client call can return.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connecting to replica {addr}: {cause}")]
    ConnectReplica {
        /// The address.
        addr: String,
        /// Cause.
        cause: io::Error,
    },
    /// The connection broke before the answer came.
    #[error("connection to replica lost")]
    Disconnected,
    /// The replica answered with an error.
    #[error("replica refused: {message}")]
    Remote {
        /// Its kind.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// The replica sent something that is not a valid frame.
    #[error("protocol error from replica: {0}")]
    Protocol(#[from] FrameError),
    /// A JSON answer did not decode.
    #[error("undecodable answer from replica: {0}")]
    Decode(String),
    /// No answer within the call timeout; the connection was torn down.
    #[error("replica did not answer within {0:?}")]
    Timeout(Duration),
    /// The request cannot be sent as asked (checked before sending).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The kind a boundary maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectReplica { .. } | Self::Disconnected | Self::Timeout(_) => {
                ErrorKind::Unavailable
            }
            Self::InvalidRequest(_) => ErrorKind::InvalidArgument,
            Self::Remote { kind, .. } => *kind,
            Self::Protocol(_) | Self::Decode(_) => ErrorKind::Corrupt,
        }
    }
}

type Reply = Result<Vec<u8>, ClientError>;

struct Outgoing {
    header: [u8; wire::REQUEST_HEADER_LEN],
    payload: Bytes,
}

#[derive(Default)]
struct Pending {
    /// Calls awaiting their answer, with when they were sent.
    waiting: HashMap<u64, (Instant, oneshot::Sender<Reply>)>,
    closed: bool,
    /// Woken once, when `closed` turns true.
    on_close: Arc<tokio::sync::Notify>,
}

/// Tells when one connection has closed, without keeping it open (see
/// [`Client::close_watch`]).
#[derive(Clone)]
pub struct CloseWatch {
    pending: Arc<Mutex<Pending>>,
}

impl std::fmt::Debug for CloseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloseWatch").finish_non_exhaustive()
    }
}

impl CloseWatch {
    /// Resolves once the connection is closed: the replica went away, a
    /// call timed out, or [`Client::shutdown`] was called.
    pub async fn closed(&self) {
        let notify = Arc::clone(&lock(&self.pending).on_close);
        // Registered before the flag is read, so a close in between still
        // wakes it.
        let woken = notify.notified();
        if lock(&self.pending).closed {
            return;
        }
        woken.await;
    }

    /// Whether `client` is the connection this watches.
    pub fn is(&self, client: &Client) -> bool {
        Arc::ptr_eq(&self.pending, &client.pending)
    }
}

/// A connection to one replica; cheap to clone and share.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
    tasks: Arc<[tokio::task::AbortHandle; 2]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// Connects to a replica at `addr` (`host:port`) with the default call timeout.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with_timeout(addr, DEFAULT_CALL_TIMEOUT).await
    }

    /// Connects with a chosen per-call timeout (also bounds the connect).
    pub async fn connect_with_timeout(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |cause| ClientError::ConnectReplica {
            addr: addr.into(),
            cause,
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(io::Error::from(io::ErrorKind::TimedOut)))?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        set_liveness_options(&stream);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let writer = tokio::spawn(write_requests(
            BufWriter::with_capacity(SOCKET_BUFFER_BYTES, wr),
            rx,
        ));
        let p = Arc::clone(&pending);
        let reader = tokio::spawn(async move {
            let _ = read_responses(BufReader::with_capacity(SOCKET_BUFFER_BYTES, rd), &p).await;
            fail_all(&p, || ClientError::Disconnected);
        });
        let tasks = Arc::new([writer.abort_handle(), reader.abort_handle()]);
        tokio::spawn(watchdog(Arc::clone(&pending), Arc::clone(&tasks), timeout));
        Ok(Self {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            timeout,
            tasks,
        })
    }

    /// Closes the connection; every waiting and later call fails.
    pub fn shutdown(&self) {
        for t in self.tasks.iter() {
            t.abort();
        }
        fail_all(&self.pending, || ClientError::Disconnected);
    }

    /// A handle that tells when this connection closes; holding it does
    /// not keep the connection open.
    pub fn close_watch(&self) -> CloseWatch {
        CloseWatch {
            pending: Arc::clone(&self.pending),
        }
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn call(&self, op: Op, offset: u64, length: u64, payload: Bytes) -> Reply {
        let crc = wire::payload_crc(&payload);
        self.call_crc(op, offset, length, payload, crc).await
    }

    async fn call_crc(&self, op: Op, offset: u64, length: u64, payload: Bytes, crc: u32) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = RequestHeader::with_crc(op, id, offset, length, payload.len(), crc).encode();
        let (otx, orx) = oneshot::channel();
        {
            let mut g = lock(&self.pending);
            if g.closed {
                return Err(ClientError::Disconnected);
            }
            g.waiting.insert(id, (Instant::now(), otx));
        }
        if self.tx.send(Outgoing { header, payload }).is_err() {
            lock(&self.pending).waiting.remove(&id);
            return Err(ClientError::Disconnected);
        }
        // No timer per call: the connection's watchdog fails every waiting
        // call once the oldest has waited longer than the timeout.
        orx.await.unwrap_or(Err(ClientError::Disconnected))
    }

    fn check_io_len(len: u64) -> Result<(), ClientError> {
        if len > wire::MAX_IO_BYTES {
            return Err(ClientError::InvalidRequest(format!(
                "{len} bytes in one request; the protocol allows at most {}",
                wire::MAX_IO_BYTES
            )));
        }
        Ok(())
    }

    async fn control<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        op: Op,
        q: &Q,
    ) -> Result<A, ClientError> {
        let body = serde_json::to_vec(q).map_err(|e| ClientError::Decode(e.to_string()))?;
        let ans = self.call(op, 0, 0, Bytes::from(body)).await?;
        let ans = if ans.is_empty() {
            b"null".to_vec()
        } else {
            ans
        };
        serde_json::from_slice(&ans).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        Self::check_io_len(len)?;
        self.call(Op::Read, offset, len, Bytes::new()).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), ClientError> {
        let crc = wire::payload_crc(&data);
        self.write_crc(offset, data, crc).await
    }

    /// [`write`](Self::write) with the payload's CRC32C
    /// ([`wire::payload_crc`]) computed by the caller, once for all the
    /// replicas it sends the same data to.
    pub async fn write_crc(&self, offset: u64, data: Bytes, crc: u32) -> Result<(), ClientError> {
        let len = data.len() as u64;
        Self::check_io_len(len)?;
        self.call_crc(Op::Write, offset, len, data, crc)
            .await
            .map(drop)
    }

    /// Trims `len` bytes at `offset`.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.call(Op::Unmap, offset, len, Bytes::new())
            .await
            .map(drop)
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(Op::Flush, 0, 0, Bytes::new()).await.map(drop)
    }

    /// Size, chain, revision and flags.
    pub async fn info(&self) -> Result<ReplicaInfo, ClientError> {
        self.control(Op::Info, &()).await
    }

    /// [`Self::info`], refused (`FailedPrecondition`) by a replica started
    /// for another volume than `volume`.
    pub async fn info_of(&self, volume: &str) -> Result<ReplicaInfo, ClientError> {
        let q = InfoRequest {
            volume: volume.to_owned(),
        };
        self.control(Op::Info, &q).await
    }

    /// Every layer.
    pub async fn list(&self) -> Result<Vec<LayerInfo>, ClientError> {
        self.control(Op::List, &()).await
    }

    /// Snapshots the head as `name`, at a user's request.
    pub async fn snapshot(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        self.snapshot_as(name, true, labels).await
    }

    /// Snapshots the head as `name`, marked user-created or not.
    pub async fn snapshot_as(
        &self,
        name: &str,
        user_created: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        let q = SnapshotRequest {
            name: name.into(),
            user_created,
            labels,
        };
        self.control::<_, ()>(Op::Snapshot, &q).await
    }

    /// Removes snapshot `name`.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::RemoveSnapshot, &NameRequest { name: name.into() })
            .await
    }

    /// Marks snapshot `name` removed, the first step of removing it.
    pub async fn mark_removed(&self, name: &str) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::MarkRemoved, &NameRequest { name: name.into() })
            .await
    }

    /// Reverts to snapshot `name`.
    pub async fn revert(&self, name: &str) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::Revert, &NameRequest { name: name.into() })
            .await
    }

    /// Grows the volume to `size` bytes.
    pub async fn expand(&self, size: u64) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::Expand, &ExpandRequest { size })
            .await
    }

    /// One page of a layer's checksummed extents.
    pub async fn extents(
        &self,
        layer: &str,
        from: u64,
        max: u32,
    ) -> Result<ExtentPage, ClientError> {
        let q = ExtentsRequest {
            layer: layer.into(),
            from,
            max,
        };
        self.control(Op::Extents, &q).await
    }

    /// Sets or clears the rebuilding flag.
    pub async fn set_rebuilding(&self, rebuilding: bool) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::SetRebuilding, &RebuildingRequest { rebuilding })
            .await
    }

    /// The bytes layer `layer` itself holds (holes read as zeros).
    pub async fn layer_read(
        &self,
        layer: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ClientError> {
        Self::check_io_len(len)?;
        let q = LayerRange {
            layer: layer.into(),
            offset,
            len,
        };
        let body = serde_json::to_vec(&q).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Op::LayerRead, 0, 0, Bytes::from(body)).await
    }

    /// Writes into snapshot `layer` of a rebuilding replica.
    pub async fn layer_write(
        &self,
        layer: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        Self::check_io_len(data.len() as u64)?;
        let body = wire::encode_layer_write(layer, offset, data);
        self.call(Op::LayerWrite, 0, 0, Bytes::from(body))
            .await
            .map(drop)
    }

    /// Punches a hole in snapshot `layer` of a rebuilding replica.
    pub async fn layer_punch(&self, layer: &str, offset: u64, len: u64) -> Result<(), ClientError> {
        let q = LayerRange {
            layer: layer.into(),
            offset,
            len,
        };
        self.control::<_, ()>(Op::LayerPunch, &q).await
    }

    /// Reshapes a rebuilding replica's chain to `chain` (bottom first).
    pub async fn set_chain(&self, chain: Vec<SnapshotSpec>) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::SetChain, &SetChainRequest { chain })
            .await
    }

    /// Syncs a rebuilt replica and clears its rebuilding flag.
    pub async fn finish_rebuild(&self) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::FinishRebuild, &()).await
    }

    /// Records the membership epoch.
    pub async fn set_epoch(&self, epoch: u64, members: Vec<String>) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::SetEpoch, &EpochRequest { epoch, members })
            .await
    }

    /// Adds and removes write-intent regions.
    pub async fn update_intent(
        &self,
        region_bytes: u64,
        add: Vec<u64>,
        remove: Vec<u64>,
    ) -> Result<(), ClientError> {
        let q = IntentRequest {
            region_bytes,
            add,
            remove,
        };
        self.control::<_, ()>(Op::UpdateIntent, &q).await
    }

    /// CRC32C of the volume's content over a range.
    pub async fn checksum(&self, offset: u64, len: u64) -> Result<u32, ClientError> {
        self.control(Op::Checksum, &ChecksumRequest { offset, len })
            .await
    }
}

fn fail_all(p: &Mutex<Pending>, err: impl Fn() -> ClientError) {
    let mut g = lock(p);
    g.closed = true;
    for (_, (_, w)) in g.waiting.drain() {
        let _ = w.send(Err(err()));
    }
    g.on_close.notify_waiters();
}

/// Tears the connection down when a call has waited longer than `timeout`:
/// a replica that does not answer in time is treated as gone, so no other
/// call waits on it either. Checks a few times per timeout period.
async fn watchdog(
    p: Arc<Mutex<Pending>>,
    tasks: Arc<[tokio::task::AbortHandle; 2]>,
    timeout: Duration,
) {
    let period = (timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let expired = {
            let g = lock(&p);
            if g.closed {
                return;
            }
            g.waiting.values().any(|(sent, _)| sent.elapsed() > timeout)
        };
        if expired {
            for t in tasks.iter() {
                t.abort();
            }
            fail_all(&p, || ClientError::Timeout(timeout));
            return;
        }
    }
}

/// Keepalive and `TCP_USER_TIMEOUT`, so a silent peer breaks the connection
/// (and fails its waiting calls) instead of leaving it open forever.
fn set_liveness_options(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let set = || -> nix::Result<()> {
        setsockopt(stream, sockopt::KeepAlive, &true)?;
        setsockopt(stream, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS)?;
        setsockopt(stream, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS)?;
        setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
        setsockopt(stream, sockopt::TcpUserTimeout, &TCP_USER_TIMEOUT_MS)
    };
    if let Err(e) = set() {
        tracing::warn!(error = %e, "cannot set TCP keepalive options");
    }
}

async fn write_requests(
    mut wr: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut yielded = false;
        while let Some(o) = next {
            wr.write_all(&o.header).await?;
            wr.write_all(&o.payload).await?;
            next = rx.try_recv().ok();
            if next.is_none() && !yielded {
                // Senders that are already runnable get one turn to queue
                // theirs, so one send carries them all.
                yielded = true;
                tokio::task::yield_now().await;
                next = rx.try_recv().ok();
            }
        }
        wr.flush().await?;
    }
    Ok(())
}

async fn read_responses(
    mut rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    pending: &Mutex<Pending>,
) -> Result<(), ClientError> {
    loop {
        let mut hb = [0u8; RESPONSE_HEADER_LEN];
        rd.read_exact(&mut hb)
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let h = ResponseHeader::decode(&hb)?;
        let payload = super::read_vec(&mut rd, h.payload_len as usize)
            .await
            .map_err(|_| ClientError::Disconnected)?;
        wire::verify_payload(h.id, h.payload_crc, &payload)?;
        let reply = match h.status {
            None => Ok(payload),
            Some(kind) => Err(ClientError::Remote {
                kind,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
        };
        let waiter = lock(pending).waiting.remove(&h.id);
        if let Some((_, w)) = waiter {
            let _ = w.send(reply);
        } else if h.id != 0 {
            return Err(ClientError::Decode(format!(
                "answer to unknown request {}",
                h.id
            )));
        }
    }
}
