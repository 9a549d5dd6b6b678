//! One worker as the master sees it, and its heartbeat file.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::KillMode;
use crate::trees::{READING_FRESH, Tree};

/// Where a worker is in its life. Transitions only go down this list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Forked; not ready yet (exec pending, or waiting for `READY=1`).
    Booting,
    /// Serving.
    Ready { since: Instant },
    /// Serving while its replacement boots in the same slot: retired (as a reload
    /// retires) once that one is ready, so a recycle never costs a ready worker.
    Recycling { since: Instant, why: Recycle },
    /// Asked to stop (TERM or QUIT); KILL at the deadline.
    Stopping { deadline: Instant },
    /// Sent ABRT for a heartbeat timeout; KILL at the deadline.
    Aborted { deadline: Instant },
    /// Sent KILL; waiting to be reaped.
    Killed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Ready { .. } => "ready",
            State::Recycling { .. } => "recycling",
            State::Stopping { .. } => "stopping",
            State::Aborted { .. } => "aborted",
            State::Killed => "killed",
        }
    }

    /// Booting or ready (not on its way out).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            State::Booting | State::Ready { .. } | State::Recycling { .. }
        )
    }
}

/// Why a serving worker is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recycle {
    /// `--max-worker-age`.
    Age,
    /// `--max-worker-rss`.
    Rss,
    /// `--max-requests`, from the scoreboard.
    Requests,
    /// The worker said `ARBITER_RECYCLE=1`.
    Asked,
}

impl Recycle {
    pub const ALL: [Recycle; 4] = [
        Recycle::Age,
        Recycle::Rss,
        Recycle::Requests,
        Recycle::Asked,
    ];

    /// As in logs, status and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Recycle::Age => "max-worker-age",
            Recycle::Rss => "max-worker-rss",
            Recycle::Requests => "max-requests",
            Recycle::Asked => "asked",
        }
    }
}

/// The unlinked file a worker touches to prove it is alive.
///
/// The master reads the file's ctime, which the kernel sets to the current time on
/// any change (fchmod, write, futimens), so workers may use any of those. ctime is a
/// wall-clock reading; it is turned into a monotonic instant with the age clamped to
/// the time since the previous check, so a clock step cannot fake or hide a beat
/// by more than one check interval.
pub struct Heartbeat {
    file: File,
    fingerprint: [i64; 4],
    last_check: Instant,
    /// The last beat seen, on the master's monotonic clock.
    pub last_beat: Option<Instant>,
}

