//! The real csi-sanity (kubernetes-csi/csi-test, version pinned in
//! scripts/install-test-tools) against `terna standalone`, with 3-replica
//! 64 MiB test volumes: once on its default local pools, once on NFS pools
//! only. Needs root. csi-sanity's own output streams to
//! stdout; its JUnit report decides: zero failures, and specs really ran.
//! Afterwards terna must exit cleanly on SIGTERM and leave no mount, loop
//! device or engine process behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TEST: &str = "csi_sanity";
/// Ginkgo stops the suite after this; the watchdog below is a backstop.
const SUITE_TIMEOUT: &str = "20m";
const WATCHDOG: Duration = Duration::from_secs(25 * 60);

/// csi-sanity from .tools/bin, installed by scripts/install-test-tools if
/// missing, so that `cargo test` alone works on a fresh machine.
fn csi_sanity() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(".tools/bin/csi-sanity");
    if !bin.exists() {
        let status = Command::new(root.join("scripts/install-test-tools"))
            .status()
            .expect("cannot run scripts/install-test-tools");
        assert!(
            status.success(),
            "scripts/install-test-tools failed: {status}"
        );
    }
    assert!(bin.exists(), "{} missing after install", bin.display());
    bin
}

/// One spec from the JUnit report.
struct Spec {
    name: String,
    status: String,
    /// The skip reason or failure message, if any.
    message: String,
}

impl Spec {
    fn passed(&self) -> bool {
        self.status == "passed"
    }
    fn skipped(&self) -> bool {
        self.status == "skipped" || self.status == "pending"
    }
    /// failed, timedout, panicked, interrupted, aborted, or anything unknown.
    fn failed(&self) -> bool {
        !self.passed() && !self.skipped()
    }
}

/// The `<testcase>` elements of a Ginkgo JUnit report. Go's XML encoder
/// escapes `<`, `>` and `"` in attribute values, so plain string search is
/// enough.
fn parse_junit(xml: &str) -> Vec<Spec> {
    let mut specs = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<testcase ") {
        rest = &rest[at..];
        let tag_end = rest.find('>').expect("unterminated <testcase> tag");
        let tag = &rest[..tag_end];
        let end = if tag.ends_with('/') {
            tag_end
        } else {
            rest.find("</testcase>").unwrap_or(rest.len())
        };
        let body = &rest[tag_end..end];
        let message = ["<failure ", "<error ", "<skipped "]
            .iter()
            .find_map(|el| {
                let i = body.find(el)?;
                let j = body[i..].find('>')? + i;
                attr(&body[i..j], "message")
            })
            .unwrap_or_default();
        specs.push(Spec {
            name: attr(tag, "name").unwrap_or_default(),
            status: attr(tag, "status").unwrap_or_default(),
            message,
        });
        rest = &rest[end..];
    }
    specs
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&#xA;", "\n")
        .replace("&#x9;", "\t")
        .replace("&#xD;", "")
        .replace("&amp;", "&")
}

