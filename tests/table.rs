//! What `arbiterctl status` and `arbiterctl metrics` show of each worker: the
//! worker's own `STATUS=` words, its heartbeat against the timeout, its slot's
//! restarts and its CPU use in an 80-column table; metrics that carry the
//! instance name and keep a crash-looping slot's series.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

/// `--ready notify` with tests/workers/table_worker.py doing `mode`.
fn table_worker(b: DaemonBuilder, opts: &[&str], mode: &[&str]) -> Daemon {
    b.args(opts)
        .args(["--ready", "notify", "--"])
        .arg(python3())
        .arg(test_file("workers/table_worker.py"))
        .args(mode)
        .start()
}

/// `arbiterctl status` (0 or 4: degraded is still a table).
fn status_text(d: &Daemon) -> String {
    let out = d.ctl(["status"]);
    if !matches!(out.code(), Some(0 | 4)) {
        d.fail(&format!("arbiterctl status: {out:?}"));
    }
    out.stdout
}

fn status_json(d: &Daemon) -> Value {
    let out = d.ctl(["--json", "status"]);
    if !matches!(out.code(), Some(0 | 4)) {
        d.fail(&format!("arbiterctl --json status: {out:?}"));
    }
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| d.fail(&format!("{e}: {out:?}")))
}

fn metrics_text(d: &Daemon) -> String {
    let out = d.ctl(["metrics"]);
    if out.code() != Some(0) {
        d.fail(&format!("arbiterctl metrics: {out:?}"));
    }
    out.stdout
}

/// The table's lines: its header, then one row per worker.
fn table_lines(out: &str) -> Vec<&str> {
    out.lines().skip_while(|l| !l.starts_with("ID ")).collect()
}

/// The table row of worker `pid`, split on whitespace (STATUS, last, may be
/// several fields).
fn row_of(out: &str, pid: i32) -> Option<Vec<String>> {
    table_lines(out).into_iter().skip(1).find_map(|l| {
        let f: Vec<String> = l.split_whitespace().map(String::from).collect();
        (f.get(2)? == &pid.to_string()).then_some(f)
    })
}

/// Columns, as the header names them: ID SLOT PID GEN STATE UP BEAT/TIMEOUT ↺
/// CPU% RSS BUSY STATUS.
const BEAT: usize = 6;
const RESTARTS: usize = 7;
const CPU: usize = 8;
const STATUS: usize = 11;

/// The live workers' pids, from the master's own status.
fn json_pids(st: &Value) -> Vec<i32> {
    st["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until the master says `n` workers are ready; their pids by slot.
fn wait_ready(d: &Daemon, n: usize) -> Vec<i32> {
    d.wait_until(LONG, &format!("{n} ready workers"), || {
        let st = status_json(d);
        let mut ready: Vec<(u64, i32)> = st["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| Some((w["slot"].as_u64()?, w["pid"].as_i64()? as i32)))
            .collect();
        ready.sort_unstable();
        if ready.len() == n {
            Ok(ready.into_iter().map(|(_, p)| p).collect())
        } else {
            Err(st["workers"].to_string())
        }
    })
}

// ------------------------------------------------------------------ metrics

/// Samples as a real Prometheus parser reads them: `[family, sample name, labels,
/// value]`. `None` (with the reason printed) without `prometheus_client`, a
/// failure under `ARBITER_REQUIRE_EXAMPLES=1`.
pub(crate) fn parse_with_prometheus_client(text: &str) -> Option<Vec<Value>> {
    let py = crate::examples::python_with("prometheus_client", "prometheus_client")?;
    let script = "\
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append([f.name, s.name, s.labels, s.value])
print(json.dumps(out))
";
    let mut child = Command::new(py)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone(),
    )
}

#[test]
fn two_instances_metrics_in_one_textfile_directory_do_not_collide() {
    let web = Daemon::start(["-n", "web", "-w", "2"]);
    let api = Daemon::start(["-n", "api", "-w", "1"]);
    let web_pids: Vec<i32> = web.wait_workers(2).iter().map(|w| w.pid).collect();
    let api_pids: Vec<i32> = api.wait_workers(1).iter().map(|w| w.pid).collect();
    let (w, a) = (metrics_text(&web), metrics_text(&api));
    // What a textfile collector sees: both files, one after the other.
    let both = format!("{w}{a}");

    let mut series = BTreeSet::new();
    for (name, text) in [("web", &w), ("api", &a)] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, _) = line.rsplit_once(' ').unwrap();
            assert!(
                key.contains(&format!("{{arbiter=\"{name}\"")),
                "{key} has no arbiter=\"{name}\" label:\n{both}"
            );
            assert!(series.insert(key.to_string()), "{key} twice in:\n{both}");
        }
    }
    for (name, pids) in [("web", &web_pids), ("api", &api_pids)] {
        for pid in pids.iter() {
            assert!(
                both.lines()
                    .any(|l| l.starts_with("arbiter_worker_cpu_seconds_total{")
                        && l.contains(&format!("arbiter=\"{name}\""))
                        && l.contains(&format!("pid=\"{pid}\"}} "))),
                "no CPU seconds for {name}'s worker {pid}:\n{both}"
            );
        }
    }

    let Some(samples) = parse_with_prometheus_client(&both) else {
        return;
    };
    let mut seen = BTreeSet::new();
    for s in &samples {
        let labels = &s[2];
        let instance = labels["arbiter"].as_str().unwrap_or_else(|| {
            panic!("a sample without the arbiter label: {s}");
        });
        assert!(instance == "web" || instance == "api", "{s}");
        assert!(
            seen.insert((s[1].to_string(), labels.to_string())),
            "{s} twice"
        );
    }
    assert_eq!(seen.len(), series.len(), "the parser read every sample");
    let families: BTreeSet<&str> = samples.iter().filter_map(|s| s[0].as_str()).collect();
    for f in [
        "arbiter_worker_cpu_seconds",
        "arbiter_worker_restarts",
        "arbiter_workers_ready",
    ] {
        assert!(families.contains(f), "{f} not parsed: {families:?}");
    }
}

