//! Volumes' dirty maps in the data dir (`dirty/<id>/dirty-<index>.map`):
//! they outlive staging, so a replica that returns while its volume is
//! unstaged still catches up incrementally. Every read, write and removal
//! of a map file goes through here; maps are written atomically and
//! private (`host::files`), so a crash leaves the old map or the new one.

use std::path::{Path, PathBuf};

use crate::core::data_dir::dirty_dir;
use crate::core::dirty::{DirtyMap, DirtyMapStore};
use crate::core::error::{Error, Result};
use crate::datapath::host::files;

/// Persisted name of replica `index`'s dirty map in its volume's dir.
fn dirty_map_file(index: usize) -> String {
    format!("dirty-{index}.map")
}

/// Every volume's dirty maps in one data dir.
pub struct DirtyMapFiles {
    data_dir: PathBuf,
}

impl DirtyMapFiles {
    pub fn new(data_dir: &Path) -> DirtyMapFiles {
        DirtyMapFiles {
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The maps of one volume. Its dir is made by `create_dir`.
    pub fn volume(&self, volume_id: &str) -> VolumeDirtyMaps {
        VolumeDirtyMaps::in_dir(dirty_dir(&self.data_dir, volume_id))
    }

    /// Replica `index`'s map; `None` when it has none (never faulted, or
    /// caught up since).
    pub fn load(&self, volume_id: &str, index: usize) -> Result<Option<DirtyMap>> {
        self.volume(volume_id).load(index)
    }

    /// Persists replica `index`'s map, making the volume's dir if need be.
    pub fn save(&self, volume_id: &str, index: usize, map: &DirtyMap) -> Result<()> {
        let maps = self.volume(volume_id);
        maps.create_dir()?;
        maps.save(index, map)
    }

    /// Removes replica `index`'s map; removing what is gone is success.
    pub fn remove(&self, volume_id: &str, index: usize) -> Result<()> {
        self.volume(volume_id).remove(index)
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

/// One volume's dirty maps, in one directory: what an engine persists to
/// while it serves (its dir made once, before it starts).
pub struct VolumeDirtyMaps {
    dir: PathBuf,
}

impl VolumeDirtyMaps {
    pub fn in_dir(dir: PathBuf) -> VolumeDirtyMaps {
        VolumeDirtyMaps { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the dir, private (0700).
    pub fn create_dir(&self) -> Result<()> {
        files::private_dir(&self.dir).map(|_| ())
    }

    fn path(&self, index: usize) -> PathBuf {
        self.dir.join(dirty_map_file(index))
    }

    /// Replica `index`'s map; `None` when there is no file. A file that
    /// does not decode (torn by an older version, damaged) is an error: the
    /// caller decides what is then known.
    pub fn load(&self, index: usize) -> Result<Option<DirtyMap>> {
        let path = self.path(index);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        DirtyMap::decode(&bytes)
            .map(Some)
            .ok_or_else(|| Error::internal(format!("{} is not a dirty map", path.display())))
    }

    /// Persists replica `index`'s map in the (existing) dir.
    pub fn save(&self, index: usize, map: &DirtyMap) -> Result<()> {
        files::atomic_write(&self.path(index), &map.encode())
    }

    /// Removes replica `index`'s map; removing what is gone is success.
    pub fn remove(&self, index: usize) -> Result<()> {
        let path = self.path(index);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::dirty::DEFAULT_REGION;

    #[test]
    fn maps_round_trip_where_existing_data_dirs_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let maps = DirtyMapFiles::new(dir.path());
        assert!(maps.load("tv-1", 2).unwrap().is_none());
        let mut map = DirtyMap::new(8 << 20, DEFAULT_REGION);
        map.mark(3 << 20, 1);
        maps.save("tv-1", 2, &map).unwrap();
        let file = dir.path().join("dirty/tv-1/dirty-2.map");
        assert_eq!(std::fs::read(&file).unwrap(), map.encode());
        assert_eq!(maps.load("tv-1", 2).unwrap(), Some(map));
        maps.remove("tv-1", 2).unwrap();
        maps.remove("tv-1", 2).unwrap();
        assert!(!file.exists());
        maps.forget("tv-1").unwrap();
        maps.forget("tv-1").unwrap();
        assert!(!dir.path().join("dirty/tv-1").exists());
    }

    #[test]
    fn a_damaged_map_is_an_error_not_an_empty_map() {
        let dir = tempfile::tempdir().unwrap();
        let maps = DirtyMapFiles::new(dir.path());
        maps.volume("tv-1").create_dir().unwrap();
        std::fs::write(dir.path().join("dirty/tv-1/dirty-0.map"), b"torn").unwrap();
        assert!(maps.load("tv-1", 0).is_err());
    }
}
