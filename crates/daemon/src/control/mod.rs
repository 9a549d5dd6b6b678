//! The control socket server, inside the master's one poll loop.
//!
//! Everything is non-blocking and bounded: at most [`MAX_CLIENTS`] connections,
//! each with an input buffer of at most one line ([`MAX_LINE`]), an output buffer
//! cap, and an idle deadline. A client that sends garbage gets an error reply; one
//! that sends an endless line gets an error and is closed; one that sends nothing is
//! closed at its deadline. None of them can delay signals or other clients, because
//! the master never waits on a client: it reads what is there and moves on.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbiter_proto::control::{ErrorKind, MAX_LINE, Request, Response, parse_request};
use nix::sys::inotify::{Inotify, WatchDescriptor};

mod client;
mod socket;

use client::{Client, has_complete_request};
pub(crate) use socket::socket_answers;

use crate::ratelimit::{Repeated, suppressed_note};
use crate::warning;

/// Connections served at once; one more is told "busy" and closed (as many again
/// wait up to [`REFUSED_GRACE`] to be told in their own framing).
pub const MAX_CLIENTS: usize = 64;
/// A connection with no complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// gunicornc's interactive mode keeps a connection open between commands typed by
/// a person; gunicorn's own server allows 300 s.
pub const GUNICORN_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const BUSY: &str = "too many control connections; try again";
const OUT_OF_FDS: &str = "the master is out of file descriptors (see its log); try again";
/// A repeating accept error is logged at most this often.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long the listener is left alone when the master is out of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// How long a refused client has to send its first bytes before it is closed.
const REFUSED_GRACE: Duration = Duration::from_secs(1);
/// After the socket file disappears, wait this long before binding a new one: an
/// `rm -rf` of its directory is still running, and a file put back at once would
/// make its rmdir fail.
const RESTORE_DELAY: Duration = Duration::from_secs(1);
/// Retries of a restore that failed back off up to this.
const RESTORE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A client that does not read its replies is dropped past this much queued output.
const MAX_OUTPUT: usize = arbiter_proto::control::MAX_REPLY;
/// Read at most this much from one client per loop turn, so one fast writer cannot
/// keep the loop on itself.
const READ_CHUNK: usize = 64 * 1024;

pub type ClientId = u64;

/// Who is on the other end, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound, so we never unlink a file that
    /// is no longer ours (an upgrade may have renamed another over it).
    identity: (u64, u64),
    clients: Vec<Client>,
    next_id: ClientId,
    uid: u32,
    /// Tells us when the socket file is removed (a tmp cleaner, an `rm -rf` of its
    /// directory), so control comes back without a reload. None when inotify is
    /// unavailable: then only a reload restores it.
    watch: Option<Inotify>,
    watched: Option<WatchDescriptor>,
    /// When to look at the path again, and the back-off after a failed restore.
    restore_at: Option<Instant>,
    restore_backoff: Duration,
    /// Sockets this server is done with (closed clients, a replaced listener), kept
    /// open until the loop has taken them out of its event set: an fd closed while
    /// still registered would leave a registration behind in any child that holds a
    /// copy of it.
    retired: Vec<OwnedFd>,
    /// Out of fds: the listener is not watched until then.
    accept_paused_until: Option<Instant>,
    /// An fd held in reserve (`/dev/null`): out of fds, it is given up for a moment
    /// to accept a waiting client and tell it `busy`, instead of leaving it hanging
    /// until its timeout says "no master answering".
    reserve: crate::reserve::ReserveFd,
    accept_errors: Repeated,
}

/// What the poll loop should watch for one fd of the control server.
pub enum Interest {
    Listener,
    Client(ClientId),
    /// The inotify watch on the socket's directory.
    Watch,
}

/// What [`ControlServer::restore`] did.
pub enum Restore {
    /// The socket file was missing; a new one is bound at the same path.
    Rebound,
    /// It is still missing and could not be bound; tried again after the delay.
    Failed(ControlError, Duration),
}

