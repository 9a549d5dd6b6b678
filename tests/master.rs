//! The master seen from outside: signals, worker churn, the worker contract, bind
//! forms, startup errors, the pidfile.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;

/// `-w N` with the built-in worker, and wait until all N serve.
fn builtin(n: usize) -> (Daemon, Vec<WorkerInfo>) {
    let d = Daemon::start(["-w", &n.to_string()]);
    let w = d.wait_workers(n);
    (d, w)
}

fn pids(ws: &[WorkerInfo]) -> Vec<i32> {
    ws.iter().map(|w| w.pid).collect()
}

fn json_pid(j: &Value) -> i32 {
    j["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {j}")) as i32
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_one_line(what: &str, out: &Outcome) {
    let text = out.stderr.trim_end();
    assert!(
        !text.is_empty() && text.lines().count() == 1,
        "{what}: expected exactly one line on stderr, got {:?} ({out:?})",
        out.stderr
    );
}

/// A startup failure: exit status 1 within a few seconds, one stderr line that
/// names `culprit`, nothing left running.
fn assert_startup_error(what: &str, out: &Outcome, culprit: &str) {
    assert_eq!(out.code(), Some(1), "{what}: exit status ({out:?})");
    assert!(
        out.elapsed < secs(5),
        "{what}: took {:?} to fail ({out:?})",
        out.elapsed
    );
    assert_one_line(what, out);
    assert!(
        out.stderr.contains(culprit),
        "{what}: the error does not name {culprit:?}: {:?}",
        out.stderr
    );
    assert!(
        out.leftovers.is_empty(),
        "{what}: processes left behind: {:?}",
        out.leftovers
    );
}

// ------------------------------------------------------------------ TTIN / TTOU

#[test]
fn ttin_three_times_adds_exactly_three_workers() {
    let (d, before) = builtin(1);
    // Three separate deliveries, each sent as soon as the kernel has handed the
    // previous one to the master (so the kernel cannot merge them; the master's
    // loop may well not have looked at the first yet).
    for _ in 0..3 {
        d.signal_delivered(Signal::SIGTTIN);
    }
    let after = d.wait_workers(4);
    assert!(
        pids(&after).contains(&before[0].pid),
        "TTIN must not replace the existing worker: before {before:?}, after {after:?}"
    );
    // And no fifth one on the way.
    d.assert_workers_stay(&pids(&after), ms(500));
}

/// `--max-workers` in the config file, lowered by a reload below a count TTIN
/// reached: the count comes down to the limit (the limit holds for the count as for
/// TTIN and `scale`), where otherwise TTIN's workers would survive the reload.
#[test]
fn a_reload_lowering_max_workers_brings_the_count_down_to_it() {
    let b = Daemon::builder();
    let cfg = b.path("app.toml");
    std::fs::write(&cfg, "workers = 2\nmax-workers = 3\n").unwrap();
    let d = b.arg("-c").arg(&cfg).start();
    d.wait_workers(2);
    d.signal_delivered(Signal::SIGTTIN);
    let three = d.wait_workers(3);
    d.signal_delivered(Signal::SIGTTIN);
    d.wait_log("TTIN at the limit logged", |l| {
        l.contains("SIGTTIN ignored: already at --max-workers (3)")
    });
    d.assert_workers_stay(&pids(&three), ms(300));

    std::fs::write(&cfg, "workers = 2\nmax-workers = 2\n").unwrap();
    let out = d.ctl(["--timeout", "30", "reload"]);
    assert_eq!(out.code(), Some(0), "reload: {out:?}");
    d.wait_workers(2);
    d.wait_log("the limit's change logged", |l| {
        l.contains("max-workers 3 -> 2")
    });
    d.wait_log("the count's change logged", |l| {
        l.contains("workers 3 -> 2: at most --max-workers")
    });
    let st = d.ctl(["--json", "status"]);
    let st: Value = serde_json::from_str(&st.stdout).unwrap_or_else(|e| panic!("{e}: {st:?}"));
    assert_eq!(st["master"]["target"], 2, "{st}");
}

