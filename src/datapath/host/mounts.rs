//! Reading the mount table and mounting/unmounting, the few ways the node
//! plugin needs.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, umount2};

use crate::core::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// `major:minor` of the mounted filesystem's device.
    pub device: String,
    /// Which part of that filesystem is mounted (`/` for all of it; a bind
    /// mount of a device node shows the node's path, e.g. `/loop3`).
    pub root: String,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

impl MountEntry {
    /// Mounted read-only (the per-mount flag, which a read-only bind mount sets).
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    /// A FUSE filesystem (`fuse`, or `fuse.<subtype>` as ours is).
    pub fn is_fuse(&self) -> bool {
        self.fs_type == "fuse" || self.fs_type.starts_with("fuse.")
    }

    /// `device` as numbers, e.g. to name a fusectl connection.
    pub fn device_number(&self) -> Option<(u64, u64)> {
        let (major, minor) = self.device.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }
}

/// Undoes the `\NNN` octal escapes the kernel writes for space, tab,
/// newline and backslash (any other octal escape is undone too). A
/// backslash not followed by three octal digits of a byte stays as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(byte) = u8::try_from(
                digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0')),
            )
        {
            out.push(byte);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One line of mountinfo (proc(5)):
/// `id parent major:minor root mount_point options [optional...] - fs_type source super_options`.
/// Fields are separated by single spaces and escape their own, so
/// splitting on spaces is exact; the optional fields (`shared:N`,
/// `master:N`, ...) vary in number, and a lone `-` ends them.
fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    let [_, _, device, root, mount_point, options, rest @ ..] = fields.as_slice() else {
        return None;
    };
    let separator = rest.iter().position(|f| *f == b"-")?;
    let (fs_type, source) = (rest.get(separator + 1)?, rest.get(separator + 2)?);
    Some(MountEntry {
        mount_point: PathBuf::from(OsString::from_vec(unescape(mount_point))),
        device: lossy(device),
        root: lossy(&unescape(root)),
        fs_type: lossy(&unescape(fs_type)),
        source: lossy(&unescape(source)),
        options: lossy(options),
    })
}