#[test]
fn a_slot_waiting_out_its_backoff_keeps_its_restarts_series() {
    // Dies at once: most of the time the slot has no worker, only a backoff.
    let d = Daemon::start(["--", "/bin/sh", "-c", "exit 1"]);
    let (failures, metrics) =
        d.wait_until(LONG, "metrics taken while slot 0 waits to restart", || {
            let before = status_json(&d);
            let metrics = metrics_text(&d);
            let after = status_json(&d);
            // The same spawn count on both sides and no worker: no worker at all
            // while the metrics were taken.
            let failures = |st: &Value| {
                st["master"]["backoff"]
                    .as_array()
                    .and_then(|b| b.iter().find(|s| s["slot"] == 0)?["failures"].as_u64())
            };
            let spawned = |st: &Value| st["master"]["workers_spawned"].as_u64();
            match (failures(&before), failures(&after)) {
                (Some(f), Some(g))
                    if f == g
                        && f >= 2
                        && spawned(&before) == spawned(&after)
                        && json_pids(&before).is_empty()
                        && json_pids(&after).is_empty() =>
                {
                    Ok((f, metrics))
                }
                _ => Err(format!("{}\n{}", before["master"], after["master"])),
            }
        });
    let sample = metrics
        .lines()
        .find(|l| l.starts_with("arbiter_worker_restarts{") && l.contains("slot=\"0\"}"))
        .unwrap_or_else(|| d.fail(&format!("no restarts series for slot 0:\n{metrics}")));
    let value: f64 = sample.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert_eq!(value, failures as f64, "{sample}");
}

// ------------------------------------------------------------------ the table

/// A cell cut to fit ends with `…`; what is left of it must begin the text.
fn shows(cell: &str, text: &str) -> bool {
    cell == text
        || cell.ends_with('…')
            && cell.chars().count() >= 8
            && text.starts_with(cell.trim_end_matches('…'))
}

#[test]
fn a_workers_status_text_shows_in_the_table() {
    let d = table_worker(
        Daemon::builder(),
        &["-w", "1"],
        &["status", "served 0 requests"],
    );
    let pid = wait_ready(&d, 1)[0];
    let out = d.wait_until(LONG, "the STATUS= text in the table", || {
        let out = status_text(&d);
        let row = row_of(&out, pid).ok_or_else(|| out.clone())?;
        if row.len() > STATUS && shows(&row[STATUS..].join(" "), "served 0 requests") {
            Ok(out)
        } else {
            Err(out)
        }
    });
    let header = table_lines(&out)[0];
    assert!(header.trim_end().ends_with("STATUS"), "{out}");
}