#[test]
fn ttou_stops_the_oldest_worker() {
    let (d, ws) = builtin(3);
    // Make the oldest worker sit in a later slot than a younger one: kill the
    // first worker; its slot gets the newest worker. Now "oldest" (lowest worker
    // id) is neither the lowest slot nor the lowest pid necessarily.
    let first = ws[0].pid;
    d.signal_worker(first, Signal::SIGKILL);
    let ws = d.wait_workers_where("3 workers, the first replaced", 3, |w| w.pid != first);
    let oldest = ws
        .iter()
        .min_by_key(|w| w.worker_id)
        .expect("workers")
        .clone();
    assert!(
        ws.iter().any(|w| w.slot < oldest.slot),
        "test setup: the oldest worker should not be in the lowest slot: {ws:?}"
    );
    d.signal(Signal::SIGTTOU);
    let left = d.wait_workers(2);
    let want: BTreeSet<i32> = ws
        .iter()
        .filter(|w| w.pid != oldest.pid)
        .map(|w| w.pid)
        .collect();
    let got: BTreeSet<i32> = pids(&left).into_iter().collect();
    assert_eq!(
        got, want,
        "TTOU must stop the oldest worker ({oldest:?}) of {ws:?}"
    );
    d.wait_until(SHORT, "the stopped worker to be reaped", || {
        if proc_stat(oldest.pid).is_none_or(|s| s.ppid != d.pid()) {
            Ok(())
        } else {
            Err(format!("{:?}", proc_stat(oldest.pid)))
        }
    });
}

#[test]
fn ttou_never_goes_below_one_worker() {
    let (d, ws) = builtin(1);
    let only = ws[0].pid;
    for _ in 0..3 {
        d.signal_delivered(Signal::SIGTTOU);
    }
    // Signals are handled in order: once this TTIN has had its effect, so have
    // the TTOUs. At 1 (never 0, and no negative debt) one TTIN makes 2.
    d.signal_delivered(Signal::SIGTTIN);
    let after = d.wait_workers(2);
    assert!(
        pids(&after).contains(&only),
        "TTOU at 1 worker must leave it alone: before {only}, after {after:?}"
    );
    d.assert_workers_stay(&pids(&after), ms(300));
}

// ------------------------------------------------------------------ HUP

#[test]
fn hup_replaces_every_worker_and_finishes_in_flight_requests() {
    let (d, old) = builtin(2);
    let gen0 = old[0].generation.expect("ARBITER_GENERATION");
    assert!(
        old.iter().all(|w| w.generation == Some(gen0)),
        "one generation at boot: {old:?}"
    );
    let answer = d.get_json("/");
    assert_eq!(
        answer["generation"].as_u64(),
        Some(gen0),
        "GET / generation vs ARBITER_GENERATION: {answer}"
    );

    let req = d.spawn_get("/sleep?ms=1500");
    let holder = d.wait_accepted(&req);
    assert!(pids(&old).contains(&holder));
    d.signal(Signal::SIGHUP);

    let resp = req.join().expect("the in-flight request across HUP");
    assert_eq!(resp.status, 200, "in-flight request across HUP: {resp:?}");

    let new = d.wait_workers_where("a new generation of 2 workers", 2, |w| {
        w.generation == Some(gen0 + 1) && !pids(&old).contains(&w.pid)
    });
    for w in &old {
        assert!(
            !is_alive(w.pid),
            "old worker {} still alive after the reload",
            w.pid
        );
    }
    let j = d.get_json("/");
    assert_eq!(
        j["generation"].as_u64(),
        Some(gen0 + 1),
        "GET / after HUP: {j}"
    );
    assert!(
        pids(&new).contains(&json_pid(&j)),
        "answered by {j}, not one of {new:?}"
    );
}

// ------------------------------------------------------------------ shutdown

