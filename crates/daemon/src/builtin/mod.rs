//! The built-in HTTP worker: what `arbiterd` runs with no COMMAND.
//!
//! The master execs its own binary as `arbiterd --builtin-worker`; from then on this
//! is a worker like any other (listeners at fds 3.., `LISTEN_PID`, a heartbeat fd,
//! `NOTIFY_SOCKET`). It is also the benchmark worker, so it is lean: one thread, one
//! level-triggered epoll loop, non-blocking connections, listeners registered with
//! `EPOLLEXCLUSIVE` so N workers sharing a socket do not all wake for each
//! connection, a bounded number of connections, canned responses, and one shared
//! read buffer (a connection only keeps bytes of its own when a request straddles
//! two reads).
//!
//! The listeners stay as the master bound them, blocking: their file status flags
//! belong to the open file description that the master and every worker share, so
//! setting O_NONBLOCK here would hand it to whatever the workers of a later reload
//! or upgrade run. Accepting therefore polls first and runs under an interval
//! alarm (see [`Worker::accept`]).
//!
//! - `GET /` answers `{"pid":P,"worker_id":I,"slot":S,"generation":G}`;
//! - `GET /sleep?ms=N` answers the same after N ms (a timer, never a blocked loop);
//! - `GET /health` answers `ok`.
//!
//! On the scoreboard (`ARBITER_SCOREBOARD_FD`) it is busy while any connection has
//! a request in hand (a head or body being read, a sleep, a response being
//! written) and idle otherwise, and counts every response it queues. It publishes
//! once per loop turn, before it waits, and only what changed: a few plain stores.
//!
//! TERM: take what waits in the listeners' accept queues (at most what they held),
//! stop accepting, finish in-flight requests (pending sleeps included), close idle
//! keep-alive connections, exit 0. QUIT/INT: exit 0 at once. ABRT: exit 1. The
//! master's own signals (HUP, USR1, USR2, WINCH, TTIN, TTOU) are ignored.
//!
//! The parts, split where the state splits, so that each can be read (and the pure
//! ones tested) without the others:
//!
//! - this file: the [`Worker`] and its life: boot, the loop, timers, heartbeat,
//!   signals, the drain. It owns all the state below; the other files add
//!   `impl Worker` blocks for their part of it.
//! - [`accept`]: the inherited listeners and taking connections from them while
//!   they stay blocking (the poll, the alarm, the back-off).
//! - [`connection`]: one connection's socket, buffers, deadline and epoll interest,
//!   the table of them, and the worker's I/O on them (read, serve, flush, linger,
//!   close).
//! - [`session`]: one connection's HTTP exchange without the socket: which requests
//!   are answered, which wait (a body, a sleep, a client not reading), and when the
//!   connection must close. Pure, so its tests need no sockets.
//! - [`http`]: the request head (httparse, under this worker's limits and rules)
//!   and the canned responses.
//!
//! The worker's accept/epoll/notify/heartbeat state stays in [`Worker`] rather than
//! in a "session" of its own: it is the worker's life, and the loop reads it on
//! every turn.

mod accept;
mod connection;
mod http;
mod response;
mod session;

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::Signal;

use arbiter_proto::worker as contract;

use crate::signals::SignalPipe;

use accept::inherited_listeners;
use accept::{AcceptAlarm, Listener};
use connection::{Conn, Conns, DRAIN_GRACE, READ_CHUNK};
use response::{Replies, identity_json};

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
const MAX_CONNECTIONS: usize = 1024;
/// More inherited fds than this is not a listener set but a mistake.
const MAX_LISTENERS: usize = 256;

/// Epoll tokens: connections use [`Conns`] tokens (a slab key in the low 32 bits),
/// which never come near these.
const TOKEN_SIGNALS: u64 = u64::MAX;
const TOKEN_LISTENER_0: u64 = u64::MAX - 1;

pub fn run() -> ExitCode {
    // Exec'd through /proc/self/exe, the process would be named `exe` in top and
    // in `ps -o comm` (argv[0] carries the full title).
    let _ = nix::sys::prctl::set_name(c"arbiterd-worker");
    match Worker::boot() {
        Ok(w) => w.serve(),
        Err(msg) => {
            eprintln!("arbiterd builtin worker: {msg}");
            ExitCode::from(contract::EXIT_BOOT_ERROR as u8)
        }
    }
}

