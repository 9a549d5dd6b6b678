//! Command line -> a validated [`Config`], once, before anything is bound or forked.

use std::ffi::{CString, OsStr, OsString};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter_proto::control::MAX_WORKERS;

/// `--max-workers` unless told otherwise: a typo in `scale` must not fork tens of
/// thousands of processes.
pub const DEFAULT_MAX_WORKERS: usize = 1024;
use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::log::Level;

mod changes;
mod count;
pub mod env;
mod file;

pub use changes::describe_changes;

pub use count::WorkerCount;

pub use file::Loader;

/// A pre-fork master with gunicorn's Arbiter semantics, for workers in any language.
///
/// With no COMMAND each worker runs the built-in HTTP worker; with a COMMAND each
/// worker is that program, exec'd with the listeners at fds 3, 4, ... and the
/// systemd LISTEN_FDS variables.
#[derive(Parser, Debug, Clone)]
#[command(name = "arbiterd", version)]
pub struct Cli {
    /// Address to listen on: HOST:PORT, [V6]:PORT, unix:PATH or fd://N (repeatable)
    #[arg(short, long = "bind", value_name = "ADDR")]
    pub bind: Vec<String>,
    /// Number of workers: N, or MIN..MAX to adapt the count to the load (one more
    /// while connections wait in the accept queue or every worker is busy, one
    /// fewer after a long idle spell)
    #[arg(short, long, value_name = "N|MIN..MAX", default_value = "1", value_parser = WorkerCount::parse)]
    pub workers: WorkerCount,
    /// The most workers `scale`, TTIN and the config may ask for
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_WORKERS)]
    pub max_workers: usize,
    /// Heartbeat timeout in seconds; 0 disables
    #[arg(short, long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// How long TERMed workers may drain before KILL, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub graceful_timeout: f64,
    /// On TERM, keep serving this many seconds first, with /readyz saying 503, so
    /// that balancers stop sending before anything closes; then stop gracefully
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub shutdown_delay: f64,
    /// /readyz says 200 once this many workers are ready (default: the target
    /// count; never more than the target)
    #[arg(long, value_name = "N")]
    pub ready_min: Option<usize>,
    /// When a worker counts as ready: `exec` (exec succeeded) or `notify` (READY=1).
    /// Default: exec for a COMMAND, notify for the built-in worker (it sends READY=1)
    #[arg(
        long,
        value_name = "MODE",
        value_parser = Choice { parse: parse_ready },
        hide_possible_values = true
    )]
    pub ready: Option<ReadyMode>,
    /// A worker not ready by then is killed and counts as a boot failure, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub boot_timeout: f64,
    /// Who gets a worker's graceful signals: `mixed` (its main process; the rest of
    /// its tree TERM then KILL once it exited), `group` (its whole tree at once),
    /// `process` (its main process only; the rest is left alone)
    #[arg(long, value_name = "MODE", value_enum, default_value_t = KillMode::Mixed)]
    pub kill_mode: KillMode,
    /// `auto`: each worker in a cgroup v2 of its own where the hierarchy is
    /// writable (its whole tree is then known and killed at once); `off`: process
    /// groups only
    #[arg(long, value_name = "MODE", value_enum, default_value_t = CgroupMode::Auto)]
    pub cgroup: CgroupMode,
    /// Instance name: process titles, default paths, logs
    #[arg(
        short,
        long,
        value_name = "NAME",
        default_value = "arbiter",
        value_hint = clap::ValueHint::Other
    )]
    pub name: String,
    /// Pidfile
    #[arg(short, long, value_name = "PATH")]
    pub pid: Option<PathBuf>,
    /// Control socket path
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at GET /metrics on this address: HOST:PORT,
    /// [V6]:PORT or unix:PATH (port 0: any free port, logged as `Metrics at:`)
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind: Option<String>,
    /// Detach (double fork, setsid, stdio to /dev/null) once a worker serves, or fail
    /// with the reason within --boot-timeout; the working directory stays
    #[arg(short = 'D', long)]
    pub daemon: bool,
    /// Log file; `-` is stderr
    #[arg(long, value_name = "PATH", default_value = "-")]
    pub log_file: PathBuf,
    /// debug, info, warning, error or critical
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "info",
        value_parser = Choice { parse: parse_log_level },
        hide_possible_values = true
    )]
    pub log_level: Level,
    /// TOML file with the same keys as the long options; re-read on reload
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Recycle a worker whose RSS exceeds this many MiB
    #[arg(long, value_name = "MIB")]
    pub max_worker_rss: Option<u64>,
    /// Recycle a worker older than this many seconds
    #[arg(long, value_name = "SECS")]
    pub max_worker_age: Option<f64>,
    /// Recycle a worker after it served this many requests (0: never); only
    /// workers that count requests on the scoreboard
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Add 0..=J to each worker's --max-requests, drawn per worker
    #[arg(long, value_name = "J", default_value_t = 0)]
    pub max_requests_jitter: u64,
    /// Set KEY=VALUE in the workers' environment (repeatable; re-read on reload)
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read the workers' environment from this file (systemd EnvironmentFile
    /// syntax), at start and at every reload; --env wins over it
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// The config file's `[env]` table.
    #[arg(skip)]
    pub file_env: Vec<(String, String)>,
    /// Set SO_REUSEPORT on the listeners
    #[arg(long)]
    pub reuse_port: bool,
    /// Listen backlog
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub backlog: i32,
    /// File mode creation mask, octal
    #[arg(long, value_name = "MODE")]
    pub umask: Option<String>,
    /// Change to this directory before anything else
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<PathBuf>,
    /// Run workers as this user (name or uid)
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Run workers as this group (name or gid)
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Check the configuration (flags, config file, COMMAND) and exit: 0 if it is
    /// valid. Binds nothing; used before an upgrade to vet the new binary
    #[arg(long)]
    pub check_config: bool,
    /// Start COMMAND once per generation as a template that loads the application
    /// and forks the workers (docs/workers.md, "Preloading"); HUP starts a new
    /// template, so new code is loaded
    #[arg(long)]
    pub preload: bool,
    /// For development: reload (as HUP does) once a burst of changes under PATH
    /// ends. No PATH: the working directory. Trees are watched whole, but for
    /// .git, __pycache__, node_modules and editors' temp files
    #[arg(long, value_name = "PATH", num_args = 0..)]
    pub reload_on_change: Option<Vec<PathBuf>>,
    /// The worker program and its arguments, after `--`
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// The value parser of an option with a fixed set of values ([`ValueEnum`]): clap
/// knows the values (completions offer them), but a bad one is refused with
/// `parse`'s message alone, as one line, the same words a bad value in the config
/// file gets.
#[derive(Clone)]
struct Choice<E> {
    parse: fn(&str) -> Result<E, String>,
}

