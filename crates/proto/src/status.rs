//! The status snapshot: what `arbiterctl status` shows and `--json` prints.
//!
//! Ages and durations are measured by the master on its monotonic clock and sent
//! as seconds; wall-clock moments are RFC 3339 UTC strings. Clients format; they do
//! not subtract their own clock from the master's.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub master: MasterStatus,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MasterStatus {
    pub pid: i32,
    pub name: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub uptime_secs: f64,
    /// `running`, `draining` (the `--shutdown-delay` window of a stop: serving
    /// on, not ready), `stopping`.
    pub state: String,
    /// In the drain window: the seconds it has left.
    #[serde(default)]
    pub draining_secs_left: Option<f64>,
    /// The generation new workers belong to.
    pub generation: u64,
    /// The target worker count.
    pub target: u64,
    /// Workers serving now (ready), of any generation: during a reload the old
    /// ones count until new ones replace them.
    pub ready: u64,
    /// Every worker process the master has, whatever its state.
    pub total: u64,
    pub listeners: Vec<ListenerStatus>,
    pub reload: Option<ReloadInFlight>,
    pub last_reload: Option<ReloadOutcome>,
    /// An upgrade (new master) in flight.
    pub upgrade: Option<String>,
    pub reloads: u64,
    pub upgrades: u64,
    /// Workers that died without being asked to, since the master started.
    pub worker_failures: u64,
    /// Workers spawned since the master started.
    pub workers_spawned: u64,
    pub timeout_secs: Option<f64>,
    /// Slots whose worker keeps failing and that wait out a restart backoff: with
    /// no worker alive in them, this is where they show.
    #[serde(default)]
    pub backoff: Vec<SlotBackoff>,
    /// The master's own log (`--log-file`, or stderr).
    #[serde(default)]
    pub log: LogStatus,
    /// Datagrams dropped at the notify socket for coming from a uid no worker
    /// runs as, since the master started.
    #[serde(default)]
    pub notify_dropped: u64,
    /// How workers' process trees are held: `cgroup v2 (PATH)` or `process groups`.
    #[serde(default)]
    pub containment: String,
    /// Lines of worker output dropped (a worker writing faster than the relay
    /// passes on), since the master started.
    #[serde(default)]
    pub output_lines_dropped: u64,
    /// Workers that say, on the scoreboard, that they have a request in hand.
    #[serde(default)]
    pub workers_busy: u64,
    /// Workers that say they have none.
    #[serde(default)]
    pub workers_idle: u64,
    /// Workers that say neither (they do not use the scoreboard, or got no entry).
    #[serde(default)]
    pub workers_unknown: u64,
    /// `--preload`: the templates alive, oldest generation first.
    #[serde(default)]
    pub templates: Vec<TemplateStatus>,
    /// `--workers MIN..MAX`: adapting the count to the load; `None` for a fixed count.
    #[serde(default)]
    pub autoscale: Option<AutoscaleStatus>,
    /// The host's `TcpExt: ListenOverflows` (/proc/net/netstat): connections any
    /// listener on this host dropped for a full accept queue. Host-wide, not ours.
    #[serde(default)]
    pub host_listen_overflows: Option<u64>,
    /// `--max-requests` and `--max-requests-jitter`; `None`: off.
    #[serde(default)]
    pub max_requests: Option<MaxRequests>,
    /// The names (never the values) of the variables the configuration sets in
    /// the environment of the generation new workers belong to (`--env`,
    /// `[env]`, env-file).
    #[serde(default)]
    pub env_keys: Vec<String>,
    /// Every generation with a worker or a template, oldest first, and the names
    /// of the variables it was started with: during a reload the old generation
    /// keeps its own.
    #[serde(default)]
    pub generations: Vec<GenerationEnv>,
    /// Recycles started since the master started (a replacement first, then a
    /// graceful stop), by reason: `max-requests`, `max-worker-age`,
    /// `max-worker-rss`, `asked` (`ARBITER_RECYCLE=1`).
    #[serde(default)]
    pub recycles: std::collections::BTreeMap<String, u64>,
}

/// A generation alive and its environment's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationEnv {
    pub generation: u64,
    pub env_keys: Vec<String>,
}

