//! The scoreboard, seen from outside: `arbiterctl status --json`, its table and
//! `metrics` say which workers are busy (a request in hand), idle, or unknown (not
//! reporting), and how many requests each served. Requests are held in flight with
//! `/sleep?ms=N` (the built-in worker's and the Python example's), long enough
//! for the state to be seen, and waited for with `wait_until`.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::{self, Daemon, LONG, SHORT, proc_environ};

/// How long a held request sleeps: the busy state must be seen within it, on a
/// slow, busy machine.
const HOLD_MS: u64 = 4000;

fn status(d: &Daemon) -> Value {
    let out = d.ctl(["--json", "status"]);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| d.fail(&format!("status --json: {e}: {out:?}")))
}

fn worker(st: &Value, pid: i32) -> Option<&Value> {
    st["workers"]
        .as_array()?
        .iter()
        .find(|w| w["pid"].as_i64() == Some(i64::from(pid)))
}

fn workers(st: &Value) -> Vec<Value> {
    st["workers"].as_array().cloned().unwrap_or_default()
}

/// (busy, requests) of worker `pid`, as the snapshot says.
fn board(st: &Value, pid: i32) -> (Value, Value) {
    match worker(st, pid) {
        Some(w) => (w["busy"].clone(), w["requests"].clone()),
        None => (Value::Null, Value::Null),
    }
}

fn counts(st: &Value) -> (Value, Value, Value) {
    let m = &st["master"];
    (
        m["workers_busy"].clone(),
        m["workers_idle"].clone(),
        m["workers_unknown"].clone(),
    )
}

/// The `BUSY` cell of worker `pid`'s row in `arbiterctl status`.
/// The value of the unlabelled-but-for-`arbiter` gauge `name` in `metrics`.
fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The BUSY cell of worker `pid` in `arbiterctl status`.
fn busy_cell(d: &Daemon, pid: i32) -> String {
    let out = d.ctl(["status"]).stdout;
    let pid = pid.to_string();
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(pid.as_str()))
        .and_then(|l| l.split_whitespace().nth(10))
        .unwrap_or_default()
        .to_string()
}

/// `ARBITER_SCOREBOARD_SLOT` of a live process.
fn entry_of(pid: i32) -> Option<u64> {
    proc_environ(pid)?
        .get("ARBITER_SCOREBOARD_SLOT")?
        .parse()
        .ok()
}

fn requests(st: &Value, pid: i32) -> u64 {
    board(st, pid).1.as_u64().unwrap_or(0)
}

