//! A blocking client for the control socket, with timeouts.
//!
//! ```no_run
//! use std::time::Duration;
//! use arbiter_proto::client::Client;
//! use arbiter_proto::control::{Reply, Request};
//!
//! let mut c = Client::connect("/run/arbiter/web.sock", Duration::from_secs(10))?;
//! match c.request(&Request::Ping)? {
//!     Ok(Reply::Pong { pid, .. }) => println!("pong from {pid}"),
//!     Ok(other) => println!("unexpected reply {other:?}"),
//!     Err(e) => eprintln!("the master refused: {}", e.message),
//! }
//! # Ok::<(), arbiter_proto::client::ClientError>(())
//! ```
//!
//! Every exchange is bounded: the connect (a Unix connect only waits when the
//! master's listen backlog is full; it is retried until the deadline), and each call
//! as a whole (writing the request and reading the one response line). `reload`,
//! `stop` and `upgrade` are answered when they are done, so give those a longer
//! timeout with [`Client::set_timeout`] or [`Client::call_with_timeout`].

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::{ErrorBody, MAX_REPLY, Reply, Request, RequestEnvelope, Response};
use crate::frame::{self, FrameError};

/// Why a call did not produce a response from the master.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens at the path: the socket file is missing (`ENOENT`) or no
    /// process accepts on it (`ECONNREFUSED`, a stale socket of a dead master).
    /// `arbiterctl` exits 3 ("no master answering").
    NoMaster {
        /// The control socket path tried.
        path: PathBuf,
        /// The error from `connect`.
        source: io::Error,
    },
    /// The connect or the call did not complete within the timeout.
    Timeout {
        /// The control socket path.
        path: PathBuf,
        /// What was going on: `"connect"`, `"send"` or `"reply"`.
        during: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The master closed the connection before a complete response line (it
    /// exited, or dropped the connection).
    Closed {
        /// The control socket path.
        path: PathBuf,
    },
    /// The peer does not speak the protocol: a response that is not valid JSON of
    /// the expected shape, or longer than [`MAX_REPLY`].
    Protocol(String),
    /// The socket is served by a uid that is neither ours nor root's, and was not
    /// named as trusted: nothing was sent to it. `arbiterctl` exits 1.
    Untrusted {
        /// The control socket path.
        path: PathBuf,
        /// The uid of the process serving it.
        uid: u32,
    },
    /// Any other I/O failure (permission denied on the socket, path too long, ...).
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl ClientError {
    /// A short machine-readable name: `no_master`, `timeout`, `closed`,
    /// `protocol_error`, `io_error` (what `arbiterctl --json` prints as the error
    /// `kind` for failures on the client side; the master's kinds are the
    /// [`ErrorKind`](crate::control::ErrorKind) names).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::NoMaster { .. } => "no_master",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Closed { .. } => "closed",
            ClientError::Protocol(_) => "protocol_error",
            ClientError::Untrusted { .. } => "untrusted",
            ClientError::Io { .. } => "io_error",
        }
    }

    /// No master answered: nothing listening, no answer in time, or the connection
    /// dropped without an answer. (`arbiterctl` exits 3 for these.)
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::NoMaster { .. } | ClientError::Timeout { .. } | ClientError::Closed { .. }
        )
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoMaster { path, source } => {
                write!(f, "no master answering on {}: {source}", path.display())
            }
            ClientError::Timeout {
                path,
                during,
                after,
            } => write!(
                f,
                "no master answering on {}: timed out after {} waiting for the {during}",
                path.display(),
                fmt_duration(*after)
            ),
            ClientError::Closed { path } => write!(
                f,
                "the master on {} closed the connection without answering",
                path.display()
            ),
            ClientError::Protocol(m) => write!(f, "protocol error: {m}"),
            ClientError::Untrusted { path, uid } => write!(
                f,
                "refusing to talk to {}: it is served by uid {uid}, not by you or root \
                 (--trust-uid {uid} to allow)",
                path.display()
            ),
            ClientError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::NoMaster { source, .. } | ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// One connection to a master's control socket.
