//! `arbiterctl`: drive a running `arbiterd` over its Unix control socket.
//!
//! ```text
//! arbiterctl [--name NAME | --control PATH | --pid PIDFILE] [--json] [--timeout SECS] COMMAND
//! ```
//!
//! Commands: `status`, `scale +N|-N|N`, `reload`, `upgrade [--binary PATH]`,
//! `reopen`, `stop [--fast]`, `kill PID [--signal SIG]`, `metrics`, `ping`,
//! `version`. `--json` prints one JSON document on stdout: the master's reply
//! object (`status`: the status snapshot; `metrics`: the metric families), or
//! `{"error":{"kind":..,"message":..}}`.
//!
//! Exit status: [`EXIT_OK`] 0 done, [`EXIT_FAILED`] 1 the master refused or the
//! action failed (one line `arbiterctl: ...` on stderr), [`EXIT_USAGE`] 2 usage
//! error, [`EXIT_NO_MASTER`] 3 no master answering, [`EXIT_DEGRADED`] 4 (`status`
//! only) running but fewer workers ready than the target, [`EXIT_STOPPING`] 5
//! (`status` only) the master is stopping: in its drain window or after.
//!
//! Output is written once, at the end, and a closed stdout (`arbiterctl status |
//! head -1`) is not an error: the exit status stays the command's.

pub mod cli;
pub mod metrics;
mod recycles;
pub mod render;
pub mod resolve;
mod top;
mod upgrade;

pub use upgrade::{TAKEOVER_TIMEOUT, UPGRADE_READY_DEFAULT, UPGRADE_SLACK};

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use arbiter_proto::client::{Client, ClientError};
use arbiter_proto::control::{ErrorBody, PROTOCOL_VERSION, Reply, Request};
use serde_json::{Value, json};

use crate::cli::{Cli, Command, Timeout};
use crate::resolve::{ResolveError, Target};

/// Done.
pub const EXIT_OK: u8 = 0;
/// The master refused, or the action failed.
pub const EXIT_FAILED: u8 = 1;
/// A usage error (clap's own exit status).
pub const EXIT_USAGE: u8 = 2;
/// No master answering: nothing listens on the socket, or no answer in time.
pub const EXIT_NO_MASTER: u8 = 3;
/// `status` only: running, but fewer ready workers than the target.
pub const EXIT_DEGRADED: u8 = 4;
/// `status` only: the master is stopping, in its drain window (`--shutdown-delay`:
/// serving on, `/readyz` 503) or after it. Wins over [`EXIT_DEGRADED`].
pub const EXIT_STOPPING: u8 = 5;

/// Connect and quick requests, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// `reload` and `stop` are answered when done: their default bound.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(120);

/// The program: parse the command line (usage errors exit 2), run, print.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_checked(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&args, e),
    };
    let report = run(&cli);
    report.emit()
}

/// A command line clap refused (or `--help`, `--version`). With `--json` a script
/// reads stdout, so it gets the error as JSON there, as for any other failure:
/// `{"error":{"kind":"usage","message":..}}`. stderr has clap's text either way
/// (with its tip), and the exit status is 2.
fn usage_error(args: &[std::ffi::OsString], e: clap::Error) -> ExitCode {
    // `--json` as given, before any `--` (after it, it would be a value).
    let json = args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json");
    if !json || !e.use_stderr() {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    let _ = e.print();
    Report {
        stdout: json_line(&json!({"error": {"kind": "usage", "message": message}})),
        stderr: Vec::new(),
        code: EXIT_USAGE,
    }
    .emit()
}

/// What a run prints and how it exits.
#[derive(Debug, Default)]
struct Report {
    stdout: String,
    /// Lines for stderr, each printed as `arbiterctl: LINE`.
    stderr: Vec<String>,
    code: u8,
}

impl Report {
    fn emit(self) -> ExitCode {
        let mut code = self.code;
        if !self.stdout.is_empty() {
            let mut out = io::stdout().lock();
            match out
                .write_all(self.stdout.as_bytes())
                .and_then(|()| out.flush())
            {
                Ok(()) => {}
                // A reader that stopped reading (`| head -1`) is not our failure.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    let _ = writeln!(io::stderr(), "arbiterctl: writing the output: {e}");
                    if code == EXIT_OK {
                        code = EXIT_FAILED;
                    }
                }
            }
        }
        let mut err = io::stderr().lock();
        for line in &self.stderr {
            let _ = writeln!(err, "arbiterctl: {line}");
        }
        ExitCode::from(code)
    }
}

