//! Hot upgrade seen from outside: USR2 and the `upgrade` control request, the
//! `.oldbin`/`.2` pidfile dance and promotion, zero failed requests under load,
//! rollback when the new binary is bad, listeners (socket-activated ones included)
//! keeping their fd numbers and names, the refusal of a second USR2, and the
//! hand-over to a service manager (`MAINPID=`, the watchdog).
//!
//! A new master is a child of the old one, then reparented when the old one exits.
//! Each test registers it with the harness (from `PIDFILE.2` or the reply) as soon
//! as it is known; until the old master exits it also sits in the harness's process
//! group, so the group kill reaches it too.
//!
//! Local helpers (some shared with `ops.rs`): a control-socket client speaking one
//! JSON line each way ([`ControlConn`], [`control_request`], [`ping_pid`]), a load
//! generator counting failed requests ([`Load`]), pidfile readers, and
//! [`tcp_accepted_inode`], which asks the kernel (sock_diag) which socket accepted a
//! connection instead of reading `/proc/net/tcp`, too slow under load.
//!
//! The stand-ins for a new binary are `tests/workers/upgrade_*.sh`, copied into the
//! test's dir and made executable there.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::*;
use crate::ops::{NotifySink, listen_inode};

// ------------------------------------------------------------------ control socket

/// One connection to a control socket: one JSON line out, one JSON line back.
pub(crate) struct ControlConn {
    reader: BufReader<UnixStream>,
}

impl ControlConn {
    pub(crate) fn connect(path: &Path) -> io::Result<ControlConn> {
        let s = UnixStream::connect(path)?;
        s.set_write_timeout(Some(SHORT))?;
        Ok(ControlConn {
            reader: BufReader::new(s),
        })
    }

    pub(crate) fn send(&mut self, req: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line)
    }

    /// The next reply line, within `timeout`.
    pub(crate) fn recv(&mut self, timeout: Duration) -> io::Result<Value> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the control socket closed without a reply",
            ));
        }
        serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply is not JSON ({e}): {line:?}"),
            )
        })
    }
}

/// Send `req` on a fresh connection to `path` and wait up to `timeout` for the reply.
pub(crate) fn control_request(path: &Path, req: &Value, timeout: Duration) -> io::Result<Value> {
    let mut c = ControlConn::connect(path)?;
    c.send(req)?;
    c.recv(timeout)
}

/// The pid in the `pong` of whatever master answers on `path`.
pub(crate) fn ping_pid(path: &Path) -> Result<i32, String> {
    let r = control_request(path, &json!({"v": 1, "cmd": "ping"}), SHORT)
        .map_err(|e| format!("ping {}: {e}", path.display()))?;
    r["reply"]["pid"]
        .as_i64()
        .map(|p| p as i32)
        .ok_or_else(|| format!("ping {}: unexpected reply {r}", path.display()))
}

/// `reply` is `{"ok":true,"reply":{"type":ty,...}}`: returns the inner reply.
pub(crate) fn expect_ok<'a>(d: &Daemon, what: &str, reply: &'a Value, ty: &str) -> &'a Value {
    if reply["ok"] != json!(true) || reply["reply"]["type"] != json!(ty) {
        d.fail(&format!("{what}: expected an ok `{ty}` reply, got {reply}"));
    }
    &reply["reply"]
}

/// `reply` is an error: returns (kind, message).
pub(crate) fn expect_err(d: &Daemon, what: &str, reply: &Value) -> (String, String) {
    if reply["ok"] != json!(false) {
        d.fail(&format!("{what}: expected an error reply, got {reply}"));
    }
    let kind = reply["error"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let message = reply["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (kind, message)
}

// ------------------------------------------------------------------ pidfiles, processes

/// `PATH.2`: the pidfile and control socket names of an unpromoted new master.
pub(crate) fn second(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".2");
    s.into()
}

/// `PIDFILE.oldbin`: the old master's pidfile while a new one runs.
pub(crate) fn oldbin(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".oldbin");
    s.into()
}

pub(crate) fn read_pid(p: &Path) -> Option<i32> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The live children of `master` that are exec'd workers (they carry
/// `ARBITER_WORKER_ID`; a new master or an upgrade check does not).
pub(crate) fn workers_of(master: i32) -> Vec<i32> {
    let mut v: Vec<i32> = live_children(master)
        .into_iter()
        .filter(|&p| worker_info(p).worker_id.is_some())
        .collect();
    v.sort_unstable();
    v
}

/// Wait until `master` has exactly `n` exec'd workers and nothing else alive under it.
fn wait_own_workers(d: &Daemon, master: i32, n: usize) -> Vec<i32> {
    d.wait_until(LONG, &format!("{n} workers of master {master}"), || {
        if !is_alive(master) {
            return Err(format!("master {master} is gone"));
        }
        let all = live_children(master);
        let ws = workers_of(master);
        if ws.len() == n && all.len() == n {
            Ok(ws)
        } else {
            Err(format!("children {all:?}, of which workers {ws:?}"))
        }
    })
}

