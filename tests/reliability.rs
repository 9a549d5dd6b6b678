//! Reliability: chaos under continuous load, resource faults (fork failing, the log
//! on a full disk, the control socket's directory removed, EMFILE), a soak of
//! reloads and worker deaths, and path/secret hygiene.
//!
//! Bounded versions run in CI (each a few seconds); the long versions are
//! `#[ignore]`d and were run by hand, figures in `bench/reliability-chaos.md`.
//! Every test prints a `RELIABILITY ...` summary line (see it with `--nocapture`).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;
use crate::health::{control, status_at};

// ------------------------------------------------------------------ helpers

/// A small xorshift generator; the seed is printed so a failing run can be replayed
/// with `RELIABILITY_SEED=N`.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("RELIABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("RELIABILITY seed {seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        ms(lo + self.below(hi - lo + 1))
    }
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The lowest fd number `pid` has free: with the open-files limit set to it, the
/// process can open nothing more (the master keeps its per-worker fds at high
/// numbers, so its fd count says nothing about where the free numbers are).
fn first_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based).
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn ctl_ok(d: &Daemon, path: &Path, req: &str, timeout: Duration) -> Value {
    let r = control(path, req, timeout).unwrap_or_else(|e| d.fail(&e));
    if r["ok"] != Value::Bool(true) {
        d.fail(&format!("{req} refused: {r}"));
    }
    r["reply"].clone()
}

fn scale_to(d: &Daemon, n: usize) {
    ctl_ok(
        d,
        &d.control_path(),
        &format!(r#"{{"v":1,"cmd":"scale","to":{n}}}"#),
        SHORT,
    );
}

/// Wait until the master has exactly `n` live children, no zombie, its fd count is
/// `fds` and its status says `ready == target == n`.
fn wait_settled(d: &Daemon, n: usize, fds: usize) {
    d.wait_workers(n);
    let pid = d.pid();
    d.wait_until(SHORT, "settled: no zombie, fd count back, ready == target", || {
        let z = d.zombies();
        let f = fd_count(pid);
        let st = status_at(&d.control_path())?;
        let m = &st["master"];
        let ok = z.is_empty()
            && f == fds
            && m["target"].as_u64() == Some(n as u64)
            && m["ready"].as_u64() == Some(n as u64)
            && m["total"].as_u64() == Some(n as u64)
            && d.workers().len() == n;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "zombies {z:?}, fds {f} (baseline {fds}), target {} ready {} total {}, children {:?}",
                m["target"],
                m["ready"],
                m["total"],
                d.workers()
            ))
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A status probe from its own thread every 50 ms: each call's duration, errors,
/// and how often the master said `busy` (out of fds for a moment: the answer it
/// gives then instead of leaving the client waiting; a script tries again).
struct Probe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<Duration>, Vec<String>, u32)>,
}

impl Probe {
    fn start(path: &Path) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let path = path.to_path_buf();
        let handle = std::thread::spawn(move || {
            let mut took = Vec::new();
            let mut errors = Vec::new();
            let mut busy = 0;
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                match status_at(&path) {
                    Ok(_) => took.push(t.elapsed()),
                    Err(e) if e.contains(r#""kind":"busy""#) => busy += 1,
                    Err(e) => errors.push(e),
                }
                std::thread::sleep(ms(50));
            }
            (took, errors, busy)
        });
        Probe { stop, handle }
    }

    /// Stop; assert every call succeeded within 1 s; return a summary.
    fn finish(self, d: &Daemon) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let (mut took, errors, busy) = self.handle.join().unwrap();
        if !errors.is_empty() {
            d.fail(&format!("status calls failed: {errors:?}"));
        }
        took.sort();
        let max = took.last().copied().unwrap_or_default();
        if max >= secs(1) {
            d.fail(&format!("a status call took {max:?}"));
        }
        let over100 = took.iter().filter(|t| **t >= ms(100)).count();
        format!(
            "status calls {} p50 {:.1?} p99 {:.1?} max {:.1?} >=100ms {} busy {busy}",
            took.len(),
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            max,
            over100
        )
    }
}

/// A request that failed: when it ran, and why.
#[derive(Debug, Clone)]
struct Failure {
    start: Instant,
    end: Instant,
    cause: String,
}

/// One client thread doing `GET /` on a fresh connection, back to back.
struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, Vec<Failure>)>,
}

