//! Daemon mode (`-D`), the pidfile, the log file and its rotation.
//!
//! A daemonized master is not the harness's child: the [`Daemon`] here is the
//! launcher (spawned with `no_wait`, it must exit 0 once the daemon serves), and the
//! daemon's pid comes from the pidfile. It carries the test's tag like everything
//! else, so the launcher's `Daemon` still kills it on drop (and it is registered
//! with `register_pid` too). The control-socket client is `health::control`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::*;
use crate::health::status_at;

/// A master started with `-D`.
struct Daemonized {
    /// The launcher (exited); dropping it kills everything the test started.
    d: Daemon,
    pid: i32,
    pidfile: PathBuf,
    control: PathBuf,
}

impl Daemonized {
    /// `arbiterd -D -p DIR/arbiter.pid --log-file DIR/arbiter.log ARGS` (plus the
    /// harness's `-b 127.0.0.1:0` and `--control DIR/control.sock` unless given):
    /// the launcher must exit 0, and by then the pidfile names the daemon.
    fn start(b: DaemonBuilder, args: &[&str]) -> Daemonized {
        let pidfile = b.path("arbiter.pid");
        let log = b.path("arbiter.log");
        let mut all: Vec<String> = vec![
            "-D".into(),
            "-p".into(),
            pidfile.to_string_lossy().into_owned(),
            "--log-file".into(),
            log.to_string_lossy().into_owned(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        Self::launch(b, &all, pidfile)
    }

    /// As [`start`](Self::start) with exactly `args` (which name their own pidfile).
    fn launch(b: DaemonBuilder, args: &[String], pidfile: PathBuf) -> Daemonized {
        let control = match args.iter().position(|a| a == "--control") {
            Some(i) => PathBuf::from(&args[i + 1]),
            None => b.path("control.sock"),
        };
        let d = b.args(args).no_wait().start();
        let st = d.wait_exit(LONG);
        if st.code() != Some(0) {
            d.fail(&format!("the -D launcher exited with {st}"));
        }
        let text = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| {
            d.fail(&format!(
                "no pidfile {} once the launcher exited 0: {e}",
                pidfile.display()
            ))
        });
        let pid: i32 = text
            .trim()
            .parse()
            .unwrap_or_else(|_| d.fail(&format!("pidfile content {text:?}")));
        d.register_pid(pid);
        if !is_alive(pid) {
            d.fail(&format!(
                "the daemon {pid} named by the pidfile is not running"
            ));
        }
        Daemonized {
            d,
            pid,
            pidfile,
            control,
        }
    }

    fn status(&self) -> Value {
        status_at(&self.control).unwrap_or_else(|e| self.d.fail(&e))
    }

    fn listener(&self) -> Listener {
        let st = self.status();
        let a = st["master"]["listeners"][0]["address"]
            .as_str()
            .unwrap_or_else(|| self.d.fail(&format!("no listener in {}", st["master"])));
        Listener::parse(a)
    }

    /// The daemon's live children with their `ARBITER_*` variables, by worker id.
    fn workers(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = live_children(self.pid)
            .into_iter()
            .map(worker_info)
            .collect();
        v.sort_by_key(|w| (w.worker_id.unwrap_or(u64::MAX), w.pid));
        v
    }

    fn worker_pids(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.workers().iter().map(|w| w.pid).collect();
        v.sort_unstable();
        v
    }

    /// `n` exec'd workers, and `GET /` answers 200 from one of them.
    fn wait_workers(&self, n: usize) -> Vec<WorkerInfo> {
        let l = self.listener();
        self.d
            .wait_until(LONG, &format!("{n} workers serving"), || {
                if !is_alive(self.pid) {
                    self.d.fail("the daemon exited");
                }
                let ws = self.workers();
                if ws.len() != n || ws.iter().any(|w| w.worker_id.is_none()) {
                    return Err(format!("children {ws:?}"));
                }
                let r = http_get(&l, "/", SHORT).map_err(|e| format!("GET /: {e}"))?;
                let pid = r.json()["pid"].as_i64().unwrap_or(-1);
                if r.status == 200 && ws.iter().any(|w| i64::from(w.pid) == pid) {
                    Ok(ws)
                } else {
                    Err(format!("GET / {} {:?} vs {ws:?}", r.status, r.body))
                }
            })
    }

    /// TERM, then the daemon gone and its pidfile with it.
    fn stop(&self) {
        kill(Pid::from_raw(self.pid), Signal::SIGTERM).unwrap();
        self.wait_gone();
    }

    fn wait_gone(&self) {
        self.d
            .wait_until(SHORT, "the daemon gone, pidfile removed", || {
                if is_alive(self.pid) || self.pidfile.exists() {
                    Err(format!(
                        "alive {}, pidfile exists {}",
                        is_alive(self.pid),
                        self.pidfile.exists()
                    ))
                } else {
                    Ok(())
                }
            });
        self.d.wait_no_leftovers(SHORT);
    }
}

fn fd_target(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

// ------------------------------------------------------------------ -D

#[test]
fn daemonize_then_arbiterctl_status_with_no_sleep_in_between() {
    let dz = Daemonized::start(Daemon::builder(), &["-w", "2"]);
    // Right away: the launcher's exit 0 means "serving".
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(&dz.control)
        .args(["status", "--json"])
        .run();
    assert_eq!(
        out.code(),
        Some(0),
        "arbiterctl status right after -D: {out:?}"
    );
    let st: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("arbiterctl status --json is not JSON ({e}): {out:?}"));
    assert_eq!(st["master"]["pid"], dz.pid, "{}", st["master"]);
    assert_eq!(st["master"]["target"], 2, "{}", st["master"]);
    assert_eq!(
        st["master"]["ready"], 2,
        "ready once -D returned: {}",
        st["master"]
    );
    let j = http_get(&dz.listener(), "/", SHORT)
        .unwrap_or_else(|e| dz.d.fail(&format!("GET /: {e}")))
        .json();
    let pids = dz.worker_pids();
    assert!(
        pids.contains(&(j["pid"].as_i64().unwrap() as i32)),
        "{j} vs {pids:?}"
    );
    // `arbiterctl stop` returns once the master is gone: no pidfile from then on.
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(&dz.control)
        .arg("stop")
        .run();
    assert_eq!(out.code(), Some(0), "arbiterctl stop: {out:?}");
    assert!(
        !dz.pidfile.exists(),
        "pidfile still there after `arbiterctl stop` returned"
    );
    assert!(
        !is_alive(dz.pid),
        "the daemon still runs after `arbiterctl stop` returned"
    );
    dz.wait_gone();
}

#[test]
fn daemonize_without_a_log_file_says_where_the_log_goes() {
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["-D", "-b", "127.0.0.1:0", "-w", "1"])
        .arg("-p")
        .arg(dir.path().join("a.pid"))
        .arg("--control")
        .arg(dir.path().join("a.sock"))
        .timeout(LONG)
        .run();
    // The daemon carries the run's tag: `run` killed it once the launcher exited.
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains("-D without --log-file") && out.stderr.contains("/dev/null"),
        "no word about the log: {:?}",
        out.stderr
    );
}

