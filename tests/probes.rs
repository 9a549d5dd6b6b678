//! `--metrics-bind`'s probes on their own: `/livez` says 503 to a probe that
//! waited out a stopped master, `/readyz` wants the target count or
//! `--ready-min`; bad values of the new flags are one line and a status.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::drain::{Continue, get, metrics_at};
use crate::harness::*;

#[test]
fn livez_says_503_to_a_probe_that_waited_out_a_stopped_master() {
    let d = Daemon::start(["-w", "1", "--metrics-bind", "127.0.0.1:0"]);
    let metrics = metrics_at(&d);
    let (status, body) = get(metrics, "/livez").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("live: "), "{body}");
    kill(Pid::from_raw(d.pid()), Signal::SIGSTOP).unwrap();
    let resume = Continue(d.pid());
    d.wait_until(SHORT, "the master stopped", || {
        match proc_stat(d.pid()).map(|s| s.state) {
            Some('T') => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The kernel completes the handshake and keeps the request for the master.
    let mut probe = TcpStream::connect(metrics).unwrap();
    probe.set_read_timeout(Some(LONG)).unwrap();
    probe
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // The stall itself, a span of time rather than a state to wait for: past
    // the 5 s bound (arbiter/probes.rs, LIVENESS_BOUND).
    std::thread::sleep(ms(5500));
    drop(resume);
    let mut answer = String::new();
    probe.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("not live: this request waited ") && answer.contains(" (bound 5 s)"),
        "{answer}"
    );
    // The loop turns again: the next probe is answered live.
    let (status, body) = get(metrics, "/livez").unwrap();
    assert_eq!(status, 200, "{body}");
    // HEAD is answered too, without a body.
    let mut head = TcpStream::connect(metrics).unwrap();
    head.set_read_timeout(Some(SHORT)).unwrap();
    head.write_all(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    head.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
}

/// A worker command for slot 0 that serves (the built-in worker, which says
/// READY=1) and for any other slot one that never gets ready.
fn half_ready() -> Vec<OsString> {
    let script = format!(
        "if [ \"$ARBITER_SLOT\" = 0 ]; then exec {ARBITERD} {}; fi; exec sleep 1000",
        arbiter_daemon::BUILTIN_WORKER_ARG
    );
    ["--ready", "notify", "--", "sh", "-c", &script]
        .into_iter()
        .map(OsString::from)
        .collect()
}

#[test]
fn readyz_wants_the_target_count_or_ready_min() {
    let strict = Daemon::builder()
        .args(["-w", "2", "--metrics-bind", "127.0.0.1:0"])
        .args(half_ready())
        .start();
    let lenient = Daemon::builder()
        .args([
            "-w",
            "2",
            "--ready-min",
            "1",
            "--metrics-bind",
            "127.0.0.1:0",
        ])
        .args(half_ready())
        .start();
    let (s, l) = (metrics_at(&strict), metrics_at(&lenient));
    lenient.wait_until(LONG, "ready with 1 of 2", || match get(l, "/readyz")? {
        (200, b) if b == "ready: 1/2 workers ready" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    strict.wait_until(LONG, "slot 0 serving", || {
        let (status, _) = get(strict.addr(), "/")?;
        (status == 200).then_some(()).ok_or(format!("{status}"))
    });
    assert_eq!(
        get(s, "/readyz").unwrap(),
        (
            503,
            "not ready: booting, 1/2 workers ready, 2 needed".to_string()
        )
    );
    // Not a path of ours, nor a method.
    assert_eq!(get(s, "/healthz").unwrap().0, 404);
}

#[test]
fn a_bad_ready_min_is_one_line_and_status_1() {
    for (value, says) in [
        ("0", "--ready-min must be from 1 to --max-workers (1024)"),
        ("2000", "--ready-min must be from 1 to --max-workers (1024)"),
    ] {
        let out = Run::arbiterd().args(["--ready-min", value]).run();
        assert_eq!(out.code(), Some(1), "{value}: {out:?}");
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out:?}");
        assert!(out.stderr.contains(says), "{value}: {out:?}");
    }
    let out = Run::arbiterd().args(["--shutdown-delay=-1"]).run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--shutdown-delay"), "{out:?}");
    let out = Run::arbiterd().args(["--shutdown-delay", "soon"]).run();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert_eq!(out.signal(), None);
}