impl<E: ValueEnum + Clone + Send + Sync + 'static> TypedValueParser for Choice<E> {
    type Value = E;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<E, clap::Error> {
        (self.parse)(&value.to_string_lossy())
            .map_err(|msg| cmd.clone().error(clap::error::ErrorKind::InvalidValue, msg))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            E::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}

/// `--ready`, from the command line or the file: `exec` or `notify`, lower case.
fn parse_ready(s: &str) -> Result<ReadyMode, String> {
    ReadyMode::from_str(s, false).map_err(|_| format!("--ready {s}: expected 'exec' or 'notify'"))
}

/// `--log-level`, from the command line or the file: any case, `warn` too.
fn parse_log_level(s: &str) -> Result<Level, String> {
    Level::from_str(s, true)
        .map_err(|_| format!("--log-level {s}: expected debug, info, warning, error or critical"))
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BindSpec {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Fd(i32),
}

impl std::fmt::Display for BindSpec {
    /// The `--bind` form, which [`parse_bind`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindSpec::Tcp(a) => write!(f, "{a}"),
            // `unix://` is itself a prefix parse_bind strips, so a path that starts
            // with `//` needs it spelled out to read back the same.
            BindSpec::Unix(p) if p.as_os_str().as_encoded_bytes().starts_with(b"//") => {
                write!(f, "unix://{}", p.display())
            }
            BindSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            BindSpec::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

/// Who gets a worker's signals, as systemd's `KillMode=`.
/// Whether workers get cgroups of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    Auto,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillMode {
    /// Graceful signals to the main process; once it exited (or at the graceful
    /// deadline), TERM then KILL to whatever is left of its tree.
    Mixed,
    /// Every signal to the whole tree at once.
    Group,
    /// Signals to the main process only; the rest of the tree is left running.
    Process,
}

/// `--ready`: its values are these names, in lower case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReadyMode {
    Exec,
    Notify,
}

