//! The manifest pipeline: inotify on the directory says "look again"; a
//! sync reads every file and translates everything.
//!
//! A directory that cannot be read (removed, replaced, EACCES, EIO) is not
//! an empty one: the sync fails, the Services read before stay programmed,
//! and the agent retries with backoff (audit A-15). A directory replaced by
//! a new one (a volume mounted again) is watched anew once it reads.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use super::load_dir;
use crate::{
    change::Change,
    model::DesiredState,
    telemetry::telemetry,
    translate::{self, Scope},
};

/// A watched directory of manifests.
pub struct ManifestSource {
    dir: PathBuf,
    scope: Scope,
    changes: mpsc::UnboundedSender<Change>,
    /// Sends a [`Change::All`] on every change in the directory while held.
    watcher: notify::RecommendedWatcher,
    /// The directory the watcher watches (inotify follows the inode, not
    /// the path).
    watched: Identity,
    /// The last read failed.
    unreadable: bool,
}

/// A directory's device and inode.
type Identity = (u64, u64);

fn identity(dir: &Path) -> std::io::Result<Identity> {
    std::fs::metadata(dir).map(|m| (m.dev(), m.ino()))
}

impl ManifestSource {
    /// Starts watching `dir`; every change is sent on `changes`.
    pub fn start(dir: &Path, scope: Scope, changes: mpsc::UnboundedSender<Change>) -> Result<Self> {
        let watched = identity(dir)
            .with_context(|| format!("reading the manifest directory {}", dir.display()))?;
        Ok(ManifestSource {
            dir: dir.to_owned(),
            scope,
            watcher: watch_dir(dir, changes.clone())?,
            changes,
            watched,
            unreadable: false,
        })
    }

    /// Reads and translates the whole directory, and hands the result to
    /// `apply`. Problems are logged: there is no object to post Events on.
    /// A directory that cannot be read is an error, and nothing is applied.
    pub fn sync(&mut self, apply: impl FnOnce(&DesiredState) -> Result<()>) -> Result<()> {
        let (mut objects, errors) = match load_dir(&self.dir) {
            Ok(loaded) => loaded,
            Err(error) => {
                telemetry().source_read_errors.inc();
                self.unreadable = true;
                return Err(anyhow::Error::new(error)
                    .context("the Services read before stay programmed until it reads again"));
            }
        };
        if std::mem::take(&mut self.unreadable) {
            tracing::info!(dir = %self.dir.display(), "the manifest directory reads again");
        }
        self.watch_again_if_replaced();
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

    /// A directory put in place of the watched one (a volume mounted again,
    /// a restored copy) would otherwise never be watched.
    fn watch_again_if_replaced(&mut self) {
        let Ok(now) = identity(&self.dir) else {
            return;
        };
        if now == self.watched {
            return;
        }
        match watch_dir(&self.dir, self.changes.clone()) {
            Ok(watcher) => {
                tracing::info!(dir = %self.dir.display(), "the manifest directory was replaced; watching the new one");
                self.watcher = watcher;
                self.watched = now;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "watching the replaced manifest directory failed")
            }
        }
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
