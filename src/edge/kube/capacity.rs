//! CSIStorageCapacity objects, one per Terna StorageClass, so the scheduler
//! (with `storageCapacity: true` on the CSIDriver) never picks a class that
//! cannot hold the claim. Terna volumes are reachable from every node, so
//! each object's topology is every node carrying Terna's topology label.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use tracing::warn;

use crate::core::controller::ControllerCore;

/// Label on the objects this controller owns.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MANAGER: &str = "terna";

/// Pure: the object for `class` with `available` bytes and the largest
/// volume that fits now.
pub fn build(class: &str, namespace: &str, available: u64, max_volume: u64) -> CSIStorageCapacity {
    CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(format!("terna-{class}")),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.to_string(),
                MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        storage_class_name: class.to_string(),
        capacity: Some(Quantity(available.to_string())),
        maximum_volume_size: Some(Quantity(max_volume.to_string())),
        node_topology: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: crate::TOPOLOGY_NODE_KEY.to_string(),
                operator: "Exists".into(),
                values: None,
            }]),
            ..Default::default()
        }),
    }
}

/// Brings the published objects in line with the classes and free space.
pub async fn publish(
    client: &kube::Client,
    namespace: &str,
    core: Arc<ControllerCore>,
    driver: &str,
) {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), namespace);
    let ours = match classes.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|c| c.provisioner == driver)
            .collect::<Vec<_>>(),
        Err(e) => {
            warn!(error = %e, "cannot list StorageClasses for capacity");
            return;
        }
    };
    let mut wanted = Vec::new();
    for class in &ours {
        let name = class.name_any();
        let params = class.parameters.clone().unwrap_or_default();
        let core = core.clone();
        let figures = tokio::task::spawn_blocking(move || core.capacity(&params)).await;
        let Ok(Ok((available, max))) = figures else {
            // A class whose parameters do not parse gets no capacity.
            continue;
        };
        let object = build(&name, namespace, available, max);
        let object_name = object.name_any();
        wanted.push(object_name.clone());
        let apply = PatchParams::apply("terna-controller").force();
        if let Err(e) = capacities
            .patch(&object_name, &apply, &Patch::Apply(&object))
            .await
        {
            warn!(class = %name, error = %e, "cannot publish capacity");
        }
    }
    let selector = ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
    if let Ok(existing) = capacities.list(&selector).await {
        for stale in existing
            .items
            .iter()
            .filter(|c| !wanted.contains(&c.name_any()))
        {
            let _ = capacities
                .delete(&stale.name_any(), &DeleteParams::default())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_object_names_the_class_and_every_terna_node() {
        let c = build("terna-fast", "terna-system", 3 << 30, 1 << 30);
        assert_eq!(c.metadata.name.as_deref(), Some("terna-terna-fast"));
        assert_eq!(c.storage_class_name, "terna-fast");
        assert_eq!(c.capacity.unwrap().0, (3u64 << 30).to_string());
        assert_eq!(c.maximum_volume_size.unwrap().0, (1u64 << 30).to_string());
        let expr = &c.node_topology.unwrap().match_expressions.unwrap()[0];
        assert_eq!(expr.key, crate::TOPOLOGY_NODE_KEY);
        assert_eq!(expr.operator, "Exists");
    }
}
