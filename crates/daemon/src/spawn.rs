//! fork + exec of one worker.
//!
//! Everything the child needs (path, argv, envp, the fd plan, the signal reset) is
//! built before fork; between fork and exec the child makes only async-signal-safe
//! system calls, never allocates and never panics, and ends in `execve` or `_exit`.
//! An exec failure reaches the master through a close-on-exec pipe: EOF means the
//! exec succeeded, eight bytes (step, errno) mean it did not.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use arbiter_proto::worker as contract;

use nix::unistd::Pid;

/// The steps of the child, as reported through the status pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStep {
    ProcessGroup = 1,
    DeathSignal = 2,
    Fds = 3,
    Credentials = 4,
    Exec = 5,
    Cgroup = 6,
    Chdir = 7,
}

impl ChildStep {
    pub fn from_code(c: i32) -> Option<ChildStep> {
        Some(match c {
            1 => ChildStep::ProcessGroup,
            2 => ChildStep::DeathSignal,
            3 => ChildStep::Fds,
            4 => ChildStep::Credentials,
            5 => ChildStep::Exec,
            6 => ChildStep::Cgroup,
            7 => ChildStep::Chdir,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::ProcessGroup => "setpgid",
            ChildStep::DeathSignal => "prctl(PR_SET_PDEATHSIG)",
            ChildStep::Fds => "placing the listeners at fds 3..",
            ChildStep::Credentials => "dropping privileges",
            ChildStep::Exec => "execve",
            ChildStep::Cgroup => "joining the worker's cgroup",
            ChildStep::Chdir => "chdir",
        }
    }
}

static ORIGINAL_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raise the master's open-files limit to its hard limit (each worker costs the
/// master a few fds), remembering the original for the workers.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let _ = ORIGINAL_NOFILE.set(lim);
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max.min(1 << 20),
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
        }
    }
}

/// The environment of a child of the master, a worker or a new master: the
/// master's own, less what was meant for the master, plus what the child is
/// handed. Built once, the same way for both kinds of child.
#[derive(Clone, Debug)]
pub struct ChildEnv {
    /// `KEY=VALUE` entries.
    pub env: Vec<Vec<u8>>,
    /// Keys whose value is the child's own pid, filled in after fork.
    pub pid_keys: Vec<&'static str>,
}

impl ChildEnv {
    /// The master's environment less the variables a child must not inherit:
    /// systemd's (they were meant for the master) and ours (each child gets its own).
    pub fn inherited() -> ChildEnv {
        ChildEnv {
            env: std::env::vars_os()
                .filter(|(k, _)| !is_reserved_env(k))
                .map(|(k, v)| {
                    let mut e = k.into_vec();
                    e.push(b'=');
                    e.extend_from_slice(v.as_bytes());
                    e
                })
                .collect(),
            pid_keys: Vec::new(),
        }
    }

    /// The configured environment (`--env`, `[env]`, env-file) over the
    /// inherited one: a configured key replaces the master's own value.
    pub fn overlay(&mut self, vars: &[(String, String)]) {
        self.env.retain(|e| {
            let key = e.split(|&b| b == b'=').next().unwrap_or_default();
            !vars.iter().any(|(k, _)| k.as_bytes() == key)
        });
        for (k, v) in vars {
            self.set(k, v);
        }
    }

    pub fn set(&mut self, key: &str, value: impl std::fmt::Display) {
        self.env.push(format!("{key}={value}").into_bytes());
    }

    /// Listeners at fds 3, 4, ... named `names`, the way systemd hands them over.
    pub fn listeners(&mut self, names: &[&str]) {
        self.set(contract::ENV_LISTEN_FDS, names.len());
        self.set(contract::ENV_LISTEN_FDNAMES, names.join(":"));
        self.pid_keys.push(contract::ENV_LISTEN_PID);
    }

    /// A watchdog to ping every `usec / 2`, as sd_watchdog_enabled(3) advises.
    pub fn watchdog(&mut self, usec: impl std::fmt::Display) {
        self.set(contract::ENV_WATCHDOG_USEC, usec);
        self.pid_keys.push(contract::ENV_WATCHDOG_PID);
    }
}

fn is_reserved_env(key: &OsStr) -> bool {
    crate::config::env::is_reserved(key.as_bytes())
}

