//! The master: the parts it owns and its loop, meant to be read top to bottom.
//!
//! One thread, one epoll set. Each turn: wait for events or the nearest deadline
//! and dispatch them -> forgive a stall -> reap (after a SIGCHLD) -> check
//! deadlines -> check limits -> converge the worker table toward the target ->
//! serve pipelined requests. The wait's timeout is the nearest deadline of any
//! part, so an idle master with nothing due sleeps.
//!
//! The parts each own their state and report what happened as an enum this module
//! acts on: [`events`] (the epoll set), [`pool`] (workers, target, generation,
//! slots, backoff, every worker timer), [`reload`] (the reload in flight and how
//! the last one ended), [`lineage`] (hot upgrade, from either master), [`manager`]
//! (systemd), [`autoscale`] (`--workers MIN..MAX`), [`requests`] (control
//! requests) and [`status`] (the snapshot); [`ending`] is how the master stops and
//! who hears about it. The verbs `reload`, `scale_to`, `begin_shutdown` and `halt`
//! are shared by signals and control requests, so `kill -HUP` and `arbiterctl
//! reload` cannot differ.

mod autoscale;
mod code_watch;
mod ending;
mod events;
mod handover;
mod lineage;
mod manager;
mod pool;
mod probes;
mod reload;
mod requests;
mod shutdown;
mod status;

use std::os::fd::AsFd;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::config::{Config, Loader, WorkerProgram};
use crate::control::{ClientId, ControlServer, Restore};
use crate::daemonize::Report;
use crate::listeners::{self, Listener};
use crate::metrics::MetricsServer;
use crate::notify::NotifySocket;
use crate::pidfile::Pidfile;
use crate::signals::{self, SignalPipe};
use crate::spawn::ChildEnv;
use crate::upgrade::StartContext;
use crate::{debug, error, info, warning};

use autoscale::Autoscaler;
use events::{Events, Source};
use lineage::{ChildExit, Lineage};
use manager::Manager;
use pool::{Death, Exit, Phase, Pool, SpawnContext};
use reload::Reloads;
use shutdown::{How, Shutdown};

pub use reload::ReloadOutcome;

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

/// How long a new master may take to be ready, unless told otherwise.
const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

pub use arbiter_proto::control::MAX_WORKERS;

/// Everything `main` prepared for the master.
pub struct Setup {
    pub loader: Loader,
    pub cfg: Config,
    pub listeners: Vec<Listener>,
    pub pidfile: Option<Pidfile>,
    pub control: Option<ControlServer>,
    /// `--metrics-bind`, bound (or taken over from the old master).
    pub metrics: Option<MetricsServer>,
    /// Who waits to hear that we serve: `-D`'s launcher, or an upgrading old master.
    pub report: Option<Report>,
    /// No terminal of ours can send WINCH for a resize: detached by `-D`, or a
    /// service that systemd runs. Then WINCH is the upgrade dance's "stop your
    /// workers".
    pub detached: bool,
    pub start: StartContext,
    /// When we are an upgrade: the old master's pid and the pipe whose EOF says it
    /// is gone.
    pub predecessor: Option<(i32, Option<std::os::fd::OwnedFd>)>,
    /// The old master's worker count, when we replace one.
    pub scaled: Option<crate::upgrade::Scaled>,
}

pub struct Arbiter {
    // The parts.
    events: Events,
    pool: Pool,
    /// `--workers MIN..MAX`: moves the pool's target with the load.
    autoscaler: Autoscaler,
    reloads: Reloads,
    lineage: Lineage,
    manager: Manager,
    control: Option<ControlServer>,
    /// `--metrics-bind`: `GET /metrics` served from this loop.
    metrics: Option<MetricsServer>,
    notify: NotifySocket,
    signals: SignalPipe,
    /// `--reload-on-change`: the code being watched.
    code_watch: code_watch::Watching,

