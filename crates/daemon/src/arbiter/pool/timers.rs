//! The pool's timers, each computed in one function that both the wait's
//! timeout ([`Pool::next_deadline`]) and the checks ([`Pool::check_deadlines`],
//! [`Pool::check_limits`]) use, so the master never wakes for a deadline it then
//! does not act on, nor sleeps past one.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::recycle::recycle_at;
use super::{ABORT_GRACE, EXEC_SETTLE, Pool};
use crate::config::{Config, ReadyMode};
use crate::workers::{State, Worker};
use crate::{critical, error, warning};

impl Pool {
    /// The earliest moment a worker timer is due. `reloading`: the settle time of
    /// new workers matters (it decides when old ones retire); `stopping`: nothing
    /// is spawned any more, so spawn timers do not count.
    pub fn next_deadline(
        &self,
        cfg: &Config,
        reloading: bool,
        stopping: bool,
        now: Instant,
    ) -> Option<Instant> {
        if self.spawn_pending && !stopping {
            return Some(now);
        }
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if cfg.max_worker_rss.is_some() {
            at(self.next_rss_check.unwrap_or(now));
        }
        if let Some(t) = self.counts_due(cfg, now) {
            at(t);
        }
        for w in &self.workers {
            // One past is waiting its turn, which an exit or a readiness brings.
            if let Some(t) = recycle_at(w, cfg).filter(|&t| t > now) {
                at(t);
            }
            match w.state {
                State::Stopping { deadline } | State::Aborted { deadline } => at(deadline),
                State::Booting => {
                    at(boot_deadline(w, cfg.boot_timeout));
                    if let Some(t) = self.heartbeat_due(w, cfg) {
                        at(t);
                    }
                }
                State::Ready { .. } | State::Recycling { .. } => {
                    if let Some(t) = self.heartbeat_due(w, cfg) {
                        at(t);
                    }
                    if let Some(t) = self.settles_at(w, reloading)
                        && t > now
                    {
                        at(t);
                    }
                }
                State::Killed => {}
            }
        }
        if let Some(t) = self.template_deadline(cfg.boot_timeout)
            && !stopping
        {
            at(t);
        }
        if let Some(t) = self.remains_due() {
            at(t);
        }
        if let Some(t) = self.watch_due() {
            at(t);
        }
        if !stopping && self.active_in_generation() < self.target {
            // A slot's backoff that has passed is not a deadline: the slot was
            // spawned this turn, or waits on the spawn trouble's own deadline (a
            // past one would make every wait return at once, for as long as
            // forks fail).
            for h in self.slots.values() {
                if let Some(t) = h.not_before.filter(|&t| t > now) {
                    at(t);
                }
            }
            if let Some(t) = &self.spawn_trouble {
                at(t.not_before);
            }
        }
        next
    }

    /// When the worker's heartbeat must next be looked at: when its silence
    /// reaches the timeout (not before an `EXTEND_TIMEOUT_USEC` ends), or, for a
    /// worker that never beat, now and then to notice its first beat.
    fn heartbeat_due(&self, w: &Worker, cfg: &Config) -> Option<Instant> {
        let timeout = cfg.timeout?;
        Some(match silent_since(w, self.silence_counted_from) {
            Some(beat) => (beat + timeout).max(w.extended_until.unwrap_or(beat)),
            None => w.heartbeat.last_check() + probe_interval(timeout),
        })
    }

    /// When a ready worker of the current generation counts as booted, while that
    /// matters (the first boot, a reload, a recycle waiting on it) and in `exec`
    /// readiness.
    fn settles_at(&self, w: &Worker, reloading: bool) -> Option<Instant> {
        let State::Ready { since } = w.state else {
            return None;
        };
        (self.ready_mode == ReadyMode::Exec
            && (!self.served || reloading || self.recycling_in(w.slot))
            && w.generation == self.generation)
            .then_some(since + EXEC_SETTLE)
    }