#[test]
fn term_finishes_in_flight_requests_then_exits_0() {
    let (d, ws) = builtin(2);
    let req = d.spawn_get("/sleep?ms=2000");
    d.wait_accepted(&req);
    d.signal(Signal::SIGTERM);
    // The master must outlive the request it is draining.
    let t0 = Instant::now();
    while !req.is_finished() {
        if let Some(st) = d.try_status() {
            d.fail(&format!(
                "the master exited ({st}) while a request was still in flight"
            ));
        }
        assert!(t0.elapsed() < LONG, "the in-flight request never finished");
        std::thread::sleep(ms(10));
    }
    let resp = req.join().expect("the in-flight request across TERM");
    assert_eq!(resp.status, 200, "in-flight request across TERM: {resp:?}");
    let st = d.wait_exit(LONG);
    assert_eq!(st.code(), Some(0), "graceful shutdown exit status: {st}");
    d.wait_no_leftovers(SHORT);
    for w in ws {
        assert!(!is_alive(w.pid), "worker {} survived the master", w.pid);
    }
}

fn fast_shutdown(sig: Signal) {
    let d = Daemon::start(["-w", "2", "--graceful-timeout", "30"]);
    d.wait_workers(2);
    let req = d.spawn_get("/sleep?ms=20000");
    d.wait_accepted(&req);
    let t0 = Instant::now();
    d.signal(sig);
    let st = d.wait_exit(SHORT);
    let took = t0.elapsed();
    assert_eq!(st.code(), Some(0), "{sig}: exit status {st}");
    assert!(
        took < secs(5),
        "{sig} must be a fast shutdown (graceful timeout is 30 s): took {took:?}"
    );
    d.wait_no_leftovers(SHORT);
    // Cut off (an error) as it should be, or at least not a success.
    if let Ok(r) = req.join() {
        assert_ne!(
            r.status, 200,
            "{sig}: a 20 s request cannot have completed: {r:?}"
        );
    }
}

#[test]
fn int_is_a_fast_shutdown() {
    fast_shutdown(Signal::SIGINT);
}

#[test]
fn quit_is_a_fast_shutdown() {
    fast_shutdown(Signal::SIGQUIT);
}

// ------------------------------------------------------------------ WINCH, USR1

#[test]
fn winch_in_the_foreground_is_logged_and_ignored() {
    let (d, ws) = builtin(2);
    d.signal_delivered(Signal::SIGWINCH);
    d.wait_log("a log line about WINCH", |l| {
        l.to_ascii_lowercase().contains("winch")
    });
    d.assert_workers_stay(&pids(&ws), secs(1));
    let j = d.get_json("/");
    assert!(pids(&ws).contains(&json_pid(&j)));
}

#[test]
fn usr1_keeps_the_master_and_the_workers() {
    let (d, ws) = builtin(2);
    let master = d.pid();
    d.signal_delivered(Signal::SIGUSR1);
    d.wait_log("a log line about USR1 / reopening", |l| {
        let l = l.to_ascii_lowercase();
        l.contains("usr1") || l.contains("reopen")
    });
    d.assert_workers_stay(&pids(&ws), secs(1));
    assert!(is_alive(master));
    let j = d.get_json("/");
    assert!(pids(&ws).contains(&json_pid(&j)));
}

// ------------------------------------------------------------------ dead workers

#[test]
fn a_killed_worker_is_replaced_and_the_signal_logged() {
    let (d, ws) = builtin(2);
    let victim = ws[0].pid;
    d.signal_worker(victim, Signal::SIGKILL);
    let now = d.wait_workers_where("a replacement for the killed worker", 2, |w| {
        w.pid != victim
    });
    assert!(pids(&now).contains(&ws[1].pid), "the other worker stays");
    d.wait_until(SHORT, "the killed worker to be reaped", || {
        if d.zombies().contains(&victim) {
            Err(format!("zombies: {:?}", d.zombies()))
        } else {
            Ok(())
        }
    });
    let line = d.wait_log("a log line naming the killed worker and SIGKILL", |l| {
        l.contains("SIGKILL") && l.contains(&victim.to_string())
    });
    assert!(!line.is_empty());
}

