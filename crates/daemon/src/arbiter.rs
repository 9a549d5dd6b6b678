//! The master: its state and its loop, meant to be read top to bottom.
//!
//! One thread, one `poll`. Each turn: drain signals -> read exec statuses -> reap ->
//! check deadlines -> converge the worker table toward the target. The poll timeout
//! is the nearest deadline, so an idle master with nothing due sleeps.
//!
//! Signals and (later) control commands go through the same methods (`reload`,
//! `scale_to`, `begin_shutdown`), so `kill -HUP` and a control command cannot behave
//! differently.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use arbiter_proto::control::{ErrorKind, Reply, Request, Response};
use arbiter_proto::status as snapshot;
use arbiter_proto::worker as contract;

use crate::config::{self, Config, Loader, ReadyMode, WorkerProgram};
use crate::control::{ClientId, ControlServer, Interest, Peer, Restore};
use crate::daemonize::Report;
use crate::listeners::{self, Listener};
use crate::notify::{self, Message, NotifySocket, ServiceManager};
use crate::pidfile::Pidfile;
use crate::relay::{self, Relay};
use crate::signals::{self, SignalPipe};
use crate::spawn::{self, Plan, Prepared};
use crate::upgrade::{self, StartContext};
use crate::workers::{self, Heartbeat, State, Worker};
use crate::{critical, debug, error, info, warning};

/// The signals the master handles; everything else keeps its default.
pub const HANDLED_SIGNALS: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCHLD,
];

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
/// How long a new master may take to be ready, unless told otherwise.
const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an abandoned new master has to quit before KILL.
const ABANDON_GRACE: Duration = Duration::from_secs(10);
/// How long a quick shutdown (INT, QUIT) waits before KILL, at most.
const QUICK_GRACE: Duration = Duration::from_secs(2);
/// A worker that lived this long resets its slot's failure count.
const STABLE_PERIOD: Duration = Duration::from_secs(10);
/// Crash-loop backoff bounds.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// From this many failures in a row, a slot is reported as crash-looping.
const CRASH_LOOP_AFTER: u32 = 3;
/// A poll that returns this much later than its deadline (or a quarter of the
/// heartbeat timeout, if less), or a turn that takes this long between poll and
/// the deadline checks, means the master did not run: stopped, a paused VM, a
/// machine thrashing in swap. The workers most likely did not run either, so
/// their silence over that time is not held against them. The lateness is less
/// than the stall by however long the master meant to sleep anyway, hence the
/// bound tied to the timeout.
const STALL: Duration = Duration::from_secs(1);

struct Reload {
    /// The generation that keeps serving if this reload fails.
    from: u64,
    to: u64,
    started: Instant,
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
        generation: u64,
        reason: String,
        at: SystemTime,
    },
}

struct Shutdown {
    graceful: bool,
    deadline: Instant,
}

/// Crash-loop bookkeeping for one slot.
#[derive(Default)]
struct SlotHealth {
    failures: u32,
    not_before: Option<Instant>,
}

/// Everything `main` prepared for the master.
pub struct Setup {
    pub loader: Loader,
    pub cfg: Config,
    pub listeners: Vec<Listener>,
    pub pidfile: Option<Pidfile>,
    pub control: Option<ControlServer>,
    /// Who waits to hear that we serve: `-D`'s launcher, or an upgrading old master.
    pub report: Option<Report>,
    pub daemonized: bool,
    pub start: StartContext,
    /// When we are an upgrade: the old master's pid and the pipe whose EOF says it
    /// is gone.
    pub predecessor: Option<(i32, Option<std::os::fd::OwnedFd>)>,
}

/// An upgrade in flight, seen from the old master.
struct Upgrade {
    binary: PathBuf,
    /// `arbiterctl upgrade`: stop this master once the new one is ready. USR2: leave
    /// both running (the operator's WINCH/QUIT dance).
    handover: bool,
    deadline: Instant,
    waiters: Vec<ClientId>,
    stage: UpgradeStage,
    /// The pidfile was renamed to `.oldbin` and must come back if this fails.
    renamed_pidfile: bool,
}

enum UpgradeStage {
    /// `NEW --check-config ARGS`: does the new binary accept our configuration?
    Checking {
        pid: Pid,
        output: Option<std::os::fd::OwnedFd>,
        said: Vec<u8>,
    },
    /// The new master booting its first generation.
    Starting {
        pid: Pid,
        ready: Option<std::os::fd::OwnedFd>,
        said: Vec<u8>,
        /// Held open for the new master's life; its EOF promotes the new master.
        _alive: std::os::fd::OwnedFd,
    },
    /// The new master serves (after USR2, beside us).
    Running {
        pid: Pid,
        _alive: std::os::fd::OwnedFd,
    },
}

impl UpgradeStage {
    fn pid(&self) -> Pid {
        match self {
            UpgradeStage::Checking { pid, .. }
            | UpgradeStage::Starting { pid, .. }
            | UpgradeStage::Running { pid, .. } => *pid,
        }
    }
}

pub struct Arbiter {
    start: StartContext,
    /// The old master we replace, until it is gone and we are promoted.
    predecessor: Option<i32>,
    predecessor_pipe: Option<std::os::fd::OwnedFd>,
    upgrade: Option<Upgrade>,
    /// A new master took over from us (or runs beside us): never unlink what it
    /// shares with us (unix socket files, the control socket path).
    successor: Option<Pid>,
    /// Control clients told "upgraded" just before we exit.
    upgrade_waiters: Vec<ClientId>,
    /// A failed new master asked to quit; KILL it at the deadline.
    abandoned_master: Option<(Pid, Instant)>,
    upgrades: u64,
    /// Rebuilds the configuration on reload (command line over file over defaults).
    loader: Loader,
    cfg: Config,
    listeners: Vec<Listener>,
    signals: SignalPipe,
    pidfile: Option<Pidfile>,
    master_pid: Pid,
    /// The environment every worker starts from (the master's, less what is ours).
    base_env: Vec<Vec<u8>>,
    heartbeat_dir: PathBuf,

    workers: Vec<Worker>,
    /// Workers' stdout/stderr pipes, until EOF.
    relays: Vec<Relay>,
    /// How many workers of the current generation we want.
    target: usize,
    /// The generation new workers belong to.
    generation: u64,
    /// The highest generation number handed out so far.
    last_generation: u64,
    next_worker_id: u64,
    reload: Option<Reload>,
    last_reload: Option<ReloadOutcome>,
    shutdown: Option<Shutdown>,
    exit_status: u8,
    exit_reason: Option<String>,
    /// The first generation was fully ready once: exit 3/4 no longer halts.
    served: bool,
    /// Heartbeat silence before this instant is not counted (see `forgive_stall`).
    silence_counted_from: Instant,
    slots: HashMap<usize, SlotHealth>,
    /// A worker of this generation exited with EX_CONFIG: spawn none until it changes.
    config_failed: Option<u64>,
    fork_failures: u32,
    fork_not_before: Option<Instant>,
    /// `--max-worker-rss`: when to read the workers' RSS next.
    next_rss_check: Option<Instant>,
    /// More workers to start than one turn starts: come back at once.
    spawn_pending: bool,

    control: Option<ControlServer>,
    notify: NotifySocket,
    /// `-D`: the launcher waiting to hear that we serve.
    report: Option<Report>,
    daemonized: bool,
    /// systemd, when it started us with `NOTIFY_SOCKET`.
    manager: Option<ServiceManager>,
    manager_watchdog_at: Option<Instant>,
    /// The last `STATUS=` sent to the manager, to send only changes.
    manager_status: String,
    /// How a worker proves it is ready (`--ready`, or the program's default).
    ready_mode: ReadyMode,
    /// Control clients waiting for the current reload's outcome.
    reload_waiters: Vec<ClientId>,
    /// Control clients waiting for the master to exit.
    stop_waiters: Vec<ClientId>,
    started: Instant,
    started_wall: SystemTime,
    reloads: u64,
    worker_failures: u64,
    workers_spawned: u64,
}

/// What woke the poll, one entry per polled fd.
enum Token {
    Signals,
    Exec(Pid),
    Relay(u64),
    Notify,
    /// The upgrade checker's output, or the new master's ready pipe.
    Upgrade,
    /// EOF: the old master is gone.
    Predecessor,
    Control(Interest),
}

