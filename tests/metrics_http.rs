//! `--metrics-bind`: Prometheus scrapes `/metrics` from the master itself, over
//! TCP or a unix socket, and gets exactly what `arbiterctl metrics` prints; the
//! server is bounded (silent clients, too many clients) and never holds up the
//! master; a bad address fails at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::harness::*;

/// Where the master serves metrics, from its `Metrics at:` line.
fn metrics_at(d: &Daemon) -> Listener {
    let line = d.wait_log("the `Metrics at:` line", |l| l.contains("Metrics at: "));
    let at = line.split("Metrics at: ").nth(1).unwrap().trim();
    Listener::parse(at.strip_suffix("/metrics").unwrap_or(at))
}

/// A stream to `target` with a read timeout, as a `Read + Write`.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn open(target: &Listener) -> Conn {
        let c = match target {
            Listener::Tcp(a) => Conn::Tcp(TcpStream::connect(a).expect("connect")),
            Listener::Unix(p) => Conn::Unix(UnixStream::connect(p).expect("connect")),
            Listener::Other(s) => panic!("cannot connect to {s}"),
        };
        c.read_timeout(LONG);
        c
    }

    fn read_timeout(&self, t: std::time::Duration) {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }

    /// Everything until the server closes.
    fn read_all(&mut self) -> std::io::Result<String> {
        let mut out = Vec::new();
        match self {
            Conn::Tcp(s) => s.read_to_end(&mut out)?,
            Conn::Unix(s) => s.read_to_end(&mut out)?,
        };
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn send(&mut self, bytes: &[u8]) {
        match self {
            Conn::Tcp(s) => s.write_all(bytes).unwrap(),
            Conn::Unix(s) => s.write_all(bytes).unwrap(),
        }
    }
}

/// Send `request` as is and read the whole answer (the server closes).
fn raw(target: &Listener, request: &[u8]) -> String {
    let mut c = Conn::open(target);
    c.send(request);
    c.read_all().expect("read the answer")
}

/// Split an answer into its status line, headers (lower-case names) and body.
fn split(answer: &str) -> (String, BTreeMap<String, String>, String) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {answer:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn scrape(target: &Listener) -> String {
    let answer = raw(
        target,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: Prometheus/2.53.0\r\n\r\n",
    );
    let (status, headers, body) = split(&answer);
    assert_eq!(status, "HTTP/1.1 200 OK", "{answer}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{answer}"
    );
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    assert_eq!(headers["content-length"], body.len().to_string());
    body
}

fn ctl_metrics(d: &Daemon) -> String {
    let out = d.ctl(["metrics"]);
    if out.code() != Some(0) {
        d.fail(&format!("arbiterctl metrics: {out:?}"));
    }
    out.stdout
}

/// Families whose values move between two calls.
const MOVING: &[&str] = &[
    "arbiter_master_uptime_seconds",
    "arbiter_worker_up_seconds",
    "arbiter_worker_heartbeat_age_seconds",
    "arbiter_worker_cpu_seconds_total",
    "arbiter_worker_rss_bytes",
];

/// The text with the values of [`MOVING`] families blanked: the rest must match
/// line for line (names, help, types, labels, order, values).
fn steady(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let moving = !l.starts_with('#')
                && MOVING
                    .iter()
                    .any(|m| l.starts_with(&format!("{m}{{")) || l.starts_with(&format!("{m} ")));
            match (moving, l.rsplit_once(' ')) {
                (true, Some((series, _))) => format!("{series} _"),
                _ => l.to_string(),
            }
        })
        .collect()
}

/// Wait until two scrapes in a row agree with `arbiterctl metrics` between them
/// (a worker may still be settling right after start).
fn assert_same_as_ctl(d: &Daemon, at: &Listener) -> String {
    d.wait_until(SHORT, "/metrics to equal `arbiterctl metrics`", || {
        let before = scrape(at);
        let ctl = ctl_metrics(d);
        let after = scrape(at);
        if steady(&before) == steady(&ctl) && steady(&ctl) == steady(&after) {
            Ok(before)
        } else {
            Err(format!("/metrics:\n{before}\narbiterctl metrics:\n{ctl}"))
        }
    })
}