/// A copy of `tests/workers/NAME` in the daemon's dir, executable (the scripts stand
/// in for a new arbiterd binary).
fn script(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    fs::copy(test_file(&format!("workers/{name}")), &to).expect("copy the test script");
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod the test script");
    to
}

/// The inode of a socket fd of this process, as `/proc/PID/fd` shows it.
fn socket_link(fd: &impl AsRawFd) -> String {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("read /proc/self/fd link")
        .to_string_lossy()
        .into_owned()
}

/// Wait until `new` has taken over from `old`: the old master is gone, PIDFILE holds
/// the new pid, no `.oldbin`/`.2` name is left, the control socket answers from the
/// new pid, and the new master logged its promotion.
fn wait_promoted(d: &Daemon, pidfile: &Path, old: i32, new: i32) {
    let control = d.control_path();
    d.wait_until(
        LONG,
        &format!("master {new} promoted in place of {old}"),
        || {
            if is_alive(old) {
                return Err(format!("the old master {old} still runs"));
            }
            if !is_alive(new) {
                return Err(format!("the new master {new} is gone"));
            }
            let held = read_pid(pidfile);
            if held != Some(new) {
                return Err(format!("{} holds {held:?}", pidfile.display()));
            }
            for p in [oldbin(pidfile), second(pidfile), second(&control)] {
                if p.exists() {
                    return Err(format!("{} still exists", p.display()));
                }
            }
            let pong = ping_pid(&control)?;
            if pong != new {
                return Err(format!("the control socket answers from pid {pong}"));
            }
            Ok(())
        },
    );
    d.wait_log("the promotion log line", |l| {
        l.contains(&format!("[{new}]")) && l.contains("Master has been promoted")
    });
}

// ------------------------------------------------------------------ load

#[derive(Clone, Debug, Default)]
pub(crate) struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    /// The first failures, with when they happened.
    pub failures: Vec<String>,
    /// The pids that answered (the `pid` of the JSON body).
    pub pids: BTreeSet<i32>,
}

/// A client thread doing `GET /` on a fresh connection, again and again, until
/// stopped; it counts what failed.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
    handle: Option<JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(target: Listener) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let (s, st) = (stop.clone(), stats.clone());
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let outcome = http_get(&target, "/", SHORT);
                let mut st = st.lock().unwrap();
                match outcome {
                    Ok(r) if r.status == 200 => {
                        st.ok += 1;
                        if let Some(pid) = serde_json::from_str::<Value>(&r.body)
                            .ok()
                            .and_then(|j| j["pid"].as_i64())
                        {
                            st.pids.insert(pid as i32);
                        }
                    }
                    other => {
                        st.failed += 1;
                        if st.failures.len() < 20 {
                            let what = match other {
                                Ok(r) => format!("status {} body {:?}", r.status, r.body),
                                Err(e) => e.to_string(),
                            };
                            st.failures.push(format!("at {:.3?}: {what}", t0.elapsed()));
                        }
                    }
                }
                drop(st);
                // Pacing, not waiting for a state: at most ~200 requests a second
                // leaves the CPUs to the daemon and keeps the TIME_WAIT sockets
                // (which every /proc/net/tcp lookup wades through) few.
                std::thread::sleep(ms(5));
            }
        });
        Load {
            stop,
            stats,
            handle: Some(handle),
        }
    }

    pub(crate) fn stats(&self) -> LoadStats {
        self.stats.lock().unwrap().clone()
    }

    /// Wait until `n` more requests have succeeded than now.
    pub(crate) fn wait_more(&self, d: &Daemon, n: u64) {
        let from = self.stats().ok;
        d.wait_until(LONG, &format!("{n} more successful requests"), || {
            let s = self.stats();
            if s.ok >= from + n {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        })
    }

    /// Wait until one of `pids` has answered a request of the load.
    pub(crate) fn wait_served_by(&self, d: &Daemon, pids: &[i32]) {
        d.wait_until(
            LONG,
            &format!("the load to be served by one of {pids:?}"),
            || {
                let s = self.stats();
                if pids.iter().any(|p| s.pids.contains(p)) {
                    Ok(())
                } else {
                    Err(format!("answered by {:?}", s.pids))
                }
            },
        )
    }

    pub(crate) fn finish(mut self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("the load thread panicked");
        }
        self.stats()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn assert_no_failures(d: &Daemon, s: &LoadStats) {
    if s.failed != 0 {
        d.fail(&format!(
            "{} of {} requests failed during the upgrade: {:#?}",
            s.failed,
            s.ok + s.failed,
            s.failures
        ));
    }
}

/// The inode of the server side of the TCP connection 127.0.0.1:`server_port` <-
/// 127.0.0.1:`client_port`, once a process has accepted it (0 before: a connection
/// in the listen queue has no file yet). Asked of the kernel with one sock_diag
/// netlink request: `/proc/net/tcp` (what the harness reads) lists every TIME_WAIT
/// socket of the machine, and under a load generator that is tens of thousands of
/// lines per look.
fn tcp_accepted_inode(server_port: u16, client_port: u16) -> Option<u64> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    req.extend_from_slice(&[0; 8]); // nlmsg_seq, nlmsg_pid
    // struct inet_diag_req_v2: family, protocol, ext, pad, states
    req.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid, from the server's side: sport, dport, src, dst, if, cookie
    req.extend_from_slice(&server_port.to_be_bytes());
    req.extend_from_slice(&client_port.to_be_bytes());
    for _ in 0..2 {
        req.extend_from_slice(&[127, 0, 0, 1]);
        req.extend_from_slice(&[0; 12]);
    }
    req.extend_from_slice(&[0; 4]);
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    assert_eq!(req.len(), 72);
    // SAFETY: plain syscalls on a socket this function owns, with buffers it owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        if libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) != req.len() as isize {
            return None;
        }
        let mut buf = [0u8; 1024];
        let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        // nlmsghdr (16) + struct inet_diag_msg, whose idiag_inode is at 68.
        if n < 88 || u16::from_ne_bytes([buf[4], buf[5]]) != SOCK_DIAG_BY_FAMILY {
            return None; // NLMSG_ERROR: no such connection (yet)
        }
        Some(u64::from(u32::from_ne_bytes(
            buf[84..88].try_into().unwrap(),
        )))
    }
}

