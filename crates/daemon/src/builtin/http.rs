//! The request head: parsing, routing, and the status of a refused request.
//! The canned responses are in `response.rs`.

/// A request head longer than this is answered 431 and the connection closed.
pub(super) const MAX_HEAD: usize = 16 * 1024;
/// `/sleep?ms=` cap: ten minutes.
pub(super) const MAX_SLEEP_MS: u64 = 600_000;

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
    match parse_head(&rest[..end]) {
        Ok(mut req) => {
            req.head_len = skip + end;
            Parse::Request(req)
        }
        Err(status) => Parse::Reject(status),
    }
}

fn leading_crlfs(buf: &[u8]) -> usize {
    buf.chunks_exact(2).take_while(|c| *c == b"\r\n").count() * 2
}

/// The length of the head up to and including its `\r\n\r\n`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
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

/// Header slots on the stack; a head with more lines gets a heap array of its exact
/// size, so that MAX_HEAD stays the only bound on the number of fields.
const INLINE_FIELDS: usize = 32;

/// Parse a head, its final `\r\n\r\n` included; `Err` is the status to answer.
///
/// httparse parses it. Around that, the rules this worker serves by, where
/// httparse alone would answer differently:
/// - bare CR, bare LF and NUL are refused up front (httparse takes a bare LF for a
///   line end): they are where request smuggling lives;
/// - other HTTP/1.x minors are served as 1.1 and other majors get 505, where
///   httparse knows only 1.0 and 1.1;
/// - a target that is not UTF-8 is served (routing looks at ASCII only), where
///   httparse wants a `str`;
/// - the fields are judged in order, so that a `Transfer-Encoding` line (411)
///   before a malformed one (400) still gets 411 (see [`read_head`]).
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    let lines = &head[..head.len().saturating_sub(4)];
    if !line_breaks_ok(lines) {
        return Err(400);
    }
    let fields = lines.iter().filter(|&&b| b == b'\n').count();
    let mut rewritten: Option<Vec<u8>> = None;
    // Each rewrite removes the cause of its refusal, so two at most (target, version).
    for _ in 0..3 {
        let buf = rewritten.as_deref().unwrap_or(head);
        let syntax = match read_head(buf, fields) {
            Ok(req) => return Ok(req),
            Err(Refused::Status(status)) => return Err(status),
            Err(Refused::Syntax(e)) => e,
        };
        rewritten = Some(match syntax {
            httparse::Error::Version => with_known_version(buf)?,
            httparse::Error::Token => with_ascii_target(buf).ok_or(400u16)?,
            _ => return Err(400),
        });
    }
    Err(400)
}

enum Refused {
    /// httparse refused the head.
    Syntax(httparse::Error),
    /// The head parsed, and says to answer this.
    Status(u16),
}

/// The request in `buf`, a head whose lines all end in CRLF (see [`parse_head`]),
/// with `fields` lines after the request line.
fn read_head(buf: &[u8], fields: usize) -> Result<Request, Refused> {
    let mut inline = [httparse::EMPTY_HEADER; INLINE_FIELDS];
    let mut heap = Vec::new();
    let slots = if fields <= INLINE_FIELDS {
        &mut inline[..]
    } else {
        heap.resize(fields, httparse::EMPTY_HEADER);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(slots);
    // Invalid field lines are skipped rather than refused, so that the fields
    // before the first of them are still judged first, in order; the loop below
    // finds that line by where the fields httparse kept lie.
    let mut config = httparse::ParserConfig::default();
    config.ignore_invalid_headers_in_requests(true);
    match config.parse_request(&mut req, buf) {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => {}
        // A complete head whose end httparse sees elsewhere: not one we can trust.
        Ok(_) => return Err(Refused::Status(400)),
        Err(e) => return Err(Refused::Syntax(e)),
    }
    let http10 = req.version == Some(0);
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        _ => Method::Other,
    };

    let mut body: Option<u64> = None;
    let (mut close, mut keep) = (false, false);
    let mut expect_continue = false;
    let refuse = |status| Err(Refused::Status(status));
    // Where the next field line starts: right after the request line.
    let mut line = buf
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |i| i + 1);
    for field in req.headers.iter() {
        // A field that does not start the next line: the line before it was skipped
        // as invalid (an empty or non-token name, obsolete line folding, `Name :`,
        // a control character in the value).
        if offset_in(buf, field.name.as_bytes()) != line {
            return refuse(400);
        }
        line += buf[line..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len() - line, |i| i + 1);
        let (name, value) = (field.name, field.value);
        if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_digits(value) else {
                return refuse(400);
            };
            if body.is_some_and(|m| m != n) {
                return refuse(400);
            }
            body = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked request bodies are not worth supporting in a test worker.
            return refuse(411);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    // Not at the blank line that ends the head: an invalid line after the last field.
    if line + 2 != buf.len() {
        return refuse(400);
    }
    Ok(Request {
        method,
        route: route_of(req.path.unwrap_or_default().as_bytes()),
        // HTTP/1.1 keeps the connection unless told not to; 1.0 only when asked.
        keep_alive: !close && (keep || !http10),
        http10,
        expect_continue,
        body: body.unwrap_or(0),
        head_len: 0,
    })
}

