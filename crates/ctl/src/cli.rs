//! The command line: clap derive types, and the parsers for `scale` and `kill`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

/// Drive a running arbiterd over its control socket.
///
/// Which master: `--control PATH`, or `--name NAME` (its default socket path), or
/// `--pid PIDFILE` (the socket that master was started with, read from
/// /proc/PID/cmdline). Default: `--name arbiter`.
///
/// Exit status: 0 done, 1 the master refused or the action failed, 2 usage error,
/// 3 no master answering, 4 (status only) running but degraded, 5 (status only)
/// stopping (draining or after).
#[derive(Parser, Debug)]
#[command(name = "arbiterctl", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// Instance name: talk to the master at its default control socket, trying
    /// $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or
    /// /tmp/arbiter-UID/NAME.sock (where a master started without
    /// XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]
    #[arg(
        short = 'n',
        long,
        global = true,
        value_name = "NAME",
        value_hint = clap::ValueHint::Other,
        conflicts_with_all = ["control", "pidfile"]
    )]
    pub name: Option<String>,

    /// The control socket path
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "pidfile")]
    pub control: Option<PathBuf>,

    /// The master's pidfile: find its control socket from its command line
    /// (--control, --name, or the config file it was started with)
    #[arg(id = "pidfile", long = "pid", global = true, value_name = "PIDFILE")]
    pub pid: Option<PathBuf>,

    /// Also talk to a master running as this uid (default: only one running as
    /// you or as root); may be repeated
    #[arg(long, global = true, value_name = "UID")]
    pub trust_uid: Vec<u32>,

    /// Print one JSON document on stdout (errors too: {"error":{"kind","message"}})
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up after SECS (0: wait as long as it takes). Default 10; reload and
    /// stop wait until done: 120. For upgrade: how long the new master may take to
    /// be ready (default 60)
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Timeout>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The master line, its listeners, then one line per worker: state, age, last
    /// beat against the timeout, restarts, CPU%, RSS, its STATUS= text (exit 4 if
    /// fewer workers are ready than the target)
    Status,
    /// Change the number of workers: +N more, -N fewer, N or =N exactly (never
    /// below 1; the master refuses more than its --max-workers)
    Scale {
        /// +N, -N, N or =N (a fixed count: stops adapting), or MIN..MAX (adapt to
        /// the load within these bounds)
        #[arg(value_name = "+N|-N|N|MIN..MAX", allow_hyphen_values = true)]
        spec: ScaleSpec,
    },
    /// Reload (as HUP): start a new generation, retire the old one once the new one
    /// is ready; waits until done and prints the outcome
    Reload,
    /// Replace the master by a new binary without dropping a connection; waits
    /// until the new master serves (rolls back if it fails)
    Upgrade {
        /// The new binary [default: the one the master was started from]
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Reopen the log file (as USR1)
    Reopen,
    /// Stop the master (as TERM: workers finish their requests); waits until it
    /// exited
    Stop {
        /// Stop at once (as QUIT)
        #[arg(long)]
        fast: bool,
    },
    /// Signal one worker (default TERM); the master replaces it
    Kill {
        /// The worker's pid
        #[arg(value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
        pid: i32,
        /// TERM, SIGTERM, term or 15
        #[arg(
            short,
            long,
            value_name = "SIG",
            default_value = "TERM",
            value_parser = SignalParser,
            hide_possible_values = true
        )]
        signal: SignalName,
    },
    /// Prometheus text exposition of the status, every series labelled
    /// arbiter="NAME": worker states, RSS, CPU seconds, heartbeat ages, restarts,
    /// reload and upgrade counts
    Metrics,
    /// A live view refreshed every second: the listeners with their accept
    /// queues, then one line per worker (state, busy, requests, CPU%, RSS, beat
    /// age); q quits. Plain frames when not on a terminal
    Top {
        /// Print one frame and exit (for scripts)
        #[arg(long)]
        once: bool,
        /// Seconds between frames
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
        interval: std::time::Duration,
    },
    /// Is the master answering?
    Ping,
    /// Versions of arbiterctl and of the master, with their protocol versions
    Version,
}

/// `top --interval`: from a tenth of a second to an hour.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("expected seconds from 0.1 to 3600, got {s:?}")),
    }
}

