//! Worker process trees: what belongs to a worker, signalling it, and making sure
//! nothing of it outlives the worker or the master.
//!
//! Where a cgroup v2 hierarchy is writable (as root on most machines, under
//! systemd with `Delegate=yes`, in a container with its own cgroup namespace),
//! each worker gets a cgroup of its own under `arbiter.NAME.PIDNS.PID` beside the
//! master, joined by the child before it execs: then everything the worker ever
//! starts is in it, setsid'd and double-forked daemons included, the tree is
//! killed at once with `cgroup.kill`, and its CPU time is the tree's (`cpu.stat`).
//! Elsewhere a worker's tree is its process group, which a process can leave.
//!
//! Below a cgroup that is not the hierarchy's root (a systemd unit's delegated
//! cgroup, a login session), the master first moves itself into a leaf,
//! `arbiter.NAME.PIDNS.PID/master`, and its workers' cgroups are that leaf's
//! siblings: cgroup v2's "no internal processes" rule lets only a cgroup without
//! processes of its own hand controllers (memory, cpu, pids) to its children, so
//! the delegated cgroup and `arbiter.*` stay free of processes. At exit the
//! master goes back where it came from and removes `arbiter.*`. A new master of
//! an upgrade is born in its predecessor's leaf and takes the same home.
//!
//! The [`crate::guardian`] kills what is left if the master itself is killed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::CgroupMode;
use crate::{info, warning};

/// The leaf of `arbiter.NAME.PIDNS.PID` that the master (and its guardian) live in.
pub const MASTER_LEAF: &str = "master";

/// How workers' trees are contained.
pub enum Containment {
    /// Each worker in a cgroup of its own under `root`; with `in_leaf`, the
    /// master in `root/master` (else it stays in `root`'s parent, the
    /// hierarchy's root, where the rule does not apply). `cpu_stat` is the
    /// root's, held open (see [`Containment::flush_cpu`]).
    Cgroup {
        root: PathBuf,
        in_leaf: bool,
        cpu_stat: Option<File>,
    },
    /// Each worker leads a process group; descendants that leave it escape.
    ProcessGroups,
}

/// One worker's tree.
pub struct Tree {
    /// The worker's main process, which leads the group.
    pub pid: Pid,
    /// Its cgroup, when there is one.
    pub cgroup: Option<PathBuf>,
    /// `cpu.stat` of the cgroup, held open (a status at thousands of workers
    /// would otherwise open a file per worker).
    cpu_stat: Option<File>,
    /// Without a cgroup, `/proc/PID/stat` of the main process, held open for the
    /// same reason: its CPU time and its reaped children's are all the kernel
    /// keeps of a process group.
    proc_stat: Option<File>,
    /// The last reading and when it was taken: reading `cpu.stat` makes the
    /// kernel gather per-CPU counters, about 5 µs a worker, so a status at
    /// thousands of workers reuses readings up to [`READING_FRESH`] old.
    cpu_read: std::cell::Cell<Option<(std::time::Instant, f64)>>,
}

/// How old a reading of a worker (its tree's CPU, its RSS) in `status` may be.
pub const READING_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// A worker's cgroup made ready before its spawn: the child writes itself into
/// `procs`.
pub struct Prepared {
    pub dir: PathBuf,
    /// The directory, open: clone3 makes the child in it.
    pub dir_fd: OwnedFd,
    /// Its `cgroup.procs`, where a kernel without CLONE_INTO_CGROUP lets the child
    /// write itself.
    pub procs: OwnedFd,
}