/// Why a command did not do what it was asked.
#[derive(Debug)]
enum Fail {
    /// No answer from a master (or none found): exit 3 when unreachable.
    Client(ClientError),
    /// The master answered with an error: exit 1.
    Master(ErrorBody),
    /// No master found for `--pid`.
    Resolve(ResolveError),
    /// Something else went wrong on our side: exit 1.
    Other { kind: &'static str, message: String },
}

impl Fail {
    fn code(&self) -> u8 {
        match self {
            Fail::Client(e) if e.is_unreachable() => EXIT_NO_MASTER,
            Fail::Resolve(ResolveError::NoMaster(_)) => EXIT_NO_MASTER,
            _ => EXIT_FAILED,
        }
    }

    fn kind(&self) -> Value {
        match self {
            Fail::Client(e) => e.kind().into(),
            Fail::Master(b) => serde_json::to_value(b.kind).unwrap_or(Value::Null),
            Fail::Resolve(ResolveError::NoMaster(_)) => "no_master".into(),
            Fail::Resolve(ResolveError::Failed(_)) => "failed".into(),
            Fail::Other { kind, .. } => (*kind).into(),
        }
    }

    fn message(&self) -> String {
        match self {
            Fail::Client(e) => e.to_string(),
            Fail::Master(b) => b.message.clone(),
            Fail::Resolve(ResolveError::NoMaster(m) | ResolveError::Failed(m)) => m.clone(),
            Fail::Other { message, .. } => message.clone(),
        }
    }

    fn json(&self) -> Value {
        json!({"error": {"kind": self.kind(), "message": self.message()}})
    }
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        Fail::Client(e)
    }
}

fn unexpected(what: &str, reply: &Reply) -> Fail {
    Fail::Other {
        kind: "protocol_error",
        message: format!("unexpected reply to {what}: {reply:?}"),
    }
}

/// A command's success: text for people, the JSON document, the exit status.
struct Done {
    human: String,
    /// The JSON document, serialized (struct field order kept).
    json: String,
    code: u8,
    /// A note for stderr that does not change the outcome.
    note: Option<String>,
}

impl Done {
    fn new(human: impl Into<String>, json: String) -> Done {
        Done {
            human: human.into(),
            json,
            code: EXIT_OK,
            note: None,
        }
    }

    fn reply(human: impl Into<String>, reply: &Reply) -> Done {
        Done::new(human, json_string(reply))
    }
}

/// One JSON document on one line.
fn json_string<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        json!({"error": {"kind": "protocol_error", "message": e.to_string()}}).to_string()
    })
}

fn json_line<T: serde::Serialize + ?Sized>(v: &T) -> String {
    let mut s = json_string(v);
    s.push('\n');
    s
}

