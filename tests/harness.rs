//! The black-box harness: start the real `arbiterd`, look at it only from outside
//! (its log, `/proc`, HTTP answers, exit status), and always clean up.
//!
//! * [`Daemon`] owns one running master: a fresh short temp dir under `/tmp`, its
//!   own process group, stdout+stderr in `DIR/daemon.log`, `-b 127.0.0.1:0` and
//!   `--control DIR/control.sock` added unless given, the real addresses parsed from
//!   the `Listening at:` line. Dropping it SIGKILLs the group, the workers and every
//!   process that inherited the daemon's tag, and prints the log if the test failed.
//! * [`wait_until`] / [`Daemon::wait_until`]: retry a probe with a 5 -> 50 ms backoff
//!   until a deadline; a timeout panics with what was awaited, the last observation
//!   and (for the daemon variant) the log. Never a fixed sleep to wait for a state.
//! * `/proc` readers: [`proc_stat`], [`children_of`], [`thread_count`],
//!   [`proc_environ`], [`status_field`].
//! * A tiny HTTP/1.1 client ([`http_get`], [`spawn_get`] for in-flight requests).
//! * [`Run`]: one-shot invocations that must exit quickly (startup errors,
//!   `arbiterctl`), with a timeout and a leftover-process check.
//!
//! Every process a test starts carries `ARBTEST_TAG=<its temp dir>` in its
//! environment; the master passes its environment on, so workers (and their
//! children) carry it too. That is how cleanup finds everything, even orphans, and
//! how tests check that nothing was left behind. Nothing here is global: tests run
//! in parallel threads of one process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

pub const ARBITERD: &str = env!("CARGO_BIN_EXE_arbiterd");
pub const ARBITERCTL: &str = env!("CARGO_BIN_EXE_arbiterctl");

/// The environment variable that marks every process started for one test.
pub const TAG_VAR: &str = "ARBTEST_TAG";

/// Boot, reload and other "the daemon has to do real work" deadlines. Generous: a
/// debug build on a small, busy CI machine running many tests at once.
pub const LONG: Duration = Duration::from_secs(30);
/// Deadlines for things that should be quick (a signal's effect, an exit).
pub const SHORT: Duration = Duration::from_secs(10);

/// The variables of the test runner's environment that would change what the
/// daemon does (systemd hand-over, a parent master's contract): never inherited.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A fresh temp dir with a short path (`/tmp/arbXXXXXX`): unix socket paths must
/// fit in 108 bytes, so not `CARGO_TARGET_TMPDIR`.
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("arb")
        .tempdir_in("/tmp")
        .expect("create a temp dir under /tmp")
}

/// The tests' own files (`tests/workers/*.py`), as an absolute path.
pub fn test_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel)
}

/// A Python 3 interpreter: the system one when present (no version-manager shims
/// between the master and the worker), else whatever `python3` PATH finds.
pub fn python3() -> OsString {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "python3".into()
}

// ------------------------------------------------------------------ tools

/// Under CI (`CI=true` or `ARBITER_REQUIRE_EXAMPLES=1`) every tool a test uses must
/// be installed: build.rs then marks none of those tests ignored.
pub fn tools_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ARBITER_REQUIRE_EXAMPLES").is_ok_and(|v| v == "1")
}

/// A tool the test needs is missing at run time although the build saw it (it was
/// removed since) or CI requires it: fail under CI, else say why and skip. Where
/// the build already saw it missing, the test is `ignored` with the reason instead
/// (build.rs).
pub fn tool_missing(what: &str) {
    if tools_required() {
        panic!("{what}, and CI requires it (.ci/run installs it)");
    }
    eprintln!("skipped: {what}");
}

// ------------------------------------------------------------------ waiting

/// Retry `probe` until it returns `Ok`, with a 5 -> 50 ms backoff. `Err` carries the
/// observation that did not satisfy the condition yet. On timeout: panic with
/// `what`, the last observation and `context()`.
pub fn wait_until_with<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
    context: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = ms(5);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let last = match probe() {
            Ok(v) => return v,
            Err(observed) => observed,
        };
        let now = Instant::now();
        if now >= deadline {
            panic!(
                "timed out after {:.1?} ({tries} tries) waiting for: {what}\nlast observation: {last}\n{}",
                now - start,
                context()
            );
        }
        std::thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(ms(50));
    }
}

/// [`wait_until_with`] without extra context.
pub fn wait_until<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Result<T, String>) -> T {
    wait_until_with(timeout, what, probe, String::new)
}

