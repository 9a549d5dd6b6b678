//! gunicorn's control protocol (`gunicornc`) on arbiterd's control socket: framed
//! requests written from Rust, then the real `gunicornc` client.
//!
//! The `gunicornc` tests run the client found in `$GUNICORNC` or on `PATH` and are
//! skipped (with a message) without it. CI installs it with
//! `python3 -m pip install 'gunicorn>=25.1'` (checked with gunicorn 27.0.1).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::harness::*;

// ------------------------------------------------------------------ a framed client

/// One gunicornc-framed connection: 4-byte big-endian length, then JSON.
struct Gc {
    stream: UnixStream,
    next_id: u64,
}

impl Gc {
    fn connect(d: &Daemon) -> Gc {
        let stream = UnixStream::connect(d.control_path())
            .unwrap_or_else(|e| d.fail(&format!("connect to the control socket: {e}")));
        stream.set_read_timeout(Some(LONG)).unwrap();
        stream.set_write_timeout(Some(SHORT)).unwrap();
        Gc { stream, next_id: 0 }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("write to the control socket");
    }

    fn send(&mut self, message: &Value) {
        let body = message.to_string();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body.as_bytes());
        self.send_raw(&out);
    }

    /// One answer frame; `None` at EOF.
    fn read(&mut self) -> Option<Value> {
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.stream.read(&mut head[got..]) {
                Ok(0) if got == 0 => return None,
                Ok(0) => panic!("EOF inside a length prefix"),
                Ok(n) => got += n,
                Err(e) => panic!("read an answer: {e}"),
            }
        }
        let len = u32::from_be_bytes(head) as usize;
        assert!(len < 1 << 24, "answer length {len}");
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .expect("read an answer body");
        Some(serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body)
            )
        }))
    }

    /// Send `command` as gunicornc does, check the id is echoed, return the answer.
    fn call(&mut self, command: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({"id": id, "command": command, "args": []}));
        let a = self
            .read()
            .unwrap_or_else(|| panic!("{command:?}: connection closed without an answer"));
        assert_eq!(a["id"], id, "{command:?}: id not echoed: {a}");
        a
    }

    /// `call`, which must succeed; its `data`.
    fn ok(&mut self, command: &str) -> Value {
        let a = self.call(command);
        assert_eq!(a["status"], "ok", "{command:?}: {a}");
        a["data"].clone()
    }

    /// The connection was closed by the master (after whatever it said).
    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes {rest:?}"),
            // A reset also means closed.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

fn pid_set(pids: impl IntoIterator<Item = i32>) -> BTreeSet<i32> {
    pids.into_iter().collect()
}

fn listed_pids(workers: &Value) -> BTreeSet<i32> {
    workers
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {workers}"))
        .iter()
        .map(|w| w["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {w}")) as i32)
        .collect()
}

/// `show workers` until it lists exactly the master's live children, `n` of them.
fn wait_listed(d: &Daemon, gc: &mut Gc, n: usize) -> Value {
    d.wait_until(
        LONG,
        &format!("`show workers` listing {n} live workers"),
        || {
            let data = gc.ok("show workers");
            let live = pid_set(d.workers());
            let listed = listed_pids(&data["workers"]);
            if listed.len() == n && listed == live && data["count"] == n {
                Ok(data)
            } else {
                Err(format!("listed {data}, live {live:?}"))
            }
        },
    )
}

// ------------------------------------------------------------------ framed, from Rust