impl Load {
    fn start(target: &Listener) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = target.clone();
        let handle = std::thread::spawn(move || {
            let mut ok = 0u64;
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = http_get(&t, "/", secs(15));
                let end = Instant::now();
                let cause = match r {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        continue;
                    }
                    Ok(r) => format!("status {}", r.status),
                    Err(e) => format!("{:?}", e.kind()),
                };
                failures.push(Failure { start, end, cause });
            }
            (ok, failures)
        });
        Load { stop, handle }
    }

    fn finish(self) -> (u64, Vec<Failure>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

// ------------------------------------------------------------------ 1. chaos

#[derive(Clone, Copy)]
struct Kinds {
    kill: bool,
    stop: bool,
    signals: bool,
    scale: bool,
    /// What the adversarial trial broke (issue 14): notify datagrams from a
    /// foreign uid and from a process that is no worker (`EXTEND_TIMEOUT_USEC`,
    /// `WATCHDOG=trigger`), and the master briefly out of fds with control
    /// clients waiting.
    hostile: bool,
}

/// The uid the chaos's foreign notify datagrams come from.
const CHAOS_FOREIGN_UID: u32 = 54324;

/// Datagrams to the master's notify socket from a process that is no worker.
fn notify_from_outside(address: &str, foreign: bool) {
    let script = r#"
import socket, sys
addr = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for _ in range(200):
    try:
        s.sendto(b"EXTEND_TIMEOUT_USEC=100000000\nWATCHDOG=trigger\nSTATUS=hostile", addr)
    except OSError:
        pass
"#;
    let mut cmd = if foreign {
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={CHAOS_FOREIGN_UID}"),
            format!("--regid={CHAOS_FOREIGN_UID}"),
            "--clear-groups".into(),
        ])
        .arg(python3());
        c
    } else {
        Command::new(python3())
    };
    let _ = cmd
        .args(["-c", script, address])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

const TARGET: usize = 3;

fn chaos(name: &str, duration: Duration, kinds: Kinds) {
    let d = Daemon::start(["-w", "3", "--graceful-timeout", "5"]);
    d.wait_workers(TARGET);
    let pid = d.pid();
    // Warm up the paths the chaos uses (a reload, a scale) before the baseline.
    ctl_ok(&d, &d.control_path(), r#"{"v":1,"cmd":"reload"}"#, LONG);
    scale_to(&d, 4);
    d.wait_workers(4);
    scale_to(&d, TARGET);
    let fd0 = {
        d.wait_workers(TARGET);
        d.wait_until(SHORT, "the warm-up to settle", || {
            let st = status_at(&d.control_path())?;
            if st["master"]["total"].as_u64() == Some(TARGET as u64) && d.zombies().is_empty() {
                Ok(())
            } else {
                Err(st["master"].to_string())
            }
        });
        std::thread::sleep(ms(200));
        fd_count(pid)
    };
    let rss0 = rss_kib(pid);

    let probe = Probe::start(&d.control_path());
    let load = Load::start(d.listener());
    let mut rng = Rng::new();
    // Windows in which a request may legitimately fail: a SIGKILLed worker may hold
    // the client's connection at that instant; a SIGSTOPped one from STOP to CONT.
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let mut counts = [0u32; 7]; // kill, stop, hup, ttin, ttou, scale, hostile
    let notify_address = d
        .workers()
        .first()
        .and_then(|w| proc_environ(*w))
        .and_then(|e| e.get("NOTIFY_SOCKET").cloned())
        .unwrap_or_default();
    let mut stopped: Vec<i32> = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let choice = rng.below(if kinds.hostile { 5 } else { 4 });
        match choice {
            0 if kinds.kill => {
                let w = d.workers();
                // Keep at least one worker alive so the queue keeps draining.
                if w.len() >= 2 {
                    let v = w[rng.below(w.len() as u64) as usize];
                    let t = Instant::now();
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(v), Signal::SIGKILL);
                    windows.push((t, Instant::now()));
                    counts[0] += 1;
                }
            }
            1 if kinds.stop => {
                let w = d.workers();
                if !w.is_empty() {
                    let v = w[rng.below(w.len() as u64) as usize];
                    let t = Instant::now();
                    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(v), Signal::SIGSTOP)
                        .is_ok()
                    {
                        stopped.push(v);
                        std::thread::sleep(rng.range_ms(50, 300));
                        let _ =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(v), Signal::SIGCONT);
                        stopped.retain(|p| *p != v);
                        windows.push((t, Instant::now()));
                        counts[1] += 1;
                    }
                }
            }
            2 if kinds.signals => {
                for _ in 0..2 + rng.below(4) {
                    let (sig, i) = match rng.below(3) {
                        0 => (Signal::SIGHUP, 2),
                        1 => (Signal::SIGTTIN, 3),
                        _ => (Signal::SIGTTOU, 4),
                    };
                    d.signal(sig);
                    counts[i] += 1;
                    std::thread::sleep(rng.range_ms(0, 30));
                }
            }
            3 if kinds.scale => {
                let n = 1 + rng.below(5) as usize;
                scale_to(&d, n);
                counts[5] += 1;
            }
            4 if kinds.hostile => {
                if rng.below(2) == 0 {
                    notify_from_outside(&notify_address, true);
                    notify_from_outside(&notify_address, false);
                } else {
                    // Out of fds for a moment, with control clients waiting.
                    let soft = nofile_soft(pid);
                    prlimit_nofile(pid, first_free_fd(pid));
                    let waiting: Vec<_> = (0..3)
                        .filter_map(|_| {
                            std::os::unix::net::UnixStream::connect(d.control_path()).ok()
                        })
                        .collect();
                    std::thread::sleep(rng.range_ms(50, 150));
                    prlimit_nofile(pid, soft);
                    drop(waiting);
                }
                counts[6] += 1;
            }
            _ => continue,
        }
        std::thread::sleep(rng.range_ms(100, 400));
    }
    for v in stopped {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(v), Signal::SIGCONT);
    }
    // Keep the load on while the master converges, then stop it.
    scale_to(&d, TARGET);
    d.wait_workers(TARGET);
    let (ok, failures) = load.finish();
    let probe_summary = probe.finish(&d);
    wait_settled(&d, TARGET, fd0);
    // RSS: the allocator keeps some grown capacity (worker table, log buffers,
    // status JSON); 2 MiB over a ~3 MiB baseline is generous for that and far
    // below what a per-event leak over hundreds of events would show.
    std::thread::sleep(ms(200));
    let rss1 = rss_kib(pid);
    let fd1 = fd_count(pid);

    let mut by_cause: std::collections::BTreeMap<String, u32> = Default::default();
    for f in &failures {
        *by_cause.entry(f.cause.clone()).or_default() += 1;
    }
    let slack = ms(50);
    let unexplained: Vec<&Failure> = failures
        .iter()
        .filter(|f| {
            !windows
                .iter()
                .any(|(a, b)| *a <= f.end + slack && *b + slack >= f.start)
        })
        .collect();
    let summary = format!(
        "RELIABILITY chaos[{name}] {:.0?}: kills {} stops {} hup {} ttin {} ttou {} scales {} hostile {} | requests ok {ok} failed {} by cause {by_cause:?} unexplained {} | fds {fd0} -> {fd1} | rss {rss0} -> {rss1} KiB | {probe_summary} | spawned {}",
        duration,
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        counts[5],
        counts[6],
        failures.len(),
        unexplained.len(),
        status_at(&d.control_path())
            .map_or(Value::Null, |s| s["master"]["workers_spawned"].clone()),
    );
    eprintln!("{summary}");
    if !kinds.kill && !kinds.stop && !failures.is_empty() {
        d.fail(&format!(
            "{summary}\nrequests failed without any worker killed or stopped: {failures:?}"
        ));
    }
    if !unexplained.is_empty() {
        d.fail(&format!(
            "{summary}\nrequests failed outside any kill/stop window: {unexplained:?}"
        ));
    }
    // One client, one connection at a time: each victim can break at most one.
    let victims = (counts[0] + counts[1]) as usize;
    assert!(
        failures.len() <= victims,
        "{summary}\n{} failures for {victims} victims",
        failures.len()
    );
    assert!(ok > 0, "{summary}");
    assert!(
        rss1 <= rss0 + 2048,
        "{summary}\nmaster RSS grew from {rss0} to {rss1} KiB"
    );
    if let Some(st) = d.try_status() {
        d.fail(&format!("the master exited ({st})"));
    }
}

