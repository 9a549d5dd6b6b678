use super::*;
use clap::CommandFactory;

#[test]
fn bind_forms() {
    assert_eq!(
        parse_bind("127.0.0.1:80").unwrap(),
        BindSpec::Tcp("127.0.0.1:80".parse().unwrap())
    );
    assert_eq!(
        parse_bind("tcp://127.0.0.1:81").unwrap(),
        BindSpec::Tcp("127.0.0.1:81".parse().unwrap())
    );
    assert_eq!(
        parse_bind("[::1]:82").unwrap(),
        BindSpec::Tcp("[::1]:82".parse().unwrap())
    );
    assert_eq!(
        parse_bind("[::1]").unwrap(),
        BindSpec::Tcp("[::1]:8000".parse().unwrap())
    );
    assert_eq!(
        parse_bind(":83").unwrap(),
        BindSpec::Tcp("0.0.0.0:83".parse().unwrap())
    );
    assert_eq!(
        parse_bind("127.0.0.1").unwrap(),
        BindSpec::Tcp("127.0.0.1:8000".parse().unwrap())
    );
    assert_eq!(
        parse_bind("unix:/tmp/x.sock").unwrap(),
        BindSpec::Unix("/tmp/x.sock".into())
    );
    assert_eq!(
        parse_bind("unix:///tmp/y.sock").unwrap(),
        BindSpec::Unix("/tmp/y.sock".into())
    );
    assert_eq!(parse_bind("fd://3").unwrap(), BindSpec::Fd(3));
    assert!(parse_bind("fd://x").is_err());
    assert!(parse_bind("127.0.0.1:http").is_err());
    assert!(parse_bind("127.0.0.1:70000").is_err());
    assert!(parse_bind("[::1").is_err());
    assert!(parse_bind("unix:").is_err());
    for s in ["127.0.0.1:80", "[::1]:82", "unix:/tmp/x.sock", "fd://3"] {
        assert_eq!(parse_bind(s).unwrap().to_string(), s);
    }
}

