//! A real systemd as PID 1 of its own pid, mount, uts, ipc, net and cgroup
//! namespaces, with the shipped units and config installed unchanged, and the
//! built `arbiterd` and `arbiterctl` as `/usr/bin/...`. One per test: tests run
//! in parallel, and each machine has its own loopback, so the shipped config's
//! `127.0.0.1:8000` is free in every one.
//!
//! Everything it made goes when it is dropped, even after a failed assertion:
//! KILL of its PID 1 ends every process of the namespace (and with the last of
//! them its mounts), then its cgroup tree and its directory are removed.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{self, Listener, Outcome, Run};

/// Where the units and the config are installed in the machine.
pub const UNIT_DIR: &str = "etc/systemd/system";
pub const SERVICE: &str = "arbiter@web.service";
pub const SOCKET: &str = "arbiter@web.socket";
/// The shipped config's address.
pub const ADDR: &str = "127.0.0.1:8000";

/// Why this machine cannot boot one, if it cannot (then the tier is ignored).
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the systemd tier needs root (namespaces, mounts, cgroups)".into());
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return Some("/lib/systemd/systemd is not installed (apt-get install systemd)".into());
    }
    if cgroup2_here().is_none() {
        return Some("no writable cgroup v2 hierarchy".into());
    }
    None
}

pub struct Machine {
    dir: PathBuf,
    cgroup: PathBuf,
    launcher: Child,
    /// Its PID 1 as the host sees it.
    pid1: i32,
    /// In seconds since the epoch: the machine shares the host's machine and
    /// boot ids, and its /var is an overlay of the host's, so only time tells
    /// its journal entries from the host's.
    booted: u64,
}