/// `struct clone_args` of clone3(2), as of Linux 5.7.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The master keeps the fds it holds per worker (output pipes, heartbeat files,
/// /proc files) at or above this number, and a child takes only the fds below it
/// (plus whatever it is handed) into its own table.
pub const HIGH_FDS: RawFd = 1024;

/// Move a long-lived per-worker fd of the master out of the range children copy
/// (see [`HIGH_FDS`]). Where the open-files limit leaves no room up there, it
/// stays where it is: correct, only each spawn costs more.
pub fn keep_from_children(fd: OwnedFd) -> OwnedFd {
    match nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(HIGH_FDS)) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
        Ok(high) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) },
        Err(_) => fd,
    }
}

/// A NUL-terminated `KEY=` entry with room for a pid, filled in by the child after
/// fork (LISTEN_PID and WATCHDOG_PID must name the worker itself).
const PID_ROOM: usize = 12;

/// A prepared spawn: build it, then call [`Prepared::spawn`].
pub struct Prepared {
    path: CString,
    // Keep the storage alive: the pointer arrays point into it.
    _argv: Vec<CString>,
    _env: Vec<Vec<u8>>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// (pointer to the first digit byte, room) for each pid slot in `env`.
    pid_slots: Vec<*mut u8>,
    fds: Vec<RawFd>,
    stdio: Option<RawFd>,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    contained: bool,
    dir: Option<CString>,
    master_pid: libc::pid_t,
    /// The open-files limit the master started with: it raises its own for many
    /// workers, and a worker gets back what it would have had (some programs still
    /// use select(2) and break above 1024).
    nofile: Option<libc::rlimit>,
    /// The cgroup the child is born in (its directory), or joins first (its
    /// `cgroup.procs`), held open by the master.
    cgroup: Option<(RawFd, RawFd)>,
}

/// What the caller must supply.
pub struct Plan<'a> {
    pub path: &'a OsStr,
    pub argv: &'a [&'a OsStr],
    /// `KEY=VALUE` entries.
    pub env: Vec<Vec<u8>>,
    /// Keys whose value is the worker's own pid (e.g. `LISTEN_PID`).
    pub pid_keys: &'a [&'a str],
    /// Placed at fds 3, 4, ... in this order.
    pub fds: Vec<RawFd>,
    /// Becomes the worker's stdout and stderr.
    pub stdio: Option<RawFd>,
    pub credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// A worker: its own process group, and killed with the master. A new master
    /// (upgrade) is neither: it must outlive this one.
    pub contained: bool,
    /// Where the child starts; `None`: the master's working directory.
    pub dir: Option<&'a Path>,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