// ------------------------------------------------------------------ /proc

/// The fields of `/proc/PID/stat` the tests need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    /// R, S, D, Z, T, X, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// In clock ticks since boot.
    pub starttime: u64,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parse a `/proc/PID/stat` line. The comm field is in parentheses and may itself
/// contain spaces and parentheses, so the fields after it start after the LAST `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let comm = line.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[2] = pgrp (5),
    // rest[3] = session (6), rest[19] = starttime (22).
    Some(ProcStat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        starttime: rest.get(19)?.parse().ok()?,
    })
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let raw = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&String::from_utf8_lossy(&raw))
}

/// Every pid in `/proc` (processes, not threads).
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The children of `ppid` (zombies included), sorted by start time then pid.
pub fn children_of(ppid: i32) -> Vec<ProcStat> {
    let mut kids: Vec<ProcStat> = all_pids()
        .into_iter()
        .filter_map(proc_stat)
        .filter(|s| s.ppid == ppid)
        .collect();
    kids.sort_by_key(|s| (s.starttime, s.pid));
    kids
}

/// The pids of `ppid`'s children that are alive (not zombies), oldest first.
pub fn live_children(ppid: i32) -> Vec<i32> {
    children_of(ppid)
        .into_iter()
        .filter(|s| !s.is_zombie())
        .map(|s| s.pid)
        .collect()
}

/// The pids of `ppid`'s children in state Z (dead, not reaped).
pub fn zombie_children(ppid: i32) -> Vec<i32> {
    children_of(ppid)
        .into_iter()
        .filter(|s| s.is_zombie())
        .map(|s| s.pid)
        .collect()
}

/// Is `pid` a process that has not exited (a zombie counts as gone)?
pub fn is_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|s| !s.is_zombie())
}

/// One `Key:` line of `/proc/PID/status`, value trimmed.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    })
}

/// `Threads:` of `/proc/PID/status`.
pub fn thread_count(pid: i32) -> Option<usize> {
    status_field(pid, "Threads")?.parse().ok()
}

/// The environment `pid` was exec'd with (`/proc/PID/environ`); `None` if it is
/// gone or unreadable. A forked child that has not exec'd yet shows its parent's.
pub fn proc_environ(pid: i32) -> Option<HashMap<String, String>> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

/// `/proc/PID/cmdline` with spaces between the arguments (for messages).
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn has_tag(pid: i32, tag: &str) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{TAG_VAR}={tag}");
    raw.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

/// Live processes (not zombies) that carry `ARBTEST_TAG=tag`, this one excluded.
pub fn tagged_pids(tag: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && has_tag(p, tag) && is_alive(p))
        .collect()
}

/// SIGKILL every process carrying `tag` (and its process group when it leads
/// one), until none is left or `timeout` passes.
pub fn kill_tagged(tag: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = tagged_pids(tag);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for p in pids {
            if proc_stat(p).is_some_and(|s| s.pgrp == p) {
                let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(ms(5));
    }
}

/// A worker as seen from `/proc`: its pid and the `ARBITER_*` variables it was
/// exec'd with (`None` while it is forked but not exec'd yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: i32,
    pub worker_id: Option<u64>,
    pub slot: Option<u64>,
    pub generation: Option<u64>,
}

pub fn worker_info(pid: i32) -> WorkerInfo {
    let env = proc_environ(pid).unwrap_or_default();
    let num = |k: &str| env.get(k).and_then(|v| v.parse().ok());
    WorkerInfo {
        pid,
        worker_id: num("ARBITER_WORKER_ID"),
        slot: num("ARBITER_SLOT"),
        generation: num("ARBITER_GENERATION"),
    }
}

// ------------------------------------------------------------------ HTTP

/// Where a daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listener {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// An entry the harness does not understand (kept for the assertion message).
    Other(String),
}

