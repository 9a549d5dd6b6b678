//! The listeners' file status flags (O_NONBLOCK above all) live on the open file
//! description that the master and every worker share. The built-in worker must
//! leave them as the master bound them, blocking, so that a COMMAND worker of a
//! later generation can run a plain blocking `accept()` loop.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;

const O_NONBLOCK: u32 = libc::O_NONBLOCK as u32;

/// The `flags:` of `/proc/PID/fdinfo/FD`: octal, as the kernel prints it.
fn fd_flags(pid: i32, fd: i32) -> Option<u32> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let value = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(value.trim(), 8).ok()
}

/// The fds of `pid` that are `socket:[inode]`.
fn fds_on_socket(pid: i32, inode: u64) -> Vec<i32> {
    let want = format!("socket:[{inode}]");
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok())
        .filter(|e| fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// The inode of the unix socket listening at `path` (from `/proc/net/unix`, where
/// the connections it accepted show the same path; only it has __SO_ACCEPTCON).
fn unix_listener_inode(path: &Path) -> Option<u64> {
    let text = fs::read_to_string("/proc/net/unix").ok()?;
    let path = path.to_str()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 8 && f[7] == path && f[3] == "00010000")
            .then(|| f[6].parse().ok())
            .flatten()
    })
}

/// Every fd of `pids` on the socket `inode`, with its flags; fails the test if a
/// process holds none (each of them should hold every listener).
fn flags_everywhere(d: &Daemon, pids: &[i32], inode: u64) -> Vec<(i32, i32, u32)> {
    let mut out = Vec::new();
    for &pid in pids {
        let fds = fds_on_socket(pid, inode);
        if fds.is_empty() {
            d.fail(&format!("pid {pid} holds no fd on socket:[{inode}]"));
        }
        for fd in fds {
            let flags = fd_flags(pid, fd).unwrap_or_else(|| {
                d.fail(&format!("no flags in /proc/{pid}/fdinfo/{fd}"));
            });
            out.push((pid, fd, flags));
        }
    }
    out
}

/// The master's live children are exactly `pids`: none died and was replaced.
fn assert_same_workers(d: &Daemon, pids: &[i32]) {
    let want: BTreeSet<i32> = pids.iter().copied().collect();
    let now: BTreeSet<i32> = d.workers().into_iter().collect();
    if now != want {
        d.fail(&format!("workers changed: expected {want:?}, now {now:?}"));
    }
}

/// `total` `GET /` over `clients` concurrent clients; panics on any failure.
/// Returns the pids that answered.
fn burst(d: &Daemon, target: &Listener, clients: usize, total: usize) -> BTreeSet<i32> {
    let per_client = total.div_ceil(clients);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let target = target.clone();
            std::thread::spawn(move || -> Result<Vec<i32>, String> {
                (0..per_client)
                    .map(|i| {
                        let r = http_get(&target, "/", SHORT)
                            .map_err(|e| format!("client {c} request {i}: {e}"))?;
                        if r.status != 200 {
                            return Err(format!("client {c} request {i}: {r:?}"));
                        }
                        let pid = serde_json::from_str::<Value>(&r.body)
                            .ok()
                            .and_then(|j| j["pid"].as_i64())
                            .ok_or_else(|| format!("client {c} request {i}: no pid: {r:?}"))?;
                        Ok(pid as i32)
                    })
                    .collect()
            })
        })
        .collect();
    let mut pids = BTreeSet::new();
    for t in threads {
        match t.join().expect("a client thread panicked") {
            Ok(v) => pids.extend(v),
            Err(e) => d.fail(&format!("burst against {target:?}: {e}")),
        }
    }
    pids
}