fn loader_with_file(text: &str, args: &[&str]) -> Result<Config, ConfigError> {
    // One directory per call: tests run in parallel, and texts may be alike.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("arbiter-cfg-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.toml");
    std::fs::write(&path, text).unwrap();
    let mut argv = vec![
        "arbiterd".to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let loader = Loader::from_argv(argv).unwrap();
    let out = loader.load();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn file_then_flags() {
    let cfg = loader_with_file(
        "workers = 3\ntimeout = 5\ngraceful-timeout = 0.5\nbind = [\"127.0.0.1:9\"]\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.workers, 3);
    assert_eq!(cfg.timeout, Some(Duration::from_secs(5)));
    assert_eq!(cfg.graceful_timeout, Duration::from_millis(500));
    assert!(!cfg.default_bind);
    let cfg = loader_with_file("workers = 3\n", &["-w", "5"]).unwrap();
    assert_eq!(cfg.workers, 5, "the command line wins over the file");
}

#[test]
fn file_errors_name_the_line() {
    let err = loader_with_file("workers = 2\nbogus = 1\n", &[])
        .unwrap_err()
        .0;
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("bogus"), "{err}");
    let err = loader_with_file("workers = \"x\"\n", &[]).unwrap_err().0;
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn zero_workers_refused() {
    let cli = Cli::try_parse_from(["arbiterd", "-w", "0"]).unwrap();
    assert!(Config::from_cli(cli).unwrap_err().0.contains("--workers"));
}

#[test]
fn timeout_zero_disables() {
    let cli = Cli::try_parse_from(["arbiterd", "-t", "0"]).unwrap();
    assert_eq!(Config::from_cli(cli).unwrap().timeout, None);
}

#[test]
fn missing_command_named() {
    let cli = Cli::try_parse_from(["arbiterd", "--", "no-such-command-xyz"]).unwrap();
    let err = Config::from_cli(cli).unwrap_err().0;
    assert!(err.contains("no-such-command-xyz"), "{err}");
}

#[test]
fn ready_and_log_level_values() {
    let parse = |args: &[&str]| {
        Cli::try_parse_from(std::iter::once("arbiterd").chain(args.iter().copied()))
    };
    let cli = parse(&["--ready", "notify", "--log-level", "WARN"]).unwrap();
    assert_eq!(cli.ready, Some(ReadyMode::Notify));
    assert_eq!(cli.log_level, Level::Warning);
    let cli = parse(&["--ready=exec", "--log-level=warning"]).unwrap();
    assert_eq!(cli.ready, Some(ReadyMode::Exec));
    assert_eq!(cli.log_level, Level::Warning);
    let cli = parse(&[]).unwrap();
    assert_eq!((cli.ready, cli.log_level), (None, Level::Info));
    for (args, want) in [
        (
            &["--ready", "Notify"][..],
            "--ready Notify: expected 'exec' or 'notify'",
        ),
        (&["--ready="], "--ready : expected 'exec' or 'notify'"),
        (
            &["--log-level", "loud"],
            "--log-level loud: expected debug, info, warning, error or critical",
        ),
    ] {
        let e = parse(args).unwrap_err();
        let text = e.render().to_string();
        assert_eq!(text.lines().next(), Some(format!("error: {want}").as_str()));
    }
    // Completions offer the values.
    let cmd = Cli::command();
    let values = |long: &str| -> Vec<String> {
        let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long));
        let arg = arg.unwrap();
        arg.get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect()
    };
    assert_eq!(values("ready"), ["exec", "notify"]);
    assert_eq!(
        values("log-level"),
        ["debug", "info", "warning", "error", "critical"]
    );
}

#[test]
fn ready_and_log_level_from_the_file() {
    let cfg = loader_with_file("ready = \"notify\"\nlog-level = \"Error\"\n", &[]).unwrap();
    assert_eq!(cfg.ready, Some(ReadyMode::Notify));
    assert_eq!(cfg.log_level, Level::Error);
    let cfg = loader_with_file("ready = \"notify\"\n", &["--ready", "exec"]).unwrap();
    assert_eq!(cfg.ready, Some(ReadyMode::Exec), "the command line wins");
    let err = loader_with_file("ready = \"x\"\n", &[]).unwrap_err().0;
    assert!(
        err.ends_with(" line 1: ready: expected \"exec\" or \"notify\", found string \"x\""),
        "{err}"
    );
    let err = loader_with_file("workers = 2\nlog_level = \"loud\"\n", &[])
        .unwrap_err()
        .0;
    assert!(
        err.ends_with(
            " line 2: log-level: expected \"debug\", \"info\", \"warning\", \"error\" or \
             \"critical\", found string \"loud\""
        ),
        "{err}"
    );
    // A bad value the command line overrides is not looked at.
    let cfg = loader_with_file("log-level = \"loud\"\n", &["--log-level", "debug"]).unwrap();
    assert_eq!(cfg.log_level, Level::Debug);
}

#[test]
fn command_after_double_dash_keeps_its_flags() {
    let cli = Cli::try_parse_from(["arbiterd", "-w", "2", "--", "sh", "-w", "9"]).unwrap();
    assert_eq!(cli.workers, WorkerCount { min: 2, max: 2 });
    assert_eq!(cli.command, vec!["sh", "-w", "9"]);
}

#[test]
fn workers_is_a_count_or_a_range() {
    assert_eq!(WorkerCount::parse("4"), Ok(WorkerCount { min: 4, max: 4 }));
    assert_eq!(
        WorkerCount::parse("2..16"),
        Ok(WorkerCount { min: 2, max: 16 })
    );
    assert_eq!(WorkerCount::parse("4").unwrap().range(), None);
    assert!(WorkerCount::parse("16..2").is_err());
    assert!(WorkerCount::parse("2..").is_err());
    assert!(WorkerCount::parse("x").is_err());
    let cfg = |args: &[&str]| {
        let mut all = vec!["arbiterd"];
        all.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(all).unwrap())
    };
    let c = cfg(&["-w", "2..8"]).unwrap();
    assert_eq!(
        (c.workers, c.autoscale),
        (2, Some(WorkerCount { min: 2, max: 8 }))
    );
    assert!(cfg(&["-w", "0..8"]).is_err());
    assert!(cfg(&["-w", "2..2000"]).is_err(), "past --max-workers");
    // The file takes a range as a string, a count as a number.
    let c = loader_with_file("workers = \"3..5\"\n", &[]).unwrap();
    assert_eq!(
        (c.workers, c.autoscale),
        (3, Some(WorkerCount { min: 3, max: 5 }))
    );
    let c = loader_with_file("workers = 3\n", &[]).unwrap();
    assert_eq!((c.workers, c.autoscale), (3, None));
}