    /// The master ran `late` (stopped, or the machine stalled): heartbeat silence
    /// is counted again from now, so a stall of the whole machine does not time
    /// out every worker at once (gunicorn's master does exactly that after a VM
    /// pause). A worker really hung is still timed out, one `--timeout` later.
    pub fn forgive_stall(&mut self, late: Duration, now: Instant, cfg: &Config) {
        let Some(timeout) = cfg.timeout else {
            return;
        };
        let silent = self
            .workers
            .iter()
            .filter(|w| {
                w.heartbeat
                    .last_beat
                    .is_some_and(|b| b + timeout / 2 <= now)
            })
            .count();
        warning!(
            "The master ran {:.1}s late (stopped, or the machine stalled); heartbeat silence \
             is counted from now ({silent} worker(s) had been silent for over half the timeout)",
            late.as_secs_f64()
        );
        self.silence_counted_from = now;
    }

    /// Timeouts: boot, heartbeat, graceful stop, abort grace, trees left behind.
    pub fn check_deadlines(&mut self, now: Instant, cfg: &Config) {
        self.check_remains(now);
        self.check_templates(now, cfg.boot_timeout);
        self.check_watch(now);
        for i in 0..self.workers.len() {
            let heartbeat_due = self.heartbeat_due(&self.workers[i], cfg);
            let counted_from = self.silence_counted_from;
            let w = &mut self.workers[i];
            match w.state {
                State::Stopping { deadline } | State::Aborted { deadline } if now >= deadline => {
                    warning!(
                        "Worker (pid:{}) still running after its {}; sending SIGKILL",
                        w.pid,
                        if matches!(w.state, State::Aborted { .. }) {
                            "abort grace"
                        } else {
                            "graceful timeout"
                        }
                    );
                    let _ = w.signal(Signal::SIGKILL);
                    w.state = State::Killed;
                }
                State::Booting if now >= boot_deadline(w, cfg.boot_timeout) => {
                    error!(
                        "Worker (pid:{}) not ready after {:.1}s (--boot-timeout); killing it",
                        w.pid,
                        cfg.boot_timeout.as_secs_f64()
                    );
                    let _ = w.signal(Signal::SIGKILL);
                    w.state = State::Killed;
                }
                State::Booting | State::Ready { .. } | State::Recycling { .. } => {
                    let (Some(timeout), Some(due)) = (cfg.timeout, heartbeat_due) else {
                        continue;
                    };
                    // Look early at files that are nearly due: one wakeup then serves
                    // many workers instead of one wakeup each. Killing still needs
                    // the full timeout of silence, and no extension in force. Not
                    // early for a worker that never beat: its probe interval is
                    // shorter than that slack, so it would be looked at every turn.
                    let early = if w.heartbeat.last_beat.is_some() {
                        timeout / 4
                    } else {
                        Duration::ZERO
                    };
                    if now + early < due {
                        continue;
                    }
                    w.heartbeat.check(now);
                    let extended = w.extended_until.is_some_and(|t| now < t);
                    if let Some(beat) = silent_since(w, counted_from)
                        && now >= beat + timeout
                        && !extended
                    {
                        critical!("WORKER TIMEOUT (pid:{})", w.pid);
                        let _ = w.signal(Signal::SIGABRT);
                        w.state = State::Aborted {
                            deadline: now + ABORT_GRACE,
                        };
                    }
                }
                _ => {}
            }
        }
    }
}

/// Since when `w` counts as silent: its last beat, or `counted_from` (the end of
/// the master's last stall) if later. None: it never beat.
fn silent_since(w: &Worker, counted_from: Instant) -> Option<Instant> {
    w.heartbeat.last_beat.map(|beat| beat.max(counted_from))
}

/// When a booting worker must be ready by (`EXTEND_TIMEOUT_USEC` may push it out).
fn boot_deadline(w: &Worker, boot_timeout: Duration) -> Instant {
    let base = w.started + boot_timeout;
    w.extended_until.map_or(base, |t| t.max(base))
}

/// How often a worker that has not beaten yet is looked at.
fn probe_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}
