//! Volumes' dirty maps in the data dir (`dirty/<id>/dirty-<index>.map`):
//! they outlive staging, so a replica that returns while its volume is
//! unstaged still catches up incrementally.

use std::path::{Path, PathBuf};

use crate::core::data_dir::dirty_dir;
use crate::core::dirty::DirtyMapStore;
use crate::core::error::{Error, Result};

pub struct DirtyMapFiles {
    data_dir: PathBuf,
}

impl DirtyMapFiles {
    pub fn new(data_dir: &Path) -> DirtyMapFiles {
        DirtyMapFiles {
            data_dir: data_dir.to_path_buf(),
        }
    }
}

impl DirtyMapStore for DirtyMapFiles {
    fn forget(&self, volume_id: &str) -> Result<()> {
        let dir = dirty_dir(&self.data_dir, volume_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove {}", dir.display()), e)),
        }
    }
}