/// The first lines of a message on one line, shortened.
fn brief(message: &str) -> String {
    let text: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(4)
        .collect();
    let text = text.join(" ");
    match text.char_indices().nth(240) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

/// Writes straight to stdout, past libtest's capture, so the summary shows
/// even when the test passes.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

#[test]
fn csi_sanity_passes_against_standalone() {
    common::assert_root(TEST);
    run_suite(common::Standalone::start());
}

/// The same suite with NFS pools only: three nfs-ganesha servers, every
/// replica of every test volume on an export, through Terna's own client.
#[test]
fn csi_sanity_passes_with_nfs_only_pools() {
    common::assert_root(TEST);
    let root = tempfile::Builder::new()
        .prefix("terna-sanity-nfs-")
        .tempdir()
        .unwrap();
    let servers = common::nfs::start_servers(root.path(), 3);
    let pools = common::nfs::pools_toml(&servers);
    run_suite(common::Standalone::start_with(move |data_dir| {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(data_dir.join("terna.toml"), pools).unwrap();
    }));
    drop(servers);
}

fn run_suite(mut terna: common::Standalone) {
    let sanity = csi_sanity();
    let dir = terna.dir.path().to_path_buf();
    let junit = dir.join("junit.xml");
    let params = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sanity-params.yaml");

    // csi-sanity creates the staging dir and the target's parent (mountdir)
    // itself, with mkdir, before every spec and removes them after it: they
    // must not exist yet. Both lie under the temp dir, so the leftover check
    // covers them.
    let mut child = Command::new(&sanity)
        .arg(format!("--csi.endpoint=unix://{}", terna.socket.display()))
        .arg(format!(
            "--csi.stagingdir={}",
            dir.join("staging").display()
        ))
        .arg(format!("--csi.mountdir={}", dir.join("mount").display()))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.testvolumesize={}", 64u64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 128u64 << 20))
        .arg(format!("--csi.junitfile={}", junit.display()))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.v")
        .arg(format!("--ginkgo.timeout={SUITE_TIMEOUT}"))
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start csi-sanity");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("csi-sanity still running after {WATCHDOG:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Stop terna and look for leftovers before judging, so a failing suite
    // still gets its mounts and loop devices cleaned up and reported. (On a
    // failed assertion below, dropping `terna` prints its log.)
    let leftovers = terna.stop_and_find_leftovers();

    let report = std::fs::read_to_string(&junit).unwrap_or_else(|e| {
        panic!(
            "csi-sanity ({status}) wrote no JUnit report at {}: {e}",
            junit.display()
        )
    });
    let specs = parse_junit(&report);
    let passed = specs.iter().filter(|s| s.passed()).count();
    let failed: Vec<&Spec> = specs.iter().filter(|s| s.failed()).collect();
    let skipped: Vec<&Spec> = specs.iter().filter(|s| s.skipped()).collect();

    let mut summary = String::new();
    if !skipped.is_empty() {
        summary.push_str("csi-sanity skipped specs:\n");
        for s in &skipped {
            summary.push_str(&format!("  - {} ({})\n", s.name, brief(&s.message)));
        }
    }
    if !failed.is_empty() {
        summary.push_str("csi-sanity failed specs:\n");
        for s in &failed {
            summary.push_str(&format!(
                "  - {} [{}]: {}\n",
                s.name,
                s.status,
                brief(&s.message)
            ));
        }
    }
    summary.push_str(&format!(
        "csi-sanity: {passed} passed, {} failed, {} skipped",
        failed.len(),
        skipped.len()
    ));
    say(&summary);

    assert!(
        passed > 0,
        "csi-sanity ran no spec ({} in the report, exit {status})",
        specs.len()
    );
    assert!(
        failed.is_empty(),
        "{} csi-sanity specs failed (its output above has the details); leftovers: {leftovers:#?}",
        failed.len()
    );
    assert!(
        status.success(),
        "csi-sanity exited {status} with no failed spec"
    );
    assert!(
        leftovers.is_empty(),
        "left behind after csi-sanity and terna stopped: {leftovers:#?}"
    );
}

#[test]
fn junit_report_parses() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
  <testsuites tests="4" disabled="2" errors="0" failures="1" time="1.5">
      <testsuite name="CSI Driver Test Suite" package="/x" tests="4" disabled="1" skipped="1" errors="0" failures="1" time="1.5" timestamp="2026-01-01T00:00:00">
          <properties><property name="SuiteSucceeded" value="false"></property></properties>
          <testcase name="[It] Node Service should work" classname="CSI Driver Test Suite" status="passed" time="0.5"><system-err>a &gt; b</system-err></testcase>
          <testcase name="[It] GetCapacity should return capacity (no optional values added)" classname="CSI Driver Test Suite" status="skipped" time="0"><skipped message="skipped - GetCapacity not supported"></skipped></testcase>
          <testcase name="[It] ListVolumes pagination &#34;x&#34;" classname="CSI Driver Test Suite" status="pending" time="0"><skipped message="pending"></skipped></testcase>
          <testcase name="[It] CreateVolume should fail when no name is provided" classname="CSI Driver Test Suite" status="failed" time="0.1"><failure message="Expected&#xA;    &lt;codes.Code&gt;: 0" type="failed">details</failure></testcase>
      </testsuite>
  </testsuites>"#;
    let specs = parse_junit(xml);
    assert_eq!(specs.len(), 4);
    assert!(specs[0].passed());
    assert_eq!(specs[0].name, "[It] Node Service should work");
    assert!(specs[1].skipped());
    assert_eq!(specs[1].message, "skipped - GetCapacity not supported");
    assert!(specs[2].skipped());
    assert_eq!(specs[2].name, "[It] ListVolumes pagination \"x\"");
    assert!(specs[3].failed());
    assert_eq!(brief(&specs[3].message), "Expected <codes.Code>: 0");
    assert!(specs[3].message.contains("<codes.Code>: 0"));
}

/// The harness's own leftover check finds a mount, a loop device and a
/// process under a directory, and its cleanup removes all three.
#[test]
fn leftover_check_finds_and_cleans_mount_loop_and_process() {
    if !common::require_root("leftover_check_finds_and_cleans_mount_loop_and_process") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("terna-leftover-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("mnt")).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &d.join("mnt"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let img = d.join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let losetup = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(losetup.status.success(), "losetup: {losetup:?}");
    let mut tail = Command::new("tail")
        .arg("-f")
        .arg(&img)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Until it has exec'd, the child's command line is still ours.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read(format!("/proc/{}/cmdline", tail.id()))
        .unwrap_or_default()
        .starts_with(b"tail")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }

    let found = common::leftovers(d);
    common::cleanup(d);
    // Before reaping: a process cleanup failed to kill would still show.
    let after = common::leftovers(d);
    let _ = tail.kill();
    let _ = tail.wait();
    for kind in ["mount ", "loop ", "process "] {
        assert!(
            found.iter().any(|f| f.starts_with(kind)),
            "no {kind}in {found:#?}"
        );
    }
    assert!(after.is_empty(), "cleanup left {after:#?}");
}
