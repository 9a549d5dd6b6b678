//! docs/gunicorn.md maps gunicorn's master settings to arbiterd's: every row of
//! its table is checked against the real `arbiterd --help`, so a renamed or
//! dropped flag cannot leave the page promising it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::harness::ARBITERD;

/// The settings issue 23 lists: the page must keep a row for each.
const GUNICORN_MASTER_SETTINGS: &[&str] = &[
    "bind",
    "backlog",
    "workers",
    "timeout",
    "graceful_timeout",
    "max_requests",
    "max_requests_jitter",
    "preload_app",
    "reload",
    "reuse_port",
    "chdir",
    "daemon",
    "raw_env",
    "pidfile",
    "user",
    "group",
    "umask",
    "proc_name",
    "errorlog",
    "loglevel",
    "capture_output",
    "statsd_host",
    "on_starting",
    "check_config",
    "print_config",
];

/// The `--long` flags a text names, without what follows `=`.
fn long_flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter_map(|w| w.strip_prefix("--"))
        .filter(|f| f.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .map(|f| f.trim_end_matches('-').to_string())
        .collect()
}

/// The table's rows: (gunicorn column, arbiterd column).
fn rows(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .skip(1) // the header
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            assert!(cells.len() >= 2, "a row without an arbiterd column: {l}");
            (cells[0].trim().to_string(), cells[1].trim().to_string())
        })
        .collect()
}

#[test]
fn every_arbiterd_flag_in_docs_gunicorn_md_is_in_arbiterd_help() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/gunicorn.md"))
            .expect("docs/gunicorn.md");
    let out = Command::new(ARBITERD)
        .arg("--help")
        .output()
        .expect("arbiterd --help");
    assert!(out.status.success(), "arbiterd --help: {out:?}");
    let help = long_flags(&String::from_utf8_lossy(&out.stdout));
    assert!(
        help.contains("bind") && help.contains("max-requests"),
        "{help:?}"
    );

    let rows = rows(&page);
    for setting in GUNICORN_MASTER_SETTINGS {
        assert!(
            rows.iter()
                .any(|(g, _)| g.contains(&format!("`{setting}`"))),
            "docs/gunicorn.md has no row for gunicorn's `{setting}`"
        );
    }
    for (gunicorn, ours) in &rows {
        let named = long_flags(ours);
        assert!(
            !named.is_empty() || ours.starts_with("none"),
            "the row for {gunicorn} names no arbiterd flag and does not say none: {ours:?}"
        );
        for flag in &named {
            assert!(
                help.contains(flag),
                "docs/gunicorn.md maps {gunicorn} to --{flag}, which `arbiterd --help` does not have"
            );
        }
    }
}