#[test]
fn builtin_workers_leave_the_listeners_blocking() {
    let b = Daemon::builder();
    let sock = b.path("web.sock");
    let d = b
        .args(["-w", "3", "-b", "127.0.0.1:0", "-b"])
        .arg(format!("unix:{}", sock.display()))
        .start();
    let workers: Vec<i32> = d.wait_workers(3).iter().map(|w| w.pid).collect();

    // Enough concurrent connections that the workers accept in batches and race
    // each other for connections on the shared sockets.
    let tcp = d.listener().clone();
    let unix = Listener::Unix(sock.clone());
    let mut answered = burst(&d, &tcp, 8, 200);
    answered.extend(burst(&d, &unix, 4, 40));
    assert!(
        answered.iter().all(|p| workers.contains(p)),
        "answered by {answered:?}, workers {workers:?}"
    );
    assert_same_workers(&d, &workers);

    let inodes = [
        (
            "tcp",
            crate::ops::listen_inode(d.port())
                .unwrap_or_else(|| d.fail(&format!("no TCP listener on port {}", d.port()))),
        ),
        (
            "unix",
            unix_listener_inode(&sock)
                .unwrap_or_else(|| d.fail(&format!("no unix socket at {}", sock.display()))),
        ),
    ];
    let mut everyone = vec![d.pid()];
    everyone.extend(&workers);
    for (kind, inode) in inodes {
        for (pid, fd, flags) in flags_everywhere(&d, &everyone, inode) {
            assert_eq!(
                flags & O_NONBLOCK,
                0,
                "the {kind} listener is non-blocking in pid {pid} (fd {fd}, flags {flags:o}; \
                 master {}, workers {workers:?})",
                d.pid()
            );
        }
    }
    // The listeners reach the workers at fds 3 and 4, in --bind order.
    for &w in &workers {
        for (fd, (kind, inode)) in [3, 4].into_iter().zip(inodes) {
            assert!(
                fds_on_socket(w, inode).contains(&fd),
                "worker {w}: fd {fd} is not the {kind} listener"
            );
        }
    }
}

/// A COMMAND worker that accepts the way the simplest servers do: a blocking
/// `accept()`, no poll, no timeout. On a non-blocking listener the first accept
/// with nothing queued raises BlockingIOError and the worker dies.
const BLOCKING_WORKER: &str = r#"
import fcntl, json, os, socket
sock = socket.socket(fileno=3)
nonblocking = bool(fcntl.fcntl(3, fcntl.F_GETFL) & os.O_NONBLOCK)
addr = os.environ["NOTIFY_SOCKET"]
addr = "\0" + addr[1:] if addr.startswith("@") else addr
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
while True:
    conn, _ = sock.accept()
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        body = json.dumps({
            "pid": os.getpid(),
            "generation": int(os.environ["ARBITER_GENERATION"]),
            "nonblocking_at_start": nonblocking,
        }).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
"#;

fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// TOML basic string: quotes and backslashes escaped.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn a_reload_from_builtin_workers_to_a_blocking_command_worker_serves() {
    let b = Daemon::builder();
    let cfg = b.path("arbiter.toml");
    let script: PathBuf = b.path("blocking_worker.py");
    write_file(&script, BLOCKING_WORKER);
    write_file(&cfg, "workers = 2\ngraceful-timeout = 5\n");
    let d = b.arg("-c").arg(&cfg).start();
    let builtin: Vec<i32> = d.wait_workers(2).iter().map(|w| w.pid).collect();
    burst(&d, &d.listener().clone(), 6, 120);

    write_file(
        &cfg,
        &format!(
            "workers = 2\ngraceful-timeout = 5\nready = \"notify\"\ncommand = [{}, {}]\n",
            toml_str(&python3().to_string_lossy()),
            toml_str(&script.to_string_lossy()),
        ),
    );
    d.signal(Signal::SIGHUP);
    let command_workers: Vec<i32> = d.wait_until(LONG, "2 COMMAND workers serving", || {
        // A worker killed by its accept says so in the log: fail now, with it.
        if d.log().contains("Traceback") {
            d.fail("a COMMAND worker raised (see its traceback in the log)");
        }
        let infos = d.worker_infos();
        if infos.len() != 2 || infos.iter().any(|w| w.generation != Some(2)) {
            return Err(format!("children: {infos:?}"));
        }
        let r = http_get(d.listener(), "/", SHORT).map_err(|e| format!("GET /: {e}"))?;
        let j: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {r:?}"))?;
        if j["generation"] != 2 {
            return Err(format!("answered by {j}"));
        }
        Ok(infos.iter().map(|w| w.pid).collect())
    });
    assert!(
        command_workers.iter().all(|p| !builtin.contains(p)),
        "a built-in worker survived: {builtin:?} -> {command_workers:?}"
    );

    // One at a time: between requests each worker is back in a blocking accept()
    // with nothing queued, which is where a non-blocking listener kills it.
    for i in 0..40 {
        let r = http_get(d.listener(), "/", SHORT)
            .unwrap_or_else(|e| d.fail(&format!("request {i} after the reload: {e}")));
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let j = r.json();
        assert_eq!(
            j["nonblocking_at_start"], false,
            "request {i}: the COMMAND worker got a non-blocking listener: {j}"
        );
        let pid = j["pid"].as_i64().unwrap_or(0) as i32;
        assert!(
            command_workers.contains(&pid),
            "request {i} answered by {pid}, not one of {command_workers:?}: {j}"
        );
    }
    if d.log().contains("Traceback") {
        d.fail("a COMMAND worker raised (see its traceback in the log)");
    }
    assert_same_workers(&d, &command_workers);
}
