//! Where a stop stands, as one state: the drain window (`--shutdown-delay`), the
//! wait for the accept queues to empty, then the workers' stop and its deadline.
//! The loop's wait, its checks, the status and `/readyz` all read this one
//! value, so they cannot disagree about it; what the master must do about it
//! comes back as a [`Step`].

use std::time::{Duration, Instant};

use crate::{info, warning};

/// How long every accept queue must stay empty before the workers are told to
/// stop: the connections a balancer sent last may still be on their way in.
pub const QUIET: Duration = Duration::from_millis(100);
/// How often the queues are read while waiting for them.
const LOOK_EVERY: Duration = Duration::from_millis(10);
/// How long a quick shutdown (INT, QUIT) waits before KILL, at most.
pub const QUICK_GRACE: Duration = Duration::from_secs(2);

/// How a stop was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// TERM, `arbiterctl stop`: the drain window, the queues, then TERM.
    Graceful,
    /// INT, QUIT, `arbiterctl stop --fast`: QUIT now, KILL soon after.
    Quick,
    /// A halt, or a master whose listeners another master serves: TERM now,
    /// since nobody needs the window and the queue is not ours to empty.
    Immediate,
}

/// The bounds a stop works within, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `--shutdown-delay`.
    pub delay: Duration,
    /// `--graceful-timeout`: the whole stop after the window, queue wait
    /// included, so that `delay + graceful` bounds it for an orchestrator.
    pub graceful: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Serving on as before, but not ready: balancers take us out meanwhile.
    Draining { until: Instant },
    /// The workers serve on until every accept queue has been empty for
    /// [`QUIET`]: what waits there when the last worker closes the socket is
    /// reset. At `gives_up` (half the graceful timeout, so the workers keep the
    /// other half) they are told anyway; KILL at `deadline`.
    Quiescing {
        gives_up: Instant,
        deadline: Instant,
        empty_since: Option<Instant>,
        next_look: Instant,
    },
    /// The workers have their signal: TERM, or QUIT when not `graceful`.
    Stopping { graceful: bool, deadline: Instant },
}

/// What the queues look like, read when the state asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Look {
    /// Connections waiting in all the accept queues together.
    pub queued: u64,
    /// Workers serving: with none, nobody would ever take the queue.
    pub serving: usize,
}

/// What the master must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// Close our listeners and tell the workers: TERM (`graceful`) or QUIT,
    /// KILL at `deadline`.
    StopWorkers {
        graceful: bool,
        deadline: Instant,
    },
    /// The deadline passed: KILL whatever is left.
    Kill,
}

fn stop(graceful: bool, deadline: Instant) -> (Shutdown, Step) {
    (
        Shutdown::Stopping { graceful, deadline },
        Step::StopWorkers { graceful, deadline },
    )
}

fn quick_deadline(now: Instant, graceful: Duration) -> Instant {
    now + graceful.min(QUICK_GRACE)
}

impl Shutdown {
    /// The first stop request.
    pub fn begin(how: How, now: Instant, b: Bounds) -> (Shutdown, Step) {
        match how {
            How::Graceful if !b.delay.is_zero() => {
                info!(
                    "Draining for {:.1}s (--shutdown-delay): serving on, /readyz says 503",
                    b.delay.as_secs_f64()
                );
                (
                    Shutdown::Draining {
                        until: now + b.delay,
                    },
                    Step::Wait,
                )
            }
            How::Graceful => (Shutdown::quiescing(now, b.graceful), Step::Wait),
            How::Immediate => stop(true, now + b.graceful),
            How::Quick => stop(false, quick_deadline(now, b.graceful)),
        }
    }

    fn quiescing(now: Instant, graceful: Duration) -> Shutdown {
        Shutdown::Quiescing {
            gives_up: now + graceful / 2,
            deadline: now + graceful,
            empty_since: None,
            next_look: now,
        }
    }

