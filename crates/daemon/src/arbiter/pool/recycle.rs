//! Recycling: a serving worker past a limit (`--max-requests`, `--max-worker-age`,
//! `--max-worker-rss`), or one that asked (`ARBITER_RECYCLE=1`), is replaced
//! first. It goes to [`State::Recycling`], which frees its slot for a normal spawn
//! of the current generation; `converge` retires it gracefully once that
//! replacement is ready. A replacement that fails is the slot's failure, backed
//! off as any; the old worker serves on meanwhile.
//!
//! gunicorn's workers exit on their own at `max_requests`, all at once if they
//! were started together (its issues #862, #3427): here the master decides, one
//! recycle per slot and at most [`in_flight_bound`] at a time.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::{Pool, RSS_CHECK_INTERVAL};
use crate::config::Config;
use crate::info;
use crate::workers::{Recycle, State, Worker};

/// How often the scoreboard's request counts are read under `--max-requests`
/// while they move; the interval doubles up to [`COUNTS_CHECK_MAX`] while they
/// do not, so an idle master wakes about once a second for it.
const COUNTS_CHECK_FIRST: Duration = Duration::from_millis(50);
const COUNTS_CHECK_MAX: Duration = Duration::from_secs(1);

/// Recycles in flight at once: a quarter of the target, at least one. Each costs
/// a worker's memory more while its replacement boots; one at a time would take
/// hours to go through a thousand slow-booting workers.
fn in_flight_bound(target: usize) -> usize {
    target.div_ceil(4).max(1)
}