#[test]
fn no_zombie_after_200_worker_churns() {
    const N: usize = 4;
    let (d, _) = builtin(N);
    let t0 = Instant::now();
    let mut churns = 0;
    let mut round = 0;
    // The master backs off restarting a slot whose workers keep dying (a death
    // other than a clean exit counts, however long the worker served, until one
    // has lived 10 s), so SIGKILL and TERM alternate per slot: a clean exit resets
    // the slot's count and every restart is immediate.
    let mut killed_last: std::collections::HashMap<u64, bool> = Default::default();
    let (mut kills, mut terms, mut scaled) = (0, 0, 0);
    while churns < 200 {
        assert!(
            t0.elapsed() < secs(60),
            "200 churns should take well under a minute; {churns} done in {:?}",
            t0.elapsed()
        );
        round += 1;
        if round % 15 == 0 {
            // A burst: three more, then three fewer (three graceful exits).
            for _ in 0..3 {
                d.signal_delivered(Signal::SIGTTIN);
            }
            d.wait_workers(N + 3);
            for _ in 0..3 {
                d.signal_delivered(Signal::SIGTTOU);
            }
            d.wait_workers(N);
            churns += 3;
            scaled += 3;
            continue;
        }
        // Stop one that has just served a request.
        let victim = json_pid(&d.get_json("/"));
        let slot = worker_info(victim)
            .slot
            .unwrap_or_else(|| d.fail(&format!("no ARBITER_SLOT for {victim}")));
        let kill = !killed_last.get(&slot).copied().unwrap_or(false);
        killed_last.insert(slot, kill);
        if kill {
            d.signal_worker(victim, Signal::SIGKILL);
            kills += 1;
        } else {
            d.signal_worker(victim, Signal::SIGTERM);
            terms += 1;
        }
        d.wait_until(LONG, "the stopped worker's replacement", || {
            let ws = d.worker_infos();
            if ws.len() == N && ws.iter().all(|w| w.pid != victim && w.worker_id.is_some()) {
                Ok(())
            } else {
                Err(format!("victim {victim}, workers {ws:?}"))
            }
        });
        churns += 1;
    }
    d.wait_until(SHORT, "no zombie child of the master", || {
        let z = d.zombies();
        if z.is_empty() {
            Ok(())
        } else {
            Err(format!("zombies: {z:?}"))
        }
    });
    let ws = d.wait_workers(N);
    assert_eq!(ws.len(), N);
    assert!(d.zombies().is_empty());
    assert_eq!(d.thread_count(), Some(1));
    let deaths = d.log_lines_with("Worker (pid:").len();
    assert!(
        deaths >= churns,
        "the master logged {deaths} worker deaths for {churns} churns"
    );
    eprintln!(
        "{churns} churns ({kills} SIGKILL, {terms} TERM, {scaled} scaled down) in {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ threads

#[test]
fn the_master_has_exactly_one_thread() {
    let (d, old) = builtin(2);
    assert_eq!(d.thread_count(), Some(1), "after boot");
    d.signal_delivered(Signal::SIGTTIN);
    d.wait_workers(3);
    assert_eq!(d.thread_count(), Some(1), "after TTIN");
    let gen0 = old[0].generation.expect("ARBITER_GENERATION");
    d.signal(Signal::SIGHUP);
    d.wait_workers_where("3 workers of the new generation", 3, |w| {
        w.generation == Some(gen0 + 1)
    });
    assert_eq!(d.thread_count(), Some(1), "after HUP");
}

// ------------------------------------------------------------------ COMMAND workers

fn fdworker_args(n: usize) -> Vec<std::ffi::OsString> {
    vec![
        "-w".into(),
        n.to_string().into(),
        "--".into(),
        python3(),
        test_file("workers/fdworker.py").into(),
    ]
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap_or("?"), 16)
        .unwrap_or_else(|_| panic!("not a hex mask: {v}"))
}

/// Check what one fdworker reported about itself (see tests/workers/fdworker.py).
fn check_fdworker_report(j: &Value, master: i32) {
    let pid = json_pid(j);
    let env = &j["env"];
    assert_eq!(env["LISTEN_FDS"], "1", "LISTEN_FDS: {j}");
    assert_eq!(
        env["LISTEN_PID"].as_str(),
        Some(pid.to_string().as_str()),
        "LISTEN_PID must be the worker's own pid: {j}"
    );
    assert!(env["LISTEN_FDNAMES"].is_string(), "LISTEN_FDNAMES: {j}");
    assert_eq!(
        env["ARBITER_MASTER_PID"].as_str(),
        Some(master.to_string().as_str()),
        "ARBITER_MASTER_PID: {j}"
    );
    for k in ["ARBITER_WORKER_ID", "ARBITER_SLOT", "ARBITER_GENERATION"] {
        assert!(
            env[k].as_str().is_some_and(|v| v.parse::<u64>().is_ok()),
            "{k}: {j}"
        );
    }
    // fds: 0, 1, 2, the listener at 3, and the heartbeat and scoreboard fds if
    // there are.
    let mut want: BTreeSet<i64> = [0, 1, 2, 3].into();
    for k in ["ARBITER_HEARTBEAT_FD", "ARBITER_SCOREBOARD_FD"] {
        if let Some(fd) = env[k].as_str() {
            want.insert(
                fd.parse()
                    .unwrap_or_else(|_| panic!("{k} is a number: {j}")),
            );
        }
    }
    if let Some(fd) = env["ARBITER_SCOREBOARD_FD"].as_str() {
        assert!(
            j["fd_targets"][fd]
                .as_str()
                .is_some_and(|t| t.starts_with("/memfd:arbiter-scoreboard")),
            "the scoreboard fd: {}",
            j["fd_targets"]
        );
    }
    let got: BTreeSet<i64> = j["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(
        got, want,
        "the worker's open fds (no master fd may leak): {}",
        j["fd_targets"]
    );
    assert!(
        j["fd_targets"]["3"]
            .as_str()
            .is_some_and(|t| t.starts_with("socket:")),
        "fd 3 must be the listening socket: {}",
        j["fd_targets"]
    );
    assert_eq!(
        j["pgid"].as_i64(),
        Some(pid as i64),
        "a worker leads its own process group: {j}"
    );
    // Signal state: nothing blocked; the master's own signals ignored (a
    // `systemctl kill` of the whole unit reaches a worker before it could install
    // a handler), the stopping ones and the rest at their defaults.
    let sig = &j["signals"];
    assert_eq!(hex(&sig["SigBlk"]), 0, "blocked signals in the worker: {j}");
    let ign = hex(&sig["SigIgn"]);
    let ignored = |s: Signal| ign & (1 << (s as i32 - 1)) != 0;
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGABRT,
        Signal::SIGTERM,
        Signal::SIGCHLD,
    ] {
        assert!(
            !ignored(s),
            "{s} is ignored in the worker (SigIgn {ign:#x}): it must have its default disposition"
        );
    }
    for s in [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        assert!(
            ignored(s),
            "{s}, the master's, is not ignored in the worker (SigIgn {ign:#x})"
        );
    }
}

