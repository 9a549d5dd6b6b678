//! Stopping without losing a request (docs/signals.md, "Stopping without losing a
//! request"). TERM with `--shutdown-delay` under looping clients that keep coming
//! for 1 s after it (a balancer that then took the instance out): no connection
//! the kernel accepted is left unanswered, `/readyz` turns 503 at once while
//! `GET /` still serves, and the master exits after the window; a second TERM
//! cuts the window short. With the built-in worker, a Python COMMAND worker
//! (`python/arbiter_preload`), `--preload`, and as PID 1 of a pid namespace.
//! `/livez` and `/readyz` on their own: tests/probes.rs.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::harness::*;

const CLIENTS: usize = 32;
/// How long the clients keep coming after TERM.
const AFTER_TERM: Duration = Duration::from_secs(1);
const DELAY: Duration = Duration::from_secs(2);
/// `/readyz` must say 503 to every probe started this long after TERM.
const FLIP: Duration = Duration::from_millis(100);

/// What the looping clients saw, together.
#[derive(Clone, Debug, Default)]
struct Tally {
    answered: u64,
    /// Connected (the kernel accepted the connection), then no answer: reset,
    /// closed under the request, timed out, or not a 200.
    unanswered: u64,
    /// The connection itself failed: nothing was listening, or no room.
    refused: u64,
    failures: Vec<String>,
}

/// Clients doing connect, `GET /`, read, close, again and again, as fast as the
/// server answers; once `termed`, each stops at its first refused connection
/// (the instance is gone).
struct Clients {
    stop: Arc<AtomicBool>,
    termed: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    handles: Vec<JoinHandle<()>>,
}

impl Clients {
    fn start(n: usize, addr: SocketAddr) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let termed = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let t0 = Instant::now();
        let handles = (0..n)
            .map(|_| {
                let (stop, termed, tally) = (stop.clone(), termed.clone(), tally.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = TcpStream::connect_timeout(&addr, secs(2)).map(|s| {
                            let _ = s.set_read_timeout(Some(SHORT));
                            let _ = s.set_write_timeout(Some(SHORT));
                            exchange(s, &addr.to_string(), "/")
                        });
                        let refused = outcome.is_err();
                        let mut t = tally.lock().unwrap();
                        let note = match outcome {
                            Ok(Ok(r)) if r.status == 200 => {
                                t.answered += 1;
                                None
                            }
                            Ok(Ok(r)) => {
                                t.unanswered += 1;
                                Some(format!("status {} {:?}", r.status, r.body))
                            }
                            Ok(Err(e)) => {
                                t.unanswered += 1;
                                Some(format!("accepted, then {e}"))
                            }
                            Err(e) => {
                                t.refused += 1;
                                Some(format!("connect: {e}"))
                            }
                        };
                        if let Some(n) = note
                            && t.failures.len() < 20
                        {
                            t.failures.push(format!("at {:.3?}: {n}", t0.elapsed()));
                        }
                        if refused && termed.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                })
            })
            .collect();
        Clients {
            stop,
            termed,
            tally,
            handles,
        }
    }

    /// Every client has stopped on its own.
    fn all_done(&self) -> bool {
        self.handles.iter().all(JoinHandle::is_finished)
    }

    fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join().expect("a client thread panicked");
        }
        self.tally()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// `GET path` on `addr`: status and body.
pub(crate) fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let r = http_get(&Listener::Tcp(addr), path, SHORT).map_err(|e| e.to_string())?;
    Ok((r.status, r.body.trim_end().to_string()))
}

/// The TCP address of the `Metrics at:` line.
pub(crate) fn metrics_at(d: &Daemon) -> SocketAddr {
    let line = d.wait_log("the `Metrics at:` line", |l| l.contains("Metrics at: "));
    parse_metrics_line(&line).unwrap_or_else(|| d.fail(&format!("cannot parse {line:?}")))
}

fn parse_metrics_line(line: &str) -> Option<SocketAddr> {
    let at = line.split("Metrics at: ").nth(1)?.trim();
    Listener::parse(at.strip_suffix("/metrics")?).tcp()
}

/// The master under test, seen from outside: where it serves, how to signal it,
/// whether it exited, and its log for a failure message.
struct Master<'a> {
    app: SocketAddr,
    metrics: SocketAddr,
    signal: Box<dyn Fn(Signal) + 'a>,
    exited: Box<dyn Fn() -> Option<ExitStatus> + 'a>,
    log: Box<dyn Fn() -> String + 'a>,
}