#[test]
fn daemonize_on_a_busy_port_fails_in_the_foreground_with_the_reason() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = short_tempdir();
    let pidfile = dir.path().join("a.pid");
    let control = dir.path().join("a.sock");
    let out = Run::arbiterd()
        .arg("-D")
        .args(["-b", &addr, "-w", "2"])
        .arg("-p")
        .arg(&pidfile)
        .arg("--control")
        .arg(&control)
        .arg("--log-file")
        .arg(dir.path().join("a.log"))
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.elapsed < secs(5), "took {:?}: {out:?}", out.elapsed);
    assert!(
        out.stderr.contains(&addr),
        "the error does not name {addr}: {:?}",
        out.stderr
    );
    assert!(
        out.leftovers.is_empty(),
        "left running: {:?}",
        out.leftovers
    );
    assert!(!pidfile.exists(), "a pidfile was left behind");
    assert!(!control.exists(), "a control socket was left behind");
}

/// `arbiterd -D --boot-timeout 2 ... -- sh -c SCRIPT` in a fresh directory: what
/// the launcher did, and the directory (to check nothing is left in it).
fn daemonize_failing_worker(script: &str) -> (Outcome, tempfile::TempDir) {
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["-D", "-b", "127.0.0.1:0", "-w", "2", "--boot-timeout", "2"])
        .arg("-p")
        .arg(dir.path().join("a.pid"))
        .arg("--control")
        .arg(dir.path().join("a.sock"))
        .arg("--log-file")
        .arg(dir.path().join("a.log"))
        .args(["--", "sh", "-c", script])
        .timeout(LONG)
        .run();
    (out, dir)
}

