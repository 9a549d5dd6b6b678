//! The pidfile: written after the binds succeed, atomically (temp file + rename),
//! and held under `flock` for the master's life, so a lock is the proof of life
//! rather than a pid that may have been reused by an unrelated process.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub struct Pidfile {
    path: PathBuf,
    // Holding the open, locked file keeps the lock. Dropping it unlocks the open
    // file description, children's copies included: none has one past exec
    // (O_CLOEXEC), and a child that does not exec leaves by _exit, not by drop.
    _file: Flock<File>,
}

#[derive(Debug)]
pub enum PidfileError {
    /// A live master holds the lock.
    Held {
        path: PathBuf,
        pid: Option<u32>,
    },
    Io {
        path: PathBuf,
        err: io::Error,
    },
}

impl std::fmt::Display for PidfileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PidfileError::Held {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "pidfile {} is held by a running master (pid {pid})",
                path.display()
            ),
            PidfileError::Held { path, pid: None } => {
                write!(f, "pidfile {} is held by a running master", path.display())
            }
            PidfileError::Io { path, err } => write!(f, "pidfile {}: {err}", path.display()),
        }
    }
}

/// `file` locked, without waiting; `None` if another open file holds a lock that
/// conflicts.
/// `.NAME.PID.tmp` in `path`'s directory.
fn tmp_beside(path: &Path) -> io::Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    Ok(dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    )))
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn try_lock(file: File, exclusive: bool) -> io::Result<Option<Flock<File>>> {
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    match Flock::lock(file, arg) {
        Ok(locked) => Ok(Some(locked)),
        Err((_, e)) if e == Errno::EWOULDBLOCK => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// The pid recorded in the file at `path`, whoever holds it.
pub fn read_pid(path: &Path) -> Option<u32> {
    let text = crate::userpath::read_to_string(path, 64).ok()?;
    text.trim().parse().ok()
}

/// Is a live process holding the lock on `path`? Whatever else sits there (a
/// FIFO, a symlink, another user's file) is an error, never a wait.
pub fn is_held(path: &Path) -> io::Result<bool> {
    use crate::userpath::{Kind, open};
    match open(path, nix::fcntl::OFlag::O_RDONLY, 0, Kind::Regular) {
        Ok(f) => Ok(try_lock(f, false)?.is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Pidfile {
    /// Write our pid to `path`, refusing if a live master holds it.
    pub fn create(path: &Path) -> Result<Pidfile, PidfileError> {
        let io_err = |err| PidfileError::Io {
            path: path.to_path_buf(),
            err,
        };
        if is_held(path).map_err(io_err)? {
            return Err(PidfileError::Held {
                path: path.to_path_buf(),
                pid: read_pid(path),
            });
        }
        let tmp = tmp_beside(path).map_err(io_err)?;
        let file = open_new(&tmp).map_err(io_err)?;
        let result = (|| {
            let Some(mut file) = try_lock(file, true)? else {
                return Err(io::Error::other("lock taken by another process"));
            };
            file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            std::fs::rename(&tmp, path)?;
            Ok(file)
        })();
        let file = match result {
            Ok(file) => file,
            Err(err) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(err));
            }
        };
        Ok(Pidfile {
            path: path.to_path_buf(),
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `pid`, another master's, to `path` (atomically, unlocked): an old
    /// master's last act when a new one took over, so that whoever reads the
    /// usual name as the old master exits (systemd's `PIDFile=`, above all) finds
    /// the new master. The new master renames its own locked file over it when
    /// it notices.
    pub fn name_successor(path: &Path, pid: i32) -> io::Result<()> {
        let tmp = tmp_beside(path)?;
        let written = open_new(&tmp)
            .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Move the file (keeping its lock: same inode) to `to`.
    pub fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Remove the file if it still names us (an upgrade may have replaced it).
    pub fn remove(self) {
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
