//! `--reload-on-change`: a burst of edits under the watched tree is one graceful
//! reload (with `--preload`, a new template, so the new code is what answers);
//! what is not code (`.git/`, `__pycache__/`, editors' swap files) is no change.
//!
//! "How many reloads" is read from the log without a fixed wait: every burst logs
//! `Reloading on change: FIRST [and N more changes]` and then
//! `Reloading: generation A -> B`, so a real edit made after the edits under test
//! shows, by the generation it reloads to and by being a burst of its own, whether
//! those edits made a reload or not.

use std::path::{Path, PathBuf};

use crate::harness::*;
use crate::health::status_at;

const CHANGED: &str = "Reloading on change: ";

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A WSGI app answering `version`.
fn app_source(version: &str) -> String {
    format!(
        "VERSION = {version:?}\n\
         def app(environ, start_response):\n    \
         body = VERSION.encode()\n    \
         start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    \
         return [body]\n"
    )
}

/// The app in `DIR/app` (the daemon's own files stay in DIR, unwatched), served
/// by 2 preloaded `arbiter_preload` workers with `--reload-on-change` and no path:
/// the working directory, here `--chdir DIR/app`.
fn start(prepare: impl FnOnce(&Path)) -> (Daemon, PathBuf) {
    let b = Daemon::builder();
    let app_dir = b.path("app");
    std::fs::create_dir(&app_dir).unwrap();
    std::fs::write(app_dir.join("app.py"), app_source("v1")).unwrap();
    prepare(&app_dir);
    let d = b
        .env("PYTHONPATH", python_dir())
        .arg("--chdir")
        .arg(&app_dir)
        .args([
            "--preload",
            "-w",
            "2",
            "--ready",
            "notify",
            "--reload-on-change",
        ])
        .arg("--")
        .arg(python3())
        .args(["-m", "arbiter_preload", "app:app"])
        .start();
    d.wait_log("the watch started", |l| {
        l.contains("Reload on change: watching")
    });
    (d, app_dir)
}

/// The master's workers are 2, all ready, of `generation`, and one answers
/// `version`.
fn wait_serving(d: &Daemon, generation: u64, version: &str) {
    d.wait_until(
        LONG,
        &format!("2 workers of generation {generation} answering {version}"),
        || {
            let st = status_at(&d.control_path())?;
            let ws = st["workers"].as_array().cloned().unwrap_or_default();
            let ready = ws
                .iter()
                .filter(|w| w["generation"] == generation && w["state"] == "ready")
                .count();
            if ready != 2 || ws.len() != 2 {
                return Err(format!("{}", st["workers"]));
            }
            let r = http_get(d.listener(), "/", SHORT).map_err(|e| e.to_string())?;
            if r.body == version {
                Ok(())
            } else {
                Err(format!("GET / -> {:?}", r.body))
            }
        },
    );
}

/// The lines that tell of a reload on change, and of the reloads started.
fn reloads(d: &Daemon) -> (Vec<String>, Vec<String>) {
    (
        d.log_lines_with(CHANGED),
        d.log_lines_with("Reloading: generation"),
    )
}

fn wait_reloads(d: &Daemon, n: usize) -> Vec<String> {
    d.wait_until(LONG, &format!("{n} reloads on change"), || {
        let (changed, started) = reloads(d);
        if changed.len() >= n && started.len() >= n {
            Ok(changed)
        } else {
            Err(format!("{changed:?} {started:?}"))
        }
    })
}

/// Save app.py as v2: the first reload on change names it alone, and generation 2
/// serves v2.
fn edit_alone_reloads_to_v2(d: &Daemon, app_dir: &Path, why: &str) {
    let app = app_dir.join("app.py");
    std::fs::write(&app, app_source("v2")).unwrap();
    let changed = wait_reloads(d, 1);
    assert_eq!(
        changed[0].split(CHANGED).nth(1),
        Some(app.display().to_string().as_str()),
        "{why}: {changed:?}"
    );
    wait_serving(d, 2, "v2");
}

#[test]
fn editing_the_code_under_load_is_one_reload_to_the_new_code_losing_nothing() {
    let (d, app_dir) = start(|_| {});
    wait_serving(&d, 1, "v1");
    let clients = LoopingClients::start(4, d.listener(), "/");
    edit_alone_reloads_to_v2(&d, &app_dir, "the first changed path, alone");
    let (ok, failures) = clients.stop();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 0, "no request answered");
    let (changed, started) = reloads(&d);
    assert_eq!(
        (changed.len(), started.len()),
        (1, 1),
        "{changed:?} {started:?}"
    );
    let st = d.ctl(["status", "--json"]);
    assert_eq!(st.code(), Some(0), "{st:?}");
}

#[test]
fn ten_edits_at_once_are_one_reload() {
    let (d, app_dir) = start(|_| {});
    wait_serving(&d, 1, "v1");
    let app = app_dir.join("app.py");
    for i in 0..10 {
        std::fs::write(&app, app_source(&format!("v1.{i}"))).unwrap();
    }
    // And a file beside it, so the burst says it held two paths.
    std::fs::write(app_dir.join("helpers.py"), "").unwrap();
    let changed = wait_reloads(&d, 1);
    assert!(
        changed[0].ends_with(&format!("{} and 1 other path", app.display())),
        "one burst of eleven edits: {changed:?}"
    );
    wait_serving(&d, 2, "v1.9");
    // A later edit is a burst of its own, and reloads to generation 3: the ten
    // made one reload, not more.
    std::fs::write(&app, app_source("v3")).unwrap();
    wait_reloads(&d, 2);
    wait_serving(&d, 3, "v3");
    let (changed, started) = reloads(&d);
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(
        started[1].contains("generation 2 -> 3"),
        "the edit after the ten: {started:?}"
    );
}

