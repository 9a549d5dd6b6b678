//! The guardian: a small process beside the master that kills what is left of
//! the workers' trees if the master is killed (`kill -9`, the OOM killer), when
//! nobody else would. PDEATHSIG reaches only a dying process's own children, so a
//! worker's children, and anything that left its process group, would live on.
//!
//! It is this binary exec'd as `arbiterd --guardian ROOT` (ROOT: the workers'
//! cgroup, or `-`), in a session of its own, deaf to the signals an operator
//! sends the master's group. The master writes to it through a pipe at fd 3:
//! `+PGID` when a worker starts, `-PGID` when its tree is gone, `bye` when the
//! master exits on its own. End of file without `bye` means the master died: the
//! guardian KILLs every group it was told of and the whole cgroup, removes the
//! cgroup, and exits.
//!
//! Why a process and not a PID namespace: a namespace needs privileges, and its
//! init would have to be the master itself (changing its pid, which pidfiles,
//! systemd's MAINPID and every runbook use); a guardian costs one idle process
//! blocked in read(2) and a pipe write per spawn.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::sys::signal::{SigHandler, Signal};
use nix::unistd::Pid;

use crate::spawn::{ChildEnv, Plan, Prepared};

/// argv[1] with which the master execs its own binary as the guardian.
pub const GUARDIAN_ARG: &str = "--guardian";

/// The master's end.
pub struct Guardian {
    pipe: File,
    /// A write failed (EPIPE): the guardian is gone and must be started again.
    lost: bool,
}

impl Guardian {
    /// Start the guardian for the workers' cgroup `root` (if any).
    pub fn start(name: &str, root: Option<&Path>, env: &ChildEnv) -> std::io::Result<Guardian> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // Never block the master: a guardian that stopped reading costs lines.
        nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let title = format!("arbiter: guardian [{name}]");
        let root_arg =
            root.map_or_else(|| OsStr::new("-").to_owned(), |r| r.as_os_str().to_owned());
        let argv = [
            OsStr::new(&title),
            OsStr::new(GUARDIAN_ARG),
            root_arg.as_os_str(),
        ];
        let mut prepared = Prepared::new(Plan {
            path: OsStr::new("/proc/self/exe"),
            argv: &argv,
            env: env.env.clone(),
            pid_keys: &[],
            fds: vec![read.as_raw_fd()],
            stdio: None,
            credentials: None,
            // It must outlive the master: no PDEATHSIG.
            contained: false,
            dir: None,
        })?;
        // Not our child (it forks once and its first process exits at once), so
        // it neither shows among the workers nor waits on our reaping; the
        // caller starts it before it becomes a subreaper, or orphans would come
        // back to it.
        let (pid, _exec_status) = prepared.spawn()?;
        drop(read);
        let _ = nix::sys::wait::waitpid(pid, None);
        let write = crate::spawn::keep_from_children(write);
        Ok(Guardian {
            pipe: File::from(write),
            lost: false,
        })
    }

    /// Whether it was found gone (a write to it failed).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    fn say(&mut self, line: &str) {
        if let Err(e) = self.pipe.write_all(line.as_bytes())
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            self.lost = true;
        }
    }

    /// A worker leading group `pgid` started.
    pub fn watch(&mut self, pgid: Pid) {
        self.say(&format!("+{pgid}\n"));
    }

    /// The tree of the worker that led `pgid` is gone.
    pub fn forget(&mut self, pgid: Pid) {
        self.say(&format!("-{pgid}\n"));
    }

    /// The master exits on its own, its workers gone: nothing to kill.
    pub fn dismiss(mut self) {
        self.say("bye\n");
    }
}

/// `arbiterd --guardian ROOT`: wait for the master to go; if it did not say
/// goodbye, kill what it leaves.
pub fn run() -> ExitCode {
    let root = std::env::args_os().nth(2).map(PathBuf::from);
    let root = root.filter(|r| r.as_os_str() != "-");
    // SAFETY: single-threaded here; the parent branch only exits.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(_) => return ExitCode::FAILURE,
    }
    let _ = nix::unistd::setsid();
    for sig in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGWINCH,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigIgn) };
    }
    // SAFETY: fd 3 is the pipe the master placed there, ours alone.
    let pipe = unsafe { File::from(OwnedFd::from_raw_fd(3)) };
    let mut groups: HashSet<i32> = HashSet::new();
    let mut said_bye = false;
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        if line == "bye" {
            said_bye = true;
            break;
        }
        if let Some(p) = line.strip_prefix('+').and_then(|p| p.parse().ok()) {
            groups.insert(p);
        } else if let Some(p) = line.strip_prefix('-').and_then(|p| p.parse::<i32>().ok()) {
            groups.remove(&p);
        }
    }
    if said_bye {
        return ExitCode::SUCCESS;
    }
    for g in &groups {
        let _ = nix::sys::signal::killpg(Pid::from_raw(*g), Signal::SIGKILL);
    }
    if let Some(root) = &root {
        // Born in the master's leaf (when it has one): out of it first, or the
        // kill of the whole cgroup would take us before we removed it.
        if root.join(crate::trees::MASTER_LEAF).exists() {
            crate::trees::vacate(root, &[std::process::id() as i32]);
        } else {
            crate::trees::kill_cgroup(root);
            crate::trees::remove_tree(root);
        }
    }
    ExitCode::SUCCESS
}
