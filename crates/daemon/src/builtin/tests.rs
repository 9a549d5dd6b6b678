use super::*;
use nix::sys::socket::SockFlag;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

fn req(s: &str) -> Request {
    match parse(s.as_bytes(), 0) {
        Parse::Request(r) => r,
        other => panic!("{s:?}: {other:?}"),
    }
}

fn reject(s: &[u8]) -> u16 {
    match parse(s, 0) {
        Parse::Reject(status) => status,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(s)),
    }
}

#[test]
fn complete_request() {
    let s = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = req(s);
    assert_eq!(
        (
            r.method,
            r.route,
            r.keep_alive,
            r.http10,
            r.body,
            r.head_len
        ),
        (Method::Get, Route::Root, true, false, 0, s.len())
    );
    assert_eq!(req("HEAD /health HTTP/1.1\r\n\r\n").method, Method::Head);
    assert_eq!(req("GET /health HTTP/1.1\r\n\r\n").route, Route::Health);
    assert_eq!(req("GET /nope HTTP/1.1\r\n\r\n").route, Route::NotFound);
    assert_eq!(req("GET /?x=1 HTTP/1.1\r\n\r\n").route, Route::Root);
    assert_eq!(req("DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
    assert_eq!(
        req("GET http://example.com/health HTTP/1.1\r\n\r\n").route,
        Route::Health
    );
    assert_eq!(
        req("GET http://example.com HTTP/1.1\r\n\r\n").route,
        Route::Root
    );
    // Empty lines before the request line are skipped, and counted as used.
    let r = req("\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    assert_eq!(r.head_len, 22);
}

#[test]
fn incomplete_request() {
    for s in [
        &b""[..],
        b"G",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r",
        b"\r\n",
    ] {
        assert_eq!(parse(s, 0), Parse::Partial, "{s:?}");
    }
}

#[test]
fn resumed_scan_finds_a_terminator_split_across_reads() {
    let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for cut in 1..full.len() {
        let first = &full[..cut];
        assert_eq!(parse(first, 0), Parse::Partial);
        let scanned = first.len().saturating_sub(3);
        assert!(
            matches!(parse(full, scanned), Parse::Request(_)),
            "cut {cut}"
        );
    }
}

#[test]
fn pipelined_requests() {
    let two = b"GET / HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\nGET /x";
    let Parse::Request(first) = parse(two, 0) else {
        panic!()
    };
    assert_eq!((first.route, first.head_len), (Route::Root, 18));
    let Parse::Request(second) = parse(&two[18..], 0) else {
        panic!()
    };
    assert_eq!(second.route, Route::Health);
    assert_eq!(parse(&two[18 + second.head_len..], 0), Parse::Partial);
}

#[test]
fn oversize_head() {
    assert_eq!(reject(&vec![b'a'; MAX_HEAD + 1]), 431);
    let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(reject(&long), 431);
    // Just under the cap is fine.
    let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
    ok.extend(std::iter::repeat_n(b'a', MAX_HEAD - ok.len() - 4));
    ok.extend_from_slice(b"\r\n\r\n");
    assert_eq!(ok.len(), MAX_HEAD);
    assert!(matches!(parse(&ok, 0), Parse::Request(_)));
}

#[test]
fn bad_requests() {
    for s in [
        &b"garbage\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / http/1.1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\n: x\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \0\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
    ] {
        assert_eq!(reject(s), 400, "{:?}", String::from_utf8_lossy(s));
    }
    assert_eq!(reject(b"GET / HTTP/2.0\r\n\r\n"), 505);
    assert_eq!(
        reject(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        411
    );
    // A future 1.x minor is served as 1.1.
    assert!(!req("GET / HTTP/1.2\r\n\r\n").http10);
}

#[test]
fn content_length() {
    assert_eq!(
        req("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").body,
        5
    );
    assert_eq!(req("GET / HTTP/1.1\r\ncontent-length:  0 \r\n\r\n").body, 0);
    let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", u64::MAX);
    assert_eq!(req(&big).body, u64::MAX);
    for bad in [
        &b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ] {
        assert_eq!(reject(bad), 400, "{:?}", String::from_utf8_lossy(bad));
    }
    // The same length twice is merely redundant.
    assert_eq!(
        req("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").body,
        5
    );
}

#[test]
fn keep_alive_rules() {
    assert!(req("GET / HTTP/1.1\r\n\r\n").keep_alive);
    assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
    assert!(!req("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
    assert!(req("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").keep_alive);
    let r = req("GET / HTTP/1.0\r\n\r\n");
    assert!(r.http10 && !r.keep_alive);
    assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    assert!(req("GET / HTTP/1.0\r\nconnection:\tfoo , Keep-Alive\r\n\r\n").keep_alive);
    assert!(!req("GET / HTTP/1.0\r\nConnection: close\r\n\r\n").keep_alive);
}

#[test]
fn sleep_parameter() {
    let route = |t: &str| req(&format!("GET {t} HTTP/1.1\r\n\r\n")).route;
    assert_eq!(route("/sleep?ms=250"), Route::Sleep(250));
    assert_eq!(route("/sleep?ms=0"), Route::Sleep(0));
    assert_eq!(route("/sleep?a=b&ms=7&ms=9"), Route::Sleep(7));
    assert_eq!(route("/sleep?ms=600000"), Route::Sleep(MAX_SLEEP_MS));
    for bad in [
        "/sleep",
        "/sleep?",
        "/sleep?ms=",
        "/sleep?ms=x",
        "/sleep?ms=+5",
        "/sleep?ms=-5",
        "/sleep?ms=1.5",
        "/sleep?ms=600001",
        "/sleep?ms=99999999999999999999999",
        "/sleep?xms=5",
    ] {
        assert_eq!(route(bad), Route::BadSleep, "{bad}");
    }
    assert_eq!(route("/sleep/?ms=5"), Route::NotFound);
}

#[test]
fn replies_carry_length_type_and_connection() {
    let replies = Replies::new("{}");
    let mut out = Vec::new();
    replies.health.write(&mut out, true, false, false);
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    );
    out.clear();
    replies.root.write(&mut out, true, true, true);
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
    );
    out.clear();
    replies.not_allowed.write(&mut out, false, false, false);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Allow: GET, HEAD\r\nConnection: close\r\n\r\n"),
        "{text}"
    );
}

#[test]
fn identity_body_shape() {
    let j: serde_json::Value = serde_json::from_str(&identity_json()).unwrap();
    assert_eq!(j["pid"].as_u64(), Some(u64::from(std::process::id())));
    for key in ["worker_id", "slot", "generation"] {
        assert!(j[key].is_i64(), "{key} in {j}");
    }
}

// ---- Session: what goes out for what comes in, without sockets.

fn session_serve(s: &mut Session, data: &[u8], draining: bool) -> (usize, Option<Duration>) {
    let replies = Replies::new("{\"pid\":1}");
    let cx = Ctx {
        replies: &replies,
        draining,
    };
    s.serve(data, &cx)
}

fn statuses(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| r[..3].to_string())
        .collect()
}

#[test]
fn session_answers_pipelined_requests_in_order() {
    let mut s = Session::default();
    let data =
        b"GET / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nPUT /health HTTP/1.1\r\n\r\nGET /heal";
    let (used, sleep) = session_serve(&mut s, data, false);
    assert_eq!(sleep, None);
    assert_eq!(used, data.len() - b"GET /heal".len());
    assert_eq!(statuses(&s.output), ["200", "404", "405"]);
    assert!(!s.close_after);
}

#[test]
fn session_stops_at_a_sleep_and_answers_on_wake() {
    let mut s = Session::default();
    let data = b"GET /sleep?ms=30 HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n";
    let (used, sleep) = session_serve(&mut s, data, false);
    assert_eq!(sleep, Some(Duration::from_millis(30)));
    assert_eq!(used, b"GET /sleep?ms=30 HTTP/1.1\r\n\r\n".len());
    assert!(s.output.is_empty());
    // More bytes while asleep are left for later.
    assert_eq!(session_serve(&mut s, &data[used..], false), (0, None));
    let replies = Replies::new("{\"pid\":1}");
    s.wake(&Ctx {
        replies: &replies,
        draining: true,
    });
    assert_eq!(statuses(&s.output), ["200"]);
    let text = String::from_utf8_lossy(&s.output).into_owned();
    assert!(
        text.ends_with("Connection: close\r\n\r\n{\"pid\":1}"),
        "{text}"
    );
    assert!(s.close_after);
    // After the last response the rest is dropped unanswered.
    assert_eq!(
        session_serve(&mut s, &data[used..], false),
        (data.len() - used, None)
    );
    assert_eq!(statuses(&s.output), ["200"]);
    assert!(s.linger, "closing on unread input must linger");
}

#[test]
fn session_discards_a_body_across_chunks() {
    let mut s = Session::default();
    let head = b"POST /health HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
    let (used, _) = session_serve(&mut s, &[&head[..], b"12345"].concat(), false);
    assert_eq!(used, head.len() + 5);
    assert!(s.output.is_empty(), "answered before the body was in");
    let next = b"67890GET / HTTP/1.1\r\n\r\n";
    let (used, _) = session_serve(&mut s, next, false);
    assert_eq!(used, next.len());
    assert_eq!(statuses(&s.output), ["405", "200"]);
}

#[test]
fn session_sends_100_continue_only_when_the_body_is_awaited() {
    let mut s = Session::default();
    let head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    session_serve(&mut s, head, false);
    assert!(s.output.starts_with(CONTINUE));
    let mut s = Session::default();
    session_serve(&mut s, &[&head[..], b"abc"].concat(), false);
    assert!(!s.output.starts_with(CONTINUE));
    assert_eq!(statuses(&s.output), ["405"]);
}

#[test]
fn session_rejects_and_closes() {
    let mut s = Session::default();
    let data = b"GET / HTTP/1.1\r\n\r\ngarbage\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    let (used, _) = session_serve(&mut s, data, false);
    assert_eq!(used, data.len());
    assert_eq!(statuses(&s.output), ["200", "400"]);
    assert!(s.close_after && s.linger);
}

#[test]
fn session_closes_after_connection_close_and_during_drain() {
    let mut s = Session::default();
    session_serve(
        &mut s,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        false,
    );
    assert!(s.close_after && !s.linger);
    let mut s = Session::default();
    session_serve(&mut s, b"GET / HTTP/1.1\r\n\r\n", true);
    assert!(s.close_after);
    assert!(String::from_utf8_lossy(&s.output).contains("Connection: close\r\n"));
    let mut s = Session::default();
    session_serve(&mut s, b"GET / HTTP/1.0\r\n\r\n", false);
    assert!(s.close_after);
}

#[test]
fn session_holds_requests_while_output_is_backed_up() {
    let mut s = Session::default();
    let one = b"GET / HTTP/1.1\r\n\r\n";
    let many = one.repeat(OUTPUT_CAP);
    let (used, _) = session_serve(&mut s, &many, false);
    assert!(used < many.len() && used % one.len() == 0);
    assert!(s.output.len() >= OUTPUT_CAP && s.output.len() < OUTPUT_CAP + 200);
}

#[test]
fn slab_tokens_do_not_outlive_their_connection() {
    let conn = || {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        Conn {
            fd: a.into(),
            input: Vec::new(),
            session: Session::default(),
            eof: false,
            lingering: false,
            deadline: None,
            last_active: Instant::now(),
            interest: READABLE,
        }
    };
    let mut slab = Slab::default();
    let t1 = slab.insert(conn());
    assert!(slab.get(t1).is_some());
    assert!(slab.remove(t1).is_some());
    let t2 = slab.insert(conn());
    assert_ne!(t1, t2, "a reused slot gets a new token");
    assert!(slab.get(t1).is_none() && slab.get_mut(t1).is_none());
    assert!(slab.remove(t1).is_none());
    assert_eq!((slab.len(), slab.tokens()), (1, vec![t2]));
    assert!(t2 < TOKEN_LISTENER_0 - MAX_LISTENERS as u64);
}

#[test]
fn heartbeat_interval() {
    assert_eq!(beat_interval(30.0), Duration::from_secs(1));
    assert_eq!(beat_interval(2.0), Duration::from_millis(500));
    assert_eq!(beat_interval(0.1), Duration::from_millis(50));
}

fn is_nonblocking(fd: BorrowedFd) -> bool {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    flags.contains(OFlag::O_NONBLOCK)
}

#[test]
fn acceptable_sees_a_queued_connection_without_waiting() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(!acceptable(l.as_fd()), "nothing queued yet");
    let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    // The handshake completes inside connect() on loopback, but nothing promises it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !acceptable(l.as_fd()) {
        assert!(Instant::now() < deadline, "the connection never showed");
        std::thread::yield_now();
    }
    let (_conn, _) = l.accept().unwrap();
    assert!(!acceptable(l.as_fd()), "the only connection was taken");
    assert!(!is_nonblocking(l.as_fd()), "polling changed the listener");
}

#[test]
fn the_alarm_gets_a_waiting_accept_back() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Should the alarm not work, a connection ends the wait, and the test fails
    // on the accept's result instead of hanging.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(Duration::from_secs(5)).is_err() {
            let _ = std::net::TcpStream::connect(addr);
        }
    });
    let mut alarm = AcceptAlarm::install().unwrap();
    for round in 0..2 {
        let start = Instant::now();
        alarm.arm().unwrap();
        let got = socket::accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC);
        alarm.disarm();
        let took = start.elapsed();
        assert_eq!(got, Err(Errno::EINTR), "round {round}, after {took:?}");
        assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
    }
    assert!(!is_nonblocking(l.as_fd()));
    let _ = done.send(());
    watchdog.join().unwrap();
}