impl Listener {
    /// Parse one entry of the `Listening at:` line: `http://127.0.0.1:8000`,
    /// `http://[::1]:8000`, `unix:/run/app.sock`.
    pub fn parse(s: &str) -> Listener {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            return Listener::Unix(PathBuf::from(p));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        match hostport.parse() {
            Ok(a) => Listener::Tcp(a),
            Err(_) => Listener::Other(s.to_string()),
        }
    }

    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(a) => Some(*a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decode a chunked body; `None` while incomplete.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A complete response in `buf`, if there is one (`eof`: the peer closed).
fn parse_response(buf: &[u8], eof: bool) -> io::Result<Option<Response>> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if eof {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a full response header ({} bytes: {:?})",
                    buf.len(),
                    String::from_utf8_lossy(buf)
                ),
            ))
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let raw_body = &buf[end + 4..];
    let body: Vec<u8> = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        match dechunk(raw_body) {
            Some(b) => b,
            None if eof => return Err(bad("connection closed inside a chunked body".into())),
            None => return Ok(None),
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        if raw_body.len() >= len {
            raw_body[..len].to_vec()
        } else if eof {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body cut short: {} of {len} bytes", raw_body.len()),
            ));
        } else {
            return Ok(None);
        }
    } else if eof {
        raw_body.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// Send `GET path` with `Connection: close` on `stream` and read the response.
pub fn exchange<S: Read + Write>(mut stream: S, host: &str, path: &str) -> io::Result<Response> {
    // One write, as a real client sends it: `write!` would send each piece of
    // the format on its own.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: arbiter-blackbox\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(r) = parse_response(&buf, false)? {
            return Ok(r);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return parse_response(&buf, true)?.ok_or_else(|| io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn connect_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// `GET path` from `target`; `timeout` bounds the connect and each read/write.
pub fn http_get(target: &Listener, path: &str, timeout: Duration) -> io::Result<Response> {
    match target {
        Listener::Tcp(addr) => exchange(connect_tcp(*addr, timeout)?, &addr.to_string(), path),
        Listener::Unix(p) => exchange(connect_unix(p, timeout)?, "localhost", path),
        Listener::Other(s) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot connect to {s:?}"),
        )),
    }
}

/// A request running in a background thread (the connection is established when
/// [`spawn_get`] returns: it is at least in the listen queue).
pub struct InFlight {
    handle: JoinHandle<io::Result<Response>>,
    /// The client's local port (TCP only), to find the connection in `/proc/net`.
    pub local_port: Option<u16>,
    pub target: Listener,
    pub path: String,
}

impl InFlight {
    /// Wait for the response (the thread's own timeouts bound this).
    pub fn join(self) -> io::Result<Response> {
        match self.handle.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Start `GET path` in a thread; returns once connected (panics if it cannot
/// connect within `timeout`). `timeout` bounds each read of the response.
pub fn spawn_get(target: &Listener, path: &str, timeout: Duration) -> InFlight {
    let (tx, rx) = mpsc::channel::<io::Result<Option<u16>>>();
    let t = target.clone();
    let p = path.to_string();
    let handle = std::thread::spawn(move || -> io::Result<Response> {
        match &t {
            Listener::Tcp(addr) => {
                let s = match connect_tcp(*addr, timeout) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = tx.send(Ok(s.local_addr().ok().map(|a| a.port())));
                exchange(s, &addr.to_string(), &p)
            }
            Listener::Unix(path) => {
                let s = match connect_unix(path, timeout) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = tx.send(Ok(None));
                exchange(s, "localhost", &p)
            }
            Listener::Other(s) => {
                let e = io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("cannot connect to {s:?}"),
                );
                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    });
    let local_port = match rx.recv_timeout(timeout + secs(1)) {
        Ok(Ok(port)) => port,
        Ok(Err(e)) => panic!("in-flight GET {path}: cannot connect to {target:?}: {e}"),
        Err(e) => panic!("in-flight GET {path}: no connection to {target:?}: {e}"),
    };
    InFlight {
        handle,
        local_port,
        target: target.clone(),
        path: path.to_string(),
    }
}

/// The inode of the server side of the TCP connection `server_port` <-
/// `client_port`, once a process has accepted it (an unaccepted connection in the
/// listen queue has no socket inode yet: `/proc/net/tcp` shows 0).
pub fn accepted_inode(server_port: u16, client_port: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port) {
                let inode: u64 = f[9].parse().unwrap_or(0);
                if inode != 0 {
                    return Some(inode);
                }
            }
        }
    }
    None
}

/// The pid among `pids` holding an fd on `socket:[inode]`.
pub fn holder_of_socket(pids: &[i32], inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        })
    })
}

// ------------------------------------------------------------------ the daemon

/// How to start a [`Daemon`]. The temp dir exists from [`Daemon::builder`] on, so
/// arguments can name paths inside it ([`DaemonBuilder::dir`]).
pub struct DaemonBuilder {
    dir: tempfile::TempDir,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    fds: Vec<(OwnedFd, RawFd)>,
    default_bind: bool,
    socket_activation: bool,
    wait_listening: bool,
    program: Option<OsString>,
}

