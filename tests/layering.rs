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
/// inside a longer identifier or after another segment's `::`; a global
/// `::root::` counts), with the segments that follow it. A use tree is
/// read whole: `root::a::{b::c, d as e, self}` names `a::b::c`, `a::d` and
/// `a`, each at its own line; a glob `root::a::*` names `a`.
fn paths_after<'a>(text: &'a str, root: &str) -> Vec<(usize, Vec<&'a str>)> {
    let needle = format!("{root}::");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        if !starts_a_path(&text[..start]) {
            continue;
        }
        let mut paths = Vec::new();
        use_tree(text, from, Vec::new(), &mut paths);
        for (at, segments) in paths {
            let line = text[..at].matches('\n').count() + 1;
            found.push((line, segments));
        }
    }
    found
}

/// Whether a name right after `before` begins a path: not the tail of a
/// longer identifier, not a later segment (`a::root`), but a global path
/// (`::root`, `(::root`) is.
fn starts_a_path(before: &str) -> bool {
    match before.chars().next_back() {
        Some(c) if is_ident(c) => false,
        Some(':') => before.strip_suffix("::").is_some_and(|b| {
            !b.chars()
                .next_back()
                .is_some_and(|c| is_ident(c) || c == ':' || c == '>')
        }),
        _ => true,
    }
}

/// Skips whitespace and line comments.
fn skip_space(text: &str, mut at: usize) -> usize {
    loop {
        let rest = &text[at..];
        let trimmed = rest.trim_start();
        at += rest.len() - trimmed.len();
        if trimmed.starts_with("//") {
            at += trimmed.find('\n').unwrap_or(trimmed.len());
        } else {
            return at;
        }
    }
}

/// Reads the use tree (or plain path) at `text[at..]` after `prefix`,
/// pushing every path it names with where it starts; returns where it ends.
fn use_tree<'a>(
    text: &'a str,
    mut at: usize,
    mut prefix: Vec<&'a str>,
    out: &mut Vec<(usize, Vec<&'a str>)>,
) -> usize {
    let start = at;
    loop {
        let rest = &text[at..];
        let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if len > 0 {
            let segment = &rest[..len];
            // `a::{self}` names `a`.
            if segment != "self" || prefix.is_empty() {
                prefix.push(segment);
            }
            at += len;
            if text[at..].starts_with("::") {
                at += 2;
                continue;
            }
        } else if rest.starts_with('{') {
            at += 1;
            loop {
                at = skip_space(text, at);
                if text[at..].starts_with('}') {
                    return at + 1;
                }
                let item = at;
                at = use_tree(text, at, prefix.clone(), out);
                at = skip_space(text, at);
                if let Some(alias) = text[at..].strip_prefix("as ") {
                    let alias = alias.trim_start();
                    let len = alias.find(|c: char| !is_ident(c)).unwrap_or(alias.len());
                    at = text.len() - alias.len() + len;
                    at = skip_space(text, at);
                }
                if text[at..].starts_with(',') {
                    at += 1;
                } else if !text[at..].starts_with('}') || at == item {
                    return at;
                }
            }
        }
        break;
    }
    out.push((start, prefix));
    at
}

/// The crate-level modules a file names, as absolute paths: `crate::x::y`
/// and `super::…` resolved against the file's own module path.
fn named_modules(module: &[String], text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out: Vec<(usize, Vec<String>)> = paths_after(text, "crate")
        .into_iter()
        .map(|(line, s)| (line, s.into_iter().map(String::from).collect()))
        .collect();
    // `super::…` climbs one module and `self::super::…` none more than its
    // `super`s say.
    for (root, climb) in [("super", 1), ("self", 0)] {
        for (line, segments) in paths_after(text, root) {
            let supers = segments.iter().take_while(|s| **s == "super").count();
            let base = module.len().saturating_sub(climb + supers);
            let mut absolute: Vec<String> = module[..base].to_vec();
            absolute.extend(segments.iter().skip(supers).map(|s| s.to_string()));
            out.push((line, absolute));
        }
    }
    out
}

