//! Someone watching the pool: `arbiterctl top` asks for a status every second,
//! and each status shows every worker's CPU and RSS from readings at most a
//! second old (`trees::READING_FRESH`). Taken at the request, those are a
//! `cpu.stat` (or `/proc/PID/stat`) and a `/proc/PID/statm` read per worker,
//! about 20 ms of a status at 4096 workers; so while statuses come that often,
//! the pool takes them itself between requests, a slice at a time, before they
//! go stale, and the next status finds them taken. A status still reads any
//! reading a second old itself, so no figure is older than that; a single
//! status, or scrapes further apart than [`WATCH`], start nothing, and an idle
//! master does not wake. Heartbeats are still looked at by each status.

use std::time::{Duration, Instant};

use super::Pool;

/// Two statuses at most this far apart mean someone is watching, and the
/// readings are kept fresh for this long after the latest.
const WATCH: Duration = Duration::from_millis(1500);
/// A round of readings starts this long after the previous one: its readings
/// are then all taken before the previous round's turn a second old.
const ROUND_EVERY: Duration = Duration::from_millis(800);
/// Readings per slice, and the pause between slices, so that a round at
/// thousands of workers holds the loop a millisecond or two at a time.
const SLICE: usize = 512;
const SLICE_GAP: Duration = Duration::from_millis(5);

#[derive(Default)]
pub struct Watch {
    /// The latest status.
    last_status: Option<Instant>,
    /// Readings are kept fresh until then.
    until: Option<Instant>,
    /// When the latest round began.
    round_started: Option<Instant>,
    /// The round under way: the index of the next worker to read.
    cursor: Option<usize>,
    /// When the next slice is due.
    next: Option<Instant>,
}

impl Watch {
    /// A status is being taken at `now`.
    fn on_status(&mut self, now: Instant) {
        let watching = self
            .last_status
            .is_some_and(|t| now.saturating_duration_since(t) <= WATCH);
        self.last_status = Some(now);
        if !watching {
            return;
        }
        self.until = Some(now + WATCH);
        if self.next.is_none() {
            // Keep the rounds' pace; after a pause, this status takes the
            // readings and the first round follows them.
            self.next = Some(match self.round_started {
                Some(r) if r + ROUND_EVERY >= now => r + ROUND_EVERY,
                _ => now + ROUND_EVERY,
            });
        }
    }

    /// A slice was taken at `now`; `done`: it ended the round.
    fn after_slice(&mut self, now: Instant, done: bool) {
        if !done {
            self.next = Some(now + SLICE_GAP);
            return;
        }
        self.cursor = None;
        let next = self.round_started.map(|r| r + ROUND_EVERY);
        self.next = next.filter(|&t| self.until.is_some_and(|u| t <= u));
        if self.next.is_none() {
            self.until = None;
        }
    }
}

impl Pool {
    /// A status (or a metrics scrape) is about to read the workers' figures.
    pub fn before_snapshot(&mut self, now: Instant) {
        self.watch.on_status(now);
        if self.workers.iter().any(|w| w.tree.cpu_stale(now)) {
            self.containment.flush_cpu();
        }
    }

    /// When the next slice of readings is due, while someone watches.
    pub(super) fn watch_due(&self) -> Option<Instant> {
        self.watch.next
    }

    /// Take the slice of readings that is due.
    pub(super) fn check_watch(&mut self, now: Instant) {
        if self.watch.next.is_none_or(|t| now < t) {
            return;
        }
        let start = match self.watch.cursor {
            Some(c) => c,
            None => {
                self.watch.round_started = Some(now);
                0
            }
        };
        let round = self.watch.round_started.unwrap_or(now);
        self.containment.flush_cpu();
        let mut read = 0;
        let mut i = start;
        while i < self.workers.len() && read < SLICE {
            // Taken since the round began (by a status): fresh enough.
            if self.workers[i].read_before(round) {
                self.workers[i].take_readings(now);
                read += 1;
            }
            i += 1;
        }
        let done = i >= self.workers.len();
        self.watch.cursor = Some(i);
        self.watch.after_slice(now, done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_single_status_starts_nothing() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.on_status(t0);
        assert_eq!(w.next, None);
        // Further apart than WATCH: still nobody watching.
        w.on_status(t0 + ms(1600));
        assert_eq!(w.next, None);
    }

    #[test]
    fn statuses_every_second_keep_rounds_going_and_they_stop_after_the_last() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.on_status(t0);
        w.on_status(t0 + ms(1000));
        // The second status took the readings; a round follows them.
        assert_eq!(w.next, Some(t0 + ms(1800)));
        let round = |w: &mut Watch, at: Instant| {
            w.round_started = Some(at);
            w.cursor = Some(0);
            w.after_slice(at, false);
            assert_eq!(w.next, Some(at + SLICE_GAP));
            w.after_slice(at + SLICE_GAP, true);
        };
        round(&mut w, t0 + ms(1800));
        // The next round would start past the watch (2500 ms): none yet.
        assert_eq!(w.next, None);
        w.on_status(t0 + ms(2000));
        // Back at the rounds' pace.
        assert_eq!(w.next, Some(t0 + ms(2600)));
        round(&mut w, t0 + ms(2600));
        assert_eq!(w.next, Some(t0 + ms(3400)));
        round(&mut w, t0 + ms(3400));
        // The last status was at 2000 ms: nothing past 3500 ms.
        assert_eq!(w.next, None);
        assert_eq!(w.until, None);
    }
}
