//! `-D`: detach from the terminal, but only report success once the daemon serves.
//!
//! Everything that can fail fast (flags, binds, the pidfile check, the control
//! socket) happens before this, in the foreground. Then: a close-on-exec pipe, fork;
//! the launcher waits on the pipe; the child calls setsid and forks again (so the
//! daemon is not a session leader and can never reacquire a terminal); the
//! grandchild is the daemon. It writes `ready` into the pipe once the first
//! generation is ready, or `error: ...` (`error N: ...` for an exit status N other
//! than 1) if startup fails, or no worker is ready within `--boot-timeout`; the
//! launcher exits 0, or prints the error and exits with that status. An EOF with no
//! word means the daemon died.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

/// The daemon's end of the launcher's pipe.
pub struct Report(OwnedFd);

impl Report {
    /// The same report over a pipe handed to us (an upgrading old master's).
    pub fn from_fd(fd: OwnedFd) -> Report {
        Report(fd)
    }

    /// The first generation serves with `workers` workers.
    pub fn ready(self, workers: usize) {
        self.say(&format!("ready {} {workers}\n", std::process::id()));
    }

    /// Startup failed; the master exits with `status`.
    pub fn error(self, status: u8, msg: &str) {
        // One line: the launcher and an old master read the first line only.
        let msg = msg.replace('\n', " ");
        match status {
            1 => self.say(&format!("error: {msg}\n")),
            n => self.say(&format!("error {n}: {msg}\n")),
        }
    }

    fn say(self, line: &str) {
        let mut f = std::fs::File::from(self.0);
        let _ = f.write_all(line.as_bytes());
    }
}

/// Detach. Returns in the daemon only; the launching process exits from here with
/// the daemon's verdict.
///
/// The working directory stays where it is (the start directory, or `--chdir`), as
/// gunicorn's does: workers started as `python3 app.py` find `app.py`, and the
/// relative paths a reload or an upgrade re-reads mean what they meant at start.
pub fn detach() -> io::Result<Report> {
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
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(Report(write))
}

/// What a starting master said on its report pipe: one complete line.
#[derive(Debug, PartialEq, Eq)]
pub enum Word<'a> {
    /// With the worker count, when the master said it.
    Ready {
        workers: Option<usize>,
    },
    Error {
        status: u8,
        msg: &'a str,
    },
}

impl Word<'_> {
    /// The first line of `said`, once it is complete; `None` before that, or for a
    /// line that is not a word of ours.
    pub fn parse(said: &str) -> Option<Word<'_>> {
        let (line, _) = said.split_once('\n')?;
        if let Some(rest) = line.strip_prefix("ready") {
            let workers = rest.split_whitespace().nth(1).and_then(|n| n.parse().ok());
            return Some(Word::Ready { workers });
        }
        let rest = line.strip_prefix("error")?;
        let (status, msg) = rest.split_once(": ")?;
        let status = match status {
            "" => 1,
            n => n.trim().parse().ok().filter(|&n| n != 0)?,
        };
        Some(Word::Error { status, msg })
    }
}

fn launcher_wait(read: OwnedFd) -> ! {
    let mut f = std::fs::File::from(read);
    let mut said = String::new();
    let _ = f.read_to_string(&mut said);
    let code = match Word::parse(&said) {
        Some(Word::Ready { .. }) => 0,
        Some(Word::Error { status, msg }) => {
            eprintln!("arbiterd: {msg}");
            status
        }
        None => {
            eprintln!("arbiterd: the daemon exited during startup (see its log file)");
            1
        }
    };
    let _ = io::stderr().flush();
    // SAFETY: _exit: the launcher must not run the master's destructors (they would
    // close what the daemon now owns).
    unsafe { libc::_exit(code.into()) }
}

#[cfg(test)]
mod tests {
    use super::Word;

    #[test]
    fn words() {
        assert_eq!(
            Word::parse("ready 42\n"),
            Some(Word::Ready { workers: None })
        );
        assert_eq!(
            Word::parse("ready 42 8\n"),
            Some(Word::Ready { workers: Some(8) })
        );
        assert_eq!(
            Word::parse("error: no bind\n"),
            Some(Word::Error {
                status: 1,
                msg: "no bind"
            })
        );
        assert_eq!(
            Word::parse("error 3: Worker failed to boot.\n"),
            Some(Word::Error {
                status: 3,
                msg: "Worker failed to boot."
            })
        );
        // Incomplete, or not ours.
        assert_eq!(Word::parse("error: no b"), None);
        assert_eq!(Word::parse("hello\n"), None);
        assert_eq!(Word::parse("error 0: x\n"), None);
    }
}
