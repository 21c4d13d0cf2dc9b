//! A pool on a disk that fails. The disk is the test's own: a file served
//! through a FUSE export (Terna's FUSE server over a device that starts
//! answering EIO when told), attached to a loop device, with ext4 on it
//! mounted as the pool's directory. To the engine and the kernel it is a
//! real disk whose reads and writes fail. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::csi_client::{Csi, mount_cap};
use terna::datapath::frontend::BlockDevice;
use terna::datapath::frontend::fuse::{FuseExport, FuseOptions};
use terna::datapath::frontend::loopdev::{LoopDevice, LoopOptions};

/// A disk: a sparse file, every I/O failing with EIO once `failing`.
struct Disk {
    file: std::fs::File,
    size: u64,
    failing: AtomicBool,
}

impl Disk {
    fn eio(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.eio()?;
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.eio()?;
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.eio()?;
        self.file.sync_data()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.eio()
    }
}

/// The disk, exported, attached and formatted, with its ext4 mounted at
/// `pool`. Dropped in reverse: unmounted, detached, export stopped.
struct PoolDisk {
    disk: Arc<Disk>,
    pool: PathBuf,
    device: Option<LoopDevice>,
    export: Option<FuseExport>,
    _dir: tempfile::TempDir,
}

impl PoolDisk {
    fn new(size: u64) -> PoolDisk {
        let dir = tempfile::Builder::new()
            .prefix("terna-disk-")
            .tempdir()
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        file.set_len(size).unwrap();
        let disk = Arc::new(Disk {
            file,
            size,
            failing: AtomicBool::new(false),
        });
        let mountpoint = dir.path().join("fuse");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let export = FuseExport::mount(
            &mountpoint,
            disk.clone(),
            FuseOptions {
                readers: 1,
                threads: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let device = LoopDevice::attach(
            &export.path(),
            LoopOptions {
                read_only: false,
                direct_io: true,
            },
        )
        .unwrap();
        let pool_disk = PoolDisk {
            disk,
            pool: dir.path().join("pool"),
            device: Some(device),
            export: Some(export),
            _dir: dir,
        };
        let dev = pool_disk.device.as_ref().unwrap().path().to_path_buf();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal"])
            .arg(&dev));
        std::fs::create_dir_all(&pool_disk.pool).unwrap();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "errors=continue"])
            .arg(&dev)
            .arg(&pool_disk.pool));
        pool_disk
    }
}

impl Drop for PoolDisk {
    fn drop(&mut self) {
        self.disk.failing.store(false, Ordering::SeqCst);
        if terna::datapath::host::mounts::is_mounted(&self.pool).unwrap_or(false) {
            let _ = nix::mount::umount2(&self.pool, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(dev) = self.device.take()
            && let Err(e) = dev.detach()
        {
            eprintln!("the pool's disk would not detach: {e}");
        }
        if let Some(export) = self.export.take() {
            let _ = export.unmount();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

fn record(data_dir: &Path, id: &str) -> serde_json::Value {
    let path = terna::core::data_dir::state_dir(data_dir).join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// EIO from the disk under a one-replica volume, whose I/O the kernel does
/// itself (FUSE passthrough) and the engine never sees, is still recorded:
/// the replica is faulted in the store with the read that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_eio_under_a_passthrough_volume_is_recorded_as_a_replica_fault() {
    if !common::require_root("disk_eio_under_a_passthrough_volume_is_recorded_as_a_replica_fault") {
        return;
    }
    let disk = PoolDisk::new(64 << 20);
    let pool = disk.pool.clone();
    let terna = common::Standalone::start_with(|data_dir| {
        std::fs::create_dir_all(data_dir).unwrap();
        let mut config = terna::core::config::Config::default_standalone();
        let mut only = config.pools[0].clone();
        only.path = pool;
        config.pools = vec![only];
        std::fs::write(
            data_dir.join("terna.toml"),
            toml::to_string(&config).unwrap(),
        )
        .unwrap();
    });
    let mut csi = Csi::connect(&terna.socket).await;
    let id = csi
        .create(
            "on-a-bad-disk",
            16 << 20,
            &[("replicas", "1")],
            mount_cap("ext4"),
        )
        .await
        .unwrap()
        .volume_id;
    let staging = terna.dir.path().join("staging");
    csi.stage(&id, &staging, mount_cap("ext4")).await;
    common::write_synced(&staging.join("data"), &common::content(5, 1 << 20));
    let run_dir = terna.data_dir.join("run").join(&id);
    let log = std::fs::read_to_string(run_dir.join("engine.log")).unwrap();
    assert!(
        log.contains("FUSE passthrough: the kernel serves"),
        "the volume is not passthrough:\n{log}"
    );
    let device = std::fs::read_to_string(run_dir.join("device")).unwrap();

    disk.disk.failing.store(true, Ordering::SeqCst);
    // What the pod sees: its reads fail.
    let mut buf = terna::datapath::replica::aligned::AlignedBuf::zeroed(4096);
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device.trim())
        .unwrap()
        .read_at(buf.as_mut_slice(), 0);
    assert!(read.is_err(), "the failing disk still reads");

    let deadline = Instant::now() + Duration::from_secs(60);
    let replica = loop {
        let replica = record(&terna.data_dir, &id)["replicas"][0].clone();
        if replica["state"]["state"] == "faulted" {
            break replica;
        }
        assert!(
            Instant::now() < deadline,
            "the disk's EIO was never recorded: {replica}\n{}",
            std::fs::read_to_string(run_dir.join("engine.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let reason = replica["state"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("read check"), "{replica}");

    disk.disk.failing.store(false, Ordering::SeqCst);
    csi.unstage(&id, &staging).await;
    csi.delete(&id).await;
    terna.stop_and_check_clean();
    drop(disk);
}