#[test]
fn max_workers_bounds_and_reload_changes() {
    let load = |args: &[&str]| {
        let mut argv = vec!["arbiterd"];
        argv.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(argv).unwrap())
    };
    assert_eq!(load(&[]).unwrap().max_workers, DEFAULT_MAX_WORKERS);
    assert_eq!(
        load(&["-w", "2000"]).unwrap_err().0,
        "--workers 2000: more than --max-workers (1024)"
    );
    assert_eq!(
        load(&["-w", "2000", "--max-workers", "2000"])
            .unwrap()
            .workers,
        2000
    );
    for bad in ["0", "65537"] {
        assert_eq!(
            load(&["--max-workers", bad]).unwrap_err().0,
            format!("--max-workers must be from 1 to {MAX_WORKERS}")
        );
    }
    let err = loader_with_file("max-workers = 3\n", &["-w", "4"])
        .unwrap_err()
        .0;
    assert_eq!(err, "--workers 4: more than --max-workers (3)");
    let old = loader_with_file("max_workers = 8\n", &[]).unwrap();
    assert_eq!(old.max_workers, 8);
    let new = loader_with_file("max-workers = 4\n", &[]).unwrap();
    let (changed, restart) = describe_changes(&old, &new);
    assert_eq!(changed, ["max-workers 8 -> 4"]);
    assert!(restart.is_empty(), "{restart:?}");
}

/// The error of a file with `text`, without the temp path in front.
fn file_error(text: &str) -> String {
    let err = loader_with_file(text, &[]).unwrap_err().0;
    let (path, rest) = err.split_once(".toml").expect("the error names the file");
    assert!(path.starts_with('/'), "{err}");
    rest.to_string()
}

#[test]
fn type_errors_name_the_key_and_the_line_in_plain_words() {
    for (text, want) in [
        (
            "workers = 2\n\nbind = 18000\n",
            " line 3: bind: expected an address string like \"127.0.0.1:8000\" or a list of \
             them, found integer 18000",
        ),
        (
            "bind = [\"127.0.0.1:1\", 2]\n",
            " line 1: bind: expected an address string like \"127.0.0.1:8000\" or a list of \
             them, found a list holding integer 2",
        ),
        (
            "workers = \"many\"\n",
            " line 1: workers: expected N or MIN..MAX (whole numbers), got \"many\"",
        ),
        (
            "workers = -1\n",
            " line 1: workers: expected a whole number such as 4, or a range such as \"2..16\", found integer -1",
        ),
        (
            "graceful_timeout = true\n",
            " line 1: graceful-timeout: expected a number of seconds such as 30 or 0.5, found \
             boolean true",
        ),
        (
            "daemon = \"yes\"\n",
            " line 1: daemon: expected true or false, found string \"yes\"",
        ),
        (
            "command = 3\n",
            " line 1: command: expected a command line such as \"python3 app.py\" or a list \
             such as [\"python3\", \"app.py\"], found integer 3",
        ),
        (
            "kill-mode = \"all\"\n",
            " line 1: kill-mode: expected \"mixed\", \"group\" or \"process\", found string \
             \"all\"",
        ),
        (
            "[server]\nworkers = 2\n",
            " line 1: unknown key \"server\"; the keys are arbiterd's long options (see \
             arbiterd(1))",
        ),
        (
            "wokers = 2\n",
            " line 1: unknown key \"wokers\"; did you mean \"workers\"?",
        ),
        (
            "log-file = \"a\"\nlog_file = \"b\"\n",
            " line 2: log-file: given twice (also on line 1)",
        ),
        (
            "command = \"python3 'app.py\"\n",
            " line 1: command: unbalanced single quote (')",
        ),
    ] {
        assert_eq!(file_error(text), want, "{text:?}");
    }
    // A syntax error: toml's words, on one line, with the line.
    let err = file_error("workers = 2\ntimeout = = 5\n");
    assert!(err.starts_with(" line 2: "), "{err}");
    assert!(!err.contains('\n'), "{err:?}");
}