impl Master<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n--- log ---\n{}", (self.log)())
    }

    fn wait_ready(&self) {
        wait_until_with(
            LONG,
            "/readyz to say ready",
            || match get(self.metrics, "/readyz")? {
                (200, body) if body.starts_with("ready: ") => Ok(()),
                other => Err(format!("{other:?}")),
            },
            &self.log,
        );
    }

    /// Probe `/readyz` from TERM (sent at `t0`) until it says draining. Every probe
    /// started FLIP after TERM must say so; returns when the first did.
    fn wait_not_ready(&self, t0: Instant) -> Duration {
        wait_until_with(
            SHORT,
            "/readyz to say draining",
            || {
                let started = Instant::now();
                match get(self.metrics, "/readyz")? {
                    (503, body) if body.starts_with("not ready: draining, ") => Ok(started - t0),
                    (200, body) if started >= t0 + FLIP => self.fail(&format!(
                        "/readyz still said {body:?} to a probe sent {:?} after TERM",
                        started - t0
                    )),
                    other => Err(format!("{other:?}")),
                }
            },
            &self.log,
        )
    }

    /// The whole scenario: see the module docs.
    fn stop_under_load(&self) {
        self.wait_ready();
        let clients = Clients::start(CLIENTS, self.app);
        wait_until_with(
            LONG,
            "the clients to be served",
            || {
                let t = clients.tally();
                if t.answered >= 200 {
                    Ok(())
                } else {
                    Err(format!("{t:?}"))
                }
            },
            &self.log,
        );
        let before = clients.tally();
        let t0 = Instant::now();
        (self.signal)(Signal::SIGTERM);
        let flipped = self.wait_not_ready(t0);
        assert!(
            flipped <= FLIP,
            "/readyz said 503 only {flipped:?} after TERM"
        );
        match get(self.app, "/") {
            Ok((200, _)) => {}
            other => self.fail(&format!("GET / in the drain window: {other:?}")),
        }
        // The clients' last second: a window of load, not a wait for a state.
        std::thread::sleep((t0 + AFTER_TERM).saturating_duration_since(Instant::now()));
        let tally = clients.finish();
        if let Some(st) = (self.exited)() {
            self.fail(&format!(
                "the master exited ({st}) {:?} after TERM, inside the {DELAY:?} window",
                t0.elapsed()
            ));
        }
        let status = wait_until_with(
            LONG,
            "the master to exit",
            || (self.exited)().ok_or_else(|| "still running".to_string()),
            &self.log,
        );
        let took = t0.elapsed();
        assert_eq!(status.code(), Some(0), "{status:?}\n{}", (self.log)());
        assert!(
            took >= DELAY,
            "exited {took:?} after TERM, before the window ended"
        );
        if tally.unanswered != 0 || tally.refused != 0 {
            self.fail(&format!(
                "{} accepted connection(s) unanswered and {} refused of {}: {:#?}",
                tally.unanswered,
                tally.refused,
                tally.answered + tally.unanswered + tally.refused,
                tally.failures
            ));
        }
        assert!(
            tally.answered > before.answered,
            "nothing was served after TERM: {tally:?}"
        );
    }

    /// TERM opens the window; `second` ends it, long before its 60 s.
    fn cut_short(&self, second: Signal, says: &str) {
        self.wait_ready();
        let t0 = Instant::now();
        (self.signal)(Signal::SIGTERM);
        self.wait_not_ready(t0);
        (self.signal)(second);
        let status = wait_until_with(
            SHORT,
            &format!("the master to exit after {second}"),
            || (self.exited)().ok_or_else(|| "still running".to_string()),
            &self.log,
        );
        assert_eq!(status.code(), Some(0), "{status:?}");
        let log = (self.log)();
        assert!(log.contains(says), "no {says:?} in the log:\n{log}");
    }
}

fn daemon_master(d: &Daemon) -> Master<'_> {
    Master {
        app: d.addr(),
        metrics: metrics_at(d),
        signal: Box::new(|sig| d.signal(sig)),
        exited: Box::new(|| d.try_status()),
        log: Box::new(|| d.log()),
    }
}

/// A WSGI app answering its pid, for `python3 -m arbiter_preload app:app`.
const APP: &str = "import json, os\n\
def app(environ, start_response):\n    \
body = json.dumps({'pid': os.getpid()}).encode()\n    \
start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])\n    \
return [body]\n";

