//! The listening sockets: bound once by the master, inherited by every worker.
//!
//! Listeners stay in blocking mode: O_NONBLOCK lives on the shared open file
//! description, so setting it here would change it for every worker, and a plain
//! `accept()` loop in a worker expects a blocking socket (systemd hands them over
//! the same way).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
    UnixAddr, sockopt,
};

use crate::config::BindSpec;

mod adopt;
pub use adopt::{claim, log_systemd, near_miss};

/// Where a listener came from. It decides whether a reload may close it, who
/// removes its socket file, and what `status` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this master from a bind.
    Bound,
    /// Bound from a bind by an earlier master, which handed it over at an upgrade.
    HandedOver,
    /// `fd://N`: opened by whoever started the master.
    Fd,
    /// Socket activation: systemd made it and keeps it (also when an upgrading
    /// master passed it on). It is served whatever the binds say, and its socket
    /// file is systemd's: never removed here.
    Systemd,
}

pub struct Listener {
    fd: OwnedFd,
    /// How operators see it: `http://127.0.0.1:8000`, `unix:/run/app.sock`.
    pub display: String,
    /// Its entry in `LISTEN_FDNAMES`.
    pub name: String,
    /// A socket file this master created and must remove on a real shutdown.
    pub owned_path: Option<PathBuf>,
    /// The bind that names it: the one it was bound from, or for systemd's, the
    /// one that resolves to its address; `None` for a systemd socket that no bind
    /// names.
    pub spec: Option<BindSpec>,
    pub origin: Origin,
    /// The number systemd (or an upgrading master) passed it as: 3, 4, ... in
    /// `LISTEN_FDS` order, which is what a bind `fd://N` names.
    pub passed_as: Option<RawFd>,
}

impl Listener {
    /// A listening socket handed over by the old master at an upgrade, bound from
    /// `spec`. Its socket file, if any, is not ours to remove until promoted.
    pub fn adopted(fd: OwnedFd, spec: BindSpec) -> Listener {
        let display = display_of(fd.as_fd());
        let name = fdname(display.trim_start_matches("http://"));
        Listener {
            fd,
            display,
            name,
            owned_path: None,
            spec: Some(spec),
            origin: Origin::HandedOver,
            passed_as: None,
        }
    }

    /// Promoted after an upgrade: the socket file of a unix bind is ours to remove
    /// from now on. systemd's never is, even when a bind names its path.
    pub fn own_path(&mut self) {
        if self.origin != Origin::Systemd
            && let Some(BindSpec::Unix(path)) = &self.spec
        {
            self.owned_path = Some(path.clone());
        }
    }

    /// What a new master is told this socket came from: its bind, or `None` for
    /// systemd's, which the new master matches against its own binds (its
    /// configuration may have changed) and never treats as its own.
    pub fn handover_spec(&self) -> Option<String> {
        match self.origin {
            Origin::Systemd => None,
            _ => self.spec.as_ref().map(|s| s.to_string()),
        }
    }

    /// Another handle on the same socket (the same listen queue).
    pub fn try_clone(&self) -> io::Result<Listener> {
        Ok(Listener {
            fd: self.fd.try_clone()?,
            display: self.display.clone(),
            name: self.name.clone(),
            owned_path: self.owned_path.clone(),
            spec: self.spec.clone(),
            origin: self.origin,
            passed_as: self.passed_as,
        })
    }
}

/// The listeners for `specs`, reusing the sockets of `current` where the address
/// is unchanged (rebinding it would fail: the old workers still listen on it).
/// systemd's sockets are all kept, first and in their order as at start-up, each
/// named by the bind that now resolves to its address, if any: a bind removed
/// from the configuration does not close a socket systemd holds (the socket unit
/// decides what systemd listens on). New addresses are bound here; on failure
/// nothing new is left open.
pub fn rebind(
    current: &[Listener],
    specs: &[BindSpec],
    use_specs: bool,
    opts: &BindOptions,
) -> Result<Vec<Listener>, BindError> {
    let clone_err = |l: &Listener, err| BindError {
        addr: l.display.clone(),
        err,
    };
    let mut out = Vec::new();
    for l in current.iter().filter(|l| l.origin == Origin::Systemd) {
        let mut kept = l.try_clone().map_err(|e| clone_err(l, e))?;
        kept.spec = None;
        out.push(kept);
    }
    if use_specs {
        for spec in claim(&mut out, specs) {
            let own = current
                .iter()
                .find(|l| l.origin != Origin::Systemd && l.spec.as_ref() == Some(&spec));
            let next = match own {
                Some(l) => l.try_clone().map_err(|e| clone_err(l, e)),
                None => bind_one(&spec, opts),
            };
            match next {
                Ok(l) => out.push(l),
                Err(e) => {
                    close_unshared(out, current);
                    return Err(e);
                }
            }
        }
    }
    Ok(out)
}