/// What each worker runs.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerProgram {
    /// This binary, as `arbiterd --builtin-worker`.
    Builtin,
    /// COMMAND resolved against PATH at startup.
    Command { path: PathBuf, argv: Vec<OsString> },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub binds: Vec<BindSpec>,
    /// True when `--bind` was not given and `binds` holds the default.
    pub default_bind: bool,
    /// The count to start with (MIN of a range).
    pub workers: usize,
    /// `--workers MIN..MAX`: adapt the count within these bounds.
    pub autoscale: Option<WorkerCount>,
    pub max_workers: usize,
    pub timeout: Option<Duration>,
    pub graceful_timeout: Duration,
    /// `--shutdown-delay`: the drain window a TERM opens before the stop.
    pub shutdown_delay: Duration,
    /// `--ready-min`: the ready workers `/readyz` wants; `None`: the target.
    pub ready_min: Option<usize>,
    /// `None`: the program's default (exec for a COMMAND, notify for the built-in).
    pub ready: Option<ReadyMode>,
    pub boot_timeout: Duration,
    pub kill_mode: KillMode,
    pub cgroup: CgroupMode,
    pub name: String,
    pub pidfile: Option<PathBuf>,
    pub control: PathBuf,
    /// `--metrics-bind`: where `/metrics` is served, if anywhere.
    pub metrics_bind: Option<BindSpec>,
    pub daemon: bool,
    pub check_config: bool,
    /// `--preload`: workers are forked by a template per generation.
    pub preload: bool,
    pub log_file: PathBuf,
    pub log_level: Level,
    pub reuse_port: bool,
    pub backlog: i32,
    /// Recycle a worker above this resident size, in bytes.
    pub max_worker_rss: Option<u64>,
    /// Recycle a worker older than this (plus up to 10% jitter).
    pub max_worker_age: Option<Duration>,
    /// Recycle a worker that counted this many requests on the scoreboard, plus
    /// its own draw of 0..=`max_requests_jitter`.
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    /// The workers' environment beyond the master's own, in order (env-file,
    /// then `[env]`, then `--env`).
    pub env: Vec<(String, String)>,
    /// `--reload-on-change`: the paths watched, absolute; empty: off.
    pub reload_on_change: Vec<PathBuf>,
    pub umask: Option<u32>,
    pub chdir: Option<PathBuf>,
    pub user: Option<nix::unistd::User>,
    pub group: Option<nix::unistd::Group>,
    pub program: WorkerProgram,
}

/// A startup error: one line for a person, exit status 1.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError(format!($($t)*))) }
}

fn seconds(flag: &str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        bail!("{flag}: expected a number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// What a `--bind` value says, before any host name is looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindForm {
    Spec(BindSpec),
    /// A host that is not an IP literal, and its port: needs a DNS look-up.
    Host(String, u16),
}

/// Parse one `--bind` value, in gunicorn's forms, resolving a host name (IPv4).
pub fn parse_bind(s: &str) -> Result<BindSpec, ConfigError> {
    let (host, port) = match parse_bind_form(s)? {
        BindForm::Spec(spec) => return Ok(spec),
        BindForm::Host(host, port) => (host, port),
    };
    match (host.as_str(), port).to_socket_addrs() {
        Ok(mut addrs) => match addrs.find(|a| a.is_ipv4()) {
            Some(a) => Ok(BindSpec::Tcp(a)),
            None => bail!("--bind {s}: '{host}' has no IPv4 address"),
        },
        Err(e) => bail!("--bind {s}: cannot resolve '{host}': {e}"),
    }
}

/// The syntax of [`parse_bind`] alone: pure, no look-up, so it can be fuzzed.
pub fn parse_bind_form(s: &str) -> Result<BindForm, ConfigError> {
    if let Some(path) = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
    {
        if path.is_empty() {
            bail!("--bind {s}: empty unix socket path");
        }
        if path.len() >= 108 {
            bail!("--bind {s}: unix socket path longer than 107 bytes");
        }
        return Ok(BindForm::Spec(BindSpec::Unix(PathBuf::from(path))));
    }
    if let Some(n) = s.strip_prefix("fd://") {
        return match n.parse::<i32>() {
            Ok(fd) if fd >= 0 => Ok(BindForm::Spec(BindSpec::Fd(fd))),
            _ => bail!("--bind {s}: '{n}' is not a valid file descriptor"),
        };
    }
    let hostport = s.strip_prefix("tcp://").unwrap_or(s);
    // An IPv6 literal is bracketed; anything else splits on the last colon.
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (
                h,
                p.strip_prefix(':')
                    .unwrap_or(if p.is_empty() { "8000" } else { p }),
            ),
            None => bail!("--bind {s}: unclosed '[' in IPv6 address"),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (hostport, "8000"),
        }
    };
    let Ok(port) = port.parse::<u16>() else {
        bail!("--bind {s}: '{port}' is not a valid port number");
    };
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(BindForm::Spec(BindSpec::Tcp(SocketAddr::new(ip, port)))),
        Err(_) => Ok(BindForm::Host(host.to_string(), port)),
    }
}