/// Wait until one of `candidates` has accepted the in-flight request (TCP only);
/// returns the request and the pid holding it.
fn wait_held_by(d: &Daemon, req: InFlight, candidates: &[i32]) -> (InFlight, i32) {
    let (Some(server), Some(client)) = (req.target.tcp(), req.local_port) else {
        d.fail("wait_held_by needs a TCP request");
    };
    let t0 = Instant::now();
    let mut finished = false;
    let holder = wait_until(SHORT, "a worker to accept the in-flight request", || {
        if req.is_finished() {
            finished = true;
            return Ok(0);
        }
        let inode = tcp_accepted_inode(server.port(), client)
            .filter(|&i| i != 0)
            .ok_or_else(|| "connection not accepted yet".to_string())?;
        holder_of_socket(candidates, inode)
            .ok_or_else(|| format!("none of {candidates:?} holds socket:[{inode}] yet"))
    });
    if finished {
        let elapsed = t0.elapsed();
        let outcome = req.join();
        d.fail(&format!(
            "the in-flight request finished after {elapsed:?} before any of {candidates:?} \
             was seen holding it: {outcome:?}"
        ));
    }
    (req, holder)
}

fn upgrade_request(binary: Option<&Path>) -> Value {
    let mut req = json!({"v": 1, "cmd": "upgrade", "timeout_secs": 30});
    if let Some(b) = binary {
        req["binary"] = json!(b.to_string_lossy());
    }
    req
}

/// Upgrade budget: the 30 s the request allows, and some.
const UPGRADE_REPLY: Duration = Duration::from_secs(45);

// ------------------------------------------------------------------ USR2, by hand

#[test]
fn usr2_then_term_hands_over_to_the_new_master_without_a_failed_request() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "2", "-p"]).arg(&pidfile).start();
    d.wait_workers(2);
    let old = d.pid();
    assert_eq!(
        read_pid(&pidfile),
        Some(old),
        "the pidfile before the upgrade"
    );
    let old_workers = workers_of(old);

    let load = Load::start(d.listener().clone());
    load.wait_more(&d, 20);

    d.signal(Signal::SIGUSR2);
    let new = d.wait_until(LONG, "PIDFILE.2 to name the new master", || {
        read_pid(&second(&pidfile)).ok_or_else(|| "no PIDFILE.2 yet".to_string())
    });
    d.register_pid(new);
    assert_ne!(new, old, "PIDFILE.2 must hold the new master's pid");
    d.wait_log("both masters serving", |l| {
        l.contains(&format!("[{old}]")) && l.contains("both masters serve now")
    });

    // Both run: the old master's pidfile is .oldbin, the new one's is .2, and each
    // answers on its own control socket.
    assert_eq!(read_pid(&oldbin(&pidfile)), Some(old), "PIDFILE.oldbin");
    assert_eq!(read_pid(&second(&pidfile)), Some(new), "PIDFILE.2");
    assert!(
        !pidfile.exists(),
        "PIDFILE must be renamed while both masters run (it holds {:?})",
        read_pid(&pidfile)
    );
    let st = proc_stat(new).expect("the new master runs");
    assert_eq!(st.ppid, old, "the new master is a child of the old one");
    assert_eq!(
        st.pgrp, old,
        "the new master stays in the original process group"
    );
    assert_eq!(
        ping_pid(&d.control_path()),
        Ok(old),
        "control socket: the old master"
    );
    assert_eq!(
        ping_pid(&second(&d.control_path())),
        Ok(new),
        "CONTROL.2: the new master"
    );
    let new_workers = wait_own_workers(&d, new, 2);
    assert_eq!(
        workers_of(old),
        old_workers,
        "USR2 alone must not touch the old master's workers"
    );
    load.wait_more(&d, 20);

    // TERM the old master: it drains and exits, the new one is promoted.
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LONG);
    assert!(status.success(), "the old master's exit: {status}");
    wait_promoted(&d, &pidfile, old, new);
    for w in &old_workers {
        assert!(!is_alive(*w), "old worker {w} left behind");
    }
    assert_eq!(
        workers_of(new),
        new_workers,
        "the new master's workers stay"
    );
    load.wait_served_by(&d, &new_workers);
    load.wait_more(&d, 20);
    let stats = load.finish();
    assert_no_failures(&d, &stats);
}

