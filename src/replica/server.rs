//! Serves a [`Replica`] over TCP with the frames of [`super::wire`].
//!
//! Per connection: one task reads frames and starts each request on the
//! blocking pool (file I/O is positional and may block); a second task writes
//! responses as they finish, in completion order, batching whatever is ready
//! into one socket write. At most [`MAX_IN_FLIGHT`] requests run per
//! connection; beyond that the reader stops reading, which pushes back on the
//! client through TCP.
//!
//! A frame that fails validation gets an error response (with its id when the
//! header was intact) and the connection is closed after the responses already
//! under way. The replica's data is never touched by a refused frame.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::chain::Replica;
use super::wire::{
    self, ChecksumRequest, EpochRequest, ExpandRequest, ExtentsRequest, FrameError, InfoRequest,
    IntentRequest, LayerRange, NameRequest, Op, RebuildingRequest, RequestHeader, ResponseHeader,
    SetChainRequest, SnapshotRequest, REQUEST_HEADER_LEN,
};
use crate::error::ErrorKind;

/// Requests one connection may have under way (executing or waiting to be
/// written back) at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// Payload bytes one connection may hold in memory at once (requests read
/// but not answered, answers not yet written).
pub const MAX_BUFFERED_BYTES_PER_CONN: usize = 64 << 20;
/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (descriptor exhaustion, aborted handshakes)
/// before trying again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Most extent chunks one `Extents` response carries.
const MAX_EXTENTS_PAGE: u32 = 16_384;
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

struct Response {
    header: ResponseHeader,
    payload: Vec<u8>,
    /// Released once the answer is written, so memory held for unanswered
    /// requests is bounded even when the client stops reading.
    _budget: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Memory a request holds while under way, in [`BUDGET_UNIT`]s.
const BUDGET_UNIT: usize = 4096;

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, replica: Arc<Replica>) -> io::Result<()> {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or a handshake aborted: existing
                // connections must keep serving, so wait and go on.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            warn!(peer = %peer, "too many connections; closing the new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let r = Arc::clone(&replica);
        let span = tracing::info_span!("conn", peer = %peer);
        tokio::spawn(
            async move {
                let _slot = slot;
                debug!("connected");
                match handle(stream, r).await {
                    Ok(()) => debug!("closed"),
                    Err(e) => warn!(error = %e, "connection closed"),
                }
            }
            .instrument(span),
        );
    }
}

async fn handle(stream: TcpStream, replica: Arc<Replica>) -> io::Result<()> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(SOCKET_BUFFER_BYTES, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Response>();
    let writer = tokio::spawn(write_responses(
        BufWriter::with_capacity(SOCKET_BUFFER_BYTES, wr),
        rx,
    ));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let memory = Arc::new(Semaphore::new(MAX_BUFFERED_BYTES_PER_CONN / BUDGET_UNIT));
    let mut batch: Vec<Job> = Vec::new();
    let result = loop {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let hdr = match RequestHeader::decode(&hb) {
            Ok(h) => h,
            Err(e) => break Err(refuse(&tx, e)),
        };
        let bytes = match hdr.op {
            Op::Read => hdr.length,
            _ => u64::from(hdr.payload_len),
        };
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT as u64).max(1))
            .expect("request sizes are bounded by the header checks");
        // Reserve before reading the payload or allocating the answer. Never
        // wait (for budget or for bytes) while holding an undispatched batch:
        // its requests hold budget that only their answers give back.
        let reserved = Arc::clone(&permits)
            .try_acquire_owned()
            .ok()
            .zip(Arc::clone(&memory).try_acquire_many_owned(units).ok());
        if reserved.is_none() || rd.buffer().len() < hdr.payload_len as usize {
            dispatch(&replica, &tx, std::mem::take(&mut batch));
        }
        let (permit, mem) = match reserved {
            Some(r) => r,
            None => {
                let p = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                let m = Arc::clone(&memory)
                    .acquire_many_owned(units)
                    .await
                    .expect("semaphore never closed");
                (p, m)
            }
        };
        let payload = match super::read_vec(&mut rd, hdr.payload_len as usize).await {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        if let Err(e) = wire::verify_payload(hdr.id, hdr.payload_crc, &payload) {
            break Err(refuse(&tx, e));
        }
        let job = Job {
            hdr,
            payload,
            budget: (permit, mem),
        };
        match run_inline(&replica, job) {
            Ok(answer) => {
                let _ = tx.send(answer);
            }
            Err(job) => batch.push(job),
        }
        // Frames that arrived together run as one job on the blocking pool:
        // the hand-off to a pool thread costs more than a cached 4 KiB
        // pwrite, so it is paid once per batch, not once per request.
        // Batches still run in parallel with each other.
        if rd.buffer().len() < REQUEST_HEADER_LEN || batch.len() >= MAX_BATCH {
            dispatch(&replica, &tx, std::mem::take(&mut batch));
        }
    };
    dispatch(&replica, &tx, batch);
    drop(tx);
    let _ = writer.await;
    result
}

