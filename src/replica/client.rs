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

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::store::{ExtentPage, LayerInfo, ReplicaInfo};
use super::wire::{
    self, ExpandRequest, ExtentsRequest, FrameError, NameRequest, Op, RebuildingRequest,
    RequestHeader, ResponseHeader, SnapshotRequest, RESPONSE_HEADER_LEN,
};
use crate::error::ErrorKind;

const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// Errors a client call can return.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connecting to replica {addr}: {source}")]
    ConnectReplica {
        /// The address.
        addr: String,
        /// Cause.
        source: io::Error,
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
}

impl ClientError {
    /// The kind a boundary maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::ConnectReplica { .. } | Self::Disconnected => ErrorKind::Unavailable,
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
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

/// A connection to one replica; cheap to clone and share.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    next_id: Arc<AtomicU64>,
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
    /// Connects to a replica at `addr` (`host:port`).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::ConnectReplica {
                addr: addr.into(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(Pending::default()));
        tokio::spawn(write_requests(BufWriter::with_capacity(SOCKET_BUFFER_BYTES, wr), rx));
        let p = Arc::clone(&pending);
        tokio::spawn(async move {
            let _ = read_responses(BufReader::with_capacity(SOCKET_BUFFER_BYTES, rd), &p).await;
            let mut g = lock(&p);
            g.closed = true;
            for (_, w) in g.waiting.drain() {
                let _ = w.send(Err(ClientError::Disconnected));
            }
        });
        Ok(Self {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    async fn call(&self, op: Op, offset: u64, length: u64, payload: Bytes) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = RequestHeader::new(op, id, offset, length, &payload).encode();
        let (otx, orx) = oneshot::channel();
        {
            let mut g = lock(&self.pending);
            if g.closed {
                return Err(ClientError::Disconnected);
            }
            g.waiting.insert(id, otx);
        }
        if self.tx.send(Outgoing { header, payload }).is_err() {
            lock(&self.pending).waiting.remove(&id);
            return Err(ClientError::Disconnected);
        }
        orx.await.unwrap_or(Err(ClientError::Disconnected))
    }

    async fn control<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        op: Op,
        q: &Q,
    ) -> Result<A, ClientError> {
        let body = serde_json::to_vec(q).map_err(|e| ClientError::Decode(e.to_string()))?;
        let ans = self.call(op, 0, 0, Bytes::from(body)).await?;
        let ans = if ans.is_empty() { b"null".to_vec() } else { ans };
        serde_json::from_slice(&ans).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        self.call(Op::Read, offset, len, Bytes::new()).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), ClientError> {
        let len = data.len() as u64;
        self.call(Op::Write, offset, len, data).await.map(drop)
    }

    /// Trims `len` bytes at `offset`.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.call(Op::Unmap, offset, len, Bytes::new()).await.map(drop)
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(Op::Flush, 0, 0, Bytes::new()).await.map(drop)
    }

    /// Size, chain, revision and flags.
    pub async fn info(&self) -> Result<ReplicaInfo, ClientError> {
        self.control(Op::Info, &()).await
    }

    /// Every layer.
    pub async fn list(&self) -> Result<Vec<LayerInfo>, ClientError> {
        self.control(Op::List, &()).await
    }

    /// Snapshots the head as `name`.
    pub async fn snapshot(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        let q = SnapshotRequest {
            name: name.into(),
            user_created: true,
            labels,
        };
        self.control::<_, ()>(Op::Snapshot, &q).await
    }

    /// Removes snapshot `name`.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::RemoveSnapshot, &NameRequest { name: name.into() })
            .await
    }

    /// Reverts to snapshot `name`.
    pub async fn revert(&self, name: &str) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::Revert, &NameRequest { name: name.into() })
            .await
    }

    /// Grows the volume to `size` bytes.
    pub async fn expand(&self, size: u64) -> Result<(), ClientError> {
        self.control::<_, ()>(Op::Expand, &ExpandRequest { size }).await
    }

    /// One page of a layer's checksummed extents.
    pub async fn extents(&self, layer: &str, from: u64, max: u32) -> Result<ExtentPage, ClientError> {
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
}

async fn write_requests(
    mut wr: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next {
            wr.write_all(&o.header).await?;
            wr.write_all(&o.payload).await?;
            next = rx.try_recv().ok();
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
        rd.read_exact(&mut hb).await.map_err(|_| ClientError::Disconnected)?;
        let h = ResponseHeader::decode(&hb)?;
        let mut payload = vec![0u8; h.payload_len as usize];
        rd.read_exact(&mut payload).await.map_err(|_| ClientError::Disconnected)?;
        wire::verify_payload(h.id, h.payload_crc, &payload)?;
        let reply = match h.status {
            None => Ok(payload),
            Some(kind) => Err(ClientError::Remote {
                kind,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
        };
        let waiter = lock(pending).waiting.remove(&h.id);
        if let Some(w) = waiter {
            let _ = w.send(reply);
        } else if h.id != 0 {
            return Err(ClientError::Decode(format!("answer to unknown request {}", h.id)));
        }
    }
}