/// Where `part`, a slice of `buf`, starts in it.
fn offset_in(buf: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize)
}

fn request_line(buf: &[u8]) -> &[u8] {
    let end = buf.iter().position(|&b| b == b'\r').unwrap_or(buf.len());
    &buf[..end]
}

/// httparse refused the version: 505 or 400 by our reading of it, or else a copy
/// of the head with a version httparse takes and that means the same here.
fn with_known_version(buf: &[u8]) -> Result<Vec<u8>, u16> {
    let line = request_line(buf);
    // httparse got this far, so the method and the target before it are sound.
    let version = line.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
    let known: &[u8] = if parse_version(version)? {
        b"HTTP/1.0"
    } else {
        b"HTTP/1.1"
    };
    let mut copy = buf.to_vec();
    copy.splice(
        line.len() - version.len()..line.len(),
        known.iter().copied(),
    );
    Ok(copy)
}

/// httparse refused the method or the target: if the target is merely not UTF-8,
/// a copy of the head with its non-ASCII bytes as `~`. Routing matches only ASCII
/// other than `~`, so the route stays the one of the bytes as sent.
fn with_ascii_target(buf: &[u8]) -> Option<Vec<u8>> {
    let mut parts = request_line(buf).splitn(3, |&b| b == b' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if std::str::from_utf8(target).is_ok() {
        return None;
    }
    let mut copy = buf.to_vec();
    let start = method.len() + 1;
    for b in copy.iter_mut().skip(start).take(target.len()) {
        if !b.is_ascii() {
            *b = b'~';
        }
    }
    Some(copy)
}

fn line_breaks_ok(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        0 => false,
        _ => true,
    })
}

