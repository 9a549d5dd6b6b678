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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{
    SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify, Signal, sigaction,
};
use nix::sys::socket::{self, MsgFlags, Shutdown, SockFlag, SockaddrLike, sockopt};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;

use arbiter_proto::worker as contract;

use crate::signals::SignalPipe;

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
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

// ------------------------------------------------------------------ requests

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Method {
    Get,
    Head,
    Other,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Route {
    Root,
    Health,
    Sleep(u64),
    BadSleep,
    NotFound,
}

/// What a request head says, as far as routing, framing and keep-alive care.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Request {
    method: Method,
    route: Route,
    keep_alive: bool,
    http10: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before its body.
    expect_continue: bool,
    /// `Content-Length`: body bytes after the head, read and discarded.
    body: u64,
    /// Bytes of head, final blank line (and any CRLFs before it) included.
    head_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Parse {
    /// The head is not complete yet.
    Partial,
    Request(Request),
    /// Answer with this status and close.
    Reject(u16),
}

/// Parse the request at the start of `buf`. `scan_from` is how far an earlier
/// call already searched `buf` for the end of the head, so that a head arriving a
/// byte at a time is not searched from the start each time.
fn parse(buf: &[u8], scan_from: usize) -> Parse {
    // RFC 9112 2.2: empty lines before a request line are ignored (some clients
    // send a CRLF after a body).
    let skip = leading_crlfs(buf);
    let rest = &buf[skip..];
    let Some(end) = find_head_end(rest, scan_from.saturating_sub(skip)) else {
        return if buf.len() > MAX_HEAD {
            Parse::Reject(431)
        } else {
            Parse::Partial
        };
    };
    if skip + end > MAX_HEAD {
        return Parse::Reject(431);
    }
    match parse_head(&rest[..end - 4]) {
        Ok(mut req) => {
            req.head_len = skip + end;
            Parse::Request(req)
        }
        Err(status) => Parse::Reject(status),
    }
}

fn leading_crlfs(buf: &[u8]) -> usize {
    buf.chunks_exact(2).take_while(|c| *c == b"\r\n").count() * 2
}

/// The length of the head up to and including its `\r\n\r\n`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let at = i + buf[i..].iter().position(|&b| b == b'\n')?;
        if at >= 3 && &buf[at - 3..=at] == b"\r\n\r\n" {
            return Some(at + 1);
        }
        i = at + 1;
    }
    None
}

/// Parse a head without its final `\r\n\r\n`; `Err` is the status to answer.
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    // Bare CR, bare LF and NUL are where request smuggling lives: refuse them, and
    // lines are then exactly the pieces between CRLFs.
    if !line_breaks_ok(head) {
        return Err(400);
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(400);
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(400);
    }
    let http10 = parse_version(version)?;
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        _ => Method::Other,
    };

    let mut body: Option<u64> = None;
    let (mut close, mut keep) = (false, false);
    let mut expect_continue = false;
    for line in lines {
        let colon = line.iter().position(|&b| b == b':').ok_or(400u16)?;
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        // An empty or non-token name also catches obsolete line folding (a line
        // starting with a space) and `Name :`, both of which RFC 9112 rejects.
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(400);
        }
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(400);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_digits(value).ok_or(400u16)?;
            if body.is_some_and(|m| m != n) {
                return Err(400);
            }
            body = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked request bodies are not worth supporting in a test worker.
            return Err(411);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(Request {
        method,
        route: route_of(target),
        // HTTP/1.1 keeps the connection unless told not to; 1.0 only when asked.
        keep_alive: !close && (keep || !http10),
        http10,
        expect_continue,
        body: body.unwrap_or(0),
        head_len: 0,
    })
}

fn line_breaks_ok(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        0 => false,
        _ => true,
    })
}

