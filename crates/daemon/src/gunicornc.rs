//! gunicorn's control-socket protocol (`gunicornc`, gunicorn >= 25.1,
//! `gunicorn/ctl/`), spoken on the same socket as our JSON lines, so `gunicornc`
//! and scripts written for gunicorn's control socket drive arbiterd.
//!
//! # The protocol (as gunicorn 27.0.1 implements it)
//!
//! Every message, each way, is a 4-byte big-endian length and then that many bytes
//! of UTF-8 JSON (Python's `json.dumps`: `", "` and `": "` separators, non-ASCII as
//! `\uXXXX`). A request is `{"id": 1, "command": "show workers", "args": []}`; the
//! answer is `{"id": 1, "status": "ok", "data": {...}}` or
//! `{"id": 1, "status": "error", "error": "..."}`, with the request's `id` echoed
//! (0 when it had none). Many requests may follow on one connection. The command is
//! split like a shell line (`shlex.split`), `args` (if any) appended, the first word
//! and the `show`/`worker`/`dirty` sub-word compared case-insensitively, and
//! trailing words ignored. Error texts are gunicorn's: `Empty command`,
//! `Invalid argument: Unknown command: x`, `Invalid argument: Missing PID for worker
//! kill`, `Invalid argument: invalid literal for int() with base 10: 'x'`, ... and
//! `Command failed: ...` when the action itself failed.
//!
//! | gunicornc command | our request | `data` of the answer |
//! |---|---|---|
//! | `show workers` | `status` | `{"workers": [{"pid", "age", "booted", "aborted", "last_heartbeat"}], "count"}` |
//! | `show all` | `status` | `{"arbiter": {"pid", "type", "role"}, "web_workers", "web_worker_count", "dirty_arbiter": null, "dirty_workers": [], "dirty_worker_count": 0}` |
//! | `show stats` | `status` | `{"uptime", "pid", "workers_current", "workers_target", "workers_spawned", "workers_killed", "reloads", "dirty_arbiter_pid": null}` |
//! | `show listeners` | `status` | `{"listeners": [{"address", "fd", "type"}], "count"}` |
//! | `show config` | `status` | `{"bind", "workers", "timeout", "proc_name"}` |
//! | `show dirty` | none | `{"enabled": false, "pid": null, "workers": [], "apps": []}` |
//! | `worker add [N]` | `scale` by +max(N,1) | `{"added", "previous", "total"}` |
//! | `worker remove [N]` | `scale` by -max(N,1) (never below 1) | `{"removed", "previous", "total"}` |
//! | `worker kill PID` | `kill` (TERM) | `{"success": true, "killed": PID}` or `{"success": false, "error": "Worker PID not found"}` |
//! | `dirty add/remove [N]` | none | `{"success": false, "error": "Dirty arbiter not running"}` |
//! | `reload` | `reload` | `{"status": "reloading"}` |
//! | `reopen` | `reopen` | `{"status": "reopening"}` |
//! | `shutdown [graceful\|quick]` | `stop` (`fast` for `quick`) | `{"status": "shutting_down", "mode": MODE}` |
//! | `help` | none | `{"commands": {...}}`, gunicorn's list |
//!
//! The field names, their order, the error texts and the byte layout are
//! gunicorn's, so `gunicornc`'s tables and `-j` output look the same.
//!
//! # What differs, and why
//!
//! * `reload`, `shutdown` answer when they are done (the new generation serves, or
//!   the master is about to exit), not when the signal is sent: our master only
//!   answers those requests then. A reload that fails is an error
//!   (`Command failed: reload failed: ...`), where gunicorn cannot know. gunicornc
//!   waits 30 s for an answer, so a reload or a graceful stop that takes longer
//!   shows a timeout there although it goes on.
//! * Values we do not have are `null`, never made up: a listener's `fd` (the
//!   master's fd numbers are not in the status snapshot), `workers_killed`.
//!   `show config` has only the keys the snapshot can answer: `bind` (the bound
//!   addresses, in gunicorn's bind syntax: `127.0.0.1:8000`, `[::1]:8000`,
//!   `unix:PATH`; port 0 resolved), `workers` (the current target), `timeout` (0
//!   when disabled, as in gunicorn), `proc_name` (our instance name). gunicorn too
//!   leaves out keys it cannot read.
//! * `booted` is true for a worker that is ready (it said `READY=1`, or is serving
//!   and being recycled); gunicorn's master always says false. `last_heartbeat` is
//!   `null` for a worker that never beat.
//! * There is no dirty arbiter: `show dirty` and `dirty add|remove` answer what
//!   gunicorn answers when none is configured.
//! * `shutdown MODE`: as gunicorn, any mode but `quick` is graceful, and the mode is
//!   echoed as given.
//! * A frame whose body exceeds [`MAX_BODY`] (1 MiB, where gunicorn allows 16 MiB),
//!   is not UTF-8, not JSON, not an object, or whose `command` is not a string
//!   closes the connection as in gunicorn, but only after an error answer with id 0
//!   (gunicorn closes without a word, which gunicornc reports as "Connection
//!   closed").
//! * Numbers that do not fit: a count beyond 2^63 is taken as 2^63 - 1 (the master
//!   clamps the target anyway), a pid outside 1..2^31 is "not found".