impl DaemonBuilder {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `self.dir().join(name)`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Arguments as on the command line, `--` and a COMMAND included.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Hand `fd` to arbiterd as fd number `target` (not close-on-exec).
    pub fn pass_fd(mut self, fd: impl Into<OwnedFd>, target: RawFd) -> Self {
        self.fds.push((fd.into(), target));
        self
    }

    /// systemd socket activation: `fds` become 3, 4, ... with `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `LISTEN_PID` = arbiterd's own pid (through
    /// `sh -c 'export LISTEN_PID=$$; exec arbiterd ...'`). Implies no default bind.
    pub fn socket_activation(mut self, fds: Vec<OwnedFd>, names: &[&str]) -> Self {
        let n = fds.len();
        for (i, fd) in fds.into_iter().enumerate() {
            self.fds.push((fd, 3 + i as RawFd));
        }
        self.envs.push(("LISTEN_FDS".into(), n.to_string().into()));
        if !names.is_empty() {
            self.envs
                .push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        self.socket_activation = true;
        self.default_bind = false;
        self
    }

    /// Do not add `-b 127.0.0.1:0` even without a `-b` (fd hand-over tests).
    pub fn no_default_bind(mut self) -> Self {
        self.default_bind = false;
        self
    }

    /// Return right after spawning, without waiting for the `Listening at:` line.
    pub fn no_wait(mut self) -> Self {
        self.wait_listening = false;
        self
    }

    /// Run this binary instead of the tested arbiterd (e.g. another build).
    pub fn program(mut self, p: impl AsRef<OsStr>) -> Self {
        self.program = Some(p.as_ref().to_owned());
        self
    }

    /// Spawn arbiterd and (unless [`no_wait`](Self::no_wait)) wait until it logs
    /// where it listens. Panics, with the log, if it exits first.
    pub fn start(self) -> Daemon {
        let DaemonBuilder {
            dir,
            args,
            envs,
            fds,
            default_bind,
            socket_activation,
            wait_listening,
            program,
        } = self;
        let program = program.unwrap_or_else(|| ARBITERD.into());
        // Options before `--`, the COMMAND after it.
        let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
        let (opts, command) = args.split_at(split);
        let has = |long: &str, short: Option<&str>| {
            opts.iter().any(|a| {
                let a = a.to_string_lossy();
                a == long
                    || a.starts_with(&format!("{long}="))
                    || short.is_some_and(|s| a.starts_with(s))
            })
        };
        let mut full: Vec<OsString> = opts.to_vec();
        if default_bind && !has("--bind", Some("-b")) {
            full.extend(["-b".into(), "127.0.0.1:0".into()]);
        }
        if !has("--control", None) {
            full.push("--control".into());
            full.push(dir.path().join("control.sock").into());
        }
        let mut log_paths = vec![dir.path().join("daemon.log")];
        if let Some(i) = opts.iter().position(|a| a == "--log-file")
            && let Some(p) = opts.get(i + 1)
            && p != "-"
        {
            log_paths.push(PathBuf::from(p));
        }
        full.extend_from_slice(command);

        let log = fs::File::create(&log_paths[0]).expect("create the daemon log file");
        let log2 = log.try_clone().expect("dup the log file");
        let mut cmd = if socket_activation {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
                .arg(&program)
                .args(&full);
            c
        } else {
            let mut c = Command::new(&program);
            c.args(&full);
            c
        };
        let tag = dir.path().to_string_lossy().into_owned();
        scrub_env(&mut cmd);
        cmd.env(TAG_VAR, &tag)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        install_fds(&mut cmd, &fds);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
        drop(fds);
        let pid = child.id() as i32;
        let daemon = Daemon {
            child: Mutex::new(child),
            status: Mutex::new(None),
            child_pid: pid,
            master_pid: pid,
            dir,
            tag,
            log_paths,
            listeners: Vec::new(),
            extra: Mutex::new(Vec::new()),
            log_shown: Mutex::new(false),
        };
        if wait_listening {
            daemon.wait_listening()
        } else {
            daemon
        }
    }
}

fn scrub_env(cmd: &mut Command) {
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"ARBITER_") || k == TAG_VAR {
            cmd.env_remove(k);
        }
    }
}

