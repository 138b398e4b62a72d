//! A JSON file beside the pinned maps that names what the maps hold by
//! number (service ids → `namespace/name:port`), for `xlb inspect`. bpffs
//! holds only BPF objects, so it lives under `--state-dir` (/run/xlb).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::reconcile::Reconciler;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FrontendInfo {
    pub frontend: String,
    pub service: String,
    pub local_only: bool,
    pub affinity_timeout: Option<u32>,
    pub source_ranges: Vec<String>,
}

pub fn path(state_dir: &Path, node_name: &str) -> PathBuf {
    state_dir.join(node_name).join("frontends.json")
}

/// Streamed to the file one frontend at a time: at 10 000 Services the
/// whole map and its text (3 MB) built first were a transient of ~20 MiB for
/// each Service added or removed (issue 11).
pub fn write(state_dir: &Path, node_name: &str, reconciler: &Reconciler) -> Result<()> {
    let p = path(state_dir, node_name);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = p.with_extension("json.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer_pretty(&mut out, &Entries(reconciler))
        .and_then(|()| std::io::Write::flush(&mut out).map_err(serde_json::Error::io))
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(out);
    std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(())
}

/// The reconciler's frontends as a map from service id to
/// [`FrontendInfo`], serialized as they are walked.
struct Entries<'a>(&'a Reconciler);

impl Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.programmed().map(|(id, frontend, spec)| {
            let mut info = FrontendInfo {
                frontend: frontend.to_string(),
                ..Default::default()
            };
            if let Some(spec) = spec {
                info.service = spec.service.to_string();
                info.local_only = spec.local_only;
                info.affinity_timeout = spec.affinity_timeout;
                info.source_ranges = spec.source_ranges.iter().map(|r| r.to_string()).collect();
            }
            (id, info)
        }))
    }
}

pub fn read(state_dir: &Path, node_name: &str) -> BTreeMap<u32, FrontendInfo> {
    std::fs::read(path(state_dir, node_name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