// ------------------------------------------------------------------ the upgrade request

#[test]
fn upgrade_request_three_times_under_load_never_fails_a_request() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "2", "-p"]).arg(&pidfile).start();
    d.wait_workers(2);
    let load = Load::start(d.listener().clone());
    load.wait_more(&d, 20);

    let mut master = d.pid();
    let mut masters = vec![master];
    for round in 1..=3 {
        let old_workers = wait_own_workers(&d, master, 2);
        // A slow request in flight on an old worker must be answered by it.
        let slow = spawn_get(d.listener(), "/sleep?ms=1000", LONG);
        let (slow, holder) = wait_held_by(&d, slow, &old_workers);
        let before = load.stats().ok;

        let reply = control_request(&d.control_path(), &upgrade_request(None), UPGRADE_REPLY)
            .unwrap_or_else(|e| d.fail(&format!("round {round}: upgrade request: {e}")));
        let r = expect_ok(&d, &format!("round {round}"), &reply, "upgraded");
        let new = r["new_pid"].as_i64().unwrap_or(0) as i32;
        if new > 0 {
            d.register_pid(new);
        }
        assert_eq!(
            r["old_pid"].as_i64(),
            Some(i64::from(master)),
            "round {round}: old_pid in {reply}"
        );
        assert!(
            new > 0 && !masters.contains(&new),
            "round {round}: new_pid must be a new pid: {reply}, masters so far {masters:?}"
        );
        masters.push(new);

        let answer = slow
            .join()
            .unwrap_or_else(|e| d.fail(&format!("round {round}: in-flight /sleep: {e}")));
        assert_eq!(
            answer.status, 200,
            "round {round}: in-flight /sleep: {answer:?}"
        );
        assert_eq!(
            answer.json()["pid"].as_i64(),
            Some(i64::from(holder)),
            "round {round}: the old worker holding the request answers it"
        );

        wait_promoted(&d, &pidfile, master, new);
        for w in &old_workers {
            assert!(!is_alive(*w), "round {round}: old worker {w} left behind");
        }
        let new_workers = wait_own_workers(&d, new, 2);
        load.wait_served_by(&d, &new_workers);
        assert!(
            load.stats().ok > before,
            "round {round}: the load made no progress"
        );
        master = new;
    }
    let st = d.wait_exit(SHORT);
    assert!(st.success(), "the first master's exit: {st}");
    let stats = load.finish();
    assert_no_failures(&d, &stats);
}

#[test]
fn a_connection_an_old_worker_accepted_is_answered_across_the_handover() {
    let d = Daemon::start(["-w", "1", "--graceful-timeout", "10"]);
    let worker = d.wait_workers(1)[0].pid;
    let (addr, old) = (d.addr(), d.pid());
    let listening =
        listen_inode(addr.port()).unwrap_or_else(|| d.fail("no listening socket in /proc/net/tcp"));

    // A client that has connected but not sent its request yet (TLS handshakes,
    // slow networks, a client preparing its body...), accepted by the old worker.
    let mut stream = TcpStream::connect_timeout(&addr, SHORT).unwrap();
    stream.set_read_timeout(Some(SHORT)).unwrap();
    let client_port = stream.local_addr().unwrap().port();
    d.wait_until(SHORT, "the worker to accept the connection", || {
        let inode = tcp_accepted_inode(addr.port(), client_port)
            .filter(|&i| i != 0)
            .ok_or_else(|| "not accepted yet".to_string())?;
        holder_of_socket(&[worker], inode)
            .ok_or_else(|| format!("socket:[{inode}] not held by {worker}"))
    });

    let mut conn = ControlConn::connect(&d.control_path()).unwrap();
    conn.send(&upgrade_request(None)).unwrap();
    // The old worker has begun its graceful stop once it closed its copy of the
    // listening socket (or it is gone already, which is the bug).
    d.wait_until(LONG, "the old worker to start draining", || {
        if !is_alive(worker) || holder_of_socket(&[worker], listening).is_none() {
            Ok(())
        } else {
            Err(format!("worker {worker} still listens"))
        }
    });
    let answer = exchange(&mut stream, &addr.to_string(), "/");
    let reply = conn
        .recv(UPGRADE_REPLY)
        .unwrap_or_else(|e| d.fail(&format!("upgrade reply: {e}")));
    let new = expect_ok(&d, "upgrade", &reply, "upgraded")["new_pid"]
        .as_i64()
        .unwrap_or(0) as i32;
    d.register_pid(new);
    let r = answer.unwrap_or_else(|e| {
        d.fail(&format!(
            "a connection accepted by the old worker {worker} (master {old}) before the \
             handover was dropped when the worker was told to stop: {e}"
        ))
    });
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["pid"].as_i64(),
        Some(i64::from(worker)),
        "answered by the worker that accepted it"
    );
}

