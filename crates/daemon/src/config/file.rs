//! The config file, and the [`Loader`] that lays it under the command line, again
//! at every reload.
//!
//! The file is read by hand, key by key, rather than by a serde derive: a wrong
//! type is then reported in the file's own words (the key, its line, what was
//! expected, what was found), not as serde's internal names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbiter_proto::options;
use clap::{CommandFactory, FromArgMatches, ValueEnum};
use toml::{Spanned, Value};

use super::{
    CgroupMode, Cli, Config, ConfigError, KillMode, WorkerCount, parse_log_level, parse_ready,
};

/// The file's one key that is not an option: the worker COMMAND, which the
/// command line has after `--`.
const COMMAND_KEY: &str = "command";

/// Every key the file takes: the options [`options`] marks as file keys (the long
/// options that configure a master), then `command`. `_` may be written for `-`.
/// packaging/arbiter.toml documents each of them (a unit test checks both ways).
pub fn keys() -> impl Iterator<Item = &'static str> {
    options::file_keys().chain([COMMAND_KEY])
}

/// A value from the file and the line it is on, for errors found later (a bad
/// `ready`, say, is only an error if the command line does not override it).
#[derive(Clone, Debug)]
struct At<T> {
    value: T,
    line: usize,
}

/// The file, its keys checked for type.
#[derive(Default, Debug)]
struct FileConfig {
    bind: Option<At<Vec<String>>>,
    workers: Option<At<WorkerCount>>,
    max_workers: Option<At<usize>>,
    timeout: Option<At<f64>>,
    graceful_timeout: Option<At<f64>>,
    shutdown_delay: Option<At<f64>>,
    ready: Option<At<String>>,
    ready_min: Option<At<usize>>,
    boot_timeout: Option<At<f64>>,
    kill_mode: Option<At<String>>,
    cgroup: Option<At<String>>,
    name: Option<At<String>>,
    pid: Option<At<PathBuf>>,
    control: Option<At<PathBuf>>,
    metrics_bind: Option<At<String>>,
    daemon: Option<At<bool>>,
    preload: Option<At<bool>>,
    /// `false`: off (`None` inside); `true`: the working directory (empty).
    reload_on_change: Option<At<Option<Vec<String>>>>,
    log_file: Option<At<PathBuf>>,
    log_level: Option<At<String>>,
    max_worker_rss: Option<At<u64>>,
    max_worker_age: Option<At<f64>>,
    max_requests: Option<At<u64>>,
    max_requests_jitter: Option<At<u64>>,
    env: Option<At<Vec<(String, String)>>>,
    env_file: Option<At<String>>,
    reuse_port: Option<At<bool>>,
    backlog: Option<At<i32>>,
    umask: Option<At<String>>,
    chdir: Option<At<PathBuf>>,
    user: Option<At<String>>,
    group: Option<At<String>>,
    command: Option<At<Vec<String>>>,
}

/// Why the file was refused: a line (when known) and a message for a person.
#[derive(Debug, PartialEq)]
struct FileError {
    line: Option<usize>,
    message: String,
}

fn at<T>(line: usize, value: T) -> Option<At<T>> {
    Some(At { value, line })
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// A TOML value as an error message shows it: its type, and the value if short.
fn found(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 60 => format!("string {s:?}"),
        Value::String(_) => "a long string".into(),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("number {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("date-time {d}"),
        Value::Array(a) if a.is_empty() => "an empty list".into(),
        Value::Array(_) => "a list".into(),
        Value::Table(_) => "a table".into(),
    }
}

/// `key: expected WHAT, found ...`.
fn mismatch(key: &str, what: &str, v: &Value) -> String {
    format!("{key}: expected {what}, found {}", found(v))
}

fn string(key: &str, v: &Value, what: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(mismatch(key, what, v)),
    }
}

/// `user`, `group`: a name, or a number (`33` or `"33"`).
fn name_or_id(key: &str, v: &Value, what: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) if *i >= 0 => Ok(i.to_string()),
        _ => Err(mismatch(key, what, v)),
    }
}

fn boolean(key: &str, v: &Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(*b),
        _ => Err(mismatch(key, "true or false", v)),
    }
}

