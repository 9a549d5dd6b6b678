//! The systemd tier: the shipped `arbiter@.service` and `arbiter@.socket`, with
//! the shipped `arbiter.toml`, under a real systemd running as PID 1 of its own
//! namespaces (see machine.rs). Each test boots its own machine.
//!
//! Needs root and /lib/systemd/systemd; elsewhere the tests are ignored with the
//! reason (build.rs), and under CI a missing piece fails them.

#[path = "../harness.rs"]
mod harness;
mod machine;

use harness::{ms, secs};
use machine::{Files, Machine, SERVICE, SOCKET};

/// A booted machine with the shipped files and `extra`, or `None` (after saying
/// why) where this host cannot boot one.
fn boot(extra: Files) -> Option<Machine> {
    if let Some(why) = machine::unavailable() {
        harness::tool_missing(&why);
        return None;
    }
    Some(Machine::boot(extra))
}

fn shipped() -> Option<Machine> {
    boot(Files::with_shipped())
}

/// A Python worker that takes `argv[1]` seconds to start serving on fd 3, then
/// says READY=1 and answers `GET` with its pid.
const SLOW_WORKER: &str = r#"
import os, signal, socket, sys, time
time.sleep(float(sys.argv[1]))
sock = socket.socket(fileno=3)
if os.environ.get("NOTIFY_SOCKET"):
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
body = b'{"pid":%d}' % os.getpid()
while True:
    c, _ = sock.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
"#;

fn shipped_config() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/arbiter.toml"
    ))
    .expect("read")
}

fn status_json(m: &Machine) -> serde_json::Value {
    let out = m.ok("arbiterctl --name web status --json");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

fn wait_main_pid(m: &Machine, want: i32) {
    m.wait(&format!("MainPID to be {want}"), secs(20), |m| {
        let p = m.main_pid();
        if p == want {
            Ok(())
        } else {
            Err(format!("MainPID is {p}, {}", m.state(SERVICE)))
        }
    });
}

/// The pid of the master that answers the control socket.
fn serving_master(m: &Machine) -> i32 {
    status_json(m)["master"]["pid"]
        .as_i64()
        .expect("master pid in status") as i32
}

fn cgroup_of(m: &Machine, pid: i32) -> String {
    m.ok(&format!("cat /proc/{pid}/cgroup"))
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}

fn new_master_beside(m: &Machine, old: i32) -> i32 {
    m.wait("a new master beside the old one", secs(30), |m| {
        let out = m.sh("for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); case \"$c\" in '/usr/bin/arbiterd '*) echo ${p#/proc/};; esac; done").stdout;
        let pids: Vec<i32> = out
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| *p != old)
            .collect();
        match pids.as_slice() {
            [p] => Ok(*p),
            other => Err(format!("masters other than {old}: {other:?}")),
        }
    })
}

fn wait_log(m: &Machine, what: &str, needle: &str) -> String {
    m.wait(what, secs(30), |m| {
        let j = m.journal();
        if j.contains(needle) {
            Ok(j)
        } else {
            Err(format!("no {needle:?} in the journal yet"))
        }
    })
}

