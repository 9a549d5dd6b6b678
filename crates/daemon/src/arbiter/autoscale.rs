//! `--workers MIN..MAX`: adapt the worker count to the load, as uWSGI's "cheaper"
//! subsystem does, from what only the master sees: the accept queue in front of
//! every worker, and (for workers that keep the scoreboard) who is busy.
//!
//! - **Pressure**: connections wait in an accept queue, or every worker that
//!   reports is busy. Pressure in every sample for `UP_AFTER` adds one worker.
//! - **Slack**: no queue, and (when workers report) at least two idle, so one fewer
//!   still leaves one idle. Slack in every sample for `DOWN_AFTER` removes one.
//!   Workers that do not report are judged by the queue alone, and then a worker
//!   is removed only after the queue stayed empty that long.
//! - Each change restarts both windows (hysteresis: a change is judged on what
//!   follows it), so the count moves at most one step per `UP_AFTER` up and per
//!   `DOWN_AFTER` down, never past the bounds.
//! - A step down that pressure undoes at once (`FLAP_WITHIN`) was a mistake: the
//!   load sits exactly at the worker count, which an empty queue alone cannot
//!   tell apart from slack (workers that keep no scoreboard). The down window then
//!   doubles, up to `DOWN_AFTER_MAX`, so such a load costs one flap, then one per
//!   20 s, 40 s, ... instead of one every 11 s. It is back to `DOWN_AFTER` once a
//!   step down stands.
//!
//! It samples every `SAMPLE_EVERY` while on; off, it never wakes the master.

use std::time::{Duration, Instant};

use crate::config::WorkerCount;

pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
pub const UP_AFTER: Duration = Duration::from_secs(1);
pub const DOWN_AFTER: Duration = Duration::from_secs(10);
pub const DOWN_AFTER_MAX: Duration = Duration::from_secs(320);
/// A step up this soon after a step down undoes it: a flap.
pub const FLAP_WITHIN: Duration = Duration::from_secs(5);

/// What the master saw at one sample.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Connections waiting in all accept queues.
    pub queued: u64,
    /// Workers of the current generation that report busy and idle (the
    /// scoreboard); those that do not report are in neither.
    pub busy: usize,
    pub idle: usize,
    /// The current target.
    pub target: usize,
}

/// A change of the worker count, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub to: usize,
    pub reason: String,
}

#[derive(Debug)]
pub struct Autoscaler {
    bounds: Option<WorkerCount>,
    next_sample: Instant,
    /// Pressure in every sample since.
    pressure_since: Option<Instant>,
    /// Slack in every sample since.
    slack_since: Option<Instant>,
    /// How long slack must last for a step down (doubled by each flap).
    down_after: Duration,
    /// The latest step down, until it is judged (a flap, or it stood).
    last_down: Option<Instant>,
    pub ups: u64,
    pub downs: u64,
    /// The latest decision, for `status`.
    pub last: Option<String>,
}

impl Autoscaler {
    pub fn new(bounds: Option<WorkerCount>, now: Instant) -> Autoscaler {
        Autoscaler {
            bounds,
            next_sample: now + SAMPLE_EVERY,
            pressure_since: None,
            slack_since: None,
            down_after: DOWN_AFTER,
            last_down: None,
            ups: 0,
            downs: 0,
            last: None,
        }
    }

    pub fn bounds(&self) -> Option<WorkerCount> {
        self.bounds
    }

    /// New bounds (a reload, `scale MIN..MAX`), or `None` to stop adapting (a
    /// count set by hand). The windows start again.
    pub fn set_bounds(&mut self, bounds: Option<WorkerCount>, now: Instant) {
        self.bounds = bounds;
        self.restart(now);
    }

    fn restart(&mut self, now: Instant) {
        self.pressure_since = None;
        self.slack_since = None;
        self.next_sample = now + SAMPLE_EVERY;
    }