/// One request read off the wire, waiting to run.
struct Job {
    hdr: RequestHeader,
    payload: Vec<u8>,
    budget: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Most requests run as one blocking job.
const MAX_BATCH: usize = 32;

/// Runs `batch` in order on the blocking pool, answering each request as soon
/// as it is done.
fn dispatch(replica: &Arc<Replica>, tx: &mpsc::UnboundedSender<Response>, batch: Vec<Job>) {
    if batch.is_empty() {
        return;
    }
    let r = Arc::clone(replica);
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        for job in batch {
            let result = execute(&r, job.hdr, job.payload);
            let _ = tx.send(answer(job.hdr.id, result, job.budget));
        }
    });
}

/// The fast path: reads served from the page cache and writes into it run
/// right here on the connection's task, skipping the hand-off to the
/// blocking pool, which costs more than the I/O itself. Anything that would
/// wait (a read missing the cache, a snapshot operation holding the chain)
/// and every other op is handed back for the pool.
fn run_inline(r: &Replica, job: Job) -> Result<Response, Job> {
    let h = job.hdr;
    let result = match h.op {
        Op::Write => match r.try_write(h.offset, &job.payload) {
            Some(res) => res.map(|()| Vec::new()),
            None => return Err(job),
        },
        Op::Read => {
            let Ok(len) = usize::try_from(h.length) else {
                return Err(job);
            };
            let mut buf = vec![0u8; len];
            match r.try_read(h.offset, &mut buf) {
                Some(res) => res.map(|()| buf),
                None => return Err(job),
            }
        }
        _ => return Err(job),
    };
    let result = result.map_err(|e| (e.kind(), e.to_string()));
    Ok(answer(h.id, result, job.budget))
}

fn answer(
    id: u64,
    result: OpResult,
    budget: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) -> Response {
    let (status, body) = match result {
        Ok(body) if body.len() <= wire::MAX_RESPONSE_BYTES as usize => (None, body),
        Ok(body) => (
            Some(ErrorKind::FailedPrecondition),
            format!("answer of {} bytes exceeds the protocol limit", body.len()).into_bytes(),
        ),
        Err((kind, msg)) => (Some(kind), msg.into_bytes()),
    };
    Response {
        header: ResponseHeader::new(id, status, &body),
        payload: body,
        _budget: Some(budget),
    }
}