use arbiter_proto::control::{ErrorKind, MAX_LINE, Reply, Request, Response};
use arbiter_proto::status::{Status, WorkerStatus};
use serde_json::Value;

/// The longest frame body taken: a whole frame fits in the control server's input
/// bound ([`MAX_LINE`]).
pub const MAX_BODY: usize = MAX_LINE - 4;

/// What a gunicornc command asked for, kept until its answer is rendered.
#[derive(Clone, Debug)]
pub struct Shape {
    /// The request's `id`, echoed in the answer.
    id: Value,
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    ShowAll,
    ShowWorkers,
    ShowStats,
    ShowConfig,
    ShowListeners,
    WorkerAdd,
    WorkerRemove,
    WorkerKill { pid: i32 },
    Reload,
    Reopen,
    Shutdown { mode: String },
}

/// The result of looking at a client's input buffer.
pub enum Frame {
    /// Not a whole frame yet.
    Incomplete,
    /// A command for the master; answer with [`render`].
    Request(Shape, Request),
    /// A command answered without the master (help, an unknown command).
    Answer(Vec<u8>),
    /// Garbage or an oversize frame: send these bytes and close.
    Invalid(Vec<u8>),
}

/// Take one frame off the front of `input`.
pub fn take_frame(input: &mut Vec<u8>) -> Frame {
    let Some(&[a, b, c, d]) = input.get(..4) else {
        return Frame::Incomplete;
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > MAX_BODY {
        input.clear();
        return Frame::Invalid(error_frame(
            &Value::from(0),
            &format!("Message too large: {len} (at most {MAX_BODY} bytes)"),
        ));
    }
    if input.len() - 4 < len {
        return Frame::Incomplete;
    }
    let body: Vec<u8> = input.drain(..4 + len).skip(4).collect();
    parse_message(&body)
}

/// The gunicornc-shaped answer to a translated command.
pub fn render(shape: &Shape, resp: &Response) -> Vec<u8> {
    let id = &shape.id;
    let reply = match (&resp.reply, &resp.error) {
        (Some(reply), _) if resp.ok => reply,
        (_, error) => {
            let (kind, message) = match error {
                Some(e) => (e.kind, e.message.as_str()),
                None => (ErrorKind::Failed, "the master sent no answer"),
            };
            if let Kind::WorkerKill { pid } = shape.kind {
                // gunicorn answers a failed kill with data, not an error.
                let error = if message.starts_with("no worker with pid") {
                    format!("Worker {pid} not found")
                } else {
                    message.to_string()
                };
                return ok_frame(
                    id,
                    obj([("success", J::Bool(false)), ("error", J::str(error))]),
                );
            }
            let prefix = match kind {
                ErrorKind::BadRequest => "Invalid argument",
                _ => "Command failed",
            };
            return error_frame(id, &format!("{prefix}: {message}"));
        }
    };
    let data = match (&shape.kind, reply) {
        (Kind::ShowWorkers, Reply::Status(s)) => show_workers(s),
        (Kind::ShowAll, Reply::Status(s)) => show_all(s),
        (Kind::ShowStats, Reply::Status(s)) => show_stats(s),
        (Kind::ShowConfig, Reply::Status(s)) => show_config(s),
        (Kind::ShowListeners, Reply::Status(s)) => show_listeners(s),
        (Kind::WorkerAdd, Reply::Scaled { from, to }) => obj([
            ("added", J::uint(to.saturating_sub(*from))),
            ("previous", J::uint(*from)),
            ("total", J::uint(*to)),
        ]),
        (Kind::WorkerRemove, Reply::Scaled { from, to }) => obj([
            ("removed", J::uint(from.saturating_sub(*to))),
            ("previous", J::uint(*from)),
            ("total", J::uint(*to)),
        ]),
        (Kind::WorkerKill { .. }, Reply::Killed { pid, .. }) => obj([
            ("success", J::Bool(true)),
            ("killed", J::Int(i128::from(*pid))),
        ]),
        (Kind::Reload, Reply::Reloaded { .. }) => obj([("status", J::str("reloading"))]),
        (Kind::Reopen, Reply::Reopened) => obj([("status", J::str("reopening"))]),
        (Kind::Shutdown { mode }, Reply::Stopped { .. }) => obj([
            ("status", J::str("shutting_down")),
            ("mode", J::str(mode.as_str())),
        ]),
        _ => return error_frame(id, "Command failed: unexpected answer from the master"),
    };
    ok_frame(id, data)
}

// ------------------------------------------------------------------ requests

/// What a command turned into.
enum Action {
    /// Ask the master.
    Master(Kind, Request),
    /// Answer at once with this `data`.
    Data(J),
}

fn parse_message(body: &[u8]) -> Frame {
    let zero = Value::from(0);
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) => return Frame::Invalid(error_frame(&zero, &format!("Invalid message: {e}"))),
    };
    let message: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Frame::Invalid(error_frame(&zero, &format!("Invalid JSON: {e}"))),
    };
    let Value::Object(message) = message else {
        return Frame::Invalid(error_frame(&zero, "Invalid message: not a JSON object"));
    };
    let id = message.get("id").cloned().unwrap_or(zero);
    let command = match message.get("command") {
        None => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Frame::Invalid(error_frame(
                &id,
                "Invalid message: \"command\" is not a string",
            ));
        }
    };
    let command = command.trim();
    if command.is_empty() {
        return Frame::Answer(error_frame(&id, "Empty command"));
    }
    match dispatch(command, message.get("args")) {
        Ok(Action::Master(kind, req)) => Frame::Request(Shape { id, kind }, req),
        Ok(Action::Data(data)) => Frame::Answer(ok_frame(&id, data)),
        Err(e) => Frame::Answer(error_frame(&id, &e)),
    }
}

