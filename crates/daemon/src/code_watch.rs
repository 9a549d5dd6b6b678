//! `--reload-on-change`: inotify on the code, read in the master's own loop.
//!
//! Directories are watched, never files: an editor saves by writing a new file and
//! renaming it over the old one, which would end a watch on the old file's inode.
//! A path given as a file is watched through its directory, for its name alone.
//! A tree is watched directory by directory (inotify is not recursive), and a
//! directory that appears later is added when its creation is seen.
//!
//! Changes are gathered into a burst: the burst ends when [`QUIET`] passes with no
//! change (a `git checkout` or a formatter run over a tree is one burst), or at
//! [`LONGEST`] after its first change, so that something writing for ever still
//! gets a reload now and then. The master reloads once per burst.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::{debug, warning};

/// A burst of changes ends once this passes without another.
pub const QUIET: Duration = Duration::from_millis(300);
/// ... or this long after its first change, whatever still comes.
pub const LONGEST: Duration = Duration::from_secs(2);

/// Directories never watched, at any depth: what version control, Python, Node
/// and their tools write while the code has not changed.
const IGNORED_DIRS: &[&str] = &[
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".tox",
    ".venv",
    ".idea",
];

/// Reads of the inotify fd per loop turn: a flood (a tree being copied in) is
/// taken over several turns, the fd staying ready, rather than in one long turn.
const READS_PER_TURN: usize = 16;

/// Names that are not code: editors' swap, backup and lock files, compiled
/// Python. `4913` is the file vim creates to test that a directory is writable.
fn ignored_file(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".swo")
        || name.ends_with('~')
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || name == "4913"
        || name.ends_with(".pyc")
        || name.ends_with(".pyo")
        || name == ".DS_Store"
        || name.starts_with("flycheck_")
        || name.contains("___jb_")
}

fn ignored_dir(name: &OsStr) -> bool {
    IGNORED_DIRS.iter().any(|d| OsStr::new(d) == name)
}

/// A watched directory.
struct Dir {
    path: PathBuf,
    /// Its subdirectories are watched too (a tree given, not a file).
    recursive: bool,
    /// A file given: only this name in the directory counts.
    only: Option<OsString>,
}

/// Other paths a burst counts, at most: a tree copied in is "more than" this.
const COUNTED: usize = 10_000;

/// The burst being gathered.
struct Burst {
    first: PathBuf,
    /// The other paths that changed (a file saved is several events).
    others: HashSet<PathBuf>,
    started: Instant,
    last: Instant,
}

/// What the master is told when a burst ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Changed {
    /// The first path that changed.
    pub first: PathBuf,
    /// How many other paths changed in the burst (up to [`COUNTED`]).
    pub others: usize,
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.first.display())?;
        match self.others {
            0 => Ok(()),
            1 => write!(f, " and 1 other path"),
            COUNTED => write!(f, " and more than {COUNTED} other paths"),
            n => write!(f, " and {n} other paths"),
        }
    }
}

pub struct CodeWatch {
    inotify: Inotify,
    /// The paths as configured, to tell whether a reload changed them.
    roots: Vec<PathBuf>,
    dirs: HashMap<WatchDescriptor, Dir>,
    /// Files the master writes itself (pidfile, log, sockets): never a change.
    own_files: Vec<PathBuf>,
    burst: Option<Burst>,
    /// Directories left unwatched since the watch limit was reached: once it is,
    /// no more are tried.
    unwatched: usize,
    /// The limit was logged (once: later directories are only counted).
    limit_said: bool,
}

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR)
    .union(AddWatchFlags::IN_DONT_FOLLOW);

