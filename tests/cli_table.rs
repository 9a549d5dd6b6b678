//! `arbiter_proto::options` says which of arbiterd's options take a value and
//! which are config-file keys, for the readers that are not arbiterd's clap parser:
//! `arbiterctl --pid` re-parses a master's command line from /proc with it (it does
//! not link the daemon), and the config file takes its keys from it. These tests
//! hold it to arbiterd's clap definition: an option added, renamed or turned into
//! a flag there without the registry following would make arbiterctl read the
//! wrong argument as the control socket or the name, and the file refuse a key.

use arbiter_ctl::resolve::parse_master_cmdline;
use arbiter_proto::options::{self, OPTIONS, Takes};
use clap::CommandFactory;

/// arbiterd's clap definition, with the defaults (actions, value counts, help and
/// version) filled in, as the registry must match them.
fn arbiterd_command() -> clap::Command {
    let mut cmd = arbiter_daemon::config::Cli::command();
    cmd.build();
    cmd
}

/// Every name clap accepts for `arg`: its long and its aliases, its short and its
/// short aliases, hidden or not.
fn names(arg: &clap::Arg) -> (Vec<&str>, Vec<char>) {
    let mut longs: Vec<&str> = arg.get_long().into_iter().collect();
    longs.extend(arg.get_all_aliases().into_iter().flatten());
    let mut shorts: Vec<char> = arg.get_short().into_iter().collect();
    shorts.extend(arg.get_all_short_aliases().into_iter().flatten());
    (longs, shorts)
}

/// What `arg` takes, in the registry's words; an error when the registry has no
/// word for what clap does with it.
fn clap_takes(arg: &clap::Arg) -> Result<Takes, String> {
    if !arg.get_action().takes_values() {
        return Ok(Takes::Flag);
    }
    let n = arg.get_num_args().expect("built");
    if arg.is_require_equals_set() {
        return Err("a value only after `=`".into());
    }
    match (n.min_values(), n.max_values()) {
        (1, 1) => Ok(Takes::Value),
        (0, usize::MAX) => Ok(Takes::Values),
        (min, usize::MAX) => Err(format!("{min} or more values")),
        (min, max) => Err(format!("from {min} to {max} values")),
    }
}

/// clap's non-positional arguments, each in the registry as it is in clap: every
/// long name and alias, every short, with the same answer to "does it take a
/// value", the shorts belonging to the same entry as the longs.
#[test]
fn every_arbiterd_option_is_in_the_registry() {
    let cmd = arbiterd_command();
    let mut wrong = Vec::new();
    for arg in cmd.get_arguments().filter(|a| !a.is_positional()) {
        let (longs, shorts) = names(arg);
        let takes = match clap_takes(arg) {
            Ok(t) => t,
            Err(what) => {
                wrong.push(format!(
                    "{longs:?} takes {what}: options::Takes needs a way to say so"
                ));
                continue;
            }
        };
        for long in &longs {
            match options::by_long(long) {
                None => wrong.push(format!("--{long} is not in options::OPTIONS")),
                Some(o) if o.takes != takes => wrong.push(format!(
                    "--{long}: options::OPTIONS says {:?}, clap {takes:?}",
                    o.takes
                )),
                Some(_) => {}
            }
        }
        for &c in &shorts {
            match options::by_short(c) {
                None => wrong.push(format!("-{c} (of {longs:?}) is not in options::OPTIONS")),
                Some(o) if !longs.contains(&o.long) => wrong.push(format!(
                    "-{c}: options::OPTIONS gives it to --{}, clap to {longs:?}",
                    o.long
                )),
                Some(o) if o.takes != takes => wrong.push(format!(
                    "-{c}: options::OPTIONS says {:?}, clap {takes:?}",
                    o.takes
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arbiter_proto::options is out of step with arbiterd's clap options:\n{}",
        wrong.join("\n")
    );
}

/// And the other way: each registry entry is a clap option, its short that
/// option's, so the registry names nothing arbiterd would refuse. A config-file
/// key among them needs one most: `Loader` lays the file under the clap option of
/// the same name.
#[test]
fn every_registry_option_is_an_arbiterd_option() {
    let cmd = arbiterd_command();
    let mut wrong = Vec::new();
    for opt in OPTIONS {
        let arg = cmd
            .get_arguments()
            .filter(|a| !a.is_positional())
            .find(|a| names(a).0.contains(&opt.long));
        let Some(arg) = arg else {
            wrong.push(if opt.in_file {
                format!("config-file key {:?} has no arbiterd option", opt.long)
            } else {
                format!("--{} is not an arbiterd option", opt.long)
            });
            continue;
        };
        if let Some(c) = opt.short
            && !names(arg).1.contains(&c)
        {
            wrong.push(format!("-{c} is not a short of --{}", opt.long));
        }
    }
    assert!(
        wrong.is_empty(),
        "arbiter_proto::options names what arbiterd's clap does not:\n{}",
        wrong.join("\n")
    );
}

/// The options `parse_master_cmdline` reads have the names and shorts it assumes:
/// each one, given to it in every spelling clap accepts, is found.
#[test]
fn ctl_reads_arbiterd_options_by_their_clap_names() {
    let cmd = arbiterd_command();
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
        let a = arg(long);
        assert!(a.get_action().takes_values(), "--{long} takes no value");
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
    assert_eq!(daemon.get_short(), Some('D'));
    // A flag: what follows it is an option of its own, not its value.
    for short in daemon.get_short_and_visible_aliases().into_iter().flatten() {
        let got = cmdline(&[&format!("-{short}"), "--name", "x"]);
        assert_eq!(got.name.as_deref(), Some("x".as_ref()), "-{short}");
    }
    let got = cmdline(&["--daemon", "--name", "x"]);
    assert_eq!(got.name.as_deref(), Some("x".as_ref()));
}
