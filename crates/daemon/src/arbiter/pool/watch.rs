//! Someone watching the pool: `arbiterctl top` asks for a status every second,
//! and each status shows every worker's CPU and RSS from readings at most a
//! second old (`trees::READING_FRESH`). Taken at the request, those are a
//! `cpu.stat` (or `/proc/PID/stat`) and a `/proc/PID/statm` read per worker,
//! about 20 ms of a status at 4096 workers; so while statuses come that often,
//! the pool takes them itself, a slice at a time, shortly before the next
//! status is expected (as long after the latest as that one was after the one
//! before), if they would be stale by then, and that status finds them taken:
//! one round per status at most, as many readings as the statuses would have
//! taken themselves, but out of their way. A status still reads any
//! reading a second old itself, so no figure is older than that; a single
//! status, or scrapes further apart than [`WATCH`], start nothing, and an idle
//! master does not wake. Heartbeats are still looked at by each status.

use std::time::{Duration, Instant};

use super::Pool;
use crate::trees::READING_FRESH;

/// Two statuses at most this far apart mean someone is watching, and the next
/// is expected as far after the latest.
const WATCH: Duration = Duration::from_millis(1500);
/// A round of readings starts this long before the next status is expected:
/// room for the round itself (8 slices at 4096 workers) and for a status a
/// little early.
const LEAD: Duration = Duration::from_millis(250);
/// Readings per slice, and the pause between slices, so that a round at
/// thousands of workers holds the loop a millisecond or two at a time.
const SLICE: usize = 512;
const SLICE_GAP: Duration = Duration::from_millis(5);

#[derive(Default)]
pub struct Watch {
    /// The latest status.
    last_status: Option<Instant>,
    /// The status the round scheduled or under way is for: readings that would
    /// be stale then are taken again.
    expected: Option<Instant>,
    /// The index of the next worker to read in the round under way.
    cursor: usize,
    /// When the next slice is due.
    next: Option<Instant>,
}

impl Watch {
    /// A status is being taken at `now`; `oldest`: when the oldest of the
    /// readings it leaves behind was taken. With a status as far before,
    /// another is expected as far after: if some reading would be stale by
    /// then, a round is due shortly before it.
    fn on_status(&mut self, now: Instant, oldest: Instant) {
        let interval = self
            .last_status
            .map(|t| now.saturating_duration_since(t))
            .filter(|&d| d <= WATCH);
        self.last_status = Some(now);
        let Some(interval) = interval else {
            return;
        };
        let expected = now + interval;
        if self.next.is_some() || oldest + READING_FRESH > expected {
            return;
        }
        self.expected = Some(expected);
        self.cursor = 0;
        self.next = Some(expected.checked_sub(LEAD).unwrap_or(now).max(now));
    }

    /// Readings taken at this or before would be stale when the expected status
    /// comes.
    fn stale_before(&self) -> Option<Instant> {
        self.expected?.checked_sub(READING_FRESH)
    }

    /// A slice was taken at `now`; `done`: it ended the round.
    fn after_slice(&mut self, now: Instant, done: bool) {
        self.next = (!done).then_some(now + SLICE_GAP);
        if done {
            self.expected = None;
            self.cursor = 0;
        }
    }
}

impl Pool {
    /// A status (or a metrics scrape) is about to read the workers' figures.
    pub fn before_snapshot(&mut self, now: Instant) {
        let oldest = self
            .workers
            .iter()
            .map(|w| w.readings_taken(now))
            .min()
            .unwrap_or(now);
        self.watch.on_status(now, oldest);
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
        self.containment.flush_cpu();
        let stale_before = self.watch.stale_before();
        let mut read = 0;
        let mut i = self.watch.cursor;
        while i < self.workers.len() && read < SLICE {
            let w = &self.workers[i];
            if stale_before.is_none_or(|t| w.read_by(t)) {
                w.take_readings(now);
                read += 1;
            }
            i += 1;
        }
        self.watch.cursor = i;
        self.watch.after_slice(now, i >= self.workers.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A whole round at `at`, in two slices.
    fn round(w: &mut Watch, at: Instant) {
        assert_eq!(w.next, Some(at));
        w.after_slice(at, false);
        assert_eq!(w.next, Some(at + SLICE_GAP));
        w.after_slice(at + SLICE_GAP, true);
        assert_eq!(w.next, None);
    }

    #[test]
    fn a_single_status_starts_nothing() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.on_status(t0, t0);
        assert_eq!(w.next, None);
        // Further apart than WATCH: still nobody watching.
        w.on_status(t0 + ms(1600), t0 + ms(1600));
        assert_eq!(w.next, None);
    }

    #[test]
    fn a_status_every_second_gets_one_round_before_each() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.on_status(t0, t0);
        // The second status read everything (its readings are its own).
        w.on_status(t0 + ms(1000), t0 + ms(1000));
        assert_eq!(w.expected, Some(t0 + ms(2000)));
        round(&mut w, t0 + ms(1750));
        // Readings from the round are fresh at the third; the fourth needs a round.
        w.on_status(t0 + ms(2000), t0 + ms(1750));
        assert_eq!(w.stale_before(), Some(t0 + ms(2000)));
        round(&mut w, t0 + ms(2750));
        // Nobody asks any more: nothing more is scheduled.
        assert_eq!(w.next, None);
    }

    #[test]
    fn statuses_more_often_than_the_readings_expire_start_a_round_only_near_expiry() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        // Every 500 ms, the readings taken by the first.
        w.on_status(t0, t0);
        w.on_status(t0 + ms(400), t0);
        assert_eq!(w.next, None, "fresh at 800 ms still");
        w.on_status(t0 + ms(600), t0);
        assert_eq!(w.next, None, "the next is expected at 800 ms");
        w.on_status(t0 + ms(900), t0);
        // Expected at 1200 ms, past the readings' second: a round right away.
        assert_eq!(w.next, Some(t0 + ms(950)));
    }
}