fn invalid(what: impl std::fmt::Display) -> String {
    format!("Invalid argument: {what}")
}

/// gunicorn's `ControlSocketServer._dispatch` and `_execute_command`.
fn dispatch(command: &str, args: Option<&Value>) -> Result<Action, String> {
    let mut parts = shlex_split(command).map_err(invalid)?;
    match args {
        Some(Value::Array(a)) => parts.extend(a.iter().map(py_str)),
        Some(Value::String(s)) => parts.extend(s.chars().map(String::from)),
        Some(Value::Object(o)) => parts.extend(o.keys().cloned()),
        Some(Value::Bool(true)) => {
            return Err("Command failed: 'bool' object is not iterable".into());
        }
        Some(Value::Number(n)) if n.as_f64() != Some(0.0) => {
            let ty = if n.is_f64() { "float" } else { "int" };
            return Err(format!("Command failed: '{ty}' object is not iterable"));
        }
        _ => {}
    }
    let Some((first, rest)) = parts.split_first() else {
        return Err("Empty command".into());
    };
    let cmd = first.to_lowercase();
    let master = |kind, req| Ok(Action::Master(kind, req));
    match cmd.as_str() {
        "show" => show(rest),
        "worker" => worker(rest),
        "dirty" => dirty(rest),
        "reload" => master(Kind::Reload, Request::Reload),
        "reopen" => master(Kind::Reopen, Request::Reopen),
        "shutdown" => {
            let mode = rest.first().map_or("graceful", String::as_str);
            let fast = mode == "quick";
            master(
                Kind::Shutdown {
                    mode: mode.to_string(),
                },
                Request::Stop { fast },
            )
        }
        "help" => Ok(Action::Data(help())),
        _ => Err(invalid(format_args!("Unknown command: {cmd}"))),
    }
}