// ------------------------------------------------------------------ containment

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn workers_are_contained_in_cgroups_below_the_unit_and_the_master_in_a_leaf() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    assert_eq!(m.get("/").expect("GET / right after start").status, 200);
    let journal = m.journal();
    assert!(
        journal.contains("Worker trees: cgroup v2"),
        "containment is off under the shipped unit:\n{journal}"
    );
    let unit = "/system.slice/system-arbiter.slice/arbiter@web.service";
    let master = m.main_pid();
    let master_cg = cgroup_of(&m, master);
    assert!(
        master_cg.starts_with(&format!("{unit}/arbiter.web.")) && master_cg.ends_with("/master"),
        "the master must live in a leaf of the delegated subtree, not {master_cg}"
    );
    let root = master_cg.trim_end_matches("/master").to_string();
    let workers = m.worker_pids();
    assert_eq!(workers.len(), 2, "the shipped config runs 2 workers");
    for w in &workers {
        let cg = cgroup_of(&m, *w);
        assert!(
            cg.starts_with(&format!("{root}/w")),
            "worker {w} in {cg}, not a cgroup of its own beside the master's"
        );
    }
    // No process directly in an inner node: the unit's own cgroup and the master's
    // root hold none (the "no internal processes" rule of delegation).
    for inner in [
        m.unit_cgroup(),
        m.unit_cgroup()
            .join(root.trim_start_matches(&format!("{unit}/"))),
    ] {
        let procs = std::fs::read_to_string(inner.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.trim().is_empty(),
            "processes in the inner cgroup {}: {procs}",
            inner.display()
        );
    }
    let s = status_json(&m);
    let containment = s["master"]["containment"].as_str().unwrap_or_default();
    assert!(
        containment.contains("cgroup v2"),
        "status says {containment:?}"
    );
    m.ok(&format!("systemctl stop {SERVICE}"));
    m.wait_state(SERVICE, "inactive/dead", secs(10));
    assert!(
        !m.unit_cgroup().exists() || m.unit_pids().is_empty(),
        "the unit's cgroup still holds {:?}",
        m.unit_pids()
    );
}

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn a_killed_master_is_restarted_and_leaves_no_worker_behind() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    let old_workers = m.worker_pids();
    assert_eq!(old_workers.len(), 2);
    m.ok(&format!("kill -9 {old}"));
    m.wait("the unit restarted with a new master", secs(20), |m| {
        let p = m.main_pid();
        let s = m.state(SERVICE);
        if p != 0 && p != old && s == "active/running" {
            Ok(())
        } else {
            Err(format!("MainPID {p}, {s}"))
        }
    });
    assert_eq!(m.prop(SERVICE, "NRestarts"), "1");
    for w in old_workers {
        assert!(
            !m.alive(w),
            "worker {w} of the killed master is still running"
        );
    }
    assert_eq!(m.get("/").expect("GET after the restart").status, 200);
}

// ------------------------------------------------------------------ readiness, reload

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn start_returns_once_workers_serve_and_reload_is_graceful_and_refuses_a_broken_config() {
    let config = "bind = \"127.0.0.1:8000\"\nworkers = 2\nready = \"notify\"\ncommand = [\"/usr/bin/python3\", \"/etc/arbiter/slow.py\", \"1.5\"]\n";
    let Some(m) = boot(
        Files::with_shipped()
            .file("/etc/arbiter/slow.py", SLOW_WORKER, 0o644)
            .file("/etc/arbiter/shipped.toml", shipped_config(), 0o644)
            .file("/etc/arbiter/web.toml", config, 0o644),
    ) else {
        return;
    };
    // Workers that say READY=1 after 1.5 s: `systemctl start` returns once they
    // serve, not before.
    m.ok(&format!("systemctl start {SERVICE}"));
    assert_eq!(m.state(SERVICE), "active/running");
    let s = status_json(&m);
    assert_eq!(
        s["master"]["ready"], 2,
        "start returned before the workers were ready: {s}"
    );
    assert_eq!(m.get("/").expect("GET right after start").status, 200);
    m.ok(&format!("systemctl stop {SERVICE}"));

    // Reloads under load, with the shipped config's built-in workers (which
    // finish what they accepted on TERM; the slow worker above does not try).
    m.ok("cp /etc/arbiter/shipped.toml /etc/arbiter/web.toml");
    m.ok(&format!("systemctl start {SERVICE}"));
    let load = m.load(4);
    m.wait_served(&load, 20);
    m.ok(&format!("systemctl reload {SERVICE}"));
    m.wait_served(&load, 20);
    // A broken config: the reload fails, the unit stays active on the old workers.
    m.ok("echo 'workers = \"many\"' >> /etc/arbiter/web.toml");
    let r = m.sh(&format!("systemctl reload {SERVICE}"));
    assert_ne!(r.code(), Some(0), "a broken config must fail the reload");
    assert_eq!(m.state(SERVICE), "active/running");
    m.wait_served(&load, 20);
    let (ok, failed, errors) = load.stop();
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed across the reloads: {errors:?}",
        ok + failed
    );
    wait_log(&m, "the refusal logged", "Reload failed");
}

