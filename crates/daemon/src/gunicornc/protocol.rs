//! What a gunicornc client sends: the framing, the message, the command grammar,
//! and the framed envelope every answer goes out in.

use super::repr::{J, obj, py_repr, py_str};
use super::{Frame, Kind, MAX_BODY, Shape};
use arbiter_proto::control::Request;
use serde_json::Value;

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
                min: None,
                max: None,
            },
        )),
        "remove" => Ok(Action::Master(
            Kind::WorkerRemove,
            Request::Scale {
                by: Some(-count(args)?),
                to: None,
                min: None,
                max: None,
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
///
/// Not the `shlex` crate (1.3 and 2.0 split alike): it splits as a POSIX shell,
/// not as Python, so gunicorn's words and errors would change. Its only error is
/// `None`, where gunicorn tells `No closing quotation` from `No escaped
/// character`; a `#` starting a word drops the rest of the line (`worker kill #5`
/// would be "Missing PID" instead of an `int()` error); `\r` is not a separator;
/// inside double quotes it unescapes `\$` and `` \` `` and drops a
/// backslash-newline, which Python keeps, as it keeps an escaped newline outside
/// quotes.
pub(super) fn shlex_split(s: &str) -> Result<Vec<String>, &'static str> {
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

/// An integer as Python's `int(str)` reads it: exact sign and digits.
#[derive(Debug, PartialEq)]
pub(super) struct PyInt {
    negative: bool,
    /// No leading zeros; "0" for zero.
    digits: String,
}

impl PyInt {
    pub(super) fn saturating_i64(&self) -> i64 {
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
pub(super) fn py_int(s: &str) -> Result<PyInt, String> {
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

fn framed(message: &J) -> Vec<u8> {
    let mut body = String::new();
    message.write(&mut body);
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

pub(super) fn ok_frame(id: &Value, data: J) -> Vec<u8> {
    framed(&obj([
        ("id", J::Echo(id.clone())),
        ("status", J::str("ok")),
        ("data", data),
    ]))
}

/// A framed error for a connection refused before any request was read (another
/// user, too many connections), so gunicornc shows the reason.
pub fn refusal(message: &str) -> Vec<u8> {
    error_frame(&Value::from(0), &format!("Command failed: {message}"))
}

pub(super) fn error_frame(id: &Value, error: &str) -> Vec<u8> {
    framed(&obj([
        ("id", J::Echo(id.clone())),
        ("status", J::str("error")),
        ("error", J::str(error)),
    ]))
}