impl Prepared {
    pub fn new(plan: Plan<'_>) -> io::Result<Prepared> {
        let path = cstring(plan.path)?;
        let dir = plan.dir.map(|d| cstring(d.as_os_str())).transpose()?;
        let argv: Vec<CString> = plan
            .argv
            .iter()
            .map(|a| cstring(a))
            .collect::<io::Result<_>>()?;
        let mut env: Vec<Vec<u8>> = Vec::with_capacity(plan.env.len() + plan.pid_keys.len());
        for mut e in plan.env {
            if e.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NUL byte in environment",
                ));
            }
            e.push(0);
            env.push(e);
        }
        let mut pid_offsets = Vec::new();
        for key in plan.pid_keys {
            let mut e = format!("{key}=").into_bytes();
            pid_offsets.push((env.len(), e.len()));
            e.resize(e.len() + PID_ROOM, 0);
            env.push(e);
        }
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut pid_slots = Vec::new();
        for (i, off) in pid_offsets {
            // SAFETY: off + PID_ROOM is within the buffer resized above.
            pid_slots.push(unsafe { env[i].as_mut_ptr().add(off) });
        }
        let envp_ptrs = env
            .iter()
            .map(|e| e.as_ptr().cast())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(Prepared {
            path,
            _argv: argv,
            _env: env,
            argv_ptrs,
            envp_ptrs,
            pid_slots,
            fds: plan.fds,
            stdio: plan.stdio,
            credentials: plan.credentials,
            contained: plan.contained,
            dir,
            master_pid: std::process::id() as libc::pid_t,
            nofile: ORIGINAL_NOFILE.get().copied(),
            cgroup: None,
        })
    }

    /// The child joins the cgroup whose `cgroup.procs` is open at `procs` before
    /// anything else, so all it ever starts is in it. The caller keeps `procs` open
    /// until the spawn.
    pub fn join_cgroup(&mut self, dir: RawFd, procs: RawFd) {
        self.cgroup = Some((dir, procs));
    }

    /// fork, and exec in the child. Returns the child's pid and the read end of its
    /// exec-status pipe (non-blocking, close-on-exec) for the master's poll loop.
    pub fn spawn(&mut self) -> io::Result<(Pid, OwnedFd)> {
        let (status_r, status_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        // A scratch copy of the fd plan the child may rearrange without allocating.
        let mut scratch = self.fds.clone();
        let (cgroup, contained) = (self.cgroup, self.contained);
        // What the child keeps of the master's fd table: everything it is handed
        // and the master's few low fds, never the per-worker ones kept above
        // HIGH_FDS (see `keep_from_children`).
        let keep_below = self
            .fds
            .iter()
            .chain(self.stdio.as_ref())
            .chain(self.cgroup.iter().flat_map(|(d, p)| [d, p]))
            .chain(std::iter::once(&status_w.as_raw_fd()))
            .map(|&fd| fd + 1)
            .max()
            .unwrap_or(0)
            .max(HIGH_FDS);
        let old_mask = crate::signals::block_all()?;
        // Like fork, but sharing the fd table until the child's first step takes
        // a copy of its low part only: a fork copies the whole table, and the
        // exec then closes every fd the master holds, which at thousands of
        // workers made each spawn cost as much as all the workers before it.
        // The memory is shared too where it can be (see `crate::clone`).
        // CLONE_VFORK holds the master until the child has exec'd or exited, so
        // nothing changes the shared table or memory meanwhile.
        // Into its cgroup at birth (CLONE_INTO_CGROUP, Linux 5.7): moving a
        // running process there instead costs milliseconds of the kernel's
        // cgroup locking per spawn.
        let shared = (libc::CLONE_FILES | libc::CLONE_VFORK) as u64 | crate::clone::SHARE_MEMORY;
        let mut call = ChildCall {
            prepared: self,
            status_fd: status_w.as_raw_fd(),
            keep_below,
            in_cgroup: false,
            fds: &mut scratch,
        };
        let mut forked = Err(io::Error::from_raw_os_error(libc::ENOSYS));
        if let Some((dir, _)) = cgroup {
            call.in_cgroup = true;
            let args = CloneArgs {
                flags: shared | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: dir as u64,
                ..CloneArgs::default()
            };
            let argv = [
                &args as *const CloneArgs as usize,
                std::mem::size_of::<CloneArgs>(),
                0,
                0,
                0,
            ];
            // SAFETY: the master is single-threaded; child_entry only makes
            // async-signal-safe calls on memory prepared before (see
            // `Prepared::child`); `args` and `call` outlive the call.
            forked = unsafe {
                crate::clone::call(libc::SYS_clone3, argv, child_entry, (&raw mut call).cast())
            };
        }
        if forked.is_err() {
            call.in_cgroup = false;
            // clone(flags, stack, parent_tid, child_tid, tls): no new stack.
            let argv = [(shared | libc::SIGCHLD as u64) as usize, 0, 0, 0, 0];
            // SAFETY: see above.
            forked = unsafe {
                crate::clone::call(libc::SYS_clone, argv, child_entry, (&raw mut call).cast())
            };
        }
        crate::signals::restore(&old_mask);
        drop(status_w);
        let pid = Pid::from_raw(forked?);
        if contained {
            // Also from the parent, so the group exists before we ever signal it;
            // EACCES once the child has exec'd is expected and harmless.
            let _ = nix::unistd::setpgid(pid, pid);
        }
        Ok((pid, status_r))
    }

    /// The child branch, from [`child_entry`]. Never returns.
    ///
    /// # Safety
    /// Must only be called in the child right after fork.
    unsafe fn child(
        &mut self,
        status_fd: RawFd,
        keep_below: RawFd,
        in_cgroup: bool,
        fds: &mut [RawFd],
    ) -> ! {
        unsafe fn fail(status_fd: RawFd, step: ChildStep) -> ! {
            // SAFETY: errno read, write(2) from the stack and _exit are async-signal-safe.
            unsafe {
                let errno = *libc::__errno_location();
                let mut rec = [0u8; 8];
                rec[..4].copy_from_slice(&(step as i32).to_ne_bytes());
                rec[4..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(status_fd, rec.as_ptr().cast(), rec.len());
                libc::_exit(127)
            }
        }
        // SAFETY: only async-signal-safe libc calls on memory prepared before fork.
        unsafe {
            // First, before any fd is touched: a table of our own, holding the fds
            // below `keep_below` only. Until then the table is the master's.
            let unshared = libc::syscall(
                libc::SYS_close_range,
                keep_below as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) == 0
                // A kernel before 5.9: a copy of the whole table, as fork makes.
                || libc::unshare(libc::CLONE_FILES) == 0;
            if !unshared {
                // The table is still shared: writing into status_fd is safe, but
                // nothing else may be done with it.
                fail(status_fd, ChildStep::Fds);
            }
            if let Some((_, procs)) = self.cgroup
                && !in_cgroup
                && libc::write(procs, b"0\n".as_ptr().cast(), 2) != 2
            {
                fail(status_fd, ChildStep::Cgroup);
            }
            // Default dispositions, SIGPIPE included (Rust ignores it, and an
            // ignored disposition survives exec), except the master's own
            // signals, which start ignored: `systemctl kill` signals every
            // process of the unit, and goes round again for the ones that appear
            // meanwhile, so a worker (or upgrade check, or new master) that the
            // signal itself made the master start gets it before it could
            // install a handler, and USR2 would kill it, TTIN stop it.
            for sig in 1..libc::SIGRTMIN() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    let how = if crate::signals::MASTERS_OWN.contains(&sig) {
                        libc::SIG_IGN
                    } else {
                        libc::SIG_DFL
                    };
                    libc::signal(sig, how);
                }
            }
            if self.contained {
                if libc::setpgid(0, 0) != 0 {
                    fail(status_fd, ChildStep::ProcessGroup);
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    fail(status_fd, ChildStep::DeathSignal);
                }
                // The master may have died between fork and prctl: then nobody
                // would kill us.
                if libc::getppid() != self.master_pid {
                    libc::_exit(1);
                }
            }
            // stdio first: the pipe's fd may sit in the range the listeners go to.
            if let Some(out) = self.stdio
                && (libc::dup2(out, 1) != 1 || libc::dup2(out, 2) != 2)
            {
                fail(status_fd, ChildStep::Fds);
            }
            place_fds(fds).unwrap_or_else(|()| fail(status_fd, ChildStep::Fds));
            if let Some((uid, gid)) = self.credentials {
                // The system calls themselves: libc's wrappers may signal every
                // thread they know of to change its credentials too, and this
                // child, in the master's memory, is not one of them.
                let groups = [gid];
                if (libc::geteuid() == 0
                    && libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0)
                    || libc::syscall(libc::SYS_setgid, gid) != 0
                    || libc::syscall(libc::SYS_setuid, uid) != 0
                {
                    fail(status_fd, ChildStep::Credentials);
                }
            }
            if let Some(limit) = &self.nofile {
                libc::setrlimit(libc::RLIMIT_NOFILE, limit);
            }
            let pid = libc::getpid();
            for &slot in &self.pid_slots {
                write_decimal(slot, PID_ROOM, pid as u64);
            }
            if let Some(dir) = &self.dir
                && libc::chdir(dir.as_ptr()) != 0
            {
                fail(status_fd, ChildStep::Chdir);
            }
            let empty: libc::sigset_t = std::mem::zeroed();
            let mut set = empty;
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
            fail(status_fd, ChildStep::Exec)
        }
    }

    #[cfg(test)]
    fn env_entries(&self) -> &[Vec<u8>] {
        &self._env
    }
}

