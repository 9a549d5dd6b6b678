//! Answers: our replies in gunicorn's shapes and words.

use super::*;

#[test]
fn render_show() {
    let st = Response::ok(Reply::Status(Box::new(status())));
    let w = rendered("show workers", &st);
    assert_eq!(w["id"], 7);
    assert_eq!(w["status"], "ok");
    assert_eq!(
        w["data"],
        serde_json::json!({"workers": [
            {"pid": 203, "age": 3, "booted": true, "aborted": false, "last_heartbeat": 0.12},
            {"pid": 204, "age": 4, "booted": false, "aborted": true, "last_heartbeat": 31.0},
            {"pid": 205, "age": 5, "booted": false, "aborted": false, "last_heartbeat": null},
        ], "count": 3})
    );
    let a = rendered("show all", &st);
    assert_eq!(
        a["data"]["arbiter"],
        serde_json::json!({"pid": 100, "type": "arbiter", "role": "master"})
    );
    assert_eq!(a["data"]["web_worker_count"], 3);
    assert_eq!(
        a["data"]["web_workers"][0],
        serde_json::json!({"pid": 203, "type": "web", "age": 3, "booted": true, "last_heartbeat": 0.12})
    );
    assert_eq!(a["data"]["dirty_arbiter"], Value::Null);
    assert_eq!(a["data"]["dirty_workers"], serde_json::json!([]));
    assert_eq!(a["data"]["dirty_worker_count"], 0);
    assert_eq!(
        rendered("show stats", &st)["data"],
        serde_json::json!({
            "uptime": 12.35, "pid": 100, "workers_current": 3, "workers_target": 3,
            "workers_spawned": 5, "workers_killed": null, "reloads": 2,
            "dirty_arbiter_pid": null,
        })
    );
    assert_eq!(
        rendered("show config", &st)["data"],
        serde_json::json!({
            "bind": ["127.0.0.1:8000", "[::1]:8001", "unix:/run/app.sock"],
            "workers": 3, "timeout": 30, "proc_name": "web",
        })
    );
    assert_eq!(
        rendered("show listeners", &st)["data"],
        serde_json::json!({"listeners": [
            {"address": "http://127.0.0.1:8000", "fd": null, "type": "tcp"},
            {"address": "http://[::1]:8001", "fd": null, "type": "tcp6"},
            {"address": "unix:/run/app.sock", "fd": null, "type": "unix"},
        ], "count": 3})
    );
    // Key order is gunicorn's.
    let (shape, _) = request("show stats");
    let bytes = render(&shape, &st);
    let text = std::str::from_utf8(&bytes[4..]).unwrap();
    assert!(
        text.starts_with(r#"{"id": 7, "status": "ok", "data": {"uptime": 12.35, "pid": 100, "workers_current": 3"#),
        "{text}"
    );
    let mut s = status();
    s.master.timeout_secs = None;
    s.workers.clear();
    let st = Response::ok(Reply::Status(Box::new(s.clone())));
    assert_eq!(rendered("show config", &st)["data"]["timeout"], 0);
    assert_eq!(
        rendered("show workers", &st)["data"],
        serde_json::json!({"workers": [], "count": 0})
    );
    s.master.timeout_secs = Some(2.5);
    let st = Response::ok(Reply::Status(Box::new(s)));
    assert_eq!(rendered("show config", &st)["data"]["timeout"], 2.5);
}

#[test]
fn render_actions() {
    let scaled = Response::ok(Reply::Scaled {
        from: 2,
        to: 5,
        min: None,
        max: None,
    });
    assert_eq!(
        rendered("worker add 3", &scaled)["data"],
        serde_json::json!({"added": 3, "previous": 2, "total": 5})
    );
    let scaled = Response::ok(Reply::Scaled {
        from: 1,
        to: 1,
        min: None,
        max: None,
    });
    assert_eq!(
        rendered("worker remove 4", &scaled)["data"],
        serde_json::json!({"removed": 0, "previous": 1, "total": 1})
    );
    let killed = Response::ok(Reply::Killed {
        pid: 42,
        signal: "TERM".into(),
    });
    assert_eq!(
        rendered("worker kill 42", &killed)["data"],
        serde_json::json!({"success": true, "killed": 42})
    );
    let missing = Response::err(ErrorKind::Refused, "no worker with pid 42");
    let w = rendered("worker kill 42", &missing);
    assert_eq!(w["status"], "ok");
    assert_eq!(
        w["data"],
        serde_json::json!({"success": false, "error": "Worker 42 not found"})
    );
    let failed = Response::err(ErrorKind::Failed, "kill 42: EPERM");
    assert_eq!(
        rendered("worker kill 42", &failed)["data"],
        serde_json::json!({"success": false, "error": "kill 42: EPERM"})
    );
    let reloaded = Response::ok(Reply::Reloaded {
        generation: 2,
        took_secs: 0.5,
    });
    assert_eq!(
        rendered("reload", &reloaded)["data"],
        serde_json::json!({"status": "reloading"})
    );
    assert_eq!(
        rendered("reopen", &Response::ok(Reply::Reopened))["data"],
        serde_json::json!({"status": "reopening"})
    );
    let stopped = Response::ok(Reply::Stopped { pid: 1 });
    assert_eq!(
        rendered("shutdown", &stopped)["data"],
        serde_json::json!({"status": "shutting_down", "mode": "graceful"})
    );
    assert_eq!(
        rendered("shutdown quick", &stopped)["data"],
        serde_json::json!({"status": "shutting_down", "mode": "quick"})
    );
    // Our errors in gunicorn's words.
    let e = rendered(
        "reload",
        &Response::err(ErrorKind::Failed, "reload failed: boom"),
    );
    assert_eq!(
        e,
        serde_json::json!({"id": 7, "status": "error", "error": "Command failed: reload failed: boom"})
    );
    let e = rendered("worker add", &Response::err(ErrorKind::BadRequest, "nope"));
    assert_eq!(e["error"], "Invalid argument: nope");
    let e = rendered(
        "worker add",
        &Response::err(ErrorKind::Refused, "the master is shutting down"),
    );
    assert_eq!(e["error"], "Command failed: the master is shutting down");
    // An answer that does not fit the question, or no answer at all.
    for resp in [
        Response::ok(Reply::Reopened),
        Response {
            v: 1,
            ok: true,
            reply: None,
            error: None,
        },
        Response {
            v: 1,
            ok: false,
            reply: None,
            error: None,
        },
    ] {
        let e = rendered("show workers", &resp);
        assert_eq!(e["status"], "error", "{resp:?}");
        assert!(e["error"].as_str().unwrap().starts_with("Command failed: "));
    }
}
