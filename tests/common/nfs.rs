//! Real NFS servers for the tests: nfs-ganesha (Debian's, installed by
//! scripts/install-test-tools) exporting temporary directories over NFSv3,
//! each on its own loopback address (so each is its own failure domain)
//! and ports, next to the one rpcbind they all register with.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

/// Loopback addresses handed out to servers of this test process.
static NEXT_ADDR: AtomicU8 = AtomicU8::new(2);
/// rpcbind, shared by the servers running at a time: (users, ours).
static RPCBIND: Mutex<(usize, Option<Child>)> = Mutex::new((0, None));

fn rpcbind_answers() -> bool {
    Command::new("rpcinfo")
        .args(["-p", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Holds rpcbind up while alive: the first holder starts it (unless one
/// already runs on this machine), the last stops it by its pid.
pub struct Rpcbind;

impl Rpcbind {
    pub fn acquire() -> Rpcbind {
        let mut g = RPCBIND.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        if g.1.is_none() && !rpcbind_answers() {
            let child = Command::new("rpcbind")
                .args(["-f", "-w"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start rpcbind (scripts/install-test-tools installs it)");
            g.1 = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !rpcbind_answers() {
                assert!(Instant::now() < deadline, "rpcbind did not answer");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Rpcbind
    }
}

impl Drop for Rpcbind {
    fn drop(&mut self) {
        let mut g = RPCBIND.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if g.0 == 0
            && let Some(mut child) = g.1.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One nfs-ganesha instance exporting one directory.
pub struct Ganesha {
    pub dir: PathBuf,
    pub export: PathBuf,
    pub addr: String,
    pub port: u16,
    pub mount_port: u16,
    read_only: bool,
    /// Exported with `Squash = Root_Squash` instead of `No_Root_Squash`.
    squash_root: bool,
    child: Option<Child>,
    _rpcbind: Rpcbind,
}

fn free_port(addr: &str) -> u16 {
    std::net::TcpListener::bind((addr, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Ganesha {
    /// A server under `root/name` exporting `root/name/export`.
    pub fn start(root: &Path, name: &str) -> Ganesha {
        Self::start_with(root, name, false, None)
    }

    /// A server whose export squashes root (`Squash = Root_Squash`), which
    /// Terna cannot fence replicas on. Its directory is writable by all, as
    /// such exports are, so the squashed root can still create files.
    pub fn start_squashing_root(root: &Path, name: &str) -> Ganesha {
        Self::start_full(root, name, false, None, true)
    }

    /// `read_only` exports it RO; `export` serves that directory instead
    /// (e.g. a small filesystem mounted by the test).
    pub fn start_with(
        root: &Path,
        name: &str,
        read_only: bool,
        export: Option<PathBuf>,
    ) -> Ganesha {
        Self::start_full(root, name, read_only, export, false)
    }

    fn start_full(
        root: &Path,
        name: &str,
        read_only: bool,
        export: Option<PathBuf>,
        squash_root: bool,
    ) -> Ganesha {
        let rpcbind = Rpcbind::acquire();
        let dir = root.join(name);
        let export = export.unwrap_or_else(|| dir.join("export"));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(&export).unwrap();
        if squash_root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let addr = format!("127.0.0.{}", NEXT_ADDR.fetch_add(1, Ordering::SeqCst));
        let (port, mount_port) = (free_port(&addr), free_port(&addr));
        let mut g = Ganesha {
            dir,
            export,
            addr,
            port,
            mount_port,
            read_only,
            squash_root,
            child: None,
            _rpcbind: rpcbind,
        };
        g.write_config();
        g.spawn();
        g
    }

    fn write_config(&self) {
        let conf = format!(
            "NFS_CORE_PARAM {{\n  Bind_addr = {addr};\n  NFS_Port = {port};\n  MNT_Port = {mnt};\n  \
             NFS_Protocols = 3;\n  Enable_NLM = false;\n  Enable_RQUOTA = false;\n  Enable_UDP = false;\n  \
             mount_path_pseudo = true;\n}}\n\
             NFS_KRB5 {{ Active_krb5 = false; }}\n\
             NFSV4 {{ Graceless = true; Grace_Period = 0; RecoveryBackend = fs; RecoveryRoot = {state}; }}\n\
             LOG {{ Default_Log_Level = EVENT; COMPONENTS {{ DBUS = FATAL; }} }}\n\
             EXPORT {{\n  Export_Id = 1;\n  Path = {export};\n  Pseudo = /export;\n  Protocols = 3;\n  \
             Transports = TCP;\n  Access_Type = {access};\n  Squash = {squash};\n  SecType = sys;\n  \
             FSAL {{ Name = VFS; }}\n}}\n",
            addr = self.addr,
            port = self.port,
            mnt = self.mount_port,
            state = self.dir.join("state").display(),
            export = self.export.display(),
            access = if self.read_only { "RO" } else { "RW" },
            squash = if self.squash_root {
                "Root_Squash"
            } else {
                "No_Root_Squash"
            },
        );
        std::fs::write(self.dir.join("ganesha.conf"), conf).unwrap();
    }

    /// Starts the server and waits until it serves. Start-ups are
    /// serialised: each one re-registers the same programs with rpcbind
    /// and gives up if another start-up undid them meanwhile.
    fn spawn(&mut self) {
        static STARTING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        let log = self.dir.join("ganesha.log");
        let _ = std::fs::remove_file(&log);
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(self.dir.join("ganesha.conf"))
            .arg("-L")
            .arg(&log)
            .arg("-p")
            .arg(self.dir.join("ganesha.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("cannot start ganesha.nfsd (scripts/install-test-tools installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("NFS SERVER INITIALIZED") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ganesha in {} exited ({status}):\n{text}",
                    self.dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ganesha in {} not serving after 20 s:\n{text}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Killed with SIGKILL, as a crashed server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a server that hangs, its
    /// connections open but nothing answered.
    pub fn set_running(&self, running: bool) {
        let child = self.child.as_ref().expect("ganesha is not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            if running {
                nix::sys::signal::Signal::SIGCONT
            } else {
                nix::sys::signal::Signal::SIGSTOP
            },
        )
        .unwrap();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "ganesha is still running");
        self.spawn();
    }

    /// The `[[pools]]` entry of a terna.toml for this export.
    pub fn pool_toml(&self, name: &str, tier: &str) -> String {
        format!(
            "[[pools]]\nname = \"{name}\"\ntier = \"{tier}\"\n[pools.nfs]\nserver = \"{}\"\nport = {}\nmount_port = {}\nexport = \"/export\"\nsubdir = \"terna\"\n",
            self.addr, self.port, self.mount_port
        )
    }

    /// A replica file as the server stores it.
    pub fn replica_file(&self, volume_id: &str, index: usize) -> PathBuf {
        self.export
            .join("terna")
            .join(format!("{volume_id}.r{index}.img"))
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `n` servers under `root` (`s1`, `s2`, ...).
pub fn start_servers(root: &Path, n: usize) -> Vec<Ganesha> {
    (1..=n)
        .map(|i| Ganesha::start(root, &format!("s{i}")))
        .collect()
}

/// terna.toml pools `nfs-0`, `nfs-1`, ... (tier standard), one per server.
pub fn pools_toml(servers: &[Ganesha]) -> String {
    servers
        .iter()
        .enumerate()
        .map(|(i, s)| s.pool_toml(&format!("nfs-{i}"), "standard"))
        .collect()
}
