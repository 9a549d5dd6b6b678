//! The generated files under `packaging/`: man pages (`packaging/man/*.1`) and
//! shell completions (`packaging/completions/`), rendered from the clap
//! definitions of both binaries and compared with the committed copies, so a
//! changed flag or help text cannot ship with stale docs.
//!
//!     UPDATE_GENERATED=1 cargo test --test blackbox manpages
//!
//! rewrites them instead of failing. The man pages are clap_mangen's sections
//! (NAME, SYNOPSIS, DESCRIPTION, OPTIONS) plus the ones written below (SIGNALS,
//! EXIT STATUS, FILES, ENVIRONMENT, ...), which say what `--help` has no room for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

use crate::harness::tool_missing;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Inline, Roff, bold, roman};

const UPDATE_VAR: &str = "UPDATE_GENERATED";

/// What `Roff::render` puts in front of every document (an apostrophe string).
const ROFF_PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------ hand-written text

/// A block of a hand-written man section. In the text, `` `x` `` is set in bold.
enum Block {
    /// A paragraph.
    P(&'static str),
    /// A tagged paragraph: the tag on its own line, the text indented below.
    Tp(&'static str, &'static str),
    /// Several tags, one per line (`.TQ`), sharing one text.
    Tqs(&'static [&'static str], &'static str),
    /// Literal lines (commands), kept as they are.
    Ex(&'static [&'static str]),
    /// A whole file's text as literal lines (the example config file).
    File(&'static str),
}
use Block::{Ex, File, P, Tp, Tqs};

struct Section {
    title: &'static str,
    blocks: &'static [Block],
}

/// Appended to clap's DESCRIPTION of arbiterd (its `long_about` is off, so `--help`
/// stays short).
const ARBITERD_DESCRIPTION: &[Block] = &[
    P(
        "`arbiterd` binds the listening sockets once, forks N workers that inherit them, \
         watches their heartbeats, replaces the dead and the hung, and reloads, rescales and \
         upgrades itself without dropping a connection, with the signals and semantics of \
         gunicorn's Arbiter.",
    ),
    P(
        "With no COMMAND, each worker runs the built-in HTTP worker. With a COMMAND after \
         `--`, each worker is that program, exec'd after fork in its own process group, \
         with the listening sockets at fds 3, 4, ... in `--bind` order and `LISTEN_FDS`, \
         `LISTEN_PID` and `LISTEN_FDNAMES` set as systemd sets them: `uvicorn --fd 3`, \
         gunicorn (which adopts them as under systemd, with no `-b`) and Rust's \
         listenfd serve unchanged.",
    ),
    P(
        "A worker proves it is alive by touching the file at `ARBITER_HEARTBEAT_FD` or by \
         sending `WATCHDOG=1` to `NOTIFY_SOCKET`; one silent for `--timeout` after its first \
         beat gets ABRT, then KILL. With `--ready notify` a worker is ready once it sends \
         `READY=1`. A reload is readiness-gated: old workers retire only as new ones become \
         ready, and if the new generation never does, the old one keeps serving.",
    ),
    P(
        "Every long option can also be set in the `--config` file (TOML, the long option \
         names as keys, and `command`); the command line wins over the file, and the file \
         is re-read on every reload. See CONFIG FILE below.",
    ),
];

const ARBITERD_SECTIONS: &[Section] = &[
    Section {
        title: "SIGNALS",
        blocks: &[
            P("As gunicorn's master. Every delivery counts: three TTIN are three more workers."),
            Tp(
                "HUP",
                "Reload: re-read the config file, start a new generation, retire the old one \
                 as the new one becomes ready.",
            ),
            Tp(
                "TERM",
                "Graceful shutdown. With `--shutdown-delay`, first a drain window: the \
                 workers serve on while `/readyz` says 503, so that balancers stop sending. \
                 Then, once the accept queues have stayed empty for 100 ms (at most half of \
                 `--graceful-timeout`), workers get TERM and finish in-flight requests; KILL \
                 after `--graceful-timeout`. A second TERM, or INT, ends the window or the \
                 wait at once. Exit status 0.",
            ),
            Tp(
                "INT, QUIT",
                "Quick shutdown: workers get QUIT and exit at once.",
            ),
            Tp(
                "TTIN, TTOU",
                "One worker more, one fewer (the oldest first, never below 1). TTIN at \
                 `--max-workers` is logged and ignored.",
            ),
            Tp(
                "USR1",
                "Reopen the log file. Workers write through the master, so their output \
                 follows.",
            ),
            Tp(
                "USR2",
                "Upgrade on the fly: fork and exec a new master that inherits the listeners; \
                 the old pidfile becomes PIDFILE.oldbin.",
            ),
            Tp(
                "WINCH",
                "When daemonized (`-D`): stop all workers gracefully, keep the master (the \
                 upgrade dance). Ignored in the foreground.",
            ),
            Tp("CHLD", "Reap."),
            P(
                "Workers get TERM (finish in-flight work, then exit), QUIT or INT (exit now), \
                 and ABRT on a heartbeat timeout, followed by KILL. Unlike unicorn and nginx, \
                 TERM is the graceful one; `arbiterctl stop` and `arbiterctl stop --fast` mean \
                 the same for every master. Send the master's signals to the master alone \
                 (`systemctl kill --kill-whom=main`): the built-in worker and \
                 `python/arbiter_preload` ignore HUP, USR1, USR2, WINCH, TTIN and TTOU, but a \
                 COMMAND worker starts with default dispositions.",
            ),
        ],
    },
    Section {
        title: "EXIT STATUS",
        blocks: &[
            Tp(
                "0",
                "Shut down on request (TERM, INT, QUIT, `arbiterctl stop`), or \
                 `--check-config` found the configuration valid.",
            ),
            Tp(
                "1",
                "Startup error: a bad config file (`PATH line N: key: ...`), an address that \
                 cannot be bound, a COMMAND that is not found or not executable, a pidfile \
                 held by a live master. One line on stderr names the thing at fault; nothing \
                 is left behind.",
            ),
            Tp(
                "2",
                "Usage error: an unknown flag or a bad flag value. stderr has the reason, a \
                 tip where there is one (did you mean ...), and the usage.",
            ),
            Tp(
                "3, 4",
                "A worker of the first generation exited with 3 (boot error) or 4 (application \
                 load error), as in gunicorn. Once the service has served, such a worker only \
                 fails its start (backoff, or a failed reload).",
            ),
            P(
                "A worker that exits with 78 (EX_CONFIG) is not restarted until a reload or a \
                 scale; one that keeps failing is restarted with exponential backoff.",
            ),
        ],
    },
    Section {
        title: "FILES",
        blocks: &[
            Tqs(
                &[
                    "$XDG_RUNTIME_DIR/arbiter/NAME.sock",
                    "/run/arbiter/NAME.sock",
                    "/tmp/arbiter-UID/NAME.sock",
                ],
                "The default control socket (the first that applies: XDG_RUNTIME_DIR set, \
                 root, anyone else). Mode 0600 in a 0700 directory; see `arbiterctl`(1).",
            ),
            Tp(
                "PIDFILE.oldbin, PIDFILE.2",
                "During an upgrade, the old master's and the new master's pidfiles; the new \
                 master renames its own to PIDFILE once the old one has exited.",
            ),
            Tp(
                "/etc/arbiter/NAME.toml",
                "The config file of the systemd unit arbiter@NAME.service.",
            ),
            Tp(
                "/var/log/arbiter/NAME.log",
                "Where the packaged logrotate rules expect `--log-file`; rotated daily, \
                 followed by `arbiterctl reopen`.",
            ),
        ],
    },
    Section {
        title: "ENVIRONMENT",
        blocks: &[
            Tp(
                "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
                "Sockets handed over by systemd socket activation (or by an upgrading master): \
                 adopted instead of binding, and passed on to the workers with their names. A \
                 `--bind` that names the address one of systemd's listens on (or `fd://N` for \
                 the one passed as N) is that socket, never bound again nor its file removed; \
                 one that no `--bind` names is served too.",
            ),
            Tp(
                "NOTIFY_SOCKET, WATCHDOG_USEC",
                "Under systemd: `READY=1` once the first generation is ready, `RELOADING=1` \
                 around a reload, `STATUS=` with the worker counts, and watchdog pings. A new \
                 master of an upgrade says nothing until the old one exits, having written the \
                 new pid to the pidfile, which systemd reads (`PIDFile=`) as it reaps the old. \
                 With NOTIFY_SOCKET set, `-D` does not detach. Never passed on to workers.",
            ),
            Tp("XDG_RUNTIME_DIR", "Where the default control socket goes."),
            P("Set for each worker:"),
            Tp(
                "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
                "The listeners at fds 3, 4, ...; LISTEN_PID is the worker's own pid.",
            ),
            Tp(
                "ARBITER_WORKER_ID, ARBITER_SLOT, ARBITER_GENERATION, ARBITER_MASTER_PID",
                "The spawn counter (gunicorn's age), the slot 0..N-1 (reused by a \
                 replacement), the generation (bumped by every reload), the master's pid.",
            ),
            Tp(
                "ARBITER_HEARTBEAT_FD, ARBITER_TIMEOUT",
                "An fd on an unlinked file: change its ctime (fchmod, a write) to beat; the \
                 heartbeat timeout in seconds.",
            ),
            Tp(
                "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID",
                "The master's sd_notify socket (READY=1, WATCHDOG=1, STATUS=, STOPPING=1), \
                 with the watchdog variables when there is a timeout, as systemd sets them.",
            ),
        ],
    },
    Section {
        title: "CONFIG FILE",
        blocks: &[
            P(
                "TOML. The keys are the long options (`graceful-timeout`, or \
                 `graceful_timeout`) and `command`, the worker program: a list of words, or \
                 one string split into words as sh(1) splits them (quotes and backslashes) \
                 with no expansion, and shell operators refused unless quoted. A value of \
                 the wrong type, an unknown key or a key given twice is refused with the \
                 file, the line and the key: at start-up (exit status 1), and at a reload \
                 (the reload fails, the running workers keep serving). This example, with \
                 every key, is installed as \
                 /usr/share/doc/arbiter/examples/arbiter.toml:",
            ),
            File(include_str!("../packaging/arbiter.toml")),
        ],
    },
    Section {
        title: "EXAMPLES",
        blocks: &[
            Ex(&["arbiterd -w 4 -b 127.0.0.1:8000"]),
            Ex(&["arbiterd -w 4 -b 127.0.0.1:8000 -- uvicorn --fd 3 app:app"]),
            Ex(&[
                "arbiterd -n web -c /etc/arbiter/web.toml -p /run/web.pid -D",
                "kill -HUP $(cat /run/web.pid)",
            ]),
        ],
    },
    Section {
        title: "SEE ALSO",
        blocks: &[P(
            "`arbiterctl`(1), gunicorn(1), systemd.socket(5), sd_notify(3), logrotate(8)",
        )],
    },
];

const ARBITERCTL_SECTIONS: &[Section] = &[
    Section {
        title: "EXIT STATUS",
        blocks: &[
            Tp("0", "Done."),
            Tp(
                "1",
                "The master refused or the action failed (the reason on stderr).",
            ),
            Tp(
                "2",
                "Usage error. With `--json`, stdout has \
                 {\"error\":{\"kind\":\"usage\",\"message\":...}} too.",
            ),
            Tp("3", "No master answering at the control socket."),
            Tp(
                "4",
                "(`status` only) Running but degraded: fewer ready workers than the target.",
            ),
            Tp(
                "5",
                "(`status` only) Stopping: in the drain window of `--shutdown-delay` (serving \
                 on, not ready) or after it. Wins over 4.",
            ),
        ],
    },
    Section {
        title: "FILES",
        blocks: &[Tqs(
            &[
                "$XDG_RUNTIME_DIR/arbiter/NAME.sock",
                "/run/arbiter/NAME.sock",
                "/tmp/arbiter-UID/NAME.sock",
            ],
            "The control socket of the master named NAME, as `arbiterd`(1) places it. It \
             speaks newline-delimited JSON (and gunicorn's gunicornc framing); only the \
             master's own user and root may use it.",
        )],
    },
    Section {
        title: "ENVIRONMENT",
        blocks: &[Tp(
            "XDG_RUNTIME_DIR",
            "Where the default control socket is looked for.",
        )],
    },
    Section {
        title: "EXAMPLES",
        blocks: &[
            Ex(&["arbiterctl --name web status"]),
            Ex(&["arbiterctl --name web scale +2"]),
            Ex(&["arbiterctl --name web reload && deploy-next-step"]),
            Ex(&["arbiterctl --pid /run/web.pid --json status"]),
            Ex(&["echo '{\"v\":1,\"cmd\":\"ping\"}' | socat - UNIX-CONNECT:/run/arbiter/web.sock"]),
        ],
    },
    Section {
        title: "SEE ALSO",
        blocks: &[P("`arbiterd`(1), socat(1)")],
    },
];

// ------------------------------------------------------------------ rendering

/// `` `x` `` in bold, the rest roman.
fn inlines(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(i, s)| if i % 2 == 1 { bold(s) } else { roman(s) })
        .collect()
}