/// Map `fds` to their target numbers in the child, not close-on-exec. Every
/// source is first copied above all targets, so a source that happens to sit on
/// another's target number is not clobbered.
fn install_fds(cmd: &mut Command, fds: &[(OwnedFd, RawFd)]) {
    if fds.is_empty() {
        return;
    }
    let plan: Vec<(RawFd, RawFd)> = fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    let floor = plan.iter().map(|(_, t)| *t).max().unwrap_or(0) + 1;
    let mut temps: Vec<RawFd> = vec![-1; plan.len()];
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (fcntl, dup2) on pre-allocated memory.
    unsafe {
        cmd.pre_exec(move || {
            for (i, (src, _)) in plan.iter().enumerate() {
                let t = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, floor.max(64));
                if t < 0 {
                    return Err(io::Error::last_os_error());
                }
                temps[i] = t;
            }
            for (i, (_, target)) in plan.iter().enumerate() {
                if libc::dup2(temps[i], *target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// One running arbiterd, killed with everything it started when dropped.
pub struct Daemon {
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    child_pid: i32,
    master_pid: i32,
    dir: tempfile::TempDir,
    tag: String,
    log_paths: Vec<PathBuf>,
    listeners: Vec<Listener>,
    extra: Mutex<Vec<i32>>,
    log_shown: Mutex<bool>,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            dir: short_tempdir(),
            args: Vec::new(),
            envs: Vec::new(),
            fds: Vec::new(),
            default_bind: true,
            socket_activation: false,
            wait_listening: true,
            program: None,
        }
    }

    /// `Daemon::builder().args(args).start()`.
    pub fn start<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Daemon::builder().args(args).start()
    }

    fn wait_listening(mut self) -> Daemon {
        let (addrs, pid) = self.wait_until(LONG, "the `Listening at:` line", || {
            if let Some(st) = self.try_status() {
                self.fail(&format!("arbiterd exited ({st}) before listening"));
            }
            let log = self.log();
            let Some(line) = log.lines().find(|l| l.contains("Listening at: ")) else {
                return Err(format!("no such line yet ({} log bytes)", log.len()));
            };
            let rest = &line[line.find("Listening at: ").unwrap() + "Listening at: ".len()..];
            let Some((addrs, pid)) = rest.trim_end().rsplit_once(" (") else {
                return Err(format!("cannot parse {line:?}"));
            };
            let pid: i32 = pid
                .trim_end_matches(')')
                .parse()
                .map_err(|_| format!("no master pid in {line:?}"))?;
            let addrs: Vec<Listener> = addrs.split(", ").map(Listener::parse).collect();
            Ok((addrs, pid))
        });
        self.listeners = addrs;
        if pid != self.child_pid {
            self.register_pid(pid);
        }
        self.master_pid = pid;
        self
    }

    /// The master's pid (from the `Listening at:` line; the spawned pid before).
    pub fn pid(&self) -> i32 {
        self.master_pid
    }

    /// The pid of the process the harness spawned.
    pub fn child_pid(&self) -> i32 {
        self.child_pid
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The control socket (`--control`, added by the harness unless given).
    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The tag in the environment of every process of this daemon.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The first listener (what [`get`](Self::get) talks to).
    pub fn listener(&self) -> &Listener {
        self.listeners
            .first()
            .unwrap_or_else(|| self.fail("the daemon has no known listener"))
    }

    /// The first TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find_map(Listener::tcp)
            .unwrap_or_else(|| self.fail("the daemon has no TCP listener"))
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Make sure `pid` is killed when the daemon is dropped.
    pub fn register_pid(&self, pid: i32) {
        self.extra.lock().unwrap().push(pid);
    }

    // -------------------------------------------------------------- log

    /// Everything the daemon wrote (stdout+stderr, then `--log-file` if any).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for p in &self.log_paths {
            if let Ok(raw) = fs::read(p) {
                out.push_str(&String::from_utf8_lossy(&raw));
            }
        }
        out
    }

    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Wait for a log line for which `pred` holds; returns it.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_until(SHORT, what, || {
            let log = self.log();
            log.lines()
                .find(|l| pred(l))
                .map(str::to_string)
                .ok_or_else(|| format!("{} log lines, none matches", log.lines().count()))
        })
    }

    /// Panic with `msg` and the log.
    pub fn fail(&self, msg: &str) -> ! {
        *self.log_shown.lock().unwrap() = true;
        panic!("{msg}\n{}", self.log_dump())
    }

    fn log_dump(&self) -> String {
        format!(
            "----- arbiterd log ({}) -----\n{}----- end of log -----",
            self.log_paths[0].display(),
            self.log()
        )
    }

    /// [`wait_until`] whose timeout message carries the daemon log.
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        wait_until_with(timeout, what, probe, || {
            *self.log_shown.lock().unwrap() = true;
            self.log_dump()
        })
    }

    // -------------------------------------------------------------- processes

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.master_pid), sig)
            .unwrap_or_else(|e| self.fail(&format!("kill({}, {sig}): {e}", self.master_pid)));
    }

    /// Send `sig` and wait until the kernel has delivered it (no longer pending in
    /// `/proc/PID/status`): a following identical signal is then a separate
    /// delivery, not merged with this one, however quickly it is sent.
    pub fn signal_delivered(&self, sig: Signal) {
        self.signal(sig);
        let bit = 1u64 << (sig as i32 - 1);
        let pid = self.master_pid;
        self.wait_until(
            SHORT,
            &format!("{sig} to be delivered to the master"),
            || {
                let pending = |k: &str| {
                    status_field(pid, k)
                        .and_then(|v| u64::from_str_radix(&v, 16).ok())
                        .unwrap_or(0)
                };
                let p = pending("ShdPnd") | pending("SigPnd");
                if p & bit == 0 {
                    Ok(())
                } else {
                    Err(format!("pending signals: {p:#x}"))
                }
            },
        )
    }

    /// Signal one worker (its pid, not its group).
    pub fn signal_worker(&self, pid: i32, sig: Signal) {
        kill(Pid::from_raw(pid), sig)
            .unwrap_or_else(|e| self.fail(&format!("kill({pid}, {sig}): {e}")));
    }

    /// The master's live children, oldest first.
    pub fn workers(&self) -> Vec<i32> {
        live_children(self.master_pid)
    }

    /// The master's children in state Z.
    pub fn zombies(&self) -> Vec<i32> {
        zombie_children(self.master_pid)
    }

    /// The master's live children with their `ARBITER_*` variables, by worker id.
    pub fn worker_infos(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = self.workers().into_iter().map(worker_info).collect();
        v.sort_by_key(|w| (w.worker_id.unwrap_or(u64::MAX), w.pid));
        v
    }

    pub fn thread_count(&self) -> Option<usize> {
        thread_count(self.master_pid)
    }

    /// Processes carrying this daemon's tag, the master (and the spawned pid)
    /// excluded: what would be left behind if the master exited now.
    pub fn leftovers(&self) -> Vec<i32> {
        tagged_pids(&self.tag)
            .into_iter()
            .filter(|&p| p != self.master_pid && p != self.child_pid)
            .collect()
    }

    /// Wait until no process but the master carries the tag.
    pub fn wait_no_leftovers(&self, timeout: Duration) {
        self.wait_until(timeout, "no process of this daemon left", || {
            let left = self.leftovers();
            if left.is_empty() {
                Ok(())
            } else {
                Err(describe_pids(&left))
            }
        })
    }

    /// Exactly `n` live children, each exec'd (it has `ARBITER_WORKER_ID`), and,
    /// when the daemon listens somewhere, `GET /` answers 200 (from one of them when
    /// the answer names a pid). Returns them by worker id.
    pub fn wait_workers(&self, n: usize) -> Vec<WorkerInfo> {
        self.wait_workers_where(&format!("{n} workers serving"), n, |_| true)
    }

    /// As [`wait_workers`](Self::wait_workers), and every worker satisfies `pred`.
    pub fn wait_workers_where(
        &self,
        what: &str,
        n: usize,
        pred: impl Fn(&WorkerInfo) -> bool,
    ) -> Vec<WorkerInfo> {
        self.wait_until(LONG, what, || {
            self.check_alive()?;
            let infos = self.worker_infos();
            if infos.len() != n || infos.iter().any(|w| w.worker_id.is_none() || !pred(w)) {
                return Err(format!("children: {infos:?}"));
            }
            if let Some(l) = self.listeners.first() {
                let r = http_get(l, "/", SHORT).map_err(|e| format!("GET /: {e}"))?;
                if r.status != 200 {
                    return Err(format!("GET /: status {} {:?}", r.status, r.body));
                }
                if let Some(pid) = serde_json::from_str::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|j| j.get("pid")?.as_i64())
                    && !infos.iter().any(|w| i64::from(w.pid) == pid)
                {
                    return Err(format!("GET / answered by pid {pid}, not in {infos:?}"));
                }
            }
            Ok(infos)
        })
    }

    /// Check, for `hold`, that the live children stay exactly `pids` (for asserting
    /// that something does NOT happen; use sparingly).
    pub fn assert_workers_stay(&self, pids: &[i32], hold: Duration) {
        let mut want = pids.to_vec();
        want.sort_unstable();
        let end = Instant::now() + hold;
        while Instant::now() < end {
            let mut now = self.workers();
            now.sort_unstable();
            if now != want {
                self.fail(&format!("workers changed: expected {want:?}, now {now:?}"));
            }
            if let Some(st) = self.try_status() {
                self.fail(&format!("the master exited ({st})"));
            }
            std::thread::sleep(ms(20));
        }
    }

    fn check_alive(&self) -> Result<(), String> {
        match self.try_status() {
            Some(st) => self.fail(&format!("the master exited ({st})")),
            None => Ok(()),
        }
    }

    /// The exit status if the spawned process has exited (reaping it).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap();
        if status.is_none() {
            *status = self.child.lock().unwrap().try_wait().ok().flatten();
        }
        *status
    }

    /// Wait for the spawned process to exit; panics (with the log) after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        self.wait_until(timeout, "arbiterd to exit", || {
            self.try_status().ok_or_else(|| {
                format!(
                    "still running; children {:?}",
                    children_of(self.master_pid)
                        .iter()
                        .map(|s| (s.pid, s.state))
                        .collect::<Vec<_>>()
                )
            })
        })
    }

    // -------------------------------------------------------------- HTTP

    /// `GET path` from the first listener.
    pub fn get(&self, path: &str) -> Response {
        http_get(self.listener(), path, SHORT)
            .unwrap_or_else(|e| self.fail(&format!("GET {path} from {:?}: {e}", self.listener())))
    }

    /// `GET path`, asserting 200 and a JSON body.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path);
        if r.status != 200 {
            self.fail(&format!(
                "GET {path}: status {} body {:?}",
                r.status, r.body
            ));
        }
        r.json()
    }

    /// Start `GET path` in the background (see [`spawn_get`]).
    pub fn spawn_get(&self, path: &str) -> InFlight {
        spawn_get(self.listener(), path, LONG)
    }

    /// Wait until a worker has accepted the in-flight request's connection (TCP
    /// only); returns the pid of the worker holding it.
    pub fn wait_accepted(&self, req: &InFlight) -> i32 {
        let (Some(server), Some(client)) = (req.target.tcp(), req.local_port) else {
            self.fail("wait_accepted needs a TCP request");
        };
        self.wait_until(SHORT, "a worker to accept the in-flight request", || {
            if req.is_finished() {
                return Err("the request already finished".into());
            }
            let inode = accepted_inode(server.port(), client)
                .ok_or_else(|| "connection not accepted yet".to_string())?;
            holder_of_socket(&self.workers(), inode)
                .ok_or_else(|| format!("no worker holds socket:[{inode}] yet"))
        })
    }

    // -------------------------------------------------------------- arbiterctl

    /// Run `arbiterctl --control <this daemon's socket> ARGS`.
    pub fn ctl<I, S>(&self, args: I) -> Outcome
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Run::new(ARBITERCTL)
            .arg("--control")
            .arg(self.control_path())
            .args(args)
            .run()
    }
}