#[test]
fn daemonize_with_workers_that_never_become_ready_gives_up_at_the_boot_timeout() {
    // Before, the launcher waited forever on a crash-looping first generation and
    // init scripts hung with it.
    let (out, dir) = daemonize_failing_worker("echo no database >&2; exit 1");
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("--boot-timeout (2s)") && out.stderr.contains("exited with code 1"),
        "the launcher does not give the daemon's reason: {:?}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line: {:?}", out.stderr);
    // Two seconds of boot timeout plus the start and a restart under backoff.
    assert!(out.elapsed < secs(15), "took {:?}", out.elapsed);
    assert!(
        out.leftovers.is_empty(),
        "left running: {:?}",
        out.leftovers
    );
    assert!(!dir.path().join("a.pid").exists(), "a pidfile was left");
    assert!(
        !dir.path().join("a.sock").exists(),
        "a control socket was left"
    );
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(log.contains("no database"), "the worker's words: {log}");
}

#[test]
fn daemonize_with_a_worker_that_fails_to_boot_exits_with_its_status() {
    let (out, _dir) = daemonize_failing_worker("exit 3");
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr.contains("failed to boot"),
        "no reason: {:?}",
        out.stderr
    );
    assert!(
        out.leftovers.is_empty(),
        "left running: {:?}",
        out.leftovers
    );
}

#[test]
fn the_daemon_is_detached_not_a_session_leader_with_stdio_on_dev_null() {
    let dz = Daemonized::start(Daemon::builder(), &[]);
    let me = proc_stat(dz.pid).unwrap();
    assert_ne!(me.session, dz.pid, "the daemon leads its session: {me:?}");
    assert_ne!(
        me.ppid,
        dz.d.child_pid(),
        "still the launcher's child: {me:?}"
    );
    let launcher_sid = nix::unistd::getsid(None).unwrap().as_raw();
    assert_ne!(
        me.session, launcher_sid,
        "the daemon stayed in the test's session: {me:?}"
    );
    for fd in 0..3 {
        assert_eq!(fd_target(dz.pid, fd), "/dev/null", "fd {fd} of the daemon");
    }
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", dz.pid)).unwrap();
    assert_eq!(
        cwd,
        dz.d.dir(),
        "the daemon keeps the directory it was started in, as gunicorn does"
    );
    // Its workers are the daemon's, in their own groups, in the daemon's session.
    let ws = dz.wait_workers(1);
    let w = proc_stat(ws[0].pid).unwrap();
    assert_eq!(
        (w.ppid, w.pgrp, w.session),
        (dz.pid, w.pid, me.session),
        "{w:?}"
    );
    dz.stop();
}

// ------------------------------------------------------------------ pidfile

#[test]
fn a_second_start_on_a_live_pidfile_is_refused_and_the_pidfile_unchanged() {
    let dz = Daemonized::start(Daemon::builder(), &[]);
    let before = std::fs::metadata(&dz.pidfile).unwrap();
    let text = std::fs::read_to_string(&dz.pidfile).unwrap();
    let other = short_tempdir();
    for daemon in [true, false] {
        let mut run = Run::arbiterd();
        if daemon {
            run = run.arg("-D");
        }
        let out = run
            .args(["-b", "127.0.0.1:0"])
            .arg("-p")
            .arg(&dz.pidfile)
            .arg("--control")
            .arg(other.path().join("b.sock"))
            .run();
        let what = if daemon { "-D" } else { "foreground" };
        assert_eq!(out.code(), Some(1), "{what}: {out:?}");
        assert!(
            out.stderr.contains(&dz.pid.to_string()),
            "{what}: the refusal does not name the running pid {}: {:?}",
            dz.pid,
            out.stderr
        );
        assert!(
            out.leftovers.is_empty(),
            "{what}: left running: {:?}",
            out.leftovers
        );
        assert!(
            !other.path().join("b.sock").exists(),
            "{what}: control socket left"
        );
        let after = std::fs::metadata(&dz.pidfile).unwrap();
        assert_eq!(
            std::fs::read_to_string(&dz.pidfile).unwrap(),
            text,
            "{what}"
        );
        assert_eq!(
            (after.ino(), after.mtime(), after.mtime_nsec()),
            (before.ino(), before.mtime(), before.mtime_nsec()),
            "{what}: the pidfile was rewritten"
        );
    }
    assert_eq!(
        dz.status()["master"]["pid"],
        dz.pid,
        "the first master still answers"
    );
    dz.stop();
}

