//! The cluster CA on disk: one JSON file (`CaSet`), private (0600 in a 0700
//! directory), replaced atomically, so a reader sees a whole set before or
//! after a rotation step and never half of one.

use std::path::{Path, PathBuf};

use crate::core::config::Config;

use super::TlsError;
use super::ca::{CaSet, Schedule, Step};

/// The CA file, read and checked.
pub fn load(path: &Path) -> Result<CaSet, TlsError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    CaSet::from_json(&bytes)
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Replaces the CA file with `set`.
pub fn save(path: &Path, set: &CaSet) -> Result<(), TlsError> {
    if let Some(dir) = path.parent() {
        crate::datapath::host::files::private_dir(dir)
            .map_err(|e| write_error(path, e.report()))?;
    }
    crate::datapath::host::files::atomic_write(path, &set.to_json()?)
        .map_err(|e| write_error(path, e.report()))
}

/// Makes a new CA at `path` unless one is there; two processes racing to
/// make one end up sharing the winner's.
pub fn ensure(path: &Path) -> Result<(), TlsError> {
    if path.exists() {
        return Ok(());
    }
    let set = CaSet::create(super::unix_now(), super::ca::CA_LIFETIME)?;
    let name = path
        .file_name()
        .ok_or_else(|| write_error(path, "no file name"))?;
    let draft = path.with_file_name(format!(
        ".{}.new-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    save(&draft, &set)?;
    // A link, unlike a rename, never replaces a CA another process made.
    let linked = std::fs::hard_link(&draft, path);
    let _ = std::fs::remove_file(&draft);
    match linked {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| write_error(path, e))?;
            }
            tracing::info!(file = %path.display(), ca = %set.current.name, "made the cluster CA");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(write_error(path, e)),
    }
}

/// Takes rotation step `step` (or the next one) on the CA file; returns the
/// step taken and the new set.
pub fn rotate(path: &Path, step: Option<Step>, schedule: &Schedule) -> Result<CaSet, TlsError> {
    let set = load(path)?;
    let step = step.unwrap_or_else(|| set.next_step());
    let rotated = set.rotated(step, super::unix_now(), schedule.ca_lifetime)?;
    save(path, &rotated)?;
    tracing::info!(file = %path.display(), ?step, ca = %rotated.current.name, "cluster CA rotated");
    Ok(rotated)
}

/// Copies the CA set at `source` (an admin's shared file, a mounted Secret)
/// to `dest` when they differ; the source is checked first, so a bad one
/// leaves `dest` alone. Whether it copied.
pub fn mirror(source: &Path, dest: &Path) -> Result<bool, TlsError> {
    let set = load(source)?;
    if load(dest).is_ok_and(|old| old == set) {
        return Ok(false);
    }
    save(dest, &set)?;
    Ok(true)
}

/// How often a mirrored CA file is compared with its source.
pub const MIRROR_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `config`'s CA source, relative paths under the data dir.
fn source_of(config: &Config, data_dir: &Path) -> Option<PathBuf> {
    config.cluster_ca_file.as_ref().map(|f| {
        if f.is_absolute() {
            f.clone()
        } else {
            data_dir.join(f)
        }
    })
}

/// Makes the data dir's CA file ready for its processes, by a process that
/// owns the data dir (standalone, agent, node): copied from
/// `cluster_ca_file` when one is set, else made once and kept. Then, when
/// there is a source, a thread copies it again whenever it changes, so a
/// rotation reaches every process of the data dir, engines included.
pub fn prepare(config: &Config, data_dir: &Path) -> Result<(), TlsError> {
    let dest = crate::core::data_dir::ca_file(data_dir);
    let Some(source) = source_of(config, data_dir) else {
        return ensure(&dest);
    };
    mirror(&source, &dest)?;
    let spawned = std::thread::Builder::new()
        .name("ca-mirror".into())
        .spawn(move || {
            loop {
                std::thread::sleep(MIRROR_EVERY);
                match mirror(&source, &dest) {
                    Ok(true) => tracing::info!(source = %source.display(), "cluster CA changed; copied"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot copy the cluster CA; keeping the last copy"),
                }
            }
        });
    spawned
        .map(drop)
        .map_err(|e| write_error(Path::new("ca-mirror thread"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_makes_one_private_ca_and_keeps_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("tls").join("ca.json");
        ensure(&file).expect("made");
        let first = load(&file).expect("load");
        ensure(&file).expect("kept");
        assert_eq!(load(&file).expect("load"), first);
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(file.parent().expect("dir"))
            .expect("ls")
            .collect();
        assert_eq!(leftovers.len(), 1, "no drafts left: {leftovers:?}");
    }

    #[test]
    fn rotation_steps_go_to_the_file_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("ca.json");
        ensure(&file).expect("made");
        let schedule = Schedule::default();
        let staged = rotate(&file, None, &schedule).expect("stage");
        assert!(staged.next.is_some());
        assert!(rotate(&file, Some(Step::Retire), &schedule).is_err());
        assert_eq!(
            load(&file).expect("load"),
            staged,
            "a refused step writes nothing"
        );
        let promoted = rotate(&file, None, &schedule).expect("promote");
        assert!(promoted.previous.is_some());
    }

    #[test]
    fn mirror_copies_only_a_good_and_different_set() {
        let dir = tempfile::tempdir().expect("dir");
        let (source, dest) = (dir.path().join("a.json"), dir.path().join("b.json"));
        ensure(&source).expect("made");
        assert!(mirror(&source, &dest).expect("copied"));
        assert!(!mirror(&source, &dest).expect("same"));
        std::fs::write(&source, b"{not json").expect("write");
        assert!(mirror(&source, &dest).is_err());
        assert!(load(&dest).is_ok(), "a bad source leaves the copy alone");
    }
}
