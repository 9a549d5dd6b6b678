//! `--preload`: a template per generation loads the application once and forks
//! the workers (docs/workers.md, "Preloading"). The template here is
//! `workers/preload_template.py`: it "loads" the answer in a file once, and every
//! worker it forks answers with it, so a worker that serves the new answer after
//! a reload proves the new code was loaded.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::*;
use crate::health::status_at;
use crate::upgrade::Load;

/// `arbiterd --preload -w N --ready notify -- python3 preload_template.py ANSWER`.
fn preloaded(workers: usize, answer: &str) -> (Daemon, PathBuf) {
    let b = Daemon::builder();
    let file = b.path("answer");
    std::fs::write(&file, answer).unwrap();
    let d = b
        .args([
            "--preload",
            "-w",
            &workers.to_string(),
            "--ready",
            "notify",
            "--",
        ])
        .arg(python3())
        .arg(test_file("workers/preload_template.py"))
        .arg(&file)
        .start();
    (d, file)
}

fn status(d: &Daemon) -> Value {
    status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e))
}

/// The workers' pids, from the master (the template is a child of the master too).
fn worker_pids(d: &Daemon) -> Vec<i32> {
    let mut v: Vec<i32> = status(d)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
        .collect();
    v.sort_unstable();
    v
}

fn template_pid(d: &Daemon) -> Option<i32> {
    status(d)["master"]["templates"]
        .as_array()?
        .iter()
        .rev()
        .find(|t| t["state"] == "ready")?["pid"]
        .as_i64()
        .map(|p| p as i32)
}

/// Every ready worker of `generation` answers `answer`, and there are `n` of them.
fn wait_answers(d: &Daemon, n: usize, generation: u64, answer: &str) -> Vec<i32> {
    d.wait_until(
        LONG,
        &format!("{n} workers of generation {generation} answering {answer}"),
        || {
            let st = status(d);
            let ws: Vec<i32> = st["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["generation"] == generation && w["state"] == "ready")
                .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
                .collect();
            if ws.len() != n || st["workers"].as_array().unwrap().len() != n {
                return Err(format!("{}", st["workers"]));
            }
            let r = http_get(d.listener(), "/", SHORT).map_err(|e| e.to_string())?;
            let j = r.json();
            if j["answer"] == answer && j["generation"] == generation {
                Ok(ws)
            } else {
                Err(format!("GET / -> {j}"))
            }
        },
    )
}

#[test]
fn preloaded_workers_are_forked_from_the_template_and_supervised_as_any() {
    let (d, _) = preloaded(2, "v1");
    let ws = wait_answers(&d, 2, 1, "v1");
    let template = template_pid(&d).unwrap_or_else(|| d.fail("no ready template in status"));
    for &w in &ws {
        let info = worker_info(w);
        let stat = proc_stat(w).unwrap();
        assert_eq!(
            stat.ppid,
            d.pid(),
            "worker {w} is the master's child (re-parented)"
        );
        assert_eq!(
            (stat.pgrp, stat.session),
            (w, w),
            "worker {w} leads its own group"
        );
        // Its environment as the template set it after fork (/proc/PID/environ
        // still shows the template's).
        let _ = info;
    }
    for _ in 0..10 {
        let r = http_get(d.listener(), "/", SHORT).unwrap().json();
        assert_eq!(
            r["listen_pid"],
            r["pid"].to_string(),
            "its own LISTEN_PID: {r}"
        );
        assert!(r["worker_id"].as_u64().is_some(), "{r}");
    }
    let r = http_get(d.listener(), "/", SHORT).unwrap().json();
    assert_eq!(r["template"], template, "{r}");
    assert!(
        d.log_lines_with("forked from the template").len() == 2,
        "{}",
        d.log()
    );
    // TTIN: one more, from the same template.
    d.signal_delivered(Signal::SIGTTIN);
    wait_answers(&d, 3, 1, "v1");
    assert_eq!(template_pid(&d), Some(template));
    // A worker's death is reaped with its status and it is replaced.
    kill(Pid::from_raw(ws[0]), Signal::SIGKILL).unwrap();
    d.wait_log("the killed worker reaped", |l| {
        l.contains(&format!("(pid:{})", ws[0])) && l.contains("SIGKILL")
    });
    wait_answers(&d, 3, 1, "v1");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0));
    d.wait_no_leftovers(SHORT);
}

