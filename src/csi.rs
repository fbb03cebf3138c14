//! The Container Storage Interface's messages and services (spec v1.12),
//! generated from `proto/csi.proto` at build time. Shared by the
//! controller and node plugins and by tests' CSI clients.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("csi.v1");
}
pub use generated::*;

/// The CSI driver name (the StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "driver.shorthorn.io";

/// Publish-context key naming the frontend the volume's engine serves on
/// the node it was published to (`iscsi` or `fuse`): ControllerPublishVolume
/// sets it, NodeStageVolume attaches accordingly.
pub const CTX_FRONTEND: &str = "shorthorn.io/frontend";
/// Publish-context keys for the `iscsi` frontend: the portal (ip:port) and
/// the target name, for the operator to see; the node attaches to what its
/// own engine serves.
pub const CTX_ISCSI_PORTAL: &str = "shorthorn.io/iscsi-portal";
/// See [`CTX_ISCSI_PORTAL`].
pub const CTX_ISCSI_TARGET: &str = "shorthorn.io/iscsi-target";

/// This driver's name and version, as both plugins report them.
pub fn plugin_info() -> GetPluginInfoResponse {
    GetPluginInfoResponse {
        name: DRIVER_NAME.to_owned(),
        vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
        manifest: std::collections::HashMap::new(),
    }
}

/// A GetPluginCapabilities answer listing `services`.
pub fn plugin_services(
    services: &[plugin_capability::service::Type],
) -> GetPluginCapabilitiesResponse {
    use plugin_capability::{Service, Type};
    GetPluginCapabilitiesResponse {
        capabilities: services
            .iter()
            .map(|t| PluginCapability {
                r#type: Some(Type::Service(Service { r#type: *t as i32 })),
            })
            .collect(),
    }
}

/// The socket path of a `unix:///absolute/path` CSI endpoint.
pub fn unix_endpoint(endpoint: &str) -> Option<std::path::PathBuf> {
    endpoint
        .strip_prefix("unix://")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// Binds a unix socket at `path` (creating its directory), replacing a
/// stale socket file a killed process left behind.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// A channel to the plugin serving the unix socket at `path` (one try).
pub async fn connect_unix(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(unix_dialer(path.to_path_buf()))
        .await
}

/// A tonic connector that dials the unix socket at `path`, as kubelet and
/// the CSI sidecars reach a plugin: `Endpoint::connect_with_connector`.
pub fn unix_dialer(path: std::path::PathBuf) -> UnixDialer {
    UnixDialer(path)
}

/// See [`unix_dialer`].
#[derive(Debug, Clone)]
pub struct UnixDialer(std::path::PathBuf);

impl tonic::codegen::Service<tonic::codegen::http::Uri> for UnixDialer {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let p = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(p).await?,
            ))
        })
    }
}
