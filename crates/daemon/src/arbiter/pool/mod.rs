//! The worker pool: the workers and their output relays, the target count, the
//! generation, each slot's health and spawn backoff. It owns every worker timer
//! (boot, heartbeat, graceful stop, abort grace, settle, recycle age, RSS and
//! request-count checks, backoff): [`Pool::next_deadline`] and [`Pool::check_deadlines`] read them from
//! the same functions. What the master must act on comes back as an [`Exit`] or
//! a [`Progress`].

mod env_keys;
mod inbox;
mod recycle;
mod remains;

use recycle::Recycler;

use remains::Remains;
mod spawn;
mod template;
mod timers;
mod watch;

use template::Template;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use arbiter_proto::worker as contract;

use super::events::Events;
use crate::config::{Config, KillMode, ReadyMode, WorkerProgram};
use crate::guardian::Guardian;
use crate::listeners::Listener;
use crate::notify::Message;
use crate::relay::Relay;
use crate::scoreboard::Scoreboard;
use crate::spawn::ChildEnv;
use crate::trees::Containment;
use crate::workers::{self, State, Worker};
use crate::{error, info, warning};

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

/// What the master is doing, as a worker's death is judged.
#[derive(Clone, Copy)]
pub struct Phase {
    /// A reload to the current generation is in flight.
    pub reloading: bool,
    /// The master is shutting down.
    pub stopping: bool,
}

/// Where the pool stands after converging.
pub struct Progress {
    /// The first generation is fully ready, for the first time: announce it.
    pub first_served: Option<usize>,
    /// Only the current generation is left, and it is fully ready.
    pub settled: bool,
}

/// Starting workers fails, again and again.
pub struct SpawnTrouble {
    pub failures: u32,
    pub not_before: Instant,
    pub since: Instant,
    pub error: String,
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
    /// Workers cannot be started (fork, pipes, heartbeat files fail): since when,
    /// why, and when to try again.
    spawn_trouble: Option<SpawnTrouble>,
    /// `--max-worker-rss`: when to read the workers' RSS next.
    next_rss_check: Option<Instant>,
    /// More workers to start than one turn starts: come back at once.
    spawn_pending: bool,
    /// The first generation was fully ready once: exit 3/4 no longer halts.
    served: bool,
    /// Heartbeat silence before this instant is not counted (see `forgive_stall`).
    silence_counted_from: Instant,
    /// `--preload`: the templates (one per generation that still needs one).
    templates: Vec<Template>,
    /// Exits of children nobody claimed yet: a forked worker's exit can come
    /// before its `FORKED` line.
    unclaimed: Vec<(Pid, Death, Instant)>,
    /// Notify messages from children nobody claimed yet: a forked worker can say
    /// `READY=1` before its `FORKED` line is read.
    early_notes: Vec<(i32, Vec<Message>, Instant)>,
    /// A template died or could not start: when to try again, and how often it
    /// failed in a row.
    template_retry_at: Option<Instant>,
    template_failures: u32,
    /// `--kill-mode`, for workers created outside `spawn` (forked by a template).
    kill_mode: KillMode,
    /// How a worker proves it is ready (`--ready`, or the program's default).
    ready_mode: ReadyMode,
    heartbeat_dir: PathBuf,
    /// How workers' trees are held: a cgroup each, or process groups.
    containment: Containment,
    /// Kills the workers' trees if the master is killed.
    guardian: Option<Guardian>,
    /// Trees of workers that exited while some of their processes still ran:
    /// TERMed, KILLed at their deadline, forgotten once empty.
    remains: Vec<Remains>,
    /// How the latest worker of the current generation failed, in words.
    last_failure: Option<String>,
    /// Where workers say busy or idle; `None` if it could not be created.
    scoreboard: Option<Scoreboard>,
    recycler: Recycler,
    /// Each generation's environment names (see `env_keys.rs`).
    env_keys: BTreeMap<u64, Vec<String>>,
    /// Statuses asked often: the workers' CPU readings taken between them.
    watch: watch::Watch,
    pub worker_failures: u64,
    pub workers_spawned: u64,
}

