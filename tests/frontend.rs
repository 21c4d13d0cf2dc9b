//! The FUSE export and loop devices against the real kernel: a test
//! `BlockDevice` (a sparse temp file) is exported through FUSE, attached to a
//! loop device with direct I/O, and exercised with O_DIRECT I/O, fsync,
//! discard, ext4, resize and teardown cycles.
//!
//! Needs root, /dev/fuse and loop devices; without them each test prints why
//! and returns. Every test runs under a timeout and cleans up through guards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use terna::datapath::frontend::fuse::{self, FuseExport, FuseOptions};
use terna::datapath::frontend::loopdev::{LoopDevice, LoopOptions};
use terna::datapath::frontend::{BlockDevice, DirectRead};

const MIB: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Tests share loop devices and CPU; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// Test device: a sparse temp file with counters.

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    aligned_writes: AtomicU64,
    max_write: AtomicUsize,
    min_write: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    flushes: AtomicU64,
    discards: AtomicU64,
    discarded: AtomicU64,
    /// Reads through `read_at`, and reads the FUSE server did itself.
    reads: AtomicU64,
    direct_done: Arc<AtomicU64>,
}

/// What `direct_read` hands out.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Direct {
    Nothing = 0,
    /// The device's own file.
    TheFile = 1,
    /// A file shorter than any read (/dev/null: every read comes back empty).
    Broken = 2,
}

struct FileRead {
    fd: std::os::fd::RawFd,
    _keep: Option<File>,
    done: Arc<AtomicU64>,
}

impl DirectRead for FileRead {
    fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }
    fn done(self: Box<Self>) {
        self.done.fetch_add(1, Ordering::SeqCst);
    }
}

struct FileDevice {
    file: File,
    size: AtomicU64,
    /// Simulated write latency (a disk), in microseconds.
    latency_us: AtomicU64,
    stats: Stats,
    direct: std::sync::atomic::AtomicU8,
}

impl FileDevice {
    fn new(path: &Path, size: u64) -> Arc<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        let stats = Stats {
            min_write: AtomicUsize::new(usize::MAX),
            ..Default::default()
        };
        Arc::new(FileDevice {
            file,
            size: AtomicU64::new(size),
            latency_us: AtomicU64::new(0),
            stats,
            direct: std::sync::atomic::AtomicU8::new(Direct::Nothing as u8),
        })
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn grow(&self, size: u64) {
        self.file.set_len(size).unwrap();
        self.size.store(size, Ordering::SeqCst);
    }

    fn sha256(&self, offset: u64, len: u64) -> String {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; MIB];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MIB as u64) as usize;
            self.read_at(&mut buf[..n], at).unwrap();
            h.update(&buf[..n]);
            at += n as u64;
        }
        hex(&h.finalize())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.stats.reads.fetch_add(1, Ordering::SeqCst);
        self.file.read_exact_at(buf, offset)
    }
    fn direct_read(&self, offset: u64, len: usize) -> Option<Box<dyn DirectRead>> {
        self.check(offset, len).ok()?;
        let done = self.stats.direct_done.clone();
        match self.direct.load(Ordering::SeqCst) {
            x if x == Direct::TheFile as u8 => Some(Box::new(FileRead {
                fd: self.file.as_raw_fd(),
                _keep: None,
                done,
            })),
            x if x == Direct::Broken as u8 => {
                let null = File::open("/dev/null").unwrap();
                Some(Box::new(FileRead {
                    fd: null.as_raw_fd(),
                    _keep: Some(null),
                    done,
                }))
            }
            _ => None,
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let s = &self.stats;
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        s.writes.fetch_add(1, Ordering::Relaxed);
        if (buf.as_ptr() as usize).is_multiple_of(4096) {
            s.aligned_writes.fetch_add(1, Ordering::Relaxed);
        }
        s.max_write.fetch_max(buf.len(), Ordering::Relaxed);
        s.min_write.fetch_min(buf.len(), Ordering::Relaxed);
        let latency = self.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            std::thread::sleep(Duration::from_micros(latency));
        }
        let r = self.file.write_all_at(buf, offset);
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn flush(&self) -> io::Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len as usize)?;
        self.stats.discards.fetch_add(1, Ordering::SeqCst);
        self.stats.discarded.fetch_add(len, Ordering::SeqCst);
        // SAFETY: plain fallocate on an open descriptor.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the environment cannot run these tests, if it cannot.