/// arbiterd with the given options and metrics on a free port; `python`: the
/// workers are `python3 -m arbiter_preload app:app`.
fn start(opts: &[&str], python: bool) -> Daemon {
    let b = Daemon::builder();
    let b = if python {
        std::fs::write(b.path("app.py"), APP).unwrap();
        let python_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        b.env("PYTHONPATH", python_dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
    } else {
        b
    };
    let b = b.args(["--metrics-bind", "127.0.0.1:0"]).args(opts);
    if python {
        b.args(["--ready", "notify", "--"])
            .arg(python3())
            .args(["-m", "arbiter_preload", "app:app"])
            .start()
    } else {
        b.start()
    }
}

const DELAY_2: &[&str] = &["-w", "4", "--shutdown-delay", "2"];
const DELAY_60: &[&str] = &["-w", "2", "--shutdown-delay", "60"];

#[test]
fn term_with_a_drain_window_loses_nothing_builtin() {
    let d = start(DELAY_2, false);
    daemon_master(&d).stop_under_load();
}

#[test]
fn term_with_a_drain_window_loses_nothing_python() {
    let d = start(DELAY_2, true);
    daemon_master(&d).stop_under_load();
}

#[test]
fn term_with_a_drain_window_loses_nothing_preload() {
    let d = start(&["--preload", "-w", "4", "--shutdown-delay", "2"], true);
    daemon_master(&d).stop_under_load();
}

#[test]
fn a_second_term_cuts_the_window_short_and_status_says_draining() {
    let d = start(DELAY_60, false);
    let m = daemon_master(&d);
    m.wait_ready();
    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    m.wait_not_ready(t0);
    let out = d.ctl(["status"]);
    assert_eq!(out.code(), Some(5), "{out:?}");
    let first = out.stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains(", draining, ") && first.ends_with(" s left"),
        "{first:?}"
    );
    let out = d.ctl(["--json", "status"]);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["master"]["state"], "draining", "{j}");
    assert!(
        j["master"]["draining_secs_left"].as_f64().unwrap() > 50.0,
        "{j}"
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(SHORT).code(), Some(0));
    assert!(t0.elapsed() < secs(30), "{:?}", t0.elapsed());
    d.wait_log("the window cut short", |l| {
        l.contains("Drain window cut short") && l.contains("stopping now")
    });
}

#[test]
fn an_int_in_the_window_is_a_quick_stop() {
    let d = start(DELAY_60, false);
    daemon_master(&d).cut_short(Signal::SIGINT, "quick shutdown");
}

#[test]
fn a_second_term_cuts_the_window_short_python() {
    let d = start(DELAY_60, true);
    daemon_master(&d).cut_short(Signal::SIGTERM, "Drain window cut short");
}

#[test]
fn a_second_term_cuts_the_window_short_preload() {
    let d = start(&["--preload", "-w", "2", "--shutdown-delay", "60"], true);
    daemon_master(&d).cut_short(Signal::SIGTERM, "Drain window cut short");
}