#[test]
fn a_command_worker_gets_the_worker_contract() {
    let d = Daemon::start(fdworker_args(2));
    let ws = d.wait_workers(2);
    let j = d.get_json("/");
    assert!(pids(&ws).contains(&json_pid(&j)), "{j} vs {ws:?}");
    check_fdworker_report(&j, d.pid());
    // Both workers, from /proc: their own LISTEN_PID, their own group, slots 0 and 1.
    let slots: BTreeSet<u64> = ws.iter().map(|w| w.slot.expect("ARBITER_SLOT")).collect();
    assert_eq!(slots, [0, 1].into(), "{ws:?}");
    for w in &ws {
        let env = proc_environ(w.pid).expect("environ");
        assert_eq!(
            env.get("LISTEN_PID"),
            Some(&w.pid.to_string()),
            "worker {}",
            w.pid
        );
        assert_eq!(proc_stat(w.pid).map(|s| s.pgrp), Some(w.pid));
        assert_eq!(w.generation, ws[0].generation);
    }
}

// ------------------------------------------------------------------ bind forms

#[test]
fn bind_a_unix_socket() {
    let b = Daemon::builder();
    let sock = b.path("app.sock");
    let d = b
        .args(["-w", "2", "-b", &format!("unix:{}", sock.display())])
        .start();
    assert_eq!(d.listeners(), [Listener::Unix(sock.clone())]);
    let ws = d.wait_workers(2);
    let j = d.get_json("/");
    assert!(pids(&ws).contains(&json_pid(&j)));
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert_eq!(st.code(), Some(0));
    assert!(
        !sock.exists(),
        "the socket file must be removed on shutdown"
    );
}

