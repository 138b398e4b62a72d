//! `cargo xtask image`: an OCI image archive of the agent, built here with
//! no registry and no container engine.
//!
//! The binary is `xlb` built for x86_64-unknown-linux-musl, which links
//! statically, with the eBPF object embedded as in every build. It is the
//! only file of the image (`/usr/local/bin/xlb`): the agent reads nothing
//! else from its root filesystem, and the kubelet mounts the service
//! account, /etc/hosts and /etc/resolv.conf itself. The archive is an OCI
//! image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) plus the
//! `manifest.json` of `docker save`, so `docker load` before Docker 25 reads
//! it too. Timestamps and owners are fixed, so the same binary gives the
//! same digests.

use std::{io::Write, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{run, workspace_root};

pub const REPOSITORY: &str = "ghcr.io/xlb-dev/xlb";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the binary lives in the image; PATH in the image config leads there.
pub const BINARY_IN_IMAGE: &str = "usr/local/bin/xlb";

/// `ghcr.io/xlb-dev/xlb:<workspace version>`, the name deploy/daemonset.yaml uses.
pub fn reference() -> String {
    format!("{REPOSITORY}:{VERSION}")
}

pub fn archive_path() -> PathBuf {
    workspace_root().join(format!("target/image/xlb-{VERSION}.oci.tar"))
}

/// Builds the static binary and writes the archive; returns its path.
pub fn build() -> Result<PathBuf> {
    crate::build_ebpf()?;
    let root = workspace_root();
    run(Command::new("rustup").args(["target", "add", TARGET]))
        .context("adding the musl target (rustup target add x86_64-unknown-linux-musl)")?;
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "lb-userspace", "--bin", "xlb"])
        .args(["--target", TARGET])
        // ring's C code, compiled against musl (package musl-tools).
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc"))
    .context("building the static xlb binary")?;
    let binary = std::fs::read(root.join("target").join(TARGET).join("release/xlb"))
        .context("reading the static xlb binary")?;
    let archive = archive_path();
    std::fs::create_dir_all(archive.parent().expect("under target/"))?;
    let image = assemble(&binary)?;
    std::fs::write(&archive, &image).with_context(|| format!("writing {}", archive.display()))?;
    let name = reference();
    println!(
        "image {name}: {} ({} bytes)",
        archive.display(),
        image.len()
    );
    println!("load it with one of:");
    println!("  docker load -i {}", archive.display());
    println!("  ctr -n k8s.io images import {}", archive.display());
    println!("  k3s ctr images import {}", archive.display());
    println!(
        "deploy/daemonset.yaml runs {name} with imagePullPolicy: IfNotPresent, so an imported image is used as it is"
    );
    Ok(archive)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A content-addressed blob: its bytes and its descriptor fields.
struct Blob {
    bytes: Vec<u8>,
    hex: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        let hex = sha256_hex(&bytes);
        Blob { bytes, hex }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", self.hex),
            "size": self.bytes.len(),
        })
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.hex)
    }
}

/// A tar header for a root-owned entry with a fixed time.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append_dir(builder: &mut tar::Builder<impl Write>, path: &str) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    builder.append_data(&mut h, path, std::io::empty())?;
    Ok(())
}

fn append_file(
    builder: &mut tar::Builder<impl Write>,
    path: &str,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, bytes.len() as u64);
    builder.append_data(&mut h, path, bytes)?;
    Ok(())
}

/// The root filesystem layer: the binary and its directories.
fn layer(binary: &[u8]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
        append_dir(&mut builder, dir)?;
    }
    append_file(&mut builder, BINARY_IN_IMAGE, 0o755, binary)?;
    Ok(builder.into_inner()?)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values serialise")
}

/// The whole archive for `binary`.
pub fn assemble(binary: &[u8]) -> Result<Vec<u8>> {
    if binary.is_empty() {
        bail!("the xlb binary is empty");
    }
    let rootfs = layer(binary)?;
    let diff_id = format!("sha256:{}", sha256_hex(&rootfs));
    let layer = Blob::new(gzip(&rootfs)?);
    let config = Blob::new(to_json(&json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin"],
            "Entrypoint": [format!("/{BINARY_IN_IMAGE}")],
            "Cmd": ["agent"],
            "Labels": {
                "org.opencontainers.image.title": "xlb",
                "org.opencontainers.image.version": VERSION,
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" }],
    })));
    let manifest = Blob::new(to_json(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
        "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar+gzip")],
    })));
    let mut manifest_descriptor = manifest.descriptor("application/vnd.oci.image.manifest.v1+json");
    manifest_descriptor["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    manifest_descriptor["annotations"] = json!({
        // The tag, as OCI layouts name references; containerd and Docker
        // take the full name from their own annotation.
        "org.opencontainers.image.ref.name": VERSION,
        "io.containerd.image.name": reference(),
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    });
    let docker_manifest = json!([{
        "Config": config.path(),
        "RepoTags": [reference()],
        "Layers": [layer.path()],
    }]);

    let mut builder = tar::Builder::new(Vec::new());
    append_file(
        &mut builder,
        "oci-layout",
        0o644,
        &to_json(&json!({ "imageLayoutVersion": "1.0.0" })),
    )?;
    append_file(&mut builder, "index.json", 0o644, &to_json(&index))?;
    append_file(
        &mut builder,
        "manifest.json",
        0o644,
        &to_json(&docker_manifest),
    )?;
    append_dir(&mut builder, "blobs/")?;
    append_dir(&mut builder, "blobs/sha256/")?;
    for blob in [&manifest, &config, &layer] {
        append_file(&mut builder, &blob.path(), 0o644, &blob.bytes)?;
    }
    Ok(builder.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut reader = tar::Archive::new(archive);
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            out.push((path, bytes));
        }
        out
    }

    #[test]
    fn same_binary_same_archive_and_every_blob_named_by_its_digest() {
        let a = assemble(b"\x7fELF pretend").unwrap();
        assert_eq!(a, assemble(b"\x7fELF pretend").unwrap());
        assert_ne!(a, assemble(b"\x7fELF other").unwrap());
        let blobs: Vec<_> = entries(&a)
            .into_iter()
            .filter(|(p, b)| p.starts_with("blobs/sha256/") && !b.is_empty())
            .collect();
        assert_eq!(blobs.len(), 3);
        for (path, bytes) in blobs {
            assert_eq!(path, format!("blobs/sha256/{}", sha256_hex(&bytes)));
        }
    }

    #[test]
    fn an_empty_binary_is_refused() {
        assert!(assemble(b"").is_err());
    }
}
