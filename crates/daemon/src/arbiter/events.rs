//! The master's event set: one epoll instance, what each registration stands
//! for, and the measure of time the master did not run.
//!
//! A loop turn costs what is ready, not what exists: fds are registered once,
//! when their owner creates them (a worker's output pipe and exec-status pipe at
//! spawn, a control client at accept), and taken out before they are closed, since
//! a child forked meanwhile can hold a copy that would keep the registration
//! alive. Every registration gets a key never used before, so an event from a
//! stale registration, or for an fd number reused since, is never taken for the
//! fd's new owner.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::control::{ClientId, ControlServer, Interest};
use crate::critical;
use crate::metrics::{self, MetricsServer};

/// What a registered fd is, as the loop dispatches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Signals,
    Notify,
    /// A worker's stdout/stderr pipe, by worker id.
    Relay(u64),
    /// A worker's exec-status pipe, by worker id.
    Exec(u64),
    /// A `--preload` template's socket, by its id.
    Template(u64),
    /// The upgrade checker's output, or the new master's ready pipe.
    Upgrade,
    /// EOF: the old master is gone.
    Predecessor,
    ControlListener,
    ControlWatch,
    ControlClient(ClientId),
    MetricsListener,
    MetricsClient(u64),
    /// `--reload-on-change`: the inotify fd.
    CodeWatch,
}

struct Registration {
    key: u64,
    source: Source,
    flags: EpollFlags,
}

pub struct Events {
    epoll: Epoll,
    next_key: u64,
    by_fd: HashMap<RawFd, Registration>,
    by_key: HashMap<u64, Source>,
    buf: Vec<EpollEvent>,
}

/// Events read per wait; more stay ready for the next turn (level-triggered).
const BATCH: usize = 256;

impl Events {
    pub fn new() -> io::Result<Events> {
        Ok(Events {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            next_key: 1,
            by_fd: HashMap::new(),
            by_key: HashMap::new(),
            buf: vec![EpollEvent::empty(); BATCH],
        })
    }

    /// Watch `fd`, new to the loop, for reading. Anything registered under the
    /// same number is forgotten first: an fd closed without [`Events::remove`]
    /// must not make its successor look registered already.
    pub fn add(&mut self, fd: BorrowedFd<'_>, source: Source) {
        self.remove(fd);
        self.set(fd, source, true, false);
    }

    /// Watch `fd` for what is wanted now; neither: not watched at all (a hangup
    /// is reported whatever the mask, and nobody would act on it).
    fn set(&mut self, fd: BorrowedFd<'_>, source: Source, read: bool, write: bool) {
        let mut flags = EpollFlags::empty();
        flags.set(EpollFlags::EPOLLIN, read);
        flags.set(EpollFlags::EPOLLOUT, write);
        let raw = fd.as_raw_fd();
        if let Some(r) = self.by_fd.get(&raw)
            && r.source == source
            && r.flags == flags
        {
            return;
        }
        self.remove(fd);
        if flags.is_empty() {
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        if let Err(e) = self.epoll.add(fd, EpollEvent::new(flags, key)) {
            critical!("epoll_ctl(ADD) failed for fd {raw}: {e}");
            return;
        }
        self.by_fd.insert(raw, Registration { key, source, flags });
        self.by_key.insert(key, source);
    }

    /// Stop watching `fd`; call before closing it.
    pub fn remove(&mut self, fd: BorrowedFd<'_>) {
        if let Some(r) = self.by_fd.remove(&fd.as_raw_fd()) {
            self.by_key.remove(&r.key);
            // ENOENT/EBADF: the fd was closed behind our back; the key is forgotten
            // all the same, so a late event from it is ignored.
            let _ = self.epoll.delete(fd);
        }
    }

    /// Bring the control server's registrations up to date: its closed sockets
    /// out (before they are dropped here), its listener, inotify watch and clients
    /// in, each with what it wants now. Costs one step per control client, of
    /// which there are few.
    pub fn sync_control(&mut self, control: &mut ControlServer) {
        for fd in control.take_retired() {
            self.remove(fd.as_fd());
        }
        for (fd, read, write, interest) in control.interests() {
            let source = match interest {
                Interest::Listener => Source::ControlListener,
                Interest::Watch => Source::ControlWatch,
                Interest::Client(id) => Source::ControlClient(id),
            };
            self.set(fd, source, read, write);
        }
    }

    /// The same for the metrics server: its closed sockets out, its listener and
    /// clients in (at most a few dozen).
    pub fn sync_metrics(&mut self, server: &mut MetricsServer) {
        for fd in server.take_retired() {
            self.remove(fd.as_fd());
        }
        for (fd, read, write, interest) in server.interests() {
            let source = match interest {
                metrics::Interest::Listener => Source::MetricsListener,
                metrics::Interest::Client(id) => Source::MetricsClient(id),
            };
            self.set(fd, source, read, write);
        }
    }

    /// Sleep until something is ready or `timeout` passes; what is ready, once
    /// per registration.
    pub fn wait(&mut self, timeout: PollTimeout) -> Vec<Source> {
        let n = match self.epoll.wait(&mut self.buf, timeout) {
            Ok(n) => n,
            // Every signal interrupts the wait (SA_RESTART does not apply to it);
            // the record waits in the pipe, ready at the next turn.
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                critical!("epoll_wait failed: {e}");
                0
            }
        };
        self.buf[..n]
            .iter()
            .filter_map(|e| self.by_key.get(&e.data()).copied())
            .collect()
    }
}