impl Heartbeat {
    /// An unlinked file in `dir`, owned by `owner` if the worker runs as another user.
    pub fn create(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<Heartbeat> {
        let file = tmpfile(dir)?;
        if let Some((uid, gid)) = owner {
            nix::unistd::fchown(file.as_fd(), Some(uid.into()), Some(gid.into()))?;
        }
        let fingerprint = fingerprint(&file)?;
        Ok(Heartbeat {
            file,
            fingerprint,
            last_check: Instant::now(),
            last_beat: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Once the worker has its copy: keep ours out of the range later children
    /// copy (see `spawn::HIGH_FDS`).
    pub fn keep_from_children(&mut self) {
        if let Ok(copy) = self.file.try_clone() {
            let copy = OwnedFd::from(copy);
            let high = crate::spawn::keep_from_children(copy);
            self.file = File::from(high);
        }
    }

    /// Look at the file; if it changed since the last look, record the beat.
    /// Returns true when a new beat was seen.
    pub fn check(&mut self, now: Instant) -> bool {
        let Ok(fp) = fingerprint(&self.file) else {
            return false;
        };
        let since_check = now.saturating_duration_since(self.last_check);
        self.last_check = now;
        if fp == self.fingerprint {
            return false;
        }
        self.fingerprint = fp;
        if fp[3] > MAX_HEARTBEAT_FILE {
            self.shrink();
        }
        let ctime = SystemTime::UNIX_EPOCH
            + Duration::new(fp[0].max(0) as u64, fp[1].clamp(0, 999_999_999) as u32);
        let age = SystemTime::now()
            .duration_since(ctime)
            .unwrap_or_default()
            .min(since_check);
        self.record(now.checked_sub(age).unwrap_or(now));
        true
    }

    /// A worker that beats by writing into the file would grow it for ever, in
    /// memory (tmpfs): empty it, offset included (the worker shares it), and take
    /// the result as the new fingerprint so our own change is not a beat.
    fn shrink(&mut self) {
        if self.file.set_len(0).is_ok() {
            let _ = nix::unistd::lseek(&self.file, 0, nix::unistd::Whence::SeekSet);
            if let Ok(fp) = fingerprint(&self.file) {
                self.fingerprint = fp;
            }
        }
    }

    /// A beat that arrived another way (`WATCHDOG=1`).
    pub fn record(&mut self, at: Instant) {
        if self.last_beat.is_none_or(|b| at > b) {
            self.last_beat = Some(at);
        }
    }

    pub fn last_check(&self) -> Instant {
        self.last_check
    }
}

/// Past this size, a heartbeat file is emptied at the next look.
const MAX_HEARTBEAT_FILE: i64 = 64 * 1024;

fn fingerprint(file: &File) -> io::Result<[i64; 4]> {
    let st = nix::sys::stat::fstat(file.as_fd())?;
    Ok([st.st_ctime, st.st_ctime_nsec, st.st_mtime, st.st_size])
}

fn tmpfile(dir: &Path) -> io::Result<File> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
    match open(dir, flags, Mode::from_bits_truncate(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        // Filesystems without O_TMPFILE: create a unique name and unlink it at once.
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EISDIR) => {
            let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
            for attempt in 0..16u32 {
                let path = dir.join(format!(
                    ".arbiter-hb-{}-{attempt}-{}",
                    std::process::id(),
                    nanos()
                ));
                match open(
                    &path,
                    OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                ) {
                    Ok(fd) => {
                        let _ = std::fs::remove_file(&path);
                        return Ok(File::from(fd));
                    }
                    Err(e) => last = e.into(),
                }
            }
            Err(last)
        }
        Err(e) => Err(e.into()),
    }
}

fn nanos() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
}

/// The directory for heartbeat files: a tmpfs where there is one, so a beat never
/// waits on a disk (gunicorn's users hit that with /tmp on slow disks).
pub fn heartbeat_dir() -> std::path::PathBuf {
    for candidate in ["/dev/shm", "/run/shm"] {
        let p = Path::new(candidate);
        if p.is_dir() && nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok() {
            return p.to_path_buf();
        }
    }
    std::env::temp_dir()
}

pub struct Worker {
    /// The spawn counter (gunicorn's age): unique for the master's life.
    pub id: u64,
    pub slot: usize,
    pub pid: Pid,
    pub generation: u64,
    pub state: State,
    pub started: Instant,
    pub started_wall: SystemTime,
    /// Until the exec succeeded or failed: the read end of the exec-status pipe.
    pub exec_status: Option<OwnedFd>,
    pub heartbeat: Heartbeat,
    /// The last signal the master sent, so a death by it is not reported as a mystery.
    pub sent: Option<Signal>,
    /// The worker's own words, from `STATUS=`.
    pub status_text: Option<String>,
    /// When it became ready (it may be stopping now).
    pub ready_at: Option<Instant>,
    /// The master asked it to stop (retired, or shutting down): its death is expected.
    pub retiring: bool,
    /// `EXTEND_TIMEOUT_USEC`: no boot or heartbeat timeout before this.
    pub extended_until: Option<Instant>,
    /// Drawn at spawn: its `--max-requests` jitter is this modulo (jitter + 1), so
    /// a reload's new jitter applies without a new draw.
    pub jitter_draw: u64,
    /// `/proc/PID/statm`, held open: `status` at 1024 workers would otherwise spend
    /// most of its time walking /proc paths (one pread each instead of five calls).
    pub statm: Option<std::fs::File>,
    /// Its process tree (group, and cgroup where there is one).
    pub tree: Tree,
    /// Who gets its signals.
    pub kill_mode: KillMode,
    /// Its scoreboard entry, if one was free when it was spawned.
    pub board: Option<u32>,
    /// The CPU readings `status` reported, which its CPU% is measured from.
    pub cpu_samples: std::cell::Cell<CpuSamples>,
    /// The last RSS reading for `status` and when it was taken: reused up to
    /// [`READING_FRESH`] old, as the tree's CPU reading is (a `statm` read is
    /// about 2 us, 9 ms of a status at 4096 workers).
    pub rss_read: std::cell::Cell<Option<(Instant, Option<u64>)>>,
}

/// Two CPU readings (when, CPU seconds) a worker's CPU% is measured between, so
/// that the master needs no timer of its own: the percentage is over the time
/// since an earlier status asked.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSamples {
    /// The reading the percentage is measured from; `None`: from the spawn.
    base: Option<(Instant, f64)>,
    /// The latest reading kept, the next base.
    last: Option<(Instant, f64)>,
}

/// The shortest interval a CPU% is measured over once there is an earlier
/// reading: `status` and `metrics` asked back to back (or `watch -n 0.2`) would
/// otherwise measure a few milliseconds, mostly noise.
const CPU_INTERVAL_MIN: Duration = Duration::from_secs(1);

impl CpuSamples {
    /// Take the reading `(at, secs)` of a worker spawned at `started`: the CPU
    /// percentage (100 = one core) since the base, and move the base on.
    pub fn take(&mut self, started: Instant, at: Instant, secs: f64) -> Option<f64> {
        let old_enough = |r: Option<(Instant, f64)>| {
            r.is_none_or(|(t, _)| at.saturating_duration_since(t) >= CPU_INTERVAL_MIN)
        };
        if let Some(last) = self.last
            && old_enough(Some(last))
        {
            self.base = Some(last);
        }
        if old_enough(self.last) {
            self.last = Some((at, secs));
        }
        let (from, base_secs) = self.base.unwrap_or((started, 0.0));
        let dt = at.saturating_duration_since(from).as_secs_f64();
        (dt > 0.0).then(|| (secs - base_secs).max(0.0) / dt * 100.0)
    }
}

impl Worker {
    /// CPU seconds so far and the CPU% since the previous status (see
    /// [`CpuSamples`]).
    pub fn cpu(&self, now: Instant) -> (Option<f64>, Option<f64>) {
        let Some((at, secs)) = self.tree.cpu_reading(now) else {
            return (None, None);
        };
        let mut samples = self.cpu_samples.get();
        let percent = samples.take(self.started, at, secs);
        self.cpu_samples.set(samples);
        (Some(secs), percent)
    }