impl Containment {
    /// A cgroup of our own for the workers if the v2 hierarchy lets us, else
    /// process groups. Leftovers of a master of the same name that was killed
    /// (its cgroup still there, its pid gone) are killed and removed first.
    pub fn set_up(name: &str, master_pid: Pid, mode: CgroupMode) -> Containment {
        let Some(own) = own_cgroup_dir().filter(|_| mode == CgroupMode::Auto) else {
            return Containment::ProcessGroups;
        };
        let parent = home_of(&own.dir).to_path_buf();
        // The pid namespace is in the name: a pid means something only there, and
        // masters in other namespaces (containers) may share the hierarchy.
        let prefix = format!("arbiter.{}.{}.", sanitize(name), pid_namespace());
        clean_predecessors(&parent, &prefix);
        let root = parent.join(format!("{prefix}{master_pid}"));
        match std::fs::create_dir(&root) {
            Ok(()) if root.join("cgroup.kill").exists() => {}
            Ok(()) => {
                // A kernel before 5.14: no cgroup.kill, so no kill of a whole tree
                // at once; process groups it is.
                let _ = std::fs::remove_dir(&root);
                return Containment::ProcessGroups;
            }
            Err(_) => return Containment::ProcessGroups,
        }
        if own.is_root {
            return Containment::Cgroup {
                cpu_stat: File::open(root.join("cpu.stat")).ok(),
                root,
                in_leaf: false,
            };
        }
        let leaf = root.join(MASTER_LEAF);
        let moved = std::fs::create_dir(&leaf)
            .and_then(|()| std::fs::write(leaf.join("cgroup.procs"), b"0"));
        match moved {
            Ok(()) => Containment::Cgroup {
                cpu_stat: File::open(root.join("cpu.stat")).ok(),
                root,
                in_leaf: true,
            },
            Err(e) => {
                warning!(
                    "Cannot move the master into {}: {e}; worker trees are process groups",
                    leaf.display()
                );
                remove_tree(&root);
                Containment::ProcessGroups
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup { root, .. } => format!("cgroup v2 ({})", root.display()),
            Containment::ProcessGroups => "process groups".to_string(),
        }
    }

    pub fn cgroup_root(&self) -> Option<&Path> {
        match self {
            Containment::Cgroup { root, .. } => Some(root),
            Containment::ProcessGroups => None,
        }
    }

    /// Make the cgroup of worker `id`, if cgroups are in use.
    pub fn prepare(&self, id: u64) -> io::Result<Option<Prepared>> {
        let Containment::Cgroup { root, .. } = self else {
            return Ok(None);
        };
        let dir = root.join(format!("w{id}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        let dir_fd = nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Some(Prepared {
            dir,
            dir_fd,
            procs: procs.into(),
        }))
    }

    /// Before reading many workers' `cpu.stat`: reading a cgroup's first folds
    /// its pending per-CPU counts in, which unlinks it from its parent's list of
    /// children with pending counts, a singly linked list the kernel walks to
    /// find it. Worker by worker that is a walk over up to all the siblings each
    /// time (at 4096 workers, a status spent 50 to 200 ms there); reading the
    /// root's first folds in the whole tree in one pass, and each worker's read
    /// then has nothing to unlink.
    pub fn flush_cpu(&self) {
        if let Containment::Cgroup {
            cpu_stat: Some(f), ..
        } = self
        {
            let _ = read_cgroup_cpu(f);
        }
    }

    /// The master exits: back to where it came from, with whatever shares its
    /// leaf (the guardian), then our cgroups go (empty by now, or killed).
    pub fn tear_down(&self) {
        match self {
            Containment::Cgroup {
                root,
                in_leaf: true,
                ..
            } => {
                let movers = cgroup_pids(&root.join(MASTER_LEAF));
                vacate(root, &movers);
            }
            Containment::Cgroup { root, .. } => {
                kill_cgroup(root);
                remove_tree(root);
            }
            Containment::ProcessGroups => {}
        }
    }
}

impl Tree {
    pub fn new(pid: Pid, cgroup: Option<PathBuf>) -> Tree {
        let cpu_stat = cgroup.as_ref().and_then(|d| {
            File::open(d.join("cpu.stat"))
                .ok()
                .map(|f| File::from(crate::spawn::keep_from_children(f.into())))
        });
        Tree {
            pid,
            cgroup,
            cpu_stat,
            proc_stat: None,
            cpu_read: std::cell::Cell::new(None),
        }
    }

    /// The tree of a worker just forked, not reaped yet: its pid is its own, so
    /// `/proc/PID/stat` can be held for CPU time where there is no cgroup (a
    /// reaped pid may be someone else's by now, hence not in [`Tree::new`]).
    pub fn of_live_worker(pid: Pid, cgroup: Option<PathBuf>) -> Tree {
        let mut t = Tree::new(pid, cgroup);
        if t.cpu_stat.is_none() {
            t.proc_stat = File::open(format!("/proc/{pid}/stat"))
                .ok()
                .map(|f| File::from(crate::spawn::keep_from_children(f.into())));
        }
        t
    }

    /// Signal the main process only.
    pub fn signal_main(&self, sig: Signal) -> nix::Result<()> {
        nix::sys::signal::kill(self.pid, sig)
    }

