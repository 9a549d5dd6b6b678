//! Reload: a new generation, with the configuration file read again. The old
//! generation serves until the new one is ready, and serves on (with its
//! configuration and listeners back) if the new one fails.

use std::time::{Duration, Instant, SystemTime};

use arbiter_proto::control::{ErrorKind, Reply, Response};

use super::Arbiter;
use crate::config::{self, Config};
use crate::control::ClientId;
use crate::listeners::{self, Listener};
use crate::notify;
use crate::{error, info, warning};

/// A reload in flight.
pub struct Reload {
    /// The generation that keeps serving if this reload fails.
    pub from: u64,
    pub to: u64,
    pub started: Instant,
    /// What the serving generation ran with, to go back to if this reload fails;
    /// `None` when the reload changed no configuration.
    previous: Option<Previous>,
}

/// The configuration and listeners a reload replaced.
struct Previous {
    cfg: Config,
    target: usize,
    /// `None` when the addresses did not change.
    listeners: Option<Vec<Listener>>,
}

#[derive(Clone, Debug)]
pub enum ReloadOutcome {
    Succeeded {
        generation: u64,
        took: Duration,
        at: SystemTime,
    },
    Failed {
        /// The generation it started; `None`: refused before starting one (a
        /// config file that does not parse), the serving one untouched.
        generation: Option<u64>,
        reason: String,
        at: SystemTime,
    },
}

/// The reload part of the master: the one in flight, how the last one ended, who
/// waits to hear.
#[derive(Default)]
pub struct Reloads {
    pub in_flight: Option<Reload>,
    pub last: Option<ReloadOutcome>,
    /// Control clients waiting for the current reload's outcome.
    waiters: Vec<ClientId>,
    pub count: u64,
}

impl Reloads {
    pub fn is_running(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn add_waiter(&mut self, id: ClientId) {
        self.waiters.push(id);
    }

    fn take_waiters(&mut self) -> Vec<ClientId> {
        std::mem::take(&mut self.waiters)
    }
}

impl Arbiter {
    /// Start a new generation; old workers retire as new ones become ready.
    ///
    /// With a config file, it is re-read and validated first: an invalid file, or a
    /// new address that cannot be bound, fails the reload before anything changes.
    pub fn reload(&mut self) -> Result<(), String> {
        if self.shutdown.is_some() {
            info!("Reload ignored: shutting down");
            return Err("the master is shutting down".into());
        }
        // A reload is also when an operator expects the control socket back if
        // something removed it.
        if !self.lineage.is_unpromoted()
            && let Some(c) = &mut self.control
        {
            match c.ensure_bound() {
                Ok(true) => warning!(
                    "Control socket was missing; recreated at {}",
                    c.path().display()
                ),
                Ok(false) => {}
                Err(e) => error!("Control socket is missing and cannot be recreated: {e}"),
            }
        }
        let changed = match self.apply_new_config() {
            Ok(previous) => previous,
            Err(e) => {
                error!("Reload failed: {e}; the running configuration stays");
                self.reloads.last = Some(ReloadOutcome::Failed {
                    generation: None,
                    reason: e.clone(),
                    at: SystemTime::now(),
                });
                return Err(e);
            }
        };
        if self.pool.target() == 0 {
            // After WINCH: a reload brings the configured count back, as in gunicorn.
            self.pool.set_target(self.cfg.workers);
        }
        self.reloads.count += 1;
        let serving = self.pool.generation();
        let (from, previous) = match self.reloads.in_flight.take() {
            // A reload during a reload: the newest wins, and the generation that was
            // serving before either keeps serving if it fails.
            Some(r) => (r.from, self.merge_previous(r.previous, changed)),
            None => (serving, changed),
        };
        let to = self.pool.new_generation();
        info!("Reloading: generation {serving} -> {to}");
        self.reloads.in_flight = Some(Reload {
            from,
            to,
            started: Instant::now(),
            previous,
        });
        // systemd's Type=notify-reload contract: RELOADING=1 with the monotonic time,
        // then READY=1 when done (or failed).
        self.tell_manager(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            notify::monotonic_usec()
        ));
        Ok(())
    }

