//! Shared fixtures: framing a request, decoding an answer, a status snapshot.

mod answers;
mod fuzz;
mod requests;

use super::protocol::{py_int, shlex_split};
use super::repr::{J, obj, py_repr, py_str};
use super::*;
use arbiter_proto::control::{ErrorKind, Reply, Response};
use arbiter_proto::status::{ListenerStatus, MasterStatus, Status, WorkerStatus};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn req(command: &str) -> Vec<u8> {
    frame(
        serde_json::json!({"id": 7, "command": command, "args": []})
            .to_string()
            .as_bytes(),
    )
}

/// Decode one whole answer frame; it must be exactly one frame.
fn decode(bytes: &[u8]) -> Value {
    assert!(bytes.len() >= 4, "short answer {bytes:?}");
    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 4, "frame length");
    assert!(bytes[4..].is_ascii(), "ensure_ascii output");
    serde_json::from_slice(&bytes[4..]).expect("the answer is JSON")
}

fn take(command: &str) -> Frame {
    let mut buf = req(command);
    let f = take_frame(&mut buf);
    assert!(buf.is_empty(), "the frame was consumed");
    f
}

fn request(command: &str) -> (Shape, Request) {
    match take(command) {
        Frame::Request(s, r) => (s, r),
        Frame::Answer(a) => panic!("{command:?}: answered {}", decode(&a)),
        Frame::Invalid(a) => panic!("{command:?}: invalid {}", decode(&a)),
        Frame::Incomplete => panic!("{command:?}: incomplete"),
    }
}

fn answer(command: &str) -> Value {
    match take(command) {
        Frame::Answer(a) => decode(&a),
        Frame::Request(_, r) => panic!("{command:?}: went to the master as {r:?}"),
        _ => panic!("{command:?}: not answered"),
    }
}

fn error_of(command: &str) -> String {
    let a = answer(command);
    assert_eq!(a["status"], "error", "{a}");
    assert_eq!(a["id"], 7);
    a["error"].as_str().unwrap().to_string()
}

fn worker(id: u64, pid: i32, state: &str, beat: Option<f64>) -> WorkerStatus {
    WorkerStatus {
        id,
        slot: 0,
        pid,
        generation: 1,
        state: state.into(),
        started_at: "2026-01-01T00:00:00.000Z".into(),
        uptime_secs: 1.0,
        last_beat_secs: beat,
        status_text: None,
        restarts: 0,
        crash_looping: false,
        rss_bytes: None,
        pss_bytes: None,
        private_bytes: None,
        cpu_secs: None,
        cpu_percent: None,
        output_dropped: 0,
        busy: None,
        requests: None,
        busy_changed_secs: None,
        max_requests: None,
    }
}

fn status() -> Status {
    Status {
        master: MasterStatus {
            autoscale: None,
            templates: Vec::new(),
            host_listen_overflows: None,
            max_requests: None,
            env_keys: Vec::new(),
            generations: Vec::new(),
            recycles: Default::default(),
            pid: 100,
            name: "web".into(),
            version: "0.1.0".into(),
            started_at: "2026-01-01T00:00:00.000Z".into(),
            uptime_secs: 12.3456,
            state: "running".into(),
            draining_secs_left: None,
            generation: 1,
            target: 3,
            ready: 2,
            total: 3,
            listeners: vec![
                ListenerStatus {
                    address: "http://127.0.0.1:8000".into(),
                    name: "a".into(),
                    queue: None,
                    queue_limit: None,
                    bind: None,
                    inherited: None,
                },
                ListenerStatus {
                    address: "http://[::1]:8001".into(),
                    name: "b".into(),
                    queue: None,
                    queue_limit: None,
                    bind: None,
                    inherited: None,
                },
                ListenerStatus {
                    address: "unix:/run/app.sock".into(),
                    name: "c".into(),
                    queue: None,
                    queue_limit: None,
                    bind: None,
                    inherited: None,
                },
            ],
            reload: None,
            last_reload: None,
            upgrade: None,
            reloads: 2,
            upgrades: 0,
            worker_failures: 1,
            workers_spawned: 5,
            timeout_secs: Some(30.0),
            backoff: Vec::new(),
            log: Default::default(),
            notify_dropped: 0,
            containment: "process groups".into(),
            output_lines_dropped: 0,
            workers_busy: 0,
            workers_idle: 0,
            workers_unknown: 0,
        },
        workers: vec![
            worker(5, 205, "booting", None),
            worker(3, 203, "ready", Some(0.123)),
            worker(4, 204, "aborted", Some(31.0)),
        ],
    }
}

fn rendered(command: &str, resp: &Response) -> Value {
    let (shape, _) = request(command);
    decode(&render(&shape, resp))
}
