//! The control protocol: one JSON object per line each way.
//!
//! A client connects to the master's Unix socket and writes a request line; the
//! master answers with one response line. Several requests may follow on the same
//! connection. Every message carries the protocol version `v`.
//!
//! ```text
//! $ echo '{"v":1,"cmd":"status"}' | socat - UNIX-CONNECT:/run/user/1000/arbiter/arbiter.sock
//! {"v":1,"ok":true,"reply":{"type":"status",...}}
//! ```
//!
//! Requests: `{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"scale","by":2}`,
//! `{"v":1,"cmd":"scale","to":4}`, `{"v":1,"cmd":"reload"}`, `{"v":1,"cmd":"reopen"}`,
//! `{"v":1,"cmd":"stop","fast":false}`, `{"v":1,"cmd":"kill","pid":1234,"signal":"TERM"}`,
//! `{"v":1,"cmd":"upgrade"}`, `{"v":1,"cmd":"ping"}`, `{"v":1,"cmd":"version"}`.
//!
//! `reload` and `stop` answer when they are done, not when they start: a reload
//! once the old generation is gone (or has failed), a stop just before the master
//! exits.

use serde::{Deserialize, Serialize};

use crate::status::Status;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line, newline included (and the longest response a
/// master takes from anything but itself).
pub const MAX_LINE: usize = 1024 * 1024;

/// The longest response line a client takes: a status lists every worker, about
/// 300 bytes each, so thousands of workers go past [`MAX_LINE`].
pub const MAX_REPLY: usize = 32 * 1024 * 1024;

/// The most workers one master runs: `--workers` above it is refused, and `scale`
/// clamps to it.
pub const MAX_WORKERS: usize = 65536;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The status snapshot.
    Status,
    /// Change the target worker count, relatively (`by`) or absolutely (`to`), or
    /// adapt it to the load within `min`..`max` (both given).
    Scale {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u64>,
    },
    /// As SIGHUP; answered once the reload succeeded or failed.
    Reload,
    /// As SIGUSR1.
    Reopen,
    /// As SIGTERM (SIGQUIT with `fast`); answered just before the master exits.
    Stop {
        #[serde(default)]
        fast: bool,
    },
    /// Signal one worker (default TERM); the master replaces it.
    Kill {
        pid: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// Replace the master: check the new binary, start it with the listeners, wait
    /// until its first generation is ready, then retire this master's workers and
    /// exit. Answered just before the old master exits (or with the failure, the old
    /// master still serving).
    Upgrade {
        /// The new binary; default: the one this master was started from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
        /// How long the new master may take to be ready, in seconds; default 60.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Liveness.
    Ping,
    /// Versions of the master and of its protocol.
    Version,
}

impl Request {
    /// Does this request change anything? (Mutating requests are logged with the
    /// caller's uid and pid.)
    pub fn is_mutating(&self) -> bool {
        !matches!(self, Request::Status | Request::Ping | Request::Version)
    }
}

/// A request with its version, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

impl RequestEnvelope {
    pub fn new(request: Request) -> RequestEnvelope {
        RequestEnvelope {
            v: PROTOCOL_VERSION,
            request,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    Scaled {
        from: u64,
        to: u64,
        /// Set when the master now adapts the count within these bounds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u64>,
    },
    Reloaded {
        generation: u64,
        took_secs: f64,
    },
    Reopened,
    /// Sent just before the master exits.
    Stopped {
        pid: i32,
    },
    Killed {
        pid: i32,
        signal: String,
    },
    /// The new master serves; the old one is about to exit.
    Upgraded {
        old_pid: i32,
        new_pid: i32,
        /// How many workers the new master runs (it keeps a `scale` or TTIN count).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workers: Option<usize>,
    },
    Pong {
        pid: i32,
        name: String,
    },
    Version {
        version: String,
        protocol: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, or not a request this master knows.
    BadRequest,
    /// A line longer than [`MAX_LINE`]; the connection is closed after this reply.
    TooLarge,
    /// A protocol version this master does not speak.
    UnsupportedVersion,
    /// The caller is not the master's user or root.
    PermissionDenied,
    /// The request is valid but cannot be done now (shutting down, no such worker...).
    Refused,
    /// The action ran and failed (a reload whose new generation never became ready).
    Failed,
    /// The master is at its client limit.
    Busy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(reply: Reply) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            reply: Some(reply),
            error: None,
        }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            reply: None,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
            }),
        }
    }

    /// The reply, or the error the master sent.
    pub fn into_result(self) -> Result<Reply, ErrorBody> {
        match (self.ok, self.reply, self.error) {
            (true, Some(r), _) => Ok(r),
            (_, _, Some(e)) => Err(e),
            _ => Err(ErrorBody {
                kind: ErrorKind::BadRequest,
                message: "malformed response".into(),
            }),
        }
    }
}

/// Parse one request line; the error is the response to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: Option<u32>,
    }
    let bad = |m: String| Response::err(ErrorKind::BadRequest, m);
    let probe: VersionOnly =
        serde_json::from_slice(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
    match probe.v {
        Some(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Response::err(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported; this master speaks {PROTOCOL_VERSION}"
                ),
            ));
        }
        None => return Err(bad("missing protocol version \"v\"".into())),
    }
    serde_json::from_slice::<RequestEnvelope>(line)
        .map(|e| e.request)
        .map_err(|e| bad(format!("invalid request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shapes() {
        let line = serde_json::to_string(&RequestEnvelope::new(Request::Scale {
            by: Some(2),
            to: None,
            min: None,
            max: None,
        }))
        .unwrap();
        assert_eq!(line, r#"{"v":1,"cmd":"scale","by":2}"#);
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"stop"}"#).unwrap(),
            Request::Stop { fast: false }
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"status"}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn bad_requests() {
        for (line, kind) in [
            (&b"garbage"[..], ErrorKind::BadRequest),
            (br#"{"cmd":"status"}"#, ErrorKind::BadRequest),
            (br#"{"v":2,"cmd":"status"}"#, ErrorKind::UnsupportedVersion),
            (br#"{"v":1,"cmd":"explode"}"#, ErrorKind::BadRequest),
            (br#"{"v":1,"cmd":"kill"}"#, ErrorKind::BadRequest),
            (br#"[1,2]"#, ErrorKind::BadRequest),
        ] {
            let err = parse_request(line).unwrap_err();
            assert_eq!(
                err.error.unwrap().kind,
                kind,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn response_round_trip() {
        let r = Response::ok(Reply::Scaled {
            from: 1,
            to: 3,
            min: None,
            max: None,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"ok":true,"reply":{"type":"scaled","from":1,"to":3}}"#
        );
        let back: Response = serde_json::from_str(&s).unwrap();
        assert_eq!(
            back.into_result().unwrap(),
            Reply::Scaled {
                from: 1,
                to: 3,
                min: None,
                max: None
            }
        );
    }
}
