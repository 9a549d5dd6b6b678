//! `-D`: detach from the terminal, but only report success once the daemon serves.
//!
//! Everything that can fail fast (flags, binds, the pidfile check, the control
//! socket) happens before this, in the foreground. Then: a close-on-exec pipe, fork;
//! the launcher waits on the pipe; the child calls setsid and forks again (so the
//! daemon is not a session leader and can never reacquire a terminal); the
//! grandchild is the daemon. It writes `ready` into the pipe once the first
//! generation is ready, or `error: ...` if startup fails; the launcher exits 0 or
//! prints the error and exits 1. An EOF with no word means the daemon died.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

/// The daemon's end of the launcher's pipe.
pub struct Report(OwnedFd);

impl Report {
    /// The same report over a pipe handed to us (an upgrading old master's).
    pub fn from_fd(fd: OwnedFd) -> Report {
        Report(fd)
    }

    pub fn ready(self) {
        self.say(&format!("ready {}\n", std::process::id()));
    }

    pub fn error(self, msg: &str) {
        self.say(&format!("error: {msg}\n"));
    }

    fn say(self, line: &str) {
        let mut f = std::fs::File::from(self.0);
        let _ = f.write_all(line.as_bytes());
    }
}

/// Detach. Returns in the daemon only; the launching process exits from here with
/// the daemon's verdict.
pub fn detach(chdir_root: bool) -> io::Result<Report> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: single-threaded; the child only continues the program.
    match unsafe { libc::fork() } {
        -1 => return Err(io::Error::last_os_error()),
        0 => {}
        _ => {
            drop(write);
            launcher_wait(read)
        }
    }
    drop(read);
    nix::unistd::setsid()?;
    // SAFETY: as above.
    match unsafe { libc::fork() } {
        -1 => return Err(io::Error::last_os_error()),
        0 => {}
        // The intermediate: leave without running any destructor of the master's.
        // SAFETY: _exit is always safe.
        _ => unsafe { libc::_exit(0) },
    }
    if chdir_root {
        std::env::set_current_dir("/")?;
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(Report(write))
}

fn launcher_wait(read: OwnedFd) -> ! {
    let mut f = std::fs::File::from(read);
    let mut said = String::new();
    let _ = f.read_to_string(&mut said);
    let line = said.lines().next().unwrap_or("");
    let code = if line.starts_with("ready") {
        0
    } else if let Some(msg) = line.strip_prefix("error: ") {
        eprintln!("arbiterd: {msg}");
        1
    } else {
        eprintln!("arbiterd: the daemon exited during startup (see its log file)");
        1
    };
    let _ = io::stderr().flush();
    // SAFETY: _exit: the launcher must not run the master's destructors (they would
    // close what the daemon now owns).
    unsafe { libc::_exit(code) }
}
