//! Capacity: the accept queue in front of the workers, and `--workers MIN..MAX`
//! adapting the count to it.
//!
//! The load is made deterministic with `workers/gated_http.py`: its workers accept
//! nothing until a gate file exists, so connections wait in the listener's accept
//! queue exactly as long as the test wants.

use std::net::TcpStream;
use std::path::PathBuf;

use serde_json::Value;

use crate::harness::*;
use crate::health::status_at;

/// `arbiterd -w WORKERS -- python3 gated_http.py GATE`.
fn gated_daemon(workers: &str) -> (Daemon, PathBuf) {
    let b = Daemon::builder();
    let gate = b.path("gate");
    let mut args: Vec<String> = vec!["-w".into(), workers.into(), "--".into()];
    args.push(python3().to_string_lossy().into_owned());
    args.push(
        test_file("workers/gated_http.py")
            .to_string_lossy()
            .into_owned(),
    );
    args.push(gate.to_string_lossy().into_owned());
    (b.args(&args).start(), gate)
}

/// `n` workers ready, by the master's word: an HTTP probe would wait in the queue.
fn wait_ready(d: &Daemon, n: u64) {
    d.wait_until(LONG, &format!("{n} workers ready"), || {
        let m = status(d)["master"].clone();
        if m["ready"] == n && m["total"] == n {
            Ok(())
        } else {
            Err(format!("{m}"))
        }
    });
}

fn status(d: &Daemon) -> Value {
    status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e))
}

fn queue(st: &Value) -> (u64, u64) {
    let l = &st["master"]["listeners"][0];
    (
        l["queue"].as_u64().unwrap_or(u64::MAX),
        l["queue_limit"].as_u64().unwrap_or(0),
    )
}

/// `n` connections that wait in the queue (their handshakes complete at once).
fn connect(d: &Daemon, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(d.addr()).unwrap_or_else(|e| d.fail(&format!("{e}"))))
        .collect()
}

#[test]
fn the_accept_queue_is_seen_rising_while_workers_are_held_and_falling_after() {
    let (d, gate) = gated_daemon("2");
    wait_ready(&d, 2);
    let st = status(&d);
    assert_eq!(queue(&st), (0, 2048), "an idle queue: {}", st["master"]);
    let clients = connect(&d, 5);
    d.wait_until(SHORT, "5 connections in the queue", || {
        let q = queue(&status(&d));
        if q.0 == 5 {
            Ok(())
        } else {
            Err(format!("{q:?}"))
        }
    });
    let out = d.ctl(["status"]);
    assert!(
        out.stdout.contains("(queue 5/2048)"),
        "the table's header shows the queue: {out:?}"
    );
    let metrics = d.ctl(["metrics"]).stdout;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("arbiter_listen_queue{") && l.ends_with(" 5")),
        "{metrics}"
    );
    std::fs::write(&gate, "").unwrap();
    for mut c in clients {
        let r = exchange(&mut c, "localhost", "/").unwrap_or_else(|e| d.fail(&format!("{e}")));
        assert_eq!(r.status, 200);
    }
    d.wait_until(SHORT, "the queue empty again", || {
        let q = queue(&status(&d));
        if q.0 == 0 {
            Ok(())
        } else {
            Err(format!("{q:?}"))
        }
    });
}