fn render_blocks(roff: &mut Roff, blocks: &[Block]) {
    for b in blocks {
        match b {
            P(text) => {
                roff.control("PP", []);
                roff.text(inlines(text));
            }
            Tp(tag, text) => {
                roff.control("TP", []);
                roff.text(inlines(tag));
                roff.text(inlines(text));
            }
            Tqs(tags, text) => {
                for (i, tag) in tags.iter().enumerate() {
                    roff.control(if i == 0 { "TP" } else { "TQ" }, []);
                    roff.text(inlines(tag));
                }
                roff.text(inlines(text));
            }
            Ex(lines) => literal(roff, lines.iter().copied()),
            File(text) => literal(roff, text.lines()),
        }
    }
}

/// Lines set as they are, indented, unfilled.
fn literal<'a>(roff: &mut Roff, lines: impl Iterator<Item = &'a str>) {
    roff.control("PP", []);
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for l in lines {
        roff.text([roman(l)]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
}

/// A rendered piece without the preamble each `Roff::render` repeats.
fn body(rendered: String) -> String {
    match rendered.strip_prefix(ROFF_PREAMBLE) {
        Some(rest) => rest.to_string(),
        None => rendered,
    }
}

fn man_part(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut buf = Vec::new();
    f(&mut buf).expect("render to a Vec");
    body(String::from_utf8(buf).expect("roff is UTF-8"))
}

/// One `.SS` per subcommand (usage, help, its own arguments) in place of
/// clap_mangen's SUBCOMMANDS section, which points at one page per subcommand.
fn render_commands(roff: &mut Roff, cmd: &clap::Command) {
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        let mut sub = sub.clone();
        let usage = sub.render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage:").trim().to_string();
        roff.control("SS", [name]);
        roff.control("PP", []);
        roff.text([bold(usage)]);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.control("PP", []);
            roff.text([roman(about.to_string())]);
        }
        let own: Vec<&clap::Arg> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .collect();
        for a in own {
            let mut tag = String::new();
            if let Some(s) = a.get_short() {
                tag.push_str(&format!("-{s}"));
            }
            if let Some(l) = a.get_long() {
                if !tag.is_empty() {
                    tag.push_str(", ");
                }
                tag.push_str(&format!("--{l}"));
            }
            let takes_value = a.get_num_args().is_some_and(|n| n.takes_values())
                && !matches!(
                    a.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
                );
            if let Some(v) = a.get_value_names().and_then(|v| v.first())
                && takes_value
            {
                if a.is_positional() {
                    tag.push_str(v.as_str());
                } else {
                    tag.push_str(&format!(" <{v}>"));
                }
            }
            let defaults: Vec<String> = a
                .get_default_values()
                .iter()
                .map(|d| d.to_string_lossy().into_owned())
                .collect();
            if !defaults.is_empty() && takes_value {
                tag.push_str(&format!(" [default: {}]", defaults.join(", ")));
            }
            roff.control("TP", []);
            roff.text([bold(tag)]);
            if let Some(help) = a.get_long_help().or_else(|| a.get_help()) {
                roff.text([roman(help.to_string())]);
            }
        }
    }
}

