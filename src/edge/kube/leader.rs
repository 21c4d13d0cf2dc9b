//! Leader election through a coordination.k8s.io Lease, so several
//! controller replicas can run and exactly one provisions.
//!
//! Every change to the Lease carries the resourceVersion it was read at, so
//! two candidates racing for an expired lease cannot both win: the API
//! server accepts one write and answers the other with a conflict. A leader
//! that cannot renew within the lease's duration must stop before another
//! may take over: `hold` returns then, and the caller exits.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who we are: unique per controller process.
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the leader renews (well under `duration`).
    pub renew_every: Duration,
}

/// What to do with a lease as read, at `now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Someone else holds it and it is current.
    Wait,
}

/// Pure: whether `identity` may write the lease at `now`.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Take,
        Some(h) if h == identity => Decision::Renew,
        Some(_) => {
            // In nanoseconds: whole seconds would let a taker act up to a
            // second early, eating into the engines' skew margin.
            let duration =
                i128::from(spec.lease_duration_seconds.unwrap_or(15).max(1)) * 1_000_000_000;
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match renewed {
                Some(t) if t.as_nanosecond() + duration > now.as_nanosecond() => Decision::Wait,
                _ => Decision::Take,
            }
        }
    }
}

/// One attempt to take or renew the lease. Ok(true): we hold it now.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration_s = cfg.duration.as_secs().max(1) as i32;
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let decision = decide(lease.spec.as_ref(), &cfg.identity, now);
            if decision == Decision::Wait {
                return Ok(false);
            }
            let spec = lease.spec.get_or_insert_with(Default::default);
            if decision == Decision::Take {
                spec.holder_identity = Some(cfg.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration_s);
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this process holds the lease.
pub async fn acquire(client: kube::Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut waiting_logged = false;
    loop {
        match try_acquire(&api, cfg).await {
            Ok(true) => {
                info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                return;
            }
            Ok(false) => {
                if !waiting_logged {
                    info!(lease = %cfg.name, "another controller leads; standing by");
                    waiting_logged = true;
                }
            }
            Err(e) => warn!(lease = %cfg.name, error = %e, "cannot read the lease"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews the lease until it is lost; returns when this process must stop
/// acting as leader: someone else holds it, or renewal has failed for long
/// enough that another may have taken it.
pub async fn hold(client: kube::Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire(&api, cfg).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                warn!(lease = %cfg.name, "lease taken by another controller");
                return;
            }
            Err(e) => warn!(lease = %cfg.name, error = %e, "cannot renew the lease"),
        }
        // Stop before the lease could expire for the others.
        if last_renewed.elapsed() + cfg.renew_every >= cfg.duration {
            warn!(lease = %cfg.name, "could not renew the lease in time");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: Option<i64>, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Take);
        assert_eq!(
            decide(Some(&spec(None, None, 15)), "a", now),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&spec(Some("a"), Some(0), 15)), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(990), 15)), "a", now),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(985), 15)), "a", now),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&spec(Some("b"), None, 15)), "a", now),
            Decision::Take
        );
    }
}
