//! Workers with process trees of their own: graceful signals reach the main
//! process only (`--kill-mode mixed`), what a worker leaves behind is TERMed then
//! KILLed, a setsid'd daemon goes with its worker (cgroup), and nothing of any
//! tree outlives a master killed with SIGKILL (the guardian).
//!
//! The workers are `tests/workers/trees_*.py`.

use std::net::TcpListener;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::*;
use crate::health::{cpu_ticks, py_worker, status_at};
use crate::upgrade::Load;

/// Every live descendant of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            if !c.is_zombie() {
                out.push(c.pid);
            }
            todo.push(c.pid);
        }
    }
    out
}

/// The master's `n` workers, ready, from its status (the harness's own wait
/// counts the master's children and asks a worker over HTTP; here a worker's
/// adopted daemon is a child of the master too, and not every worker serves).
fn wait_ready(d: &Daemon, n: usize) -> Vec<i32> {
    d.wait_until(LONG, &format!("{n} ready workers"), || {
        if let Some(st) = d.try_status() {
            d.fail(&format!("the master exited ({st})"));
        }
        let st = status_at(&d.control_path())?;
        let ws = st["workers"].as_array().cloned().unwrap_or_default();
        if ws.len() == n && ws.iter().all(|w| w["state"] == "ready") {
            Ok(ws
                .iter()
                .filter_map(|w| w["pid"].as_i64())
                .map(|p| p as i32)
                .collect())
        } else {
            Err(st["workers"].to_string())
        }
    })
}

fn pids_in(file: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn wait_gone(d: &Daemon, pids: &[i32], within: std::time::Duration, what: &str) {
    d.wait_until(within, what, || {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still alive: {alive:?}"))
        }
    });
}

/// Whether this master put its workers in cgroups (else the test that needs it
/// says so and passes, or fails under CI, where the hierarchy is writable).
fn has_cgroups(d: &Daemon) -> bool {
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let yes = st["master"]["containment"]
        .as_str()
        .is_some_and(|c| c.starts_with("cgroup v2"));
    if !yes {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root where cgroup v2 is writable, but the master says {}",
            st["master"]["containment"]
        );
        eprintln!("SKIPPED: no writable cgroup v2 hierarchy here");
    }
    yes
}

#[test]
fn a_worker_serving_from_its_child_reloads_5_times_under_load_without_a_failed_request() {
    let mut args: Vec<String> = ["-w", "2"].map(String::from).to_vec();
    args.extend(py_worker("trees_child_server.py"));
    let d = Daemon::builder().args(&args).start();
    wait_ready(&d, 2);
    let load = Load::start(d.listener().clone());
    load.wait_more(&d, 50);
    for generation in 2..=6 {
        d.signal_delivered(Signal::SIGHUP);
        d.wait_until(LONG, &format!("generation {generation} alone"), || {
            let ws = d.worker_infos();
            if ws.len() == 2 && ws.iter().all(|w| w.generation == Some(generation)) {
                Ok(())
            } else {
                Err(format!("{ws:?}"))
            }
        });
        load.wait_more(&d, 20);
    }
    let stats = load.finish();
    assert_eq!(
        stats.failed,
        0,
        "{} of {} requests failed across 5 reloads: {:#?}",
        stats.failed,
        stats.ok + stats.failed,
        stats.failures
    );
    assert!(
        d.log_lines_with("left processes running").is_empty(),
        "the children stopped with their parents: {}",
        d.log()
    );
}

