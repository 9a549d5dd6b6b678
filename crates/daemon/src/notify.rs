//! sd_notify from workers: the master's own datagram socket.
//!
//! Workers find it in `NOTIFY_SOCKET`, so libraries that already speak to systemd
//! (`READY=1`, `WATCHDOG=1`, `STATUS=...`) speak to us unchanged. The socket is a
//! file in a private directory (mode 0700, or 0710 with the workers' group when
//! they run as another user): another user cannot even send to it, so a flood from
//! one costs the master nothing. (An abstract socket, as before, is open to every
//! uid: dropping each datagram after reading it still cost a core.) Every datagram
//! is attributed by the kernel-checked sender credentials (SO_PASSCRED), never by
//! what the message says: a datagram from a process that is not one of our workers
//! (or in one's process group) is dropped.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    UnixCredentials, sockopt,
};

use arbiter_proto::worker as contract;

use crate::ratelimit::{Repeated, suppressed_note};
use crate::warning;

/// Datagrams handled per loop turn: a flood waits for later turns instead of
/// starving signals and other clients.
const MAX_PER_TURN: usize = 256;
/// Longer datagrams are truncated by the kernel and dropped by us.
const MAX_DATAGRAM: usize = 4096;
/// `STATUS=` text kept per worker.
const MAX_STATUS: usize = 256;
/// Datagrams from another uid are logged at most this often.
const FOREIGN_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

pub struct NotifySocket {
    fd: OwnedFd,
    /// The value for `NOTIFY_SOCKET`: the socket's path.
    pub address: String,
    /// The private directory holding the socket; removed with it on drop.
    dir: PathBuf,
    /// The uids our workers run as: datagrams from any other uid (root, who can
    /// reach any file) are dropped before they are parsed.
    uids: Vec<u32>,
    /// Datagrams dropped for coming from another uid, since the start.
    pub foreign_dropped: u64,
    foreign_log: Repeated,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory only we (and root) can enter: `$XDG_RUNTIME_DIR` (a tmpfs of
/// our own) or `/tmp`, `arbiter-NAME.PIDNS.PID.XXXXXX`. The pid (and its
/// namespace) in the name lets a later master of the name remove what a killed
/// one left (SIGKILL skips our drop), as it does with cgroups.
fn private_dir(name: &str) -> std::io::Result<PathBuf> {
    let base = private_base();
    // Short: the socket path must fit in 108 bytes.
    let short: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    let pidns = std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    let prefix = format!("arbiter-{short}.{pidns}.");
    remove_stale(&base, &prefix);
    let template = base.join(format!("{prefix}{}.XXXXXX", std::process::id()));
    // mkdtemp makes it 0700, with a name nobody could have prepared.
    Ok(nix::unistd::mkdtemp(&template)?)
}

/// Where the private directories go: `$XDG_RUNTIME_DIR`, else `/tmp`.
fn private_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty() && Path::new(d).is_dir())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
}

/// Our directories under `base` named `PREFIX.PID.XXXXXX` whose master is gone.
fn remove_stale(base: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // Not following a link, and only what we own: another user's name-alike
        // is none of our business.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// One thing a worker said.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Ready,
    Watchdog,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    WatchdogTrigger,
    Status(String),
    Stopping,
    /// `ARBITER_RECYCLE=1`: replace me (a replacement first, then a graceful stop).
    Recycle,
    /// `EXTEND_TIMEOUT_USEC=`: push the boot or heartbeat deadline this far from now.
    ExtendTimeout(std::time::Duration),
}

impl NotifySocket {
    /// `worker_uid`: the uid workers run as when not the master's (`--user`).
    /// `workers`: the uid and gid workers run as when not the master's (`--user`,
    /// `--group`): they get into the directory through its group.
    pub fn bind(name: &str, workers: Option<(u32, u32)>) -> std::io::Result<NotifySocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        let dir = private_dir(name)?;
        let bound = (|| {
            let me = nix::unistd::geteuid().as_raw();
            if let Some((_, gid)) = workers.filter(|&(uid, _)| uid != me) {
                nix::unistd::chown(&dir, None, Some(nix::unistd::Gid::from_raw(gid)))?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o710))?;
            }
            let path = dir.join("notify");
            socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path)?)?;
            // The directory keeps others out; a worker running as another user
            // must be able to write to the socket itself.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            Ok::<_, std::io::Error>(path)
        })();
        let path = match bound {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut uids = vec![nix::unistd::geteuid().as_raw()];
        uids.extend(workers.map(|(uid, _)| uid));
        Ok(NotifySocket {
            fd,
            address: path.to_string_lossy().into_owned(),
            dir,
            uids,
            foreign_dropped: 0,
            foreign_log: Repeated::new(FOREIGN_LOG_EVERY),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Read what is waiting (bounded): (sender pid, messages) per datagram.
    pub fn receive(&mut self) -> Vec<(i32, Vec<Message>)> {
        let mut out = Vec::new();
        let mut foreign = None;
        let mut buf = [0u8; MAX_DATAGRAM];
        for _ in 0..MAX_PER_TURN {
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            };
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            let len = msg.bytes;
            let mut sender = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    // Any fds a sender attached arrive close-on-exec and are closed
                    // when the owned message drops.
                    if let ControlMessageOwned::ScmCredentials(cred) = c {
                        sender = Some((cred.pid(), cred.uid()));
                    }
                }
            }
            let (Some((pid, uid)), false) = (sender, truncated) else {
                continue;
            };
            if !self.uids.contains(&uid) {
                self.foreign_dropped += 1;
                foreign = Some((pid, uid));
                continue;
            }
            out.push((pid, parse(&buf[..len])));
        }
        if let Some((pid, uid)) = foreign
            && let Some(n) = self.foreign_log.note(std::time::Instant::now())
        {
            warning!(
                "Dropped notify datagrams from uid {uid} (pid {pid}): not a worker's uid ({} dropped so far){}",
                self.foreign_dropped,
                suppressed_note(n)
            );
        }
        out
    }
}