fn describe_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| format!("{p} ({})", cmdline(*p)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let reaped = self.try_status().is_some();
        let mut victims: Vec<i32> = children_of(self.master_pid).iter().map(|s| s.pid).collect();
        victims.extend(self.extra.lock().unwrap().iter().copied());
        if !reaped {
            // The group the harness created: the master and whatever stayed in it.
            let _ = killpg(Pid::from_raw(self.child_pid), Signal::SIGKILL);
        }
        // Workers lead their own groups; a pid is only killed while it still
        // carries our tag (no stranger that reused a pid).
        for p in victims {
            if has_tag(p, &self.tag) {
                if proc_stat(p).is_some_and(|s| s.pgrp == p) {
                    let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        kill_tagged(&self.tag, secs(5));
        if !reaped {
            let _ = self.child.lock().unwrap().wait();
        }
        if std::thread::panicking() && !*self.log_shown.lock().unwrap() {
            eprintln!("{}", self.log_dump());
        }
    }
}

// ------------------------------------------------------------------ one-shot runs

/// A command that must finish quickly: arbiterd startup errors, `arbiterctl`.
pub struct Run {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    timeout: Duration,
    dir: Option<PathBuf>,
}

/// What a [`Run`] did.
#[derive(Debug)]
pub struct Outcome {
    /// `None` if it had to be killed after the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Processes that carried its tag and were still alive 2 s after it exited
    /// (killed since): what it left behind.
    pub leftovers: Vec<String>,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }
}

impl Run {
    pub fn new(program: impl AsRef<OsStr>) -> Run {
        Run {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            timeout: SHORT,
            dir: None,
        }
    }

    /// `Run::new(ARBITERD)`.
    pub fn arbiterd() -> Run {
        Run::new(ARBITERD)
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn current_dir(mut self, d: impl AsRef<Path>) -> Self {
        self.dir = Some(d.as_ref().to_owned());
        self
    }

    /// Run it in its own process group, output to files (no pipes to fill up);
    /// after `timeout` kill the group. Then wait up to 2 s for everything it
    /// started to go, and kill and report what did not.
    pub fn run(self) -> Outcome {
        let io_dir = short_tempdir();
        let out_path = io_dir.path().join("stdout");
        let err_path = io_dir.path().join("stderr");
        let tag = io_dir.path().to_string_lossy().into_owned();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        scrub_env(&mut cmd);
        cmd.env(TAG_VAR, &tag)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("create stdout file"))
            .stderr(fs::File::create(&err_path).expect("create stderr file"))
            .process_group(0);
        if let Some(d) = &self.dir {
            cmd.current_dir(d);
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.program));
        let pgid = Pid::from_raw(child.id() as i32);
        let deadline = start + self.timeout;
        let mut delay = ms(2);
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(ms(50));
        };
        let elapsed = start.elapsed();
        let left_deadline = Instant::now() + secs(2);
        let mut left = tagged_pids(&tag);
        while !left.is_empty() && Instant::now() < left_deadline {
            std::thread::sleep(ms(20));
            left = tagged_pids(&tag);
        }
        let leftovers = left
            .iter()
            .map(|p| format!("{p} ({})", cmdline(*p)))
            .collect();
        kill_tagged(&tag, secs(5));
        let read =
            |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        Outcome {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
            elapsed,
            leftovers,
        }
    }
}

