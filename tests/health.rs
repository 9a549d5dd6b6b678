//! Health: heartbeats and timeouts, readiness, readiness-gated reloads, the failure
//! policy (backoff, exit 3), containment (the master's death, a worker's children,
//! signals from workers), and an idle master that really sleeps.
//!
//! Local helpers (the harness has no control-socket client): [`control`] sends one
//! JSON request on the control socket and reads one response line; [`status`] is the
//! status snapshot; [`wait_exec_children`] waits for COMMAND workers that do not
//! speak HTTP (the harness's `wait_workers` GETs `/`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;

// ------------------------------------------------------------------ helpers

/// One request on the control socket at `path`, one response line back (parsed).
pub(crate) fn control(path: &Path, request: &str, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect {path:?}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("write {request} to {path:?}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read the answer to {request} from {path:?}: {e}"))?;
    serde_json::from_str(&line)
        .map_err(|e| format!("answer to {request} is not JSON ({e}): {line:?}"))
}

/// The status snapshot (`reply` of `{"v":1,"cmd":"status"}`).
pub(crate) fn status_at(path: &Path) -> Result<Value, String> {
    let r = control(path, r#"{"v":1,"cmd":"status"}"#, SHORT)?;
    if r["ok"] == Value::Bool(true) {
        Ok(r["reply"].clone())
    } else {
        Err(format!("status refused: {r}"))
    }
}

fn status(d: &Daemon) -> Value {
    status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e))
}

/// The status entry of worker `pid`, if the master lists it.
fn worker_entry(st: &Value, pid: i32) -> Option<Value> {
    st["workers"]
        .as_array()?
        .iter()
        .find(|w| w["pid"].as_i64() == Some(i64::from(pid)))
        .cloned()
}

/// `n` live children, each exec'd (it has `ARBITER_WORKER_ID`); no HTTP check.
fn wait_exec_children(d: &Daemon, n: usize) -> Vec<WorkerInfo> {
    d.wait_until(LONG, &format!("{n} exec'd workers"), || {
        if let Some(st) = d.try_status() {
            d.fail(&format!("the master exited ({st})"));
        }
        let infos = d.worker_infos();
        if infos.len() == n && infos.iter().all(|w| w.worker_id.is_some()) {
            Ok(infos)
        } else {
            Err(format!("children: {infos:?}"))
        }
    })
}

/// The master counts `n` ready workers of its current generation, and lists no other.
fn wait_ready(d: &Daemon, n: u64) -> Value {
    d.wait_until(LONG, &format!("{n} ready workers in the status"), || {
        let st = status(d);
        let ws = st["workers"].as_array().cloned().unwrap_or_default();
        if st["master"]["ready"] == n
            && ws.len() as u64 == n
            && ws.iter().all(|w| w["state"] == "ready")
        {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    })
}

fn pids(ws: &[WorkerInfo]) -> Vec<i32> {
    let mut v: Vec<i32> = ws.iter().map(|w| w.pid).collect();
    v.sort_unstable();
    v
}

fn sorted(mut v: Vec<i32>) -> Vec<i32> {
    v.sort_unstable();
    v
}

pub(crate) fn py_worker(script: &str) -> Vec<String> {
    vec![
        "--".into(),
        python3().to_string_lossy().into_owned(),
        test_file(&format!("workers/{script}"))
            .to_string_lossy()
            .into_owned(),
    ]
}

fn assert_one_thread(d: &Daemon) {
    match d.thread_count() {
        Some(1) | None => {}
        Some(n) => d.fail(&format!("the master has {n} threads, expected exactly 1")),
    }
}

/// Background clients sending `GET /` on fresh connections as fast as they can,
/// until stopped. Every answer (pid, generation) and every failure is recorded.
struct Hammer {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<HammerResult>>,
}

#[derive(Default, Debug)]
struct HammerResult {
    ok: Vec<(i64, i64)>,
    failures: Vec<String>,
}

impl Hammer {
    fn start(target: &Listener, threads: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                let answered = answered.clone();
                let target = target.clone();
                std::thread::spawn(move || {
                    let mut r = HammerResult::default();
                    while !stop.load(Ordering::Relaxed) {
                        match http_get(&target, "/", secs(5)) {
                            Ok(resp) if resp.status == 200 => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                let j: Value = serde_json::from_str(&resp.body).unwrap_or_default();
                                r.ok.push((
                                    j["pid"].as_i64().unwrap_or(-1),
                                    j["generation"].as_i64().unwrap_or(-1),
                                ));
                            }
                            Ok(resp) => r
                                .failures
                                .push(format!("status {} body {:?}", resp.status, resp.body)),
                            Err(e) => r.failures.push(e.to_string()),
                        }
                    }
                    r
                })
            })
            .collect();
        Hammer {
            stop,
            answered,
            threads,
        }
    }

    /// Successful answers so far.
    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> HammerResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = HammerResult::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().expect("hammer thread panicked");
            all.ok.extend(r.ok);
            all.failures.extend(r.failures);
        }
        all
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------ heartbeat timeout