const ALL: Kinds = Kinds {
    kill: true,
    stop: true,
    signals: true,
    scale: true,
    hostile: true,
};
const GENTLE: Kinds = Kinds {
    kill: false,
    stop: false,
    signals: true,
    scale: true,
    hostile: false,
};

#[test]
fn chaos_kill_stop_signals_scale_under_load() {
    chaos("all", secs(10), ALL);
}

#[test]
fn chaos_reloads_and_scaling_only_fail_no_request() {
    chaos("hup-ttin-ttou-scale", secs(6), GENTLE);
}

#[test]
#[ignore = "long: 60 s of chaos; run by hand, figures in bench/reliability-chaos.md"]
fn chaos_long_all() {
    chaos("all-long", secs(60), ALL);
}

#[test]
#[ignore = "long: 60 s of chaos; run by hand, figures in bench/reliability-chaos.md"]
fn chaos_long_gentle() {
    chaos("hup-ttin-ttou-scale-long", secs(60), GENTLE);
}

// ------------------------------------------------------------------ 3. soak

fn soak(reloads: usize, deaths: usize) {
    let d = Daemon::start(["-w", "4", "--graceful-timeout", "5"]);
    d.wait_workers(4);
    let pid = d.pid();
    let path = d.control_path();
    let per_reload = deaths.div_ceil(reloads.max(1));
    let mut killed: Vec<i32> = Vec::new();
    let mut kill_one = |d: &Daemon| {
        // A death through the control socket: SIGKILL, and the master replaces the
        // worker at once (no crash-loop backoff, which raw SIGKILLs would build up).
        loop {
            let w: Vec<i32> = d
                .workers()
                .into_iter()
                .filter(|p| !killed.contains(p))
                .collect();
            if let Some(&v) = w.first() {
                let r = control(
                    &path,
                    &format!(r#"{{"v":1,"cmd":"kill","pid":{v},"signal":"KILL"}}"#),
                    SHORT,
                )
                .unwrap_or_else(|e| d.fail(&e));
                killed.push(v);
                if killed.len() > 64 {
                    killed.drain(..32);
                }
                if r["ok"] == Value::Bool(true) {
                    return;
                }
            }
            std::thread::sleep(ms(5));
        }
    };
    let reload = |d: &Daemon| {
        ctl_ok(d, &path, r#"{"v":1,"cmd":"reload"}"#, LONG);
    };
    // Warm-up, then the baseline.
    for _ in 0..3 {
        reload(&d);
        for _ in 0..per_reload {
            kill_one(&d);
        }
    }
    d.wait_workers(4);
    std::thread::sleep(ms(200));
    let fd0 = fd_count(pid);
    let rss0 = rss_kib(pid);
    let start = Instant::now();
    let mut samples = Vec::new();
    let (mut done_r, mut done_d, mut raw) = (0, 0, 0);
    while done_r < reloads || done_d < deaths {
        if done_r < reloads {
            reload(&d);
            done_r += 1;
        }
        // One raw SIGKILL per reload (the master sees an unexpected death and
        // restarts the slot), the rest through the control socket.
        if done_d < deaths
            && let Some(&v) = d.workers().last()
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(v), Signal::SIGKILL);
            raw += 1;
            done_d += 1;
        }
        for _ in 0..per_reload.saturating_sub(1).min(deaths - done_d) {
            kill_one(&d);
            done_d += 1;
        }
        if done_r % (reloads / 10).max(1) == 0 {
            samples.push(rss_kib(pid));
        }
    }
    let took = start.elapsed();
    wait_settled(&d, 4, fd0);
    std::thread::sleep(ms(200));
    let rss1 = rss_kib(pid);
    let fd1 = fd_count(pid);
    let st = status_at(&path).unwrap_or_else(|e| d.fail(&e));
    let summary = format!(
        "RELIABILITY soak {reloads} reloads + {deaths} deaths ({raw} raw SIGKILL) in {took:.1?}: fds {fd0} -> {fd1} | rss {rss0} -> {rss1} KiB (samples {samples:?}) | generation {} spawned {} threads {:?}",
        st["master"]["generation"],
        st["master"]["workers_spawned"],
        d.thread_count()
    );
    eprintln!("{summary}");
    // Flat: at most 1 MiB over the warmed-up baseline (allocator slack), whatever
    // the number of cycles.
    assert!(rss1 <= rss0 + 1024, "{summary}");
    assert_eq!(d.thread_count(), Some(1), "{summary}");
}

