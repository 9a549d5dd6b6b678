//! The master's signals sent to every process of the service, as `systemctl kill
//! -s SIG` does with its default `--kill-whom=all`: the built-in worker, the
//! Python template (`python/arbiter_preload`) and its workers ignore HUP, USR1,
//! USR2, WINCH, TTIN and TTOU and serve on with the same pids, and the master
//! still acts on its own copy (docs/runbook.md, "Signals for the master alone").

use serde_json::Value;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;
use crate::health::status_at;

/// By default HUP, USR1 and USR2 kill a process, TTIN and TTOU stop it.
const MASTERS: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

fn status(d: &Daemon) -> Value {
    status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e))
}

fn pids(st: &Value, key: &str) -> Vec<i32> {
    let mut v: Vec<i32> = st["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| key.is_empty() || w["state"] == key)
                .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn template_pid(st: &Value) -> Option<i32> {
    st["master"]["templates"]
        .as_array()?
        .iter()
        .find(|t| t["state"] == "ready")?["pid"]
        .as_i64()
        .map(|p| p as i32)
}

/// Send `sig` to each of `targets`, and wait until the kernel has dealt with it:
/// pending no more (an ignored signal is dropped when sent, one that kills or
/// stops is pending until the process acts on it).
fn send(d: &Daemon, targets: &[i32], sig: Signal) {
    for &pid in targets {
        kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| d.fail(&format!("kill {pid}: {e}")));
    }
    let bit = 1u64 << (sig as i32 - 1);
    d.wait_until(SHORT, &format!("{sig} delivered to {targets:?}"), || {
        for &pid in targets {
            let pending = |k: &str| {
                status_field(pid, k)
                    .and_then(|v| u64::from_str_radix(&v, 16).ok())
                    .unwrap_or(0)
            };
            if (pending("SigPnd") | pending("ShdPnd")) & bit != 0 {
                return Err(format!("pending in {pid}"));
            }
        }
        Ok(())
    });
}

/// Every one of `targets` alive, not stopped, and still the master's.
fn assert_unharmed(d: &Daemon, targets: &[i32], sig: Signal) {
    for &pid in targets {
        match proc_stat(pid).map(|s| s.state) {
            Some('S' | 'R' | 'D') => {}
            other => d.fail(&format!("after {sig}: process {pid} is {other:?}")),
        }
    }
}

/// Each of the master's signals to each of `targets`; then they must all be
/// there, unharmed, as the master's children, with `GET /` answered.
fn signal_each(d: &Daemon, targets: &[i32]) {
    let mut children = d.workers();
    children.sort_unstable();
    for sig in MASTERS {
        send(d, targets, sig);
        assert_unharmed(d, targets, sig);
    }
    // Something does not happen: a process that took a fatal signal is gone by
    // now, but look for a moment anyway.
    d.assert_workers_stay(&children, ms(300));
    let r = d.get("/");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn builtin_workers_ignore_the_masters_signals_and_the_master_still_acts_on_them() {
    let d = Daemon::start(["-w", "2"]);
    d.wait_workers(2);
    let workers = d.wait_until(LONG, "2 ready workers", || {
        let p = pids(&status(&d), "ready");
        if p.len() == 2 {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    signal_each(&d, &workers);
    assert_eq!(pids(&status(&d), "ready"), workers);

    // The whole unit at once, as `systemctl kill -s TTIN` sends it: the master
    // adds one worker, the two keep serving.
    let mut unit = workers.clone();
    unit.push(d.pid());
    send(&d, &unit, Signal::SIGTTIN);
    let three = d.wait_until(LONG, "3 ready workers", || {
        let p = pids(&status(&d), "ready");
        if p.len() == 3 {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    assert!(
        workers.iter().all(|w| three.contains(w)),
        "{workers:?} {three:?}"
    );

    // HUP to every process: the master reloads, and the old workers leave
    // because it TERMs them (exit 0), not because HUP killed them.
    let mut unit = three.clone();
    unit.push(d.pid());
    send(&d, &unit, Signal::SIGHUP);
    d.wait_until(LONG, "generation 2 serving alone", || {
        let st = status(&d);
        let ws = st["workers"].as_array().cloned().unwrap_or_default();
        let new = ws
            .iter()
            .filter(|w| w["generation"] == 2 && w["state"] == "ready")
            .count();
        if new == 3 && ws.len() == 3 {
            Ok(())
        } else {
            Err(format!("{}", st["workers"]))
        }
    });
    for pid in three {
        d.wait_log(&format!("worker {pid} exiting 0"), |l| {
            l.contains(&format!("Worker (pid:{pid}) exited with code 0."))
        });
    }
    assert!(d.log_lines_with("was killed by").is_empty(), "{}", d.log());
}

fn python_daemon(preload: bool) -> Daemon {
    let b = Daemon::builder();
    std::fs::write(
        b.path("app.py"),
        "def app(environ, start_response):\n    \
         start_response('200 OK', [('Content-Length', '2')])\n    \
         return [b'ok']\n",
    )
    .unwrap();
    let python_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let b = b
        .env("PYTHONPATH", python_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let b = if preload { b.arg("--preload") } else { b };
    b.args(["-w", "2", "--ready", "notify", "--"])
        .arg(python3())
        .args(["-m", "arbiter_preload", "app:app"])
        .start()
}

#[test]
fn the_python_template_and_its_workers_ignore_the_masters_signals() {
    let d = python_daemon(true);
    let (template, workers) = d.wait_until(LONG, "a template and 2 ready workers", || {
        let st = status(&d);
        let w = pids(&st, "ready");
        match template_pid(&st) {
            Some(t) if w.len() == 2 => Ok((t, w)),
            t => Err(format!("template {t:?}, workers {w:?}")),
        }
    });
    let mut targets = workers.clone();
    targets.push(template);
    signal_each(&d, &targets);
    let st = status(&d);
    assert_eq!(pids(&st, "ready"), workers, "{st}");
    assert_eq!(template_pid(&st), Some(template), "{st}");

    // TTIN to the whole unit: the master asks the same template for one more.
    targets.push(d.pid());
    send(&d, &targets, Signal::SIGTTIN);
    let three = d.wait_until(LONG, "3 ready workers", || {
        let p = pids(&status(&d), "ready");
        if p.len() == 3 {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    assert!(
        workers.iter().all(|w| three.contains(w)),
        "{workers:?} {three:?}"
    );
    assert_eq!(template_pid(&status(&d)), Some(template));
}

#[test]
fn plain_python_workers_ignore_the_masters_signals() {
    let d = python_daemon(false);
    let workers = d.wait_until(LONG, "2 ready workers", || {
        let p = pids(&status(&d), "ready");
        if p.len() == 2 {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    signal_each(&d, &workers);
    assert_eq!(pids(&status(&d), "ready"), workers);
}