/// A whole number in `T`'s range (`workers`, `backlog`, ...).
fn whole<T: TryFrom<i64>>(key: &str, v: &Value, what: &str) -> Result<T, String> {
    match v {
        Value::Integer(i) => T::try_from(*i).map_err(|_| mismatch(key, what, v)),
        _ => Err(mismatch(key, what, v)),
    }
}

/// A number of seconds: `30` or `0.5`.
fn seconds(key: &str, v: &Value) -> Result<f64, String> {
    match v {
        Value::Integer(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        _ => Err(mismatch(key, "a number of seconds such as 30 or 0.5", v)),
    }
}

/// One string or a list of strings (`bind`).
/// `[env]`: a table of strings (numbers and booleans as they are written).
fn env_table(v: &Value) -> Result<Vec<(String, String)>, String> {
    let Value::Table(t) = v else {
        return Err("env: expected a table ([env] with KEY = \"value\" lines)".into());
    };
    t.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Boolean(b) => b.to_string(),
                _ => return Err(format!("env.{k}: expected a string")),
            };
            Ok((k.clone(), v))
        })
        .collect()
}

fn strings(key: &str, v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "{key}: expected {what}, found a list holding {}",
                    found(other)
                )),
            })
            .collect(),
        _ => Err(mismatch(key, what, v)),
    }
}

/// `command`: a list of strings as they are, or one string split as a POSIX
/// shell splits words.
fn command(v: &Value) -> Result<Vec<String>, String> {
    const WHAT: &str = "a command line such as \"python3 app.py\" or a list such as \
                        [\"python3\", \"app.py\"]";
    match v {
        Value::String(s) => match split_words(s) {
            Ok(words) if words.is_empty() => Err(format!(
                "command: expected {WHAT}, found an empty command line"
            )),
            Ok(words) => Ok(words),
            Err(e) => Err(format!("command: {e}")),
        },
        Value::Array(_) => strings("command", v, WHAT),
        _ => Err(mismatch("command", WHAT, v)),
    }
}