/// Parse one sd_notify datagram: newline-separated `KEY=VALUE`; unknown keys ignored.
pub fn parse(datagram: &[u8]) -> Vec<Message> {
    let text = String::from_utf8_lossy(datagram);
    let mut out = Vec::new();
    for line in text.split('\n') {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match (key, value) {
            ("READY", "1") => out.push(Message::Ready),
            ("WATCHDOG", "1") => out.push(Message::Watchdog),
            ("WATCHDOG", "trigger") => out.push(Message::WatchdogTrigger),
            ("STOPPING", "1") => out.push(Message::Stopping),
            (contract::NOTIFY_RECYCLE, "1") => out.push(Message::Recycle),
            ("STATUS", text) => {
                let mut t: String = text.chars().filter(|c| !c.is_control()).collect();
                if t.len() > MAX_STATUS {
                    let mut cut = MAX_STATUS;
                    while !t.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    t.truncate(cut);
                }
                out.push(Message::Status(t));
            }
            ("EXTEND_TIMEOUT_USEC", n) => {
                if let Ok(us) = n.parse::<u64>() {
                    out.push(Message::ExtendTimeout(std::time::Duration::from_micros(us)));
                }
            }
            _ => {}
        }
    }
    out
}

/// The service manager's notify socket (systemd's `NOTIFY_SOCKET` for the master).
///
/// Read once at startup and removed from the environment, so no worker ever talks
/// to systemd in the master's name.
pub struct ServiceManager {
    address: String,
    /// Ping `WATCHDOG=1` this often, when systemd asked for it (`WATCHDOG_USEC`).
    pub watchdog_interval: Option<std::time::Duration>,
    /// systemd's `WATCHDOG_USEC` as given, to hand to a new master on upgrade.
    pub watchdog_usec: Option<u64>,
}

impl ServiceManager {
    pub fn from_env() -> Option<ServiceManager> {
        let address = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|a| !a.is_empty());
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog_usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && pid_ok);
        // Half the interval, as sd_watchdog_enabled(3) advises.
        let watchdog = watchdog_usec.map(|u| std::time::Duration::from_micros(u / 2));
        // SAFETY: called at startup, before any thread could exist.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        Some(ServiceManager {
            address: address?,
            watchdog_interval: watchdog,
            watchdog_usec,
        })
    }

    /// The socket's address, for a new master to notify in our place.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Best effort, as sd_notify(3): a failed send is logged at debug and forgotten.
    pub fn send(&self, state: &str) {
        if !arbiter_proto::worker::notify_to(&self.address, state) {
            crate::debug!("sd_notify to {} failed: {state:?}", self.address);
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, for `RELOADING=1`'s `MONOTONIC_USEC`.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=warming up\nWATCHDOG=1\nX=1\nnonsense"),
            vec![
                Message::Ready,
                Message::Status("warming up".into()),
                Message::Watchdog
            ]
        );
        assert_eq!(parse(b"WATCHDOG=trigger"), vec![Message::WatchdogTrigger]);
        assert_eq!(
            parse(b"EXTEND_TIMEOUT_USEC=5000000"),
            vec![Message::ExtendTimeout(std::time::Duration::from_secs(5))]
        );
        assert_eq!(parse(b"READY=0\nEXTEND_TIMEOUT_USEC=x"), vec![]);
        assert_eq!(parse(b"ARBITER_RECYCLE=1"), vec![Message::Recycle]);
        assert_eq!(parse(b"ARBITER_RECYCLE=0"), vec![]);
        assert_eq!(parse(&[0xff, 0xfe]), vec![]);
    }

    #[test]
    fn status_is_bounded() {
        let long = format!("STATUS={}", "é".repeat(1000));
        match &parse(long.as_bytes())[0] {
            Message::Status(t) => assert!(t.len() <= MAX_STATUS),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn receives_with_credentials() {
        let mut sock = NotifySocket::bind("unit-test", None).unwrap();
        assert!(arbiter_proto::worker::notify_to(
            &sock.address,
            "READY=1\nSTATUS=hi"
        ));
        let got = sock.receive();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, std::process::id() as i32);
        assert_eq!(got[0].1, vec![Message::Ready, Message::Status("hi".into())]);
    }

    #[test]
    fn what_a_killed_master_left_is_removed_by_the_next_of_its_name() {
        // A pid that is surely gone: a child we reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let pidns = std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        let base = private_base();
        let stale = base.join(format!("arbiter-stalecase.{pidns}.{dead}.abcdef"));
        let alive = base.join(format!(
            "arbiter-stalecase.{pidns}.{}.ghijkl",
            std::process::id()
        ));
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::create_dir_all(&alive).unwrap();
        let sock = NotifySocket::bind("stale-case", None).unwrap();
        assert!(!stale.exists(), "a dead master's directory is removed");
        assert!(alive.exists(), "a live one's is kept");
        drop(sock);
        std::fs::remove_dir_all(&alive).unwrap();
    }

    #[test]
    fn the_socket_is_private_and_goes_with_the_master() {
        use std::os::unix::fs::MetadataExt;
        let sock = NotifySocket::bind("unit-test", None).unwrap();
        let dir = Path::new(&sock.address).parent().unwrap().to_path_buf();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        drop(sock);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
