//! The config file, and the [`Loader`] that lays it under the command line, again
//! at every reload.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};
use serde::Deserialize;

use super::{CgroupMode, Cli, Config, ConfigError, KillMode, parse_log_level, parse_ready};

/// A number of seconds in the file: `30` or `0.5`.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn get(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The config file: the long option names as keys (`graceful-timeout`, or
/// `graceful_timeout`), `command` as an array.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    bind: Option<OneOrMany>,
    workers: Option<usize>,
    #[serde(alias = "max_workers")]
    max_workers: Option<usize>,
    timeout: Option<Number>,
    #[serde(alias = "graceful_timeout")]
    graceful_timeout: Option<Number>,
    ready: Option<String>,
    #[serde(alias = "boot_timeout")]
    boot_timeout: Option<Number>,
    #[serde(alias = "kill_mode")]
    kill_mode: Option<KillMode>,
    cgroup: Option<CgroupMode>,
    name: Option<String>,
    pid: Option<PathBuf>,
    control: Option<PathBuf>,
    daemon: Option<bool>,
    #[serde(alias = "log_file")]
    log_file: Option<PathBuf>,
    #[serde(alias = "log_level")]
    log_level: Option<String>,
    #[serde(alias = "max_worker_rss")]
    max_worker_rss: Option<u64>,
    #[serde(alias = "max_worker_age")]
    max_worker_age: Option<Number>,
    #[serde(alias = "reuse_port")]
    reuse_port: Option<bool>,
    backlog: Option<i32>,
    umask: Option<String>,
    chdir: Option<PathBuf>,
    user: Option<String>,
    group: Option<String>,
    command: Option<Vec<String>>,
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
            let file: FileConfig = toml::from_str(&text).map_err(|e| {
                let place = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                        format!(", line {line}")
                    })
                    .unwrap_or_default();
                ConfigError(format!(
                    "config file {}{place}: {}",
                    path.display(),
                    e.message()
                ))
            })?;
            self.overlay(&mut cli, file)?;
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
        cli.control = cli.control.map(rel);
        if cli.log_file.as_os_str() != "-" {
            cli.log_file = rel(cli.log_file);
        }
        Config::from_cli(cli)
    }

    /// The file's values where the command line did not set them; a value the
    /// command line would refuse is refused in the same words.
    fn overlay(&self, cli: &mut Cli, f: FileConfig) -> Result<(), ConfigError> {
        macro_rules! take {
            ($field:ident, $id:literal, $conv:expr) => {
                if let Some(v) = f.$field
                    && !self.given($id)
                {
                    cli.$field = $conv(v);
                }
            };
        }
        take!(workers, "workers", |v| v);
        take!(max_workers, "max_workers", |v| v);
        take!(timeout, "timeout", |v: Number| v.get());
        take!(graceful_timeout, "graceful_timeout", |v: Number| v.get());
        take!(boot_timeout, "boot_timeout", |v: Number| v.get());
        take!(kill_mode, "kill_mode", |v| v);
        take!(cgroup, "cgroup", |v| v);
        take!(name, "name", |v| v);
        take!(pid, "pid", Some);
        take!(control, "control", Some);
        take!(daemon, "daemon", |v| v);
        take!(log_file, "log_file", |v| v);
        take!(max_worker_rss, "max_worker_rss", Some);
        take!(max_worker_age, "max_worker_age", |v: Number| Some(v.get()));
        take!(reuse_port, "reuse_port", |v| v);
        take!(backlog, "backlog", |v| v);
        take!(umask, "umask", Some);
        take!(chdir, "chdir", Some);
        take!(user, "user", Some);
        take!(group, "group", Some);
        if let Some(v) = f.ready
            && !self.given("ready")
        {
            cli.ready = Some(parse_ready(&v).map_err(ConfigError)?);
        }
        if let Some(v) = f.log_level
            && !self.given("log_level")
        {
            cli.log_level = parse_log_level(&v).map_err(ConfigError)?;
        }
        if let Some(b) = f.bind
            && !self.given("bind")
        {
            cli.bind = match b {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
        }
        if let Some(c) = f.command
            && !self.given("command")
        {
            cli.command = c.into_iter().map(Into::into).collect();
        }
        Ok(())
    }
}
