//! One connection's HTTP exchange, apart from its socket.

use std::time::Duration;

use super::http::{Method, Parse, Request, Route, parse};
use super::response::{CONTINUE, Replies, Reply};

/// Responses queued for a client that does not read them: past this, its further
/// requests wait (and reading from it stops) until the socket drains.
pub(super) const OUTPUT_CAP: usize = 64 * 1024;

// ------------------------------------------------------------------ one connection's HTTP

/// What a connection waits for before it reads its next request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    #[default]
    Ready,
    /// Body bytes still to skip; then `req` is answered.
    Body { left: u64, req: Request },
    /// A `/sleep` whose timer has not fired; later requests stay buffered.
    Sleep(Request),
}

/// The HTTP state of a connection, apart from its socket and unparsed input, so
/// that it can be fed from either the shared read buffer or the connection's own.
#[derive(Default)]
pub(super) struct Session {
    /// Responses not yet sent, in request order.
    pub(super) output: Vec<u8>,
    pub(super) wait: Wait,
    /// How much of the buffered partial head was already searched.
    scanned: usize,
    /// At least one response was queued (so an idle connection is a kept-alive one).
    answered: bool,
    /// The last response is queued: close once it is sent.
    pub(super) close_after: bool,
    /// ... and it was an error, or unread bytes followed it: linger before
    /// closing (see LINGER).
    pub(super) linger: bool,
}

/// What answers need to know about the worker.
pub(super) struct Ctx<'a> {
    pub(super) replies: &'a Replies,
    pub(super) draining: bool,
    /// Responses queued, by every connection (the scoreboard's count).
    pub(super) served: &'a std::cell::Cell<u64>,
}

impl Session {
    /// Answer the requests at the start of `data` in order, until one must wait (a
    /// body still arriving, a sleep, a client not reading its responses) or the
    /// data ends. Returns the bytes used (the rest must be kept and fed again) and,
    /// when a `/sleep` began, how long it lasts.
    pub(super) fn serve(&mut self, data: &[u8], cx: &Ctx) -> (usize, Option<Duration>) {
        let mut pos = 0;
        loop {
            if self.close_after {
                // Whatever follows the last response is never answered; but closing
                // on unread bytes would RST, which can destroy the responses.
                self.linger |= pos < data.len();
                return (data.len(), None);
            }
            match self.wait {
                Wait::Sleep(_) => return (pos, None),
                Wait::Body { left, req } => {
                    let take = left.min((data.len() - pos) as u64);
                    pos += take as usize;
                    if take < left {
                        self.wait = Wait::Body {
                            left: left - take,
                            req,
                        };
                        return (pos, None);
                    }
                    self.wait = Wait::Ready;
                    if let Some(sleep) = self.answer(req, cx) {
                        return (pos, Some(sleep));
                    }
                }
                Wait::Ready => {
                    if self.output.len() >= OUTPUT_CAP {
                        return (pos, None);
                    }
                    let rest = &data[pos..];
                    match parse(rest, std::mem::take(&mut self.scanned)) {
                        Parse::Partial => {
                            self.scanned = rest.len().saturating_sub(3);
                            return (pos, None);
                        }
                        Parse::Reject(status) => {
                            self.reject(status, cx);
                            return (data.len(), None);
                        }
                        Parse::Request(req) => {
                            pos += req.head_len;
                            if req.body == 0 {
                                if let Some(sleep) = self.answer(req, cx) {
                                    return (pos, Some(sleep));
                                }
                                continue;
                            }
                            let have = (data.len() - pos) as u64;
                            if req.expect_continue && !req.http10 && have < req.body {
                                self.output.extend_from_slice(CONTINUE);
                            }
                            self.wait = Wait::Body {
                                left: req.body,
                                req,
                            };
                        }
                    }
                }
            }
        }
    }

    /// Queue the answer to `req`, or start its sleep and return how long it is.
    fn answer(&mut self, req: Request, cx: &Ctx) -> Option<Duration> {
        let r = cx.replies;
        let reply = match (req.method, req.route) {
            (_, Route::NotFound) => &r.not_found,
            (Method::Other, _) => &r.not_allowed,
            (_, Route::BadSleep) => &r.bad_sleep,
            (_, Route::Root) => &r.root,
            (_, Route::Health) => &r.health,
            (_, Route::Sleep(ms)) => {
                self.wait = Wait::Sleep(req);
                return Some(Duration::from_millis(ms));
            }
        };
        self.reply(reply, req, cx);
        None
    }

    /// The sleep is over: answer it.
    pub(super) fn wake(&mut self, cx: &Ctx) {
        if let Wait::Sleep(req) = self.wait {
            self.wait = Wait::Ready;
            self.reply(&cx.replies.root, req, cx);
        }
    }

    fn reply(&mut self, reply: &Reply, req: Request, cx: &Ctx) {
        // During a drain every response is the connection's last.
        let keep_alive = req.keep_alive && !cx.draining;
        self.close_after |= !keep_alive;
        self.answered = true;
        cx.served.set(cx.served.get() + 1);
        reply.write(
            &mut self.output,
            keep_alive,
            req.http10,
            req.method == Method::Head,
        );
    }

