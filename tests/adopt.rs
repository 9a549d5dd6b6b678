//! Binds that name a socket systemd already listens on: the shipped socket unit
//! (`ListenStream=127.0.0.1:8000`) with the shipped config (`bind =
//! "127.0.0.1:8000"`). The master serves the inherited socket instead of binding
//! the address again, for TCP and unix paths, at a reload and across an upgrade;
//! inherited sockets no bind names are served as before, and binds that match
//! nothing inherited are bound beside them.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::*;
use crate::upgrade::{ping_pid, workers_of};

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// A port nothing listens on now (bound, then closed: a tiny race with other
/// processes, for the tools that bind it themselves).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The inodes of the sockets listening on TCP `port`, from /proc/net.
fn listen_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if on_port
                && f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9).and_then(|i| i.parse().ok())
            {
                out.push(inode);
            }
        }
    }
    out
}

/// What fd `fd` of `pid` is (`socket:[123]`).
fn fd_link(pid: i32, fd: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|l| l.to_string_lossy().into_owned())
}

/// What an fd of this process is, as another process's fd on the same socket
/// shows it.
fn own_link(fd: &impl AsRawFd) -> String {
    fd_link(std::process::id() as i32, fd.as_raw_fd()).expect("read /proc/self/fd")
}

fn inode_of(link: &str) -> u64 {
    link.strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a socket link: {link}"))
}

/// `arbiterctl --json status` of the master on `d`'s control socket.
fn status(d: &Daemon) -> Value {
    let out = d.ctl(["--json", "status"]);
    if !matches!(out.code(), Some(0 | 4)) {
        d.fail(&format!("arbiterctl status: {out:?}"));
    }
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| d.fail(&format!("status is not JSON ({e}): {}", out.stdout)))
}

/// The listeners of a status, without their queues (they change).
fn listeners(st: &Value) -> Vec<Value> {
    st["master"]["listeners"]
        .as_array()
        .unwrap_or_else(|| panic!("no listeners in {st}"))
        .iter()
        .map(|l| {
            json!({
                "address": l["address"],
                "name": l["name"],
                "bind": l["bind"],
                "inherited": l["inherited"],
            })
        })
        .collect()
}

fn listener(address: String, name: &str, bind: Option<String>, inherited: Option<&str>) -> Value {
    json!({"address": address, "name": name, "bind": bind, "inherited": inherited})
}

/// GET / on `target` answers 200 from a worker of `master`; returns its pid.
fn served_by_worker_of(d: &Daemon, target: &Listener, master: i32) -> i32 {
    d.wait_until(LONG, &format!("GET / on {target:?} from a worker"), || {
        let r = http_get(target, "/", SHORT).map_err(|e| e.to_string())?;
        let pid = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|j| j["pid"].as_i64())
            .ok_or_else(|| format!("not a worker's answer: {r:?}"))? as i32;
        match proc_stat(pid) {
            Some(s) if r.status == 200 && s.ppid == master => Ok(pid),
            other => Err(format!("status {}, from pid {pid} ({other:?})", r.status)),
        }
    })
}

