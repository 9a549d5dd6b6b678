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
//!
//! # Layout
//!
//! The code falls into three parts by what it knows, each a file; this one holds
//! the public surface ([`take_frame`], [`render`], [`refusal`], [`Shape`],
//! [`Frame`], [`MAX_BODY`]) that `control.rs` uses, and `Kind`, where the first
//! two parts meet (made from a request, read to shape its answer):
//!
//! * `protocol.rs`: what a client sends and the envelope of every answer: the
//!   length-prefixed framing, the message object, the command grammar
//!   (`shlex.split`, `int()`, the `show`/`worker`/`dirty` words) and gunicorn's
//!   error texts. It turns bytes into a `Kind` and one of our requests, and
//!   wraps any answer's JSON in gunicorn's `{"id", "status", ...}` frame.
//! * `answers.rs`: what the master's reply becomes: a `Kind` and our
//!   [`Response`](arbiter_proto::control::Response) turned into gunicorn's `data`
//!   objects, with its field names and order. It knows our status snapshot, and
//!   is the only part that reads a worker's state.
//! * `repr.rs`: how Python writes values: `json.dumps` (a `serde_json` formatter
//!   over a JSON value that keeps its key order), `repr()` of a string and of a
//!   float, `str()` of an argument. It knows nothing of gunicorn.
//!
//! The tests are a `tests` module of their own (shared fixtures, then one file for
//! requests, one for answers, one for the fuzz-style checks): most of them drive
//! [`take_frame`] and [`render`] end to end, across all three parts, so none of
//! the parts is where they belong.

mod answers;
mod protocol;
mod repr;
#[cfg(test)]
mod tests;

pub use answers::render;
pub use protocol::{refusal, take_frame};

use arbiter_proto::control::{MAX_LINE, Request};
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
