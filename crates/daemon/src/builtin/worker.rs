use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::Signal;
use nix::sys::socket::{self, Shutdown, SockFlag, sockopt};

use arbiter_proto::worker as contract;

use crate::signals::SignalPipe;

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
use super::*;

// ------------------------------------------------------------------ the worker

pub(super) struct Listener {
    pub(super) fd: OwnedFd,
    /// TCP (not unix): accepted connections get TCP_NODELAY.
    pub(super) tcp: bool,
}

pub(super) struct Worker {
    pub(super) epoll: Epoll,
    pub(super) signals: SignalPipe,
    /// Armed only during a batch of accepts; see [`AcceptAlarm`].
    pub(super) alarm: AcceptAlarm,
    pub(super) listeners: Vec<Listener>,
    /// The listeners are in the epoll set.
    pub(super) listening: bool,
    pub(super) conns: Slab,
    /// Connection deadlines, soonest first; see `Conn::deadline`.
    pub(super) timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pub(super) replies: Replies,
    pub(super) read_buf: Box<[u8]>,
    pub(super) heartbeat: Option<(contract::Heartbeat, Duration)>,
    pub(super) next_beat: Option<Instant>,
    pub(super) accept_paused_until: Option<Instant>,
    pub(super) accept_error_reported: bool,
    pub(super) next_sweep: Option<Instant>,
    pub(super) draining: bool,
    /// The clock as of the last wake-up: good enough for activity stamps.
    pub(super) now: Instant,
}

