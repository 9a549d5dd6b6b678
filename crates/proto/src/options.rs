//! arbiterd's options as data, for the readers of its settings that are not its
//! clap parser: the config file, whose keys are the long options, and arbiterctl,
//! which re-reads a running master's command line from `/proc` and must know which
//! options eat the next argument (it does not link the daemon, so it cannot ask
//! clap). arbiterd's clap definition stays the one that parses; `tests/cli_table.rs`
//! holds this table to it both ways, so a new option or a changed one fails there
//! until it is entered here.

/// What an option takes on the command line.
///
/// A reader that skips over options must know this to tell an option's value
/// from the next option; match on it exhaustively, so that a new kind is handled
/// where it matters rather than read as one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takes {
    /// No value: what follows is an argument of its own.
    Flag,
    /// Exactly one value: `--name web`, `--name=web`, `-n web`, `-nweb`, `-n=web`.
    Value,
    /// None or more: `--reload-on-change`, `--reload-on-change src lib` (up to the
    /// next argument that starts with `-`), `--reload-on-change=src`.
    Values,
}

/// One option of arbiterd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opt {
    /// `--long`, without the dashes.
    pub long: &'static str,
    /// `-c`, if it has one.
    pub short: Option<char>,
    pub takes: Takes,
    /// A config-file key as well (spelt as `long`). Not for the options about the
    /// invocation itself rather than the master it starts: `--config` would name
    /// another file, `--check-config`, `--help` and `--version` start none.
    pub in_file: bool,
}

use Takes::{Flag, Value, Values};

/// Every option of arbiterd that is not positional (the COMMAND after `--` is
/// not), in the order of `arbiterd --help`, clap's own `--help` and `--version`
/// included: arbiterctl must step over them like any other.
#[rustfmt::skip]
pub const OPTIONS: &[Opt] = &[
    Opt { long: "bind",                short: Some('b'), takes: Value, in_file: true },
    Opt { long: "workers",             short: Some('w'), takes: Value, in_file: true },
    Opt { long: "max-workers",         short: None,      takes: Value, in_file: true },
    Opt { long: "timeout",             short: Some('t'), takes: Value, in_file: true },
    Opt { long: "graceful-timeout",    short: None,      takes: Value, in_file: true },
    Opt { long: "shutdown-delay",      short: None,      takes: Value, in_file: true },
    Opt { long: "ready-min",           short: None,      takes: Value, in_file: true },
    Opt { long: "ready",               short: None,      takes: Value, in_file: true },
    Opt { long: "boot-timeout",        short: None,      takes: Value, in_file: true },
    Opt { long: "kill-mode",           short: None,      takes: Value, in_file: true },
    Opt { long: "cgroup",              short: None,      takes: Value, in_file: true },
    Opt { long: "name",                short: Some('n'), takes: Value, in_file: true },
    Opt { long: "pid",                 short: Some('p'), takes: Value, in_file: true },
    Opt { long: "control",             short: None,      takes: Value, in_file: true },
    Opt { long: "metrics-bind",        short: None,      takes: Value, in_file: true },
    Opt { long: "daemon",              short: Some('D'), takes: Flag,  in_file: true },
    Opt { long: "log-file",            short: None,      takes: Value, in_file: true },
    Opt { long: "log-level",           short: None,      takes: Value, in_file: true },
    Opt { long: "config",              short: Some('c'), takes: Value, in_file: false },
    Opt { long: "max-worker-rss",      short: None,      takes: Value, in_file: true },
    Opt { long: "max-worker-age",      short: None,      takes: Value, in_file: true },
    Opt { long: "max-requests",        short: None,      takes: Value, in_file: true },
    Opt { long: "max-requests-jitter", short: None,      takes: Value, in_file: true },
    Opt { long: "env",                 short: None,      takes: Value, in_file: true },
    Opt { long: "env-file",            short: None,      takes: Value, in_file: true },
    Opt { long: "reuse-port",          short: None,      takes: Flag,  in_file: true },
    Opt { long: "backlog",             short: None,      takes: Value, in_file: true },
    Opt { long: "umask",               short: None,      takes: Value, in_file: true },
    Opt { long: "chdir",               short: None,      takes: Value, in_file: true },
    Opt { long: "user",                short: None,      takes: Value, in_file: true },
    Opt { long: "group",               short: None,      takes: Value, in_file: true },
    Opt { long: "check-config",        short: None,      takes: Flag,  in_file: false },
    Opt { long: "preload",             short: None,      takes: Flag,  in_file: true },
    Opt { long: "reload-on-change",    short: None,      takes: Values, in_file: true },
    Opt { long: "help",                short: Some('h'), takes: Flag,  in_file: false },
    Opt { long: "version",             short: Some('V'), takes: Flag,  in_file: false },
];

/// The option spelt `--name`.
pub fn by_long(name: &str) -> Option<&'static Opt> {
    OPTIONS.iter().find(|o| o.long == name)
}

/// The option spelt `-c`.
pub fn by_short(c: char) -> Option<&'static Opt> {
    OPTIONS.iter().find(|o| o.short == Some(c))
}

/// The options that are config-file keys, in [`OPTIONS`] order. Not all the
/// file's keys: it has the COMMAND too, which is no option.
pub fn file_keys() -> impl Iterator<Item = &'static str> {
    OPTIONS.iter().filter(|o| o.in_file).map(|o| o.long)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name given twice would hide the second entry from the look-ups.
    #[test]
    fn each_spelling_names_one_option() {
        for (i, o) in OPTIONS.iter().enumerate() {
            let later = &OPTIONS[i + 1..];
            assert!(
                !later.iter().any(|p| p.long == o.long),
                "--{} is in OPTIONS twice",
                o.long
            );
            if let Some(c) = o.short {
                assert!(
                    !later.iter().any(|p| p.short == Some(c)),
                    "-{c} is in OPTIONS twice"
                );
            }
        }
    }

    /// The file's keys are written as the long names; `_` is read as `-`.
    #[test]
    fn long_names_are_lower_case_words_and_dashes() {
        for o in OPTIONS {
            assert!(
                !o.long.is_empty()
                    && !o.long.starts_with('-')
                    && o.long.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{:?}",
                o.long
            );
            assert!(o.short.is_none_or(|c| c.is_ascii_alphanumeric()), "{o:?}");
        }
    }

    #[test]
    fn look_ups() {
        assert_eq!(by_long("name").map(|o| o.short), Some(Some('n')));
        assert_eq!(by_short('n').map(|o| o.long), Some("name"));
        assert_eq!(by_long("daemon").map(|o| o.takes), Some(Flag));
        assert_eq!(by_short('D').map(|o| o.takes), Some(Flag));
        assert_eq!(by_long("control").map(|o| o.takes), Some(Value));
        assert_eq!(by_long("nope"), None);
        assert_eq!(by_short('x'), None);
        let keys: Vec<_> = file_keys().collect();
        assert_eq!(keys.first(), Some(&"bind"));
        for invocation in ["config", "check-config", "help", "version"] {
            assert!(!keys.contains(&invocation), "{invocation}");
        }
    }
}