/// xorshift64*, seeded once from the OS through std's hasher keys: enough to
/// spread recycles, with no dependency and no syscall per draw.
pub(super) struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        Rng(h.finish() | 1)
    }

    pub fn draw(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The pool's recycling bookkeeping.
pub(super) struct Recycler {
    pub rng: Rng,
    /// Workers (by id) that said `ARBITER_RECYCLE=1`, until their recycle starts.
    asked: Vec<u64>,
    next_counts_check: Option<Instant>,
    counts_interval: Duration,
    /// What the counts summed to at the last read: unchanged means idle.
    counts_seen: u64,
    /// Recycles started, by [`Recycle::ALL`]'s order.
    started: [u64; 4],
}

impl Recycler {
    pub fn new() -> Recycler {
        Recycler {
            rng: Rng::seeded(),
            asked: Vec::new(),
            next_counts_check: None,
            counts_interval: COUNTS_CHECK_FIRST,
            counts_seen: 0,
            started: [0; 4],
        }
    }
}

impl Pool {
    /// Worker `id` asked to be replaced.
    pub(super) fn ask_recycle(&mut self, id: u64) {
        if !self.recycler.asked.contains(&id) {
            self.recycler.asked.push(id);
        }
    }

    /// A worker of the current generation in `slot` is being recycled.
    pub(super) fn recycling_in(&self, slot: usize) -> bool {
        self.workers
            .iter()
            .any(|w| w.slot == slot && w.generation == self.generation && w.is_recycling())
    }

    /// Recycles started since the master started, by reason.
    pub fn recycles(&self) -> impl Iterator<Item = (Recycle, u64)> + '_ {
        Recycle::ALL.into_iter().zip(self.recycler.started)
    }

    /// When the request counts are to be read next, under `--max-requests`.
    pub(super) fn counts_due(&self, cfg: &Config, now: Instant) -> Option<Instant> {
        cfg.max_requests?;
        Some(self.recycler.next_counts_check.unwrap_or(now))
    }

    /// Start the recycles that are due and fit: ready workers of the current
    /// generation past a limit or that asked, oldest first, one per slot, at most
    /// [`in_flight_bound`] at once. The others wait their turn, still serving.
    pub fn check_limits(&mut self, now: Instant, cfg: &Config) {
        let check_rss =
            cfg.max_worker_rss.is_some() && self.next_rss_check.is_none_or(|t| now >= t);
        if check_rss {
            self.next_rss_check = Some(now + RSS_CHECK_INTERVAL);
        }
        let counts = self.read_counts(now, cfg);
        let current = self.generation;
        self.recycler.asked.retain(|id| {
            self.workers
                .iter()
                .any(|w| w.id == *id && w.generation == current && w.state.is_active())
        });
        if cfg.max_worker_age.is_none()
            && counts.is_none()
            && !check_rss
            && self.recycler.asked.is_empty()
        {
            return;
        }
        let bound = in_flight_bound(self.target);
        let mut busy_slots: Vec<usize> = self
            .workers
            .iter()
            .filter(|w| w.generation == current && w.is_recycling())
            .map(|w| w.slot)
            .collect();
        for i in 0..self.workers.len() {
            if busy_slots.len() >= bound {
                break;
            }
            let w = &self.workers[i];
            if !matches!(w.state, State::Ready { .. })
                || w.generation != current
                || busy_slots.contains(&w.slot)
            {
                continue;
            }
            let served = counts.as_ref().and_then(|c| c[i]);
            let why = if self.recycler.asked.contains(&w.id) {
                Recycle::Asked
            } else if recycle_at(w, cfg).is_some_and(|t| now >= t) {
                Recycle::Age
            } else if let (Some(n), Some(limit)) = (
                served,
                w.request_limit(cfg.max_requests, cfg.max_requests_jitter),
            ) && n >= limit
            {
                Recycle::Requests
            } else if check_rss
                && let (Some(limit), Some(rss)) = (cfg.max_worker_rss, w.rss_bytes())
                && rss > limit
            {
                Recycle::Rss
            } else {
                continue;
            };
            let detail = match why {
                Recycle::Asked => "it asked (ARBITER_RECYCLE=1)".to_string(),
                Recycle::Age => "older than --max-worker-age".to_string(),
                Recycle::Requests => format!("{} requests served", served.unwrap_or(0)),
                Recycle::Rss => format!(
                    "RSS {} MiB over --max-worker-rss",
                    w.rss_bytes().unwrap_or(0) / (1024 * 1024)
                ),
            };
            info!(
                "Recycling worker (pid:{}): {detail}; its replacement starts first",
                w.pid
            );
            busy_slots.push(w.slot);
            let id = w.id;
            self.workers[i].state = State::Recycling { since: now, why };
            self.recycler.asked.retain(|&a| a != id);
            if let Some(k) = Recycle::ALL.iter().position(|&r| r == why) {
                self.recycler.started[k] += 1;
            }
        }
    }

    /// Each worker's request count (by index), read when due under
    /// `--max-requests`; `None` for a worker that does not count.
    fn read_counts(&mut self, now: Instant, cfg: &Config) -> Option<Vec<Option<u64>>> {
        if self.counts_due(cfg, now).is_none_or(|t| now < t) {
            return None;
        }
        let now_ns = arbiter_proto::scoreboard::monotonic_ns();
        let counts: Vec<Option<u64>> = self
            .workers
            .iter()
            .map(|w| self.board_report(w, now_ns).map(|r| r.requests))
            .collect();
        let seen = self.workers.iter().zip(&counts).fold(0u64, |acc, (w, c)| {
            acc.wrapping_add(w.id.wrapping_mul(c.unwrap_or(0).wrapping_add(1)))
        });
        let r = &mut self.recycler;
        r.counts_interval = if seen == r.counts_seen {
            (r.counts_interval * 2).min(COUNTS_CHECK_MAX)
        } else {
            COUNTS_CHECK_FIRST
        };
        r.counts_seen = seen;
        r.next_counts_check = Some(now + r.counts_interval);
        Some(counts)
    }
}

/// When a ready worker is due for recycling by `--max-worker-age`, if it is not
/// already being recycled.
pub(super) fn recycle_at(w: &Worker, cfg: &Config) -> Option<Instant> {
    let age = cfg.max_worker_age?;
    matches!(w.state, State::Ready { .. }).then(|| w.started + age + age_jitter(w.id, age))
}

/// Up to 10% of `age`, fixed per worker, so workers started together (a boot, a
/// reload) are not all recycled at once.
fn age_jitter(id: u64, age: Duration) -> Duration {
    let spread = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32; // 0..1023
    age / 10 * spread / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_a_quarter_at_least_one() {
        assert_eq!(in_flight_bound(1), 1);
        assert_eq!(in_flight_bound(2), 1);
        assert_eq!(in_flight_bound(5), 2);
        assert_eq!(in_flight_bound(1024), 256);
    }

    #[test]
    fn draws_spread() {
        let mut r = Rng::seeded();
        let draws: Vec<u64> = (0..64).map(|_| r.draw() % 11).collect();
        // 64 draws of 0..=10 that all land on one or two values would not spread
        // recycles at all.
        let mut distinct = draws.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() >= 6, "{draws:?}");
    }
}
