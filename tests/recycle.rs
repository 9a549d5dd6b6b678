//! Recycling (`--max-requests`, `ARBITER_RECYCLE=1`): a worker is replaced
//! first, then retired gracefully, so under load no request fails and the
//! ready count never falls below the target. The ready count is sampled every
//! 50 ms over the control socket while 4 clients loop on `GET /`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;
use crate::health::status_at;

const CLIENTS: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

fn status(d: &Daemon) -> Value {
    status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e))
}

fn recycles(st: &Value, reason: &str) -> u64 {
    st["master"]["recycles"][reason].as_u64().unwrap_or(0)
}

fn wait_ready(d: &Daemon, n: u64) {
    d.wait_until(LONG, &format!("{n} workers ready"), || {
        let st = status(d);
        if st["master"]["ready"] == n && st["master"]["total"] == n {
            Ok(())
        } else {
            Err(format!("{}", st["workers"]))
        }
    });
}

/// 4 clients looping on `GET /` for `run`, the ready count sampled every 50 ms:
/// (requests that succeeded, failures, the lowest ready count seen).
fn under_load(d: &Daemon, run: Duration) -> (u64, Vec<String>, u64) {
    let clients = LoopingClients::start(CLIENTS, d.listener(), "/");
    let end = Instant::now() + run;
    let mut min_ready = u64::MAX;
    while Instant::now() < end {
        let st = status(d);
        let ready = st["master"]["ready"].as_u64().unwrap_or(0);
        min_ready = min_ready.min(ready);
        std::thread::sleep(SAMPLE_EVERY);
    }
    let (ok, failures) = clients.stop();
    (ok, failures, min_ready)
}

/// Under load for 8 s: recycled by count, nothing lost, never below 2 ready.
fn recycled_under_load_with_none_lost(d: &Daemon) {
    wait_ready(d, 2);
    let (ok, failures, min_ready) = under_load(d, secs(8));
    let st = status(d);
    let n = recycles(&st, "max-requests");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(min_ready >= 2, "ready fell to {min_ready}\n{}", d.log());
    // 40..=50 requests each, thousands served: a few recycles at the very least.
    assert!(
        n >= 3 && ok > 50 * n,
        "{n} recycles for {ok} requests: {}\n{}",
        st["master"],
        d.log()
    );
    let m = d.ctl(["metrics"]).stdout;
    assert!(
        m.lines()
            .any(|l| l.starts_with("arbiter_worker_recycles_total{")
                && l.contains("reason=\"max-requests\"")
                && !l.ends_with(" 0")),
        "{m}"
    );
    assert!(
        d.log_lines_with("Autorestarting").is_empty()
            && !d
                .log_lines_with("gracefully: recycled, its replacement is ready")
                .is_empty(),
        "{}",
        d.log()
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());
    d.wait_no_leftovers(SHORT);
}

#[test]
fn max_requests_recycles_builtin_workers_under_load_losing_nothing() {
    let d = Daemon::start([
        "-w",
        "2",
        "--max-requests",
        "40",
        "--max-requests-jitter",
        "10",
    ]);
    recycled_under_load_with_none_lost(&d);
}

fn python_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

#[test]
fn max_requests_recycles_preloaded_python_workers_under_load_losing_nothing() {
    let b = Daemon::builder();
    let app = b.path("app.py");
    std::fs::write(
        &app,
        "import os\n\
         def app(environ, start_response):\n    \
         body = ('{\"pid\": %d}' % os.getpid()).encode()\n    \
         start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])\n    \
         return [body]\n",
    )
    .unwrap();
    let d = b
        .env("PYTHONPATH", python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["--preload", "-w", "2", "--ready", "notify"])
        .args(["--max-requests", "40", "--max-requests-jitter", "10", "--"])
        .arg(python3())
        .args(["-m", "arbiter_preload", "app:app"])
        .start();
    recycled_under_load_with_none_lost(&d);
}

