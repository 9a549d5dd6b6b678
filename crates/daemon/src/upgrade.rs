//! Hot upgrade: what passes from the old master to the new one.
//!
//! The old master forks and execs the new binary with its original argv. The new
//! master gets the listeners at fds 3.. as systemd would hand them over
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, so names and fd numbers survive,
//! socket-activated ones included), plus:
//!
//! - `ARBITER_UPGRADE_FROM`: the old master's pid;
//! - `ARBITER_UPGRADE_SPECS`: the `--bind` each inherited socket came from (JSON,
//!   `null` for systemd's, which the new master matches against its own binds as
//!   at a first start), so the new master reuses them instead of binding again;
//! - `ARBITER_UPGRADE_READY_FD`: where to write `ready PID` once its first generation
//!   is ready (or `error: ...`), the same protocol as `-D`'s launcher pipe;
//! - `ARBITER_UPGRADE_PARENT_FD`: a pipe whose EOF means the old master is gone: the
//!   new master is then promoted (it takes the pidfile and control socket names);
//! - `ARBITER_UPGRADE_METRICS_FD`, `ARBITER_UPGRADE_METRICS`: the `--metrics-bind`
//!   listener and the address it was bound from, taken over if the new
//!   configuration names the same address.
//!
//! Until promoted, the new master writes `PIDFILE.2`, serves control on `PATH.2`,
//! and never unlinks a unix socket file (the old master may still use it).

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub const ENV_FROM: &str = "ARBITER_UPGRADE_FROM";
pub const ENV_SPECS: &str = "ARBITER_UPGRADE_SPECS";
pub const ENV_READY_FD: &str = "ARBITER_UPGRADE_READY_FD";
pub const ENV_PARENT_FD: &str = "ARBITER_UPGRADE_PARENT_FD";
pub const ENV_METRICS_FD: &str = "ARBITER_UPGRADE_METRICS_FD";
pub const ENV_METRICS_SPEC: &str = "ARBITER_UPGRADE_METRICS";
/// `TARGET CONFIGURED`: the old master's worker count and the count its
/// configuration gave, so a `scale` or TTIN survives the upgrade as it survives a
/// reload.
pub const ENV_WORKERS: &str = "ARBITER_UPGRADE_WORKERS";

/// The worker count the old master ran, and the one its configuration asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scaled {
    pub target: usize,
    pub configured: usize,
}

impl Scaled {
    pub fn encode(self) -> String {
        format!("{} {}", self.target, self.configured)
    }

    pub fn decode(s: &str) -> Option<Scaled> {
        let (t, c) = s.split_once(' ')?;
        Some(Scaled {
            target: t.parse().ok()?,
            configured: c.parse().ok()?,
        })
    }

    /// The count for a new master whose configuration asks for `configured`, at
    /// most `max`: an explicit new count wins, as in a reload.
    pub fn target_for(self, configured: usize, max: usize) -> usize {
        if configured == self.configured {
            self.target.min(max)
        } else {
            configured
        }
    }
}

/// How this master was started, captured before anything can change it, so that an
/// upgrade re-executes the same command line (and the binary now at that path).
#[derive(Clone, Debug)]
pub struct StartContext {
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    /// The directory it was started in, before `--chdir`: the same argv means the
    /// same thing there (a relative `--chdir`, `-c` or `--pid`).
    pub dir: Option<PathBuf>,
}

impl StartContext {
    pub fn capture() -> StartContext {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let exe = std::env::current_exe()
            .ok()
            .map(|p| {
                // A package upgrade replaced the file: exec what is at the path now.
                let s = p.to_string_lossy();
                match s.strip_suffix(" (deleted)") {
                    Some(live) => PathBuf::from(live),
                    None => p,
                }
            })
            .unwrap_or_else(|| PathBuf::from(argv.first().cloned().unwrap_or_default()));
        let dir = std::env::current_dir().ok();
        StartContext { exe, argv, dir }
    }
}

/// What a new master learns from the old one.
pub struct Inherited {
    pub from: i32,
    /// One per inherited listener, in fd order: the `--bind` it was made from.
    pub specs: Vec<Option<String>>,
    pub ready: Option<OwnedFd>,
    pub parent: Option<OwnedFd>,
    pub scaled: Option<Scaled>,
    /// The old master's `--metrics-bind` listener and the address it came from.
    pub metrics: Option<(OwnedFd, String)>,
}

fn take_fd(key: &str) -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(key).ok()?.parse().ok()?;
    if fd < 3 {
        return None;
    }
    // A bad number must not let us own some other fd: check that it is open.
    nix::fcntl::fcntl(
        // SAFETY: borrowed only for this check.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .ok()?;
    // SAFETY: the old master placed this fd here for us to own.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Inherited {
    /// Read and remove the upgrade variables (so no worker sees them).
    pub fn from_env() -> Option<Inherited> {
        let from = std::env::var(ENV_FROM).ok().and_then(|p| p.parse().ok());
        let specs = std::env::var(ENV_SPECS)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let ready = take_fd(ENV_READY_FD);
        let parent = take_fd(ENV_PARENT_FD);
        let scaled = std::env::var(ENV_WORKERS)
            .ok()
            .and_then(|s| Scaled::decode(&s));
        let metrics = take_fd(ENV_METRICS_FD).zip(std::env::var(ENV_METRICS_SPEC).ok());
        // SAFETY: at startup, before any thread could exist.
        unsafe {
            for k in [
                ENV_FROM,
                ENV_SPECS,
                ENV_READY_FD,
                ENV_PARENT_FD,
                ENV_WORKERS,
                ENV_METRICS_FD,
                ENV_METRICS_SPEC,
            ] {
                std::env::remove_var(k);
            }
        }
        Some(Inherited {
            from: from?,
            specs,
            ready,
            parent,
            scaled,
            metrics,
        })
    }
}

/// `PATH.2`: where an unpromoted new master keeps its pidfile and control socket.
pub fn second(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".2");
    PathBuf::from(s)
}

/// `PIDFILE.oldbin`: the old master's pidfile while a new master runs.
pub fn oldbin(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".oldbin");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::Scaled;

    #[test]
    fn a_scaled_count_survives_unless_the_configuration_changed() {
        let s = Scaled {
            target: 8,
            configured: 4,
        };
        assert_eq!(Scaled::decode(&s.encode()), Some(s));
        assert_eq!(Scaled::decode("8"), None);
        // Same configuration: the old master's count, within the new limit.
        assert_eq!(s.target_for(4, 1024), 8);
        assert_eq!(s.target_for(4, 6), 6);
        // The configuration names a new count: it wins, as in a reload.
        assert_eq!(s.target_for(2, 1024), 2);
    }
}