#[test]
fn a_sigstopped_worker_is_killed_and_replaced_within_timeout_plus_1s() {
    let d = Daemon::start(["-t", "2", "--graceful-timeout", "2"]);
    let w = d.wait_workers(1)[0].pid;
    d.wait_until(SHORT, "the built-in worker's first heartbeat", || {
        let st = status(&d);
        match worker_entry(&st, w).and_then(|e| e["last_beat_secs"].as_f64()) {
            Some(_) => Ok(()),
            None => Err(st["workers"].to_string()),
        }
    });
    d.signal_worker(w, Signal::SIGSTOP);
    let stopped = Instant::now();
    // Killed (ABRT, then KILL 0.5 s later: a stopped process only dies of the KILL)
    // and a replacement forked, all within timeout + 1 s of the last beat.
    let replacement = d.wait_until(secs(3), "the stopped worker killed and replaced", || {
        if is_alive(w) {
            return Err(format!("{w} still alive: {:?}", proc_stat(w)));
        }
        d.workers()
            .into_iter()
            .find(|&p| p != w)
            .ok_or_else(|| "no replacement yet".to_string())
    });
    let took = stopped.elapsed();
    assert!(
        took >= ms(1400),
        "killed {took:?} after SIGSTOP: sooner than the 2 s timeout allows (beats are 0.5 s apart)"
    );
    let line = d.wait_log("WORKER TIMEOUT for the stopped worker", |l| {
        l.contains(&format!("WORKER TIMEOUT (pid:{w})"))
    });
    assert!(line.contains("CRITICAL"), "not logged as critical: {line}");
    let now = d.wait_workers(1);
    assert_eq!(pids(&now), vec![replacement], "the replacement serves");
}

#[test]
fn a_stall_of_the_whole_machine_does_not_time_out_the_workers() {
    // SIGSTOP of the master and of every worker stands in for a paused VM or a
    // machine thrashing in swap: nobody runs, nobody beats. gunicorn's master
    // wakes from that and kills every worker at once for silence.
    let d = Daemon::start(["-w", "2", "-t", "2"]);
    let before = pids(&d.wait_workers(2));
    d.wait_until(SHORT, "both workers' first heartbeat", || {
        let st = status(&d);
        let beating = before
            .iter()
            .filter(|&&p| worker_entry(&st, p).is_some_and(|e| e["last_beat_secs"].is_number()))
            .count();
        if beating == 2 {
            Ok(())
        } else {
            Err(st["workers"].to_string())
        }
    });
    d.signal(Signal::SIGSTOP);
    for &p in &before {
        d.signal_worker(p, Signal::SIGSTOP);
    }
    // The fault itself, not a wait for a condition: the stall must outlast the
    // 2 s timeout by enough that the master, which may have meant to sleep up to
    // 2 s of it anyway, still wakes well past its deadline.
    std::thread::sleep(secs(4));
    // The master first: it must not judge before the workers have had a chance.
    d.signal(Signal::SIGCONT);
    for &p in &before {
        d.signal_worker(p, Signal::SIGCONT);
    }
    let late = d.wait_log("the master saying it ran late", |l| {
        l.contains("WARNING") && l.contains("ran") && l.contains("late")
    });
    eprintln!("RELIABILITY stall of 4 s: {late}");
    // Fresh beats from both, seen by the master: any timeout would have been
    // decided by now, in the master's first turn after the stall.
    d.wait_until(SHORT, "fresh heartbeats from both workers", || {
        let st = status(&d);
        let fresh = before
            .iter()
            .filter(|&&p| {
                worker_entry(&st, p)
                    .and_then(|e| e["last_beat_secs"].as_f64())
                    .is_some_and(|age| age < 1.0)
            })
            .count();
        if fresh == 2 {
            Ok(())
        } else {
            Err(st["workers"].to_string())
        }
    });
    let timeouts = d.log_lines_with("WORKER TIMEOUT");
    if !timeouts.is_empty() {
        d.fail(&format!("workers timed out for the stall: {timeouts:?}"));
    }
    assert_eq!(sorted(d.workers()), before, "the same workers serve");
    d.get("/");
}

#[test]
fn a_worker_that_never_heartbeats_is_not_killed_for_silence() {
    // Slot 0 never touches its heartbeat fd; slot 1 beats once (a byte written to
    // the fd) and then goes silent: it is the control showing that the 1 s timeout
    // is live in this very master.
    let d = Daemon::start([
        "-w",
        "2",
        "-t",
        "1",
        "--",
        "/bin/sh",
        "-c",
        r#"if [ "$ARBITER_SLOT" = 1 ]; then printf x >&"$ARBITER_HEARTBEAT_FD"; fi; exec sleep 1000"#,
    ]);
    let ws = wait_exec_children(&d, 2);
    let silent = ws
        .iter()
        .find(|w| w.slot == Some(0))
        .unwrap_or_else(|| d.fail(&format!("no slot 0 in {ws:?}")))
        .pid;
    let beaten = ws.iter().find(|w| w.slot == Some(1)).unwrap().pid;
    // The one that beat once times out...
    d.wait_log("WORKER TIMEOUT for the worker that beat once", |l| {
        l.contains(&format!("WORKER TIMEOUT (pid:{beaten})"))
    });
    // ...the silent one stays, for three timeouts.
    let end = Instant::now() + secs(3);
    while Instant::now() < end {
        if !is_alive(silent) || !d.workers().contains(&silent) {
            d.fail(&format!("the never-beating worker {silent} was killed"));
        }
        std::thread::sleep(ms(50));
    }
    let st = status(&d);
    let e = worker_entry(&st, silent).unwrap_or_else(|| d.fail(&format!("{silent} not in {st}")));
    assert_eq!(e["last_beat_secs"], Value::Null, "it never beat: {e}");
    assert_eq!(e["state"], "ready", "{e}");
    assert!(
        d.log_lines_with(&format!("(pid:{silent})")).is_empty(),
        "the log says something about the silent worker: {:?}",
        d.log_lines_with(&format!("(pid:{silent})"))
    );
}