#[test]
fn a_stale_pidfile_is_replaced() {
    let b = Daemon::builder();
    let pidfile = b.path("arbiter.pid");
    // Written by a process that is gone (and so holds no lock).
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0""#)
        .arg(&pidfile)
        .status()
        .unwrap();
    assert!(st.success());
    let stale: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!is_alive(stale));
    let dz = Daemonized::start(b, &[]);
    assert_ne!(dz.pid, stale);
    assert_eq!(dz.status()["master"]["pid"], dz.pid);
    dz.stop();
}

// ------------------------------------------------------------------ logs

fn find_logrotate() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/sbin".into()];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.into_iter()
        .map(|d| d.join("logrotate"))
        .find(|p| p.is_file())
}

fn tick_pids(text: &str) -> std::collections::BTreeSet<i32> {
    text.lines()
        .filter(|l| l.contains("[worker:") && l.contains("tick "))
        .filter_map(|l| l.rsplit_once("(pid ")?.1.trim_end_matches(')').parse().ok())
        .collect()
}

#[test]
#[cfg_attr(
    not(has_logrotate),
    ignore = "logrotate is not installed (apt-get install logrotate)"
)]
fn logrotate_with_the_packaged_config_moves_master_and_worker_lines_to_the_new_file() {
    let Some(logrotate) = find_logrotate() else {
        return tool_missing("logrotate is not installed (apt-get install logrotate)");
    };
    let b = Daemon::builder();
    let (logdir, rundir) = (b.path("log"), b.path("run"));
    std::fs::create_dir(&logdir).unwrap();
    std::fs::create_dir(&rundir).unwrap();
    std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = logdir.join("web.log");
    let rotated = logdir.join("web.log.1");
    let control = rundir.join("web.sock");
    let pidfile = rundir.join("web.pid");

    // The packaged config, pointed at this test's directories and arbiterctl.
    let packaged = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/logrotate/arbiter"),
    )
    .unwrap();
    let mut config = packaged.clone();
    for (from, to) in [
        ("/var/log/arbiter/", format!("{}/", logdir.display())),
        ("/run/arbiter/", format!("{}/", rundir.display())),
        ("/usr/bin/arbiterctl", ARBITERCTL.to_string()),
    ] {
        assert!(
            packaged.contains(from),
            "the packaged config no longer mentions {from}"
        );
        config = config.replace(from, &to);
    }
    let conf_path = b.path("logrotate.conf");
    std::fs::write(&conf_path, &config).unwrap();

    let s = |p: &Path| p.to_string_lossy().into_owned();
    let args: Vec<String> = vec![
        "-D".into(),
        "-n".into(),
        "web".into(),
        "-w".into(),
        "2".into(),
        "-p".into(),
        s(&pidfile),
        "--log-file".into(),
        s(&log),
        "--control".into(),
        s(&control),
        "--".into(),
        python3().to_string_lossy().into_owned(),
        s(&test_file("workers/daemon_ticker.py")),
    ];
    let dz = Daemonized::launch(b, &args, pidfile);
    let before = dz.worker_pids();
    assert_eq!(before.len(), 2, "{before:?}");
    dz.d.wait_until(SHORT, "ticks from both workers in the log", || {
        let got = tick_pids(&std::fs::read_to_string(&log).unwrap_or_default());
        if got.len() == 2 {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });

    let out = Run::new(&logrotate)
        .arg("-f")
        .arg("-s")
        .arg(dz.d.path("logrotate.state"))
        .arg(&conf_path)
        .run();
    assert_eq!(out.code(), Some(0), "logrotate: {out:?}\nconfig:\n{config}");
    let old = std::fs::read_to_string(&rotated)
        .unwrap_or_else(|e| dz.d.fail(&format!("no rotated {}: {e}", rotated.display())));
    assert!(
        old.contains("Starting arbiter"),
        "the rotated file is the old log"
    );
    // The postrotate `arbiterctl reopen` has run by now: the old file is done.
    let old_len = std::fs::metadata(&rotated).unwrap().len();
    let new =
        dz.d.wait_until(SHORT, "master and worker lines in the new log", || {
            let text = std::fs::read_to_string(&log)
                .map_err(|e| format!("{}: {e} (did the postrotate reopen run?)", log.display()))?;
            let ticks = tick_pids(&text);
            if text.contains("Reopened the log file")
                && ticks.len() == 2
                && text.lines().count() >= 6
            {
                Ok(text)
            } else {
                Err(format!("ticks from {ticks:?} in {text:?}"))
            }
        });
    assert_eq!(
        std::fs::metadata(&rotated).unwrap().len(),
        old_len,
        "lines still land in the rotated file after the reopen"
    );
    let ticks = tick_pids(&new);
    assert_eq!(
        ticks.into_iter().collect::<Vec<_>>(),
        before,
        "the new file's worker lines come from the same workers"
    );
    assert_eq!(
        dz.worker_pids(),
        before,
        "a worker was replaced by the rotation"
    );
    assert!(
        !new.contains("exited") && !old.contains("exited"),
        "a worker exited:\n{old}{new}"
    );
    dz.stop();
}

