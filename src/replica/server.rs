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
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::store::Replica;
use super::wire::{
    self, ExpandRequest, ExtentsRequest, FrameError, NameRequest, Op, RebuildingRequest,
    RequestHeader, ResponseHeader, SnapshotRequest, REQUEST_HEADER_LEN,
};
use crate::error::ErrorKind;

/// Requests one connection may have executing at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most extent chunks one `Extents` response carries.
const MAX_EXTENTS_PAGE: u32 = 16_384;
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

struct Response {
    header: ResponseHeader,
    payload: Vec<u8>,
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, replica: Arc<Replica>) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let r = Arc::clone(&replica);
        let span = tracing::info_span!("conn", peer = %peer);
        tokio::spawn(
            async move {
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
    let writer = tokio::spawn(write_responses(BufWriter::with_capacity(SOCKET_BUFFER_BYTES, wr), rx));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
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
        let mut payload = vec![0u8; hdr.payload_len as usize];
        if let Err(e) = rd.read_exact(&mut payload).await {
            break Err(e);
        }
        if let Err(e) = wire::verify_payload(hdr.id, hdr.payload_crc, &payload) {
            break Err(refuse(&tx, e));
        }
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let r = Arc::clone(&replica);
        let tx = tx.clone();
        tokio::spawn(async move {
            let id = hdr.id;
            let res = tokio::task::spawn_blocking(move || execute(&r, hdr, payload)).await;
            let (status, body) = match res {
                Ok(Ok(body)) => (None, body),
                Ok(Err((kind, msg))) => (Some(kind), msg.into_bytes()),
                Err(join) => (Some(ErrorKind::Io), format!("request failed: {join}").into_bytes()),
            };
            let _ = tx.send(Response {
                header: ResponseHeader::new(id, status, &body),
                payload: body,
            });
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
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
            let len = usize::try_from(h.length).map_err(|_| (ErrorKind::InvalidArgument, "length".to_string()))?;
            let mut buf = vec![0u8; len];
            r.read(h.offset, &mut buf).map_err(fail)?;
            Ok(buf)
        }
        Op::Write => r.write(h.offset, &payload).map(|()| Vec::new()).map_err(fail),
        Op::Unmap => r.unmap(h.offset, h.length).map(|()| Vec::new()).map_err(fail),
        Op::Flush => r.flush().map(|()| Vec::new()).map_err(fail),
        Op::Info => json(&r.info()),
        Op::List => json(&r.list().map_err(fail)?),
        Op::Snapshot => {
            let q: SnapshotRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "snapshot");
            r.snapshot(&q.name, q.user_created, q.labels).map_err(fail)?;
            Ok(Vec::new())
        }
        Op::RemoveSnapshot => {
            let q: NameRequest = parse(&payload)?;
            info!(snapshot.name = %q.name, "remove snapshot");
            r.remove_snapshot(&q.name).map_err(fail)?;
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
            r.set_rebuilding(q.rebuilding).map_err(fail)?;
            Ok(Vec::new())
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, (ErrorKind, String)> {
    serde_json::from_slice(payload)
        .map_err(|e| (ErrorKind::InvalidArgument, format!("malformed request body: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> OpResult {
    serde_json::to_vec(v).map_err(|e| (ErrorKind::Io, e.to_string()))
}