impl Arbiter {
    pub fn new(setup: Setup) -> Result<Arbiter, (std::io::Error, Option<Report>)> {
        let Setup {
            loader,
            cfg,
            listeners,
            pidfile,
            control,
            report,
            daemonized,
            start,
            predecessor,
        } = setup;
        let master_pid = nix::unistd::getpid();
        let (signals, notify) = match SignalPipe::install(HANDLED_SIGNALS)
            .and_then(|s| Ok((s, NotifySocket::bind(master_pid.as_raw(), &cfg.name)?)))
        {
            Ok(both) => both,
            Err(e) => return Err((e, report)),
        };
        let manager = ServiceManager::from_env();
        let manager_watchdog_at = manager
            .as_ref()
            .and_then(|m| m.watchdog_interval)
            .map(|i| Instant::now() + i);
        // The built-in worker says READY=1 once it accepts, so wait for that; a
        // COMMAND is ready once exec'd unless told otherwise.
        let ready_mode = ready_mode(&cfg);
        // Orphans of our workers' own children come back to us, to be reaped silently,
        // instead of going to init with nobody watching them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !is_reserved_env(k))
            .map(|(k, v)| {
                let mut e = k.into_vec();
                e.push(b'=');
                e.extend_from_slice(v.as_bytes());
                e
            })
            .collect();
        let (predecessor, predecessor_pipe) = match predecessor {
            Some((pid, pipe)) => (Some(pid), pipe),
            None => (None, None),
        };
        Ok(Arbiter {
            start,
            predecessor,
            predecessor_pipe,
            upgrade: None,
            successor: None,
            upgrade_waiters: Vec::new(),
            abandoned_master: None,
            upgrades: 0,
            loader,
            target: cfg.workers,
            cfg,
            listeners,
            signals,
            pidfile,
            master_pid,
            base_env,
            heartbeat_dir: workers::heartbeat_dir(),
            workers: Vec::new(),
            relays: Vec::new(),
            generation: 1,
            last_generation: 1,
            next_worker_id: 1,
            reload: None,
            last_reload: None,
            shutdown: None,
            exit_status: 0,
            exit_reason: None,
            served: false,
            silence_counted_from: Instant::now(),
            slots: HashMap::new(),
            config_failed: None,
            fork_failures: 0,
            fork_not_before: None,
            next_rss_check: None,
            spawn_pending: false,
            control,
            notify,
            manager,
            manager_watchdog_at,
            manager_status: String::new(),
            report,
            daemonized,
            ready_mode,
            reload_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            started: Instant::now(),
            started_wall: SystemTime::now(),
            reloads: 0,
            worker_failures: 0,
            workers_spawned: 0,
        })
    }

    /// Run until shut down; returns the exit status.
    pub fn run(mut self) -> u8 {
        info!("Starting arbiter {}", env!("CARGO_PKG_VERSION"));
        let shown: Vec<&str> = self.listeners.iter().map(|l| l.display.as_str()).collect();
        info!("Listening at: {} ({})", shown.join(", "), self.master_pid);
        info!("Using worker: {}", self.worker_description());
        if let WorkerProgram::Command { argv, .. } = &self.cfg.program {
            // Arguments may carry secrets: only at debug level.
            debug!("Worker command line: {argv:?}");
        }
        if let Some(c) = &self.control {
            info!("Control socket at {}", c.path().display());
        }
        self.converge(Instant::now());
        loop {
            if self.shutdown.is_some() && self.workers.is_empty() {
                break;
            }
            let (due, woke) = self.wait_for_events();
            let now = Instant::now();
            // Before anything is judged on time: time the master did not run, past
            // its deadline while it slept, or while it handled this turn's events.
            let lost = now.saturating_duration_since(due.map_or(woke, |d| d.min(woke)));
            if lost > self.stall_threshold() {
                self.forgive_stall(lost, now);
            }
            self.reap(now);
            self.check_deadlines(now);
            self.check_limits(now);
            self.converge(now);
            self.serve_pipelined(now);
        }
        self.finish()
    }

    fn worker_description(&self) -> String {
        match &self.cfg.program {
            WorkerProgram::Builtin => "builtin (HTTP)".to_string(),
            WorkerProgram::Command { path, .. } => path.display().to_string(),
        }
    }

    // ---------------------------------------------------------------- the poll