#[test]
fn soak_50_reloads_300_deaths() {
    soak(50, 300);
}

#[test]
#[ignore = "long: 1000 reloads and 10000 deaths; run by hand, figures in bench/reliability-chaos.md"]
fn soak_long_1000_reloads_10000_deaths() {
    soak(1000, 10000);
}

// ------------------------------------------------------------------ 2. resource faults

/// A uid no other test uses, so RLIMIT_NPROC counts only this test's processes.
const NPROC_UID: u32 = 54321;

fn tasks_of_uid(uid: u32) -> usize {
    let mut n = 0;
    for pid in all_pids() {
        if let Some(u) = status_field(pid, "Uid")
            && u.split_whitespace().next() == Some(&uid.to_string())
        {
            n += thread_count(pid).unwrap_or(1);
        }
    }
    n
}

/// arbiterd with `args`, run as `uid` under a process limit of `limit` (root
/// ignores RLIMIT_NPROC), in a directory of its own: it holds the control
/// socket, in world-writable /tmp, so nobody else may write to it.
fn start_as_uid_with_nproc(uid: u32, limit: usize, args: &[&str]) -> Daemon {
    let b = Daemon::builder();
    std::os::unix::fs::chown(b.dir(), Some(uid), Some(uid)).unwrap();
    fs::set_permissions(b.dir(), fs::Permissions::from_mode(0o700)).unwrap();
    let mut argv: Vec<String> = vec![
        format!("--nproc={limit}:{limit}"),
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        ARBITERD.into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    b.program("prlimit").args(argv).start()
}

/// Use up the rest of `uid`'s process limit with sleepers of that uid (killing
/// them clears the fault); they are registered with `d` for the cleanup.
fn fill_process_limit(d: &Daemon, uid: u32, limit: usize) -> Vec<Child> {
    let used = tasks_of_uid(uid);
    assert!(used < limit, "the uid already runs {used} tasks");
    let sleepers: Vec<Child> = (used..limit)
        .map(|_| {
            let c = Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "sleep",
                    "60",
                ])
                .env(TAG_VAR, d.tag())
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn a sleeper");
            d.register_pid(c.id() as i32);
            c
        })
        .collect();
    d.wait_until(SHORT, "the uid to be at its process limit", || {
        let n = tasks_of_uid(uid);
        if n >= limit {
            Ok(())
        } else {
            Err(format!("{n} tasks"))
        }
    });
    sleepers
}

#[test]
fn fork_failing_under_rlimit_nproc_is_logged_and_recovers() {
    // The master runs as an unprivileged uid with a process limit; other
    // processes of that uid use up the rest.
    const LIMIT: usize = 24;
    let d = start_as_uid_with_nproc(NPROC_UID, LIMIT, &["-w", "1"]);
    d.wait_workers(1);
    let mut sleepers = fill_process_limit(&d, NPROC_UID, LIMIT);
    scale_to(&d, 3);
    let line = d.wait_log("a fork failure logged", |l| {
        l.contains("fork failed") || l.contains("Resource temporarily unavailable")
    });
    // The master survives and keeps serving with what it has.
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    assert_eq!(st["master"]["target"], 3, "{st}");
    assert_eq!(d.get("/").status, 200);
    assert_eq!(d.workers().len(), 1, "{:?}", d.worker_infos());
    for c in &mut sleepers {
        let _ = c.kill();
        let _ = c.wait();
    }
    let t = Instant::now();
    d.wait_workers(3);
    eprintln!(
        "RELIABILITY nproc: logged {line:?}; recovered to 3 workers {:.1?} after the fault cleared; {} fork-failure lines",
        t.elapsed(),
        d.log_lines_with("fork failed").len()
    );
}

/// Another uid of its own, for the same reason as [`NPROC_UID`].
const RELOAD_NPROC_UID: u32 = 54322;

