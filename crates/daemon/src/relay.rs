//! Workers' stdout and stderr, relayed line by line into the master's log.
//!
//! Each worker writes into a pipe whose read end the master polls. Going through the
//! master means a log reopen (USR1, `arbiterctl reopen`) redirects workers too, and
//! every line is tagged with the worker it came from. The master reads without
//! blocking and at most [`READ_PER_TURN`] bytes per pipe per loop turn, so a worker
//! that floods cannot hold the loop; past [`BYTES_PER_SECOND`] its lines are dropped
//! rather than slowing the master down. Drops are counted as they happen (per
//! worker and in total, for `status`), and the first drop of a burst is logged
//! then, rate-limited: a worker that floods and then goes quiet must not keep
//! its losses unseen until it exits.
//! A relay lives until its pipe's EOF, which may come after the worker itself is
//! gone (its own children can still hold the pipe).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ratelimit::Repeated;

const READ_PER_TURN: usize = 64 * 1024;
/// A longer line is cut and relayed in pieces.
const MAX_LINE: usize = 16 * 1024;
const BYTES_PER_SECOND: usize = 4 * 1024 * 1024;
/// A worker that keeps flooding gets one "dropping" line per this interval.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lines dropped from all workers since the master started (relays come and go
/// with their workers; the total must outlive them).
static TOTAL_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Worker output lines dropped since the master started.
pub fn total_dropped() -> u64 {
    TOTAL_DROPPED.load(Ordering::Relaxed)
}

pub struct Relay {
    fd: OwnedFd,
    pub pid: i32,
    pub worker_id: u64,
    partial: Vec<u8>,
    window_start: Instant,
    window_bytes: usize,
    /// Dropped in this burst, for the summary line when it ends.
    dropped: u64,
    dropped_total: u64,
    drop_log: Repeated,
}

/// A pipe for one worker: the read end (non-blocking, close-on-exec) for the
/// master, the write end (blocking, close-on-exec until the child dup2s it onto 1
/// and 2) for the worker.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_GETFL,
    )?);
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok((read, write))
}

impl Relay {
    pub fn new(fd: OwnedFd, pid: i32, worker_id: u64) -> Relay {
        Relay {
            fd,
            pid,
            worker_id,
            partial: Vec::new(),
            window_start: Instant::now(),
            window_bytes: 0,
            dropped: 0,
            dropped_total: 0,
            drop_log: Repeated::new(DROP_LOG_EVERY),
        }
    }

    /// Lines of this worker's output dropped so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Read what is there (bounded) and log complete lines. Returns false at EOF or
    /// on an error: the relay is done.
    pub fn pump(&mut self, now: Instant) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let mut taken = 0;
        let mut open = true;
        while taken < READ_PER_TURN {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => {
                    taken += n;
                    self.take(&buf[..n], now);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    open = false;
                    break;
                }
            }
        }
        if !open {
            if !self.partial.is_empty() {
                let rest = std::mem::take(&mut self.partial);
                self.emit(&rest);
            }
            self.note_dropped();
        }
        open
    }

    fn take(&mut self, mut data: &[u8], now: Instant) {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.note_dropped();
            self.window_start = now;
            self.window_bytes = 0;
        }
        while !data.is_empty() {
            let (line, rest, complete) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            self.partial.extend_from_slice(line);
            if complete || self.partial.len() >= MAX_LINE {
                let whole = std::mem::take(&mut self.partial);
                if self.window_bytes + whole.len() > BYTES_PER_SECOND {
                    self.drop_line(now);
                } else {
                    self.window_bytes += whole.len();
                    self.emit(&whole);
                }
            }
        }
    }

    fn emit(&self, line: &[u8]) {
        crate::log::worker_line(self.pid, self.worker_id, &String::from_utf8_lossy(line));
    }

    fn drop_line(&mut self, now: Instant) {
        // The first drop of a burst: say so now, not when the burst ends (it may
        // end with a silence that lasts until the worker exits).
        if self.dropped == 0 && self.drop_log.note(now).is_some() {
            crate::warning!(
                "Worker (pid:{}) writes faster than {} MiB/s: dropping its output lines \
                 ({} dropped before this burst; `arbiterctl status` counts them)",
                self.pid,
                BYTES_PER_SECOND / (1024 * 1024),
                self.dropped_total
            );
        }
        self.dropped += 1;
        self.dropped_total += 1;
        TOTAL_DROPPED.fetch_add(1, Ordering::Relaxed);
    }

    fn note_dropped(&mut self) {
        if self.dropped > 0 {
            crate::warning!(
                "Worker (pid:{}) wrote too fast: {} lines dropped",
                self.pid,
                self.dropped
            );
            self.dropped = 0;
        }
    }
}
