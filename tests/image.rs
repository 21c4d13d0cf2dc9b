//! The Terna image built without a registry (scripts/build-images, for the
//! real nodes of tests/nodes.rs) has the same contents as the Dockerfile's:
//! the same runtime packages from one list, the binary at the same path,
//! the same entrypoint. The Dockerfile cannot be built here (no Docker
//! engine), so its side is checked from its text, and the script's from the
//! image it wrote.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn packages() -> Vec<String> {
    std::fs::read_to_string(repo().join("deploy/image/packages"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The Dockerfile's runtime stage: everything after its last FROM.
fn runtime_stage() -> String {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let at = text.rfind("\nFROM ").unwrap();
    text[at..].to_string()
}

#[test]
fn the_dockerfile_installs_the_shared_package_list_and_nothing_else() {
    let stage = runtime_stage();
    assert!(stage.starts_with("\nFROM debian:bookworm-slim"), "{stage}");
    assert!(stage.contains("COPY deploy/image/packages /tmp/packages"));
    assert!(stage.contains("xargs apt-get install -y --no-install-recommends"));
    // No package named anywhere else in the stage.
    let installs = stage.matches("apt-get install").count();
    assert_eq!(installs, 1, "one install, from the list: {stage}");
    assert!(stage.contains("COPY --from=build /src/target/release/terna /usr/local/bin/terna"));
    assert!(stage.contains(r#"ENTRYPOINT ["/usr/local/bin/terna"]"#));
    let list = packages();
    for p in [
        "e2fsprogs",
        "xfsprogs",
        "util-linux",
        "mount",
        "ca-certificates",
    ] {
        assert!(list.iter().any(|l| l == p), "{p} in deploy/image/packages");
    }
}

/// `tar` member `name` of the archive at `path`.
fn member(path: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(path)
        .arg(name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{name} in {}", path.display());
    out.stdout
}

fn members(path: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tf").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect()
}

#[test]
fn the_local_image_has_the_dockerfiles_contents() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mmdebstrap needs root");
        return;
    }
    let out = Command::new(repo().join("scripts/build-images"))
        .arg("dev")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tar = repo().join(".tools/images/terna-dev.tar");
    let dir = tempfile::tempdir().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&member(&tar, "./manifest.json")).unwrap();
    assert_eq!(manifest[0]["RepoTags"][0], "terna.local/terna:dev");
    let config: serde_json::Value = serde_json::from_slice(&member(
        &tar,
        &format!("./{}", manifest[0]["Config"].as_str().unwrap()),
    ))
    .unwrap();
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/terna"])
    );
    let layers: Vec<&str> = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(layers.len(), 2, "a Debian base and the binary");
    // Each layer's digest is the one the config declares.
    for (i, l) in layers.iter().enumerate() {
        let bytes = member(&tar, &format!("./{l}"));
        let path = dir.path().join(l);
        std::fs::write(&path, &bytes).unwrap();
        let sum = Command::new("sha256sum").arg(&path).output().unwrap();
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(
            config["rootfs"]["diff_ids"][i],
            format!("sha256:{}", sum.split_whitespace().next().unwrap())
        );
    }
    let base = members(&dir.path().join(layers[0]));
    for tool in [
        "usr/sbin/mkfs.ext4",
        "usr/sbin/resize2fs",
        "usr/sbin/mkfs.xfs",
        "usr/sbin/xfs_growfs",
        "usr/sbin/blkid",
        "usr/sbin/losetup",
        "usr/bin/mount",
        "usr/bin/umount",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(
            base.iter()
                .any(|m| m == tool || m == &tool.replacen("usr/", "", 1)),
            "{tool} in the base layer"
        );
    }
    // Debian's record of what is installed names every listed package.
    let status_member = base
        .iter()
        .find(|m| m.ends_with("var/lib/dpkg/status"))
        .unwrap();
    let status = String::from_utf8(member(
        &dir.path().join(layers[0]),
        &format!("./{status_member}"),
    ))
    .unwrap();
    for p in packages() {
        assert!(status.contains(&format!("Package: {p}\n")), "{p} installed");
    }
    // The top layer is exactly the release binary.
    let top = dir.path().join(layers[1]);
    let mut binary = Vec::new();
    std::fs::File::open(repo().join("target/image/release/terna"))
        .unwrap()
        .read_to_end(&mut binary)
        .unwrap();
    assert!(
        member(&top, "./usr/local/bin/terna") == binary,
        "the top layer holds the release binary"
    );
}