impl Cli {
    /// Parse `args` (program name first), with the checks clap cannot do for
    /// global options given at different levels (`--pid P status --name N`).
    pub fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        let given: Vec<&str> = [
            ("--name", cli.name.is_some()),
            ("--control", cli.control.is_some()),
            ("--pid", cli.pid.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if given.len() > 1 {
            return Err(Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{} cannot be used with {}: name one master",
                    given[0],
                    given[1..].join(" or ")
                ),
            ));
        }
        Ok(cli)
    }
}

/// `--timeout`: a bound, or none (`0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

fn parse_secs(s: &str) -> Result<Timeout, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a number of seconds (0 or more)"));
    }
    if v == 0.0 {
        return Ok(Timeout(None));
    }
    Duration::try_from_secs_f64(v)
        .map(|d| Timeout(Some(d)))
        .map_err(|e| format!("{s:?}: {e}"))
}

/// `scale`'s argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleSpec {
    /// `+N`
    Up(u32),
    /// `-N`
    Down(u32),
    /// `N` or `=N`
    To(u32),
    /// `MIN..MAX`: adapt to the load within these bounds.
    Range(u32, u32),
}

impl FromStr for ScaleSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<ScaleSpec, String> {
        if let Some((a, b)) = s.split_once("..") {
            let bound = |d: &str| {
                if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{s}: expected MIN..MAX (whole numbers)"));
                }
                d.parse::<u32>().map_err(|_| format!("{d} is too large"))
            };
            return Ok(ScaleSpec::Range(bound(a)?, bound(b)?));
        }
        let (ctor, digits): (fn(u32) -> ScaleSpec, &str) = if let Some(d) = s.strip_prefix('+') {
            (ScaleSpec::Up, d)
        } else if let Some(d) = s.strip_prefix('-') {
            (ScaleSpec::Down, d)
        } else if let Some(d) = s.strip_prefix('=') {
            (ScaleSpec::To, d)
        } else {
            (ScaleSpec::To, s)
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("expected +N, -N, N, =N or MIN..MAX (whole numbers)".into());
        }
        digits
            .parse()
            .map(ctor)
            .map_err(|_| format!("{digits} is too large"))
    }
}

impl ScaleSpec {
    /// The request for it.
    pub fn request(self) -> arbiter_proto::control::Request {
        let (mut by, mut to, mut min, mut max) = (None, None, None, None);
        match self {
            ScaleSpec::Up(n) => by = Some(i64::from(n)),
            ScaleSpec::Down(n) => by = Some(-i64::from(n)),
            ScaleSpec::To(n) => to = Some(u64::from(n)),
            ScaleSpec::Range(a, b) => (min, max) = (Some(u64::from(a)), Some(u64::from(b))),
        }
        arbiter_proto::control::Request::Scale { by, to, min, max }
    }
}

/// A signal name as the master takes it: `TERM`, `KILL`, `USR1`...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalName(pub String);

/// `--signal`'s parser: [`parse_signal`], which takes more spellings than it
/// lists; the list (the short names) is what completions offer.
#[derive(Clone)]
struct SignalParser;

impl clap::builder::TypedValueParser for SignalParser {
    type Value = SignalName;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SignalName, clap::Error> {
        clap::builder::StringValueParser::new()
            .try_map(|s| parse_signal(&s))
            .parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            arbiter_proto::signal::NamedSignal::all()
                .map(|s| clap::builder::PossibleValue::new(s.name)),
        ))
    }
}