/// Hold a request on one worker; see it busy (and every other worker idle) in
/// the snapshot, the table and the metrics; let it finish; see it idle with the
/// request counted.
fn held_request_shows_busy_then_idle(d: &Daemon, n: usize) {
    let before = d.wait_until(SHORT, "every worker idle on the scoreboard", || {
        let st = status(d);
        let ws = workers(&st);
        if ws.len() != n || ws.iter().any(|w| w["busy"] != Value::Bool(false)) {
            return Err(format!("workers: {ws:?}"));
        }
        if counts(&st) != (0.into(), n.into(), 0.into()) {
            return Err(format!("counts: {:?}", counts(&st)));
        }
        Ok(st)
    });
    let req = d.spawn_get(&format!("/sleep?ms={HOLD_MS}"));
    let holder = d.wait_accepted(&req);
    let counted_before = requests(&before, holder);
    d.wait_until(SHORT, "the holder busy, every other worker idle", || {
        let st = status(d);
        for w in workers(&st) {
            let want = w["pid"].as_i64() == Some(i64::from(holder));
            if w["busy"] != Value::Bool(want) {
                return Err(format!("worker {w}"));
            }
        }
        if counts(&st) != (1.into(), (n - 1).into(), 0.into()) {
            return Err(format!("counts: {:?}", counts(&st)));
        }
        Ok(())
    });
    assert_eq!(busy_cell(d, holder), "busy", "{}", d.ctl(["status"]).stdout);
    let metrics = d.ctl(["metrics"]).stdout;
    assert!(
        gauge(&metrics, "arbiter_workers_busy") == Some(1)
            && gauge(&metrics, "arbiter_workers_idle") == Some(n as u64 - 1)
            && gauge(&metrics, "arbiter_workers_unknown") == Some(0),
        "{metrics}"
    );
    let r = req.join().expect("the held request");
    assert_eq!(r.status, 200, "{r:?}");
    d.wait_until(SHORT, "the holder idle again, its request counted", || {
        let st = status(d);
        let (busy, _) = board(&st, holder);
        let now = requests(&st, holder);
        if busy != Value::Bool(false) || now <= counted_before {
            return Err(format!(
                "busy {busy}, requests {now} (before: {counted_before})"
            ));
        }
        Ok(())
    });
    assert_eq!(busy_cell(d, holder), "idle");
    let metrics = d.ctl(["metrics"]).stdout;
    let sample = format!("pid=\"{holder}\"}} ");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("arbiter_worker_requests_total{") && l.contains(&sample))
        .unwrap_or_else(|| panic!("no request count for {holder}:\n{metrics}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > counted_before, "{line}");
}

#[test]
fn builtin_workers_are_busy_while_a_request_is_held_and_idle_after() {
    let d = Daemon::start(["-w", "2"]);
    d.wait_workers(2);
    held_request_shows_busy_then_idle(&d, 2);
}

#[test]
fn a_worker_that_does_not_report_is_unknown_not_idle() {
    let d = Daemon::start(["-w", "2", "--", "/bin/sh", "-c", "exec sleep 600"]);
    let st = d.wait_until(LONG, "2 ready workers", || {
        let st = status(&d);
        let ready = workers(&st)
            .iter()
            .filter(|w| w["state"] == "ready")
            .count();
        if ready != 2 {
            return Err(format!("{st}"));
        }
        Ok(st)
    });
    for w in workers(&st) {
        assert_eq!(w["busy"], Value::Null, "{w}");
        assert_eq!(w["requests"], Value::Null, "{w}");
        let pid = w["pid"].as_i64().unwrap() as i32;
        // It has an entry; it just never says anything on it.
        assert!(entry_of(pid).is_some(), "no scoreboard entry for {pid}");
        assert_eq!(busy_cell(&d, pid), "-");
    }
    assert_eq!(counts(&st), (0.into(), 0.into(), 2.into()), "{st}");
    let metrics = d.ctl(["metrics"]).stdout;
    assert!(
        gauge(&metrics, "arbiter_workers_unknown") == Some(2)
            && gauge(&metrics, "arbiter_workers_idle") == Some(0)
            && !metrics.contains("\narbiter_worker_requests_total{"),
        "{metrics}"
    );
}

#[test]
fn generations_of_a_reload_keep_entries_of_their_own() {
    let d = Daemon::start(["-w", "2"]);
    let old: BTreeSet<i32> = d.wait_workers(2).iter().map(|w| w.pid).collect();
    let old_entries: BTreeSet<u64> = old.iter().filter_map(|&p| entry_of(p)).collect();
    assert_eq!(old_entries.len(), 2, "entries of {old:?}");
    for _ in 0..4 {
        d.get("/");
    }
    let req = d.spawn_get(&format!("/sleep?ms={HOLD_MS}"));
    let holder = d.wait_accepted(&req);
    d.wait_until(SHORT, "the holder busy", || {
        match board(&status(&d), holder).0 {
            Value::Bool(true) => Ok(()),
            other => Err(format!("busy: {other}")),
        }
    });
    d.signal(Signal::SIGHUP);
    // Generation 2 is up while the holder drains its request (the other old
    // worker, with nothing in flight, is gone): they share slot numbers, never an
    // entry, and each shows its own state and count.
    let st = d.wait_until(
        LONG,
        "generation 2 ready beside the draining holder",
        || {
            let st = status(&d);
            let ws = workers(&st);
            let new = ws
                .iter()
                .filter(|w| w["generation"] == 2 && w["state"] == "ready")
                .count();
            if new != 2 || ws.len() != 3 || board(&st, holder).0 != Value::Bool(true) {
                return Err(format!("{st}"));
            }
            Ok(st)
        },
    );
    let mut entries = BTreeSet::new();
    let mut slots_shared = false;
    let holder_slot = worker(&st, holder).unwrap()["slot"].clone();
    for w in workers(&st) {
        let pid = w["pid"].as_i64().unwrap() as i32;
        let e = entry_of(pid).unwrap_or_else(|| panic!("no entry for {w}"));
        assert!(entries.insert(e), "entry {e} handed out twice: {st}");
        if w["generation"] == 2 {
            assert_eq!(w["busy"], Value::Bool(false), "{w}");
            assert_eq!(w["requests"], 0, "a new worker starts from 0: {w}");
            slots_shared |= w["slot"] == holder_slot;
        }
    }
    assert!(slots_shared, "no new worker shares the holder's slot: {st}");
    let holder_count = requests(&st, holder);

    // The new generation serves; the holder's count does not move.
    for _ in 0..6 {
        d.get("/");
    }
    let st = d.wait_until(SHORT, "6 requests counted by generation 2", || {
        let st = status(&d);
        let new_total: u64 = workers(&st)
            .iter()
            .filter(|w| w["generation"] == 2)
            .map(|w| w["requests"].as_u64().unwrap_or(0))
            .sum();
        if new_total != 6 {
            return Err(format!("{new_total}: {st}"));
        }
        Ok(st)
    });
    assert_eq!(requests(&st, holder), holder_count, "{st}");
    assert_eq!(board(&st, holder).0, Value::Bool(true), "{st}");

    req.join().expect("the held request");
    d.wait_until(LONG, "the old generation gone", || {
        let left: Vec<i32> = d
            .workers()
            .into_iter()
            .filter(|p| old.contains(p))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    // A worker that gets a freed entry starts from nothing, not from the count
    // the entry held.
    d.signal(Signal::SIGTTIN);
    let (pid, st) = d.wait_until(LONG, "a third worker reporting", || {
        let st = status(&d);
        let w = workers(&st)
            .into_iter()
            .find(|w| w["generation"] == 2 && w["slot"] == 2 && !w["busy"].is_null())
            .ok_or_else(|| format!("{st}"))?;
        Ok((w["pid"].as_i64().unwrap() as i32, st))
    });
    let e = entry_of(pid).expect("entry of the third worker");
    assert!(
        old_entries.contains(&e),
        "entry {e} is not a freed one ({old_entries:?})"
    );
    assert_eq!(board(&st, pid), (Value::Bool(false), 0.into()), "{st}");
}

#[test]
fn the_python_wsgi_middleware_reports_busy_while_a_request_is_held() {
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scoreboard/app.py");
    let py = harness::python3();
    let d = Daemon::builder()
        .args(["-w", "1", "--"])
        .arg(&py)
        .arg(&app)
        .start();
    d.wait_workers(1);
    held_request_shows_busy_then_idle(&d, 1);
}