fn show(args: &[String]) -> Result<Action, String> {
    let Some(target) = args.first() else {
        return Err(invalid(
            "Missing show target (all|workers|dirty|config|stats|listeners)",
        ));
    };
    let target = target.to_lowercase();
    let kind = match target.as_str() {
        "all" => Kind::ShowAll,
        "workers" => Kind::ShowWorkers,
        "config" => Kind::ShowConfig,
        "stats" => Kind::ShowStats,
        "listeners" => Kind::ShowListeners,
        "dirty" => {
            return Ok(Action::Data(obj([
                ("enabled", J::Bool(false)),
                ("pid", J::Null),
                ("workers", J::Arr(vec![])),
                ("apps", J::Arr(vec![])),
            ])));
        }
        _ => return Err(invalid(format_args!("Unknown show target: {target}"))),
    };
    Ok(Action::Master(kind, Request::Status))
}

/// `N` of `worker add|remove [N]`: default 1, at least 1 (gunicorn's `max(1, N)`).
fn count(args: &[String]) -> Result<i64, String> {
    match args.first() {
        None => Ok(1),
        Some(a) => Ok(py_int(a).map_err(invalid)?.saturating_i64().max(1)),
    }
}

fn worker(args: &[String]) -> Result<Action, String> {
    let Some((action, args)) = args.split_first() else {
        return Err(invalid("Missing worker action (add|remove|kill)"));
    };
    let action = action.to_lowercase();
    match action.as_str() {
        "add" => Ok(Action::Master(
            Kind::WorkerAdd,
            Request::Scale {
                by: Some(count(args)?),
                to: None,
            },
        )),
        "remove" => Ok(Action::Master(
            Kind::WorkerRemove,
            Request::Scale {
                by: Some(-count(args)?),
                to: None,
            },
        )),
        "kill" => {
            let Some(pid) = args.first() else {
                return Err(invalid("Missing PID for worker kill"));
            };
            let pid = py_int(pid).map_err(invalid)?;
            match i32::try_from(pid.saturating_i64()) {
                Ok(p) if p > 0 => Ok(Action::Master(
                    Kind::WorkerKill { pid: p },
                    Request::Kill {
                        pid: p,
                        signal: None,
                    },
                )),
                // Not a pid any worker can have.
                _ => Ok(Action::Data(obj([
                    ("success", J::Bool(false)),
                    ("error", J::str(format!("Worker {pid} not found"))),
                ]))),
            }
        }
        _ => Err(invalid(format_args!("Unknown worker action: {action}"))),
    }
}

fn dirty(args: &[String]) -> Result<Action, String> {
    let Some((action, args)) = args.split_first() else {
        return Err(invalid("Missing dirty action (add|remove)"));
    };
    let action = action.to_lowercase();
    match action.as_str() {
        "add" | "remove" => {
            count(args)?;
            Ok(Action::Data(obj([
                ("success", J::Bool(false)),
                ("error", J::str("Dirty arbiter not running")),
            ])))
        }
        _ => Err(invalid(format_args!("Unknown dirty action: {action}"))),
    }
}

