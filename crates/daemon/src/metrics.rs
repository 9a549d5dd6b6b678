//! `--metrics-bind`: Prometheus scrapes `GET /metrics` from the master itself, in
//! its one loop, with no thread and no blocking call; balancers and orchestrators
//! probe `GET /livez` and `GET /readyz` there too (what they answer is the loop's
//! to say: see `arbiter/probes.rs`).
//!
//! Bounded like the control socket: at most [`MAX_CLIENTS`] connections served at
//! once (one more is told `503` and closed), a request head of at most
//! [`MAX_HEAD`] bytes that must arrive within [`READ_TIMEOUT`], an answer that
//! must be taken within [`WRITE_TIMEOUT`]. Every answer closes the connection:
//! nothing is kept alive, so nothing is left to track between scrapes. The body is
//! [`arbiter_proto::metrics`]' rendering, the same text `arbiterctl metrics`
//! prints.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, Shutdown, SockFlag, accept4, recv, send, shutdown};

use crate::config::BindSpec;
use crate::listeners::{self, BindError, BindOptions, Listener};
use crate::ratelimit::{Repeated, suppressed_note};
use crate::warning;

/// Connections served at once; one more gets a `503` and is closed.
pub const MAX_CLIENTS: usize = 16;
/// Refused connections still being told `503`; past these, one is closed unheard.
const MAX_REFUSED: usize = 16;
/// The request head must be complete this soon after the connection is accepted.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer must be taken by the client this soon after it is ready.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the answer, how long what the client still sends is read and dropped,
/// so that closing with unread bytes does not reset the connection before the
/// client has read the answer.
const LINGER: Duration = Duration::from_secs(2);
/// The most of a request body (or anything else) read and dropped while lingering.
const LINGER_BYTES: usize = 64 * 1024;
/// The largest request head taken; a longer one gets `431`.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers a request may carry (httparse needs the room up front).
const MAX_HEADERS: usize = 64;
/// Prometheus' own listen backlog is small too: scrapes come a few at a time.
const BACKLOG: i32 = 64;
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long the listener is left alone when the master is out of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);

/// What a request head asks for, as far as this server is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not all of the head yet.
    Incomplete,
    /// `GET` (`head_only` for `HEAD`) of a path served here: the loop answers.
    Ask { what: Ask, head_only: bool },
    /// Answer with this status and nothing else.
    Refuse(Status),
}

/// The paths served here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// `/metrics`: the Prometheus text.
    Metrics,
    /// `/livez`: whether the master's loop turns.
    Live,
    /// `/readyz`: whether traffic should be sent to this service.
    Ready,
}

/// A client's complete request, for the loop to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asked {
    pub what: Ask,
    pub head_only: bool,
    /// How long the request had been waiting when the loop read it (TCP only:
    /// the kernel's time since the last bytes came in).
    pub waited: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    Busy,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Busy => "503 Service Unavailable",
        }
    }
}

