//! The state store: volume records, behind one trait so the cluster role can
//! keep them in Kubernetes while standalone keeps them in files.
//!
//! The file store writes each record as `<id>.json` by write-temp, fsync,
//! rename, fsync-directory, so a crash leaves either the old or the new
//! record, never a torn one. Writers in several processes (the node plugin
//! and each volume's engine) serialise through an flock on `.lock`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, ErrorKind, Result};
use crate::volume::VolumeRecord;

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

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<FileStore> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create state dir {}", dir.display()), e))?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            Error::io(
                format!("cannot lock {}", path.display()),
                std::io::Error::from(errno),
            )
        })
    }

    fn read(&self, path: &Path) -> Result<Option<VolumeRecord>> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::with_source(
                    ErrorKind::Internal,
                    format!("state record {} is unreadable", path.display()),
                    e,
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    fn write(&self, record: &VolumeRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::internal(format!("cannot encode volume {}: {e}", record.id)))?;
        atomic_write(&self.path(&record.id), &bytes)
    }
}

impl StateStore for FileStore {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.read(&self.path(id))
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("cannot list {}", self.dir.display()), e))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(format!("cannot list {}", self.dir.display()), e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(record) = self.read(&path)?
            {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    fn put(&self, record: &VolumeRecord) -> Result<()> {
        let _lock = self.lock()?;
        self.write(record)
    }

    fn insert(&self, record: &VolumeRecord) -> Result<()> {
        let _lock = self.lock()?;
        if self.get(&record.id)?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("volume {} already has a record", record.id),
            ));
        }
        self.write(record)
    }

    fn remove(&self, id: &str) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), e)),
        }
    }

    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> Result<bool>,
    ) -> Result<Option<VolumeRecord>> {
        let _lock = self.lock()?;
        let Some(mut record) = self.get(id)? else {
            return Ok(None);
        };
        if change(&mut record)? {
            self.write(&record)?;
        }
        Ok(Some(record))
    }
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either
/// the old content or the new, and the new survives power loss once this returns.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent dir", path.display())))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::internal(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("cannot write {}", path.display()), e));
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync dir {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::tests::record;

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut a = record(3);
        a.id = "tv-a".into();
        let mut b = record(2);
        b.id = "tv-b".into();
        store.put(&b).unwrap();
        store.put(&a).unwrap();
        assert_eq!(store.get("tv-a").unwrap(), Some(a.clone()));
        assert_eq!(
            store
                .list()
                .unwrap()
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["tv-a", "tv-b"]
        );
        store.remove("tv-a").unwrap();
        store.remove("tv-a").unwrap();
        assert_eq!(store.get("tv-a").unwrap(), None);
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| n == ".lock" || n.ends_with(".json")),
            "{names:?}"
        );
    }

    #[test]
    fn update_writes_only_when_changed_and_is_serialised_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::open(dir.path()).unwrap());
        let mut a = record(1);
        a.id = "tv-a".into();
        a.generation = 0;
        store.put(&a).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        store
                            .update("tv-a", &mut |r| {
                                r.generation += 1;
                                Ok(true)
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.get("tv-a").unwrap().unwrap().generation, 100);
        assert!(
            store
                .update("tv-missing", &mut |_| Ok(true))
                .unwrap()
                .is_none()
        );
    }
}