/// `Ok(true)` for HTTP/1.0. Other 1.x minors are served as 1.1; other majors 505.
fn parse_version(v: &[u8]) -> Result<bool, u16> {
    match v {
        b"HTTP/1.1" => Ok(false),
        b"HTTP/1.0" => Ok(true),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major == b'1' {
                Ok(false)
            } else {
                Err(505)
            }
        }
        _ => Err(400),
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// Plain decimal digits only: `str::parse` would also take a leading `+`.
fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn route_of(target: &[u8]) -> Route {
    let target = origin_form(target);
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    match path {
        b"/" => Route::Root,
        b"/health" => Route::Health,
        b"/sleep" => sleep_ms(query).map_or(Route::BadSleep, Route::Sleep),
        _ => Route::NotFound,
    }
}

/// The path and query of an absolute-form target (`http://host/path`), which
/// RFC 9112 3.2.2 says a server must accept; other targets as they are.
fn origin_form(target: &[u8]) -> &[u8] {
    for scheme in [&b"http://"[..], b"https://"] {
        if let Some(prefix) = target.get(..scheme.len())
            && prefix.eq_ignore_ascii_case(scheme)
        {
            let rest = &target[scheme.len()..];
            return match rest.iter().position(|&b| b == b'/') {
                Some(i) => &rest[i..],
                None => b"/",
            };
        }
    }
    target
}

/// The first `ms=` of a query, if it is a whole number of at most MAX_SLEEP_MS.
fn sleep_ms(query: &[u8]) -> Option<u64> {
    let value = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"ms="))?;
    parse_digits(value).filter(|&ms| ms <= MAX_SLEEP_MS)
}

// ------------------------------------------------------------------ responses

/// A response prepared at boot: status line and fixed headers, and its body.
/// Only the `Connection` header varies per request.
struct Reply {
    head: Box<[u8]>,
    body: Box<[u8]>,
}

impl Reply {
    fn new(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Reply {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}",
            reason(status),
            body.len()
        );
        Reply {
            head: head.into_bytes().into(),
            body: body.into(),
        }
    }

    fn text(status: u16, body: &str) -> Reply {
        Reply::new(status, "text/plain", "", body.as_bytes())
    }

    fn write(&self, out: &mut Vec<u8>, keep_alive: bool, http10: bool, head_only: bool) {
        let connection: &[u8] = match (keep_alive, http10) {
            (false, _) => b"Connection: close\r\n\r\n",
            (true, true) => b"Connection: keep-alive\r\n\r\n",
            (true, false) => b"\r\n",
        };
        out.extend_from_slice(&self.head);
        out.extend_from_slice(connection);
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

struct Replies {
    root: Reply,
    health: Reply,
    not_found: Reply,
    not_allowed: Reply,
    bad_sleep: Reply,
    bad_request: Reply,
    length_required: Reply,
    head_too_large: Reply,
    bad_version: Reply,
}

impl Replies {
    fn new(identity_json: &str) -> Replies {
        Replies {
            root: Reply::new(200, "application/json", "", identity_json.as_bytes()),
            health: Reply::text(200, "ok"),
            not_found: Reply::text(404, "not found\n"),
            not_allowed: Reply::new(
                405,
                "text/plain",
                "Allow: GET, HEAD\r\n",
                b"method not allowed\n",
            ),
            bad_sleep: Reply::text(400, "expected /sleep?ms=N with N in 0..=600000\n"),
            bad_request: Reply::text(400, "bad request\n"),
            length_required: Reply::text(411, "chunked request bodies are not supported\n"),
            head_too_large: Reply::text(431, "request head too large\n"),
            bad_version: Reply::text(505, "HTTP version not supported\n"),
        }
    }

    /// The reply for a request that could not be parsed.
    fn rejection(&self, status: u16) -> &Reply {
        match status {
            411 => &self.length_required,
            431 => &self.head_too_large,
            505 => &self.bad_version,
            _ => &self.bad_request,
        }
    }
}

fn identity_json() -> String {
    let var = |key| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    format!(
        "{{\"pid\":{},\"worker_id\":{},\"slot\":{},\"generation\":{}}}",
        std::process::id(),
        var(contract::ENV_WORKER_ID),
        var(contract::ENV_SLOT),
        var(contract::ENV_GENERATION)
    )
}

// ------------------------------------------------------------------ one connection's HTTP

/// What a connection waits for before it reads its next request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Wait {
    #[default]
    Ready,
    /// Body bytes still to skip; then `req` is answered.
    Body { left: u64, req: Request },
    /// A `/sleep` whose timer has not fired; later requests stay buffered.
    Sleep(Request),
}

