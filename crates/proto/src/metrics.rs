//! The status snapshot as Prometheus text exposition (format 0.0.4): what
//! `arbiterctl metrics` prints (for a node_exporter textfile collector) and what
//! arbiterd's `--metrics-bind` serves at `/metrics`, from this one renderer so the
//! two can never disagree.
//!
//! Every sample carries [`INSTANCE_LABEL`], the master's `--name`: two masters'
//! files side by side in one textfile directory must not emit the same series,
//! which the collector would reject. Not `instance`, which Prometheus sets to the
//! scrape target and would overwrite.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::status::{Status, WorkerState};

/// One metric family.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    pub samples: Vec<Sample>,
}

/// One sample of a family.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label names and values, in output order.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// The `Content-Type` of [`render`]'s output, as Prometheus expects it over HTTP.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family {
        name,
        help,
        kind,
        samples: Vec::new(),
    }
}

fn single(name: &'static str, kind: &'static str, help: &'static str, value: f64) -> Family {
    let mut f = family(name, kind, help);
    f.samples.push(Sample {
        labels: Vec::new(),
        value,
    });
    f
}

/// The label every sample carries: the master's instance name (`--name`).
pub const INSTANCE_LABEL: &str = "arbiter";

/// The metric families of one status snapshot.
pub fn families(st: &Status) -> Vec<Family> {
    let mut out = unlabelled_families(st);
    for f in &mut out {
        for s in &mut f.samples {
            s.labels.insert(0, (INSTANCE_LABEL, st.master.name.clone()));
        }
    }
    out
}

