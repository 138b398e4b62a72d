//! The manifest pipeline: inotify on the directory says "look again"; a
//! sync reads every file and translates everything.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use super::load_dir;
use crate::{
    change::Change,
    model::DesiredState,
    translate::{self, Scope},
};

/// A watched directory of manifests.
pub struct ManifestSource {
    dir: PathBuf,
    scope: Scope,
    /// Sends a [`Change::All`] on every change in the directory while held.
    _watcher: notify::RecommendedWatcher,
}

impl ManifestSource {
    /// Starts watching `dir`; every change is sent on `changes`.
    pub fn start(dir: &Path, scope: Scope, changes: mpsc::UnboundedSender<Change>) -> Result<Self> {
        Ok(ManifestSource {
            dir: dir.to_owned(),
            scope,
            _watcher: watch_dir(dir, changes)?,
        })
    }

    /// Reads and translates the whole directory, and hands the result to
    /// `apply`. Problems are logged: there is no object to post Events on.
    pub fn sync(&mut self, apply: impl FnOnce(&DesiredState) -> Result<()>) -> Result<()> {
        let (mut objects, errors) = load_dir(&self.dir);
        for e in &errors {
            tracing::warn!(error = %e, "skipping malformed manifest");
        }
        objects.retain_classes(&self.scope.lb_classes);
        let (desired, problems) =
            translate::translate(&objects, &self.scope.node_name, self.scope.address_mode);
        drop(objects);
        for problem in &problems {
            tracing::warn!(error = %problem, "skipping invalid object");
        }
        let result = apply(&desired);
        drop(desired);
        // Parsing a large directory allocates in a burst that glibc would
        // keep; give it back so the agent's resident size reflects its state.
        // glibc only: musl (the static image's binary) has no malloc_trim
        // and returns freed memory by itself.
        // SAFETY: malloc_trim has no preconditions.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0)
        };
        result
    }
}

/// inotify on the manifest directory; every event just says "look again".
fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<Change>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    if !dir.is_dir() {
        bail!("manifest directory {} does not exist", dir.display());
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes count: the agent's own reads of the files raise
        // access events, and reacting to those would re-read forever.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(Change::All);
        }
    })
    .context("creating the manifest watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}