///
/// Requests on one connection are answered in order; a `Client` sends one and
/// waits for its answer before the next.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<DeadlineStream>,
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// Connect to the socket at `path`, giving up after `timeout`. The same timeout
    /// bounds each later call until [`set_timeout`](Self::set_timeout) changes it.
    /// (`Duration::MAX` means no bound.)
    ///
    /// A missing socket file or a refused connection is [`ClientError::NoMaster`]; a
    /// master whose listen backlog stays full past the timeout is
    /// [`ClientError::Timeout`]; a socket served by another user (not root) is
    /// [`ClientError::Untrusted`] (see [`connect_trusting`](Self::connect_trusting)).
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        Client::connect_trusting(path, timeout, &[])
    }

    /// [`connect`](Self::connect), also accepting a socket served by one of
    /// `trusted` uids. Whoever can write to the socket's directory could otherwise
    /// put their own socket there and collect our requests (and answer them with
    /// lies): the peer's uid comes from the kernel (`SO_PEERCRED`) and is checked
    /// before anything is sent.
    pub fn connect_trusting(
        path: impl AsRef<Path>,
        timeout: Duration,
        trusted: &[u32],
    ) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = connect_with_timeout(&path, timeout)?;
        let uid = peer_uid(&stream).map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        let me = nix::unistd::getuid().as_raw();
        if uid != me && uid != 0 && !trusted.contains(&uid) {
            return Err(ClientError::Untrusted { path, uid });
        }
        Ok(Client {
            reader: BufReader::new(DeadlineStream {
                stream,
                deadline: None,
            }),
            path,
            timeout: Some(timeout),
        })
    }

    /// The socket path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bound on each later call; `None` waits as long as it takes.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The current bound on a call.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Send `request` (one [`RequestEnvelope`] line) and read the one response
    /// line, within the current timeout.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.call_with_timeout(request, self.timeout)
    }

    /// [`call`](Self::call) with its own bound (`None`: no bound), for requests
    /// answered when they are done (`reload`, `stop`, `upgrade`).
    pub fn call_with_timeout(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(&RequestEnvelope::new(request.clone()))
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        line.push(b'\n');
        let start = Instant::now();
        self.reader.get_mut().deadline = timeout.and_then(|t| start.checked_add(t));
        let timed_out = |during| ClientError::Timeout {
            path: self.path.clone(),
            during,
            after: timeout.unwrap_or_default(),
        };
        if let Err(e) = self.reader.get_mut().write_all(&line) {
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out("send"),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Closed {
                    path: self.path.clone(),
                },
                _ => ClientError::Io {
                    path: self.path.clone(),
                    source: e,
                },
            });
        }
        let reply = match frame::read_line_up_to(&mut self.reader, MAX_REPLY) {
            Ok(l) => l,
            Err(FrameError::Closed) => {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
            Err(FrameError::TooLarge) => {
                return Err(ClientError::Protocol(format!(
                    "response longer than {MAX_REPLY} bytes"
                )));
            }
            Err(FrameError::Io(e)) => {
                return Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out("reply"),
                    io::ErrorKind::ConnectionReset => ClientError::Closed {
                        path: self.path.clone(),
                    },
                    _ => ClientError::Io {
                        path: self.path.clone(),
                        source: e,
                    },
                });
            }
        };
        serde_json::from_slice::<Response>(&reply).map_err(|e| {
            let shown = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
            ClientError::Protocol(format!("not a response ({e}): {shown:?}"))
        })
    }

    /// [`call`](Self::call), then split the response: `Ok(Ok(reply))`, or
    /// `Ok(Err(error))` when the master answered with an error.
    pub fn request(&mut self, request: &Request) -> Result<Result<Reply, ErrorBody>, ClientError> {
        self.call(request).map(Response::into_result)
    }
}