#[test]
fn hup_after_changing_the_application_serves_the_new_answer() {
    // What gunicorn --preload cannot do: its master holds the old code, so a HUP
    // forks the old application again (see the next test).
    let (d, file) = preloaded(2, "v1");
    let old = wait_answers(&d, 2, 1, "v1");
    let old_template = template_pid(&d).unwrap();
    std::fs::write(&file, "v2").unwrap();
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let new = wait_answers(&d, 2, 2, "v2");
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "new workers: {new:?} vs {old:?}"
    );
    d.wait_until(SHORT, "the old template gone", || {
        if is_alive(old_template) {
            Err(format!("{old_template} alive"))
        } else {
            Ok(())
        }
    });
    assert_ne!(template_pid(&d), Some(old_template));
}

#[test]
fn a_template_that_fails_to_load_on_hup_leaves_the_old_generation_serving() {
    let (d, file) = preloaded(2, "v1");
    let old = wait_answers(&d, 2, 1, "v1");
    let fail = PathBuf::from(format!("{}.fail", file.display()));
    std::fs::write(&fail, "").unwrap();
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("template"),
        "the reason names the template: {out:?}"
    );
    let now = worker_pids(&d);
    let mut want = old.clone();
    want.sort_unstable();
    assert_eq!(now, want, "the old workers serve on");
    assert_eq!(
        http_get(d.listener(), "/", SHORT).unwrap().json()["answer"],
        "v1"
    );
    // Fixed: the next reload works.
    std::fs::remove_file(&fail).unwrap();
    std::fs::write(&file, "v3").unwrap();
    assert_eq!(d.ctl(["reload"]).code(), Some(0));
    wait_answers(&d, 2, 3, "v3");
}

#[test]
fn a_first_template_that_cannot_load_halts_with_its_status() {
    let b = Daemon::builder();
    let file = b.path("answer");
    std::fs::write(format!("{}.fail", file.display()), "").unwrap();
    let d = b
        .args(["--preload", "-w", "2", "--"])
        .arg(python3())
        .arg(test_file("workers/preload_template.py"))
        .arg(&file)
        .start();
    assert_eq!(d.wait_exit(LONG).code(), Some(4), "{}", d.log());
    assert!(
        d.log()
            .contains("The template failed to load the application.")
    );
    d.wait_no_leftovers(SHORT);
}

#[test]
fn a_template_killed_mid_generation_is_restarted_and_no_worker_is_lost() {
    let (d, _) = preloaded(2, "v1");
    let ws = wait_answers(&d, 2, 1, "v1");
    let template = template_pid(&d).unwrap();
    kill(Pid::from_raw(template), Signal::SIGKILL).unwrap();
    let again = d.wait_until(LONG, "a new template", || match template_pid(&d) {
        Some(p) if p != template => Ok(p),
        other => Err(format!("{other:?}")),
    });
    let now = worker_pids(&d);
    let mut want = ws.clone();
    want.sort_unstable();
    assert_eq!(now, want, "the workers serve on");
    // Scale-up forks from the new one.
    assert_eq!(d.ctl(["scale", "3"]).code(), Some(0));
    wait_answers(&d, 3, 1, "v1");
    let r = http_get(d.listener(), "/", SHORT).unwrap().json();
    assert!(r["template"] == template || r["template"] == again, "{r}");
}

