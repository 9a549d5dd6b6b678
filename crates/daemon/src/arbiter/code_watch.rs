//! `--reload-on-change` in the master: the watch follows the configuration, and a
//! burst of changes that has ended is one reload.

use std::path::PathBuf;
use std::time::Instant;

use super::Arbiter;
use super::events::Source;
use crate::code_watch::CodeWatch;
use crate::config::{BindSpec, Config};
use crate::{info, warning};

/// The files the master itself writes: a change to one is not a change of code.
fn own_files(cfg: &Config) -> Vec<PathBuf> {
    let mut files = vec![cfg.control.clone()];
    files.extend(cfg.pidfile.clone());
    if cfg.log_file.as_os_str() != "-" {
        files.push(cfg.log_file.clone());
    }
    for b in cfg.binds.iter().chain(cfg.metrics_bind.as_ref()) {
        if let BindSpec::Unix(p) = b {
            files.push(p.clone());
        }
    }
    files
}

/// The master's side of the watch.
#[derive(Default)]
pub enum Watching {
    #[default]
    Off,
    On(CodeWatch),
    /// No inotify instance could be had for these paths: said once, not retried
    /// until the paths change.
    Unavailable(Vec<PathBuf>),
}

impl Watching {
    fn roots(&self) -> &[PathBuf] {
        match self {
            Watching::Off => &[],
            Watching::On(w) => w.roots(),
            Watching::Unavailable(roots) => roots,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Watching::On(w) => w.next_deadline(),
            _ => None,
        }
    }

    pub fn on_ready(&mut self, now: Instant) {
        if let Watching::On(w) = self {
            w.on_ready(now);
        }
    }
}

impl Arbiter {
    /// Watch what the configuration names, now that it may name something else (at
    /// start, after a reload, after a failed reload went back).
    pub(super) fn sync_code_watch(&mut self) {
        let wanted = &self.cfg.reload_on_change;
        if self.code_watch.roots() == wanted.as_slice() {
            return;
        }
        if let Watching::On(old) = std::mem::take(&mut self.code_watch) {
            self.events.remove(old.fd());
            if wanted.is_empty() {
                info!("Reload on change: off");
            }
        }
        if wanted.is_empty() {
            return;
        }
        match CodeWatch::start(wanted, own_files(&self.cfg)) {
            Ok(w) => {
                info!(
                    "Reload on change: watching {} ({} directories)",
                    wanted
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    w.watched()
                );
                self.events.add(w.fd(), Source::CodeWatch);
                self.code_watch = Watching::On(w);
            }
            // inotify instances are per user (fs.inotify.max_user_instances); the
            // master serves on without the watch.
            Err(e) => {
                warning!("Reload on change: cannot watch for changes: {e}");
                self.code_watch = Watching::Unavailable(wanted.clone());
            }
        }
    }

    /// A burst of changes has ended: reload, as HUP would.
    pub(super) fn check_code_changed(&mut self, now: Instant) {
        self.sync_code_watch();
        let Watching::On(w) = &mut self.code_watch else {
            return;
        };
        let Some(changed) = w.take_ended(now) else {
            return;
        };
        if self.shutdown.is_some() {
            return;
        }
        info!("Reloading on change: {changed}");
        // A refused reload (a config file broken mid-edit) has said why; the next
        // change tries again.
        let _ = self.reload();
    }
}
