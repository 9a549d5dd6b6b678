use arbiter_proto::worker as contract;

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
use super::*;

// ------------------------------------------------------------------ requests

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum Method {
    Get,
    Head,
    Other,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum Route {
    Root,
    Health,
    Sleep(u64),
    BadSleep,
    NotFound,
}

/// What a request head says, as far as routing, framing and keep-alive care.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) struct Request {
    pub(super) method: Method,
    pub(super) route: Route,
    pub(super) keep_alive: bool,
    pub(super) http10: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before its body.
    pub(super) expect_continue: bool,
    /// `Content-Length`: body bytes after the head, read and discarded.
    pub(super) body: u64,
    /// Bytes of head, final blank line (and any CRLFs before it) included.
    pub(super) head_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parse {
    /// The head is not complete yet.
    Partial,
    Request(Request),
    /// Answer with this status and close.
    Reject(u16),
}

/// Parse the request at the start of `buf`. `scan_from` is how far an earlier
/// call already searched `buf` for the end of the head, so that a head arriving a
/// byte at a time is not searched from the start each time.
pub(super) fn parse(buf: &[u8], scan_from: usize) -> Parse {
    // RFC 9112 2.2: empty lines before a request line are ignored (some clients
    // send a CRLF after a body).
    let skip = leading_crlfs(buf);
    let rest = &buf[skip..];
    let Some(end) = find_head_end(rest, scan_from.saturating_sub(skip)) else {
        return if buf.len() > MAX_HEAD {
            Parse::Reject(431)
        } else {
            Parse::Partial
        };
    };
    if skip + end > MAX_HEAD {
        return Parse::Reject(431);
    }
    match parse_head(&rest[..end - 4]) {
        Ok(mut req) => {
            req.head_len = skip + end;
            Parse::Request(req)
        }
        Err(status) => Parse::Reject(status),
    }
}

pub(super) fn leading_crlfs(buf: &[u8]) -> usize {
    buf.chunks_exact(2).take_while(|c| *c == b"\r\n").count() * 2
}

/// The length of the head up to and including its `\r\n\r\n`.
pub(super) fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let at = i + buf[i..].iter().position(|&b| b == b'\n')?;
        if at >= 3 && &buf[at - 3..=at] == b"\r\n\r\n" {
            return Some(at + 1);
        }
        i = at + 1;
    }
    None
}

/// Parse a head without its final `\r\n\r\n`; `Err` is the status to answer.
pub(super) fn parse_head(head: &[u8]) -> Result<Request, u16> {
    // Bare CR, bare LF and NUL are where request smuggling lives: refuse them, and
    // lines are then exactly the pieces between CRLFs.
    if !line_breaks_ok(head) {
        return Err(400);
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(400);
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(400);
    }
    let http10 = parse_version(version)?;
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        _ => Method::Other,
    };

    let mut body: Option<u64> = None;
    let (mut close, mut keep) = (false, false);
    let mut expect_continue = false;
    for line in lines {
        let colon = line.iter().position(|&b| b == b':').ok_or(400u16)?;
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        // An empty or non-token name also catches obsolete line folding (a line
        // starting with a space) and `Name :`, both of which RFC 9112 rejects.
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(400);
        }
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(400);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_digits(value).ok_or(400u16)?;
            if body.is_some_and(|m| m != n) {
                return Err(400);
            }
            body = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked request bodies are not worth supporting in a test worker.
            return Err(411);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(Request {
        method,
        route: route_of(target),
        // HTTP/1.1 keeps the connection unless told not to; 1.0 only when asked.
        keep_alive: !close && (keep || !http10),
        http10,
        expect_continue,
        body: body.unwrap_or(0),
        head_len: 0,
    })
}

pub(super) fn line_breaks_ok(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        0 => false,
        _ => true,
    })
}

/// `Ok(true)` for HTTP/1.0. Other 1.x minors are served as 1.1; other majors 505.
pub(super) fn parse_version(v: &[u8]) -> Result<bool, u16> {
    match v {
        b"HTTP/1.1" => Ok(false),
        b"HTTP/1.0" => Ok(true),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major == b'1' {
                Ok(false)
            } else {
                Err(505)
            }
        }
        _ => Err(400),
    }
}

pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(super) fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// Plain decimal digits only: `str::parse` would also take a leading `+`.
pub(super) fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

pub(super) fn route_of(target: &[u8]) -> Route {
    let target = origin_form(target);
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    match path {
        b"/" => Route::Root,
        b"/health" => Route::Health,
        b"/sleep" => sleep_ms(query).map_or(Route::BadSleep, Route::Sleep),
        _ => Route::NotFound,
    }
}

/// The path and query of an absolute-form target (`http://host/path`), which
/// RFC 9112 3.2.2 says a server must accept; other targets as they are.
pub(super) fn origin_form(target: &[u8]) -> &[u8] {
    for scheme in [&b"http://"[..], b"https://"] {
        if let Some(prefix) = target.get(..scheme.len())
            && prefix.eq_ignore_ascii_case(scheme)
        {
            let rest = &target[scheme.len()..];
            return match rest.iter().position(|&b| b == b'/') {
                Some(i) => &rest[i..],
                None => b"/",
            };
        }
    }
    target
}

/// The first `ms=` of a query, if it is a whole number of at most MAX_SLEEP_MS.
pub(super) fn sleep_ms(query: &[u8]) -> Option<u64> {
    let value = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"ms="))?;
    parse_digits(value).filter(|&ms| ms <= MAX_SLEEP_MS)
}

// ------------------------------------------------------------------ responses

/// A response prepared at boot: status line and fixed headers, and its body.
/// Only the `Connection` header varies per request.
pub(super) struct Reply {
    pub(super) head: Box<[u8]>,
    pub(super) body: Box<[u8]>,
}

impl Reply {
    pub(super) fn new(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Reply {
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

    pub(super) fn text(status: u16, body: &str) -> Reply {
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

pub(super) fn reason(status: u16) -> &'static str {
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
    pub(super) bad_request: Reply,
    pub(super) length_required: Reply,
    pub(super) head_too_large: Reply,
    pub(super) bad_version: Reply,
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