/// The mounts listed in `text`, a copy of a mountinfo file, in its order
/// (a later mount at the same point is on top). Lines that are not
/// mountinfo lines are skipped. Mount points keep their exact bytes, which
/// need not be UTF-8.
pub fn parse_mountinfo(text: &(impl AsRef<[u8]> + ?Sized)) -> Vec<MountEntry> {
    text.as_ref()
        .split(|b| *b == b'\n')
        .filter_map(parse_line)
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

pub fn is_mounted(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("cannot run {what}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

pub fn mount_fs(device: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs_type);
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg(device).arg(target);
    run(
        &mut cmd,
        &format!("mount {} on {}", device.display(), target.display()),
    )
}

pub fn bind_mount(source: &Path, target: &Path, read_only: bool, options: &[String]) -> Result<()> {
    run(
        Command::new("mount").arg("--bind").arg(source).arg(target),
        &format!("bind mount {} on {}", source.display(), target.display()),
    )?;
    if read_only || !options.is_empty() {
        let mut opts = vec!["remount".to_string(), "bind".to_string()];
        opts.extend(options.iter().cloned());
        // Last, so a flag such as `rw` in the options cannot undo it.
        if read_only {
            opts.push("ro".to_string());
        }
        run(
            Command::new("mount")
                .arg("-o")
                .arg(opts.join(","))
                .arg(target),
            &format!("remount {}", target.display()),
        )?;
    }
    Ok(())
}

/// Unmounts the topmost mount at `path`.
pub fn unmount_one(path: &Path) -> Result<()> {
    umount2(path, MntFlags::empty()).map_err(|e| {
        Error::io(
            format!("cannot unmount {}", path.display()),
            std::io::Error::from(e),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:45 / /var/lib/x rw shared:2 - fuse.terna terna rw,user_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[0].options, "rw,noatime");
        assert_eq!(m[0].device, "98:0");
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[1].fs_type, "fuse.terna");
    }

    #[test]
    fn unescape_leaves_plain_and_short_sequences_alone() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"a\\13"), b"a\\13");
        assert_eq!(unescape(b"plain"), b"plain");
    }

    #[test]
    fn unescape_decodes_space_tab_newline_backslash_and_nothing_past_a_byte() {
        assert_eq!(unescape(br"/a\040b\134c\011"), b"/a b\\c\t");
        assert_eq!(unescape(br"/a\012b"), b"/a\nb");
        assert_eq!(unescape(br"/a\04"), br"/a\04");
        assert_eq!(unescape(br"/x\777"), br"/x\777");
        assert_eq!(unescape(br"/x\08a"), br"/x\08a");
        assert_eq!(unescape(br"\\040"), br"\ ");
        assert_eq!(unescape(br"end\"), br"end\");
        assert_eq!(unescape(b""), b"");
    }

    #[test]
    fn optional_fields_come_in_any_number_and_only_a_lone_dash_ends_them() {
        let none = parse_mountinfo("22 1 0:21 / /proc rw,nosuid - proc proc rw");
        assert_eq!(none.len(), 1);
        assert_eq!(
            (none[0].fs_type.as_str(), none[0].source.as_str()),
            ("proc", "proc")
        );
        let many = parse_mountinfo(
            "23 1 0:22 / /sys rw shared:7 master:3 propagate_from:2 unbindable - sysfs sysfs rw",
        );
        assert_eq!(many.len(), 1);
        assert_eq!(
            (many[0].fs_type.as_str(), many[0].options.as_str()),
            ("sysfs", "rw")
        );
        // A mount point with " - " in it is escaped, so it is no separator.
        let dashed = parse_mountinfo(r"24 1 0:23 / /a\040-\040b rw - tmpfs none rw");
        assert_eq!(dashed[0].mount_point, Path::new("/a - b"));
        assert_eq!(dashed[0].fs_type, "tmpfs");
        // A dash among the first six fields (here the mount point) is not
        // the separator.
        let early = parse_mountinfo("25 1 0:24 / - rw - tmpfs none rw");
        assert_eq!(early.len(), 1);
        assert_eq!(early[0].mount_point, Path::new("-"));
    }

    #[test]
    fn lines_without_separator_type_or_source_are_skipped() {
        for line in [
            "",
            "36 35 98:0 /mnt1 /mnt rw",
            "36 35 98:0 /mnt1 /mnt rw master:1 ext3 /dev/root rw",
            "36 35 98:0 /mnt1 /mnt rw -",
            "36 35 98:0 /mnt1 /mnt rw - ext3",
            "36 35 98:0 - ext3 /dev/root",
        ] {
            assert_eq!(parse_mountinfo(line), [], "{line:?}");
        }
        // An empty source is a field all the same.
        let empty = parse_mountinfo("36 35 0:5 / /t rw - tmpfs  rw");
        assert_eq!(empty[0].source, "");
    }

    #[test]
    fn mount_points_keep_bytes_that_are_not_utf8() {
        let mut text = b"40 36 0:45 / /var/lib/\xff\\012x rw - fuse.terna terna rw\n".to_vec();
        text.extend_from_slice(b"41 36 0:46 / /ok rw - ext4 /dev/sda1 rw\n");
        let m = parse_mountinfo(&text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point.as_os_str().as_bytes(), b"/var/lib/\xff\nx");
        assert_eq!(m[1].mount_point, Path::new("/ok"));
    }

    #[test]
    fn fuse_mounts_and_device_numbers() {
        let m = parse_mountinfo(
            "1 0 0:45 / /a rw - fuse.terna terna rw\n\
             2 0 0:46 / /b rw - fuse /dev/fuse rw\n\
             3 0 0:47 / /c rw - fuseblk /dev/sdb rw\n\
             4 0 x:1 / /d rw - ext4 /dev/sda rw\n",
        );
        let fuse: Vec<bool> = m.iter().map(MountEntry::is_fuse).collect();
        assert_eq!(fuse, [true, true, false, false]);
        assert_eq!(m[0].device_number(), Some((0, 45)));
        assert_eq!(m[3].device_number(), None);
    }

    /// Escapes as the kernel does (`mangle` in fs/proc_namespace.c).
    fn escape(field: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in field {
            if b" \t\n\\".contains(&b) {
                out.extend_from_slice(format!("\\{b:03o}").as_bytes());
            } else {
                out.push(b);
            }
        }
        out
    }

    fn field() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b' '),
                Just(b'\t'),
                Just(b'\n'),
                Just(b'\\'),
                Just(b'-'),
                Just(b'0'),
                Just(b'7'),
                Just(0xff),
                any::<u8>(),
            ],
            0..24,
        )
    }

    proptest! {
        #[test]
        fn unescape_undoes_the_kernels_escapes(raw in field()) {
            prop_assert_eq!(unescape(&escape(&raw)), raw);
        }

        #[test]
        fn what_the_kernel_writes_parses_back(
            entries in proptest::collection::vec(
                (
                    field(),
                    field(),
                    proptest::collection::vec("(shared|master|propagate_from):[0-9]{1,3}|unbindable", 0..4),
                    "[a-z0-9]{1,8}(\\.[a-z]{1,6})?",
                    "[ -~]{0,12}",
                    0u64..4096,
                    0u64..1 << 20,
                ),
                0..6,
            ),
        ) {
            let mut text = Vec::new();
            for (i, (point, root, optional, fs_type, source, major, minor)) in entries.iter().enumerate() {
                let mut point_bytes = b"/".to_vec();
                point_bytes.extend_from_slice(point);
                let mut root_bytes = b"/".to_vec();
                root_bytes.extend_from_slice(root);
                text.extend_from_slice(format!("{} 1 {major}:{minor} ", i + 2).as_bytes());
                text.extend_from_slice(&escape(&root_bytes));
                text.push(b' ');
                text.extend_from_slice(&escape(&point_bytes));
                text.extend_from_slice(b" rw,relatime");
                for o in optional {
                    text.push(b' ');
                    text.extend_from_slice(o.as_bytes());
                }
                text.extend_from_slice(b" - ");
                text.extend_from_slice(&escape(fs_type.as_bytes()));
                text.push(b' ');
                text.extend_from_slice(&escape(source.as_bytes()));
                text.extend_from_slice(b" rw\n");
            }
            let parsed = parse_mountinfo(&text);
            prop_assert_eq!(parsed.len(), entries.len());
            for (m, (point, root, _, fs_type, source, major, minor)) in parsed.iter().zip(&entries) {
                prop_assert_eq!(&m.mount_point.as_os_str().as_bytes()[1..], &point[..]);
                prop_assert_eq!(m.root.clone(), lossy(&[b"/".as_slice(), root].concat()));
                prop_assert_eq!(&m.fs_type, fs_type);
                prop_assert_eq!(&m.source, source);
                prop_assert_eq!(m.options.as_str(), "rw,relatime");
                prop_assert_eq!(m.device_number(), Some((*major, *minor)));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(text in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_mountinfo(&text);
        }
    }
}
