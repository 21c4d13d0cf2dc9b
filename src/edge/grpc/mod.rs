//! gRPC on Unix sockets, accepting every real client: the kubelet's
//! (grpc-go), grpc-python's and tonic's. Each accepted connection's
//! client→server bytes go through [`authority::Rewriter`] on their way to
//! tonic, so an `:authority` that is a socket path no longer makes h2 reset
//! the stream. Every Terna gRPC server on a Unix socket takes its
//! connections from [`uds::incoming`]. [`hpack`] is the header compression
//! the rewriter decodes and encodes with.

pub mod authority;
pub mod hpack;
pub mod uds;
