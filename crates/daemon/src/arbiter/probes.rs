//! What `--metrics-bind` answers, for scrapers and for probes: `/metrics`,
//! `/livez` (does the master's loop turn?) and `/readyz` (should a balancer send
//! us traffic?). Each probe's answer is one line that says why.

use std::time::{Duration, Instant};

use super::Arbiter;
use crate::metrics::{Ask, Asked, Reply};

/// A probe that waited longer than this for the loop to read it is told the
/// master is not live. Well above any turn of a healthy master (spawning a
/// thousand workers takes a few hundred ms), well below what an orchestrator
/// would wait before it gave up on the probe anyway.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(5);

impl Arbiter {
    /// Answer the requests this turn completed: one snapshot for every scrape,
    /// one readiness for every `/readyz`.
    pub(super) fn answer(&mut self, asks: Vec<(u64, Asked)>, now: Instant) {
        if asks.is_empty() {
            return;
        }
        let metrics = asks.iter().any(|(_, a)| a.what == Ask::Metrics).then(|| {
            arbiter_proto::metrics::render(&arbiter_proto::metrics::families(&self.snapshot()))
        });
        let (ready, ready_line) = self.readiness(now);
        let Some(m) = &mut self.metrics else {
            return;
        };
        for (id, asked) in asks {
            let live;
            let reply = match asked.what {
                Ask::Metrics => Reply::Metrics(metrics.as_deref().unwrap_or_default()),
                Ask::Ready => Reply::Probe {
                    ok: ready,
                    line: &ready_line,
                },
                Ask::Live => {
                    live = liveness(asked.waited);
                    Reply::Probe {
                        ok: live.0,
                        line: &live.1,
                    }
                }
            };
            m.respond(id, asked.head_only, reply, now);
        }
    }

    /// `/readyz`: ready while not stopping and with at least `--ready-min` (by
    /// default: the target count, and never more) workers ready.
    pub(super) fn readiness(&self, now: Instant) -> (bool, String) {
        if let Some(s) = &self.shutdown {
            return match s.draining_left(now) {
                Some(left) => (
                    false,
                    format!(
                        "not ready: draining, {} s left",
                        left.as_secs_f64().ceil() as u64
                    ),
                ),
                None => (false, "not ready: stopping".into()),
            };
        }
        let (serving, target) = (self.pool.serving(), self.pool.target());
        let needed = self.cfg.ready_min.unwrap_or(target).min(target).max(1);
        if serving >= needed {
            return (true, format!("ready: {serving}/{target} workers ready"));
        }
        let why = if self.pool.has_served() {
            ""
        } else {
            "booting, "
        };
        (
            false,
            format!("not ready: {why}{serving}/{target} workers ready, {needed} needed"),
        )
    }
}

/// `/livez`: live unless this probe waited past [`LIVENESS_BOUND`] for the loop
/// (it was stopped, starved of CPU, or stuck in a turn).
fn liveness(waited: Option<Duration>) -> (bool, String) {
    match waited {
        Some(w) if w > LIVENESS_BOUND => (
            false,
            format!(
                "not live: this request waited {:.1} s for the master's loop (bound {} s)",
                w.as_secs_f64(),
                LIVENESS_BOUND.as_secs()
            ),
        ),
        Some(w) => (
            true,
            format!(
                "live: this request waited {:.3} s for the master's loop",
                w.as_secs_f64()
            ),
        ),
        None => (true, "live: the master's loop answered".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_is_the_probes_own_wait() {
        assert!(liveness(None).0);
        assert!(liveness(Some(Duration::from_millis(3))).0);
        assert!(liveness(Some(LIVENESS_BOUND)).0);
        let (ok, line) = liveness(Some(Duration::from_millis(6200)));
        assert!(!ok);
        assert_eq!(
            line,
            "not live: this request waited 6.2 s for the master's loop (bound 5 s)"
        );
    }
}