fn unlabelled_families(st: &Status) -> Vec<Family> {
    let m = &st.master;
    let mut out = Vec::new();

    let mut info = family(
        "arbiter_master_info",
        "gauge",
        "The master: version and pid (always 1).",
    );
    info.samples.push(Sample {
        labels: vec![("version", m.version.clone()), ("pid", m.pid.to_string())],
        value: 1.0,
    });
    out.push(info);
    out.push(single(
        "arbiter_master_uptime_seconds",
        "gauge",
        "Seconds since the master started.",
        m.uptime_secs,
    ));
    out.push(single(
        "arbiter_generation",
        "gauge",
        "The generation new workers belong to (bumped by every reload).",
        m.generation as f64,
    ));
    out.push(single(
        "arbiter_workers_target",
        "gauge",
        "The target number of workers.",
        m.target as f64,
    ));
    out.push(single(
        "arbiter_workers_ready",
        "gauge",
        "Workers serving now (ready), of any generation.",
        m.ready as f64,
    ));

    // Every state gets a sample, 0 included, so that no series comes and goes. A
    // state only a newer master knows shows as `unknown`, and only while it is seen.
    let mut by_state: BTreeMap<&str, u64> =
        WorkerState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for w in &st.workers {
        *by_state.entry(w.state.as_str()).or_default() += 1;
    }
    let mut states = family("arbiter_workers", "gauge", "Worker processes by state.");
    for (state, n) in by_state {
        states.samples.push(Sample {
            labels: vec![("state", state.to_string())],
            value: n as f64,
        });
    }
    out.push(states);
    // The queue in front of every worker: what only the master can see.
    let mut queue = family(
        "arbiter_listen_queue",
        "gauge",
        "Connections waiting in the listener's accept queue, as the status was taken.",
    );
    let mut limit = family(
        "arbiter_listen_queue_limit",
        "gauge",
        "The most the listener's accept queue holds (--backlog, capped by net.core.somaxconn).",
    );
    for l in &m.listeners {
        let labels = vec![("listener", l.name.clone())];
        if let Some(q) = l.queue {
            queue.samples.push(Sample {
                labels: labels.clone(),
                value: q as f64,
            });
        }
        if let Some(q) = l.queue_limit {
            limit.samples.push(Sample {
                labels,
                value: q as f64,
            });
        }
    }
    out.extend([queue, limit]);
    if let Some(n) = m.host_listen_overflows {
        out.push(single(
            "arbiter_host_listen_overflows_total",
            "counter",
            "Connections dropped for a full accept queue by any listener of this host (TcpExt ListenOverflows; host-wide, not only this master's).",
            n as f64,
        ));
    }
    if let Some(a) = &m.autoscale {
        let mut events = family(
            "arbiter_autoscale_events_total",
            "counter",
            "Workers added (up) and removed (down) by --workers MIN..MAX for the load.",
        );
        for (dir, n) in [("up", a.ups), ("down", a.downs)] {
            events.samples.push(Sample {
                labels: vec![("direction", dir.to_string())],
                value: n as f64,
            });
        }
        out.push(events);
        out.push(single(
            "arbiter_autoscale_min_workers",
            "gauge",
            "The lower bound of --workers MIN..MAX.",
            a.min as f64,
        ));
        out.push(single(
            "arbiter_autoscale_max_workers",
            "gauge",
            "The upper bound of --workers MIN..MAX.",
            a.max as f64,
        ));
    }
    out.push(single(
        "arbiter_reload_in_progress",
        "gauge",
        "1 while a reload is in flight.",
        if m.reload.is_some() { 1.0 } else { 0.0 },
    ));

    let mut workers: Vec<_> = st.workers.iter().collect();
    workers.sort_by_key(|w| (w.id, w.pid));
    let ids = |w: &crate::status::WorkerStatus| {
        vec![
            ("id", w.id.to_string()),
            ("slot", w.slot.to_string()),
            ("pid", w.pid.to_string()),
        ]
    };
    let mut up = family(
        "arbiter_worker_up_seconds",
        "gauge",
        "Seconds since the worker was spawned.",
    );
    let mut rss = family(
        "arbiter_worker_rss_bytes",
        "gauge",
        "Resident set size of the worker, in bytes.",
    );
    let mut beat = family(
        "arbiter_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since the worker's last heartbeat (absent if it never beat).",
    );
    let mut cpu = family(
        "arbiter_worker_cpu_seconds_total",
        "counter",
        "CPU seconds used by the worker: its whole process tree where it has a cgroup, else its main process and the children it reaped.",
    );
    for w in &workers {
        up.samples.push(Sample {
            labels: ids(w),
            value: w.uptime_secs,
        });
        if let Some(b) = w.rss_bytes {
            rss.samples.push(Sample {
                labels: ids(w),
                value: b as f64,
            });
        }
        if let Some(a) = w.last_beat_secs {
            beat.samples.push(Sample {
                labels: ids(w),
                value: a,
            });
        }
        if let Some(c) = w.cpu_secs {
            cpu.samples.push(Sample {
                labels: ids(w),
                value: c,
            });
        }
    }
    out.extend([up, rss, beat, cpu]);
    // `--preload` only: what the workers share with their template.
    if workers.iter().any(|w| w.pss_bytes.is_some()) {
        let mut pss = family(
            "arbiter_worker_pss_bytes",
            "gauge",
            "Proportional set size of the worker (shared pages divided among their sharers), in bytes; --preload only.",
        );
        let mut private = family(
            "arbiter_worker_private_bytes",
            "gauge",
            "Pages of the worker nobody else maps, in bytes; --preload only.",
        );
        for w in &workers {
            if let (Some(p), Some(v)) = (w.pss_bytes, w.private_bytes) {
                pss.samples.push(Sample {
                    labels: ids(w),
                    value: p as f64,
                });
                private.samples.push(Sample {
                    labels: ids(w),
                    value: v as f64,
                });
            }
        }
        out.extend([pss, private]);
    }

    // Every slot has a sample, also while it has no worker because it waits out a
    // restart backoff: that is when an alert on a crash loop must see it.
    let mut by_slot: BTreeMap<u64, u64> = (0..m.target).map(|slot| (slot, 0)).collect();
    for w in &st.workers {
        let e = by_slot.entry(w.slot).or_default();
        *e = (*e).max(w.restarts);
    }
    for b in &m.backoff {
        let e = by_slot.entry(b.slot).or_default();
        *e = (*e).max(b.failures);
    }
    let mut restarts = family(
        "arbiter_worker_restarts",
        "gauge",
        "Consecutive failures of the worker slot (0 once a worker of it stays up), also while it waits to restart.",
    );
    for (slot, n) in by_slot {
        restarts.samples.push(Sample {
            labels: vec![("slot", slot.to_string())],
            value: n as f64,
        });
    }
    out.push(restarts);

    out.push(single(
        "arbiter_reloads_total",
        "counter",
        "Reloads since the master started.",
        m.reloads as f64,
    ));
    out.push(single(
        "arbiter_upgrades_total",
        "counter",
        "Master upgrades started by this master.",
        m.upgrades as f64,
    ));
    out.push(single(
        "arbiter_worker_failures_total",
        "counter",
        "Workers that died without being asked to.",
        m.worker_failures as f64,
    ));
    out.push(single(
        "arbiter_workers_spawned_total",
        "counter",
        "Workers spawned since the master started.",
        m.workers_spawned as f64,
    ));
    out.push(single(
        "arbiter_log_lines_dropped_total",
        "counter",
        "Lines the master could not write to its log (a full disk, a stalled reader).",
        m.log.lines_dropped as f64,
    ));
    out.push(single(
        "arbiter_worker_output_lines_dropped_total",
        "counter",
        "Lines of worker output dropped because a worker wrote faster than the relay passes on.",
        m.output_lines_dropped as f64,
    ));
    if !m.recycles.is_empty() {
        let mut recycles = family(
            "arbiter_worker_recycles_total",
            "counter",
            "Workers recycled (replacement first, then a graceful stop), by reason.",
        );
        for (reason, n) in &m.recycles {
            recycles.samples.push(Sample {
                labels: vec![("reason", reason.clone())],
                value: *n as f64,
            });
        }
        out.push(recycles);
    }
    out.push(single(
        "arbiter_notify_dropped_total",
        "counter",
        "Notify datagrams dropped for coming from a uid no worker runs as.",
        m.notify_dropped as f64,
    ));
    out.push(single(
        "arbiter_log_failing",
        "gauge",
        "1 while the master's log is refusing lines.",
        if m.log.failing.is_some() { 1.0 } else { 0.0 },
    ));
    out.extend(scoreboard(st));
    out
}