fn unsupported(need_loop: bool) -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing");
    }
    if need_loop && !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control is missing");
    }
    None
}

/// Runs `body` on its own thread, one test at a time, failing after
/// `TIMEOUT` instead of hanging.
fn run(name: &str, need_loop: bool, body: impl FnOnce() + Send + 'static) {
    if let Some(why) = unsupported(need_loop) {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(r);
        })
        .unwrap();
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{name} did not finish within {TIMEOUT:?}"),
    }
}

/// A page-aligned buffer for O_DIRECT (over-allocate, slice).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Aligned {
            storage,
            start,
            len,
        }
    }
    fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// xorshift64*: deterministic pseudo-random bytes.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

fn mounted_in_mountinfo(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn loop_size_bytes(dev: &LoopDevice) -> u64 {
    let name = dev.path().file_name().unwrap();
    let sectors: u64 = std::fs::read_to_string(Path::new("/sys/block").join(name).join("size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    sectors * 512
}

/// Thread name -> whether the kernel marked it PF_MEMALLOC_NOIO (what
/// PR_SET_IO_FLUSHER sets), from /proc/self/task/*/stat.
fn io_flusher_threads() -> std::collections::HashMap<String, bool> {
    const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
    let mut out = std::collections::HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        // After ") ": state ppid pgrp session tty_nr tpgid flags ...
        let flags: u64 = stat[close + 2..]
            .split(' ')
            .nth(6)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        out.insert(name, flags & PF_MEMALLOC_NOIO != 0);
    }
    out
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

const BLKDISCARD: libc::c_ulong = 0x1277;

fn blkdiscard(dev: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BLKDISCARD as libc::Ioctl, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Guard: everything a test set up, torn down in order even on panic.

struct Stack {
    dir: tempfile::TempDir,
    device: Arc<FileDevice>,
    export: Option<FuseExport>,
    loop_dev: Option<LoopDevice>,
    fs_mount: Option<PathBuf>,
}

impl Stack {
    /// A device of `size` bytes exported through FUSE (no loop yet).
    fn new(size: u64, opts: FuseOptions) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let device = FileDevice::new(&dir.path().join("device.img"), size);
        let mut stack = Stack {
            dir,
            device,
            export: None,
            loop_dev: None,
            fs_mount: None,
        };
        std::fs::create_dir(stack.mountpoint()).unwrap();
        stack.mount_fuse(opts);
        stack
    }

    fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("fuse mnt")
    }

    fn mount_fuse(&mut self, opts: FuseOptions) {
        let dev: Arc<dyn BlockDevice> = self.device.clone();
        self.export = Some(FuseExport::mount(&self.mountpoint(), dev, opts).unwrap());
    }

    fn volume(&self) -> PathBuf {
        self.export.as_ref().unwrap().path()
    }

    fn attach(&mut self) -> LoopDevice {
        let dev = LoopDevice::attach(
            &self.volume(),
            LoopOptions {
                read_only: false,
                direct_io: true,
            },
        )
        .unwrap();
        self.loop_dev = Some(dev.clone());
        dev
    }

    fn teardown(&mut self) {
        if let Some(m) = self.fs_mount.take() {
            nix::mount::umount2(&m, nix::mount::MntFlags::empty())
                .or_else(|_| nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH))
                .unwrap();
        }
        if let Some(dev) = self.loop_dev.take() {
            dev.detach().unwrap();
            assert_eq!(dev.backing_file(), None, "loop device still attached");
        }
        if let Some(export) = self.export.take() {
            export.unmount().unwrap();
        }
        assert!(!fuse::is_mounted(&self.mountpoint()));
        assert!(!mounted_in_mountinfo(&self.mountpoint()));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(m) = self.fs_mount.take() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = dev.detach();
        }
        if let Some(export) = self.export.take() {
            let _ = export.unmount();
        }
        let _ = fuse::unmount(&self.mountpoint());
    }
}

