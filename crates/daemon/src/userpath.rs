//! Opening a path an operator named (pidfile, config file, log file).
//!
//! The master is single-threaded and often runs as root, and these paths often sit
//! in directories other users can write to (a 1777 /tmp). Whatever another user
//! put at the path must neither stall the loop (a FIFO with no writer blocks a
//! plain `open` for reading forever) nor redirect us (a symlink to a file of
//! theirs or ours). So every such open is `O_NONBLOCK | O_NOFOLLOW`, and the file
//! it got is checked with `fstat` (not `stat` on the path, which could have been
//! swapped in between) before anything is read or written.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

/// A configuration file is a few KiB; past this it is not one.
pub const CONFIG_LIMIT: u64 = 1024 * 1024;

/// What the file at the path may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file only.
    Regular,
    /// A regular file, a FIFO or a character device: a log may go to a log
    /// shipper's pipe or to /dev/null, /dev/full, a tty.
    Sink,
}

/// Open `path` with `flags` (plus `O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC`; `mode`
/// is used when `O_CREAT` creates it), and accept it only if it is of `kind` and
/// owned by us or by root. The error text is one line, without the path: callers
/// prefix what the path is for.
pub fn open(path: &Path, flags: OFlag, mode: u32, kind: Kind) -> io::Result<File> {
    let all = flags | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(path, all, Mode::from_bits_truncate(mode)).map_err(|e| match e {
        Errno::ELOOP => refused("it is a symbolic link, which is not followed"),
        // A non-blocking open for writing of a FIFO without a reader, or any
        // open of a socket file.
        Errno::ENXIO => refused("it is a FIFO that nobody reads, or a socket"),
        // `fs.protected_regular` refuses even root an O_CREAT open of another
        // user's file in a sticky directory: say whose it is, as below.
        Errno::EACCES => match nix::sys::stat::lstat(path) {
            Ok(st) if !owned_by_us_or_root(st.st_uid) => refused(&not_ours(st.st_uid)),
            _ => io::Error::from(e),
        },
        e => io::Error::from(e),
    })?;
    let st = nix::sys::stat::fstat(fd.as_fd())?;
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let ok = match kind {
        Kind::Regular => fmt == SFlag::S_IFREG,
        Kind::Sink => fmt == SFlag::S_IFREG || fmt == SFlag::S_IFIFO || fmt == SFlag::S_IFCHR,
    };
    if !ok {
        return Err(refused(&format!("it is {}, not a regular file", what(fmt))));
    }
    if !owned_by_us_or_root(st.st_uid) {
        return Err(refused(&not_ours(st.st_uid)));
    }
    Ok(File::from(fd))
}

fn owned_by_us_or_root(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn not_ours(uid: u32) -> String {
    format!(
        "it is owned by uid {uid}, not by us (uid {}) or root",
        nix::unistd::geteuid().as_raw()
    )
}

/// Read a whole regular file of at most `limit` bytes (see [`open`]).
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    let file = open(path, OFlag::O_RDONLY, 0, Kind::Regular)?;
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(refused(&format!("it is larger than {limit} bytes")));
    }
    Ok(text)
}

fn refused(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("refused: {why}"))
}

fn what(fmt: SFlag) -> &'static str {
    match fmt {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFSOCK => "a socket",
        _ => "not a regular file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile_lite::Dir {
        tempfile_lite::Dir::new()
    }

    /// A unique directory under the system temp dir, removed on drop (the crate
    /// has no tempfile dependency).
    mod tempfile_lite {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "arbiter-userpath-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_fifo_is_refused_at_once_not_waited_on() {
        let d = dir();
        let p = d.0.join("fifo");
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_to_string(&p, 100).unwrap_err().to_string();
        assert_eq!(e, "refused: it is a FIFO, not a regular file");
        // As a log (write side): nobody reads it.
        let e = open(&p, OFlag::O_WRONLY | OFlag::O_APPEND, 0, Kind::Sink)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "refused: it is a FIFO that nobody reads, or a socket");
    }

    #[test]
    fn a_symlink_is_refused_and_a_regular_file_read() {
        let d = dir();
        let f = d.0.join("f");
        std::fs::write(&f, "12\n").unwrap();
        assert_eq!(read_to_string(&f, 100).unwrap(), "12\n");
        let l = d.0.join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let e = read_to_string(&l, 100).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = read_to_string(&f, 2).unwrap_err().to_string();
        assert!(e.contains("larger than 2 bytes"), "{e}");
        let e = read_to_string(&d.0, 2).unwrap_err().to_string();
        assert!(
            e.contains("directory") || e.contains("Is a directory"),
            "{e}"
        );
    }
}
