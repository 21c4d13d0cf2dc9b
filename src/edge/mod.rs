//! The edges: CSI gRPC (the only code that sees CSI and kubelet protobuf
//! types), Kubernetes (the only code that sees kube and k8s-openapi types),
//! and the metrics HTTP endpoint.
#![forbid(unsafe_code)]

pub mod csi;
pub mod grpc;
pub mod kube;
pub mod metrics;
