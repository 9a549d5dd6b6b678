//! The built-in HTTP worker: what `arbiterd` runs with no COMMAND.
//!
//! The master execs its own binary as `arbiterd --builtin-worker`; from then on this
//! is a worker like any other (listeners at fds 3.., `LISTEN_PID`, a heartbeat fd,
//! `NOTIFY_SOCKET`). It is also the benchmark worker, so it is lean: one thread, one
//! epoll loop, non-blocking sockets, listeners registered with `EPOLLEXCLUSIVE` so N
//! workers sharing a socket do not all wake for each connection, a bounded number of
//! connections, and canned responses.
//!
//! - `GET /` answers `{"pid":P,"worker_id":I,"slot":S,"generation":G}`;
//! - `GET /sleep?ms=N` answers the same after N ms (a timer, never a blocked loop);
//! - `GET /health` answers `ok`.
//!
//! TERM: stop accepting, finish in-flight requests (pending sleeps included), close
//! idle keep-alive connections, exit 0. QUIT/INT: exit 0 at once. ABRT: exit 1.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::Signal;
use nix::sys::socket::{self, MsgFlags, SockFlag};

use arbiter_proto::worker as contract;

use crate::signals::SignalPipe;

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest).
const MAX_CONNECTIONS: usize = 1024;
/// A request head longer than this is answered 431 and the connection closed.
const MAX_HEAD: usize = 16 * 1024;
/// A request body longer than this is answered 413 and the connection closed.
const MAX_BODY: usize = 1024 * 1024;
/// While draining, how long a connection accepted but still silent may take to send
/// its request before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// `/sleep?ms=` cap.
const MAX_SLEEP_MS: u64 = 600_000;

const TOKEN_SIGNALS: u64 = 0;
const TOKEN_LISTENER_BASE: u64 = 1;
/// Connection tokens start above every possible listener token.
const TOKEN_CONN_BASE: u64 = 1 << 20;

pub fn run() -> ExitCode {
    match Worker::boot() {
        Ok(mut w) => w.serve(),
        Err(msg) => {
            eprintln!("arbiterd builtin worker: {msg}");
            ExitCode::from(contract::EXIT_BOOT_ERROR as u8)
        }
    }
}