fn no_bind_failed(d: &Daemon) {
    let refused = d.log_lines_with("cannot listen");
    if !refused.is_empty() {
        d.fail(&format!("a bind was refused: {refused:?}"));
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ------------------------------------------------------------------ the shipped pair

#[test]
fn the_shipped_config_serves_the_socket_the_shipped_unit_makes_systemd_hold() {
    assert!(
        Path::new(ACTIVATE).exists(),
        "{ACTIVATE} is needed for this test"
    );
    let port = free_port();
    let shipped = include_str!("../packaging/arbiter.toml");
    let line = "\nbind = \"127.0.0.1:8000\"\n";
    assert_eq!(
        shipped.matches(line).count(),
        1,
        "packaging/arbiter.toml binds 127.0.0.1:8000, as arbiter@.socket listens"
    );
    let unit = include_str!("../packaging/systemd/arbiter@.socket");
    assert!(
        unit.contains("\nListenStream=127.0.0.1:8000\n")
            && unit.contains("\nFileDescriptorName=http\n"),
        "arbiter@.socket listens on 127.0.0.1:8000 as `http`"
    );
    let b = Daemon::builder();
    let cfg = b.path("web.toml");
    write(
        &cfg,
        &shipped.replace(line, &format!("\nbind = \"127.0.0.1:{port}\"\n")),
    );
    let control = b.path("control.sock");
    // What systemd does with the unit: bind, listen, start the service at the
    // first connection with the socket as fd 3, named as FileDescriptorName says.
    let d = b
        .program(ACTIVATE)
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=http"])
        .arg(ARBITERD)
        .arg("-c")
        .arg(&cfg)
        .arg("--control")
        .arg(&control)
        .no_default_bind()
        .no_wait()
        .start();
    let activator = d.child_pid();
    let inode = d.wait_until(SHORT, "systemd-socket-activate to listen", || {
        if let Some(st) = d.try_status() {
            d.fail(&format!("systemd-socket-activate exited ({st})"));
        }
        match listen_inodes(port)[..] {
            [inode] => Ok(inode),
            ref other => Err(format!("listening on port {port}: {other:?}")),
        }
    });
    assert_eq!(
        holder_of_socket(&[activator], inode),
        Some(activator),
        "the activator holds the socket"
    );
    let target = Listener::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    // The activator execs arbiterd in its place: the master is the activator's
    // pid, and serves on the socket it holds.
    let worker = served_by_worker_of(&d, &target, activator);
    d.wait_log("the listening line", |l| {
        l.contains(&format!(
            "Listening at: http://127.0.0.1:{port} ({activator})"
        ))
    });
    assert_eq!(
        listen_inodes(port),
        vec![inode],
        "the activator's socket, and no other, listens on the port"
    );
    assert_eq!(holder_of_socket(&[activator], inode), Some(activator));
    assert_eq!(
        holder_of_socket(&[worker], inode),
        Some(worker),
        "the worker that answered has the activator's socket"
    );
    d.wait_log("the adoption", |l| {
        l.contains(&format!(
            "Bind 127.0.0.1:{port}: systemd's socket \"http\" listens there; serving it"
        ))
    });
    no_bind_failed(&d);

    let st = status(&d);
    assert_eq!(
        listeners(&st),
        vec![listener(
            format!("http://127.0.0.1:{port}"),
            "http",
            Some(format!("127.0.0.1:{port}")),
            Some("systemd"),
        )],
        "{st}"
    );
    let human = d.ctl(["status"]);
    let want = format!("listening at http://127.0.0.1:{port} (queue ");
    let line = human
        .stdout
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| d.fail(&format!("no `{want}` line: {human:?}")));
    assert!(line.ends_with(", from systemd)"), "{line:?}");

    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit status after TERM: {st}");
    d.wait_no_leftovers(SHORT);
}

// ------------------------------------------------------------------ unix paths

#[test]
fn a_unix_bind_serves_the_inherited_socket_at_its_path_and_leaves_the_file_to_systemd() {
    let b = Daemon::builder();
    let path = b.path("app.sock");
    let sock = UnixListener::bind(&path).expect("bind the unix socket");
    // systemd keeps its own copy, as here.
    let held = sock.try_clone().unwrap();
    let link = own_link(&held);
    let file = fs::metadata(&path).unwrap().ino();
    let cfg = b.path("app.toml");
    write(
        &cfg,
        &format!("bind = \"unix:{}\"\nworkers = 2\n", path.display()),
    );
    let d = b
        .socket_activation(vec![OwnedFd::from(sock)], &["app"])
        .arg("-c")
        .arg(&cfg)
        .start();
    let master = d.pid();
    assert_eq!(
        d.listeners(),
        [Listener::Unix(path.clone())],
        "listening on the inherited socket only"
    );
    let worker = served_by_worker_of(&d, &Listener::Unix(path.clone()), master);
    for pid in [master, worker] {
        assert_eq!(
            holder_of_socket(&[pid], inode_of(&link)),
            Some(pid),
            "pid {pid} has the inherited socket"
        );
    }
    assert_eq!(fd_link(worker, 3), Some(link.clone()), "fd 3 of the worker");
    assert_eq!(
        fs::metadata(&path).map(|m| m.ino()).ok(),
        Some(file),
        "the socket file was neither removed nor bound again"
    );
    no_bind_failed(&d);
    let st = status(&d);
    assert_eq!(
        listeners(&st),
        vec![listener(
            format!("unix:{}", path.display()),
            "app",
            Some(format!("unix:{}", path.display())),
            Some("systemd"),
        )],
        "{st}"
    );

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success());
    assert_eq!(
        fs::metadata(&path).map(|m| m.ino()).ok(),
        Some(file),
        "the master left systemd's socket file in place at exit"
    );
    // And it still takes connections, into the queue systemd holds.
    std::os::unix::net::UnixStream::connect(&path)
        .expect("connect to systemd's socket after the master's exit");
}