// ------------------------------------------------------------------ readiness

#[test]
fn in_notify_mode_a_worker_is_ready_only_after_ready_1() {
    let d = Daemon::builder();
    let flag = d.path("ready.flag");
    let mut args: Vec<String> = vec![
        "--ready".into(),
        "notify".into(),
        "--boot-timeout".into(),
        "30".into(),
    ];
    args.extend(py_worker("health_notify_flag.py"));
    args.push(flag.to_string_lossy().into_owned());
    let d = d.args(&args).start();
    let w = wait_exec_children(&d, 1)[0].pid;
    // It talks (STATUS=) but has not said READY=1: booting.
    let e = d.wait_until(SHORT, "the worker's STATUS= before READY=1", || {
        let st = status(&d);
        match worker_entry(&st, w) {
            Some(e) if e["status_text"] == "waiting for the flag" => Ok(e),
            _ => Err(st["workers"].to_string()),
        }
    });
    assert_eq!(e["state"], "booting", "no READY=1 yet: {e}");
    for _ in 0..10 {
        let st = status(&d);
        let e = worker_entry(&st, w).unwrap_or_else(|| d.fail(&format!("{w} gone: {st}")));
        assert_eq!(e["state"], "booting", "no READY=1 yet: {e}");
        assert_eq!(st["master"]["ready"], 0, "no READY=1 yet: {}", st["master"]);
        std::thread::sleep(ms(50));
    }
    assert!(
        d.log_lines_with("Serving:").is_empty(),
        "serving before READY=1: {:?}",
        d.log_lines_with("Serving:")
    );
    std::fs::write(&flag, b"").unwrap();
    d.wait_until(SHORT, "the worker ready after READY=1", || {
        let st = status(&d);
        match worker_entry(&st, w) {
            Some(e) if e["state"] == "ready" && st["master"]["ready"] == 1 => {
                assert_eq!(e["status_text"], "flag seen", "{e}");
                Ok(())
            }
            _ => Err(st.to_string()),
        }
    });
    d.wait_log("Serving: once ready", |l| {
        l.contains("Serving: 1 worker(s) ready")
    });
}

/// utime + stime of `pid`, in clock ticks (100 a second).
pub(crate) fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// `EXTEND_TIMEOUT_USEC` during boot and while ready pushes the timeouts out and
/// nothing else: the master sleeps through the extension (it used to spin at
/// 100% CPU, logging "ran late" hundreds of thousands of times a second).
#[test]
fn an_extended_timeout_keeps_the_worker_and_the_master_sleeps() {
    let mut args: Vec<String> = ["--ready", "notify", "--boot-timeout", "2", "-t", "2"]
        .map(String::from)
        .to_vec();
    args.extend(py_worker("health_extend.py"));
    let d = Daemon::builder().args(&args).start();
    let c0 = cpu_ticks(d.pid());
    let w = wait_exec_children(&d, 1)[0].pid;
    d.wait_until(LONG, "the worker ready and extended again", || {
        let st = status(&d);
        match worker_entry(&st, w) {
            Some(e) if e["state"] == "ready" && e["status_text"] == "extended while ready" => {
                Ok(())
            }
            _ => Err(st["workers"].to_string()),
        }
    });
    // Through the second extension (2 s): the never-beating worker is not killed.
    let until = Instant::now() + secs(2);
    while Instant::now() < until {
        assert!(
            is_alive(w),
            "the extended worker {w} was killed: {}",
            d.log()
        );
        std::thread::sleep(ms(100));
    }
    let cpu = cpu_ticks(d.pid()) - c0;
    assert!(
        d.log_lines_with("ran").iter().all(|l| !l.contains("late")),
        "the master thought it stalled: {:?}",
        d.log_lines_with("late").len()
    );
    assert!(
        d.log_lines_with("not ready after").is_empty(),
        "boot timeout despite the extension: {}",
        d.log()
    );
    // About 5 s of wall time; a busy loop would use all of it.
    assert!(
        cpu < 50,
        "the master used {cpu} ticks through the extensions"
    );
}