#[test]
fn a_term_ignoring_grandchild_is_gone_after_reload_and_after_stop() {
    let b = Daemon::builder();
    let kids = b.path("grandchildren");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bind = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = ["-w", "1", "-b", &bind, "--graceful-timeout", "5"]
        .map(String::from)
        .to_vec();
    args.extend(py_worker("trees_stubborn_grandchild.py"));
    args.push(kids.to_string_lossy().into_owned());
    let d = b.args(&args).start();
    wait_ready(&d, 1);
    let first = d.wait_until(SHORT, "the first grandchild", || {
        pids_in(&kids)
            .first()
            .copied()
            .ok_or("none yet".to_string())
    });
    d.register_pid(first);

    d.signal_delivered(Signal::SIGHUP);
    wait_gone(&d, &[first], LONG, "the old worker's TERM-ignoring child");
    d.wait_log("what it left, TERMed then KILLed", |l| {
        l.contains("still runs after SIGTERM") && l.contains(&first.to_string())
    });
    let second = d.wait_until(SHORT, "the second grandchild", || {
        pids_in(&kids).get(1).copied().ok_or("none yet".to_string())
    });
    d.register_pid(second);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());
    assert!(
        !is_alive(second),
        "the grandchild {second} outlived the master"
    );
    // The port is free: a new master binds it at once.
    let again = Daemon::builder().args(["-w", "1", "-b", &bind]).start();
    wait_ready(&again, 1);
}

/// A master with one worker that starts a classic daemon (fork, setsid, fork):
/// (the master, the worker's pid, the daemon's pid). `pre`: more flags first.
fn with_a_daemonizing_worker(pre: &[&str]) -> (Daemon, i32, i32) {
    let b = Daemon::builder();
    let file = b.path("daemons");
    let mut args: Vec<String> = pre.iter().map(|a| a.to_string()).collect();
    args.extend(["-w".to_string(), "1".to_string()]);
    args.extend(py_worker("trees_daemonizer.py"));
    args.push(file.to_string_lossy().into_owned());
    let d = b.args(&args).start();
    let w = wait_ready(&d, 1)[0];
    let daemon = d.wait_until(SHORT, "the worker's daemon", || {
        pids_in(&file)
            .first()
            .copied()
            .ok_or("none yet".to_string())
    });
    d.register_pid(daemon);
    (d, w, daemon)
}

#[test]
fn a_setsid_daemon_started_by_a_worker_is_gone_when_the_worker_is_retired() {
    let (d, _, daemon) = with_a_daemonizing_worker(&[]);
    if !has_cgroups(&d) {
        return;
    }
    d.signal_delivered(Signal::SIGHUP);
    wait_gone(&d, &[daemon], LONG, "the retired worker's setsid'd daemon");
}

#[test]
fn a_killed_worker_takes_its_whole_cgroup_and_status_has_the_tree_cpu() {
    let (d, w, daemon) = with_a_daemonizing_worker(&[]);
    if !has_cgroups(&d) {
        return;
    }
    // A reading is reused for up to a second, so the first may be from the
    // worker's first instant: wait for the tree's CPU to show.
    d.wait_until(LONG, "the tree's CPU time in status", || {
        let st = status_at(&d.control_path())?;
        let cpu = &st["workers"][0]["cpu_secs"];
        if cpu.as_f64().is_some_and(|c| c > 0.0) {
            Ok(())
        } else {
            Err(st["workers"].to_string())
        }
    });
    let out = d.ctl(["kill", &w.to_string(), "--signal", "KILL"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    wait_gone(
        &d,
        &[w, daemon],
        SHORT,
        "the worker and its setsid'd daemon",
    );
}

/// kill -9 of the master: its guardian kills the workers' trees, grandchildren
/// included, within a second.
fn sigkill_leaves_nothing(command: &[&str]) {
    let mut args: Vec<String> = ["-w", "2", "--"].map(String::from).to_vec();
    args.extend(command.iter().map(|s| s.to_string()));
    let d = Daemon::builder().args(&args).start();
    wait_ready(&d, 2);
    let tree = d.wait_until(SHORT, "the workers' children", || {
        let all = descendants(d.pid());
        // Two workers with at least one child each.
        if all.len() >= 4 {
            Ok(all)
        } else {
            Err(format!("{all:?}"))
        }
    });
    for p in &tree {
        d.register_pid(*p);
    }
    nix::sys::signal::kill(Pid::from_raw(d.pid()), Signal::SIGKILL).unwrap();
    let t = Instant::now();
    wait_gone(&d, &tree, secs(1), "every process of the workers' trees");
    eprintln!(
        "RELIABILITY kill-9 {command:?}: trees gone {:.0?} after SIGKILL",
        t.elapsed()
    );
}

#[test]
fn sigkill_of_the_master_leaves_no_process_of_a_sh_wrapper_worker() {
    let script = format!(
        "{} -c 'import time; time.sleep(1000)'; true",
        python3().to_string_lossy()
    );
    sigkill_leaves_nothing(&["sh", "-c", &script]);
}

#[test]
fn sigkill_of_the_master_leaves_no_process_of_a_worker_with_serving_children() {
    let py3 = python3().to_string_lossy().into_owned();
    let script = test_file("workers/trees_busy_forker.py")
        .to_string_lossy()
        .into_owned();
    sigkill_leaves_nothing(&[&py3, &script]);
}

/// `--kill-mode` is a flag and a config key; a bad value is a one-line error.
#[test]
fn kill_mode_is_a_flag_and_a_config_key() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    std::fs::write(&cfg, "kill-mode = \"group\"\n").unwrap();
    let d = b.args(["-w", "1", "-c"]).arg(&cfg).start();
    wait_ready(&d, 1);
    let bad = Run::new(ARBITERD)
        .args(["--check-config", "--kill-mode", "everything"])
        .run();
    // A bad flag value is a usage error (exit status 2), named on the first line.
    assert_eq!(bad.code(), Some(2), "{bad:?}");
    let first = bad.stderr.lines().next().unwrap_or_default();
    assert!(first.contains("kill-mode"), "{bad:?}");
}

/// A port held by another process: the start-up error names it.
#[test]
fn a_port_in_use_names_the_process_holding_it() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = short_tempdir();
    let out = Run::new(ARBITERD)
        .args(["-w", "1", "-b", &addr, "--control"])
        .arg(dir.path().join("c.sock"))
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    let want = format!("held by pid {} (", std::process::id());
    assert!(
        out.stderr.contains("address already in use") && out.stderr.contains(&want),
        "{out:?}"
    );
}

