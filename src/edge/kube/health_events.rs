//! Tells users when a volume's health changes: an event on its claim (what
//! `kubectl describe pvc` shows) and on its PV, when a TernaVolume turns
//! degraded, rebuilding, faulted or healthy again. The first listing is the
//! baseline: a restarted controller does not repeat old news.

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

use crate::edge::kube::crd::TernaVolume;

/// Pure: the event for a change of state, `None` when nothing changed.
pub fn event_for(
    previous: &str,
    current: &str,
    message: Option<&str>,
) -> Option<(EventType, &'static str, String)> {
    if previous == current || current.is_empty() {
        return None;
    }
    let detail = message.unwrap_or("");
    Some(match current {
        "healthy" => (
            EventType::Normal,
            "VolumeHealthy",
            format!("every replica is healthy again (was {previous})"),
        ),
        "rebuilding" => (
            EventType::Normal,
            "VolumeRebuilding",
            format!("a lost replica is being rebuilt on another pool; {detail}"),
        ),
        "faulted" => (
            EventType::Warning,
            "VolumeFaulted",
            format!("no healthy replica is left; I/O fails until one returns; {detail}"),
        ),
        _ => (
            EventType::Warning,
            "VolumeDegraded",
            format!("running on fewer replicas; it heals by itself when they return; {detail}"),
        ),
    })
}

/// The objects a volume's events go to: its PV, and its claim if any.
pub fn regarding(volume: &TernaVolume) -> Vec<ObjectReference> {
    let mut refs = vec![ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: Some(volume.spec.volume_name.clone()),
        ..Default::default()
    }];
    if let Some(claim) = &volume.spec.claim {
        let mut parts = claim.splitn(3, '/');
        if let (Some(ns), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next()) {
            refs.push(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            });
        }
    }
    refs
}

/// Watches every TernaVolume and publishes an event per state change.
pub async fn run(client: kube::Client, recorder: kube::runtime::events::Recorder) {
    let api: Api<TernaVolume> = Api::all(client);
    let mut last: HashMap<String, String> = HashMap::new();
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut baseline = true;
    while let Some(event) = stream.next().await {
        let volume = match event {
            Ok(watcher::Event::Init) => {
                baseline = last.is_empty();
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                baseline = false;
                continue;
            }
            Ok(watcher::Event::Delete(v)) => {
                if let Some(name) = v.metadata.name {
                    last.remove(&name);
                }
                continue;
            }
            Ok(watcher::Event::Apply(v) | watcher::Event::InitApply(v)) => v,
            Err(_) => continue,
        };
        let (Some(name), Some(status)) = (volume.metadata.name.clone(), volume.status.as_ref())
        else {
            continue;
        };
        let current = status.state.clone();
        let previous = last.insert(name.clone(), current.clone());
        if baseline {
            continue;
        }
        let previous = previous.unwrap_or_else(|| "healthy".into());
        let Some((type_, reason, note)) = event_for(&previous, &current, status.message.as_deref())
        else {
            continue;
        };
        info!(volume_id = %name, from = %previous, to = %current, "volume health changed");
        for reference in regarding(&volume) {
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note.clone()),
                action: "Health".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(error = %e, "cannot publish event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_become_events() {
        assert!(event_for("healthy", "healthy", None).is_none());
        let (t, reason, note) =
            event_for("healthy", "degraded", Some("replica 1 faulted")).unwrap();
        assert_eq!((t, reason), (EventType::Warning, "VolumeDegraded"));
        assert!(note.contains("replica 1 faulted"));
        assert_eq!(
            event_for("degraded", "rebuilding", None).unwrap().1,
            "VolumeRebuilding"
        );
        assert_eq!(
            event_for("degraded", "faulted", None).unwrap().1,
            "VolumeFaulted"
        );
        let (t, reason, _) = event_for("rebuilding", "healthy", None).unwrap();
        assert_eq!((t, reason), (EventType::Normal, "VolumeHealthy"));
    }

    #[test]
    fn events_go_to_the_pv_and_the_claim() {
        let mut v = TernaVolume::new(
            "tv-1",
            crate::edge::kube::crd::TernaVolumeSpec {
                volume_name: "pvc-9".into(),
                capacity_bytes: 1,
                size: String::new(),
                parameters: Default::default(),
                tier: None,
                replicas: vec![],
                created_at_ns: 0,
                claim: None,
            },
        );
        assert_eq!(regarding(&v).len(), 1);
        v.spec.claim = Some("apps/data/9".into());
        let refs = regarding(&v);
        assert_eq!(refs[1].namespace.as_deref(), Some("apps"));
        assert_eq!(refs[1].name.as_deref(), Some("data"));
    }
}