#[test]
fn autoscaling_goes_from_min_to_max_under_a_queue_and_back_when_idle() {
    let (d, gate) = gated_daemon("1..3");
    wait_ready(&d, 1);
    let target = |st: &Value| st["master"]["target"].as_u64().unwrap_or(0);
    let mut seen = Vec::new();
    let mut watch = |st: &Value| {
        let t = target(st);
        assert!(
            (1..=3).contains(&t),
            "target {t} outside 1..3: {}",
            st["master"]
        );
        if seen.last() != Some(&t) {
            seen.push(t);
        }
    };
    // A queue that stays: one worker more per second, up to MAX and no further.
    let _clients = connect(&d, 8);
    d.wait_until(LONG, "3 workers for a queue that stays", || {
        let st = status(&d);
        watch(&st);
        if target(&st) == 3 && d.workers().len() == 3 {
            Ok(())
        } else {
            Err(format!("target {}, queue {:?}", target(&st), queue(&st)))
        }
    });
    let st = status(&d);
    assert_eq!(st["master"]["autoscale"]["ups"], 2, "{}", st["master"]);
    // Open the gate: the queue drains, and after the idle window the count goes
    // back to MIN, one at a time.
    std::fs::write(&gate, "").unwrap();
    d.wait_until(secs(60), "back to 1 worker once idle", || {
        let st = status(&d);
        watch(&st);
        if target(&st) == 1 && d.workers().len() == 1 {
            Ok(())
        } else {
            Err(format!("target {}, queue {:?}", target(&st), queue(&st)))
        }
    });
    assert_eq!(seen, [1, 2, 3, 2, 1], "one step at a time, no flapping");
    let st = status(&d);
    assert_eq!(st["master"]["autoscale"]["downs"], 2, "{}", st["master"]);
    assert!(
        d.log_lines_with("Autoscale: workers").len() == 4,
        "every decision is logged with its reason"
    );
    // A count set by hand stops adapting; a range turns it back on.
    let out = d.ctl(["scale", "2"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(status(&d)["master"]["autoscale"].is_null());
    let out = d.ctl(["scale", "1..4"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("adapting within 1..4"), "{out:?}");
    assert_eq!(status(&d)["master"]["autoscale"]["max"], 4);
}

#[test]
fn autoscaling_adds_a_worker_when_every_scoreboard_worker_is_busy() {
    // No queue at all: the built-in worker takes every connection at once, but
    // says on the scoreboard that it has a request in hand.
    let d = Daemon::start(["-w", "1..2"]);
    wait_ready(&d, 1);
    let held = spawn_get(d.listener(), "/sleep?ms=5000", LONG);
    d.wait_until(LONG, "a second worker for a busy one", || {
        let m = status(&d)["master"].clone();
        if m["target"] == 2 {
            Ok(())
        } else {
            Err(format!("{m}"))
        }
    });
    assert!(
        d.log_lines_with("every worker was busy").len() == 1,
        "the reason is logged: {}",
        d.log()
    );
    assert_eq!(queue(&status(&d)).0, 0, "there was no queue to see");
    assert_eq!(held.join().map(|r| r.status).ok(), Some(200));
}

// ------------------------------------------------------------------ top

#[test]
fn top_once_prints_one_plain_frame_with_queues_and_workers() {
    let d = Daemon::start(["-w", "3"]);
    wait_ready(&d, 3);
    let out = d.ctl(["top", "--once"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].contains(&format!("(pid {})", d.pid())) && lines[0].contains("3/3 ready"),
        "{out:?}"
    );
    assert!(lines.iter().any(|l| l.starts_with("LISTENER")), "{out:?}");
    let addr = format!("http://{}", d.addr());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&addr) && l.split_whitespace().nth(1) == Some("0")),
        "the listener with its empty queue: {out:?}"
    );
    let header = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some("ID"))
        .unwrap_or_else(|| d.fail(&format!("no worker header: {out:?}")));
    let workers = &lines[header + 1..];
    assert_eq!(workers.len(), 3, "{out:?}");
    for w in workers {
        let f: Vec<&str> = w.split_whitespace().collect();
        assert_eq!((f[3], f[4]), ("ready", "idle"), "{w:?}");
    }
    assert!(
        !out.stdout.contains('\x1b'),
        "no terminal codes off a terminal"
    );
}

#[test]
fn top_off_a_terminal_prints_frame_after_frame() {
    let d = Daemon::start(["-w", "1"]);
    wait_ready(&d, 1);
    // Until killed at the timeout, as `watch` would run.
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(d.control_path())
        .args(["top", "--interval", "0.2"])
        .timeout(secs(2))
        .run();
    let frames = out.stdout.matches("LISTENER").count();
    assert!(frames >= 3, "{frames} frames in 2 s: {out:?}");
}

#[test]
#[cfg_attr(
    not(has_script),
    ignore = "script(1) is not installed (apt-get install util-linux)"
)]
fn top_on_a_terminal_quits_on_q_and_gives_the_terminal_back() {
    // `script` gives arbiterctl a pseudo-terminal; what we type goes to its stdin.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        return tool_missing("script(1) is not installed (apt-get install util-linux)");
    }
    let d = Daemon::start(["-w", "2"]);
    wait_ready(&d, 2);
    let cmd = format!(
        "{} --control {} top",
        ARBITERCTL,
        d.control_path().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env(TAG_VAR, d.tag())
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    d.wait_until(SHORT, "a frame drawn on the alternate screen", || {
        let t = text();
        if t.contains("\x1b[?1049h") && t.contains("LISTENER") {
            Ok(())
        } else {
            Err(t)
        }
    });
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"q").unwrap();
    let status = d.wait_until(SHORT, "top to quit on q", || {
        child.try_wait().unwrap().ok_or_else(text)
    });
    assert!(status.success(), "{status}: {}", text());
    reader.join().unwrap();
    let t = text();
    assert!(
        t.ends_with("\x1b[?25h\x1b[?1049l") || t.contains("\x1b[?25h\x1b[?1049l"),
        "the cursor and the screen are given back: {t:?}"
    );
}
