//! The OCI image archive `cargo xtask image` writes (`cargo xtask test`
//! builds it first and names it in `XLB_IMAGE_ARCHIVE`): its layout,
//! index, manifest and config agree with each other and with the blobs'
//! recomputed digests and sizes; the one layer holds the agent binary; and
//! that binary, run alone in the unpacked root filesystem, starts and says
//! its version (which only a static binary can do there).

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMAGE: &str = "ghcr.io/xlb-dev/xlb";

fn archive_path() -> PathBuf {
    std::env::var_os("XLB_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../target/image/xlb-{VERSION}.oci.tar"))
        })
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every entry of a tar stream: path → contents (directories empty).
fn entries(tar_bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in tar::Archive::new(tar_bytes).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        if out.insert(path.clone(), bytes).is_some() {
            bail!("{path} is in the archive twice");
        }
    }
    Ok(out)
}

/// The blob a descriptor points at, after checking its digest, its size
/// and its media type.
fn blob<'a>(
    files: &'a BTreeMap<String, Vec<u8>>,
    descriptor: &Value,
    media_type: &str,
) -> Result<&'a [u8]> {
    assert_eq!(descriptor["mediaType"], media_type, "{descriptor}");
    let digest = descriptor["digest"].as_str().context("no digest")?;
    let hex = digest.strip_prefix("sha256:").context("not sha256")?;
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .with_context(|| format!("blob {digest} missing"))?;
    assert_eq!(
        sha256_hex(bytes),
        hex,
        "blob content differs from its digest"
    );
    assert_eq!(descriptor["size"], bytes.len(), "size of {digest}");
    Ok(bytes)
}

fn json(bytes: &[u8]) -> Result<Value> {
    Ok(serde_json::from_slice(bytes)?)
}

#[test]
fn image_archive_is_a_valid_oci_layout_whose_binary_runs_alone() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "chroot needs root");
    let path = archive_path();
    let archive = std::fs::read(&path)
        .with_context(|| format!("reading {}: run `cargo xtask image`", path.display()))?;
    let files = entries(&archive)?;

    assert_eq!(
        json(&files["oci-layout"])?,
        serde_json::json!({ "imageLayoutVersion": "1.0.0" })
    );
    let index = json(&files["index.json"])?;
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().context("index.manifests")?;
    assert_eq!(manifests.len(), 1, "{index}");
    let reference = format!("{IMAGE}:{VERSION}");
    let annotations = &manifests[0]["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], VERSION);
    assert_eq!(annotations["io.containerd.image.name"], reference.as_str());
    assert_eq!(manifests[0]["platform"]["os"], "linux");
    assert_eq!(manifests[0]["platform"]["architecture"], "amd64");

    let manifest = json(blob(
        &files,
        &manifests[0],
        "application/vnd.oci.image.manifest.v1+json",
    )?)?;
    assert_eq!(manifest["schemaVersion"], 2);
    let config = json(blob(
        &files,
        &manifest["config"],
        "application/vnd.oci.image.config.v1+json",
    )?)?;
    let layers = manifest["layers"].as_array().context("manifest.layers")?;
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer_gz = blob(
        &files,
        &layers[0],
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )?;
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(layer_gz).read_to_end(&mut layer)?;

    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", sha256_hex(&layer))]),
        "diff_id is not the digest of the uncompressed layer"
    );
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/xlb"])
    );

    // The `docker save` manifest, for docker load before Docker 25.
    let docker = json(&files["manifest.json"])?;
    assert_eq!(
        docker,
        serde_json::json!([{
            "Config": format!("blobs/sha256/{}", sha256_hex(&serde_json::to_vec(&config)?)),
            "RepoTags": [reference],
            "Layers": [format!("blobs/sha256/{}", sha256_hex(layer_gz))],
        }])
    );

    let rootfs_files = entries(&layer)?;
    assert_eq!(
        rootfs_files.keys().collect::<Vec<_>>(),
        ["usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/xlb"]
    );
    // The eBPF object is embedded, byte for byte.
    let object = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"),
    )
    .context("the eBPF object `cargo xtask build-ebpf` writes")?;
    let binary = &rootfs_files["usr/local/bin/xlb"];
    assert!(
        !object.is_empty() && binary.windows(object.len()).any(|w| w == object),
        "the image's xlb does not embed the eBPF object"
    );

    // Unpacked alone, with nothing else in its root: no loader, no libc.
    let rootfs = std::env::temp_dir().join(format!("xlb-image-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs)?;
    let mut unpack = tar::Archive::new(layer.as_slice());
    unpack.set_preserve_permissions(true);
    unpack.unpack(&rootfs)?;
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/xlb", "--version"])
        .output()
        .context("running chroot")?;
    // Its allocator is jemalloc with the agent's settings (one arena, freed
    // pages given back at once; `main.rs`), as the benchmark's figures
    // assume: its statistics, printed at exit on request, say so.
    let stats = Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/xlb", "--version"])
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .context("running chroot")?;
    let _ = std::fs::remove_dir_all(&rootfs);
    let printed = String::from_utf8_lossy(&stats.stderr).into_owned()
        + &String::from_utf8_lossy(&stats.stdout);
    for setting in [
        "opt.narenas: 1\n",
        "opt.dirty_decay_ms: 0 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(
            printed.contains(setting),
            "the image's xlb does not run jemalloc with {setting:?}: {printed}"
        );
    }
    assert!(
        out.status.success(),
        "xlb --version in the image's root failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("xlb {VERSION}")
    );

    // deploy/ runs exactly this image, and uses an imported copy as it is.
    let daemonset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"),
    )?;
    assert!(
        daemonset.contains(&format!("image: {IMAGE}:{VERSION}\n")),
        "deploy/daemonset.yaml does not name {IMAGE}:{VERSION}"
    );
    assert!(daemonset.contains("imagePullPolicy: IfNotPresent"));
    Ok(())
}
