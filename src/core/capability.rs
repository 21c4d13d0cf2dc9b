//! Volume capabilities as the core understands them, parsed from CSI by
//! `src/edge/csi/` and checked here.

use crate::core::class::FsType;
use crate::core::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    /// Terna volumes are assembled on one node at a time (RWO).
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Block,
    Mount {
        fs_type: Option<FsType>,
        mount_flags: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    /// Why this capability cannot be served, or `None` when it can.
    pub fn unsupported_reason(&self) -> Option<String> {
        if !self.mode.is_supported() {
            return Some(format!(
                "access mode {:?} is not supported: Terna volumes attach to one node at a time",
                self.mode
            ));
        }
        None
    }

    pub fn check(&self) -> Result<()> {
        match self.unsupported_reason() {
            Some(reason) => Err(Error::invalid(reason)),
            None => Ok(()),
        }
    }
}
