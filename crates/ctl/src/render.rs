//! Human output: durations, sizes, the status header and the worker table.

use std::fmt::Write as _;

use arbiter_proto::status::{Inherited, Status, WorkerStatus};
use tabled::builder::Builder;
use tabled::settings::object::Columns;
use tabled::settings::{Alignment, Padding, Style};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

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

/// Seconds for the beat column: `0.4s` under 10 s, else as [`human_duration`].
fn short_secs(s: f64) -> String {
    if s.is_finite() && s < 10.0 {
        format!("{:.1}s", s.max(0.0))
    } else {
        human_duration(s)
    }
}

/// A timeout for people: `30s`, `2.5s`, `2m00s`.
fn timeout_secs(t: f64) -> String {
    if t < 60.0 && t.fract() != 0.0 {
        format!("{t:.1}s")
    } else {
        human_duration(t)
    }
}

/// The last heartbeat's age: `0.4s`, `8.8s!` once past half of the timeout (the
/// worker is halfway to being killed for silence), `1m15s!`; `-` if the worker
/// never beat. The timeout, the same for every worker, is in the column's header
/// (see [`beat_header`]), not repeated on every row.
pub fn beat_cell(age: Option<f64>, timeout: Option<f64>) -> String {
    let Some(age) = age else {
        return "-".into();
    };
    let late = timeout.is_some_and(|t| t > 0.0 && age > t / 2.0);
    format!("{}{}", short_secs(age), if late { "!" } else { "" })
}

/// The beat column's header: `BEAT/30s`, the ages below against that timeout;
/// `BEAT` with none.
pub fn beat_header(timeout: Option<f64>) -> String {
    match timeout.filter(|t| *t > 0.0) {
        Some(t) => format!("BEAT/{}", timeout_secs(t)),
        None => "BEAT".into(),
    }
}

/// CPU use in percent of one core: `0.3`, `12`, `198`; `-` if unknown.
pub fn cpu_cell(percent: Option<f64>) -> String {
    match percent {
        Some(p) if p.is_finite() && p < 9.95 => format!("{:.1}", p.max(0.0)),
        Some(p) if p.is_finite() => format!("{p:.0}"),
        _ => "-".into(),
    }
}