impl Worker {
    pub(super) fn boot() -> Result<Worker, String> {
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
            conns: Slab::default(),
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
        };
        w.listen(true).map_err(|e| format!("epoll: {e}"))?;
        Ok(w)
    }

    pub(super) fn serve(mut self) -> ExitCode {
        // Best effort: without a notify socket the master counts exec as ready.
        contract::notify("READY=1");
        let mut events = [EpollEvent::empty(); 256];
        loop {
            self.on_time();
            if self.draining && self.conns.is_empty() {
                return ExitCode::SUCCESS;
            }
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
    pub(super) fn on_time(&mut self) {
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

    /// Until the next thing due; forever when nothing is (an idle worker without a
    /// heartbeat timeout never wakes up on its own).
    pub(super) fn poll_timeout(&self) -> EpollTimeout {
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
    pub(super) fn on_signals(&mut self) -> Option<ExitCode> {
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
    pub(super) fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        contract::notify("STOPPING=1");
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
        let mut armed = false;
        for _ in 0..ACCEPT_BATCH {
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
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if l.tcp {
                        // Pipelined responses must not wait on the client's delayed ACK.
                        let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
                    }
                    self.adopt(fd);
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
    }

    /// Out of descriptors or memory, or worse: the connection stays queued and the
    /// listener readable, so stop asking for a moment instead of spinning.
    pub(super) fn accept_failed(&mut self, e: Errno) {
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

    pub(super) fn adopt(&mut self, fd: OwnedFd) {
        let now = self.now;
        let token = self.conns.insert(Conn {
            fd,
            input: Vec::new(),
            session: Session::default(),
            eof: false,
            lingering: false,
            deadline: None,
            last_active: now,
            interest: READABLE,
        });
        let Some(c) = self.conns.get(token) else {
            return;
        };
        if self
            .epoll
            .add(c.fd.as_fd(), EpollEvent::new(READABLE, token))
            .is_err()
        {
            self.conns.remove(token);
            return;
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.update_listening();
        }
    }

    pub(super) fn on_conn(&mut self, token: u64, flags: EpollFlags) {
        let Some(reading) = self.conns.get(token).map(Conn::reading) else {
            // Closed earlier in this batch.
            return;
        };
        // ERR: reset. HUP: both directions are shut, nothing can be delivered; and
        // level-triggered HUP would be reported again on every wait.
        if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            self.close(token);
            return;
        }
        if flags.intersects(READABLE) && reading {
            let to_eof = flags.contains(EpollFlags::EPOLLRDHUP);
            if !self.read(token, to_eof) {
                self.close(token);
                return;
            }
        }
        self.pump(token);
    }

    /// Read what the peer sent and serve it. False: the connection is broken.
    /// With `to_eof` (the peer sent FIN) keep reading until EOF shows, so that the
    /// connection can be closed right after its last answer.
    pub(super) fn read(&mut self, token: u64, to_eof: bool) -> bool {
        for _ in 0..READS_PER_EVENT {
            let Some(c) = self.conns.get_mut(token) else {
                return false;
            };
            if !c.reading() {
                return true;
            }
            match nix::unistd::read(&c.fd, &mut self.read_buf) {
                Ok(0) => {
                    c.eof = true;
                    return true;
                }
                Ok(n) => {
                    c.last_active = self.now;
                    self.feed(token, n);
                    if n < READ_CHUNK && !to_eof {
                        // Drained: skip the read that would only say EAGAIN.
                        return true;
                    }
                }
                Err(Errno::EAGAIN) => return true,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
        true
    }

    /// Take `n` fresh bytes from the shared read buffer.
    pub(super) fn feed(&mut self, token: u64, n: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let data = &self.read_buf[..n];
        if c.lingering {
            return;
        }
        if !c.input.is_empty() {
            // Behind earlier bytes: `pump` serves them together.
            c.input.extend_from_slice(data);
            return;
        }
        // The common case: whole requests, served straight from the shared buffer.
        let cx = Ctx {
            replies: &self.replies,
            draining: self.draining,
        };
        let (used, sleep) = c.session.serve(data, &cx);
        c.input.extend_from_slice(&data[used..]);
        if let Some(d) = sleep {
            self.arm(token, Instant::now() + d);
        }
    }

    /// Serve buffered requests, send what is queued, then close the connection or
    /// watch it for what it needs next.
    pub(super) fn pump(&mut self, token: u64) {
        loop {
            let Some(c) = self.conns.get_mut(token) else {
                return;
            };
            let mut sleep = None;
            if !c.input.is_empty() && !c.lingering {
                let cx = Ctx {
                    replies: &self.replies,
                    draining: self.draining,
                };
                let (used, started) = c.session.serve(&c.input, &cx);
                c.input.drain(..used);
                sleep = started;
            }
            // Stopped only because too much output was queued: go on once it is sent.
            let blocked_on_output = c.session.output.len() >= OUTPUT_CAP
                && c.session.wait == Wait::Ready
                && !c.session.close_after;
            if c.flush(self.now).is_err() {
                self.close(token);
                return;
            }
            let again = blocked_on_output && c.session.output.is_empty() && !c.input.is_empty();
            if let Some(d) = sleep {
                self.arm(token, Instant::now() + d);
            }
            if !again {
                break;
            }
        }
        self.settle(token);
    }

    /// After I/O: close the connection if it is done, else update what epoll
    /// watches for it.
    pub(super) fn settle(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.session.output.is_empty() {
            if c.lingering {
                if c.eof {
                    self.close(token);
                    return;
                }
            } else if c.session.close_after {
                if !c.session.linger || c.eof {
                    self.close(token);
                    return;
                }
                let _ = socket::shutdown(c.fd.as_raw_fd(), Shutdown::Write);
                c.lingering = true;
                c.input = Vec::new();
                self.arm(token, self.now + LINGER);
            } else if c.eof && !c.sleeping() {
                // Nothing more is coming, and nothing is owed.
                self.close(token);
                return;
            } else if self.draining && c.idle() && c.deadline.is_none() {
                // An idle keep-alive connection: its client may be sending the
                // next request right now. Closing under it would fail that
                // request; answering it (with `Connection: close`) sends the client
                // to another worker. Closed at the grace's end if nothing comes.
                self.arm(token, self.now + DRAIN_GRACE);
            }
        }
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let wanted = c.wanted_interest();
        if wanted != c.interest {
            // Failure only if the fd is gone from the set, which we never do.
            let _ = self
                .epoll
                .modify(c.fd.as_fd(), &mut EpollEvent::new(wanted, token));
            c.interest = wanted;
        }
    }

    /// Give the connection a deadline (it replaces any earlier one).
    pub(super) fn arm(&mut self, token: u64, at: Instant) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.deadline = Some(at);
        self.timers.push(Reverse((at, token)));
        // Deadlines replaced or of closed connections stay in the heap until due:
        // weed them out before they outnumber the live ones.
        if self.timers.len() > 64 + 2 * self.conns.len() {
            let conns = &self.conns;
            self.timers.retain(|Reverse((t, tok))| {
                conns.get(*tok).is_some_and(|c| c.deadline == Some(*t))
            });
        }
    }

    pub(super) fn on_deadline(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.deadline = None;
        if c.lingering {
            self.close(token);
        } else if c.sleeping() {
            let cx = Ctx {
                replies: &self.replies,
                draining: self.draining,
            };
            c.session.wake(&cx);
            c.last_active = self.now;
            self.pump(token);
        } else if self.draining && c.idle() {
            // The drain grace of a connection that never sent a request.
            self.close(token);
        }
    }

    /// Close connections that have done nothing for IDLE_TIMEOUT (a sleeping one
    /// is waiting on us, not idle).
    pub(super) fn sweep(&mut self) {
        if let Some(cutoff) = self.now.checked_sub(IDLE_TIMEOUT) {
            for token in self.conns.tokens() {
                if self
                    .conns
                    .get(token)
                    .is_some_and(|c| !c.sleeping() && c.last_active < cutoff)
                {
                    self.close(token);
                }
            }
        }
        self.next_sweep = (!self.conns.is_empty()).then(|| self.now + SWEEP_EVERY);
    }

    pub(super) fn close(&mut self, token: u64) {
        // Dropping the fd also takes it out of the epoll set: a connection's open
        // file description is ours alone.
        if self.conns.remove(token).is_none() {
            return;
        }
        if self.conns.is_empty() {
            // Nothing left to time: an idle worker must not wake up for stale entries.
            self.timers.clear();
            self.next_sweep = None;
        }
        if self.conns.len() + 1 == MAX_CONNECTIONS {
            self.update_listening();
        }
    }
}