#[test]
fn scraped_over_tcp_it_is_what_arbiterctl_metrics_prints() {
    let d = Daemon::start(["-n", "web", "-w", "2", "--metrics-bind", "127.0.0.1:0"]);
    d.wait_workers(2);
    let at = metrics_at(&d);
    assert!(at.tcp().is_some_and(|a| a.port() != 0), "{at:?}");
    let body = assert_same_as_ctl(&d, &at);
    assert!(
        body.contains(&format!(
            "arbiter_master_info{{arbiter=\"web\",version=\"{}\",pid=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            d.pid()
        )),
        "{body}"
    );
    // HTTP/1.0 and HEAD too.
    let old = raw(&at, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(old.starts_with("HTTP/1.1 200 OK\r\n"), "{old}");
    let head = raw(&at, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, headers, rest) = split(&head);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(rest.is_empty(), "{head}");
    assert!(headers["content-length"].parse::<usize>().unwrap() > 0);

    let Some(samples) = crate::table::parse_with_prometheus_client(&body) else {
        return;
    };
    let series = body.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples.len(), series, "the parser read every sample");
    let mut seen = BTreeSet::new();
    for s in &samples {
        assert_eq!(s[2]["arbiter"], "web", "{s}");
        assert!(
            seen.insert((s[1].to_string(), s[2].to_string())),
            "{s} twice"
        );
    }
    let ready = samples
        .iter()
        .find(|s| s[1] == "arbiter_workers_ready")
        .unwrap();
    assert_eq!(ready[3], 2.0, "{ready}");
}