/// gunicorn's `CommandHandlers.help`, word for word.
fn help() -> J {
    const COMMANDS: [(&str, &str); 15] = [
        (
            "show all",
            "Show all processes (arbiter, web workers, dirty workers)",
        ),
        ("show workers", "List HTTP workers with their status"),
        ("show dirty", "List dirty workers and apps"),
        ("show config", "Show current effective configuration"),
        ("show stats", "Show server statistics"),
        ("show listeners", "Show bound sockets"),
        ("worker add [N]", "Spawn N workers (default 1)"),
        ("worker remove [N]", "Remove N workers (default 1)"),
        ("worker kill <PID>", "Gracefully terminate specific worker"),
        ("dirty add [N]", "Spawn N dirty workers (default 1)"),
        ("dirty remove [N]", "Remove N dirty workers (default 1)"),
        ("reload", "Graceful reload (HUP)"),
        ("reopen", "Reopen log files (USR1)"),
        ("shutdown [graceful|quick]", "Shutdown server (TERM/INT)"),
        ("help", "Show this help message"),
    ];
    obj([(
        "commands",
        J::Obj(
            COMMANDS
                .iter()
                .map(|(k, v)| (k.to_string(), J::str(*v)))
                .collect(),
        ),
    )])
}

/// Python's `shlex.split(s)` (POSIX mode, no comments). The error is shlex's.
fn shlex_split(s: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\\' => {
                word.push(chars.next().ok_or("No escaped character")?);
                in_word = true;
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next().ok_or("No closing quotation")? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next().ok_or("No closing quotation")? {
                        '"' => break,
                        '\\' => {
                            let next = chars.next().ok_or("No escaped character")?;
                            if next != '"' && next != '\\' {
                                word.push('\\');
                            }
                            word.push(next);
                        }
                        c => word.push(c),
                    }
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// Python's `str()` of a JSON value (what gunicorn does to each of `args`).
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => py_float(f),
            _ => n.to_string(),
        },
        // Python would print a repr; only ever compared, never executed.
        other => other.to_string(),
    }
}

/// An integer as Python's `int(str)` reads it: exact sign and digits.
#[derive(Debug, PartialEq)]
struct PyInt {
    negative: bool,
    /// No leading zeros; "0" for zero.
    digits: String,
}

impl PyInt {
    fn saturating_i64(&self) -> i64 {
        let magnitude = self.digits.bytes().fold(0i64, |acc, d| {
            acc.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        });
        if self.negative { -magnitude } else { magnitude }
    }
}

impl std::fmt::Display for PyInt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.negative { "-" } else { "" };
        write!(f, "{sign}{}", self.digits)
    }
}

/// Python's `int(s)`: surrounding whitespace, a sign, ASCII digits with single
/// underscores between them. The error is Python's.
fn py_int(s: &str) -> Result<PyInt, String> {
    let bad = || format!("invalid literal for int() with base 10: {}", py_repr(s));
    let t = s.trim();
    let (negative, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if body.is_empty()
        || body.starts_with('_')
        || body.ends_with('_')
        || body.contains("__")
        || !body.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return Err(bad());
    }
    let digits: String = body.chars().filter(|c| *c != '_').collect();
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(PyInt {
            negative: false,
            digits: "0".into(),
        });
    }
    Ok(PyInt {
        negative,
        digits: digits.to_string(),
    })
}

/// Python's `repr()` of a string, near enough for error messages.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\x7f' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

// ------------------------------------------------------------------ answers

