//! The real-worker examples under `examples/`, run against the real arbiterd the
//! way their READMEs say, each under continuous HTTP load across a reload (HUP):
//! not one request may fail, answers must come from both generations, and a TERM
//! afterwards must stop everything (gunicorn's own workers included) with exit 0.
//! The one exception is plain `uvicorn --fd 3`, whose own shutdown resets
//! connections it accepted but had not read (see [`Losses`]): allowed only there,
//! only in that form, and only at the rate upstream measured. The example's
//! `serve.py`, which reads them before closing, must lose nothing.
//!
//! uvicorn and gunicorn come from PyPI: when the Python package is missing the
//! test says so and passes, unless `ARBITER_REQUIRE_EXAMPLES=1` (CI installs them
//! and sets it, so a broken install cannot hide as a skip). The Rust example is
//! built with cargo into `target/examples-rust-listenfd` (a few seconds), the Go
//! one with `go build` into `target/examples-go`; the Node one runs as it is. When
//! `node` or `go` is missing those tests skip the same way.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::harness::{self, Daemon, LONG, Listener, SHORT, http_get, ms, secs};

fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// A Python interpreter that can import `module`, as its real path
/// (`sys.executable`, not a version manager's shim). `None`, with the reason
/// printed, when there is none (a failure instead under `ARBITER_REQUIRE_EXAMPLES=1`).
pub(crate) fn python_with(module: &str, pip_name: &str) -> Option<PathBuf> {
    let candidates: [OsString; 2] = [harness::python3(), "python3".into()];
    for py in &candidates {
        let Ok(out) = Command::new(py)
            .args([
                "-c",
                &format!("import sys, {module}; print(sys.executable)"),
            ])
            .output()
        else {
            continue;
        };
        let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !exe.is_empty() {
            return Some(PathBuf::from(exe));
        }
    }
    skip(&format!(
        "the Python package `{pip_name}` is not installed for {candidates:?} \
         (`python3 -m pip install {pip_name}`)"
    ))
}

/// `program` as PATH finds it, if `program VERSION_ARG` runs. `None`, with the
/// reason printed, when it does not (a failure instead under
/// `ARBITER_REQUIRE_EXAMPLES=1`); `debian` names the package that has it.
fn tool(program: &str, version_arg: &str, debian: &str) -> Option<OsString> {
    match Command::new(program).arg(version_arg).output() {
        Ok(out) if out.status.success() => Some(program.into()),
        Ok(out) => skip(&format!(
            "`{program} {version_arg}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => skip(&format!(
            "`{program}` cannot be run ({e}; Debian's package is `{debian}`)"
        )),
    }
}

/// Skip a test whose worker's runtime is missing, saying why; under CI fail
/// instead (see `harness::tool_missing`).
fn skip<T>(msg: &str) -> Option<T> {
    harness::tool_missing(msg);
    None
}

// ------------------------------------------------------------------ load

/// What the load threads saw.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Of `failed`: the server closed the connection before answering (a reset,
    /// a broken pipe while sending the request, or EOF with no response).
    closed_unanswered: u64,
    /// The first few failures, for the message.
    errors: Vec<String>,
    /// `generation` fields of the answers.
    generations: BTreeSet<u64>,
}