// ------------------------------------------------------------------ beside other listeners

#[test]
fn inherited_sockets_no_bind_names_are_served_and_binds_that_match_nothing_are_bound() {
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (web_at, admin_at) = (web.local_addr().unwrap(), admin.local_addr().unwrap());
    let (web_link, admin_link) = (own_link(&web), own_link(&admin));
    // `localhost` resolves as binding would resolve it, to web's 127.0.0.1; port
    // 0 asks for a new port, so it never names an inherited socket.
    let d = Daemon::builder()
        .socket_activation(
            vec![OwnedFd::from(web), OwnedFd::from(admin)],
            &["web", "admin"],
        )
        .args(["-w", "1", "-b"])
        .arg(format!("localhost:{}", web_at.port()))
        .args(["-b", "127.0.0.1:0"])
        .start();
    let master = d.pid();
    let ls = d.listeners().to_vec();
    let fresh = match &ls[..] {
        [Listener::Tcp(a), Listener::Tcp(b), Listener::Tcp(c)]
            if *a == web_at && *b == admin_at =>
        {
            *c
        }
        other => d.fail(&format!(
            "expected {web_at}, {admin_at} and a new port: {other:?}"
        )),
    };
    assert!(
        fresh.port() != 0 && fresh != web_at && fresh != admin_at,
        "{fresh}"
    );
    for l in &ls {
        served_by_worker_of(&d, l, master);
    }
    let worker = workers_of(master)[0];
    let env = proc_environ(worker).unwrap_or_default();
    assert_eq!(
        env.get("LISTEN_FDNAMES").map(String::as_str),
        Some(format!("web:admin:127.0.0.1_{}", fresh.port()).as_str()),
        "systemd's sockets first, in their order, then the binds: {env:?}"
    );
    assert_eq!(fd_link(worker, 3), Some(web_link));
    assert_eq!(fd_link(worker, 4), Some(admin_link));
    assert_eq!(listen_inodes(web_at.port()).len(), 1);
    no_bind_failed(&d);
    let st = status(&d);
    assert_eq!(
        listeners(&st),
        vec![
            listener(
                format!("http://{web_at}"),
                "web",
                Some(web_at.to_string()),
                Some("systemd")
            ),
            listener(format!("http://{admin_at}"), "admin", None, Some("systemd")),
            listener(
                format!("http://{fresh}"),
                &format!("127.0.0.1_{}", fresh.port()),
                Some("127.0.0.1:0".into()),
                None
            ),
        ],
        "{st}"
    );
    d.wait_log("the unnamed socket's line", |l| {
        l.contains(&format!(
            "Serving systemd's socket \"admin\" at http://{admin_at}, which no bind names"
        ))
    });
}

