//! The worker pool: the workers and their output relays, the target count, the
//! generation, each slot's health and spawn backoff. It owns every worker timer
//! (boot, heartbeat, graceful stop, abort grace, settle, recycle age, RSS checks,
//! backoff): [`Pool::next_deadline`] and [`Pool::check_deadlines`] read them from
//! the same functions. What the master must act on comes back as an [`Exit`] or
//! a [`Progress`].

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use arbiter_proto::worker as contract;

use super::events::{Events, Source};
use crate::config::{Config, ReadyMode, WorkerProgram};
use crate::listeners::Listener;
use crate::notify::Message;
use crate::relay::{self, Relay};
use crate::spawn::{self, ChildEnv, Plan, Prepared};
use crate::workers::{self, Heartbeat, State, Worker};
use crate::{critical, debug, error, info, warning};

/// In `exec` readiness there is no word from the worker, so a worker counts as
/// booted only once it has survived this long past its exec: an exit 3/4 or a crash
/// before then is a boot failure (it halts a first boot, fails a reload), and a
/// reload retires an old worker only for a booted new one.
const EXEC_SETTLE: Duration = Duration::from_secs(2);
/// Between ABRT for a heartbeat timeout and the KILL that follows.
const ABORT_GRACE: Duration = Duration::from_millis(500);
/// How often RSS is read with `--max-worker-rss` (the only periodic wakeup it adds).
const RSS_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Workers forked per loop turn at most, so a large boot or scale-up does not keep
/// signals and control clients waiting.
const SPAWNS_PER_TURN: usize = 64;
/// A worker that lived this long resets its slot's failure count.
const STABLE_PERIOD: Duration = Duration::from_secs(10);
/// Crash-loop backoff bounds.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// From this many failures in a row, a slot is reported as crash-looping.
pub const CRASH_LOOP_AFTER: u32 = 3;

/// Crash-loop bookkeeping for one slot.
#[derive(Default)]
pub struct SlotHealth {
    pub failures: u32,
    pub not_before: Option<Instant>,
}

/// How a child ended.
#[derive(Clone, Copy, Debug)]
pub enum Death {
    Code(i32),
    Signal(Signal),
}

impl Death {
    pub fn describe(self) -> String {
        match self {
            Death::Code(c) => format!("exited with code {c}"),
            Death::Signal(s) => format!("was killed by {s}"),
        }
    }
}

/// What a worker's death means beyond the pool.
pub enum Exit {
    /// Not one of our workers.
    NotAWorker,
    /// Taken care of (a retired worker, a restart on backoff).
    Handled,
    /// A first boot failed with exit 3 or 4: the master halts with that status.
    Halt { status: u8, reason: &'static str },
    /// A worker of the generation being reloaded to died before it was ready.
    NewGenerationFailed(String),
}

/// Where the pool stands after converging.
pub struct Progress {
    /// The first generation is fully ready, for the first time: announce it.
    pub first_served: Option<usize>,
    /// Only the current generation is left, and it is fully ready.
    pub settled: bool,
}

/// What a spawn needs from the master.
pub struct SpawnContext<'a> {
    pub cfg: &'a Config,
    pub listeners: &'a [Listener],
    pub env: &'a ChildEnv,
    pub notify_address: &'a str,
    pub master_pid: Pid,
}

pub struct Pool {
    workers: Vec<Worker>,
    /// Workers' stdout/stderr pipes, until EOF (which can come after the worker
    /// is gone, when its own children hold the pipe).
    relays: Vec<Relay>,
    /// How many workers of the current generation we want.
    target: usize,
    /// The generation new workers belong to.
    generation: u64,
    /// The highest generation number handed out so far.
    last_generation: u64,
    next_worker_id: u64,
    slots: HashMap<usize, SlotHealth>,
    /// A worker of this generation exited with EX_CONFIG: spawn none until it changes.
    config_failed: Option<u64>,
    fork_failures: u32,
    fork_not_before: Option<Instant>,
    /// `--max-worker-rss`: when to read the workers' RSS next.
    next_rss_check: Option<Instant>,
    /// More workers to start than one turn starts: come back at once.
    spawn_pending: bool,
    /// The first generation was fully ready once: exit 3/4 no longer halts.
    served: bool,
    /// Heartbeat silence before this instant is not counted (see `forgive_stall`).
    silence_counted_from: Instant,
    /// How a worker proves it is ready (`--ready`, or the program's default).
    ready_mode: ReadyMode,
    heartbeat_dir: PathBuf,
    pub worker_failures: u64,
    pub workers_spawned: u64,
}