// ------------------------------------------------------------------ upgrades

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn ctl_upgrade_under_load_moves_main_pid_and_a_stop_after_it_ends_inactive() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    let load = m.load(4);
    m.wait_served(&load, 20);
    let out = m.ok("arbiterctl --name web upgrade");
    assert!(out.contains("upgraded"), "{out}");
    let new = serving_master(&m);
    assert_ne!(new, old);
    wait_main_pid(&m, new);
    m.wait("the old master gone", secs(20), |m| {
        if m.alive(old) {
            Err("still running".into())
        } else {
            Ok(())
        }
    });
    m.wait_served(&load, 20);
    let (ok, failed, errors) = load.stop();
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed across the upgrade: {errors:?}",
        ok + failed
    );
    assert_eq!(m.state(SERVICE), "active/running");
    m.ok(&format!("systemctl stop {SERVICE}"));
    m.wait_state(SERVICE, "inactive/dead", secs(20));
    assert!(m.unit_pids().is_empty(), "left: {:?}", m.unit_pids());
}

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn a_failed_or_timed_out_ctl_upgrade_leaves_the_unit_active_on_the_old_master() {
    let Some(m) = boot(Files::with_shipped().file("/etc/arbiter/slow.py", SLOW_WORKER, 0o644))
    else {
        return;
    };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    // The new master reads the config anew: workers that exit at once never
    // become ready, so it gives up at its boot timeout.
    m.ok("printf 'command = [\"/bin/false\"]\\nboot-timeout = 2\\n' >> /etc/arbiter/web.toml");
    let r = m.sh_within("arbiterctl --name web upgrade --timeout 20", secs(40));
    assert_ne!(
        r.code(),
        Some(0),
        "the upgrade must fail: {}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(m.state(SERVICE), "active/running");
    assert_eq!(m.main_pid(), old);
    assert_eq!(
        m.get("/").expect("GET after the failed upgrade").status,
        200
    );
    // A new master that is slower than the upgrade's timeout.
    m.ok("sed -i '/^command/d; /^boot-timeout/d' /etc/arbiter/web.toml && printf 'command = [\"/usr/bin/python3\", \"/etc/arbiter/slow.py\", \"30\"]\\nready = \"notify\"\\n' >> /etc/arbiter/web.toml");
    let r = m.sh_within("arbiterctl --name web upgrade --timeout 2", secs(40));
    assert_ne!(
        r.code(),
        Some(0),
        "the upgrade must time out: {}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(m.state(SERVICE), "active/running");
    assert_eq!(m.main_pid(), old);
    assert_eq!(serving_master(&m), old);
    assert_eq!(
        m.get("/").expect("GET after the timed-out upgrade").status,
        200
    );
    m.ok(&format!("systemctl stop {SERVICE}"));
    m.wait_state(SERVICE, "inactive/dead", secs(20));
}

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn usr2_then_winch_and_quit_hands_the_unit_to_the_new_master() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    let load = m.load(4);
    m.wait_served(&load, 20);
    let old_workers = m.worker_pids();
    m.ok(&format!(
        "systemctl kill -s USR2 --kill-whom=main {SERVICE}"
    ));
    let new = new_master_beside(&m, old);
    wait_log(&m, "both masters serving", "both masters serve now");
    // While both run, systemd still supervises its own child, the old master.
    assert_eq!(m.main_pid(), old);
    // gunicorn's dance: WINCH, the old workers finish and go, then QUIT.
    m.ok(&format!("kill -WINCH {old}"));
    m.wait("the old master's workers gone", secs(20), |m| {
        let left: Vec<i32> = old_workers
            .iter()
            .copied()
            .filter(|w| m.alive(*w))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    m.ok(&format!("kill -QUIT {old}"));
    wait_main_pid(&m, new);
    m.wait("the old master gone", secs(20), |m| {
        if m.alive(old) {
            Err("still running".into())
        } else {
            Ok(())
        }
    });
    m.wait_served(&load, 20);
    let (ok, failed, errors) = load.stop();
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    assert_eq!(m.state(SERVICE), "active/running");
    // The new master is systemd's to supervise: its death is seen and restarted.
    m.ok(&format!("kill -9 {new}"));
    m.wait("a restart after the new master was killed", secs(20), |m| {
        let n = m.prop(SERVICE, "NRestarts");
        let p = m.main_pid();
        if n == "1" && p != 0 && p != new && m.state(SERVICE) == "active/running" {
            Ok(())
        } else {
            Err(format!("NRestarts {n}, MainPID {p}, {}", m.state(SERVICE)))
        }
    });
}

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn usr2_rolled_back_or_its_new_master_killed_leaves_the_unit_on_the_old_master() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    for end in ["QUIT", "KILL"] {
        m.ok(&format!(
            "systemctl kill -s USR2 --kill-whom=main {SERVICE}"
        ));
        let new = new_master_beside(&m, old);
        m.wait("the new master ready", secs(20), |m| {
            let n = m.journal().matches("both masters serve now").count();
            if n > usize::from(end == "KILL") {
                Ok(())
            } else {
                Err(format!("{n} upgrades ready"))
            }
        });
        // The rollback: the old master's workers back (WINCH had not come), the
        // new master asked to go, or killed.
        m.ok(&format!("kill -{end} {new}"));
        m.wait("the new master gone", secs(20), |m| {
            if m.alive(new) {
                Err("still running".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(m.main_pid(), old, "after {end} of the new master");
        assert_eq!(m.state(SERVICE), "active/running", "after {end}");
        assert_eq!(serving_master(&m), old);
        assert_eq!(m.get("/").expect("GET after the rollback").status, 200);
    }
    assert_eq!(m.prop(SERVICE, "NRestarts"), "0");
    // And systemd still supervises it: a stop ends inactive.
    m.ok(&format!("systemctl stop {SERVICE}"));
    m.wait_state(SERVICE, "inactive/dead", secs(20));
}

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn master_signals_sent_to_the_whole_unit_spare_the_workers() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    // systemctl kill without --kill-whom signals every process of the unit: the
    // master acts on its signal, the workers (and the guardian) carry on. (WINCH
    // is left out: under systemd the master takes it as "stop your workers".)
    let running = |m: &Machine, what: &str| {
        for w in m.worker_pids() {
            let st = m.proc_state(w);
            assert!(
                matches!(st, Some('S' | 'R')),
                "worker {w} after {what}: {st:?}"
            );
        }
    };
    let count = |m: &Machine, n: usize, what: &str| {
        m.wait(what, secs(10), |m| {
            let got = m.worker_pids().len();
            if got == n {
                Ok(())
            } else {
                Err(format!("{got} workers"))
            }
        });
    };
    m.ok(&format!("systemctl kill -s TTIN {SERVICE}"));
    count(&m, 3, "a third worker after TTIN");
    running(&m, "TTIN");
    m.ok(&format!("systemctl kill -s TTOU {SERVICE}"));
    count(&m, 2, "one worker fewer after TTOU");
    running(&m, "TTOU");
    let workers = m.worker_pids();
    m.ok(&format!("systemctl kill -s USR2 {SERVICE}"));
    let new = new_master_beside(&m, old);
    wait_log(&m, "both masters serving", "both masters serve now");
    running(&m, "USR2");
    for w in &workers {
        assert!(m.alive(*w), "worker {w} of the old master died of USR2");
    }
    m.ok(&format!("kill -QUIT {new}"));
    assert_eq!(m.get("/").expect("GET").status, 200);
    assert_eq!(m.main_pid(), old);
}

// ------------------------------------------------------------------ watchdog

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn the_watchdog_is_fed_across_an_upgrade_and_fires_on_a_stopped_master() {
    // The shipped 60 s, shortened in a drop-in so the test waits seconds.
    let Some(m) = boot(Files::with_shipped().file(
        "/etc/systemd/system/arbiter@.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=2\n",
        0o644,
    )) else {
        return;
    };
    m.ok(&format!("systemctl start {SERVICE}"));
    let old = m.main_pid();
    m.ok("arbiterctl --name web upgrade");
    let new = serving_master(&m);
    wait_main_pid(&m, new);
    // Several watchdog periods go by without a fire.
    let until = std::time::Instant::now() + secs(5);
    while std::time::Instant::now() < until {
        assert_eq!(m.main_pid(), new, "the watchdog fired across the upgrade");
        assert_eq!(m.state(SERVICE), "active/running");
        std::thread::sleep(ms(250));
    }
    assert_eq!(m.prop(SERVICE, "NRestarts"), "0");
    assert_ne!(old, new);
    m.ok(&format!("kill -STOP {new}"));
    m.wait(
        "the watchdog to restart the stopped master",
        secs(20),
        |m| {
            let n = m.prop(SERVICE, "NRestarts");
            let p = m.main_pid();
            if n == "1" && p != new && p != 0 && m.state(SERVICE) == "active/running" {
                Ok(())
            } else {
                Err(format!("NRestarts {n}, MainPID {p}, {}", m.state(SERVICE)))
            }
        },
    );
    assert!(m.journal().contains("Watchdog timeout"));
}

// ------------------------------------------------------------------ socket activation

#[cfg_attr(
    not(has_systemd_tier),
    ignore = "the systemd tier needs root and /lib/systemd/systemd (apt-get install systemd)"
)]
#[test]
fn the_shipped_socket_unit_starts_the_service_with_the_shipped_config_and_keeps_the_queue() {
    let Some(m) = shipped() else { return };
    m.ok(&format!("systemctl start {SOCKET}"));
    assert_eq!(m.state(SERVICE), "inactive/dead");
    // The first connection starts the service, whose config binds the same address.
    let r = m.get("/").expect("GET through the socket unit");
    assert_eq!(r.status, 200, "{r:?}");
    m.wait_state(SERVICE, "active/running", secs(10));
    let status = status_json(&m);
    let listeners = status["master"]["listeners"]
        .as_array()
        .expect("listeners")
        .clone();
    assert_eq!(
        listeners.len(),
        1,
        "one listener, the inherited one: {status}"
    );
    assert_eq!(listeners[0]["inherited"], "systemd", "{status}");
    let text = m.ok("arbiterctl --name web status");
    assert!(
        text.contains("from systemd"),
        "status says the listener was inherited:\n{text}"
    );
    // A restart under load: systemd holds the socket, connections wait in its
    // queue while no master runs.
    let load = m.load(4);
    m.wait_served(&load, 20);
    m.ok(&format!("systemctl restart {SERVICE}"));
    m.wait_served(&load, 20);
    let (ok, failed, errors) = load.stop();
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed across the restart: {errors:?}",
        ok + failed
    );
    // A stop keeps the socket; the next connection starts the service again.
    m.ok(&format!("systemctl stop {SERVICE}"));
    assert_eq!(m.state(SOCKET), "active/listening");
    assert_eq!(m.get("/").expect("GET after the stop").status, 200);
    m.wait_state(SERVICE, "active/running", secs(10));
    // An upgrade keeps serving on the socket.
    let old = m.main_pid();
    m.ok("arbiterctl --name web upgrade");
    m.wait("MainPID to move", secs(20), |m| {
        let p = m.main_pid();
        if p != old && p != 0 {
            Ok(())
        } else {
            Err(format!("{p}"))
        }
    });
    assert_eq!(m.get("/").expect("GET after the upgrade").status, 200);
}