#[test]
fn fd_3_under_socket_activation_is_systemds_socket_taken_once() {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let (at, link) = (http.local_addr().unwrap(), own_link(&http));
    let d = Daemon::builder()
        .socket_activation(vec![OwnedFd::from(http)], &["http"])
        .args(["-w", "1", "-b", "fd://3"])
        .start();
    assert_eq!(d.listeners(), [Listener::Tcp(at)]);
    let worker = served_by_worker_of(&d, &Listener::Tcp(at), d.pid());
    let env = proc_environ(worker).unwrap_or_default();
    assert_eq!(
        env.get("LISTEN_FDS").map(String::as_str),
        Some("1"),
        "{env:?}"
    );
    assert_eq!(fd_link(worker, 3), Some(link));
    assert_eq!(
        listeners(&status(&d)),
        vec![listener(
            format!("http://{at}"),
            "http",
            Some("fd://3".into()),
            Some("systemd")
        )]
    );
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "exit status after TERM: {st}");
}

#[test]
fn a_bind_on_the_port_of_a_systemd_socket_at_another_address_names_that_socket() {
    let wild = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = wild.local_addr().unwrap().port();
    let d = Daemon::builder()
        .socket_activation(vec![OwnedFd::from(wild)], &["http"])
        .args(["-b", &format!("127.0.0.1:{port}")])
        .no_wait()
        .start();
    let st = d.wait_exit(SHORT);
    assert_eq!(st.code(), Some(1), "{st}\n{}", d.log());
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.starts_with("arbiterd: "))
        .unwrap_or_else(|| d.fail("no error line"));
    assert!(
        line.starts_with(&format!(
            "arbiterd: cannot listen on 127.0.0.1:{port}: address already in use"
        )) && line.ends_with(&format!(
            "; systemd's socket \"http\" listens on 0.0.0.0:{port}, not 127.0.0.1:{port}: \
             bind 0.0.0.0:{port} to serve it, or make the socket unit listen on 127.0.0.1:{port}"
        )),
        "{line}"
    );
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    d.wait_no_leftovers(SHORT);
}

// ------------------------------------------------------------------ reload

#[test]
fn a_reload_keeps_the_adopted_socket_and_a_bind_removed_from_the_file_keeps_it_served() {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = http.local_addr().unwrap();
    let link = own_link(&http);
    let b = Daemon::builder();
    let cfg = b.path("web.toml");
    let graceful = "workers = 1\ngraceful-timeout = 5\n";
    write(&cfg, &format!("bind = \"{at}\"\n{graceful}"));
    let d = b
        .socket_activation(vec![OwnedFd::from(http)], &["http"])
        .arg("-c")
        .arg(&cfg)
        .start();
    let master = d.pid();
    let inherited = || {
        listener(
            format!("http://{at}"),
            "http",
            Some(at.to_string()),
            Some("systemd"),
        )
    };
    let reload = |generation: u64| {
        let out = d.ctl(["reload"]);
        if out.code() != Some(0) {
            d.fail(&format!("reload to generation {generation}: {out:?}"));
        }
        let ws = d.wait_workers_where(&format!("generation {generation}"), 1, |w| {
            w.generation == Some(generation)
        });
        assert_eq!(
            fd_link(ws[0].pid, 3),
            Some(link.clone()),
            "generation {generation}: fd 3 is systemd's socket"
        );
        served_by_worker_of(&d, &Listener::Tcp(at), master);
        assert_eq!(listen_inodes(at.port()), vec![inode_of(&link)]);
        listeners(&status(&d))
    };

    // The same file.
    assert_eq!(reload(2), vec![inherited()]);
    // A bind added: bound beside it, the adopted one not bound again.
    write(
        &cfg,
        &format!("bind = [\"{at}\", \"127.0.0.1:0\"]\n{graceful}"),
    );
    let now = reload(3);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], inherited());
    assert_eq!(now[1]["bind"], json!("127.0.0.1:0"), "{now:?}");
    assert_eq!(now[1]["inherited"], Value::Null, "{now:?}");
    let fresh_one = now[1].clone();
    let fresh = Listener::parse(fresh_one["address"].as_str().unwrap_or_default());
    served_by_worker_of(&d, &fresh, master);
    // Its bind gone from the file, systemd's socket is still served: the socket
    // unit, not the config file, says what systemd listens on.
    write(&cfg, &format!("bind = \"127.0.0.1:0\"\n{graceful}"));
    let now = reload(4);
    assert_eq!(
        now[0],
        listener(format!("http://{at}"), "http", None, Some("systemd")),
        "{now:?}"
    );
    assert_eq!(now[1], fresh_one, "the new bind's socket is kept: {now:?}");
    no_bind_failed(&d);
}