/// Parse a `--metrics-bind` value: `HOST:PORT`, `[V6]:PORT` or `unix:PATH`. Unlike
/// `--bind`, the port is required (gunicorn's default 8000 is the application's
/// port, not a metrics port) and `fd://` is refused: the master serves it alone.
pub fn parse_metrics_bind(s: &str) -> Result<BindSpec, ConfigError> {
    let reword = |e: ConfigError| ConfigError(e.0.replacen("--bind ", "--metrics-bind ", 1));
    let spec = parse_bind(s).map_err(reword)?;
    match &spec {
        BindSpec::Fd(_) => {
            bail!("--metrics-bind {s}: expected HOST:PORT or unix:PATH, not a file descriptor")
        }
        BindSpec::Tcp(_) => {
            let hostport = s.strip_prefix("tcp://").unwrap_or(s);
            let port_given = match hostport.strip_prefix('[') {
                Some(rest) => rest
                    .split_once(']')
                    .is_some_and(|(_, p)| p.starts_with(':')),
                None => hostport.contains(':'),
            };
            if !port_given {
                bail!("--metrics-bind {s}: expected HOST:PORT (a port is required) or unix:PATH");
            }
        }
        BindSpec::Unix(_) => {}
    }
    Ok(spec)
}

/// Find COMMAND the way a shell would, once, so that "not found" is a startup error.
fn resolve_command(cmd: &OsString) -> Result<PathBuf, ConfigError> {
    let shown = Path::new(cmd).display().to_string();
    if cmd.is_empty() {
        bail!("empty COMMAND");
    }
    let executable = |p: &Path| -> Result<(), nix::errno::Errno> {
        let meta = std::fs::metadata(p)
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)))?;
        if meta.is_dir() {
            return Err(nix::errno::Errno::EISDIR);
        }
        nix::unistd::access(p, nix::unistd::AccessFlags::X_OK)
    };
    if cmd.as_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        return match executable(&p) {
            Ok(()) => Ok(std::path::absolute(&p).unwrap_or(p)),
            Err(nix::errno::Errno::ENOENT) => bail!("command not found: {shown}"),
            Err(e) => bail!("command not executable: {shown}: {}", e.desc()),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut denied = None;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(cmd);
        match executable(&candidate) {
            Ok(()) => return Ok(std::path::absolute(&candidate).unwrap_or(candidate)),
            Err(nix::errno::Errno::EACCES) => denied = Some(candidate),
            Err(_) => {}
        }
    }
    match denied {
        Some(p) => bail!("command not executable: {}: permission denied", p.display()),
        None => bail!("command not found: {shown} (searched PATH)"),
    }
}

fn resolve_user(s: &str) -> Result<nix::unistd::User, ConfigError> {
    let found = match s.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(s),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) => bail!("--user {s}: no such user"),
        Err(e) => bail!("--user {s}: {}", e.desc()),
    }
}

fn resolve_group(s: &str) -> Result<nix::unistd::Group, ConfigError> {
    let found = match s.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)),
        Err(_) => nix::unistd::Group::from_name(s),
    };
    match found {
        Ok(Some(g)) => Ok(g),
        Ok(None) => bail!("--group {s}: no such group"),
        Err(e) => bail!("--group {s}: {}", e.desc()),
    }
}

impl Config {
    /// The uid and gid workers run as (`--user`, `--group`), when not the master's.
    pub fn worker_credentials(&self) -> Option<(u32, u32)> {
        self.user.as_ref().map(|u| {
            (
                u.uid.as_raw(),
                self.group.as_ref().map_or(u.gid, |g| g.gid).as_raw(),
            )
        })
    }