#[test]
fn a_command_string_is_split_as_a_shell_would() {
    let cfg = loader_with_file("command = \"/bin/sh -c 'echo \\\"$x\\\"' arg\"\n", &[]).unwrap();
    match cfg.program {
        WorkerProgram::Command { path, argv } => {
            assert_eq!(path, Path::new("/bin/sh"));
            assert_eq!(argv, ["/bin/sh", "-c", "echo \"$x\"", "arg"]);
        }
        other => panic!("{other:?}"),
    }
    // user and group as numbers too.
    let cfg = loader_with_file("user = 0\ngroup = 0\n", &[]);
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!(cfg.unwrap().worker_credentials(), Some((0, 0)));
    } else {
        cfg.unwrap();
    }
}

#[test]
fn split_words_follows_the_shell() {
    let ok = |s: &str| file::split_words(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    for (s, want) in [
        ("python3 app.py", &["python3", "app.py"][..]),
        ("  a\t b \n c  ", &["a", "b", "c"]),
        ("'a b' c", &["a b", "c"]),
        ("\"a b\" c", &["a b", "c"]),
        ("a' 'b", &["a b"]),
        ("'' x", &["", "x"]),
        ("\"\"", &[""]),
        ("a\\ b", &["a b"]),
        ("a\\\\b", &["a\\b"]),
        ("'a\\b'", &["a\\b"]),
        ("\"a\\b\"", &["a\\b"]),
        ("\"a\\\"b\"", &["a\"b"]),
        ("\"\\$HOME\"", &["$HOME"]),
        ("$HOME ~ *.py", &["$HOME", "~", "*.py"]),
        ("a\\\nb", &["ab"]),
        ("'it'\\''s'", &["it's"]),
        ("x#y", &["x#y"]),
        ("'|' \">\" \\;", &["|", ">", ";"]),
        ("", &[]),
    ] {
        assert_eq!(ok(s), want, "{s:?}");
    }
    assert_eq!(ok("'app:create_app()'"), ["app:create_app()"]);
    for (s, want) in [
        ("'a", "unbalanced single quote (')"),
        ("\"a", "unbalanced double quote (\")"),
        ("\"a\\\"", "unbalanced double quote (\")"),
        ("a\\", "ends with a backslash that escapes nothing"),
    ] {
        assert_eq!(file::split_words(s).unwrap_err(), want, "{s:?}");
    }
    for s in ["a | b", "a > log", "a; b", "a &", "f()", "a #comment"] {
        let e = file::split_words(s).unwrap_err();
        assert!(e.contains("quote it"), "{s:?}: {e}");
    }
}

/// The shipped example, packaging/arbiter.toml.
const EXAMPLE: &str = include_str!("../../../../packaging/arbiter.toml");

/// The keys the example sets or shows (`key = ...` lines, commented out or not).
fn example_keys(text: &str) -> Vec<String> {
    let mut keys: Vec<String> = text
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| {
            let (k, _) = l.split_once(" = ")?;
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c == '-' || c == '_')
                .then(|| k.to_string())
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn the_example_file_parses_and_shows_every_key() {
    // As shipped: a valid configuration of its own.
    let cfg = loader_with_file(EXAMPLE, &[]).unwrap();
    assert_eq!(cfg.workers, 2);
    // Every key the parser takes is shown, and nothing else.
    let mut want: Vec<String> = file::keys().map(str::to_string).collect();
    want.sort();
    assert_eq!(example_keys(EXAMPLE), want);
    // Every example value, commented out or not, has the type its key takes.
    // One file per key: a key shown twice (bind, command) is checked each time.
    for line in EXAMPLE.lines() {
        let l = line.trim_start_matches('#').trim();
        let Some((k, _)) = l.split_once(" = ") else {
            continue;
        };
        if !file::keys().any(|key| key == k) {
            continue;
        }
        if let Err(e) = file::check_file(l) {
            panic!("{l:?}: {e}");
        }
    }
}

#[test]
fn the_file_takes_every_long_option() {
    // A new flag must be readable from the file too (and so be in the example).
    // The exceptions are named here as well as by `in_file: false` in
    // arbiter_proto::options, so that a new option left out of the file is a
    // decision made twice, not a slip of one flag.
    let cmd = Cli::command();
    let mut longs: Vec<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["config", "check-config", "help", "version"].contains(l))
        .collect();
    longs.push("command");
    longs.sort();
    let mut keys: Vec<&str> = file::keys().collect();
    keys.sort();
    assert_eq!(longs, keys);
}

#[test]
fn every_key_is_read_once() {
    assert_eq!(
        file::keys_without_a_reader(),
        Vec::<&str>::new(),
        "file keys (arbiter_proto::options, in_file) with no arm in config::file::read_key"
    );
    let mut keys: Vec<&str> = file::keys().collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "a key is in config::file::keys() twice");
}

