//! Signal names and numbers, as `arbiterctl kill --signal` and the control
//! protocol's `kill` request take them: `TERM`, `SIGTERM`, `term` or `15`.
//!
//! One table for both sides, so that what arbiterctl accepts is what the master
//! accepts. The names are the short ones (`TERM`); the control protocol carries them
//! that way.

/// A signal the master knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NamedSignal {
    /// The short name: `TERM`, `USR1`.
    pub name: &'static str,
    /// Its number on this platform.
    pub number: i32,
}

/// The standard signals of this platform (no real-time ones), by number.
const SIGNALS: &[(&str, libc::c_int)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    // Absent on the architectures where nix (the master's view) leaves it out.
    #[cfg(all(
        any(target_os = "linux", target_os = "android"),
        not(any(
            target_arch = "mips",
            target_arch = "mips32r6",
            target_arch = "mips64",
            target_arch = "mips64r6",
            target_arch = "sparc64"
        ))
    ))]
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    #[cfg(any(target_os = "linux", target_os = "android"))]
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

impl NamedSignal {
    /// Every signal in the table, by number.
    pub fn all() -> impl Iterator<Item = NamedSignal> {
        SIGNALS
            .iter()
            .map(|&(name, number)| NamedSignal { name, number })
    }

    /// The signal numbered `n`, if it is in the table.
    pub fn from_number(n: i32) -> Option<NamedSignal> {
        NamedSignal::all().find(|s| s.number == n)
    }

    /// `TERM`, `SIGTERM`, `term` or `sigterm` (no number).
    pub fn from_name(s: &str) -> Option<NamedSignal> {
        let upper = s.to_ascii_uppercase();
        let short = upper.strip_prefix("SIG").unwrap_or(&upper);
        NamedSignal::all().find(|sig| sig.name == short)
    }
}

impl std::fmt::Display for NamedSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// `TERM`, `SIGTERM`, `term`, `sigterm` or `15`; the error is one line for a person.
pub fn parse(s: &str) -> Result<NamedSignal, String> {
    // Digits only: `+15` and `-15` are not signal numbers anyone means.
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<i32>()
            .ok()
            .and_then(NamedSignal::from_number)
            .ok_or_else(|| format!("no signal number {s}"));
    }
    NamedSignal::from_name(s).ok_or_else(|| {
        format!(
            "unknown signal {s:?} (use a name such as TERM, INT, QUIT, KILL, USR1, or a number)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        let term = NamedSignal {
            name: "TERM",
            number: libc::SIGTERM,
        };
        for s in ["TERM", "SIGTERM", "term", "sigterm", "Term", "15"] {
            assert_eq!(parse(s), Ok(term), "{s}");
        }
        assert_eq!(parse("9").map(|s| s.name), Ok("KILL"));
        assert_eq!(parse("usr1").map(|s| s.number), Ok(libc::SIGUSR1));
        assert_eq!(parse("SIGQUIT").map(|s| s.name), Ok("QUIT"));
        for s in [
            "",
            "TERMINATE",
            "SIG",
            "SIGSIG",
            "0",
            "999",
            "-9",
            "+9",
            "SIGFOO",
            "1x",
            " 9",
            "99999999999",
        ] {
            assert!(parse(s).is_err(), "{s:?} should be rejected");
        }
        assert_eq!(parse("999"), Err("no signal number 999".to_string()));
        assert!(
            parse("nope")
                .unwrap_err()
                .starts_with("unknown signal \"nope\"")
        );
    }

    #[test]
    fn the_table_is_consistent() {
        for sig in NamedSignal::all() {
            assert_eq!(NamedSignal::from_number(sig.number), Some(sig));
            assert_eq!(NamedSignal::from_name(sig.name), Some(sig));
            assert_eq!(parse(&sig.number.to_string()), Ok(sig));
            assert_eq!(sig.to_string(), sig.name);
        }
        let mut numbers: Vec<i32> = NamedSignal::all().map(|s| s.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), SIGNALS.len(), "a number appears twice");
    }
}