#[test]
fn version_control_caches_and_editor_files_are_no_change() {
    let (d, app_dir) = start(|dir| {
        for sub in [".git/objects", "__pycache__", "node_modules/left-pad"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
    });
    wait_serving(&d, 1, "v1");
    let noise = [
        ".git/index",
        ".git/objects/ab12",
        "__pycache__/app.cpython-312.pyc",
        "node_modules/left-pad/index.js",
        ".app.py.swp",
        "app.py~",
        "4913",
    ];
    for f in noise {
        std::fs::write(app_dir.join(f), "noise").unwrap();
    }
    // A directory created under .git later is not watched either.
    std::fs::create_dir(app_dir.join(".git/refs")).unwrap();
    std::fs::write(app_dir.join(".git/refs/main"), "noise").unwrap();
    // Then the real edit: inotify reports in order, so had any of the above been
    // taken for a change, this edit would not start the first burst alone.
    edit_alone_reloads_to_v2(&d, &app_dir, "the noise was taken for a change");
    let (changed, started) = reloads(&d);
    assert_eq!(
        (changed.len(), started.len()),
        (1, 1),
        "{changed:?} {started:?}"
    );
}

#[test]
fn a_new_directory_is_watched_and_named_paths_must_exist() {
    let (d, app_dir) = start(|_| {});
    wait_serving(&d, 1, "v1");
    std::fs::create_dir(app_dir.join("pkg")).unwrap();
    let changed = wait_reloads(&d, 1);
    assert!(changed[0].ends_with("/app/pkg"), "{changed:?}");
    wait_serving(&d, 2, "v1");
    // A file in the new directory is seen.
    std::fs::write(app_dir.join("pkg/mod.py"), "X = 1\n").unwrap();
    let changed = wait_reloads(&d, 2);
    assert!(changed[1].ends_with("/app/pkg/mod.py"), "{changed:?}");
    wait_serving(&d, 3, "v1");

    let dir = short_tempdir();
    let missing = dir.path().join("nope");
    let out = Run::arbiterd()
        .arg("--control")
        .arg(dir.path().join("ctl.sock"))
        .args(["-b", "127.0.0.1:0", "--reload-on-change"])
        .arg(&missing)
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "arbiterd: --reload-on-change {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}

/// Watches run out (a user namespace with `user.max_inotify_watches = 2`: the
/// control socket's watch and the tree's top): one warning line, the master serves
/// on, and what is watched still reloads.
#[test]
fn a_watch_limit_reached_is_one_line_and_the_rest_still_reloads() {
    let b = Daemon::builder();
    let app_dir = b.path("app");
    for sub in ["a", "b", "c/d"] {
        std::fs::create_dir_all(app_dir.join(sub)).unwrap();
    }
    let probe = Run::new("unshare")
        .args(["-U", "-r", "true"])
        .timeout(SHORT)
        .run();
    if probe.code() != Some(0) {
        tool_missing(&format!("unshare -U (a user namespace): {probe:?}"));
        return;
    }
    let d = b
        .program("unshare")
        .args(["-U", "-r", "/bin/sh", "-c"])
        .arg(r#"echo 2 > /proc/sys/user/max_inotify_watches && exec "$0" "$@""#)
        .arg(ARBITERD)
        .args(["--cgroup", "off", "-w", "1", "--reload-on-change"])
        .arg(&app_dir)
        .start();
    let said = d.wait_log("the limit said", |l| {
        l.contains("Reload on change: the inotify watch limit is reached")
    });
    assert!(
        said.contains("user.max_inotify_watches = 2")
            && said.contains("directories watched 1, not watched 3 or more"),
        "{said}"
    );
    assert_eq!(d.get("/").status, 200);
    std::fs::write(app_dir.join("app.py"), "").unwrap();
    let changed = wait_reloads(&d, 1);
    assert!(changed[0].ends_with("/app/app.py"), "{changed:?}");
    d.wait_log("the reload complete", |l| {
        l.contains("Reload to generation 2 complete")
    });
    assert_eq!(d.log_lines_with("watch limit").len(), 1, "said once");
}

/// The config file's `reload-on-change`: turned on by a reload, its relative
/// paths taken from the working directory, and a wrong type refused in the file's
/// words.
#[test]
fn the_config_file_turns_it_on_at_a_reload() {
    let b = Daemon::builder();
    let app_dir = b.path("app");
    std::fs::create_dir(&app_dir).unwrap();
    let cfg = b.path("arbiter.toml");
    std::fs::write(&cfg, "workers = 1\nreload-on-change = false\n").unwrap();
    let d = b.arg("-c").arg(&cfg).start();
    d.wait_workers(1);
    assert!(
        d.log_lines_with("Reload on change").is_empty(),
        "{}",
        d.log()
    );

    std::fs::write(&cfg, "workers = 1\nreload-on-change = 3\n").unwrap();
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "reload-on-change: expected true, false, a path string or a list of them, found integer 3"
        ),
        "{out:?}"
    );

    // Relative to the daemon's working directory, where the file is too.
    std::fs::write(&cfg, "workers = 1\nreload-on-change = [\"app\"]\n").unwrap();
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    d.wait_log("the watch started", |l| {
        l.contains(&format!("Reload on change: watching {}", app_dir.display()))
    });
    std::fs::write(app_dir.join("main.go"), "package main\n").unwrap();
    let changed = wait_reloads(&d, 1);
    assert!(changed[0].ends_with("/app/main.go"), "{changed:?}");
    d.wait_log("the reload on change complete", |l| {
        l.contains("Reload to generation 3 complete")
    });
}