/// The stream, with a deadline for the whole call: each read and write gets the
/// time that is left as its socket timeout.
#[derive(Debug)]
struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl DeadlineStream {
    fn arm(&self, write: bool) -> io::Result<()> {
        let left = match self.deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
        };
        if write {
            self.stream.set_write_timeout(left)
        } else {
            self.stream.set_read_timeout(left)
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.stream.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// The length of `sun_path` on Linux: a socket path must be shorter.
const SUN_PATH_LEN: usize = 108;

/// Connect without blocking past `timeout`. A Unix stream connect either completes
/// at once, fails at once, or (non-blocking, listen backlog full) fails with EAGAIN:
/// there is no "in progress" state to poll for, so EAGAIN is retried with a short
/// backoff until the deadline.
fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let io_err = |source: io::Error| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not a usable socket path (empty, NUL byte, or {SUN_PATH_LEN} bytes or longer)"
            ),
        )));
    }
    let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err(e.into()))?;

    // No deadline if it would not fit in an Instant (a timeout of "forever").
    let deadline = Instant::now().checked_add(timeout);
    let mut backoff = Duration::from_millis(1);
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN | Errno::EINPROGRESS) => {
                let now = Instant::now();
                let left = deadline.map_or(backoff, |d| d.saturating_duration_since(now));
                if left.is_zero() {
                    return Err(ClientError::Timeout {
                        path: path.to_path_buf(),
                        during: "connect",
                        after: timeout,
                    });
                }
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(25));
            }
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED | Errno::ENOTDIR)) => {
                return Err(ClientError::NoMaster {
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
            Err(e) => return Err(io_err(e.into())),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(io_err)?;
    Ok(stream)
}

/// The uid of the process that serves the socket (the one that called `listen`).
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    Ok(getsockopt(stream, PeerCredentials)?.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ErrorKind;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "arbproto-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn no_master() {
        let d = tempdir();
        let missing = d.join("missing.sock");
        let e = Client::connect(&missing, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NoMaster { .. }), "{e:?}");
        assert_eq!(e.kind(), "no_master");
        // A stale socket file: bound, then the listener is gone.
        let stale = d.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let e = Client::connect(&stale, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NoMaster { .. }), "{e:?}");
        assert!(e.is_unreachable());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn untrusted_says_whose_socket_and_how_to_allow_it() {
        let e = ClientError::Untrusted {
            path: "/tmp/arbiter-1000/web.sock".into(),
            uid: 31337,
        };
        assert_eq!(
            e.to_string(),
            "refusing to talk to /tmp/arbiter-1000/web.sock: it is served by uid 31337, \
             not by you or root (--trust-uid 31337 to allow)"
        );
        assert_eq!(e.kind(), "untrusted");
        assert!(!e.is_unreachable());
    }

    #[test]
    fn path_too_long() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let e = Client::connect(&long, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::Io { .. }), "{e:?}");
    }

    #[test]
    fn round_trip_error_and_timeout() {
        let d = tempdir();
        let p = d.join("m.sock");
        let l = UnixListener::bind(&p).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"v\":1,\"cmd\":\"ping\"}\n");
            writeln!(
                w,
                "{}",
                serde_json::to_string(&Response::ok(Reply::Pong {
                    pid: 7,
                    name: "x".into()
                }))
                .unwrap()
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(
                w,
                "{}",
                serde_json::to_string(&Response::err(ErrorKind::Refused, "no")).unwrap()
            )
            .unwrap();
            // Third request: never answered (timeout), then garbage.
            line.clear();
            r.read_line(&mut line).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            w.write_all(b"garbage\n").unwrap();
            line.clear();
            let _ = r.read_line(&mut line);
        });
        let mut c = Client::connect(&p, Duration::from_secs(5)).unwrap();
        assert_eq!(
            c.request(&Request::Ping).unwrap().unwrap(),
            Reply::Pong {
                pid: 7,
                name: "x".into()
            }
        );
        let e = c.request(&Request::Status).unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        let e = c
            .call_with_timeout(&Request::Version, Some(Duration::from_millis(100)))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Timeout {
                    during: "reply",
                    ..
                }
            ),
            "{e:?}"
        );
        // The late garbage line arrives for the next read.
        let e = c.call(&Request::Ping).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn closed_without_answer() {
        let d = tempdir();
        let p = d.join("c.sock");
        let l = UnixListener::bind(&p).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
        });
        let mut c = Client::connect(&p, Duration::from_secs(5)).unwrap();
        let e = c.call(&Request::Ping).unwrap_err();
        assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn full_backlog_times_out() {
        let d = tempdir();
        let p = d.join("b.sock");
        // A listener that never accepts: fill its backlog with connections.
        let l = UnixListener::bind(&p).unwrap();
        // Listening again changes the backlog (Linux): 0 admits one pending connect.
        nix::sys::socket::listen(&l, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let mut held = Vec::new();
        let mut timed_out = false;
        for _ in 0..64 {
            match Client::connect(&p, Duration::from_millis(50)) {
                Ok(c) => held.push(c),
                Err(ClientError::Timeout {
                    during: "connect", ..
                }) => {
                    timed_out = true;
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(timed_out, "the backlog never filled");
        drop(l);
        let _ = std::fs::remove_dir_all(&d);
    }
}