/// Clients in threads, each sending `GET /` on a fresh connection
/// (`Connection: close`) back to back until stopped. Bounded: every thread stops
/// by itself after 2 minutes.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    fn start(target: &Listener, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, target) = (stop.clone(), ok.clone(), target.clone());
                std::thread::spawn(move || {
                    let mut t = Tally::default();
                    let end = Instant::now() + secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        match http_get(&target, "/", SHORT) {
                            Ok(r) if r.status == 200 => {
                                t.ok += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(g) = serde_json::from_str::<serde_json::Value>(&r.body)
                                    .ok()
                                    .and_then(|j| j.get("generation")?.as_u64())
                                {
                                    t.generations.insert(g);
                                }
                            }
                            other => {
                                t.failed += 1;
                                if other.as_ref().is_err_and(|e| {
                                    matches!(
                                        e.kind(),
                                        std::io::ErrorKind::ConnectionReset
                                            | std::io::ErrorKind::BrokenPipe
                                            | std::io::ErrorKind::UnexpectedEof
                                    )
                                }) {
                                    t.closed_unanswered += 1;
                                }
                                if t.errors.len() < 5 {
                                    t.errors.push(match other {
                                        Ok(r) => format!("status {}: {:?}", r.status, r.body),
                                        Err(e) => e.to_string(),
                                    });
                                }
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for h in self.threads {
            let t = h.join().expect("a load thread panicked");
            all.ok += t.ok;
            all.failed += t.failed;
            all.closed_unanswered += t.closed_unanswered;
            all.errors.extend(t.errors);
            all.generations.extend(t.generations);
        }
        all
    }
}

/// Wait until the load has `n` more successful answers than now.
fn wait_more_answers(d: &Daemon, load: &Load, n: u64, what: &str) {
    let from = load.ok();
    d.wait_until(LONG, what, || {
        let now = load.ok();
        if now >= from + n {
            Ok(())
        } else {
            Err(format!("{} answers since", now - from))
        }
    });
}

// ------------------------------------------------------------------ the scenario

/// Start arbiterd with `args` (`-b 127.0.0.1:0` and `--control` are added by the
/// harness), wait for `workers` serving workers, put it under load, HUP, wait for
/// the new generation to replace the old one, keep the load on a little longer,
/// then TERM. Zero failed requests (but see [`Losses`]), answers from both
/// generations, exit 0, nothing left behind.
fn reload_under_load(args: &[OsString], workers: usize, losses: Losses) -> Tally {
    let d = Daemon::builder().args(args).start();
    let first = d.wait_workers(workers);
    let old: Vec<i32> = first.iter().map(|w| w.pid).collect();

    let load = Load::start(d.listener(), 2);
    wait_more_answers(&d, &load, 100, "100 answers under load before the reload");

    d.signal_delivered(Signal::SIGHUP);
    d.wait_until(LONG, "generation 2 to replace generation 1", || {
        let now = d.worker_infos();
        let gone = old.iter().all(|p| !harness::is_alive(*p));
        if gone && now.len() == workers && now.iter().all(|w| w.generation == Some(2)) {
            Ok(())
        } else {
            Err(format!("workers {now:?}, old {old:?}"))
        }
    });
    wait_more_answers(&d, &load, 100, "100 answers after the reload");
    let tally = load.finish();

    if tally.failed > losses.allowed(&tally) {
        d.fail(&format!(
            "{} of {} requests failed across the reload; first errors: {:#?}",
            tally.failed,
            tally.ok + tally.failed,
            tally.errors
        ));
    }
    if !(tally.generations.contains(&1) && tally.generations.contains(&2)) {
        d.fail(&format!(
            "expected answers from generations 1 and 2, saw {:?}",
            tally.generations
        ));
    }

    // Nothing is in flight now, so a graceful stop is quick; a worker deaf to TERM
    // (say, stuck in a blocking accept() it lost to another worker) would hold it
    // for the whole --graceful-timeout (30 s) before its KILL.
    let term = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LONG);
    if status.code() != Some(0) {
        d.fail(&format!("arbiterd exited with {status} after TERM, not 0"));
    }
    if term.elapsed() > secs(10) {
        d.fail(&format!(
            "TERM with nothing in flight took {:.1?} to stop: a worker ignored it",
            term.elapsed()
        ));
    }
    d.wait_no_leftovers(SHORT);
    tally
}

/// What a reload may lose.
#[derive(Clone, Copy)]
enum Losses {
    /// Not one request: the master's part of a reload, for any worker that
    /// finishes what it accepted.
    None,
    /// uvicorn's shutdown closes every connection whose request it has not read
    /// yet (`cycle is None` in its protocols' `shutdown()`), so a request that
    /// reached an old worker in the instant before its TERM is reset: upstream
    /// Kludex/uvicorn#2757 (~0.02% under load, reproducible without any master),
    /// the fix proposed in #3124 not merged as of 0.54. Allowed: only failures of
    /// that shape, at most 1 in 1000 requests (5 of the ~5000 a run makes; runs
    /// here see 0 to 2).
    UvicornUnreadClose,
}

impl Losses {
    fn allowed(self, t: &Tally) -> u64 {
        match self {
            Losses::None => 0,
            Losses::UvicornUnreadClose if t.closed_unanswered == t.failed => {
                ((t.ok + t.failed) / 1000).max(1)
            }
            Losses::UvicornUnreadClose => 0,
        }
    }
}

/// For a daemon started with `--timeout 3`: `workers` workers serve, and past
/// the timeout the same ones still do, each with a beat the master saw less than
/// 3 s ago. (A worker that never beats is never killed for silence, so the
/// recent beat is what shows the heartbeat works; one that stopped beating would
/// be replaced.) Returns the `arbiterctl --json status` document.
fn assert_beating(d: &Daemon, workers: usize) -> serde_json::Value {
    let pids: Vec<i32> = d.wait_workers(workers).iter().map(|w| w.pid).collect();
    d.assert_workers_stay(&pids, ms(4000));
    let out = d.ctl(["--json", "status"]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| d.fail(&format!("arbiterctl --json status: {e}: {out:?}")));
    let beats: Vec<Option<f64>> = json["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["last_beat_secs"].as_f64()).collect())
        .unwrap_or_default();
    if beats.len() != workers || beats.iter().any(|b| !b.is_some_and(|s| s < 3.0)) {
        d.fail(&format!(
            "expected {workers} workers with a recent beat, got {beats:?} in {json}"
        ));
    }
    json
}

/// A request in flight when arbiterd gets TERM is answered by the worker that
/// holds it (TERMed meanwhile), then arbiterd exits 0 and nothing is left.
fn assert_term_finishes_in_flight(d: &Daemon) {
    // Long enough that the worker's TERM surely comes while it sleeps: the
    // master passes it on at once. The hold is also the window in which the
    // accept must be seen in /proc: in a full parallel suite on 2 cores, the Go
    // worker's once went unseen for all of 2 s (cause not found; see the
    // issue note), so 5 s.
    let slow = d.spawn_get("/sleep?ms=5000");
    let holder = d.wait_accepted(&slow);
    d.signal(Signal::SIGTERM);
    match slow.join() {
        Ok(r) if r.status == 200 && r.json()["pid"].as_i64() == Some(i64::from(holder)) => {}
        other => d.fail(&format!(
            "the request in flight at TERM, held by worker {holder}, got {other:?}"
        )),
    }
    let status = d.wait_exit(LONG);
    if status.code() != Some(0) {
        d.fail(&format!("arbiterd exited with {status} after TERM, not 0"));
    }
    d.wait_no_leftovers(SHORT);
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

// ------------------------------------------------------------------ the examples

/// `arbiterd -w 2 --chdir examples/uvicorn -- PYTHON ARGS`, with the interpreter
/// that has uvicorn; None (the test skips) without one.
fn uvicorn_example(args: &[&str]) -> Option<Vec<OsString>> {
    let py = python_with("uvicorn", "uvicorn")?;
    let mut all = os(&["-w", "2", "--chdir"]);
    all.push(example_dir("uvicorn").into());
    all.extend(os(&["--"]));
    all.push(py.into());
    all.extend(os(args));
    Some(all)
}

#[test]
#[cfg_attr(
    not(has_py_uvicorn),
    ignore = "uvicorn is not installed (python3 -m pip install uvicorn)"
)]
fn uvicorn_example_reloads_under_load_losing_only_what_uvicorn_closes_unread() {
    // As the README, with `python -m` for the interpreter found.
    let Some(args) = uvicorn_example(&["-m", "uvicorn", "--fd", "3", "--no-access-log", "app:app"])
    else {
        return;
    };
    let t = reload_under_load(&args, 2, Losses::UvicornUnreadClose);
    eprintln!(
        "uvicorn: {} answers, {} closed unread by uvicorn's shutdown, generations {:?}",
        t.ok, t.failed, t.generations
    );
}

#[test]
#[cfg_attr(
    not(has_py_uvicorn),
    ignore = "uvicorn is not installed (python3 -m pip install uvicorn)"
)]
fn uvicorn_example_with_its_draining_serve_py_reloads_under_load_without_a_failed_request() {
    let Some(args) = uvicorn_example(&["serve.py"]) else {
        return;
    };
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "uvicorn serve.py: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}

#[test]
#[cfg_attr(
    not(has_py_gunicorn),
    ignore = "gunicorn is not installed (python3 -m pip install gunicorn)"
)]
fn gunicorn_example_reloads_under_load_without_a_failed_request() {
    let Some(py) = python_with("gunicorn", "gunicorn") else {
        return;
    };
    let dir = example_dir("gunicorn");
    let mut args = os(&["-w", "2", "--ready", "notify", "--chdir"]);
    args.push(dir.into());
    args.extend(os(&["--"]));
    args.push(py.into());
    args.extend(os(&["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]));
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "gunicorn: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}

#[test]
fn python_notify_example_reloads_under_load_and_beats() {
    let dir = example_dir("python-notify");
    let py = harness::python3();
    // A 3 s heartbeat timeout: the worker's WATCHDOG=1 pings (every 1.5 s) must
    // keep it alive.
    let mut args = os(&["-w", "2", "--ready", "notify", "--timeout", "3", "--"]);
    args.push(py);
    args.push(dir.join("worker.py").into());
    let d = Daemon::builder().args(&args).start();
    assert_beating(&d, 2);
    drop(d);
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "python-notify: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}

/// The Rust example builds (its own lock file, its own target dir) and serves.
#[test]
fn rust_listenfd_example_reloads_under_load_without_a_failed_request() {
    let dir = example_dir("rust-listenfd");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/examples-rust-listenfd");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let start = Instant::now();
    let out = Command::new(&cargo)
        .args(["build", "--quiet", "--locked", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build --locked of examples/rust-listenfd failed (if crates/proto's \
         dependencies changed, its Cargo.lock needs them: run `cargo build --manifest-path \
         examples/rust-listenfd/Cargo.toml` once and commit the lock file):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("rust-listenfd: built in {:.1?}", start.elapsed());
    let bin = target.join("debug/listenfd-worker");
    let mut args = os(&["-w", "2", "--ready", "notify", "--timeout", "5", "--"]);
    args.push(bin.into());
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "rust-listenfd: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}

/// The Node example (core modules only) as its README runs it: the default
/// `--ready exec`, the heartbeat through `ARBITER_HEARTBEAT_FD`.
#[test]
#[cfg_attr(
    not(has_node),
    ignore = "node is not installed (apt-get install nodejs)"
)]
fn node_example_beats_drains_on_term_and_reloads_under_load() {
    let Some(node) = tool("node", "--version", "nodejs") else {
        return;
    };
    let mut args = os(&["-w", "2", "--timeout", "3", "--"]);
    args.push(node);
    args.push(example_dir("node").join("worker.js").into());
    let d = Daemon::builder().args(&args).start();
    assert_beating(&d, 2);
    assert_term_finishes_in_flight(&d);
    drop(d);
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "node: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}

/// `go build` of `examples/go` into `target/examples-go/go-worker`, offline and
/// for any user: the build cache and GOPATH live there too, no proxy, no user
/// go.env, no go.work, no cgo (so no C compiler needed). `None` (skip) without go.
fn build_go_example() -> Option<PathBuf> {
    let go = tool("go", "version", "golang-go")?;
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/examples-go");
    let bin = target.join("go-worker");
    let start = Instant::now();
    let out = Command::new(go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(example_dir("go"))
        .env("GOCACHE", target.join("cache"))
        .env("GOPATH", target.join("gopath"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOENV", "off")
        .env("GOWORK", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .expect("run go build");
    assert!(
        out.status.success(),
        "go build of examples/go failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("go: built in {:.1?}", start.elapsed());
    Some(bin)
}

/// The Go example (standard library only): `--ready notify` (its `READY=1`
/// gates the reload), the heartbeat as `WATCHDOG=1`, `STATUS=` shown by
/// arbiterctl, `http.Server.Shutdown` on TERM.
#[test]
#[cfg_attr(
    not(has_go),
    ignore = "go is not installed (apt-get install golang-go)"
)]
fn go_example_beats_drains_on_term_and_reloads_under_load() {
    let Some(bin) = build_go_example() else {
        return;
    };
    let mut args = os(&["-w", "2", "--ready", "notify", "--timeout", "3", "--"]);
    args.push(bin.into());
    let d = Daemon::builder().args(&args).start();
    let json = assert_beating(&d, 2);
    // STATUS= rides on the WATCHDOG=1 datagrams: the master read them as sd_notify.
    let texts: Vec<&str> = json["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["status_text"].as_str())
                .collect()
        })
        .unwrap_or_default();
    if texts.len() != 2 || !texts.iter().all(|t| t.starts_with("served ")) {
        d.fail(&format!(
            "expected each worker's STATUS=served N requests, got {texts:?} in {json}"
        ));
    }
    assert_term_finishes_in_flight(&d);
    drop(d);
    let t = reload_under_load(&args, 2, Losses::None);
    eprintln!(
        "go: {} answers, 0 failed, generations {:?}",
        t.ok, t.generations
    );
}
