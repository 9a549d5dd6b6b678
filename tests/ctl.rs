//! `arbiterctl` against a real master: every command, its output, its exit status,
//! and that `reload`/`stop`/`upgrade` return only once the thing is done.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

/// `-w N` with the built-in worker, and wait until all N serve.
fn builtin(n: usize) -> (Daemon, Vec<WorkerInfo>) {
    let d = Daemon::start(["-w", &n.to_string()]);
    let w = d.wait_workers(n);
    (d, w)
}

fn pid_set(pids: impl IntoIterator<Item = i32>) -> BTreeSet<i32> {
    pids.into_iter().collect()
}

/// `arbiterctl --control <d's socket> ARGS`, asserting exit status `code`.
fn ctl_code(d: &Daemon, args: &[&str], code: i32) -> Outcome {
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(d.control_path())
        .args(args)
        .timeout(LONG)
        .run();
    if out.code() != Some(code) {
        d.fail(&format!(
            "arbiterctl {args:?}: expected exit status {code}, got {out:?}"
        ));
    }
    out
}

/// `arbiterctl ... ARGS` that must succeed.
fn ctl_ok(d: &Daemon, args: &[&str]) -> Outcome {
    ctl_code(d, args, 0)
}

/// `arbiterctl` without a daemon (explicit arguments only).
fn ctl_alone(args: &[&str]) -> Outcome {
    Run::new(ARBITERCTL).args(args).run()
}

fn json(out: &Outcome) -> Value {
    serde_json::from_str(out.stdout.trim_end()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON document ({e}): {out:?}");
    })
}

fn status_json(d: &Daemon) -> Value {
    json(&ctl_ok(d, &["--json", "status"]))
}

fn json_worker_pids(st: &Value) -> BTreeSet<i32> {
    st["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers array in {st}"))
        .iter()
        .map(|w| w["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {w}")) as i32)
        .collect()
}

fn assert_one_stderr_line(what: &str, out: &Outcome, starts: &str) {
    let text = out.stderr.trim_end();
    assert!(
        text.lines().count() == 1 && text.starts_with(starts),
        "{what}: expected one stderr line starting with {starts:?}, got {out:?}"
    );
}

/// Wait until the master's live children are `n` workers of which none is in
/// `gone`, and return them.
fn wait_workers_without(d: &Daemon, n: usize, gone: &[i32]) -> Vec<WorkerInfo> {
    d.wait_workers_where(&format!("{n} workers, none of {gone:?}"), n, |w| {
        !gone.contains(&w.pid)
    })
}

// ------------------------------------------------------------------ status

#[test]
fn status_shows_the_master_line_and_a_table_of_the_live_workers() {
    let (d, ws) = builtin(3);
    let out = ctl_ok(&d, &["status"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let head = lines.first().copied().unwrap_or_default();
    assert!(
        head.starts_with(&format!("arbiter (pid {}) v", d.pid()))
            && head.contains(": 3/3 ready, generation 1, up "),
        "master line: {head:?}\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("listening at {}", {
            let a = d.addr();
            format!("http://{a}")
        })),
        "listeners: {}",
        out.stdout
    );
    let at = lines
        .iter()
        .position(|l| l.starts_with("ID"))
        .unwrap_or_else(|| panic!("no table header in\n{}", out.stdout));
    assert_eq!(
        lines[at].split_whitespace().collect::<Vec<_>>(),
        [
            "ID", "SLOT", "PID", "GEN", "STATE", "UP", "BEAT/30s", "↺", "CPU%", "RSS", "BUSY",
            "STATUS"
        ],
        "table header: {:?}",
        lines[at]
    );
    let rows = &lines[at + 1..];
    assert_eq!(rows.len(), 3, "one row per worker:\n{}", out.stdout);
    let mut table_pids = BTreeSet::new();
    for row in rows {
        // BEAT is `0.4s` or `-`; the built-in worker says no STATUS=.
        let f: Vec<&str> = row.split_whitespace().collect();
        assert!(
            f.len() == 12 && (f[6].ends_with('s') || f[6] == "-") && f[11] == "-",
            "row {row:?}"
        );
        table_pids.insert(f[2].parse::<i32>().unwrap());
        assert_eq!(f[3], "1", "GEN of {row:?}");
        assert_eq!(f[4], "ready", "STATE of {row:?}");
        let rss = f[9];
        assert!(rss.ends_with(['K', 'M', 'G']), "RSS of {row:?}");
        // Built-in workers report on the scoreboard; nothing is in flight.
        assert_eq!(f[10], "idle", "BUSY of {row:?}");
    }
    for line in &lines {
        assert_eq!(*line, line.trim_end(), "trailing spaces in {line:?}");
    }
    assert_eq!(table_pids, pid_set(ws.iter().map(|w| w.pid)));
}

