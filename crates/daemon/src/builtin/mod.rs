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
//! TERM: stop accepting, finish in-flight requests (pending sleeps included), close
//! idle keep-alive connections, exit 0. QUIT/INT: exit 0 at once. ABRT: exit 1.
//!
//! Layout: `http.rs` parses a request head and shapes the canned replies (pure,
//! no I/O); `connection.rs` is one connection's buffers and its HTTP session, and
//! the table of connections; `worker.rs` is the epoll loop that accepts, reads,
//! answers, beats and drains; this file boots it (listeners, alarm, heartbeat).

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::EpollFlags;
use nix::sys::signal::{
    SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify, Signal, sigaction,
};
use nix::sys::socket::{self, SockaddrLike, sockopt};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;

use arbiter_proto::worker as contract;

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
mod connection;
mod http;
#[cfg(test)]
mod tests;
mod worker;

use connection::*;
use http::*;
use worker::*;

const MAX_CONNECTIONS: usize = 1024;
/// More inherited fds than this is not a listener set but a mistake.
const MAX_LISTENERS: usize = 256;
/// A request head longer than this is answered 431 and the connection closed.
const MAX_HEAD: usize = 16 * 1024;
/// Responses queued for a client that does not read them: past this, its further
/// requests wait (and reading from it stops) until the socket drains.
const OUTPUT_CAP: usize = 64 * 1024;
/// `/sleep?ms=` cap: ten minutes.
const MAX_SLEEP_MS: u64 = 600_000;
/// One read; also the shared read buffer's size.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per readiness event, so that one fast sender cannot starve the others
/// (the fd stays readable and epoll reports it again).
const READS_PER_EVENT: usize = 16;
/// Connections taken per listener event: with `EPOLLEXCLUSIVE` only some workers
/// are woken, so each takes a few, but not so many that it hoards them.
const ACCEPT_BATCH: usize = 64;
/// Out of descriptors: how long to leave the listeners alone.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// While a batch of accepts runs, SIGALRM comes this often: the longest a blocking
/// accept that lost its connection to another process (between our poll and the
/// accept) keeps the worker from its other connections.
const ACCEPT_ALARM_EVERY: Duration = Duration::from_millis(10);
/// A connection with nothing in progress (idle keep-alive, a head or body that
/// stopped arriving, a client that does not read) is closed after this; without
/// it, MAX_CONNECTIONS silent clients would wedge the worker for good.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are looked for, while there are any connections.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// After an error response (or one followed by bytes we will not answer) we shut
/// down our side and read what the client still sends for this long, so that
/// closing with unread input does not RST the response away before it is read.
const LINGER: Duration = Duration::from_secs(2);
/// On TERM, an idle connection (accepted with no request yet, or keep-alive between
/// requests) gets this long to send one, answered with `Connection: close`: its
/// client connected to be served, and may be sending right now.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Epoll tokens: connections use slab tokens (index in the low 32 bits), which
/// never come near these.
const TOKEN_SIGNALS: u64 = u64::MAX;
const TOKEN_LISTENER_0: u64 = u64::MAX - 1;

const READABLE: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLRDHUP);

pub fn run() -> ExitCode {
    match Worker::boot() {
        Ok(w) => w.serve(),
        Err(msg) => {
            eprintln!("arbiterd builtin worker: {msg}");
            ExitCode::from(contract::EXIT_BOOT_ERROR as u8)
        }
    }
}

// ------------------------------------------------------------------ boot

/// The listening sockets at fds 3.. as systemd's socket activation passes them.
fn inherited_listeners() -> Result<Vec<Listener>, String> {
    let count = std::env::var(contract::ENV_LISTEN_FDS)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if count == 0 {
        return Err("no listening socket: LISTEN_FDS is not set or 0".into());
    }
    if count > MAX_LISTENERS {
        return Err(format!("LISTEN_FDS={count}: more than {MAX_LISTENERS}"));
    }
    let pid = std::env::var(contract::ENV_LISTEN_PID).unwrap_or_default();
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Err(format!(
            "LISTEN_PID={pid:?} is not this process ({}): the sockets are not ours",
            std::process::id()
        ));
    }
    (0..count as RawFd)
        .map(|i| adopt_listener(contract::LISTEN_FDS_START + i))
        .collect()
}

