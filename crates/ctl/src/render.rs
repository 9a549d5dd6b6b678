//! Human output: durations, sizes, the status header and the worker table.

use std::fmt::Write as _;

use arbiter_proto::status::{Status, WorkerStatus};
use tabled::builder::Builder;
use tabled::settings::object::Columns;
use tabled::settings::{Alignment, Padding, Style};

/// A duration for people: `45s`, `3m07s`, `2h05m`, `4d03h` (rounded down; negative
/// or not finite counts as 0).
pub fn human_duration(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// How long ago the last heartbeat was: `0.4s ago` under 10 s, else `45s ago`,
/// `3m07s ago`...; `-` if the worker never beat.
pub fn last_beat(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s.is_finite() && s < 10.0 => format!("{:.1}s ago", s.max(0.0)),
        Some(s) => format!("{} ago", human_duration(s)),
    }
}

/// A size in bytes, binary units with one decimal: `512B`, `4.0K`, `12.3M`, `1.5G`;
/// `-` if unknown.
pub fn human_bytes(bytes: Option<u64>) -> String {
    let Some(b) = bytes else {
        return "-".into();
    };
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    for unit in ["K", "M", "G", "T"] {
        // 1023.95 would print as "1024.0"; go up a unit instead.
        if v < 1023.95 || unit == "T" {
            return format!("{v:.1}{unit}");
        }
        v /= 1024.0;
    }
    unreachable!()
}

/// An RFC 3339 moment from the master, shortened for people: `2026-11-24 10:34:39 UTC`
/// (as sent if it does not parse).
pub fn human_time(rfc3339: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
        Err(_) => rfc3339.to_string(),
    }
}

/// The lines above the table: the master line, then listeners and notes.
pub fn status_header(st: &Status) -> String {
    let m = &st.master;
    let mut out = format!(
        "{} (pid {}) v{}: {}/{} ready, generation {}, up {}",
        m.name,
        m.pid,
        m.version,
        m.ready,
        m.target,
        m.generation,
        human_duration(m.uptime_secs)
    );
    if m.state != "running" {
        let _ = write!(out, ", {}", m.state);
    }
    out.push('\n');
    if !m.listeners.is_empty() {
        let addrs: Vec<&str> = m.listeners.iter().map(|l| l.address.as_str()).collect();
        let _ = writeln!(out, "listening at {}", addrs.join(", "));
    }
    if let Some(r) = &m.reload {
        let _ = writeln!(
            out,
            "reload in flight: generation {} -> {} for {}",
            r.from_generation,
            r.to_generation,
            human_duration(r.elapsed_secs)
        );
    }
    if let Some(r) = &m.last_reload {
        let outcome = if r.ok { "ok" } else { "FAILED" };
        let _ = match r.generation {
            Some(g) => write!(
                out,
                "last reload: generation {g} {outcome} at {}",
                human_time(&r.at)
            ),
            None => write!(
                out,
                "last reload: {outcome} at {}, before starting a generation (generation {} serves on)",
                human_time(&r.at),
                m.generation
            ),
        };
        if !r.message.is_empty() {
            let _ = write!(out, ": {}", r.message);
        }
        out.push('\n');
    }
    if let Some(u) = &m.upgrade {
        let _ = writeln!(out, "upgrade in flight: {u}");
    }
    match (&m.log.failing, m.log.lines_dropped) {
        (Some(e), n) => {
            let _ = writeln!(out, "LOG FAILING: {e} ({n} lines lost so far)");
        }
        (None, 0) => {}
        (None, n) => {
            let _ = writeln!(out, "log: {n} lines lost earlier; writing again");
        }
    }
    if m.output_lines_dropped > 0 {
        let n = m.output_lines_dropped;
        let _ = writeln!(out, "worker output: {n} lines dropped (written too fast)");
    }
    let mut looping: Vec<(u64, u64)> = st
        .workers
        .iter()
        .filter(|w| w.crash_looping)
        .map(|w| (w.slot, w.restarts))
        .collect();
    looping.sort_unstable();
    looping.dedup_by_key(|(slot, _)| *slot);
    for (slot, restarts) in looping {
        let _ = writeln!(
            out,
            "slot {slot} is crash-looping ({restarts} failures in a row)"
        );
    }
    // A slot waiting out its backoff has no worker to show in the table.
    for b in &m.backoff {
        if !st
            .workers
            .iter()
            .any(|w| w.slot == b.slot && w.generation == m.generation)
        {
            let _ = writeln!(
                out,
                "slot {} has no worker: {} failures in a row, next start in {:.1}s",
                b.slot, b.failures, b.next_start_secs
            );
        }
    }
    out
}

