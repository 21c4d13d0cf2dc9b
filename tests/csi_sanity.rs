//! The real csi-sanity (kubernetes-csi/csi-test, version pinned in
//! scripts/install-test-tools) against `terna standalone`, with 3-replica
//! test volumes. Zero failures allowed; every skip is printed with its reason.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

fn csi_sanity() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(".tools/bin/csi-sanity");
    if !bin.exists() {
        let status = Command::new(root.join("scripts/install-test-tools"))
            .status()
            .expect("run scripts/install-test-tools");
        assert!(status.success(), "scripts/install-test-tools failed");
    }
    bin
}

/// (tests, failures, errors, skipped) from the JUnit report's testsuite element.
fn junit_counts(xml: &str) -> (u32, u32, u32, u32) {
    let start = xml.find("<testsuite ").expect("testsuite element");
    let tag = &xml[start..start + xml[start..].find('>').unwrap()];
    let attr = |name: &str| -> u32 {
        let key = format!(" {name}=\"");
        let at = tag.find(&key).unwrap_or_else(|| panic!("{name} in {tag}")) + key.len();
        tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
    };
    (
        attr("tests"),
        attr("failures"),
        attr("errors"),
        attr("skipped"),
    )
}

#[test]
fn csi_sanity_passes_against_standalone() {
    if !common::require_root("csi_sanity_passes_against_standalone") {
        return;
    }
    let sanity = csi_sanity();
    let terna = common::Standalone::start();
    let dir = terna.dir.path();
    let junit = dir.join("junit.xml");
    let params = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sanity-params.yaml");
    let output = Command::new(&sanity)
        .arg(format!("--csi.endpoint={}", terna.socket.display()))
        .arg(format!(
            "--csi.stagingdir={}",
            dir.join("staging").display()
        ))
        .arg(format!("--csi.mountdir={}", dir.join("mount").display()))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 128 << 20))
        .arg(format!("--csi.junitfile={}", junit.display()))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.v")
        .arg("--ginkgo.timeout=20m")
        .output()
        .unwrap();
    let stdout = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(dir.join("csi-sanity.out"), &stdout).unwrap();
    let report = std::fs::read_to_string(&junit).unwrap_or_default();
    if report.is_empty() || !output.status.success() {
        println!("{stdout}");
    }
    let (_tests, failures, errors, _skipped) = junit_counts(&report);
    // Ginkgo's own summary: "SUCCESS! -- 49 Passed | 0 Failed | 1 Pending | 53 Skipped".
    let summary = stdout
        .lines()
        .find(|l| l.contains(" Passed | "))
        .unwrap_or_else(|| panic!("no csi-sanity summary:\n{stdout}"));
    let count = |what: &str| -> u32 {
        let part = summary.split('|').find(|p| p.contains(what)).unwrap();
        part.split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (passed, pending, skipped) = (count("Passed"), count("Pending"), count("Skipped"));
    // Why each skipped spec was skipped, as csi-sanity says it.
    let mut reasons: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("[SKIPPED] ") && !l.starts_with("[SKIPPED] in "))
        .collect();
    reasons.sort();
    reasons.dedup();
    println!("csi-sanity skip reasons:\n  {}", reasons.join("\n  "));
    println!("{}", summary.trim());
    println!(
        "csi-sanity: {passed} passed, {} failed, {} skipped",
        failures + errors,
        skipped + pending
    );
    assert!(passed > 40, "csi-sanity ran only {passed} specs:\n{stdout}");
    assert_eq!(failures + errors, 0, "csi-sanity failures:\n{stdout}");
    assert!(
        output.status.success(),
        "csi-sanity exited {}",
        output.status
    );
    terna.stop_and_check_clean();
}
