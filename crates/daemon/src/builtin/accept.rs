//! The inherited listeners, and taking connections from them while they stay
//! blocking.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{
    SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify, Signal, sigaction,
};
use nix::sys::socket::{self, SockFlag, SockaddrLike, sockopt};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;

use arbiter_proto::worker as contract;

use super::{MAX_CONNECTIONS, MAX_LISTENERS, TOKEN_LISTENER_0, Worker};

/// Connections taken per listener event: with `EPOLLEXCLUSIVE` only some workers
/// are woken, so each takes a few, but not so many that it hoards them.
const ACCEPT_BATCH: usize = 64;
/// Out of descriptors: how long to leave the listeners alone.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// While a batch of accepts runs, SIGALRM comes this often: the longest a blocking
/// accept that lost its connection to another process (between our poll and the
/// accept) keeps the worker from its other connections.
const ACCEPT_ALARM_EVERY: Duration = Duration::from_millis(10);

pub(super) struct Listener {
    fd: OwnedFd,
    /// TCP (not unix): accepted connections get TCP_NODELAY.
    tcp: bool,
}

impl Worker {
    /// Register (or unregister) the listeners with epoll.
    pub(super) fn listen(&mut self, on: bool) -> nix::Result<()> {
        if on == self.listening {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if on {
                let token = TOKEN_LISTENER_0 - i as u64;
                let exclusive = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                // EEXIST: left in by an earlier pass that failed half-way.
                match self
                    .epoll
                    .add(l.fd.as_fd(), EpollEvent::new(exclusive, token))
                {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    // Kernels before 4.5: thundering herd, but working.
                    Err(Errno::EINVAL) => self
                        .epoll
                        .add(l.fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))?,
                    Err(e) => return Err(e),
                }
            } else {
                match self.epoll.delete(l.fd.as_fd()) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.listening = on;
        Ok(())
    }

    pub(super) fn update_listening(&mut self) {
        let want = !self.draining
            && self.accept_paused_until.is_none()
            && self.conns.len() < MAX_CONNECTIONS;
        if let Err(e) = self.listen(want) {
            eprintln!("arbiterd builtin worker: epoll (listeners): {e}");
        }
    }

    /// Take up to ACCEPT_BATCH connections from a listener that is blocking (see
    /// the module docs) without ever waiting on it: each accept follows a poll that
    /// saw a connection queued, and since another worker may take that connection
    /// first, the batch runs with the alarm armed, which turns an accept left
    /// waiting into EINTR within ACCEPT_ALARM_EVERY.
    pub(super) fn accept(&mut self, index: usize) {
        self.accept_up_to(index, ACCEPT_BATCH);
    }

    /// On TERM, before letting go of the listeners: take what waits in their
    /// queues, since once the last process holding a socket closes it, whatever
    /// waits there is reset. At most as many as each held when asked (so a flood
    /// cannot keep a stopping worker), and never past MAX_CONNECTIONS.
    pub(super) fn take_queued(&mut self) {
        for index in 0..self.listeners.len() {
            let fd = self.listeners[index].fd.as_fd();
            let mut budget = crate::queue::of(fd).map_or(ACCEPT_BATCH, |q| q.len as usize);
            while budget > 0 && self.conns.len() < MAX_CONNECTIONS {
                let taken =
                    self.accept_up_to(index, budget.min(MAX_CONNECTIONS - self.conns.len()));
                if taken == 0 {
                    break;
                }
                budget = budget.saturating_sub(taken);
            }
        }
    }

    /// The accepts of [`accept`](Self::accept), at most `most`; how many it took.
    fn accept_up_to(&mut self, index: usize, most: usize) -> usize {
        let mut armed = false;
        let mut taken = 0;
        for _ in 0..most {
            let Some(l) = self.listeners.get(index) else {
                break;
            };
            if !self.listening || !acceptable(l.fd.as_fd()) {
                break;
            }
            if !armed {
                if let Err(e) = self.alarm.arm() {
                    // Unguarded, an accept could wait for good: leave the listeners
                    // alone for a moment, as for any accept error.
                    self.accept_failed(e);
                    break;
                }
                armed = true;
            }
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            match socket::accept4(l.fd.as_raw_fd(), flags) {
                Ok(fd) => {
                    // SAFETY: accept4 just returned this fd; nothing else owns it.
                    // (nix 0.31's accept4 hands back a RawFd, so this stays unsafe.)
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if l.tcp {
                        // Pipelined responses must not wait on the client's delayed ACK.
                        let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
                    }
                    self.adopt(fd);
                    taken += 1;
                }
                // EINTR: the alarm, so another process took the connection we saw;
                // EAGAIN: someone else made the listener non-blocking. Either way the
                // queue is empty, and epoll says when it is not.
                Err(Errno::EINTR | Errno::EAGAIN) => break,
                // The connection died in the queue, or a network error that accept(2)
                // says to treat as a retry.
                Err(
                    Errno::ECONNABORTED
                    | Errno::EPROTO
                    | Errno::ENETDOWN
                    | Errno::ENOPROTOOPT
                    | Errno::EHOSTDOWN
                    | Errno::ENONET
                    | Errno::EHOSTUNREACH
                    | Errno::EOPNOTSUPP
                    | Errno::ENETUNREACH,
                ) => continue,
                Err(e) => {
                    self.accept_failed(e);
                    break;
                }
            }
        }
        if armed {
            self.alarm.disarm();
        }
        taken
    }

    /// Out of descriptors or memory, or worse: the connection stays queued and the
    /// listener readable, so stop asking for a moment instead of spinning.
    fn accept_failed(&mut self, e: Errno) {
        let expected = matches!(
            e,
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        );
        if !expected && !self.accept_error_reported {
            self.accept_error_reported = true;
            eprintln!("arbiterd builtin worker: accept: {e}");
        }
        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
        self.update_listening();
    }
}

/// The listening sockets at fds 3.. as systemd's socket activation passes them.
pub(super) fn inherited_listeners() -> Result<Vec<Listener>, String> {
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
    // nix's getsockname takes a raw fd, safely: EBADF tells a closed fd before it
    // is owned, and on a socket the address says whether it is TCP.
    let name = socket::getsockname::<socket::SockaddrStorage>(raw);
    if matches!(name, Err(Errno::EBADF)) {
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
    let tcp = name.is_ok_and(|a| {
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
pub(super) struct AcceptAlarm {
    timer: Timer,
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
    fn arm(&mut self) -> nix::Result<()> {
        let every = TimeSpec::from_duration(ACCEPT_ALARM_EVERY);
        self.timer
            .set(Expiration::Interval(every), TimerSetTimeFlags::empty())
    }

    fn disarm(&mut self) {
        // A zero one-shot expiry stops the timer, which cannot fail for a timer we
        // own; were it to, the alarms would only cut epoll_wait short (an empty
        // wake-up), never make anything wait.
        let _ = self.timer.set(
            Expiration::OneShot(TimeSpec::new(0, 0)),
            TimerSetTimeFlags::empty(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_nonblocking(fd: BorrowedFd) -> bool {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        flags.contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn acceptable_sees_a_queued_connection_without_waiting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!acceptable(l.as_fd()), "nothing queued yet");
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // The handshake completes inside connect() on loopback, but nothing promises it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !acceptable(l.as_fd()) {
            assert!(Instant::now() < deadline, "the connection never showed");
            std::thread::yield_now();
        }
        let (_conn, _) = l.accept().unwrap();
        assert!(!acceptable(l.as_fd()), "the only connection was taken");
        assert!(!is_nonblocking(l.as_fd()), "polling changed the listener");
    }

    #[test]
    fn the_alarm_gets_a_waiting_accept_back() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Should the alarm not work, a connection ends the wait, and the test fails
        // on the accept's result instead of hanging.
        let (done, watch) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if watch.recv_timeout(Duration::from_secs(5)).is_err() {
                let _ = std::net::TcpStream::connect(addr);
            }
        });
        let mut alarm = AcceptAlarm::install().unwrap();
        for round in 0..2 {
            let start = Instant::now();
            alarm.arm().unwrap();
            let got = socket::accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC);
            alarm.disarm();
            let took = start.elapsed();
            assert_eq!(got, Err(Errno::EINTR), "round {round}, after {took:?}");
            assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
        }
        assert!(!is_nonblocking(l.as_fd()));
        let _ = done.send(());
        watchdog.join().unwrap();
    }
}
