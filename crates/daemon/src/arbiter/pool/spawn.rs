//! Spawning the missing workers: everything prepared before fork (see
//! `crate::spawn`), registered with the event set at once, and backed off when
//! fork or its preparations fail.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Instant, SystemTime};

use arbiter_proto::worker as contract;

use super::{Pool, SPAWNS_PER_TURN, SpawnContext, SpawnTrouble, backoff};
use crate::arbiter::events::{Events, Source};
use crate::config::WorkerProgram;
use crate::relay::{self, Relay};
use crate::spawn::{Plan, Prepared};
use crate::trees::Tree;
use crate::workers::{Heartbeat, State, Worker};
use crate::{error, info};
use nix::unistd::Pid;

impl Pool {
    pub(super) fn spawn_missing(&mut self, now: Instant, ctx: &SpawnContext<'_>, ev: &mut Events) {
        self.revive_guardian(ctx.cfg, ctx.env);
        self.note_env_keys(ctx.cfg);
        if ctx.cfg.preload {
            self.ensure_template(now, ctx, ev);
        }
        let current_gen = self.generation;
        let mut used = vec![false; self.target + self.workers.len()];
        for w in &self.workers {
            // A worker killed because it never booted holds its slot until it is
            // reaped: its death decides the slot's backoff, which its replacement
            // must wait out.
            let failing = w.state == State::Killed && !w.retiring && w.ready_at.is_none();
            if w.generation == current_gen
                && (w.state.is_active() || failing)
                && !w.is_recycling()
                && w.slot < used.len()
            {
                used[w.slot] = true;
            }
        }
        for slot in self.pending_slots() {
            if let Some(u) = used.get_mut(slot) {
                *u = true;
            }
        }
        let active = used.iter().filter(|&&u| u).count();
        let mut missing = self.target.saturating_sub(active);
        let mut spawned = 0;
        let mut slot = 0;
        while missing > 0 {
            while used.get(slot) == Some(&true) {
                slot += 1;
            }
            if spawned == SPAWNS_PER_TURN {
                // The rest next turn, right after signals and control clients
                // have had their say.
                self.spawn_pending = true;
                break;
            }
            let waiting = self
                .slots
                .get(&slot)
                .and_then(|h| h.not_before)
                .is_some_and(|t| now < t);
            if !waiting {
                if self
                    .spawn_trouble
                    .as_ref()
                    .is_some_and(|t| now < t.not_before)
                {
                    break;
                }
                let started = if ctx.cfg.preload {
                    self.fork_from_template(slot, now, ctx, ev)
                } else {
                    self.spawn(slot, now, ctx, ev)
                };
                if !started {
                    break;
                }
                spawned += 1;
            }
            if let Some(u) = used.get_mut(slot) {
                *u = true;
            }
            slot += 1;
            missing -= 1;
        }
    }

