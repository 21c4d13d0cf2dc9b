//! The data dir: where each kind of state lives in it. Its one owner is
//! `datapath::host::lock`.

use std::path::{Path, PathBuf};

/// Where the file state store keeps volume records.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("volumes")
}

/// Where a volume's dirty maps are kept; they outlive staging, so a
/// replica that returns while the volume is unstaged still catches up
/// incrementally.
pub fn dirty_dir(data_dir: &Path, volume_id: &str) -> PathBuf {
    data_dir.join("dirty").join(volume_id)
}

/// Where an agent keeps its replicas' claim floors.
pub fn fence_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("fences")
}