/// The old master after a failed upgrade: same pid in PIDFILE, no `.oldbin` or `.2`
/// left, the same workers and nothing else under it, still answering and serving.
fn assert_unchanged(d: &Daemon, pidfile: &Path, workers: &[i32]) {
    let mut want = workers.to_vec();
    want.sort_unstable();
    d.wait_until(SHORT, "the old master as it was before the upgrade", || {
        let held = read_pid(pidfile);
        if held != Some(d.pid()) {
            return Err(format!("{} holds {held:?}", pidfile.display()));
        }
        for p in [oldbin(pidfile), second(pidfile), second(&d.control_path())] {
            if p.exists() {
                return Err(format!("{} exists", p.display()));
            }
        }
        let mut kids = live_children(d.pid());
        kids.sort_unstable();
        if kids != want {
            return Err(format!("children {kids:?}, want the workers {want:?}"));
        }
        Ok(())
    });
    assert_eq!(ping_pid(&d.control_path()), Ok(d.pid()), "control socket");
    let r = d.get_json("/");
    assert!(
        want.contains(&(r["pid"].as_i64().unwrap_or(0) as i32)),
        "GET / answered by {r}, not one of the old workers {want:?}"
    );
    d.assert_workers_stay(&want, ms(300));
}

#[test]
fn upgrade_to_bin_false_fails_and_the_old_master_carries_on() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "2", "-p"]).arg(&pidfile).start();
    let ws: Vec<i32> = d.wait_workers(2).iter().map(|w| w.pid).collect();

    let reply = control_request(
        &d.control_path(),
        &upgrade_request(Some(Path::new("/bin/false"))),
        UPGRADE_REPLY,
    )
    .unwrap_or_else(|e| d.fail(&format!("upgrade request: {e}")));
    let (kind, message) = expect_err(&d, "upgrade to /bin/false", &reply);
    assert_eq!(kind, "failed", "error kind: {reply}");
    assert!(!message.is_empty(), "the error says why: {reply}");
    d.wait_log("the failure in the log", |l| l.contains("Upgrade failed"));
    assert_unchanged(&d, &pidfile, &ws);
}

#[test]
fn upgrade_to_a_binary_that_exits_at_once_rolls_back() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let bad = script(b.dir(), "upgrade_exits_at_once.sh");
    let d = b.args(["-w", "2", "-p"]).arg(&pidfile).start();
    let ws: Vec<i32> = d.wait_workers(2).iter().map(|w| w.pid).collect();

    let reply = control_request(
        &d.control_path(),
        &upgrade_request(Some(&bad)),
        UPGRADE_REPLY,
    )
    .unwrap_or_else(|e| d.fail(&format!("upgrade request: {e}")));
    let (kind, message) = expect_err(&d, "upgrade to a binary that exits at once", &reply);
    assert_eq!(kind, "failed", "error kind: {reply}");
    assert!(
        message.contains("new master"),
        "the error should say the new master failed: {reply}"
    );
    // The check passed, so the new binary was really started (and the pidfile
    // renamed) before it failed: the rollback is what is tested here.
    d.wait_log("the new master started", |l| {
        l.contains("Upgrade: started the new master")
    });
    assert_unchanged(&d, &pidfile, &ws);
}

// ------------------------------------------------------------------ arbiterctl

