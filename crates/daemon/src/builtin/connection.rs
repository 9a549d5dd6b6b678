//! One connection's socket and buffers, the table of them, and the worker's I/O on
//! them.

use std::cmp::Reverse;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::socket::{self, MsgFlags, Shutdown};
use slab::Slab;

use super::http::MAX_HEAD;
use super::session::{Ctx, OUTPUT_CAP, Session, Wait};
use super::{MAX_CONNECTIONS, Worker};

/// One read; also the shared read buffer's size.
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// Reads per readiness event, so that one fast sender cannot starve the others
/// (the fd stays readable and epoll reports it again).
const READS_PER_EVENT: usize = 16;
/// A connection with nothing in progress (idle keep-alive, a head or body that
/// stopped arriving, a client that does not read) is closed after this; without
/// it, MAX_CONNECTIONS silent clients would wedge the worker for good.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are looked for, while there are any connections.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// After an error response (or one followed by bytes we will not answer) we shut
/// down our side and read what the client still sends for this long, so that
/// closing with unread input does not RST the response away before it is read.
const LINGER: Duration = Duration::from_secs(2);
/// On TERM, an idle connection (accepted with no request yet, or keep-alive between
/// requests) gets this long to send one, answered with `Connection: close`: its
/// client connected to be served, and may be sending right now.
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(1);

pub(super) const READABLE: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLRDHUP);

// ------------------------------------------------------------------ connections

pub(super) struct Conn {
    fd: OwnedFd,
    /// Received bytes not used yet: a partial request, or requests behind a sleep.
    input: Vec<u8>,
    session: Session,
    /// The peer sent FIN.
    eof: bool,
    /// Our side is shut down, the last response sent; input is discarded until
    /// the peer closes or LINGER runs out.
    lingering: bool,
    /// The one timer that counts for this connection (sleep, linger, drain grace);
    /// heap entries with another instant are stale.
    pub(super) deadline: Option<Instant>,
    last_active: Instant,
    /// What epoll watches for it now.
    interest: EpollFlags,
    /// Counted in the worker's `in_hand`.
    counted: bool,
}

impl Conn {
    /// Nothing received, nothing owed, nothing pending.
    pub(super) fn idle(&self) -> bool {
        self.input.is_empty()
            && self.session.output.is_empty()
            && self.session.wait == Wait::Ready
            && !self.session.close_after
    }

    /// A request is being read, waited on (a sleep) or answered: the worker is
    /// busy with it. A lingering connection has had its last answer.
    fn in_hand(&self) -> bool {
        !self.lingering
            && (!self.input.is_empty()
                || !self.session.output.is_empty()
                || self.session.wait != Wait::Ready)
    }

    fn sleeping(&self) -> bool {
        matches!(self.session.wait, Wait::Sleep(_))
    }

    /// Whether to read more now: not past EOF, nor after the last request, nor
    /// while enough is buffered either way (backpressure on pipelining clients).
    fn reading(&self) -> bool {
        !self.eof
            && (self.lingering
                || (!self.session.close_after
                    && self.input.len() < MAX_HEAD
                    && self.session.output.len() < OUTPUT_CAP))
    }