#[test]
fn show_workers_and_scale() {
    let d = Daemon::start(["-w", "2"]);
    let first = pid_set(d.wait_workers(2).iter().map(|w| w.pid));
    let mut gc = Gc::connect(&d);

    // Every request below goes over this one connection, as gunicornc does.
    let data = wait_listed(&d, &mut gc, 2);
    assert_eq!(listed_pids(&data["workers"]), first);
    let ages: Vec<i64> = data["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            for key in ["pid", "age", "booted", "aborted", "last_heartbeat"] {
                assert!(w.get(key).is_some(), "no {key:?} in {w}");
            }
            assert_eq!(w.as_object().unwrap().len(), 5, "{w}");
            assert_eq!(w["aborted"], false, "{w}");
            w["age"].as_i64().unwrap()
        })
        .collect();
    assert!(
        ages.windows(2).all(|p| p[0] < p[1]),
        "sorted by age: {data}"
    );
    // The built-in worker says READY=1; the master reports it as booted.
    d.wait_until(SHORT, "both workers booted", || {
        let data = gc.ok("show workers");
        let booted = data["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["booted"] == true);
        if booted {
            Ok(())
        } else {
            Err(data.to_string())
        }
    });

    assert_eq!(
        gc.ok("worker add 1"),
        json!({"added": 1, "previous": 2, "total": 3})
    );
    d.wait_workers(3);
    let data = wait_listed(&d, &mut gc, 3);
    assert!(listed_pids(&data["workers"]).is_superset(&first), "{data}");

    assert_eq!(
        gc.ok("worker remove 1"),
        json!({"removed": 1, "previous": 3, "total": 2})
    );
    d.wait_workers(2);
    wait_listed(&d, &mut gc, 2);
    // Never below one, as gunicorn.
    assert_eq!(
        gc.ok("worker remove 5"),
        json!({"removed": 1, "previous": 2, "total": 1})
    );
    d.wait_workers(1);
    assert_eq!(
        gc.ok("WORKER ADD"),
        json!({"added": 1, "previous": 1, "total": 2})
    );
    d.wait_workers(2);

    let stats = gc.ok("show stats");
    assert_eq!(stats["pid"], d.pid(), "{stats}");
    assert_eq!(stats["workers_target"], 2, "{stats}");
    assert!(stats["workers_spawned"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["uptime"].as_f64().unwrap() >= 0.0, "{stats}");
    assert_eq!(stats["reloads"], 0, "{stats}");
    assert_eq!(stats["dirty_arbiter_pid"], Value::Null, "{stats}");

    let port = d.port();
    assert_eq!(
        gc.ok("show listeners"),
        json!({"listeners": [
            {"address": format!("http://127.0.0.1:{port}"), "fd": null, "type": "tcp"}
        ], "count": 1})
    );
    let config = gc.ok("show config");
    assert_eq!(
        config["bind"],
        json!([format!("127.0.0.1:{port}")]),
        "{config}"
    );
    assert_eq!(config["workers"], 2, "{config}");
    assert_eq!(config["timeout"], 30, "{config}");

    let all = gc.ok("show all");
    assert_eq!(
        all["arbiter"],
        json!({"pid": d.pid(), "type": "arbiter", "role": "master"})
    );
    assert_eq!(all["web_worker_count"], 2, "{all}");
    assert_eq!(all["dirty_arbiter"], Value::Null, "{all}");
    assert_eq!(
        gc.ok("show dirty"),
        json!({"enabled": false, "pid": null, "workers": [], "apps": []})
    );
}

/// `worker add` past `--max-workers` is refused in one line naming the limit, and
/// adds nothing; up to the limit it adds as ever.
#[test]
fn worker_add_past_max_workers_is_refused() {
    let d = Daemon::start(["-w", "2", "--max-workers", "3"]);
    d.wait_workers(2);
    let mut gc = Gc::connect(&d);
    assert_eq!(
        gc.call("worker add 5"),
        json!({"id": gc.next_id, "status": "error",
               "error": "Command failed: scale 7: more than --max-workers (3)"})
    );
    assert_eq!(gc.ok("show stats")["workers_target"], 2);
    assert_eq!(
        gc.ok("worker add 1"),
        json!({"added": 1, "previous": 2, "total": 3})
    );
    let three: Vec<i32> = d.wait_workers(3).iter().map(|w| w.pid).collect();
    assert_eq!(
        gc.call("worker add"),
        json!({"id": gc.next_id, "status": "error",
               "error": "Command failed: scale 4: more than --max-workers (3)"})
    );
    assert_eq!(gc.ok("show stats")["workers_target"], 3);
    d.assert_workers_stay(&three, ms(300));
}

#[test]
fn kill_reload_reopen_and_errors() {
    let d = Daemon::start(["-w", "1"]);
    let pid0 = d.wait_workers(1)[0].pid;
    let mut gc = Gc::connect(&d);

    assert_eq!(
        gc.ok(&format!("worker kill {pid0}")),
        json!({"success": true, "killed": pid0})
    );
    let pid1 = d.wait_workers_where("the killed worker replaced", 1, |w| w.pid != pid0)[0].pid;
    // gunicorn answers a kill of a stranger with data, not an error.
    assert_eq!(
        gc.ok(&format!("worker kill {}", d.pid())),
        json!({"success": false, "error": format!("Worker {} not found", d.pid())})
    );

    // Errors in gunicorn's words; the connection stays usable.
    for (command, error) in [
        (
            "frobnicate",
            "Invalid argument: Unknown command: frobnicate",
        ),
        (
            "show",
            "Invalid argument: Missing show target (all|workers|dirty|config|stats|listeners)",
        ),
        (
            "worker add many",
            "Invalid argument: invalid literal for int() with base 10: 'many'",
        ),
        (
            "worker kill",
            "Invalid argument: Missing PID for worker kill",
        ),
        ("   ", "Empty command"),
    ] {
        assert_eq!(
            gc.call(command),
            json!({"id": gc.next_id, "status": "error", "error": error})
        );
    }
    let help = gc.ok("help");
    assert_eq!(
        help["commands"]["show workers"],
        "List HTTP workers with their status"
    );

    // Our reload answers once it is done: the old worker is gone by then.
    assert_eq!(gc.ok("reload"), json!({"status": "reloading"}));
    let after = pid_set(d.workers());
    assert!(
        !after.contains(&pid1),
        "old worker {pid1} still there: {after:?}"
    );
    d.wait_workers(1);
    assert_eq!(gc.ok("show stats")["reloads"], 1);
    assert_eq!(gc.ok("reopen"), json!({"status": "reopening"}));

    // JSON-line clients still share the socket.
    let mut line = UnixStream::connect(d.control_path()).unwrap();
    line.set_read_timeout(Some(SHORT)).unwrap();
    line.write_all(b"{\"v\":1,\"cmd\":\"ping\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&line), &mut answer).unwrap();
    assert!(answer.contains("\"pong\""), "{answer}");
}

#[test]
fn garbage_is_answered_then_closed() {
    let d = Daemon::start(["-w", "1"]);
    d.wait_workers(1);

    // A length beyond the limit: refused on the header alone.
    let mut gc = Gc::connect(&d);
    gc.send_raw(&0x00ff_ffffu32.to_be_bytes());
    let a = gc.read().expect("an answer before the close");
    assert_eq!(a["status"], "error", "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("Message too large"),
        "{a}"
    );
    gc.assert_closed();

    // Not JSON, not UTF-8, not an object.
    for body in [
        &b"show workers"[..],
        b"\xff\xfe\xfd",
        b"[\"show\", \"workers\"]",
    ] {
        let mut gc = Gc::connect(&d);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        gc.send_raw(&frame);
        let a = gc.read().expect("an answer before the close");
        assert_eq!(a["status"], "error", "{a}");
        assert_eq!(a["id"], 0, "{a}");
        gc.assert_closed();
    }

    // A frame cut short by the client: nothing breaks.
    let mut gc = Gc::connect(&d);
    gc.send_raw(&[0, 0, 0, 50, b'{']);
    drop(gc);

    // Byte by byte, then two frames at once: both answered in order.
    let mut gc = Gc::connect(&d);
    let body = br#"{"id": 9, "command": "show stats"}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    for b in &frame {
        gc.send_raw(&[*b]);
        std::thread::sleep(ms(1));
    }
    let a = gc.read().unwrap();
    assert_eq!(
        (a["id"].clone(), a["status"].clone()),
        (json!(9), json!("ok")),
        "{a}"
    );
    gc.send_raw(&[frame.clone(), frame].concat());
    assert_eq!(gc.read().unwrap()["id"], 9);
    assert_eq!(gc.read().unwrap()["data"]["pid"], d.pid());

    // A quick shutdown answers, then the master exits.
    assert_eq!(
        gc.ok("shutdown quick"),
        json!({"status": "shutting_down", "mode": "quick"})
    );
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit status {st}");
}

// ------------------------------------------------------------------ the real gunicornc

/// The `gunicornc` to test with: `$GUNICORNC`, or the first on `PATH`.
fn gunicornc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GUNICORNC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("gunicornc"))
        .find(|p| p.is_file())
}