/// A man page: clap_mangen's sections, then the hand-written ones.
fn render_man(cmd: clap::Command, extra_description: &[Block], sections: &[Section]) -> String {
    // `about` is the crate description, "arbiterd: the pre-fork master": NAME
    // already says whose it is.
    let name = cmd.get_name().to_string();
    let cmd = match cmd.get_about().map(|a| a.to_string()) {
        Some(about) => {
            let short = about.strip_prefix(&format!("{name}: ")).unwrap_or(&about);
            cmd.about(short.to_string())
        }
        None => cmd,
    };
    let man = Man::new(cmd.clone()).manual("arbiter");
    let mut built = cmd;
    built.build();
    let mut out = String::from(ROFF_PREAMBLE);
    out += &man_part(|w| man.render_title(w));
    out += &man_part(|w| man.render_name_section(w));
    out += &man_part(|w| man.render_synopsis_section(w));
    if built.get_long_about().is_some() || extra_description.is_empty() {
        out += &man_part(|w| man.render_description_section(w));
    } else {
        // Only the one-line `about`, already in NAME: the paragraphs below say more.
        let mut roff = Roff::new();
        roff.control("SH", ["DESCRIPTION"]);
        out += &body(roff.render());
    }
    let mut roff = Roff::new();
    render_blocks(&mut roff, extra_description);
    out += &body(roff.render());
    out += &man_part(|w| man.render_options_section(w));
    if built.has_subcommands() {
        let mut roff = Roff::new();
        render_commands(&mut roff, &built);
        out += &body(roff.render());
    }
    if built.get_after_long_help().is_some() || built.get_after_help().is_some() {
        out += &man_part(|w| man.render_extra_section(w));
    }
    for s in sections {
        let mut roff = Roff::new();
        roff.control("SH", [s.title]);
        render_blocks(&mut roff, s.blocks);
        out += &body(roff.render());
    }
    out += &man_part(|w| man.render_version_section(w));
    out
}