#[test]
fn two_binds_both_serve() {
    let b = Daemon::builder();
    let sock = b.path("app.sock");
    let d = b
        .args(["-w", "2", "-b", "127.0.0.1:0", "-b"])
        .arg(format!("unix:{}", sock.display()))
        .start();
    let ls = d.listeners().to_vec();
    assert_eq!(
        ls.len(),
        2,
        "the `Listening at:` line, in --bind order: {ls:?}"
    );
    assert!(ls[0].tcp().is_some_and(|a| a.port() != 0), "{ls:?}");
    assert_eq!(ls[1], Listener::Unix(sock));
    let ws = d.wait_workers(2);
    for l in &ls {
        let r = http_get(l, "/", SHORT).unwrap_or_else(|e| d.fail(&format!("GET / on {l:?}: {e}")));
        assert_eq!(r.status, 200, "{l:?}: {r:?}");
        assert!(pids(&ws).contains(&json_pid(&r.json())), "{l:?}: {r:?}");
    }
}

#[test]
fn bind_ipv6_loopback() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no ::1");
        return;
    }
    let d = Daemon::start(["-w", "1", "-b", "[::1]:0"]);
    let addr = d.addr();
    assert!(addr.is_ipv6() && addr.ip().is_loopback(), "{addr}");
    assert_ne!(addr.port(), 0);
    let ws = d.wait_workers(1);
    assert_eq!(json_pid(&d.get_json("/")), ws[0].pid);
}

#[test]
fn bind_an_inherited_fd() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let d = Daemon::builder()
        .args(["-w", "2", "-b", "fd://7"])
        .pass_fd(l, 7)
        .start();
    assert_eq!(
        d.listeners(),
        [Listener::Tcp(format!("127.0.0.1:{port}").parse().unwrap())]
    );
    let ws = d.wait_workers(2);
    assert!(pids(&ws).contains(&json_pid(&d.get_json("/"))));
}

#[test]
fn systemd_socket_activation() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let d = Daemon::builder()
        .args(fdworker_args(2))
        .socket_activation(vec![OwnedFd::from(l)], &["web"])
        .start();
    // The setup is right: the master itself got LISTEN_PID = its pid.
    let menv = proc_environ(d.pid()).expect("the master's environ");
    assert_eq!(menv.get("LISTEN_PID"), Some(&d.pid().to_string()));
    assert_eq!(
        d.listeners(),
        [Listener::Tcp(format!("127.0.0.1:{port}").parse().unwrap())],
        "the master serves the socket systemd handed over, and binds nothing else"
    );
    let ws = d.wait_workers(2);
    let j = d.get_json("/");
    assert!(pids(&ws).contains(&json_pid(&j)));
    // Workers get their own LISTEN_* (LISTEN_PID = their pid), not the master's.
    check_fdworker_report(&j, d.pid());
    for w in &ws {
        let env = proc_environ(w.pid).expect("environ");
        assert_eq!(env.get("LISTEN_PID"), Some(&w.pid.to_string()));
        assert_eq!(env.get("LISTEN_FDS").map(String::as_str), Some("1"));
    }
}

// ------------------------------------------------------------------ startup errors

#[test]
fn a_busy_port_is_a_clean_startup_error() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["-w", "2", "-b", &addr, "-p"])
        .arg(dir.path().join("x.pid"))
        .arg("--control")
        .arg(dir.path().join("ctl.sock"))
        .run();
    assert_startup_error("busy port", &out, &addr);
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "left behind");
    drop(holder);
}

