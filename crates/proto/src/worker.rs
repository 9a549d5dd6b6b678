//! The worker contract: what a worker process gets from arbiterd and how it talks back.
//!
//! A worker is exec'd with its listening sockets at fds 3, 4, ... (in `--bind` order)
//! and the systemd socket-activation variables, so any library that understands
//! `LISTEN_FDS` works unchanged. On top of that arbiterd sets the `ARBITER_*`
//! variables below. A worker proves it is alive by touching its heartbeat fd or by
//! sending `WATCHDOG=1` to `NOTIFY_SOCKET`, and may announce readiness with
//! `READY=1`.

use std::os::fd::RawFd;

/// The first inherited listener fd (systemd's `SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Number of listeners passed, at fds 3..3+N.
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// The pid the listeners are meant for: the worker's own pid.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// Colon-separated names of the listeners, one per fd.
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The spawn counter (gunicorn's "age"): unique for the life of the master.
pub const ENV_WORKER_ID: &str = "ARBITER_WORKER_ID";
/// 0..N-1, reused by the worker that replaces one.
pub const ENV_SLOT: &str = "ARBITER_SLOT";
/// Bumped by every reload.
pub const ENV_GENERATION: &str = "ARBITER_GENERATION";
/// The pid of the master that spawned this worker.
pub const ENV_MASTER_PID: &str = "ARBITER_MASTER_PID";
/// An fd open on an unlinked file: change its ctime (fchmod, a write, futimens) to beat.
pub const ENV_HEARTBEAT_FD: &str = "ARBITER_HEARTBEAT_FD";
/// An fd on the scoreboard (see [`crate::scoreboard`]): shared memory where the
/// worker marks itself busy or idle and counts requests. Absent when the master
/// had no free entry for it.
pub const ENV_SCOREBOARD_FD: &str = "ARBITER_SCOREBOARD_FD";
/// The worker's entry in the scoreboard. Not `ARBITER_SLOT`: during a reload an
/// old and a new worker share a slot number, never an entry.
pub const ENV_SCOREBOARD_SLOT: &str = "ARBITER_SCOREBOARD_SLOT";
/// The heartbeat timeout in seconds (absent or 0: no timeout). Beat at least twice per period.
pub const ENV_TIMEOUT: &str = "ARBITER_TIMEOUT";
/// `--preload`: the template's socket to the master (docs/workers.md, "Preloading").
pub const ENV_TEMPLATE_FD: &str = "ARBITER_TEMPLATE_FD";
/// sd_notify datagram socket of the master (a leading `@` means the abstract namespace).
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Set with a timeout, as systemd does: microseconds between required pings.
pub const ENV_WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// Set with `WATCHDOG_USEC`: the pid the watchdog setting is meant for.
pub const ENV_WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The notify key (`ARBITER_RECYCLE=1` on `NOTIFY_SOCKET`) by which a worker asks
/// to be replaced: the master starts its replacement, and stops it gracefully once
/// that one is ready.
pub const NOTIFY_RECYCLE: &str = "ARBITER_RECYCLE";

/// Exit status: the worker failed to boot (gunicorn's WORKER_BOOT_ERROR).
pub const EXIT_BOOT_ERROR: i32 = 3;
/// Exit status: the application failed to load (gunicorn's APP_LOAD_ERROR).
pub const EXIT_APP_LOAD_ERROR: i32 = 4;
/// Exit status: configuration error (sysexits EX_CONFIG); the master does not restart it.
pub const EXIT_CONFIG: i32 = 78;

/// The worker's side of the heartbeat file: flip its mode to change its ctime.
///
/// This is the same call gunicorn's workers make (`fchmod`); the master reads the
/// file's ctime, which the kernel sets to the current time on any change.
pub struct Heartbeat {
    fd: RawFd,
    flip: bool,
}

impl Heartbeat {
    /// The heartbeat fd named by `ARBITER_HEARTBEAT_FD`, if any.
    pub fn from_env() -> Option<Heartbeat> {
        let fd: RawFd = std::env::var(ENV_HEARTBEAT_FD).ok()?.parse().ok()?;
        if fd < 0 {
            return None;
        }
        Some(Heartbeat { fd, flip: false })
    }

    /// Tell the master we are alive. Cheap: one `fchmod` on a file nobody else opens.
    pub fn beat(&mut self) {
        self.flip = !self.flip;
        let mode = if self.flip { 0o400 } else { 0o600 };
        // SAFETY: fchmod on an integer fd has no memory-safety preconditions; a bad fd
        // only yields EBADF, which a heartbeat has no use for.
        unsafe {
            libc::fchmod(self.fd, mode);
        }
    }
}

/// Send one sd_notify datagram (`READY=1`, `WATCHDOG=1`, `STATUS=...`) to `NOTIFY_SOCKET`.
///
/// Returns false when there is no notify socket or the send failed; callers treat
/// notification as best effort, as systemd's own `sd_notify` does.
pub fn notify(state: &str) -> bool {
    let Ok(path) = std::env::var(ENV_NOTIFY_SOCKET) else {
        return false;
    };
    notify_to(&path, state)
}

/// Send one sd_notify datagram to the socket at `path` (`@name` = abstract namespace).
pub fn notify_to(path: &str, state: &str) -> bool {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path),
    };
    let Ok(addr) = addr else { return false };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    sock.send_to_addr(state.as_bytes(), &addr).is_ok()
}
