//! What the cluster controller does while it leads: provision claims,
//! report each pool's allocation and publish storage capacity. It leads
//! until the lease is lost (say, the API server was away longer than the
//! lease), then stands by and tries again: it never acts unled.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::Recorder;
use tracing::{info, warn};

use crate::core::controller::ControllerCore;
use crate::core::error::{Error, Result};
use crate::edge::kube::leader::{self, LeaseConfig};
use crate::edge::kube::pool_list::PoolList;
use crate::edge::kube::provisioner::Provisioner;
use crate::edge::metrics::controller::ControllerMetrics;

/// How often the leader reports allocation and capacity.
const REPORT_EVERY: Duration = Duration::from_secs(10);

pub struct Leading {
    pub client: kube::Client,
    pub identity: String,
    /// `None`: lead without election (one controller only).
    pub lease: Option<LeaseConfig>,
    /// Claims provisioned at once.
    pub concurrency: u16,
    /// Publish CSIStorageCapacity objects into this namespace.
    pub capacity_namespace: Option<String>,
    pub core: Arc<ControllerCore>,
    pub pools: Arc<PoolList>,
    pub metrics: Arc<ControllerMetrics>,
}

impl Leading {
    /// Leads whenever this process holds the lease; returns only when
    /// leading failed.
    pub async fn run(&self) -> Result<()> {
        loop {
            if let Some(lease) = &self.lease {
                leader::acquire(self.client.clone(), lease).await;
            }
            self.metrics.set_leading(true);
            let led = self.lead().await;
            self.metrics.set_leading(false);
            led?;
            warn!("leadership lost; standing by");
        }
    }

    /// Provisions while this process holds the lease; `Ok` when it is lost.
    async fn lead(&self) -> Result<()> {
        // A new leader starts from pools listed now, not from what the
        // list held when it last led.
        let objects = loop {
            match self.pools.refresh().await {
                Ok(objects) => break objects,
                Err(e) => {
                    warn!(error = %e, "cannot list StoragePools");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        info!(pools = objects.len(), "provisioning");
        let provisioner = Arc::new(Provisioner {
            client: self.client.clone(),
            core: self.core.clone(),
            driver: crate::DRIVER_NAME.to_string(),
            recorder: Recorder::new(self.client.clone(), Provisioner::reporter(&self.identity)),
            concurrency: self.concurrency,
            metrics: self.metrics.clone(),
        });
        let reporting = async {
            loop {
                let objects = self.pools.latest();
                crate::edge::kube::allocation::report(&self.client, self.core.clone(), &objects)
                    .await;
                if let Some(ns) = &self.capacity_namespace {
                    crate::edge::kube::capacity::publish(
                        &self.client,
                        ns,
                        self.core.clone(),
                        crate::DRIVER_NAME,
                    )
                    .await;
                }
                tokio::time::sleep(REPORT_EVERY).await;
            }
        };
        let holding = async {
            match &self.lease {
                Some(lease) => leader::hold(self.client.clone(), lease).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = provisioner.run() => Err(Error::internal("the provisioner stopped")),
            () = reporting => Err(Error::internal("the allocation reporter stopped")),
            () = holding => Ok(()),
        }
    }
}