    fn wanted_interest(&self) -> EpollFlags {
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
    fn flush(&mut self, now: Instant) -> Result<(), Errno> {
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

/// Connections by token: the slab key in the low 32 bits and the generation of the
/// insert in the high ones, so that an event or a timer for a connection that is
/// gone never reaches the one that reused its key.
#[derive(Default)]
pub(super) struct Conns {
    slab: Slab<(u32, Conn)>,
    /// Bumped on each insert. Wrapping is harmless: a stale token would need its
    /// key reused exactly 2^32 inserts later while its timer or event is pending.
    generation: u32,
}

fn token(generation: u32, key: usize) -> u64 {
    (u64::from(generation) << 32) | key as u64
}

impl Conns {
    pub(super) fn insert(&mut self, conn: Conn) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        token(self.generation, self.slab.insert((self.generation, conn)))
    }

    /// The key of a token that is current.
    fn key(&self, token: u64) -> Option<usize> {
        let key = (token & 0xffff_ffff) as usize;
        let (generation, _) = self.slab.get(key)?;
        (u64::from(*generation) == token >> 32).then_some(key)
    }

    pub(super) fn get(&self, token: u64) -> Option<&Conn> {
        Some(&self.slab.get(self.key(token)?)?.1)
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut Conn> {
        let key = self.key(token)?;
        Some(&mut self.slab.get_mut(key)?.1)
    }

    fn remove(&mut self, token: u64) -> Option<Conn> {
        let key = self.key(token)?;
        self.slab.try_remove(key).map(|(_, conn)| conn)
    }

    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub(super) fn tokens(&self) -> Vec<u64> {
        self.slab
            .iter()
            .map(|(key, (generation, _))| token(*generation, key))
            .collect()
    }
}

// ------------------------------------------------------------------ driving connections

impl Worker {
    pub(super) fn adopt(&mut self, fd: OwnedFd) {
        let now = self.now;
        let token = self.conns.insert(Conn {
            fd,
            input: Vec::new(),
            session: Session::default(),
            eof: false,
            lingering: false,
            deadline: None,
            last_active: now,
            interest: READABLE,
            counted: false,
        });
        let Some(c) = self.conns.get(token) else {
            return;
        };
        if self
            .epoll
            .add(c.fd.as_fd(), EpollEvent::new(READABLE, token))
            .is_err()
        {
            self.conns.remove(token);
            return;
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.update_listening();
        }
    }

    pub(super) fn on_conn(&mut self, token: u64, flags: EpollFlags) {
        let Some(reading) = self.conns.get(token).map(Conn::reading) else {
            // Closed earlier in this batch.
            return;
        };
        // ERR: reset. HUP: both directions are shut, nothing can be delivered; and
        // level-triggered HUP would be reported again on every wait.
        if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            self.close(token);
            return;
        }
        if flags.intersects(READABLE) && reading {
            let to_eof = flags.contains(EpollFlags::EPOLLRDHUP);
            if !self.read(token, to_eof) {
                self.close(token);
                return;
            }
        }
        self.pump(token);
    }

    /// Read what the peer sent and serve it. False: the connection is broken.
    /// With `to_eof` (the peer sent FIN) keep reading until EOF shows, so that the
    /// connection can be closed right after its last answer.
    pub(super) fn read(&mut self, token: u64, to_eof: bool) -> bool {
        for _ in 0..READS_PER_EVENT {
            let Some(c) = self.conns.get_mut(token) else {
                return false;
            };
            if !c.reading() {
                return true;
            }
            match nix::unistd::read(&c.fd, &mut self.read_buf) {
                Ok(0) => {
                    c.eof = true;
                    return true;
                }
                Ok(n) => {
                    c.last_active = self.now;
                    self.feed(token, n);
                    if n < READ_CHUNK && !to_eof {
                        // Drained: skip the read that would only say EAGAIN.
                        return true;
                    }
                }
                Err(Errno::EAGAIN) => return true,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
        true
    }

    /// Take `n` fresh bytes from the shared read buffer.
    fn feed(&mut self, token: u64, n: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let data = &self.read_buf[..n];
        if c.lingering {
            return;
        }
        if !c.input.is_empty() {
            // Behind earlier bytes: `pump` serves them together.
            c.input.extend_from_slice(data);
            return;
        }
        // The common case: whole requests, served straight from the shared buffer.
        let cx = Ctx {
            replies: &self.replies,
            draining: self.draining,
            served: &self.served,
        };
        let (used, sleep) = c.session.serve(data, &cx);
        c.input.extend_from_slice(&data[used..]);
        if let Some(d) = sleep {
            self.arm(token, Instant::now() + d);
        }
    }

    /// Serve buffered requests, send what is queued, then close the connection or
    /// watch it for what it needs next.
    pub(super) fn pump(&mut self, token: u64) {
        loop {
            let Some(c) = self.conns.get_mut(token) else {
                return;
            };
            let mut sleep = None;
            if !c.input.is_empty() && !c.lingering {
                let cx = Ctx {
                    replies: &self.replies,
                    draining: self.draining,
                    served: &self.served,
                };
                let (used, started) = c.session.serve(&c.input, &cx);
                c.input.drain(..used);
                sleep = started;
            }
            // Stopped only because too much output was queued: go on once it is sent.
            let blocked_on_output = c.session.output.len() >= OUTPUT_CAP
                && c.session.wait == Wait::Ready
                && !c.session.close_after;
            if c.flush(self.now).is_err() {
                self.close(token);
                return;
            }
            let again = blocked_on_output && c.session.output.is_empty() && !c.input.is_empty();
            if let Some(d) = sleep {
                self.arm(token, Instant::now() + d);
            }
            if !again {
                break;
            }
        }
        self.settle(token);
    }

    /// After I/O: close the connection if it is done, else update what epoll
    /// watches for it.
    fn settle(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.session.output.is_empty() {
            if c.lingering {
                if c.eof {
                    self.close(token);
                    return;
                }
            } else if c.session.close_after {
                if !c.session.linger || c.eof {
                    self.close(token);
                    return;
                }
                let _ = socket::shutdown(c.fd.as_raw_fd(), Shutdown::Write);
                c.lingering = true;
                c.input = Vec::new();
                self.arm(token, self.now + LINGER);
            } else if c.eof && !c.sleeping() {
                // Nothing more is coming, and nothing is owed.
                self.close(token);
                return;
            } else if self.draining && c.idle() && c.deadline.is_none() {
                // An idle keep-alive connection: its client may be sending the
                // next request right now. Closing under it would fail that
                // request; answering it (with `Connection: close`) sends the client
                // to another worker. Closed at the grace's end if nothing comes.
                self.arm(token, self.now + DRAIN_GRACE);
            }
        }
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let in_hand = c.in_hand();
        if in_hand != c.counted {
            c.counted = in_hand;
            if in_hand {
                self.in_hand += 1;
            } else {
                self.in_hand -= 1;
            }
        }
        let wanted = c.wanted_interest();
        if wanted != c.interest {
            // Failure only if the fd is gone from the set, which we never do.
            let _ = self
                .epoll
                .modify(c.fd.as_fd(), &mut EpollEvent::new(wanted, token));
            c.interest = wanted;
        }
    }

    /// Give the connection a deadline (it replaces any earlier one).
    pub(super) fn arm(&mut self, token: u64, at: Instant) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.deadline = Some(at);
        self.timers.push(Reverse((at, token)));
        // Deadlines replaced or of closed connections stay in the heap until due:
        // weed them out before they outnumber the live ones.
        if self.timers.len() > 64 + 2 * self.conns.len() {
            let conns = &self.conns;
            self.timers.retain(|Reverse((t, tok))| {
                conns.get(*tok).is_some_and(|c| c.deadline == Some(*t))
            });
        }
    }

    pub(super) fn on_deadline(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.deadline = None;
        if c.lingering {
            self.close(token);
        } else if c.sleeping() {
            let cx = Ctx {
                replies: &self.replies,
                draining: self.draining,
                served: &self.served,
            };
            c.session.wake(&cx);
            c.last_active = self.now;
            self.pump(token);
        } else if self.draining && c.idle() {
            // The drain grace of a connection that never sent a request.
            self.close(token);
        }
    }

    /// Close connections that have done nothing for IDLE_TIMEOUT (a sleeping one
    /// is waiting on us, not idle).
    pub(super) fn sweep(&mut self) {
        if let Some(cutoff) = self.now.checked_sub(IDLE_TIMEOUT) {
            for token in self.conns.tokens() {
                if self
                    .conns
                    .get(token)
                    .is_some_and(|c| !c.sleeping() && c.last_active < cutoff)
                {
                    self.close(token);
                }
            }
        }
        self.next_sweep = (!self.conns.is_empty()).then(|| self.now + SWEEP_EVERY);
    }

    pub(super) fn close(&mut self, token: u64) {
        // Dropping the fd also takes it out of the epoll set: a connection's open
        // file description is ours alone.
        let Some(c) = self.conns.remove(token) else {
            return;
        };
        if c.counted {
            self.in_hand -= 1;
        }
        if self.conns.is_empty() {
            // Nothing left to time: an idle worker must not wake up for stale entries.
            self.timers.clear();
            self.next_sweep = None;
        }
        if self.conns.len() + 1 == MAX_CONNECTIONS {
            self.update_listening();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MAX_LISTENERS, TOKEN_LISTENER_0};
    use super::*;

    #[test]
    fn slab_tokens_do_not_outlive_their_connection() {
        let conn = || {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            Conn {
                fd: a.into(),
                input: Vec::new(),
                session: Session::default(),
                eof: false,
                lingering: false,
                deadline: None,
                last_active: Instant::now(),
                interest: READABLE,
                counted: false,
            }
        };
        let mut slab = Conns::default();
        let t1 = slab.insert(conn());
        assert!(slab.get(t1).is_some());
        assert!(slab.remove(t1).is_some());
        let t2 = slab.insert(conn());
        assert_ne!(t1, t2, "a reused slot gets a new token");
        assert!(slab.get(t1).is_none() && slab.get_mut(t1).is_none());
        assert!(slab.remove(t1).is_none());
        assert_eq!((slab.len(), slab.tokens()), (1, vec![t2]));
        assert!(t2 < TOKEN_LISTENER_0 - MAX_LISTENERS as u64);
    }
}