/// What the child needs from [`Prepared::spawn`]'s frame.
struct ChildCall<'a> {
    prepared: &'a mut Prepared,
    status_fd: RawFd,
    keep_below: RawFd,
    /// Born in its cgroup (clone3 took CLONE_INTO_CGROUP).
    in_cgroup: bool,
    fds: &'a mut [RawFd],
}

/// The child's first function.
///
/// # Safety
/// Only as the entry of [`crate::clone::call`], with `arg` a [`ChildCall`].
unsafe extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the parent's ChildCall, alive while the parent is held
    // (CLONE_VFORK).
    let c = unsafe { &mut *arg.cast::<ChildCall<'_>>() };
    // SAFETY: we are the child.
    unsafe {
        c.prepared
            .child(c.status_fd, c.keep_below, c.in_cgroup, c.fds)
    }
}

/// Move `fds[i]` to fd `3 + i` for every i, clearing close-on-exec on the targets.
///
/// A source that sits on another's target is first moved above the whole range, so
/// the sequential dup2 calls cannot clobber it. Async-signal-safe, no allocation.
fn place_fds(fds: &mut [RawFd]) -> Result<(), ()> {
    let top = 3 + fds.len() as RawFd;
    for (i, src) in fds.iter_mut().enumerate() {
        if *src >= 3 && *src < top && *src != 3 + i as RawFd {
            // SAFETY: fcntl on an fd we own; no memory is touched.
            let moved = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, top) };
            if moved < 0 {
                return Err(());
            }
            *src = moved;
        }
    }
    for (i, &src) in fds.iter().enumerate() {
        let target = 3 + i as RawFd;
        // SAFETY: fcntl/dup2 on fds we own.
        let ok = unsafe {
            if src == target {
                // dup2 onto itself is a no-op that would leave FD_CLOEXEC set.
                libc::fcntl(src, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(src, target) == target
            }
        };
        if !ok {
            return Err(());
        }
    }
    Ok(())
}

