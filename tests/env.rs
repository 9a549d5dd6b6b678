//! The workers' environment from the configuration: env-file, `[env]` and
//! `--env`, re-read at every reload; the master's own variables cannot be set.

use std::collections::HashMap;
use std::path::Path;

use crate::harness::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn config(table: &str) -> String {
    format!(
        "workers = 2\nenv-file = \"app.env\"\n\n[env]\nAPP_TABLE = \"{table}\"\nAPP_SHARED = \"table\"\n"
    )
}

/// The APP_ variables a worker answers with over HTTP.
fn answered(d: &Daemon) -> HashMap<String, String> {
    let j = d.get_json("/");
    j["env"]
        .as_object()
        .unwrap_or_else(|| d.fail(&format!("no env in {j}")))
        .iter()
        .filter(|(k, _)| k.starts_with("APP_"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn app_env(pid: i32) -> Vec<(String, String)> {
    let mut v: Vec<_> = proc_environ(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("APP_"))
        .collect();
    v.sort();
    v
}

fn want(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn workers_get_the_env_file_the_env_table_and_env_flags_and_a_reload_gives_the_new_values() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    let env_file = b.path("app.env");
    write(
        &env_file,
        "# the app's\nAPP_FROM_FILE=one\nexport APP_SHARED=\"file\"\n",
    );
    write(&cfg, &config("t1"));
    let d = b
        .arg("-c")
        .arg(&cfg)
        .args(["--env", "APP_FLAG=f1"])
        .arg("--")
        .arg(python3())
        .arg(test_file("workers/fdworker.py"))
        .start();
    let first = want(&[
        ("APP_FLAG", "f1"),
        ("APP_FROM_FILE", "one"),
        ("APP_SHARED", "table"),
        ("APP_TABLE", "t1"),
    ]);
    let ws = d.wait_workers(2);
    for w in &ws {
        assert_eq!(app_env(w.pid), first, "worker {}", w.pid);
    }
    let mut got: Vec<_> = answered(&d).into_iter().collect();
    got.sort();
    assert_eq!(got, first, "what a worker answers");

    // Names in status, never values.
    let out = d.ctl(["status", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("status json");
    let mut keys: Vec<&str> = j["master"]["env_keys"]
        .as_array()
        .expect("env_keys")
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["APP_FLAG", "APP_FROM_FILE", "APP_SHARED", "APP_TABLE"]
    );
    assert!(
        !out.stdout.contains("f1") && !out.stdout.contains("\"one\""),
        "a value in status: {}",
        out.stdout
    );

    // Both files change; a reload gives every new worker the new values.
    write(&env_file, "APP_FROM_FILE=two\n");
    write(&cfg, &config("t2"));
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let second = want(&[
        ("APP_FLAG", "f1"),
        ("APP_FROM_FILE", "two"),
        ("APP_SHARED", "table"),
        ("APP_TABLE", "t2"),
    ]);
    let ws = d.wait_workers_where("2 workers of generation 2", 2, |w| w.generation == Some(2));
    for w in &ws {
        assert_eq!(app_env(w.pid), second, "worker {} after the reload", w.pid);
    }
    let mut got: Vec<_> = answered(&d).into_iter().collect();
    got.sort();
    assert_eq!(got, second, "what a worker answers after the reload");

    // A broken env-file refuses the reload, naming the line; the workers serve on.
    write(
        &env_file,
        "APP_FROM_FILE=three\nthis is not an assignment\n",
    );
    let out = d.ctl(["reload"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("line 2") && out.stderr.contains("KEY=VALUE"),
        "{out:?}"
    );
    let pids: Vec<i32> = ws.iter().map(|w| w.pid).collect();
    d.assert_workers_stay(&pids, ms(300));
    for w in &pids {
        assert_eq!(app_env(*w), second, "worker {w} after the refused reload");
    }
    assert_eq!(d.get("/").status, 200);
}

#[test]
fn the_masters_own_variables_cannot_be_set_for_workers() {
    let dir = short_tempdir();
    let env_file = dir.path().join("bad.env");
    write(&env_file, "APP_OK=1\nNOTIFY_SOCKET=/tmp/x\n");
    let cfg = dir.path().join("bad.toml");
    write(&cfg, "[env]\nARBITER_SLOT = \"7\"\n");
    let cases: [(Vec<std::ffi::OsString>, &str); 3] = [
        (
            vec!["--env".into(), "LISTEN_FDS=9".into()],
            "arbiterd: --env: LISTEN_FDS is set by the master for each worker and cannot be overridden\n",
        ),
        (
            vec!["--env-file".into(), env_file.clone().into()],
            "NOTIFY_SOCKET is set by the master",
        ),
        (
            vec!["-c".into(), cfg.clone().into()],
            "[env]: ARBITER_SLOT is set by the master",
        ),
    ];
    for (args, said) in cases {
        let out = Run::arbiterd()
            .args(&args)
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .args(["-b", "127.0.0.1:0", "--", "true"])
            .run();
        assert_eq!(out.code(), Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains(said), "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
        assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    }
}

/// `{generation: sorted env keys}` from `status --json`'s `master.generations`.
fn generations(d: &Daemon) -> Vec<(u64, Vec<String>)> {
    let st = crate::health::status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    st["master"]["generations"]
        .as_array()
        .unwrap_or_else(|| d.fail(&format!("no generations in {st}")))
        .iter()
        .map(|g| {
            let mut keys: Vec<String> = g["env_keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            keys.sort();
            (g["generation"].as_u64().unwrap(), keys)
        })
        .collect()
}

fn keys(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// With `--preload` the template gets the environment and its forks inherit it;
/// an `--env-file` given without a config file is read again at a reload; while
/// the new generation loads, `status` shows each generation's own names.
#[test]
fn preloaded_workers_get_the_env_and_each_generation_keeps_its_own() {
    let b = Daemon::builder();
    let env_file = b.path("app.env");
    write(&env_file, "APP_FROM_FILE=one\n");
    let gate = b.path("gate");
    // A generation given APP_GATE loads only once the gate exists: the reload
    // stays in flight, both generations alive, until the test opens it.
    write(
        &b.path("app.py"),
        "import json, os, time\n\
         gate = os.environ.get('APP_GATE')\n\
         while gate and not os.path.exists(gate):\n    time.sleep(0.02)\n\
         def app(environ, start_response):\n    \
         env = {k: v for k, v in os.environ.items() if k.startswith('APP_')}\n    \
         body = json.dumps({'env': env}).encode()\n    \
         start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])\n    \
         return [body]\n",
    );
    let d = b
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("python"),
        )
        .args(["--preload", "-w", "2", "--ready", "notify"])
        .arg("--env-file")
        .arg(&env_file)
        .args(["--env", "APP_FLAG=f", "--"])
        .arg(python3())
        .args(["-m", "arbiter_preload", "app:app"])
        .start();
    let first = want(&[("APP_FLAG", "f"), ("APP_FROM_FILE", "one")]);
    d.wait_until(LONG, "2 workers answering the first environment", || {
        let mut got: Vec<_> = answered(&d).into_iter().collect();
        got.sort();
        let g = generations(&d);
        (got == first && g == [(1, keys(&["APP_FLAG", "APP_FROM_FILE"]))])
            .then_some(())
            .ok_or(format!("{got:?} {g:?}"))
    });
    // The template itself has it, so what it loads at import time sees it too.
    let st = crate::health::status_at(&d.control_path()).unwrap_or_else(|e| d.fail(&e));
    let template = st["master"]["templates"][0]["pid"].as_i64().unwrap() as i32;
    assert_eq!(app_env(template), first, "the template");

    write(
        &env_file,
        &format!("APP_FROM_FILE=two\nAPP_GATE={}\n", gate.display()),
    );
    // HUP: arbiterctl reload would wait for the end of a reload held open.
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let both = vec![
        (1, keys(&["APP_FLAG", "APP_FROM_FILE"])),
        (2, keys(&["APP_FLAG", "APP_FROM_FILE", "APP_GATE"])),
    ];
    d.wait_until(SHORT, "both generations, each with its own names", || {
        let g = generations(&d);
        (g == both).then_some(()).ok_or(format!("{g:?}"))
    });
    // The old generation serves its own environment meanwhile.
    let mut got: Vec<_> = answered(&d).into_iter().collect();
    got.sort();
    assert_eq!(got, first, "the old generation while the new one loads");

    write(&gate, "");
    let second = want(&[
        ("APP_FLAG", "f"),
        ("APP_FROM_FILE", "two"),
        ("APP_GATE", &gate.display().to_string()),
    ]);
    d.wait_until(
        LONG,
        "the new generation alone, answering its environment",
        || {
            let mut got: Vec<_> = answered(&d).into_iter().collect();
            got.sort();
            let g = generations(&d);
            (got == second && g == both[1..])
                .then_some(())
                .ok_or(format!("{got:?} {g:?}"))
        },
    );
}