    /// When to sample next; `None` when off.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.bounds.map(|_| self.next_sample)
    }

    pub fn is_due(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|t| now >= t)
    }

    /// Judge one sample; the next one is scheduled whatever the outcome.
    pub fn sample(&mut self, s: Sample, now: Instant) -> Option<Decision> {
        let bounds = self.bounds?;
        self.next_sample = now + SAMPLE_EVERY;
        let reporting = s.busy + s.idle;
        let all_busy = reporting > 0 && s.idle == 0 && reporting >= s.target;
        let pressure = s.queued > 0 || all_busy;
        let slack = s.queued == 0 && (reporting == 0 || s.idle >= 2);
        self.pressure_since = if pressure {
            Some(self.pressure_since.unwrap_or(now))
        } else {
            None
        };
        self.slack_since = if slack {
            Some(self.slack_since.unwrap_or(now))
        } else {
            None
        };
        let held = |since: Option<Instant>, window: Duration| {
            since.is_some_and(|t| now.saturating_duration_since(t) >= window)
        };
        // A step down that stood long enough: the window is back to normal.
        if self
            .last_down
            .is_some_and(|t| now.saturating_duration_since(t) >= FLAP_WITHIN)
        {
            self.last_down = None;
            if self.pressure_since.is_none() {
                self.down_after = DOWN_AFTER;
            }
        }
        let decision = if held(self.pressure_since, UP_AFTER) && s.target < bounds.max {
            self.ups += 1;
            if self.last_down.take().is_some() {
                self.down_after = (self.down_after * 2).min(DOWN_AFTER_MAX);
            }
            Decision {
                to: s.target + 1,
                reason: if s.queued > 0 {
                    format!(
                        "connections waited in the accept queue for {:.1}s ({} now)",
                        UP_AFTER.as_secs_f64(),
                        s.queued
                    )
                } else {
                    format!("every worker was busy for {:.1}s", UP_AFTER.as_secs_f64())
                },
            }
        } else if held(self.slack_since, self.down_after) && s.target > bounds.min {
            self.downs += 1;
            self.last_down = Some(now);
            Decision {
                to: s.target - 1,
                reason: if reporting == 0 {
                    format!(
                        "no connection waited for {:.0}s",
                        self.down_after.as_secs_f64()
                    )
                } else {
                    format!(
                        "at least two workers were idle for {:.0}s",
                        self.down_after.as_secs_f64()
                    )
                },
            }
        } else if s.target < bounds.min || s.target > bounds.max {
            // Bounds changed under a count outside them (a reload).
            Decision {
                to: s.target.clamp(bounds.min, bounds.max),
                reason: format!("within --workers {bounds}"),
            }
        } else {
            return None;
        };
        self.restart(now);
        self.last = Some(format!(
            "{} -> {}: {}",
            s.target, decision.to, decision.reason
        ));
        Some(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(queued: u64, busy: usize, idle: usize, target: usize) -> Sample {
        Sample {
            queued,
            busy,
            idle,
            target,
        }
    }

    /// Feed `s` every SAMPLE_EVERY for `d`, returning the decisions and the target.
    fn run(a: &mut Autoscaler, t: &mut Instant, d: Duration, mut s: Sample) -> Vec<usize> {
        let end = *t + d;
        let mut seen = Vec::new();
        while *t < end {
            *t += SAMPLE_EVERY;
            if let Some(dec) = a.sample(s, *t) {
                s.target = dec.to;
                seen.push(dec.to);
            }
        }
        seen
    }

    #[test]
    fn off_never_wakes() {
        let a = Autoscaler::new(None, Instant::now());
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn a_queue_adds_one_worker_per_window_up_to_max() {
        let now = Instant::now();
        let mut t = now;
        let mut a = Autoscaler::new(Some(WorkerCount { min: 2, max: 4 }), now);
        // A queue for less than the window: nothing.
        assert_eq!(
            run(&mut a, &mut t, ms(750), sample(5, 0, 0, 2)),
            [0usize; 0]
        );
        let ups = run(&mut a, &mut t, Duration::from_secs(10), sample(5, 0, 0, 2));
        assert_eq!(ups, [3, 4], "one at a time, never past MAX");
        assert_eq!(a.ups, 2);
    }

    #[test]
    fn slack_removes_one_worker_per_long_window_down_to_min() {
        let now = Instant::now();
        let mut t = now;
        let mut a = Autoscaler::new(Some(WorkerCount { min: 2, max: 4 }), now);
        let downs = run(&mut a, &mut t, Duration::from_secs(25), sample(0, 1, 3, 4));
        assert_eq!(downs, [3, 2]);
        // One idle worker is not slack: removing it would leave none.
        let mut a = Autoscaler::new(Some(WorkerCount { min: 1, max: 4 }), now);
        let mut t = now;
        assert_eq!(
            run(&mut a, &mut t, Duration::from_secs(30), sample(0, 2, 1, 3)),
            [0usize; 0]
        );
    }

    #[test]
    fn every_reporting_worker_busy_is_pressure() {
        let now = Instant::now();
        let mut t = now;
        let mut a = Autoscaler::new(Some(WorkerCount { min: 2, max: 3 }), now);
        assert_eq!(run(&mut a, &mut t, ms(1500), sample(0, 2, 0, 2)), [3]);
    }

    #[test]
    fn a_blip_resets_the_window() {
        let now = Instant::now();
        let mut t = now;
        let mut a = Autoscaler::new(Some(WorkerCount { min: 1, max: 4 }), now);
        for _ in 0..10 {
            assert_eq!(
                run(&mut a, &mut t, ms(750), sample(3, 0, 0, 1)),
                [0usize; 0]
            );
            assert_eq!(
                run(&mut a, &mut t, ms(250), sample(0, 0, 0, 1)),
                [0usize; 0]
            );
        }
    }

    #[test]
    fn a_step_down_undone_at_once_doubles_the_down_window() {
        // Load exactly at the worker count, workers that keep no scoreboard: an
        // empty queue looks like slack, one fewer makes a queue.
        let now = Instant::now();
        let mut t = now;
        let mut a = Autoscaler::new(Some(WorkerCount { min: 2, max: 16 }), now);
        let mut target = 16;
        let mut steps = Vec::new();
        let end = now + Duration::from_secs(200);
        while t < end {
            t += SAMPLE_EVERY;
            let queued = if target < 16 { 3 } else { 0 };
            if let Some(d) = a.sample(sample(queued, 0, 0, target), t) {
                steps.push((t.duration_since(now).as_secs(), d.to));
                target = d.to;
            }
        }
        let downs: Vec<u64> = steps.iter().filter(|s| s.1 == 15).map(|s| s.0).collect();
        // Down after 10 s, then 20 s, 40 s, 80 s of slack: 4 flaps in 200 s, not 18.
        assert_eq!(downs.len(), 4, "{steps:?}");
        assert!(downs.windows(2).all(|w| w[1] - w[0] >= 20), "{steps:?}");
        assert!(
            steps.iter().all(|s| s.1 >= 15),
            "never more than one step off"
        );
    }

    #[test]
    fn new_bounds_pull_the_count_inside() {
        let now = Instant::now();
        let mut a = Autoscaler::new(Some(WorkerCount { min: 4, max: 8 }), now);
        let d = a.sample(sample(0, 0, 0, 2), now + SAMPLE_EVERY);
        assert_eq!(d.map(|d| d.to), Some(4));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}