/// A worker killed for its boot timeout is replaced only once it is reaped, so
/// its death sets the slot's backoff before the replacement starts (the log used
/// to say "next start in Xs" after the replacement had already booted).
#[test]
fn a_worker_killed_at_its_boot_timeout_is_replaced_after_its_death_is_counted() {
    let d = Daemon::builder()
        .args([
            "--ready",
            "notify",
            "--boot-timeout",
            "1",
            "-w",
            "1",
            "--",
            "sleep",
            "600",
        ])
        .start();
    d.wait_until(LONG, "three boot timeouts", || {
        let n = d.log_lines_with("not ready after").len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} so far"))
        }
    });
    let log = d.log();
    let mut killed_unreaped: Vec<String> = Vec::new();
    for line in log.lines() {
        if line.contains("not ready after")
            && let Some(pid) = line.split("(pid:").nth(1).and_then(|r| r.split(')').next())
        {
            killed_unreaped.push(pid.to_string());
        } else if line.contains("was sent SIGKILL") || line.contains("was killed") {
            killed_unreaped.retain(|p| !line.contains(&format!("(pid:{p})")));
        } else if line.contains("Booting worker") {
            assert!(
                killed_unreaped.is_empty(),
                "a replacement booted before the killed worker(s) {killed_unreaped:?} were reaped:\n{log}"
            );
        }
    }
    let looping = d.log_lines_with("is crash-looping");
    assert!(!looping.is_empty(), "{log}");
}