// ------------------------------------------------------------------ self-tests

/// Clients looping on `GET path` as fast as the server answers, until
/// [`LoopingClients::stop`]: what a deploy under load must not break.
pub struct LoopingClients {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl LoopingClients {
    pub fn start(n: usize, target: &Listener, path: &str) -> LoopingClients {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..n)
            .map(|_| {
                let (stop, target, path) = (stop.clone(), target.clone(), path.to_string());
                std::thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match http_get(&target, &path, SHORT) {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failures.push(format!("status {}", r.status)),
                            Err(e) => failures.push(format!("{:?}: {e}", e.kind())),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        LoopingClients { stop, handles }
    }

    /// Stop them: (requests answered 200, every failure).
    pub fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for h in std::mem::take(&mut self.handles) {
            let (ok, failures) = h.join().unwrap();
            total.0 += ok;
            total.1.extend(failures);
        }
        total
    }
}

impl Drop for LoopingClients {
    /// A test that failed midway must not leave them spinning on a dead address.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_parens_and_spaces_in_comm() {
        let line = "1234 (we ird) (x) S 1000 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 1";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 1234);
        assert_eq!(s.comm, "we ird) (x");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1000);
        assert_eq!(s.pgrp, 1234);
        assert_eq!(s.session, 1234);
        assert_eq!(s.starttime, 98765);
        let me = proc_stat(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(!me.is_zombie());
    }

    #[test]
    fn http_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", false)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi", false)
                .unwrap()
                .is_none()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi", true).is_err());
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
        let r = parse_response(b"HTTP/1.0 500 X\r\n\r\nall of it", true)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (500, "all of it"));
    }

    #[test]
    fn listening_entries() {
        assert_eq!(
            Listener::parse("http://127.0.0.1:8000"),
            Listener::Tcp("127.0.0.1:8000".parse().unwrap())
        );
        assert_eq!(
            Listener::parse(" http://[::1]:81"),
            Listener::Tcp("[::1]:81".parse().unwrap())
        );
        assert_eq!(
            Listener::parse("unix:/tmp/a b.sock"),
            Listener::Unix("/tmp/a b.sock".into())
        );
        assert_eq!(
            Listener::parse("http://nonsense"),
            Listener::Other("http://nonsense".into())
        );
    }
}