/// A worker that asks (`ARBITER_RECYCLE=1`, through `arbiter_preload.recycle()`)
/// is replaced first: its slot's new worker is ready before it is told to stop,
/// and the ready count never dips.
#[test]
fn a_worker_that_asks_is_replaced_first() {
    let b = Daemon::builder();
    let marker = b.path("asked");
    let d = b
        .env("PYTHONPATH", python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-w", "2", "--ready", "notify", "--"])
        .arg(python3())
        .arg(test_file("workers/recycle_worker.py"))
        .arg("ask")
        .arg(&marker)
        .start();
    let mut min_ready = u64::MAX;
    // Counted from the first sample with both first workers ready: the asker
    // asks as soon as it is ready itself, maybe before the other one is, and
    // a count below 2 then is the boot, not the recycle.
    let mut both_up = false;
    let asker: i32 = d.wait_until(LONG, "a worker asked", || {
        std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "no marker yet".to_string())
    });
    let slot = d.wait_until(LONG, "the asker recycled and gone", || {
        let st = status(&d);
        let ready = st["master"]["ready"].as_u64().unwrap_or(0);
        both_up |= ready >= 2;
        if both_up {
            min_ready = min_ready.min(ready);
        }
        let ws = st["workers"].as_array().cloned().unwrap_or_default();
        let gone = !ws.iter().any(|w| w["pid"] == asker);
        let slot = d
            .log_lines_with(&format!("Recycling worker (pid:{asker})"))
            .first()
            .map(|_| ());
        std::thread::sleep(SAMPLE_EVERY);
        match (gone && !is_alive(asker), slot) {
            (true, Some(())) if st["master"]["ready"] == 2 => Ok(st),
            _ => Err(format!("{ws:?}")),
        }
    });
    assert_eq!(recycles(&slot, "asked"), 1, "{}", slot["master"]);
    assert!(min_ready >= 2, "ready fell to {min_ready}\n{}", d.log());
    // In the log: asked, then a replacement booted, then the asker stopped as
    // recycled (not as a failure, not before its replacement was ready).
    let log = d.log();
    let asked_at = log
        .find(&format!("Recycling worker (pid:{asker}): it asked"))
        .unwrap_or_else(|| d.fail("no recycle line"));
    let stopped_at = log
        .find(&format!(
            "Stopping worker (pid:{asker}) gracefully: recycled, its replacement is ready"
        ))
        .unwrap_or_else(|| d.fail("no graceful stop as recycled"));
    assert!(asked_at < stopped_at, "{log}");
    assert!(
        log[asked_at..stopped_at].contains("Booting worker with pid"),
        "no replacement booted between the ask and the stop:\n{log}"
    );
    assert_eq!(slot["master"]["worker_failures"], 0, "{log}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());
    d.wait_no_leftovers(SHORT);
}

/// Six workers started together count at the same steady rate: with no jitter
/// they would all reach `--max-requests` at once. With 0..=600 more each (up to
/// 6 s at 100 a second), their limits differ and their recycles spread over
/// seconds.
#[test]
fn jitter_spreads_the_recycles() {
    let d = Daemon::builder()
        .env("PYTHONPATH", python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-w", "6", "--ready", "notify"])
        .args([
            "--max-requests",
            "100",
            "--max-requests-jitter",
            "600",
            "--",
        ])
        .arg(python3())
        .arg(test_file("workers/recycle_worker.py"))
        .arg("count")
        .start();
    wait_ready(&d, 6);
    let first = status(&d);
    let originals: Vec<i64> = first["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    let limits: Vec<u64> = first["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["max_requests"].as_u64())
        .collect();
    assert_eq!(limits.len(), 6, "{}", first["workers"]);
    assert!(limits.iter().all(|l| (100..=700).contains(l)), "{limits:?}");
    let distinct: std::collections::BTreeSet<u64> = limits.iter().copied().collect();
    assert!(distinct.len() >= 4, "limits hardly differ: {limits:?}");
    // When each first worker was first seen recycling (or gone).
    let t0 = Instant::now();
    let mut seen: BTreeMap<i64, Duration> = BTreeMap::new();
    let mut min_ready = u64::MAX;
    d.wait_until(LONG, "every first worker recycled", || {
        let st = status(&d);
        min_ready = min_ready.min(st["master"]["ready"].as_u64().unwrap_or(0));
        let ws = st["workers"].as_array().cloned().unwrap_or_default();
        for &pid in &originals {
            let w = ws.iter().find(|w| w["pid"] == pid);
            if w.is_none_or(|w| w["state"] != "ready") {
                seen.entry(pid).or_insert(t0.elapsed());
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
        if seen.len() == originals.len() {
            Ok(())
        } else {
            Err(format!("seen {seen:?} of {originals:?}"))
        }
    });
    let times: Vec<Duration> = seen.values().copied().collect();
    let spread = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    assert!(
        spread > Duration::from_secs(1),
        "all six recycled within {spread:?}: {seen:?}, limits {limits:?}"
    );
    assert!(min_ready >= 6, "ready fell to {min_ready}\n{}", d.log());
    let st = status(&d);
    assert!(
        d.ctl(["status"])
            .stdout
            .contains("max-requests: 100 +0..600 per worker"),
        "{}",
        d.ctl(["status"]).stdout
    );
    assert!(recycles(&st, "max-requests") >= 6, "{}", st["master"]);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());
    d.wait_no_leftovers(SHORT);
}

/// A worker that does not count requests (a plain COMMAND) is never recycled by
/// count, and `status` says `n/a` for it.
#[test]
fn workers_that_do_not_count_are_not_recycled_by_count() {
    let d = Daemon::builder()
        .args(["-w", "1", "--max-requests", "1", "--"])
        .arg(python3())
        .arg(test_file("workers/fdworker.py"))
        .start();
    wait_ready(&d, 1);
    let pid = status(&d)["workers"][0]["pid"].clone();
    for _ in 0..5 {
        d.get("/");
    }
    // Longer than the master's slowest look at the counts (1 s).
    d.assert_workers_stay(&[pid.as_i64().unwrap() as i32], secs(2));
    let text = d.ctl(["status"]).stdout;
    assert!(
        text.contains("max-requests: 1, n/a for every worker (none counts requests); 0 recycled"),
        "{text}"
    );
    let st = status(&d);
    assert_eq!(st["workers"][0]["pid"], pid, "{}", st["workers"]);
    assert_eq!(st["workers"][0]["max_requests"], Value::Null);
    assert_eq!(recycles(&st, "max-requests"), 0);
}