    fn reject(&mut self, status: u16, cx: &Ctx) {
        cx.replies
            .rejection(status)
            .write(&mut self.output, false, false, false);
        self.answered = true;
        cx.served.set(cx.served.get() + 1);
        self.close_after = true;
        self.linger = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- Session: what goes out for what comes in, without sockets.

    fn session_serve(s: &mut Session, data: &[u8], draining: bool) -> (usize, Option<Duration>) {
        let replies = Replies::new("{\"pid\":1}");
        let served = std::cell::Cell::new(0);
        let cx = Ctx {
            replies: &replies,
            draining,
            served: &served,
        };
        s.serve(data, &cx)
    }

    fn statuses(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r[..3].to_string())
            .collect()
    }

    #[test]
    fn session_answers_pipelined_requests_in_order() {
        let mut s = Session::default();
        let data = b"GET / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nPUT /health HTTP/1.1\r\n\r\nGET /heal";
        let (used, sleep) = session_serve(&mut s, data, false);
        assert_eq!(sleep, None);
        assert_eq!(used, data.len() - b"GET /heal".len());
        assert_eq!(statuses(&s.output), ["200", "404", "405"]);
        assert!(!s.close_after);
    }

    #[test]
    fn session_stops_at_a_sleep_and_answers_on_wake() {
        let mut s = Session::default();
        let data = b"GET /sleep?ms=30 HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n";
        let (used, sleep) = session_serve(&mut s, data, false);
        assert_eq!(sleep, Some(Duration::from_millis(30)));
        assert_eq!(used, b"GET /sleep?ms=30 HTTP/1.1\r\n\r\n".len());
        assert!(s.output.is_empty());
        // More bytes while asleep are left for later.
        assert_eq!(session_serve(&mut s, &data[used..], false), (0, None));
        let replies = Replies::new("{\"pid\":1}");
        let served = std::cell::Cell::new(0);
        s.wake(&Ctx {
            replies: &replies,
            draining: true,
            served: &served,
        });
        assert_eq!(served.get(), 1, "a sleep counts once it is answered");
        assert_eq!(statuses(&s.output), ["200"]);
        let text = String::from_utf8_lossy(&s.output).into_owned();
        assert!(
            text.ends_with("Connection: close\r\n\r\n{\"pid\":1}"),
            "{text}"
        );
        assert!(s.close_after);
        // After the last response the rest is dropped unanswered.
        assert_eq!(
            session_serve(&mut s, &data[used..], false),
            (data.len() - used, None)
        );
        assert_eq!(statuses(&s.output), ["200"]);
        assert!(s.linger, "closing on unread input must linger");
    }

    #[test]
    fn session_discards_a_body_across_chunks() {
        let mut s = Session::default();
        let head = b"POST /health HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        let (used, _) = session_serve(&mut s, &[&head[..], b"12345"].concat(), false);
        assert_eq!(used, head.len() + 5);
        assert!(s.output.is_empty(), "answered before the body was in");
        let next = b"67890GET / HTTP/1.1\r\n\r\n";
        let (used, _) = session_serve(&mut s, next, false);
        assert_eq!(used, next.len());
        assert_eq!(statuses(&s.output), ["405", "200"]);
    }

    #[test]
    fn session_sends_100_continue_only_when_the_body_is_awaited() {
        let mut s = Session::default();
        let head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        session_serve(&mut s, head, false);
        assert!(s.output.starts_with(CONTINUE));
        let mut s = Session::default();
        session_serve(&mut s, &[&head[..], b"abc"].concat(), false);
        assert!(!s.output.starts_with(CONTINUE));
        assert_eq!(statuses(&s.output), ["405"]);
    }

    #[test]
    fn session_rejects_and_closes() {
        let mut s = Session::default();
        let data = b"GET / HTTP/1.1\r\n\r\ngarbage\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (used, _) = session_serve(&mut s, data, false);
        assert_eq!(used, data.len());
        assert_eq!(statuses(&s.output), ["200", "400"]);
        assert!(s.close_after && s.linger);
    }

    #[test]
    fn session_closes_after_connection_close_and_during_drain() {
        let mut s = Session::default();
        session_serve(
            &mut s,
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(s.close_after && !s.linger);
        let mut s = Session::default();
        session_serve(&mut s, b"GET / HTTP/1.1\r\n\r\n", true);
        assert!(s.close_after);
        assert!(String::from_utf8_lossy(&s.output).contains("Connection: close\r\n"));
        let mut s = Session::default();
        session_serve(&mut s, b"GET / HTTP/1.0\r\n\r\n", false);
        assert!(s.close_after);
    }

    #[test]
    fn session_holds_requests_while_output_is_backed_up() {
        let mut s = Session::default();
        let one = b"GET / HTTP/1.1\r\n\r\n";
        let many = one.repeat(OUTPUT_CAP);
        let (used, _) = session_serve(&mut s, &many, false);
        assert!(used < many.len() && used % one.len() == 0);
        assert!(s.output.len() >= OUTPUT_CAP && s.output.len() < OUTPUT_CAP + 200);
    }
}