#[test]
fn arbiterctl_stop_drains_too() {
    let d = start(&["-w", "1", "--shutdown-delay", "1"], false);
    let m = daemon_master(&d);
    m.wait_ready();
    let t0 = Instant::now();
    let out = d.ctl(["stop"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(t0.elapsed() >= secs(1), "stopped after {:?}", t0.elapsed());
    d.wait_log("the drain window", |l| l.contains("Draining for 1.0s"));
}

// ------------------------------------------------------------------ the workers' own drain

/// No drain window, and a queue the master gives up waiting for: its one worker
/// is stopped (SIGSTOP) while `n` connections queue behind it, so it gets its
/// TERM with all of them waiting, after the master has closed its copy of the
/// listener. Resumed, it must serve every one before it exits: once it closes
/// the socket, what waits there is reset.
fn a_stopped_worker_serves_its_queue_on_term(python: bool, n: usize) {
    let d = start(&["-w", "1", "--graceful-timeout", "4"], python);
    daemon_master(&d).wait_ready();
    let st = crate::health::status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let worker = st["workers"][0]["pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(worker), Signal::SIGSTOP).unwrap();
    let resume = Continue(worker);
    d.wait_until(SHORT, "the worker stopped", || {
        match proc_stat(worker).map(|s| s.state) {
            Some('T') => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let waiting: Vec<InFlight> = (0..n).map(|_| spawn_get(d.listener(), "/", LONG)).collect();
    d.wait_until(SHORT, &format!("{n} connections queued"), || {
        let st = crate::health::status_at(&d.control_path())?;
        let q = st["master"]["listeners"][0]["queue"].as_u64();
        if q == Some(n as u64) {
            Ok(())
        } else {
            Err(format!("queue {q:?}"))
        }
    });
    d.signal(Signal::SIGTERM);
    d.wait_log("the master giving up on the queue", |l| {
        l.contains("still in the accept queues after")
    });
    drop(resume);
    let mut lost = Vec::new();
    for (i, r) in waiting.into_iter().enumerate() {
        match r.join() {
            Ok(r) if r.status == 200 => {}
            Ok(r) => lost.push(format!("{i}: status {}", r.status)),
            Err(e) => lost.push(format!("{i}: {e}")),
        }
    }
    if !lost.is_empty() {
        d.fail(&format!(
            "{} of {n} queued connections lost: {lost:?}",
            lost.len()
        ));
    }
    assert_eq!(d.wait_exit(SHORT).code(), Some(0));
}

#[test]
fn without_a_window_the_builtin_worker_serves_what_is_queued_on_term() {
    // More than one batch of accepts (64): some are left for the drain itself.
    a_stopped_worker_serves_its_queue_on_term(false, 100);
}

#[test]
fn without_a_window_the_python_worker_serves_what_is_queued_on_term() {
    a_stopped_worker_serves_its_queue_on_term(true, 20);
}

/// No window, and clients that never stop coming: the queue the workers drain on
/// TERM would refill behind them, and what it held at the last close would be
/// reset (31 of 32 before the master kept the queue from taking more). Each
/// client is refused once, retryable; at most one connection can still slip into
/// the emptied queue between a worker's last look and its close.
#[test]
fn without_a_window_a_stop_under_unending_load_refuses_rather_than_resets() {
    let d = start(&["-w", "4", "--graceful-timeout", "4"], true);
    let m = daemon_master(&d);
    m.wait_ready();
    let clients = Clients::start(CLIENTS, d.addr());
    d.wait_until(LONG, "the clients to be served", || {
        let t = clients.tally();
        (t.answered >= 200).then_some(()).ok_or(format!("{t:?}"))
    });
    clients.termed.store(true, Ordering::Relaxed);
    d.signal(Signal::SIGTERM);
    d.wait_until(LONG, "every client refused", || {
        clients
            .all_done()
            .then_some(())
            .ok_or(format!("{:?}", clients.tally()))
    });
    let tally = clients.finish();
    assert_eq!(d.wait_exit(SHORT).code(), Some(0));
    if tally.unanswered > 1 || tally.refused != CLIENTS as u64 {
        d.fail(&format!(
            "{} accepted connection(s) unanswered, {} refused: {:#?}",
            tally.unanswered, tally.refused, tally.failures
        ));
    }
}

// ------------------------------------------------------------------ PID 1

/// `arbiterd` as PID 1 of a pid namespace of its own (`unshare --pid --fork
/// --mount-proc`, as a container runs it), in a process group of its own that is
/// killed whole at the end.
struct InNamespace {
    unshare: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl InNamespace {
    fn start(args: &[&str]) -> InNamespace {
        let dir = short_tempdir();
        let log = dir.path().join("daemon.log");
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc"])
            .arg(ARBITERD)
            .args(args)
            .args(["-b", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0"])
            .arg("--log-file")
            .arg(&log)
            .arg("--control")
            .arg(dir.path().join("c.sock"))
            .env(TAG_VAR, dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        for k in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
        ] {
            cmd.env_remove(k);
        }
        let unshare = cmd.spawn().expect("run unshare");
        InNamespace {
            unshare: Mutex::new(unshare),
            status: Mutex::new(None),
            log,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn line(&self, needle: &str) -> String {
        wait_until_with(
            LONG,
            needle,
            || {
                self.log()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_string)
                    .ok_or_else(|| "not yet".to_string())
            },
            || self.log(),
        )
    }

    /// The master as the host sees it (it is 1 inside).
    fn master(&self) -> i32 {
        let ns = self.unshare.lock().unwrap().id() as i32;
        wait_until(LONG, "the master inside the namespace", || {
            children_of(ns)
                .first()
                .map(|c| c.pid)
                .ok_or_else(|| "not yet".to_string())
        })
    }

    fn exited(&self) -> Option<ExitStatus> {
        let mut st = self.status.lock().unwrap();
        if st.is_none() {
            *st = self.unshare.lock().unwrap().try_wait().ok().flatten();
        }
        *st
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        let mut child = self.unshare.lock().unwrap();
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        kill_tagged(&self.dir.path().to_string_lossy(), SHORT);
    }
}

#[test]
fn as_pid_1_of_a_namespace_term_drains_and_loses_nothing() {
    let ns = InNamespace::start(&["-w", "4", "--shutdown-delay", "2"]);
    let listening = ns.line("Listening at: ");
    assert!(listening.ends_with(" (1)"), "not PID 1: {listening}");
    let app = listening
        .split("Listening at: ")
        .nth(1)
        .and_then(|r| r.rsplit_once(" ("))
        .and_then(|(a, _)| Listener::parse(a).tcp())
        .unwrap_or_else(|| panic!("cannot parse {listening:?}"));
    let metrics = parse_metrics_line(&ns.line("Metrics at: ")).unwrap();
    let master = ns.master();
    let m = Master {
        app,
        metrics,
        signal: Box::new(move |sig| {
            let _ = kill(Pid::from_raw(master), sig);
        }),
        exited: Box::new(|| ns.exited()),
        log: Box::new(|| ns.log()),
    };
    m.stop_under_load();
    assert!(ns.log().contains("Draining for 2.0s"), "{}", ns.log());
}

/// Sends SIGCONT when dropped, so that a failing assertion never leaves the
/// master stopped (the harness would KILL it anyway).
pub(crate) struct Continue(pub(crate) i32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}
