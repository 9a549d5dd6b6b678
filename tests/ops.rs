//! Operations seen from outside: the config file and its reload (a change applies, a
//! broken file is refused and changes nothing, a changed bind moves the listener),
//! a start through `systemd-socket-activate`, and what the master tells a service
//! manager on `NOTIFY_SOCKET` (READY=1, RELOADING=1, STOPPING=1, STATUS=, the
//! watchdog), `-D` not forking under one.
//!
//! Local helper (also used by `upgrade.rs`): [`NotifySink`], a datagram socket the
//! test binds and hands to the daemon as `NOTIFY_SOCKET`, recording every datagram
//! with its sender's pid (SO_PASSCRED).

use std::fs;
use std::io::IoSliceMut;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixCredentials, sockopt};
use serde_json::{Value, json};

use crate::harness::*;
use crate::upgrade::{control_request, expect_err, expect_ok};

// ------------------------------------------------------------------ NOTIFY_SOCKET

/// One sd_notify datagram as the service manager would get it.
#[derive(Clone, Debug)]
pub(crate) struct Datagram {
    /// Its place in the sink's history.
    pub index: usize,
    /// The sender, from the kernel-checked credentials.
    pub pid: i32,
    pub text: String,
    pub at: Instant,
}

impl Datagram {
    /// Does it carry exactly this `KEY=VALUE` line?
    pub fn has(&self, line: &str) -> bool {
        self.text.split('\n').any(|l| l == line)
    }

    pub fn value(&self, key: &str) -> Option<&str> {
        self.text
            .split('\n')
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A `NOTIFY_SOCKET` for the daemon under test: a path datagram socket that records
/// everything it receives, in order.
pub(crate) struct NotifySink {
    sock: UnixDatagram,
    pub path: PathBuf,
    history: Mutex<Vec<Datagram>>,
    /// Where the next [`wait_for`](Self::wait_for) starts looking.
    cursor: Mutex<usize>,
}

impl NotifySink {
    pub(crate) fn bind(path: &Path) -> NotifySink {
        let sock = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("bind the notify socket {}: {e}", path.display()));
        socket::setsockopt(&sock, sockopt::PassCred, &true).expect("SO_PASSCRED");
        NotifySink {
            sock,
            path: path.to_owned(),
            history: Mutex::new(Vec::new()),
            cursor: Mutex::new(0),
        }
    }

    /// Receive one datagram, waiting up to `timeout` (`None`: only what is queued).
    fn recv_one(&self, timeout: Option<Duration>) -> Option<Datagram> {
        let flags = match timeout {
            None => MsgFlags::MSG_DONTWAIT,
            Some(t) => {
                self.sock
                    .set_read_timeout(Some(t.max(ms(1))))
                    .expect("SO_RCVTIMEO");
                MsgFlags::empty()
            }
        };
        let mut buf = [0u8; 4096];
        let (len, pid) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            let msg =
                socket::recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)
                    .ok()?;
            let mut pid = 0;
            for c in msg.cmsgs().ok()? {
                if let ControlMessageOwned::ScmCredentials(cred) = c {
                    pid = cred.pid();
                }
            }
            (msg.bytes, pid)
        };
        let mut h = self.history.lock().unwrap();
        let g = Datagram {
            index: h.len(),
            pid,
            text: String::from_utf8_lossy(&buf[..len]).into_owned(),
            at: Instant::now(),
        };
        h.push(g.clone());
        Some(g)
    }

    /// Receive everything queued now.
    pub(crate) fn drain(&self) -> Vec<Datagram> {
        std::iter::from_fn(|| self.recv_one(None)).collect()
    }

    /// The next datagram (after the previous match) for which `pred` holds; fails
    /// the test with everything received if none comes within [`LONG`].
    pub(crate) fn wait_for(
        &self,
        d: &Daemon,
        what: &str,
        pred: impl Fn(&Datagram) -> bool,
    ) -> Datagram {
        self.wait_for_within(d, LONG, what, pred)
    }

    /// [`wait_for`](Self::wait_for) with its own deadline.
    pub(crate) fn wait_for_within(
        &self,
        d: &Daemon,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Datagram) -> bool,
    ) -> Datagram {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let h = self.history.lock().unwrap();
                let mut c = self.cursor.lock().unwrap();
                if let Some(g) = h[*c..].iter().find(|g| pred(g)) {
                    *c = g.index + 1;
                    return g.clone();
                }
            }
            let now = Instant::now();
            if now >= deadline {
                d.fail(&format!(
                    "no sd_notify datagram for: {what}\nreceived: {:#?}",
                    self.history()
                ));
            }
            self.recv_one(Some((deadline - now).min(ms(100))));
        }
    }

    pub(crate) fn history(&self) -> Vec<Datagram> {
        self.history.lock().unwrap().clone()
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

// ------------------------------------------------------------------ small helpers

fn write_config(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn reload_request() -> Value {
    json!({"v": 1, "cmd": "reload"})
}

fn pids(ws: &[WorkerInfo]) -> Vec<i32> {
    ws.iter().map(|w| w.pid).collect()
}

/// The addresses of the last `Listening at:` line `pid` logged.
fn last_listening(d: &Daemon, pid: i32) -> Vec<Listener> {
    let lines = d.log_lines_with("Listening at: ");
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains(&format!("[{pid}]")))
        .unwrap_or_else(|| d.fail("no `Listening at:` line"));
    let rest = &line[line.find("Listening at: ").unwrap() + "Listening at: ".len()..];
    let addrs = rest.rsplit_once(" (").map_or(rest, |(a, _)| a);
    addrs.split(", ").map(Listener::parse).collect()
}

/// The inode of the TCP socket listening on `port` (IPv4 or IPv6), from
/// `/proc/net/tcp{,6}`.
pub(crate) fn listen_inode(port: u16) -> Option<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(t).ok())
        .find_map(|text| {
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local_port = f
                    .get(1)?
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())?;
                // st 0A = LISTEN
                (local_port == port && *f.get(3)? == "0A")
                    .then(|| f.get(9)?.parse().ok())
                    .flatten()
            })
        })
}

