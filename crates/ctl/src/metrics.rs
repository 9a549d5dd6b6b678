//! `arbiterctl metrics`: the status snapshot as Prometheus text exposition. The
//! renderer lives in the proto crate, shared with arbiterd's `--metrics-bind`;
//! its tests stay here, next to the status fixture they share with `render`.

pub use arbiter_proto::metrics::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::fixture;
    use arbiter_proto::status::{Status, WorkerState};

    #[test]
    fn rendered() {
        let mut st = fixture();
        st.master.name = "we\"b\\".into();
        let text = render(&families(&st));
        let want = r#"# HELP arbiter_master_info The master: version and pid (always 1).
# TYPE arbiter_master_info gauge
arbiter_master_info{arbiter="we\"b\\",version="0.1.0",pid="1234"} 1
# HELP arbiter_master_uptime_seconds Seconds since the master started.
# TYPE arbiter_master_uptime_seconds gauge
arbiter_master_uptime_seconds{arbiter="we\"b\\"} 11523.5
# HELP arbiter_generation The generation new workers belong to (bumped by every reload).
# TYPE arbiter_generation gauge
arbiter_generation{arbiter="we\"b\\"} 2
# HELP arbiter_workers_target The target number of workers.
# TYPE arbiter_workers_target gauge
arbiter_workers_target{arbiter="we\"b\\"} 4
# HELP arbiter_workers_ready Workers serving now (ready), of any generation.
# TYPE arbiter_workers_ready gauge
arbiter_workers_ready{arbiter="we\"b\\"} 3
# HELP arbiter_workers Worker processes by state.
# TYPE arbiter_workers gauge
arbiter_workers{arbiter="we\"b\\",state="aborted"} 0
arbiter_workers{arbiter="we\"b\\",state="booting"} 1
arbiter_workers{arbiter="we\"b\\",state="killed"} 0
arbiter_workers{arbiter="we\"b\\",state="ready"} 3
arbiter_workers{arbiter="we\"b\\",state="recycling"} 0
arbiter_workers{arbiter="we\"b\\",state="stopping"} 0
# HELP arbiter_listen_queue Connections waiting in the listener's accept queue, as the status was taken.
# TYPE arbiter_listen_queue gauge
arbiter_listen_queue{arbiter="we\"b\\",listener="127.0.0.1_8000"} 3
# HELP arbiter_listen_queue_limit The most the listener's accept queue holds (--backlog, capped by net.core.somaxconn).
# TYPE arbiter_listen_queue_limit gauge
arbiter_listen_queue_limit{arbiter="we\"b\\",listener="127.0.0.1_8000"} 2048
# HELP arbiter_reload_in_progress 1 while a reload is in flight.
# TYPE arbiter_reload_in_progress gauge
arbiter_reload_in_progress{arbiter="we\"b\\"} 0
# HELP arbiter_worker_up_seconds Seconds since the worker was spawned.
# TYPE arbiter_worker_up_seconds gauge
arbiter_worker_up_seconds{arbiter="we\"b\\",id="9",slot="1",pid="999"} 11520
arbiter_worker_up_seconds{arbiter="we\"b\\",id="10",slot="0",pid="1001"} 187.9
arbiter_worker_up_seconds{arbiter="we\"b\\",id="11",slot="2",pid="100234"} 187.9
arbiter_worker_up_seconds{arbiter="we\"b\\",id="12",slot="3",pid="4321"} 2
# HELP arbiter_worker_rss_bytes Resident set size of the worker, in bytes.
# TYPE arbiter_worker_rss_bytes gauge
arbiter_worker_rss_bytes{arbiter="we\"b\\",id="9",slot="1",pid="999"} 1536
arbiter_worker_rss_bytes{arbiter="we\"b\\",id="10",slot="0",pid="1001"} 12900000
arbiter_worker_rss_bytes{arbiter="we\"b\\",id="11",slot="2",pid="100234"} 12900000
# HELP arbiter_worker_heartbeat_age_seconds Seconds since the worker's last heartbeat (absent if it never beat).
# TYPE arbiter_worker_heartbeat_age_seconds gauge
arbiter_worker_heartbeat_age_seconds{arbiter="we\"b\\",id="9",slot="1",pid="999"} 75
arbiter_worker_heartbeat_age_seconds{arbiter="we\"b\\",id="10",slot="0",pid="1001"} 0.42
arbiter_worker_heartbeat_age_seconds{arbiter="we\"b\\",id="11",slot="2",pid="100234"} 16.2
# HELP arbiter_worker_cpu_seconds_total CPU seconds used by the worker: its whole process tree where it has a cgroup, else its main process and the children it reaped.
# TYPE arbiter_worker_cpu_seconds_total counter
arbiter_worker_cpu_seconds_total{arbiter="we\"b\\",id="9",slot="1",pid="999"} 3.5
arbiter_worker_cpu_seconds_total{arbiter="we\"b\\",id="10",slot="0",pid="1001"} 3.5
arbiter_worker_cpu_seconds_total{arbiter="we\"b\\",id="11",slot="2",pid="100234"} 3.5
arbiter_worker_cpu_seconds_total{arbiter="we\"b\\",id="12",slot="3",pid="4321"} 3.5
# HELP arbiter_worker_restarts Consecutive failures of the worker slot (0 once a worker of it stays up), also while it waits to restart.
# TYPE arbiter_worker_restarts gauge
arbiter_worker_restarts{arbiter="we\"b\\",slot="0"} 0
arbiter_worker_restarts{arbiter="we\"b\\",slot="1"} 0
arbiter_worker_restarts{arbiter="we\"b\\",slot="2"} 0
arbiter_worker_restarts{arbiter="we\"b\\",slot="3"} 3
# HELP arbiter_reloads_total Reloads since the master started.
# TYPE arbiter_reloads_total counter
arbiter_reloads_total{arbiter="we\"b\\"} 1
# HELP arbiter_upgrades_total Master upgrades started by this master.
# TYPE arbiter_upgrades_total counter
arbiter_upgrades_total{arbiter="we\"b\\"} 0
# HELP arbiter_worker_failures_total Workers that died without being asked to.
# TYPE arbiter_worker_failures_total counter
arbiter_worker_failures_total{arbiter="we\"b\\"} 5
# HELP arbiter_workers_spawned_total Workers spawned since the master started.
# TYPE arbiter_workers_spawned_total counter
arbiter_workers_spawned_total{arbiter="we\"b\\"} 12
# HELP arbiter_log_lines_dropped_total Lines the master could not write to its log (a full disk, a stalled reader).
# TYPE arbiter_log_lines_dropped_total counter
arbiter_log_lines_dropped_total{arbiter="we\"b\\"} 0
# HELP arbiter_worker_output_lines_dropped_total Lines of worker output dropped because a worker wrote faster than the relay passes on.
# TYPE arbiter_worker_output_lines_dropped_total counter
arbiter_worker_output_lines_dropped_total{arbiter="we\"b\\"} 0
# HELP arbiter_notify_dropped_total Notify datagrams dropped for coming from a uid no worker runs as.
# TYPE arbiter_notify_dropped_total counter
arbiter_notify_dropped_total{arbiter="we\"b\\"} 0
# HELP arbiter_log_failing 1 while the master's log is refusing lines.
# TYPE arbiter_log_failing gauge
arbiter_log_failing{arbiter="we\"b\\"} 0
# HELP arbiter_workers_busy Workers that say they have a request in hand.
# TYPE arbiter_workers_busy gauge
arbiter_workers_busy{arbiter="we\"b\\"} 0
# HELP arbiter_workers_idle Workers that say they have no request in hand.
# TYPE arbiter_workers_idle gauge
arbiter_workers_idle{arbiter="we\"b\\"} 3
# HELP arbiter_workers_unknown Workers that say neither (they do not use the scoreboard).
# TYPE arbiter_workers_unknown gauge
arbiter_workers_unknown{arbiter="we\"b\\"} 1
# HELP arbiter_worker_requests_total Requests served, as the worker counts them (absent if it does not report).
# TYPE arbiter_worker_requests_total counter
arbiter_worker_requests_total{arbiter="we\"b\\",id="9",slot="1",pid="999"} 41
arbiter_worker_requests_total{arbiter="we\"b\\",id="10",slot="0",pid="1001"} 41
arbiter_worker_requests_total{arbiter="we\"b\\",id="11",slot="2",pid="100234"} 41
"#;
        assert_eq!(text, want, "got:\n{text}");
    }

    #[test]
    fn every_state_has_a_series() {
        let workers = |st: &Status| {
            families(st)
                .into_iter()
                .find(|f| f.name == "arbiter_workers")
                .unwrap()
                .samples
                .into_iter()
                .map(|s| (s.labels[1].1.clone(), s.value))
                .collect::<Vec<_>>()
        };
        let mut st = fixture();
        st.workers.clear();
        let empty = workers(&st);
        assert_eq!(empty.len(), WorkerState::ALL.len());
        for state in WorkerState::ALL {
            assert!(
                empty.contains(&(state.as_str().to_string(), 0.0)),
                "{state}: {empty:?}"
            );
        }
        let mut st = fixture();
        st.workers[0].state = WorkerState::Recycling;
        st.workers[1].state = WorkerState::Unknown;
        let some = workers(&st);
        assert!(some.contains(&("recycling".into(), 1.0)), "{some:?}");
        assert!(some.contains(&("unknown".into(), 1.0)), "{some:?}");
    }

    #[test]
    fn a_slot_waiting_out_its_backoff_keeps_its_restarts_series() {
        let mut st = fixture();
        // Slot 3's worker died: no worker, a backoff entry.
        st.workers.retain(|w| w.slot != 3);
        st.master.backoff.push(arbiter_proto::status::SlotBackoff {
            slot: 3,
            failures: 4,
            next_start_secs: 1.5,
        });
        let restarts = families(&st)
            .into_iter()
            .find(|f| f.name == "arbiter_worker_restarts")
            .unwrap();
        let slot3: Vec<f64> = restarts
            .samples
            .iter()
            .filter(|s| s.labels.contains(&("slot", "3".into())))
            .map(|s| s.value)
            .collect();
        assert_eq!(slot3, [4.0], "{restarts:?}");
        // A slot of the target with no worker yet and no failure: 0, not absent.
        st.master.target = 6;
        let n = families(&st)
            .into_iter()
            .find(|f| f.name == "arbiter_worker_restarts")
            .unwrap()
            .samples
            .len();
        assert_eq!(n, 6);
    }

    #[test]
    fn two_instances_share_no_series() {
        let web = fixture();
        let mut api = fixture();
        api.master.name = "api".into();
        let mut seen = std::collections::HashSet::new();
        for st in [&web, &api] {
            for f in families(st) {
                for s in f.samples {
                    assert_eq!(s.labels[0], (INSTANCE_LABEL, st.master.name.clone()));
                    assert!(seen.insert((f.name, s.labels)), "{} twice", f.name);
                }
            }
        }
    }

    #[test]
    fn json_form() {
        let j = to_json(&families(&fixture()));
        let ready = j
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "arbiter_workers_ready")
            .unwrap();
        assert_eq!(ready["type"], "gauge");
        assert_eq!(ready["samples"][0]["value"], 3.0);
        let states = j
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "arbiter_workers")
            .unwrap();
        assert_eq!(states["samples"][1]["labels"]["state"], "booting");
    }
}