    /// A stop request while stopping: a second TERM ends the window or the queue
    /// wait at once, INT or QUIT turn any stop quick; anything else is a repeat.
    pub fn again(&mut self, how: How, now: Instant, graceful: Duration) -> Step {
        let (next, step) = match (*self, how) {
            (Shutdown::Draining { until }, How::Quick) => {
                info!(
                    "Drain window cut short ({:.1}s early): quick shutdown",
                    until.saturating_duration_since(now).as_secs_f64()
                );
                stop(false, quick_deadline(now, graceful))
            }
            (Shutdown::Draining { until }, _) => {
                info!(
                    "Drain window cut short ({:.1}s early): stopping now",
                    until.saturating_duration_since(now).as_secs_f64()
                );
                stop(true, now + graceful)
            }
            (Shutdown::Quiescing { deadline, .. }, How::Quick) => {
                info!("Quick shutdown requested");
                stop(false, deadline.min(quick_deadline(now, graceful)))
            }
            (Shutdown::Quiescing { deadline, .. }, _) => {
                info!("No more waiting for the accept queues: stopping now");
                stop(true, deadline)
            }
            (
                Shutdown::Stopping {
                    graceful: true,
                    deadline,
                },
                How::Quick,
            ) => {
                info!("Quick shutdown requested");
                stop(false, deadline.min(now + QUICK_GRACE))
            }
            (Shutdown::Stopping { .. }, _) => {
                info!("Already shutting down");
                return Step::Wait;
            }
        };
        *self = next;
        step
    }

    /// Move on as time says; `look` reads the queues, only when due.
    pub fn tick(&mut self, now: Instant, graceful: Duration, look: impl FnOnce() -> Look) -> Step {
        if let Shutdown::Draining { until } = *self
            && now >= until
        {
            info!("Drain window over: waiting for the accept queues to be empty");
            *self = Shutdown::quiescing(now, graceful);
        }
        let (next, step) = match self {
            Shutdown::Draining { .. } => return Step::Wait,
            Shutdown::Stopping { deadline, .. } => {
                return if now >= *deadline {
                    Step::Kill
                } else {
                    Step::Wait
                };
            }
            Shutdown::Quiescing {
                gives_up,
                deadline,
                empty_since,
                next_look,
            } => {
                if now < *next_look {
                    return Step::Wait;
                }
                let seen = look();
                if seen.serving == 0 {
                    info!("No worker serving to take the accept queues: stopping");
                    stop(true, *deadline)
                } else if seen.queued == 0
                    && now.saturating_duration_since(*empty_since.get_or_insert(now)) >= QUIET
                {
                    info!(
                        "Accept queues empty for {} ms: stopping the workers",
                        QUIET.as_millis()
                    );
                    stop(true, *deadline)
                } else if now >= *gives_up {
                    warning!(
                        "{} connection(s) still in the accept queues after {:.1}s: stopping the workers anyway",
                        seen.queued,
                        (graceful / 2).as_secs_f64()
                    );
                    stop(true, *deadline)
                } else {
                    if seen.queued > 0 {
                        *empty_since = None;
                    }
                    *next_look = now + LOOK_EVERY;
                    return Step::Wait;
                }
            }
        };
        *self = next;
        step
    }

    /// When [`tick`](Self::tick) has something to do.
    pub fn next_deadline(&self) -> Instant {
        match *self {
            Shutdown::Draining { until } => until,
            Shutdown::Quiescing { next_look, .. } => next_look,
            Shutdown::Stopping { deadline, .. } => deadline,
        }
    }

    /// The workers have been told to stop: nothing is to be replaced or spawned.
    pub fn workers_told(&self) -> bool {
        matches!(self, Shutdown::Stopping { .. })
    }

