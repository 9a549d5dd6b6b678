//! One fd held back for the moment a listener of the master's own (the control
//! socket, `--metrics-bind`) hits EMFILE: given up for an instant, it lets the
//! master accept a waiting client and tell it "busy" at once, instead of leaving
//! it to time out, then it is taken back.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{MsgFlags, SockFlag, accept4, send};

pub struct ReserveFd(Option<File>);

/// Anything that costs one descriptor and nothing else.
fn open() -> Option<File> {
    File::open("/dev/null").ok()
}

impl ReserveFd {
    /// Take one fd to hold back.
    pub fn hold() -> ReserveFd {
        ReserveFd(open())
    }

    /// Out of fds: give up the reserve, accept one client waiting on `listener`,
    /// send it `answer`, close it, take the reserve back. False when there is no
    /// reserve or no client came.
    pub fn refuse(&mut self, listener: BorrowedFd<'_>, answer: &[u8]) -> bool {
        let Some(reserve) = self.0.take() else {
            return false;
        };
        drop(reserve);
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let answered = match accept4(listener.as_raw_fd(), flags) {
            Ok(fd) => {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let _ = send(fd.as_raw_fd(), answer, MsgFlags::MSG_NOSIGNAL);
                true
            }
            Err(_) => false,
        };
        self.0 = open();
        answered
    }

    /// Lost at some EMFILE (the re-open failed): try again now that time passed.
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = open();
        }
    }
}