/// `arbiterd` as PID 1 of a PID namespace of its own, as a container runs it,
/// started by `unshare --pid --fork --mount-proc` in a process group of its own
/// (killed whole at the end, whatever happens).
struct InNamespace {
    unshare: std::process::Child,
    control: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl InNamespace {
    fn start(command: &[String]) -> InNamespace {
        use std::os::unix::process::CommandExt;
        let dir = short_tempdir();
        let control = dir.path().join("c.sock");
        let unshare = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(ARBITERD)
            .args(["-w", "2", "-b", "127.0.0.1:0", "--control"])
            .arg(&control)
            .arg("--")
            .args(command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("run unshare");
        InNamespace {
            unshare,
            control,
            _dir: dir,
        }
    }

    /// The master, as the host sees it (it is 1 inside).
    fn master(&self) -> i32 {
        wait_until(LONG, "the master inside the namespace", || {
            children_of(self.unshare.id() as i32)
                .first()
                .map(|c| c.pid)
                .ok_or_else(|| "not yet".to_string())
        })
    }

    fn wait_ready(&self, n: usize) -> Value {
        wait_until(LONG, &format!("{n} ready workers in the namespace"), || {
            let st = status_at(&self.control)?;
            let ready = st["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["state"] == "ready").count());
            if ready == n {
                Ok(st)
            } else {
                Err(st.to_string())
            }
        })
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.unshare.id() as i32), Signal::SIGKILL);
        let _ = self.unshare.wait();
    }
}

#[test]
fn as_pid_1_of_a_namespace_term_is_a_graceful_stop() {
    let ns = InNamespace::start(&["sleep".into(), "1000".into()]);
    let st = ns.wait_ready(2);
    assert_eq!(st["master"]["pid"], 1, "{st}");
    let master = ns.master();
    nix::sys::signal::kill(Pid::from_raw(master), Signal::SIGTERM).unwrap();
    let mut unshare = ns;
    let status = wait_until(LONG, "the namespace's init to exit", || {
        unshare
            .unshare
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_string())
    });
    assert_eq!(status.code(), Some(0), "a TERMed master exits 0");
}

