//! The status snapshot, measured now on the master's clocks.

use std::os::fd::AsFd;
use std::time::{Instant, SystemTime};

use arbiter_proto::status as snapshot;

use super::Arbiter;
use super::pool::CRASH_LOOP_AFTER;
use super::reload::ReloadOutcome;
use crate::listeners::Origin;
use crate::workers::{State, Worker};

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Arbiter {
    pub(super) fn snapshot(&mut self) -> snapshot::Status {
        let now = Instant::now();
        self.pool.before_snapshot(now);
        let generation = self.pool.generation();
        let slots = self.pool.slots();
        let dropped = self.pool.output_dropped();
        let now_ns = arbiter_proto::scoreboard::monotonic_ns();
        let workers: Vec<snapshot::WorkerStatus> = self
            .pool
            .workers()
            .iter()
            .map(|w| {
                let failures = slots
                    .get(&w.slot)
                    .filter(|_| w.generation == generation)
                    .map_or(0, |h| h.failures);
                let dropped = dropped.get(&w.id).copied().unwrap_or(0);
                let mut st = worker_status(w, now, failures, dropped);
                if self.cfg.preload
                    && let Some((pss, private)) = smaps_rollup(w.pid.as_raw())
                {
                    st.pss_bytes = Some(pss);
                    st.private_bytes = Some(private);
                }
                if let Some(r) = self.pool.board_report(w, now_ns) {
                    st.busy = Some(r.busy);
                    st.requests = Some(r.requests);
                    st.max_requests =
                        w.request_limit(self.cfg.max_requests, self.cfg.max_requests_jitter);
                    st.busy_changed_secs = r.since_secs;
                }
                st
            })
            .collect();
        let busy = workers.iter().filter(|w| w.busy == Some(true)).count() as u64;
        let idle = workers.iter().filter(|w| w.busy == Some(false)).count() as u64;
        let unknown = workers.len() as u64 - busy - idle;
        let mut backoff: Vec<snapshot::SlotBackoff> = slots
            .iter()
            .filter(|(_, h)| h.failures > 0)
            .map(|(&slot, h)| snapshot::SlotBackoff {
                slot: slot as u64,
                failures: u64::from(h.failures),
                next_start_secs: h
                    .not_before
                    .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64()),
            })
            .collect();
        backoff.sort_by_key(|x| x.slot);
        let (lines_dropped, failing) = crate::log::health();
        snapshot::Status {
            master: snapshot::MasterStatus {
                pid: self.master_pid.as_raw(),
                name: self.cfg.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: rfc3339(self.started_wall),
                uptime_secs: now.saturating_duration_since(self.started).as_secs_f64(),
                state: self
                    .shutdown
                    .as_ref()
                    .map_or("running", |s| s.name())
                    .into(),
                draining_secs_left: self
                    .shutdown
                    .as_ref()
                    .and_then(|s| s.draining_left(now))
                    .map(|d| d.as_secs_f64()),
                generation,
                target: self.pool.target() as u64,
                ready: self.pool.serving() as u64,
                total: self.pool.workers().len() as u64,
                listeners: self
                    .listeners
                    .iter()
                    .map(|l| {
                        let q = crate::queue::of(l.as_fd()).ok();
                        snapshot::ListenerStatus {
                            address: l.display.clone(),
                            name: l.name.clone(),
                            queue: q.map(|q| u64::from(q.len)),
                            queue_limit: q.map(|q| u64::from(q.limit)),
                            bind: l.spec.as_ref().map(ToString::to_string),
                            inherited: match l.origin {
                                Origin::Bound => None,
                                Origin::HandedOver => Some(snapshot::Inherited::Upgrade),
                                Origin::Fd => Some(snapshot::Inherited::Fd),
                                Origin::Systemd => Some(snapshot::Inherited::Systemd),
                            },
                        }
                    })
                    .collect(),
                reload: self
                    .reloads
                    .in_flight
                    .as_ref()
                    .map(|r| snapshot::ReloadInFlight {
                        from_generation: r.from,
                        to_generation: r.to,
                        elapsed_secs: now.saturating_duration_since(r.started).as_secs_f64(),
                    }),
                last_reload: self.reloads.last.as_ref().map(reload_outcome),
                upgrade: self.lineage.describe(),
                reloads: self.reloads.count,
                upgrades: self.lineage.upgrades,
                worker_failures: self.pool.worker_failures,
                workers_spawned: self.pool.workers_spawned,
                log: snapshot::LogStatus {
                    lines_dropped,
                    failing,
                },
                timeout_secs: self.cfg.timeout.map(|t| t.as_secs_f64()),
                notify_dropped: self.notify.foreign_dropped,
                containment: self.pool.containment().describe(),
                output_lines_dropped: crate::relay::total_dropped(),
                workers_busy: busy,
                workers_idle: idle,
                workers_unknown: unknown,
                templates: self
                    .pool
                    .templates()
                    .into_iter()
                    .map(|t| snapshot::TemplateStatus {
                        generation: t.generation,
                        pid: t.pid,
                        state: if t.ready { "ready" } else { "loading" }.into(),
                        rss_bytes: t.rss_bytes,
                    })
                    .collect(),
                autoscale: self.autoscaler.bounds().map(|b| snapshot::AutoscaleStatus {
                    min: b.min as u64,
                    max: b.max as u64,
                    ups: self.autoscaler.ups,
                    downs: self.autoscaler.downs,
                    last: self.autoscaler.last.clone(),
                }),
                host_listen_overflows: crate::queue::host_listen_overflows(),
                env_keys: self.cfg.env.iter().map(|(k, _)| k.clone()).collect(),
                generations: self
                    .pool
                    .env_keys()
                    .into_iter()
                    .map(|(generation, keys)| snapshot::GenerationEnv {
                        generation,
                        env_keys: keys.to_vec(),
                    })
                    .collect(),
                max_requests: self.cfg.max_requests.map(|limit| snapshot::MaxRequests {
                    limit,
                    jitter: self.cfg.max_requests_jitter,
                }),
                recycles: self
                    .pool
                    .recycles()
                    .map(|(why, n)| (why.name().to_string(), n))
                    .collect(),
                backoff,
            },
            workers,
        }
    }
}

