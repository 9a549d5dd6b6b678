//! The canned responses, prepared at boot.

use arbiter_proto::worker as contract;

/// A response prepared at boot: status line and fixed headers, and its body.
/// Only the `Connection` header varies per request.
pub(super) struct Reply {
    head: Box<[u8]>,
    body: Box<[u8]>,
}

impl Reply {
    fn new(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Reply {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}",
            reason(status),
            body.len()
        );
        Reply {
            head: head.into_bytes().into(),
            body: body.into(),
        }
    }

    fn text(status: u16, body: &str) -> Reply {
        Reply::new(status, "text/plain", "", body.as_bytes())
    }

    pub(super) fn write(&self, out: &mut Vec<u8>, keep_alive: bool, http10: bool, head_only: bool) {
        let connection: &[u8] = match (keep_alive, http10) {
            (false, _) => b"Connection: close\r\n\r\n",
            (true, true) => b"Connection: keep-alive\r\n\r\n",
            (true, false) => b"\r\n",
        };
        out.extend_from_slice(&self.head);
        out.extend_from_slice(connection);
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

pub(super) struct Replies {
    pub(super) root: Reply,
    pub(super) health: Reply,
    pub(super) not_found: Reply,
    pub(super) not_allowed: Reply,
    pub(super) bad_sleep: Reply,
    bad_request: Reply,
    length_required: Reply,
    head_too_large: Reply,
    bad_version: Reply,
}

impl Replies {
    pub(super) fn new(identity_json: &str) -> Replies {
        Replies {
            root: Reply::new(200, "application/json", "", identity_json.as_bytes()),
            health: Reply::text(200, "ok"),
            not_found: Reply::text(404, "not found\n"),
            not_allowed: Reply::new(
                405,
                "text/plain",
                "Allow: GET, HEAD\r\n",
                b"method not allowed\n",
            ),
            bad_sleep: Reply::text(400, "expected /sleep?ms=N with N in 0..=600000\n"),
            bad_request: Reply::text(400, "bad request\n"),
            length_required: Reply::text(411, "chunked request bodies are not supported\n"),
            head_too_large: Reply::text(431, "request head too large\n"),
            bad_version: Reply::text(505, "HTTP version not supported\n"),
        }
    }

    /// The reply for a request that could not be parsed.
    pub(super) fn rejection(&self, status: u16) -> &Reply {
        match status {
            411 => &self.length_required,
            431 => &self.head_too_large,
            505 => &self.bad_version,
            _ => &self.bad_request,
        }
    }
}

pub(super) fn identity_json() -> String {
    let var = |key| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    format!(
        "{{\"pid\":{},\"worker_id\":{},\"slot\":{},\"generation\":{}}}",
        std::process::id(),
        var(contract::ENV_WORKER_ID),
        var(contract::ENV_SLOT),
        var(contract::ENV_GENERATION)
    )
}