impl CodeWatch {
    /// Watch `roots` (absolute, checked to exist by the config). An inotify
    /// instance that cannot be had is an error for the caller to log; a watch limit
    /// reached is logged here, once, and the rest is watched without it.
    pub fn start(roots: &[PathBuf], own_files: Vec<PathBuf>) -> io::Result<CodeWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut w = CodeWatch {
            inotify,
            roots: roots.to_vec(),
            dirs: HashMap::new(),
            own_files,
            burst: None,
            unwatched: 0,
            limit_said: false,
        };
        for root in roots {
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => w.add_tree(root),
                Ok(_) => {
                    let parent = root.parent().unwrap_or(Path::new("/"));
                    w.add_dir(parent, false, root.file_name().map(OsStr::to_os_string));
                }
                Err(e) => warning!("Reload on change: cannot watch {}: {e}", root.display()),
            }
        }
        w.say_unwatched();
        Ok(w)
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// How many directories are watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Watch `root` and every directory under it that is not ignored. Symbolic
    /// links are not followed: a link back up the tree would never end.
    fn add_tree(&mut self, root: &Path) {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            if !self.add_dir(&dir, true, None) {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) && !ignored_dir(&e.file_name()) {
                    stack.push(e.path());
                }
            }
        }
    }

    /// One watch; false when it could not be added.
    fn add_dir(&mut self, dir: &Path, recursive: bool, only: Option<OsString>) -> bool {
        if self.unwatched > 0 {
            self.unwatched += 1;
            return false;
        }
        match self.inotify.add_watch(dir, DIR_MASK) {
            Ok(wd) => {
                // The same directory twice (a file and its directory both given)
                // is one watch: the wider interest wins.
                let entry = self.dirs.entry(wd).or_insert(Dir {
                    path: dir.to_path_buf(),
                    recursive,
                    only: only.clone(),
                });
                entry.recursive |= recursive;
                if entry.only != only {
                    entry.only = None;
                }
                true
            }
            Err(Errno::ENOSPC) => {
                self.unwatched = 1;
                false
            }
            // Gone or unreadable since it was listed: nothing to watch there.
            Err(e) => {
                debug!("Reload on change: cannot watch {}: {e}", dir.display());
                false
            }
        }
    }

    /// The one line for a watch limit reached, when it was.
    fn say_unwatched(&mut self) {
        if self.unwatched == 0 || self.limit_said {
            return;
        }
        self.limit_said = true;
        // The limit of this user namespace: the same file as the sysctl in the
        // first one, lower in a container that set its own.
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
        let limit = match (
            read("/proc/sys/user/max_inotify_watches"),
            read("/proc/sys/fs/inotify/max_user_watches"),
        ) {
            (Ok(ns), Ok(global)) if ns != global => {
                format!("user.max_inotify_watches = {ns} in this user namespace")
            }
            (_, Ok(global)) => format!("fs.inotify.max_user_watches = {global}"),
            _ => "fs.inotify.max_user_watches".into(),
        };
        warning!(
            "Reload on change: the inotify watch limit is reached ({limit}): directories \
             watched {}, not watched {} or more (their changes are not seen); raise the limit \
             with sysctl or name fewer paths",
            self.dirs.len(),
            self.unwatched
        );
    }

    /// The inotify fd is readable: take in what changed.
    pub fn on_ready(&mut self, now: Instant) {
        for _ in 0..READS_PER_TURN {
            let events = match self.inotify.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                Ok(_) | Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warning!("Reload on change: reading inotify failed: {e}");
                    return;
                }
            };
            for e in events {
                self.on_event(e.wd, e.mask, e.name, now);
            }
        }
    }

    fn on_event(
        &mut self,
        wd: WatchDescriptor,
        mask: AddWatchFlags,
        name: Option<OsString>,
        now: Instant,
    ) {
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            // Events were lost: something changed, nobody knows what.
            let first = self.roots.first().cloned().unwrap_or_default();
            return self.note(first, now);
        }
        if mask.contains(AddWatchFlags::IN_IGNORED) {
            self.dirs.remove(&wd);
            return;
        }
        let Some(dir) = self.dirs.get(&wd) else {
            return;
        };
        let Some(name) = name else {
            // The directory itself was deleted or moved away.
            if mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
                && dir.only.is_none()
            {
                let path = dir.path.clone();
                self.note(path, now);
            }
            return;
        };
        if dir.only.as_ref().is_some_and(|only| *only != name) {
            return;
        }
        let is_dir = mask.contains(AddWatchFlags::IN_ISDIR);
        if (is_dir && ignored_dir(&name)) || (!is_dir && ignored_file(&name)) {
            return;
        }
        let path = dir.path.join(&name);
        if self.own_files.contains(&path) {
            return;
        }
        if is_dir
            && dir.recursive
            && mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        {
            // Files written into it before its watch was added are in the burst
            // anyway: the directory's arrival is a change.
            self.add_tree(&path);
            self.say_unwatched();
        }
        self.note(path, now);
    }

    fn note(&mut self, path: PathBuf, now: Instant) {
        match &mut self.burst {
            Some(b) => {
                if b.first != path && b.others.len() < COUNTED {
                    b.others.insert(path);
                }
                b.last = now;
            }
            None => {
                self.burst = Some(Burst {
                    first: path,
                    others: HashSet::new(),
                    started: now,
                    last: now,
                })
            }
        }
    }

    /// When the burst being gathered ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        let b = self.burst.as_ref()?;
        Some((b.last + QUIET).min(b.started + LONGEST))
    }

    /// The burst, if it has ended by `now`; the next change starts a new one.
    pub fn take_ended(&mut self, now: Instant) -> Option<Changed> {
        if self.next_deadline()? > now {
            return None;
        }
        let b = self.burst.take()?;
        Some(Changed {
            first: b.first,
            others: b.others.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_and_tool_files_are_not_code() {
        for name in [
            ".app.py.swp",
            "app.py~",
            ".#app.py",
            "#app.py#",
            "4913",
            "app.cpython-312.pyc",
            ".DS_Store",
        ] {
            assert!(ignored_file(OsStr::new(name)), "{name}");
        }
        for name in ["app.py", "index.js", "main.go", "config.toml", "Makefile"] {
            assert!(!ignored_file(OsStr::new(name)), "{name}");
        }
        assert!(ignored_dir(OsStr::new(".git")));
        assert!(ignored_dir(OsStr::new("node_modules")));
        assert!(!ignored_dir(OsStr::new("src")));
    }

    #[test]
    fn a_burst_ends_when_quiet_or_at_its_longest() {
        let dir = std::env::temp_dir().join(format!("arbiter-cw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = CodeWatch::start(std::slice::from_ref(&dir), Vec::new()).unwrap();
        let t0 = Instant::now();
        assert_eq!(w.next_deadline(), None);
        w.note(dir.join("a"), t0);
        w.note(dir.join("b"), t0 + Duration::from_millis(100));
        assert_eq!(
            w.next_deadline(),
            Some(t0 + Duration::from_millis(100) + QUIET)
        );
        assert_eq!(w.take_ended(t0 + Duration::from_millis(200)), None);
        // A change every 200 ms keeps it open, but not past LONGEST.
        let mut t = t0;
        while t < t0 + LONGEST {
            t += Duration::from_millis(200);
            w.note(dir.join("c"), t);
        }
        assert_eq!(w.next_deadline(), Some(t0 + LONGEST));
        let changed = w.take_ended(t0 + LONGEST).unwrap();
        assert_eq!(changed.first, dir.join("a"));
        // b and c, each once however often it changed.
        assert_eq!(changed.others, 2);
        assert_eq!(
            changed.to_string(),
            format!("{} and 2 other paths", dir.join("a").display())
        );
        assert_eq!(w.next_deadline(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
