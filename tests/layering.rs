//! The Architecture Invariant (ARCHITECTURE.md), checked on the source
//! text the way a reviewer would read `use` lines: dependencies point one
//! way, roles → edges → data path → core, and nothing imports a role.
//!
//! - `src/core/` may name only `core`; `src/datapath/` also `datapath`;
//!   `src/edge/` also `edge`; `src/roles/` all of those and its own module,
//!   never another role. `src/main.rs` is the binary above every layer.
//! - Only `src/edge/csi/` sees the CSI and kubelet protobuf types
//!   (`proto::`); only `src/edge/kube/` sees `kube` and `k8s_openapi`.
//! - The core does no I/O of its own (no `std::fs`, `std::net`,
//!   `std::process`, `nix`, `libc`, `tokio`) outside its tests: it reaches
//!   disks, networks and clusters only through its traits.
//! - `unsafe` lives only in the data path; the other layers forbid it.
//!
//! A violation names the file, the line and the rule, so the fix is plain.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Core,
    Datapath,
    Edge,
    Roles,
}

impl Layer {
    fn of(segment: &str) -> Option<Layer> {
        match segment {
            "core" => Some(Layer::Core),
            "datapath" => Some(Layer::Datapath),
            "edge" => Some(Layer::Edge),
            "roles" => Some(Layer::Roles),
            _ => None,
        }
    }
}

/// The module path of a file under `src/`: `core/volume.rs` is
/// `["core", "volume"]`, `datapath/engine/mod.rs` is `["datapath", "engine"]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_string();
        if stem != "mod" && stem != "lib" && stem != "main" {
            parts.push(stem);
        }
    }
    parts
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every place `text` names a path starting with `root::` (as a path, not
/// inside a longer identifier or after another `::`), with the segments
/// that follow it.
fn paths_after<'a>(text: &'a str, root: &str) -> Vec<(usize, Vec<&'a str>)> {
    let needle = format!("{root}::");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let mut segments = Vec::new();
        let mut rest = &text[from..];
        loop {
            let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            if len == 0 {
                break;
            }
            segments.push(&rest[..len]);
            rest = &rest[len..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        let line = text[..start].matches('\n').count() + 1;
        found.push((line, segments));
    }
    found
}

/// The crate-level modules a file names, as absolute paths: `crate::x::y`
/// and `super::…` resolved against the file's own module path.
fn named_modules(module: &[String], text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out: Vec<(usize, Vec<String>)> = paths_after(text, "crate")
        .into_iter()
        .map(|(line, s)| (line, s.into_iter().map(String::from).collect()))
        .collect();
    for (line, segments) in paths_after(text, "super") {
        let ups = 1 + segments.iter().take_while(|s| **s == "super").count();
        let base = module.len().saturating_sub(ups);
        let mut absolute: Vec<String> = module[..base].to_vec();
        absolute.extend(segments.iter().skip(ups - 1).map(|s| s.to_string()));
        out.push((line, absolute));
    }
    out
}

/// The file's text without its tests, which may do I/O and may drive a
/// lower layer through a higher one: nothing of a file named `tests.rs`,
/// and nothing from an inline `#[cfg(test)] mod name {` on (by custom the
/// last item of a file).
fn outside_tests<'a>(relative: &Path, text: &'a str) -> &'a str {
    if relative.file_name().is_some_and(|n| n == "tests.rs") {
        return "";
    }
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]") {
        let start = from + at;
        from = start + "#[cfg(test)]".len();
        let item = text[from..].trim_start();
        let head = item.lines().next().unwrap_or("");
        if head.starts_with("mod ") && head.trim_end().ends_with('{') {
            return &text[..start];
        }
    }
    text
}

const ADDRESSES: &[&str] = &["SocketAddr", "IpAddr", "Ipv4Addr", "Ipv6Addr"];
const CORE_IO: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "nix",
    "libc",
    "tokio",
];

fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (relative, text) in files {
        let shown = relative.display();
        let module = module_path(relative);
        let Some(layer) = module.first().and_then(|m| Layer::of(m)) else {
            continue;
        };
        let code = outside_tests(relative, text);
        for (line, path) in named_modules(&module, code) {
            if path.first().map(String::as_str) == Some("proto")
                && module.get(..2) != Some(&["edge".to_string(), "csi".to_string()][..])
            {
                found.push(format!(
                    "src/{shown}:{line}: only src/edge/csi/ sees protobuf types ({})",
                    path.join("::")
                ));
            }
            let Some(target) = path.first().and_then(|m| Layer::of(m)) else {
                continue;
            };
            if target > layer {
                found.push(format!(
                    "src/{shown}:{line}: {layer:?} imports upward into {}",
                    path.join("::")
                ));
            } else if target == Layer::Roles && path.get(1) != module.get(1) {
                found.push(format!(
                    "src/{shown}:{line}: a role imports another role ({}); shared code belongs in a lower layer",
                    path.join("::")
                ));
            }
        }
        let in_kube_edge = module.get(..2) == Some(&["edge".to_string(), "kube".to_string()][..]);
        if !in_kube_edge {
            for root in ["kube", "k8s_openapi"] {
                for (line, _) in paths_after(text, root) {
                    found.push(format!(
                        "src/{shown}:{line}: only src/edge/kube/ sees {root} types"
                    ));
                }
            }
        }
        if layer == Layer::Core {
            for root in CORE_IO {
                let (head, tail) = root.split_once("::").unwrap_or((root, ""));
                for (line, segments) in paths_after(code, head) {
                    // An address is a value, not a connection.
                    let address =
                        tail == "net" && segments.get(1).is_some_and(|s| ADDRESSES.contains(s));
                    if (tail.is_empty() || segments.first() == Some(&tail)) && !address {
                        found.push(format!(
                            "src/{shown}:{line}: the core does no I/O of its own ({root}); go through a trait"
                        ));
                    }
                }
            }
        }
        if layer != Layer::Datapath && contains_word(text, "unsafe") {
            found.push(format!("src/{shown}: unsafe outside the data path"));
        }
    }
    found
}

fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// The module-to-module imports of the tree (a file's module to the
/// module file a path it names lands in), without tests.
fn module_graph(files: &[(PathBuf, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(p, _)| module_path(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (relative, text) in files {
        let from = module_path(relative);
        let edges = graph.entry(from.join("::")).or_default();
        for (_, path) in named_modules(&from, outside_tests(relative, text)) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|prefix| modules.contains(prefix));
            if let Some(target) = target
                && target != from
                && !target.is_empty()
            {
                edges.insert(target.join("::"));
            }
        }
    }
    graph
}

/// Every circle of imports in `graph`, each as the modules along it.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            found.push(path[at..].to_vec());
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, found);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path.strip_prefix(root).unwrap().to_path_buf(), text));
        }
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    let layered = files
        .iter()
        .filter(|(p, _)| {
            module_path(p)
                .first()
                .is_some_and(|m| Layer::of(m).is_some())
        })
        .count();
    assert!(
        layered > 50,
        "only {layered} files found in the layer folders"
    );
    let unlayered: Vec<_> = files
        .iter()
        .map(|(p, _)| p.display().to_string())
        .filter(|p| !matches!(p.as_str(), "lib.rs" | "main.rs"))
        .filter(|p| Layer::of(p.split('/').next().unwrap_or("")).is_none())
        .collect();
    assert!(
        unlayered.is_empty(),
        "every module lives in a layer folder (core, datapath, edge, roles): {unlayered:?}"
    );
    let found = violations(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    let graph = module_graph(&files);
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 100,
        "{graph:?}"
    );
    let found: Vec<String> = circles(&graph).iter().map(|c| c.join(" -> ")).collect();
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_circle_check_finds_a_circle() {
    let files = [
        file(
            "datapath/frontend/fuse/ops.rs",
            "use super::passthrough::Backing;\n",
        ),
        file(
            "datapath/frontend/fuse/passthrough.rs",
            "use super::ops::Session;\n",
        ),
        file(
            "datapath/frontend/fuse/reply.rs",
            "use super::ops::Session;\n",
        ),
    ];
    let found = circles(&module_graph(&files));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0]
            .iter()
            .all(|m| m.ends_with("ops") || m.ends_with("passthrough")),
        "{found:?}"
    );
}