fn ensure_newline(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

fn run(cli: &Cli) -> Report {
    if cli.command == Command::Version {
        return version(cli);
    }
    if let Command::Top { once, interval } = cli.command {
        return top::run(cli, once, interval);
    }
    match execute(cli) {
        Ok(done) => Report {
            stdout: if cli.json {
                format!("{}\n", done.json)
            } else {
                ensure_newline(done.human)
            },
            stderr: done.note.into_iter().collect(),
            code: done.code,
        },
        Err(fail) => Report {
            stdout: if cli.json {
                json_line(&fail.json())
            } else {
                String::new()
            },
            stderr: vec![fail.message()],
            code: fail.code(),
        },
    }
}

/// The socket to talk to, connected.
fn connect_target(cli: &Cli) -> Result<(Target, Client), Fail> {
    let target = if let Some(p) = &cli.control {
        Target {
            path: p.clone(),
            pid: None,
        }
    } else if let Some(pidfile) = &cli.pid {
        resolve::from_pidfile(pidfile).map_err(Fail::Resolve)?
    } else {
        return connect_by_name(cli, cli.name.as_deref().unwrap_or("arbiter"));
    };
    let client = connect(cli, &target.path)?;
    Ok((target, client))
}

/// The first place a master named `name` answers, whatever our own environment
/// says the default is; when none does, every path tried and why.
fn connect_by_name(cli: &Cli, name: &str) -> Result<(Target, Client), Fail> {
    let candidates = arbiter_proto::paths::control_path_candidates(
        std::ffi::OsStr::new(name),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        nix::unistd::getuid().as_raw(),
    );
    let mut tried = Vec::new();
    for path in candidates {
        match connect(cli, &path) {
            Ok(client) => return Ok((Target { path, pid: None }, client)),
            Err(Fail::Client(ClientError::NoMaster { path, source })) => {
                tried.push((path, source));
            }
            Err(e) => return Err(e),
        }
    }
    // One place only: the client's own words, as with --control.
    if tried.len() == 1
        && let Some((path, source)) = tried.pop()
    {
        return Err(Fail::Client(ClientError::NoMaster { path, source }));
    }
    let shown: Vec<String> = tried
        .iter()
        .map(|(p, e)| format!("{} ({e})", p.display()))
        .collect();
    Err(Fail::Resolve(ResolveError::NoMaster(format!(
        "no master named {name} answering; tried {}",
        shown.join(", ")
    ))))
}

/// `--timeout` if given (`None` inside: no bound), else `default`.
fn bound(cli: &Cli, default: Duration) -> Option<Duration> {
    match cli.timeout {
        Some(Timeout(t)) => t,
        None => Some(default),
    }
}

fn connect(cli: &Cli, path: &Path) -> Result<Client, Fail> {
    let t = bound(cli, DEFAULT_TIMEOUT).unwrap_or(Duration::MAX);
    Ok(Client::connect_trusting(path, t, &cli.trust_uid)?)
}

/// Send `req` within `timeout`; the master's error becomes [`Fail::Master`].
fn ask(client: &mut Client, req: &Request, timeout: Option<Duration>) -> Result<Reply, Fail> {
    client
        .call_with_timeout(req, timeout)?
        .into_result()
        .map_err(Fail::Master)
}

fn execute(cli: &Cli) -> Result<Done, Fail> {
    let (target, mut client) = connect_target(cli)?;
    let quick = bound(cli, DEFAULT_TIMEOUT);
    match &cli.command {
        Command::Status => match ask(&mut client, &Request::Status, quick)? {
            Reply::Status(st) => Ok(Done {
                human: render::status_text(&st),
                json: json_string(&*st),
                code: if st.master.state != "running" {
                    EXIT_STOPPING
                } else if st.degraded() {
                    EXIT_DEGRADED
                } else {
                    EXIT_OK
                },
                note: None,
            }),
            other => Err(unexpected("status", &other)),
        },
        Command::Metrics => match ask(&mut client, &Request::Status, quick)? {
            Reply::Status(st) => {
                let fams = metrics::families(&st);
                Ok(Done::new(
                    metrics::render(&fams),
                    json_string(&metrics::to_json(&fams)),
                ))
            }
            other => Err(unexpected("status", &other)),
        },
        Command::Scale { spec } => match ask(&mut client, &spec.request(), quick)? {
            r @ Reply::Scaled { from, to, min, max } => {
                let adapting = match (min, max) {
                    (Some(a), Some(b)) if a < b => format!(", adapting within {a}..{b}"),
                    _ => String::new(),
                };
                Ok(Done::reply(format!("workers {from} -> {to}{adapting}"), &r))
            }
            other => Err(unexpected("scale", &other)),
        },
        Command::Reload => match ask(&mut client, &Request::Reload, bound(cli, LONG_TIMEOUT))? {
            r @ Reply::Reloaded {
                generation,
                took_secs,
            } => Ok(Done::reply(
                format!("reloaded: generation {generation} serving (took {took_secs:.1}s)"),
                &r,
            )),
            other => Err(unexpected("reload", &other)),
        },
        Command::Upgrade { binary } => upgrade::upgrade(cli, &target, client, binary.as_deref()),
        Command::Reopen => match ask(&mut client, &Request::Reopen, quick)? {
            r @ Reply::Reopened => Ok(Done::reply("reopened the log file", &r)),
            other => Err(unexpected("reopen", &other)),
        },
        Command::Stop { fast } => stop(cli, &target, client, *fast),
        Command::Kill { pid, signal } => {
            let req = Request::Kill {
                pid: *pid,
                signal: Some(signal.0.clone()),
            };
            match ask(&mut client, &req, quick)? {
                Reply::Killed { pid, signal } => {
                    let human = format!("sent {signal} to worker {pid}; the master replaces it");
                    Ok(Done::reply(human, &Reply::Killed { pid, signal }))
                }
                other => Err(unexpected("kill", &other)),
            }
        }
        Command::Ping => match ask(&mut client, &Request::Ping, quick)? {
            r @ Reply::Pong { pid, .. } => Ok(Done::reply(format!("pong from {pid}"), &r)),
            other => Err(unexpected("ping", &other)),
        },
        Command::Version => unreachable!("handled by version()"),
        Command::Top { .. } => unreachable!("handled by top::run()"),
    }
}

/// `version --json`: the master's reply with `"client"` added.
#[derive(serde::Serialize)]
struct VersionDoc<'a> {
    #[serde(flatten)]
    reply: &'a Reply,
    client: Value,
}