/// The table columns.
pub const COLUMNS: [&str; 9] = [
    "ID",
    "SLOT",
    "PID",
    "GEN",
    "STATE",
    "UP",
    "LAST BEAT",
    "RSS",
    "BUSY",
];

/// From the scoreboard: `busy`, `idle`, or `-` for a worker that does not say
/// (which is not idle).
fn busy_cell(w: &WorkerStatus) -> &'static str {
    match w.busy {
        Some(true) => "busy",
        Some(false) => "idle",
        None => "-",
    }
}

fn state_cell(w: &WorkerStatus) -> String {
    if w.crash_looping {
        format!("{}!", w.state)
    } else {
        w.state.to_string()
    }
}

/// The worker table (by worker id): no borders, two spaces between columns,
/// numbers right-aligned, no trailing spaces. A crash-looping slot's worker has `!`
/// after its state.
pub fn worker_table(workers: &[WorkerStatus]) -> String {
    let mut rows: Vec<&WorkerStatus> = workers.iter().collect();
    rows.sort_by_key(|w| (w.id, w.pid));
    let mut b = Builder::default();
    b.push_record(COLUMNS);
    for w in rows {
        b.push_record([
            w.id.to_string(),
            w.slot.to_string(),
            w.pid.to_string(),
            w.generation.to_string(),
            state_cell(w),
            human_duration(w.uptime_secs),
            last_beat(w.last_beat_secs),
            human_bytes(w.rss_bytes),
            busy_cell(w).to_string(),
        ]);
    }
    let mut t = b.build();
    t.with(Style::empty())
        .with(Padding::new(0, 2, 0, 0))
        .modify(Columns::last(), Padding::zero())
        .modify(Columns::new(0..4), Alignment::right())
        .modify(Columns::new(5..8), Alignment::right());
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `status` for people: the header, then the table.
pub fn status_text(st: &Status) -> String {
    let mut out = status_header(st);
    out.push_str(&worker_table(&st.workers));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arbiter_proto::status::{ListenerStatus, MasterStatus, ReloadOutcome, WorkerState};

    pub(crate) fn worker(id: u64, slot: u64, pid: i32) -> WorkerStatus {
        WorkerStatus {
            id,
            slot,
            pid,
            generation: 2,
            state: WorkerState::Ready,
            started_at: "2026-11-24T10:00:00.000Z".into(),
            uptime_secs: 187.9,
            last_beat_secs: Some(0.42),
            status_text: None,
            restarts: 0,
            crash_looping: false,
            rss_bytes: Some(12_900_000),
            cpu_secs: None,
            output_dropped: 0,
            busy: Some(false),
            requests: Some(41),
            busy_changed_secs: Some(3.0),
        }
    }

    /// A fixed snapshot: 3 of 4 ready, one booting with no beat and no RSS yet.
    pub(crate) fn fixture() -> Status {
        let mut booting = worker(12, 3, 4321);
        booting.state = WorkerState::Booting;
        booting.uptime_secs = 2.0;
        booting.last_beat_secs = None;
        booting.rss_bytes = None;
        booting.restarts = 3;
        booting.crash_looping = true;
        booting.busy = None;
        booting.requests = None;
        booting.busy_changed_secs = None;
        let mut busy = worker(10, 0, 1001);
        busy.busy = Some(true);
        busy.requests = Some(7);
        let mut old = worker(9, 1, 999);
        old.uptime_secs = 11_520.0;
        old.last_beat_secs = Some(75.0);
        old.rss_bytes = Some(1536);
        Status {
            master: MasterStatus {
                pid: 1234,
                name: "web".into(),
                version: "0.1.0".into(),
                started_at: "2026-11-24T07:00:00.000Z".into(),
                uptime_secs: 11_523.5,
                state: "running".into(),
                generation: 2,
                target: 4,
                ready: 3,
                total: 4,
                listeners: vec![
                    ListenerStatus {
                        address: "http://127.0.0.1:8000".into(),
                        name: "127.0.0.1_8000".into(),
                    },
                    ListenerStatus {
                        address: "unix:/run/app.sock".into(),
                        name: "app".into(),
                    },
                ],
                reload: None,
                last_reload: Some(ReloadOutcome {
                    generation: Some(2),
                    ok: true,
                    message: "4 workers ready in 1.2s".into(),
                    at: "2026-11-24T09:58:01.123Z".into(),
                }),
                upgrade: None,
                reloads: 1,
                upgrades: 0,
                worker_failures: 5,
                workers_spawned: 12,
                timeout_secs: Some(30.0),
                backoff: Vec::new(),
                log: Default::default(),
                notify_dropped: 0,
                containment: "process groups".into(),
                output_lines_dropped: 0,
                workers_busy: 1,
                workers_idle: 2,
                workers_unknown: 1,
            },
            workers: vec![busy, booting, old, worker(11, 2, 100_234)],
        }
    }

    #[test]
    fn durations() {
        for (s, want) in [
            (0.0, "0s"),
            (0.4, "0s"),
            (45.9, "45s"),
            (59.99, "59s"),
            (60.0, "1m00s"),
            (187.0, "3m07s"),
            (3599.0, "59m59s"),
            (3600.0, "1h00m"),
            (7500.0, "2h05m"),
            (86_399.0, "23h59m"),
            (86_400.0, "1d00h"),
            (356_400.0, "4d03h"),
            (-5.0, "0s"),
            (f64::NAN, "0s"),
            (f64::INFINITY, "0s"),
        ] {
            assert_eq!(human_duration(s), want, "{s}");
        }
        assert_eq!(last_beat(None), "-");
        assert_eq!(last_beat(Some(0.42)), "0.4s ago");
        assert_eq!(last_beat(Some(9.94)), "9.9s ago");
        assert_eq!(last_beat(Some(12.0)), "12s ago");
        assert_eq!(last_beat(Some(75.0)), "1m15s ago");
        assert_eq!(last_beat(Some(-0.1)), "0.0s ago");
    }

    #[test]
    fn sizes() {
        for (b, want) in [
            (Some(0), "0B"),
            (Some(1023), "1023B"),
            (Some(1024), "1.0K"),
            (Some(1536), "1.5K"),
            (Some(4_575_232), "4.4M"),
            (Some(12_900_000), "12.3M"),
            (Some(1024 * 1024 - 1), "1.0M"),
            (Some(1_610_612_736), "1.5G"),
            (Some(5 * 1024u64.pow(4)), "5.0T"),
            (Some(u64::MAX), "16777216.0T"),
            (None, "-"),
        ] {
            assert_eq!(human_bytes(b), want, "{b:?}");
        }
    }

    #[test]
    fn table() {
        let st = fixture();
        let text = worker_table(&st.workers);
        let want = "\
ID  SLOT     PID  GEN  STATE        UP  LAST BEAT    RSS  BUSY
 9     1     999    2  ready     3h12m  1m15s ago   1.5K  idle
10     0    1001    2  ready     3m07s   0.4s ago  12.3M  busy
11     2  100234    2  ready     3m07s   0.4s ago  12.3M  idle
12     3    4321    2  booting!     2s          -      -  -
";
        assert_eq!(text, want, "got:\n{text}");
        for line in text.lines() {
            assert_eq!(line, line.trim_end());
        }
        let empty = worker_table(&[]);
        assert_eq!(
            empty,
            "ID  SLOT  PID  GEN  STATE  UP  LAST BEAT  RSS  BUSY\n"
        );
    }

    #[test]
    fn header() {
        let st = fixture();
        let text = status_header(&st);
        let want = "\
web (pid 1234) v0.1.0: 3/4 ready, generation 2, up 3h12m
listening at http://127.0.0.1:8000, unix:/run/app.sock
last reload: generation 2 ok at 2026-11-24 09:58:01 UTC: 4 workers ready in 1.2s
slot 3 is crash-looping (3 failures in a row)
";
        assert_eq!(text, want, "got:\n{text}");
        assert!(status_text(&st).starts_with(want));
    }

    #[test]
    fn times() {
        assert_eq!(
            human_time("2026-11-24T10:34:35.413Z"),
            "2026-11-24 10:34:35 UTC"
        );
        assert_eq!(
            human_time("2026-11-24T11:34:35+01:00"),
            "2026-11-24 10:34:35 UTC"
        );
        assert_eq!(human_time("yesterday"), "yesterday");
    }
}