/// How long the wait may sleep: until `due`, or for ever when nothing is due.
pub fn wait_timeout(due: Option<Instant>, now: Instant) -> PollTimeout {
    let Some(next) = due else {
        return PollTimeout::NONE;
    };
    let wait = next.saturating_duration_since(now);
    // Round up: a sub-millisecond remainder must not become 0 and spin the loop.
    let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// A wait that returns this much later than its deadline (or a quarter of the
/// heartbeat timeout, if less), or a turn that takes this long between the wait
/// and the deadline checks, means the master did not run: stopped, a paused VM, a
/// machine thrashing in swap. The workers most likely did not run either, so
/// their silence over that time is not held against them. The lateness is less
/// than the stall by however long the master meant to sleep anyway, hence the
/// bound tied to the timeout.
const STALL: Duration = Duration::from_secs(1);

/// The time the master did not run this turn, when it is long enough to count as
/// a stall: measured from the earlier of the deadline it slept toward and the
/// moment the wait returned, so a stop during the wait and one while the turn's
/// events were handled are both seen.
pub fn stall(
    due: Option<Instant>,
    woke: Instant,
    now: Instant,
    timeout: Option<Duration>,
) -> Option<Duration> {
    let threshold = timeout.map_or(STALL, |t| STALL.min(t / 4));
    let lost = now.saturating_duration_since(due.map_or(woke, |d| d.min(woke)));
    (lost > threshold).then_some(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_rounds_up() {
        let now = Instant::now();
        assert_eq!(wait_timeout(None, now), PollTimeout::NONE);
        let t = wait_timeout(Some(now + Duration::from_micros(10)), now);
        assert_eq!(i32::from(t), 1);
        assert_eq!(i32::from(wait_timeout(Some(now), now)), 0);
    }

    #[test]
    fn stall_is_measured_from_the_earlier_moment() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Woke on time, handled events quickly: no stall.
        assert_eq!(stall(Some(t0), t0, t0 + s(0), None), None);
        // Woke 3 s past the deadline.
        assert_eq!(stall(Some(t0), t0 + s(3), t0 + s(3), None), Some(s(3)));
        // Woke early but the turn itself lost 2 s.
        assert_eq!(stall(None, t0, t0 + s(2), None), Some(s(2)));
        // A short timeout lowers the bar.
        assert!(stall(None, t0, t0 + Duration::from_millis(600), Some(s(2))).is_some());
    }

    #[test]
    fn a_stale_key_is_ignored() {
        let mut ev = Events::new().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        ev.add(r.as_fd(), Source::Relay(1));
        nix::unistd::write(&w, b"x").unwrap();
        assert_eq!(ev.wait(PollTimeout::ZERO), vec![Source::Relay(1)]);
        // Re-registered under another owner: only the new one is reported.
        ev.remove(r.as_fd());
        ev.add(r.as_fd(), Source::Relay(2));
        assert_eq!(ev.wait(PollTimeout::ZERO), vec![Source::Relay(2)]);
        ev.remove(r.as_fd());
        assert!(ev.wait(PollTimeout::ZERO).is_empty());
    }

    /// `fd` moved to the lowest free number from 700: a range nothing else in
    /// this process uses (the master's per-worker fds sit above 1024), so the
    /// number freed by a close comes back to the next caller even while other
    /// tests open fds in parallel threads.
    fn in_quiet_range(fd: std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
        use std::os::fd::{FromRawFd, OwnedFd};
        let n = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(700)).unwrap();
        // SAFETY: a fresh fd from F_DUPFD, owned here alone.
        unsafe { OwnedFd::from_raw_fd(n) }
    }

    #[test]
    fn an_fd_closed_without_remove_does_not_hide_its_successor() {
        let mut ev = Events::new().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let r = in_quiet_range(r);
        let number = r.as_raw_fd();
        ev.add(r.as_fd(), Source::Upgrade);
        drop((r, w));
        let (r2, w2) = nix::unistd::pipe().unwrap();
        let r2 = in_quiet_range(r2);
        assert_eq!(r2.as_raw_fd(), number, "the number is reused");
        ev.add(r2.as_fd(), Source::Upgrade);
        nix::unistd::write(&w2, b"x").unwrap();
        assert_eq!(ev.wait(PollTimeout::ZERO), vec![Source::Upgrade]);
    }
}