impl Pool {
    pub fn new(cfg: &Config) -> Pool {
        Pool {
            workers: Vec::new(),
            relays: Vec::new(),
            target: cfg.workers,
            generation: 1,
            last_generation: 1,
            next_worker_id: 1,
            slots: HashMap::new(),
            config_failed: None,
            fork_failures: 0,
            fork_not_before: None,
            next_rss_check: None,
            spawn_pending: false,
            served: false,
            silence_counted_from: Instant::now(),
            ready_mode: ready_mode(cfg),
            heartbeat_dir: workers::heartbeat_dir(),
            worker_failures: 0,
            workers_spawned: 0,
        }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn target(&self) -> usize {
        self.target
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn slots(&self) -> &HashMap<usize, SlotHealth> {
        &self.slots
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Ready workers of the current generation.
    pub fn ready_in_generation(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == self.generation && w.is_ready())
            .count()
    }

    /// A new target (scale, WINCH, a reload's configuration); a slot held back by
    /// a configuration error is tried again.
    pub fn set_target(&mut self, n: usize) {
        self.target = n;
        self.config_failed = None;
    }

    /// The configuration changed: how the next workers prove they are ready.
    pub fn configure(&mut self, cfg: &Config) {
        self.ready_mode = ready_mode(cfg);
    }

    /// Start a new generation: returns its number.
    pub fn new_generation(&mut self) -> u64 {
        self.last_generation += 1;
        self.generation = self.last_generation;
        self.config_failed = None;
        self.slots.clear();
        self.generation
    }

    /// A reload failed: `generation` serves again; the failed one's workers are
    /// now "other" workers, retired as the old ones are back to strength.
    pub fn revert_to(&mut self, generation: u64) {
        self.generation = generation;
        self.slots.clear();
    }

    // ---------------------------------------------------------------- timers

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
        for w in &self.workers {
            if let Some(t) = recycle_at(w, cfg) {
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
                State::Ready { .. } => {
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
        if !stopping && self.active_in_generation() < self.target {
            for h in self.slots.values() {
                if let Some(t) = h.not_before {
                    at(t);
                }
            }
            if let Some(t) = self.fork_not_before {
                at(t);
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
    /// matters (the first boot, a reload) and in `exec` readiness.
    fn settles_at(&self, w: &Worker, reloading: bool) -> Option<Instant> {
        let State::Ready { since } = w.state else {
            return None;
        };
        (self.ready_mode == ReadyMode::Exec
            && (!self.served || reloading)
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

    /// Timeouts: boot, heartbeat, graceful stop, abort grace.
    pub fn check_deadlines(&mut self, now: Instant, cfg: &Config) {
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
                State::Booting | State::Ready { .. } => {
                    let (Some(timeout), Some(due)) = (cfg.timeout, heartbeat_due) else {
                        continue;
                    };
                    // Look early at files that are nearly due: one wakeup then serves
                    // many workers instead of one wakeup each. Killing still needs
                    // the full timeout of silence, and no extension in force.
                    if now + timeout / 4 < due {
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

    /// Mark workers past `--max-worker-age` or `--max-worker-rss` for recycling.
    pub fn check_limits(&mut self, now: Instant, cfg: &Config) {
        if cfg.max_worker_age.is_none() && cfg.max_worker_rss.is_none() {
            return;
        }
        let check_rss =
            cfg.max_worker_rss.is_some() && self.next_rss_check.is_none_or(|t| now >= t);
        if check_rss {
            self.next_rss_check = Some(now + RSS_CHECK_INTERVAL);
        }
        for w in &mut self.workers {
            if recycle_at(w, cfg).is_some_and(|t| now >= t) {
                info!(
                    "Recycling worker (pid:{}): older than --max-worker-age",
                    w.pid
                );
                w.recycle = true;
            } else if check_rss
                && !w.recycle
                && w.is_ready()
                && let (Some(limit), Some(rss)) = (cfg.max_worker_rss, w.rss_bytes())
                && rss > limit
            {
                info!(
                    "Recycling worker (pid:{}): RSS {} MiB over --max-worker-rss",
                    w.pid,
                    rss / (1024 * 1024)
                );
                w.recycle = true;
            }
        }
    }

    // ---------------------------------------------------------------- events

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
            debug!("Dropped a notify datagram from pid {sender}: not one of our workers");
            return;
        };
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == owner) else {
            return;
        };
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
                Message::ExtendTimeout(by) => {
                    w.extended_until = Some(now + by);
                }
            }
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
        match spawn::read_status(fd) {
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

    /// The workers' last words, already in their pipes, as the master exits.
    pub fn drain_relays(&mut self, now: Instant) {
        for r in &mut self.relays {
            r.pump(now);
        }
    }

    /// Ready, and past the point where dying counts as failing to boot.
    fn booted(&self, w: &Worker, now: Instant) -> bool {
        match (w.ready_at, self.ready_mode) {
            (None, _) => false,
            (Some(_), ReadyMode::Notify) => true,
            (Some(t), ReadyMode::Exec) => now.saturating_duration_since(t) >= EXEC_SETTLE,
        }
    }

    /// A child exited. `reloading`: a reload to the current generation is in
    /// flight; `stopping`: the master is shutting down.
    pub fn on_exit(
        &mut self,
        pid: Pid,
        death: Death,
        now: Instant,
        reloading: bool,
        stopping: bool,
        ev: &mut Events,
    ) -> Exit {
        let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
            return Exit::NotAWorker;
        };
        let mut w = self.workers.remove(idx);
        if let Some(fd) = w.exec_status.take() {
            ev.remove(fd.as_fd());
        }
        let was_ready = self.booted(&w, now);
        log_death(&w, death);
        if w.retiring {
            // Asked to stop (or said STOPPING=1): not a failure. A clean exit after
            // serving also proves the slot healthy again.
            if was_ready && matches!(death, Death::Code(0)) && w.generation == self.generation {
                self.slots.remove(&w.slot);
            }
            return Exit::Handled;
        }
        let failed = !was_ready || !matches!(death, Death::Code(0));
        if failed {
            self.worker_failures += 1;
        }
        if let Death::Code(code @ (contract::EXIT_BOOT_ERROR | contract::EXIT_APP_LOAD_ERROR)) =
            death
            && !self.served
            && !stopping
        {
            let reason = if code == contract::EXIT_BOOT_ERROR {
                "Worker failed to boot."
            } else {
                "App failed to load."
            };
            return Exit::Halt {
                status: code as u8,
                reason,
            };
        }
        if reloading && w.generation == self.generation && !was_ready {
            return Exit::NewGenerationFailed(format!(
                "worker (pid:{pid}) {} before it was ready",
                death.describe()
            ));
        }
        if matches!(death, Death::Code(contract::EXIT_CONFIG)) && w.generation == self.generation {
            error!(
                "Worker (pid:{pid}) exited with code 78 (configuration error): not restarting generation {} until a reload or a scale",
                w.generation
            );
            self.config_failed = Some(w.generation);
            return Exit::Handled;
        }
        if w.generation != self.generation {
            return Exit::Handled;
        }
        let health = self.slots.entry(w.slot).or_default();
        if !failed {
            health.failures = 0;
            health.not_before = None;
            return Exit::Handled;
        }
        if now.saturating_duration_since(w.started) >= STABLE_PERIOD {
            health.failures = 0;
        }
        health.failures += 1;
        let delay = backoff(health.failures);
        health.not_before = Some(now + delay);
        if health.failures >= CRASH_LOOP_AFTER {
            warning!(
                "Worker slot {} is crash-looping ({} failures in a row); next start in {:.1}s",
                w.slot,
                health.failures,
                delay.as_secs_f64()
            );
        }
        Exit::Handled
    }

    // ---------------------------------------------------------------- commands

    /// Ask every worker to stop with `sig`, KILL at `deadline`. A graceful stop
    /// leaves workers already on their way out alone.
    pub fn stop_all(&mut self, sig: Signal, deadline: Instant, graceful: bool) {
        for w in &mut self.workers {
            match w.state {
                State::Killed => {}
                State::Stopping { .. } | State::Aborted { .. } if graceful => {}
                _ => w.stop(sig, deadline),
            }
        }
    }

    /// The shutdown deadline passed: KILL whatever is left.
    pub fn kill_all(&mut self) {
        for w in &mut self.workers {
            if w.state != State::Killed {
                warning!(
                    "Worker (pid:{}) still running at the shutdown deadline; sending SIGKILL",
                    w.pid
                );
                let _ = w.signal(Signal::SIGKILL);
                w.state = State::Killed;
            }
        }
    }

    /// `arbiterctl kill`: signal one worker, as its state allows.
    /// `Ok(false)`: no worker has that pid.
    pub fn signal_worker(&mut self, pid: i32, sig: Signal, cfg: &Config) -> nix::Result<bool> {
        let deadline = Instant::now() + cfg.graceful_timeout;
        let Some(w) = self.workers.iter_mut().find(|w| w.pid.as_raw() == pid) else {
            return Ok(false);
        };
        match sig {
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT if w.state.is_active() => {
                w.stop(sig, deadline);
            }
            Signal::SIGKILL => {
                w.retiring = true;
                let _ = w.signal(sig);
                w.state = State::Killed;
            }
            _ => w.signal(sig)?,
        }
        Ok(true)
    }

    /// Read every heartbeat file now (the loop does only near a deadline), so a
    /// status shows the real last beat.
    pub fn check_heartbeats(&mut self, now: Instant) {
        for w in &mut self.workers {
            w.heartbeat.check(now);
        }
    }

    fn active_in_generation(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == self.generation && w.state.is_active() && !w.recycle)
            .count()
    }

    fn retire(&mut self, pid: Pid, why: &str, cfg: &Config) {
        let deadline = Instant::now() + cfg.graceful_timeout;
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            info!("Stopping worker (pid:{pid}) gracefully: {why}");
            w.stop(Signal::SIGTERM, deadline);
        }
    }

    // ---------------------------------------------------------------- converge

    /// Move the worker table toward the target: spawn what is missing, retire what
    /// is surplus, and retire older generations as the current one becomes ready.
    pub fn converge(&mut self, now: Instant, ctx: &SpawnContext<'_>, ev: &mut Events) -> Progress {
        let cfg = ctx.cfg;
        let current_gen = self.generation;

        // Surplus of the current generation (TTOU, scale down): oldest first.
        let mut current: Vec<(u64, Pid)> = self
            .workers
            .iter()
            .filter(|w| w.generation == current_gen && w.state.is_active() && !w.recycle)
            .map(|w| (w.id, w.pid))
            .collect();
        current.sort();
        if current.len() > self.target {
            for &(_, pid) in &current[..current.len() - self.target] {
                self.retire(pid, "scale down", cfg);
            }
        }

        // Missing workers of the current generation.
        self.spawn_pending = false;
        if self.config_failed != Some(current_gen) {
            self.spawn_missing(now, ctx, ev);
        }

        // Older generations: the booting ones are useless, retire them now; keep
        // just enough ready ones to cover what the current generation lacks.
        let ready_current = self
            .workers
            .iter()
            .filter(|w| {
                w.generation == current_gen && w.is_ready() && !w.recycle && self.booted(w, now)
            })
            .count();
        // Workers being recycled are retired by the same rule as an older
        // generation: only as their replacements are ready.
        let mut others: Vec<(bool, u64, Pid, bool)> = self
            .workers
            .iter()
            .filter(|w| (w.generation != current_gen || w.recycle) && w.state.is_active())
            .map(|w| (w.is_ready(), w.id, w.pid, w.recycle))
            .collect();
        others.sort();
        let keep = self.target.saturating_sub(ready_current);
        // Booting ones sort first (false < true) and cover nothing: all go.
        let booting = others.iter().filter(|o| !o.0).count();
        let surplus = others.len().saturating_sub(keep).max(booting);
        for &(_, _, pid, recycled) in &others[..surplus] {
            let why = if recycled {
                "recycled, its replacement is ready"
            } else {
                "replaced by a new generation"
            };
            self.retire(pid, why, cfg);
        }

        let first_served = (!self.served && ready_current >= self.target).then(|| {
            self.served = true;
            ready_current
        });
        Progress {
            first_served,
            settled: ready_current >= self.target
                && self.workers.iter().all(|w| w.generation == current_gen),
        }
    }

    fn spawn_missing(&mut self, now: Instant, ctx: &SpawnContext<'_>, ev: &mut Events) {
        let current_gen = self.generation;
        let mut used = vec![false; self.target + self.workers.len()];
        for w in &self.workers {
            if w.generation == current_gen
                && w.state.is_active()
                && !w.recycle
                && w.slot < used.len()
            {
                used[w.slot] = true;
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
                if self.fork_not_before.is_some_and(|t| now < t) {
                    break;
                }
                if !self.spawn(slot, now, ctx, ev) {
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
        let credentials = ctx.cfg.worker_credentials();
        let heartbeat = match Heartbeat::create(&self.heartbeat_dir, credentials) {
            Ok(h) => h,
            Err(e) => {
                let dir = self.heartbeat_dir.display().to_string();
                self.spawn_failed(
                    &format!("cannot create a heartbeat file in {dir}: {e}"),
                    now,
                );
                return false;
            }
        };
        let id = self.next_worker_id;
        let (relay_read, relay_write) = match relay::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.spawn_failed(&format!("cannot create the output pipe: {e}"), now);
                return false;
            }
        };
        let prepared = prepare(
            ctx,
            id,
            slot,
            self.generation,
            &heartbeat,
            relay_write.as_raw_fd(),
        );
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.spawn_failed(&format!("cannot prepare the worker: {e}"), now);
                return false;
            }
        };
        let spawned = prepared.spawn();
        // Only the worker writes into its pipe: EOF then means it (and any child
        // that inherited its stdout) is gone.
        drop(relay_write);
        let (pid, exec_status) = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.spawn_failed(&format!("fork failed: {e}"), now);
                return false;
            }
        };
        ev.add(relay_read.as_fd(), Source::Relay(id));
        ev.add(exec_status.as_fd(), Source::Exec(id));
        self.relays.push(Relay::new(relay_read, pid.as_raw(), id));
        self.next_worker_id += 1;
        self.workers_spawned += 1;
        self.fork_failures = 0;
        self.fork_not_before = None;
        info!(
            "Booting worker with pid: {pid} (id:{id} slot:{slot} gen:{})",
            self.generation
        );
        self.workers.push(Worker {
            id,
            slot,
            pid,
            generation: self.generation,
            state: State::Booting,
            started: now,
            started_wall: SystemTime::now(),
            exec_status: Some(exec_status),
            heartbeat,
            sent: None,
            status_text: None,
            ready_at: None,
            retiring: false,
            extended_until: None,
            recycle: false,
            // Opened now, read after the exec: it shows the new image.
            statm: std::fs::File::open(format!("/proc/{pid}/statm")).ok(),
        });
        true
    }

    fn spawn_failed(&mut self, what: &str, now: Instant) {
        self.fork_failures += 1;
        let delay = backoff(self.fork_failures + 1);
        self.fork_not_before = Some(now + delay);
        error!(
            "Cannot start a worker: {what}; retrying in {:.1}s",
            delay.as_secs_f64()
        );
    }
}

/// Everything the child needs, built before fork.
fn prepare(
    ctx: &SpawnContext<'_>,
    id: u64,
    slot: usize,
    generation: u64,
    heartbeat: &Heartbeat,
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
    let names: Vec<&str> = ctx.listeners.iter().map(|l| l.name.as_str()).collect();
    let mut env = ctx.env.clone();
    env.listeners(&names);
    env.set(contract::ENV_WORKER_ID, id);
    env.set(contract::ENV_SLOT, slot);
    env.set(contract::ENV_GENERATION, generation);
    env.set(contract::ENV_MASTER_PID, ctx.master_pid);
    env.set(contract::ENV_HEARTBEAT_FD, heartbeat_target);
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
            builtin_title = std::ffi::OsString::from(format!("arbiter: worker [{}]", cfg.name));
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
    })
}

fn log_death(w: &Worker, death: Death) {
    let pid = w.pid;
    match death {
        Death::Code(0) => info!("Worker (pid:{pid}) exited with code 0."),
        Death::Code(c) => error!("Worker (pid:{pid}) exited with code {c}."),
        Death::Signal(sig) if w.sent == Some(sig) => {
            info!("Worker (pid:{pid}) was sent {sig} by the master.")
        }
        Death::Signal(Signal::SIGKILL) => {
            error!("Worker (pid:{pid}) was sent SIGKILL! Perhaps out of memory?")
        }
        Death::Signal(Signal::SIGTERM) => info!("Worker (pid:{pid}) was sent SIGTERM!"),
        Death::Signal(sig) => warning!("Worker (pid:{pid}) was sent {sig}!"),
    }
}

/// How a worker of this configuration proves it is ready: `--ready`, or the
/// program's default (the built-in worker says READY=1 once it accepts; a COMMAND
/// is ready once exec'd).
pub fn ready_mode(cfg: &Config) -> ReadyMode {
    cfg.ready.unwrap_or(match cfg.program {
        WorkerProgram::Builtin => ReadyMode::Notify,
        WorkerProgram::Command { .. } => ReadyMode::Exec,
    })
}

/// Delay before the n-th consecutive failure's restart: the first is immediate.
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(16);
    (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_MAX)
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

/// When a ready worker is due for recycling by `--max-worker-age`, if it is not
/// already being recycled.
fn recycle_at(w: &Worker, cfg: &Config) -> Option<Instant> {
    let age = cfg.max_worker_age?;
    (w.is_ready() && !w.recycle).then(|| w.started + age + age_jitter(w.id, age))
}

/// Up to 10% of `age`, fixed per worker, so workers started together (a boot, a
/// reload) are not all recycled at once.
fn age_jitter(id: u64, age: Duration) -> Duration {
    let spread = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32; // 0..1023
    age / 10 * spread / 1024
}

/// How often a worker that has not beaten yet is looked at.
fn probe_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(50), BACKOFF_MAX);
    }
}
