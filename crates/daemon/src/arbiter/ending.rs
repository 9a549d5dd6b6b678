//! How the master ends, and who hears about it: the shutdown (graceful or
//! quick), a halt with a status and a reason, the deadline by which whoever waits
//! for the first generation (`-D`'s launcher, an old master) hears, and the last
//! words: replies to waiting clients, sockets, pidfile, the launcher's report.

use std::os::fd::AsFd;
use std::time::Instant;

use arbiter_proto::control::{ErrorKind, Reply, Response};
use nix::sys::signal::Signal;

use super::Arbiter;
use super::shutdown::{Bounds, How, Look, Shutdown, Step};
use crate::{error, info};

impl Arbiter {
    /// TERM, INT, QUIT, `arbiterctl stop`, a halt, a handover: the first starts
    /// the stop, the next may hurry it (see [`Shutdown::again`]).
    pub fn begin_shutdown(&mut self, how: How) {
        let now = Instant::now();
        let step = match &mut self.shutdown {
            Some(s) => s.again(how, now, self.cfg.graceful_timeout),
            None => {
                let how = if how == How::Graceful && self.lineage.shares_paths() {
                    info!("Another master serves these listeners: no drain window, no queue wait");
                    How::Immediate
                } else {
                    how
                };
                if how == How::Graceful {
                    // The workers serve on for a while: the generation that
                    // serves now is the one to keep.
                    self.abandon_reload("the master is shutting down".into());
                } else if self.reloads.in_flight.take().is_some() {
                    self.reply_reload_waiters(Response::err(
                        ErrorKind::Refused,
                        "the master is shutting down; the reload was abandoned",
                    ));
                }
                let bounds = Bounds {
                    delay: self.cfg.shutdown_delay,
                    graceful: self.cfg.graceful_timeout,
                };
                let (state, step) = Shutdown::begin(how, now, bounds);
                self.shutdown = Some(state);
                // Handing over (or leaving the new master of a USR2 serving): the
                // service is not stopping, it changes hands as we exit.
                if self.lineage.successor().is_none() {
                    self.tell_manager("STOPPING=1");
                }
                step
            }
        };
        self.act_on(step);
    }

    /// Each turn: the window's end, the queues, the KILL deadline.
    pub(super) fn check_shutdown(&mut self, now: Instant) {
        let Some(s) = &mut self.shutdown else {
            return;
        };
        let (listeners, pool) = (&self.listeners, &self.pool);
        let step = s.tick(now, self.cfg.graceful_timeout, || Look {
            queued: crate::queue::queued(listeners.iter().map(|l| l.as_fd())),
            serving: pool.serving(),
        });
        self.act_on(step);
    }

    fn act_on(&mut self, step: Step) {
        match step {
            Step::Wait => {}
            Step::StopWorkers { graceful, deadline } => {
                self.refuse_more_connections();
                // New connections now wait in the backlog of the workers' copies
                // until those close; the unix socket path goes away at once,
                // unless another master serves on it.
                self.release_listeners();
                // Its address too is free for a master started in our place.
                self.close_metrics();
                let sig = if graceful {
                    Signal::SIGTERM
                } else {
                    Signal::SIGQUIT
                };
                self.pool.stop_all(sig, deadline, graceful);
            }
            Step::Kill => self.pool.kill_all(),
        }
    }

    /// From here on, a connection let into an accept queue would only be reset
    /// once the last worker closed the socket. With the queue kept at what it
    /// holds, the kernel drops the SYN instead; the client sends it again a
    /// second later and, the socket gone by then, is refused: a failure a
    /// balancer retries elsewhere, which a reset under a sent request is not.
    /// Only for sockets this master's lineage bound and that go with it: the next
    /// master would inherit the shrunk queue of one that systemd or a parent
    /// keeps (`fd://`), and another master still serves from shared ones.
    fn refuse_more_connections(&self) {
        if self.lineage.shares_paths() {
            return;
        }
        for l in &self.listeners {
            if matches!(
                l.origin,
                crate::listeners::Origin::Bound | crate::listeners::Origin::HandedOver
            ) && let Err(e) = crate::queue::refuse_more(l.as_fd())
            {
                crate::warning!("Cannot close the accept queue of {}: {e}", l.display);
            }
        }
    }

    /// The workers have been told to stop (not in the drain window or the wait
    /// for the queues, when they serve on as before).
    pub(super) fn stopping_workers(&self) -> bool {
        self.shutdown.as_ref().is_some_and(Shutdown::workers_told)
    }

    pub(super) fn halt(&mut self, status: u8, reason: &str) {
        error!("{reason} Halting with status {status}");
        self.exit_status = status;
        self.exit_reason = Some(reason.to_string());
        self.begin_shutdown(How::Immediate);
    }

    /// Whoever waits to hear that we serve (`-D`'s launcher, an old master) hears
    /// by then: a crash-looping first generation must not keep an init script or a
    /// deploy waiting forever.
    pub(super) fn report_due(&self) -> Option<Instant> {
        if self.shutdown.is_some() {
            return None;
        }
        self.report.as_ref()?;
        Some(self.started + self.cfg.boot_timeout)
    }

    /// No worker ready within `--boot-timeout` while someone waits: stop, and say
    /// why in the workers' own words.
    pub(super) fn check_report(&mut self, now: Instant) {
        if self.report_due().is_none_or(|t| now < t) {
            return;
        }
        let mut reason = format!(
            "no worker was ready within --boot-timeout ({}s)",
            self.cfg.boot_timeout.as_secs_f64()
        );
        if let Some(trouble) = self.pool.spawn_trouble() {
            reason += &format!(": workers cannot be started: {}", trouble.error);
        } else if let Some(last) = self.pool.last_failure() {
            reason += &format!("; the last {last}");
        }
        self.halt(1, &reason);
    }

    pub(super) fn finish(mut self) -> u8 {
        self.pool.drain_relays(Instant::now());
        let bye = Response::ok(Reply::Stopped {
            pid: self.master_pid.as_raw(),
        });
        for id in std::mem::take(&mut self.stop_waiters) {
            self.reply(id, &bye);
        }
        if let Some(new_pid) = self.lineage.successor() {
            let done = Response::ok(Reply::Upgraded {
                old_pid: self.master_pid.as_raw(),
                new_pid: new_pid.as_raw(),
                workers: self.lineage.successor_workers(),
            });
            for id in self.lineage.take_handover_waiters() {
                self.reply(id, &done);
            }
        }
        if let Some(c) = self.control.take() {
            // The new master renames its socket over the path: leave ours there
            // until then, so the path never goes missing.
            c.shutdown(self.lineage.successor().is_none());
        }
        self.release_listeners();
        self.close_metrics();
        self.pool.tear_down();
        if let Some(p) = self.pidfile.take() {
            p.remove();
        }
        if let (Some(new_pid), Some(base)) = (self.lineage.successor(), &self.cfg.pidfile)
            && let Err(e) = crate::pidfile::Pidfile::name_successor(base, new_pid.as_raw())
        {
            error!(
                "Cannot write the new master's pid (pid:{new_pid}) to {}: {e}",
                base.display()
            );
        }
        if self.exit_status == 0 {
            info!("Shutting down: Master");
        } else {
            error!("Shutting down: Master");
        }
        if let Some(reason) = &self.exit_reason {
            error!("Reason: {reason}");
        }
        if let Some(r) = self.report.take() {
            r.error(
                self.exit_status.max(1),
                self.exit_reason
                    .as_deref()
                    .unwrap_or("the master stopped before it served"),
            );
        }
        self.exit_status
    }
}
