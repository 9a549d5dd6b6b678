//! What an adversarial trial broke: paths other users can plant things at, a
//! control socket served by someone else, worker output dropped unseen, an
//! upgrade reported as failed although it completed.
//!
//! Another user is played with `setpriv --reuid=UID` (the tests run as root);
//! each test has its own uid (5433x) so that parallel tests never share one.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::harness::*;
use nix::sys::signal::Signal;

/// Run `argv` as `uid` (same gid), no supplementary groups.
fn as_user(uid: u32, argv: &[&str]) -> Outcome {
    Run::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(argv)
        .run()
}

/// A world-writable sticky directory, as /tmp is.
fn sticky_dir(parent: &Path) -> std::path::PathBuf {
    let shared = parent.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    // The test's temp dir itself must be traversable by the other user.
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).unwrap();
    shared
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stderr:?}");
    lines[0]
}

// ------------------------------------------------------------- A. user-named paths

#[test]
fn a_fifo_another_user_made_at_the_pidfile_path_is_refused_at_once() {
    let dir = short_tempdir();
    let shared = sticky_dir(dir.path());
    let pid = shared.join("app.pid");
    let made = as_user(54330, &["mkfifo", pid.to_str().unwrap()]);
    assert_eq!(made.code(), Some(0), "mkfifo as uid 54330: {made:?}");
    let control = dir.path().join("c.sock");
    let out = Run::arbiterd()
        .args(["-w", "1", "-b", "127.0.0.1:0", "--control"])
        .arg(&control)
        .arg("--pid")
        .arg(&pid)
        .timeout(SHORT)
        .run();
    assert_eq!(out.code(), Some(1), "expected a refusal: {out:?}");
    assert!(out.elapsed < secs(5), "took {:?}", out.elapsed);
    let line = one_line(&out.stderr);
    assert!(
        line.contains(&pid.display().to_string()) && line.contains("FIFO"),
        "{line}"
    );
    assert!(out.leftovers.is_empty(), "left behind: {:?}", out.leftovers);
    assert!(!control.exists(), "the control socket was left behind");
    assert!(fs::symlink_metadata(&pid).unwrap().file_type().is_fifo());
    let names: Vec<_> = fs::read_dir(&shared).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "files left in {shared:?}: {names:?}");
}

#[test]
fn a_log_file_another_user_planted_is_refused() {
    let dir = short_tempdir();
    let shared = sticky_dir(dir.path());
    let log = shared.join("app.log");
    let made = as_user(54331, &["touch", log.to_str().unwrap()]);
    assert_eq!(made.code(), Some(0), "touch as uid 54331: {made:?}");
    let out = Run::arbiterd()
        .args(["-w", "1", "-b", "127.0.0.1:0", "--control"])
        .arg(dir.path().join("c.sock"))
        .arg("--log-file")
        .arg(&log)
        .run();
    assert_eq!(out.code(), Some(1), "expected a refusal: {out:?}");
    let line = one_line(&out.stderr);
    assert!(
        line.contains(&log.display().to_string()) && line.contains("uid 54331"),
        "{line}"
    );
    assert_eq!(
        fs::metadata(&log).unwrap().len(),
        0,
        "the master wrote into it"
    );
    assert!(out.leftovers.is_empty(), "left behind: {:?}", out.leftovers);
}