/// What workers say on the scoreboard. Counted from the workers, not the
/// master's summary, so a master too old to read the scoreboard shows its workers
/// as unknown rather than as nothing.
fn scoreboard(st: &Status) -> Vec<Family> {
    let count = |busy: Option<bool>| st.workers.iter().filter(|w| w.busy == busy).count() as f64;
    let mut out = vec![
        single(
            "arbiter_workers_busy",
            "gauge",
            "Workers that say they have a request in hand.",
            count(Some(true)),
        ),
        single(
            "arbiter_workers_idle",
            "gauge",
            "Workers that say they have no request in hand.",
            count(Some(false)),
        ),
        single(
            "arbiter_workers_unknown",
            "gauge",
            "Workers that say neither (they do not use the scoreboard).",
            count(None),
        ),
    ];
    let mut workers: Vec<_> = st.workers.iter().collect();
    workers.sort_by_key(|w| (w.id, w.pid));
    let mut requests = family(
        "arbiter_worker_requests_total",
        "counter",
        "Requests served, as the worker counts them (absent if it does not report).",
    );
    for w in workers {
        if let Some(n) = w.requests {
            requests.samples.push(Sample {
                labels: vec![
                    ("id", w.id.to_string()),
                    ("slot", w.slot.to_string()),
                    ("pid", w.pid.to_string()),
                ],
                value: n as f64,
            });
        }
    }
    out.push(requests);
    out
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust prints the shortest representation that reads back exactly: `4`,
        // `2.021479694`, `1e-7`.
        format!("{v}")
    }
}

/// Render families as Prometheus text exposition.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for s in &f.samples {
            out.push_str(f.name);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", value(s.value));
        }
    }
    out
}

/// [`families`] as JSON (`metrics --json`): `[{"name","help","type","samples":
/// [{"labels":{..},"value":..}]}]`.
pub fn to_json(families: &[Family]) -> serde_json::Value {
    serde_json::Value::Array(
        families
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "help": f.help,
                    "type": f.kind,
                    "samples": f.samples.iter().map(|s| serde_json::json!({
                        "labels": s.labels.iter()
                            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone())))
                            .collect::<serde_json::Map<_, _>>(),
                        "value": s.value,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_escapes() {
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(value(3.0), "3");
        assert_eq!(escape_label("a\nb\"c\\"), "a\\nb\\\"c\\\\");
    }
}