// ------------------------------------------------------------------ upgrade

#[test]
fn an_upgrade_keeps_the_adopted_sockets_and_never_removes_systemds_path() {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = http.local_addr().unwrap();
    let b = Daemon::builder();
    let path = b.path("app.sock");
    let app = UnixListener::bind(&path).unwrap();
    let (http_link, app_link) = (own_link(&http), own_link(&app));
    let file = fs::metadata(&path).unwrap().ino();
    let cfg = b.path("web.toml");
    write(
        &cfg,
        &format!(
            "bind = [\"{at}\", \"unix:{}\"]\nworkers = 1\n",
            path.display()
        ),
    );
    let pidfile = b.path("web.pid");
    let d = b
        .socket_activation(
            vec![OwnedFd::from(http), OwnedFd::from(app)],
            &["http", "app"],
        )
        .arg("-c")
        .arg(&cfg)
        .arg("-p")
        .arg(&pidfile)
        .start();
    let old = d.pid();
    served_by_worker_of(&d, &Listener::Tcp(at), old);
    let want = vec![
        listener(
            format!("http://{at}"),
            "http",
            Some(at.to_string()),
            Some("systemd"),
        ),
        listener(
            format!("unix:{}", path.display()),
            "app",
            Some(format!("unix:{}", path.display())),
            Some("systemd"),
        ),
    ];
    assert_eq!(listeners(&status(&d)), want);

    let out = d.ctl(["--json", "upgrade"]);
    if out.code() != Some(0) {
        d.fail(&format!("arbiterctl upgrade: {out:?}"));
    }
    let reply: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| d.fail(&format!("{e}: {out:?}")));
    let new = reply["new_pid"]
        .as_i64()
        .unwrap_or_else(|| d.fail(&format!("no new pid in {reply}"))) as i32;
    d.register_pid(new);
    d.wait_until(LONG, "the new master promoted", || {
        if is_alive(old) {
            return Err(format!("the old master {old} still runs"));
        }
        match ping_pid(&d.control_path())? {
            pid if pid == new => Ok(()),
            pid => Err(format!("pid {pid} answers")),
        }
    });
    d.wait_log("the promotion", |l| {
        l.contains(&format!("[{new}]")) && l.contains("Master has been promoted")
    });
    for l in [Listener::Tcp(at), Listener::Unix(path.clone())] {
        served_by_worker_of(&d, &l, new);
    }
    let worker = workers_of(new)[0];
    assert_eq!(fd_link(worker, 3), Some(http_link.clone()));
    assert_eq!(fd_link(worker, 4), Some(app_link));
    assert_eq!(listen_inodes(at.port()), vec![inode_of(&http_link)]);
    assert_eq!(listeners(&status(&d)), want, "the new master's status");
    no_bind_failed(&d);

    // Promoted, the new master owns its own binds' files, never systemd's.
    let out = d.ctl(["stop"]);
    assert_eq!(out.code(), Some(0), "stop: {out:?}");
    d.wait_until(SHORT, "the new master to exit", || {
        if is_alive(new) {
            Err("still running".to_string())
        } else {
            Ok(())
        }
    });
    assert_eq!(
        fs::metadata(&path).map(|m| m.ino()).ok(),
        Some(file),
        "systemd's socket file is still there"
    );
}