/// Close `old`, removing only the socket files no listener in `keep` still uses.
pub fn close_unshared(old: Vec<Listener>, keep: &[Listener]) {
    for mut l in old {
        if let Some(p) = &l.owned_path
            && keep.iter().any(|k| k.owned_path.as_ref() == Some(p))
        {
            l.owned_path = None;
        }
        close_all(vec![l]);
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Why a bind failed, with the address at fault.
#[derive(Debug)]
pub struct BindError {
    pub addr: String,
    pub err: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = match self.err.raw_os_error() {
            Some(libc::EADDRINUSE) => match port_holder(&self.addr) {
                Some(who) => format!("address already in use (held by {who})"),
                None => "address already in use".to_string(),
            },
            Some(libc::EADDRNOTAVAIL) => "address not available on this machine".to_string(),
            Some(libc::EACCES) => "permission denied".to_string(),
            _ => self.err.to_string(),
        };
        write!(f, "cannot listen on {}: {reason}", self.addr)
    }
}

/// Who listens on the TCP port of `addr` (`127.0.0.1:8000`, `[::1]:8000`), for
/// an operator told the address is in use: `pid 123 (python3)`. A walk of /proc,
/// done only on that error.
fn port_holder(addr: &str) -> Option<String> {
    let port: u16 = addr.rsplit(':').next()?.parse().ok()?;
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; inode is field 9.
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening
                && on_port
                && let Some(inode) = f.get(9)
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
        });
        if holds {
            return Some(format!("pid {pid} ({})", crate::trees::comm(pid)));
        }
    }
    None
}

fn fdname(s: &str) -> String {
    // LISTEN_FDNAMES is colon-separated and systemd allows [A-Za-z0-9._-] in names.
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn display_of(fd: BorrowedFd<'_>) -> String {
    match socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(addr) => {
            if let Some(v4) = addr.as_sockaddr_in() {
                format!("http://{}", std::net::SocketAddrV4::from(*v4))
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                format!("http://{}", std::net::SocketAddrV6::from(*v6))
            } else if let Some(un) = addr.as_unix_addr() {
                match un.path() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_string(),
                }
            } else {
                format!("fd://{}", fd.as_raw_fd())
            }
        }
        Err(_) => format!("fd://{}", fd.as_raw_fd()),
    }
}

pub struct BindOptions {
    pub backlog: i32,
    pub reuse_port: bool,
}

/// Bind every address, or none: on the first failure the ones already made are
/// dropped (and their socket files removed) so a failed start leaves nothing behind.
pub fn bind_all(specs: &[BindSpec], opts: &BindOptions) -> Result<Vec<Listener>, BindError> {
    let mut out: Vec<Listener> = Vec::new();
    for spec in specs {
        match bind_one(spec, opts) {
            Ok(l) => out.push(l),
            Err(e) => {
                close_all(out);
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Bind one address (see [`bind_all`]).
pub fn bind_one(spec: &BindSpec, opts: &BindOptions) -> Result<Listener, BindError> {
    let shown = match spec {
        BindSpec::Tcp(a) => a.to_string(),
        BindSpec::Unix(p) => format!("unix:{}", p.display()),
        BindSpec::Fd(n) => format!("fd://{n}"),
    };
    let fail = |err: io::Error| BindError {
        addr: shown.clone(),
        err,
    };
    let backlog = Backlog::new(opts.backlog).unwrap_or(Backlog::MAXCONN);
    let (fd, owned_path) = match spec {
        BindSpec::Tcp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                .map_err(|e| fail(e.into()))?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| fail(e.into()))?;
            if opts.reuse_port {
                socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(|e| fail(e.into()))?;
            }
            // Inherited by every accepted connection on Linux, as gunicorn relies on.
            let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
            let res = match addr {
                std::net::SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(*a)),
                std::net::SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
            };
            res.map_err(|e| fail(e.into()))?;
            socket::listen(&fd, backlog).map_err(|e| fail(e.into()))?;
            (fd, None)
        }
        BindSpec::Unix(path) => {
            remove_stale_socket(path).map_err(fail)?;
            let fd = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| fail(e.into()))?;
            let addr = UnixAddr::new(path).map_err(|e| fail(e.into()))?;
            socket::bind(fd.as_raw_fd(), &addr).map_err(|e| fail(e.into()))?;
            if let Err(e) = socket::listen(&fd, backlog) {
                let _ = std::fs::remove_file(path);
                return Err(fail(e.into()));
            }
            (fd, Some(path.clone()))
        }
        BindSpec::Fd(n) => (adopt_fd(*n, backlog).map_err(fail)?, None),
    };
    let display = display_of(fd.as_fd());
    let (name, origin) = match spec {
        BindSpec::Fd(_) => (fdname(&display), Origin::Fd),
        _ => (fdname(display.trim_start_matches("http://")), Origin::Bound),
    };
    Ok(Listener {
        fd,
        display,
        name,
        owned_path,
        spec: Some(spec.clone()),
        origin,
        passed_as: None,
    })
}