/// `--max-requests N --max-requests-jitter J`: each worker's limit is N plus its
/// own draw of 0..=J.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaxRequests {
    pub limit: u64,
    pub jitter: u64,
}

/// `--preload`: a generation's template, which loaded the application once and
/// forks its workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateStatus {
    pub generation: u64,
    pub pid: i32,
    /// `loading` or `ready`.
    pub state: String,
    pub rss_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub min: u64,
    pub max: u64,
    /// Workers added and removed for the load, since the master started.
    pub ups: u64,
    pub downs: u64,
    /// The latest change and its reason (`2 -> 3: connections waited ...`).
    pub last: Option<String>,
}

/// Whether the master's log is taking its lines: a full disk or a log reader that
/// stopped reading costs lines, never the master.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogStatus {
    /// Lines the master could not write, since it started.
    pub lines_dropped: u64,
    /// Set while the log is refusing lines: the last write error. Cleared by the
    /// first line that gets through.
    pub failing: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotBackoff {
    pub slot: u64,
    /// Failures in a row.
    pub failures: u64,
    /// Seconds until the next start; 0 when it is due.
    pub next_start_secs: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `http://127.0.0.1:8000`, `unix:/run/app.sock`.
    pub address: String,
    /// Its `LISTEN_FDNAMES` entry.
    pub name: String,
    /// Connections waiting in its accept queue now (read when status is asked),
    /// and the queue's limit; `None` when the kernel does not say.
    #[serde(default)]
    pub queue: Option<u64>,
    #[serde(default)]
    pub queue_limit: Option<u64>,
    /// The bind that names it (`127.0.0.1:8000`, `unix:/run/app.sock`, `fd://3`),
    /// as resolved: the one it was bound from, or the one that resolves to an
    /// inherited socket's address; `None` for an inherited socket that no bind
    /// names, served all the same.
    #[serde(default)]
    pub bind: Option<String>,
    /// Where the socket came from; `None`: this master bound it.
    #[serde(default)]
    pub inherited: Option<Inherited>,
}

/// Where an inherited listener came from. On the wire a lowercase string; one
/// this build does not know reads as [`Inherited::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inherited {
    /// Socket activation: systemd made it and holds it (also once an upgrade
    /// passed it on to a new master). Its socket file is systemd's.
    Systemd,
    /// An earlier master bound it and handed it over at an upgrade.
    Upgrade,
    /// `fd://N`: opened by whoever started the master.
    Fd,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadInFlight {
    pub from_generation: u64,
    pub to_generation: u64,
    pub elapsed_secs: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The generation the reload started; `None` when it failed before starting
    /// one (the config file did not parse): the serving generation is untouched.
    pub generation: Option<u64>,
    pub ok: bool,
    pub message: String,
    /// RFC 3339, UTC.
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The spawn counter (gunicorn's age).
    pub id: u64,
    pub slot: u64,
    pub pid: i32,
    pub generation: u64,
    pub state: WorkerState,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub uptime_secs: f64,
    /// Seconds since the last heartbeat; `None` if it never beat.
    pub last_beat_secs: Option<f64>,
    /// What the worker said with `STATUS=`.
    pub status_text: Option<String>,
    /// Consecutive failures of this worker's slot.
    pub restarts: u64,
    pub crash_looping: bool,
    /// Resident set size in bytes, from /proc, read at most a second before.
    pub rss_bytes: Option<u64>,
    /// `--preload` only (reading it walks the process's page tables): the worker's
    /// proportional set size (shared pages divided among their sharers) and its
    /// private pages, from `/proc/PID/smaps_rollup`, in bytes. What preloading
    /// saves shows as PSS far below RSS, and private pages far below both.
    #[serde(default)]
    pub pss_bytes: Option<u64>,
    #[serde(default)]
    pub private_bytes: Option<u64>,
    /// CPU seconds used so far: by the worker's whole tree where it has a cgroup,
    /// else by its main process and the children it reaped; read at most a
    /// second before.
    #[serde(default)]
    pub cpu_secs: Option<f64>,
    /// CPU use in percent of one core (200 is two cores busy) since the reading
    /// an earlier status used, at least a second before, or since the spawn.
    /// The master reads when asked, and between statuses that come at most
    /// 1.5 s apart (`top`), so that the next finds the readings taken; nobody
    /// asking, it reads nothing.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Lines of this worker's output dropped so far (it wrote faster than the
    /// relay passes on).
    #[serde(default)]
    pub output_dropped: u64,
    /// From the scoreboard: `true` busy, `false` idle, `None` not reporting
    /// (unknown, which is not idle).
    #[serde(default)]
    pub busy: Option<bool>,
    /// Requests served, as the worker counts them on the scoreboard.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Seconds since the worker last went busy or idle.
    #[serde(default)]
    pub busy_changed_secs: Option<f64>,
    /// Its `--max-requests` limit (jitter included), for a worker that counts
    /// requests on the scoreboard; `None` when off, or for a worker that does not
    /// count (it is never recycled by count).
    #[serde(default)]
    pub max_requests: Option<u64>,
}

/// Where a worker is in its life, as the master reports it.
///
/// On the wire a lowercase string (`"ready"`). A state this build does not know (sent
/// by a newer master) reads as [`WorkerState::Unknown`] rather than failing the
/// whole snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Forked; not ready yet.
    Booting,
    /// Serving.
    Ready,
    /// Serving, but marked for replacement (`--max-worker-age`, `--max-worker-rss`,
    /// or an old generation during a reload).
    Recycling,
    /// Asked to stop; KILL at the graceful deadline.
    Stopping,
    /// Sent ABRT for a heartbeat timeout.
    Aborted,
    /// Sent KILL; waiting to be reaped.
    Killed,
    /// Not a state this build knows; never sent by a master of this version.
    #[serde(other)]
    Unknown,
}