#[test]
fn a_config_file_replaced_by_a_fifo_fails_the_reload_and_the_master_answers() {
    let b = Daemon::builder();
    let cfg = b.path("app.toml");
    fs::write(&cfg, "workers = 1\n").unwrap();
    let d = b.arg("-c").arg(&cfg).start();
    d.wait_workers(1);
    fs::remove_file(&cfg).unwrap();
    nix::unistd::mkfifo(&cfg, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = d.ctl(["--timeout", "5", "reload"]);
    assert_eq!(out.code(), Some(1), "reload: {out:?}");
    let line = one_line(&out.stderr);
    assert!(
        line.contains(&cfg.display().to_string()) && line.contains("FIFO"),
        "{line}"
    );
    let ping = d.ctl(["--timeout", "5", "ping"]);
    assert_eq!(ping.code(), Some(0), "ping after the reload: {ping:?}");
    assert_eq!(d.get("/").status, 200);
    assert!(d.try_status().is_none(), "the master exited");
}

#[test]
fn arbiterctl_pid_on_a_fifo_fails_at_once() {
    let dir = short_tempdir();
    let pid = dir.path().join("app.pid");
    nix::unistd::mkfifo(&pid, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = Run::new(ARBITERCTL)
        .arg("--pid")
        .arg(&pid)
        .arg("status")
        .timeout(secs(5))
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        one_line(&out.stderr),
        format!("arbiterctl: pidfile {}: not a regular file", pid.display())
    );
}

// ------------------------------------------------------------- B. control-socket trust

#[test]
fn a_control_directory_others_could_have_made_is_refused() {
    let dir = short_tempdir();
    let shared = sticky_dir(dir.path());
    // Ours, and what a planted symlink leads to.
    let target = dir.path().join("target");
    fs::create_dir(&target).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
    let plant_link = |at: &Path| {
        let made = as_user(
            54332,
            &["ln", "-s", target.to_str().unwrap(), at.to_str().unwrap()],
        );
        assert_eq!(made.code(), Some(0), "ln -s as uid 54332: {made:?}");
    };
    let make_dir = |at: &Path, mode: u32| {
        fs::create_dir(at).unwrap();
        fs::set_permissions(at, fs::Permissions::from_mode(mode)).unwrap();
    };
    let refused = |sub: &Path, why: &str, control: Option<&Path>| {
        let mut run = Run::arbiterd()
            .args(["-w", "1", "-b", "127.0.0.1:0"])
            .timeout(secs(5));
        run = match control {
            Some(c) => run.arg("--control").arg(c),
            // The default path: $XDG_RUNTIME_DIR/arbiter/arbiter.sock.
            None => run.env("XDG_RUNTIME_DIR", &shared),
        };
        let out = run.run();
        assert_eq!(out.code(), Some(1), "{sub:?}: expected a refusal: {out:?}");
        let line = one_line(&out.stderr);
        assert!(
            line.contains(&sub.display().to_string()) && line.contains(why),
            "{line}"
        );
        assert!(out.leftovers.is_empty(), "left behind: {:?}", out.leftovers);
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0, "{sub:?}");
    };
    // --control in a directory another user could have made.
    let link = shared.join("arbiter-link");
    plant_link(&link);
    refused(&link, "symbolic link", Some(&link.join("web.sock")));
    let open = shared.join("arbiter-open");
    make_dir(&open, 0o777);
    refused(&open, "mode 0777", Some(&open.join("web.sock")));
    // The default directory: a symlink, or ours but not 0700.
    let default = shared.join("arbiter");
    plant_link(&default);
    refused(&default, "symbolic link", None);
    fs::remove_file(&default).unwrap();
    make_dir(&default, 0o755);
    refused(&default, "mode 0755", None);
    assert_eq!(fs::read_dir(&default).unwrap().count(), 0);
}

/// A fake master as `uid`: answers every line with `pong from 31337`, and
/// appends what it heard to `heard`. Killed on drop.
struct FakeMaster(std::process::Child);

