//! The controller's one list of the cluster's StoragePools: refreshed every
//! few seconds, it sets the pools the core places replicas on and is what
//! the leader reports allocation against, so both see the same objects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, ListParams};
use tracing::warn;

use crate::core::controller::ControllerCore;
use crate::edge::kube::crd::StoragePool;
use crate::edge::kube::pools::PoolDirectory;

/// How often the list is refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

pub struct PoolList {
    api: Api<StoragePool>,
    directory: PoolDirectory,
    core: Arc<ControllerCore>,
    latest: Mutex<Arc<Vec<StoragePool>>>,
}

impl PoolList {
    pub fn new(client: kube::Client, directory: PoolDirectory, core: Arc<ControllerCore>) -> Self {
        PoolList {
            api: Api::all(client),
            directory,
            core,
            latest: Mutex::new(Arc::new(Vec::new())),
        }
    }

    /// Lists the StoragePools now and hands them to the core.
    pub async fn refresh(&self) -> Result<Arc<Vec<StoragePool>>, kube::Error> {
        let objects = self.api.list(&ListParams::default()).await?.items;
        let shared: Vec<Arc<StoragePool>> = objects.iter().cloned().map(Arc::new).collect();
        self.core.set_pools(Arc::new(self.directory.pools(&shared)));
        let objects = Arc::new(objects);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = objects.clone();
        Ok(objects)
    }

    /// The objects of the last successful refresh.
    pub fn latest(&self) -> Arc<Vec<StoragePool>> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refreshes forever. Every controller replica does, leader or not:
    /// the CSI endpoint answers whoever leads.
    pub async fn keep_current(&self) {
        loop {
            if let Err(e) = self.refresh().await {
                warn!(error = %e, "cannot list StoragePools");
            }
            tokio::time::sleep(REFRESH_EVERY).await;
        }
    }
}
