//! shorthorn's own gRPC APIs between its processes, generated from
//! `proto/manager.proto` (nodes → controller) and `proto/agent.proto`
//! (controller → a node's instance manager). Shared here because both
//! ends are in this crate and neither layer may import the other.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The controller's manager API.
pub mod manager {
    tonic::include_proto!("shorthorn.manager.v1");
}

/// A node agent's API.
pub mod agent {
    tonic::include_proto!("shorthorn.agent.v1");
}