#[test]
fn arbiterctl_upgrade_hands_over_and_rolls_back_a_bad_binary() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "1", "-p"]).arg(&pidfile).start();
    d.wait_workers(1);
    let mut master = d.pid();

    // Once by --control, once by --pid: each time a new master, answering on the
    // control socket by the time arbiterctl exits.
    let by_control = vec![
        "--control".to_string(),
        d.control_path().to_string_lossy().into_owned(),
    ];
    let by_pidfile = vec!["--pid".to_string(), pidfile.to_string_lossy().into_owned()];
    for target in [by_control, by_pidfile] {
        let out = Run::new(ARBITERCTL)
            .args(&target)
            .args(["--json", "upgrade"])
            .timeout(UPGRADE_REPLY)
            .run();
        if out.code() != Some(0) {
            d.fail(&format!("arbiterctl {target:?} upgrade: {out:?}"));
        }
        let j: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| d.fail(&format!("--json output ({e}): {out:?}")));
        let (old, new) = (j["old_pid"].as_i64(), j["new_pid"].as_i64());
        let new = new.unwrap_or_else(|| d.fail(&format!("no new_pid in {j}"))) as i32;
        d.register_pid(new);
        assert_eq!(old, Some(i64::from(master)), "old_pid in {j}");
        assert_ne!(new, master, "{j}");
        assert_eq!(
            ping_pid(&d.control_path()),
            Ok(new),
            "arbiterctl upgrade returns once the new master answers on the socket"
        );
        wait_promoted(&d, &pidfile, master, new);
        master = new;
    }

    // A bad binary: exit 1 with the reason, the master unchanged.
    let ws = wait_own_workers(&d, master, 1);
    let out = d.ctl(["upgrade", "--binary", "/bin/false"]);
    assert_eq!(
        out.code(),
        Some(1),
        "arbiterctl upgrade --binary /bin/false: {out:?}"
    );
    assert!(
        out.stderr.contains("upgrade failed"),
        "stderr says why: {out:?}"
    );
    assert_eq!(read_pid(&pidfile), Some(master), "the pidfile stays");
    assert!(!oldbin(&pidfile).exists() && !second(&pidfile).exists());
    assert_eq!(ping_pid(&d.control_path()), Ok(master));
    assert_eq!(wait_own_workers(&d, master, 1), ws, "the workers stay");
}

#[test]
fn an_upgrade_keeps_the_scaled_worker_count_and_says_it() {
    // It used to start the configured count, silently.
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "2", "-p"]).arg(&pidfile).start();
    d.wait_workers(2);
    let out = d.ctl(["scale", "3"]);
    assert_eq!(out.code(), Some(0), "scale 3: {out:?}");
    wait_own_workers(&d, d.pid(), 3);
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(d.control_path())
        .arg("upgrade")
        .timeout(UPGRADE_REPLY)
        .run();
    if out.code() != Some(0) {
        d.fail(&format!("arbiterctl upgrade: {out:?}"));
    }
    assert!(
        out.stdout.contains(", 3 workers"),
        "the output gives the count: {out:?}"
    );
    let new = ping_pid(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    d.register_pid(new);
    wait_promoted(&d, &pidfile, d.pid(), new);
    wait_own_workers(&d, new, 3);
    // And a reload of the new master keeps it too.
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(0), "reload: {out:?}");
    wait_own_workers(&d, new, 3);
}

// ------------------------------------------------------------------ listeners

#[test]
fn socket_activated_listeners_keep_fd_numbers_and_names_across_an_upgrade() {
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (web_link, admin_link) = (socket_link(&web), socket_link(&admin));
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b
        .socket_activation(
            vec![OwnedFd::from(web), OwnedFd::from(admin)],
            &["web", "admin"],
        )
        .args(["-w", "1", "-p"])
        .arg(&pidfile)
        .arg("--")
        .arg(python3())
        .arg(test_file("workers/fdworker.py"))
        .start();
    d.wait_workers(1);
    let old = d.pid();

    let check = |when: &str, report: &Value| {
        let env = &report["env"];
        let fds = &report["fd_targets"];
        assert_eq!(
            env["LISTEN_FDS"],
            json!("2"),
            "{when}: LISTEN_FDS in {report}"
        );
        assert_eq!(
            env["LISTEN_FDNAMES"],
            json!("web:admin"),
            "{when}: LISTEN_FDNAMES in {report}"
        );
        assert_eq!(
            fds["3"],
            json!(web_link),
            "{when}: fd 3 must be the `web` socket"
        );
        assert_eq!(
            fds["4"],
            json!(admin_link),
            "{when}: fd 4 must be the `admin` socket"
        );
    };
    let before = d.get_json("/");
    assert_eq!(before["ppid"].as_i64(), Some(i64::from(old)));
    check("before the upgrade", &before);

    let reply = control_request(&d.control_path(), &upgrade_request(None), UPGRADE_REPLY)
        .unwrap_or_else(|e| d.fail(&format!("upgrade request: {e}")));
    let new = expect_ok(&d, "upgrade", &reply, "upgraded")["new_pid"]
        .as_i64()
        .unwrap_or(0) as i32;
    d.register_pid(new);
    wait_promoted(&d, &pidfile, old, new);

    let after = d.wait_until(LONG, "GET / from a worker of the new master", || {
        let r = http_get(d.listener(), "/", SHORT).map_err(|e| e.to_string())?;
        let j: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {r:?}"))?;
        if j["ppid"].as_i64() == Some(i64::from(new)) {
            Ok(j)
        } else {
            Err(format!("answered by a worker of {}", j["ppid"]))
        }
    });
    check("after the upgrade", &after);
}

// ------------------------------------------------------------------ USR2 refusals