// ------------------------------------------------------------------ the worker

struct Worker {
    epoll: Epoll,
    signals: SignalPipe,
    /// Armed only during a batch of accepts; see [`AcceptAlarm`].
    alarm: AcceptAlarm,
    listeners: Vec<Listener>,
    /// The listeners are in the epoll set.
    listening: bool,
    conns: Conns,
    /// Connection deadlines, soonest first; see `Conn::deadline`.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    replies: Replies,
    read_buf: Box<[u8]>,
    heartbeat: Option<(contract::Heartbeat, Duration)>,
    next_beat: Option<Instant>,
    accept_paused_until: Option<Instant>,
    accept_error_reported: bool,
    next_sweep: Option<Instant>,
    draining: bool,
    /// The clock as of the last wake-up: good enough for activity stamps.
    now: Instant,
    /// This worker's scoreboard entry, if the master gave it one.
    board: Option<arbiter_proto::scoreboard::Entry>,
    /// Connections with a request in hand (see `Conn::in_hand`).
    in_hand: usize,
    /// Responses queued so far.
    served: Cell<u64>,
}

impl Worker {
    fn boot() -> Result<Worker, String> {
        let listeners = inherited_listeners()?;
        raise_fd_limit();
        let signals = SignalPipe::install(&[
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGABRT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ])
        .map_err(|e| format!("signal handlers: {e}"))?;
        ignore_masters_signals().map_err(|e| format!("signal handlers: {e}"))?;
        let alarm = AcceptAlarm::install().map_err(|e| format!("accept alarm: {e}"))?;
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        epoll
            .add(
                signals.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNALS),
            )
            .map_err(|e| format!("epoll: {e}"))?;
        let mut w = Worker {
            epoll,
            signals,
            alarm,
            listeners,
            listening: false,
            conns: Conns::default(),
            timers: BinaryHeap::new(),
            replies: Replies::new(&identity_json()),
            read_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            heartbeat: heartbeat_from_env(),
            next_beat: None,
            accept_paused_until: None,
            accept_error_reported: false,
            next_sweep: None,
            draining: false,
            now: Instant::now(),
            board: arbiter_proto::scoreboard::Entry::from_env(),
            in_hand: 0,
            served: Cell::new(0),
        };
        w.listen(true).map_err(|e| format!("epoll: {e}"))?;
        Ok(w)
    }

    fn serve(mut self) -> ExitCode {
        // Best effort: without a notify socket the master counts exec as ready.
        contract::notify("READY=1");
        let mut events = [EpollEvent::empty(); 256];
        loop {
            self.on_time();
            if self.draining && self.conns.is_empty() {
                return ExitCode::SUCCESS;
            }
            self.publish();
            let n = match self.epoll.wait(&mut events, self.poll_timeout()) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    eprintln!("arbiterd builtin worker: epoll_wait: {e}");
                    return ExitCode::FAILURE;
                }
            };
            self.now = Instant::now();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_SIGNALS => {
                        if let Some(code) = self.on_signals() {
                            return code;
                        }
                    }
                    t if t > TOKEN_LISTENER_0 - MAX_LISTENERS as u64 => {
                        self.accept((TOKEN_LISTENER_0 - t) as usize);
                    }
                    t => self.on_conn(t, ev.events()),
                }
            }
        }
    }

    /// Everything that is due: timers, heartbeat, accept back-off, idle sweep.
    fn on_time(&mut self) {
        self.now = Instant::now();
        while let Some(&Reverse((at, token))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            if self
                .conns
                .get(token)
                .is_some_and(|c| c.deadline == Some(at))
            {
                self.on_deadline(token);
            }
        }
        if let Some((hb, every)) = &mut self.heartbeat
            && self.next_beat.is_none_or(|t| self.now >= t)
        {
            hb.beat();
            self.next_beat = Some(self.now + *every);
        }
        if self.accept_paused_until.is_some_and(|t| self.now >= t) {
            self.accept_paused_until = None;
            self.update_listening();
        }
        if self.next_sweep.is_some_and(|t| self.now >= t) {
            self.sweep();
        }
    }

    /// Tell the scoreboard where this turn left us, before waiting.
    fn publish(&mut self) {
        if let Some(b) = &mut self.board {
            b.set_busy(self.in_hand > 0);
            b.set_requests(self.served.get());
        }
    }

    /// Until the next thing due; forever when nothing is (an idle worker without a
    /// heartbeat timeout never wakes up on its own).
    fn poll_timeout(&self) -> EpollTimeout {
        let next = [
            self.timers.peek().map(|Reverse((t, _))| *t),
            self.next_beat,
            self.accept_paused_until,
            self.next_sweep,
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(at) = next else {
            return EpollTimeout::NONE;
        };
        // Rounded up: waking a little early would only spin until the deadline.
        let ms = at
            .saturating_duration_since(Instant::now())
            .as_nanos()
            .div_ceil(1_000_000);
        EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX)
    }

    /// Returns an exit code when a signal says to exit now.
    fn on_signals(&mut self) -> Option<ExitCode> {
        for sig in self.signals.drain() {
            match sig {
                Signal::SIGINT | Signal::SIGQUIT => return Some(ExitCode::SUCCESS),
                // The master's heartbeat-timeout signal: KILL follows anyway.
                Signal::SIGABRT => return Some(ExitCode::FAILURE),
                Signal::SIGTERM => self.drain(),
                // HUP, USR1: nothing to reload, no log file of our own.
                _ => {}
            }
        }
        None
    }

    /// Graceful stop: no new connections; busy ones finish, each with
    /// `Connection: close` on its last response; idle ones get DRAIN_GRACE to ask.
    fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        contract::notify("STOPPING=1");
        self.take_queued();
        // Out of the epoll set first: the master holds the same open file
        // descriptions, so closing our fds alone would not remove them from it.
        let _ = self.listen(false);
        self.listeners.clear();
        self.accept_paused_until = None;
        for token in self.conns.tokens() {
            if !self.conns.get(token).is_some_and(Conn::idle) {
                continue;
            }
            // A request may be sitting unread in the socket: answer it rather than
            // close under it. `settle` closes the connection if nothing was there.
            if !self.read(token, false) {
                self.close(token);
                continue;
            }
            self.pump(token);
            if let Some(c) = self.conns.get(token)
                && c.idle()
            {
                self.arm(token, self.now + DRAIN_GRACE);
            }
        }
    }
}

