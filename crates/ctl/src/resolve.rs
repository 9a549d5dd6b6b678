//! Which control socket: `--control`, `--name`, or `--pid PIDFILE`.
//!
//! With `--pid`, arbiterctl reads the pid from the file and looks at that process:
//!
//! 1. It must be alive (not a zombie), else "no master answering" (exit 3).
//! 2. Its command line (`/proc/PID/cmdline`, up to a `--`) is read the way arbiterd
//!    parses it: `--control PATH` / `--control=PATH` wins; else `-c/--config FILE`
//!    is read for a `control` key; else the name (`-n NAME`, `-nNAME`,
//!    `--name NAME`, `--name=NAME`, or the config file's `name`, default
//!    `arbiter`) gives the default path as arbiterd computes it, with the master's
//!    own `XDG_RUNTIME_DIR` (from `/proc/PID/environ`) and uid.
//! 3. Relative paths are taken from the master's working directory
//!    (`/proc/PID/cwd`: its start directory, or `--chdir`; `-D` keeps it), or
//!    arbiterctl's own when that cannot be read.
//! 4. The result is checked against the Unix sockets the master really listens on
//!    (its fds, matched by inode in `/proc/PID/net/unix`, where paths are as bound,
//!    absolute): if the computed path is not one of them but exactly one has the
//!    same file name, that one is used. This is what finds the socket of a master
//!    whose config file changed since, or of an older `-D` master that moved to `/`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use arbiter_proto::options::{self, Takes};
use arbiter_proto::paths::default_control_path_for;

/// Where to connect, and the master's pid when it is known beforehand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The control socket.
    pub path: PathBuf,
    /// The master's pid, from `--pid PIDFILE`.
    pub pid: Option<i32>,
}

/// Why no socket path could be found.
#[derive(Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// No master runs (missing pidfile, dead pid): exit 3.
    NoMaster(String),
    /// Anything else (unreadable pidfile, garbage in it): exit 1.
    Failed(String),
}

/// The options of arbiterd's command line that matter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasterArgs {
    /// `--control PATH`.
    pub control: Option<OsString>,
    /// `-n/--name NAME`.
    pub name: Option<OsString>,
    /// `-c/--config FILE`.
    pub config: Option<OsString>,
}

/// Parse `/proc/PID/cmdline` (NUL-separated, `argv[0]` first) as arbiterd's parser
/// would, for the options in [`MasterArgs`]. Stops at `--` (the worker COMMAND);
/// the last occurrence of an option wins. Which options take a value comes from
/// [`arbiter_proto::options`], which `tests/cli_table.rs` holds to arbiterd's clap
/// definition (arbiterctl does not link the daemon).
pub fn parse_master_cmdline(raw: &[u8]) -> MasterArgs {
    let mut args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    if raw.ends_with(&[0]) {
        args.pop();
    }
    let mut out = MasterArgs::default();
    let set = |out: &mut MasterArgs, opt: &options::Opt, v: &[u8]| {
        let v = Some(OsStr::from_bytes(v).to_os_string());
        match opt.long {
            "control" => out.control = v,
            "name" => out.name = v,
            "config" => out.config = v,
            _ => {}
        }
    };
    let mut i = 1;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == b"--" {
            break;
        }
        if let Some(long) = a.strip_prefix(b"--") {
            let (key, inline) = match long.iter().position(|b| *b == b'=') {
                Some(eq) => (&long[..eq], Some(&long[eq + 1..])),
                None => (long, None),
            };
            // Not one of arbiterd's (it would have refused to start): taken alone.
            let Some(opt) = options::by_long(&String::from_utf8_lossy(key)) else {
                continue;
            };
            match opt.takes {
                Takes::Flag => {}
                Takes::Value => {
                    let value = match inline {
                        Some(v) => Some(v),
                        None if i < args.len() => {
                            i += 1;
                            Some(args[i - 1])
                        }
                        None => None,
                    };
                    if let Some(v) = value {
                        set(&mut out, opt, v);
                    }
                }
                // None of these is read here: step over their values.
                Takes::Values if inline.is_none() => {
                    while i < args.len() && !args[i].starts_with(b"-") {
                        i += 1;
                    }
                }
                Takes::Values => {}
            }
        } else if let Some(cluster) = a.strip_prefix(b"-").filter(|c| !c.is_empty()) {
            // -D, -w4, -n web, -nweb, -n=web, -Dn web
            for (j, &c) in cluster.iter().enumerate() {
                let Some(opt) = options::by_short(char::from(c)) else {
                    continue;
                };
                match opt.takes {
                    Takes::Flag => {}
                    Takes::Value => {
                        let rest = &cluster[j + 1..];
                        let rest = rest.strip_prefix(b"=").unwrap_or(rest);
                        let value = if !rest.is_empty() {
                            Some(rest)
                        } else if i < args.len() {
                            i += 1;
                            Some(args[i - 1])
                        } else {
                            None
                        };
                        if let Some(v) = value {
                            set(&mut out, opt, v);
                        }
                        break;
                    }
                    Takes::Values => {
                        if cluster.len() == j + 1 {
                            while i < args.len() && !args[i].starts_with(b"-") {
                                i += 1;
                            }
                        }
                        break;
                    }
                }
            }
        }
    }
    out
}