#[test]
fn usr2_during_an_upgrade_check_is_refused() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let gate = b.path("gate");
    let gated = script(b.dir(), "upgrade_gated.sh");
    let d = b
        .env("UPGRADE_GATE", &gate)
        .env("UPGRADE_REAL", ARBITERD)
        .args(["-w", "1", "-p"])
        .arg(&pidfile)
        .start();
    d.wait_workers(1);
    let old = d.pid();

    // An upgrade held in its configuration check.
    let mut conn = ControlConn::connect(&d.control_path()).unwrap();
    conn.send(&upgrade_request(Some(&gated))).unwrap();
    d.wait_log("the upgrade check to start", |l| {
        l.contains("Upgrade: checking") && l.contains("upgrade_gated.sh")
    });

    d.signal(Signal::SIGUSR2);
    let line = d.wait_log("the second upgrade refused", |l| {
        l.contains(&format!("[{old}]")) && l.contains("USR2 signal ignored.")
    });
    assert_eq!(
        d.log_lines_with("Upgrade: checking").len(),
        1,
        "only one upgrade may start ({line})"
    );

    // Let the first one through: it completes as if nothing happened.
    fs::write(&gate, "").unwrap();
    let reply = conn
        .recv(UPGRADE_REPLY)
        .unwrap_or_else(|e| d.fail(&format!("upgrade reply: {e}")));
    let new = expect_ok(&d, "the held upgrade", &reply, "upgraded")["new_pid"]
        .as_i64()
        .unwrap_or(0) as i32;
    d.register_pid(new);
    wait_promoted(&d, &pidfile, old, new);
    assert_eq!(
        d.log_lines_with("Upgrade: checking").len(),
        1,
        "the refused USR2 must not start an upgrade later"
    );
}

#[test]
fn second_usr2_is_refused_and_quitting_the_new_master_rolls_back() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let d = b.args(["-w", "1", "-p"]).arg(&pidfile).start();
    let ws: Vec<i32> = d.wait_workers(1).iter().map(|w| w.pid).collect();
    let old = d.pid();

    d.signal(Signal::SIGUSR2);
    let new = d.wait_until(LONG, "PIDFILE.2 to name the new master", || {
        read_pid(&second(&pidfile)).ok_or_else(|| "no PIDFILE.2 yet".to_string())
    });
    d.register_pid(new);
    d.wait_log("both masters serving", |l| {
        l.contains("both masters serve now")
    });
    let new_workers = wait_own_workers(&d, new, 1);

    // A second USR2 to the old master, and one to the unpromoted new master.
    d.signal(Signal::SIGUSR2);
    d.wait_log("the old master refusing a second USR2", |l| {
        l.contains(&format!("[{old}]")) && l.contains("USR2 signal ignored.")
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGUSR2).unwrap();
    d.wait_log("the unpromoted new master refusing USR2", |l| {
        l.contains(&format!("[{new}]")) && l.contains("USR2 signal ignored.")
    });
    assert_eq!(
        d.log_lines_with("Upgrade: checking").len(),
        1,
        "only one upgrade may start"
    );
    assert_eq!(
        workers_of(new),
        new_workers,
        "the new master's workers stay"
    );

    // Roll back: QUIT the new master; the old one keeps its pidfile and serves.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGQUIT).unwrap();
    assert_unchanged(&d, &pidfile, &ws);
    for w in &new_workers {
        assert!(!is_alive(*w), "the new master's worker {w} left behind");
    }
}

/// The rollback `docs/signals.md` documents (USR2, then QUIT the new master)
/// leaves the old master as it was before: the only master, with nothing said
/// about an upgrade, ready for another USR2, and owning its paths again, so a TERM
/// removes the control socket and the unix socket file.
#[test]
fn after_a_usr2_rollback_the_old_master_is_the_only_master_again() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let sock = b.path("app.sock");
    let d = b
        .args(["-w", "1", "-b", "127.0.0.1:0", "-b"])
        .arg(format!("unix:{}", sock.display()))
        .arg("-p")
        .arg(&pidfile)
        .start();
    let ws: Vec<i32> = d.wait_workers(1).iter().map(|w| w.pid).collect();
    let upgrade_in_status = || {
        let out = d.ctl(["status", "--json"]);
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| d.fail(&format!("status --json: {e}: {out:?}")));
        v["master"]["upgrade"].clone()
    };

    for round in 1..=2 {
        d.signal(Signal::SIGUSR2);
        let new = d.wait_until(LONG, "PIDFILE.2 to name the new master", || {
            read_pid(&second(&pidfile)).ok_or_else(|| "no PIDFILE.2 yet".to_string())
        });
        d.register_pid(new);
        d.wait_until(
            LONG,
            &format!("both masters serving (round {round})"),
            || {
                let n = d.log_lines_with("both masters serve now").len();
                if n == round {
                    Ok(())
                } else {
                    Err(format!("{n} 'both masters serve now' lines"))
                }
            },
        );
        wait_own_workers(&d, new, 1);
        let said = upgrade_in_status();
        assert!(
            said.as_str().is_some_and(|s| s.contains("beside")),
            "round {round}: status during the upgrade: {said}"
        );

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGQUIT).unwrap();
        d.wait_until(LONG, "the new master to exit", || {
            if is_alive(new) {
                Err(format!("{new} still runs"))
            } else {
                Ok(())
            }
        });
        assert_unchanged(&d, &pidfile, &ws);
        assert_eq!(
            upgrade_in_status(),
            Value::Null,
            "round {round}: status after the rollback must say no upgrade"
        );
    }
    assert!(
        d.log_lines_with("USR2 signal ignored").is_empty(),
        "the second USR2 must be taken: {:?}",
        d.log_lines_with("USR2 signal ignored")
    );

    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(
        !d.control_path().exists(),
        "the control socket {} was left behind",
        d.control_path().display()
    );
    assert!(
        !sock.exists(),
        "the unix socket {} was left behind",
        sock.display()
    );
}