// ------------------------------------------------------------------ config reload

#[test]
fn hup_applies_a_changed_config_file() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    write_config(&cfg, "workers = 2\ngraceful-timeout = 5\n");
    let d = b.arg("-c").arg(&cfg).start();
    let before = d.wait_workers(2);
    assert!(before.iter().all(|w| w.generation == Some(1)), "{before:?}");

    write_config(&cfg, "workers = 3\ngraceful-timeout = 5\n");
    d.signal(Signal::SIGHUP);
    let after = d.wait_workers_where("3 workers of generation 2", 3, |w| w.generation == Some(2));
    d.wait_log("the change in the log", |l| l.contains("workers 2 -> 3"));
    for w in &before {
        assert!(
            !after.iter().any(|a| a.pid == w.pid),
            "an old worker survived the reload: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_broken_config_file_fails_the_reload_and_changes_nothing() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    write_config(&cfg, "workers = 2\ngraceful-timeout = 5\n");
    let d = b.arg("-c").arg(&cfg).start();
    let ws = pids(&d.wait_workers(2));

    // Line 2 is broken; line 1 would change something if it were applied.
    write_config(&cfg, "workers = 3\ngraceful-timeout = = 5\n");
    let reply = control_request(&d.control_path(), &reload_request(), LONG)
        .unwrap_or_else(|e| d.fail(&format!("reload request: {e}")));
    let (kind, message) = expect_err(&d, "reload with a broken config file", &reply);
    assert_eq!(kind, "failed", "error kind: {reply}");
    let path = cfg.display().to_string();
    assert!(
        message.contains(&path) && message.contains("line 2"),
        "the error must name the file ({path}) and the line (2): {message:?}"
    );
    d.assert_workers_stay(&ws, ms(300));

    // HUP: the same refusal, in the log.
    let refusals = d.log_lines_with("Reload failed").len();
    d.signal(Signal::SIGHUP);
    d.wait_until(SHORT, "a second `Reload failed` log line", || {
        let lines = d.log_lines_with("Reload failed");
        if lines.len() > refusals {
            Ok(())
        } else {
            Err(format!("{lines:?}"))
        }
    });
    let line = d.log_lines_with("Reload failed").pop().unwrap();
    assert!(
        line.contains(&path) && line.contains("line 2"),
        "the log line must name the file and the line: {line:?}"
    );
    d.assert_workers_stay(&ws, ms(300));

    let status = control_request(&d.control_path(), &json!({"v": 1, "cmd": "status"}), SHORT)
        .unwrap_or_else(|e| d.fail(&format!("status request: {e}")));
    let master = &expect_ok(&d, "status", &status, "status")["master"];
    assert_eq!(
        master["generation"],
        json!(1),
        "the generation stays: {master}"
    );
    assert_eq!(
        master["target"],
        json!(2),
        "the worker count stays: {master}"
    );
    let r = d.get_json("/");
    assert!(
        ws.contains(&(r["pid"].as_i64().unwrap_or(0) as i32)),
        "GET / from {r}, not one of {ws:?}"
    );
    // No generation was started: the status must not blame the serving one (it
    // used to say `generation 1 FAILED`).
    assert_eq!(master["last_reload"]["generation"], json!(null), "{master}");
    let out = d.ctl(["status"]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("last reload"))
        .unwrap_or_else(|| d.fail(&format!("no last reload line: {out:?}")));
    assert!(
        line.contains("before starting a generation (generation 1 serves on)")
            && line.contains("line 2"),
        "{line:?}"
    );
}

#[test]
fn a_changed_bind_in_the_config_file_moves_the_listener() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    // Port 0 both times, on two loopback addresses: a real change of address with
    // no free-port race.
    write_config(&cfg, "workers = 1\nbind = [\"127.0.0.1:0\"]\n");
    let d = b.arg("-c").arg(&cfg).no_default_bind().start();
    d.wait_workers(1);
    let old_addr = d.addr();

    write_config(&cfg, "workers = 1\nbind = [\"127.0.0.2:0\"]\n");
    let reply = control_request(&d.control_path(), &reload_request(), LONG)
        .unwrap_or_else(|e| d.fail(&format!("reload request: {e}")));
    expect_ok(&d, "reload with a new bind", &reply, "reloaded");

    let now = last_listening(&d, d.pid());
    let new_addr: SocketAddr = match now.as_slice() {
        [l] => l
            .tcp()
            .unwrap_or_else(|| d.fail(&format!("listening at {now:?}"))),
        _ => d.fail(&format!(
            "expected one listener after the reload, got {now:?}"
        )),
    };
    assert_eq!(new_addr.ip().to_string(), "127.0.0.2", "{now:?}");
    let r = http_get(&Listener::Tcp(new_addr), "/", SHORT)
        .unwrap_or_else(|e| d.fail(&format!("GET / on the new address {new_addr}: {e}")));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["generation"],
        json!(2),
        "served by the new generation"
    );

    // The reload has answered: the old generation is gone, so is the old socket.
    d.wait_until(
        SHORT,
        "the old address to refuse connections",
        || match TcpStream::connect_timeout(&old_addr, SHORT) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(format!("connect {old_addr}: {e}")),
            Ok(_) => Err(format!("{old_addr} still accepts")),
        },
    );
    assert!(
        d.workers()
            .iter()
            .all(|&p| worker_info(p).generation == Some(2)),
        "only the new generation is left: {:?}",
        d.worker_infos()
    );
}