#[test]
fn five_reloads_under_load_lose_no_request() {
    let (d, file) = preloaded(2, "v1");
    wait_answers(&d, 2, 1, "v1");
    let load = Load::start(d.listener().clone());
    for g in 2..=6u64 {
        std::fs::write(&file, format!("v{g}")).unwrap();
        let out = d.ctl(["reload"]);
        if out.code() != Some(0) {
            d.fail(&format!("reload {g}: {out:?}"));
        }
        wait_answers(&d, 2, g, &format!("v{g}"));
        load.wait_more(&d, 20);
    }
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:#?}", stats.failures);
    assert!(stats.ok > 100, "{} answers", stats.ok);
}

#[test]
fn preload_needs_a_command() {
    let out = Run::arbiterd()
        .args(["--preload", "-b", "127.0.0.1:0"])
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--preload needs a COMMAND"), "{out:?}");
}

/// gunicorn's own `--preload`, for the record: a HUP forks the application the
/// master loaded at start, so a changed application is not served. This is the
/// price gunicorn's documentation states, and what arbiterd's `--preload` does
/// not pay (the test above).
#[test]
#[cfg_attr(
    not(has_py_gunicorn),
    ignore = "gunicorn is not installed (python3 -m pip install gunicorn)"
)]
fn gunicorn_preload_keeps_serving_the_old_code_after_hup() {
    let Some(py) = crate::examples::python_with("gunicorn", "gunicorn") else {
        return;
    };
    let dir = short_tempdir();
    let tag = dir.path().to_string_lossy().into_owned();
    let answer = dir.path().join("answer");
    std::fs::write(&answer, "v1").unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        format!(
            "ANSWER = open({:?}).read()\ndef app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [ANSWER.encode()]\n",
            answer.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(&py)
        .args(["-m", "gunicorn", "--preload", "-w", "2", "-b"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("app:app")
        .current_dir(dir.path())
        .env(TAG_VAR, &tag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let get = || {
        let l = Listener::parse(&format!("http://127.0.0.1:{port}"));
        http_get(&l, "/", SHORT).map(|r| r.body)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(LONG, "gunicorn serving v1", || match get() {
            Ok(b) if b == "v1" => Ok(()),
            other => Err(format!("{other:?}")),
        });
        std::fs::write(&answer, "v2").unwrap();
        kill(Pid::from_raw(pgid), Signal::SIGHUP).unwrap();
        // New workers come up (their pids change), still with the old answer.
        let before: Vec<i32> = children_of(pgid).iter().map(|s| s.pid).collect();
        wait_until(LONG, "gunicorn's new workers", || {
            let now: Vec<i32> = children_of(pgid).iter().map(|s| s.pid).collect();
            if now.len() == 2 && now.iter().all(|p| !before.contains(p)) {
                Ok(())
            } else {
                Err(format!("{before:?} -> {now:?}"))
            }
        });
        assert_eq!(
            get().unwrap(),
            "v1",
            "gunicorn --preload did not load the new code"
        );
    }));
    let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let _ = child.wait();
    kill_tagged(&tag, SHORT);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// The reference template for Python (`python/arbiter_preload`) under the real
/// master: a WSGI application loaded once, served by forked workers, a changed
/// application served after a HUP, and no request lost across reloads.
#[test]
fn the_python_reference_template_preloads_and_reloads_new_code_under_load() {
    let b = Daemon::builder();
    let app = b.path("app.py");
    let write_app = |version: &str| {
        std::fs::write(
            &app,
            format!(
                "import os\nVERSION = {version:?}\nLOADED_BY = os.getpid()\n\
                 def app(environ, start_response):\n    \
                 body = ('{{\"version\": \"%s\", \"loaded_by\": %d, \"pid\": %d}}' % (VERSION, LOADED_BY, os.getpid())).encode()\n    \
                 start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])\n    \
                 return [body]\n"
            ),
        )
        .unwrap();
    };
    write_app("v1");
    let python_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let d = b
        .env("PYTHONPATH", &python_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["--preload", "-w", "2", "--ready", "notify", "--"])
        .arg(python3())
        .args(["-m", "arbiter_preload", "app:app"])
        .start();
    let answer = |d: &Daemon| -> Result<Value, String> {
        let r = http_get(d.listener(), "/", SHORT).map_err(|e| e.to_string())?;
        Ok(r.json())
    };
    let first = d.wait_until(LONG, "v1 served by a forked worker", || {
        let j = answer(&d)?;
        if j["version"] == "v1" {
            Ok(j)
        } else {
            Err(format!("{j}"))
        }
    });
    assert_ne!(
        first["loaded_by"], first["pid"],
        "loaded once, in the template: {first}"
    );
    assert_eq!(
        Some(first["loaded_by"].as_i64().unwrap() as i32),
        template_pid(&d)
    );
    // What the workers share with the template shows: PSS below RSS, private
    // pages below both.
    let st = status(&d);
    for w in st["workers"].as_array().unwrap() {
        let (rss, pss, private) = (
            w["rss_bytes"].as_u64().unwrap_or(0),
            w["pss_bytes"].as_u64().unwrap_or(0),
            w["private_bytes"].as_u64().unwrap_or(0),
        );
        assert!(0 < private && private < pss && pss < rss, "{w}");
    }
    assert!(
        d.ctl(["metrics"])
            .stdout
            .contains("\narbiter_worker_pss_bytes{")
    );
    let load = Load::start(d.listener().clone());
    for g in 2..=3u64 {
        write_app(&format!("v{g}"));
        let out = d.ctl(["reload"]);
        if out.code() != Some(0) {
            d.fail(&format!("reload {g}: {out:?}"));
        }
        let want = format!("v{g}");
        d.wait_until(LONG, &format!("{want} served"), || {
            let j = answer(&d)?;
            if j["version"] == want.as_str() {
                Ok(())
            } else {
                Err(format!("{j}"))
            }
        });
        load.wait_more(&d, 20);
    }
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:#?}", stats.failures);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).code(), Some(0), "{}", d.log());
    d.wait_no_leftovers(SHORT);
}

/// `python/tests`: the reference template against a master played by the test
/// (the protocol's corners: FAILED, EOF, fds, the worker's session and fds).
#[test]
fn the_python_reference_templates_own_tests_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Run::new(python3())
        .args(["-m", "unittest", "discover", "-s", "python/tests"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(root)
        .timeout(secs(120))
        .run();
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
}

#[test]
fn an_upgraded_preloading_master_starts_its_own_template_and_loses_no_request() {
    let (d, file) = preloaded(2, "v1");
    wait_answers(&d, 2, 1, "v1");
    let old_master = d.pid();
    let old_template = template_pid(&d).unwrap();
    std::fs::write(&file, "v2").unwrap();
    let load = Load::start(d.listener().clone());
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(d.control_path())
        .arg("upgrade")
        .timeout(LONG)
        .run();
    if out.code() != Some(0) {
        d.fail(&format!("upgrade: {out:?}"));
    }
    let new_master = d.wait_until(LONG, "the new master answering", || {
        let st = status_at(&d.control_path())?;
        match st["master"]["pid"].as_i64().map(|p| p as i32) {
            Some(p) if p != old_master => Ok(p),
            other => Err(format!("{other:?}")),
        }
    });
    d.register_pid(new_master);
    d.wait_until(LONG, "the new master's template serving v2", || {
        let t = template_pid(&d).ok_or("no template")?;
        let r = http_get(d.listener(), "/", SHORT)
            .map_err(|e| e.to_string())?
            .json();
        if t != old_template && r["answer"] == "v2" && r["template"] == t {
            Ok(())
        } else {
            Err(format!("template {t}, answer {r}"))
        }
    });
    load.wait_more(&d, 20);
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:#?}", stats.failures);
    d.wait_until(LONG, "the old master and template gone", || {
        if is_alive(old_master) || is_alive(old_template) {
            Err("still alive".to_string())
        } else {
            Ok(())
        }
    });
}