/// A worker's `STATUS=` text for one table cell at most `width` columns wide: control
/// characters as spaces, cut with `…` when too long; `-` if it said nothing.
pub fn status_cell(text: Option<&str>, width: usize) -> String {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return "-".into();
    };
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.width() <= width {
        return clean;
    }
    let mut out = String::new();
    let mut used = 0;
    for c in clean.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
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
        // 1023.5 would print as "1024"; go up a unit instead. From 100 on, the
        // tenth says nothing and costs the table two columns.
        if v < 99.95 {
            return format!("{v:.1}{unit}");
        }
        if v < 1023.5 || unit == "T" {
            return format!("{v:.0}{unit}");
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

/// `web (pid 4100) v0.1.0: 3/4 ready, generation 2, up 3h12m` (and `, stopping`,
/// or `, draining, 4 s left`).
pub fn master_line(m: &arbiter_proto::status::MasterStatus) -> String {
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
    if let Some(left) = m.draining_secs_left {
        let _ = write!(out, ", {} s left", left.ceil() as u64);
    }
    out
}

/// The lines above the table: the master line, then listeners and notes.
pub fn status_header(st: &Status) -> String {
    let m = &st.master;
    let mut out = master_line(m);
    out.push('\n');
    if !m.listeners.is_empty() {
        // With each listener, its accept queue (connections no worker took yet)
        // and where it came from if this master did not bind it.
        let addrs: Vec<String> = m
            .listeners
            .iter()
            .map(|l| {
                let mut notes = Vec::new();
                if let (Some(q), Some(limit)) = (l.queue, l.queue_limit) {
                    notes.push(format!("queue {q}/{limit}"));
                }
                notes.extend(l.inherited.map(|from| match (from, &l.bind) {
                    (Inherited::Systemd, _) => "from systemd".to_string(),
                    (Inherited::Upgrade, _) => "handed over at an upgrade".to_string(),
                    (Inherited::Fd, Some(bind)) => format!("from {bind}"),
                    (Inherited::Fd, None) | (Inherited::Unknown, _) => "inherited".to_string(),
                }));
                if notes.is_empty() {
                    l.address.clone()
                } else {
                    format!("{} ({})", l.address, notes.join(", "))
                }
            })
            .collect();
        let _ = writeln!(out, "listening at {}", addrs.join(", "));
    }
    for t in &m.templates {
        let _ = writeln!(
            out,
            "template of generation {}: pid {}, {}, RSS {}",
            t.generation,
            t.pid,
            t.state,
            human_bytes(t.rss_bytes)
        );
    }
    if let Some(a) = &m.autoscale {
        let _ = write!(
            out,
            "autoscaling within {}..{}: {} up, {} down",
            a.min, a.max, a.ups, a.downs
        );
        if let Some(last) = &a.last {
            let _ = write!(out, "; last {last}");
        }
        out.push('\n');
    }
    crate::recycles::line(st, &mut out);
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
pub const COLUMNS: [&str; 12] = [
    "ID", "SLOT", "PID", "GEN", "STATE", "UP", "BEAT", "↺", "CPU%", "RSS", "BUSY", "STATUS",
];

/// How wide the table may be: STATUS, last, gets what the other columns leave.
pub const TABLE_WIDTH: usize = 80;
/// The least STATUS gets when the other columns leave less (unusual rows: a
/// `recycling!` state, a beat minutes old, ids past 9999); the table is wider
/// than [`TABLE_WIDTH`] then.
const STATUS_MIN: usize = 5;
/// Between two columns.
const GAP: usize = 2;
/// Where the beat column is; its header carries the timeout.
const BEAT_COLUMN: usize = 6;

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
/// numbers right-aligned, no trailing spaces, the STATUS texts cut to keep rows
/// within [`TABLE_WIDTH`]. A crash-looping slot's worker has `!` after its state;
/// a heartbeat past half of `timeout` (seconds) has `!` after it; ↺ is the
/// failures in a row of the worker's slot.
pub fn worker_table(workers: &[WorkerStatus], timeout: Option<f64>) -> String {
    let mut rows: Vec<&WorkerStatus> = workers.iter().collect();
    rows.sort_by_key(|w| (w.id, w.pid));
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|w| {
            [
                w.id.to_string(),
                w.slot.to_string(),
                w.pid.to_string(),
                w.generation.to_string(),
                state_cell(w),
                human_duration(w.uptime_secs),
                beat_cell(w.last_beat_secs, timeout),
                w.restarts.to_string(),
                cpu_cell(w.cpu_percent),
                human_bytes(w.rss_bytes),
                busy_cell(w).to_string(),
            ]
        })
        .collect();
    let mut header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    header[BEAT_COLUMN] = beat_header(timeout);
    let before_status: usize = (0..11)
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].width())
                .chain([header[i].width()])
                .max()
                .unwrap_or(0)
                + GAP
        })
        .sum();
    let status_width = TABLE_WIDTH.saturating_sub(before_status).max(STATUS_MIN);
    let mut b = Builder::default();
    b.push_record(header);
    for (w, row) in rows.iter().zip(cells) {
        let mut record: Vec<String> = row.into();
        record.push(status_cell(w.status_text.as_deref(), status_width));
        b.push_record(record);
    }
    let mut t = b.build();
    t.with(Style::empty())
        .with(Padding::new(0, GAP, 0, 0))
        .modify(Columns::last(), Padding::zero())
        .modify(Columns::new(0..4), Alignment::right())
        .modify(Columns::new(5..10), Alignment::right());
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
    out.push_str(&worker_table(&st.workers, st.master.timeout_secs));
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
            pss_bytes: None,
            private_bytes: None,
            cpu_secs: Some(3.5),
            cpu_percent: Some(0.42),
            output_dropped: 0,
            busy: Some(false),
            requests: Some(41),
            busy_changed_secs: Some(3.0),
            max_requests: None,
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
        old.cpu_percent = Some(97.3);
        old.status_text = Some("served 1200 requests, 3 in flight, queue empty".into());
        let mut quiet = worker(11, 2, 100_234);
        quiet.last_beat_secs = Some(16.2);
        quiet.status_text = Some("idle".into());
        Status {
            master: MasterStatus {
                autoscale: None,
                templates: Vec::new(),
                host_listen_overflows: None,
                max_requests: None,
                env_keys: Vec::new(),
                generations: Vec::new(),
                recycles: Default::default(),
                pid: 1234,
                name: "web".into(),
                version: "0.1.0".into(),
                started_at: "2026-11-24T07:00:00.000Z".into(),
                uptime_secs: 11_523.5,
                state: "running".into(),
                draining_secs_left: None,
                generation: 2,
                target: 4,
                ready: 3,
                total: 4,
                listeners: vec![
                    ListenerStatus {
                        address: "http://127.0.0.1:8000".into(),
                        name: "127.0.0.1_8000".into(),
                        queue: Some(3),
                        queue_limit: Some(2048),
                        bind: Some("127.0.0.1:8000".into()),
                        inherited: None,
                    },
                    ListenerStatus {
                        address: "unix:/run/app.sock".into(),
                        name: "app".into(),
                        queue: None,
                        queue_limit: None,
                        bind: Some("unix:/run/app.sock".into()),
                        inherited: Some(Inherited::Systemd),
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
            workers: vec![worker(10, 0, 1001), booting, old, quiet],
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
    }

    #[test]
    fn beats_against_the_timeout() {
        let t = Some(10.0);
        assert_eq!(beat_cell(None, t), "-");
        assert_eq!(beat_cell(Some(0.42), t), "0.4s");
        assert_eq!(beat_cell(Some(5.0), t), "5.0s");
        // Past half the timeout: halfway to being killed for silence.
        assert_eq!(beat_cell(Some(5.04), t), "5.0s!");
        assert_eq!(beat_cell(Some(8.8), t), "8.8s!");
        assert_eq!(beat_cell(Some(75.0), Some(30.0)), "1m15s!");
        // The timeout is the header's.
        assert_eq!(beat_header(Some(2.5)), "BEAT/2.5s");
        assert_eq!(beat_header(Some(120.0)), "BEAT/2m00s");
        assert_eq!(beat_header(None), "BEAT");
        // No timeout (`-t 0`): the age alone, never marked.
        assert_eq!(beat_cell(Some(9.94), None), "9.9s");
        assert_eq!(beat_cell(Some(12.0), Some(0.0)), "12s");
        assert_eq!(beat_cell(Some(-0.1), None), "0.0s");
    }

    #[test]
    fn cpu_and_status_cells() {
        assert_eq!(cpu_cell(None), "-");
        assert_eq!(cpu_cell(Some(0.0)), "0.0");
        assert_eq!(cpu_cell(Some(0.34)), "0.3");
        assert_eq!(cpu_cell(Some(9.96)), "10");
        assert_eq!(cpu_cell(Some(198.4)), "198");
        assert_eq!(cpu_cell(Some(f64::NAN)), "-");
        assert_eq!(status_cell(None, 12), "-");
        assert_eq!(status_cell(Some("  "), 12), "-");
        assert_eq!(status_cell(Some("served 0"), 12), "served 0");
        assert_eq!(status_cell(Some("exactly 12 c"), 12), "exactly 12 c");
        assert_eq!(status_cell(Some("served 0 requests"), 12), "served 0 re…");
        assert_eq!(status_cell(Some("a\tb\nc"), 12), "a b c");
        // Wide characters count double, as the terminal shows them.
        assert_eq!(status_cell(Some("処理中の要求です"), 7), "処理中…");
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
            (Some(u64::MAX), "16777216T"),
            (Some(150 * 1024 * 1024), "150M"),
            (Some(1023 * 1024 * 1024), "1023M"),
            (None, "-"),
        ] {
            assert_eq!(human_bytes(b), want, "{b:?}");
        }
    }

    #[test]
    fn table() {
        let st = fixture();
        let text = worker_table(&st.workers, st.master.timeout_secs);
        let want = "\
ID  SLOT     PID  GEN  STATE        UP  BEAT/30s  ↺  CPU%    RSS  BUSY  STATUS
 9     1     999    2  ready     3h12m    1m15s!  0    97   1.5K  idle  served …
10     0    1001    2  ready     3m07s      0.4s  0   0.4  12.3M  idle  -
11     2  100234    2  ready     3m07s      16s!  0   0.4  12.3M  idle  idle
12     3    4321    2  booting!     2s         -  3   0.4      -  -     -
";
        assert_eq!(text, want, "got:\n{text}");
        for line in text.lines() {
            assert_eq!(line, line.trim_end());
            assert!(line.width() <= TABLE_WIDTH, "{line:?}");
        }
        let empty = worker_table(&[], None);
        assert_eq!(
            empty,
            "ID  SLOT  PID  GEN  STATE  UP  BEAT  ↺  CPU%  RSS  BUSY  STATUS\n"
        );
    }

    /// The widest normal row (a 4-digit id, a 7-digit pid as pid_max allows
    /// on 64-bit, days up, a late beat, two cores busy, a GiB resident) still
    /// fits 80 columns, and its STATUS keeps a readable part.
    #[test]
    fn a_normal_row_fits_80_columns() {
        let mut w = worker(9999, 511, 4_194_303);
        w.generation = 42;
        w.uptime_secs = 86_400.0 * 12.5;
        w.last_beat_secs = Some(9.9);
        w.restarts = 12;
        w.cpu_percent = Some(199.6);
        w.rss_bytes = Some(1000 * 1024 * 1024);
        w.status_text = Some("x".repeat(200));
        let text = worker_table(&[w], Some(30.0));
        for line in text.lines() {
            assert!(
                line.width() <= TABLE_WIDTH,
                "{} wide: {line:?}",
                line.width()
            );
        }
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.ends_with(&format!("{}…", "x".repeat(STATUS_MIN - 1))),
            "{row:?}"
        );
    }

    #[test]
    fn header() {
        let st = fixture();
        let text = status_header(&st);
        let want = "\
web (pid 1234) v0.1.0: 3/4 ready, generation 2, up 3h12m
listening at http://127.0.0.1:8000 (queue 3/2048), unix:/run/app.sock (from systemd)
last reload: generation 2 ok at 2026-11-24 09:58:01 UTC: 4 workers ready in 1.2s
slot 3 is crash-looping (3 failures in a row)
";
        assert_eq!(text, want, "got:\n{text}");
        assert!(status_text(&st).starts_with(want));
    }

    #[test]
    fn listeners_say_where_they_came_from() {
        let mut st = fixture();
        let ls = &mut st.master.listeners;
        ls[0].inherited = Some(Inherited::Upgrade);
        ls[1].inherited = Some(Inherited::Fd);
        ls[1].bind = Some("fd://3".into());
        let text = status_header(&st);
        let line = text.lines().nth(1).unwrap();
        assert_eq!(
            line,
            "listening at http://127.0.0.1:8000 (queue 3/2048, handed over at an upgrade), \
             unix:/run/app.sock (from fd://3)"
        );
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
