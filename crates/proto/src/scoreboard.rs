//! The scoreboard: one shared memory region, created by the master, where each
//! worker says whether it is busy or idle and how many requests it has served,
//! with plain memory stores (no syscall, no message to the master).
//!
//! The master creates it once at start (a sealed memfd that cannot shrink, so no
//! process mapping it can be made to fault by another), hands each worker the fd as
//! `ARBITER_SCOREBOARD_FD` and its entry's index as `ARBITER_SCOREBOARD_SLOT`, and
//! reads it only when a status is asked for. The layout, all integers native-endian
//! (little-endian on every platform arbiterd runs on), each aligned to its size:
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | magic `ARSB` ([`MAGIC`]) | master, at creation |
//! | 4 | 4 | layout version ([`VERSION`]) | master, at creation |
//! | 8 | 4 | entry size in bytes ([`ENTRY_SIZE`], 64) | master, at creation |
//! | 12 | 4 | entry count | master, at creation |
//! | 16 | 48 | reserved, zero | |
//! | 64 + 64 i | 64 | entry i | |
//!
//! An entry (one cache line, so workers never share a line):
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 8 | worker id (`ARBITER_WORKER_ID`) the entry belongs to | master, before the fork |
//! | 8 | 4 | state: 0 not reporting, 1 idle, 2 busy | worker |
//! | 12 | 4 | reserved, zero | |
//! | 16 | 8 | requests served | worker |
//! | 24 | 8 | `CLOCK_MONOTONIC` nanoseconds of the last state change | worker |
//! | 32 | 32 | reserved, zero | |
//!
//! A worker changes state by storing the time (24), then the state (8, a release
//! store); it counts a request by storing the new total (16) once the response is
//! handed to the kernel. It is the only writer of its entry, so no read-modify-write
//! is needed. The master zeroes an entry and stamps the worker id before each spawn,
//! so a count or state left by an earlier owner is never read as the new one's.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::worker as contract;

/// `ARSB`, read as a native-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ARSB");
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 64;
pub const ENTRY_SIZE: usize = 64;

pub const HEADER_MAGIC: usize = 0;
pub const HEADER_VERSION: usize = 4;
pub const HEADER_ENTRY_SIZE: usize = 8;
pub const HEADER_ENTRIES: usize = 12;

pub const ENTRY_WORKER_ID: usize = 0;
pub const ENTRY_STATE: usize = 8;
pub const ENTRY_REQUESTS: usize = 16;
pub const ENTRY_CHANGED_NS: usize = 24;

/// The worker has not said anything (or does not use the scoreboard).
pub const STATE_NOT_REPORTING: u32 = 0;
pub const STATE_IDLE: u32 = 1;
pub const STATE_BUSY: u32 = 2;

/// The region's size for `entries` entries.
pub fn region_size(entries: u32) -> usize {
    HEADER_SIZE + entries as usize * ENTRY_SIZE
}