fn short_stop() -> FuseOptions {
    FuseOptions {
        stop_timeout: Duration::from_secs(3),
        ..FuseOptions::default()
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn fuse_export_serves_the_volume_file() {
    run("fuse_export_serves_the_volume_file", false, || {
        let mut s = Stack::new(64 * MIB as u64, FuseOptions::default());
        let mp = s.mountpoint();
        assert!(fuse::is_mounted(&mp), "is_mounted must decode \\040");
        assert!(mounted_in_mountinfo(&mp));
        let names: Vec<_> = std::fs::read_dir(&mp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["volume"]);
        let meta = std::fs::metadata(s.volume()).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), 64 * MIB as u64);
        assert!(std::fs::metadata(mp.join("nope")).is_err());

        // PR_SET_IO_FLUSHER is per thread: the workers have it, we do not.
        // It needs CAP_SYS_RESOURCE; without it the export still works.
        // A thread names itself once it runs, so one just started may
        // still carry its parent's name for a moment.
        let started = std::time::Instant::now();
        let mut flushers = io_flusher_threads();
        while flushers.keys().filter(|n| n.starts_with("fuse-")).count() < 34
            && started.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
            flushers = io_flusher_threads();
        }
        let me: String = std::thread::current()
            .name()
            .unwrap()
            .chars()
            .take(15)
            .collect();
        assert_eq!(flushers.get(&me), Some(&false), "{flushers:?}");
        let workers: Vec<bool> = flushers
            .iter()
            .filter(|(n, _)| n.starts_with("fuse-"))
            .map(|(_, f)| *f)
            .collect();
        // 32 helpers and 2 readers ("fuse-reader-N", cut to 15 bytes).
        assert_eq!(workers.len(), 34);
        if has_cap_sys_resource() {
            assert!(workers.iter().all(|f| *f), "{flushers:?}");
        } else {
            eprintln!("note: no CAP_SYS_RESOURCE here, so PR_SET_IO_FLUSHER cannot apply");
        }

        // O_DIRECT write and read through the FUSE file.
        let f = open_direct(&s.volume());
        let mut buf = Aligned::new(MIB);
        fill_random(buf.get_mut(), 1);
        f.write_all_at(buf.get(), 3 * MIB as u64).unwrap();
        let mut small = Aligned::new(4096);
        fill_random(small.get_mut(), 2);
        f.write_all_at(small.get(), 12288).unwrap();
        let mut back = Aligned::new(MIB);
        f.read_exact_at(back.get_mut(), 3 * MIB as u64).unwrap();
        assert!(back.get() == buf.get());
        let mut raw = vec![0u8; MIB];
        s.device.read_at(&mut raw, 3 * MIB as u64).unwrap();
        assert!(raw == buf.get());
        s.device.read_at(&mut raw[..4096], 12288).unwrap();
        assert!(raw[..4096] == *small.get());
        // Reading at the end gives EOF, writing past it is refused.
        assert_eq!(f.read_at(back.get_mut(), 64 * MIB as u64).unwrap(), 0);
        assert!(f.write_at(small.get(), 64 * MIB as u64).is_err());

        // fsync reaches flush; resizing is refused; other setattr works.
        let before = s.device.stats.flushes.load(Ordering::SeqCst);
        f.sync_all().unwrap();
        assert!(s.device.stats.flushes.load(Ordering::SeqCst) > before);
        assert!(f.set_len(MIB as u64).is_err());
        f.set_len(64 * MIB as u64).unwrap();
        // SAFETY: futimens reads no times through a NULL pointer (it sets
        // both to now), and `f` is open.
        let rc = unsafe { libc::futimens(f.as_raw_fd(), std::ptr::null()) };
        assert_eq!(rc, 0);

        // Punching a hole reaches discard.
        // SAFETY: fallocate on an open descriptor.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                3 * MIB as libc::off_t,
                MIB as libc::off_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        assert_eq!(s.device.stats.discards.load(Ordering::SeqCst), 1);
        f.read_exact_at(back.get_mut(), 3 * MIB as u64).unwrap();
        assert!(back.get().iter().all(|&b| b == 0));
        drop(f);

        // Payloads land page-aligned (our buffer layout) and whole.
        let st = &s.device.stats;
        assert_eq!(
            st.aligned_writes.load(Ordering::SeqCst),
            st.writes.load(Ordering::SeqCst)
        );
        assert_eq!(st.max_write.load(Ordering::SeqCst), MIB);

        s.teardown();
        // The free unmount is idempotent.
        fuse::unmount(&mp).unwrap();
    });
}