    /// Two reloads in a row: keep what the first replaced, to go back to; the
    /// in-between configuration is dropped and its own listeners closed.
    fn merge_previous(&self, first: Option<Previous>, now: Option<Previous>) -> Option<Previous> {
        match (first, now) {
            (Some(mut first), Some(now)) => {
                if first.listeners.is_none() {
                    first.listeners = now.listeners;
                } else if let Some(between) = now.listeners {
                    let mut keep = first.listeners.as_ref().map_or(Vec::new(), |l| {
                        l.iter().filter_map(|x| x.try_clone().ok()).collect()
                    });
                    keep.extend(self.listeners.iter().filter_map(|x| x.try_clone().ok()));
                    listeners::close_unshared(between, &keep);
                    drop(keep);
                }
                Some(first)
            }
            (first, now) => first.or(now),
        }
    }

    /// Re-read the config file and the env-file (those given) and switch to what
    /// they say. Returns what it replaced.
    fn apply_new_config(&mut self) -> Result<Option<Previous>, String> {
        if !self.loader.has_files() {
            return Ok(None);
        }
        let new = self.loader.load().map_err(|e| e.0)?;
        let (changes, restart_only) = config::describe_changes(&self.cfg, &new);
        let rebind = new.binds != self.cfg.binds
            || new.default_bind != self.cfg.default_bind
            || new.backlog != self.cfg.backlog
            || new.reuse_port != self.cfg.reuse_port;
        let listeners = if rebind {
            let opts = listeners::BindOptions {
                backlog: new.backlog,
                reuse_port: new.reuse_port,
            };
            let has_systemd = self
                .listeners
                .iter()
                .any(|l| l.origin == listeners::Origin::Systemd);
            let use_specs = !has_systemd || !new.default_bind;
            let rebound = listeners::rebind(&self.listeners, &new.binds, use_specs, &opts)
                .map_err(|e| match listeners::near_miss(&self.listeners, &e) {
                    Some(hint) => format!("{e}; {hint}"),
                    None => e.to_string(),
                })?;
            listeners::log_systemd(&rebound, !new.default_bind);
            Some(rebound)
        } else {
            None
        };
        if (new.log_file != self.cfg.log_file || new.log_level != self.cfg.log_level)
            && let Err(e) = crate::log::init(new.log_level, Some(&new.log_file))
        {
            if let Some(l) = listeners {
                listeners::close_unshared(l, &self.listeners);
            }
            return Err(format!("--log-file {}: {e}", new.log_file.display()));
        }
        for c in &changes {
            info!("{c}");
        }
        for name in restart_only {
            warning!("{name} changed in the config file: it takes effect at the next restart");
        }
        if changes.is_empty()
            && let Some(path) = self.loader.config_path()
        {
            info!("Config file {} unchanged", path.display());
        }
        let previous_target = self.pool.target();
        if new.workers != self.cfg.workers {
            // An explicit new count wins; otherwise TTIN/TTOU scaling survives.
            self.pool.set_target(new.workers);
        } else if previous_target > new.max_workers {
            // TTIN or scale took the count past the limit the file now lowers: the
            // limit is what `scale` and TTIN are held to, so the count is too.
            info!(
                "workers {previous_target} -> {}: at most --max-workers",
                new.max_workers
            );
            self.pool.set_target(new.max_workers);
        }
        // Keep what cannot change without a restart.
        let mut new = new;
        new.name = self.cfg.name.clone();
        new.pidfile = self.cfg.pidfile.clone();
        new.control = self.cfg.control.clone();
        new.daemon = self.cfg.daemon;
        self.pool.configure(&new);
        if new.autoscale != self.cfg.autoscale {
            // New bounds from the file; a count set by hand survives a reload of an
            // unchanged file, as a plain count does.
            self.autoscaler
                .set_bounds(new.autoscale, std::time::Instant::now());
        }
        let cfg = std::mem::replace(&mut self.cfg, new);
        let listeners = listeners.map(|l| std::mem::replace(&mut self.listeners, l));
        if listeners.is_some() {
            self.log_listening();
        }
        Ok(Some(Previous {
            cfg,
            target: previous_target,
            listeners,
        }))
    }

