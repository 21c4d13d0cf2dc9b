//! `terna.toml` and the cluster token on disk: the configuration is
//! written once with defaults on first start and read on every start
//! after; the token file is read, checked and kept private.

use std::path::Path;

use crate::core::config::{CONFIG_FILE, Config, HEADER, MIN_TOKEN_BYTES, check_cluster_token};
use crate::core::error::{Error, Result};
use crate::datapath::host::files::atomic_write;

/// Loads `data_dir/terna.toml`, writing the default first when it is absent.
pub fn load_or_init(data_dir: &Path) -> Result<Config> {
    load_or_init_with(data_dir, Config::default_standalone)
}

pub fn load_or_init_with(data_dir: &Path, default: fn() -> Config) -> Result<Config> {
    prepare_data_dir(data_dir)?;
    let path = data_dir.join(CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Config::parse(&text, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let config = default();
            let body = toml::to_string_pretty(&config)
                .map_err(|e| Error::internal(format!("cannot encode default config: {e}")))?;
            atomic_write(&path, format!("{HEADER}\n{body}").as_bytes())?;
            Ok(config)
        }
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

/// Installs `source` (an admin's file, e.g. a ConfigMap's) as the data
/// dir's `terna.toml`, where every process of the node, engines included,
/// reads it; checked first, so a bad file leaves the installed one alone.
pub fn install_from(source: &Path, data_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(source)
        .map_err(|e| Error::io(format!("cannot read {}", source.display()), e))?;
    Config::parse(&text, source)?;
    prepare_data_dir(data_dir)?;
    atomic_write(&data_dir.join(CONFIG_FILE), text.as_bytes())
}

/// The cluster token agents and their peers authenticate with, from
/// `cluster_token_file`. There is no default: an agent without one
/// would serve anyone, so a missing, short or placeholder token is an
/// error saying how to make one.
pub fn cluster_token(config: &Config, data_dir: &Path) -> Result<Vec<u8>> {
    let Some(file) = &config.cluster_token_file else {
        return Err(Error::precondition(format!(
            "no cluster token: set cluster_token_file in {} to a file holding a secret of at least {MIN_TOKEN_BYTES} bytes, made with `openssl rand -hex 32 > FILE` (the replica agent and every node reaching it must share it)",
            data_dir.join(CONFIG_FILE).display()
        )));
    };
    let path = if file.is_absolute() {
        file.clone()
    } else {
        data_dir.join(file)
    };
    let token = read_cluster_token(&path)?;
    if path.starts_with(data_dir) {
        restrict_token_file(&path)?;
    } else {
        warn_if_readable(&path);
    }
    Ok(token)
}
/// Reads a cluster token file (`cluster_token_file`, `--cluster-token-file`)
/// and checks it as every token is (`config::check_cluster_token`):
/// a short, long or placeholder token is refused with a message saying how
/// to make a good one.
pub fn read_cluster_token(path: &Path) -> Result<Vec<u8>> {
    let make = format!("make one with `openssl rand -hex 32 > {}`", path.display());
    let mut token = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, 64 * 1024), &mut token)
        })
        .map_err(|e| {
            Error::with_source(
                crate::core::error::ErrorKind::FailedPrecondition,
                format!(
                    "cannot read cluster token {} (cluster_token_file); {make}",
                    path.display()
                ),
                e,
            )
        })?;
    match check_cluster_token(&token) {
        Ok(token) => Ok(token.to_vec()),
        Err(problem) => Err(Error::precondition(format!(
            "cluster token {} (cluster_token_file) {problem}; {make}",
            path.display()
        ))),
    }
}

/// A token file inside the data dir is ours to keep private: 0600 in a
/// 0700 directory.
fn restrict_token_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        crate::datapath::host::files::private_dir(dir)?;
    }
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    if meta.file_type().is_file() && meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(crate::datapath::host::files::PRIVATE_FILE_MODE),
        )
        .map_err(|e| Error::io(format!("cannot restrict {}", path.display()), e))?;
    }
    Ok(())
}

/// A token file elsewhere (a mounted Secret) is left alone, but a token
/// other users can read is worth a warning.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the cluster token file is readable by other users: chmod 600 it"
        );
    }
}

/// The data dir and the directories of private state in it: created 0700
/// (the data dir itself only when it is new), and tightened to 0700 when an
/// older version left them open (`state`, `dirty`, `fences`).
pub fn prepare_data_dir(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !data_dir.exists() {
        crate::datapath::host::files::private_dir(data_dir)?;
    }
    for dir in [
        crate::core::data_dir::state_root(data_dir),
        crate::core::data_dir::dirty_root(data_dir),
    ] {
        crate::datapath::host::files::private_dir(&dir)?;
    }
    for dir in [
        crate::core::data_dir::fence_dir(data_dir),
        crate::core::data_dir::run_root(data_dir),
    ] {
        if dir.exists() {
            crate::datapath::host::files::private_dir(&dir)?;
        }
    }
    // It names the token file and the pools: nobody else's business.
    let config = data_dir.join(CONFIG_FILE);
    if let Ok(meta) = std::fs::metadata(&config)
        && meta.permissions().mode() & 0o077 != 0
    {
        match std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            // Mounted read-only over the data dir (a ConfigMap, in deploy/):
            // its mode is the mount's to set.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => tracing::warn!(
                file = %config.display(),
                "the config file is readable by other users and on a read-only mount; give the mount mode 0400"
            ),
            Err(e) => {
                return Err(Error::io(
                    format!("cannot restrict {}", config.display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}