#[test]
fn reads_the_device_hands_out_are_done_by_the_server_and_failed_ones_fall_back() {
    run(
        "reads_the_device_hands_out_are_done_by_the_server_and_failed_ones_fall_back",
        false,
        || {
            let mut s = Stack::new(16 * MIB as u64, FuseOptions::default());
            let f = open_direct(&s.volume());
            let mut data = Aligned::new(4 * MIB);
            fill_random(data.get_mut(), 7);
            f.write_all_at(data.get(), 0).unwrap();
            let st = &s.device.stats;
            // Every 4 KiB block and 1 MiB chunk, in three modes: the
            // device's own reads, the server's reads of the device's file,
            // and the server's reads failing (so the device reads after all).
            for mode in [Direct::Nothing, Direct::TheFile, Direct::Broken] {
                s.device.direct.store(mode as u8, Ordering::SeqCst);
                let (reads, direct) = (
                    st.reads.load(Ordering::SeqCst),
                    st.direct_done.load(Ordering::SeqCst),
                );
                let mut back = Aligned::new(4 * MIB);
                for (i, chunk) in back.get_mut().chunks_mut(4096).enumerate().take(64) {
                    f.read_exact_at(chunk, (i * 4096) as u64).unwrap();
                }
                for (i, chunk) in back.get_mut().chunks_mut(MIB).enumerate() {
                    f.read_exact_at(chunk, (i * MIB) as u64).unwrap();
                }
                assert!(back.get() == data.get(), "data differs");
                let reads = st.reads.load(Ordering::SeqCst) - reads;
                let direct = st.direct_done.load(Ordering::SeqCst) - direct;
                match mode {
                    Direct::Nothing | Direct::Broken => {
                        assert_eq!((reads, direct), (68, 0))
                    }
                    Direct::TheFile => assert_eq!((reads, direct), (0, 68)),
                }
            }
            // Past the end, the device offers nothing and the read is short.
            s.device
                .direct
                .store(Direct::TheFile as u8, Ordering::SeqCst);
            let mut tail = Aligned::new(MIB);
            assert_eq!(
                f.read_at(tail.get_mut(), 16 * MIB as u64 - 4096).unwrap(),
                4096
            );
            drop(f);
            s.teardown();
        },
    );
}

#[test]
fn loop_over_fuse_keeps_data_intact() {
    run("loop_over_fuse_keeps_data_intact", true, || {
        const DATA: usize = 64 * MIB;
        let mut s = Stack::new(128 * MIB as u64, FuseOptions::default());
        let dev = s.attach();
        assert!(dev.direct_io(), "loop device must run with direct I/O");
        assert_eq!(dev.backing_file(), Some(s.volume()));
        let found = LoopDevice::find_by_backing(&s.volume()).unwrap().unwrap();
        assert_eq!(found.path(), dev.path());
        assert_eq!(loop_size_bytes(&dev), 128 * MIB as u64);

        let mut data = vec![0u8; DATA];
        fill_random(&mut data, 0x7e57);
        let data = Arc::new(data);
        let expected = hex(&Sha256::digest(&data[..]));

        // First 48 MiB: 1 MiB writes from 4 threads; last 16 MiB: 4 KiB writes.
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..4usize {
                let data = data.clone();
                let path = dev.path().to_path_buf();
                scope.spawn(move || {
                    let f = open_direct(&path);
                    let mut buf = Aligned::new(MIB);
                    for i in (t..48).step_by(4) {
                        buf.get_mut().copy_from_slice(&data[i * MIB..(i + 1) * MIB]);
                        f.write_all_at(buf.get(), (i * MIB) as u64).unwrap();
                    }
                });
            }
        });
        let parallel = started.elapsed();
        let f = open_direct(dev.path());
        let mut page = Aligned::new(4096);
        for off in (48 * MIB..DATA).step_by(4096) {
            page.get_mut().copy_from_slice(&data[off..off + 4096]);
            f.write_all_at(page.get(), off as u64).unwrap();
        }
        let before = s.device.stats.flushes.load(Ordering::SeqCst);
        f.sync_all().unwrap();
        assert!(
            s.device.stats.flushes.load(Ordering::SeqCst) > before,
            "fsync on the loop device must reach BlockDevice::flush"
        );

        // Read back through the loop device; compare with what the device holds.
        let mut h = Sha256::new();
        let mut buf = Aligned::new(MIB);
        for i in 0..DATA / MIB {
            f.read_exact_at(buf.get_mut(), (i * MIB) as u64).unwrap();
            h.update(buf.get());
        }
        assert_eq!(hex(&h.finalize()), expected, "read back through loop");
        assert_eq!(s.device.sha256(0, DATA as u64), expected, "device contents");

        let st = &s.device.stats;
        eprintln!(
            "loop->FUSE: 48 MiB of 1 MiB writes by 4 threads in {parallel:?}; device saw {} writes, \
             sizes {}..{} bytes, {} page-aligned, up to {} in flight",
            st.writes.load(Ordering::SeqCst),
            st.min_write.load(Ordering::SeqCst),
            st.max_write.load(Ordering::SeqCst),
            st.aligned_writes.load(Ordering::SeqCst),
            st.max_in_flight.load(Ordering::SeqCst),
        );
        // The block layer splits requests at 128 segments of up to 64 KiB
        // (loop's queue limits), so how large they arrive depends on how
        // physically contiguous the writer's pages are: 512 KiB to 1 MiB.
        let max = st.max_write.load(Ordering::SeqCst);
        assert!((MIB / 2..=MIB).contains(&max), "largest write {max}");

        // Discard through the loop device reaches BlockDevice::discard.
        blkdiscard(&f, 8 * MIB as u64, 8 * MIB as u64).unwrap();
        assert!(st.discards.load(Ordering::SeqCst) > 0);
        assert!(st.discarded.load(Ordering::SeqCst) >= 8 * MIB as u64);
        f.read_exact_at(buf.get_mut(), 10 * MIB as u64).unwrap();
        assert!(
            buf.get().iter().all(|&b| b == 0),
            "discarded range reads as zeroes"
        );
        f.read_exact_at(buf.get_mut(), 16 * MIB as u64).unwrap();
        assert!(buf.get() == &data[16 * MIB..17 * MIB]);
        drop(f);

        // Growing the device, then the loop device.
        s.device.grow(160 * MIB as u64);
        dev.set_capacity().unwrap();
        assert_eq!(loop_size_bytes(&dev), 160 * MIB as u64);

        measure_throughput(dev.path());
        concurrency_reaches_the_device(&s.device, dev.path());
        s.teardown();
        let volume = s.mountpoint().join("volume");
        assert!(LoopDevice::find_by_backing(&volume).unwrap().is_none());
    });
}

