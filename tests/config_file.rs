//! The config file as a person meets it (issue 15, item 9): the shipped example
//! starts a daemon, a wrong type is one line naming the file, the line and the key,
//! `command` may be one string; and the usage errors of both binaries (item 10):
//! clap's tip and exit status 2, and JSON on stdout for `arbiterctl --json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::harness::*;

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A process's argv, from /proc.
fn argv(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[test]
fn a_wrong_type_in_the_config_file_is_one_line_naming_the_file_line_and_key() {
    let dir = short_tempdir();
    let cfg = dir.path().join("app.toml");
    for (text, want) in [
        (
            "workers = 2\n\nbind = 18000\n",
            "line 3: bind: expected an address string like \"127.0.0.1:8000\" or a list of \
             them, found integer 18000",
        ),
        (
            "# a comment\ncommand = \"python3 'app.py\"\n",
            "line 2: command: unbalanced single quote (')",
        ),
        (
            "workers = true\n",
            "line 1: workers: expected a whole number such as 4, or a range such as \"2..16\", \
             found boolean true",
        ),
    ] {
        write(&cfg, text);
        let out = Run::arbiterd()
            .arg("-c")
            .arg(&cfg)
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .run();
        assert_eq!(out.code(), Some(1), "{text:?}: {out:?}");
        let expected = format!("arbiterd: {} {want}\n", cfg.display());
        assert_eq!(out.stderr, expected, "{text:?}");
        assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
        assert_eq!(entries(dir.path()), ["app.toml"], "left behind");
    }
}

#[test]
fn a_reload_with_a_wrong_type_is_refused_in_the_same_words() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    write(&cfg, "workers = 1\n");
    let d = b.arg("-c").arg(&cfg).start();
    let before: Vec<i32> = d.wait_workers(1).iter().map(|w| w.pid).collect();

    write(&cfg, "workers = 2\nbind = 18000\n");
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let want = format!(
        "{} line 2: bind: expected an address string like \"127.0.0.1:8000\" or a list of \
         them, found integer 18000",
        cfg.display()
    );
    assert!(out.stderr.contains(&want), "{want:?} in {out:?}");
    // The old configuration keeps serving.
    d.assert_workers_stay(&before, ms(300));
    assert_eq!(d.get("/").status, 200);
}

#[test]
fn a_command_string_in_the_config_file_is_split_as_sh_would_and_serves() {
    let b = Daemon::builder();
    // A space in the path: only the quotes keep the script one word.
    let app_dir = b.path("my app");
    std::fs::create_dir(&app_dir).unwrap();
    let script = app_dir.join("fdworker.py");
    std::fs::copy(test_file("workers/fdworker.py"), &script).unwrap();
    let python = python3().to_string_lossy().into_owned();
    let cfg = b.path("arbiter.toml");
    let line = format!(
        "'{python}' \"{}\" it\\'s \"$HOME\"",
        script.display().to_string().replace('"', "\\\"")
    );
    write(
        &cfg,
        &format!("workers = 2\ncommand = {}\n", toml_str(&line)),
    );
    let d = b.arg("-c").arg(&cfg).start();
    d.wait_workers(2);
    let r = d.get_json("/");
    let pid = r["pid"]
        .as_i64()
        .unwrap_or_else(|| d.fail(&format!("no pid in {r}"))) as i32;
    let want: Vec<String> = vec![
        python.clone(),
        script.display().to_string(),
        "it's".into(),
        "$HOME".into(),
    ];
    // The worker is python running the script: argv[0] may be what python made
    // of it, the rest is ours word for word.
    let got = argv(pid);
    assert_eq!(got[1..], want[1..], "argv of worker {pid}: {got:?}");
}

#[test]
fn the_shipped_example_config_starts_a_daemon() {
    let example: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/arbiter.toml");
    let text = std::fs::read_to_string(&example)
        .unwrap_or_else(|e| panic!("read {}: {e}", example.display()));
    // Port 0 for the example's 8000: a free port, no race with other tests.
    let from = "\nbind = \"127.0.0.1:8000\"\n";
    assert!(
        text.contains(from),
        "the example no longer sets {from:?}; update this test"
    );
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    write(&cfg, &text.replace(from, "\nbind = \"127.0.0.1:0\"\n"));
    let d = b.arg("-c").arg(&cfg).no_default_bind().start();
    assert_eq!(d.addr().ip().to_string(), "127.0.0.1");
    let ws = d.wait_workers(2);
    let r = d.get_json("/");
    assert!(
        ws.iter()
            .any(|w| i64::from(w.pid) == r["pid"].as_i64().unwrap_or(0)),
        "GET / answered by {r}, not one of {ws:?}"
    );
}

#[test]
fn a_bad_arbiterd_flag_exits_2_with_clap_s_tip() {
    let dir = short_tempdir();
    let out = Run::arbiterd()
        .args(["--worker", "2", "--control"])
        .arg(dir.path().join("ctl.sock"))
        .run();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: unexpected argument '--worker' found"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("tip:") && out.stderr.contains("'--workers'"),
        "clap's did-you-mean tip is kept: {:?}",
        out.stderr
    );
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert!(entries(dir.path()).is_empty(), "left behind");
}

#[test]
fn an_arbiterctl_usage_error_with_json_is_json() {
    for args in [
        &["--json", "stauts"][..],
        &["scale", "x", "--json"],
        &["--json", "--name", "a", "--control", "/x.sock", "ping"],
    ] {
        let out = Run::new(ARBITERCTL).args(args).run();
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        let doc: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"));
        assert_eq!(doc["error"]["kind"], "usage", "{args:?}: {doc}");
        let message = doc["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && !message.contains('\n') && !message.starts_with("error:"),
            "{args:?}: {doc}"
        );
        // stderr keeps clap's text for a person.
        assert!(out.stderr.starts_with("error: "), "{args:?}: {out:?}");
    }
    // The tip, where clap has one.
    let out = Run::new(ARBITERCTL).args(["--json", "stauts"]).run();
    assert!(out.stderr.contains("tip:"), "{out:?}");
    // Without --json, stdout stays empty.
    let out = Run::new(ARBITERCTL).args(["stauts"]).run();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
}
