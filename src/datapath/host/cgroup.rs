//! Engines leave the node plugin pod's cgroup, so that the pod can be
//! deleted or rolled without its container runtime killing them.
//!
//! When a container stops, runc kills every process in the container's
//! cgroup (the node plugin runs with `hostPID`, so no pid namespace dies
//! with it). An engine started by the plugin moves itself, before it starts
//! any thread, into `terna-engines` next to the kubelet's pod cgroups: for
//! a pod cgroup `/<root>/kubepods/burstable/pod<uid>/<container>` (or
//! `kubepods.slice/...` with the systemd driver) that is
//! `/<root>/terna-engines`, in every hierarchy the process is in. The
//! next plugin pod finds the engines by their pid files, as before.
//!
//! The text of `/proc/<pid>/cgroup` and the paths derived from it are pure
//! and tested here; the moves themselves are `leave_pod`.

use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};

/// Where engines go, beside the pods.
pub const ENGINES_CGROUP: &str = "terna-engines";

/// One line of `/proc/<pid>/cgroup`: `ID:CONTROLLERS:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    /// Comma-separated v1 controllers (`cpu,cpuacct`, `name=systemd`);
    /// empty for the v2 hierarchy.
    pub controllers: String,
    pub path: String,
}

/// The lines of `/proc/<pid>/cgroup`; malformed ones are skipped.
pub fn parse(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?.to_string();
            let path = parts.next()?;
            path.starts_with('/').then(|| Membership {
                hierarchy,
                controllers,
                path: path.to_string(),
            })
        })
        .collect()
}

/// The engines' cgroup for a process whose cgroup is `path`: the prefix
/// before the first segment naming the kubelet's pods, plus
/// `terna-engines`. `None` outside a pod.
pub fn engines_path(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segments.iter().position(|s| s.starts_with("kubepods"))?;
    let mut target = String::new();
    for s in &segments[..at] {
        target.push('/');
        target.push_str(s);
    }
    target.push('/');
    target.push_str(ENGINES_CGROUP);
    Some(target)
}

/// Where a hierarchy may be mounted below the cgroup root, most likely
/// first: v1 under its controllers' names (`cpu,cpuacct`, or either alone
/// where they are mounted apart; `systemd` for `name=systemd`), v2 at the
/// root itself or, on a hybrid host, at `unified`.
pub fn mount_candidates(m: &Membership) -> Vec<String> {
    if m.hierarchy == 0 && m.controllers.is_empty() {
        return vec![String::new(), "unified".to_string()];
    }
    let joined = m
        .controllers
        .split(',')
        .map(|c| c.strip_prefix("name=").unwrap_or(c))
        .collect::<Vec<_>>()
        .join(",");
    let mut candidates = vec![joined.clone()];
    for c in joined.split(',') {
        if !candidates.iter().any(|x| x == c) {
            candidates.push(c.to_string());
        }
    }
    candidates
}

/// What `leave_pod` did for one hierarchy.
#[derive(Debug)]
pub enum Move {
    Moved {
        hierarchy: String,
        to: PathBuf,
    },
    /// Not mounted under the root given: nothing to do there.
    Unmounted {
        hierarchy: String,
    },
    Failed {
        hierarchy: String,
        error: Error,
    },
}

/// Moves process `pid`, whose `/proc/<pid>/cgroup` is `memberships`, into
/// the engines' cgroup of every hierarchy mounted under `root`. Empty when
/// the process is in no pod.
pub fn leave_pod(root: &Path, memberships: &[Membership], pid: u32) -> Vec<Move> {
    let mut moves = Vec::new();
    for m in memberships {
        let Some(target) = engines_path(&m.path) else {
            continue;
        };
        let name = if m.controllers.is_empty() {
            "unified".to_string()
        } else {
            m.controllers.clone()
        };
        let Some(mount) = mount_candidates(m)
            .into_iter()
            .map(|c| root.join(c))
            .find(|dir| {
                dir.join(m.path.trim_start_matches('/'))
                    .join("cgroup.procs")
                    .exists()
            })
        else {
            moves.push(Move::Unmounted { hierarchy: name });
            continue;
        };
        let dir = mount.join(target.trim_start_matches('/'));
        match move_into(&dir, pid) {
            Ok(()) => moves.push(Move::Moved {
                hierarchy: name,
                to: dir,
            }),
            Err(error) => moves.push(Move::Failed {
                hierarchy: name,
                error,
            }),
        }
    }
    moves
}

fn move_into(dir: &Path, pid: u32) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create cgroup {}", dir.display()), e))?;
    // A new v1 cpuset has no CPUs and no memory nodes, and refuses tasks
    // until it is given its parent's.
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Ok(value) = std::fs::read_to_string(&own) else {
            continue;
        };
        if value.trim().is_empty()
            && let Some(parent) = dir.parent()
        {
            let inherited = std::fs::read_to_string(parent.join(file)).map_err(|e| {
                Error::io(format!("cannot read {}", parent.join(file).display()), e)
            })?;
            std::fs::write(&own, inherited.trim())
                .map_err(|e| Error::io(format!("cannot write {}", own.display()), e))?;
        }
    }
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|e| {
        Error::io(
            format!("cannot move process {pid} into {}", procs.display()),
            e,
        )
    })
}