/// The master's own signals, which reach workers too when an operator signals
/// every process of a unit (`systemctl kill` without `--kill-whom=main`, `pkill
/// arbiterd`): by default USR2 kills and TTIN/TTOU stop a process. HUP and USR1
/// go through the self-pipe and are ignored there.
fn ignore_masters_signals() -> nix::Result<()> {
    use nix::sys::signal::{SigHandler, signal};
    for sig in [
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler; nothing runs in signal context.
        unsafe { signal(sig, SigHandler::SigIgn) }?;
    }
    Ok(())
}

/// The common soft limit of 1024 descriptors is below MAX_CONNECTIONS plus our own:
/// raise it as far as the hard limit allows (best effort; EMFILE is handled).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = (MAX_CONNECTIONS + MAX_LISTENERS + 64) as u64;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < want
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    }
}

/// The heartbeat and how often to beat: with a timeout of T seconds, every T/4,
/// within 50 ms..1 s. None without a heartbeat fd or a timeout.
fn heartbeat_from_env() -> Option<(contract::Heartbeat, Duration)> {
    let timeout = std::env::var(contract::ENV_TIMEOUT)
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0)?;
    Some((contract::Heartbeat::from_env()?, beat_interval(timeout)))
}

fn beat_interval(timeout_secs: f64) -> Duration {
    Duration::from_secs_f64((timeout_secs / 4.0).min(1.0))
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval() {
        assert_eq!(beat_interval(30.0), Duration::from_secs(1));
        assert_eq!(beat_interval(2.0), Duration::from_millis(500));
        assert_eq!(beat_interval(0.1), Duration::from_millis(50));
    }
}