/// Where entry `index` starts.
pub fn entry_offset(index: u32) -> usize {
    HEADER_SIZE + index as usize * ENTRY_SIZE
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock every process of the machine shares
/// (Python's `time.monotonic_ns()`), read through the vDSO.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A shared, writable mapping of a scoreboard fd.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

impl Region {
    /// Map the first `len` bytes of `fd`, shared and writable. The file must be at
    /// least `len` long and must not shrink while mapped (the master's is sealed).
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Region> {
        if len < HEADER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "scoreboard too small",
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint); nothing aliases
        // it yet, and failure is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Region { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "scoreboard offset {off}"
        );
        // SAFETY: in bounds and aligned (checked; the mapping is page-aligned), the
        // mapping lives as long as `self`, and every access to shared memory goes
        // through atomics, so other processes' stores are not data races.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "scoreboard offset {off}"
        );
        // SAFETY: as in `u32_at`.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The master, at creation: the header, for `entries` entries.
    pub fn write_header(&self, entries: u32) {
        assert!(region_size(entries) <= self.len);
        self.u32_at(HEADER_MAGIC).store(MAGIC, Ordering::Relaxed);
        self.u32_at(HEADER_VERSION)
            .store(VERSION, Ordering::Relaxed);
        self.u32_at(HEADER_ENTRY_SIZE)
            .store(ENTRY_SIZE as u32, Ordering::Relaxed);
        self.u32_at(HEADER_ENTRIES)
            .store(entries, Ordering::Release);
    }

    /// The entry count, if the header is one this code understands and the
    /// mapping holds every entry it announces.
    pub fn entries(&self) -> Option<u32> {
        let n = self.u32_at(HEADER_ENTRIES).load(Ordering::Acquire);
        let ok = self.u32_at(HEADER_MAGIC).load(Ordering::Relaxed) == MAGIC
            && self.u32_at(HEADER_VERSION).load(Ordering::Relaxed) == VERSION
            && self.u32_at(HEADER_ENTRY_SIZE).load(Ordering::Relaxed) == ENTRY_SIZE as u32
            && region_size(n) <= self.len;
        ok.then_some(n)
    }

    /// The master, before handing entry `index` to worker `worker_id`: nothing of
    /// an earlier owner is left, and the entry names its new owner.
    pub fn stamp(&self, index: u32, worker_id: u64) {
        let e = entry_offset(index);
        self.u32_at(e + ENTRY_STATE)
            .store(STATE_NOT_REPORTING, Ordering::Relaxed);
        self.u64_at(e + ENTRY_REQUESTS).store(0, Ordering::Relaxed);
        self.u64_at(e + ENTRY_CHANGED_NS)
            .store(0, Ordering::Relaxed);
        self.u64_at(e + ENTRY_WORKER_ID)
            .store(worker_id, Ordering::Release);
    }

    /// What entry `index` says about worker `worker_id`; `None` when it is not
    /// that worker's, or the worker does not report. `now_ns` is
    /// [`monotonic_ns`], read once per snapshot.
    pub fn report(&self, index: u32, worker_id: u64, now_ns: u64) -> Option<Report> {
        let e = entry_offset(index);
        if e + ENTRY_SIZE > self.len
            || self.u64_at(e + ENTRY_WORKER_ID).load(Ordering::Acquire) != worker_id
        {
            return None;
        }
        let busy = match self.u32_at(e + ENTRY_STATE).load(Ordering::Acquire) {
            STATE_IDLE => false,
            STATE_BUSY => true,
            // Not reporting, or garbage: unknown, never idle.
            _ => return None,
        };
        let changed = self.u64_at(e + ENTRY_CHANGED_NS).load(Ordering::Relaxed);
        Some(Report {
            busy,
            requests: self.u64_at(e + ENTRY_REQUESTS).load(Ordering::Relaxed),
            // A worker's clock reading is its word: one in the future, or none, is
            // no duration at all.
            since_secs: (changed != 0 && changed <= now_ns)
                .then(|| (now_ns - changed) as f64 / 1e9),
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the references handed out borrow
        // `self`, so none outlives it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// One worker's line of the scoreboard, as the master reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    pub busy: bool,
    pub requests: u64,
    /// Seconds in the current state, if the worker stamped its changes.
    pub since_secs: Option<f64>,
}

/// The worker's side: its own entry.
pub struct Entry {
    region: Region,
    offset: usize,
    state: u32,
    requests: u64,
}

impl Entry {
    /// The entry named by `ARBITER_SCOREBOARD_FD` and `ARBITER_SCOREBOARD_SLOT`,
    /// checked against `ARBITER_WORKER_ID`, marked idle. `None` when there is none
    /// (the master had no free entry) or it does not check out.
    pub fn from_env() -> Option<Entry> {
        let var = |k: &str| std::env::var(k).ok()?.parse::<u64>().ok();
        let fd = RawFd::try_from(var(contract::ENV_SCOREBOARD_FD)?).ok()?;
        let index = u32::try_from(var(contract::ENV_SCOREBOARD_SLOT)?).ok()?;
        let id = var(contract::ENV_WORKER_ID)?;
        if fd < 0 {
            return None;
        }
        // SAFETY: the master handed this fd over for the worker's life; it is only
        // borrowed for the calls below.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        Entry::open(fd, index, id).ok()
    }

    /// Entry `index` of the scoreboard at `fd`, if it belongs to `worker_id`;
    /// marked idle. The fd may be closed afterwards: the mapping stays.
    pub fn open(fd: BorrowedFd<'_>, index: u32, worker_id: u64) -> io::Result<Entry> {
        let size = nix::sys::stat::fstat(fd)?.st_size;
        let len = usize::try_from(size).map_err(|_| io::Error::other("bad size"))?;
        let region = Region::map(fd, len)?;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let entries = region.entries().ok_or_else(|| bad("not a scoreboard"))?;
        if index >= entries {
            return Err(bad("entry index out of range"));
        }
        let offset = entry_offset(index);
        if region
            .u64_at(offset + ENTRY_WORKER_ID)
            .load(Ordering::Acquire)
            != worker_id
        {
            return Err(bad("the entry belongs to another worker"));
        }
        let mut entry = Entry {
            region,
            offset,
            state: STATE_NOT_REPORTING,
            requests: 0,
        };
        entry.set_busy(false);
        Ok(entry)
    }

    /// Busy (a request in hand) or idle. Only a change is stored.
    pub fn set_busy(&mut self, busy: bool) {
        let state = if busy { STATE_BUSY } else { STATE_IDLE };
        if state == self.state {
            return;
        }
        self.state = state;
        self.region
            .u64_at(self.offset + ENTRY_CHANGED_NS)
            .store(monotonic_ns(), Ordering::Relaxed);
        // Release: a reader that sees the state sees its time too.
        self.region
            .u32_at(self.offset + ENTRY_STATE)
            .store(state, Ordering::Release);
    }

    /// The total of requests served, as the worker counts it.
    pub fn set_requests(&mut self, total: u64) {
        if total != self.requests {
            self.requests = total;
            self.region
                .u64_at(self.offset + ENTRY_REQUESTS)
                .store(total, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn memfd(len: usize) -> OwnedFd {
        // SAFETY: a NUL-terminated name; the returned fd is checked and owned here.
        let fd = unsafe { libc::memfd_create(c"test-scoreboard".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        fd
    }

    #[test]
    fn layout_is_documented_and_aligned() {
        assert_eq!(MAGIC.to_le_bytes(), *b"ARSB");
        assert_eq!(region_size(0), 64);
        assert_eq!(region_size(3), 64 + 3 * 64);
        assert_eq!(entry_offset(0), 64);
        assert_eq!(entry_offset(2), 192);
        for off in [ENTRY_WORKER_ID, ENTRY_REQUESTS, ENTRY_CHANGED_NS] {
            assert!(off.is_multiple_of(8));
            assert!(off + 8 <= ENTRY_SIZE);
        }
        assert!(ENTRY_STATE.is_multiple_of(4));
        assert_eq!(ENTRY_SIZE, 64, "one cache line per worker");
    }

    #[test]
    fn a_worker_reports_through_its_entry_only() {
        let fd = memfd(region_size(4));
        let master = Region::map(fd.as_fd(), region_size(4)).unwrap();
        assert_eq!(master.entries(), None, "no header yet");
        master.write_header(4);
        assert_eq!(master.entries(), Some(4));
        master.stamp(2, 17);
        let now = monotonic_ns();
        assert_eq!(master.report(2, 17, now), None, "not reporting yet");

        assert!(
            Entry::open(fd.as_fd(), 2, 18).is_err(),
            "someone else's entry"
        );
        assert!(Entry::open(fd.as_fd(), 4, 17).is_err(), "out of range");
        let mut e = Entry::open(fd.as_fd(), 2, 17).unwrap();
        let r = master.report(2, 17, monotonic_ns()).unwrap();
        assert!(!r.busy);
        assert_eq!(r.requests, 0);
        assert!(r.since_secs.is_some_and(|s| s >= 0.0));

        e.set_busy(true);
        e.set_requests(5);
        let r = master.report(2, 17, monotonic_ns()).unwrap();
        assert!(r.busy);
        assert_eq!(r.requests, 5);
        // Neighbours are untouched.
        for i in [0, 1, 3] {
            assert_eq!(master.report(i, 0, now), None);
        }
        // Handed to another worker: nothing of the old one shows.
        master.stamp(2, 30);
        assert_eq!(master.report(2, 17, monotonic_ns()), None);
        assert_eq!(master.report(2, 30, monotonic_ns()), None);
    }

    #[test]
    fn garbage_is_unknown() {
        let fd = memfd(region_size(1));
        let r = Region::map(fd.as_fd(), region_size(1)).unwrap();
        r.write_header(1);
        r.stamp(0, 1);
        r.u32_at(entry_offset(0) + ENTRY_STATE)
            .store(7, Ordering::Relaxed);
        assert_eq!(r.report(0, 1, monotonic_ns()), None);
        // A header announcing more entries than the mapping holds is refused.
        r.u32_at(HEADER_ENTRIES).store(2, Ordering::Relaxed);
        assert_eq!(r.entries(), None);
        assert_eq!(r.report(5, 0, 0), None, "out of the mapping");
    }
}
