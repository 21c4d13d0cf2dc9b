//! The controller's /metrics: provisioning outcomes and latency, volumes
//! by state, and whether this replica leads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::controller::ControllerCore;
use crate::core::metrics::{Histogram, histogram_lines};

pub struct ControllerMetrics {
    core: Arc<ControllerCore>,
    leading: AtomicBool,
    provisioned: AtomicU64,
    deleted: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latency: Histogram,
}

impl ControllerMetrics {
    pub fn new(core: Arc<ControllerCore>) -> ControllerMetrics {
        ControllerMetrics {
            core,
            leading: AtomicBool::new(false),
            provisioned: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            latency: Histogram::default(),
        }
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    /// A claim got its volume and PV, taking `elapsed`.
    pub fn provisioned(&self, elapsed: Duration) {
        self.provisioned.fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    pub fn deleted(&self) {
        self.deleted.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed attempt, by the reason its event carries.
    pub fn failed(&self, reason: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(reason.to_string()).or_default() += 1;
    }
}

impl crate::edge::metrics::http::Probe for ControllerMetrics {
    fn metrics(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP terna_controller_leading 1 while this controller holds the lease.\n# TYPE terna_controller_leading gauge\nterna_controller_leading {}",
            u8::from(self.leading.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP terna_claims_provisioned_total Claims given a volume and a PV.\n# TYPE terna_claims_provisioned_total counter\nterna_claims_provisioned_total {}",
            self.provisioned.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP terna_volumes_reclaimed_total Volumes deleted after their claim was released.\n# TYPE terna_volumes_reclaimed_total counter\nterna_volumes_reclaimed_total {}",
            self.deleted.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP terna_provision_errors_total Failed provisioning attempts by reason.\n# TYPE terna_provision_errors_total counter"
        );
        for (reason, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "terna_provision_errors_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP terna_provision_seconds Time to create a claim's replicas and PV.\n# TYPE terna_provision_seconds histogram"
        );
        out += &histogram_lines("terna_provision_seconds", "", &self.latency.snapshot());
        let mut states: BTreeMap<&'static str, u64> = BTreeMap::new();
        for r in self.core.list_all().unwrap_or_default() {
            *states
                .entry(crate::edge::kube::store::volume_state(&r))
                .or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP terna_volumes Volumes by state.\n# TYPE terna_volumes gauge"
        );
        for (state, n) in states {
            let _ = writeln!(out, "terna_volumes{{state=\"{state}\"}} {n}");
        }
        out
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