    /// Signal the whole tree: its cgroup (KILL at once through `cgroup.kill`),
    /// and its process group.
    pub fn signal_all(&self, sig: Signal) -> nix::Result<()> {
        if let Some(dir) = &self.cgroup {
            if sig == Signal::SIGKILL {
                kill_cgroup(dir);
            } else {
                for pid in cgroup_pids(dir) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                }
            }
        }
        match nix::sys::signal::killpg(self.pid, sig) {
            // The group may not exist yet if the child has not run setpgid; the
            // parent sets it too, so this is only a dead worker not yet reaped.
            Err(nix::errno::Errno::ESRCH) => nix::sys::signal::kill(self.pid, sig).or(Ok(())),
            other => other,
        }
    }

    /// What is left of the tree (its main process aside, once reaped): pids with
    /// their command names, for the log.
    pub fn remaining(&self) -> Vec<(i32, String)> {
        let pids = match &self.cgroup {
            Some(dir) => cgroup_pids(dir),
            None if nix::sys::signal::killpg(self.pid, None).is_ok() => group_pids(self.pid),
            None => Vec::new(),
        };
        pids.into_iter()
            .filter(|&p| p != self.pid.as_raw())
            .map(|p| (p, comm(p)))
            .collect()
    }

    /// Whether anything of the tree still runs (cheap: no /proc walk).
    pub fn is_populated(&self) -> bool {
        match &self.cgroup {
            Some(dir) => std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|s| s.lines().any(|l| l == "populated 1"))
                .unwrap_or(false),
            None => nix::sys::signal::killpg(self.pid, None).is_ok(),
        }
    }

    /// CPU seconds used so far and when that was read (at most [`READING_FRESH`]
    /// ago): the whole tree with a cgroup, else the main process and the
    /// children it reaped.
    pub fn cpu_reading(&self, now: std::time::Instant) -> Option<(std::time::Instant, f64)> {
        if let Some((at, secs)) = self.cpu_read.get()
            && now.saturating_duration_since(at) < READING_FRESH
        {
            return Some((at, secs));
        }
        self.read_cpu(now)
    }

    /// Whether [`Tree::cpu_reading`] at `now` would read the kernel's figure.
    pub fn cpu_stale(&self, now: std::time::Instant) -> bool {
        (self.cpu_stat.is_some() || self.proc_stat.is_some())
            && self
                .cpu_read
                .get()
                .is_none_or(|(at, _)| now.saturating_duration_since(at) >= READING_FRESH)
    }

    /// Whether the last CPU reading was taken at `t` or before (or none was).
    pub fn cpu_read_by(&self, t: std::time::Instant) -> bool {
        self.cpu_read.get().is_none_or(|(at, _)| at <= t)
    }

    /// When the CPU reading a status at `now` would use was taken (`now` if it
    /// would read it, or has nothing to read).
    pub fn cpu_taken(&self, now: std::time::Instant) -> std::time::Instant {
        match self.cpu_read.get() {
            Some((at, _)) if now.saturating_duration_since(at) < READING_FRESH => at,
            _ => now,
        }
    }

    /// Read the CPU seconds now, however recent the last reading.
    pub fn read_cpu(&self, now: std::time::Instant) -> Option<(std::time::Instant, f64)> {
        let secs = match &self.cpu_stat {
            Some(f) => read_cgroup_cpu(f)?,
            None => read_proc_cpu(self.proc_stat.as_ref()?)?,
        };
        self.cpu_read.set(Some((now, secs)));
        Some((now, secs))
    }

    /// The tree is gone: remove its cgroup.
    pub fn remove(&self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `usage_usec` of a cgroup's `cpu.stat`, in seconds.
fn read_cgroup_cpu(f: &File) -> Option<f64> {
    let mut buf = [0u8; 512];
    let n = nix::sys::uio::pread(f, &mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    Some(usec as f64 / 1e6)
}

/// utime + stime + cutime + cstime of a `/proc/PID/stat`, in seconds.
fn read_proc_cpu(f: &File) -> Option<f64> {
    let mut buf = [0u8; 1024];
    let n = nix::sys::uio::pread(f, &mut buf, 0).ok()?;
    Some(parse_proc_cpu_ticks(std::str::from_utf8(&buf[..n]).ok()?)? as f64 / clock_ticks())
}

/// Fields 14 to 17 of a `/proc/PID/stat` line, summed, in clock ticks. The command
/// name before them may hold spaces and parentheses: fields count from the last `)`.
fn parse_proc_cpu_ticks(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    // After the `)`: field 3 (state) is the first, so 14..=17 are 11..=14 here.
    let ticks: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (ticks.len() == 4).then(|| ticks.iter().sum())
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Move `movers` (pids in `root/master`) back to `root`'s parent, then kill and
/// remove `root`. Where the parent refuses them (it hands controllers to its
/// children, so it may hold no process), only the workers' cgroups go, and the
/// leaf stays until its processes are gone (systemd removes a unit's cgroups
/// when it stops; the next master of the name removes a dead one's).
pub fn vacate(root: &Path, movers: &[i32]) {
    let Some(home) = root.parent() else { return };
    let refused = movers.iter().any(|pid| {
        match std::fs::write(home.join("cgroup.procs"), pid.to_string()) {
            Ok(()) => false,
            // Gone meanwhile.
            Err(e) => e.raw_os_error() != Some(nix::libc::ESRCH),
        }
    });
    if !refused {
        kill_cgroup(root);
        remove_tree(root);
        return;
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != MASTER_LEAF {
                kill_cgroup(&e.path());
                remove_tree(&e.path());
            }
        }
    }
}

/// Where a master whose own cgroup is `own` puts `arbiter.*`: beside itself, or,
/// born in a predecessor's leaf (`arbiter.NAME.PIDNS.PID/master`, an upgrade),
/// where that one put it.
fn home_of(own: &Path) -> &Path {
    let in_leaf = own.file_name().is_some_and(|n| n == MASTER_LEAF)
        && own
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("arbiter."));
    match own.parent().and_then(Path::parent) {
        Some(home) if in_leaf => home,
        _ => own,
    }
}

struct OwnCgroup {
    dir: PathBuf,
    /// The root of the hierarchy (as our cgroup namespace shows it).
    is_root: bool,
}

/// Our own cgroup v2 directory, if the hierarchy is mounted and writable.
fn own_cgroup_dir() -> Option<OwnCgroup> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER`
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split(' ').nth(4))?
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK)
        .ok()
        .map(|()| OwnCgroup {
            dir,
            is_root: path.trim() == "/",
        })
}

/// The inode of our pid namespace (`/proc/self/ns/pid`), 0 if unknown.
fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// Cgroups `PREFIX` + pid beside ours (`arbiter.NAME.PIDNS.PID`) whose master is
/// gone: a master of this name, in this pid namespace, was killed with its
/// guardian. Whatever still runs in them goes.
fn clean_predecessors(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // Alive, whatever it runs now: a reused pid costs a leftover cgroup, a
        // wrong guess would kill a live master's workers.
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() {
            continue;
        }
        let dir = e.path();
        let left: Vec<String> = walk_pids(&dir)
            .into_iter()
            .map(|p| format!("{p} ({})", comm(p)))
            .collect();
        if left.is_empty() {
            info!(
                "Removing the cgroup of a master of this name that is gone: {}",
                dir.display()
            );
        } else {
            warning!(
                "A master of this name (pid {pid}) was killed and left processes running: {}; killing them",
                left.join(", ")
            );
        }
        kill_cgroup(&dir);
        remove_tree(&dir);
    }
}

/// Write `1` to `cgroup.kill`: every process in the cgroup and below gets KILL.
pub fn kill_cgroup(dir: &Path) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
    {
        let _ = f.write_all(b"1");
    }
}

/// Remove `dir` and the cgroups below it, waiting (briefly) for killed processes
/// to leave them.
pub fn remove_tree(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                warning!("Cannot remove the cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut s = String::new();
    if File::open(dir.join("cgroup.procs"))
        .and_then(|mut f| f.read_to_string(&mut s))
        .is_err()
    {
        return Vec::new();
    }
    s.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn walk_pids(dir: &Path) -> Vec<i32> {
    let mut out = cgroup_pids(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_pids(&e.path()));
            }
        }
    }
    out
}

/// Members of process group `pgid`, from /proc (only when the group is known to
/// be non-empty: this walks every process).
fn group_pids(pgid: Pid) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1;
                    after.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid.as_raw())
        })
        .collect()
}

/// A process's command name, for the log.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Instance names may hold anything a file name cannot.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_ticks() {
        // utime 100, stime 20, cutime 3, cstime 4; a command name with `) (` in it.
        let line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194304 300 0 0 0 100 20 3 4 20 0 1 0 \
                    12345 1000000 200 18446744073709551615";
        assert_eq!(parse_proc_cpu_ticks(line), Some(127));
        assert_eq!(parse_proc_cpu_ticks("4242 (a) S 1 2"), None);
        assert_eq!(parse_proc_cpu_ticks("no parenthesis"), None);
        // Our own, read for real.
        let f = File::open("/proc/self/stat").unwrap();
        assert!(read_proc_cpu(&f).is_some_and(|s| s >= 0.0));
    }
}