/// Judge what has arrived of a request. Pure, so the parser is tested alone.
pub fn judge(input: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => {
            Verdict::Refuse(Status::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Verdict::Incomplete,
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            Verdict::Refuse(Status::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(_)) => {
            let (Some(method), Some(target)) = (req.method, req.path) else {
                return Verdict::Refuse(Status::BadRequest);
            };
            // Prometheus may add parameters (`params:` in a scrape config).
            let path = target.split_once('?').map_or(target, |(p, _)| p);
            let what = match path {
                "/metrics" => Ask::Metrics,
                "/livez" => Ask::Live,
                "/readyz" => Ask::Ready,
                _ => return Verdict::Refuse(Status::NotFound),
            };
            match method {
                "GET" => Verdict::Ask {
                    what,
                    head_only: false,
                },
                "HEAD" => Verdict::Ask {
                    what,
                    head_only: true,
                },
                _ => Verdict::Refuse(Status::MethodNotAllowed),
            }
        }
        Err(httparse::Error::TooManyHeaders) => Verdict::Refuse(Status::HeadTooLarge),
        Err(_) => Verdict::Refuse(Status::BadRequest),
    }
}

/// What the loop answers a request with.
#[derive(Clone, Copy, Debug)]
pub enum Reply<'a> {
    /// The metrics text.
    Metrics(&'a str),
    /// `200` (`ok`) or `503`, with one line that says why.
    Probe { ok: bool, line: &'a str },
}

/// How long ago the last bytes of a request arrived on this TCP connection
/// (`tcpi_last_data_recv`): the time it waited for the loop to read it. `None`
/// for a unix socket, which keeps no such time.
fn waited(fd: BorrowedFd<'_>) -> Option<Duration> {
    let info = crate::queue::tcp_info(fd).ok()?;
    Some(Duration::from_millis(u64::from(info.tcpi_last_data_recv)))
}

/// A whole HTTP/1.1 answer that closes the connection.
fn answer(status: &str, content_type: &str, extra: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn refusal(status: Status) -> Vec<u8> {
    let extra = match status {
        Status::MethodNotAllowed => "Allow: GET, HEAD\r\n",
        Status::Busy => "Retry-After: 1\r\n",
        _ => "",
    };
    let body = format!("{}\n", status.line());
    answer(
        status.line(),
        "text/plain; charset=utf-8",
        extra,
        body.as_bytes(),
        false,
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Reading,
    /// Asked: waiting for the loop's answer.
    Asked(Asked),
    /// Sending the answer.
    Writing,
    /// Answered and our side shut down: reading (and dropping) until the client
    /// closes too.
    Lingering,
    /// To be closed.
    Done,
}

struct Conn {
    id: u64,
    fd: OwnedFd,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    deadline: Instant,
    /// Told `503` for being one too many: not counted among those served.
    refused: bool,
    dropped: usize,
}

impl Conn {
    fn reply(&mut self, bytes: Vec<u8>, now: Instant) {
        self.input = Vec::new();
        self.output = bytes;
        self.phase = Phase::Writing;
        self.deadline = now + WRITE_TIMEOUT;
        self.flush(now);
    }

    fn flush(&mut self, now: Instant) {
        while self.phase == Phase::Writing && !self.output.is_empty() {
            // MSG_NOSIGNAL: a client gone away is an error here, not a SIGPIPE.
            match send(self.fd.as_raw_fd(), &self.output, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => self.phase = Phase::Done,
            }
        }
        if self.phase == Phase::Writing {
            let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Write);
            self.phase = Phase::Lingering;
            self.deadline = now + LINGER;
        }
    }

    /// Read what is there; in `Reading`, judge the head.
    fn read(&mut self, now: Instant) {
        let mut buf = [0u8; 4096];
        loop {
            match self.phase {
                Phase::Reading | Phase::Lingering => {}
                _ => return,
            }
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                // The client is done: nothing more will come.
                Ok(0) => {
                    self.phase = Phase::Done;
                    return;
                }
                Ok(n) if self.phase == Phase::Lingering => {
                    self.dropped += n;
                    if self.dropped > LINGER_BYTES {
                        self.phase = Phase::Done;
                    }
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    match judge(&self.input) {
                        Verdict::Incomplete => {}
                        Verdict::Ask { what, head_only } => {
                            self.phase = Phase::Asked(Asked {
                                what,
                                head_only,
                                waited: waited(self.fd.as_fd()),
                            });
                            return;
                        }
                        Verdict::Refuse(status) => {
                            self.reply(refusal(status), now);
                            return;
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.phase = Phase::Done;
                    return;
                }
            }
        }
    }
}

pub struct MetricsServer {
    listener: Listener,
    conns: Vec<Conn>,
    next_id: u64,
    /// Sockets closed since the loop last looked, still open until it has taken
    /// them out of its event set (see `Events`).
    retired: Vec<OwnedFd>,
    accept_paused_until: Option<Instant>,
    /// Out of fds, given up for a moment to accept one waiting client and tell it
    /// `503`, rather than leave it hanging until its scrape timeout.
    reserve: crate::reserve::ReserveFd,
    accept_errors: Repeated,
    refusals: Repeated,
}

/// What the loop should watch for one fd of the metrics server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    Listener,
    Client(u64),
}

impl MetricsServer {
    /// Bind `spec` (a stale unix socket file is replaced, a live one refused).
    pub fn bind(spec: &BindSpec) -> Result<MetricsServer, BindError> {
        let opts = BindOptions {
            backlog: BACKLOG,
            reuse_port: false,
        };
        let listener = listeners::bind_one(spec, &opts)?;
        MetricsServer::serve(listener).map_err(|err| BindError {
            addr: spec.to_string(),
            err,
        })
    }

    /// Serve on a listener already bound (the old master's, at an upgrade).
    pub fn serve(listener: Listener) -> io::Result<MetricsServer> {
        // Ours alone (close-on-exec, never given to a worker): non-blocking is safe.
        nix::fcntl::fcntl(
            listener.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(MetricsServer {
            listener,
            conns: Vec::new(),
            next_id: 1,
            retired: Vec::new(),
            accept_paused_until: None,
            reserve: crate::reserve::ReserveFd::hold(),
            accept_errors: Repeated::new(LOG_EVERY),
            refusals: Repeated::new(LOG_EVERY),
        })
    }

    /// Where scrapes go, for the log: `http://127.0.0.1:9100/metrics`,
    /// `unix:/run/m.sock`.
    pub fn url(&self) -> String {
        let d = &self.listener.display;
        if d.starts_with("http://") {
            format!("{d}/metrics")
        } else {
            d.clone()
        }
    }

    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Own the socket file from now on (a promoted new master).
    pub fn own_path(&mut self) {
        if let Some(BindSpec::Unix(p)) = &self.listener.spec {
            self.listener.owned_path = Some(p.clone());
        }
    }

    /// The fds to poll and what for: (fd, want read, want write, whose).
    pub fn interests(&self) -> Vec<(BorrowedFd<'_>, bool, bool, Interest)> {
        let accepting = self.accept_paused_until.is_none();
        let mut out = vec![(self.listener.as_fd(), accepting, false, Interest::Listener)];
        for c in &self.conns {
            let read = matches!(c.phase, Phase::Reading | Phase::Lingering);
            let write = c.phase == Phase::Writing;
            out.push((c.fd.as_fd(), read, write, Interest::Client(c.id)));
        }
        out
    }

    /// Every fd of the server, to be taken out of the event set before it closes.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut out = vec![self.listener.as_fd()];
        out.extend(self.conns.iter().map(|c| c.fd.as_fd()));
        out.extend(self.retired.iter().map(|f| f.as_fd()));
        out
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .map(|c| c.deadline)
            .chain(self.accept_paused_until)
            .min()
    }

    /// Accept what is waiting. Never blocks.
    pub fn accept(&mut self, now: Instant) {
        // Bounded per turn so a connect flood cannot keep the loop here.
        for _ in 0..MAX_CLIENTS + MAX_REFUSED {
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            let fd = match accept4(self.listener.as_fd().as_raw_fd(), flags) {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) => {
                    if self.refuse_with_reserve() {
                        continue;
                    }
                    self.out_of_fds(e, now);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and the like concern that one connection.
                    if let Some(n) = self.accept_errors.note(now) {
                        warning!("Metrics: accept failed: {e}{}", suppressed_note(n));
                    }
                    continue;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            let mut conn = Conn {
                id,
                fd,
                input: Vec::new(),
                output: Vec::new(),
                phase: Phase::Reading,
                deadline: now + READ_TIMEOUT,
                refused: false,
                dropped: 0,
            };
            let served = self.conns.iter().filter(|c| !c.refused).count();
            if served >= MAX_CLIENTS {
                if let Some(n) = self.refusals.note(now) {
                    warning!(
                        "Metrics: {MAX_CLIENTS} clients already connected; answering 503{}",
                        suppressed_note(n)
                    );
                }
                conn.refused = true;
                conn.reply(refusal(Status::Busy), now);
                if self.conns.len() - served >= MAX_REFUSED {
                    // A flood: said once without waiting, then closed.
                    conn.phase = Phase::Done;
                }
            }
            self.conns.push(conn);
        }
        self.sweep();
    }

    /// Out of fds: the reserve fd answers one waiting client `503` at once.
    /// False when it could not.
    fn refuse_with_reserve(&mut self) -> bool {
        self.reserve
            .refuse(self.listener.as_fd(), &refusal(Status::Busy))
    }

    /// Out of fds and no reserve to answer with: the connection stays in the
    /// backlog, and the listener is left alone for a moment so that the loop does
    /// not spin on it.
    fn out_of_fds(&mut self, e: Errno, now: Instant) {
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        self.reserve.refill();
        if let Some(n) = self.accept_errors.note(now) {
            warning!(
                "Metrics: accept failed: {e}; trying again every {} ms{}",
                ACCEPT_PAUSE.as_millis(),
                suppressed_note(n)
            );
        }
    }

    /// A client's fd polled ready. `Some`: its request is complete; answer it
    /// with [`respond`](Self::respond) this turn.
    pub fn on_ready(&mut self, id: u64, now: Instant) -> Option<Asked> {
        let c = self.conns.iter_mut().find(|c| c.id == id)?;
        c.flush(now);
        c.read(now);
        let asked = match c.phase {
            Phase::Asked(a) => Some(a),
            _ => None,
        };
        self.sweep();
        asked
    }

    /// Send a client what it asked for: the rendered metrics, or a probe's line.
    pub fn respond(&mut self, id: u64, head_only: bool, reply: Reply<'_>, now: Instant) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            let bytes = match reply {
                Reply::Metrics(body) => answer(
                    "200 OK",
                    arbiter_proto::metrics::CONTENT_TYPE,
                    "",
                    body.as_bytes(),
                    head_only,
                ),
                Reply::Probe { ok, line } => answer(
                    if ok { "200 OK" } else { Status::Busy.line() },
                    "text/plain; charset=utf-8",
                    // A probe's answer is now's: no cache may keep it.
                    "Cache-Control: no-store\r\n",
                    format!("{line}\n").as_bytes(),
                    head_only,
                ),
            };
            c.reply(bytes, now);
        }
        self.sweep();
    }

    /// Close clients past their deadline; accept again after a pause.
    pub fn expire(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        for c in &mut self.conns {
            if now >= c.deadline {
                c.phase = Phase::Done;
            }
        }
        self.sweep();
    }

    fn sweep(&mut self) {
        let (done, live): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|c| c.phase == Phase::Done);
        self.conns = live;
        self.retired.extend(done.into_iter().map(|c| c.fd));
    }

    /// The sockets closed since the last call, to be taken out of the event set
    /// before they are dropped.
    pub fn take_retired(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.retired)
    }

    /// Close everything; the socket file goes too if it is ours (`remove`: no
    /// other master serves on it).
    pub fn close(self, remove: bool) {
        let MetricsServer { mut listener, .. } = self;
        if !remove {
            listener.owned_path = None;
        }
        listeners::close_all(vec![listener]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let scrape = Verdict::Ask {
            what: Ask::Metrics,
            head_only: false,
        };
        assert_eq!(judge(b""), Verdict::Incomplete);
        assert_eq!(judge(b"GET /metr"), Verdict::Incomplete);
        assert_eq!(
            judge(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Incomplete
        );
        assert_eq!(judge(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), scrape);
        assert_eq!(judge(b"GET /metrics HTTP/1.0\r\n\r\n"), scrape);
        // Prometheus' `params:` arrive as a query string.
        assert_eq!(judge(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), scrape);
        assert_eq!(
            judge(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Verdict::Ask {
                what: Ask::Metrics,
                head_only: true
            }
        );
        for (path, what) in [("/livez", Ask::Live), ("/readyz", Ask::Ready)] {
            let get = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(
                judge(get.as_bytes()),
                Verdict::Ask {
                    what,
                    head_only: false
                }
            );
            let head = format!("HEAD {path}?verbose HTTP/1.0\r\n\r\n");
            assert_eq!(
                judge(head.as_bytes()),
                Verdict::Ask {
                    what,
                    head_only: true
                }
            );
        }
        assert_eq!(
            judge(b"GET /healthz HTTP/1.1\r\n\r\n"),
            Verdict::Refuse(Status::NotFound)
        );
        let refused = |s| Verdict::Refuse(s);
        assert_eq!(judge(b"GET / HTTP/1.1\r\n\r\n"), refused(Status::NotFound));
        assert_eq!(
            judge(b"GET /metrics/x HTTP/1.1\r\n\r\n"),
            refused(Status::NotFound)
        );
        assert_eq!(
            judge(b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"),
            refused(Status::MethodNotAllowed)
        );
        assert_eq!(
            judge(b"DELETE /metrics HTTP/1.0\r\n\r\n"),
            refused(Status::MethodNotAllowed)
        );
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00"[..],
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics FOO\r\n\r\n",
            b"GET\r\n\r\n",
            b"{\"v\":1}\n",
        ] {
            assert_eq!(judge(bad), refused(Status::BadRequest), "{bad:?}");
        }
    }

    #[test]
    fn a_head_past_the_cap_is_refused() {
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(judge(&long), Verdict::Refuse(Status::HeadTooLarge));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(judge(&long), Verdict::Refuse(Status::HeadTooLarge));
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(judge(&many), Verdict::Refuse(Status::HeadTooLarge));
        // Just under the cap is fine.
        let mut fits = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        fits.resize(MAX_HEAD - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            judge(&fits),
            Verdict::Ask {
                what: Ask::Metrics,
                head_only: false
            }
        );
    }

    #[test]
    fn answers_close_and_say_their_length() {
        let a = answer("200 OK", "text/plain", "", b"abc", false);
        assert_eq!(
            a,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        );
        let h = answer("200 OK", "text/plain", "", b"abc", true);
        assert!(h.ends_with(b"Content-Length: 3\r\nConnection: close\r\n\r\n"));
        let r = String::from_utf8(refusal(Status::MethodNotAllowed)).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");
    }
}
