//! Paths a caller hands the node plugin (staging paths, publish targets,
//! volume paths). Whoever can reach the CSI socket chooses them, so they
//! are checked before anything is created, mounted or removed at them.
//! Pure logic, except `resolved`, which asks the file system where
//! symlinks lead.

use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};
use crate::core::volume::shown;

/// Linux's PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;

/// Directories a volume is never staged or published on, nor anything
/// beneath them: the system's own, where a bind mount would shadow what the
/// machine runs on.
const SYSTEM_DIRS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/root",
    "/home",
    "/opt",
    "/srv",
    "/run",
    "/var/run",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/backups",
];

/// `value` as an absolute path without `.` or `..` components (so what
/// is checked is what gets used), with doubled and trailing slashes
/// removed. `what` names the field for the error.
pub fn caller_path(value: &str, what: &str) -> Result<PathBuf> {
    let bad = |why: &str| Err(Error::invalid(format!("{what} {} {why}", shown(value))));
    if value.is_empty() {
        return Err(Error::invalid(format!("{what} is required")));
    }
    if value.len() > MAX_PATH_BYTES {
        return bad("is longer than 4096 bytes");
    }
    if value.contains('\0') {
        return bad("contains a NUL byte");
    }
    if !value.starts_with('/') {
        return bad("is not absolute");
    }
    if value.split('/').any(|c| c == "." || c == "..") {
        return bad("has a '.' or '..' component");
    }
    let path: PathBuf = Path::new(value).components().collect();
    if path == Path::new("/") {
        return bad("is the root directory");
    }
    Ok(path)
}

/// Refuses a path that is, is inside, or is an ancestor of a system
/// directory or one of `own` (Terna's data dir and pools): a volume mounted
/// there would hide what the node or Terna itself depends on.
pub fn outside_protected(path: &Path, what: &str, own: &[&Path]) -> Result<()> {
    let system = SYSTEM_DIRS.iter().map(Path::new);
    let mut protected = system.chain(own.iter().copied());
    if let Some(dir) = protected.find(|d| path.starts_with(d) || d.starts_with(path)) {
        let relation = if path.starts_with(dir) {
            "inside"
        } else {
            "above"
        };
        return Err(Error::invalid(format!(
            "{what} {} is {relation} {}, where Terna never mounts a volume",
            shown(&path.to_string_lossy()),
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a path at, inside or above a place where a volume staged on
/// this node already lives (`occupied`: volume id and its staging path or
/// a target it is published at), except `volume_id`'s own path itself (a
/// repeated call). A mount inside another volume lands in that volume's
/// filesystem, where its pod sees it and its unstage cannot proceed; one
/// above another hides it.
pub fn outside_volumes(
    path: &Path,
    what: &str,
    volume_id: &str,
    occupied: &[(&str, &Path)],
) -> Result<()> {
    for (id, place) in occupied {
        if (*id == volume_id && *place == path) || !place.is_absolute() {
            continue;
        }
        if path.starts_with(place) || place.starts_with(path) {
            let relation = if path == *place {
                "where"
            } else if path.starts_with(place) {
                "inside where"
            } else {
                "above where"
            };
            return Err(Error::invalid(format!(
                "{what} {} is {relation} volume {id} is mounted ({}); give each volume a path of its own",
                shown(&path.to_string_lossy()),
                place.display()
            )));
        }
    }
    Ok(())
}

/// `path` with the symlinks of its longest existing prefix resolved: what
/// mount(2) and mkdir would really act on.
pub fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut prefix = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(prefix) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (prefix.parent(), prefix.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                prefix = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::ErrorKind;

    #[test]
    fn hostile_paths_are_invalid_arguments() {
        let long = format!("/{}", "a".repeat(4096));
        for p in [
            "",
            "relative/path",
            "/",
            "//",
            "/a/../b",
            "/a/..",
            "/a/./b",
            "/a/.",
            "/a\0/b",
            &long,
        ] {
            let err = caller_path(p, "target path").unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{p:?}");
            assert!(err.message.len() < 200, "{}", err.message);
        }
    }

    #[test]
    fn plain_absolute_paths_are_normalised() {
        assert_eq!(
            caller_path("/var/lib//kubelet/pods/x/", "target path").unwrap(),
            PathBuf::from("/var/lib/kubelet/pods/x")
        );
        assert_eq!(
            caller_path("/tmp/a..b/.c", "target path").unwrap(),
            PathBuf::from("/tmp/a..b/.c")
        );
    }

    #[test]
    fn system_and_own_directories_are_refused() {
        let own = Path::new("/var/lib/terna");
        for p in [
            "/etc",
            "/etc/x",
            "/proc/1",
            "/dev/loop0",
            "/var/lib/terna/state",
            "/var/lib",
            "/var",
            "/root/.ssh",
        ] {
            let err = outside_protected(Path::new(p), "target path", &[own]).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{p}");
        }
        for p in [
            "/var/lib/kubelet/pods/x",
            "/tmp/etc",
            "/devices",
            "/var/lib/ternax",
        ] {
            outside_protected(Path::new(p), "target path", &[own]).unwrap();
        }
    }

    #[test]
    fn a_symlink_into_a_system_directory_is_seen_through() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let target = link.join("new/target");
        assert_eq!(resolved(&target), Path::new("/etc/new/target"));
        assert!(outside_protected(&resolved(&target), "target path", &[]).is_err());
        let plain = dir.path().join("a/b");
        assert_eq!(
            resolved(&plain),
            std::fs::canonicalize(dir.path()).unwrap().join("a/b")
        );
    }

    #[test]
    fn paths_inside_or_above_another_volume_are_refused() {
        let (a_stage, a_target) = (Path::new("/k/a/globalmount"), Path::new("/k/pods/1/a"));
        let occupied = [("tv-a", a_stage), ("tv-a", a_target)];
        let check =
            |path: &str, id: &str| outside_volumes(Path::new(path), "target path", id, &occupied);
        // The volume's own paths, again: a repeated call.
        check("/k/a/globalmount", "tv-a").unwrap();
        check("/k/pods/1/a", "tv-a").unwrap();
        // Siblings are fine, for it and for others.
        check("/k/b/globalmount", "tv-b").unwrap();
        check("/k/pods/1/ab", "tv-b").unwrap();
        check("/k/pods/1/b", "tv-a").unwrap();
        for (path, id) in [
            ("/k/a/globalmount/x", "tv-b"),
            ("/k/a/globalmount", "tv-b"),
            ("/k/pods/1/a/sub", "tv-b"),
            ("/k/a", "tv-b"),
            ("/k", "tv-b"),
            // Nor inside or above its own.
            ("/k/a/globalmount/t", "tv-a"),
            ("/k/pods/1", "tv-a"),
        ] {
            let err = check(path, id).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{path}");
            assert!(err.message.contains("tv-a"), "{}", err.message);
        }
    }

    proptest::proptest! {
        #[test]
        fn an_accepted_path_never_climbs(value in "[/a.]{0,24}") {
            if let Ok(path) = caller_path(&value, "path") {
                proptest::prop_assert!(path.is_absolute());
                proptest::prop_assert!(path.components().all(|c| matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )));
                proptest::prop_assert!(!path.components().any(|c| c.as_os_str() == ".."));
            }
        }
    }
}