/// What arbiterctl reads about a running master (from /proc, or a test's fixture).
#[derive(Clone, Debug, Default)]
pub struct MasterProc {
    /// `/proc/PID/cmdline`: NUL-separated arguments, `argv[0]` first.
    pub cmdline: Vec<u8>,
    /// Its environment could be read (`runtime_dir` is meaningful).
    pub env_known: bool,
    /// `XDG_RUNTIME_DIR` of its environment; `None` if unset or unreadable.
    pub runtime_dir: Option<OsString>,
    /// Its real uid; `None` if unknown.
    pub uid: Option<u32>,
    /// Its working directory; `None` if unreadable.
    pub cwd: Option<PathBuf>,
}

impl MasterProc {
    /// Read `/proc/PID/{cmdline,environ,status,cwd}`.
    pub fn read(pid: i32) -> std::io::Result<MasterProc> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let cmdline = std::fs::read(dir.join("cmdline"))?;
        let environ = std::fs::read(dir.join("environ")).ok();
        let env_known = environ.is_some();
        let runtime_dir = environ.and_then(|env| {
            env.split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"XDG_RUNTIME_DIR=".as_slice()))
                .map(|v| OsString::from_vec(v.to_vec()))
        });
        let uid = std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        let cwd = std::fs::read_link(dir.join("cwd")).ok();
        Ok(MasterProc {
            cmdline,
            env_known,
            runtime_dir,
            uid,
            cwd,
        })
    }
}

/// The control socket of the master described by `proc`. `own_cwd`, `own_uid` and
/// `own_runtime_dir` stand in for what cannot be read about the master.
pub fn control_path_of(
    proc: &MasterProc,
    own_cwd: &Path,
    own_uid: u32,
    own_runtime_dir: Option<&OsStr>,
) -> PathBuf {
    let args = parse_master_cmdline(&proc.cmdline);
    let base: PathBuf = proc.cwd.clone().unwrap_or_else(|| own_cwd.to_path_buf());
    let abs = |p: &OsStr| base.join(p);
    if let Some(c) = &args.control {
        return abs(c);
    }
    let mut name = args.name.clone();
    if let Some(cfg) = &args.config {
        let (control, cfg_name) = read_config(&abs(cfg));
        if let Some(c) = control {
            return abs(OsStr::new(&c));
        }
        if name.is_none() {
            name = cfg_name.map(OsString::from);
        }
    }
    let name = name.unwrap_or_else(|| "arbiter".into());
    // Its environment when readable, even if the variable is unset there.
    let runtime_dir = if proc.env_known {
        proc.runtime_dir.clone()
    } else {
        own_runtime_dir.map(OsStr::to_os_string)
    };
    default_control_path_for(&name, runtime_dir.as_deref(), proc.uid.unwrap_or(own_uid))
}

/// The `control` and `name` keys of an arbiterd config file (TOML); nothing if it
/// cannot be read or parsed.
fn read_config(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(text) = arbiter_proto::paths::read_regular(path, 1024 * 1024) else {
        return (None, None);
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return (None, None);
    };
    let get = |k: &str| table.get(k).and_then(|v| v.as_str()).map(str::to_string);
    (get("control"), get("name"))
}

/// Is `pid` a live process (a zombie counts as gone)?
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may contain parentheses).
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => !matches!(state, "Z" | "X" | "x"),
        None => false,
    }
}