#[test]
fn the_table_fits_80_columns_and_cuts_a_long_status() {
    let long = "handling 1234 requests a second over 16 connections, 3 queued, all fine";
    let d = table_worker(Daemon::builder(), &["-w", "2"], &["status", long]);
    let pids = wait_ready(&d, 2);
    let out = d.wait_until(LONG, "both workers' STATUS= in the table", || {
        let out = status_text(&d);
        let have = pids
            .iter()
            .all(|&p| row_of(&out, p).is_some_and(|r| r.len() > STATUS && r[STATUS] == "handling"));
        if have { Ok(out) } else { Err(out) }
    });
    for line in out.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}\n{out}",
            line.chars().count()
        );
    }
    for &p in &pids {
        let row = table_lines(&out)
            .into_iter()
            .find(|l| l.split_whitespace().nth(2) == Some(&p.to_string()))
            .unwrap();
        let cell = row.rsplit("  ").next().unwrap();
        assert!(
            cell.ends_with('…') && shows(cell, long),
            "the status cut to fit: {cell:?}\n{out}"
        );
    }
}

#[test]
fn a_heartbeat_past_half_the_timeout_is_marked() {
    let b = Daemon::builder();
    let flag = b.path("silence.flag");
    let d = table_worker(
        b,
        &["-w", "1", "-t", "6"],
        &["beat-until", flag.to_str().unwrap()],
    );
    let pid = wait_ready(&d, 1)[0];
    let beat_cell = |d: &Daemon| {
        let out = status_text(d);
        row_of(&out, pid)
            .and_then(|r| r.get(BEAT).cloned())
            .ok_or(out)
    };
    let out = status_text(&d);
    assert!(
        table_lines(&out)
            .first()
            .is_some_and(|h| h.contains(" BEAT/6s ")),
        "the header gives the timeout: {out}"
    );
    let fresh = d.wait_until(LONG, "a fresh beat shown against the timeout", || {
        let c = beat_cell(&d)?;
        if c.ends_with('s') { Ok(c) } else { Err(c) }
    });
    assert!(!fresh.contains('!'), "{fresh}");
    std::fs::write(&flag, "").unwrap();
    let stale = d.wait_until(
        LONG,
        "the silent worker's beat marked past 3 s of 6",
        || {
            let c = beat_cell(&d)?;
            if c.ends_with("s!") { Ok(c) } else { Err(c) }
        },
    );
    let age: f64 = stale.split('s').next().unwrap().parse().unwrap();
    // Past 3 s, shown to a tenth, rounded.
    assert!(age >= 3.0, "marked at {stale}");
    // The mark is the beat's, not the state's: the worker is still plain ready.
    let out = status_text(&d);
    if let Some(row) = row_of(&out, pid) {
        assert_eq!(row[4], "ready", "{out}");
        assert_eq!(row[RESTARTS], "0", "{out}");
    }
}

#[test]
fn a_worker_burning_cpu_shows_its_cpu_percent() {
    let d = table_worker(Daemon::builder(), &["-w", "2"], &["burn"]);
    let pids = wait_ready(&d, 2);
    let (busy, idle) = (pids[0], pids[1]);
    let cpu = |out: &str, pid: i32| -> Option<f64> { row_of(out, pid)?.get(CPU)?.parse().ok() };
    let (b, i) = d.wait_until(LONG, "slot 0 busy and slot 1 idle in CPU%", || {
        let out = status_text(&d);
        match (cpu(&out, busy), cpu(&out, idle)) {
            (Some(b), Some(i)) if b >= 20.0 && i <= 2.0 => Ok((b, i)),
            _ => Err(out),
        }
    });
    // A spinning single-threaded process is one core at most.
    assert!(b <= 110.0 && i >= 0.0, "busy {b}, idle {i}");
    let st = status_json(&d);
    let w = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == busy)
        .unwrap()
        .clone();
    assert!(w["cpu_percent"].as_f64().is_some(), "{w}");
    assert!(w["cpu_secs"].as_f64().is_some_and(|s| s > 0.1), "{w}");
}
