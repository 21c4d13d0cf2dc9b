//! A pool on this node's own disk, as an engine here reaches it: its
//! replicas are read and written as local files, but fenced through this
//! node's replica agent too. Another node's engine writes them through
//! that agent; a stale one (frozen, cut off, then resumed after this node
//! took its volume over) could otherwise still land writes there, since a
//! local file's own fence stops nobody.

use std::io;
use std::sync::Arc;

use crate::core::error::Result;
use crate::core::pool::{Pool, ReplicaIo};
use crate::datapath::replica::local::LocalPool;
use crate::datapath::replica::remote::RemotePool;

pub struct AgentFencedPool {
    local: LocalPool,
    /// The same pool, as this node's agent serves it to other nodes.
    agent: Arc<RemotePool>,
}

impl AgentFencedPool {
    pub fn new(local: LocalPool, agent: RemotePool) -> AgentFencedPool {
        AgentFencedPool {
            local,
            agent: Arc::new(agent),
        }
    }
}

impl Pool for AgentFencedPool {
    fn create(&self, name: &str, size: u64) -> Result<()> {
        self.local.create(name, size)
    }
    fn grow(&self, name: &str, size: u64) -> Result<()> {
        self.local.grow(name, size)
    }
    fn delete(&self, name: &str) -> Result<()> {
        self.local.delete(name)
    }
    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        self.local.size_of(name)
    }
    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
        Ok(Box::new(AgentFenced {
            local: self.local.open(name)?,
            agent: self.agent.clone(),
            name: name.to_string(),
        }))
    }
    fn recreate_empty(&self, name: &str) -> Result<()> {
        self.local.recreate_empty(name)
    }
    fn capacity(&self) -> Result<u64> {
        self.local.capacity()
    }
    /// The claim this engine fences the agent's connections under.
    fn act_under_claim(&self, epoch: u64) {
        self.agent.act_under_claim(epoch);
    }
}

struct AgentFenced {
    local: Box<dyn ReplicaIo>,
    agent: Arc<RemotePool>,
    name: String,
}

impl ReplicaIo for AgentFenced {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.local.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.local.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.local.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.local.discard(offset, len)
    }
    fn check(&self) -> std::result::Result<(), String> {
        self.local.check()
    }
    /// Raises the agent's claim floor for this replica (and waits for the
    /// writes it is applying), so no older claim's engine writes it again.
    fn fence(&self) -> io::Result<()> {
        let remote = self.agent.open(&self.name).map_err(|e| {
            io::Error::other(format!(
                "cannot fence {} through this node's agent: {}",
                self.name,
                e.report()
            ))
        })?;
        remote.fence()?;
        self.local.fence()
    }
    /// Only engines elsewhere write this replica, and only through the
    /// agent: its fence is enough, and the file this engine has open stays
    /// the replica.
    fn fence_empty(&self) -> io::Result<()> {
        self.fence()
    }
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        self.local.direct_fd()
    }
    fn size(&self) -> Option<io::Result<u64>> {
        self.local.size()
    }
}