    /// What the drain window has left, while in it.
    pub fn draining_left(&self, now: Instant) -> Option<Duration> {
        match *self {
            Shutdown::Draining { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// For the status: `draining` in the window, `stopping` after it.
    pub fn name(&self) -> &'static str {
        match self {
            Shutdown::Draining { .. } => "draining",
            _ => "stopping",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        delay: Duration::from_secs(5),
        graceful: Duration::from_secs(30),
    };

    fn look(queued: u64) -> impl FnOnce() -> Look {
        move || Look { queued, serving: 4 }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_term_drains_then_waits_for_a_quiet_queue_then_stops() {
        let t0 = Instant::now();
        let (mut st, step) = Shutdown::begin(How::Graceful, t0, B);
        assert_eq!(step, Step::Wait);
        assert_eq!(st.next_deadline(), t0 + s(5));
        assert_eq!(st.draining_left(t0 + s(2)), Some(s(3)));
        assert!(!st.workers_told());
        // Inside the window nothing is read, whatever waits.
        assert_eq!(
            st.tick(t0 + s(4), B.graceful, || unreachable!()),
            Step::Wait
        );
        // The window ends with connections queued: wait on.
        let t1 = t0 + s(5);
        assert_eq!(st.tick(t1, B.graceful, look(3)), Step::Wait);
        assert_eq!(st.name(), "stopping");
        assert!(st.draining_left(t1).is_none());
        let mut t = t1 + LOOK_EVERY;
        assert_eq!(st.next_deadline(), t);
        // Empty, then not again before QUIET: the quiet spell starts over.
        assert_eq!(st.tick(t, B.graceful, look(0)), Step::Wait);
        t += LOOK_EVERY;
        assert_eq!(st.tick(t, B.graceful, look(1)), Step::Wait);
        let empty_from = t + LOOK_EVERY;
        t = empty_from;
        while t < empty_from + QUIET {
            assert_eq!(st.tick(t, B.graceful, look(0)), Step::Wait, "{t:?}");
            t += LOOK_EVERY;
        }
        assert_eq!(
            st.tick(t, B.graceful, look(0)),
            Step::StopWorkers {
                graceful: true,
                deadline: t1 + B.graceful
            }
        );
        assert!(st.workers_told());
        assert_eq!(
            st.tick(t1 + s(29), B.graceful, || unreachable!()),
            Step::Wait
        );
        assert_eq!(
            st.tick(t1 + s(30), B.graceful, || unreachable!()),
            Step::Kill
        );
    }

    #[test]
    fn a_queue_that_never_empties_is_given_half_the_graceful_timeout() {
        let t0 = Instant::now();
        let b = Bounds {
            delay: Duration::ZERO,
            ..B
        };
        let (mut st, step) = Shutdown::begin(How::Graceful, t0, b);
        assert_eq!(step, Step::Wait);
        assert_eq!(st.next_deadline(), t0, "the first look is at once");
        assert_eq!(st.tick(t0, b.graceful, look(9)), Step::Wait);
        assert_eq!(st.tick(t0 + s(14), b.graceful, look(9)), Step::Wait);
        assert_eq!(
            st.tick(t0 + s(15), b.graceful, look(9)),
            Step::StopWorkers {
                graceful: true,
                deadline: t0 + s(30)
            }
        );
    }

    #[test]
    fn with_no_worker_serving_nobody_waits_for_the_queue() {
        let t0 = Instant::now();
        let b = Bounds {
            delay: Duration::ZERO,
            ..B
        };
        let (mut st, _) = Shutdown::begin(How::Graceful, t0, b);
        let step = st.tick(t0, b.graceful, || Look {
            queued: 5,
            serving: 0,
        });
        assert!(matches!(step, Step::StopWorkers { graceful: true, .. }));
    }

    #[test]
    fn a_second_term_cuts_the_window_and_int_makes_it_quick() {
        let t0 = Instant::now();
        let (mut st, _) = Shutdown::begin(How::Graceful, t0, B);
        let t1 = t0 + s(1);
        assert_eq!(
            st.again(How::Graceful, t1, B.graceful),
            Step::StopWorkers {
                graceful: true,
                deadline: t1 + B.graceful
            }
        );
        assert_eq!(st.again(How::Graceful, t1, B.graceful), Step::Wait);
        // INT after that: quick, within QUICK_GRACE.
        assert_eq!(
            st.again(How::Quick, t1, B.graceful),
            Step::StopWorkers {
                graceful: false,
                deadline: t1 + QUICK_GRACE
            }
        );
        assert_eq!(st.again(How::Quick, t1, B.graceful), Step::Wait);

        let (mut st, _) = Shutdown::begin(How::Graceful, t0, B);
        assert_eq!(
            st.again(How::Quick, t1, B.graceful),
            Step::StopWorkers {
                graceful: false,
                deadline: t1 + QUICK_GRACE
            }
        );
    }

    #[test]
    fn quick_and_immediate_stops_tell_the_workers_at_once() {
        let t0 = Instant::now();
        let (st, step) = Shutdown::begin(How::Quick, t0, B);
        assert_eq!(
            step,
            Step::StopWorkers {
                graceful: false,
                deadline: t0 + QUICK_GRACE
            }
        );
        assert!(st.workers_told());
        let (_, step) = Shutdown::begin(How::Immediate, t0, B);
        assert_eq!(
            step,
            Step::StopWorkers {
                graceful: true,
                deadline: t0 + B.graceful
            }
        );
        // A graceful timeout below QUICK_GRACE bounds a quick stop too.
        let short = Bounds {
            graceful: Duration::from_millis(500),
            ..B
        };
        let (_, step) = Shutdown::begin(How::Quick, t0, short);
        assert_eq!(
            step,
            Step::StopWorkers {
                graceful: false,
                deadline: t0 + Duration::from_millis(500)
            }
        );
    }
}