#[test]
fn usr1_after_a_rename_moves_master_and_worker_lines_to_a_new_file() {
    let b = Daemon::builder();
    let log = b.path("app.log");
    let moved = b.path("app.log.old");
    let mut args: Vec<String> = vec![
        "-w".into(),
        "2".into(),
        "--log-file".into(),
        log.to_string_lossy().into_owned(),
        "--".into(),
        python3().to_string_lossy().into_owned(),
    ];
    args.push(
        test_file("workers/daemon_ticker.py")
            .to_string_lossy()
            .into_owned(),
    );
    let d = b.args(&args).start();
    let ws = d.wait_until(LONG, "ticks from both workers", || {
        let got = tick_pids(&std::fs::read_to_string(&log).unwrap_or_default());
        if got.len() == 2 {
            Ok(got)
        } else {
            Err(format!("{got:?}"))
        }
    });
    std::fs::rename(&log, &moved).unwrap();
    d.signal_delivered(Signal::SIGUSR1);
    let new = d.wait_until(SHORT, "master and worker lines in the new file", || {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        if text.contains("Reopened the log file") && tick_pids(&text) == ws {
            Ok(text)
        } else {
            Err(text)
        }
    });
    // Unhandled USR1 kills a Python worker: the same two workers prove they
    // were not signalled.
    let mut now = d.workers();
    now.sort_unstable();
    assert_eq!(
        now,
        ws.iter().copied().collect::<Vec<_>>(),
        "the workers changed"
    );
    assert!(!new.contains("exited"), "{new}");
    let old_len = std::fs::metadata(&moved).unwrap().len();
    d.wait_until(SHORT, "more ticks in the new file", || {
        let n = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        if n >= new.lines().count() + 4 {
            Ok(())
        } else {
            Err(format!("{n} lines"))
        }
    });
    assert_eq!(
        std::fs::metadata(&moved).unwrap().len(),
        old_len,
        "lines still land in the renamed file"
    );
}

#[test]
fn with_chdir_the_daemon_works_in_that_directory() {
    let b = Daemon::builder();
    let dir = b.dir().to_path_buf();
    let dz = Daemonized::start(b, &["--chdir", &dir.to_string_lossy()]);
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", dz.pid)).unwrap();
    assert_eq!(cwd, dir, "the daemon's working directory with --chdir");
    let w = dz.wait_workers(1)[0].pid;
    let wcwd = std::fs::read_link(format!("/proc/{w}/cwd")).unwrap();
    assert_eq!(wcwd, dir, "the worker's working directory with --chdir");
    dz.stop();
}

