//! The replica agent: serves this node's pools to engines on other nodes
//! over mutual TLS (`transport.rs`), with the protocol in `protocol.rs`.

pub mod protocol;
pub mod server;
pub mod transport;

#[cfg(test)]
mod tests;