/// The HTTP state of a connection, apart from its socket and unparsed input, so
/// that it can be fed from either the shared read buffer or the connection's own.
#[derive(Default)]
struct Session {
    /// Responses not yet sent, in request order.
    output: Vec<u8>,
    wait: Wait,
    /// How much of the buffered partial head was already searched.
    scanned: usize,
    /// At least one response was queued (so an idle connection is a kept-alive one).
    answered: bool,
    /// The last response is queued: close once it is sent.
    close_after: bool,
    /// ... and it was an error, or unread bytes followed it: linger before
    /// closing (see LINGER).
    linger: bool,
}

/// What answers need to know about the worker.
struct Ctx<'a> {
    replies: &'a Replies,
    draining: bool,
}

impl Session {
    /// Answer the requests at the start of `data` in order, until one must wait (a
    /// body still arriving, a sleep, a client not reading its responses) or the
    /// data ends. Returns the bytes used (the rest must be kept and fed again) and,
    /// when a `/sleep` began, how long it lasts.
    fn serve(&mut self, data: &[u8], cx: &Ctx) -> (usize, Option<Duration>) {
        let mut pos = 0;
        loop {
            if self.close_after {
                // Whatever follows the last response is never answered; but closing
                // on unread bytes would RST, which can destroy the responses.
                self.linger |= pos < data.len();
                return (data.len(), None);
            }
            match self.wait {
                Wait::Sleep(_) => return (pos, None),
                Wait::Body { left, req } => {
                    let take = left.min((data.len() - pos) as u64);
                    pos += take as usize;
                    if take < left {
                        self.wait = Wait::Body {
                            left: left - take,
                            req,
                        };
                        return (pos, None);
                    }
                    self.wait = Wait::Ready;
                    if let Some(sleep) = self.answer(req, cx) {
                        return (pos, Some(sleep));
                    }
                }
                Wait::Ready => {
                    if self.output.len() >= OUTPUT_CAP {
                        return (pos, None);
                    }
                    let rest = &data[pos..];
                    match parse(rest, std::mem::take(&mut self.scanned)) {
                        Parse::Partial => {
                            self.scanned = rest.len().saturating_sub(3);
                            return (pos, None);
                        }
                        Parse::Reject(status) => {
                            self.reject(status, cx);
                            return (data.len(), None);
                        }
                        Parse::Request(req) => {
                            pos += req.head_len;
                            if req.body == 0 {
                                if let Some(sleep) = self.answer(req, cx) {
                                    return (pos, Some(sleep));
                                }
                                continue;
                            }
                            let have = (data.len() - pos) as u64;
                            if req.expect_continue && !req.http10 && have < req.body {
                                self.output.extend_from_slice(CONTINUE);
                            }
                            self.wait = Wait::Body {
                                left: req.body,
                                req,
                            };
                        }
                    }
                }
            }
        }
    }

    /// Queue the answer to `req`, or start its sleep and return how long it is.
    fn answer(&mut self, req: Request, cx: &Ctx) -> Option<Duration> {
        let r = cx.replies;
        let reply = match (req.method, req.route) {
            (_, Route::NotFound) => &r.not_found,
            (Method::Other, _) => &r.not_allowed,
            (_, Route::BadSleep) => &r.bad_sleep,
            (_, Route::Root) => &r.root,
            (_, Route::Health) => &r.health,
            (_, Route::Sleep(ms)) => {
                self.wait = Wait::Sleep(req);
                return Some(Duration::from_millis(ms));
            }
        };
        self.reply(reply, req, cx.draining);
        None
    }

    /// The sleep is over: answer it.
    fn wake(&mut self, cx: &Ctx) {
        if let Wait::Sleep(req) = self.wait {
            self.wait = Wait::Ready;
            self.reply(&cx.replies.root, req, cx.draining);
        }
    }

    fn reply(&mut self, reply: &Reply, req: Request, draining: bool) {
        // During a drain every response is the connection's last.
        let keep_alive = req.keep_alive && !draining;
        self.close_after |= !keep_alive;
        self.answered = true;
        reply.write(
            &mut self.output,
            keep_alive,
            req.http10,
            req.method == Method::Head,
        );
    }