#[test]
fn status_json_lists_exactly_the_live_worker_pids() {
    let (d, _) = builtin(3);
    let st = status_json(&d);
    assert_eq!(
        st["master"]["pid"].as_i64(),
        Some(i64::from(d.pid())),
        "{st}"
    );
    assert_eq!(st["master"]["target"].as_u64(), Some(3), "{st}");
    assert_eq!(st["master"]["ready"].as_u64(), Some(3), "{st}");
    assert!(st.get("type").is_none(), "the Status object itself: {st}");
    assert_eq!(json_worker_pids(&st), pid_set(d.workers()), "{st}");
    for w in st["workers"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap() as i32;
        let info = worker_info(pid);
        assert_eq!(w["id"].as_u64(), info.worker_id, "{w}");
        assert_eq!(w["slot"].as_u64(), info.slot, "{w}");
        assert_eq!(w["generation"].as_u64(), info.generation, "{w}");
    }
}

#[test]
fn status_of_a_degraded_master_exits_4() {
    // A worker that never says READY=1: 0 of 1 ready.
    let d = Daemon::start([
        "-w",
        "1",
        "--ready",
        "notify",
        "--boot-timeout",
        "600",
        "--",
        "/bin/sleep",
        "1000",
    ]);
    d.wait_until(SHORT, "the worker to be spawned", || {
        let w = d.workers();
        if w.len() == 1 {
            Ok(())
        } else {
            Err(format!("{w:?}"))
        }
    });
    let out = ctl_code(&d, &["status"], 4);
    assert!(out.stdout.contains(": 0/1 ready"), "{}", out.stdout);
    assert!(out.stdout.contains("booting"), "{}", out.stdout);
    let out = ctl_code(&d, &["--json", "status"], 4);
    assert_eq!(json(&out)["master"]["ready"].as_u64(), Some(0));
}

#[test]
fn status_piped_into_head_exits_fine() {
    let (d, _) = builtin(3);
    let script = format!(
        "set -o pipefail; '{}' --control '{}' status | head -1",
        ARBITERCTL,
        d.control_path().display()
    );
    let out = Run::new("bash").args(["-c", &script]).run();
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 1, "{out:?}");
    assert!(out.stdout.starts_with("arbiter (pid "), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");

    // A reader that is gone before anything is written: EPIPE on the first write.
    for cmd in ["status", "metrics"] {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        drop(r);
        let mut child = Command::new(ARBITERCTL)
            .arg("--control")
            .arg(d.control_path())
            .arg(cmd)
            .env_remove(TAG_VAR)
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn arbiterctl");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait().unwrap();
        assert_eq!(
            st.code(),
            Some(0),
            "{cmd} into a closed pipe: {st:?} {err:?}"
        );
        assert!(err.is_empty(), "{cmd} into a closed pipe: stderr {err:?}");
    }
}

// ------------------------------------------------------------------ scale

#[test]
fn scale_up_down_and_absolute_change_the_worker_count() {
    let (d, _) = builtin(2);
    let out = ctl_ok(&d, &["scale", "+2"]);
    assert_eq!(out.stdout, "workers 2 -> 4\n");
    d.wait_workers(4);
    let out = ctl_ok(&d, &["scale", "-1"]);
    assert_eq!(out.stdout, "workers 4 -> 3\n");
    d.wait_workers(3);
    let out = ctl_ok(&d, &["scale", "2"]);
    assert_eq!(out.stdout, "workers 3 -> 2\n");
    d.wait_workers(2);
    let out = ctl_ok(&d, &["--json", "scale", "=3"]);
    let j = json(&out);
    assert_eq!(
        (j["type"].as_str(), j["from"].as_u64(), j["to"].as_u64()),
        (Some("scaled"), Some(2), Some(3)),
        "{j}"
    );
    d.wait_workers(3);
    let out = ctl_ok(&d, &["scale", "--", "-2"]);
    assert_eq!(out.stdout, "workers 3 -> 1\n");
    d.wait_workers(1);
    // Never below 1: the master clamps.
    let out = ctl_ok(&d, &["scale", "-5"]);
    assert_eq!(out.stdout, "workers 1 -> 1\n");
    d.assert_workers_stay(&d.workers(), ms(300));
    assert_eq!(json_worker_pids(&status_json(&d)), pid_set(d.workers()));
}

