//! The state store: volume records, behind one trait so the cluster role can
//! keep them in Kubernetes while standalone keeps them in files
//! (`datapath::host::files::FileStore`).

use crate::core::error::Result;
use crate::core::volume::VolumeRecord;

pub mod conformance;

pub trait StateStore: Send + Sync {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>>;
    /// Every record, ordered by id.
    fn list(&self) -> Result<Vec<VolumeRecord>>;
    /// Creates or replaces the record.
    fn put(&self, record: &VolumeRecord) -> Result<()>;
    /// Creates the record; `AlreadyExists` when one with its id exists, so
    /// two writers racing to create a volume cannot both win.
    fn insert(&self, record: &VolumeRecord) -> Result<()>;
    /// Removing what is already gone is success.
    fn remove(&self, id: &str) -> Result<()>;
    /// Read-modify-write under the store's lock. `change` returns whether it
    /// changed anything; only then is the record written. `Ok(None)` when
    /// there is no such record.
    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> Result<bool>,
    ) -> Result<Option<VolumeRecord>>;
}