/// A reload whose workers cannot be forked (the uid at its process limit) fails
/// at --boot-timeout with the reason, the control socket answering throughout and
/// the old workers serving; it used to stay "in flight" for ever.
#[test]
fn a_reload_that_cannot_fork_fails_at_the_boot_timeout() {
    const LIMIT: usize = 24;
    let d = start_as_uid_with_nproc(RELOAD_NPROC_UID, LIMIT, &["-w", "2", "--boot-timeout", "3"]);
    let old: Vec<i32> = d.wait_workers(2).iter().map(|w| w.pid).collect();
    let mut sleepers = fill_process_limit(&d, RELOAD_NPROC_UID, LIMIT);
    let reload = std::thread::spawn({
        let ctl = d.control_path();
        move || {
            Run::new(ARBITERCTL)
                .arg("--control")
                .arg(ctl)
                // The master runs as another uid; root trusts it by name.
                .args(["--trust-uid", &RELOAD_NPROC_UID.to_string()])
                .arg("reload")
                .run()
        }
    });
    // While forks fail, the master answers and the old generation serves.
    d.wait_log("a fork failure", |l| l.contains("process limit"));
    assert!(status_at(&d.control_path()).is_ok());
    assert_eq!(d.get("/").status, 200);
    let out = reload.join().expect("the arbiterctl thread");
    for c in &mut sleepers {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("could not be started") && out.stderr.contains("process limit"),
        "{out:?}"
    );
    assert!(
        out.elapsed < secs(15),
        "the reload should fail about --boot-timeout after it began: {out:?}"
    );
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    assert_eq!(st["master"]["reload"], Value::Null, "{st}");
    assert_eq!(st["master"]["last_reload"]["ok"], false, "{st}");
    let mut serving: Vec<i32> = d.workers();
    serving.sort_unstable();
    let mut want = old.clone();
    want.sort_unstable();
    assert_eq!(serving, want, "the old workers serve on");
}

/// A uid no other test uses, for the notify flood.
const FLOOD_UID: u32 = 54323;

/// The notify socket sits in a private directory: another uid cannot even send to
/// it. (It was abstract, open to every uid: each datagram of a flood was read and
/// dropped, which cost the master most of a core.)
#[test]
fn notify_datagrams_from_another_uid_cannot_reach_the_master() {
    let d = Daemon::start(["-w", "2"]);
    let ws = d.wait_workers(2);
    let address = proc_environ(ws[0].pid)
        .and_then(|e| e.get("NOTIFY_SOCKET").cloned())
        .unwrap_or_else(|| d.fail("no NOTIFY_SOCKET in the worker's environment"));
    assert!(
        address.starts_with('/'),
        "NOTIFY_SOCKET is not a path: {address:?}"
    );
    let flood = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sent = refused = 0
until = time.monotonic() + 0.5
while time.monotonic() < until:
    try:
        s.sendto(b"READY=1\nSTATUS=flood\nWATCHDOG=trigger", sys.argv[1])
        sent += 1
    except PermissionError:
        refused += 1
    except OSError:
        time.sleep(0.001)
print(sent, refused)
"#;
    let c0 = cpu_ticks(d.pid());
    let out = Run::new("setpriv")
        .args([
            format!("--reuid={FLOOD_UID}"),
            format!("--regid={FLOOD_UID}"),
            "--clear-groups".into(),
        ])
        .arg(python3())
        .args(["-c", flood, &address])
        .run();
    let cpu = cpu_ticks(d.pid()) - c0;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let counts: Vec<u64> = out
        .stdout
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        matches!(counts[..], [0, refused] if refused > 0),
        "sent, refused: {counts:?} ({out:?})"
    );
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    assert_eq!(st["master"]["notify_dropped"], 0, "{st}");
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "ready", "{w}");
        assert_ne!(w["status_text"], "flood", "{w}");
    }
    assert_eq!(d.workers().len(), 2);
    eprintln!(
        "RELIABILITY notify-flood-foreign-uid: {} refused by the kernel in 0.5 s, master CPU {cpu} ticks",
        counts[1]
    );
}