/// The file's text without its tests, which may do I/O and may drive a
/// lower layer through a higher one: nothing of a file named `tests.rs`,
/// and nothing of an inline `#[cfg(test)] mod name { … }` up to its
/// closing brace (what follows it is checked again). Lines keep their
/// numbers.
fn outside_tests(relative: &Path, text: &str) -> String {
    if relative.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let mut out = String::new();
    let mut from = 0;
    let mut search = 0;
    while let Some(at) = text[search..].find("#[cfg(test)]") {
        let start = search + at;
        search = start + "#[cfg(test)]".len();
        let item = text[search..].trim_start();
        let head = item.lines().next().unwrap_or("");
        if head.starts_with("mod ") && head.trim_end().ends_with('{') {
            let open = search + (text[search..].len() - item.len()) + head.trim_end().len() - 1;
            let end = closing_brace(text, open).unwrap_or(text.len());
            out.push_str(&text[from..start]);
            out.extend(text[start..end].chars().filter(|c| *c == '\n'));
            from = end;
            search = end;
        }
    }
    out.push_str(&text[from..]);
    out
}

/// Just past the brace closing the one at `text[open]`, skipping braces
/// in comments, strings and character literals.
fn closing_brace(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i += text[i..].find('\n').unwrap_or(text.len() - i);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += text[i..].find("*/").map_or(text.len() - i, |e| e + 1);
            }
            b'r' if matches!(bytes.get(i + 1), Some(b'"' | b'#'))
                && !bytes
                    .get(i.wrapping_sub(1))
                    .is_some_and(|c| is_ident(*c as char)) =>
            {
                let hashes = text[i + 1..].find('"').unwrap_or(0);
                let close = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                i = body
                    + text[body..]
                        .find(&close)
                        .map_or(text.len() - body, |e| e + close.len() - 1);
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'\'' => {
                // A character literal ('{', '\''), not a lifetime ('a).
                if bytes.get(i + 1) == Some(&b'\\') {
                    i += 3 + text[i + 3..].find('\'').unwrap_or(0);
                } else if let Some(c) = text[i + 1..].chars().next()
                    && text[i + 1 + c.len_utf8()..].starts_with('\'')
                {
                    i += c.len_utf8() + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

const ADDRESSES: &[&str] = &["SocketAddr", "IpAddr", "Ipv4Addr", "Ipv6Addr"];
const CORE_IO: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "nix",
    "libc",
    "tokio",
    "tokio_stream",
    "std::os::unix::net",
    "std::os::unix::fs",
    "io_uring",
    "nfs3_client",
    "tonic",
];

/// What hides the module a path lands in from a reader of `use` lines:
/// the crate root under another name, another file's text compiled into
/// this module, a macro put at the crate root.
const HIDDEN: &[(&str, &str)] = &[
    ("crate as ", "names the crate root under another name"),
    ("super as ", "names a parent module under another name"),
    ("extern crate", "names a crate under another name"),
    (
        "#[path",
        "compiles a file from another folder into this module",
    ),
    ("include!", "compiles another file's text into this module"),
    (
        "#[macro_export]",
        "exports a macro at the crate root, outside its layer",
    ),
];

fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (relative, text) in files {
        let shown = relative.display();
        let module = module_path(relative);
        if relative == Path::new("lib.rs") {
            // A re-export at the root would let any layer name a role's
            // items as `crate::Item`.
            let mut named: Vec<_> = named_modules(&module, text);
            for layer in ["core", "datapath", "edge", "roles"] {
                named.extend(paths_after(text, layer).into_iter().map(|(line, s)| {
                    let mut path = vec![layer.to_string()];
                    path.extend(s.into_iter().map(String::from));
                    (line, path)
                }));
            }
            for (line, path) in named {
                if path.first().is_some_and(|m| Layer::of(m).is_some()) {
                    found.push(format!(
                        "src/lib.rs:{line}: the crate root re-exports from a layer ({})",
                        path.join("::")
                    ));
                }
            }
        }
        let Some(layer) = module.first().and_then(|m| Layer::of(m)) else {
            continue;
        };
        for (needle, rule) in HIDDEN {
            for (at, _) in text.match_indices(needle) {
                let line = text[..at].matches('\n').count() + 1;
                found.push(format!("src/{shown}:{line}: {rule} ({})", needle.trim()));
            }
        }
        for (line, _) in paths_after(text, "terna") {
            found.push(format!(
                "src/{shown}:{line}: names the crate root under another name (terna::)"
            ));
        }
        let code = outside_tests(relative, text);
        for (line, path) in named_modules(&module, &code) {
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
                let mut parts = root.split("::");
                let head = parts.next().unwrap();
                let tail: Vec<&str> = parts.collect();
                for (line, segments) in paths_after(&code, head) {
                    // An address is a value, not a connection.
                    let address =
                        tail == ["net"] && segments.get(1).is_some_and(|s| ADDRESSES.contains(s));
                    if segments.starts_with(&tail) && !address {
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
    found.extend(methods_added_from_above(files));
    found
}

/// The structs and enums `text` defines.
fn defined_types(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(at) = words.iter().position(|w| *w == "struct" || *w == "enum")
            && let Some(name) = words.get(at + 1)
        {
            out.insert(name.chars().take_while(|c| is_ident(*c)).collect());
        }
    }
    out
}

/// An inherent `impl` of a core type written in a higher layer: the core
/// could call it without naming the layer, so the arrow would be hidden.
fn methods_added_from_above(files: &[(PathBuf, String)]) -> Vec<String> {
    let layer_of = |p: &Path| module_path(p).first().and_then(|m| Layer::of(m));
    let mut core_types = BTreeSet::new();
    for (relative, text) in files {
        if layer_of(relative) == Some(Layer::Core) {
            core_types.extend(defined_types(&outside_tests(relative, text)));
        }
    }
    let mut found = Vec::new();
    for (relative, text) in files {
        if matches!(layer_of(relative), None | Some(Layer::Core)) {
            continue;
        }
        let own = defined_types(&outside_tests(relative, text));
        for (n, line) in outside_tests(relative, text).lines().enumerate() {
            let line = line.trim_start();
            let Some(rest) = line.strip_prefix("impl") else {
                continue;
            };
            if rest.contains(" for ") || !rest.trim_end().ends_with('{') {
                continue;
            }
            let name: String = rest
                .trim_start_matches([' ', '<'])
                .rsplit("::")
                .next()
                .unwrap_or("")
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            if core_types.contains(&name) && !own.contains(&name) {
                found.push(format!(
                    "src/{}:{}: methods of the core's {name} written in a higher layer; make them free functions there",
                    relative.display(),
                    n + 1
                ));
            }
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

/// Every module path a file names: `crate::…`, `super::…`, `self::…`, and
/// a child module's plain name (`ops::Session` in `fuse/mod.rs`).
fn all_named(
    modules: &BTreeSet<Vec<String>>,
    from: &[String],
    text: &str,
) -> Vec<(usize, Vec<String>)> {
    let mut out = named_modules(from, text);
    for child in modules {
        if child.len() == from.len() + 1 && child.starts_with(from) {
            for (line, segments) in paths_after(text, &child[from.len()]) {
                let mut path = child.clone();
                path.extend(segments.into_iter().map(String::from));
                out.push((line, path));
            }
        }
    }
    out
}

/// The module a path lands in, seeing through re-exports (`pub use
/// revoke::Revoker;` in `fuse/mod.rs` makes `fuse::Revoker` land in
/// `fuse::revoke`).
fn landing(
    modules: &BTreeSet<Vec<String>>,
    reexports: &BTreeMap<Vec<String>, Vec<String>>,
    path: &[String],
) -> Option<Vec<String>> {
    let mut path = path.to_vec();
    for _ in 0..8 {
        let module = (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| modules.contains(prefix))?;
        match path
            .get(..module.len() + 1)
            .and_then(|item| reexports.get(item))
        {
            Some(target) if *target != module => path = target.clone(),
            _ => return Some(module),
        }
    }
    None
}

/// The module-to-module imports of the tree (a file's module to the
/// module file a path it names lands in), without tests.
fn module_graph(files: &[(PathBuf, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(p, _)| module_path(p)).collect();
    // What each module re-exports: its path and the item's name, to
    // where the item lives.
    let mut reexports: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for (relative, text) in files {
        let from = module_path(relative);
        let code = outside_tests(relative, text);
        for (at, _) in code
            .match_indices("pub use ")
            .chain(code.match_indices("pub(crate) use "))
        {
            let statement: String = code[at..]
                .split_inclusive(';')
                .next()
                .unwrap_or("")
                .to_string();
            let statement = statement
                .split_once("use ")
                .map_or("", |(_, s)| s)
                .trim_start();
            let named = all_named(&modules, &from, statement);
            for (_, path) in named {
                if let (Some(name), Some(_)) = (path.last(), path.first()) {
                    let mut item = from.clone();
                    item.push(name.clone());
                    reexports.insert(item, path.clone());
                }
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (relative, text) in files {
        let from = module_path(relative);
        let edges = graph.entry(from.join("::")).or_default();
        for (_, path) in all_named(&modules, &from, &outside_tests(relative, text)) {
            // A module reaching into its own children (declaring and
            // re-exporting them) is how Rust nests modules, not a circle.
            if let Some(target) = landing(&modules, &reexports, &path)
                && !target.starts_with(&from)
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
fn methods_on_core_types_from_above_are_caught() {
    let core = file("core/config.rs", "pub struct Config {\n    pub a: u8,\n}\n");
    for text in [
        "impl Config {\n    pub fn load() {}\n}\n",
        "impl crate::core::config::Config {\n}\n",
    ] {
        let found = violations(&[core.clone(), file("datapath/host/config_file.rs", text)]);
        assert!(
            found
                .iter()
                .any(|v| v.contains("methods of the core's Config")),
            "{text:?}: {found:?}"
        );
    }
    for text in [
        "impl std::fmt::Display for Config {\n}\n",
        "impl Configurator {\n}\n",
    ] {
        let found = violations(&[core.clone(), file("datapath/host/config_file.rs", text)]);
        assert!(found.is_empty(), "{text:?}: {found:?}");
    }
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
fn the_circle_check_sees_through_re_exports_and_use_trees() {
    let files = [
        file(
            "datapath/frontend/fuse/mod.rs",
            "mod ops;\nmod passthrough;\npub use passthrough::Backing;\n",
        ),
        file("datapath/frontend/fuse/ops.rs", "use super::Backing;\n"),
        file(
            "datapath/frontend/fuse/passthrough.rs",
            "use super::{abi::Header, ops::Session};\n",
        ),
        file("datapath/frontend/fuse/abi.rs", "pub struct Header;\n"),
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
        // Use trees are read whole.
        (
            "core/volume.rs",
            "use crate::{core::error::Result, roles::standalone};\n",
            "imports upward",
        ),
        (
            "datapath/node/mod.rs",
            "use crate::{\n    core::error::Result,\n    edge::{csi::volume_id, kube},\n};\n",
            "imports upward",
        ),
        (
            "roles/node.rs",
            "use crate::{proto::csi::NodeServer};\n",
            "protobuf",
        ),
        ("core/config.rs", "use std::{fs, path::Path};\n", "no I/O"),
        // Global paths.
        ("datapath/pools.rs", "use ::kube::Client;\n", "kube types"),
        (
            "core/config.rs",
            "fn f() { ::std::fs::read(\"x\"); }\n",
            "no I/O",
        ),
        (
            "core/config.rs",
            "fn f() { std::os::unix::net::UnixStream::connect(p); }\n",
            "no I/O",
        ),
        // The crate root, or a parent, under another name.
        (
            "core/store.rs",
            "use crate as root;\nfn f() { root::roles::run(); }\n",
            "another name",
        ),
        (
            "core/store.rs",
            "extern crate self as terna;\nfn f() { terna::roles::run(); }\n",
            "another name",
        ),
        (
            "core/mod.rs",
            "use self::super::roles::node;\n",
            "imports upward",
        ),
        // What follows an inline test module is checked again.
        (
            "core/volume.rs",
            "#[cfg(test)]\nmod tests {\n    const C: char = '}';\n}\nuse crate::edge::kube::crd;\n",
            "imports upward",
        ),
        // Another file's code compiled into this module, or a macro put
        // at the crate root, escapes its folder's layer.
        (
            "core/volume.rs",
            "#[path = \"../roles/node.rs\"]\nmod node;\n",
            "another folder",
        ),
        (
            "core/config.rs",
            "include!(\"../roles/args.rs\");\n",
            "another file",
        ),
        (
            "roles/node.rs",
            "#[macro_export]\nmacro_rules! args { () => {} }\n",
            "crate root",
        ),
        // A re-export at the crate root hides the layer an item lives in.
        ("lib.rs", "pub use roles::standalone::Args;\n", "re-exports"),
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
        ("core/config.rs", "use std::net::{IpAddr, SocketAddr};\n"),
        ("roles/node.rs", "use crate::roles::node::{Args, Mode};\n"),
        (
            "core/volume.rs",
            "#[cfg(test)]\nmod tests {\n    fn f() { std::fs::read(\"}\"); }\n}\n",
        ),
        (
            "lib.rs",
            "pub mod core;\npub mod proto {\n    tonic::include_proto!(\"csi.v1\");\n}\n",
        ),
    ];
    for (path, text) in fine {
        let found = violations(&[file(path, text)]);
        assert!(
            found.is_empty(),
            "{path}: {text:?} is allowed, found {found:?}"
        );
    }
}