    /// Resident set size for `status`: the last reading if it is under
    /// [`READING_FRESH`] old, else read now.
    pub fn rss_reading(&self, now: Instant) -> Option<u64> {
        match self.rss_read.get() {
            Some((at, rss)) if now.saturating_duration_since(at) < READING_FRESH => rss,
            _ => self.read_rss(now),
        }
    }

    fn read_rss(&self, now: Instant) -> Option<u64> {
        let rss = self.rss_bytes();
        self.rss_read.set(Some((now, rss)));
        rss
    }

    /// Whether a reading was taken at `t` or before (or never).
    pub fn read_by(&self, t: Instant) -> bool {
        self.tree.cpu_read_by(t) || self.rss_read.get().is_none_or(|(at, _)| at <= t)
    }

    /// When the older of its readings was taken, once a status at `now` has read
    /// those that are stale.
    pub fn readings_taken(&self, now: Instant) -> Instant {
        let rss = match self.rss_read.get() {
            Some((at, _)) if now.saturating_duration_since(at) < READING_FRESH => at,
            _ => now,
        };
        rss.min(self.tree.cpu_taken(now))
    }

    /// Read the CPU and the RSS now, however recent the last readings.
    pub fn take_readings(&self, now: Instant) {
        self.tree.read_cpu(now);
        self.read_rss(now);
    }

    /// Resident set size, in bytes (None once the process is gone).
    pub fn rss_bytes(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = match &self.statm {
            Some(f) => nix::sys::uio::pread(f, &mut buf, 0).ok()?,
            None => {
                use std::io::Read;
                let mut f = std::fs::File::open(format!("/proc/{}/statm", self.pid)).ok()?;
                f.read(&mut buf).ok()?
            }
        };
        // "size resident shared ...", in pages.
        let pages: u64 = std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(pages * page.max(0) as u64)
    }

    /// Signal the worker as `--kill-mode` says: its main process only (`mixed`,
    /// `process`), or its whole tree (`group`, and KILL in `mixed`).
    pub fn signal(&mut self, sig: Signal) -> nix::Result<()> {
        self.sent = Some(sig);
        match (self.kill_mode, sig) {
            (KillMode::Group, _) | (KillMode::Mixed, Signal::SIGKILL) => self.tree.signal_all(sig),
            _ => self.tree.signal_main(sig),
        }
    }

    /// Serving: ready, or ready and being recycled.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. } | State::Recycling { .. })
    }

    pub fn is_recycling(&self) -> bool {
        matches!(self.state, State::Recycling { .. })
    }

    /// How many requests it may count before it is recycled, under `max` and
    /// `jitter` (`--max-requests`, `--max-requests-jitter`).
    pub fn request_limit(&self, max: Option<u64>, jitter: u64) -> Option<u64> {
        let spread = match jitter.checked_add(1) {
            Some(n) => self.jitter_draw % n,
            None => self.jitter_draw,
        };
        max.map(|m| m.saturating_add(spread))
    }

    pub fn mark_ready(&mut self, now: Instant) {
        if self.state == State::Booting {
            self.state = State::Ready { since: now };
            self.ready_at = Some(now);
        }
    }

    /// Ask it to stop (TERM or QUIT) and KILL it at `deadline` if it has not.
    pub fn stop(&mut self, sig: Signal, deadline: Instant) {
        self.retiring = true;
        let _ = self.signal(sig);
        self.state = State::Stopping { deadline };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_is_over_at_least_a_second_once_there_is_a_base() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = CpuSamples::default();
        // First: since the spawn. 0.5 s of CPU in 2 s.
        assert_eq!(s.take(t0, at(2000), 0.5), Some(25.0));
        // 100 ms later: too short to be a base of its own, still from the spawn.
        assert_eq!(s.take(t0, at(2100), 0.6), Some(0.6 / 2.1 * 100.0));
        // A second after the first reading: measured from it.
        assert_eq!(s.take(t0, at(3000), 1.5), Some(100.0));
        assert_eq!(s.take(t0, at(3500), 1.5), Some(1.0 / 1.5 * 100.0));
        // Idle since.
        assert_eq!(s.take(t0, at(4000), 1.5), Some(0.0));
        // A reading at the spawn itself measures nothing.
        assert_eq!(CpuSamples::default().take(t0, t0, 0.0), None);
    }
}
