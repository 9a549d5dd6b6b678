//! The master's side of the scoreboard (layout in `arbiter_proto::scoreboard`):
//! the sealed memfd, its mapping, and which entries are free.
//!
//! Entries are the master's to hand out, not slots: during a reload an old and a
//! new worker share a slot number. The count is fixed at start (twice
//! `--max-workers`, room for a full reload overlap); a worker spawned when none is
//! free gets no entry and shows as unknown. Handing out and taking back are O(1),
//! and the region is read only when a status is asked for.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use arbiter_proto::scoreboard::{Region, Report, region_size};

pub struct Scoreboard {
    fd: OwnedFd,
    region: Region,
    /// Free entry indexes; the lowest is handed out first.
    free: Vec<u32>,
    /// Whether each entry is handed out, so a double release cannot put an entry
    /// on the free list twice.
    taken: Vec<bool>,
}

impl Scoreboard {
    /// A scoreboard of `entries` entries, sealed against shrinking and growing.
    pub fn create(entries: u32) -> io::Result<Scoreboard> {
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"arbiter-scoreboard".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = region_size(entries);
        nix::unistd::ftruncate(&fd, len as libc::off_t)?;
        // A worker could otherwise truncate it, and every process mapping it
        // (the master first) would get SIGBUS at its next read.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own; no memory is passed.
        if unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Held for the master's life: out of the range children copy.
        let fd = crate::spawn::keep_from_children(fd);
        let region = Region::map(fd.as_fd(), len)?;
        region.write_header(entries);
        Ok(Scoreboard {
            fd,
            region,
            free: (0..entries).rev().collect(),
            taken: vec![false; entries as usize],
        })
    }

    /// The fd a worker gets (placed in its fd plan, without close-on-exec).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A free entry, zeroed and stamped with `worker_id`; `None` when all are taken.
    pub fn claim(&mut self, worker_id: u64) -> Option<u32> {
        let index = self.free.pop()?;
        self.taken[index as usize] = true;
        self.region.stamp(index, worker_id);
        Some(index)
    }

    /// Entry `index` is free again (its worker is gone, and its tree with it).
    pub fn release(&mut self, index: u32) {
        if let Some(t) = self.taken.get_mut(index as usize)
            && *t
        {
            *t = false;
            self.free.push(index);
        }
    }

    /// What worker `worker_id` says in entry `index`.
    pub fn report(&self, index: u32, worker_id: u64, now_ns: u64) -> Option<Report> {
        self.region.report(index, worker_id, now_ns)
    }

    pub fn free_entries(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_proto::scoreboard::{Entry, monotonic_ns};

    #[test]
    fn entries_are_handed_out_once_and_zeroed_on_reuse() {
        let mut sb = Scoreboard::create(3).unwrap();
        assert_eq!(sb.claim(10), Some(0));
        assert_eq!(sb.claim(11), Some(1));
        assert_eq!(sb.claim(12), Some(2));
        assert_eq!(sb.claim(13), None, "full: the worker goes without");
        let mut e = Entry::open(sb.fd(), 1, 11).unwrap();
        e.set_busy(true);
        e.set_requests(9);
        let r = sb.report(1, 11, monotonic_ns()).unwrap();
        assert!(r.busy && r.requests == 9);

        sb.release(1);
        sb.release(1);
        assert_eq!(sb.free_entries(), 1, "a double release frees once");
        sb.release(7);
        assert_eq!(sb.free_entries(), 1, "an index out of range is ignored");
        assert_eq!(sb.claim(14), Some(1));
        assert_eq!(sb.claim(15), None);
        // The old owner's count and state are gone, even if it still wrote.
        assert_eq!(sb.report(1, 11, monotonic_ns()), None);
        assert_eq!(sb.report(1, 14, monotonic_ns()), None, "not reporting yet");
        let e = Entry::open(sb.fd(), 1, 14).unwrap();
        let r = sb.report(1, 14, monotonic_ns()).unwrap();
        assert!(!r.busy && r.requests == 0);
        drop(e);
    }

    #[test]
    fn sealed_against_shrinking() {
        let sb = Scoreboard::create(2).unwrap();
        assert!(nix::unistd::ftruncate(sb.fd(), 0).is_err());
        assert!(nix::unistd::ftruncate(sb.fd(), 1 << 20).is_err());
        assert!(sb.report(1, 0, monotonic_ns()).is_none());
    }
}
