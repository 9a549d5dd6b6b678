//! Requests: framing, translation into our requests, gunicorn's error texts.

use super::*;

#[test]
fn framing() {
    let mut buf = Vec::new();
    assert!(matches!(take_frame(&mut buf), Frame::Incomplete));
    let whole = req("reload");
    for cut in 0..whole.len() {
        let mut part = whole[..cut].to_vec();
        assert!(
            matches!(take_frame(&mut part), Frame::Incomplete),
            "cut {cut}"
        );
        assert_eq!(part, whole[..cut], "nothing taken from a partial frame");
    }
    // Two frames and the start of a third: one at a time.
    let mut buf = [req("reload"), req("reopen"), req("help")[..6].to_vec()].concat();
    assert!(matches!(
        take_frame(&mut buf),
        Frame::Request(_, Request::Reload)
    ));
    assert!(matches!(
        take_frame(&mut buf),
        Frame::Request(_, Request::Reopen)
    ));
    assert!(matches!(take_frame(&mut buf), Frame::Incomplete));
    assert_eq!(buf.len(), 6);
}

#[test]
fn answers_are_python_json() {
    let mut buf = frame(br#"{"id": 1, "command": "  "}"#);
    let Frame::Answer(a) = take_frame(&mut buf) else {
        panic!("not answered");
    };
    let body = br#"{"id": 1, "status": "error", "error": "Empty command"}"#;
    assert_eq!(a, frame(body));
    // The id is echoed whatever it is; 0 when missing.
    for (msg, id) in [
        (r#"{"command": ""}"#, serde_json::json!(0)),
        (
            r#"{"id": "x\u00e9", "command": ""}"#,
            serde_json::json!("xé"),
        ),
        (r#"{"id": null, "command": ""}"#, Value::Null),
        (
            r#"{"id": [1, {"a": 2.5}], "command": ""}"#,
            serde_json::json!([1, {"a": 2.5}]),
        ),
    ] {
        let Frame::Answer(a) = take_frame(&mut frame(msg.as_bytes())) else {
            panic!("{msg}");
        };
        assert_eq!(decode(&a)["id"], id, "{msg}");
    }
    let mut s = String::new();
    obj([
        ("a", J::str("é\u{1F600}\"\\\n\x01")),
        ("b", J::Float(1e-7)),
        ("c", J::Float(30.0)),
        ("d", J::Float(f64::NAN)),
    ])
    .write(&mut s);
    assert_eq!(
        s,
        r#"{"a": "\u00e9\ud83d\ude00\"\\\n\u0001", "b": 1e-07, "c": 30.0, "d": null}"#
    );
}

#[test]
fn oversize_and_garbage_close() {
    for head in [
        ((MAX_BODY + 1) as u32).to_be_bytes(),
        [0, 0x10, 0, 0],
        [0xff; 4],
    ] {
        let mut buf = head.to_vec();
        let Frame::Invalid(a) = take_frame(&mut buf) else {
            panic!("{head:?}: not refused on its header");
        };
        assert!(buf.is_empty());
        let a = decode(&a);
        assert_eq!(a["status"], "error");
        assert!(
            a["error"]
                .as_str()
                .unwrap()
                .starts_with("Message too large"),
            "{a}"
        );
    }
    for body in [
        &b""[..],
        b"not json",
        b"\xff\xfe{}",
        b"{\"command\": \"show \xc3\"}",
        b"[1, 2]",
        b"42",
        b"\"show workers\"",
        b"null",
        b"{\"id\": 1, \"command\": 5}",
        b"{\"id\": 1, \"command\": [\"show\", \"workers\"]}",
        b"{\"id\": 1, \"command\": null}",
        b"{\"id\": 1, \"command\": \"help\"",
        &[b'['; 10_000],
    ] {
        let mut buf = frame(body);
        let Frame::Invalid(a) = take_frame(&mut buf) else {
            panic!("{:?}: not refused", String::from_utf8_lossy(body));
        };
        assert!(buf.is_empty());
        assert_eq!(decode(&a)["status"], "error");
    }
    // The largest body is taken whole.
    let pad = " ".repeat(MAX_BODY - 19);
    let mut buf = frame(format!("{{\"command\": \"help\"}}{pad}").as_bytes());
    assert_eq!(buf.len(), MAX_BODY + 4);
    assert!(matches!(take_frame(&mut buf), Frame::Answer(_)));
}

#[test]
fn translations() {
    let cases: Vec<(&str, Request)> = vec![
        ("show workers", Request::Status),
        ("SHOW Workers extra", Request::Status),
        ("show all", Request::Status),
        ("show stats", Request::Status),
        ("show config", Request::Status),
        ("show listeners", Request::Status),
        (
            "worker add",
            Request::Scale {
                by: Some(1),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker add 3",
            Request::Scale {
                by: Some(3),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker add 0",
            Request::Scale {
                by: Some(1),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker add -4",
            Request::Scale {
                by: Some(1),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker add ' +1_0 '",
            Request::Scale {
                by: Some(10),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker add 123456789012345678901234567890",
            Request::Scale {
                by: Some(i64::MAX),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker remove",
            Request::Scale {
                by: Some(-1),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "Worker REMOVE 2",
            Request::Scale {
                by: Some(-2),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            "worker kill 1234",
            Request::Kill {
                pid: 1234,
                signal: None,
            },
        ),
        ("reload", Request::Reload),
        ("reload now", Request::Reload),
        ("reopen", Request::Reopen),
        ("shutdown", Request::Stop { fast: false }),
        ("shutdown graceful", Request::Stop { fast: false }),
        ("shutdown quick", Request::Stop { fast: true }),
        ("shutdown QUICK", Request::Stop { fast: false }),
        (
            "\"worker\" 'add' \"2\"",
            Request::Scale {
                by: Some(2),
                to: None,
                min: None,
                max: None,
            },
        ),
    ];
    for (command, want) in cases {
        assert_eq!(request(command).1, want, "{command:?}");
    }
    // `args` are appended (gunicorn's str() of each).
    for (msg, want) in [
        (
            r#"{"command": "worker add", "args": [2]}"#,
            Request::Scale {
                by: Some(2),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            r#"{"command": "worker", "args": ["kill", "99"]}"#,
            Request::Kill {
                pid: 99,
                signal: None,
            },
        ),
        (
            r#"{"command": "worker add", "args": "5"}"#,
            Request::Scale {
                by: Some(5),
                to: None,
                min: None,
                max: None,
            },
        ),
        (
            r#"{"command": "show", "args": {"stats": 1}}"#,
            Request::Status,
        ),
        (r#"{"command": "reload", "args": null}"#, Request::Reload),
        (r#"{"command": "reload", "args": 0}"#, Request::Reload),
        (r#"{"command": "reload", "args": false}"#, Request::Reload),
    ] {
        match take_frame(&mut frame(msg.as_bytes())) {
            Frame::Request(_, r) => assert_eq!(r, want, "{msg}"),
            _ => panic!("{msg}: not a request"),
        }
    }
    assert_eq!(
        request("shutdown whenever").0.kind,
        Kind::Shutdown {
            mode: "whenever".into()
        }
    );
}

#[test]
fn errors_are_gunicorns() {
    for (command, want) in [
        (
            "frobnicate",
            "Invalid argument: Unknown command: frobnicate",
        ),
        ("FROB x", "Invalid argument: Unknown command: frob"),
        ("''", "Invalid argument: Unknown command: "),
        (
            "show",
            "Invalid argument: Missing show target (all|workers|dirty|config|stats|listeners)",
        ),
        (
            "show nothing",
            "Invalid argument: Unknown show target: nothing",
        ),
        (
            "worker",
            "Invalid argument: Missing worker action (add|remove|kill)",
        ),
        (
            "worker fire 2",
            "Invalid argument: Unknown worker action: fire",
        ),
        (
            "worker kill",
            "Invalid argument: Missing PID for worker kill",
        ),
        (
            "worker kill abc",
            "Invalid argument: invalid literal for int() with base 10: 'abc'",
        ),
        (
            "worker add 1.5",
            "Invalid argument: invalid literal for int() with base 10: '1.5'",
        ),
        (
            "worker add \"it's\"",
            "Invalid argument: invalid literal for int() with base 10: \"it's\"",
        ),
        (
            "worker add 1__0",
            "Invalid argument: invalid literal for int() with base 10: '1__0'",
        ),
        (
            "dirty",
            "Invalid argument: Missing dirty action (add|remove)",
        ),
        ("dirty up", "Invalid argument: Unknown dirty action: up"),
        (
            "dirty add x",
            "Invalid argument: invalid literal for int() with base 10: 'x'",
        ),
        ("show 'workers", "Invalid argument: No closing quotation"),
        ("reload \\", "Invalid argument: No escaped character"),
    ] {
        assert_eq!(error_of(command), want, "{command:?}");
    }
    let mut buf = frame(br#"{"id": 3, "command": "reload", "args": 5}"#);
    let Frame::Answer(a) = take_frame(&mut buf) else {
        panic!()
    };
    assert_eq!(
        decode(&a)["error"],
        "Command failed: 'int' object is not iterable"
    );
}

#[test]
fn answered_without_the_master() {
    let a = answer("show dirty");
    assert_eq!(a["status"], "ok");
    assert_eq!(
        a["data"],
        serde_json::json!({"enabled": false, "pid": null, "workers": [], "apps": []})
    );
    for c in ["dirty add", "dirty remove 3"] {
        assert_eq!(
            answer(c)["data"],
            serde_json::json!({"success": false, "error": "Dirty arbiter not running"})
        );
    }
    let h = answer("HELP");
    let commands = h["data"]["commands"].as_object().unwrap();
    assert_eq!(commands.len(), 15);
    assert_eq!(commands["worker add [N]"], "Spawn N workers (default 1)");
    for pid in ["0", "-5", "2147483648", "99999999999999999999999"] {
        assert_eq!(
            answer(&format!("worker kill {pid}"))["data"],
            serde_json::json!({"success": false, "error": format!("Worker {pid} not found")}),
        );
    }
    assert_eq!(
        answer("worker kill -007")["data"]["error"],
        "Worker -7 not found"
    );
    assert_eq!(
        request("worker kill 007").1,
        Request::Kill {
            pid: 7,
            signal: None
        }
    );
}

#[test]
fn shlex_and_ints() {
    assert_eq!(
        shlex_split("  a  b\t'c d' e\"f g\"h ''").unwrap(),
        ["a", "b", "c d", "ef gh", ""]
    );
    assert_eq!(
        shlex_split(r#"a\ b "x\"y\z\\" 'q\'"#).unwrap(),
        ["a b", "x\"y\\z\\", "q\\"]
    );
    assert_eq!(shlex_split("").unwrap(), Vec::<String>::new());
    assert!(shlex_split("\"abc").is_err());
    assert!(shlex_split("\"abc\\").is_err());
    assert_eq!(py_int(" -0 ").unwrap().to_string(), "0");
    assert_eq!(py_int("+00012").unwrap().to_string(), "12");
    assert_eq!(py_int("-12").unwrap().saturating_i64(), -12);
    assert_eq!(py_int(&"9".repeat(60)).unwrap().saturating_i64(), i64::MAX);
    assert_eq!(
        py_int(&format!("-{}", "9".repeat(60)))
            .unwrap()
            .saturating_i64(),
        -i64::MAX
    );
    for bad in ["", "-", "+", "_1", "1_", "1 2", "0x10", "1e3"] {
        assert!(py_int(bad).is_err(), "{bad:?}");
    }
    assert_eq!(py_repr("a'b\"c\n"), r#"'a\'b"c\n'"#);
    assert_eq!(py_str(&serde_json::json!(2.0)), "2.0");
    assert_eq!(py_str(&serde_json::json!(true)), "True");
}

/// Where a POSIX shell's splitting (the `shlex` crate's) and Python's differ,
/// gunicorn's words are Python's.
#[test]
fn shlex_is_pythons_not_a_shells() {
    assert_eq!(shlex_split("a#b #c\rd").unwrap(), ["a#b", "#c", "d"]);
    assert_eq!(
        shlex_split("\"\\$\\`\\\n\" a\\\nb").unwrap(),
        ["\\$\\`\\\n", "a\nb"]
    );
    assert_eq!(
        error_of("worker kill #5"),
        "Invalid argument: invalid literal for int() with base 10: '#5'"
    );
}