/// `Ok(true)` for HTTP/1.0. Other 1.x minors are served as 1.1; other majors 505.
fn parse_version(v: &[u8]) -> Result<bool, u16> {
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

fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// Plain decimal digits only: `str::parse` would also take a leading `+`.
fn parse_digits(s: &[u8]) -> Option<u64> {
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

fn route_of(target: &[u8]) -> Route {
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
fn origin_form(target: &[u8]) -> &[u8] {
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
fn sleep_ms(query: &[u8]) -> Option<u64> {
    let value = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"ms="))?;
    parse_digits(value).filter(|&ms| ms <= MAX_SLEEP_MS)
}

#[cfg(test)]
mod tests {
    use super::super::response::{Replies, identity_json};
    use super::*;

    fn req(s: &str) -> Request {
        match parse(s.as_bytes(), 0) {
            Parse::Request(r) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn reject(s: &[u8]) -> u16 {
        match parse(s, 0) {
            Parse::Reject(status) => status,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(s)),
        }
    }

    #[test]
    fn complete_request() {
        let s = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = req(s);
        assert_eq!(
            (
                r.method,
                r.route,
                r.keep_alive,
                r.http10,
                r.body,
                r.head_len
            ),
            (Method::Get, Route::Root, true, false, 0, s.len())
        );
        assert_eq!(req("HEAD /health HTTP/1.1\r\n\r\n").method, Method::Head);
        assert_eq!(req("GET /health HTTP/1.1\r\n\r\n").route, Route::Health);
        assert_eq!(req("GET /nope HTTP/1.1\r\n\r\n").route, Route::NotFound);
        assert_eq!(req("GET /?x=1 HTTP/1.1\r\n\r\n").route, Route::Root);
        assert_eq!(req("DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert_eq!(
            req("GET http://example.com/health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            req("GET http://example.com HTTP/1.1\r\n\r\n").route,
            Route::Root
        );
        // Empty lines before the request line are skipped, and counted as used.
        let r = req("\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.head_len, 22);
    }

    #[test]
    fn incomplete_request() {
        for s in [
            &b""[..],
            b"G",
            b"GET / HTTP/1.1",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"\r\n",
        ] {
            assert_eq!(parse(s, 0), Parse::Partial, "{s:?}");
        }
    }

    #[test]
    fn resumed_scan_finds_a_terminator_split_across_reads() {
        let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..full.len() {
            let first = &full[..cut];
            assert_eq!(parse(first, 0), Parse::Partial);
            let scanned = first.len().saturating_sub(3);
            assert!(
                matches!(parse(full, scanned), Parse::Request(_)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn pipelined_requests() {
        let two = b"GET / HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\nGET /x";
        let Parse::Request(first) = parse(two, 0) else {
            panic!()
        };
        assert_eq!((first.route, first.head_len), (Route::Root, 18));
        let Parse::Request(second) = parse(&two[18..], 0) else {
            panic!()
        };
        assert_eq!(second.route, Route::Health);
        assert_eq!(parse(&two[18 + second.head_len..], 0), Parse::Partial);
    }

    #[test]
    fn oversize_head() {
        assert_eq!(reject(&vec![b'a'; MAX_HEAD + 1]), 431);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(reject(&long), 431);
        // Just under the cap is fine.
        let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ok.extend(std::iter::repeat_n(b'a', MAX_HEAD - ok.len() - 4));
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(ok.len(), MAX_HEAD);
        assert!(matches!(parse(&ok, 0), Parse::Request(_)));
    }

    #[test]
    fn bad_requests() {
        for s in [
            &b"garbage\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \0\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert_eq!(reject(s), 400, "{:?}", String::from_utf8_lossy(s));
        }
        assert_eq!(reject(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(
            reject(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        // A future 1.x minor is served as 1.1.
        assert!(!req("GET / HTTP/1.2\r\n\r\n").http10);
    }

    #[test]
    fn content_length() {
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").body,
            5
        );
        assert_eq!(req("GET / HTTP/1.1\r\ncontent-length:  0 \r\n\r\n").body, 0);
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert_eq!(req(&big).body, u64::MAX);
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        ] {
            assert_eq!(reject(bad), 400, "{:?}", String::from_utf8_lossy(bad));
        }
        // The same length twice is merely redundant.
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").body,
            5
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(req("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(req("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").keep_alive);
        let r = req("GET / HTTP/1.0\r\n\r\n");
        assert!(r.http10 && !r.keep_alive);
        assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(req("GET / HTTP/1.0\r\nconnection:\tfoo , Keep-Alive\r\n\r\n").keep_alive);
        assert!(!req("GET / HTTP/1.0\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn sleep_parameter() {
        let route = |t: &str| req(&format!("GET {t} HTTP/1.1\r\n\r\n")).route;
        assert_eq!(route("/sleep?ms=250"), Route::Sleep(250));
        assert_eq!(route("/sleep?ms=0"), Route::Sleep(0));
        assert_eq!(route("/sleep?a=b&ms=7&ms=9"), Route::Sleep(7));
        assert_eq!(route("/sleep?ms=600000"), Route::Sleep(MAX_SLEEP_MS));
        for bad in [
            "/sleep",
            "/sleep?",
            "/sleep?ms=",
            "/sleep?ms=x",
            "/sleep?ms=+5",
            "/sleep?ms=-5",
            "/sleep?ms=1.5",
            "/sleep?ms=600001",
            "/sleep?ms=99999999999999999999999",
            "/sleep?xms=5",
        ] {
            assert_eq!(route(bad), Route::BadSleep, "{bad}");
        }
        assert_eq!(route("/sleep/?ms=5"), Route::NotFound);
    }

    #[test]
    fn replies_carry_length_type_and_connection() {
        let replies = Replies::new("{}");
        let mut out = Vec::new();
        replies.health.write(&mut out, true, false, false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
        );
        out.clear();
        replies.root.write(&mut out, true, true, true);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        replies.not_allowed.write(&mut out, false, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Allow: GET, HEAD\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn identity_body_shape() {
        let j: serde_json::Value = serde_json::from_str(&identity_json()).unwrap();
        assert_eq!(j["pid"].as_u64(), Some(u64::from(std::process::id())));
        for key in ["worker_id", "slot", "generation"] {
            assert!(j[key].is_i64(), "{key} in {j}");
        }
    }
}