fn skip_without_gunicornc() -> Option<PathBuf> {
    let found = gunicornc();
    if found.is_none() {
        tool_missing(
            "gunicornc is not installed (python3 -m pip install 'gunicorn>=25.1', \
             or set GUNICORNC=/path/to/gunicornc)",
        );
    }
    found
}

/// `gunicornc -s SOCKET ARGS` in one-shot mode.
fn run_gc(gc: &Path, d: &Daemon, args: &[&str]) -> Outcome {
    Run::new(gc)
        .arg("-s")
        .arg(d.control_path())
        .args(args)
        .timeout(LONG)
        .run()
}

fn ok_run(what: &str, out: &Outcome) {
    assert_eq!(out.code(), Some(0), "{what}: {out:?}");
    assert!(out.leftovers.is_empty(), "{what}: {out:?}");
}

#[test]
#[cfg_attr(
    not(has_gunicornc),
    ignore = "gunicornc is not installed (python3 -m pip install 'gunicorn>=25.1')"
)]
fn real_gunicornc_one_shot() {
    let Some(gc) = skip_without_gunicornc() else {
        return;
    };
    let d = Daemon::start(["-w", "2"]);
    let pids = pid_set(d.wait_workers(2).iter().map(|w| w.pid));

    let out = run_gc(&gc, &d, &["-c", "show workers"]);
    ok_run("show workers", &out);
    assert!(
        out.stdout
            .starts_with("PID        AGE    BOOTED   LAST_BEAT\n"),
        "{out:?}"
    );
    for pid in &pids {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("{pid} "))),
            "worker {pid} not listed: {out:?}"
        );
    }
    assert!(out.stdout.contains("Total: 2 workers"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "worker add 1"]);
    ok_run("worker add 1", &out);
    let added: Value = serde_json::from_str(&out.stdout).expect("JSON printed");
    assert_eq!(added, json!({"added": 1, "previous": 2, "total": 3}));
    d.wait_workers(3);

    let out = run_gc(&gc, &d, &["-j", "-c", "show stats"]);
    ok_run("show stats -j", &out);
    let stats: Value = serde_json::from_str(&out.stdout).expect("JSON printed");
    assert_eq!(stats["pid"], d.pid(), "{stats}");
    assert_eq!(stats["workers_target"], 3, "{stats}");

    let out = run_gc(&gc, &d, &["-c", "show stats"]);
    ok_run("show stats", &out);
    assert!(
        out.stdout
            .contains(&format!("PID:              {}\n", d.pid())),
        "{out:?}"
    );
    assert!(out.stdout.contains("Workers target:   3\n"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "show listeners"]);
    ok_run("show listeners", &out);
    let addr = format!("http://127.0.0.1:{}", d.port());
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&addr) && l.contains(" tcp ")),
        "{out:?}"
    );

    let out = run_gc(&gc, &d, &["-c", "show config"]);
    ok_run("show config", &out);
    assert!(out.stdout.contains("workers: 3\n"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "show all"]);
    ok_run("show all", &out);
    assert!(out.stdout.contains("WEB WORKERS (3)"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "help"]);
    ok_run("help", &out);
    assert!(out.stdout.contains("worker add [N]"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "worker kill 1"]);
    ok_run("worker kill 1", &out);
    assert!(out.stdout.contains("Worker 1 not found"), "{out:?}");

    let out = run_gc(&gc, &d, &["-c", "frobnicate"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        "Error: Invalid argument: Unknown command: frobnicate",
        "{out:?}"
    );

    let out = run_gc(&gc, &d, &["-c", "reload"]);
    ok_run("reload", &out);
    assert!(out.stdout.contains("\"reloading\""), "{out:?}");
    d.wait_workers(3);

    let out = run_gc(&gc, &d, &["-c", "shutdown"]);
    ok_run("shutdown", &out);
    let said: Value = serde_json::from_str(&out.stdout).expect("JSON printed");
    assert_eq!(said, json!({"status": "shutting_down", "mode": "graceful"}));
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit status {st}");
}

