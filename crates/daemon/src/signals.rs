//! Signals into a poll loop through a self-pipe, one byte per delivery.
//!
//! signal-hook's `pending()` reports each signal once per drain, but gunicorn's
//! semantics count every TTIN and TTOU, so the handler writes the signal number
//! itself into a non-blocking, close-on-exec pipe. The handler does nothing else:
//! all work happens in the loop that reads the pipe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, sigaction};

static WRITE_FD: AtomicI32 = AtomicI32::new(-1);
/// Set when a delivery found the pipe full and was dropped: the loop then cannot
/// trust the records to say whether a child exited, and reaps anyway.
static OVERFLOWED: AtomicBool = AtomicBool::new(false);

/// One delivery as written into the pipe: the signal number, the sender's pid and
/// its process group. Twelve bytes, well under PIPE_BUF, so each write is atomic.
const RECORD: usize = 12;

extern "C" fn on_signal(signum: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: only async-signal-safe calls: errno is saved and restored around a
    // non-blocking write(2) of a record built on the stack; `info` is the kernel's.
    unsafe {
        let errno = *libc::__errno_location();
        let fd = WRITE_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            let sender = if info.is_null() { 0 } else { (*info).si_pid() };
            // Looked up now, while the sender most likely still exists: by the time
            // the loop reads this record, a short-lived `kill` has exited.
            let group = if sender > 0 {
                libc::getpgid(sender)
            } else {
                -1
            };
            let mut rec = [0u8; RECORD];
            rec[..4].copy_from_slice(&signum.to_ne_bytes());
            rec[4..8].copy_from_slice(&sender.to_ne_bytes());
            rec[8..].copy_from_slice(&group.to_ne_bytes());
            // A full pipe (EAGAIN) drops this delivery: thousands of signals are
            // already queued and the loop is about to read them.
            if libc::write(fd, rec.as_ptr().cast(), RECORD) != RECORD as isize {
                OVERFLOWED.store(true, Ordering::Relaxed);
            }
        }
        *libc::__errno_location() = errno;
    }
}

/// Who sent a signal, as seen when it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    /// Its process group at delivery time, if it still existed.
    pub group: Option<i32>,
}

/// The read end of the self-pipe; the loop polls it and calls [`SignalPipe::drain`].
pub struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
    handled: Vec<Signal>,
}

impl SignalPipe {
    /// Create the pipe and route `signals` into it. One per process.
    pub fn install(signals: &[Signal]) -> io::Result<SignalPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        WRITE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::SigAction(on_signal),
            SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
            SigSet::all(),
        );
        for &sig in signals {
            // SAFETY: the handler above is async-signal-safe.
            unsafe { sigaction(sig, &action) }?;
        }
        Ok(SignalPipe {
            read,
            _write: write,
            handled: signals.to_vec(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Every delivery since the last drain, in arrival order.
    pub fn drain(&self) -> Vec<Signal> {
        self.drain_with_sender()
            .into_iter()
            .map(|(sig, _)| sig)
            .collect()
    }

    /// Every delivery since the last drain, in arrival order, with who sent it
    /// (`None` when the kernel sent it).
    pub fn drain_with_sender(&self) -> Vec<(Signal, Option<Sender>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; RECORD * 64];
        loop {
            match nix::unistd::read(&self.read, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for rec in buf[..n].chunks_exact(RECORD) {
                        let word = |i: usize| {
                            i32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]])
                        };
                        let (signum, pid, group) = (word(0), word(4), word(8));
                        if let Ok(sig) = Signal::try_from(signum) {
                            let sender = (pid > 0).then_some(Sender {
                                pid,
                                group: (group > 0).then_some(group),
                            });
                            out.push((sig, sender));
                        }
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        out
    }

    /// Whether a delivery was dropped for a full pipe since the last call (and so
    /// a SIGCHLD may be missing from the records).
    pub fn take_overflow(&self) -> bool {
        OVERFLOWED.swap(false, Ordering::Relaxed)
    }

    /// The signals routed into this pipe, for a child to reset before exec.
    pub fn handled(&self) -> &[Signal] {
        &self.handled
    }
}

/// The signals meant for the master alone, which every child starts with
/// ignored (docs/workers.md, "The master's signals"). INT, QUIT and TERM are not
/// among them: those stop a worker as they stop the master.
pub const MASTERS_OWN: [libc::c_int; 6] = [
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Block every signal and return the previous mask: used around fork so that no
/// handler of the master runs in a child before it resets its dispositions.
pub fn block_all() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    Ok(old)
}

/// Restore a mask saved by [`block_all`].
pub fn restore(mask: &SigSet) {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// The short upper-case name operators use: `TERM`, `TTIN`, `KILL`.
pub fn short_name(sig: Signal) -> &'static str {
    let full = sig.as_str();
    full.strip_prefix("SIG").unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_proto::signal::NamedSignal;

    /// The control protocol names signals by proto's table; the master acts on
    /// nix's. A signal in one and not the other would be accepted by arbiterctl and
    /// refused by the master, or the reverse.
    #[test]
    fn proto_table_is_nix_signals() {
        for sig in Signal::iterator() {
            let named = NamedSignal::from_number(sig as i32);
            assert_eq!(named.map(|n| n.name), Some(short_name(sig)), "{sig}");
        }
        for named in NamedSignal::all() {
            let sig = Signal::try_from(named.number).unwrap();
            assert_eq!(short_name(sig), named.name);
        }
    }
}