/// `TERM`, `SIGTERM`, `term`, `sigterm` or `15` -> `TERM`.
pub fn parse_signal(s: &str) -> Result<SignalName, String> {
    arbiter_proto::signal::parse(s).map(|sig| SignalName(sig.name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_specs() {
        for (s, want) in [
            ("+2", ScaleSpec::Up(2)),
            ("-1", ScaleSpec::Down(1)),
            ("4", ScaleSpec::To(4)),
            ("=4", ScaleSpec::To(4)),
            ("0", ScaleSpec::To(0)),
            ("+0", ScaleSpec::Up(0)),
            ("007", ScaleSpec::To(7)),
            ("2..16", ScaleSpec::Range(2, 16)),
        ] {
            assert_eq!(s.parse::<ScaleSpec>(), Ok(want), "{s}");
        }
        for s in [
            "",
            "+",
            "-",
            "=",
            "x",
            "+-1",
            "--1",
            "1.5",
            " 3",
            "3 ",
            "+ 3",
            "=+3",
            "99999999999",
            "2..",
            "..4",
            "2..x",
        ] {
            assert!(s.parse::<ScaleSpec>().is_err(), "{s:?} should be rejected");
        }
        let json = |s: ScaleSpec| serde_json::to_value(s.request()).unwrap().to_string();
        assert_eq!(json(ScaleSpec::Up(2)), r#"{"by":2,"cmd":"scale"}"#);
        assert_eq!(json(ScaleSpec::Down(3)), r#"{"by":-3,"cmd":"scale"}"#);
        assert_eq!(json(ScaleSpec::To(4)), r#"{"cmd":"scale","to":4}"#);
        assert_eq!(
            json(ScaleSpec::Range(2, 16)),
            r#"{"cmd":"scale","max":16,"min":2}"#
        );
    }

    #[test]
    fn signals() {
        for s in ["TERM", "SIGTERM", "term", "sigterm", "Term", "15"] {
            assert_eq!(parse_signal(s), Ok(SignalName("TERM".into())), "{s}");
        }
        assert_eq!(parse_signal("9"), Ok(SignalName("KILL".into())));
        assert_eq!(parse_signal("usr1"), Ok(SignalName("USR1".into())));
        assert_eq!(parse_signal("SIGQUIT"), Ok(SignalName("QUIT".into())));
        for s in ["", "TERMINATE", "SIG", "0", "999", "-9", "SIGFOO", "1x"] {
            assert!(parse_signal(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_secs("0"), Ok(Timeout(None)));
        assert_eq!(
            parse_secs("2.5"),
            Ok(Timeout(Some(Duration::from_millis(2500))))
        );
        for s in ["-1", "x", "inf", "NaN", ""] {
            assert!(parse_secs(s).is_err(), "{s:?}");
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_checked(std::iter::once("arbiterctl").chain(args.iter().copied()))
    }

    #[test]
    fn command_lines() {
        Cli::command().debug_assert();
        let c = parse(&["scale", "-1"]).unwrap();
        assert_eq!(
            c.command,
            Command::Scale {
                spec: ScaleSpec::Down(1)
            }
        );
        let c = parse(&["--json", "scale", "--", "-2"]).unwrap();
        assert!(c.json);
        assert_eq!(
            c.command,
            Command::Scale {
                spec: ScaleSpec::Down(2)
            }
        );
        let c = parse(&["status", "--json", "--name", "web", "--timeout", "3"]).unwrap();
        assert!(c.json);
        assert_eq!(c.name.as_deref(), Some("web"));
        assert_eq!(c.timeout, Some(Timeout(Some(Duration::from_secs(3)))));
        let c = parse(&["kill", "42", "--signal", "sigkill"]).unwrap();
        assert_eq!(
            c.command,
            Command::Kill {
                pid: 42,
                signal: SignalName("KILL".into())
            }
        );
        let c = parse(&["kill", "42"]).unwrap();
        assert_eq!(
            c.command,
            Command::Kill {
                pid: 42,
                signal: SignalName("TERM".into())
            }
        );
        let c = parse(&["stop", "--fast"]).unwrap();
        assert_eq!(c.command, Command::Stop { fast: true });

        // Completions offer the signal names, not file names.
        let cmd = Cli::command();
        let kill = cmd.find_subcommand("kill").unwrap();
        let sig = kill
            .get_arguments()
            .find(|a| a.get_long() == Some("signal"));
        let names: Vec<String> = sig
            .unwrap()
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "TERM") && names.iter().any(|n| n == "USR1"));
        assert!(
            parse(&["kill", "1", "--signal", "9"]).is_ok(),
            "numbers still parse"
        );

        use clap::error::ErrorKind as K;
        for (args, kind) in [
            (&["scale", "x"][..], K::ValueValidation),
            (&["scale"], K::MissingRequiredArgument),
            (&["kill", "1", "--signal", "NOPE"], K::ValueValidation),
            (&["kill", "0"], K::ValueValidation),
            (&["kill", "-5"], K::UnknownArgument),
            (
                &["--name", "a", "--control", "/x", "ping"],
                K::ArgumentConflict,
            ),
            (
                &["ping", "--control", "/x", "--pid", "/p"],
                K::ArgumentConflict,
            ),
            (
                &["--pid", "/p", "status", "--name", "a"],
                K::ArgumentConflict,
            ),
            (&["explode"], K::InvalidSubcommand),
            (&["--timeout", "-3", "ping"], K::UnknownArgument),
            (&["--timeout", "soon", "ping"], K::ValueValidation),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), kind, "{args:?}: {e}");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
