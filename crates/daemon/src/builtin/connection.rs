use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::EpollFlags;
use nix::sys::socket::{self, MsgFlags};

/// Connections served at once; at the cap the listeners are left alone until one
/// closes (the kernel's backlog holds the rest, or another worker takes them).
use super::*;

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
    pub(super) scanned: usize,
    /// At least one response was queued (so an idle connection is a kept-alive one).
    pub(super) answered: bool,
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
    pub(super) fn answer(&mut self, req: Request, cx: &Ctx) -> Option<Duration> {
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
        self.reply(reply, req, cx.draining);
        None
    }

    /// The sleep is over: answer it.
    pub(super) fn wake(&mut self, cx: &Ctx) {
        if let Wait::Sleep(req) = self.wait {
            self.wait = Wait::Ready;
            self.reply(&cx.replies.root, req, cx.draining);
        }
    }

    pub(super) fn reply(&mut self, reply: &Reply, req: Request, draining: bool) {
        // During a drain every response is the connection's last.
        let keep_alive = req.keep_alive && !draining;
        self.close_after |= !keep_alive;
        self.answered = true;
        reply.write(
            &mut self.output,
            keep_alive,
            req.http10,
            req.method == Method::Head,
        );
    }

    pub(super) fn reject(&mut self, status: u16, cx: &Ctx) {
        cx.replies
            .rejection(status)
            .write(&mut self.output, false, false, false);
        self.answered = true;
        self.close_after = true;
        self.linger = true;
    }
}

// ------------------------------------------------------------------ connections

pub(super) struct Conn {
    pub(super) fd: OwnedFd,
    /// Received bytes not used yet: a partial request, or requests behind a sleep.
    pub(super) input: Vec<u8>,
    pub(super) session: Session,
    /// The peer sent FIN.
    pub(super) eof: bool,
    /// Our side is shut down, the last response sent; input is discarded until
    /// the peer closes or LINGER runs out.
    pub(super) lingering: bool,
    /// The one timer that counts for this connection (sleep, linger, drain grace);
    /// heap entries with another instant are stale.
    pub(super) deadline: Option<Instant>,
    pub(super) last_active: Instant,
    /// What epoll watches for it now.
    pub(super) interest: EpollFlags,
}

impl Conn {
    /// Nothing received, nothing owed, nothing pending.
    pub(super) fn idle(&self) -> bool {
        self.input.is_empty()
            && self.session.output.is_empty()
            && self.session.wait == Wait::Ready
            && !self.session.close_after
    }

    pub(super) fn sleeping(&self) -> bool {
        matches!(self.session.wait, Wait::Sleep(_))
    }

    /// Whether to read more now: not past EOF, nor after the last request, nor
    /// while enough is buffered either way (backpressure on pipelining clients).
    pub(super) fn reading(&self) -> bool {
        !self.eof
            && (self.lingering
                || (!self.session.close_after
                    && self.input.len() < MAX_HEAD
                    && self.session.output.len() < OUTPUT_CAP))
    }

    pub(super) fn wanted_interest(&self) -> EpollFlags {
        let mut flags = EpollFlags::empty();
        if self.reading() {
            flags |= READABLE;
        }
        if !self.session.output.is_empty() {
            flags |= EpollFlags::EPOLLOUT;
        }
        flags
    }

    /// Send what is queued, as far as the socket takes it. `Err`: the peer is gone.
    pub(super) fn flush(&mut self, now: Instant) -> Result<(), Errno> {
        let out = &mut self.session.output;
        while !out.is_empty() {
            match socket::send(self.fd.as_raw_fd(), out, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    out.drain(..n);
                    self.last_active = now;
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        release_if_big(out);
        release_if_big(&mut self.input);
        Ok(())
    }
}

/// A buffer that once held a burst should not pin that memory while idle.
pub(super) fn release_if_big(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 2 * OUTPUT_CAP {
        *buf = Vec::new();
    }
}

/// Connections by token: the slot index in the low 32 bits and the slot's
/// generation in the high ones, so that an event or a timer for a connection that
/// is gone never reaches the one that reused its slot.
#[derive(Default)]
pub(super) struct Slab {
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u32>,
    pub(super) len: usize,
}

pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) conn: Option<Conn>,
}

impl Slab {
    pub(super) fn insert(&mut self, conn: Conn) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.conn = Some(conn);
        self.len += 1;
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    pub(super) fn slot(&self, token: u64) -> Option<&Slot> {
        let slot = self.slots.get((token & 0xffff_ffff) as usize)?;
        (u64::from(slot.generation) == token >> 32).then_some(slot)
    }

    pub(super) fn get(&self, token: u64) -> Option<&Conn> {
        self.slot(token)?.conn.as_ref()
    }

    pub(super) fn get_mut(&mut self, token: u64) -> Option<&mut Conn> {
        self.slot(token)?;
        self.slots[(token & 0xffff_ffff) as usize].conn.as_mut()
    }

    pub(super) fn remove(&mut self, token: u64) -> Option<Conn> {
        self.slot(token)?;
        let index = (token & 0xffff_ffff) as u32;
        let slot = &mut self.slots[index as usize];
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.len -= 1;
        Some(conn)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn tokens(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(i, s)| (u64::from(s.generation) << 32) | i as u64)
            .collect()
    }
}