    /// Validate the command line. `--chdir` is applied by the caller before this
    /// runs, so relative paths here are relative to it, as in gunicorn.
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let env = env::for_workers(cli.env_file.as_deref(), &cli.file_env, &cli.env)
            .map_err(ConfigError)?;
        if cli.max_worker_rss == Some(0) {
            bail!("--max-worker-rss must be at least 1 MiB");
        }
        let max_worker_age = match cli.max_worker_age {
            Some(a) if a < 1.0 => bail!("--max-worker-age must be at least 1 second"),
            Some(a) => Some(seconds("--max-worker-age", a)?),
            None => None,
        };
        if cli.workers.min == 0 {
            bail!("--workers must be at least 1");
        }
        if cli.max_workers == 0 || cli.max_workers > MAX_WORKERS {
            bail!("--max-workers must be from 1 to {MAX_WORKERS}");
        }
        if cli.workers.max > cli.max_workers {
            bail!(
                "--workers {}: more than --max-workers ({})",
                cli.workers,
                cli.max_workers
            );
        }
        if cli.backlog <= 0 {
            bail!("--backlog must be positive");
        }
        if cli.ready_min.is_some_and(|n| n == 0 || n > cli.max_workers) {
            bail!(
                "--ready-min must be from 1 to --max-workers ({})",
                cli.max_workers
            );
        }
        let timeout = seconds("--timeout", cli.timeout)?;
        let umask = match &cli.umask {
            None => None,
            Some(s) => match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => Some(m),
                _ => bail!("--umask {s}: expected an octal mode such as 022"),
            },
        };
        if cli.name.is_empty() || cli.name.contains('/') || cli.name.len() > 64 {
            bail!(
                "--name {:?}: expected 1 to 64 characters and no '/'",
                cli.name
            );
        }
        let default_bind = cli.bind.is_empty();
        let binds = if default_bind {
            vec![BindSpec::Tcp(SocketAddr::from(([127, 0, 0, 1], 8000)))]
        } else {
            cli.bind
                .iter()
                .map(|b| parse_bind(b))
                .collect::<Result<_, _>>()?
        };
        if cli.preload && cli.command.is_empty() {
            bail!("--preload needs a COMMAND: the built-in worker has nothing to preload");
        }
        let program = match cli.command.split_first() {
            None => WorkerProgram::Builtin,
            Some((cmd, _)) => WorkerProgram::Command {
                path: resolve_command(cmd)?,
                argv: cli.command.clone(),
            },
        };
        for arg in &cli.command {
            if CString::new(arg.as_bytes()).is_err() {
                bail!("COMMAND argument contains a NUL byte");
            }
        }
        let control = match cli.control {
            Some(p) => p,
            None => arbiter_proto::paths::default_control_path(&cli.name),
        };
        // Absolute from here on: a daemon changes to / after start, and an upgraded
        // master must find the same files.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let control = absolute(control);
        let pidfile = cli.pid.map(absolute);
        let log_file = if cli.log_file.as_os_str() == "-" {
            cli.log_file
        } else {
            absolute(cli.log_file)
        };
        let binds = binds
            .into_iter()
            .map(|b| match b {
                BindSpec::Unix(p) => BindSpec::Unix(absolute(p)),
                other => other,
            })
            .collect();
        let metrics_bind = match cli.metrics_bind.as_deref() {
            None => None,
            Some(s) => Some(match parse_metrics_bind(s)? {
                BindSpec::Unix(p) => BindSpec::Unix(absolute(p)),
                other => other,
            }),
        };
        let mut reload_on_change = Vec::new();
        for p in cli.reload_on_change.into_iter().flatten() {
            let p = absolute(p);
            if let Err(e) = std::fs::metadata(&p) {
                bail!("--reload-on-change {}: {e}", p.display());
            }
            reload_on_change.push(p);
        }
        Ok(Config {
            binds,
            default_bind,
            workers: cli.workers.min,
            autoscale: cli.workers.range(),
            max_workers: cli.max_workers,
            timeout: (!timeout.is_zero()).then_some(timeout),
            graceful_timeout: seconds("--graceful-timeout", cli.graceful_timeout)?,
            shutdown_delay: seconds("--shutdown-delay", cli.shutdown_delay)?,
            ready_min: cli.ready_min,
            ready: cli.ready,
            boot_timeout: seconds("--boot-timeout", cli.boot_timeout)?,
            kill_mode: cli.kill_mode,
            cgroup: cli.cgroup,
            name: cli.name,
            pidfile,
            control,
            metrics_bind,
            daemon: cli.daemon,
            check_config: cli.check_config,
            preload: cli.preload,
            log_file,
            log_level: cli.log_level,
            reuse_port: cli.reuse_port,
            backlog: cli.backlog,
            max_worker_rss: cli.max_worker_rss.map(|m| m.saturating_mul(1024 * 1024)),
            max_worker_age,
            // 0 is gunicorn's "off"; jitter alone recycles nothing (gunicorn #1978).
            max_requests: cli.max_requests.filter(|&n| n > 0),
            max_requests_jitter: cli.max_requests_jitter,
            env,
            reload_on_change,
            umask,
            chdir: cli.chdir,
            user: cli.user.as_deref().map(resolve_user).transpose()?,
            group: cli.group.as_deref().map(resolve_group).transpose()?,
            program,
        })
    }
}

#[cfg(test)]
mod tests;