#[test]
fn scraped_over_a_unix_socket_and_the_file_goes_with_the_master() {
    let b = Daemon::builder();
    let path = b.path("metrics.sock");
    let d = b
        .args(["-w", "1", "--metrics-bind"])
        .arg(format!("unix:{}", path.display()))
        .start();
    d.wait_workers(1);
    let at = metrics_at(&d);
    assert!(matches!(&at, Listener::Unix(p) if *p == path), "{at:?}");
    let body = assert_same_as_ctl(&d, &at);
    if let Some(samples) = crate::table::parse_with_prometheus_client(&body) {
        assert!(
            samples.iter().any(|s| s[1] == "arbiter_workers_target"),
            "{samples:?}"
        );
    }
    let out = d.ctl(["stop"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    d.wait_exit(LONG);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn other_paths_methods_and_garbage_are_refused() {
    let d = Daemon::start(["-w", "1", "--metrics-bind", "127.0.0.1:0"]);
    let at = metrics_at(&d);
    let status = |req: &[u8]| {
        let a = raw(&at, req);
        let (status, headers, body) = split(&a);
        assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
        (status, headers, body)
    };
    assert_eq!(
        status(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        status(b"GET /status HTTP/1.0\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    let (s, h, _) = status(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(s, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(h.get("allow").map(String::as_str), Some("GET, HEAD"));
    assert_eq!(
        status(b"DELETE /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        status(b"GET /metrics SPDY/3\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    // A head past 8 KiB is not read on for ever.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    long.resize(9000, b'a');
    assert_eq!(
        status(&long).0,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Still serving.
    scrape(&at);
}

#[test]
fn a_silent_client_is_closed_at_the_deadline_without_holding_up_the_master() {
    let d = Daemon::start(["-w", "1", "--metrics-bind", "127.0.0.1:0"]);
    let at = metrics_at(&d);
    let mut silent = Conn::open(&at);
    let mut half = Conn::open(&at);
    half.send(b"GET /metrics HTTP/1.1\r\nHost:");
    let opened = Instant::now();
    // Meanwhile the master answers its control socket and other scrapes at once.
    for _ in 0..3 {
        let t = Instant::now();
        let out = d.ctl(["ping"]);
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert!(t.elapsed() < secs(2), "ping took {:?}", t.elapsed());
        scrape(&at);
    }
    let got = silent
        .read_all()
        .expect("closed, not timed out on our side");
    let waited = opened.elapsed();
    assert_eq!(
        got, "",
        "a client that sent nothing is closed without a word"
    );
    assert!(
        waited >= ms(4500) && waited < secs(15),
        "closed after {waited:?}, not at the 5 s deadline"
    );
    let got = half.read_all().expect("closed");
    assert!(!got.contains("200 OK"), "{got}");
}

#[test]
fn past_sixteen_clients_the_next_are_told_503_and_the_master_carries_on() {
    let d = Daemon::start(["-w", "1", "--metrics-bind", "127.0.0.1:0"]);
    let at = metrics_at(&d);
    let held: Vec<Conn> = (0..16).map(|_| Conn::open(&at)).collect();
    let mut extra: Vec<Conn> = (0..4).map(|_| Conn::open(&at)).collect();
    for (i, c) in extra.iter_mut().enumerate() {
        c.read_timeout(SHORT);
        let got = c.read_all().expect("an answer, then the close");
        assert!(
            got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "client {}: {got:?}",
            17 + i
        );
    }
    let t = Instant::now();
    let out = d.ctl(["ping"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(t.elapsed() < secs(2), "ping took {:?}", t.elapsed());
    // The sixteen held are still being served: a request on one of them is
    // answered with the metrics.
    let mut held = held;
    let mut first = held.remove(0);
    first.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = first.read_all().unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
    // Once that one is done, its place is free again.
    d.wait_until(SHORT, "a new scrape to be served", || {
        let a = raw(&at, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        if a.starts_with("HTTP/1.1 200 OK\r\n") {
            Ok(())
        } else {
            Err(a.lines().next().unwrap_or_default().to_string())
        }
    });
    drop(held);
}

#[test]
fn a_bad_address_or_a_busy_port_fails_at_start_up_in_one_line() {
    let dir = short_tempdir();
    let app = dir.path().join("app.sock");
    let control = dir.path().join("c.sock");
    let run = |metrics: &str| {
        Run::arbiterd()
            .args(["-w", "1", "-b"])
            .arg(format!("unix:{}", app.display()))
            .arg("--control")
            .arg(&control)
            .args(["--metrics-bind", metrics])
            .run()
    };
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    for (value, says) in [
        (
            "localhost",
            "--metrics-bind localhost: expected HOST:PORT".to_string(),
        ),
        ("127.0.0.1:99999", "--metrics-bind 127.0.0.1:99999:".into()),
        ("fd://3", "--metrics-bind fd://3:".into()),
        (
            busy.as_str(),
            format!("cannot listen on {busy}: address already in use"),
        ),
    ] {
        let out = run(value);
        assert_eq!(out.code(), Some(1), "{value}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{value}: {out:?}");
        assert!(out.stderr.contains(&says), "{value}: {out:?}");
        assert!(out.leftovers.is_empty(), "{value}: {out:?}");
        assert!(
            !app.exists() && !control.exists(),
            "{value}: files left behind"
        );
    }
}

#[test]
fn an_upgrade_hands_the_metrics_socket_to_the_new_master() {
    // Port 0: the new master could neither bind the same port again while the old
    // one holds it nor know which port that was; it takes the socket over.
    let d = Daemon::start(["-w", "1", "--metrics-bind", "127.0.0.1:0"]);
    d.wait_workers(1);
    let at = metrics_at(&d);
    let old = d.pid();
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(d.control_path())
        .args(["--json", "upgrade"])
        .timeout(LONG)
        .run();
    if out.code() != Some(0) {
        d.fail(&format!("arbiterctl upgrade: {out:?}"));
    }
    let j: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let new = j["new_pid"].as_i64().unwrap() as i32;
    d.register_pid(new);
    assert_ne!(new, old);
    d.wait_until(LONG, "the new master to answer on the same address", || {
        let body = scrape(&at);
        if body.contains(&format!(",pid=\"{new}\"}} 1\n")) {
            Ok(())
        } else {
            Err(body.lines().nth(2).unwrap_or_default().to_string())
        }
    });
    let lines = d.log_lines_with("Metrics at: ");
    assert!(
        lines.len() == 2
            && lines[0].split("Metrics at: ").nth(1) == lines[1].split("Metrics at: ").nth(1),
        "{lines:?}"
    );
}