/// The calling process's memberships as the host sees them. Under cgroup
/// v2 a container has a cgroup namespace of its own, in which its cgroup
/// is `/` and nothing outside it can be reached: this thread first joins
/// the host's (pid 1's, visible with hostPID) where it differs.
pub fn own_memberships() -> Result<Vec<Membership>> {
    let ours = std::fs::read_link("/proc/thread-self/ns/cgroup").ok();
    let hosts = std::fs::read_link("/proc/1/ns/cgroup").ok();
    if ours.is_some() && hosts.is_some() && ours != hosts {
        let ns = std::fs::File::open("/proc/1/ns/cgroup")
            .map_err(|e| Error::io("cannot open the host's cgroup namespace", e))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| Error::io("cannot join the host's cgroup namespace", e.into()))?;
    }
    let text = std::fs::read_to_string("/proc/thread-self/cgroup")
        .map_err(|e| Error::io("cannot read /proc/thread-self/cgroup", e))?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V1: &str = "12:pids:/terna-node-1/kubepods/burstable/podab/c1\n\
        11:name=systemd:/terna-node-1/kubepods/burstable/podab/c1\n\
        4:cpu,cpuacct:/kubepods/besteffort/podcd/c2\n\
        3:cpuset:/\n\
        0::/\n";

    #[test]
    fn parses_every_well_formed_line() {
        let m = parse(V1);
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].controllers, "name=systemd");
        assert_eq!(m[2].path, "/kubepods/besteffort/podcd/c2");
        assert_eq!(m[4].hierarchy, 0);
        assert!(m[4].controllers.is_empty());
        assert!(parse("garbage\n7:x\n8:y:relative\n:a:/b\n").is_empty());
    }

    #[test]
    fn engines_go_next_to_the_pods() {
        assert_eq!(
            engines_path("/terna-node-1/kubepods/burstable/podab/c1").as_deref(),
            Some("/terna-node-1/terna-engines")
        );
        assert_eq!(
            engines_path("/kubepods/besteffort/podcd/c2").as_deref(),
            Some("/terna-engines")
        );
        assert_eq!(
            engines_path("/kubepods.slice/kubepods-burstable.slice/x.scope").as_deref(),
            Some("/terna-engines")
        );
        assert_eq!(engines_path("/"), None);
        assert_eq!(engines_path("/user.slice/session-1.scope"), None);
        // A name merely containing the word is not the pods' root.
        assert_eq!(engines_path("/my-kubepods-test"), None);
    }

    #[test]
    fn hierarchies_are_found_by_their_controllers() {
        let m = parse(V1);
        assert_eq!(mount_candidates(&m[0]), vec!["pids"]);
        assert_eq!(mount_candidates(&m[1]), vec!["systemd"]);
        assert_eq!(
            mount_candidates(&m[2]),
            vec!["cpu,cpuacct", "cpu", "cpuacct"]
        );
        assert_eq!(mount_candidates(&m[4]), vec!["", "unified"]);
    }

    proptest! {
        #[test]
        fn the_target_is_a_sibling_of_the_pods_root(
            prefix in proptest::collection::vec("[a-z0-9-]{1,8}", 0..4),
            rest in proptest::collection::vec("[a-z0-9-]{1,8}", 0..4),
            suffix in "(|\\.slice)",
        ) {
            prop_assume!(prefix.iter().all(|s| !s.starts_with("kubepods")));
            let mut path = String::new();
            for s in &prefix { path.push('/'); path.push_str(s); }
            let parent = if path.is_empty() { String::new() } else { path.clone() };
            path.push_str("/kubepods");
            path.push_str(&suffix);
            for s in &rest { path.push('/'); path.push_str(s); }
            prop_assert_eq!(engines_path(&path), Some(format!("{parent}/{ENGINES_CGROUP}")));
            // Parsing a line built from it gives it back.
            let parsed = parse(&format!("5:memory:{path}\n"));
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(&parsed[0].path, &path);
        }
    }

    /// The moves on this machine's own cgroups (v1 hierarchies under
    /// /sys/fs/cgroup): a child process put in a pod-shaped cgroup of
    /// every hierarchy comes out in the engines' cgroup of each.
    #[test]
    fn a_process_in_a_pod_cgroup_moves_beside_it() {
        let root = Path::new("/sys/fs/cgroup");
        if !nix::unistd::geteuid().is_root() || !root.join("pids/cgroup.procs").exists() {
            eprintln!("skipped: needs root and cgroup v1 hierarchies under /sys/fs/cgroup");
            return;
        }
        let base = format!("terna-test-{}", std::process::id());
        let pod = format!("{base}/kubepods/burstable/podx");
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        let hierarchies = ["pids", "memory", "cpuset", "freezer"];
        for h in hierarchies {
            let mut dir = root.join(h);
            for part in pod.split('/') {
                dir = dir.join(part);
                std::fs::create_dir_all(&dir).unwrap();
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = std::fs::read_to_string(dir.join(f))
                        && v.trim().is_empty()
                    {
                        let p = std::fs::read_to_string(dir.parent().unwrap().join(f)).unwrap();
                        std::fs::write(dir.join(f), p.trim()).unwrap();
                    }
                }
            }
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
        let memberships = parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap());
        let moves = leave_pod(root, &memberships, pid);
        let after = parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        for h in hierarchies {
            for dir in [
                pod.clone(),
                format!("{base}/kubepods/burstable"),
                format!("{base}/kubepods"),
                format!("{base}/{ENGINES_CGROUP}"),
                base.clone(),
            ] {
                let _ = std::fs::remove_dir(root.join(h).join(dir));
            }
        }
        let moved: Vec<&Move> = moves
            .iter()
            .filter(|m| matches!(m, Move::Moved { .. }))
            .collect();
        assert_eq!(moved.len(), hierarchies.len(), "{moves:?}");
        for m in after
            .iter()
            .filter(|m| hierarchies.contains(&m.controllers.as_str()))
        {
            assert_eq!(m.path, format!("/{base}/{ENGINES_CGROUP}"), "{after:?}");
        }
    }
}
