//! The control socket server, inside the master's one poll loop.
//!
//! Everything is non-blocking and bounded: at most [`MAX_CLIENTS`] connections,
//! each with an input buffer of at most one line ([`MAX_LINE`]), an output buffer
//! cap, and an idle deadline. A client that sends garbage gets an error reply; one
//! that sends an endless line gets an error and is closed; one that sends nothing is
//! closed at its deadline. None of them can delay signals or other clients, because
//! the master never waits on a client: it reads what is there and moves on.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbiter_proto::control::{ErrorKind, MAX_LINE, Request, Response, parse_request};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

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
const MAX_OUTPUT: usize = 8 * 1024 * 1024;
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

struct Client {
    id: ClientId,
    stream: UnixStream,
    peer: Peer,
    input: Vec<u8>,
    output: Vec<u8>,
    deadline: Instant,
    /// A request is being carried out (reload, stop): read nothing more until it is
    /// answered, so replies stay in order.
    waiting: bool,
    /// Close once the output is flushed.
    closing: bool,
    /// The peer finished sending (EOF): answer what it asked, then close.
    eof: bool,
    /// The gunicornc framing was detected on this connection.
    gunicorn: bool,
    /// The framing is decided by the connection's first byte, once: a later NUL
    /// (after a JSON line, say) must not switch it.
    framing_known: bool,
    /// For a gunicornc request in flight: how to shape its answer.
    shape: Option<crate::gunicornc::Shape>,
    /// Not to be served (another user): answered with this error once its first
    /// bytes show which framing it speaks, then closed. Answering before it writes
    /// would make its write fail, and many clients then never read the answer.
    refused: Option<(ErrorKind, &'static str)>,
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
    /// Bind the control socket at `path`: mode 0600, in a directory created 0700 if
    /// missing. A stale socket from a dead master is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let (listener, identity) = bind_socket(path)?;
        let mut server = ControlServer {
            listener,
            path: path.to_path_buf(),
            identity,
            clients: Vec::new(),
            next_id: 1,
            uid: nix::unistd::getuid().as_raw(),
            watch: None,
            watched: None,
            restore_at: None,
            restore_backoff: RESTORE_DELAY,
            retired: Vec::new(),
            accept_paused_until: None,
            accept_errors: Repeated::new(ACCEPT_ERROR_LOG_EVERY),
        };
        match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => server.watch = Some(i),
            Err(e) => warning!(
                "Control socket: cannot watch {} ({e}); if it is removed, a reload \
                 brings it back",
                path.display()
            ),
        }
        server.arm_watch();
        Ok(server)
    }

    /// (Re)point the inotify watch at the socket's directory, which may be new.
    fn arm_watch(&mut self) {
        let Some(inotify) = &self.watch else { return };
        if let Some(wd) = self.watched.take() {
            let _ = inotify.rm_watch(wd);
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mask = AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        // Failing here (the directory just went away) is noticed at the restore.
        self.watched = inotify.add_watch(dir, mask).ok();
    }

    /// The watch fired: if the event concerns our file or its directory, look at
    /// the path again shortly.
    pub fn on_watch(&mut self, now: Instant) {
        let Some(inotify) = &self.watch else { return };
        let name = self.path.file_name();
        let mut gone = false;
        // Bounded: the queue holds at most max_queued_events, and our own writes
        // never generate these events.
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for e in events {
                let dir_gone = e.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED
                        | AddWatchFlags::IN_Q_OVERFLOW,
                );
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watched = None;
                }
                gone |= dir_gone || (e.name.is_some() && e.name.as_deref() == name);
            }
        }
        if gone && self.restore_at.is_none() {
            self.restore_at = Some(now + RESTORE_DELAY);
        }
    }

    /// Bind a new socket if ours was removed and nothing took its place. A path
    /// that exists is left alone whoever owns it: during an upgrade the new master
    /// renames its socket over ours.
    pub fn restore(&mut self, now: Instant) -> Option<Restore> {
        if self.restore_at.is_none_or(|t| now < t) {
            return None;
        }
        self.restore_at = None;
        match std::fs::symlink_metadata(&self.path) {
            // NotADirectory: something else now sits where the directory was.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) => {}
            _ => {
                self.restore_backoff = RESTORE_DELAY;
                if self.watched.is_none() {
                    self.arm_watch();
                }
                return None;
            }
        }
        match self.rebind() {
            Ok(()) => {
                self.restore_backoff = RESTORE_DELAY;
                Some(Restore::Rebound)
            }
            Err(e) => {
                let retry = self.restore_backoff;
                self.restore_backoff = (retry * 2).min(RESTORE_BACKOFF_MAX);
                self.restore_at = Some(now + retry);
                Some(Restore::Failed(e, retry))
            }
        }
    }

    /// A new listener at the same path; connected clients stay.
    fn rebind(&mut self) -> Result<(), ControlError> {
        let (listener, identity) = bind_socket(&self.path)?;
        let old = std::mem::replace(&mut self.listener, listener);
        self.retired.push(OwnedFd::from(old));
        self.identity = identity;
        self.arm_watch();
        Ok(())
    }

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

    /// Out of fds: the connection stays in the backlog, and the listener is left
    /// alone for a moment, so the loop does not spin on a listener it cannot
    /// accept from; the waiting client is served once fds are free again.
    fn out_of_fds(&mut self, e: io::Error, now: Instant) {
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
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

    /// If the socket file is gone (a cleaner removed its directory) or replaced by
    /// something that is not ours, bind a new one at the same path. The connected
    /// clients stay. Returns whether it had to.
    pub fn ensure_bound(&mut self) -> Result<bool, ControlError> {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            return Ok(false);
        }
        self.rebind()?;
        self.restore_at = None;
        Ok(true)
    }

    /// Move the socket file (an upgraded master taking the usual path). The rename is
    /// atomic: clients find either the old master's socket or ours, never nothing.
    pub fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        self.arm_watch();
        Ok(())
    }

    /// Last words before the master exits: flush each client with a short blocking
    /// write, since there will be no next turn. `remove`: unlink the socket file
    /// (if it is still ours).
    pub fn shutdown(mut self, remove: bool) {
        for c in &mut self.clients {
            if !c.output.is_empty() {
                let _ = c.stream.set_nonblocking(false);
                let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = c.stream.write_all(&c.output);
            }
        }
        self.clients.clear();
        // Remove the socket file only if it is still the one we bound.
        if remove
            && let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
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

impl Client {
    fn send(&mut self, resp: &Response) {
        match serde_json::to_vec(resp) {
            Ok(mut line) => {
                line.push(b'\n');
                self.output.extend_from_slice(&line);
            }
            Err(_) => self.output.extend_from_slice(b"{\"v\":1,\"ok\":false}\n"),
        }
    }

    fn flush(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => break,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The peer is gone: nothing more to say to it.
                    self.output.clear();
                    self.closing = true;
                    break;
                }
            }
        }
    }
}