fn show_workers(s: &Status) -> J {
    let workers: Vec<J> = by_age(s)
        .into_iter()
        .map(|w| {
            obj([
                ("pid", J::Int(i128::from(w.pid))),
                ("age", J::uint(w.id)),
                ("booted", J::Bool(booted(w))),
                ("aborted", J::Bool(w.state == "aborted")),
                ("last_heartbeat", heartbeat(w)),
            ])
        })
        .collect();
    let count = J::uint(workers.len() as u64);
    obj([("workers", J::Arr(workers)), ("count", count)])
}

fn show_all(s: &Status) -> J {
    let workers: Vec<J> = by_age(s)
        .into_iter()
        .map(|w| {
            obj([
                ("pid", J::Int(i128::from(w.pid))),
                ("type", J::str("web")),
                ("age", J::uint(w.id)),
                ("booted", J::Bool(booted(w))),
                ("last_heartbeat", heartbeat(w)),
            ])
        })
        .collect();
    let count = J::uint(workers.len() as u64);
    obj([
        (
            "arbiter",
            obj([
                ("pid", J::Int(i128::from(s.master.pid))),
                ("type", J::str("arbiter")),
                ("role", J::str("master")),
            ]),
        ),
        ("web_workers", J::Arr(workers)),
        ("web_worker_count", count),
        ("dirty_arbiter", J::Null),
        ("dirty_workers", J::Arr(vec![])),
        ("dirty_worker_count", J::Int(0)),
    ])
}

fn show_stats(s: &Status) -> J {
    let m = &s.master;
    obj([
        ("uptime", J::Float(round2(m.uptime_secs))),
        ("pid", J::Int(i128::from(m.pid))),
        ("workers_current", J::uint(s.workers.len() as u64)),
        ("workers_target", J::uint(m.target)),
        ("workers_spawned", J::uint(m.workers_spawned)),
        // gunicorn counts the TERM/KILLs it sent; we do not.
        ("workers_killed", J::Null),
        ("reloads", J::uint(m.reloads)),
        ("dirty_arbiter_pid", J::Null),
    ])
}

fn show_config(s: &Status) -> J {
    let m = &s.master;
    let bind = m
        .listeners
        .iter()
        .map(|l| {
            let a = &l.address;
            J::str(a.strip_prefix("http://").unwrap_or(a))
        })
        .collect();
    let timeout = match m.timeout_secs {
        None => J::Int(0),
        Some(t) if t.fract() == 0.0 && t.abs() < 1e15 => J::Int(t as i128),
        Some(t) => J::Float(t),
    };
    obj([
        ("bind", J::Arr(bind)),
        ("workers", J::uint(m.target)),
        ("timeout", timeout),
        ("proc_name", J::str(m.name.as_str())),
    ])
}

fn show_listeners(s: &Status) -> J {
    let listeners: Vec<J> = s
        .master
        .listeners
        .iter()
        .map(|l| {
            let a = l.address.as_str();
            let ty = if a.starts_with("unix:") {
                "unix"
            } else if a.starts_with("http://[") {
                "tcp6"
            } else if a.starts_with("http://") {
                "tcp"
            } else {
                "unknown"
            };
            obj([
                ("address", J::str(a)),
                ("fd", J::Null),
                ("type", J::str(ty)),
            ])
        })
        .collect();
    let count = J::uint(listeners.len() as u64);
    obj([("listeners", J::Arr(listeners)), ("count", count)])
}

/// Oldest first, as gunicorn sorts by age.
fn by_age(s: &Status) -> Vec<&WorkerStatus> {
    let mut v: Vec<&WorkerStatus> = s.workers.iter().collect();
    v.sort_by_key(|w| (w.id, w.pid));
    v
}

/// Ready, or ready and being recycled (only ready workers are recycled).
fn booted(w: &WorkerStatus) -> bool {
    w.state == "ready" || w.state == "recycling"
}

fn heartbeat(w: &WorkerStatus) -> J {
    w.last_beat_secs.map_or(J::Null, |b| J::Float(round2(b)))
}

/// Python's `round(x, 2)`, near enough.
fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        x
    }
}

// ------------------------------------------------------------------ JSON out