/// Completion scripts for bash, zsh and fish, under the names their packaged
/// locations expect once the directory is dropped (`NAME.bash` -> bash-completion's
/// `NAME`, `_NAME` for zsh, `NAME.fish`).
fn render_completions(cmd: &clap::Command, bin: &str, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for (shell, file) in [
        (Shell::Bash, format!("{bin}.bash")),
        (Shell::Zsh, format!("_{bin}")),
        (Shell::Fish, format!("{bin}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), bin, &mut buf);
        let script = String::from_utf8(buf).expect("completions are UTF-8");
        let script = complete_instance_names(shell, bin, &script);
        out.insert(
            PathBuf::from("packaging/completions").join(file),
            script.into_bytes(),
        );
    }
}

/// `--name` completes to the names of the running masters: the control sockets
/// in the default directories (`NAME.sock`, see FILES in arbiterd(1)). clap has
/// no way to say so for a static script; `--name` has `ValueHint::Other` (no file
/// names), and its empty completion is replaced here, in each shell's terms.
fn complete_instance_names(shell: Shell, bin: &str, script: &str) -> String {
    let (helper, out) = match shell {
        Shell::Bash => {
            let helper = "# The names of the running masters: their control sockets.\n\
                 __arbiter_names() {\n\
                 \x20   local d f\n\
                 \x20   for d in ${XDG_RUNTIME_DIR:+\"$XDG_RUNTIME_DIR/arbiter\"} /run/arbiter \"/tmp/arbiter-$UID\"; do\n\
                 \x20       for f in \"$d\"/*.sock; do\n\
                 \x20           [[ -S $f ]] || continue\n\
                 \x20           f=${f##*/}\n\
                 \x20           printf '%s\\n' \"${f%.sock}\"\n\
                 \x20       done\n\
                 \x20   done\n\
                 }\n\n";
            let mut out = String::new();
            let mut lines = script.lines().peekable();
            while let Some(line) = lines.next() {
                out.push_str(line);
                out.push('\n');
                let label = line.trim();
                if (label == "--name)" || label == "-n)")
                    && let Some(next) = lines.peek()
                    && next.trim() == "COMPREPLY=(\"${cur}\")"
                {
                    let indent = &next[..next.len() - next.trim_start().len()];
                    out.push_str(&format!(
                        "{indent}COMPREPLY=($(compgen -W \"$(__arbiter_names)\" -- \"${{cur}}\"))\n"
                    ));
                    lines.next();
                    // clap's `nospace` is for a value being typed; a listed name
                    // is whole.
                    if lines.peek().is_some_and(|l| l.contains("BASH_VERSINFO")) {
                        let block: Vec<&str> = lines.by_ref().take(3).collect();
                        assert!(
                            block
                                .get(1)
                                .is_some_and(|l| l.contains("compopt -o nospace")),
                            "{bin}: unexpected lines after --name: {block:?}"
                        );
                    }
                }
            }
            (helper, out)
        }
        Shell::Zsh => {
            let helper = "# The names of the running masters: their control sockets.\n\
                 (( $+functions[__arbiter_names] )) ||\n\
                 __arbiter_names() {\n\
                 \x20   local -a names\n\
                 \x20   local d\n\
                 \x20   for d in ${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/arbiter} /run/arbiter /tmp/arbiter-$UID; do\n\
                 \x20       names+=( $d/*.sock(N=:t:r) )\n\
                 \x20   done\n\
                 \x20   compadd -a names\n\
                 }\n\n";
            let out = script
                .lines()
                .map(|l| {
                    // `'-n+[...`, `'(--control --pid)--name=[...`.
                    let name =
                        l.starts_with('\'') && (l.contains("-n+[") || l.contains("--name=["));
                    if name && l.ends_with(":NAME:' \\") {
                        l.replace(":NAME:' \\", ":NAME:__arbiter_names' \\")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
            (helper, out)
        }
        Shell::Fish => {
            let helper = "# The names of the running masters: their control sockets.\n\
                 function __arbiter_names\n\
                 \x20   for d in $XDG_RUNTIME_DIR/arbiter /run/arbiter /tmp/arbiter-(id -u)\n\
                 \x20       for f in $d/*.sock\n\
                 \x20           test -S $f; and string replace -r '\\.sock$' '' -- (basename $f)\n\
                 \x20       end\n\
                 \x20   end\n\
                 end\n\n";
            let out = script
                .lines()
                .map(|l| {
                    if l.contains(" -l name ") && l.ends_with(" -r -f") {
                        format!("{l} -a \"(__arbiter_names)\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
            (helper, out)
        }
        _ => unreachable!("only bash, zsh and fish are generated"),
    };
    assert!(
        out.contains("__arbiter_names"),
        "{bin} {shell}: no --name completion found to replace; has clap_complete's output changed?"
    );
    // The helper after zsh's `#compdef` line, which must stay the first.
    match out.split_once('\n') {
        Some((first, rest)) if first.starts_with("#compdef") => {
            format!("{first}\n\n{helper}{}", rest.trim_start_matches('\n'))
        }
        _ => format!("{helper}{out}"),
    }
}

fn arbiterd_command() -> clap::Command {
    arbiter_daemon::config::Cli::command()
}

fn arbiterctl_command() -> clap::Command {
    arbiter_ctl::cli::Cli::command()
}

/// Every generated file, by path relative to the repository root.
fn generated() -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let d = arbiterd_command();
    out.insert(
        PathBuf::from("packaging/man/arbiterd.1"),
        render_man(d.clone(), ARBITERD_DESCRIPTION, ARBITERD_SECTIONS).into_bytes(),
    );
    render_completions(&d, "arbiterd", &mut out);
    let c = arbiterctl_command();
    out.insert(
        PathBuf::from("packaging/man/arbiterctl.1"),
        render_man(c.clone(), &[], ARBITERCTL_SECTIONS).into_bytes(),
    );
    render_completions(&c, "arbiterctl", &mut out);
    out
}

/// Where `want` and `have` first differ, for the failure message.
fn first_difference(want: &[u8], have: &[u8]) -> String {
    let w = String::from_utf8_lossy(want);
    let h = String::from_utf8_lossy(have);
    let (mut wl, mut hl) = (w.lines(), h.lines());
    let mut n = 1;
    loop {
        match (wl.next(), hl.next()) {
            (Some(a), Some(b)) if a == b => n += 1,
            (None, None) => return "they differ only in line endings".into(),
            (a, b) => {
                return format!(
                    "line {n}: generated {:?}, committed {:?}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                );
            }
        }
    }
}

#[test]
fn man_pages_and_completions_are_current() {
    let update = std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (rel, want) in generated() {
        let path = root().join(&rel);
        let have = std::fs::read(&path).ok();
        if have.as_deref() == Some(&want[..]) {
            continue;
        }
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            eprintln!("rewrote {}", rel.display());
            continue;
        }
        let why = match &have {
            None => "missing".to_string(),
            Some(have) => first_difference(&want, have),
        };
        stale.push(format!("  {}: {why}", rel.display()));
    }
    assert!(
        stale.is_empty(),
        "generated files under packaging/ are out of date with the clap definitions:\n{}\n\
         regenerate them with\n    {UPDATE_VAR}=1 cargo test --test blackbox manpages\n\
         and commit the result",
        stale.join("\n")
    );
}

/// The committed man pages format without warnings, where a formatter is installed.
#[test]
#[cfg_attr(not(has_man), ignore = "man is not installed (apt-get install man-db)")]
fn man_pages_format_cleanly() {
    let Some(man) = ["/usr/bin/man", "/bin/man"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return tool_missing("man is not installed (apt-get install man-db)");
    };
    for page in ["arbiterd.1", "arbiterctl.1"] {
        let path = root().join("packaging/man").join(page);
        if !path.exists() {
            continue; // reported by man_pages_and_completions_are_current
        }
        let out = Command::new(man)
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .output()
            .expect("run man");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "man -l {}: {}\n{stderr}",
            path.display(),
            out.status
        );
        // Overstrike (`X\bX`, `_\bX`) to plain text, as col -b does.
        let mut text = String::new();
        for ch in String::from_utf8_lossy(&out.stdout).chars() {
            if ch == '\u{8}' {
                text.pop();
            } else {
                text.push(ch);
            }
        }
        for heading in ["NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "SEE ALSO"] {
            assert!(
                text.contains(heading),
                "{page} has no {heading} section:\n{text}"
            );
        }
    }
}

#[test]
fn completions_parse_in_bash() {
    completions_parse("bash", ".bash");
}

#[test]
#[cfg_attr(not(has_zsh), ignore = "zsh is not installed (apt-get install zsh)")]
fn completions_parse_in_zsh() {
    completions_parse("zsh", "");
}

#[test]
#[cfg_attr(not(has_fish), ignore = "fish is not installed (apt-get install fish)")]
fn completions_parse_in_fish() {
    completions_parse("fish", ".fish");
}

/// The committed completion scripts for `shell` parse (`shell -n`).
fn completions_parse(shell: &str, suffix: &str) {
    let dir = root().join("packaging/completions");
    let Some(bin) = ["/usr/bin/", "/bin/"]
        .iter()
        .map(|d| PathBuf::from(format!("{d}{shell}")))
        .find(|p| p.exists())
    else {
        return tool_missing(&format!(
            "{shell} is not installed (apt-get install {shell})"
        ));
    };
    for name in ["arbiterd", "arbiterctl"] {
        let file = if shell == "zsh" {
            dir.join(format!("_{name}"))
        } else {
            dir.join(format!("{name}{suffix}"))
        };
        if !file.exists() {
            continue; // reported by man_pages_and_completions_are_current
        }
        let out = Command::new(&bin)
            .arg("-n")
            .arg(&file)
            .output()
            .expect("run the shell");
        assert!(
            out.status.success(),
            "{shell} -n {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