#[test]
fn arbiterctl_pid_finds_a_daemons_relative_control_socket_from_anywhere() {
    // -D moves the master to /, so a relative --control cannot be resolved from its
    // command line and working directory; arbiterctl finds it among the sockets
    // the master listens on.
    let b = Daemon::builder();
    let pidfile = b.path("arbiter.pid");
    let args: Vec<String> = [
        "-D",
        "-p",
        &pidfile.to_string_lossy(),
        "--control",
        "rel.sock",
        "-w",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let dz = Daemonized::launch(b, &args, pidfile.clone());
    assert!(
        dz.d.path("rel.sock").exists(),
        "the socket is in the start directory"
    );
    for cwd in ["/", "/tmp"] {
        let out = Run::new(ARBITERCTL)
            .arg("--pid")
            .arg(&pidfile)
            .args(["--json", "ping"])
            .current_dir(cwd)
            .run();
        assert_eq!(out.code(), Some(0), "from {cwd}: {out:?}");
        let j: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        assert_eq!(j["pid"].as_i64(), Some(i64::from(dz.pid)), "{j}");
    }
    dz.stop();
}

#[test]
fn a_daemon_started_with_relative_paths_serves_and_upgrades() {
    // `cd app && arbiterd -D -c rel.toml` with `command = python3 worker.py`: the
    // master used to move to /, so workers crash-looped on `/worker.py` and an
    // upgrade failed on `/rel.toml`.
    relative_paths_survive_an_upgrade(None);
}

#[test]
fn a_daemon_with_a_relative_chdir_upgrades() {
    // The new master starts where the old one was started, so `--chdir app` does
    // not become app/app.
    relative_paths_survive_an_upgrade(Some("app"));
}

/// In the test's directory (or its `chdir` subdirectory): a notify worker given as
/// `python3 health_http.py`, a relative `-c`, pidfile and log; -D, serve, upgrade
/// through arbiterctl from `/`, and the new master serves.
fn relative_paths_survive_an_upgrade(chdir: Option<&str>) {
    let b = Daemon::builder();
    let app = chdir.map_or(b.dir().to_path_buf(), |c| b.path(c));
    std::fs::create_dir_all(&app).unwrap();
    for f in ["health_http.py", "health_lib.py"] {
        std::fs::copy(test_file(&format!("workers/{f}")), app.join(f)).unwrap();
    }
    let py = python3();
    std::fs::write(
        app.join("rel.toml"),
        format!(
            "workers = 2\nready = \"notify\"\ncommand = [{:?}, \"health_http.py\", \"no-such-flag\", \"exit1\"]\n",
            py.to_string_lossy()
        ),
    )
    .unwrap();
    let pidfile = app.join("arbiter.pid");
    let mut args: Vec<String> = Vec::new();
    if let Some(c) = chdir {
        args.extend(["--chdir".into(), c.into()]);
    }
    args.extend(
        [
            "-D",
            "-p",
            "arbiter.pid",
            "--log-file",
            "arbiter.log",
            "-c",
            "rel.toml",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let dz = Daemonized::launch(b, &args, pidfile.clone());
    dz.wait_workers(2);
    let out = Run::new(ARBITERCTL)
        .arg("--pid")
        .arg(&pidfile)
        .args(["upgrade"])
        .current_dir("/")
        .timeout(LONG)
        .run();
    assert_eq!(out.code(), Some(0), "upgrade: {out:?}");
    let new_pid: i32 = dz.d.wait_until(LONG, "the new master in the pidfile", || {
        let text = std::fs::read_to_string(&pidfile).map_err(|e| e.to_string())?;
        match text.trim().parse::<i32>() {
            Ok(p) if p != dz.pid => Ok(p),
            _ => Err(format!("pidfile says {text:?}")),
        }
    });
    dz.d.register_pid(new_pid);
    let upgraded = Daemonized {
        d: dz.d,
        pid: new_pid,
        pidfile,
        control: dz.control,
    };
    let cwd = std::fs::read_link(format!("/proc/{new_pid}/cwd")).unwrap();
    assert_eq!(cwd, app, "the new master's working directory");
    upgraded.wait_workers(2);
    upgraded.stop();
}

// ------------------------------------------------------------------ WINCH

#[test]
fn winch_stops_the_workers_and_keeps_the_daemon_then_hup_brings_them_back() {
    let dz = Daemonized::start(Daemon::builder(), &["-w", "2", "--graceful-timeout", "2"]);
    let old = dz.wait_workers(2);
    kill(Pid::from_raw(dz.pid), Signal::SIGWINCH).unwrap();
    dz.d.wait_until(SHORT, "every worker stopped", || {
        let ws = dz.worker_pids();
        if ws.is_empty() {
            Ok(())
        } else {
            Err(format!("{ws:?}"))
        }
    });
    for w in &old {
        assert!(!is_alive(w.pid), "worker {} still alive", w.pid);
    }
    assert!(
        dz.d.log_lines_with("was sent SIGKILL").is_empty(),
        "the workers were not stopped gracefully"
    );
    // The master stays, and starts nothing by itself.
    let end = Instant::now() + secs(1);
    while Instant::now() < end {
        assert!(is_alive(dz.pid), "the daemon exited after WINCH");
        let ws = dz.worker_pids();
        assert!(ws.is_empty(), "workers came back without HUP: {ws:?}");
        std::thread::sleep(ms(50));
    }
    let st = dz.status();
    assert_eq!(st["master"]["state"], "running", "{}", st["master"]);
    assert_eq!(st["master"]["total"], 0, "{}", st["master"]);
    assert!(dz.pidfile.exists(), "the pidfile went with the workers");

    kill(Pid::from_raw(dz.pid), Signal::SIGHUP).unwrap();
    let new = dz.wait_workers(2);
    assert!(
        new.iter().all(|w| old.iter().all(|o| o.pid != w.pid)),
        "{old:?} -> {new:?}"
    );
    dz.stop();
}