/// PSS and private (clean + dirty) bytes of `pid`, from `/proc/PID/smaps_rollup`.
fn smaps_rollup(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_smaps_rollup(&text)
}

fn parse_smaps_rollup(text: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let pss = kib("Pss:")?;
    let private = kib("Private_Clean:")? + kib("Private_Dirty:")?;
    Some((pss * 1024, private * 1024))
}

fn worker_status(
    w: &Worker,
    now: Instant,
    failures: u32,
    output_dropped: u64,
) -> snapshot::WorkerStatus {
    let (cpu_secs, cpu_percent) = w.cpu(now);
    snapshot::WorkerStatus {
        id: w.id,
        slot: w.slot as u64,
        pid: w.pid.as_raw(),
        generation: w.generation,
        state: match w.state {
            State::Recycling { .. } => snapshot::WorkerState::Recycling,
            State::Booting => snapshot::WorkerState::Booting,
            State::Ready { .. } => snapshot::WorkerState::Ready,
            State::Stopping { .. } => snapshot::WorkerState::Stopping,
            State::Aborted { .. } => snapshot::WorkerState::Aborted,
            State::Killed => snapshot::WorkerState::Killed,
        },
        started_at: rfc3339(w.started_wall),
        uptime_secs: now.saturating_duration_since(w.started).as_secs_f64(),
        last_beat_secs: w
            .heartbeat
            .last_beat
            .map(|b| now.saturating_duration_since(b).as_secs_f64()),
        status_text: w.status_text.clone(),
        restarts: u64::from(failures),
        crash_looping: failures >= CRASH_LOOP_AFTER,
        rss_bytes: w.rss_reading(now),
        pss_bytes: None,
        private_bytes: None,
        cpu_secs,
        cpu_percent,
        output_dropped,
        busy: None,
        requests: None,
        busy_changed_secs: None,
        max_requests: None,
    }
}

fn reload_outcome(r: &ReloadOutcome) -> snapshot::ReloadOutcome {
    match r {
        ReloadOutcome::Succeeded {
            generation,
            took,
            at,
        } => snapshot::ReloadOutcome {
            generation: Some(*generation),
            ok: true,
            message: format!("succeeded in {:.2}s", took.as_secs_f64()),
            at: rfc3339(*at),
        },
        ReloadOutcome::Failed {
            generation,
            reason,
            at,
        } => snapshot::ReloadOutcome {
            generation: *generation,
            ok: false,
            message: reason.clone(),
            at: rfc3339(*at),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::parse_smaps_rollup;

    #[test]
    fn smaps_rollup_fields() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 20000 kB\nPss: 6000 kB\nPss_Anon: 1 kB\nShared_Clean: 14000 kB\nPrivate_Clean: 500 kB\nPrivate_Dirty: 1500 kB\n";
        assert_eq!(parse_smaps_rollup(text), Some((6000 * 1024, 2000 * 1024)));
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
    }
}
