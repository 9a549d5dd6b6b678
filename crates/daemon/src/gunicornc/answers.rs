//! What the master's reply becomes: gunicorn's `data` for each command, with its
//! field names and order, from our status snapshot and replies.

use super::protocol::{error_frame, ok_frame};
use super::repr::{J, obj};
use super::{Kind, Shape};
use arbiter_proto::control::{ErrorKind, Reply, Response};
use arbiter_proto::status::{Status, WorkerState, WorkerStatus};

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
        (Kind::WorkerAdd, Reply::Scaled { from, to, .. }) => obj([
            ("added", J::uint(to.saturating_sub(*from))),
            ("previous", J::uint(*from)),
            ("total", J::uint(*to)),
        ]),
        (Kind::WorkerRemove, Reply::Scaled { from, to, .. }) => obj([
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

fn show_workers(s: &Status) -> J {
    let workers: Vec<J> = by_age(s)
        .into_iter()
        .map(|w| {
            obj([
                ("pid", J::Int(i128::from(w.pid))),
                ("age", J::uint(w.id)),
                ("booted", J::Bool(flags(w).booted)),
                ("aborted", J::Bool(flags(w).aborted)),
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
                ("booted", J::Bool(flags(w).booted)),
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

/// gunicorn's two flags for a worker's state.
struct Flags {
    /// Ready, or ready and being recycled (only ready workers are recycled).
    booted: bool,
    aborted: bool,
}

/// What gunicornc's answers say of a worker's state.
fn flags(w: &WorkerStatus) -> Flags {
    match w.state {
        WorkerState::Ready | WorkerState::Recycling => Flags {
            booted: true,
            aborted: false,
        },
        WorkerState::Aborted => Flags {
            booted: false,
            aborted: true,
        },
        WorkerState::Booting
        | WorkerState::Stopping
        | WorkerState::Killed
        | WorkerState::Unknown => Flags {
            booted: false,
            aborted: false,
        },
    }
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