#[test]
fn metrics_bind_forms_and_reload() {
    assert_eq!(
        parse_metrics_bind("127.0.0.1:9100").unwrap(),
        BindSpec::Tcp("127.0.0.1:9100".parse().unwrap())
    );
    assert_eq!(
        parse_metrics_bind("[::1]:0").unwrap(),
        BindSpec::Tcp("[::1]:0".parse().unwrap())
    );
    assert_eq!(
        parse_metrics_bind("unix:/run/m.sock").unwrap(),
        BindSpec::Unix("/run/m.sock".into())
    );
    for (bad, says) in [
        ("127.0.0.1", "a port is required"),
        ("[::1]", "a port is required"),
        ("fd://3", "not a file descriptor"),
        ("127.0.0.1:x", "'x' is not a valid port number"),
        ("unix:", "empty unix socket path"),
    ] {
        let e = parse_metrics_bind(bad).unwrap_err().0;
        assert!(e.starts_with(&format!("--metrics-bind {bad}: ")), "{e}");
        assert!(e.contains(says), "{bad}: {e}");
    }
    // From the file, and restart-only on reload.
    let old = loader_with_file("metrics-bind = \"127.0.0.1:9100\"\n", &[]).unwrap();
    assert_eq!(
        old.metrics_bind,
        Some(BindSpec::Tcp("127.0.0.1:9100".parse().unwrap()))
    );
    let new = loader_with_file("metrics_bind = \"127.0.0.1:9200\"\n", &[]).unwrap();
    let (changed, restart) = describe_changes(&old, &new);
    assert!(changed.is_empty(), "{changed:?}");
    assert_eq!(restart, ["metrics-bind"]);
    let e = loader_with_file("metrics-bind = 9100\n", &[])
        .unwrap_err()
        .0;
    assert!(
        e.contains("line 1: metrics-bind: expected an address string"),
        "{e}"
    );
}

#[test]
fn max_requests_from_flags_and_file_and_reload_changes() {
    let cfg = loader_with_file("max-requests = 1000\nmax-requests-jitter = 50\n", &[]).unwrap();
    assert_eq!(
        (cfg.max_requests, cfg.max_requests_jitter),
        (Some(1000), 50)
    );
    let cfg = loader_with_file("max-requests = 1000\n", &["--max-requests", "40"]).unwrap();
    assert_eq!(
        cfg.max_requests,
        Some(40),
        "the command line wins over the file"
    );
    // 0 is gunicorn's "off", and jitter alone recycles nothing (gunicorn #1978).
    let off = loader_with_file("max-requests = 0\nmax-requests-jitter = 9\n", &[]).unwrap();
    assert_eq!(off.max_requests, None);
    let err = file_error("max-requests = -1\n");
    assert!(
        err.contains("line 1") && err.contains("max-requests"),
        "{err}"
    );
    let (changed, _) = describe_changes(&off, &cfg);
    assert!(
        changed.contains(&"max-requests None -> Some(40)".to_string()),
        "{changed:?}"
    );
}
