//! The control socket's file and directory: binding it safely, watching it,
//! binding it again when removed, moving it at an upgrade, removing it at exit.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::{
    ACCEPT_ERROR_LOG_EVERY, ControlError, ControlServer, RESTORE_BACKOFF_MAX, RESTORE_DELAY,
    Restore,
};
use crate::ratelimit::Repeated;
use crate::warning;

impl ControlServer {
    /// Bind the control socket at `path`: mode 0600, in a directory created 0700 if
    /// missing. A stale socket from a dead master is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let (listener, identity) = bind_socket(path)?;
        let mut server = ControlServer {
            listener,
            path: path.to_path_buf(),
            identity,
            clients: Vec::new(),
            next_id: 1,
            uid: nix::unistd::getuid().as_raw(),
            watch: None,
            watched: None,
            restore_at: None,
            restore_backoff: RESTORE_DELAY,
            retired: Vec::new(),
            accept_paused_until: None,
            reserve: crate::reserve::ReserveFd::hold(),
            accept_errors: Repeated::new(ACCEPT_ERROR_LOG_EVERY),
        };
        match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => server.watch = Some(i),
            Err(e) => warning!(
                "Control socket: cannot watch {} ({e}); if it is removed, a reload \
                 brings it back",
                path.display()
            ),
        }
        server.arm_watch();
        Ok(server)
    }

    /// (Re)point the inotify watch at the socket's directory, which may be new.
    fn arm_watch(&mut self) {
        let Some(inotify) = &self.watch else { return };
        if let Some(wd) = self.watched.take() {
            let _ = inotify.rm_watch(wd);
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mask = AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        // Failing here (the directory just went away) is noticed at the restore.
        self.watched = inotify.add_watch(dir, mask).ok();
    }

    /// The watch fired: if the event concerns our file or its directory, look at
    /// the path again shortly.
    pub fn on_watch(&mut self, now: Instant) {
        let Some(inotify) = &self.watch else { return };
        let name = self.path.file_name();
        let mut gone = false;
        // Bounded: the queue holds at most max_queued_events, and our own writes
        // never generate these events.
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for e in events {
                let dir_gone = e.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED
                        | AddWatchFlags::IN_Q_OVERFLOW,
                );
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watched = None;
                }
                gone |= dir_gone || (e.name.is_some() && e.name.as_deref() == name);
            }
        }
        if gone && self.restore_at.is_none() {
            self.restore_at = Some(now + RESTORE_DELAY);
        }
    }

    /// Bind a new socket if ours was removed and nothing took its place. A path
    /// that exists is left alone whoever owns it: during an upgrade the new master
    /// renames its socket over ours.
    pub fn restore(&mut self, now: Instant) -> Option<Restore> {
        if self.restore_at.is_none_or(|t| now < t) {
            return None;
        }
        self.restore_at = None;
        match std::fs::symlink_metadata(&self.path) {
            // NotADirectory: something else now sits where the directory was.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) => {}
            _ => {
                self.restore_backoff = RESTORE_DELAY;
                if self.watched.is_none() {
                    self.arm_watch();
                }
                return None;
            }
        }
        match self.rebind() {
            Ok(()) => {
                self.restore_backoff = RESTORE_DELAY;
                Some(Restore::Rebound)
            }
            Err(e) => {
                let retry = self.restore_backoff;
                self.restore_backoff = (retry * 2).min(RESTORE_BACKOFF_MAX);
                self.restore_at = Some(now + retry);
                Some(Restore::Failed(e, retry))
            }
        }
    }

    /// A new listener at the same path; connected clients stay.
    fn rebind(&mut self) -> Result<(), ControlError> {
        let (listener, identity) = bind_socket(&self.path)?;
        let old = std::mem::replace(&mut self.listener, listener);
        self.retired.push(OwnedFd::from(old));
        self.identity = identity;
        self.arm_watch();
        Ok(())
    }

    /// If the socket file is gone (a cleaner removed its directory) or replaced by
    /// something that is not ours, bind a new one at the same path. The connected
    /// clients stay. Returns whether it had to.
    pub fn ensure_bound(&mut self) -> Result<bool, ControlError> {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            return Ok(false);
        }
        self.rebind()?;
        self.restore_at = None;
        Ok(true)
    }

    /// Move the socket file (an upgraded master taking the usual path). The rename is
    /// atomic: clients find either the old master's socket or ours, never nothing.
    pub fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        self.arm_watch();
        Ok(())
    }

    /// Last words before the master exits: flush each client with a short blocking
    /// write, since there will be no next turn. `remove`: unlink the socket file
    /// (if it is still ours).
    pub fn shutdown(mut self, remove: bool) {
        for c in &mut self.clients {
            if !c.output.is_empty() {
                let _ = c.stream.set_nonblocking(false);
                let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = c.stream.write_all(&c.output);
            }
        }
        self.clients.clear();
        // Remove the socket file only if it is still the one we bound.
        if remove
            && let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Is a whole request already buffered? (A gunicornc frame's length is checked by
/// its parser; four bytes are enough to ask it.)
/// Bind the socket file at `path` (see [`ControlServer::bind`]); its listener and
/// the file's device and inode.
fn bind_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), ControlError> {
    let shown = path.display();
    let fail = |what: String| ControlError(format!("control socket {shown}: {what}"));
    if path.as_os_str().len() >= 108 {
        return Err(fail("path longer than 107 bytes".into()));
    }
    let uid = nix::unistd::getuid().as_raw();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir, uid).map_err(fail)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(fail("the path exists and is not a socket".into()));
            }
            if socket_answers(path) {
                return Err(fail("a running master is answering on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    // The master has one thread, so changing the umask around bind is race-free
    // and leaves no window in which the socket is more open than 0600.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| fail(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// How much of a directory's ownership and mode we insist on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// The operator's choice, in a place only they (or root) could have made it:
    /// it need only belong to us or root.
    Chosen,
    /// Other users could have made it (its parent is group- or world-writable, as
    /// /tmp is): a real directory, ours, that nobody else can write to.
    Shared,
    /// The default directory (/tmp/arbiter-UID, $XDG_RUNTIME_DIR/arbiter,
    /// /run/arbiter), or one we just created: a real directory, ours, 0700.
    Private,
}

/// Make sure the socket's directory is one nobody else controls, creating it 0700
/// if missing. Otherwise whoever made it, or owns the directory a planted symlink
/// leads to, could replace or impersonate our socket.
fn prepare_dir(dir: &Path, uid: u32) -> Result<(), String> {
    let shown = dir.display();
    let default_dir = arbiter_proto::paths::default_control_path("arbiter");
    let shared = dir
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.mode() & 0o022 != 0);
    let trust = if default_dir.parent() == Some(dir) {
        Trust::Private
    } else if shared {
        Trust::Shared
    } else {
        Trust::Chosen
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if trust == Trust::Chosen && meta.file_type().is_symlink() => {
            let meta = std::fs::metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
            check_dir(dir, &meta, uid, trust)
        }
        Ok(meta) => check_dir(dir, &meta, uid, trust),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {shown}: {e}"))?;
            // DirBuilder's mode is filtered by the umask; make it exactly 0700.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            // Someone may have made it between our look and our mkdir (which then
            // succeeds quietly): check what is there now.
            let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
            check_dir(dir, &meta, uid, Trust::Private)
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// Is `meta` (from `lstat`; from `stat` where a symlink is fine) a directory we
/// may put the socket in, at `trust`?
fn check_dir(dir: &Path, meta: &std::fs::Metadata, uid: u32, trust: Trust) -> Result<(), String> {
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        return Err(format!(
            "directory {shown} is a symbolic link (another user can make one there)"
        ));
    }
    if !meta.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    if meta.uid() != uid && (trust != Trust::Chosen || meta.uid() != 0) {
        return Err(format!(
            "directory {shown} belongs to uid {}, not to us (uid {uid})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    let bad = match trust {
        Trust::Chosen => false,
        Trust::Shared => mode & 0o022 != 0,
        Trust::Private => mode != 0o700,
    };
    if bad {
        return Err(format!(
            "directory {shown} has mode {mode:04o}, not 0700 (other users could reach the socket)"
        ));
    }
    Ok(())
}

/// Does a server accept on the socket at `path`? Asked without blocking (the
/// master must not wait on a stranger's full backlog): a full backlog counts as
/// a live server.
pub(crate) fn socket_answers(path: &Path) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    use std::os::fd::AsRawFd;
    matches!(
        connect(fd.as_raw_fd(), &addr),
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS)
    )
}