// ------------------------------------------------------------------ reload

#[test]
fn reload_returns_only_after_the_old_generation_is_gone() {
    let (d, old) = builtin(3);
    let old_pids: Vec<i32> = old.iter().map(|w| w.pid).collect();
    let out = ctl_ok(&d, &["reload"]);
    // Right now, not eventually.
    for p in &old_pids {
        assert!(
            proc_stat(*p).is_none(),
            "old worker {p} still there after reload returned: {:?}",
            proc_stat(*p)
        );
    }
    let now = d.worker_infos();
    assert_eq!(now.len(), 3, "workers right after reload: {now:?}");
    for w in &now {
        assert!(!old_pids.contains(&w.pid), "{w:?} is an old worker");
        assert_eq!(w.generation, Some(2), "{w:?}");
    }
    assert!(
        out.stdout.starts_with("reloaded: generation 2"),
        "{}",
        out.stdout
    );
    let st = status_json(&d);
    assert_eq!(st["master"]["generation"].as_u64(), Some(2), "{st}");
    assert_eq!(
        json_worker_pids(&st),
        pid_set(now.iter().map(|w| w.pid)),
        "{st}"
    );
    assert_eq!(
        st["master"]["last_reload"]["ok"].as_bool(),
        Some(true),
        "{st}"
    );

    let out = ctl_ok(&d, &["--json", "reload"]);
    let j = json(&out);
    assert_eq!(
        (j["type"].as_str(), j["generation"].as_u64()),
        (Some("reloaded"), Some(3)),
        "{j}"
    );
}

#[test]
fn a_failed_reload_exits_1_and_the_old_workers_keep_serving() {
    let b = Daemon::builder();
    let flag = b.path("fail-boot");
    let d = b
        .args(["-w", "1", "--ready", "notify", "--"])
        .arg(python3())
        .arg(test_file("workers/health_exit3_flag.py"))
        .arg(&flag)
        .start();
    // Not an HTTP worker: wait for the master to say so instead of GET /.
    d.wait_log("the first generation serving", |l| {
        l.contains("Serving: 1 worker(s) ready")
    });
    let old = d.workers();
    assert_eq!(old.len(), 1, "{old:?}");
    std::fs::write(&flag, "").unwrap();
    let out = ctl_code(&d, &["reload"], 1);
    assert_one_stderr_line("failed reload", &out, "arbiterctl: ");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(d.workers(), old, "the old worker keeps serving");
    let st = status_json(&d);
    assert_eq!(
        st["master"]["last_reload"]["ok"].as_bool(),
        Some(false),
        "{st}"
    );
}

// ------------------------------------------------------------------ stop

fn check_stop(args: &[&str]) {
    let (d, ws) = builtin(2);
    let out = ctl_ok(&d, args);
    assert_eq!(out.stdout, format!("stopped (pid {})\n", d.pid()));
    // Right now: the master has exited (a zombie until the harness reaps it) ...
    assert!(
        !is_alive(d.pid()),
        "the master still runs after `{args:?}` returned: {:?}",
        proc_stat(d.pid())
    );
    let st = d.try_status().expect("the master has exited");
    assert_eq!(st.code(), Some(0), "{st:?}");
    // ... with its workers.
    for w in &ws {
        assert!(!is_alive(w.pid), "worker {} outlived the master", w.pid);
    }
    assert!(d.leftovers().is_empty(), "left: {:?}", d.leftovers());
    assert!(!d.control_path().exists(), "the socket file is removed");
    // And nobody answers any more.
    let out = ctl_code(&d, &["ping"], 3);
    assert_one_stderr_line("ping after stop", &out, "arbiterctl: no master answering");
}

#[test]
fn stop_returns_only_after_the_master_exited() {
    check_stop(&["stop"]);
}

#[test]
fn stop_fast_returns_only_after_the_master_exited() {
    check_stop(&["stop", "--fast"]);
}

