//! The Container Storage Interface's messages and services (spec v1.12),
//! generated from `proto/csi.proto` at build time. Shared by the
//! controller and node plugins and by tests' CSI clients.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("csi.v1");