/// Sequential 1 MiB O_DIRECT writes then reads at queue depth 1 (like `dd
/// oflag=direct bs=1M`), over the first 64 MiB; prints MB/s.
fn measure_throughput(path: &Path) {
    let f = open_direct(path);
    let mut buf = Aligned::new(MIB);
    fill_random(buf.get_mut(), 99);
    let rounds = 4;
    let started = Instant::now();
    for _ in 0..rounds {
        for i in 0..64 {
            f.write_all_at(buf.get(), (i * MIB) as u64).unwrap();
        }
    }
    let w = started.elapsed();
    let started = Instant::now();
    for _ in 0..rounds {
        for i in 0..64 {
            f.read_exact_at(buf.get_mut(), (i * MIB) as u64).unwrap();
        }
    }
    let r = started.elapsed();
    let mb = (rounds * 64) as f64 * 1.048_576;
    eprintln!(
        "QD1 1 MiB O_DIRECT via loop->FUSE->temp file: write {:.0} MB/s, read {:.0} MB/s",
        mb / w.as_secs_f64(),
        mb / r.as_secs_f64()
    );
}

/// With a 2 ms "disk", 32 writers must keep many requests in flight at
/// once (async direct I/O, background limit, one request per FUSE thread).
fn concurrency_reaches_the_device(device: &FileDevice, path: &Path) {
    device.latency_us.store(2000, Ordering::SeqCst);
    device.stats.max_in_flight.store(0, Ordering::SeqCst);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..32u64 {
            scope.spawn(move || {
                let f = open_direct(path);
                let mut buf = Aligned::new(128 << 10);
                fill_random(buf.get_mut(), t);
                for i in 0..8 {
                    f.write_all_at(buf.get(), (t * 8 + i) * (128 << 10))
                        .unwrap();
                }
            });
        }
    });
    device.latency_us.store(0, Ordering::SeqCst);
    let max = device.stats.max_in_flight.load(Ordering::SeqCst);
    eprintln!(
        "32 writers x 8 x 128 KiB against a 2 ms device: {:?}, up to {max} writes in flight",
        started.elapsed()
    );
    assert!(max >= 16, "only {max} writes in flight");
}