/// `version`: ours always; the master's if one answers (else exit 3).
fn version(cli: &Cli) -> Report {
    let ours = env!("CARGO_PKG_VERSION");
    let client_line = format!("arbiterctl {ours} (protocol {PROTOCOL_VERSION})\n");
    let client_json = json!({"version": ours, "protocol": PROTOCOL_VERSION});
    let asked = connect_target(cli)
        .and_then(|(_, mut c)| ask(&mut c, &Request::Version, bound(cli, DEFAULT_TIMEOUT)));
    match asked {
        Ok(Reply::Version { version, protocol }) => {
            let doc = VersionDoc {
                reply: &Reply::Version {
                    version: version.clone(),
                    protocol,
                },
                client: client_json,
            };
            let mut stderr = Vec::new();
            if protocol != PROTOCOL_VERSION {
                stderr.push(format!(
                    "the master speaks protocol {protocol}, this arbiterctl {PROTOCOL_VERSION}"
                ));
            }
            Report {
                stdout: if cli.json {
                    json_line(&doc)
                } else {
                    format!("{client_line}arbiterd {version} (protocol {protocol})\n")
                },
                stderr,
                code: EXIT_OK,
            }
        }
        Ok(other) => {
            let f = unexpected("version", &other);
            version_failed(cli, f, client_line, client_json)
        }
        Err(f) => version_failed(cli, f, client_line, client_json),
    }
}

fn version_failed(cli: &Cli, f: Fail, client_line: String, client_json: Value) -> Report {
    let mut doc = f.json();
    doc["client"] = client_json;
    Report {
        stdout: if cli.json {
            json_line(&doc)
        } else {
            client_line
        },
        stderr: vec![f.message()],
        code: f.code(),
    }
}

/// Retry `probe` with a 5 -> 50 ms backoff until it says done or `deadline` passes.
fn wait_for(deadline: Option<Instant>, mut probe: impl FnMut() -> bool) -> bool {
    let mut delay = Duration::from_millis(5);
    loop {
        if probe() {
            return true;
        }
        let now = Instant::now();
        let left = deadline.map_or(delay, |d| d.saturating_duration_since(now));
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(delay.min(left));
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// Who answers a ping on `path` now (`None`: nobody, or not in time).
fn pong_pid(cli: &Cli, path: &Path) -> Option<Result<i32, ClientError>> {
    let t = Duration::from_secs(1);
    let mut c = match Client::connect_trusting(path, t, &cli.trust_uid) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    match c.request(&Request::Ping) {
        Ok(Ok(Reply::Pong { pid, .. })) => Some(Ok(pid)),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    }
}

/// `stop`: the master answers `stopped` just before it exits; then wait until its
/// pid is gone (or a zombie) and its socket no longer answers as it.
fn stop(cli: &Cli, target: &Target, mut client: Client, fast: bool) -> Result<Done, Fail> {
    let start = Instant::now();
    let overall = bound(cli, LONG_TIMEOUT);
    let deadline = overall.and_then(|t| start.checked_add(t));
    // Learn the pid first, so the wait works even if the answer never comes.
    let known = match ask(&mut client, &Request::Ping, bound(cli, DEFAULT_TIMEOUT))? {
        Reply::Pong { pid, .. } => pid,
        other => return Err(unexpected("ping", &other)),
    };
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let (pid, reply, note) = match ask(&mut client, &Request::Stop { fast }, left) {
        Ok(r @ Reply::Stopped { pid }) => (pid, r, None),
        Ok(other) => return Err(unexpected("stop", &other)),
        Err(Fail::Client(ClientError::Closed { .. })) => (
            known,
            Reply::Stopped { pid: known },
            Some("the master closed the connection without answering".to_string()),
        ),
        Err(e) => return Err(e),
    };
    drop(client);
    let gone = wait_for(deadline, || {
        if resolve::pid_alive(pid) {
            return false;
        }
        match pong_pid(cli, &target.path) {
            // Nothing listens any more.
            Some(Err(ClientError::NoMaster { .. })) => true,
            // Another master answers there now (a supervisor restarted it).
            Some(Ok(p)) => p != pid,
            _ => false,
        }
    });
    if !gone {
        return Err(Fail::Other {
            kind: "failed",
            message: format!(
                "the master (pid {pid}) is still running {}s after the stop request",
                start.elapsed().as_secs()
            ),
        });
    }
    let mut done = Done::reply(format!("stopped (pid {pid})"), &reply);
    done.note = note;
    Ok(done)
}