impl Pool {
    pub fn new(cfg: &Config, master_pid: Pid, env: &ChildEnv) -> Pool {
        let containment = Containment::set_up(&cfg.name, master_pid, cfg.cgroup);
        let guardian = match Guardian::start(&cfg.name, containment.cgroup_root(), env) {
            Ok(g) => Some(g),
            Err(e) => {
                error!(
                    "Cannot start the guardian: {e}; if the master is killed, workers' children may outlive it"
                );
                None
            }
        };
        info!(
            "Worker trees: {}{}",
            containment.describe(),
            if guardian.is_some() {
                ", with a guardian"
            } else {
                ""
            }
        );
        // Room for every worker of two generations at once: a reload at
        // --max-workers. Fixed for the master's life, so a worker never sees its
        // mapping change under it.
        let entries = u32::try_from(cfg.max_workers.saturating_mul(2)).unwrap_or(u32::MAX);
        let scoreboard = Scoreboard::create(entries)
            .inspect_err(|e| {
                warning!("Cannot create the scoreboard: {e}; workers' busy/idle states will show as unknown")
            })
            .ok();
        Pool {
            scoreboard,
            recycler: Recycler::new(),
            env_keys: BTreeMap::new(),
            watch: watch::Watch::default(),
            workers: Vec::new(),
            relays: Vec::new(),
            target: cfg.workers,
            generation: 1,
            last_generation: 1,
            next_worker_id: 1,
            slots: HashMap::new(),
            config_failed: None,
            spawn_trouble: None,
            next_rss_check: None,
            spawn_pending: false,
            served: false,
            last_failure: None,
            silence_counted_from: Instant::now(),
            ready_mode: ready_mode(cfg),
            templates: Vec::new(),
            unclaimed: Vec::new(),
            early_notes: Vec::new(),
            template_retry_at: None,
            template_failures: 0,
            kill_mode: cfg.kill_mode,
            heartbeat_dir: workers::heartbeat_dir(),
            containment,
            guardian,
            remains: Vec::new(),
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

    /// How the latest worker of the current generation failed, if one did.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Why workers cannot be started right now, if they cannot.
    pub fn spawn_trouble(&self) -> Option<&SpawnTrouble> {
        self.spawn_trouble.as_ref()
    }

    pub fn slots(&self) -> &HashMap<usize, SlotHealth> {
        &self.slots
    }

    /// No worker, and nothing left of any worker's tree.
    /// The first generation has been ready in full once.
    pub fn has_served(&self) -> bool {
        self.served
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.remains.is_empty() && self.templates.is_empty()
    }

    pub fn containment(&self) -> &Containment {
        &self.containment
    }

    /// What worker `w` says on the scoreboard now (`now_ns`: the monotonic clock,
    /// read once per snapshot).
    pub fn board_report(
        &self,
        w: &Worker,
        now_ns: u64,
    ) -> Option<arbiter_proto::scoreboard::Report> {
        self.scoreboard.as_ref()?.report(w.board?, w.id, now_ns)
    }

    /// Ready workers of the current generation that say, on the scoreboard, they
    /// are busy and idle (the autoscaler's sample; those that say nothing count
    /// in neither).
    pub fn busy_idle(&self) -> (usize, usize) {
        let now_ns = arbiter_proto::scoreboard::monotonic_ns();
        let mut counts = (0, 0);
        for w in self
            .workers
            .iter()
            .filter(|w| w.is_ready() && w.generation == self.generation)
        {
            match self.board_report(w, now_ns).map(|r| r.busy) {
                Some(true) => counts.0 += 1,
                Some(false) => counts.1 += 1,
                None => {}
            }
        }
        counts
    }

    /// Workers serving now, of any generation: during a reload the old ones
    /// serve until new ones replace them, so a healthy reload is never below
    /// the target.
    pub fn serving(&self) -> usize {
        self.workers.iter().filter(|w| w.is_ready()).count()
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
        self.kill_mode = cfg.kill_mode;
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

    /// Ready, and past the point where dying counts as failing to boot.
    fn booted(&self, w: &Worker, now: Instant) -> bool {
        match (w.ready_at, self.ready_mode) {
            (None, _) => false,
            (Some(_), ReadyMode::Notify) => true,
            (Some(t), ReadyMode::Exec) => now.saturating_duration_since(t) >= EXEC_SETTLE,
        }
    }

    /// A child exited.
    pub fn on_exit(
        &mut self,
        pid: Pid,
        death: Death,
        now: Instant,
        phase: Phase,
        cfg: &Config,
        ev: &mut Events,
    ) -> Exit {
        let Phase {
            reloading,
            stopping,
        } = phase;
        if let Some(exit) = self.template_exited(pid, death, now, phase) {
            return exit;
        }
        let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
            self.keep_unclaimed(pid, death, now);
            return Exit::NotAWorker;
        };
        let mut w = self.workers.remove(idx);
        if let Some(fd) = w.exec_status.take() {
            ev.remove(fd.as_fd());
        }
        let was_ready = self.booted(&w, now);
        log_death(&w, death);
        self.bury(&w, now, cfg);
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
            if w.generation == self.generation {
                self.last_failure = Some(format!(
                    "worker (pid:{pid}) {}{}",
                    death.describe(),
                    if was_ready {
                        ""
                    } else {
                        " before it was ready"
                    }
                ));
            }
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
        self.signal_templates(Signal::SIGTERM);
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
        self.kill_remains();
        self.signal_templates(Signal::SIGKILL);
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
            .filter(|w| w.generation == self.generation && w.state.is_active() && !w.is_recycling())
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
            .filter(|w| w.generation == current_gen && w.state.is_active() && !w.is_recycling())
            .map(|w| (w.id, w.pid))
            .collect();
        current.sort();
        if current.len() > self.target {
            for &(_, pid) in &current[..current.len() - self.target] {
                self.retire(pid, "scale down", cfg);
            }
        }

        self.retire_templates(cfg.preload);

        // Missing workers of the current generation.
        self.spawn_pending = false;
        if self.config_failed != Some(current_gen) {
            self.spawn_missing(now, ctx, ev);
        }

        // A recycled worker goes once its slot's replacement is booted, or once
        // the generation is at full strength without it (the target shrank).
        let booted: Vec<usize> = self
            .workers
            .iter()
            .filter(|w| {
                w.generation == current_gen
                    && matches!(w.state, State::Ready { .. })
                    && self.booted(w, now)
            })
            .map(|w| w.slot)
            .collect();
        let ready_current = booted.len();
        let replaced: Vec<Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation == current_gen && w.is_recycling())
            .filter(|w| ready_current >= self.target || booted.contains(&w.slot))
            .map(|w| w.pid)
            .collect();
        let recycling = self
            .workers
            .iter()
            .filter(|w| w.generation == current_gen && w.is_recycling())
            .count();
        for &pid in &replaced {
            self.retire(pid, "recycled, its replacement is ready", cfg);
        }

        // Older generations: the booting ones are useless, retire them now; keep
        // just enough ready ones to cover what the current generation lacks (a
        // worker still serving while it is recycled covers its slot).
        let mut others: Vec<(bool, u64, Pid)> = self
            .workers
            .iter()
            .filter(|w| w.generation != current_gen && w.state.is_active())
            .map(|w| (w.is_ready(), w.id, w.pid))
            .collect();
        others.sort();
        let keep = self
            .target
            .saturating_sub(ready_current + recycling - replaced.len());
        // Booting ones sort first (false < true) and cover nothing: all go.
        let booting = others.iter().filter(|o| !o.0).count();
        let surplus = others.len().saturating_sub(keep).max(booting);
        for &(_, _, pid) in &others[..surplus] {
            self.retire(pid, "replaced by a new generation", cfg);
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