/// A worker that beats by writing into its heartbeat fd does not grow the file
/// (in memory, on tmpfs) without bound: the master empties it as it looks.
#[test]
fn a_heartbeat_file_written_to_stays_small() {
    let b = Daemon::builder();
    let flag = b.path("fast-part-done");
    let mut args: Vec<String> = ["-w", "1", "-t", "1"].map(String::from).to_vec();
    args.extend(py_worker("health_write_beats.py"));
    args.push(flag.to_string_lossy().into_owned());
    let d = b.args(&args).start();
    let w = wait_exec_children(&d, 1)[0].pid;
    let fd = proc_environ(w)
        .and_then(|e| e.get("ARBITER_HEARTBEAT_FD").cloned())
        .unwrap_or_else(|| d.fail("no ARBITER_HEARTBEAT_FD"));
    let size = || {
        std::fs::metadata(format!("/proc/{w}/fd/{fd}"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let mut largest = 0;
    while !flag.exists() {
        assert!(is_alive(w), "the worker died: {}", d.log());
        largest = largest.max(size());
        std::thread::sleep(ms(20));
    }
    // It wrote about 12 MiB; the master looks at least every timeout.
    assert!(
        largest < 8 << 20,
        "the heartbeat file reached {largest} bytes"
    );
    d.wait_until(SHORT, "the file emptied after the fast part", || {
        let n = size();
        if n < 64 * 1024 {
            Ok(())
        } else {
            Err(format!("{n} bytes"))
        }
    });
    assert!(is_alive(w), "the beating worker was killed: {}", d.log());
    assert!(d.log_lines_with("WORKER TIMEOUT").is_empty(), "{}", d.log());
}

// ------------------------------------------------------------------ reloads

fn control_reload(d: &Daemon) -> Value {
    control(&d.control_path(), r#"{"v":1,"cmd":"reload"}"#, LONG).unwrap_or_else(|e| d.fail(&e))
}

fn http_worker_daemon(workers: usize, mode: &str) -> (Daemon, PathBuf) {
    let b = Daemon::builder();
    let flag = b.path("broken.flag");
    let w = workers.to_string();
    let mut args: Vec<String> = [
        "-w",
        &w,
        "--ready",
        "notify",
        "--boot-timeout",
        "2",
        "--graceful-timeout",
        "2",
        "-t",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(py_worker("health_http.py"));
    args.push(flag.to_string_lossy().into_owned());
    args.push(mode.into());
    (b.args(&args).start(), flag)
}

#[test]
fn a_reload_that_never_becomes_ready_keeps_the_old_generation_then_a_good_one_succeeds() {
    let (d, flag) = http_worker_daemon(2, "hang");
    let old = d.wait_workers(2);
    // Both have read the (absent) flag and said READY=1.
    wait_ready(&d, 2);
    let old_pids = pids(&old);
    let gen0 = old[0].generation.unwrap();

    std::fs::write(&flag, b"").unwrap();
    let hammer = Hammer::start(d.listener(), 2);
    let t0 = Instant::now();
    let r = control_reload(&d);
    let took = t0.elapsed();
    let served = hammer.finish();
    assert_eq!(r["ok"], false, "the reload must fail: {r}");
    assert_eq!(r["error"]["kind"], "failed", "{r}");
    assert!(
        took >= ms(1900),
        "failed after {took:?}, before the 2 s boot timeout: {r}"
    );
    assert!(
        served.failures.is_empty(),
        "{} requests failed during the failed reload: {:?}",
        served.failures.len(),
        &served.failures[..served.failures.len().min(5)]
    );
    assert!(served.ok.len() >= 5, "too few answers: {}", served.ok.len());
    for (pid, g) in &served.ok {
        assert!(
            old_pids.contains(&(*pid as i32)) && *g == gen0 as i64,
            "answered by pid {pid} gen {g}, not the old generation {old:?}"
        );
    }
    // The broken workers are gone; exactly the old ones remain, serving.
    d.wait_until(SHORT, "only the old workers left", || {
        let now = sorted(d.workers());
        if now == old_pids {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
    let st = status(&d);
    assert_eq!(st["master"]["generation"], gen0, "{}", st["master"]);
    assert_eq!(st["master"]["ready"], 2, "{}", st["master"]);
    assert_eq!(st["master"]["last_reload"]["ok"], false, "{}", st["master"]);
    assert!(st["master"]["reload"].is_null(), "{}", st["master"]);
    let j = d.get_json("/");
    assert!(
        old_pids.contains(&(j["pid"].as_i64().unwrap() as i32)),
        "{j}"
    );

    // Fixed: the next reload goes through.
    std::fs::remove_file(&flag).unwrap();
    let r = control_reload(&d);
    assert_eq!(r["ok"], true, "the good reload must succeed: {r}");
    assert_eq!(r["reply"]["type"], "reloaded", "{r}");
    let new = d.wait_workers_where("a new generation of 2", 2, |w| {
        w.generation.unwrap_or(0) > gen0 && !old_pids.contains(&w.pid)
    });
    assert_eq!(
        r["reply"]["generation"],
        new[0].generation.unwrap(),
        "{r} vs {new:?}"
    );
    for p in old_pids {
        assert!(
            !is_alive(p),
            "old worker {p} still alive after the good reload"
        );
    }
    let st = status(&d);
    assert_eq!(st["master"]["last_reload"]["ok"], true, "{}", st["master"]);
}

#[test]
fn a_hup_whose_workers_exit_before_ready_fails_fast_and_the_old_ones_stay() {
    let (d, flag) = http_worker_daemon(1, "exit1");
    let old = d.wait_workers(1);
    wait_ready(&d, 1);
    let gen0 = old[0].generation.unwrap();
    std::fs::write(&flag, b"").unwrap();
    d.signal(Signal::SIGHUP);
    let st = d.wait_until(SHORT, "last_reload to report the failure", || {
        let st = status(&d);
        if st["master"]["last_reload"]["ok"] == false {
            Ok(st)
        } else {
            Err(st["master"].to_string())
        }
    });
    assert_eq!(st["master"]["generation"], gen0, "{}", st["master"]);
    d.wait_log("the failed reload logged", |l| {
        l.contains("failed") && l.contains("keeps serving")
    });
    let now = d.wait_workers(1);
    assert_eq!(pids(&now), pids(&old), "the old worker keeps serving");
    d.assert_workers_stay(&pids(&old), ms(500));
}

#[test]
fn five_reloads_of_the_builtin_worker_under_load_lose_no_request() {
    let d = Daemon::start(["-w", "2", "--graceful-timeout", "5"]);
    let first = d.wait_workers(2);
    let gen0 = first[0].generation.unwrap() as i64;
    let hammer = Hammer::start(d.listener(), 2);
    for i in 1..=5 {
        assert_one_thread(&d);
        let r = control_reload(&d);
        assert_eq!(r["ok"], true, "reload {i}: {r}");
        assert_eq!(r["reply"]["generation"], gen0 + i, "reload {i}: {r}");
    }
    // Traffic after the last reload too: 20 more answers.
    let base = hammer.answered();
    d.wait_until(SHORT, "20 more answers after the last reload", || {
        let n = hammer.answered() - base;
        if n >= 20 { Ok(()) } else { Err(format!("{n}")) }
    });
    let res = hammer.finish();
    assert_one_thread(&d);
    assert!(
        res.failures.is_empty(),
        "{} of {} requests failed across 5 reloads: {:?}",
        res.failures.len(),
        res.failures.len() + res.ok.len(),
        &res.failures[..res.failures.len().min(10)]
    );
    let gens: std::collections::BTreeSet<i64> = res.ok.iter().map(|(_, g)| *g).collect();
    assert!(
        res.ok.len() >= 50,
        "too few requests to mean anything: {}",
        res.ok.len()
    );
    assert!(
        gens.contains(&(gen0 + 5)),
        "never answered by the last generation: {gens:?}"
    );
    assert!(
        gens.len() >= 4,
        "answers from too few generations: {gens:?}"
    );
}

// ------------------------------------------------------------------ failure policy

#[test]
fn a_command_that_exits_1_at_once_is_restarted_with_backoff_and_the_master_stays_responsive() {
    let d = Daemon::start(["--", "/bin/sh", "-c", "exit 1"]);
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut polls = 0;
    while t0.elapsed() < secs(6) {
        let q = Instant::now();
        let st = status(&d);
        slowest = slowest.max(q.elapsed());
        polls += 1;
        assert_eq!(st["master"]["state"], "running", "{}", st["master"]);
        assert_one_thread(&d);
        std::thread::sleep(ms(50));
    }
    let st = status(&d);
    let starts = d.log_lines_with("Booting worker").len();
    // Backoff 0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s: 7 or 8 starts in 6 s; hundreds without.
    assert!(
        (4..=15).contains(&starts),
        "{starts} starts in 6 s (status: {})",
        st["master"]
    );
    assert_eq!(
        st["master"]["workers_spawned"].as_u64(),
        Some(starts as u64),
        "workers_spawned vs `Booting worker` lines: {}",
        st["master"]
    );
    assert!(
        slowest < ms(500),
        "the status took up to {slowest:?} to answer during the crash loop ({polls} polls)"
    );
    d.wait_log("crash-looping logged", |l| l.contains("crash-looping"));
}

#[test]
fn a_crash_looping_worker_is_shown_as_such() {
    // Lives 0.3 s each time, so the status can catch it alive.
    let d = Daemon::start(["--", "/bin/sh", "-c", "sleep 0.3; exit 1"]);
    let e = d.wait_until(LONG, "a worker shown as crash-looping", || {
        let st = status(&d);
        st["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["crash_looping"] == true).cloned())
            .ok_or_else(|| st["workers"].to_string())
    });
    assert!(e["restarts"].as_u64().unwrap_or(0) >= 3, "{e}");
}

#[test]
fn a_slot_waiting_out_its_backoff_shows_in_status_with_no_worker_alive() {
    // Dies at once: between starts the slot has no process for the table to show.
    let d = Daemon::start(["--", "/bin/sh", "-c", "exit 1"]);
    let b = d.wait_until(LONG, "a slot in backoff with 3+ failures", || {
        let st = status(&d);
        st["master"]["backoff"]
            .as_array()
            .and_then(|b| {
                b.iter()
                    .find(|s| s["slot"] == 0 && s["failures"].as_u64().unwrap_or(0) >= 3)
                    .cloned()
            })
            .ok_or_else(|| st["master"].to_string())
    });
    assert!(b["next_start_secs"].as_f64().is_some(), "{b}");
    let out = d.ctl(["status"]);
    assert!(
        out.stdout.contains("slot 0 has no worker")
            || out.stdout.contains("slot 0 is crash-looping"),
        "the table must say why slot 0 is missing: {}",
        out.stdout
    );
}

#[test]
fn exit_3_during_the_first_boot_halts_with_status_3() {
    let d = Daemon::builder()
        .args(["--", "/bin/sh", "-c", "exit 3"])
        .no_wait()
        .start();
    let st = d.wait_exit(SHORT);
    assert_eq!(st.code(), Some(3), "exit status: {st}");
    d.wait_log("Worker failed to boot.", |l| {
        l.contains("Worker failed to boot.")
    });
    d.wait_no_leftovers(SHORT);
}

#[test]
fn exit_3_after_the_service_has_served_is_never_a_halt() {
    let b = Daemon::builder();
    let flag = b.path("exit3.flag");
    let mut args: Vec<String> = vec!["--ready".into(), "notify".into()];
    args.extend(py_worker("health_exit3_flag.py"));
    args.push(flag.to_string_lossy().into_owned());
    let d = b.args(&args).start();
    d.wait_log("the first generation serving", |l| {
        l.contains("Serving: 1 worker(s) ready")
    });
    let w = wait_exec_children(&d, 1)[0].pid;
    std::fs::write(&flag, b"").unwrap();
    d.signal_worker(w, Signal::SIGKILL);
    // Its replacements exit 3, again and again: restarted, never a halt.
    d.wait_until(LONG, "three replacements exiting with code 3", || {
        if let Some(st) = d.try_status() {
            d.fail(&format!("the master exited ({st})"));
        }
        let n = d.log_lines_with("exited with code 3").len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} so far"))
        }
    });
    let st = status(&d);
    assert_eq!(st["master"]["state"], "running", "{}", st["master"]);
    assert!(
        d.log_lines_with("Halting").is_empty(),
        "{:?}",
        d.log_lines_with("Halting")
    );
    // Fixed: the next restart boots and serves.
    std::fs::remove_file(&flag).unwrap();
    d.wait_until(LONG, "a ready worker again", || {
        let st = status(&d);
        if st["master"]["ready"] == 1 {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    assert!(d.try_status().is_none(), "the master exited");
}

// ------------------------------------------------------------------ containment

#[test]
fn sigkill_to_the_master_leaves_no_worker_alive_after_2s() {
    let d = Daemon::start(["-w", "3"]);
    let ws = d.wait_workers(3);
    d.signal(Signal::SIGKILL);
    let t0 = Instant::now();
    d.wait_exit(SHORT);
    d.wait_until(
        secs(2).saturating_sub(t0.elapsed()),
        "no worker left",
        || {
            let left: Vec<i32> = ws.iter().map(|w| w.pid).filter(|&p| is_alive(p)).collect();
            let tagged = d.leftovers();
            if left.is_empty() && tagged.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "workers alive {left:?}, tagged processes {tagged:?}"
                ))
            }
        },
    );
}

#[test]
fn a_timed_out_worker_takes_its_children_with_it() {
    let b = Daemon::builder();
    let pidfile = b.path("child.pid");
    let mut args: Vec<String> = vec!["-t".into(), "2".into()];
    args.extend(py_worker("health_child_stop.py"));
    args.push(pidfile.to_string_lossy().into_owned());
    let d = b.args(&args).start();
    let child: i32 = d.wait_until(SHORT, "the worker's child pid", || {
        std::fs::read_to_string(&pidfile)
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("{e}"))
    });
    let w = wait_exec_children(&d, 1)[0].pid;
    assert_eq!(
        proc_stat(child).map(|s| (s.ppid, s.pgrp)),
        Some((w, w)),
        "the child's parent and group"
    );
    d.wait_until(SHORT, "the worker's first heartbeat", || {
        let st = status(&d);
        match worker_entry(&st, w).and_then(|e| e["last_beat_secs"].as_f64()) {
            Some(_) => Ok(()),
            None => Err(st["workers"].to_string()),
        }
    });
    d.signal_worker(w, Signal::SIGSTOP);
    d.wait_until(secs(4), "the stopped worker and its child gone", || match (
        is_alive(w),
        is_alive(child),
    ) {
        (false, false) => Ok(()),
        state => Err(format!("(worker, child) alive: {state:?}")),
    });
    d.wait_log("WORKER TIMEOUT", |l| {
        l.contains(&format!("WORKER TIMEOUT (pid:{w})"))
    });
    // The orphaned child was the master's to reap (child subreaper).
    d.wait_until(SHORT, "the child reaped", || match proc_stat(child) {
        Some(s) if s.ppid == d.pid() => Err(format!("{s:?}")),
        _ => Ok(()),
    });
}

#[test]
fn an_idle_master_without_timeout_does_not_wake_up() {
    let d = Daemon::start(["-t", "0", "--", "/bin/sleep", "1000"]);
    wait_exec_children(&d, 1);
    // Settled: the first generation counts as booted (exec + 2 s) and said so.
    d.wait_until(LONG, "the Serving: line", || {
        if d.log_lines_with("Serving:").is_empty() {
            Err("not yet".into())
        } else {
            Ok(())
        }
    });
    let pid = d.pid();
    let switches = || -> u64 {
        status_field(pid, "voluntary_ctxt_switches")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| d.fail("no voluntary_ctxt_switches"))
    };
    let v0 = switches();
    let t0 = Instant::now();
    while t0.elapsed() < secs(5) {
        std::thread::sleep(ms(100));
        let v = switches();
        if v != v0 {
            d.fail(&format!(
                "the idle master woke up: voluntary_ctxt_switches {v0} -> {v} after {:?}",
                t0.elapsed()
            ));
        }
    }
    assert_one_thread(&d);
}

#[test]
fn signals_from_a_worker_or_its_children_are_ignored_and_the_master_has_one_thread() {
    // The worker itself sends TERM; a child of it (same process group, still alive
    // when the master looks at the sender) sends QUIT.
    let d = Daemon::start([
        "--",
        "/bin/sh",
        "-c",
        r#"kill -TERM "$ARBITER_MASTER_PID"
/bin/sh -c 'kill -QUIT "$ARBITER_MASTER_PID"; exec sleep 1000' &
exec sleep 1000"#,
    ]);
    assert_one_thread(&d);
    let w = wait_exec_children(&d, 1)[0].pid;
    let mut lines = Vec::new();
    for sig in ["SIGTERM", "SIGQUIT"] {
        assert_one_thread(&d);
        lines.push(d.wait_log(&format!("{sig} from the worker ignored"), |l| {
            l.contains(&format!("Ignoring {sig} sent by worker (pid:{w})"))
        }));
    }
    assert!(
        lines[1].contains("sender pid:") && !lines[1].contains(&format!("sender pid:{w})")),
        "QUIT came from the worker's child, not the worker: {}",
        lines[1]
    );
    assert_one_thread(&d);
    let st = status(&d);
    assert_eq!(st["master"]["state"], "running", "{}", st["master"]);
    d.assert_workers_stay(&[w], ms(500));
    assert_one_thread(&d);
    // The master still obeys the same signal from elsewhere.
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(SHORT);
    assert_eq!(st.code(), Some(0), "{st}");
}

/// A signal from a child of a worker (here a shell that runs `kill` and lingers a
/// moment, as a library's helper process would) is attributed by the sender's
/// process group, which the master reads in its signal handler while the sender
/// still exists. A sender that has already exited when the signal lands cannot be
/// attributed by anyone (siginfo carries only its pid and uid); that limit is
/// documented in docs/signals.md.
#[test]
fn signals_from_short_lived_processes_of_a_worker_group_are_ignored() {
    let b = Daemon::builder();
    let done = b.path("done");
    let script = format!(
        r#"[ "$ARBITER_GENERATION" = 1 ] && for i in 1 2 3 4 5 6 7 8 9 10; do /bin/sh -c 'kill -HUP "$ARBITER_MASTER_PID"; sleep 0.2'; done; : > '{}'; exec sleep 1000"#,
        done.display()
    );
    let d = b.args(["--", "/bin/sh", "-c", &script]).start();
    let obeyed = || d.log_lines_with("Hang up: Master");
    d.wait_until(LONG, "the worker done sending HUPs", || {
        if !obeyed().is_empty() {
            d.fail(&format!(
                "a HUP from the worker's group was obeyed: {:?}",
                obeyed()
            ));
        }
        if done.exists() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    d.wait_until(SHORT, "every HUP handled", || {
        let n = d.log_lines_with("Ignoring SIGHUP").len() + obeyed().len();
        if n >= 10 { Ok(()) } else { Err(format!("{n}")) }
    });
    if !obeyed().is_empty() {
        d.fail(&format!(
            "a HUP from the worker's group was obeyed: {:?}",
            obeyed()
        ));
    }
}

// ------------------------------------------------------------------ sd_notify heartbeats

fn watchdog_daemon(timeout: &str, mode: &str) -> Daemon {
    let mut args: Vec<String> = vec![
        "-t".into(),
        timeout.into(),
        "--ready".into(),
        "notify".into(),
    ];
    args.extend(py_worker("health_watchdog.py"));
    args.push(mode.into());
    Daemon::start(&args)
}

#[test]
fn watchdog_1_on_the_notify_socket_is_a_heartbeat_and_its_silence_a_timeout() {
    let d = watchdog_daemon("1", "ping_then_stop");
    let w = wait_exec_children(&d, 1)[0].pid;
    let seen = Instant::now();
    let env = proc_environ(w).unwrap_or_default();
    assert_eq!(
        env.get("WATCHDOG_USEC").map(String::as_str),
        Some("1000000"),
        "{env:?}"
    );
    assert_eq!(env.get("WATCHDOG_PID"), Some(&w.to_string()), "{env:?}");
    assert_eq!(
        env.get("ARBITER_TIMEOUT").map(String::as_str),
        Some("1"),
        "{env:?}"
    );
    // Beating through the socket only: the master sees the beats.
    d.wait_until(SHORT, "a WATCHDOG=1 beat in the status", || {
        let st = status(&d);
        match worker_entry(&st, w).and_then(|e| e["last_beat_secs"].as_f64()) {
            Some(_) => Ok(()),
            None => Err(st["workers"].to_string()),
        }
    });
    d.wait_until(secs(5), "the worker killed once it fell silent", || {
        if is_alive(w) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
    let lived = seen.elapsed();
    assert!(
        lived >= ms(1900),
        "killed after {lived:?}, while it was still pinging (2 s of WATCHDOG=1, timeout 1 s)"
    );
    d.wait_log("WORKER TIMEOUT", |l| {
        l.contains(&format!("WORKER TIMEOUT (pid:{w})"))
    });
}

#[test]
fn watchdog_trigger_is_treated_as_hung_at_once() {
    let d = watchdog_daemon("30", "trigger");
    let w = wait_exec_children(&d, 1)[0].pid;
    d.wait_until(SHORT, "the triggered worker gone (timeout is 30 s)", || {
        if is_alive(w) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
    let line = d.wait_log("WORKER TIMEOUT for WATCHDOG=trigger", |l| {
        l.contains(&format!("WORKER TIMEOUT (pid:{w})"))
    });
    assert!(line.contains("trigger"), "{line}");
    let now = wait_exec_children(&d, 1);
    assert_ne!(now[0].pid, w, "replaced");
}

#[test]
fn a_worker_flooding_the_notify_socket_with_garbage_and_fds_changes_nothing() {
    let count = 4000;
    let mut args: Vec<String> = vec!["-w".into(), "1".into(), "--ready".into(), "notify".into()];
    args.extend(py_worker("notify_fuzz.py"));
    args.push("7".into());
    args.push(count.to_string());
    let d = Daemon::start(&args);
    let w = wait_exec_children(&d, 1)[0].pid;
    // The status text the worker sends after its flood: the master got through all
    // of it, still attributing datagrams to the right worker.
    let done = format!("fuzzed {count}, ");
    let text = d.wait_until(LONG, "the worker's STATUS after its flood", || {
        let st = status(&d);
        let e = worker_entry(&st, w).ok_or_else(|| st["workers"].to_string())?;
        match e["status_text"].as_str() {
            Some(t) if e["state"] == "ready" && t.starts_with(&done) => Ok(t.to_string()),
            _ => Err(e.to_string()),
        }
    });
    let sent: usize = text
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| d.fail(&format!("status text {text:?}")));
    assert!(sent >= count / 8, "the flood did not happen: {text}");
    assert_eq!(d.workers(), vec![w], "the same worker, never replaced");
    // fds attached to datagrams were not installed in the master: it holds as many
    // as a fresh master with one worker.
    let fd_count = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let fresh = Daemon::start(["-w", "1", "--ready", "notify"]);
    fresh.wait_workers(1);
    // Compared until equal: a control connection just closed is let go by each
    // master on its next turn.
    let (flooded, clean) = d.wait_until(SHORT, "as many fds as a fresh master", || {
        let (flooded, clean) = (fd_count(d.pid()), fd_count(fresh.pid()));
        if flooded == clean {
            Ok((flooded, clean))
        } else {
            Err(format!("flooded master {flooded} fds, fresh one {clean}"))
        }
    });
    assert_one_thread(&d);
    eprintln!("RELIABILITY notify flood: {text}; master fds {flooded} (a fresh master: {clean})");
}