/// Is a whole request already buffered? (A gunicornc frame's length is checked by
/// its parser; four bytes are enough to ask it.)
/// Bind the socket file at `path` (see [`ControlServer::bind`]); its listener and
/// the file's device and inode.
fn bind_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), ControlError> {
    let shown = path.display();
    let fail = |what: String| ControlError(format!("control socket {shown}: {what}"));
    if path.as_os_str().len() >= 108 {
        return Err(fail("path longer than 107 bytes".into()));
    }
    let uid = nix::unistd::getuid().as_raw();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir, uid).map_err(fail)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(fail("the path exists and is not a socket".into()));
            }
            if socket_answers(path) {
                return Err(fail("a running master is answering on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    // The master has one thread, so changing the umask around bind is race-free
    // and leaves no window in which the socket is more open than 0600.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| fail(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

fn has_complete_request(c: &Client) -> bool {
    if c.gunicorn {
        // A whole frame, or a length prefix the parser refuses outright: either
        // way there is an answer to give. A partial frame at EOF never completes.
        match c.input.get(..4) {
            Some(&[a, b, x, y]) => {
                let len = u32::from_be_bytes([a, b, x, y]) as usize;
                len > crate::gunicornc::MAX_BODY || c.input.len() - 4 >= len
            }
            _ => false,
        }
    } else {
        c.input.contains(&b'\n')
    }
}

/// How much of a directory's ownership and mode we insist on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// The operator's choice, in a place only they (or root) could have made it:
    /// it need only belong to us or root.
    Chosen,
    /// Other users could have made it (its parent is group- or world-writable, as
    /// /tmp is): a real directory, ours, that nobody else can write to.
    Shared,
    /// The default directory (/tmp/arbiter-UID, $XDG_RUNTIME_DIR/arbiter,
    /// /run/arbiter), or one we just created: a real directory, ours, 0700.
    Private,
}

/// Make sure the socket's directory is one nobody else controls, creating it 0700
/// if missing. Otherwise whoever made it, or owns the directory a planted symlink
/// leads to, could replace or impersonate our socket.
fn prepare_dir(dir: &Path, uid: u32) -> Result<(), String> {
    let shown = dir.display();
    let default_dir = arbiter_proto::paths::default_control_path("arbiter");
    let shared = dir
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.mode() & 0o022 != 0);
    let trust = if default_dir.parent() == Some(dir) {
        Trust::Private
    } else if shared {
        Trust::Shared
    } else {
        Trust::Chosen
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if trust == Trust::Chosen && meta.file_type().is_symlink() => {
            let meta = std::fs::metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
            check_dir(dir, &meta, uid, trust)
        }
        Ok(meta) => check_dir(dir, &meta, uid, trust),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {shown}: {e}"))?;
            // DirBuilder's mode is filtered by the umask; make it exactly 0700.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            // Someone may have made it between our look and our mkdir (which then
            // succeeds quietly): check what is there now.
            let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
            check_dir(dir, &meta, uid, Trust::Private)
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// Is `meta` (from `lstat`; from `stat` where a symlink is fine) a directory we
/// may put the socket in, at `trust`?
fn check_dir(dir: &Path, meta: &std::fs::Metadata, uid: u32, trust: Trust) -> Result<(), String> {
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        return Err(format!(
            "directory {shown} is a symbolic link (another user can make one there)"
        ));
    }
    if !meta.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    if meta.uid() != uid && (trust != Trust::Chosen || meta.uid() != 0) {
        return Err(format!(
            "directory {shown} belongs to uid {}, not to us (uid {uid})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    let bad = match trust {
        Trust::Chosen => false,
        Trust::Shared => mode & 0o022 != 0,
        Trust::Private => mode != 0o700,
    };
    if bad {
        return Err(format!(
            "directory {shown} has mode {mode:04o}, not 0700 (other users could reach the socket)"
        ));
    }
    Ok(())
}

/// Does a server accept on the socket at `path`? Asked without blocking (the
/// master must not wait on a stranger's full backlog): a full backlog counts as
/// a live server.
pub(crate) fn socket_answers(path: &Path) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    use std::os::fd::AsRawFd;
    matches!(
        connect(fd.as_raw_fd(), &addr),
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS)
    )
}