#[test]
fn stop_json_prints_the_reply() {
    let (d, _) = builtin(1);
    let j = json(&ctl_ok(&d, &["--json", "stop"]));
    assert_eq!(
        (j["type"].as_str(), j["pid"].as_i64()),
        (Some("stopped"), Some(i64::from(d.pid()))),
        "{j}"
    );
    assert!(d.try_status().is_some(), "the master has exited");
}

// ------------------------------------------------------------------ kill

#[test]
fn kill_replaces_that_worker() {
    let (d, ws) = builtin(2);
    let victim = ws[0].clone();
    let out = ctl_ok(&d, &["kill", &victim.pid.to_string()]);
    assert!(
        out.stdout
            .contains(&format!("sent TERM to worker {}", victim.pid)),
        "{}",
        out.stdout
    );
    let now = wait_workers_without(&d, 2, &[victim.pid]);
    assert!(!is_alive(victim.pid));
    assert!(
        now.iter()
            .any(|w| w.slot == victim.slot && w.pid != victim.pid),
        "slot {:?} refilled: {now:?}",
        victim.slot
    );
    assert!(
        now.iter().any(|w| w.pid == ws[1].pid),
        "the other worker stays"
    );

    // By another signal name form, with --json.
    let victim = now[0].pid;
    let j = json(&ctl_ok(
        &d,
        &["--json", "kill", &victim.to_string(), "--signal", "sigkill"],
    ));
    assert_eq!(
        (j["type"].as_str(), j["pid"].as_i64(), j["signal"].as_str()),
        (Some("killed"), Some(i64::from(victim)), Some("KILL")),
        "{j}"
    );
    wait_workers_without(&d, 2, &[victim]);

    // Not a worker of this master: refused, exit 1.
    let out = ctl_code(&d, &["kill", "1"], 1);
    assert_one_stderr_line("kill 1", &out, "arbiterctl: ");
    let j = json(&ctl_code(&d, &["--json", "kill", &d.pid().to_string()], 1));
    assert_eq!(j["error"]["kind"].as_str(), Some("refused"), "{j}");
}

// ------------------------------------------------------------------ the rest

#[test]
fn ping_version_reopen_and_metrics() {
    let (d, ws) = builtin(2);
    let out = ctl_ok(&d, &["ping"]);
    assert_eq!(out.stdout, format!("pong from {}\n", d.pid()));
    let j = json(&ctl_ok(&d, &["--json", "ping"]));
    assert_eq!(j["type"].as_str(), Some("pong"), "{j}");
    assert_eq!(j["pid"].as_i64(), Some(i64::from(d.pid())), "{j}");

    let out = ctl_ok(&d, &["version"]);
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        out.stdout,
        format!("arbiterctl {v} (protocol 1)\narbiterd {v} (protocol 1)\n")
    );
    let j = json(&ctl_ok(&d, &["--json", "version"]));
    assert_eq!(j["version"].as_str(), Some(v), "{j}");
    assert_eq!(j["protocol"].as_u64(), Some(1), "{j}");
    assert_eq!(j["client"]["version"].as_str(), Some(v), "{j}");

    let out = ctl_ok(&d, &["reopen"]);
    assert!(!out.stdout.is_empty());
    assert_eq!(json(&ctl_ok(&d, &["--json", "reopen"]))["type"], "reopened");

    let out = ctl_ok(&d, &["metrics"]);
    let text = &out.stdout;
    for name in [
        "arbiter_workers_target",
        "arbiter_workers_ready",
        "arbiter_workers",
        "arbiter_worker_up_seconds",
        "arbiter_worker_rss_bytes",
        "arbiter_worker_heartbeat_age_seconds",
        "arbiter_worker_restarts",
        "arbiter_reloads_total",
        "arbiter_upgrades_total",
        "arbiter_worker_failures_total",
        "arbiter_workers_spawned_total",
        "arbiter_master_uptime_seconds",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")) && text.contains(&format!("# TYPE {name} ")),
            "no HELP/TYPE for {name}:\n{text}"
        );
    }
    assert!(
        text.contains("\narbiter_workers_target{arbiter=\"arbiter\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("\narbiter_workers_ready{arbiter=\"arbiter\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("\narbiter_workers{arbiter=\"arbiter\",state=\"ready\"} 2\n"),
        "{text}"
    );
    for w in &ws {
        let labels = format!(
            "{{arbiter=\"arbiter\",id=\"{}\",slot=\"{}\",pid=\"{}\"}}",
            w.worker_id.unwrap(),
            w.slot.unwrap(),
            w.pid
        );
        assert!(
            text.contains(&format!("\narbiter_worker_up_seconds{labels} ")),
            "{labels} in\n{text}"
        );
    }
    // Every sample line is `name{labels} value` with a number.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(value.parse::<f64>().is_ok(), "{line:?}");
    }
    let j = json(&ctl_ok(&d, &["--json", "metrics"]));
    assert!(j.as_array().is_some_and(|a| !a.is_empty()), "{j}");
}