    /// Fork and exec one worker into `slot`. False if it could not be started now
    /// (the caller stops spawning for this turn; a backoff deadline is set).
    fn spawn(
        &mut self,
        slot: usize,
        now: Instant,
        ctx: &SpawnContext<'_>,
        ev: &mut Events,
    ) -> bool {
        let Some(parts) = self.worker_parts(ctx, now) else {
            return false;
        };
        let Some(parts) = parts.with_write_end() else {
            return false;
        };
        let (mut parts, relay_write) = parts;
        let (id, board) = (parts.id, parts.board);
        let prepared = prepare(
            ctx,
            id,
            slot,
            self.generation,
            &parts.heartbeat,
            board,
            relay_write.as_raw_fd(),
        );
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.discard(parts);
                self.spawn_failed(format!("cannot prepare the worker: {e}"), now);
                return false;
            }
        };
        if let Some(c) = &parts.cgroup {
            prepared.join_cgroup(c.dir_fd.as_raw_fd(), c.procs.as_raw_fd());
        }
        let spawned = prepared.spawn();
        // Only the worker writes into its pipe: EOF then means it (and any child
        // that inherited its stdout) is gone.
        drop(relay_write);
        let (pid, exec_status) = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.discard(parts);
                let why = if e.raw_os_error() == Some(libc::EAGAIN) {
                    format!("fork failed: {e} (process limit)")
                } else {
                    format!("fork failed: {e}")
                };
                self.spawn_failed(why, now);
                return false;
            }
        };
        ev.add(exec_status.as_fd(), Source::Exec(id));
        info!(
            "Booting worker with pid: {pid} (id:{id} slot:{slot} gen:{})",
            self.generation
        );
        parts.relay_write = None;
        self.adopt(parts, slot, pid, Some(exec_status), now, ev);
        self.spawn_trouble = None;
        true
    }

    /// What a worker needs from the master before it exists (its heartbeat file,
    /// output pipe, cgroup, scoreboard entry), for an exec'd worker and for one a
    /// template forks alike. `None` (a backoff is set) if any cannot be made.
    pub(super) fn worker_parts(
        &mut self,
        ctx: &SpawnContext<'_>,
        now: Instant,
    ) -> Option<WorkerParts> {
        let credentials = ctx.cfg.worker_credentials();
        let heartbeat = match Heartbeat::create(&self.heartbeat_dir, credentials) {
            Ok(h) => h,
            Err(e) => {
                let dir = self.heartbeat_dir.display().to_string();
                self.spawn_failed(format!("cannot create a heartbeat file in {dir}: {e}"), now);
                return None;
            }
        };
        let id = self.next_worker_id;
        let (relay_read, relay_write) = match relay::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.spawn_failed(format!("cannot create the output pipe: {e}"), now);
                return None;
            }
        };
        let cgroup = match self.containment.prepare(id) {
            Ok(c) => c,
            Err(e) => {
                self.spawn_failed(format!("cannot make the worker's cgroup: {e}"), now);
                return None;
            }
        };
        // No free entry (more workers alive than a reload at --max-workers
        // needs): the worker runs without one and shows as unknown.
        let board = self
            .scoreboard
            .as_mut()
            .and_then(|sb| Some((sb.claim(id)?, sb.fd().as_raw_fd())));
        self.next_worker_id += 1;
        Some(WorkerParts {
            id,
            heartbeat,
            relay_read,
            relay_write: Some(relay_write),
            cgroup,
            board,
        })
    }

    /// Parts of a worker that will not be: its scoreboard entry back, its cgroup
    /// (empty: nobody was born in it) gone.
    pub(super) fn discard(&mut self, parts: WorkerParts) {
        self.release_board(parts.board.map(|b| b.0));
        if let Some(c) = parts.cgroup {
            let _ = std::fs::remove_dir(&c.dir);
        }
    }

    /// Worker `parts.id` exists as `pid` (exec'd, with its exec-status pipe, or
    /// forked by a template): the pool takes it in.
    pub(super) fn adopt(
        &mut self,
        parts: WorkerParts,
        slot: usize,
        pid: Pid,
        exec_status: Option<OwnedFd>,
        now: Instant,
        ev: &mut Events,
    ) {
        let WorkerParts {
            id,
            mut heartbeat,
            relay_read,
            cgroup,
            board,
            ..
        } = parts;
        // Ours to keep for the worker's life: out of the range children copy.
        let relay_read = crate::spawn::keep_from_children(relay_read);
        heartbeat.keep_from_children();
        ev.add(relay_read.as_fd(), Source::Relay(id));
        self.relays.push(Relay::new(relay_read, pid.as_raw(), id));
        self.workers_spawned += 1;
        if let Some(g) = &mut self.guardian {
            g.watch(pid);
        }
        self.workers.push(Worker {
            tree: Tree::of_live_worker(pid, cgroup.map(|c| c.dir)),
            kill_mode: self.kill_mode,
            board: board.map(|b| b.0),
            cpu_samples: Default::default(),
            rss_read: Default::default(),
            id,
            slot,
            pid,
            generation: self.generation,
            state: State::Booting,
            started: now,
            started_wall: SystemTime::now(),
            exec_status,
            heartbeat,
            sent: None,
            status_text: None,
            ready_at: None,
            retiring: false,
            extended_until: None,
            jitter_draw: self.recycler.rng.draw(),
            // Opened now, read after the exec: it shows the new image.
            statm: std::fs::File::open(format!("/proc/{pid}/statm"))
                .ok()
                .map(|f| std::fs::File::from(crate::spawn::keep_from_children(f.into()))),
        });
    }

    pub(super) fn spawn_failed(&mut self, what: String, now: Instant) {
        let failures = self.spawn_trouble.as_ref().map_or(0, |t| t.failures) + 1;
        let delay = backoff(failures + 1);
        error!(
            "Cannot start a worker: {what}; retrying in {:.1}s",
            delay.as_secs_f64()
        );
        let since = self.spawn_trouble.as_ref().map_or(now, |t| t.since);
        self.spawn_trouble = Some(SpawnTrouble {
            failures,
            not_before: now + delay,
            since,
            error: what,
        });
    }
}