/// Write `n` in decimal followed by NUL into `room` bytes at `dst`. No allocation.
///
/// # Safety
/// `dst` must be valid for `room` bytes of writes.
unsafe fn write_decimal(dst: *mut u8, room: usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = len.min(room - 1);
    for i in 0..len {
        // SAFETY: i < room - 1 by the clamp above.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= room - 1.
    unsafe { *dst.add(len) = 0 };
}

/// Read the exec-status pipe once it is readable: `Ok(None)` = the exec succeeded
/// (EOF), `Ok(Some((step, errno)))` = the child failed at that step.
pub fn read_status(fd: &OwnedFd) -> io::Result<Option<(Option<ChildStep>, i32)>> {
    let mut rec = [0u8; 8];
    match nix::unistd::read(fd, &mut rec) {
        Ok(0) => Ok(None),
        Ok(8) => {
            let step = i32::from_ne_bytes(rec[..4].try_into().unwrap_or_default());
            let errno = i32::from_ne_bytes(rec[4..].try_into().unwrap_or_default());
            Ok(Some((ChildStep::from_code(step), errno)))
        }
        Ok(_) => Ok(Some((None, 0))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_env() {
        assert!(is_reserved_env(OsStr::new("LISTEN_FDS")));
        assert!(is_reserved_env(OsStr::new("NOTIFY_SOCKET")));
        assert!(is_reserved_env(OsStr::new("ARBITER_SLOT")));
        assert!(!is_reserved_env(OsStr::new("PATH")));
    }

    #[test]
    fn decimal() {
        let mut buf = [0xffu8; PID_ROOM];
        unsafe { write_decimal(buf.as_mut_ptr(), PID_ROOM, 4194304) };
        assert_eq!(&buf[..8], b"4194304\0");
        unsafe { write_decimal(buf.as_mut_ptr(), PID_ROOM, 0) };
        assert_eq!(&buf[..2], b"0\0");
    }

    #[test]
    fn pid_keys_get_room() {
        let p = Prepared::new(Plan {
            path: OsStr::new("/bin/true"),
            argv: &[OsStr::new("true")],
            env: vec![b"A=1".to_vec()],
            pid_keys: &["LISTEN_PID"],
            fds: vec![],
            stdio: None,
            credentials: None,
            contained: true,
            dir: None,
        })
        .unwrap();
        assert_eq!(p.env_entries()[0], b"A=1\0");
        assert_eq!(p.env_entries()[1].len(), "LISTEN_PID=".len() + PID_ROOM);
    }
}