    fn reject(&mut self, status: u16, cx: &Ctx) {
        cx.replies
            .rejection(status)
            .write(&mut self.output, false, false, false);
        self.answered = true;
        self.close_after = true;
        self.linger = true;
    }
}

// ------------------------------------------------------------------ connections

struct Conn {
    fd: OwnedFd,
    /// Received bytes not used yet: a partial request, or requests behind a sleep.
    input: Vec<u8>,
    session: Session,
    /// The peer sent FIN.
    eof: bool,
    /// Our side is shut down, the last response sent; input is discarded until
    /// the peer closes or LINGER runs out.
    lingering: bool,
    /// The one timer that counts for this connection (sleep, linger, drain grace);
    /// heap entries with another instant are stale.
    deadline: Option<Instant>,
    last_active: Instant,
    /// What epoll watches for it now.
    interest: EpollFlags,
}

impl Conn {
    /// Nothing received, nothing owed, nothing pending.
    fn idle(&self) -> bool {
        self.input.is_empty()
            && self.session.output.is_empty()
            && self.session.wait == Wait::Ready
            && !self.session.close_after
    }

    fn sleeping(&self) -> bool {
        matches!(self.session.wait, Wait::Sleep(_))
    }

    /// Whether to read more now: not past EOF, nor after the last request, nor
    /// while enough is buffered either way (backpressure on pipelining clients).
    fn reading(&self) -> bool {
        !self.eof
            && (self.lingering
                || (!self.session.close_after
                    && self.input.len() < MAX_HEAD
                    && self.session.output.len() < OUTPUT_CAP))
    }

    fn wanted_interest(&self) -> EpollFlags {
        let mut flags = EpollFlags::empty();
        if self.reading() {
            flags |= READABLE;
        }
        if !self.session.output.is_empty() {
            flags |= EpollFlags::EPOLLOUT;
        }
        flags
    }

