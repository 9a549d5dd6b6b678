//! `arbiterctl --pid` re-parses a master's command line from /proc with a table of
//! arbiterd's options (`arbiter_ctl::resolve`), since arbiterctl does not link the
//! daemon. These tests hold that table to arbiterd's clap definition: an option
//! added, renamed or turned into a flag there without the table following would
//! make arbiterctl read the wrong argument as the control socket or the name.

use std::collections::BTreeSet;

use arbiter_ctl::resolve::{LONG_WITH_VALUE, SHORT_WITH_VALUE, parse_master_cmdline};
use clap::CommandFactory;

/// arbiterd's options as clap has them: (long names, short names) of the ones
/// that take a value, and of the ones that do not. Aliases count: clap accepts them.
struct Options {
    long_valued: BTreeSet<String>,
    short_valued: BTreeSet<char>,
    long_flags: BTreeSet<String>,
    short_flags: BTreeSet<char>,
}

fn arbiterd_options() -> Options {
    let mut cmd = arbiter_daemon::config::Cli::command();
    // Fills in the defaults (actions, help and version) that the table must match.
    cmd.build();
    let mut o = Options {
        long_valued: BTreeSet::new(),
        short_valued: BTreeSet::new(),
        long_flags: BTreeSet::new(),
        short_flags: BTreeSet::new(),
    };
    for arg in cmd.get_arguments().filter(|a| !a.is_positional()) {
        let (longs, shorts) = if arg.get_action().takes_values() {
            (&mut o.long_valued, &mut o.short_valued)
        } else {
            (&mut o.long_flags, &mut o.short_flags)
        };
        longs.extend(
            arg.get_long_and_visible_aliases()
                .into_iter()
                .flatten()
                .map(str::to_string),
        );
        longs.extend(
            arg.get_all_aliases()
                .into_iter()
                .flatten()
                .map(str::to_string),
        );
        shorts.extend(arg.get_short_and_visible_aliases().into_iter().flatten());
        shorts.extend(arg.get_all_short_aliases().into_iter().flatten());
    }
    o
}

#[test]
fn ctl_knows_which_arbiterd_options_take_a_value() {
    let o = arbiterd_options();
    let table_long: BTreeSet<String> = LONG_WITH_VALUE.iter().map(|s| s.to_string()).collect();
    let table_short: BTreeSet<char> = SHORT_WITH_VALUE.iter().map(|&b| b as char).collect();
    assert_eq!(
        table_long.len(),
        LONG_WITH_VALUE.len(),
        "a long option is in arbiter_ctl::resolve::LONG_WITH_VALUE twice"
    );
    assert_eq!(
        table_short.len(),
        SHORT_WITH_VALUE.len(),
        "a short option is in arbiter_ctl::resolve::SHORT_WITH_VALUE twice"
    );
    let missing: Vec<_> = o.long_valued.difference(&table_long).collect();
    let extra: Vec<_> = table_long.difference(&o.long_valued).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "arbiter_ctl::resolve::LONG_WITH_VALUE is out of step with arbiterd's options: \
         missing {missing:?}, not arbiterd options that take a value {extra:?}"
    );
    let missing: Vec<_> = o.short_valued.difference(&table_short).collect();
    let extra: Vec<_> = table_short.difference(&o.short_valued).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "arbiter_ctl::resolve::SHORT_WITH_VALUE is out of step with arbiterd's options: \
         missing {missing:?}, not arbiterd options that take a value {extra:?}"
    );
}

/// The options `parse_master_cmdline` reads have the names and shorts it assumes:
/// each one, given to it in every spelling clap accepts, is found.
#[test]
fn ctl_reads_arbiterd_options_by_their_clap_names() {
    let o = arbiterd_options();
    let cmd = arbiter_daemon::config::Cli::command();
    let arg = |long: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .unwrap_or_else(|| panic!("arbiterd has no --{long}"))
    };
    let cmdline = |args: &[&str]| {
        let mut raw = Vec::new();
        for a in std::iter::once("arbiterd").chain(args.iter().copied()) {
            raw.extend_from_slice(a.as_bytes());
            raw.push(0);
        }
        parse_master_cmdline(&raw)
    };
    for long in ["control", "name", "config"] {
        assert!(o.long_valued.contains(long), "--{long} takes no value");
        let a = arg(long);
        let mut spellings = vec![
            vec![format!("--{long}"), "v".into()],
            vec![format!("--{long}=v")],
        ];
        for short in a.get_short_and_visible_aliases().into_iter().flatten() {
            spellings.push(vec![format!("-{short}"), "v".into()]);
            spellings.push(vec![format!("-{short}v")]);
        }
        for spelling in spellings {
            let args: Vec<&str> = spelling.iter().map(String::as_str).collect();
            let got = cmdline(&args);
            let value = match long {
                "control" => got.control,
                "name" => got.name,
                _ => got.config,
            };
            assert_eq!(value.as_deref(), Some("v".as_ref()), "{spelling:?}");
        }
    }
    let daemon = arg("daemon");
    assert!(
        !daemon.get_action().takes_values(),
        "--daemon takes a value"
    );
    assert!(o.long_flags.contains("daemon"));
    // A flag: what follows it is an option of its own, not its value.
    for short in daemon.get_short_and_visible_aliases().into_iter().flatten() {
        let got = cmdline(&[&format!("-{short}"), "--name", "x"]);
        assert_eq!(got.name.as_deref(), Some("x".as_ref()), "-{short}");
    }
    let got = cmdline(&["--daemon", "--name", "x"]);
    assert_eq!(got.name.as_deref(), Some("x".as_ref()));
    assert!(o.short_flags.contains(&'D'));
}