impl FakeMaster {
    fn start(uid: u32, sock: &Path, heard: &Path) -> FakeMaster {
        const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
open(sys.argv[2] + ".ready", "w").close()
while True:
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(4096)
        if not d:
            break
        data += d
    if data:
        with open(sys.argv[2], "ab") as f:
            f.write(data)
        c.sendall(b'{"v":1,"ok":true,"reply":{"type":"pong","pid":31337,"name":"fake"}}\n')
    c.close()
"#;
        let child = std::process::Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(python3())
            .args(["-c", SERVER])
            .arg(sock)
            .arg(heard)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn the fake master");
        let fake = FakeMaster(child);
        let ready = heard.with_extension("ready");
        wait_until(SHORT, "the fake master listening", || {
            if ready.exists() {
                Ok(())
            } else {
                Err("no ready file yet".into())
            }
        });
        fake
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn arbiterctl_refuses_a_control_socket_served_by_another_uid() {
    let dir = short_tempdir();
    let shared = sticky_dir(dir.path());
    let sock = shared.join("fake.sock");
    let heard = shared.join("heard");
    let _fake = FakeMaster::start(54333, &sock, &heard);
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(&sock)
        .arg("ping")
        .run();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        one_line(&out.stderr),
        format!(
            "arbiterctl: refusing to talk to {}: it is served by uid 54333, not by you or root (--trust-uid 54333 to allow)",
            sock.display()
        )
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(!heard.exists(), "the request was sent anyway");
    // Named explicitly, it is trusted.
    let out = Run::new(ARBITERCTL)
        .arg("--control")
        .arg(&sock)
        .args(["--trust-uid", "54333", "ping"])
        .run();
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "pong from 31337");
}

// ------------------------------------------------------------- C. worker output drops

#[test]
fn output_drops_show_in_status_and_the_log_while_the_worker_still_runs() {
    // 24 MB of 8 KB lines at once, then silence: past the relay's 4 MiB/s (long
    // lines, so that the master's own log writes are not what slows the flood).
    let d = Daemon::start([
        "-w",
        "1",
        "--",
        "/bin/sh",
        "-c",
        "x=$(printf '%8000s' '' | tr ' ' x); yes \"$x\" | head -n 3000; exec sleep 600",
    ]);
    // Not an HTTP server: its pid comes from status.
    let st = d.wait_until(LONG, "drops counted in status", || {
        let out = d.ctl(["--json", "status"]);
        let st: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out:?}"))?;
        let w = &st["workers"][0];
        let n = w["output_dropped"].as_u64().unwrap_or(0);
        if n > 0 && st["master"]["output_lines_dropped"].as_u64() == Some(n) {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    });
    let pid = st["workers"][0]["pid"].as_i64().unwrap() as i32;
    let line = d.wait_log("the dropping line", |l| {
        l.contains("WARNING") && l.contains(&format!("(pid:{pid})")) && l.contains("dropping")
    });
    assert!(is_alive(pid), "the worker is gone: {st}");
    let text = d.ctl(["status"]).stdout;
    assert!(text.contains("lines dropped"), "{text}");
    eprintln!(
        "HARDENING drops: {} while running; {line}",
        st["workers"][0]["output_dropped"]
    );
}

// ------------------------------------------------------------- D. upgrade, old master stopped

/// A new "binary" whose real start (not its `--check-config`) waits for `gate`.
fn gated_binary(dir: &Path, gate: &Path) -> std::path::PathBuf {
    let to = dir.join("gated-arbiterd.sh");
    fs::write(
        &to,
        format!(
            "#!/bin/sh\nif [ \"$1\" != --check-config ]; then\n  while [ ! -e '{}' ]; do sleep 0.02; done\nfi\nexec '{}' \"$@\"\n",
            gate.display(),
            ARBITERD
        ),
    )
    .unwrap();
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
    to
}

#[test]
fn upgrade_reports_the_takeover_when_the_old_master_is_stopped_mid_upgrade() {
    let b = Daemon::builder();
    let pidfile = b.path("app.pid");
    let gate = b.path("gate");
    let gated = gated_binary(b.dir(), &gate);
    let d = b.args(["-w", "1", "-p"]).arg(&pidfile).start();
    d.wait_workers(1);
    let old = d.pid();
    let control = d.control_path();
    let ctl = {
        let gated = gated.clone();
        std::thread::spawn(move || {
            Run::new(ARBITERCTL)
                .arg("--control")
                .arg(&control)
                .args(["upgrade", "--binary"])
                .arg(&gated)
                .timeout(LONG)
                .run()
        })
    };
    // The new master is started (waiting at the gate): stop the old one. Not the
    // `--check-config` run before it, which goes through the same script: the
    // old master stopped then never starts a new one.
    let new = d.wait_until(LONG, "the new master started", || {
        children_of(old)
            .into_iter()
            .find(|c| {
                let line = cmdline(c.pid);
                line.contains("gated-arbiterd.sh") && !line.contains("--check-config")
            })
            .map(|c| c.pid)
            .ok_or_else(|| "no new master yet".to_string())
    });
    d.register_pid(new);
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
    fs::write(&gate, "").unwrap();
    let out = ctl.join().unwrap();
    eprintln!("HARDENING upgrade after TERM: {out:?}");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("upgraded: master {old} -> {new}")),
        "{out:?}"
    );
    assert!(out.stderr.contains("closed the connection"), "{out:?}");
}