#[test]
fn layers_that_need_no_unsafe_forbid_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for layer in ["core", "edge", "roles"] {
        let text = std::fs::read_to_string(root.join(layer).join("mod.rs")).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "src/{layer}/mod.rs forbids unsafe_code"
        );
    }
}

fn file(path: &str, text: &str) -> (PathBuf, String) {
    (PathBuf::from(path), text.to_string())
}

#[test]
fn the_check_catches_each_kind_of_wrong_import() {
    let cases = [
        (
            "core/volume.rs",
            "use crate::datapath::engine::Engine;\n",
            "imports upward",
        ),
        (
            "datapath/node/mod.rs",
            "use crate::edge::csi::volume_id;\n",
            "imports upward",
        ),
        (
            "edge/csi/node.rs",
            "use crate::roles::standalone;\n",
            "imports upward",
        ),
        (
            "datapath/engine/mod.rs",
            "fn f() { crate::roles::engine::run(); }\n",
            "imports upward",
        ),
        (
            "roles/node.rs",
            "use crate::roles::standalone::bind;\n",
            "another role",
        ),
        (
            "roles/node.rs",
            "use crate::proto::csi::NodeServer;\n",
            "protobuf",
        ),
        (
            "edge/kube/store.rs",
            "use crate::proto::csi::Volume;\n",
            "protobuf",
        ),
        (
            "roles/report.rs",
            "async fn f(c: kube::Client) {}\n",
            "kube types",
        ),
        (
            "datapath/pools.rs",
            "use k8s_openapi::api::core::v1::Node;\n",
            "k8s_openapi types",
        ),
        (
            "core/config.rs",
            "fn f() { std::fs::read(\"x\"); }\n",
            "no I/O",
        ),
        ("core/store.rs", "use tokio::runtime::Handle;\n", "no I/O"),
        (
            "core/config.rs",
            "fn f() { std::net::TcpStream::connect(a); }\n",
            "no I/O",
        ),
        // A test module declared from the file, not inline: still checked.
        (
            "datapath/replica/mod.rs",
            "#[cfg(test)]\nmod conformance;\nuse crate::edge::kube::crd;\n",
            "imports upward",
        ),
        (
            "edge/metrics/http.rs",
            "fn f() { unsafe { g() } }\n",
            "unsafe outside",
        ),
        // super:: from a layer's mod.rs reaches the crate root.
        (
            "core/mod.rs",
            "use super::datapath::pools;\n",
            "imports upward",
        ),
    ];
    for (path, text, rule) in cases {
        let found = violations(&[file(path, text)]);
        assert!(
            found.iter().any(|v| v.contains(rule)),
            "{path}: {text:?} should break \"{rule}\", found {found:?}"
        );
    }
    let fine = [
        (
            "roles/node.rs",
            "use crate::roles::node::Args; use crate::edge::kube::crd;\n",
        ),
        (
            "edge/csi/node.rs",
            "use crate::proto::csi::NodeServer; use crate::datapath::node::NodeCore;\n",
        ),
        (
            "datapath/repair.rs",
            "use crate::core::store::StateStore; use super::engine::assemble;\n",
        ),
        (
            "core/volume.rs",
            "use crate::core::error::Result;\n#[cfg(test)]\nmod tests {\n    fn f() { std::fs::read(\"x\"); }\n}\n",
        ),
        ("datapath/agent/tests.rs", "use crate::roles::agent::run;\n"),
        (
            "core/metrics.rs",
            "// the fs in std::fmt is not I/O; nor is a field named fs_kind\nfn fs_kind() {}\n",
        ),
        ("edge/kube/client.rs", "async fn f(c: kube::Client) {}\n"),
        ("core/config.rs", "pub agent: std::net::SocketAddr,\n"),
    ];
    for (path, text) in fine {
        let found = violations(&[file(path, text)]);
        assert!(
            found.is_empty(),
            "{path}: {text:?} is allowed, found {found:?}"
        );
    }
}