/// Split a command line into words as a POSIX shell does, without any expansion:
/// blanks separate words; `'...'` is literal; in `"..."` a backslash escapes only
/// `$`, `` ` ``, `"`, `\` and a newline; elsewhere a backslash makes the next
/// character literal; backslash-newline joins lines. Since no shell runs the
/// result, the operators that would make a different command of it (`|`, `&`,
/// `;`, `<`, `>`, `(`, `)`) and a `#` comment are refused unless quoted, rather
/// than passed to the program as words.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    // The word being built; `None` between words (so `""` is an empty word).
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unbalanced single quote (')".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('\n') => {}
                            Some(c @ ('$' | '`' | '"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("unbalanced double quote (\")".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("unbalanced double quote (\")".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("ends with a backslash that escapes nothing".into()),
            },
            '|' | '&' | ';' | '<' | '>' | '(' | ')' => {
                return Err(format!(
                    "'{c}' is a shell operator, and no shell runs the command: quote it to \
                     pass it as an argument, or write [\"sh\", \"-c\", \"...\"]"
                ));
            }
            '#' if word.is_none() => {
                return Err(
                    "'#' would start a comment in a shell: quote it to pass it as an argument"
                        .into(),
                );
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// The closest key to a misspelt one, if it is close.
fn suggest(key: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    keys()
        .map(|k| (distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

/// Parse the file's text: its syntax, its keys, the type of each value.
fn parse_file(text: &str) -> Result<FileConfig, FileError> {
    let table: BTreeMap<Spanned<String>, Spanned<Value>> =
        toml::from_str(text).map_err(|e| FileError {
            line: e.span().map(|s| line_of(text, s.start)),
            // toml's messages may run over several lines; ours are one.
            message: e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        })?;
    let mut entries: Vec<_> = table.into_iter().collect();
    // In the order of the file, so the first bad key is the one reported.
    entries.sort_by_key(|(k, _)| k.span().start);
    let mut f = FileConfig::default();
    let mut seen: Vec<(&'static str, usize)> = Vec::new();
    for (key, value) in entries {
        let line = line_of(text, key.span().start);
        let err = |message: String| FileError {
            line: Some(line),
            message,
        };
        let spelt = key.get_ref().as_str();
        let normal = spelt.replace('_', "-");
        let Some(name) = keys().find(|k| *k == normal) else {
            let hint = match suggest(&normal) {
                Some(k) => format!("; did you mean {k:?}?"),
                None => "; the keys are arbiterd's long options (see arbiterd(1))".into(),
            };
            return Err(err(format!("unknown key {spelt:?}{hint}")));
        };
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == name) {
            return Err(err(format!("{name}: given twice (also on line {first})")));
        }
        seen.push((name, line));
        match read_key(&mut f, name, value.get_ref(), line) {
            Ok(()) => {}
            Err(Unread::Bad(message)) => return Err(err(message)),
            // A unit test rules this out for every key; should one slip by, it is
            // refused as a key rather than a panic in a reload.
            Err(Unread::NoReader) => {
                return Err(err(format!(
                    "{name}: a key this arbiterd knows but does not read (a bug)"
                )));
            }
        }
    }
    Ok(f)
}

/// Why [`read_key`] stored nothing.
#[derive(Debug, PartialEq)]
enum Unread {
    /// The value is not of the key's type: the message says so.
    Bad(String),
    /// No arm reads the key.
    NoReader,
}

impl From<String> for Unread {
    fn from(message: String) -> Unread {
        Unread::Bad(message)
    }
}

/// Check `v` for the type key `name` takes and store it in `f`. Each key's type is
/// its own, hence one arm per key; a key of [`keys`] without one is
/// [`Unread::NoReader`], which a unit test rules out.
fn read_key(f: &mut FileConfig, name: &str, v: &Value, line: usize) -> Result<(), Unread> {
    const COUNT: &str = "a whole number such as 4";
    const PATH: &str = "a path string";
    const NAME: &str = "a name string";
    match name {
        "bind" => {
            let what = "an address string like \"127.0.0.1:8000\" or a list of them";
            f.bind = at(line, strings(name, v, what)?);
        }
        "workers" => {
            let count = match v {
                Value::String(s) => WorkerCount::parse(s).map_err(|e| format!("{name}: {e}")),
                _ => whole(
                    name,
                    v,
                    "a whole number such as 4, or a range such as \"2..16\"",
                )
                .map(|n| WorkerCount { min: n, max: n }),
            };
            f.workers = at(line, count?);
        }
        "max-workers" => f.max_workers = at(line, whole(name, v, COUNT)?),
        "timeout" => f.timeout = at(line, seconds(name, v)?),
        "graceful-timeout" => f.graceful_timeout = at(line, seconds(name, v)?),
        "shutdown-delay" => f.shutdown_delay = at(line, seconds(name, v)?),
        "ready-min" => f.ready_min = at(line, whole(name, v, COUNT)?),
        "boot-timeout" => f.boot_timeout = at(line, seconds(name, v)?),
        "max-worker-age" => f.max_worker_age = at(line, seconds(name, v)?),
        "ready" => f.ready = at(line, string(name, v, "\"exec\" or \"notify\"")?),
        "kill-mode" => {
            let what = "\"mixed\", \"group\" or \"process\"";
            f.kill_mode = at(line, string(name, v, what)?);
        }
        "cgroup" => f.cgroup = at(line, string(name, v, "\"auto\" or \"off\"")?),
        "log-level" => {
            let what = "\"debug\", \"info\", \"warning\", \"error\" or \"critical\"";
            f.log_level = at(line, string(name, v, what)?);
        }
        "name" => f.name = at(line, string(name, v, NAME)?),
        "user" => f.user = at(line, name_or_id(name, v, "a user name or uid")?),
        "group" => {
            f.group = at(line, name_or_id(name, v, "a group name or gid")?);
        }
        "umask" => {
            f.umask = at(
                line,
                string(name, v, "an octal mode string such as \"022\"")?,
            );
        }
        "pid" => f.pid = at(line, string(name, v, PATH)?.into()),
        "control" => f.control = at(line, string(name, v, PATH)?.into()),
        "metrics-bind" => {
            let what = "an address string like \"127.0.0.1:9100\" or \"unix:/run/m.sock\"";
            f.metrics_bind = at(line, string(name, v, what)?);
        }
        "log-file" => f.log_file = at(line, string(name, v, PATH)?.into()),
        "chdir" => f.chdir = at(line, string(name, v, PATH)?.into()),
        "daemon" => f.daemon = at(line, boolean(name, v)?),
        "preload" => f.preload = at(line, boolean(name, v)?),
        "reload-on-change" => {
            let paths = match v {
                Value::Boolean(on) => on.then(Vec::new),
                _ => {
                    let what = "true, false, a path string or a list of them";
                    Some(strings(name, v, what)?)
                }
            };
            f.reload_on_change = at(line, paths);
        }
        "reuse-port" => f.reuse_port = at(line, boolean(name, v)?),
        "max-worker-rss" => {
            f.max_worker_rss = at(line, whole(name, v, "a whole number of MiB")?);
        }
        "max-requests" => {
            f.max_requests = at(line, whole(name, v, "a whole number of requests")?);
        }
        "max-requests-jitter" => {
            f.max_requests_jitter = at(line, whole(name, v, "a whole number of requests")?);
        }
        "backlog" => f.backlog = at(line, whole(name, v, COUNT)?),
        "env" => f.env = at(line, env_table(v)?),
        "env-file" => f.env_file = at(line, string(name, v, PATH)?),
        "command" => f.command = at(line, command(v)?),
        _ => return Err(Unread::NoReader),
    }
    Ok(())
}

/// How to build the [`Config`], again and again: the command line as given, which
/// options it set explicitly (they win over the file), and the directory relative
/// paths are resolved against. A reload calls [`Loader::load`] again.
#[derive(Clone, Debug)]
pub struct Loader {
    cli: Cli,
    explicit: Vec<String>,
    base_dir: PathBuf,
}

impl Loader {
    /// Parse the process's arguments. Errors are clap's (help and version included).
    pub fn from_args() -> Result<Loader, clap::Error> {
        Loader::from_argv(std::env::args_os())
    }

    pub fn from_argv<I, T>(args: I) -> Result<Loader, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let explicit = matches
            .ids()
            .filter(|id| {
                matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_string())
            .collect();
        Ok(Loader {
            cli,
            explicit,
            base_dir: PathBuf::new(),
        })
    }

    /// `--chdir`, applied once at startup before anything is resolved.
    pub fn chdir(&self) -> Option<&Path> {
        self.cli.chdir.as_deref()
    }

    /// Fix the directory relative paths mean (the cwd after `--chdir`), so that a
    /// reload in a daemon that has since moved to / resolves them the same way.
    pub fn pin_base_dir(&mut self) {
        self.base_dir = std::env::current_dir().unwrap_or_default();
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.cli.config.as_deref()
    }

    /// A reload has files to read again: the config file, or an `--env-file`
    /// given on the command line alone.
    pub fn has_files(&self) -> bool {
        self.cli.config.is_some() || self.cli.env_file.is_some()
    }

    fn given(&self, id: &str) -> bool {
        self.explicit.iter().any(|e| e == id)
    }

    /// The command line over the file over the defaults, validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut cli = self.cli.clone();
        if let Some(path) = &self.cli.config {
            let path = self.base_dir.join(path);
            let text = crate::userpath::read_to_string(&path, crate::userpath::CONFIG_LIMIT)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            // `PATH line N: key: what is wrong`, one line.
            let located = |e: FileError| {
                let place = e.line.map(|l| format!(" line {l}")).unwrap_or_default();
                ConfigError(format!("{}{place}: {}", path.display(), e.message))
            };
            let file = parse_file(&text).map_err(located)?;
            self.overlay(&mut cli, file).map_err(located)?;
        }
        let base = &self.base_dir;
        let rel = |p: PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                base.join(p)
            } else {
                p
            }
        };
        // A `--chdir` on the command line was applied before `base` was pinned:
        // `base` is where it led. One from the file is relative to `base`.
        if self.given("chdir") && !base.as_os_str().is_empty() {
            cli.chdir = Some(base.clone());
        } else {
            cli.chdir = cli.chdir.map(rel);
        }
        cli.pid = cli.pid.map(rel);
        cli.env_file = cli.env_file.map(rel);
        // No PATH: the directory the workers start in.
        cli.reload_on_change = cli.reload_on_change.map(|paths| match paths.is_empty() {
            true => vec![rel(PathBuf::from("."))],
            false => paths.into_iter().map(rel).collect(),
        });
        cli.control = cli.control.map(rel);
        if cli.log_file.as_os_str() != "-" {
            cli.log_file = rel(cli.log_file);
        }
        Config::from_cli(cli)
    }

    /// The file's values where the command line did not set them. A value of the
    /// right type but not one of the accepted words is refused here, and only if
    /// the command line does not override it.
    fn overlay(&self, cli: &mut Cli, f: FileConfig) -> Result<(), FileError> {
        macro_rules! take {
            ($field:ident, $id:literal, $conv:expr) => {
                if let Some(At { value, .. }) = f.$field
                    && !self.given($id)
                {
                    cli.$field = $conv(value);
                }
            };
        }
        take!(workers, "workers", |v| v);
        take!(max_workers, "max_workers", |v| v);
        take!(timeout, "timeout", |v| v);
        take!(graceful_timeout, "graceful_timeout", |v| v);
        take!(shutdown_delay, "shutdown_delay", |v| v);
        take!(ready_min, "ready_min", Some);
        take!(boot_timeout, "boot_timeout", |v| v);
        take!(name, "name", |v| v);
        take!(pid, "pid", Some);
        take!(control, "control", Some);
        take!(metrics_bind, "metrics_bind", Some);
        take!(daemon, "daemon", |v| v);
        take!(preload, "preload", |v| v);
        take!(reload_on_change, "reload_on_change", |v: Option<
            Vec<String>,
        >| v
            .map(|paths| paths.into_iter().map(PathBuf::from).collect()));
        take!(log_file, "log_file", |v| v);
        take!(max_worker_rss, "max_worker_rss", Some);
        take!(max_worker_age, "max_worker_age", Some);
        take!(max_requests, "max_requests", Some);
        take!(max_requests_jitter, "max_requests_jitter", |v| v);
        take!(env_file, "env_file", |v: String| Some(v.into()));
        if let Some(At { value, .. }) = f.env {
            cli.file_env = value;
        }
        take!(reuse_port, "reuse_port", |v| v);
        take!(backlog, "backlog", |v| v);
        take!(umask, "umask", Some);
        take!(chdir, "chdir", Some);
        take!(user, "user", Some);
        take!(group, "group", Some);
        take!(bind, "bind", |v| v);
        take!(command, "command", |v: Vec<String>| v
            .into_iter()
            .map(Into::into)
            .collect());
        // The words of these keys are checked by the same parsers as the flags',
        // reported in the file's terms.
        let word = |at: At<String>, key: &str, what: &str| FileError {
            line: Some(at.line),
            message: mismatch(key, what, &Value::String(at.value)),
        };
        if let Some(at) = f.ready
            && !self.given("ready")
        {
            match parse_ready(&at.value) {
                Ok(v) => cli.ready = Some(v),
                Err(_) => return Err(word(at, "ready", "\"exec\" or \"notify\"")),
            }
        }
        if let Some(at) = f.log_level
            && !self.given("log_level")
        {
            match parse_log_level(&at.value) {
                Ok(v) => cli.log_level = v,
                Err(_) => {
                    let what = "\"debug\", \"info\", \"warning\", \"error\" or \"critical\"";
                    return Err(word(at, "log-level", what));
                }
            }
        }
        if let Some(at) = f.kill_mode
            && !self.given("kill_mode")
        {
            match KillMode::from_str(&at.value, false) {
                Ok(v) => cli.kill_mode = v,
                Err(_) => return Err(word(at, "kill-mode", "\"mixed\", \"group\" or \"process\"")),
            }
        }
        if let Some(at) = f.cgroup
            && !self.given("cgroup")
        {
            match CgroupMode::from_str(&at.value, false) {
                Ok(v) => cli.cgroup = v,
                Err(_) => return Err(word(at, "cgroup", "\"auto\" or \"off\"")),
            }
        }
        Ok(())
    }
}

/// Read `text` as a config file and lay it over the defaults, without resolving
/// anything (users, the command): the example file's values are checked this way.
#[cfg(test)]
pub(super) fn check_file(text: &str) -> Result<(), String> {
    let loader = Loader::from_argv(["arbiterd"]).map_err(|e| e.to_string())?;
    let mut cli = loader.cli.clone();
    let f = parse_file(text).map_err(|e| e.message)?;
    loader.overlay(&mut cli, f).map_err(|e| e.message)
}

/// The keys of [`keys`] that no arm of [`read_key`] reads (one that refuses the
/// value's type has read it).
#[cfg(test)]
pub(super) fn keys_without_a_reader() -> Vec<&'static str> {
    let probe = Value::Boolean(true);
    keys()
        .filter(|k| read_key(&mut FileConfig::default(), k, &probe, 1) == Err(Unread::NoReader))
        .collect()
}