/// What [`Pool::worker_parts`] makes for one worker.
pub(super) struct WorkerParts {
    pub id: u64,
    pub heartbeat: Heartbeat,
    pub relay_read: OwnedFd,
    /// The output pipe's write end, until it is handed to the worker (or its
    /// template): ours must then close, so EOF means the worker is gone.
    pub relay_write: Option<OwnedFd>,
    pub cgroup: Option<crate::trees::Prepared>,
    pub board: Option<(u32, RawFd)>,
}

impl WorkerParts {
    /// The parts and the write end, apart.
    pub fn with_write_end(mut self) -> Option<(WorkerParts, OwnedFd)> {
        let w = self.relay_write.take()?;
        Some((self, w))
    }
}

/// Everything the child needs, built before fork.
fn prepare(
    ctx: &SpawnContext<'_>,
    id: u64,
    slot: usize,
    generation: u64,
    heartbeat: &Heartbeat,
    board: Option<(u32, i32)>,
    stdio: i32,
) -> std::io::Result<Prepared> {
    let cfg = ctx.cfg;
    let mut fds: Vec<i32> = ctx
        .listeners
        .iter()
        .map(|l| l.as_fd().as_raw_fd())
        .collect();
    let heartbeat_target = contract::LISTEN_FDS_START + fds.len() as i32;
    fds.push(heartbeat.fd());
    let board_target = contract::LISTEN_FDS_START + fds.len() as i32;
    if let Some((_, fd)) = board {
        fds.push(fd);
    }
    let names: Vec<&str> = ctx.listeners.iter().map(|l| l.name.as_str()).collect();
    let mut env = ctx.env.clone();
    env.overlay(&ctx.cfg.env);
    env.listeners(&names);
    env.set(contract::ENV_WORKER_ID, id);
    env.set(contract::ENV_SLOT, slot);
    env.set(contract::ENV_GENERATION, generation);
    env.set(contract::ENV_MASTER_PID, ctx.master_pid);
    env.set(contract::ENV_HEARTBEAT_FD, heartbeat_target);
    if let Some((index, _)) = board {
        env.set(contract::ENV_SCOREBOARD_FD, board_target);
        env.set(contract::ENV_SCOREBOARD_SLOT, index);
    }
    env.set(
        contract::ENV_TIMEOUT,
        cfg.timeout.map_or(0.0, |t| t.as_secs_f64()),
    );
    env.set(contract::ENV_NOTIFY_SOCKET, ctx.notify_address);
    if let Some(t) = cfg.timeout {
        // Libraries that already ping systemd's watchdog ping ours.
        env.watchdog(t.as_micros());
    }
    let builtin_title;
    let (path, argv): (&std::ffi::OsStr, Vec<&std::ffi::OsStr>) = match &cfg.program {
        WorkerProgram::Builtin => {
            // What ps, top -c and htop show for it, as gunicorn's setproctitle does.
            builtin_title =
                std::ffi::OsString::from(format!("arbiterd: worker {} id:{id}", cfg.name));
            (
                std::ffi::OsStr::new("/proc/self/exe"),
                vec![
                    builtin_title.as_os_str(),
                    std::ffi::OsStr::new(crate::BUILTIN_WORKER_ARG),
                ],
            )
        }
        WorkerProgram::Command { path, argv } => (
            path.as_os_str(),
            argv.iter().map(|a| a.as_os_str()).collect(),
        ),
    };
    Prepared::new(Plan {
        path,
        argv: &argv,
        env: env.env,
        pid_keys: &env.pid_keys,
        fds,
        stdio: Some(stdio),
        credentials: cfg.worker_credentials(),
        contained: true,
        dir: None,
    })
}