#[test]
fn upgrade_hands_over_to_a_new_master() {
    let (d, old) = builtin(2);
    let old_pids: Vec<i32> = old.iter().map(|w| w.pid).collect();

    // A binary that does not exist: refused, the old master keeps serving.
    let out = ctl_code(&d, &["upgrade", "--binary", "/nonexistent/arbiterd"], 1);
    assert_one_stderr_line("upgrade to a missing binary", &out, "arbiterctl: ");
    assert_eq!(pid_set(d.workers()), pid_set(old_pids.iter().copied()));
    assert_eq!(
        ctl_ok(&d, &["ping"]).stdout,
        format!("pong from {}\n", d.pid())
    );

    let out = ctl_ok(&d, &["upgrade"]);
    let new_pid: i32 = out
        .stdout
        .trim_end()
        .strip_prefix(&format!("upgraded: master {} -> ", d.pid()))
        .and_then(|rest| rest.strip_suffix(", 2 workers"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| d.fail(&format!("upgrade output: {out:?}")));
    d.register_pid(new_pid);
    // Right now the socket answers from the new master.
    assert_eq!(
        ctl_ok(&d, &["ping"]).stdout,
        format!("pong from {new_pid}\n")
    );
    d.wait_exit(SHORT);
    let st = status_json(&d);
    assert_eq!(
        st["master"]["pid"].as_i64(),
        Some(i64::from(new_pid)),
        "{st}"
    );
    let pids = json_worker_pids(&st);
    assert_eq!(pids.len(), 2, "{st}");
    assert!(pids.iter().all(|p| !old_pids.contains(p)), "{st}");
    assert_eq!(pids, pid_set(live_children(new_pid)), "{st}");
    // The new master is not our child: stop still waits until it is gone.
    ctl_ok(&d, &["stop"]);
    assert!(!is_alive(new_pid), "{:?}", proc_stat(new_pid));
}

// ------------------------------------------------------------------ finding the master

#[test]
fn pid_and_name_find_the_socket() {
    let b = Daemon::builder();
    let pidfile = b.path("m.pid");
    let rt = b.path("rt");
    // The default path under XDG_RUNTIME_DIR for --name web, given explicitly (the
    // harness adds its own --control otherwise).
    let sock = rt.join("arbiter").join("web.sock");
    let d = b
        .args(["-w", "1", "--name", "web", "-p"])
        .arg(&pidfile)
        .arg("--control")
        .arg(&sock)
        .start();
    d.wait_workers(1);
    let pong = format!("pong from {}\n", d.pid());

    let out = Run::new(ARBITERCTL)
        .env("XDG_RUNTIME_DIR", &rt)
        .args(["--name", "web", "ping"])
        .run();
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), pong.as_str()),
        "{out:?}"
    );

    let out = Run::new(ARBITERCTL)
        .arg("--pid")
        .arg(&pidfile)
        .arg("ping")
        .run();
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), pong.as_str()),
        "{out:?}"
    );
}

#[test]
fn pid_follows_a_relative_control_path_and_the_name() {
    // The harness runs arbiterd in its temp dir: a relative --control is there.
    let b = Daemon::builder();
    let pidfile = b.path("m.pid");
    let d = b
        .args(["-w", "1", "--control", "rel.sock", "-p"])
        .arg(&pidfile)
        .start();
    d.wait_workers(1);
    assert!(d.path("rel.sock").exists());
    let out = Run::new(ARBITERCTL)
        .arg("--pid")
        .arg(&pidfile)
        .args(["--json", "ping"])
        .current_dir("/")
        .run();
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["pid"].as_i64(), Some(i64::from(d.pid())));

    // A pidfile whose master is gone: no master answering.
    let dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let stale = d.path("stale.pid");
    std::fs::write(&stale, format!("{dead_pid}\n")).unwrap();
    let out = Run::new(ARBITERCTL)
        .arg("--pid")
        .arg(&stale)
        .arg("status")
        .run();
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert_one_stderr_line("stale pidfile", &out, "arbiterctl: no master answering");
}

