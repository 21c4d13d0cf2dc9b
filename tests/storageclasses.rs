//! Every class in storageclasses/ names our driver and parameters our class
//! parser accepts, so an admin never installs a class that fails every PVC.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

/// The `parameters:` block of a StorageClass manifest (flat string map).
fn parameters(yaml: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in yaml.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line == "parameters:" {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            let (k, v) = line.trim().split_once(':').expect("key: value");
            out.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    out
}

#[test]
fn every_storage_class_parses_and_names_the_driver() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("storageclasses");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("provisioner: {}", terna::DRIVER_NAME)),
            "{} does not name {}",
            path.display(),
            terna::DRIVER_NAME
        );
        let params = parameters(&text);
        assert!(!params.is_empty(), "{} has no parameters", path.display());
        terna::core::class::VolumeClass::parse(&params)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 5, "expected the documented classes, found {seen}");
}