    /// The reload in flight failed: the generation before it serves on, with its
    /// configuration and listeners.
    pub(super) fn abandon_reload(&mut self, reason: String) {
        let Some(r) = self.reloads.in_flight.take() else {
            return;
        };
        error!(
            "Reload to generation {} failed: {reason}; generation {} keeps serving",
            r.to, r.from
        );
        self.reply_reload_waiters(Response::err(
            ErrorKind::Failed,
            format!(
                "reload to generation {} failed: {reason}; generation {} keeps serving",
                r.to, r.from
            ),
        ));
        self.reloads.last = Some(ReloadOutcome::Failed {
            generation: Some(r.to),
            reason,
            at: SystemTime::now(),
        });
        self.pool.revert_to(r.from);
        if let Some(prev) = r.previous {
            info!("Going back to the configuration of generation {}", r.from);
            self.pool.set_target(prev.target);
            self.pool.configure(&prev.cfg);
            if prev.cfg.log_file != self.cfg.log_file || prev.cfg.log_level != self.cfg.log_level {
                let _ = crate::log::init(prev.cfg.log_level, Some(&prev.cfg.log_file));
            }
            self.cfg = prev.cfg;
            if let Some(old) = prev.listeners {
                let new = std::mem::replace(&mut self.listeners, old);
                listeners::close_unshared(new, &self.listeners);
            }
        }
        self.tell_manager("READY=1");
    }

    /// Only the new generation is left and all of it is ready.
    pub(super) fn complete_reload(&mut self) {
        let Some(mut r) = self.reloads.in_flight.take() else {
            return;
        };
        let took = r.started.elapsed();
        info!(
            "Reload to generation {} complete in {:.2}s",
            r.to,
            took.as_secs_f64()
        );
        if let Some(Some(old)) = r.previous.take().map(|p| p.listeners) {
            // The old generation is gone: nobody needs the old addresses now.
            listeners::close_unshared(old, &self.listeners);
        }
        self.reloads.last = Some(ReloadOutcome::Succeeded {
            generation: r.to,
            took,
            at: SystemTime::now(),
        });
        self.reply_reload_waiters(Response::ok(Reply::Reloaded {
            generation: r.to,
            took_secs: took.as_secs_f64(),
        }));
        self.tell_manager("READY=1");
    }

    /// When a reload whose workers cannot even be started gives up: after
    /// `--boot-timeout` of failing, as one whose workers do not become ready.
    pub(super) fn reload_gives_up_at(&self) -> Option<Instant> {
        let r = self.reloads.in_flight.as_ref()?;
        let trouble = self.pool.spawn_trouble()?;
        Some(r.started.max(trouble.since) + self.cfg.boot_timeout)
    }

    /// Give up on a reload whose workers cannot be started, when it is time.
    pub(super) fn check_reload(&mut self, now: Instant) {
        if self.reload_gives_up_at().is_some_and(|t| now >= t)
            && let Some(trouble) = self.pool.spawn_trouble()
        {
            let reason = format!(
                "its workers could not be started within --boot-timeout ({:.0}s): {}",
                self.cfg.boot_timeout.as_secs_f64(),
                trouble.error
            );
            self.abandon_reload(reason);
        }
    }

    /// Tell everyone waiting on the reload how it ended.
    pub(super) fn reply_reload_waiters(&mut self, resp: Response) {
        for id in self.reloads.take_waiters() {
            self.reply(id, &resp);
        }
    }
}
