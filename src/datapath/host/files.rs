//! Private files, and the state store kept in them (`FileStore`).
//!
//! The file store writes each record as `<id>.json` by write-temp, fsync,
//! rename, fsync-directory, so a crash leaves either the old or the new
//! record, never a torn one. Writers in several processes (the node plugin
//! and each volume's engine) serialise through an flock on `.lock`.
//!
//! Private: records are 0600 in a 0700 directory (`atomic_write` makes
//! every file 0600, `private_dir` every directory 0700). Temp files are
//! named `.<file>.terna-tmp-<pid>-<n>`; a crash between write and rename
//! leaves one, and opening the store removes them (under the lock, so none
//! belongs to a write still under way).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

use crate::core::error::{Error, ErrorKind, Result};
use crate::core::store::StateStore;
use crate::core::volume::VolumeRecord;

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Opens (creating it private) the store in `dir`, tightening records
    /// older versions left readable and removing temp files crashed writes
    /// left behind.
    pub fn open(dir: &Path) -> Result<FileStore> {
        private_dir(dir)?;
        let store = FileStore {
            dir: dir.to_path_buf(),
        };
        let _lock = store.lock()?;
        let entries = fs::read_dir(dir)
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Only plain files: never through a link, never a directory.
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if !meta.file_type().is_file() {
                continue;
            }
            if is_temp_name(name) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed a temp file a crashed write left")
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale temp file")
                    }
                }
            } else if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(PRIVATE_FILE_MODE))
                    .map_err(|e| {
                        Error::io(format!("cannot restrict {}", entry.path().display()), e)
                    })?;
            }
        }
        Ok(store)
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
            .mode(PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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

/// Mode of every file `atomic_write` writes: owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of the directories of private state: owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// What marks a temp file of `atomic_write`.
const TEMP_MARK: &str = ".terna-tmp-";

/// Whether `name` is a temp file of `atomic_write`: `.<file>.terna-tmp-<pid>-<n>`,
/// or `.<file>.tmp-<pid>` as versions before named them.
pub fn is_temp_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    if let Some((file, tail)) = rest.rsplit_once(TEMP_MARK) {
        return !file.is_empty()
            && tail
                .split_once('-')
                .is_some_and(|(pid, n)| digits(pid) && digits(n));
    }
    rest.rsplit_once(".tmp-")
        .is_some_and(|(file, pid)| !file.is_empty() && digits(pid))
}

/// Creates `dir` (and missing parents) 0700, or tightens an existing one to
/// 0700 (never `/`). Returns the mode it had when it was tightened.
pub fn private_dir(dir: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create directory {}", dir.display()), e))?;
    let meta = fs::metadata(dir)
        .map_err(|e| Error::io(format!("cannot stat directory {}", dir.display()), e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 || dir.parent().is_none() {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(|e| Error::io(format!("cannot restrict directory {}", dir.display()), e))?;
    Ok(Some(mode))
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either
/// the old content or the new, and the new survives power loss once this
/// returns. The file is 0600, whatever mode the one it replaces had.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent dir", path.display())))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::internal(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}{TEMP_MARK}{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let result = (|| {
        // A leftover of a crashed process that had our pid is in the way.
        let mut f = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create()?
            }
            other => other?,
        };
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
    use crate::core::volume::tests::record;

    #[test]
    fn file_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        crate::core::store::conformance::run(&store, "file-store");
    }

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

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn temp_names_are_recognisable_and_nothing_else_is_one() {
        for temp in [
            ".tv-a.json.terna-tmp-12-0",
            ".dirty-0.map.terna-tmp-4242-17",
            ".x.claim.terna-tmp-1-2",
            ".tv-a.json.tmp-999",
        ] {
            assert!(is_temp_name(temp), "{temp}");
        }
        for other in [
            "tv-a.json",
            ".lock",
            "tv-a.json.terna-tmp-12-0",
            ".terna-tmp-12-0",
            ".tv-a.json.terna-tmp-12",
            ".tv-a.json.terna-tmp-x-0",
            ".tv-a.json.tmp-",
            ".tv-a.json.tmp-12a",
            ".tmp-12",
        ] {
            assert!(!is_temp_name(other), "{other}");
        }
    }

    /// A crash between writing a temp file and renaming it leaves the temp
    /// file; the next open of the store removes it, and only such files.
    #[test]
    fn temp_files_of_crashed_writes_are_removed_when_the_store_opens() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/volumes");
        let store = FileStore::open(&dir).unwrap();
        let mut a = record(1);
        a.id = "tv-a".into();
        store.put(&a).unwrap();
        drop(store);
        // What crashed writers left, ours and an older version's.
        for stale in [".tv-a.json.terna-tmp-4242-3", ".tv-b.json.tmp-77"] {
            fs::write(dir.join(stale), b"{half").unwrap();
        }
        // Not temp files, or not plain files, or not the store's: kept.
        let keep = ["notes.txt", "tv-a.json.terna-tmp-1-1"];
        for k in keep {
            fs::write(dir.join(k), b"x").unwrap();
        }
        fs::create_dir(dir.join(".sub.json.terna-tmp-1-1")).unwrap();
        let outside = root.path().join(".tv-c.json.terna-tmp-1-1");
        fs::write(&outside, b"x").unwrap();
        let target = root.path().join("target");
        fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(".tv-d.json.terna-tmp-1-1")).unwrap();

        let store = FileStore::open(&dir).unwrap();
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".lock",
                ".sub.json.terna-tmp-1-1",
                ".tv-d.json.terna-tmp-1-1",
                "notes.txt",
                "tv-a.json",
                "tv-a.json.terna-tmp-1-1"
            ]
        );
        assert!(outside.exists() && target.exists());
        assert_eq!(store.get("tv-a").unwrap(), Some(a));
    }

    #[test]
    fn records_are_private_and_old_ones_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/volumes");
        // As an older version left it.
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("tv-old.json"), b"{}").unwrap();
        fs::set_permissions(dir.join("tv-old.json"), fs::Permissions::from_mode(0o644)).unwrap();
        let store = FileStore::open(&dir).unwrap();
        assert_eq!(mode_of(&dir), PRIVATE_DIR_MODE);
        assert_eq!(mode_of(&dir.join("tv-old.json")), PRIVATE_FILE_MODE);
        let mut a = record(1);
        a.id = "tv-a".into();
        store.put(&a).unwrap();
        assert_eq!(mode_of(&dir.join("tv-a.json")), PRIVATE_FILE_MODE);
        assert_eq!(mode_of(&dir.join(".lock")), PRIVATE_FILE_MODE);
        // atomic_write replaces a world-readable file with a private one.
        let other = root.path().join("cfg");
        fs::write(&other, b"old").unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o644)).unwrap();
        atomic_write(&other, b"new").unwrap();
        assert_eq!(mode_of(&other), PRIVATE_FILE_MODE);
        assert_eq!(fs::read(&other).unwrap(), b"new");
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::process::CommandExt;
            fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
            let out = std::process::Command::new("cat")
                .arg(dir.join("tv-a.json"))
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            assert!(!out.status.success(), "nobody read a volume record");
        }
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