fn adopt_listener(raw: RawFd) -> Result<Listener, String> {
    // SAFETY: F_GETFD on an integer fd has no memory-safety preconditions.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(format!("fd {raw} (from LISTEN_FDS) is not open"));
    }
    // SAFETY: the fd is open (checked above) and the master handed it to this
    // process to own; nothing else in the worker uses fds 3.. .
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match socket::getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(format!("fd {raw} is a socket that is not listening")),
        Err(e) => return Err(format!("fd {raw} is not a listening socket: {e}")),
    }
    let tcp = socket::getsockname::<socket::SockaddrStorage>(raw).is_ok_and(|a| {
        matches!(
            a.family(),
            Some(socket::AddressFamily::Inet | socket::AddressFamily::Inet6)
        )
    });
    Ok(Listener { fd, tcp })
}

/// Whether accept would find something now: a queued connection, or an error
/// (which accept then reports). Never waits.
fn acceptable(fd: BorrowedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => return n > 0,
            // A signal arrived while nothing was ready; look again.
            Err(Errno::EINTR) => continue,
            // Let accept try: the alarm bounds the wait, and saying "nothing" would
            // have the level-triggered listener reported, and polled, in a loop.
            Err(_) => return true,
        }
    }
}

/// SIGALRM every ACCEPT_ALARM_EVERY while armed, with a handler that does nothing
/// but is installed without SA_RESTART: a blocking accept it interrupts returns
/// EINTR instead of being restarted. The self-pipe's handlers use SA_RESTART (an
/// accept they interrupt just goes on waiting), so this is the signal that gets a
/// waiting accept back to the loop.
struct AcceptAlarm {
    pub(super) timer: Timer,
}

extern "C" fn on_alarm(_: libc::c_int) {}

impl AcceptAlarm {
    pub(super) fn install() -> nix::Result<AcceptAlarm> {
        let action = SigAction::new(
            SigHandler::Handler(on_alarm),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe { sigaction(Signal::SIGALRM, &action) }?;
        // The contract hands workers an empty mask; a blocked SIGALRM would leave
        // an accept that lost its race waiting, so make sure.
        SigSet::from(Signal::SIGALRM).thread_unblock()?;
        // To this thread, not the process: the worker has only one, but the unit
        // tests run beside libtest's threads, any of which could take a signal
        // sent to the process and leave the accept waiting.
        #[cfg(target_env = "gnu")]
        let notify = SigevNotify::SigevThreadId {
            signal: Signal::SIGALRM,
            thread_id: nix::unistd::gettid().as_raw(),
            si_value: 0,
        };
        #[cfg(not(target_env = "gnu"))]
        let notify = SigevNotify::SigevSignal {
            signal: Signal::SIGALRM,
            si_value: 0,
        };
        let timer = Timer::new(ClockId::CLOCK_MONOTONIC, SigEvent::new(notify))?;
        Ok(AcceptAlarm { timer })
    }

    /// An interval, not one shot: the batch may outlast the first expiry, and a
    /// signal that lands just before an accept starts waiting is followed by another.
    pub(super) fn arm(&mut self) -> nix::Result<()> {
        let every = TimeSpec::from_duration(ACCEPT_ALARM_EVERY);
        self.timer
            .set(Expiration::Interval(every), TimerSetTimeFlags::empty())
    }

    pub(super) fn disarm(&mut self) {
        // A zero one-shot expiry stops the timer, which cannot fail for a timer we
        // own; were it to, the alarms would only cut epoll_wait short (an empty
        // wake-up), never make anything wait.
        let _ = self.timer.set(
            Expiration::OneShot(TimeSpec::new(0, 0)),
            TimerSetTimeFlags::empty(),
        );
    }
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