    /// Send what is queued, as far as the socket takes it. `Err`: the peer is gone.
    fn flush(&mut self, now: Instant) -> Result<(), Errno> {
        let out = &mut self.session.output;
        while !out.is_empty() {
            match socket::send(self.fd.as_raw_fd(), out, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    out.drain(..n);
                    self.last_active = now;
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        release_if_big(out);
        release_if_big(&mut self.input);
        Ok(())
    }
}

/// A buffer that once held a burst should not pin that memory while idle.
fn release_if_big(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 2 * OUTPUT_CAP {
        *buf = Vec::new();
    }
}

/// Connections by token: the slot index in the low 32 bits and the slot's
/// generation in the high ones, so that an event or a timer for a connection that
/// is gone never reaches the one that reused its slot.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

impl Slab {
    fn insert(&mut self, conn: Conn) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.conn = Some(conn);
        self.len += 1;
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    fn slot(&self, token: u64) -> Option<&Slot> {
        let slot = self.slots.get((token & 0xffff_ffff) as usize)?;
        (u64::from(slot.generation) == token >> 32).then_some(slot)
    }

    fn get(&self, token: u64) -> Option<&Conn> {
        self.slot(token)?.conn.as_ref()
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut Conn> {
        self.slot(token)?;
        self.slots[(token & 0xffff_ffff) as usize].conn.as_mut()
    }

    fn remove(&mut self, token: u64) -> Option<Conn> {
        self.slot(token)?;
        let index = (token & 0xffff_ffff) as u32;
        let slot = &mut self.slots[index as usize];
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.len -= 1;
        Some(conn)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn tokens(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| (u64::from(s.generation) << 32) | i as u64)
            .collect()
    }
}

// ------------------------------------------------------------------ the worker

struct Listener {
    fd: OwnedFd,
    /// TCP (not unix): accepted connections get TCP_NODELAY.
    tcp: bool,
}

struct Worker {
    epoll: Epoll,
    signals: SignalPipe,
    /// Armed only during a batch of accepts; see [`AcceptAlarm`].
    alarm: AcceptAlarm,
    listeners: Vec<Listener>,
    /// The listeners are in the epoll set.
    listening: bool,
    conns: Slab,
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

    fn serve(mut self) -> ExitCode {
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
    fn listen(&mut self, on: bool) -> nix::Result<()> {
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

    fn update_listening(&mut self) {
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
    fn accept(&mut self, index: usize) {
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

    fn adopt(&mut self, fd: OwnedFd) {
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

    fn on_conn(&mut self, token: u64, flags: EpollFlags) {
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
    fn read(&mut self, token: u64, to_eof: bool) -> bool {
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
    fn feed(&mut self, token: u64, n: usize) {
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
    fn pump(&mut self, token: u64) {
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
    fn settle(&mut self, token: u64) {
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
    fn arm(&mut self, token: u64, at: Instant) {
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

    fn on_deadline(&mut self, token: u64) {
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
    fn sweep(&mut self) {
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

    fn close(&mut self, token: u64) {
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
    timer: Timer,
}

extern "C" fn on_alarm(_: libc::c_int) {}

impl AcceptAlarm {
    fn install() -> nix::Result<AcceptAlarm> {
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

    fn req(s: &str) -> Request {
        match parse(s.as_bytes(), 0) {
            Parse::Request(r) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn reject(s: &[u8]) -> u16 {
        match parse(s, 0) {
            Parse::Reject(status) => status,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(s)),
        }
    }

    #[test]
    fn complete_request() {
        let s = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = req(s);
        assert_eq!(
            (
                r.method,
                r.route,
                r.keep_alive,
                r.http10,
                r.body,
                r.head_len
            ),
            (Method::Get, Route::Root, true, false, 0, s.len())
        );
        assert_eq!(req("HEAD /health HTTP/1.1\r\n\r\n").method, Method::Head);
        assert_eq!(req("GET /health HTTP/1.1\r\n\r\n").route, Route::Health);
        assert_eq!(req("GET /nope HTTP/1.1\r\n\r\n").route, Route::NotFound);
        assert_eq!(req("GET /?x=1 HTTP/1.1\r\n\r\n").route, Route::Root);
        assert_eq!(req("DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert_eq!(
            req("GET http://example.com/health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            req("GET http://example.com HTTP/1.1\r\n\r\n").route,
            Route::Root
        );
        // Empty lines before the request line are skipped, and counted as used.
        let r = req("\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.head_len, 22);
    }

    #[test]
    fn incomplete_request() {
        for s in [
            &b""[..],
            b"G",
            b"GET / HTTP/1.1",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"\r\n",
        ] {
            assert_eq!(parse(s, 0), Parse::Partial, "{s:?}");
        }
    }

    #[test]
    fn resumed_scan_finds_a_terminator_split_across_reads() {
        let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..full.len() {
            let first = &full[..cut];
            assert_eq!(parse(first, 0), Parse::Partial);
            let scanned = first.len().saturating_sub(3);
            assert!(
                matches!(parse(full, scanned), Parse::Request(_)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn pipelined_requests() {
        let two = b"GET / HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\nGET /x";
        let Parse::Request(first) = parse(two, 0) else {
            panic!()
        };
        assert_eq!((first.route, first.head_len), (Route::Root, 18));
        let Parse::Request(second) = parse(&two[18..], 0) else {
            panic!()
        };
        assert_eq!(second.route, Route::Health);
        assert_eq!(parse(&two[18 + second.head_len..], 0), Parse::Partial);
    }

    #[test]
    fn oversize_head() {
        assert_eq!(reject(&vec![b'a'; MAX_HEAD + 1]), 431);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(reject(&long), 431);
        // Just under the cap is fine.
        let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ok.extend(std::iter::repeat_n(b'a', MAX_HEAD - ok.len() - 4));
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(ok.len(), MAX_HEAD);
        assert!(matches!(parse(&ok, 0), Parse::Request(_)));
    }

    #[test]
    fn bad_requests() {
        for s in [
            &b"garbage\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \0\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert_eq!(reject(s), 400, "{:?}", String::from_utf8_lossy(s));
        }
        assert_eq!(reject(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(
            reject(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        // A future 1.x minor is served as 1.1.
        assert!(!req("GET / HTTP/1.2\r\n\r\n").http10);
    }

    #[test]
    fn content_length() {
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").body,
            5
        );
        assert_eq!(req("GET / HTTP/1.1\r\ncontent-length:  0 \r\n\r\n").body, 0);
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert_eq!(req(&big).body, u64::MAX);
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        ] {
            assert_eq!(reject(bad), 400, "{:?}", String::from_utf8_lossy(bad));
        }
        // The same length twice is merely redundant.
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").body,
            5
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(req("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(req("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").keep_alive);
        let r = req("GET / HTTP/1.0\r\n\r\n");
        assert!(r.http10 && !r.keep_alive);
        assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(req("GET / HTTP/1.0\r\nconnection:\tfoo , Keep-Alive\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.0\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn sleep_parameter() {
        let route = |t: &str| req(&format!("GET {t} HTTP/1.1\r\n\r\n")).route;
        assert_eq!(route("/sleep?ms=250"), Route::Sleep(250));
        assert_eq!(route("/sleep?ms=0"), Route::Sleep(0));
        assert_eq!(route("/sleep?a=b&ms=7&ms=9"), Route::Sleep(7));
        assert_eq!(route("/sleep?ms=600000"), Route::Sleep(MAX_SLEEP_MS));
        for bad in [
            "/sleep",
            "/sleep?",
            "/sleep?ms=",
            "/sleep?ms=x",
            "/sleep?ms=+5",
            "/sleep?ms=-5",
            "/sleep?ms=1.5",
            "/sleep?ms=600001",
            "/sleep?ms=99999999999999999999999",
            "/sleep?xms=5",
        ] {
            assert_eq!(route(bad), Route::BadSleep, "{bad}");
        }
        assert_eq!(route("/sleep/?ms=5"), Route::NotFound);
    }

    #[test]
    fn replies_carry_length_type_and_connection() {
        let replies = Replies::new("{}");
        let mut out = Vec::new();
        replies.health.write(&mut out, true, false, false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
        );
        out.clear();
        replies.root.write(&mut out, true, true, true);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        replies.not_allowed.write(&mut out, false, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Allow: GET, HEAD\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn identity_body_shape() {
        let j: serde_json::Value = serde_json::from_str(&identity_json()).unwrap();
        assert_eq!(j["pid"].as_u64(), Some(u64::from(std::process::id())));
        for key in ["worker_id", "slot", "generation"] {
            assert!(j[key].is_i64(), "{key} in {j}");
        }
    }

    // ---- Session: what goes out for what comes in, without sockets.

    fn session_serve(s: &mut Session, data: &[u8], draining: bool) -> (usize, Option<Duration>) {
        let replies = Replies::new("{\"pid\":1}");
        let cx = Ctx {
            replies: &replies,
            draining,
        };
        s.serve(data, &cx)
    }

    fn statuses(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r[..3].to_string())
            .collect()
    }

    #[test]
    fn session_answers_pipelined_requests_in_order() {
        let mut s = Session::default();
        let data = b"GET / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nPUT /health HTTP/1.1\r\n\r\nGET /heal";
        let (used, sleep) = session_serve(&mut s, data, false);
        assert_eq!(sleep, None);
        assert_eq!(used, data.len() - b"GET /heal".len());
        assert_eq!(statuses(&s.output), ["200", "404", "405"]);
        assert!(!s.close_after);
    }

    #[test]
    fn session_stops_at_a_sleep_and_answers_on_wake() {
        let mut s = Session::default();
        let data = b"GET /sleep?ms=30 HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n";
        let (used, sleep) = session_serve(&mut s, data, false);
        assert_eq!(sleep, Some(Duration::from_millis(30)));
        assert_eq!(used, b"GET /sleep?ms=30 HTTP/1.1\r\n\r\n".len());
        assert!(s.output.is_empty());
        // More bytes while asleep are left for later.
        assert_eq!(session_serve(&mut s, &data[used..], false), (0, None));
        let replies = Replies::new("{\"pid\":1}");
        s.wake(&Ctx {
            replies: &replies,
            draining: true,
        });
        assert_eq!(statuses(&s.output), ["200"]);
        let text = String::from_utf8_lossy(&s.output).into_owned();
        assert!(
            text.ends_with("Connection: close\r\n\r\n{\"pid\":1}"),
            "{text}"
        );
        assert!(s.close_after);
        // After the last response the rest is dropped unanswered.
        assert_eq!(
            session_serve(&mut s, &data[used..], false),
            (data.len() - used, None)
        );
        assert_eq!(statuses(&s.output), ["200"]);
        assert!(s.linger, "closing on unread input must linger");
    }

    #[test]
    fn session_discards_a_body_across_chunks() {
        let mut s = Session::default();
        let head = b"POST /health HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        let (used, _) = session_serve(&mut s, &[&head[..], b"12345"].concat(), false);
        assert_eq!(used, head.len() + 5);
        assert!(s.output.is_empty(), "answered before the body was in");
        let next = b"67890GET / HTTP/1.1\r\n\r\n";
        let (used, _) = session_serve(&mut s, next, false);
        assert_eq!(used, next.len());
        assert_eq!(statuses(&s.output), ["405", "200"]);
    }

    #[test]
    fn session_sends_100_continue_only_when_the_body_is_awaited() {
        let mut s = Session::default();
        let head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        session_serve(&mut s, head, false);
        assert!(s.output.starts_with(CONTINUE));
        let mut s = Session::default();
        session_serve(&mut s, &[&head[..], b"abc"].concat(), false);
        assert!(!s.output.starts_with(CONTINUE));
        assert_eq!(statuses(&s.output), ["405"]);
    }

    #[test]
    fn session_rejects_and_closes() {
        let mut s = Session::default();
        let data = b"GET / HTTP/1.1\r\n\r\ngarbage\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (used, _) = session_serve(&mut s, data, false);
        assert_eq!(used, data.len());
        assert_eq!(statuses(&s.output), ["200", "400"]);
        assert!(s.close_after && s.linger);
    }

    #[test]
    fn session_closes_after_connection_close_and_during_drain() {
        let mut s = Session::default();
        session_serve(
            &mut s,
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(s.close_after && !s.linger);
        let mut s = Session::default();
        session_serve(&mut s, b"GET / HTTP/1.1\r\n\r\n", true);
        assert!(s.close_after);
        assert!(String::from_utf8_lossy(&s.output).contains("Connection: close\r\n"));
        let mut s = Session::default();
        session_serve(&mut s, b"GET / HTTP/1.0\r\n\r\n", false);
        assert!(s.close_after);
    }

    #[test]
    fn session_holds_requests_while_output_is_backed_up() {
        let mut s = Session::default();
        let one = b"GET / HTTP/1.1\r\n\r\n";
        let many = one.repeat(OUTPUT_CAP);
        let (used, _) = session_serve(&mut s, &many, false);
        assert!(used < many.len() && used % one.len() == 0);
        assert!(s.output.len() >= OUTPUT_CAP && s.output.len() < OUTPUT_CAP + 200);
    }

    #[test]
    fn slab_tokens_do_not_outlive_their_connection() {
        let conn = || {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            Conn {
                fd: a.into(),
                input: Vec::new(),
                session: Session::default(),
                eof: false,
                lingering: false,
                deadline: None,
                last_active: Instant::now(),
                interest: READABLE,
            }
        };
        let mut slab = Slab::default();
        let t1 = slab.insert(conn());
        assert!(slab.get(t1).is_some());
        assert!(slab.remove(t1).is_some());
        let t2 = slab.insert(conn());
        assert_ne!(t1, t2, "a reused slot gets a new token");
        assert!(slab.get(t1).is_none() && slab.get_mut(t1).is_none());
        assert!(slab.remove(t1).is_none());
        assert_eq!((slab.len(), slab.tokens()), (1, vec![t2]));
        assert!(t2 < TOKEN_LISTENER_0 - MAX_LISTENERS as u64);
    }

    #[test]
    fn heartbeat_interval() {
        assert_eq!(beat_interval(30.0), Duration::from_secs(1));
        assert_eq!(beat_interval(2.0), Duration::from_millis(500));
        assert_eq!(beat_interval(0.1), Duration::from_millis(50));
    }

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