// ------------------------------------------------------------------ socket activation

#[test]
fn a_start_through_systemd_socket_activate_serves_the_handed_socket() {
    const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
    assert!(
        Path::new(ACTIVATE).exists(),
        "{ACTIVATE} is needed for this test"
    );
    // A free port: bound then closed (a tiny race with other processes).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = Daemon::builder();
    let control = b.path("control.sock");
    let d = b
        .program(ACTIVATE)
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=web"])
        .arg(ARBITERD)
        .args(["-w", "1", "--control"])
        .arg(&control)
        .arg("--")
        .arg(python3())
        .arg(test_file("workers/fdworker.py"))
        .no_default_bind()
        .no_wait()
        .start();
    // systemd-socket-activate listens, and execs arbiterd in its own place at the
    // first connection.
    let inode = d.wait_until(SHORT, "systemd-socket-activate to listen", || {
        if let Some(st) = d.try_status() {
            d.fail(&format!("systemd-socket-activate exited ({st})"));
        }
        listen_inode(port).ok_or_else(|| format!("nothing listens on port {port}"))
    });
    let target = Listener::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let r = spawn_get(&target, "/", LONG)
        .join()
        .unwrap_or_else(|e| d.fail(&format!("GET / through the activated socket: {e}")));
    assert_eq!(r.status, 200, "{r:?}");
    let report = r.json();
    let master = d.child_pid();
    assert_eq!(
        report["ppid"].as_i64(),
        Some(i64::from(master)),
        "the worker's parent is arbiterd, exec'd in systemd-socket-activate's place: {report}"
    );
    let env = &report["env"];
    assert_eq!(env["LISTEN_FDS"], json!("1"), "{report}");
    assert_eq!(env["LISTEN_FDNAMES"], json!("web"), "{report}");
    assert_eq!(
        env["LISTEN_PID"],
        json!(report["pid"].as_i64().unwrap().to_string()),
        "{report}"
    );
    assert_eq!(
        report["fd_targets"]["3"],
        json!(format!("socket:[{inode}]")),
        "the worker's fd 3 is the socket systemd-socket-activate bound: {report}"
    );
    d.wait_log("the listening line", |l| {
        l.contains(&format!("Listening at: http://127.0.0.1:{port} ({master})"))
    });
    assert_eq!(
        listen_inode(port),
        Some(inode),
        "the same socket still listens (never rebound)"
    );

    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit status after TERM: {st}");
    d.wait_no_leftovers(SHORT);
}