// ------------------------------------------------------------------ under systemd

/// Start `-w 1 -p PIDFILE` with `NOTIFY_SOCKET` (and `extra_env`), wait for its
/// READY=1, and run the upgrade request. Returns (daemon, sink, old pid, new pid).
fn upgrade_under_a_service_manager(
    extra_env: &[(&str, &str)],
    watchdog: bool,
) -> (Daemon, NotifySink, i32, i32) {
    let mut b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let sink = NotifySink::bind(&b.path("notify.sock"));
    b = b.env("NOTIFY_SOCKET", &sink.path);
    for (k, v) in extra_env {
        b = b.env(k, v);
    }
    let d = b.args(["-w", "1", "-p"]).arg(&pidfile).start();
    let old = d.pid();
    sink.wait_for(&d, "READY=1 from the first master", |g| {
        g.pid == old && g.has("READY=1")
    });
    if watchdog {
        sink.wait_for(&d, "WATCHDOG=1 from the first master", |g| {
            g.pid == old && g.has("WATCHDOG=1")
        });
    }
    let reply = control_request(&d.control_path(), &upgrade_request(None), UPGRADE_REPLY)
        .unwrap_or_else(|e| d.fail(&format!("upgrade request: {e}")));
    let new = expect_ok(&d, "upgrade", &reply, "upgraded")["new_pid"]
        .as_i64()
        .unwrap_or(0) as i32;
    d.register_pid(new);
    wait_promoted(&d, &pidfile, old, new);
    (d, sink, old, new)
}

/// The contract of docs/upgrade.md under systemd: the old master stays the
/// service's main process until it exits, and hands over through the pidfile
/// (systemd's `PIDFile=`), never with a MAINPID= that systemd would read while
/// the new master is not its child; the new master says nothing until the old is
/// gone; nobody says STOPPING=1. (The real systemd tier, tests/systemd, checks
/// what systemd makes of it.)
#[test]
fn upgrade_under_systemd_hands_over_by_the_pidfile_and_nobody_says_stopping() {
    let (d, sink, old, new) = upgrade_under_a_service_manager(&[], false);
    let pidfile = d.path("app.pid");
    assert_eq!(
        std::fs::read_to_string(&pidfile)
            .ok()
            .map(|s| s.trim().to_string()),
        Some(new.to_string()),
        "the pidfile names the new master once the old one is gone"
    );
    let spoke = sink.wait_for(&d, "the promoted master speaking (STATUS=)", |g| {
        g.pid == new && g.text.contains("STATUS=")
    });
    // The old master is gone: everything it sent is queued already.
    sink.drain();
    let all = sink.history();
    let early: Vec<_> = all
        .iter()
        .filter(|g| g.pid == new && all.iter().any(|o| o.pid == old && o.index > g.index))
        .collect();
    let mainpid: Vec<_> = all.iter().filter(|g| g.text.contains("MAINPID=")).collect();
    let stopping: Vec<_> = all.iter().filter(|g| g.has("STOPPING=1")).collect();
    if !early.is_empty() || !mainpid.is_empty() || !stopping.is_empty() {
        d.fail(&format!(
            "old master {old}, new {new}: the new master spoke before the old one was \
             done: {early:#?}\nMAINPID= sent: {mainpid:#?}\nSTOPPING=1 sent (a \
             Type=notify unit would go to `deactivating`): {stopping:#?}\n\
             all datagrams: {all:#?}"
        ));
    }
    assert!(spoke.index > 0);
}

#[test]
fn upgrade_under_systemd_keeps_the_watchdog_fed() {
    // WATCHDOG_USEC of 1 s: a master pings every 0.5 s.
    let (d, sink, _old, new) =
        upgrade_under_a_service_manager(&[("WATCHDOG_USEC", "1000000")], true);
    // Pings every 0.5 s: a few seconds without one is a dead watchdog.
    sink.wait_for_within(&d, secs(5), "WATCHDOG=1 from the promoted master", |g| {
        g.pid == new && g.has("WATCHDOG=1")
    });
}
