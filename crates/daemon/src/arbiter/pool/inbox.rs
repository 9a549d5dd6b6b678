//! What workers tell the master: sd_notify messages (`READY=1`, `WATCHDOG=1`,
//! `STATUS=`, ...), the exec-status pipe (did the exec work), and their output,
//! relayed line by line into the master's log.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{ABORT_GRACE, Pool};
use crate::arbiter::events::Events;
use crate::config::{Config, ReadyMode};
use crate::notify::Message;
use crate::workers::State;
use crate::{critical, debug, error, info};

impl Pool {
    /// The worker whose process (or process group) `pid` belongs to, if any.
    pub fn owner_of(&self, pid: i32) -> Option<Pid> {
        if let Some(w) = self.workers.iter().find(|w| w.pid.as_raw() == pid) {
            return Some(w.pid);
        }
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok()?;
        self.workers.iter().find(|w| w.pid == pgid).map(|w| w.pid)
    }

    /// The worker leading process group `group`, if any.
    pub fn leading(&self, group: i32) -> Option<Pid> {
        self.workers
            .iter()
            .find(|w| w.pid.as_raw() == group)
            .map(|w| w.pid)
    }

    /// What a worker said on NOTIFY_SOCKET. `sender` is the kernel-checked pid.
    pub fn on_notify(&mut self, sender: i32, messages: Vec<Message>, now: Instant, cfg: &Config) {
        let Some(owner) = self.owner_of(sender) else {
            if !self.keep_early_notes(sender, messages, now) {
                debug!("Dropped a notify datagram from pid {sender}: not one of our workers");
            }
            return;
        };
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == owner) else {
            return;
        };
        let mut asked = None;
        for m in messages {
            match m {
                Message::Ready => {
                    // Not a heartbeat: many notify-aware programs say READY=1 and
                    // never ping a watchdog, and must not time out for it.
                    if w.state == State::Booting {
                        w.mark_ready(now);
                        debug!("Worker (pid:{owner}) is ready (READY=1)");
                    }
                }
                Message::Watchdog => w.heartbeat.record(now),
                Message::WatchdogTrigger if w.state.is_active() => {
                    critical!("WORKER TIMEOUT (pid:{owner}) (the worker sent WATCHDOG=trigger)");
                    let _ = w.signal(Signal::SIGABRT);
                    w.state = State::Aborted {
                        deadline: now + ABORT_GRACE,
                    };
                }
                Message::WatchdogTrigger => {}
                Message::Status(text) => w.status_text = Some(text),
                Message::Stopping if w.state.is_active() => {
                    // The worker is leaving on its own (a recycle): replace it now,
                    // and hold it to the graceful timeout like any stopping worker.
                    info!("Worker (pid:{owner}) is stopping (STOPPING=1)");
                    w.retiring = true;
                    w.state = State::Stopping {
                        deadline: now + cfg.graceful_timeout,
                    };
                }
                Message::Stopping => {}
                Message::Recycle => {
                    debug!("Worker (pid:{owner}) asks to be recycled (ARBITER_RECYCLE=1)");
                    asked = Some(w.id);
                }
                Message::ExtendTimeout(by) => {
                    w.extended_until = Some(now + by);
                }
            }
        }
        if let Some(id) = asked {
            self.ask_recycle(id);
        }
    }

    /// The exec-status pipe of worker `id` is readable: EOF means the exec worked.
    pub fn on_exec_status(&mut self, id: u64, ev: &mut Events) {
        let ready_mode = self.ready_mode;
        let Some(w) = self.workers.iter_mut().find(|w| w.id == id) else {
            return;
        };
        let Some(fd) = &w.exec_status else { return };
        let pid = w.pid;
        match crate::spawn::read_status(fd) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Ok(None) | Err(_) => {
                if ready_mode == ReadyMode::Exec && w.state == State::Booting {
                    w.mark_ready(Instant::now());
                    debug!("Worker (pid:{pid}) is ready");
                }
            }
            Ok(Some((step, errno))) => {
                let what = step.map_or("starting", |s| s.describe());
                error!(
                    "Worker (pid:{pid}) failed to start: {what}: {} ({})",
                    nix::errno::Errno::from_raw(errno).desc(),
                    nix::errno::Errno::from_raw(errno)
                );
            }
        }
        if let Some(fd) = w.exec_status.take() {
            ev.remove(fd.as_fd());
        }
    }

    /// Worker `id`'s output pipe is readable.
    pub fn on_relay(&mut self, id: u64, now: Instant, ev: &mut Events) {
        if let Some(i) = self.relays.iter().position(|r| r.worker_id == id)
            && !self.relays[i].pump(now)
        {
            let r = self.relays.swap_remove(i);
            ev.remove(r.fd());
        }
    }

    /// Output lines dropped so far, by worker id, for the workers whose pipe is
    /// still open: one pass, so a status stays linear in the worker count.
    pub fn output_dropped(&self) -> HashMap<u64, u64> {
        self.relays
            .iter()
            .map(|r| (r.worker_id, r.dropped_total()))
            .collect()
    }

    /// The workers' last words, already in their pipes, as the master exits.
    pub fn drain_relays(&mut self, now: Instant) {
        for r in &mut self.relays {
            r.pump(now);
        }
    }
}