#[test]
fn ext4_on_loop_survives_remount_and_tears_down_cleanly() {
    run(
        "ext4_on_loop_survives_remount_and_tears_down_cleanly",
        true,
        || {
            let mut s = Stack::new(256 * MIB as u64, FuseOptions::default());
            let dev = s.attach();
            let out = Command::new("mkfs.ext4")
                .args(["-F", "-q"])
                .arg(dev.path())
                .output()
                .expect("mkfs.ext4 must be installed");
            assert!(out.status.success(), "mkfs.ext4: {out:?}");
            // mkfs discards the whole device first.
            assert!(s.device.stats.discards.load(Ordering::SeqCst) > 0);

            let fs = s.dir.path().join("fs");
            std::fs::create_dir(&fs).unwrap();
            let mut payload = vec![0u8; 8 * MIB + 123];
            fill_random(&mut payload, 5);
            let sum = hex(&Sha256::digest(&payload));
            for round in 0..2 {
                nix::mount::mount(
                    Some(dev.path()),
                    &fs,
                    Some("ext4"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .unwrap();
                s.fs_mount = Some(fs.clone());
                let file = fs.join("data.bin");
                if round == 0 {
                    std::fs::write(&file, &payload).unwrap();
                    File::open(&file).unwrap().sync_all().unwrap();
                }
                assert_eq!(hex(&Sha256::digest(std::fs::read(&file).unwrap())), sum);
                nix::mount::umount2(&fs, nix::mount::MntFlags::empty()).unwrap();
                s.fs_mount = None;
            }
            assert!(s.device.stats.flushes.load(Ordering::SeqCst) > 0);

            // Teardown in order: filesystem, loop device, FUSE.
            s.teardown();
            assert!(!mounted_in_mountinfo(&fs));
            assert_eq!(dev.backing_file(), None);
        },
    );
}

#[test]
fn mount_attach_detach_unmount_cycles() {
    run("mount_attach_detach_unmount_cycles", true, || {
        for cycle in 0..10u64 {
            let mut s = Stack::new(32 * MIB as u64, FuseOptions::default());
            let dev = s.attach();
            let f = open_direct(dev.path());
            let mut buf = Aligned::new(MIB);
            fill_random(buf.get_mut(), cycle);
            f.write_all_at(buf.get(), cycle * MIB as u64).unwrap();
            f.sync_all().unwrap();
            drop(f);
            let mut raw = vec![0u8; MIB];
            s.device.read_at(&mut raw, cycle * MIB as u64).unwrap();
            assert!(raw == buf.get(), "cycle {cycle}");
            s.teardown();
            assert_eq!(dev.backing_file(), None, "cycle {cycle}");
        }
    });
}

#[test]
fn wait_returns_after_external_unmount() {
    run("wait_returns_after_external_unmount", false, || {
        let mut s = Stack::new(MIB as u64, FuseOptions::default());
        let mp = s.mountpoint();
        std::fs::metadata(s.volume()).unwrap();
        let export = s.export.take().unwrap();
        let waiter = std::thread::spawn(move || export.wait());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished());
        fuse::unmount(&mp).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !waiter.is_finished() {
            assert!(Instant::now() < deadline, "wait() did not return");
            std::thread::sleep(Duration::from_millis(10));
        }
        waiter.join().unwrap();
        assert!(!fuse::is_mounted(&mp));
        fuse::unmount(&mp).unwrap();
    });
}

#[test]
fn dropping_export_under_an_attached_loop_does_not_hang() {
    run(
        "dropping_export_under_an_attached_loop_does_not_hang",
        true,
        || {
            let mut s = Stack::new(16 * MIB as u64, short_stop());
            let dev = s.attach();
            let mp = s.mountpoint();
            // Wrong order on purpose: the FUSE file is still in use by the loop
            // device, so unmounting is lazy and the session must be aborted.
            let started = Instant::now();
            drop(s.export.take());
            assert!(started.elapsed() < Duration::from_secs(30));
            assert!(!mounted_in_mountinfo(&mp));
            // The loop device now fails I/O instead of hanging, and detaches.
            let f = open_direct(dev.path());
            let mut buf = Aligned::new(4096);
            assert!(f.read_exact_at(buf.get_mut(), 0).is_err());
            drop(f);
            s.loop_dev = None;
            dev.detach().unwrap();
            assert_eq!(dev.backing_file(), None);
            assert!(
                LoopDevice::find_by_backing(&mp.join("volume"))
                    .unwrap()
                    .is_none()
            );
        },
    );
}