/// Files to put in the machine before it boots, by path inside it.
#[derive(Default)]
pub struct Files {
    files: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl Files {
    pub fn with_shipped() -> Files {
        let mut f = Files::default();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for unit in ["arbiter@.service", "arbiter@.socket"] {
            let text = fs::read(repo.join("packaging/systemd").join(unit)).expect("read unit");
            f = f.file(&format!("/{UNIT_DIR}/{unit}"), text, 0o644);
        }
        let config = fs::read(repo.join("packaging/arbiter.toml")).expect("read config");
        f.file("/etc/arbiter/web.toml", config, 0o644)
    }

    pub fn file(mut self, path: &str, content: impl Into<Vec<u8>>, mode: u32) -> Files {
        self.files.push((PathBuf::from(path), content.into(), mode));
        self
    }
}

impl Machine {
    /// Boot a machine with the shipped units, the shipped config and `extra`.
    pub fn boot(extra: Files) -> Machine {
        let dir = tempfile::Builder::new()
            .prefix("arbsd")
            .tempdir_in("/tmp")
            .expect("temp dir")
            .keep();
        let (mount, own) = cgroup2_here().expect("a cgroup v2 hierarchy");
        let cgroup = mount
            .join(own.trim_start_matches('/'))
            .join(dir.file_name().expect("name"));
        fs::create_dir(&cgroup).expect("create the machine's cgroup");
        for (top, bin) in [
            ("usr/bin/arbiterd", harness::ARBITERD),
            ("usr/bin/arbiterctl", harness::ARBITERCTL),
        ] {
            let to = upper(&dir, top);
            fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            if fs::hard_link(bin, &to).is_err() {
                fs::copy(bin, &to).expect("copy binary");
            }
        }
        for (path, content, mode) in &extra.files {
            let to = upper(
                &dir,
                path.strip_prefix("/")
                    .unwrap_or(path)
                    .to_str()
                    .expect("utf-8"),
            );
            fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            fs::write(&to, content).expect("write file");
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&to, fs::Permissions::from_mode(*mode)).expect("chmod");
        }
        let boot = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd/boot.sh");
        // Into the fresh cgroup first: the new cgroup namespace is rooted where
        // the process stands when it unshares.
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            OsStr::new("-c"),
            OsStr::new(
                "echo $$ > \"$1/cgroup.procs\" && exec unshare --pid --fork --mount --uts --ipc --net --cgroup \"$2\" \"$3\"",
            ),
            OsStr::new("sh"),
            cgroup.as_os_str(),
            boot.as_os_str(),
            dir.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("launcher.log")).expect("log"))
        .process_group(0);
        let launcher = match cmd.spawn() {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir(&cgroup);
                let _ = fs::remove_dir_all(&dir);
                panic!("cannot start the machine's launcher: {e}");
            }
        };
        let mut m = Machine {
            dir,
            cgroup,
            launcher,
            pid1: 0,
            booted: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let hostpid = m.dir.join("hostpid");
        let end = Instant::now() + secs(10);
        m.pid1 = loop {
            if let Some(p) = fs::read_to_string(&hostpid)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                break p;
            }
            let exited = m.launcher.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= end {
                panic!(
                    "the machine's PID 1 did not start ({exited:?}): {}{}",
                    fs::read_to_string(m.dir.join("launcher.log")).unwrap_or_default(),
                    fs::read_to_string(m.dir.join("console.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // basic.target reached: journald, the sockets and the slices are up.
        m.wait("systemd to finish booting", secs(60), |m| {
            let o = m.sh("systemctl is-system-running");
            match o.stdout.trim() {
                "running" | "degraded" => Ok(()),
                s => Err(format!("system is {s:?}; {}", o.stderr.trim())),
            }
        });
        m
    }

    fn context(&self) -> String {
        let console = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let journal = self.sh(&format!(
            "journalctl --no-pager -n 300 -o short-precise --since @{}",
            self.booted
        ));
        format!(
            "\n--- console ---\n{console}\n--- journal (last 300) ---\n{}{}",
            journal.stdout, journal.stderr
        )
    }

    /// Retry `probe` until `Ok` or `timeout`; then panic with `what`, the last
    /// observation and the machine's journal.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        let end = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let last = match probe(self) {
                Ok(v) => return v,
                Err(e) => e,
            };
            if Instant::now() >= end {
                panic!(
                    "timed out after {timeout:?} waiting for {what}: {last}{}",
                    if self.pid1 > 0 {
                        self.context()
                    } else {
                        String::new()
                    }
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// `sh -c CMD` inside the machine (every namespace of its PID 1).
    pub fn sh(&self, cmd: &str) -> Outcome {
        self.sh_within(cmd, secs(30))
    }

    pub fn sh_within(&self, cmd: &str, timeout: Duration) -> Outcome {
        Run::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "/bin/sh", "-c", cmd])
            .timeout(timeout)
            .run()
    }

    /// `sh -c CMD`, which must succeed; its stdout.
    pub fn ok(&self, cmd: &str) -> String {
        let o = self.sh_within(cmd, secs(60));
        if o.code() != Some(0) {
            panic!(
                "`{cmd}` failed ({:?}): {}{}{}",
                o.status,
                o.stdout,
                o.stderr,
                self.context()
            );
        }
        o.stdout
    }

    /// A unit's property (`systemctl show -p P --value`).
    pub fn prop(&self, unit: &str, p: &str) -> String {
        self.sh(&format!("systemctl show -p {p} --value {unit}"))
            .stdout
            .trim()
            .to_string()
    }

    /// `MainPID` of the service (in the machine's pid namespace), 0 for none.
    pub fn main_pid(&self) -> i32 {
        self.prop(SERVICE, "MainPID").parse().unwrap_or(0)
    }

    /// `ActiveState/SubState`, as in `active/running`.
    pub fn state(&self, unit: &str) -> String {
        format!(
            "{}/{}",
            self.prop(unit, "ActiveState"),
            self.prop(unit, "SubState")
        )
    }

    pub fn wait_state(&self, unit: &str, want: &str, timeout: Duration) {
        self.wait(&format!("{unit} to be {want}"), timeout, |m| {
            let s = m.state(unit);
            if s == want { Ok(()) } else { Err(s) }
        });
    }

    /// The service's journal, as text.
    pub fn journal(&self) -> String {
        self.sh(&format!("journalctl --no-pager -o cat -u {SERVICE}"))
            .stdout
    }

    /// The processes in the unit's cgroup tree (host pids).
    pub fn unit_pids(&self) -> Vec<i32> {
        let dir = self.unit_cgroup();
        let mut out = Vec::new();
        collect_procs(&dir, &mut out);
        out.sort();
        out
    }

    /// The service's cgroup as the host sees it.
    pub fn unit_cgroup(&self) -> PathBuf {
        self.cgroup
            .join("system.slice/system-arbiter.slice")
            .join(SERVICE)
    }

    /// The state letter of process `pid` of the machine (`S`, `R`, `T`, `Z`),
    /// `None` if there is none.
    pub fn proc_state(&self, pid: i32) -> Option<char> {
        let stat = self.sh(&format!("cat /proc/{pid}/stat 2>/dev/null")).stdout;
        let i = stat.rfind(')')?;
        stat[i + 1..].trim_start().chars().next()
    }

    /// Whether process `pid` of the machine is alive (not a zombie).
    pub fn alive(&self, pid: i32) -> bool {
        self.proc_state(pid).is_some_and(|c| c != 'Z')
    }

    /// Processes whose command line starts with `arbiterd: worker` in the machine.
    pub fn worker_pids(&self) -> Vec<i32> {
        let out = self.sh("for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); case \"$c\" in 'arbiterd: worker'*) echo ${p#/proc/};; esac; done").stdout;
        let mut v: Vec<i32> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        v.sort();
        v
    }

    /// `GET /` from inside the machine's network namespace.
    pub fn get(&self, path: &str) -> io::Result<harness::Response> {
        let addr = Listener::parse(ADDR);
        let p = path.to_string();
        self.in_net(move || harness::http_get(&addr, &p, secs(5)))
    }

    /// Run `f` on a thread that joined the machine's network namespace.
    pub fn in_net<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.net_ns();
        std::thread::spawn(move || {
            join_net(&ns);
            f()
        })
        .join()
        .expect("thread")
    }

    fn net_ns(&self) -> fs::File {
        fs::File::open(format!("/proc/{}/ns/net", self.pid1)).expect("open the net namespace")
    }

    /// Clients looping `GET /` against the shipped address from inside the
    /// machine, until [`Load::stop`].
    pub fn load(&self, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let threads = (0..clients)
            .map(|_| {
                let ns = self.net_ns();
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                std::thread::spawn(move || {
                    join_net(&ns);
                    let addr = Listener::parse(ADDR);
                    while !stop.load(Ordering::Relaxed) {
                        match harness::http_get(&addr, "/", secs(10)) {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut e = errors.lock().expect("lock");
                                if e.len() < 10 {
                                    e.push(match other {
                                        Ok(r) => format!("status {}", r.status),
                                        Err(e) => e.to_string(),
                                    });
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    /// Wait until `count()` of served requests has grown by `n` since now.
    pub fn wait_served(&self, load: &Load, n: u64) {
        let from = load.ok();
        self.wait(&format!("{n} more requests served"), secs(20), |_| {
            if load.ok() >= from + n {
                Ok(())
            } else {
                Err(format!("{} served, {} failed", load.ok(), load.failed()))
            }
        });
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.pid1 > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid1),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The launcher (sh, then unshare) leads its own group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.launcher.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.launcher.wait();
        // The namespace's processes die with its PID 1, but not in the same
        // instant: the cgroups empty as they go.
        let end = Instant::now() + secs(10);
        loop {
            remove_cgroup_tree(&self.cgroup);
            if !self.cgroup.exists() || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stop the clients; (served, failed, the first errors).
    pub fn stop(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        let errors = self.errors.lock().expect("lock").clone();
        (self.ok(), self.failed(), errors)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// This thread joins the network namespace `ns` (setns is per thread).
fn join_net(ns: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace fd; setns touches only the calling thread.
    let r = unsafe { libc::setns(ns.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
}

fn upper(dir: &Path, path_in_machine: &str) -> PathBuf {
    let (top, rest) = path_in_machine
        .split_once('/')
        .expect("a path under /usr, /etc or /var");
    assert!(
        matches!(top, "usr" | "etc" | "var"),
        "files go under /usr, /etc or /var, not {path_in_machine}"
    );
    dir.join(format!("{top}.up")).join(rest)
}

/// The cgroup2 mount point and our own cgroup's path in it, if writable.
fn cgroup2_here() -> Option<(PathBuf, String)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split(' ').nth(4))?
    })?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).ok()?;
    Some((PathBuf::from(mount), path))
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), out);
            }
        }
    }
}

/// rmdir every cgroup under `dir`, deepest first (only empty ones go).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