#[test]
#[cfg_attr(
    not(has_socat),
    ignore = "socat is not installed (apt-get install socat)"
)]
fn the_control_socket_speaks_json_lines_to_socat() {
    if !Path::new("/usr/bin/socat").exists() && Command::new("socat").arg("-V").output().is_err() {
        return tool_missing("socat is not installed (apt-get install socat)");
    }
    let (d, _) = builtin(1);
    let script = format!(
        "echo '{{\"v\":1,\"cmd\":\"ping\"}}' | socat - UNIX-CONNECT:'{}'",
        d.control_path().display()
    );
    let out = Run::new("sh").args(["-c", &script]).run();
    assert_eq!(out.code(), Some(0), "{out:?}");
    let j = json(&out);
    assert_eq!(j["v"].as_u64(), Some(1), "{j}");
    assert_eq!(j["ok"].as_bool(), Some(true), "{j}");
    assert_eq!(j["reply"]["type"].as_str(), Some("pong"), "{j}");
    assert_eq!(j["reply"]["pid"].as_i64(), Some(i64::from(d.pid())), "{j}");
}

// ------------------------------------------------------------------ no master, bad usage

#[test]
fn no_master_exits_3() {
    let dir = short_tempdir();
    let missing = dir.path().join("none.sock");
    let m = missing.to_str().unwrap();
    for cmd in ["status", "ping", "reload", "stop", "metrics"] {
        let out = ctl_alone(&["--control", m, cmd]);
        assert_eq!(out.code(), Some(3), "{cmd}: {out:?}");
        assert!(out.stdout.is_empty(), "{cmd}: {out:?}");
        assert_one_stderr_line(cmd, &out, "arbiterctl: no master answering");
    }
    let out = ctl_alone(&["--control", m, "--json", "status"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert_eq!(json(&out)["error"]["kind"].as_str(), Some("no_master"));

    // A stale socket file: nobody accepts.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = ctl_alone(&["--control", stale.to_str().unwrap(), "ping"]);
    assert_eq!(out.code(), Some(3), "{out:?}");

    // Something listens but never answers: a timeout is "no master answering" too.
    let silent = dir.path().join("silent.sock");
    let _held = UnixListener::bind(&silent).unwrap();
    let out = ctl_alone(&[
        "--control",
        silent.to_str().unwrap(),
        "--timeout",
        "0.5",
        "--json",
        "status",
    ]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.elapsed < secs(5), "{out:?}");
    assert_eq!(json(&out)["error"]["kind"].as_str(), Some("timeout"));

    // A missing pidfile.
    let out = ctl_alone(&["--pid", dir.path().join("x.pid").to_str().unwrap(), "ping"]);
    assert_eq!(out.code(), Some(3), "{out:?}");

    // version still tells its own.
    let out = ctl_alone(&["--control", m, "version"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert_eq!(
        out.stdout,
        format!("arbiterctl {} (protocol 1)\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &[][..],
        &["explode"],
        &["scale"],
        &["scale", "x"],
        &["scale", "+"],
        &["kill"],
        &["kill", "abc"],
        &["kill", "12", "--signal", "NOPE"],
        &["--timeout", "soon", "ping"],
        &["--name", "a", "--control", "/tmp/x.sock", "ping"],
        &["--pid", "/tmp/x.pid", "status", "--control", "/tmp/x.sock"],
        &["stop", "--fastest"],
    ] {
        let out = ctl_alone(args);
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: {out:?}");
    }
    for args in [&["--help"][..], &["--version"], &["scale", "--help"]] {
        let out = ctl_alone(args);
        assert_eq!(out.code(), Some(0), "{args:?}: {out:?}");
    }
}

#[test]
fn upgrade_of_nothing_exits_3() {
    let dir = short_tempdir();
    let sock = dir.path().join("none.sock");
    let out = ctl_alone(&["--control", sock.to_str().unwrap(), "upgrade"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
}

/// `--max-workers` (default 1024) caps scale, TTIN and the configured count.
#[test]
fn scale_past_max_workers_is_refused_with_the_limit() {
    let (d, ws) = builtin(2);
    let out = ctl_code(&d, &["scale", "100000"], 1);
    assert!(
        out.stderr.contains("more than --max-workers (1024)"),
        "{out:?}"
    );
    assert_eq!(status_json(&d)["master"]["target"], 2);
    d.assert_workers_stay(&ws.iter().map(|w| w.pid).collect::<Vec<_>>(), ms(300));

    let bad = Run::new(ARBITERD)
        .args(["--check-config", "-w", "2000"])
        .run();
    assert_eq!(bad.code(), Some(1), "{bad:?}");
    assert!(
        bad.stderr.contains("more than --max-workers (1024)"),
        "{bad:?}"
    );

    let capped = Daemon::start(["-w", "2", "--max-workers", "2"]);
    capped.wait_workers(2);
    capped.signal_delivered(nix::sys::signal::Signal::SIGTTIN);
    capped.wait_log("TTIN ignored at the limit", |l| {
        l.contains("SIGTTIN ignored: already at --max-workers (2)")
    });
    assert_eq!(status_json(&capped)["master"]["target"], 2);
}

/// During a readiness-gated reload the old generation serves: `status` counts
/// it as ready (no exit 4), and the metrics agree with status.
#[test]
fn a_healthy_reload_is_not_reported_degraded() {
    let b = Daemon::builder();
    let gate = b.path("ready.flag");
    let d = b
        .args(["-w", "3", "--ready", "notify", "--"])
        .arg(python3())
        .arg(test_file("workers/ops_notify_gate.py"))
        .arg(&gate)
        .start();
    std::fs::write(&gate, "").unwrap();
    d.wait_until(LONG, "3 ready workers", || {
        let st = crate::health::status_at(&d.control_path())?;
        if st["master"]["ready"] == 3 {
            Ok(())
        } else {
            Err(st["master"].to_string())
        }
    });
    // The new generation will wait for the gate: the old one keeps serving.
    std::fs::remove_file(&gate).unwrap();
    d.signal_delivered(nix::sys::signal::Signal::SIGHUP);
    let st = d.wait_until(
        LONG,
        "the reload in flight with 3 new workers booting",
        || {
            let st = crate::health::status_at(&d.control_path())?;
            let booting = st["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["state"] == "booting").count());
            if st["master"]["reload"].is_object() && booting == 3 {
                Ok(st)
            } else {
                Err(st.to_string())
            }
        },
    );
    assert_eq!(
        st["master"]["ready"], 3,
        "the old generation serves: {}",
        st["master"]
    );
    ctl_code(&d, &["status"], 0);
    let metrics = ctl_ok(&d, &["metrics"]).stdout;
    let value = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        value("arbiter_workers_ready{arbiter=\"arbiter\"} "),
        "3",
        "{metrics}"
    );
    assert_eq!(
        value("arbiter_workers{arbiter=\"arbiter\",state=\"ready\"} "),
        "3",
        "{metrics}"
    );
    assert_eq!(
        value("arbiter_workers{arbiter=\"arbiter\",state=\"booting\"} "),
        "3",
        "{metrics}"
    );
    std::fs::write(&gate, "").unwrap();
}

#[test]
fn name_finds_a_master_outside_our_own_runtime_dir_and_lists_the_paths_tried() {
    // A root SSH session has XDG_RUNTIME_DIR=/run/user/0; the master systemd started
    // has none and sits at /run/arbiter. `--name` used to look only under the first.
    let b = Daemon::builder();
    let name = b.dir().file_name().unwrap().to_string_lossy().into_owned();
    let uid = nix::unistd::getuid().as_raw();
    let control =
        arbiter_proto::paths::default_control_path_for(std::ffi::OsStr::new(&name), None, uid);
    let d = b.args(["--name", &name, "--control"]).arg(&control).start();
    d.wait_workers(1);
    let our_runtime_dir = d.path("runtime");
    std::fs::create_dir(&our_runtime_dir).unwrap();
    let ping = || {
        Run::new(ARBITERCTL)
            .env("XDG_RUNTIME_DIR", &our_runtime_dir)
            .args(["--name", &name, "ping"])
            .run()
    };
    let out = ping();
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("pong from {}\n", d.pid()));

    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(SHORT);
    let out = ping();
    assert_eq!(out.code(), Some(3), "{out:?}");
    let under_ours = our_runtime_dir.join("arbiter").join(format!("{name}.sock"));
    for p in [&under_ours, &control] {
        assert!(
            out.stderr.contains(&*p.to_string_lossy()),
            "the error does not list {}: {:?}",
            p.display(),
            out.stderr
        );
    }
}
