//! The replica agent: serves this node's pools to engines on other nodes
//! over TCP, with the protocol in `protocol.rs`.

pub mod protocol;
pub mod server;

#[cfg(test)]
mod tests;
