//! The engine's control API (`proto/engine.proto`) over gRPC, and its
//! Prometheus endpoint. This is the engine's boundary: engine errors become
//! gRPC status codes here and nowhere else.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tonic::{Request, Response, Status};

use super::volume::{Health, Mode, VolumeStatus};
use super::{Error, Volume};
use crate::replica::chain::LayerInfo;

/// Code generated from `proto/engine.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("shorthorn.engine.v1");
}

pub use pb::engine_client::EngineClient;

/// Serves a volume's control API.
#[derive(Debug, Clone)]
pub struct ControlService {
    volume: Volume,
}

impl ControlService {
    /// The service for `volume`.
    pub fn new(volume: Volume) -> Self {
        Self { volume }
    }

    /// Serves the API on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(pb::engine_server::EngineServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

/// Serves `GET /metrics` in the Prometheus text format on `listener`.
pub async fn serve_metrics(
    volume: Volume,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let v = volume.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    v.metrics_text(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

fn status(e: Error) -> Status {
    Status::new(e.kind().grpc_code(), e.to_string())
}

fn to_pb_status(s: &VolumeStatus, revisions: &[Option<u64>]) -> pb::StatusResponse {
    pb::StatusResponse {
        volume: s.name.clone(),
        size_bytes: s.size,
        health: match s.health {
            Health::Healthy => pb::Health::Healthy,
            Health::Degraded => pb::Health::Degraded,
            Health::Faulted => pb::Health::Faulted,
        } as i32,
        epoch: s.epoch,
        intent_regions: s.intent_regions as u64,
        replicas: s
            .replicas
            .iter()
            .zip(revisions.iter().chain(std::iter::repeat(&None)))
            .map(|(r, rev)| pb::Replica {
                revision: *rev,
                address: r.addr.clone(),
                mode: match r.mode {
                    Mode::ReadWrite => pb::ReplicaMode::ReadWrite,
                    Mode::WriteOnly => pb::ReplicaMode::WriteOnly,
                    Mode::Failed => pb::ReplicaMode::Failed,
                } as i32,
                error: r.error.clone().unwrap_or_default(),
                rebuild: r.rebuild.as_ref().map(|p| pb::Rebuild {
                    done_bytes: p.done_bytes,
                    total_bytes: p.total_bytes,
                    copied_bytes: p.copied_bytes,
                }),
            })
            .collect(),
    }
}

fn to_pb_snapshots(layers: Vec<LayerInfo>) -> pb::SnapshotsResponse {
    pb::SnapshotsResponse {
        snapshots: layers
            .into_iter()
            .map(|l| pb::Snapshot {
                name: l.name,
                file: l.file,
                parent: l.parent,
                children: l.children,
                head: l.head,
                active: l.active,
                created: l.created,
                user_created: l.user_created,
                removed: l.removed,
                allocated_bytes: l.allocated_bytes,
                labels: l.labels.into_iter().collect(),
            })
            .collect(),
    }
}

// tonic's handlers return `Status` by value; boxing it here would only be
// unboxed again at the call site.
#[allow(clippy::result_large_err)]
fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

impl ControlService {
    async fn status_response(&self) -> Result<Response<pb::StatusResponse>, Status> {
        let revisions = self.volume.revisions().await;
        Ok(Response::new(to_pb_status(
            &self.volume.status(),
            &revisions,
        )))
    }

    async fn snapshots(&self) -> Result<Response<pb::SnapshotsResponse>, Status> {
        let l = self.volume.list_snapshots().await.map_err(status)?;
        Ok(Response::new(to_pb_snapshots(l)))
    }
}

#[tonic::async_trait]
impl pb::engine_server::Engine for ControlService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.status_response().await
    }

    async fn add_replica(
        &self,
        r: Request<pb::ReplicaRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let addr = r.into_inner().address;
        required("address", &addr)?;
        tracing::info!(volume.id = %self.volume.name(), replica.addr = %addr, "add replica");
        self.volume.add_replica(&addr).await.map_err(status)?;
        self.status_response().await
    }

    async fn remove_replica(
        &self,
        r: Request<pb::ReplicaRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let addr = r.into_inner().address;
        required("address", &addr)?;
        tracing::info!(volume.id = %self.volume.name(), replica.addr = %addr, "remove replica");
        self.volume.remove_replica(&addr).await.map_err(status)?;
        self.status_response().await
    }

    async fn snapshot(
        &self,
        r: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotsResponse>, Status> {
        let q = r.into_inner();
        required("name", &q.name)?;
        let labels: BTreeMap<String, String> = q.labels.into_iter().collect();
        self.volume
            .snapshot(&q.name, labels)
            .await
            .map_err(status)?;
        self.snapshots().await
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::SnapshotsResponse>, Status> {
        self.snapshots().await
    }

    async fn remove_snapshot(
        &self,
        r: Request<pb::SnapshotNameRequest>,
    ) -> Result<Response<pb::SnapshotsResponse>, Status> {
        let name = r.into_inner().name;
        required("name", &name)?;
        self.volume.remove_snapshot(&name).await.map_err(status)?;
        self.snapshots().await
    }

    async fn revert(
        &self,
        r: Request<pb::SnapshotNameRequest>,
    ) -> Result<Response<pb::SnapshotsResponse>, Status> {
        let name = r.into_inner().name;
        required("name", &name)?;
        self.volume.revert(&name).await.map_err(status)?;
        self.snapshots().await
    }

    async fn expand(
        &self,
        r: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let size = r.into_inner().size_bytes;
        self.volume.expand(size).await.map_err(status)?;
        self.status_response().await
    }
}

/// Binds `addr` for a server, with a message naming the address.
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let a: SocketAddr = addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr:?} is not a host:port address"),
        )
    })?;
    tokio::net::TcpListener::bind(a).await
}