impl WorkerState {
    /// Every state a master of this version sends, in life order.
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Booting,
        WorkerState::Ready,
        WorkerState::Recycling,
        WorkerState::Stopping,
        WorkerState::Aborted,
        WorkerState::Killed,
    ];

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Booting => "booting",
            WorkerState::Ready => "ready",
            WorkerState::Recycling => "recycling",
            WorkerState::Stopping => "stopping",
            WorkerState::Aborted => "aborted",
            WorkerState::Killed => "killed",
            WorkerState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for WorkerState {
    /// The wire form back; anything else is [`WorkerState::Unknown`], as in
    /// deserialization.
    fn from(s: &str) -> WorkerState {
        WorkerState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(WorkerState::Unknown)
    }
}

/// Compares with the wire form, so code written against the string field reads
/// the same.
impl PartialEq<&str> for WorkerState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Status {
    /// Fewer ready workers than the target (`arbiterctl status` exits 4).
    pub fn degraded(&self) -> bool {
        self.master.ready < self.master.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_states_on_the_wire() {
        for st in WorkerState::ALL {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
            assert_eq!(serde_json::from_str::<WorkerState>(&json).unwrap(), st);
            assert_eq!(WorkerState::from(st.as_str()), st);
            assert_eq!(st.to_string(), st.as_str());
        }
        // A newer master's state does not make the snapshot unreadable.
        assert_eq!(
            serde_json::from_str::<WorkerState>("\"hibernating\"").unwrap(),
            WorkerState::Unknown
        );
        assert_eq!(WorkerState::from("Ready"), WorkerState::Unknown);
        assert!(serde_json::from_str::<WorkerState>("3").is_err());
        assert!(WorkerState::Ready == "ready");
        assert!(WorkerState::Ready != "recycling");
    }

    #[test]
    fn listener_origins_on_the_wire() {
        let l: ListenerStatus =
            serde_json::from_str(r#"{"address":"http://127.0.0.1:8000","name":"http"}"#).unwrap();
        assert_eq!(
            (l.bind, l.inherited),
            (None, None),
            "an older master's snapshot"
        );
        for (o, wire) in [
            (Inherited::Systemd, "\"systemd\""),
            (Inherited::Upgrade, "\"upgrade\""),
            (Inherited::Fd, "\"fd\""),
        ] {
            assert_eq!(serde_json::to_string(&o).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Inherited>(wire).unwrap(), o);
        }
        assert_eq!(
            serde_json::from_str::<Inherited>("\"inetd\"").unwrap(),
            Inherited::Unknown
        );
    }
}