/// Queues the error response for a refused frame and returns the error that
/// ends the connection.
fn refuse(tx: &mpsc::UnboundedSender<Response>, e: FrameError) -> io::Error {
    warn!(error = %e, "refusing frame");
    let kind = match e {
        FrameError::PayloadChecksum { .. } => ErrorKind::Corrupt,
        _ => ErrorKind::InvalidArgument,
    };
    let msg = e.to_string().into_bytes();
    let _ = tx.send(Response {
        header: ResponseHeader::new(e.id().unwrap_or(0), Some(kind), &msg),
        payload: msg,
        _budget: None,
    });
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn write_responses(
    mut wr: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Response>,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(r) = next {
            wr.write_all(&r.header.encode()).await?;
            wr.write_all(&r.payload).await?;
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

type OpResult = Result<Vec<u8>, (ErrorKind, String)>;

fn execute(r: &Replica, h: RequestHeader, payload: Vec<u8>) -> OpResult {
    let fail = |e: super::Error| (e.kind(), e.to_string());
    match h.op {
        Op::Read => {
            let len = usize::try_from(h.length)
                .map_err(|_| (ErrorKind::InvalidArgument, "length".to_string()))?;
            let mut buf = vec![0u8; len];
            r.read(h.offset, &mut buf).map_err(fail)?;
            Ok(buf)
        }
        Op::Write => r
            .write(h.offset, &payload)
            .map(|()| Vec::new())
            .map_err(fail),
        Op::Unmap => r
            .unmap(h.offset, h.length)
            .map(|()| Vec::new())
            .map_err(fail),
        Op::Flush => r.flush().map(|()| Vec::new()).map_err(fail),
        Op::Info => {
            // Callers that ask no question send nothing or `null`.
            if !payload.is_empty() {
                if let Some(q) = parse::<Option<InfoRequest>>(&payload)? {
                    r.check_volume(&q.volume).map_err(fail)?;
                }
            }
            json(&r.info())
        }
        Op::List => json(&r.list().map_err(fail)?),
        Op::Snapshot => {
            let q: SnapshotRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "snapshot");
            r.snapshot(&q.name, q.user_created, q.labels)
                .map_err(fail)?;
            Ok(Vec::new())
        }
        Op::RemoveSnapshot => {
            let q: NameRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "remove snapshot");
            r.remove_snapshot(&q.name).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::MarkRemoved => {
            let q: NameRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "mark snapshot removed");
            r.mark_removed(&q.name).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::Revert => {
            let q: NameRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "revert");
            r.revert(&q.name).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::Expand => {
            let q: ExpandRequest = parse(&payload)?;
            info!(size = q.size, "expand");
            r.expand(q.size).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::Extents => {
            let q: ExtentsRequest = parse(&payload)?;
            let max = q.max.clamp(1, MAX_EXTENTS_PAGE) as usize;
            json(&r.extents(&q.layer, q.from, max).map_err(fail)?)
        }
        Op::SetRebuilding => {
            let q: RebuildingRequest = parse(&payload)?;
            info!(rebuilding = q.rebuilding, "set rebuilding");
            r.set_rebuilding(q.rebuilding).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::LayerRead => {
            let q: LayerRange = parse(&payload)?;
            if q.len > wire::MAX_IO_BYTES {
                return Err((
                    ErrorKind::InvalidArgument,
                    format!(
                        "layer read of {} bytes exceeds {}",
                        q.len,
                        wire::MAX_IO_BYTES
                    ),
                ));
            }
            let mut buf = vec![0u8; usize::try_from(q.len).expect("bounded above")];
            r.layer_read(&q.layer, q.offset, &mut buf).map_err(fail)?;
            Ok(buf)
        }
        Op::LayerWrite => {
            let (q, data) =
                wire::decode_layer_write(&payload).map_err(|m| (ErrorKind::InvalidArgument, m))?;
            r.layer_write(&q.layer, q.offset, data).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::LayerPunch => {
            let q: LayerRange = parse(&payload)?;
            r.layer_punch(&q.layer, q.offset, q.len).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::SetChain => {
            let q: SetChainRequest = parse(&payload)?;
            info!(snapshots = q.chain.len(), "set chain");
            r.set_chain(&q.chain).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::FinishRebuild => {
            info!("finish rebuild");
            r.finish_rebuild().map_err(fail)?;
            Ok(Vec::new())
        }
        Op::SetEpoch => {
            let q: EpochRequest = parse(&payload)?;
            info!(epoch = q.epoch, members = ?q.members, "set epoch");
            r.set_epoch(q.epoch, q.members).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::UpdateIntent => {
            let q: IntentRequest = parse(&payload)?;
            r.update_intent(q.region_bytes, &q.add, &q.remove)
                .map_err(fail)?;
            Ok(Vec::new())
        }
        Op::Checksum => {
            let q: ChecksumRequest = parse(&payload)?;
            let crc = r.checksum(q.offset, q.len).map_err(fail)?;
            json(&crc)
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, (ErrorKind, String)> {
    serde_json::from_slice(payload).map_err(|e| {
        (
            ErrorKind::InvalidArgument,
            format!("malformed request body: {e}"),
        )
    })
}

fn json<T: serde::Serialize>(v: &T) -> OpResult {
    serde_json::to_vec(v).map_err(|e| (ErrorKind::Io, e.to_string()))
}
