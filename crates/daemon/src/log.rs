//! One line per event, in gunicorn's format:
//! `[2026-11-22 10:00:00 +0000] [1234] [INFO] Booting worker with pid: 1240`.
//!
//! The master is single-threaded, so the logger is a process-wide value behind a
//! mutex that is never contended; it exists so that every module can log without
//! threading a handle through every call.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

/// `--log-level`: its values are these names, in any case (`config` parses them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    Debug,
    Info,
    #[value(alias = "warn")]
    Warning,
    Error,
    Critical,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }
}

enum Target {
    /// fd 2 as it is (a terminal, a file); `pipe` is a non-blocking description of
    /// our own on it when it is a pipe, so a reader that stops reading costs us
    /// lines, not the loop.
    Stderr {
        pipe: Option<File>,
    },
    File {
        path: PathBuf,
        file: File,
    },
}

struct Logger {
    level: Level,
    target: Target,
    /// Lines that could not be written (a full pipe, a full disk), reported with
    /// the next line that can be.
    dropped: u64,
    /// All lines ever dropped, and the error while it lasts: for `status`, which
    /// is how an operator learns that the log itself is lost.
    dropped_total: u64,
    failing: Option<String>,
}

static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    level: Level::Info,
    target: Target::Stderr { pipe: None },
    dropped: 0,
    dropped_total: 0,
    failing: None,
});

/// Lines dropped since the start, and the current write error if the log is
/// refusing lines now.
pub fn health() -> (u64, Option<String>) {
    let logger = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    (logger.dropped_total, logger.failing.clone())
}

fn open_log(path: &std::path::Path) -> io::Result<File> {
    use nix::fcntl::OFlag;
    // Non-blocking: a FIFO log whose reader stalls costs lines, not the loop (and
    // one with no reader fails the open at once instead of hanging the start).
    crate::userpath::open(
        path,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
        0o640,
        crate::userpath::Kind::Sink,
    )
}

/// fd 2 again, non-blocking, when it is a pipe (a supervisor's, a shell pipeline).
/// Opening /proc/self/fd/2 makes a new open file description, so the flag does not
/// reach whoever else writes to that pipe.
fn stderr_pipe() -> Option<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
    if !meta.file_type().is_fifo() {
        return None;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/proc/self/fd/2")
        .ok()
}

impl Logger {
    /// Write one line, or count it as dropped; never wait for the reader.
    fn emit(&mut self, line: &str) {
        if self.dropped > 0 {
            let note = format!(
                "[{}] [{}] [WARNING] {} log lines could not be written (the log did not accept them)\n",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S %z"),
                std::process::id(),
                self.dropped
            );
            if let Err(e) = self.raw(note.as_bytes()) {
                self.drop_line(e);
                return;
            }
            self.dropped = 0;
        }
        match self.raw(line.as_bytes()) {
            Ok(()) => self.failing = None,
            Err(e) => self.drop_line(e),
        }
    }

    fn drop_line(&mut self, e: io::Error) {
        self.dropped += 1;
        self.dropped_total += 1;
        self.failing = Some(e.to_string());
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.target {
            Target::Stderr { pipe: Some(p) } => p.write_all(bytes),
            Target::Stderr { pipe: None } => io::stderr().write_all(bytes),
            Target::File { file, .. } => file.write_all(bytes),
        }
    }
}

/// Route logs to `path` (`None` or `-`: stderr) at `level`.
pub fn init(level: Level, path: Option<&PathBuf>) -> io::Result<()> {
    let target = match path {
        Some(p) if p.as_os_str() != "-" => Target::File {
            file: open_log(p)?,
            path: p.clone(),
        },
        _ => Target::Stderr {
            pipe: stderr_pipe(),
        },
    };
    let mut logger = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    logger.level = level;
    logger.target = target;
    Ok(())
}

/// Reopen the log file by path (USR1, after logrotate renamed it).
pub fn reopen() -> io::Result<()> {
    let mut logger = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    if let Target::File { path, file } = &mut logger.target {
        *file = open_log(path)?;
    }
    Ok(())
}

pub fn enabled(level: Level) -> bool {
    level >= LOGGER.lock().unwrap_or_else(|e| e.into_inner()).level
}

pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let mut logger = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    if level < logger.level {
        return;
    }
    let line = format!(
        "[{}] [{}] [{}] {}\n",
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S %z"),
        std::process::id(),
        level.label(),
        args
    );
    // A log that cannot be written must not take the master down: the line is
    // lost, and counted.
    logger.emit(&line);
}

#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warning { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warning, format_args!($($t)*)) } }
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! critical { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Critical, format_args!($($t)*)) } }

/// A line a worker wrote to its stdout or stderr, tagged with the worker it came
/// from: `[2026-11-22 10:00:00 +0000] [1240] [worker:3] the worker's own words`.
pub fn worker_line(pid: i32, worker_id: u64, text: &str) {
    let mut logger = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    let line = format!(
        "[{}] [{pid}] [worker:{worker_id}] {}\n",
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S %z"),
        text.trim_end_matches('\r')
    );
    logger.emit(&line);
}