#[test]
fn a_busy_port_after_a_unix_bind_leaves_no_socket_file() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = short_tempdir();
    let sock = dir.path().join("app.sock");
    let out = Run::arbiterd()
        .arg("-b")
        .arg(format!("unix:{}", sock.display()))
        .args(["-b", &addr, "-p"])
        .arg(dir.path().join("x.pid"))
        .arg("--control")
        .arg(dir.path().join("ctl.sock"))
        .run();
    assert_startup_error("unix socket then a busy port", &out, &addr);
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "left behind");
    drop(holder);
}

/// More workers than `--max-workers` (1024 unless told, or the config file's
/// `max-workers`): nothing starts, and the one line names the limit.
#[test]
fn more_workers_than_max_workers_is_a_clean_startup_error() {
    let dir = short_tempdir();
    let cfg = dir.path().join("app.toml");
    std::fs::write(&cfg, "max-workers = 3\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    for (args, line) in [
        (
            &["-w", "2000"][..],
            "arbiterd: --workers 2000: more than --max-workers (1024)",
        ),
        (
            &["-w", "4", "-c", cfg],
            "arbiterd: --workers 4: more than --max-workers (3)",
        ),
        (
            &["-w", "2", "--max-workers", "65537"],
            "arbiterd: --max-workers must be from 1 to 65536",
        ),
    ] {
        let out = Run::arbiterd()
            .args(args)
            .args(["-b", "127.0.0.1:0", "-p"])
            .arg(dir.path().join("x.pid"))
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .run();
        assert_startup_error(&format!("{args:?}"), &out, "--max-workers");
        assert_eq!(out.stderr.trim_end(), line, "{args:?}");
    }
    assert_eq!(entries(dir.path()), ["app.toml"], "left behind");
}

fn missing_command(cmd: &str) {
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["-w", "2", "-b", "127.0.0.1:0", "-p"])
        .arg(dir.path().join("x.pid"))
        .arg("--control")
        .arg(dir.path().join("ctl.sock"))
        .args(["--", cmd, "--some-arg"])
        .run();
    assert_startup_error(&format!("missing command {cmd}"), &out, cmd);
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "left behind");
}

#[test]
fn a_missing_command_path_is_a_clean_startup_error() {
    missing_command("/nonexistent/cmd");
}

#[test]
fn a_command_not_on_path_is_a_clean_startup_error() {
    missing_command("no-such-command-xyz");
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["--workers", "abc", "-b", "127.0.0.1:0", "--control"])
        .arg(dir.path().join("ctl.sock"))
        .run();
    // A usage error: clap's exit status and message (first line), as arbiterctl's.
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.starts_with("error: "), "{out:?}");
    assert!(
        out.stderr.contains("abc") || out.stderr.contains("workers"),
        "the error should name the bad value or flag: {:?}",
        out.stderr
    );
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "left behind");
}

// ------------------------------------------------------------------ pidfile

#[test]
fn the_pidfile_holds_the_master_pid_and_goes_with_it() {
    let b = Daemon::builder();
    let pidfile = b.path("x.pid");
    let d = b.args(["-w", "1", "-p"]).arg(&pidfile).start();
    d.wait_workers(1);
    let text = std::fs::read_to_string(&pidfile).expect("the pidfile once serving");
    assert_eq!(text.trim(), d.pid().to_string(), "pidfile content {text:?}");
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert_eq!(st.code(), Some(0));
    assert!(!pidfile.exists(), "the pidfile must be removed on exit");
}

#[test]
fn built_in_workers_carry_a_title_not_exe() {
    // Exec'd through /proc/self/exe, they showed as `exe` in top.
    let b = Daemon::builder();
    let name = b.dir().file_name().unwrap().to_string_lossy().into_owned();
    let d = b.args(["--name", &name, "-w", "1"]).start();
    let w = d.wait_workers(1)[0].pid;
    let comm = std::fs::read_to_string(format!("/proc/{w}/comm")).unwrap();
    assert_eq!(comm.trim(), "arbiterd-worker");
    let title = cmdline(w);
    assert!(
        title.starts_with(&format!("arbiterd: worker {name} id:1")),
        "{title:?}"
    );
}