/// The paths of the stream sockets `pid` is listening on, as bound; empty when
/// they cannot be read (another user's process, no /proc).
pub fn listening_unix_paths(pid: i32) -> Vec<PathBuf> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<u64> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let Ok(table) = std::fs::read(format!("/proc/{pid}/net/unix")) else {
        return Vec::new();
    };
    parse_net_unix(&table)
        .into_iter()
        .filter(|(inode, _)| inodes.contains(inode))
        .map(|(_, path)| path)
        .collect()
}

/// (inode, path) of each listening, path-bound stream socket in a
/// `/proc/net/unix` table: `Num RefCount Protocol Flags Type St Inode Path`.
fn parse_net_unix(table: &[u8]) -> Vec<(u64, PathBuf)> {
    const ACCEPTCON: u32 = 0x0001_0000;
    const STREAM: u32 = 1;
    let mut out = Vec::new();
    for line in table.split(|b| *b == b'\n').skip(1) {
        // Seven fields, then the path, which may itself contain spaces.
        let mut rest = line;
        let mut fields = Vec::with_capacity(7);
        while fields.len() < 7 {
            let start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let path = rest.strip_prefix(b" ").unwrap_or(rest);
        if fields.len() < 7 || path.first() != Some(&b'/') {
            continue; // unbound, abstract, or not a table row
        }
        let hex = |f: &[u8]| u32::from_str_radix(std::str::from_utf8(f).ok()?, 16).ok();
        let (Some(flags), Some(kind)) = (hex(fields[3]), hex(fields[4])) else {
            continue;
        };
        let Some(inode) = std::str::from_utf8(fields[6])
            .ok()
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        if flags & ACCEPTCON != 0 && kind == STREAM {
            out.push((inode, PathBuf::from(OsStr::from_bytes(path))));
        }
    }
    out
}

/// `computed` if the master listens there (or nothing is known); else the one
/// socket it listens on with the same file name, if there is exactly one.
pub fn check_against_listening(computed: PathBuf, listening: &[PathBuf]) -> PathBuf {
    if listening.is_empty() || listening.contains(&computed) {
        return computed;
    }
    let mut same = listening
        .iter()
        .filter(|p| p.file_name() == computed.file_name());
    match (same.next(), same.next()) {
        (Some(only), None) => only.clone(),
        _ => computed,
    }
}

/// The socket of the master whose pid is in `pidfile`.
pub fn from_pidfile(pidfile: &Path) -> Result<Target, ResolveError> {
    let shown = pidfile.display();
    let text = match arbiter_proto::paths::read_regular(pidfile, 64) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ResolveError::NoMaster(format!(
                "no master answering: pidfile {shown} does not exist"
            )));
        }
        Err(e) => return Err(ResolveError::Failed(format!("pidfile {shown}: {e}"))),
    };
    let pid: i32 = match text.trim().parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(ResolveError::Failed(format!(
                "pidfile {shown}: not a pid: {:?}",
                text.trim()
            )));
        }
    };
    if !pid_alive(pid) {
        return Err(ResolveError::NoMaster(format!(
            "no master answering: pid {pid} (from {shown}) is not running"
        )));
    }
    let proc = MasterProc::read(pid).map_err(|e| {
        if pid_alive(pid) {
            ResolveError::Failed(format!("cannot read /proc/{pid}: {e}"))
        } else {
            ResolveError::NoMaster(format!(
                "no master answering: pid {pid} (from {shown}) is not running"
            ))
        }
    })?;
    let own_cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let own_uid = nix::unistd::getuid().as_raw();
    let own_runtime = std::env::var_os("XDG_RUNTIME_DIR");
    let computed = control_path_of(&proc, &own_cwd, own_uid, own_runtime.as_deref());
    Ok(Target {
        path: check_against_listening(computed, &listening_unix_paths(pid)),
        pid: Some(pid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_unix_rows() {
        let table = b"Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 123456 /tmp/a b/c.sock
0000000000000000: 00000002 00000000 00010000 0001 01    77 /srv/app.sock
0000000000000000: 00000003 00000000 00000000 0001 03 123457 /tmp/connected.sock
0000000000000000: 00000002 00000000 00010000 0002 01 123458 /tmp/dgram.sock
0000000000000000: 00000002 00000000 00010000 0001 01 123459 @abstract
0000000000000000: 00000002 00000000 00000000 0001 03 123460
";
        assert_eq!(
            parse_net_unix(table),
            vec![
                (123456, PathBuf::from("/tmp/a b/c.sock")),
                (77, PathBuf::from("/srv/app.sock")),
            ]
        );
        assert!(parse_net_unix(b"").is_empty());
        assert!(parse_net_unix(b"header\ngarbage line\n\xff\xfe\n").is_empty());
    }

    #[test]
    fn the_listening_socket_with_the_same_name_wins() {
        let l = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        let pick = |c: &str, v: &[&str]| check_against_listening(PathBuf::from(c), &l(v));
        assert_eq!(pick("/x/c.sock", &[]), PathBuf::from("/x/c.sock"));
        assert_eq!(
            pick("/x/c.sock", &["/x/c.sock", "/y/c.sock"]),
            PathBuf::from("/x/c.sock")
        );
        assert_eq!(
            pick("/c.sock", &["/srv/c.sock", "/srv/app.sock"]),
            PathBuf::from("/srv/c.sock")
        );
        // Ambiguous, or nothing alike: keep what the command line says.
        assert_eq!(
            pick("/c.sock", &["/a/c.sock", "/b/c.sock"]),
            PathBuf::from("/c.sock")
        );
        assert_eq!(
            pick("/c.sock", &["/srv/app.sock"]),
            PathBuf::from("/c.sock")
        );
    }

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for a in args {
            v.extend_from_slice(a.as_bytes());
            v.push(0);
        }
        v
    }

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn cmdlines() {
        let p = |a: &[&str]| parse_master_cmdline(&cmd(a));
        assert_eq!(p(&["arbiterd"]), MasterArgs::default());
        assert_eq!(p(&[]), MasterArgs::default());
        assert_eq!(
            p(&["arbiterd", "--control", "/tmp/a.sock", "-w", "4"]).control,
            os("/tmp/a.sock")
        );
        assert_eq!(
            p(&["arbiterd", "--control=/tmp/b.sock"]).control,
            os("/tmp/b.sock")
        );
        assert_eq!(p(&["arbiterd", "-n", "web"]).name, os("web"));
        assert_eq!(p(&["arbiterd", "-nweb"]).name, os("web"));
        assert_eq!(p(&["arbiterd", "-n=web"]).name, os("web"));
        assert_eq!(p(&["arbiterd", "--name", "web"]).name, os("web"));
        assert_eq!(p(&["arbiterd", "--name=web"]).name, os("web"));
        let a = p(&["arbiterd", "-Dn", "web", "-c", "app.toml"]);
        assert_eq!(
            a,
            MasterArgs {
                name: os("web"),
                config: os("app.toml"),
                ..MasterArgs::default()
            }
        );
        // Values of other options are skipped, not read as options.
        assert_eq!(p(&["arbiterd", "--log-file", "--name", "x"]).name, None);
        assert_eq!(p(&["arbiterd", "-b", "-n", "x"]).name, None);
        assert_eq!(p(&["arbiterd", "-w4", "-n", "x"]).name, os("x"));
        // Flags do not eat the next argument.
        assert_eq!(p(&["arbiterd", "--reuse-port", "-n", "x"]).name, os("x"));
        // The last one wins.
        assert_eq!(p(&["arbiterd", "-n", "a", "--name=b"]).name, os("b"));
        // The worker command's own options are not the master's.
        let a = p(&[
            "arbiterd",
            "-n",
            "a",
            "--",
            "app",
            "--name",
            "b",
            "--control",
            "/x",
        ]);
        assert_eq!((a.name, a.control), (os("a"), None));
        // A trailing option without its value.
        assert_eq!(p(&["arbiterd", "--control"]).control, None);
        // A skipped value is not read as the name.
        assert_eq!(p(&["arbiterd", "--chdir", "-n"]).name, None);
        // An option of none or more values takes what does not start with `-`.
        let a = p(&["arbiterd", "--reload-on-change", "-n", "x"]);
        assert_eq!(a.name, os("x"));
        let a = p(&["arbiterd", "--reload-on-change", "src", "lib", "-n", "x"]);
        assert_eq!(a.name, os("x"));
        let a = p(&["arbiterd", "--reload-on-change=src", "-n", "x"]);
        assert_eq!(a.name, os("x"));
        let a = p(&["arbiterd", "--reload-on-change", "--", "-n", "x"]);
        assert_eq!(a.name, None);
    }

    #[test]
    fn paths_from_a_master() {
        let m = |args: &[&str], cwd: &str| MasterProc {
            cmdline: cmd(args),
            env_known: true,
            runtime_dir: None,
            uid: Some(1000),
            cwd: Some(cwd.into()),
        };
        let own = Path::new("/home/me");
        let path = |p: &MasterProc| control_path_of(p, own, 0, Some(OsStr::new("/run/user/0")));
        assert_eq!(
            path(&m(&["arbiterd", "--control", "/s/c.sock"], "/srv")),
            PathBuf::from("/s/c.sock")
        );
        assert_eq!(
            path(&m(&["arbiterd", "--control", "c.sock"], "/srv")),
            PathBuf::from("/srv/c.sock")
        );
        // -D keeps the start directory.
        assert_eq!(
            path(&m(&["arbiterd", "-D", "--control", "c.sock"], "/srv")),
            PathBuf::from("/srv/c.sock")
        );
        // The master's uid and (unset) XDG_RUNTIME_DIR, not ours.
        assert_eq!(
            path(&m(&["arbiterd", "-n", "web"], "/srv")),
            PathBuf::from("/tmp/arbiter-1000/web.sock")
        );
        let mut with_rt = m(&["arbiterd"], "/srv");
        with_rt.runtime_dir = os("/run/user/1000");
        assert_eq!(
            path(&with_rt),
            PathBuf::from("/run/user/1000/arbiter/arbiter.sock")
        );
        // Unreadable /proc details: our own stand in.
        let unknown = MasterProc {
            cmdline: cmd(&["arbiterd", "--name", "x"]),
            env_known: false,
            runtime_dir: None,
            uid: None,
            cwd: None,
        };
        assert_eq!(path(&unknown), PathBuf::from("/run/user/0/arbiter/x.sock"));

        // A config file: its `control`, else its `name`; the command line wins.
        let dir = std::env::temp_dir().join(format!("arbctl-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.toml"),
            "workers = 2\ncontrol = \"ctl/a.sock\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.toml"), "name = \"bee\"\n[extra]\ncontrol = 1\n").unwrap();
        std::fs::write(dir.join("bad.toml"), "this is = = not toml").unwrap();
        let d = dir.to_str().unwrap();
        assert_eq!(
            path(&m(&["arbiterd", "-c", "a.toml"], d)),
            dir.join("ctl/a.sock")
        );
        assert_eq!(
            path(&m(&["arbiterd", "-c", "a.toml", "--control", "/z.sock"], d)),
            PathBuf::from("/z.sock")
        );
        assert_eq!(
            path(&m(&["arbiterd", "--config", "b.toml"], d)),
            PathBuf::from("/tmp/arbiter-1000/bee.sock")
        );
        assert_eq!(
            path(&m(&["arbiterd", "--config", "b.toml", "-n", "cli"], d)),
            PathBuf::from("/tmp/arbiter-1000/cli.sock")
        );
        assert_eq!(
            path(&m(&["arbiterd", "-c", "bad.toml"], d)),
            PathBuf::from("/tmp/arbiter-1000/arbiter.sock")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pidfiles() {
        let dir = std::env::temp_dir().join(format!("arbctl-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            from_pidfile(&dir.join("missing.pid")),
            Err(ResolveError::NoMaster(_))
        ));
        std::fs::write(dir.join("garbage.pid"), "hello\n").unwrap();
        assert!(matches!(
            from_pidfile(&dir.join("garbage.pid")),
            Err(ResolveError::Failed(_))
        ));
        // A pid that cannot exist (above pid_max).
        std::fs::write(dir.join("dead.pid"), "2147483646\n").unwrap();
        assert!(matches!(
            from_pidfile(&dir.join("dead.pid")),
            Err(ResolveError::NoMaster(_))
        ));
        // This test process: alive, its cmdline is not arbiterd's, so the default.
        std::fs::write(dir.join("me.pid"), format!("{}\n", std::process::id())).unwrap();
        let t = from_pidfile(&dir.join("me.pid")).unwrap();
        assert_eq!(t.pid, Some(std::process::id() as i32));
        assert!(t.path.ends_with("arbiter.sock"), "{t:?}");
        assert!(pid_alive(std::process::id() as i32));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