#[derive(Debug)]
pub struct ControlError(pub String);

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ControlServer {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fds to poll and what for: (fd, want read, want write, whose).
    pub fn interests(&self) -> Vec<(BorrowedFd<'_>, bool, bool, Interest)> {
        let accepting = self.accept_paused_until.is_none();
        let mut out = vec![(self.listener.as_fd(), accepting, false, Interest::Listener)];
        if let Some(w) = &self.watch {
            out.push((w.as_fd(), true, false, Interest::Watch));
        }
        for c in &self.clients {
            let read = !c.waiting && !c.closing && !c.eof;
            let write = !c.output.is_empty();
            out.push((c.stream.as_fd(), read, write, Interest::Client(c.id)));
        }
        out
    }

    /// The nearest idle deadline of a client that is not waiting on the master.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter(|c| !c.waiting)
            .map(|c| c.deadline)
            .chain(self.restore_at)
            .chain(self.accept_paused_until)
            .min()
    }

    /// Accept what is waiting. Never blocks.
    pub fn accept(&mut self, now: Instant) {
        // Bounded per turn so a connect flood cannot keep the loop here.
        for _ in 0..MAX_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if self.refuse_with_reserve() {
                        continue;
                    }
                    self.out_of_fds(e, now);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and the like concern that one connection.
                    if let Some(n) = self.accept_errors.note(now) {
                        warning!("Control socket: accept failed: {e}{}", suppressed_note(n));
                    }
                    continue;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let peer = match nix::sys::socket::getsockopt(
                &stream,
                nix::sys::socket::sockopt::PeerCredentials,
            ) {
                Ok(c) => Peer {
                    uid: c.uid(),
                    pid: c.pid(),
                },
                Err(_) => continue,
            };
            let id = self.next_id;
            self.next_id += 1;
            let mut client = Client {
                id,
                stream,
                peer,
                input: Vec::new(),
                output: Vec::new(),
                deadline: now + IDLE_TIMEOUT,
                waiting: false,
                closing: false,
                eof: false,
                gunicorn: false,
                framing_known: false,
                shape: None,
                refused: None,
            };
            if peer.uid != self.uid && peer.uid != 0 {
                warning!(
                    "Control socket: refused uid {} (pid {}): only uid {} and root may use it",
                    peer.uid,
                    peer.pid,
                    self.uid
                );
                client.refused = Some((
                    ErrorKind::PermissionDenied,
                    "permission denied: not the master's user",
                ));
                client.deadline = now + REFUSED_GRACE;
            }
            let served = self.clients.iter().filter(|c| c.refused.is_none()).count();
            let refused = self.clients.len() - served;
            if client.refused.is_none() && served >= MAX_CLIENTS {
                // Answered like a refused user: once it has written, in its own
                // framing, so it reads the answer instead of a broken pipe.
                client.refused = Some((ErrorKind::Busy, BUSY));
                client.deadline = now + REFUSED_GRACE;
            }
            if let Some((kind, message)) = client.refused
                && refused >= MAX_CLIENTS
            {
                // Past the refused ones too (a flood): say it at once and close.
                client.send(&Response::err(kind, message));
                client.closing = true;
                client.flush();
                continue;
            }
            self.clients.push(client);
        }
    }

    /// Out of fds: the reserve fd answers one waiting client `busy` at once (JSON
    /// lines: it has not written yet). False when it could not.
    fn refuse_with_reserve(&mut self) -> bool {
        let mut line =
            serde_json::to_vec(&Response::err(ErrorKind::Busy, OUT_OF_FDS)).unwrap_or_default();
        line.push(b'\n');
        self.reserve.refuse(self.listener.as_fd(), &line)
    }

    /// Out of fds and no reserve to answer with: the connection stays in the
    /// backlog, and the listener is left alone for a moment, so the loop does not
    /// spin on a listener it cannot accept from; the waiting client is served
    /// once fds are free again.
    fn out_of_fds(&mut self, e: io::Error, now: Instant) {
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        self.reserve.refill();
        if let Some(n) = self.accept_errors.note(now) {
            warning!(
                "Control socket: accept failed: {e}; trying again every {} ms{}",
                ACCEPT_PAUSE.as_millis(),
                suppressed_note(n)
            );
        }
    }

    /// Read from a client that polled readable; returns the complete requests it
    /// sent (at most one while a deferred reply is pending).
    pub fn read(&mut self, id: ClientId, now: Instant) -> Vec<(ClientId, Peer, Request)> {
        let mut out = Vec::new();
        let Some(c) = self.clients.iter_mut().find(|c| c.id == id) else {
            return out;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut taken = 0;
        while taken < READ_CHUNK && !c.closing && !c.eof {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    // The peer is done sending. Finish what was asked, then close.
                    c.eof = true;
                    break;
                }
                Ok(n) => {
                    taken += n;
                    c.input.extend_from_slice(&buf[..n]);
                    // A framed (gunicornc) connection is bounded by its parser, from
                    // each frame's length prefix.
                    if !c.gunicorn
                        && c.input.len() > MAX_LINE
                        && !c.input[..MAX_LINE].contains(&b'\n')
                    {
                        c.send(&Response::err(
                            ErrorKind::TooLarge,
                            format!("request longer than {MAX_LINE} bytes"),
                        ));
                        c.input.clear();
                        c.closing = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.input.clear();
                    c.output.clear();
                    c.closing = true;
                    break;
                }
            }
        }
        if !c.framing_known && !c.input.is_empty() {
            // gunicornc's frames start with a 4-byte big-endian length; a JSON line
            // never starts with a NUL byte.
            c.gunicorn = c.input[0] == 0;
            c.framing_known = true;
        }
        if let Some((kind, message)) = c.refused
            && (!c.input.is_empty() || c.eof)
        {
            if c.gunicorn {
                c.output
                    .extend_from_slice(&crate::gunicornc::refusal(message));
            } else {
                c.send(&Response::err(kind, message));
            }
            c.input.clear();
            c.closing = true;
        }
        // A last request without its newline, then EOF (`printf '{...}' | socat`):
        // the end of the stream ends the line.
        if c.eof && !c.gunicorn && !c.input.is_empty() && c.input.last() != Some(&b'\n') {
            c.input.push(b'\n');
        }
        while !c.waiting && !c.closing {
            if c.gunicorn {
                use crate::gunicornc::Frame;
                match crate::gunicornc::take_frame(&mut c.input) {
                    Frame::Incomplete => break,
                    Frame::Request(shape, req) => {
                        c.deadline = now + GUNICORN_IDLE_TIMEOUT;
                        c.waiting = true;
                        c.shape = Some(shape);
                        out.push((c.id, c.peer, req));
                    }
                    Frame::Answer(bytes) => {
                        c.deadline = now + GUNICORN_IDLE_TIMEOUT;
                        c.output.extend_from_slice(&bytes);
                    }
                    Frame::Invalid(bytes) => {
                        c.output.extend_from_slice(&bytes);
                        c.input.clear();
                        c.closing = true;
                    }
                }
                continue;
            }
            let Some(end) = c.input.iter().position(|&b| b == b'\n') else {
                break;
            };
            let line: Vec<u8> = c.input.drain(..=end).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            c.deadline = now + IDLE_TIMEOUT;
            match parse_request(line) {
                Ok(req) => {
                    c.waiting = true;
                    out.push((c.id, c.peer, req));
                }
                Err(resp) => c.send(&resp),
            }
        }
        c.flush();
        self.sweep();
        out
    }

    /// Answer a request; the client may send its next one.
    pub fn reply(&mut self, id: ClientId, resp: &Response) {
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == id) {
            c.waiting = false;
            match c.shape.take() {
                Some(shape) => c
                    .output
                    .extend_from_slice(&crate::gunicornc::render(&shape, resp)),
                None => c.send(resp),
            }
            c.flush();
        }
        self.sweep();
    }

    /// Flush a client that polled writable.
    pub fn write(&mut self, id: ClientId) {
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == id) {
            c.flush();
        }
        self.sweep();
    }

    /// Requests that came in while the previous one was pending, once it is answered.
    pub fn pending_requests(&mut self, now: Instant) -> Vec<(ClientId, Peer, Request)> {
        let ids: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|c| !c.waiting && !c.closing && has_complete_request(c))
            .map(|c| c.id)
            .collect();
        ids.into_iter().flat_map(|id| self.read(id, now)).collect()
    }

    /// Close clients past their idle deadline; accept again after a pause.
    pub fn expire(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        for c in &mut self.clients {
            if !c.waiting && now >= c.deadline && !c.closing {
                c.closing = true;
                c.output.clear();
            }
        }
        self.sweep();
    }

    fn sweep(&mut self) {
        let mut i = 0;
        while i < self.clients.len() {
            let c = &self.clients[i];
            // A client that half-closed after its request still gets the reply; a
            // gunicornc client at EOF with a partial frame never completes it.
            let more = has_complete_request(c);
            let done = (c.closing || (c.eof && !more)) && !c.waiting && c.output.is_empty();
            if c.output.len() <= MAX_OUTPUT && !done {
                i += 1;
            } else {
                let c = self.clients.remove(i);
                self.retired.push(OwnedFd::from(c.stream));
            }
        }
    }

    /// The sockets closed since the last call, to be taken out of the event set
    /// before they are dropped.
    pub fn take_retired(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.retired)
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }
}