fn env_u64(key: &str) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Parsed request head: just what routing and keep-alive need.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: Method,
    route: Route,
    keep_alive: bool,
    http10: bool,
    /// Bytes of body after the head.
    body: usize,
    /// Bytes of head, blank line included.
    head_len: usize,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Method {
    Get,
    Head,
    Other,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Route {
    Root,
    Sleep(u64),
    BadSleep,
    Health,
    NotFound,
}

#[derive(Debug, PartialEq, Eq)]
enum Parse {
    /// Need more bytes.
    Partial,
    Request(Head),
    /// Answer with this status and close.
    Reject(u16),
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn route_of(target: &[u8]) -> Route {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    match path {
        b"/" => Route::Root,
        b"/health" => Route::Health,
        b"/sleep" => {
            let ms = query
                .split(|&b| b == b'&')
                .find_map(|kv| kv.strip_prefix(b"ms="));
            match ms
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                Some(ms) if ms <= MAX_SLEEP_MS => Route::Sleep(ms),
                _ => Route::BadSleep,
            }
        }
        _ => Route::NotFound,
    }
}

/// Parse one request at the start of `buf`.
fn parse(buf: &[u8]) -> Parse {
    let Some(head_len) = find_head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Parse::Reject(431)
        } else {
            Parse::Partial
        };
    };
    if head_len > MAX_HEAD {
        return Parse::Reject(431);
    }
    let head = &buf[..head_len - 4];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(request_line) = lines.next() else {
        return Parse::Reject(400);
    };
    let mut parts = request_line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Reject(400);
    };
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Parse::Reject(400),
    };
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        m if m.iter().all(|b| b.is_ascii_uppercase()) => Method::Other,
        _ => return Parse::Reject(400),
    };
    let mut keep_alive = !http10;
    let mut body = 0usize;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Parse::Reject(400);
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                Some(n) if n <= MAX_BODY => body = n,
                Some(_) => return Parse::Reject(413),
                None => return Parse::Reject(400),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked request bodies are not worth supporting here.
            return Parse::Reject(411);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    Parse::Request(Head {
        method,
        route: route_of(target),
        keep_alive,
        http10,
        body,
        head_len,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// Append a whole response to `out`.
fn respond(
    out: &mut Vec<u8>,
    status: u16,
    ctype: &str,
    body: &[u8],
    keep_alive: bool,
    http10: bool,
    head_only: bool,
) {
    use std::io::Write;
    let conn = match (keep_alive, http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{conn}\r\n",
        reason(status),
        body.len()
    );
    if !head_only {
        out.extend_from_slice(body);
    }
}

struct Conn {
    fd: OwnedFd,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A `/sleep` in progress: no further request is read until it is answered.
    sleeping: bool,
    /// The last response is queued (or the peer is done): close once flushed.
    close_after: bool,
    /// What epoll watches for it now.
    interest: EpollFlags,
    /// The peer finished sending: answer what it asked, then close.
    eof: bool,
    /// Requests answered on this connection. A connection that has not sent its
    /// first request yet is not idle: its client is about to.
    served: u32,
}

impl Conn {
    /// Between requests of a keep-alive connection: nothing asked, nothing owed.
    fn idle(&self) -> bool {
        self.served > 0 && self.input.is_empty() && self.output.is_empty() && !self.sleeping
    }
}

struct Sleeper {
    conn: u64,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
}

struct Worker {
    epoll: Epoll,
    signals: SignalPipe,
    listeners: Vec<OwnedFd>,
    listening: bool,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    sleepers: HashMap<u64, Sleeper>,
    next_timer: u64,
    heartbeat: Option<contract::Heartbeat>,
    beat_every: Option<Duration>,
    next_beat: Option<Instant>,
    draining: bool,
    /// While draining: when connections that are still silent get closed.
    drain_deadline: Option<Instant>,
    /// Accepting paused after EMFILE/ENFILE until this moment.
    accept_paused_until: Option<Instant>,
    body: Vec<u8>,
}

impl Worker {
    fn boot() -> Result<Worker, String> {
        let listen_pid = env_u64(contract::ENV_LISTEN_PID);
        if listen_pid != u64::from(std::process::id()) {
            return Err(format!(
                "LISTEN_PID ({listen_pid}) is not this process ({}): no sockets for me",
                std::process::id()
            ));
        }
        let count = env_u64(contract::ENV_LISTEN_FDS);
        if count == 0 || count > 1024 {
            return Err("LISTEN_FDS names no listening socket".into());
        }
        let signals = SignalPipe::install(&[
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGABRT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ])
        .map_err(|e| format!("signals: {e}"))?;
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        epoll
            .add(
                signals.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNALS),
            )
            .map_err(|e| format!("epoll: {e}"))?;
        let mut listeners = Vec::new();
        for i in 0..count as RawFd {
            let raw = contract::LISTEN_FDS_START + i;
            // SAFETY: the master placed our listeners at fds 3..3+LISTEN_FDS for us.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // Our own descriptor table is not shared, but O_NONBLOCK is on the open
            // file description: the master never accepts, so setting it is ours to do.
            set_nonblocking(&fd).map_err(|e| format!("fd {raw}: {e}"))?;
            listeners.push(fd);
        }
        let timeout = std::env::var(contract::ENV_TIMEOUT)
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|t| *t > 0.0 && t.is_finite());
        let heartbeat = timeout.and(contract::Heartbeat::from_env());
        let beat_every = heartbeat.as_ref().and(timeout).map(|t| {
            Duration::from_secs_f64(t / 4.0)
                .clamp(Duration::from_millis(50), Duration::from_secs(1))
        });
        let body = format!(
            "{{\"pid\":{},\"worker_id\":{},\"slot\":{},\"generation\":{}}}",
            std::process::id(),
            env_u64(contract::ENV_WORKER_ID),
            env_u64(contract::ENV_SLOT),
            env_u64(contract::ENV_GENERATION)
        )
        .into_bytes();
        let mut w = Worker {
            epoll,
            signals,
            listeners,
            listening: false,
            conns: HashMap::new(),
            next_conn: TOKEN_CONN_BASE,
            timers: BinaryHeap::new(),
            sleepers: HashMap::new(),
            next_timer: 0,
            heartbeat,
            beat_every,
            next_beat: None,
            draining: false,
            drain_deadline: None,
            accept_paused_until: None,
            body,
        };
        w.listen(true).map_err(|e| format!("epoll: {e}"))?;
        Ok(w)
    }

    /// Register (or unregister) the listeners with epoll.
    fn listen(&mut self, on: bool) -> nix::Result<()> {
        if on == self.listening {
            return Ok(());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if on {
                let ev = EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
                    TOKEN_LISTENER_BASE + i as u64,
                );
                self.epoll.add(l.as_fd(), ev)?;
            } else {
                self.epoll.delete(l.as_fd())?;
            }
        }
        self.listening = on;
        Ok(())
    }

    fn serve(&mut self) -> ExitCode {
        contract::notify("READY=1");
        self.beat();
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            if self.draining && self.conns.is_empty() {
                return ExitCode::SUCCESS;
            }
            let timeout = self.poll_timeout();
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    eprintln!("arbiterd builtin worker: epoll_wait: {e}");
                    return ExitCode::from(1);
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                let flags = ev.events();
                if token == TOKEN_SIGNALS {
                    if let Some(code) = self.on_signals() {
                        return code;
                    }
                } else if token < TOKEN_CONN_BASE {
                    self.accept((token - TOKEN_LISTENER_BASE) as usize);
                } else {
                    self.on_conn(token, flags);
                }
            }
            let now = Instant::now();
            self.fire_timers(now);
            if self.next_beat.is_some_and(|t| now >= t) {
                self.beat();
            }
            if self.drain_deadline.is_some_and(|t| now >= t) {
                self.drain_deadline = None;
                let silent: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.input.is_empty() && c.output.is_empty() && !c.sleeping)
                    .map(|(&id, _)| id)
                    .collect();
                for id in silent {
                    self.close(id);
                }
            }
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                self.update_listening();
            }
        }
    }

    fn poll_timeout(&self) -> EpollTimeout {
        let now = Instant::now();
        let mut next: Option<Instant> = self.timers.peek().map(|Reverse((t, _))| *t);
        for t in [self.next_beat, self.accept_paused_until]
            .into_iter()
            .flatten()
        {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        match next {
            None => EpollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                EpollTimeout::try_from(ms.min(i32::MAX as u128) as i32)
                    .unwrap_or(EpollTimeout::NONE)
            }
        }
    }

    fn beat(&mut self) {
        if let (Some(hb), Some(every)) = (&mut self.heartbeat, self.beat_every) {
            hb.beat();
            self.next_beat = Some(Instant::now() + every);
        }
    }

    /// Returns an exit code when a signal says to exit now.
    fn on_signals(&mut self) -> Option<ExitCode> {
        for sig in self.signals.drain() {
            match sig {
                Signal::SIGINT | Signal::SIGQUIT => return Some(ExitCode::SUCCESS),
                Signal::SIGABRT => return Some(ExitCode::from(1)),
                Signal::SIGTERM if !self.draining => self.drain(),
                _ => {}
            }
        }
        None
    }

    /// Graceful stop: no new connections; idle ones closed; busy ones finish.
    fn drain(&mut self) {
        self.draining = true;
        let _ = self.listen(false);
        // Take what is already queued for us: an EPOLLEXCLUSIVE wakeup we consumed
        // would otherwise leave those connections waiting for the next arrival to
        // wake another worker. They are served like any other, then closed.
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
        // Closing our copies: the master and other workers keep theirs.
        self.listeners.clear();
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.idle())
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.close(id);
        }
        // The others finish: `draining` makes their next response the last one.
        // (Marking them finished here would close a connection whose request is
        // still arriving, and its client would see a reset.)
        // A connection that never sends its request must not hold the exit forever.
        self.drain_deadline = Some(Instant::now() + FIRST_REQUEST_GRACE);
    }

    fn accept(&mut self, index: usize) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        let raw = listener.as_raw_fd();
        // A bounded batch: with EPOLLEXCLUSIVE one worker is woken, so it takes a few.
        for _ in 0..64 {
            if self.conns.len() >= MAX_CONNECTIONS {
                break;
            }
            match socket::accept4(raw, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new fd that we now own.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let id = self.next_conn;
                    self.next_conn += 1;
                    let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, id);
                    if self.epoll.add(fd.as_fd(), ev).is_err() {
                        continue;
                    }
                    self.conns.insert(
                        id,
                        Conn {
                            fd,
                            input: Vec::new(),
                            output: Vec::new(),
                            sleeping: false,
                            close_after: false,
                            interest: EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
                            eof: false,
                            served: 0,
                        },
                    );
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                Err(
                    nix::errno::Errno::EMFILE
                    | nix::errno::Errno::ENFILE
                    | nix::errno::Errno::ENOBUFS
                    | nix::errno::Errno::ENOMEM,
                ) => {
                    // Out of descriptors: stop asking for a moment instead of spinning.
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
                Err(_) => break,
            }
        }
        self.update_listening();
    }

    fn update_listening(&mut self) {
        let want = !self.draining
            && self.accept_paused_until.is_none()
            && self.conns.len() < MAX_CONNECTIONS;
        let _ = self.listen(want);
    }

    fn on_conn(&mut self, id: u64, flags: EpollFlags) {
        // HUP/ERR are reported whatever we ask for: the peer is gone both ways and
        // nothing more can be delivered.
        if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            self.close(id);
            return;
        }
        let readable = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        let eof = self.conns.get(&id).is_some_and(|c| c.eof);
        if flags.intersects(readable) && !eof && !self.read(id) {
            self.close(id);
            return;
        }
        self.process(id);
        if !self.flush(id) {
            self.close(id);
        }
    }

    /// Read what is there. False: the peer is gone (or broke the protocol).
    fn read(&mut self, id: u64) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            match nix::unistd::read(&c.fd, &mut buf) {
                Ok(0) => {
                    // The fd stays readable at EOF: stop watching for input, or a
                    // pending /sleep would spin the loop.
                    c.eof = true;
                    c.close_after = true;
                    return !c.idle();
                }
                Ok(n) => {
                    c.input.extend_from_slice(&buf[..n]);
                    if c.input.len() > MAX_HEAD + MAX_BODY {
                        return false;
                    }
                    if n < buf.len() {
                        return true;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Answer every complete request in the buffer, in order.
    fn process(&mut self, id: u64) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.sleeping || c.close_after && c.input.is_empty() {
                return;
            }
            let head = match parse(&c.input) {
                Parse::Partial => return,
                Parse::Reject(status) => {
                    respond(
                        &mut c.output,
                        status,
                        "text/plain",
                        reason(status).as_bytes(),
                        false,
                        false,
                        false,
                    );
                    c.input.clear();
                    c.close_after = true;
                    return;
                }
                Parse::Request(h) => h,
            };
            if c.input.len() < head.head_len + head.body {
                return;
            }
            c.input.drain(..head.head_len + head.body);
            c.served += 1;
            let keep_alive = head.keep_alive && !self.draining && !c.close_after;
            if !keep_alive {
                c.close_after = true;
            }
            let head_only = head.method == Method::Head;
            match (head.method, head.route) {
                (Method::Other, Route::NotFound) | (_, Route::NotFound) => respond(
                    &mut c.output,
                    404,
                    "text/plain",
                    b"not found\n",
                    keep_alive,
                    head.http10,
                    head_only,
                ),
                (Method::Other, _) => respond(
                    &mut c.output,
                    405,
                    "text/plain",
                    b"method not allowed\n",
                    keep_alive,
                    head.http10,
                    head_only,
                ),
                (_, Route::Root) => respond(
                    &mut c.output,
                    200,
                    "application/json",
                    &self.body,
                    keep_alive,
                    head.http10,
                    head_only,
                ),
                (_, Route::Health) => respond(
                    &mut c.output,
                    200,
                    "text/plain",
                    b"ok",
                    keep_alive,
                    head.http10,
                    head_only,
                ),
                (_, Route::BadSleep) => respond(
                    &mut c.output,
                    400,
                    "text/plain",
                    b"expected /sleep?ms=N\n",
                    keep_alive,
                    head.http10,
                    head_only,
                ),
                (_, Route::Sleep(ms)) => {
                    c.sleeping = true;
                    let key = self.next_timer;
                    self.next_timer += 1;
                    self.timers
                        .push(Reverse((Instant::now() + Duration::from_millis(ms), key)));
                    self.sleepers.insert(
                        key,
                        Sleeper {
                            conn: id,
                            keep_alive,
                            http10: head.http10,
                            head_only,
                        },
                    );
                    return;
                }
            }
            if !keep_alive {
                c.input.clear();
                return;
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, key))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sleepers.remove(&key) else {
                continue;
            };
            let draining = self.draining;
            let Some(c) = self.conns.get_mut(&s.conn) else {
                continue;
            };
            c.sleeping = false;
            let keep_alive = s.keep_alive && !draining;
            if !keep_alive {
                c.close_after = true;
            }
            respond(
                &mut c.output,
                200,
                "application/json",
                &self.body,
                keep_alive,
                s.http10,
                s.head_only,
            );
            self.process(s.conn);
            if !self.flush(s.conn) {
                self.close(s.conn);
            }
        }
    }

    /// Write what is queued. False: the connection is finished (closed by us or the
    /// peer) and must be dropped.
    fn flush(&mut self, id: u64) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        while !c.output.is_empty() {
            match socket::send(c.fd.as_raw_fd(), &c.output, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
        let mut flags = EpollFlags::empty();
        if !c.eof {
            flags |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        }
        if !c.output.is_empty() {
            flags |= EpollFlags::EPOLLOUT;
        }
        if flags != c.interest {
            let _ = self
                .epoll
                .modify(c.fd.as_fd(), &mut EpollEvent::new(flags, id));
            c.interest = flags;
        }
        !(c.output.is_empty() && !c.sleeping && c.close_after)
    }

    fn close(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = self.epoll.delete(c.fd.as_fd());
        }
        self.update_listening();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Head {
        match parse(s.as_bytes()) {
            Parse::Request(h) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn routes_and_keep_alive() {
        let h = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (h.method, h.route, h.keep_alive, h.body),
            (Method::Get, Route::Root, true, 0)
        );
        let h = req("GET /sleep?ms=250 HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!((h.route, h.keep_alive), (Route::Sleep(250), false));
        assert_eq!(
            req("GET /sleep?ms=x HTTP/1.1\r\n\r\n").route,
            Route::BadSleep
        );
        assert_eq!(req("GET /sleep HTTP/1.1\r\n\r\n").route, Route::BadSleep);
        assert_eq!(
            req("GET /sleep?ms=999999999 HTTP/1.1\r\n\r\n").route,
            Route::BadSleep
        );
        assert_eq!(req("GET /nope HTTP/1.1\r\n\r\n").route, Route::NotFound);
        assert_eq!(req("HEAD /health HTTP/1.1\r\n\r\n").method, Method::Head);
        let h = req("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive && h.http10);
        assert!(req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").body,
            5
        );
    }

    #[test]
    fn partial_pipelined_and_bad() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost"), Parse::Partial);
        let two = b"GET / HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n";
        let h = req(std::str::from_utf8(two).unwrap());
        assert_eq!(h.head_len, 18);
        assert_eq!(
            parse(&two[h.head_len..]),
            Parse::Request(req("GET /health HTTP/1.1\r\n\r\n"))
        );
        assert_eq!(parse(b"garbage\r\n\r\n"), Parse::Reject(400));
        assert_eq!(parse(b"GET / HTTP/2\r\n\r\n"), Parse::Reject(400));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            Parse::Reject(400)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Parse::Reject(400)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parse::Reject(411)
        );
        assert_eq!(parse(&vec![b'a'; MAX_HEAD + 1]), Parse::Reject(431));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Parse::Reject(413)
        );
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        respond(&mut out, 200, "text/plain", b"ok", true, false, false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
        );
        out.clear();
        respond(&mut out, 404, "text/plain", b"x", false, false, true);
        assert!(out.ends_with(b"Connection: close\r\n\r\n"));
    }
}