// ------------------------------------------------------------------ sd_notify

#[test]
fn notify_socket_gets_ready_reloading_ready_stopping_in_order() {
    let b = Daemon::builder();
    let sink = NotifySink::bind(&b.path("notify.sock"));
    let gate = b.path("ready.flag");
    let d = b
        .env("NOTIFY_SOCKET", &sink.path)
        .args([
            "-w",
            "2",
            "--ready",
            "notify",
            "--graceful-timeout",
            "5",
            "--",
        ])
        .arg(python3())
        .arg(test_file("workers/ops_notify_gate.py"))
        .arg(&gate)
        .start();
    let master = d.pid();

    // Both workers run, neither is ready (they wait for the gate): no READY=1 yet.
    d.wait_until(LONG, "2 exec'd workers", || {
        let ws = d.worker_infos();
        if ws.len() == 2 && ws.iter().all(|w| w.worker_id.is_some()) {
            Ok(())
        } else {
            Err(format!("{ws:?}"))
        }
    });
    let early = sink.drain();
    assert!(
        !early.iter().any(|g| g.has("READY=1")),
        "READY=1 before any worker was ready: {early:#?}"
    );

    fs::write(&gate, "").unwrap();
    let ready = sink.wait_for(&d, "READY=1 at boot", |g| g.has("READY=1"));
    assert_eq!(ready.pid, master, "sent by the master: {ready:?}");
    let status = ready.value("STATUS").unwrap_or_default();
    assert!(
        status.contains("2/2"),
        "READY=1 comes with a STATUS= showing both workers ready: {ready:?}"
    );
    d.wait_workers(2);

    // Reload: RELOADING=1 with the monotonic time of the request, then READY=1 once
    // the new generation has replaced the old one.
    let t0 = monotonic_usec();
    d.signal(Signal::SIGHUP);
    let reloading = sink.wait_for(&d, "RELOADING=1", |g| g.has("RELOADING=1"));
    let t1 = monotonic_usec();
    assert_eq!(reloading.pid, master);
    let stamp: u64 = reloading
        .value("MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            d.fail(&format!(
                "RELOADING=1 without MONOTONIC_USEC: {reloading:?}"
            ))
        });
    assert!(
        (t0..=t1).contains(&stamp),
        "MONOTONIC_USEC={stamp} is not CLOCK_MONOTONIC between the HUP ({t0}) and its receipt ({t1})"
    );
    let reloaded = sink.wait_for(&d, "READY=1 after the reload", |g| g.has("READY=1"));
    assert_eq!(reloaded.pid, master);
    assert!(
        !d.log_lines_with("Reload to generation 2 complete")
            .is_empty(),
        "READY=1 came before the reload was complete"
    );
    d.wait_workers_where("2 workers of generation 2", 2, |w| w.generation == Some(2));

    // A change of the worker count shows in STATUS=.
    let last_status = sink
        .history()
        .iter()
        .rev()
        .find_map(|g| g.value("STATUS").map(str::to_string))
        .unwrap_or_default();
    d.signal(Signal::SIGTTIN);
    sink.wait_for(&d, "a new STATUS= after TTIN", |g| {
        g.value("STATUS").is_some_and(|s| s != last_status)
    });
    d.wait_workers(3);

    d.signal(Signal::SIGTERM);
    let stopping = sink.wait_for(&d, "STOPPING=1", |g| g.has("STOPPING=1"));
    assert_eq!(stopping.pid, master);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit after TERM: {st}");

    // The whole sequence, in order, with nothing else of that kind in between.
    sink.drain();
    let events: Vec<&str> = sink
        .history()
        .iter()
        .flat_map(|g| {
            ["READY=1", "RELOADING=1", "STOPPING=1"]
                .into_iter()
                .filter(|e| g.has(e))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        events,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{:#?}",
        sink.history()
    );
    assert!(
        sink.history().iter().all(|g| g.pid == master),
        "only the master talks to the service manager: {:#?}",
        sink.history()
    );
}

#[test]
fn daemon_flag_with_notify_socket_does_not_fork() {
    let b = Daemon::builder();
    let sink = NotifySink::bind(&b.path("notify.sock"));
    let d = b
        .env("NOTIFY_SOCKET", &sink.path)
        .args(["-D", "-w", "1"])
        .start();
    assert_eq!(
        d.pid(),
        d.child_pid(),
        "with NOTIFY_SOCKET set, -D must not fork: the spawned process stays the master"
    );
    let ready = sink.wait_for(&d, "READY=1", |g| g.has("READY=1"));
    assert_eq!(ready.pid, d.child_pid(), "READY=1 from the spawned process");
    let me = proc_stat(std::process::id() as i32).unwrap();
    let it = proc_stat(d.child_pid()).expect("the master runs");
    assert_eq!(
        it.session, me.session,
        "-D must not setsid under a service manager"
    );
    d.wait_log("the not-detaching log line", |l| {
        l.contains("Not detaching")
    });
    d.wait_workers(1);
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit after TERM: {st}");
}

/// `/bin/sh -c 'export WATCHDOG_PID=...; exec arbiterd ...'`, so that WATCHDOG_PID
/// can name arbiterd's own pid, as systemd sets it.
fn with_watchdog(pid_expr: &str, usec: &str) -> (Daemon, NotifySink) {
    let b = Daemon::builder();
    let sink = NotifySink::bind(&b.path("notify.sock"));
    let d = b
        .program("/bin/sh")
        .arg("-c")
        .arg(format!(r#"export WATCHDOG_PID={pid_expr}; exec "$0" "$@""#))
        .arg(ARBITERD)
        .args(["-w", "1"])
        .env("NOTIFY_SOCKET", &sink.path)
        .env("WATCHDOG_USEC", usec)
        .start();
    (d, sink)
}

#[test]
fn watchdog_pings_come_at_half_the_interval() {
    let (d, sink) = with_watchdog("$$", "1000000");
    let master = d.pid();
    sink.wait_for(&d, "READY=1", |g| g.has("READY=1"));
    let pings: Vec<Datagram> = (0..4)
        .map(|i| {
            sink.wait_for_within(&d, SHORT, &format!("WATCHDOG=1 #{i}"), |g| {
                g.has("WATCHDOG=1")
            })
        })
        .collect();
    for p in &pings {
        assert_eq!(p.pid, master, "WATCHDOG=1 from the master: {p:?}");
    }
    for w in pings.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap < ms(1000),
            "{gap:?} between two WATCHDOG=1 with WATCHDOG_USEC=1s: systemd would kill the service"
        );
    }
}

#[test]
fn watchdog_pid_of_another_process_means_no_pings() {
    // WATCHDOG_PID names pid 1, not arbiterd: the watchdog is not for it.
    let (d, sink) = with_watchdog("1", "200000");
    sink.wait_for(&d, "READY=1", |g| g.has("READY=1"));
    let until = Instant::now() + ms(600);
    while Instant::now() < until {
        if let Some(g) = sink.recv_one(Some(until - Instant::now())) {
            assert!(
                !g.has("WATCHDOG=1"),
                "WATCHDOG=1 although WATCHDOG_PID is another process: {g:?}"
            );
        }
    }
}