#[test]
fn log_file_on_a_full_disk_does_not_stop_the_master() {
    // `--log-file=/dev/full` (the `=` form: the harness would try to read a
    // `--log-file PATH` as the log, and /dev/full never ends). No `Listening at:`
    // line reaches the harness, so the listener comes from `status`.
    let d = Daemon::builder()
        .args(["-w", "2", "--log-file=/dev/full"])
        .no_wait()
        .start();
    let st = d.wait_until(LONG, "status on the control socket", || {
        if let Some(s) = d.try_status() {
            d.fail(&format!("the master exited ({s})"));
        }
        status_at(&d.control_path())
    });
    let addr = st["master"]["listeners"][0]["address"]
        .as_str()
        .unwrap_or_else(|| d.fail(&format!("no listener in {st}")))
        .to_string();
    let target = Listener::parse(&addr);
    let pid = st["master"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(http_get(&target, "/", SHORT).unwrap().status, 200);
    // Log-heavy work: scaling, reloads, deaths, a reopen.
    kill_and_check(&d, pid);
    ctl_ok(&d, &d.control_path(), r#"{"v":1,"cmd":"reload"}"#, LONG);
    let reopen = control(&d.control_path(), r#"{"v":1,"cmd":"reopen"}"#, SHORT)
        .unwrap_or_else(|e| d.fail(&e));
    // The reopen itself works on /dev/full; what matters to a logrotate script is
    // that the log still takes nothing, and it hears so.
    assert_eq!(reopen["error"]["kind"], "failed", "{reopen}");
    let msg = reopen["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("refuses lines") && msg.contains("No space left"),
        "{reopen}"
    );
    let out = d.ctl(["reopen"]);
    assert_eq!(
        out.code(),
        Some(1),
        "arbiterctl reopen on a full disk: {out:?}"
    );
    scale_to(&d, 4);
    d.wait_until(LONG, "4 ready workers", || {
        let st = status_at(&d.control_path())?;
        if st["master"]["ready"] == 4 && d.workers().len() == 4 {
            Ok(())
        } else {
            Err(st["master"].to_string())
        }
    });
    assert_eq!(http_get(&target, "/", SHORT).unwrap().status, 200);
    assert!(d.try_status().is_none(), "the master exited");
    // The operator can tell the log is lost: status, arbiterctl and metrics say so.
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let log = &st["master"]["log"];
    let dropped = log["lines_dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped >= 10,
        "lines_dropped {dropped} after all that: {log}"
    );
    let failing = log["failing"].as_str().unwrap_or_default();
    assert!(failing.contains("No space left"), "failing: {log}");
    let shown = d.ctl(["status"]);
    assert!(
        shown
            .stdout
            .contains("LOG FAILING: No space left on device"),
        "arbiterctl status: {shown:?}"
    );
    let metrics = d.ctl(["metrics"]);
    assert!(
        metrics
            .stdout
            .contains("\narbiter_log_failing{arbiter=\"arbiter\"} 1\n"),
        "arbiterctl metrics: {}",
        metrics.stdout
    );
    eprintln!(
        "RELIABILITY log=/dev/full: master alive and serving; {dropped} lines dropped, status says {failing:?}; reopen answered {reopen}; stderr/stdout carried {:?}",
        d.log()
    );
}

fn kill_and_check(d: &Daemon, pid: i32) {
    let w = live_children(pid);
    // The whole group: a COMMAND worker's own children go with it.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(w[0]), Signal::SIGKILL);
    d.wait_until(LONG, "the killed worker replaced", || {
        let now = live_children(pid);
        if now.len() == w.len() && !now.contains(&w[0]) {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
}

#[test]
fn log_file_replaced_by_a_symlink_before_reopen_is_not_followed() {
    let b = Daemon::builder();
    let log = b.path("app.log");
    let victim = b.path("victim.txt");
    fs::write(&victim, "untouched\n").unwrap();
    let d = b.args(["-w", "1", "--log-file"]).arg(&log).start();
    d.wait_workers(1);
    fs::rename(&log, d.path("app.log.1")).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    let reopen = control(&d.control_path(), r#"{"v":1,"cmd":"reopen"}"#, SHORT)
        .unwrap_or_else(|e| d.fail(&e));
    d.signal_delivered(Signal::SIGTTIN);
    d.wait_workers(2);
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "untouched\n",
        "the master wrote through a planted symlink"
    );
    assert!(
        fs::symlink_metadata(&log).is_ok(),
        "the link at the log path is gone"
    );
    assert!(d.try_status().is_none(), "the master exited");
    eprintln!(
        "RELIABILITY reopen onto a symlink: reply {reopen}; link now {}",
        if fs::symlink_metadata(&log).unwrap().file_type().is_symlink() {
            "still a symlink (not followed)"
        } else {
            "replaced by a regular file"
        }
    );
}

#[test]
fn control_socket_directory_removed_at_runtime() {
    let b = Daemon::builder();
    let sub = b.path("run");
    let sock = sub.join("c.sock");
    let d = b.args(["-w", "2", "--control"]).arg(&sock).start();
    d.wait_workers(2);
    assert!(status_at(&sock).is_ok());
    // As a tmp cleaner would: the directory and the socket in it.
    let removed = Instant::now();
    fs::remove_dir_all(&sub).unwrap();
    // HTTP and signals keep working meanwhile.
    for _ in 0..20 {
        assert_eq!(d.get("/").status, 200);
    }
    d.signal_delivered(Signal::SIGTTIN);
    d.wait_workers(3);
    // Back by itself, with no reload: the master watches the directory.
    d.wait_log("the control socket rebound", |l| {
        l.contains("WARNING") && l.contains("was removed; bound a new one")
    });
    let st = d.wait_until(SHORT, "status on the new socket", || status_at(&sock));
    let back = removed.elapsed();
    assert_eq!(st["master"]["target"], 3, "{st}");
    let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the recreated directory is 0{mode:o}");
    let mode = fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the recreated socket is 0{mode:o}");
    // Again, the socket file alone; and a reload still finds everything in place.
    fs::remove_file(&sock).unwrap();
    d.wait_until(SHORT, "status on the socket bound a second time", || {
        status_at(&sock)
    });
    // A file where the directory was: the master cannot bind, says so, and
    // retries until the file is gone.
    fs::remove_dir_all(&sub).unwrap();
    fs::write(&sub, "not a directory").unwrap();
    d.wait_log("the failed restore", |l| {
        l.contains("ERROR") && l.contains("cannot be recreated") && l.contains("retrying in")
    });
    fs::remove_file(&sub).unwrap();
    d.wait_until(SHORT, "status once the file is gone", || status_at(&sock));
    d.signal_delivered(Signal::SIGHUP);
    d.wait_workers_where("generation 2", 3, |w| w.generation == Some(2));
    assert!(status_at(&sock).is_ok());
    assert_eq!(
        d.log_lines_with("was removed; bound a new one").len(),
        3,
        "one rebind per removal"
    );
    assert!(d.try_status().is_none(), "the master exited");
    eprintln!(
        "RELIABILITY control-socket-removed: control back {back:.1?} after rm -rf, no reload"
    );
}

fn nofile_soft(pid: i32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn prlimit_nofile(pid: i32, soft: u64) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
}

#[test]
fn emfile_in_the_master_is_logged_survived_and_recovered() {
    let d = Daemon::start(["-w", "2"]);
    d.wait_workers(2);
    let pid = d.pid();
    let soft = nofile_soft(pid);
    let used = first_free_fd(pid);
    prlimit_nofile(pid, used);
    // Every fd is in use: spawning needs pipes, the control socket needs accept().
    d.signal_delivered(Signal::SIGTTIN);
    d.signal_delivered(Signal::SIGTTIN);
    let line = d.wait_log("EMFILE logged", |l| l.contains("Too many open files"));
    // A control client is told `busy` at once (the master gives up a reserve fd to
    // answer it) instead of hanging until its own timeout.
    let refused = std::os::unix::net::UnixStream::connect(d.control_path()).unwrap();
    refused.set_read_timeout(Some(SHORT)).unwrap();
    let mut answer = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(&refused), &mut answer).unwrap();
    assert!(answer.contains("\"busy\""), "{answer:?}");
    let out = d.ctl(["ping"]);
    assert_eq!(out.code(), Some(1), "arbiterctl at EMFILE: {out:?}");
    assert!(out.stderr.contains("out of file descriptors"), "{out:?}");
    // And the master does not spin meanwhile.
    let c0 = cpu_ticks(pid);
    let t0 = Instant::now();
    for _ in 0..10 {
        assert_eq!(d.get("/").status, 200, "the workers must keep serving");
        std::thread::sleep(ms(100));
    }
    let cpu = cpu_ticks(pid) - c0;
    let wall = t0.elapsed();
    assert_eq!(d.workers().len(), 2);
    assert!(d.try_status().is_none(), "the master exited");
    // 100 ticks/s: more than half a second of CPU in ~1 s is a busy loop.
    assert!(
        cpu < 50,
        "the master used {cpu} ticks in {wall:?} at EMFILE"
    );
    prlimit_nofile(pid, soft);
    let t = Instant::now();
    d.wait_workers(4);
    let recovered = t.elapsed();
    // Served again.
    assert!(status_at(&d.control_path()).is_ok());
    eprintln!(
        "RELIABILITY emfile: logged {line:?}; master CPU {cpu} ticks over {wall:.1?} at the limit; 4 workers {recovered:.1?} after raising it; {} EMFILE lines",
        d.log_lines_with("Too many open files").len()
    );
}

// ------------------------------------------------------------------ 4. security

#[test]
fn symlinks_at_the_pidfile_log_and_control_paths_are_refused() {
    let dir = short_tempdir();
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, "untouched\n").unwrap();
    for (opt, name) in [
        ("--pid", "pid.lnk"),
        ("--log-file", "log.lnk"),
        ("--control", "ctl.lnk"),
    ] {
        for (target, what) in [
            (victim.clone(), "existing"),
            (dir.path().join(format!("new-{name}")), "dangling"),
        ] {
            let link = dir.path().join(name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let mut args: Vec<std::ffi::OsString> =
                vec!["-w".into(), "1".into(), "-b".into(), "127.0.0.1:0".into()];
            if opt != "--control" {
                args.push("--control".into());
                args.push(dir.path().join(format!("c-{name}.sock")).into());
            }
            args.push(opt.into());
            args.push(link.clone().into());
            let out = Run::arbiterd().args(args).timeout(SHORT).run();
            assert_eq!(
                out.code(),
                Some(1),
                "{opt} -> {what} symlink: expected a refusal, got {out:?}"
            );
            assert!(
                out.stderr.contains(&link.display().to_string()),
                "the error must name the path: {:?}",
                out.stderr
            );
            assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched\n");
            assert!(
                !target.exists() || target == victim,
                "{opt}: the master created {target:?} through the link"
            );
            assert!(
                fs::symlink_metadata(&link)
                    .unwrap()
                    .file_type()
                    .is_symlink(),
                "{opt}: the link was replaced"
            );
            eprintln!("RELIABILITY symlink {opt} ({what}): {}", out.stderr.trim());
        }
    }
}

#[test]
fn worker_argv_and_environment_are_not_logged_at_info() {
    const ARG_SECRET: &str = "argv-s3cr3t-7f1c";
    const ENV_SECRET: &str = "env-s3cr3t-9a2e";
    let d = Daemon::builder()
        .env("RELIABILITY_TOKEN", ENV_SECRET)
        .args(["-w", "2", "--log-level", "info", "--graceful-timeout", "2"])
        .args([
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; sleep 600 & wait",
            ARG_SECRET,
        ])
        .start();
    let pid = d.pid();
    let ws = d.wait_until(LONG, "2 exec'd workers", || {
        let infos = d.worker_infos();
        if infos.len() == 2 && infos.iter().all(|w| w.worker_id.is_some()) {
            Ok(infos)
        } else {
            Err(format!("{infos:?}"))
        }
    });
    // The secret really reaches the workers.
    assert!(cmdline(ws[0].pid).contains(ARG_SECRET));
    assert_eq!(
        proc_environ(ws[0].pid)
            .unwrap()
            .get("RELIABILITY_TOKEN")
            .map(String::as_str),
        Some(ENV_SECRET)
    );
    // Boot, death, reload, scale, status: everything that logs about a worker.
    kill_and_check(&d, pid);
    d.signal_delivered(Signal::SIGHUP);
    d.wait_log("the reload to complete", |l| l.contains("complete"));
    scale_to(&d, 3);
    let _ = status_at(&d.control_path());
    d.wait_until(LONG, "3 workers", || {
        let n = live_children(pid).len();
        if n == 3 { Ok(()) } else { Err(format!("{n}")) }
    });
    let log = d.log();
    for s in [ARG_SECRET, ENV_SECRET] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(s)).collect();
        assert!(hits.is_empty(), "secret {s:?} logged at info: {hits:?}");
    }
    eprintln!(
        "RELIABILITY secrets: {} log lines, no argv/env secret",
        log.lines().count()
    );
}

#[test]
fn a_stuck_log_reader_does_not_freeze_the_master() {
    // The log is a FIFO whose reader never reads (a stalled log shipper): once the
    // pipe buffer (64 KiB) is full, a master that writes its log blocking stops
    // answering everything. `--log-file=` form: the harness must not read the FIFO.
    let b = Daemon::builder();
    let fifo = b.path("log.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let d = b
        .args(["-w", "2"])
        .arg(format!("--log-file={}", fifo.display()))
        .no_wait()
        .start();
    d.wait_until(LONG, "status on the control socket", || {
        status_at(&d.control_path())
    });
    // Log-producing churn: ~200 scale changes, each logging a few lines.
    let mut stuck = None;
    for i in 0..400 {
        let t = Instant::now();
        let r = control(
            &d.control_path(),
            &format!(r#"{{"v":1,"cmd":"scale","to":{}}}"#, 1 + i % 2),
            secs(2),
        );
        if let Err(e) = r {
            stuck = Some((i, t.elapsed(), e));
            break;
        }
    }
    assert!(
        stuck.is_none(),
        "the master stopped answering after {:?} (scale call #{}, {}) with its log pipe full",
        stuck.as_ref().map(|s| s.1),
        stuck.as_ref().map_or(0, |s| s.0),
        stuck.as_ref().map_or(String::new(), |s| s.2.clone()),
    );
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let log = st["master"]["log"].clone();
    assert!(
        log["lines_dropped"].as_u64().unwrap_or(0) > 0 && log["failing"].is_string(),
        "status while the reader is stuck: {log}"
    );
    // The reader catches up: the next line gets through, with the count of those
    // lost, and status stops saying the log is failing.
    let mut reader = _reader;
    let mut seen = Vec::new();
    d.wait_until(SHORT, "the log writing again", || {
        use std::io::Read;
        let mut buf = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        // A line to write: the scale logs one.
        control(
            &d.control_path(),
            r#"{"v":1,"cmd":"scale","to":2}"#,
            secs(2),
        )?;
        let st = status_at(&d.control_path())?;
        if st["master"]["log"]["failing"].is_null() {
            Ok(())
        } else {
            Err(st["master"]["log"].to_string())
        }
    });
    {
        use std::io::Read;
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        seen.extend_from_slice(&rest);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("log lines could not be written"),
        "no count of the lost lines in what the reader got: {}",
        &text[text.len().saturating_sub(2000)..]
    );
}

/// Workers running as another user (`--user`, `--group`) still reach the private
/// notify socket, through the directory's group.
#[test]
fn workers_of_another_user_reach_the_notify_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run workers as another user");
        return;
    }
    // `nobody`/`nogroup`: --user takes names only, and these exist on every Debian.
    let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
        eprintln!("skipped: no user `nobody` here");
        return;
    };
    let uid = nobody.uid.to_string();
    let b = Daemon::builder();
    let mut args: Vec<String> = ["-w", "2", "--ready", "notify", "--user", "nobody"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(crate::health::py_worker("health_http.py"));
    args.extend(["no-such-flag".into(), "exit1".into()]);
    let d = b.args(&args).start();
    let ws = d.wait_workers(2);
    for w in &ws {
        assert_eq!(
            status_field(w.pid, "Uid").and_then(|u| u.split_whitespace().next().map(String::from)),
            Some(uid.clone()),
            "worker {} runs as {uid}",
            w.pid
        );
    }
    d.wait_until(LONG, "both workers ready by READY=1", || {
        let st = status_at(&d.control_path())?;
        let ready = st["workers"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|w| w["state"] == "ready").count());
        if ready == 2 {
            Ok(())
        } else {
            Err(format!("{}", st["workers"]))
        }
    });
}
