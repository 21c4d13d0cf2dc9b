//! Loop devices through their ioctls: attach a file with direct I/O, find an
//! existing attachment after a crash, grow, detach. No partition scanning.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::datapath::host::holders;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LOOP_MAJOR: u64 = 7;
const CONFIGURE_ATTEMPTS: u32 = 16;
/// How long `detach` waits for the last close of a device others still
/// have open (udev's blkid, a filesystem still being released, a slow
/// kernel on a loaded machine): long enough for any of those, short of the
/// two minutes the kubelet gives a NodeUnstageVolume.
pub const DETACH_WAIT: Duration = Duration::from_secs(60);
/// Logical block size of the loop device. Every request the filesystem sends
/// is a multiple of this (and aligned to it), so O_DIRECT replica I/O never
/// needs a bounce buffer for the offset or length.
pub const BLOCK_SIZE: u32 = 4096;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

impl LoopInfo64 {
    fn empty() -> LoopInfo64 {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` from linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

/// Errors of loop device handling, with the operation and path involved.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no free loop device after {0} attempts")]
    NoFreeDevice(u32),
    #[error("{} is not a loop device", path.display())]
    NotLoop { path: PathBuf },
    /// LOOP_CLR_FD succeeded but the device stayed open elsewhere for the
    /// whole wait; the kernel detaches it at the last close.
    #[error(
        "{} is still open after {} s ({holders}); it detaches when that lets go",
        path.display(),
        waited.as_secs()
    )]
    Busy {
        path: PathBuf,
        waited: Duration,
        holders: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoopError + 'a {
    move |source| LoopError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How to attach a file.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopOptions {
    pub read_only: bool,
    /// Direct I/O from the loop device to the file (no double caching, and
    /// concurrent requests to a FUSE file).
    pub direct_io: bool,
}

/// A loop device node, `/dev/loopN`.
#[derive(Debug, Clone)]
pub struct LoopDevice {
    path: PathBuf,
}

/// Runs `request` on `file` with `arg`.
///
/// # Safety
/// `arg` must be what `request` takes: ignored or read as an integer, or
/// the address of a live value of the structure the kernel reads (or
/// writes) for it, which stays valid for the call.
unsafe fn raw_ioctl(
    file: &File,
    request: libc::c_ulong,
    arg: libc::c_ulong,
) -> io::Result<libc::c_int> {
    // SAFETY: `file` is open for the call (borrowed); the argument is the
    // caller's promise.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: the number of a free device
/// (made if none is).
fn get_free(control: &File) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument.
    let n = unsafe { raw_ioctl(control, LOOP_CTL_GET_FREE, 0) }?;
    u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}

/// `LOOP_CONFIGURE`: attaches `config.fd` with all its settings at once.
fn configure(dev: &File, config: &LoopConfig) -> io::Result<()> {
    // SAFETY: LOOP_CONFIGURE copies one `struct loop_config` from the
    // address; `LoopConfig` has its layout (sizes asserted above) and the
    // borrow keeps it alive for the call; the kernel keeps no pointer.
    unsafe {
        raw_ioctl(
            dev,
            LOOP_CONFIGURE,
            std::ptr::from_ref(config) as libc::c_ulong,
        )
    }
    .map(|_| ())
}

/// `LOOP_CLR_FD`: detaches the backing file.
fn clear_fd(dev: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD ignores its argument.
    unsafe { raw_ioctl(dev, LOOP_CLR_FD, 0) }.map(|_| ())
}

/// `LOOP_GET_STATUS64`: the device's settings and its backing file's
/// device and inode numbers (which the kernel asks the filesystem for).
fn get_status(dev: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::empty();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which
    // `info` is (repr(C), same layout), alive for the call.
    unsafe {
        raw_ioctl(
            dev,
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64 as libc::c_ulong,
        )
    }?;
    Ok(info)
}

/// The kernel's `new_decode_dev`: `lo_device` is encoded that way.
fn decode_dev(dev: u64) -> (u64, u64) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

/// `LOOP_SET_CAPACITY`: re-reads the backing file's size.
fn set_capacity(dev: &File) -> io::Result<()> {
    // SAFETY: LOOP_SET_CAPACITY ignores its argument.
    unsafe { raw_ioctl(dev, LOOP_SET_CAPACITY, 0) }.map(|_| ())
}

impl LoopDevice {
    /// Wraps an existing loop device node (nothing is checked until used).
    pub fn open(path: &Path) -> LoopDevice {
        LoopDevice {
            path: path.to_path_buf(),
        }
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Attaches `backing` to a free loop device (4 KiB logical blocks, no
    /// partition scan, no autoclear). The device's `lo_file_name` is the
    /// backing path (truncated to 63 bytes); `find_by_backing` uses sysfs,
    /// which has the full path.
    pub fn attach(backing: &Path, opts: LoopOptions) -> Result<LoopDevice, LoopError> {
        let file = open_backing(backing, opts)?;
        let control_path = Path::new("/dev/loop-control");
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(control_path)
            .map_err(io_err("open", control_path))?;
        let mut info = LoopInfo64::empty();
        if opts.read_only {
            info.lo_flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            info.lo_flags |= LO_FLAGS_DIRECT_IO;
        }
        let name = backing.as_os_str().as_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        let fd = u32::try_from(file.as_raw_fd()).map_err(|_| {
            io_err("use descriptor of", backing)(io::Error::from_raw_os_error(libc::EBADF))
        })?;
        let config = LoopConfig {
            fd,
            block_size: BLOCK_SIZE,
            info,
            reserved: [0; 8],
        };
        for _ in 0..CONFIGURE_ATTEMPTS {
            let n =
                get_free(&control).map_err(io_err("get a free loop device from", control_path))?;
            let dev_path = PathBuf::from(format!("/dev/loop{n}"));
            ensure_node(&dev_path, n)?;
            let dev = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&dev_path)
            {
                Ok(dev) => dev,
                // The device was removed (LOOP_CTL_REMOVE) meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => continue,
                Err(e) => return Err(io_err("open", &dev_path)(e)),
            };
            match configure(&dev, &config) {
                Ok(()) => {
                    let loop_dev = LoopDevice { path: dev_path };
                    if opts.direct_io && !loop_dev.direct_io() {
                        tracing::warn!(
                            device = %loop_dev.path.display(),
                            backing = %backing.display(),
                            "loop device runs without direct I/O"
                        );
                    }
                    return Ok(loop_dev);
                }
                // Another process took this device between GET_FREE and CONFIGURE.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(io_err("configure", &dev_path)(e)),
            }
        }
        Err(LoopError::NoFreeDevice(CONFIGURE_ATTEMPTS))
    }

    /// The loop device currently backed by `backing` that is not being torn
    /// down, if any (to stay idempotent after a crash). One whose detach
    /// waits for a last close is on its way out and must not be taken up
    /// again.
    pub fn find_by_backing(backing: &Path) -> Result<Option<LoopDevice>, LoopError> {
        Ok(Self::attached_to(backing)?
            .into_iter()
            .find(|(_, leaving)| !leaving)
            .map(|(dev, _)| dev))
    }

    /// Autoclear armed: a detach found it busy, and it goes at its last
    /// close.
    pub fn tearing_down(&self) -> bool {
        self.sysfs_dir().is_some_and(|d| tearing_down(&d))
    }

    /// Every loop device backed by `backing`, those being torn down too:
    /// what a teardown must see gone, including what an earlier, partial
    /// one left waiting for its last close.
    pub fn find_all_by_backing(backing: &Path) -> Result<Vec<LoopDevice>, LoopError> {
        Ok(Self::attached_to(backing)?
            .into_iter()
            .map(|(dev, _)| dev)
            .collect())
    }

    /// Devices backed by `backing`, each with whether it is being torn down.
    fn attached_to(backing: &Path) -> Result<Vec<(LoopDevice, bool)>, LoopError> {
        let wanted = [backing.to_path_buf(), normalize(backing)];
        let sys = Path::new("/sys/block");
        let entries = std::fs::read_dir(sys).map_err(io_err("list", sys))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("loop"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(attached) = read_backing(&entry.path()) else {
                continue;
            };
            if wanted.contains(&attached) {
                let path = PathBuf::from(format!("/dev/loop{n}"));
                ensure_node(&path, n)?;
                found.push((LoopDevice { path }, tearing_down(&entry.path())));
            }
        }
        Ok(found)
    }

    /// The file this device is attached to, per sysfs; `None` if detached.
    pub fn backing_file(&self) -> Option<PathBuf> {
        read_backing(&self.sysfs_dir()?)
    }

    /// `major:minor` of the filesystem the backing file lives on: which
    /// mount serves it, where the path alone cannot tell (the same path in
    /// two mount namespaces). The kernel asks that filesystem, so a dead
    /// FUSE session can make this fail.
    pub fn backing_device(&self) -> Result<(u64, u64), LoopError> {
        let dev = self.open_dev()?;
        let info = get_status(&dev).map_err(io_err("get the status of", &self.path))?;
        Ok(decode_dev(info.lo_device))
    }

    /// Whether the kernel actually runs this device with direct I/O.
    pub fn direct_io(&self) -> bool {
        self.sysfs_dir()
            .and_then(|d| std::fs::read_to_string(d.join("loop/dio")).ok())
            .is_some_and(|s| s.trim() == "1")
    }

    fn sysfs_dir(&self) -> Option<PathBuf> {
        let name = self.path.file_name()?;
        Some(Path::new("/sys/block").join(name))
    }

    fn open_dev(&self) -> Result<File, LoopError> {
        let meta = std::fs::metadata(&self.path).map_err(io_err("stat", &self.path))?;
        if !meta.file_type().is_block_device() {
            return Err(LoopError::NotLoop {
                path: self.path.clone(),
            });
        }
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io_err("open", &self.path))
    }

    /// Detaches the backing file and returns once the kernel has; already
    /// detached is success. A device still open elsewhere (mounted, or a
    /// process has it open) only gets autoclear armed by the ioctl, so this
    /// waits up to [`DETACH_WAIT`] for its last close, then returns
    /// [`LoopError::Busy`] naming what still holds it. Asking again (a
    /// retry) waits again.
    pub fn detach(&self) -> Result<(), LoopError> {
        if self.sysfs_dir().is_some_and(|d| d.exists()) && self.backing_file().is_none() {
            return Ok(());
        }
        {
            let dev = match self.open_dev() {
                Ok(dev) => dev,
                Err(LoopError::Io { source, .. })
                    if matches!(source.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            match clear_fd(&dev) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
                Err(e) => return Err(io_err("detach", &self.path)(e)),
            }
            // Closing our descriptor lets the kernel tear down now if it was
            // the last one.
        }
        let deadline = Instant::now() + DETACH_WAIT;
        let mut pause = Duration::from_millis(10);
        while self.backing_file().is_some() {
            if Instant::now() >= deadline {
                return Err(LoopError::Busy {
                    path: self.path.clone(),
                    waited: DETACH_WAIT,
                    holders: holders::describe(&holders::of_device(&self.path)),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Re-reads the backing file's size after it grew. The backing file is
    /// stat'ed with `AT_STATX_FORCE_SYNC` first, so a FUSE file's cached
    /// size (which the loop driver reads) is refreshed.
    pub fn set_capacity(&self) -> Result<(), LoopError> {
        if let Some(backing) = self.backing_file() {
            refresh_size(&backing);
        }
        let dev = self.open_dev()?;
        set_capacity(&dev).map_err(io_err("set capacity of", &self.path))
    }
}

fn open_backing(backing: &Path, opts: LoopOptions) -> Result<File, LoopError> {
    let open = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(backing)
    };
    let file = if opts.direct_io {
        // Some filesystems refuse O_DIRECT at open; the loop driver may
        // still manage (or will run buffered, which `attach` reports).
        open(libc::O_DIRECT).or_else(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => open(0),
            _ => Err(e),
        })
    } else {
        open(0)
    };
    file.map_err(io_err("open backing file", backing))
}

/// `statx(AT_STATX_FORCE_SYNC)`: makes FUSE fetch fresh attributes.
fn refresh_size(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `stx` a live, writable statx
    // buffer for the duration of the call.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_SIZE,
            &mut stx,
        )
    };
    if rc < 0 {
        tracing::debug!(path = %path.display(), error = %io::Error::last_os_error(), "statx failed");
    }
}

/// Autoclear armed (`/sys/block/loopN/loop/autoclear`): Terna never
/// attaches with it, so it was armed by a detach the device was too busy
/// for.
fn tearing_down(sys_dir: &Path) -> bool {
    std::fs::read(sys_dir.join("loop/autoclear")).is_ok_and(|t| t.starts_with(b"1"))
}

/// `/sys/block/loopN/loop/backing_file`, without the newline and the
/// " (deleted)" the kernel appends when the file went away.
fn read_backing(sys_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read(sys_dir.join("loop/backing_file")).ok()?;
    let text = text.strip_suffix(b"\n").unwrap_or(&text);
    let text = text.strip_suffix(b" (deleted)").unwrap_or(text);
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(text)))
}

/// Resolves symlinks in the parent only (the file itself may sit on a dead
/// FUSE mount, which cannot be stat'ed).
fn normalize(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// Containers may lack /dev/loopN nodes for devices the kernel just made.
fn ensure_node(path: &Path, n: u32) -> Result<(), LoopError> {
    if path.exists() {
        return Ok(());
    }
    // The kernel's own numbers (minor = N << part_shift with max_part).
    let dev = std::fs::read_to_string(format!("/sys/block/loop{n}/dev"))
        .ok()
        .and_then(|s| {
            let (major, minor) = s.trim().split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .unwrap_or((LOOP_MAJOR, u64::from(n)));
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    match mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(dev.0, dev.1),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(io_err("create device node", path)(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::decode_dev;

    #[test]
    fn device_numbers_decode_as_the_kernel_encodes_them() {
        // new_encode_dev: minor's low byte, major, then minor's high bits.
        let encode =
            |major: u64, minor: u64| (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        for (major, minor) in [(0, 57), (7, 3), (259, 300), (0, 0xfffff), (0xfff, 0)] {
            assert_eq!(decode_dev(encode(major, minor)), (major, minor));
        }
    }
}
