//! Loop devices through their ioctls: attach a file with direct I/O, find an
//! existing attachment after a crash, grow, detach.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LOOP_MAJOR: u64 = 7;
/// Every request the filesystem sends is a multiple of this, so O_DIRECT
/// replica I/O never needs a bounce buffer.
pub const BLOCK_SIZE: u32 = 4096;

#[repr(C)]
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

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free loop device after {0} attempts")]
    NoFreeDevice(u32),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LoopError + 'a {
    move |source| LoopError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    pub read_only: bool,
    pub direct_io: bool,
}

#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

/// Runs an ioctl whose argument is an integer or a pointer, as the kernel
/// interface of each request defines.
fn ioctl(file: &File, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: `file` is an open descriptor; each caller passes the argument
    // kind its request expects (an integer, or a pointer to a live struct of
    // the layout the kernel defines for it).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl LoopDevice {
    pub fn open(path: &Path) -> LoopDevice {
        LoopDevice {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn attach(backing: &Path, opts: LoopOptions) -> Result<LoopDevice, LoopError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)
            .map_err(io_err("open backing file", backing))?;
        let control_path = Path::new("/dev/loop-control");
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(control_path)
            .map_err(io_err("open", control_path))?;
        const ATTEMPTS: u32 = 16;
        for _ in 0..ATTEMPTS {
            let n =
                ioctl(&control, LOOP_CTL_GET_FREE, 0).map_err(io_err("allocate", control_path))?;
            let dev_path = PathBuf::from(format!("/dev/loop{n}"));
            ensure_node(&dev_path, n as u64)?;
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&dev_path)
                .map_err(io_err("open", &dev_path))?;
            let mut info = LoopInfo64 {
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
            };
            if opts.read_only {
                info.lo_flags |= LO_FLAGS_READ_ONLY;
            }
            if opts.direct_io {
                info.lo_flags |= LO_FLAGS_DIRECT_IO;
            }
            let name = backing.as_os_str().as_encoded_bytes();
            let len = name.len().min(LO_NAME_SIZE - 1);
            info.lo_file_name[..len].copy_from_slice(&name[..len]);
            let config = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: BLOCK_SIZE,
                info,
                reserved: [0; 8],
            };
            match ioctl(
                &dev,
                LOOP_CONFIGURE,
                &config as *const LoopConfig as libc::c_ulong,
            ) {
                Ok(_) => return Ok(LoopDevice { path: dev_path }),
                // Another process took this device between GET_FREE and CONFIGURE.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => return Err(io_err("configure", &dev_path)(e)),
            }
        }
        Err(LoopError::NoFreeDevice(ATTEMPTS))
    }

    /// The loop device currently backed by `backing`, if any.
    pub fn find_by_backing(backing: &Path) -> Result<Option<LoopDevice>, LoopError> {
        let sys = Path::new("/sys/block");
        let entries = std::fs::read_dir(sys).map_err(io_err("list", sys))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
                continue;
            };
            let attached = text.trim_end_matches('\n');
            // The kernel appends " (deleted)" when the file went away.
            let attached = attached.strip_suffix(" (deleted)").unwrap_or(attached);
            if Path::new(attached) == backing {
                return Ok(Some(LoopDevice {
                    path: PathBuf::from(format!("/dev/{name}")),
                }));
            }
        }
        Ok(None)
    }

    /// Whether the kernel actually runs this device with direct I/O.
    pub fn direct_io(&self) -> bool {
        let Some(name) = self.path.file_name() else {
            return false;
        };
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/dio"))
            .is_ok_and(|s| s.trim() == "1")
    }

    fn open_dev(&self) -> Result<File, LoopError> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io_err("open", &self.path))
    }

    /// Detaches the backing file. Already detached is success.
    pub fn detach(&self) -> Result<(), LoopError> {
        let dev = self.open_dev()?;
        match ioctl(&dev, LOOP_CLR_FD, 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(io_err("detach", &self.path)(e)),
        }
    }

    /// Re-reads the backing file's size after it grew.
    pub fn set_capacity(&self) -> Result<(), LoopError> {
        let dev = self.open_dev()?;
        ioctl(&dev, LOOP_SET_CAPACITY, 0)
            .map(|_| ())
            .map_err(io_err("set capacity of", &self.path))
    }
}

/// Containers may lack /dev/loopN nodes for devices the kernel just made.
fn ensure_node(path: &Path, minor: u64) -> Result<(), LoopError> {
    if path.exists() {
        return Ok(());
    }
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    match mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(LOOP_MAJOR, minor),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(io_err("create device node", path)(e.into())),
    }
}