    // What they share: the configuration, the listeners, the environment children
    // start from.
    /// Rebuilds the configuration on reload (command line over file over defaults).
    loader: Loader,
    cfg: Config,
    listeners: Vec<Listener>,
    child_env: ChildEnv,
    start: StartContext,
    master_pid: Pid,
    pidfile: Option<Pidfile>,
    /// `-D`: the launcher (or the old master) waiting to hear that we serve.
    report: Option<Report>,
    detached: bool,

    // The master's own life.
    shutdown: Option<Shutdown>,
    exit_status: u8,
    exit_reason: Option<String>,
    /// Control clients waiting for the master to exit.
    stop_waiters: Vec<ClientId>,
    started: Instant,
    started_wall: SystemTime,
}

impl Arbiter {
    pub fn new(setup: Setup) -> Result<Arbiter, (std::io::Error, Option<Report>)> {
        let Setup {
            loader,
            cfg,
            listeners,
            pidfile,
            control,
            metrics,
            report,
            detached,
            start,
            predecessor,
            scaled,
        } = setup;
        let master_pid = nix::unistd::getpid();
        let parts = Events::new().and_then(|ev| {
            let signals = SignalPipe::install(HANDLED_SIGNALS)?;
            let notify = NotifySocket::bind(&cfg.name, cfg.worker_credentials())?;
            Ok((ev, signals, notify))
        });
        let (mut events, signals, notify) = match parts {
            Ok(p) => p,
            Err(e) => return Err((e, report)),
        };
        events.add(signals.fd(), Source::Signals);
        events.add(notify.fd(), Source::Notify);
        let lineage = Lineage::new(predecessor, &mut events);
        let child_env = ChildEnv::inherited();
        let mut pool = Pool::new(&cfg, master_pid, &child_env);
        if let Some(s) = scaled {
            let n = s.target_for(cfg.workers, cfg.max_workers);
            if n != cfg.workers {
                info!(
                    "Running the old master's {n} workers (scaled from the configured {})",
                    cfg.workers
                );
                pool.set_target(n);
            }
        }
        // Orphans of our workers' own children come back to us, to be reaped silently,
        // instead of going to init with nobody watching them. After the pool
        // started the guardian, which must not be one of them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        Ok(Arbiter {
            autoscaler: Autoscaler::new(cfg.autoscale, Instant::now()),
            pool,
            reloads: Reloads::default(),
            lineage,
            manager: Manager::from_env(),
            events,
            control,
            metrics,
            notify,
            signals,
            code_watch: code_watch::Watching::Off,
            loader,
            cfg,
            listeners,
            child_env,
            start,
            master_pid,
            pidfile,
            report,
            detached,
            shutdown: None,
            exit_status: 0,
            exit_reason: None,
            stop_waiters: Vec::new(),
            started: Instant::now(),
            started_wall: SystemTime::now(),
        })
    }

    /// Run until shut down; returns the exit status.
    pub fn run(mut self) -> u8 {
        self.log_start();
        self.sync_code_watch();
        self.converge(Instant::now());
        while !(self.stopping_workers() && self.pool.is_empty()) {
            let due = self.next_deadline(Instant::now());
            let woke = self.wait_and_dispatch(due);
            let now = Instant::now();
            // Before anything is judged on time: time the master did not run.
            if let Some(lost) = events::stall(due, woke.at, now, self.cfg.timeout) {
                self.pool.forgive_stall(lost, now, &self.cfg);
            }
            if woke.child_exited || self.signals.take_overflow() {
                self.reap(now);
            }
            self.check_deadlines(now);
            self.pool.check_limits(now, &self.cfg);
            self.converge(now);
            self.serve_pipelined(now);
        }
        self.finish()
    }

    fn log_start(&self) {
        info!("Starting arbiter {}", env!("CARGO_PKG_VERSION"));
        self.log_listening();
        let using = match &self.cfg.program {
            WorkerProgram::Builtin => "builtin (HTTP)".to_string(),
            WorkerProgram::Command { path, argv } => {
                // Arguments may carry secrets: only at debug level.
                debug!("Worker command line: {argv:?}");
                path.display().to_string()
            }
        };
        info!("Using worker: {using}");
        if let Some(c) = &self.control {
            info!("Control socket at {}", c.path().display());
        }
        if let Some(m) = &self.metrics {
            info!("Metrics at: {}", m.url());
        }
    }

    fn log_listening(&self) {
        let shown: Vec<&str> = self.listeners.iter().map(|l| l.display.as_str()).collect();
        info!("Listening at: {} ({})", shown.join(", "), self.master_pid);
    }

    // ---------------------------------------------------------------- the wait

    /// The earliest moment any part has something due; `None`: sleep until an
    /// event. Each timer is computed by its owner, in one place.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        [
            self.shutdown.as_ref().map(Shutdown::next_deadline),
            self.control.as_ref().and_then(|c| c.next_deadline()),
            self.metrics.as_ref().and_then(|m| m.next_deadline()),
            self.manager.next_deadline(),
            self.lineage.next_deadline(),
            self.reload_gives_up_at(),
            self.report_due(),
            self.autoscaler.next_deadline(),
            self.code_watch.next_deadline(),
            self.pool.next_deadline(
                &self.cfg,
                self.reloads.is_running(),
                self.stopping_workers(),
                now,
            ),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sleep until an event or `due`, and handle what woke us.
    fn wait_and_dispatch(&mut self, due: Option<Instant>) -> Woke {
        if let Some(c) = &mut self.control {
            self.events.sync_control(c);
        }
        if let Some(m) = &mut self.metrics {
            self.events.sync_metrics(m);
        }
        let ready = self.events.wait(events::wait_timeout(due, Instant::now()));
        let now = Instant::now();
        let mut woke = Woke {
            at: now,
            child_exited: false,
        };
        let mut requests = Vec::new();
        let mut asks = Vec::new();
        for source in ready {
            match source {
                Source::Signals => {
                    for (sig, sender) in self.signals.drain_with_sender() {
                        woke.child_exited |= sig == Signal::SIGCHLD;
                        self.handle_signal(sig, sender);
                    }
                }
                Source::Exec(id) => self.pool.on_exec_status(id, &mut self.events),
                Source::Template(id) => {
                    let early = self.pool.on_template(id, now, &mut self.events);
                    for (pid, messages) in early.notes {
                        self.pool.on_notify(pid, messages, now, &self.cfg);
                    }
                    for (pid, death) in early.deaths {
                        self.on_exit(pid, death, now);
                    }
                }
                Source::Relay(id) => self.pool.on_relay(id, now, &mut self.events),
                Source::Upgrade => self.on_upgrade_pipe(),
                Source::Predecessor => self.promote(),
                Source::Notify => {
                    for (sender, messages) in self.notify.receive() {
                        self.pool.on_notify(sender, messages, now, &self.cfg);
                    }
                }
                Source::ControlWatch => {
                    if let Some(c) = &mut self.control {
                        c.on_watch(now);
                    }
                }
                Source::ControlListener => {
                    if let Some(c) = &mut self.control {
                        c.accept(now);
                    }
                }
                Source::ControlClient(id) => {
                    if let Some(c) = &mut self.control {
                        c.write(id);
                        requests.extend(c.read(id, now));
                    }
                }
                Source::MetricsListener => {
                    if let Some(m) = &mut self.metrics {
                        m.accept(now);
                    }
                }
                Source::MetricsClient(id) => {
                    if let Some(m) = &mut self.metrics
                        && let Some(asked) = m.on_ready(id, now)
                    {
                        asks.push((id, asked));
                    }
                }
                Source::CodeWatch => self.code_watch.on_ready(now),
            }
        }
        self.answer(asks, now);
        for (id, peer, req) in requests {
            self.handle_request(id, peer, req);
        }
        self.serve_pipelined(now);
        woke
    }

    /// Requests a client pipelined behind one that has just been answered (here or
    /// by a reload completing): their bytes are already read, so no event will
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
            && let Some(worker_pid) = self.pool.owner_of(sender.pid).or_else(|| {
                // Each worker leads its own group: a sender in one is that worker's.
                self.pool.leading(sender.group?)
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
            Signal::SIGTERM => self.begin_shutdown(How::Graceful),
            Signal::SIGINT | Signal::SIGQUIT => self.begin_shutdown(How::Quick),
            Signal::SIGTTIN if self.pool.target() >= self.cfg.max_workers => info!(
                "SIGTTIN ignored: already at --max-workers ({})",
                self.cfg.max_workers
            ),
            Signal::SIGTTIN => self.scale_to(self.pool.target().saturating_add(1)),
            Signal::SIGTTOU => {
                if self.pool.target() <= 1 {
                    info!("SIGTTOU ignored: already at 1 worker");
                } else {
                    self.scale_to(self.pool.target() - 1);
                }
            }
            Signal::SIGUSR1 => match crate::log::reopen() {
                Ok(()) => info!("Reopened the log file"),
                Err(e) => error!("Cannot reopen the log file: {e}"),
            },
            Signal::SIGUSR2 => {
                if let Err(e) = self.begin_upgrade(None, DEFAULT_UPGRADE_TIMEOUT, false) {
                    warning!("USR2 signal ignored. {e}");
                }
            }
            // The workers serve on through a drain window: only a stop ends it.
            Signal::SIGWINCH if self.shutdown.is_some() => info!("SIGWINCH ignored: shutting down"),
            Signal::SIGWINCH if self.detached => {
                // The upgrade dance: the old master keeps its listeners and pidfile
                // but hands all traffic to the new one. HUP or a scale brings
                // workers back.
                info!("graceful stop of workers");
                self.pool.set_target(0);
            }
            Signal::SIGWINCH => info!("SIGWINCH ignored. Not daemonized (nor a systemd service)"),
            _ => {}
        }
    }

    // ---------------------------------------------------------------- verbs

    /// A count set by hand (TTIN, TTOU, `scale N`): it also stops adapting.
    pub fn scale_to(&mut self, n: usize) {
        if self.shutdown.is_some() {
            info!("Scale ignored: shutting down");
            return;
        }
        if let Some(b) = self.autoscaler.bounds() {
            info!(
                "Autoscaling within {b} is off: the count was set by hand (scale MIN..MAX or a reload turns it on again)"
            );
            self.autoscaler.set_bounds(None, Instant::now());
        }
        let n = n.max(1);
        if n != self.pool.target() {
            info!("workers {} -> {n}", self.pool.target());
        }
        self.pool.set_target(n);
    }

    // ---------------------------------------------------------------- each turn

    /// Collect every exited child: one SIGCHLD may stand for many exits.
    fn reap(&mut self, now: Instant) {
        loop {
            let (pid, death) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Death::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Death::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    break;
                }
            };
            self.on_exit(pid, death, now);
        }
    }

    fn on_exit(&mut self, pid: Pid, death: Death, now: Instant) {
        match self.lineage.on_child_exit(pid, death) {
            ChildExit::NotOurs => {}
            ChildExit::Abandoned => return,
            ChildExit::CheckPassed => return self.start_new_master(),
            ChildExit::Failed(reason) => return self.upgrade_failed(reason),
            ChildExit::SuccessorGone {
                reason,
                renamed_pidfile,
                waiters,
            } => return self.successor_gone(reason, renamed_pidfile, waiters),
        }
        let phase = Phase {
            reloading: self.reloads.is_running(),
            stopping: self.stopping_workers(),
        };
        match self
            .pool
            .on_exit(pid, death, now, phase, &self.cfg, &mut self.events)
        {
            // An orphan that came to us as subreaper, or a child of something else.
            Exit::NotAWorker => debug!("Reaped unknown child process (pid:{pid})"),
            Exit::Handled => {}
            Exit::Halt { status, reason } => self.halt(status, reason),
            Exit::NewGenerationFailed(reason) => self.abandon_reload(reason),
        }
    }

    /// Timeouts of every part but the pool's limits (see `check_limits`).
    fn check_deadlines(&mut self, now: Instant) {
        if let Some(m) = &mut self.metrics {
            m.expire(now);
        }
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
        if let Some(reason) = self.lineage.check_deadlines(now) {
            self.upgrade_failed(reason);
        }
        self.check_reload(now);
        self.check_code_changed(now);
        self.check_report(now);
        self.autoscale(now);
        self.manager.check(now, self.lineage.is_main_process());
        self.pool.check_deadlines(now, &self.cfg);
        self.check_shutdown(now);
    }

    /// Move the pool toward its target and act on where it stands.
    /// Also through a drain window: a worker that dies in it is replaced.
    fn converge(&mut self, now: Instant) {
        if self.stopping_workers() {
            return;
        }
        let ctx = SpawnContext {
            cfg: &self.cfg,
            listeners: &self.listeners,
            env: &self.child_env,
            notify_address: &self.notify.address,
            master_pid: self.master_pid,
        };
        let progress = self.pool.converge(now, &ctx, &mut self.events);
        // Serving for the first time while stopping: nobody is to hear "ready".
        if let Some(ready) = progress.first_served.filter(|_| self.shutdown.is_none()) {
            info!("Serving: {ready} worker(s) ready");
            // A new master of an upgrade is not heard yet (the old one speaks
            // until it hands over); tell_manager knows.
            self.tell_manager("READY=1");
            if let Some(r) = self.report.take() {
                r.ready(ready);
            }
        }
        if progress.settled && self.reloads.is_running() {
            self.complete_reload();
        }
        self.tell_manager("");
    }

    /// `--workers MIN..MAX`: sample the queues (and who is busy) when due, and
    /// move the target one step if the load says so.
    fn autoscale(&mut self, now: Instant) {
        if !self.autoscaler.is_due(now) {
            return;
        }
        let queued = crate::queue::queued(self.listeners.iter().map(|l| l.as_fd()));
        let (busy, idle) = self.pool.busy_idle();
        let sample = autoscale::Sample {
            queued,
            busy,
            idle,
            target: self.pool.target(),
        };
        // Not while stopping or reloading: the pool is busy changing already.
        if self.shutdown.is_some() || self.reloads.is_running() {
            self.autoscaler.set_bounds(self.autoscaler.bounds(), now);
            return;
        }
        if let Some(d) = self.autoscaler.sample(sample, now) {
            info!(
                "Autoscale: workers {} -> {}: {}",
                sample.target, d.to, d.reason
            );
            self.pool.set_target(d.to);
        }
    }

    /// Send `extra` (if any) with the current `STATUS=` to systemd.
    fn tell_manager(&mut self, extra: &str) {
        let doing = match &self.shutdown {
            Some(s) => s.name(),
            None if self.reloads.is_running() => "reloading",
            None => "",
        };
        let status = format!(
            "{}/{} workers ready, generation {}{}{doing}",
            self.pool.serving(),
            self.pool.target(),
            self.pool.generation(),
            if doing.is_empty() { "" } else { ", " },
        );
        self.manager
            .tell(extra, status, self.lineage.is_main_process());
    }

    /// Close our listeners; unix socket files go too unless another master uses
    /// them.
    fn release_listeners(&mut self) {
        let mut ls = std::mem::take(&mut self.listeners);
        if self.lineage.shares_paths() {
            for l in &mut ls {
                l.owned_path = None;
            }
        }
        listeners::close_all(ls);
    }

    /// Stop serving `/metrics`: its fds out of the event set, then closed; the
    /// socket file removed unless another master serves on it.
    fn close_metrics(&mut self) {
        if let Some(m) = self.metrics.take() {
            for fd in m.fds() {
                self.events.remove(fd);
            }
            m.close(!self.lineage.shares_paths());
        }
    }
}

/// What one wait brought.
struct Woke {
    /// When the wait returned.
    at: Instant,
    /// A SIGCHLD was among the signals: reap.
    child_exited: bool,
}

/// `TERM`, `SIGTERM`, `term`, `15`.
pub fn parse_signal(s: &str) -> Option<Signal> {
    let sig = arbiter_proto::signal::parse(s).ok()?;
    Signal::try_from(sig.number).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigusr1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("NOPE"), None);
    }
}