/// A unix socket path may hold a socket left by a dead server (replace it), a live
/// server's socket (refuse: unlinking it would cut that server off), or something
/// that is not a socket at all (refuse).
fn remove_stale_socket(path: &PathBuf) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if !meta.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Ok(_) if crate::control::socket_answers(path) => {
            Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
        }
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Take over an already-open listening socket (fd://N, LISTEN_FDS).
fn adopt_fd(n: RawFd, backlog: Backlog) -> io::Result<OwnedFd> {
    let flags = nix::fcntl::fcntl(
        // SAFETY: only used for this fcntl call while we check that n is open.
        unsafe { BorrowedFd::borrow_raw(n) },
        nix::fcntl::FcntlArg::F_GETFD,
    );
    if flags.is_err() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no such open file descriptor",
        ));
    }
    // SAFETY: the fd is open (checked above) and the operator handed it to us to own.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    let ty = socket::getsockopt(&fd, sockopt::SockType);
    match ty {
        Ok(SockType::Stream) => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a stream socket",
            ));
        }
        Err(_) => {
            // Not a socket: give the fd back untouched rather than closing something of the caller's.
            let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
        }
    }
    if !socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
        // Bound but not listening (or not even bound): listen now, as gunicorn does.
        socket::listen(&fd, backlog)?;
    }
    set_cloexec(fd.as_fd(), true)?;
    Ok(fd)
}

pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Adopt systemd's sockets when `LISTEN_PID` names us, and remove the variables so
/// nothing we spawn mistakes them for its own. An upgrading master hands its
/// listeners over the same way; the caller tells its binds from systemd's.
pub fn from_systemd(backlog: i32) -> Result<Vec<Listener>, BindError> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok());
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: called once at startup, before any thread could exist.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (true, Some(count)) = (pid_matches, count) else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    let mut out = Vec::new();
    for i in 0..count.clamp(0, 1024) {
        let n = 3 + i;
        let fd = adopt_fd(n, backlog).map_err(|err| BindError {
            addr: format!("systemd socket fd {n}"),
            err,
        })?;
        let display = display_of(fd.as_fd());
        let name = names
            .get(i as usize)
            .filter(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| fdname(&display));
        out.push(Listener {
            fd,
            display,
            name,
            owned_path: None,
            spec: None,
            origin: Origin::Systemd,
            passed_as: Some(n),
        });
    }
    Ok(out)
}

/// Close the listeners, removing the socket files this master created.
pub fn close_all(listeners: Vec<Listener>) {
    for l in listeners {
        if let Some(p) = &l.owned_path {
            let _ = std::fs::remove_file(p);
        }
        drop(l);
    }
}

/// The fds a worker must inherit: every fd >= 3 of ours is close-on-exec except the
/// ones the spawn code places on purpose, so nothing else leaks into a worker.
pub fn mark_inherited_fds_cloexec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: borrowed only for this fcntl; a fd that has meanwhile closed (the
        // read_dir handle itself) just yields EBADF.
        let _ = set_cloexec(unsafe { BorrowedFd::borrow_raw(fd) }, true);
    }
}