/// A child in its own process group, killed with its group when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(
    not(has_gunicornc),
    ignore = "gunicornc is not installed (python3 -m pip install 'gunicorn>=25.1')"
)]
fn real_gunicornc_interactive() {
    let Some(gc) = skip_without_gunicornc() else {
        return;
    };
    let d = Daemon::start(["-w", "1"]);
    let pid = d.wait_workers(1)[0].pid;
    // gunicornc keeps its history in $HOME: a temp dir.
    let home = short_tempdir();
    // Several commands on one connection, as the interactive mode keeps it.
    let mut cmd = Command::new(&gc);
    cmd.arg("-s")
        .arg(d.control_path())
        .env("HOME", home.path())
        .env(TAG_VAR, d.tag())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = Group(cmd.spawn().expect("spawn gunicornc"));
    let script = "show workers\nworker add 2\nshow stats\nbogus\nworker remove\nquit\n";
    child
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < LONG, "gunicornc did not finish");
        std::thread::sleep(ms(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let seen = format!("status {status}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(status.success(), "{seen}");
    assert!(
        out.contains(&format!("Connected to {}", d.control_path().display())),
        "{seen}"
    );
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{pid} "))),
        "{seen}"
    );
    assert!(out.contains("\"added\": 2"), "{seen}");
    assert!(out.contains("Workers target:   3"), "{seen}");
    assert!(
        out.contains("Error: Invalid argument: Unknown command: bogus"),
        "{seen}"
    );
    assert!(out.contains("\"removed\": 1"), "{seen}");
    assert!(!out.contains("Connection lost"), "{seen}");
    d.wait_workers(2);
}