/// A JSON value that keeps its keys in order, written as Python's `json.dumps`.
#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn str(s: impl Into<String>) -> J {
        J::Str(s.into())
    }

    fn uint(n: u64) -> J {
        J::Int(i128::from(n))
    }

    fn from_value(v: &Value) -> J {
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => J::Int(i128::from(i)),
                (_, Some(u), _) => J::Int(i128::from(u)),
                (_, _, Some(f)) => J::Float(f),
                _ => J::Null,
            },
            Value::String(s) => J::Str(s.clone()),
            Value::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            Value::Object(o) => J::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), J::from_value(v)))
                    .collect(),
            ),
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(true) => out.push_str("true"),
            J::Bool(false) => out.push_str("false"),
            J::Int(i) => out.push_str(&i.to_string()),
            J::Float(f) if f.is_finite() => out.push_str(&py_float(*f)),
            J::Float(_) => out.push_str("null"),
            J::Str(s) => write_str(s, out),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(k, out);
                    out.push_str(": ");
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn obj<const N: usize>(fields: [(&str, J); N]) -> J {
    J::Obj(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// A string as `json.dumps` writes it (`ensure_ascii`).
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if c.is_ascii() && c >= ' ' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`, near enough: `30.0`, `0.01`, `1e-07`.
fn py_float(f: f64) -> String {
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

fn framed(message: &J) -> Vec<u8> {
    let mut body = String::new();
    message.write(&mut body);
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

fn ok_frame(id: &Value, data: J) -> Vec<u8> {
    framed(&obj([
        ("id", J::from_value(id)),
        ("status", J::str("ok")),
        ("data", data),
    ]))
}

/// A framed error for a connection refused before any request was read (another
/// user, too many connections), so gunicornc shows the reason.
pub fn refusal(message: &str) -> Vec<u8> {
    error_frame(&Value::from(0), &format!("Command failed: {message}"))
}

fn error_frame(id: &Value, error: &str) -> Vec<u8> {
    framed(&obj([
        ("id", J::from_value(id)),
        ("status", J::str("error")),
        ("error", J::str(error)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_proto::status::{ListenerStatus, MasterStatus};

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
        }
    }

    fn status() -> Status {
        Status {
            master: MasterStatus {
                pid: 100,
                name: "web".into(),
                version: "0.1.0".into(),
                started_at: "2026-01-01T00:00:00.000Z".into(),
                uptime_secs: 12.3456,
                state: "running".into(),
                generation: 1,
                target: 3,
                ready: 2,
                total: 3,
                listeners: vec![
                    ListenerStatus {
                        address: "http://127.0.0.1:8000".into(),
                        name: "a".into(),
                    },
                    ListenerStatus {
                        address: "http://[::1]:8001".into(),
                        name: "b".into(),
                    },
                    ListenerStatus {
                        address: "unix:/run/app.sock".into(),
                        name: "c".into(),
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
                },
            ),
            (
                "worker add 3",
                Request::Scale {
                    by: Some(3),
                    to: None,
                },
            ),
            (
                "worker add 0",
                Request::Scale {
                    by: Some(1),
                    to: None,
                },
            ),
            (
                "worker add -4",
                Request::Scale {
                    by: Some(1),
                    to: None,
                },
            ),
            (
                "worker add ' +1_0 '",
                Request::Scale {
                    by: Some(10),
                    to: None,
                },
            ),
            (
                "worker add 123456789012345678901234567890",
                Request::Scale {
                    by: Some(i64::MAX),
                    to: None,
                },
            ),
            (
                "worker remove",
                Request::Scale {
                    by: Some(-1),
                    to: None,
                },
            ),
            (
                "Worker REMOVE 2",
                Request::Scale {
                    by: Some(-2),
                    to: None,
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
        let scaled = Response::ok(Reply::Scaled { from: 2, to: 5 });
        assert_eq!(
            rendered("worker add 3", &scaled)["data"],
            serde_json::json!({"added": 3, "previous": 2, "total": 5})
        );
        let scaled = Response::ok(Reply::Scaled { from: 1, to: 1 });
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

    /// A tiny deterministic PRNG for the fuzz-ish tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Drain a buffer the way the control server does; must never panic or loop.
    fn drain(mut buf: Vec<u8>) {
        for _ in 0..buf.len() + 2 {
            let before = buf.len();
            match take_frame(&mut buf) {
                Frame::Incomplete => return,
                Frame::Invalid(a) => {
                    decode(&a);
                    return;
                }
                Frame::Answer(a) => {
                    decode(&a);
                }
                Frame::Request(shape, _) => {
                    for resp in responses() {
                        decode(&render(&shape, &resp));
                    }
                }
            }
            assert!(buf.len() < before, "no progress");
        }
        panic!("take_frame loops");
    }

    fn responses() -> Vec<Response> {
        let mut odd = status();
        odd.master.uptime_secs = f64::INFINITY;
        odd.master.timeout_secs = Some(f64::NAN);
        odd.master.name = "\u{0}\u{ffff}💥".into();
        odd.master.listeners[0].address = "weird".into();
        odd.workers
            .push(worker(u64::MAX, i32::MIN, "", Some(f64::NAN)));
        vec![
            Response::ok(Reply::Status(Box::new(status()))),
            Response::ok(Reply::Status(Box::new(odd))),
            Response::ok(Reply::Scaled { from: 5, to: 2 }),
            Response::ok(Reply::Killed {
                pid: -1,
                signal: String::new(),
            }),
            Response::ok(Reply::Reloaded {
                generation: 0,
                took_secs: -1.0,
            }),
            Response::ok(Reply::Stopped { pid: 0 }),
            Response::ok(Reply::Pong {
                pid: 1,
                name: "x".into(),
            }),
            Response::err(ErrorKind::TooLarge, "\u{7f}\"x"),
            Response {
                v: 9,
                ok: true,
                reply: None,
                error: None,
            },
        ]
    }

    #[test]
    fn fuzz_random_bytes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let n = rng.below(64);
            let mut buf: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 && buf.len() >= 4 {
                // A plausible header over random bytes.
                let len = rng.below(buf.len()) as u32;
                buf[..4].copy_from_slice(&len.to_be_bytes());
            }
            drain(buf);
        }
    }

    #[test]
    fn fuzz_commands() {
        const WORDS: [&str; 24] = [
            "show",
            "workers",
            "all",
            "stats",
            "config",
            "listeners",
            "dirty",
            "worker",
            "add",
            "remove",
            "kill",
            "reload",
            "reopen",
            "shutdown",
            "quick",
            "graceful",
            "help",
            "-1",
            "0",
            "99999999999999999999",
            "'",
            "\"",
            "\\",
            "é",
        ];
        let mut rng = Rng(42);
        for _ in 0..3000 {
            let words: Vec<&str> = (0..rng.below(5))
                .map(|_| WORDS[rng.below(WORDS.len())])
                .collect();
            let command = words.join(if rng.below(3) == 0 { "\t" } else { " " });
            let args = match rng.below(6) {
                0 => serde_json::json!(["1"]),
                1 => serde_json::json!([1, null, true, 2.5, {"k": []}]),
                2 => serde_json::json!("12"),
                3 => serde_json::json!(3),
                4 => serde_json::json!(null),
                _ => serde_json::json!([]),
            };
            let id = match rng.below(3) {
                0 => serde_json::json!(rng.next()),
                1 => serde_json::json!("req"),
                _ => serde_json::json!({"nested": [1, 2]}),
            };
            let msg = serde_json::json!({"id": id, "command": command, "args": args});
            let whole = frame(msg.to_string().as_bytes());
            // Whole, doubled, and truncated anywhere.
            drain(whole.clone());
            drain([whole.clone(), whole.clone()].concat());
            drain(whole[..rng.below(whole.len())].to_vec());
        }
    }
}