    /// Sleep until a signal, an exec status, a control client, or the nearest
    /// deadline, and handle what woke us. Returns the deadline it slept toward and
    /// when poll returned.
    fn wait_for_events(&mut self) -> (Option<Instant>, Instant) {
        let due = self.next_deadline();
        let timeout = poll_timeout(due, Instant::now());
        let woke: Vec<Token> = {
            let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
            let mut tokens = vec![Token::Signals];
            fds.push(PollFd::new(self.notify.fd(), PollFlags::POLLIN));
            tokens.push(Token::Notify);
            for r in &self.relays {
                fds.push(PollFd::new(r.fd(), PollFlags::POLLIN));
                tokens.push(Token::Relay(r.worker_id));
            }
            if let Some(fd) = self.upgrade.as_ref().and_then(|u| match &u.stage {
                UpgradeStage::Checking { output, .. } => output.as_ref(),
                UpgradeStage::Starting { ready, .. } => ready.as_ref(),
                UpgradeStage::Running { .. } => None,
            }) {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                tokens.push(Token::Upgrade);
            }
            if let Some(fd) = &self.predecessor_pipe {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                tokens.push(Token::Predecessor);
            }
            for w in &self.workers {
                if let Some(fd) = &w.exec_status {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    tokens.push(Token::Exec(w.pid));
                }
            }
            if let Some(control) = &self.control {
                for (fd, read, write, interest) in control.interests() {
                    let mut flags = PollFlags::empty();
                    flags.set(PollFlags::POLLIN, read);
                    flags.set(PollFlags::POLLOUT, write);
                    fds.push(PollFd::new(fd, flags));
                    tokens.push(Token::Control(interest));
                }
            }
            match poll(&mut fds, timeout) {
                Ok(_) => fds
                    .iter()
                    .zip(tokens)
                    .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(_, t)| t)
                    .collect(),
                // Every signal interrupts poll (SA_RESTART does not apply to it); the
                // record waits in the pipe for the next turn.
                Err(nix::errno::Errno::EINTR) => Vec::new(),
                Err(e) => {
                    critical!("poll failed: {e}");
                    Vec::new()
                }
            }
        };
        let now = Instant::now();
        let mut requests = Vec::new();
        for token in woke {
            match token {
                Token::Signals => {
                    for (sig, sender) in self.signals.drain_with_sender() {
                        self.handle_signal(sig, sender);
                    }
                }
                Token::Exec(pid) => self.on_exec_status(pid),
                Token::Relay(id) => {
                    if let Some(i) = self.relays.iter().position(|r| r.worker_id == id)
                        && !self.relays[i].pump(now)
                    {
                        self.relays.swap_remove(i);
                    }
                }
                Token::Upgrade => self.on_upgrade_pipe(now),
                Token::Predecessor => self.promote(),
                Token::Notify => {
                    for (sender, messages) in self.notify.receive() {
                        self.on_notify(sender, messages, now);
                    }
                }
                Token::Control(Interest::Watch) => {
                    if let Some(c) = &mut self.control {
                        c.on_watch(now);
                    }
                }
                Token::Control(Interest::Listener) => {
                    if let Some(c) = &mut self.control {
                        c.accept(now);
                    }
                }
                Token::Control(Interest::Client(id)) => {
                    if let Some(c) = &mut self.control {
                        c.write(id);
                        requests.extend(c.read(id, now));
                    }
                }
            }
        }
        for (id, peer, req) in requests {
            self.handle_request(id, peer, req);
        }
        self.serve_pipelined(now);
        (due, now)
    }

    /// Requests a client pipelined behind one that has just been answered (here or
    /// by a reload completing): their bytes are already read, so no poll will
    /// report them.
    fn serve_pipelined(&mut self, now: Instant) {
        loop {
            let requests = match &mut self.control {
                Some(c) => c.pending_requests(now),
                None => return,
            };
            if requests.is_empty() {
                return;
            }
            for (id, peer, req) in requests {
                self.handle_request(id, peer, req);
            }
        }
    }

    /// The earliest moment something is due: a graceful-stop deadline, a heartbeat
    /// expiry, a boot timeout, a spawn backoff. `None`: nothing is due, sleep.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        if self.spawn_pending && self.shutdown.is_none() {
            return Some(Instant::now());
        }
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(s) = &self.shutdown {
            at(s.deadline);
        }
        if let Some(t) = self.control.as_ref().and_then(|c| c.next_deadline()) {
            at(t);
        }
        if let Some(t) = self.manager_watchdog_at {
            at(t);
        }
        if let Some(u) = &self.upgrade
            && !matches!(u.stage, UpgradeStage::Running { .. })
        {
            at(u.deadline);
        }
        if let Some((_, t)) = self.abandoned_master {
            at(t);
        }
        if self.cfg.max_worker_rss.is_some() {
            at(self.next_rss_check.unwrap_or_else(Instant::now));
        }
        if let Some(age) = self.cfg.max_worker_age {
            for w in self.workers.iter().filter(|w| w.is_ready() && !w.recycle) {
                at(w.started + age + age_jitter(w.id, age));
            }
        }
        for w in &self.workers {
            match w.state {
                State::Stopping { deadline } | State::Aborted { deadline } => at(deadline),
                State::Booting => {
                    at(boot_deadline(w, self.cfg.boot_timeout));
                    self.heartbeat_deadline(w).map(&mut at);
                }
                State::Ready { since } => {
                    self.heartbeat_deadline(w).map(&mut at);
                    if self.ready_mode == ReadyMode::Exec
                        && (!self.served || self.reload.is_some())
                        && w.generation == self.generation
                    {
                        let settled = since + EXEC_SETTLE;
                        if settled > Instant::now() {
                            at(settled);
                        }
                    }
                }
                State::Killed => {}
            }
        }
        if self.shutdown.is_none() && self.active_in_generation() < self.target {
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

    /// Past this, time the master was not running counts as a stall (see [`STALL`]).
    fn stall_threshold(&self) -> Duration {
        self.cfg.timeout.map_or(STALL, |t| STALL.min(t / 4))
    }

    /// The master woke `late` after its deadline: heartbeat silence is counted
    /// again from now, so a stall of the whole machine does not time out every
    /// worker at once (gunicorn's master does exactly that after a VM pause). A
    /// worker really hung is still timed out, one `--timeout` later.
    fn forgive_stall(&mut self, late: Duration, now: Instant) {
        let Some(timeout) = self.cfg.timeout else {
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

    /// When the worker's heartbeat must next be looked at.
    fn heartbeat_deadline(&self, w: &Worker) -> Option<Instant> {
        let timeout = self.cfg.timeout?;
        Some(match silent_since(w, self.silence_counted_from) {
            Some(beat) => (beat + timeout).max(w.extended_until.unwrap_or(beat)),
            // Not beating yet: never killed for that, but looked at now and then to
            // notice the first beat.
            None => w.heartbeat.last_check() + probe_interval(timeout),
        })
    }

    // ---------------------------------------------------------------- signals

    fn handle_signal(&mut self, sig: Signal, sender: Option<signals::Sender>) {
        if sig == Signal::SIGCHLD {
            debug!("Handling signal: chld");
            return;
        }
        info!(
            "Handling signal: {}",
            signals::short_name(sig).to_ascii_lowercase()
        );
        let lifecycle = matches!(
            sig,
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT | Signal::SIGHUP
        );
        if let Some(sender) = sender.filter(|_| lifecycle)
            && let Some(worker_pid) = self.worker_owning(sender.pid).or_else(|| {
                // Each worker leads its own group: a sender in one is that worker's.
                let group = sender.group?;
                self.workers
                    .iter()
                    .find(|w| w.pid.as_raw() == group)
                    .map(|w| w.pid)
            })
        {
            // Some libraries signal their parent; a worker must not stop or reload
            // the whole service that way.
            warning!(
                "Ignoring SIG{} sent by worker (pid:{worker_pid}) (sender pid:{})",
                signals::short_name(sig),
                sender.pid
            );
            return;
        }
        match sig {
            Signal::SIGHUP => {
                info!("Hang up: Master");
                let _ = self.reload();
            }
            Signal::SIGTERM => self.begin_shutdown(true),
            Signal::SIGINT | Signal::SIGQUIT => self.begin_shutdown(false),
            Signal::SIGTTIN => self.scale_to(self.target.saturating_add(1)),
            Signal::SIGTTOU => {
                if self.target <= 1 {
                    info!("SIGTTOU ignored: already at 1 worker");
                } else {
                    self.scale_to(self.target - 1);
                }
            }
            Signal::SIGUSR1 => self.reopen_logs(),
            Signal::SIGUSR2 => {
                if let Err(e) = self.begin_upgrade(None, DEFAULT_UPGRADE_TIMEOUT, false) {
                    warning!("USR2 signal ignored. {e}");
                }
            }
            Signal::SIGWINCH if self.daemonized => {
                // The upgrade dance: the old master keeps its listeners and pidfile
                // but hands all traffic to the new one. HUP or a scale brings
                // workers back.
                info!("graceful stop of workers");
                self.target = 0;
            }
            Signal::SIGWINCH => info!("SIGWINCH ignored. Not daemonized"),
            _ => {}
        }
    }

    /// The worker whose process (or process group) `pid` belongs to, if any.
    fn worker_owning(&self, pid: i32) -> Option<Pid> {
        if let Some(w) = self.workers.iter().find(|w| w.pid.as_raw() == pid) {
            return Some(w.pid);
        }
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok()?;
        self.workers.iter().find(|w| w.pid == pgid).map(|w| w.pid)
    }

    // ---------------------------------------------------------------- commands

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
        if self.predecessor.is_none()
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
                self.last_reload = Some(ReloadOutcome::Failed {
                    generation: self.generation,
                    reason: e.clone(),
                    at: SystemTime::now(),
                });
                return Err(e);
            }
        };
        if self.target == 0 {
            // After WINCH: a reload brings the configured count back, as in gunicorn.
            self.target = self.cfg.workers;
        }
        self.last_generation += 1;
        self.reloads += 1;
        let to = self.last_generation;
        let (from, previous) = match self.reload.take() {
            // A reload during a reload: the newest wins, and the generation that was
            // serving before either keeps serving if it fails.
            Some(r) => {
                let previous = match (r.previous, changed) {
                    (Some(mut first), Some(now)) => {
                        // The in-between configuration is dropped; keep the first
                        // one's listeners to go back to, close the in-between ones.
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
                };
                (r.from, previous)
            }
            None => (self.generation, changed),
        };
        info!("Reloading: generation {} -> {to}", self.generation);
        self.generation = to;
        self.config_failed = None;
        self.slots.clear();
        self.reload = Some(Reload {
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

    /// Re-read the config file (if any) and switch to it. Returns what it replaced.
    fn apply_new_config(&mut self) -> Result<Option<Previous>, String> {
        if self.loader.config_path().is_none() {
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
            let has_systemd = self.listeners.iter().any(|l| l.spec.is_none());
            let use_specs = !has_systemd || !new.default_bind;
            Some(
                listeners::rebind(&self.listeners, &new.binds, use_specs, &opts)
                    .map_err(|e| e.to_string())?,
            )
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
        if changes.is_empty() {
            info!(
                "Config file {} unchanged",
                self.loader
                    .config_path()
                    .map_or(String::new(), |p| p.display().to_string())
            );
        }
        let previous_target = self.target;
        if new.workers != self.cfg.workers {
            // An explicit new count wins; otherwise TTIN/TTOU scaling survives.
            self.target = new.workers;
        }
        // Keep what cannot change without a restart.
        let mut new = new;
        new.name = self.cfg.name.clone();
        new.pidfile = self.cfg.pidfile.clone();
        new.control = self.cfg.control.clone();
        new.daemon = self.cfg.daemon;
        self.ready_mode = ready_mode(&new);
        let cfg = std::mem::replace(&mut self.cfg, new);
        let listeners = listeners.map(|l| std::mem::replace(&mut self.listeners, l));
        if listeners.is_some() {
            let shown: Vec<&str> = self.listeners.iter().map(|l| l.display.as_str()).collect();
            info!("Listening at: {} ({})", shown.join(", "), self.master_pid);
        }
        Ok(Some(Previous {
            cfg,
            target: previous_target,
            listeners,
        }))
    }

    pub fn scale_to(&mut self, n: usize) {
        if self.shutdown.is_some() {
            info!("Scale ignored: shutting down");
            return;
        }
        let n = n.max(1);
        if n != self.target {
            info!("workers {} -> {n}", self.target);
        }
        self.target = n;
        self.config_failed = None;
    }

    pub fn begin_shutdown(&mut self, graceful: bool) {
        let now = Instant::now();
        match &mut self.shutdown {
            Some(s) if graceful || !s.graceful => {
                info!("Already shutting down");
                return;
            }
            Some(s) => {
                info!("Quick shutdown requested");
                s.graceful = false;
                s.deadline = s.deadline.min(now + QUICK_GRACE);
            }
            None => {
                if self.reload.take().is_some() {
                    self.reply_reload_waiters(Response::err(
                        ErrorKind::Refused,
                        "the master is shutting down; the reload was abandoned",
                    ));
                }
                let wait = if graceful {
                    self.cfg.graceful_timeout
                } else {
                    self.cfg.graceful_timeout.min(QUICK_GRACE)
                };
                self.shutdown = Some(Shutdown {
                    graceful,
                    deadline: now + wait,
                });
                self.tell_manager("STOPPING=1");
                // New connections now wait in the backlog of the workers' copies
                // until those close; the unix socket path goes away at once, unless
                // a new master serves on it.
                self.release_listeners();
            }
        }
        let deadline = self.shutdown.as_ref().map_or(now, |s| s.deadline);
        let sig = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGQUIT
        };
        for w in &mut self.workers {
            match w.state {
                State::Killed => {}
                State::Stopping { .. } | State::Aborted { .. } if graceful => {}
                _ => w.stop(sig, deadline),
            }
        }
    }

    fn halt(&mut self, status: u8, reason: &str) {
        error!("{reason} Halting with status {status}");
        self.exit_status = status;
        self.exit_reason = Some(reason.to_string());
        self.begin_shutdown(true);
    }

    fn reopen_logs(&mut self) {
        match crate::log::reopen() {
            Ok(()) => info!("Reopened the log file"),
            Err(e) => error!("Cannot reopen the log file: {e}"),
        }
    }

    // ---------------------------------------------------------------- control

    fn handle_request(&mut self, id: ClientId, peer: Peer, req: Request) {
        if req.is_mutating() {
            info!(
                "Control: {} requested by uid {} pid {}",
                request_name(&req),
                peer.uid,
                peer.pid
            );
        }
        let resp = match req {
            Request::Status => {
                // The master reads heartbeat files only near a deadline; a status
                // shows the real last beat.
                let now = Instant::now();
                for w in &mut self.workers {
                    w.heartbeat.check(now);
                }
                Response::ok(Reply::Status(Box::new(self.snapshot())))
            }
            Request::Ping => Response::ok(Reply::Pong {
                pid: self.master_pid.as_raw(),
                name: self.cfg.name.clone(),
            }),
            Request::Version => Response::ok(Reply::Version {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: arbiter_proto::control::PROTOCOL_VERSION,
            }),
            Request::Scale { by, to } => self.scale_request(by, to),
            Request::Reopen => match crate::log::reopen() {
                Ok(()) => {
                    info!("Reopened the log file");
                    // The open can succeed on a disk that is still full: the line
                    // just written says whether the log takes lines again, and a
                    // logrotate postrotate or a cron job should hear it if not.
                    match crate::log::health().1 {
                        None => Response::ok(Reply::Reopened),
                        Some(e) => Response::err(
                            ErrorKind::Failed,
                            format!("reopened the log file, but it refuses lines: {e}"),
                        ),
                    }
                }
                Err(e) => Response::err(
                    ErrorKind::Failed,
                    format!("cannot reopen the log file: {e}"),
                ),
            },
            Request::Kill { pid, signal } => self.kill_request(pid, signal.as_deref()),
            Request::Reload => match self.reload() {
                Ok(()) => {
                    self.reload_waiters.push(id);
                    return;
                }
                Err(e) if self.shutdown.is_some() => Response::err(ErrorKind::Refused, e),
                Err(e) => Response::err(ErrorKind::Failed, format!("reload failed: {e}")),
            },
            Request::Upgrade {
                binary,
                timeout_secs,
            } => {
                let timeout = timeout_secs.map_or(DEFAULT_UPGRADE_TIMEOUT, Duration::from_secs);
                match self.begin_upgrade(binary.map(PathBuf::from), timeout, true) {
                    Ok(()) => {
                        if let Some(u) = &mut self.upgrade {
                            u.waiters.push(id);
                        }
                        return;
                    }
                    Err(e) => Response::err(ErrorKind::Refused, e),
                }
            }
            Request::Stop { fast } => {
                self.begin_shutdown(!fast);
                self.stop_waiters.push(id);
                return;
            }
        };
        self.reply(id, &resp);
    }

    fn reply(&mut self, id: ClientId, resp: &Response) {
        if let Some(c) = &mut self.control {
            c.reply(id, resp);
        }
    }

    /// Tell everyone waiting on the reload how it ended.
    fn reply_reload_waiters(&mut self, resp: Response) {
        for id in std::mem::take(&mut self.reload_waiters) {
            self.reply(id, &resp);
        }
    }

    fn scale_request(&mut self, by: Option<i64>, to: Option<u64>) -> Response {
        if self.shutdown.is_some() {
            return Response::err(ErrorKind::Refused, "the master is shutting down");
        }
        let from = self.target as i64;
        let wanted = match (by, to) {
            (Some(by), None) => from.saturating_add(by),
            (None, Some(to)) => to.min(i64::MAX as u64) as i64,
            _ => {
                return Response::err(
                    ErrorKind::BadRequest,
                    "scale takes exactly one of \"by\" or \"to\"",
                );
            }
        };
        // Never below 1, as TTOU; the master owns the clamp.
        let n = wanted.clamp(1, MAX_WORKERS as i64) as usize;
        self.scale_to(n);
        Response::ok(Reply::Scaled {
            from: from as u64,
            to: n as u64,
        })
    }

    fn kill_request(&mut self, pid: i32, signal: Option<&str>) -> Response {
        let sig = match signal.map(parse_signal).unwrap_or(Some(Signal::SIGTERM)) {
            Some(sig) => sig,
            None => {
                return Response::err(
                    ErrorKind::BadRequest,
                    format!("unknown signal {:?}", signal.unwrap_or_default()),
                );
            }
        };
        let deadline = Instant::now() + self.cfg.graceful_timeout;
        let Some(w) = self.workers.iter_mut().find(|w| w.pid.as_raw() == pid) else {
            return Response::err(ErrorKind::Refused, format!("no worker with pid {pid}"));
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
            _ => {
                if let Err(e) = w.signal(sig) {
                    return Response::err(ErrorKind::Failed, format!("kill {pid}: {e}"));
                }
            }
        }
        Response::ok(Reply::Killed {
            pid,
            signal: signals::short_name(sig).to_string(),
        })
    }

    /// The status snapshot, measured now on the master's clocks.
    fn snapshot(&self) -> snapshot::Status {
        let now = Instant::now();
        let rfc3339 = |t: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let ready = self
            .workers
            .iter()
            .filter(|w| w.generation == self.generation && w.is_ready())
            .count();
        let workers = self
            .workers
            .iter()
            .map(|w| {
                let health = self
                    .slots
                    .get(&w.slot)
                    .filter(|_| w.generation == self.generation);
                let failures = health.map_or(0, |h| h.failures);
                snapshot::WorkerStatus {
                    id: w.id,
                    slot: w.slot as u64,
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    state: match w.state {
                        _ if w.recycle && w.state.is_active() => snapshot::WorkerState::Recycling,
                        State::Booting => snapshot::WorkerState::Booting,
                        State::Ready { .. } => snapshot::WorkerState::Ready,
                        State::Stopping { .. } => snapshot::WorkerState::Stopping,
                        State::Aborted { .. } => snapshot::WorkerState::Aborted,
                        State::Killed => snapshot::WorkerState::Killed,
                    },
                    started_at: rfc3339(w.started_wall),
                    uptime_secs: now.saturating_duration_since(w.started).as_secs_f64(),
                    last_beat_secs: w
                        .heartbeat
                        .last_beat
                        .map(|b| now.saturating_duration_since(b).as_secs_f64()),
                    status_text: w.status_text.clone(),
                    restarts: u64::from(failures),
                    crash_looping: failures >= CRASH_LOOP_AFTER,
                    rss_bytes: w.rss_bytes(),
                }
            })
            .collect();
        let last_reload = self.last_reload.as_ref().map(|r| match r {
            ReloadOutcome::Succeeded {
                generation,
                took,
                at,
            } => snapshot::ReloadOutcome {
                generation: *generation,
                ok: true,
                message: format!("succeeded in {:.2}s", took.as_secs_f64()),
                at: rfc3339(*at),
            },
            ReloadOutcome::Failed {
                generation,
                reason,
                at,
            } => snapshot::ReloadOutcome {
                generation: *generation,
                ok: false,
                message: reason.clone(),
                at: rfc3339(*at),
            },
        });
        snapshot::Status {
            master: snapshot::MasterStatus {
                pid: self.master_pid.as_raw(),
                name: self.cfg.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: rfc3339(self.started_wall),
                uptime_secs: now.saturating_duration_since(self.started).as_secs_f64(),
                state: if self.shutdown.is_some() {
                    "stopping"
                } else {
                    "running"
                }
                .to_string(),
                generation: self.generation,
                target: self.target as u64,
                ready: ready as u64,
                total: self.workers.len() as u64,
                listeners: self
                    .listeners
                    .iter()
                    .map(|l| snapshot::ListenerStatus {
                        address: l.display.clone(),
                        name: l.name.clone(),
                    })
                    .collect(),
                reload: self.reload.as_ref().map(|r| snapshot::ReloadInFlight {
                    from_generation: r.from,
                    to_generation: r.to,
                    elapsed_secs: now.saturating_duration_since(r.started).as_secs_f64(),
                }),
                last_reload,
                upgrade: self.upgrade_description(),
                reloads: self.reloads,
                upgrades: self.upgrades,
                worker_failures: self.worker_failures,
                workers_spawned: self.workers_spawned,
                log: {
                    let (lines_dropped, failing) = crate::log::health();
                    snapshot::LogStatus {
                        lines_dropped,
                        failing,
                    }
                },
                timeout_secs: self.cfg.timeout.map(|t| t.as_secs_f64()),
                backoff: {
                    let mut b: Vec<snapshot::SlotBackoff> = self
                        .slots
                        .iter()
                        .filter(|(_, h)| h.failures > 0)
                        .map(|(&slot, h)| snapshot::SlotBackoff {
                            slot: slot as u64,
                            failures: u64::from(h.failures),
                            next_start_secs: h
                                .not_before
                                .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64()),
                        })
                        .collect();
                    b.sort_by_key(|x| x.slot);
                    b
                },
            },
            workers,
        }
    }

    // ---------------------------------------------------------------- workers

    /// What a worker said on NOTIFY_SOCKET. `sender` is the kernel-checked pid.
    fn on_notify(&mut self, sender: i32, messages: Vec<Message>, now: Instant) {
        let Some(owner) = self.worker_owning(sender) else {
            debug!("Dropped a notify datagram from pid {sender}: not one of our workers");
            return;
        };
        let graceful = self.cfg.graceful_timeout;
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
                        deadline: now + graceful,
                    };
                }
                Message::Stopping => {}
                Message::ExtendTimeout(by) => {
                    w.extended_until = Some(now + by);
                }
            }
        }
    }

    fn on_exec_status(&mut self, pid: Pid) {
        let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return;
        };
        let Some(fd) = &w.exec_status else { return };
        match spawn::read_status(fd) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Ok(None) | Err(_) => {
                if self.ready_mode == ReadyMode::Exec && w.state == State::Booting {
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
        w.exec_status = None;
    }

    /// Collect every exited child: one SIGCHLD may stand for many exits, and a lost
    /// wakeup must not leave a zombie, so this runs every turn.
    fn reap(&mut self, now: Instant) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid, Death::Code(code), now),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.on_exit(pid, Death::Signal(sig), now),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, death: Death, now: Instant) {
        if self.upgrade.as_ref().is_some_and(|u| u.stage.pid() == pid) {
            self.on_upgrade_child_exit(death);
            return;
        }
        if self.successor == Some(pid) {
            error!("The new master (pid:{pid}) {}", death.describe());
            self.successor = None;
            if self.shutdown.is_none() {
                // A rollback: we are systemd's main process again.
                self.tell_manager(&format!("MAINPID={}\nREADY=1", self.master_pid));
            }
            return;
        }
        if self.abandoned_master.is_some_and(|(p, _)| p == pid) {
            self.abandoned_master = None;
            info!("The abandoned new master (pid:{pid}) {}", death.describe());
            return;
        }
        let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
            // An orphan that came to us as subreaper, or a child of something else.
            debug!("Reaped unknown child process (pid:{pid})");
            return;
        };
        let w = self.workers.remove(idx);
        let was_ready = self.booted(&w, now);
        log_death(&w, death);
        if w.retiring {
            // Asked to stop (or said STOPPING=1): not a failure. A clean exit after
            // serving also proves the slot healthy again.
            if was_ready && matches!(death, Death::Code(0)) && w.generation == self.generation {
                self.slots.remove(&w.slot);
            }
            return;
        }
        let failed = !was_ready || !matches!(death, Death::Code(0));
        if failed {
            self.worker_failures += 1;
        }
        if let Death::Code(code @ (contract::EXIT_BOOT_ERROR | contract::EXIT_APP_LOAD_ERROR)) =
            death
            && !self.served
            && self.shutdown.is_none()
        {
            let reason = if code == contract::EXIT_BOOT_ERROR {
                "Worker failed to boot."
            } else {
                "App failed to load."
            };
            self.halt(code as u8, reason);
            return;
        }
        if let Some(r) = &self.reload
            && w.generation == r.to
            && !was_ready
        {
            let reason = format!(
                "worker (pid:{pid}) {} before it was ready",
                death.describe()
            );
            self.abandon_reload(reason);
            return;
        }
        if matches!(death, Death::Code(contract::EXIT_CONFIG)) && w.generation == self.generation {
            error!(
                "Worker (pid:{pid}) exited with code 78 (configuration error): not restarting generation {} until a reload or a scale",
                w.generation
            );
            self.config_failed = Some(w.generation);
            return;
        }
        if w.generation != self.generation {
            return;
        }
        let health = self.slots.entry(w.slot).or_default();
        if !failed {
            health.failures = 0;
            health.not_before = None;
            return;
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
    }

    fn abandon_reload(&mut self, reason: String) {
        let Some(r) = self.reload.take() else { return };
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
        self.last_reload = Some(ReloadOutcome::Failed {
            generation: r.to,
            reason,
            at: SystemTime::now(),
        });
        // The new generation's workers become "other" workers: the booting ones are
        // retired at once, the ready ones as the old generation is back to strength.
        self.generation = r.from;
        self.slots.clear();
        if let Some(prev) = r.previous {
            info!("Going back to the configuration of generation {}", r.from);
            self.target = prev.target;
            self.ready_mode = ready_mode(&prev.cfg);
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

    /// Timeouts: boot, heartbeat, graceful stop, shutdown.
    fn check_deadlines(&mut self, now: Instant) {
        if let Some(c) = &mut self.control {
            c.expire(now);
            match c.restore(now) {
                Some(Restore::Rebound) => warning!(
                    "Control socket {} was removed; bound a new one",
                    c.path().display()
                ),
                Some(Restore::Failed(e, retry)) => error!(
                    "Control socket was removed and cannot be recreated: {e}; retrying in {:.0}s",
                    retry.as_secs_f64()
                ),
                None => {}
            }
        }
        if self
            .upgrade
            .as_ref()
            .is_some_and(|u| !matches!(u.stage, UpgradeStage::Running { .. }) && now >= u.deadline)
        {
            self.upgrade_failed("the new master was not ready in time".into());
        }
        if let Some((pid, t)) = self.abandoned_master
            && now >= t
        {
            warning!("The abandoned new master (pid:{pid}) did not exit; sending SIGKILL");
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            self.abandoned_master = None;
        }
        if let (Some(m), Some(t)) = (&self.manager, self.manager_watchdog_at)
            && now >= t
            && self.successor.is_none()
        {
            m.send("WATCHDOG=1");
            self.manager_watchdog_at = m.watchdog_interval.map(|i| now + i);
        }
        let timeout = self.cfg.timeout;
        let boot_timeout = self.cfg.boot_timeout;
        let counted_from = self.silence_counted_from;
        for w in &mut self.workers {
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
                State::Booting if now >= boot_deadline(w, boot_timeout) => {
                    error!(
                        "Worker (pid:{}) not ready after {:.1}s (--boot-timeout); killing it",
                        w.pid,
                        boot_timeout.as_secs_f64()
                    );
                    let _ = w.signal(Signal::SIGKILL);
                    w.state = State::Killed;
                }
                State::Booting | State::Ready { .. } => {
                    let Some(timeout) = timeout else { continue };
                    if w.extended_until.is_some_and(|t| now < t) {
                        continue;
                    }
                    // Look early at files that are nearly due: one wakeup then serves
                    // many workers instead of one wakeup each. Killing still needs
                    // the full timeout of silence (checked below).
                    let slack = timeout / 4;
                    let due = match silent_since(w, counted_from) {
                        Some(beat) => now + slack >= beat + timeout,
                        None => now + slack >= w.heartbeat.last_check() + probe_interval(timeout),
                    };
                    if !due {
                        continue;
                    }
                    w.heartbeat.check(now);
                    if let Some(beat) = silent_since(w, counted_from)
                        && now >= beat + timeout
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
        if let Some(s) = &self.shutdown
            && now >= s.deadline
        {
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
    }

    /// Ready, and past the point where dying counts as failing to boot.
    fn booted(&self, w: &Worker, now: Instant) -> bool {
        match (w.ready_at, self.ready_mode) {
            (None, _) => false,
            (Some(_), ReadyMode::Notify) => true,
            (Some(t), ReadyMode::Exec) => now.saturating_duration_since(t) >= EXEC_SETTLE,
        }
    }

    fn active_in_generation(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == self.generation && w.state.is_active() && !w.recycle)
            .count()
    }

    /// Mark workers past `--max-worker-age` or `--max-worker-rss` for recycling.
    fn check_limits(&mut self, now: Instant) {
        let (max_age, max_rss) = (self.cfg.max_worker_age, self.cfg.max_worker_rss);
        if max_age.is_none() && max_rss.is_none() {
            return;
        }
        let check_rss = max_rss.is_some() && self.next_rss_check.is_none_or(|t| now >= t);
        if check_rss {
            self.next_rss_check = Some(now + RSS_CHECK_INTERVAL);
        }
        for w in &mut self.workers {
            if w.recycle || !w.is_ready() {
                continue;
            }
            if let Some(age) = max_age
                && now >= w.started + age + age_jitter(w.id, age)
            {
                info!(
                    "Recycling worker (pid:{}): older than --max-worker-age",
                    w.pid
                );
                w.recycle = true;
            } else if check_rss
                && let (Some(limit), Some(rss)) = (max_rss, w.rss_bytes())
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

    /// Move the worker table toward the target: spawn what is missing, retire what
    /// is surplus, and retire older generations as the current one becomes ready.
    fn converge(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
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
                self.retire(pid, "scale down");
            }
        }

        // Missing workers of the current generation.
        if self.config_failed != Some(current_gen) {
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
            self.spawn_pending = false;
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
                    if !self.spawn(slot, now) {
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
        let mut others: Vec<(bool, u64, Pid)> = self
            .workers
            .iter()
            .filter(|w| (w.generation != current_gen || w.recycle) && w.state.is_active())
            .map(|w| (w.is_ready(), w.id, w.pid))
            .collect();
        others.sort();
        let keep = self.target.saturating_sub(ready_current);
        // Booting ones sort first (false < true) and cover nothing: all go.
        let booting = others.iter().filter(|(ready, _, _)| !ready).count();
        let surplus = others.len().saturating_sub(keep).max(booting);
        for &(_, _, pid) in &others[..surplus] {
            let recycled = self.workers.iter().any(|w| w.pid == pid && w.recycle);
            let why = if recycled {
                "recycled, its replacement is ready"
            } else {
                "replaced by a new generation"
            };
            self.retire(pid, why);
        }

        if !self.served && ready_current >= self.target {
            self.served = true;
            info!("Serving: {} worker(s) ready", ready_current);
            if self.predecessor.is_some() {
                // Take over as systemd's main process before the old master exits,
                // so a Type=notify unit stays active through the handover.
                self.tell_manager(&format!("MAINPID={}\nREADY=1", self.master_pid));
            } else {
                self.tell_manager("READY=1");
            }
            if let Some(r) = self.report.take() {
                r.ready();
            }
        }
        if let Some(r) = &self.reload
            && self.workers.iter().all(|w| w.generation == r.to)
            && ready_current >= self.target
        {
            let took = r.started.elapsed();
            info!(
                "Reload to generation {} complete in {:.2}s",
                r.to,
                took.as_secs_f64()
            );
            let generation = r.to;
            if let Some(Some(old)) = self
                .reload
                .as_mut()
                .and_then(|r| r.previous.take())
                .map(|p| p.listeners)
            {
                // The old generation is gone: nobody needs the old addresses now.
                listeners::close_unshared(old, &self.listeners);
            }
            self.last_reload = Some(ReloadOutcome::Succeeded {
                generation,
                took,
                at: SystemTime::now(),
            });
            self.reload = None;
            self.reply_reload_waiters(Response::ok(Reply::Reloaded {
                generation,
                took_secs: took.as_secs_f64(),
            }));
            self.tell_manager("READY=1");
        }
        self.tell_manager("");
    }

    /// Send `extra` (if any) with the current `STATUS=` to systemd; a bare status is
    /// sent only when it changed.
    fn tell_manager(&mut self, extra: &str) {
        let Some(m) = &self.manager else { return };
        if self.successor.is_some() {
            // The new master is systemd's main process now (it sent MAINPID=): a
            // word from us, STOPPING=1 above all, would be taken as the service's.
            return;
        }
        let ready = self
            .workers
            .iter()
            .filter(|w| w.generation == self.generation && w.is_ready())
            .count();
        let status = format!(
            "STATUS={ready}/{} workers ready, generation {}{}",
            self.target,
            self.generation,
            if self.reload.is_some() {
                ", reloading"
            } else {
                ""
            }
        );
        if extra.is_empty() && status == self.manager_status {
            return;
        }
        if extra.is_empty() {
            m.send(&status);
        } else {
            m.send(&format!("{extra}\n{status}"));
        }
        self.manager_status = status;
    }

    fn retire(&mut self, pid: Pid, why: &str) {
        let deadline = Instant::now() + self.cfg.graceful_timeout;
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            info!("Stopping worker (pid:{pid}) gracefully: {why}");
            w.stop(Signal::SIGTERM, deadline);
        }
    }

    /// Fork and exec one worker into `slot`. False if it could not be started now
    /// (the caller stops spawning for this turn; a backoff deadline is set).
    fn spawn(&mut self, slot: usize, now: Instant) -> bool {
        let owner = self.cfg.user.as_ref().map(|u| {
            (
                u.uid.as_raw(),
                self.cfg.group.as_ref().map_or(u.gid, |g| g.gid).as_raw(),
            )
        });
        let heartbeat = match Heartbeat::create(&self.heartbeat_dir, owner) {
            Ok(h) => h,
            Err(e) => {
                self.spawn_failed(
                    &format!(
                        "cannot create a heartbeat file in {}: {e}",
                        self.heartbeat_dir.display()
                    ),
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
        let mut prepared = match self.prepare(id, slot, &heartbeat, relay_write.as_raw_fd()) {
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
        match spawned {
            Ok((pid, exec_status)) => {
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
            Err(e) => {
                self.spawn_failed(&format!("fork failed: {e}"), now);
                false
            }
        }
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

    /// Everything the child needs, built before fork.
    fn prepare(
        &self,
        id: u64,
        slot: usize,
        heartbeat: &Heartbeat,
        stdio: i32,
    ) -> std::io::Result<Prepared> {
        let mut fds: Vec<i32> = self
            .listeners
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .collect();
        let heartbeat_target = contract::LISTEN_FDS_START + fds.len() as i32;
        fds.push(heartbeat.fd());
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        let mut env = self.base_env.clone();
        let mut set =
            |k: &str, v: &dyn std::fmt::Display| env.push(format!("{k}={v}").into_bytes());
        set(contract::ENV_LISTEN_FDS, &self.listeners.len());
        set(contract::ENV_LISTEN_FDNAMES, &names.join(":"));
        set(contract::ENV_WORKER_ID, &id);
        set(contract::ENV_SLOT, &slot);
        set(contract::ENV_GENERATION, &self.generation);
        set(contract::ENV_MASTER_PID, &self.master_pid);
        set(contract::ENV_HEARTBEAT_FD, &heartbeat_target);
        let timeout_secs = self.cfg.timeout.map_or(0.0, |t| t.as_secs_f64());
        set(contract::ENV_TIMEOUT, &timeout_secs);
        set(contract::ENV_NOTIFY_SOCKET, &self.notify.address);
        let mut pid_keys = vec![contract::ENV_LISTEN_PID];
        if let Some(t) = self.cfg.timeout {
            // Libraries that already ping systemd's watchdog ping ours; they ping at
            // half this interval, as sd_watchdog_enabled(3) advises.
            set(contract::ENV_WATCHDOG_USEC, &t.as_micros());
            pid_keys.push(contract::ENV_WATCHDOG_PID);
        }
        let builtin_title;
        let (path, argv): (&OsStr, Vec<&OsStr>) = match &self.cfg.program {
            WorkerProgram::Builtin => {
                builtin_title = OsString::from(format!("arbiter: worker [{}]", self.cfg.name));
                (
                    OsStr::new("/proc/self/exe"),
                    vec![
                        builtin_title.as_os_str(),
                        OsStr::new(crate::BUILTIN_WORKER_ARG),
                    ],
                )
            }
            WorkerProgram::Command { path, argv } => (
                path.as_os_str(),
                argv.iter().map(|a| a.as_os_str()).collect(),
            ),
        };
        let credentials = self.cfg.user.as_ref().map(|u| {
            (
                u.uid.as_raw(),
                self.cfg.group.as_ref().map_or(u.gid, |g| g.gid).as_raw(),
            )
        });
        Prepared::new(Plan {
            path,
            argv: &argv,
            env,
            pid_keys: &pid_keys,
            fds,
            stdio: Some(stdio),
            credentials,
            contained: true,
        })
    }

    // ---------------------------------------------------------------- upgrade

    /// Start replacing this master: vet the new binary with `--check-config`, then
    /// fork+exec it with our listeners (see `upgrade.rs`).
    fn begin_upgrade(
        &mut self,
        binary: Option<PathBuf>,
        timeout: Duration,
        handover: bool,
    ) -> Result<(), String> {
        if self.shutdown.is_some() {
            return Err("The master is shutting down.".into());
        }
        if let Some(u) = &self.upgrade {
            return Err(format!(
                "Child exists: an upgrade is already in flight (pid {}).",
                u.stage.pid()
            ));
        }
        if let Some(old) = self.predecessor {
            return Err(format!(
                "Parent exists: this master is itself an upgrade, and the old master (pid {old}) still runs."
            ));
        }
        if let Some(new) = self.successor {
            return Err(format!("A new master (pid {new}) already took over."));
        }
        let binary = binary
            .map(|b| std::path::absolute(&b).unwrap_or(b))
            .unwrap_or_else(|| self.start.exe.clone());
        let (out_r, out_w) = relay::pipe().map_err(|e| format!("pipe: {e}"))?;
        let mut argv: Vec<&OsStr> = self.start.argv.iter().map(|a| a.as_os_str()).collect();
        // Right after argv[0]: everything after `--` belongs to COMMAND.
        argv.insert(1.min(argv.len()), OsStr::new("--check-config"));
        let mut checker = Prepared::new(Plan {
            path: binary.as_os_str(),
            argv: &argv,
            env: self.base_env.clone(),
            pid_keys: &[],
            fds: Vec::new(),
            stdio: Some(out_w.as_raw_fd()),
            credentials: None,
            contained: true,
        })
        .map_err(|e| format!("{}: {e}", binary.display()))?;
        let (pid, _exec_status) = checker
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        drop(out_w);
        info!(
            "Upgrade: checking {} against the configuration (pid:{pid})",
            binary.display()
        );
        self.upgrade = Some(Upgrade {
            binary,
            handover,
            deadline: Instant::now() + timeout,
            waiters: Vec::new(),
            stage: UpgradeStage::Checking {
                pid,
                output: Some(out_r),
                said: Vec::new(),
            },
            renamed_pidfile: false,
        });
        Ok(())
    }

    /// The check passed: exec the new master with our listeners.
    fn start_new_master(&mut self) -> Result<(), String> {
        let Some(u) = &self.upgrade else {
            return Ok(());
        };
        let binary = u.binary.clone();
        let (ready_r, ready_w) = relay::pipe().map_err(|e| format!("pipe: {e}"))?;
        let (alive_r, alive_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let mut fds: Vec<i32> = self
            .listeners
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .collect();
        let n = fds.len() as i32;
        fds.push(ready_w.as_raw_fd());
        fds.push(alive_r.as_raw_fd());
        let specs: Vec<Option<String>> = self
            .listeners
            .iter()
            .map(|l| l.spec.as_ref().map(|s| s.to_string()))
            .collect();
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        let mut env = self.base_env.clone();
        let mut set =
            |k: &str, v: &dyn std::fmt::Display| env.push(format!("{k}={v}").into_bytes());
        set(contract::ENV_LISTEN_FDS, &n);
        set(contract::ENV_LISTEN_FDNAMES, &names.join(":"));
        set(upgrade::ENV_FROM, &self.master_pid);
        set(
            upgrade::ENV_SPECS,
            &serde_json::to_string(&specs).unwrap_or_else(|_| "[]".into()),
        );
        set(upgrade::ENV_READY_FD, &(contract::LISTEN_FDS_START + n));
        set(
            upgrade::ENV_PARENT_FD,
            &(contract::LISTEN_FDS_START + n + 1),
        );
        let mut pid_keys = vec![contract::ENV_LISTEN_PID];
        if let Some(m) = &self.manager {
            set(contract::ENV_NOTIFY_SOCKET, &m.address());
            // The unit's watchdog must stay fed by whoever is the main process.
            if let Some(usec) = m.watchdog_usec {
                set(contract::ENV_WATCHDOG_USEC, &usec);
                pid_keys.push(contract::ENV_WATCHDOG_PID);
            }
        }
        let argv: Vec<&OsStr> = self.start.argv.iter().map(|a| a.as_os_str()).collect();
        let mut prepared = Prepared::new(Plan {
            path: binary.as_os_str(),
            argv: &argv,
            env,
            pid_keys: &pid_keys,
            fds,
            stdio: None,
            credentials: None,
            contained: false,
        })
        .map_err(|e| format!("{}: {e}", binary.display()))?;
        // Move aside before the new master writes PIDFILE.2, as gunicorn and
        // unicorn do, so both pids can be found during the handover.
        let mut renamed = false;
        if let Some(p) = &mut self.pidfile {
            let to = upgrade::oldbin(p.path());
            match p.rename_to(&to) {
                Ok(()) => renamed = true,
                Err(e) => warning!(
                    "Upgrade: cannot rename the pidfile to {}: {e}",
                    to.display()
                ),
            }
        }
        let (pid, _exec_status) = match prepared.spawn() {
            Ok(s) => s,
            Err(e) => {
                if renamed {
                    self.restore_pidfile();
                }
                return Err(format!("cannot start {}: {e}", binary.display()));
            }
        };
        drop(ready_w);
        drop(alive_r);
        info!(
            "Upgrade: started the new master (pid:{pid}) from {}",
            binary.display()
        );
        if let Some(u) = &mut self.upgrade {
            u.renamed_pidfile = renamed;
            u.stage = UpgradeStage::Starting {
                pid,
                ready: Some(ready_r),
                said: Vec::new(),
                _alive: alive_w,
            };
        }
        Ok(())
    }

    /// Output of the checker, or the new master's "ready".
    fn on_upgrade_pipe(&mut self, _now: Instant) {
        let Some(u) = &mut self.upgrade else { return };
        let (fd, said) = match &mut u.stage {
            UpgradeStage::Checking { output, said, .. } => (output, said),
            UpgradeStage::Starting { ready, said, .. } => (ready, said),
            UpgradeStage::Running { .. } => return,
        };
        let Some(pipe) = fd else { return };
        let mut buf = [0u8; 4096];
        let eof = match nix::unistd::read(&*pipe, &mut buf) {
            Ok(0) => true,
            Ok(k) => {
                if said.len() < 4096 {
                    said.extend_from_slice(&buf[..k]);
                }
                false
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        };
        if eof {
            *fd = None;
        }
        let UpgradeStage::Starting { pid, said, .. } = &u.stage else {
            return;
        };
        let pid = *pid;
        let text = String::from_utf8_lossy(said).to_string();
        if text.starts_with("ready") && text.contains('\n') {
            self.upgrade_ready(pid);
        } else if let Some(msg) = text.strip_prefix("error: ") {
            let msg = msg.trim().to_string();
            self.upgrade_failed(format!("the new master failed to start: {msg}"));
        } else if eof {
            self.upgrade_failed("the new master exited before it was ready".into());
        }
    }

    fn upgrade_ready(&mut self, pid: Pid) {
        let Some(mut u) = self.upgrade.take() else {
            return;
        };
        self.upgrades += 1;
        self.successor = Some(pid);
        info!("Upgrade: the new master (pid:{pid}) is ready");
        let alive = match std::mem::replace(
            &mut u.stage,
            UpgradeStage::Checking {
                pid,
                output: None,
                said: Vec::new(),
            },
        ) {
            UpgradeStage::Starting { _alive, .. } => _alive,
            _ => return,
        };
        if u.handover {
            // Our workers drain while the new master's serve; we exit when they are
            // gone, and the new master is promoted when our end of the pipe closes.
            info!("Upgrade: handing over to the new master (pid:{pid}); stopping this one");
            self.upgrade_waiters.append(&mut u.waiters);
            // The pipe closes when we exit, which is the promotion signal.
            std::mem::forget(alive);
            self.begin_shutdown(true);
        } else {
            info!(
                "Upgrade: both masters serve now; WINCH then QUIT this one (pid:{}) to finish, or HUP this one and QUIT the new one to roll back",
                self.master_pid
            );
            u.stage = UpgradeStage::Running { pid, _alive: alive };
            self.upgrade = Some(u);
        }
    }

    fn on_upgrade_child_exit(&mut self, death: Death) {
        let Some(u) = &self.upgrade else { return };
        match (&u.stage, death) {
            (UpgradeStage::Checking { .. }, Death::Code(0)) => {
                if let Err(e) = self.start_new_master() {
                    self.upgrade_failed(e);
                }
            }
            (UpgradeStage::Checking { said, .. }, _) => {
                let said = String::from_utf8_lossy(said);
                let said = said.trim();
                let reason = if said.is_empty() {
                    format!("the new binary's configuration check {}", death.describe())
                } else {
                    format!("the new binary refused the configuration: {said}")
                };
                self.upgrade_failed(reason);
            }
            (UpgradeStage::Starting { pid, .. } | UpgradeStage::Running { pid, .. }, _) => {
                let reason = format!("the new master (pid:{pid}) {}", death.describe());
                let pid = *pid;
                self.upgrade_failed(reason);
                // It is gone: nothing to KILL later.
                if self.abandoned_master.is_some_and(|(p, _)| p == pid) {
                    self.abandoned_master = None;
                }
            }
        }
    }

    /// Give up on the new master: it is asked to quit (KILL follows), our pidfile
    /// gets its name back, and this master carries on serving.
    fn upgrade_failed(&mut self, reason: String) {
        let Some(u) = self.upgrade.take() else { return };
        error!(
            "Upgrade failed: {reason}; this master (pid:{}) carries on",
            self.master_pid
        );
        let pid = u.stage.pid();
        if nix::sys::signal::kill(pid, Signal::SIGQUIT).is_ok() {
            self.abandoned_master = Some((pid, Instant::now() + ABANDON_GRACE));
        }
        if u.renamed_pidfile {
            self.restore_pidfile();
        }
        let resp = Response::err(ErrorKind::Failed, format!("upgrade failed: {reason}"));
        for id in u.waiters {
            self.reply(id, &resp);
        }
    }

    fn restore_pidfile(&mut self) {
        if let (Some(p), Some(base)) = (&mut self.pidfile, &self.cfg.pidfile)
            && let Err(e) = p.rename_to(base)
        {
            error!(
                "Cannot give the pidfile its name back ({}): {e}",
                base.display()
            );
        }
    }

    /// The old master is gone: take the pidfile and control socket names, and own
    /// the unix socket files from now on.
    fn promote(&mut self) {
        self.predecessor_pipe = None;
        let Some(old) = self.predecessor.take() else {
            return;
        };
        if let (Some(p), Some(base)) = (&mut self.pidfile, &self.cfg.pidfile)
            && let Err(e) = p.rename_to(base)
        {
            error!(
                "Promotion: cannot rename the pidfile to {}: {e}",
                base.display()
            );
        }
        if let Some(c) = &mut self.control
            && let Err(e) = c.rename_to(&self.cfg.control)
        {
            error!(
                "Promotion: cannot move the control socket to {}: {e}",
                self.cfg.control.display()
            );
        }
        for l in &mut self.listeners {
            if let Some(config::BindSpec::Unix(path)) = &l.spec {
                l.owned_path = Some(path.clone());
            }
        }
        info!("Master has been promoted (the old master, pid {old}, is gone).");
    }

    /// Close our listeners; unix socket files go too unless a new master uses them.
    fn release_listeners(&mut self) {
        let mut ls = std::mem::take(&mut self.listeners);
        if self.successor.is_some() || self.predecessor.is_some() {
            for l in &mut ls {
                l.owned_path = None;
            }
        }
        listeners::close_all(ls);
    }

    fn upgrade_description(&self) -> Option<String> {
        if let Some(old) = self.predecessor {
            return Some(format!(
                "new master, not promoted yet (old master pid {old})"
            ));
        }
        if let Some(new) = self.successor {
            return Some(format!("handing over to the new master (pid {new})"));
        }
        self.upgrade.as_ref().map(|u| match u.stage {
            UpgradeStage::Checking { pid, .. } => {
                format!("checking {} (pid {pid})", u.binary.display())
            }
            UpgradeStage::Starting { pid, .. } => format!("new master starting (pid {pid})"),
            UpgradeStage::Running { pid, .. } => {
                format!("new master running beside this one (pid {pid})")
            }
        })
    }

    // ---------------------------------------------------------------- exit

    fn finish(mut self) -> u8 {
        // The last words of the workers, already in their pipes.
        let now = Instant::now();
        for r in &mut self.relays {
            r.pump(now);
        }
        let bye = Response::ok(Reply::Stopped {
            pid: self.master_pid.as_raw(),
        });
        for id in std::mem::take(&mut self.stop_waiters) {
            self.reply(id, &bye);
        }
        if let Some(new_pid) = self.successor {
            let done = Response::ok(Reply::Upgraded {
                old_pid: self.master_pid.as_raw(),
                new_pid: new_pid.as_raw(),
            });
            for id in std::mem::take(&mut self.upgrade_waiters) {
                self.reply(id, &done);
            }
        }
        if let Some(c) = self.control.take() {
            // The new master renames its socket over the path: leave ours there
            // until then, so the path never goes missing.
            c.shutdown(self.successor.is_none());
        }
        self.release_listeners();
        if let Some(p) = self.pidfile.take() {
            p.remove();
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
                self.exit_reason
                    .as_deref()
                    .unwrap_or("the master stopped before it served"),
            );
        }
        self.exit_status
    }
}

/// How a worker ended.
#[derive(Clone, Copy, Debug)]
enum Death {
    Code(i32),
    Signal(Signal),
}

impl Death {
    fn describe(self) -> String {
        match self {
            Death::Code(c) => format!("exited with code {c}"),
            Death::Signal(s) => format!("was killed by {s}"),
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

/// Delay before the n-th consecutive failure's restart: the first is immediate.
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(16);
    (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_MAX)
}

pub use arbiter_proto::control::MAX_WORKERS;

fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Status => "status",
        Request::Scale { .. } => "scale",
        Request::Reload => "reload",
        Request::Reopen => "reopen",
        Request::Stop { fast: false } => "stop",
        Request::Stop { fast: true } => "stop --fast",
        Request::Kill { .. } => "kill",
        Request::Upgrade { .. } => "upgrade",
        Request::Ping => "ping",
        Request::Version => "version",
    }
}

/// `TERM`, `SIGTERM`, `term`, `15`.
pub fn parse_signal(s: &str) -> Option<Signal> {
    let sig = arbiter_proto::signal::parse(s).ok()?;
    Signal::try_from(sig.number).ok()
}

/// How a worker of this configuration proves it is ready: `--ready`, or the
/// program's default (the built-in worker says READY=1 once it accepts; a COMMAND
/// is ready once exec'd).
fn ready_mode(cfg: &Config) -> ReadyMode {
    cfg.ready.unwrap_or(match cfg.program {
        WorkerProgram::Builtin => ReadyMode::Notify,
        WorkerProgram::Command { .. } => ReadyMode::Exec,
    })
}

/// How long poll may sleep: until `due`, or for ever when nothing is due.
fn poll_timeout(due: Option<Instant>, now: Instant) -> PollTimeout {
    let Some(next) = due else {
        return PollTimeout::NONE;
    };
    let wait = next.saturating_duration_since(now);
    // Round up: a sub-millisecond remainder must not become 0 and spin the loop.
    let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
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

/// Variables of the master's own environment a worker must not inherit: systemd's
/// (they were meant for the master) and ours (each worker gets its own).
fn is_reserved_env(key: &OsStr) -> bool {
    let k = key.as_bytes();
    k.starts_with(b"LISTEN_")
        || k.starts_with(b"ARBITER_")
        || k == b"NOTIFY_SOCKET"
        || k.starts_with(b"WATCHDOG_")
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

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigusr1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("NOPE"), None);
    }

    #[test]
    fn reserved_env() {
        assert!(is_reserved_env(OsStr::new("LISTEN_FDS")));
        assert!(is_reserved_env(OsStr::new("NOTIFY_SOCKET")));
        assert!(is_reserved_env(OsStr::new("ARBITER_SLOT")));
        assert!(!is_reserved_env(OsStr::new("PATH")));
    }
}