#[test]
fn as_pid_1_of_a_namespace_orphans_are_reaped_and_kill_9_takes_everything() {
    let dir = short_tempdir();
    let flags = dir.path().join("done");
    let py3 = python3().to_string_lossy().into_owned();
    let script = test_file("workers/trees_orphans.py")
        .to_string_lossy()
        .into_owned();
    let ns = InNamespace::start(&[py3, script, flags.to_string_lossy().into_owned()]);
    ns.wait_ready(2);
    let master = ns.master();
    wait_until(LONG, "both workers done making 50 orphans each", || {
        let n = std::fs::read_dir(dir.path()).map_or(0, |d| d.count());
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} done"))
        }
    });
    wait_until(SHORT, "no zombie left under the namespace's init", || {
        let z = zombie_children(master);
        if z.is_empty() {
            Ok(())
        } else {
            Err(format!("zombies {z:?}"))
        }
    });
    let tree = descendants(master);
    assert!(tree.len() >= 2, "{tree:?}");
    nix::sys::signal::kill(Pid::from_raw(master), Signal::SIGKILL).unwrap();
    wait_until(secs(1), "every process of the namespace gone", || {
        let alive: Vec<i32> = tree.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("{alive:?}"))
        }
    });
}

/// Every live process whose command line contains `needle`.
fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| cmdline(*p).contains(needle))
        .collect()
}

/// The master and its guardian both SIGKILLed: the workers' children live on in
/// the workers' cgroups, and the next master of that name finds them, says so,
/// and kills them.
#[test]
fn a_fresh_start_cleans_up_what_a_killed_master_and_guardian_left() {
    let name = format!("fresh{}", std::process::id());
    let (d, _, daemon) = with_a_daemonizing_worker(&["-n", &name]);
    if !has_cgroups(&d) {
        return;
    }
    let guardian = d.wait_until(SHORT, "the guardian", || {
        let g = pids_with_cmdline(&format!("guardian [{name}]"));
        if g.len() == 1 {
            Ok(g[0])
        } else {
            Err(format!("{g:?}"))
        }
    });
    d.register_pid(guardian);
    nix::sys::signal::kill(Pid::from_raw(guardian), Signal::SIGKILL).unwrap();
    wait_gone(&d, &[guardian], SHORT, "the guardian");
    nix::sys::signal::kill(Pid::from_raw(d.pid()), Signal::SIGKILL).unwrap();
    d.wait_exit(SHORT);
    assert!(
        is_alive(daemon),
        "the daemon should outlive a master killed with its guardian"
    );

    let again = Daemon::builder().args(["-n", &name, "-w", "1"]).start();
    again.wait_log("the leftover found and killed", |l| {
        l.contains("was killed and left processes running") && l.contains(&daemon.to_string())
    });
    wait_gone(&again, &[daemon], SHORT, "what the killed master left");
}

/// A crash-looping slot whose restart then cannot even be started (its cgroup
/// is gone) must not spin the master: the slot's passed backoff used to stay a
/// deadline in the past, so every wait returned at once.
#[test]
fn a_crash_looping_slot_that_cannot_be_started_leaves_the_master_asleep() {
    let d = Daemon::builder()
        .args(["-w", "1", "--", "sh", "-c", "sleep 0.05; exit 1"])
        .start();
    if !has_cgroups(&d) {
        return;
    }
    let st = status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let root = st["master"]["containment"]
        .as_str()
        .and_then(|c| c.strip_prefix("cgroup v2 ("))
        .and_then(|c| c.strip_suffix(')'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| d.fail(&format!("no cgroup root in {st}")));
    d.wait_log("the slot crash-looping", |l| l.contains("is crash-looping"));
    // Take the master's cgroup away between two of the worker's lives.
    d.wait_until(LONG, "the master's cgroup removed", || {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        std::fs::remove_dir(&root).map_err(|e| e.to_string())
    });
    d.wait_log("spawns failing", |l| {
        l.contains("cannot make the worker's cgroup")
    });
    let c0 = cpu_ticks(d.pid());
    let t0 = Instant::now();
    // A window to measure over, not a wait for a state.
    std::thread::sleep(secs(2));
    let cpu = cpu_ticks(d.pid()) - c0;
    assert!(
        cpu < 50,
        "the master used {cpu} ticks in {:?} while spawns failed",
        t0.elapsed()
    );
    assert!(
        d.log_lines_with("ran").iter().all(|l| !l.contains("late")),
        "{}",
        d.log()
    );
}
