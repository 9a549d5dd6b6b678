//! Deterministic robustness tests for the master's parsers: the gunicornc framing
//! and translation (`gunicornc::take_frame` + `render`), the notify datagram parser
//! (`notify::parse`), the config file (`config::Loader::load` on a temp TOML file)
//! and `config::parse_bind`. A fixed-seed xorshift PRNG feeds random bytes and
//! structured mutations of valid inputs; the tests assert that nothing panics,
//! every call returns, answers are well-formed frames and round trips hold.
//!
//! The CI variants run a few thousand inputs each (well under 2 s in debug). The
//! `#[ignore]`d `*_long` variants run 1,000,000 executions per target; see
//! bench/reliability-fuzz.md. The seed corpus is fuzz/corpus/<target>/ (shared with
//! the cargo-fuzz targets under fuzz/).

use std::path::PathBuf;

use arbiter_daemon::config::{BindForm, BindSpec, Loader, parse_bind, parse_bind_form};
use arbiter_daemon::gunicornc::{Frame, MAX_BODY, render, take_frame};
use arbiter_daemon::notify::{Message, parse};
use arbiter_proto::control::{ErrorKind, Reply, Response};
use serde_json::Value;

const CI_ITERS: u64 = 10_000;
const LONG_ITERS: u64 = 1_000_000;

#[path = "../../proto/tests/support/fuzzgen.rs"]
mod fuzzgen;
use fuzzgen::{Rng, mutate};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

// ---------------------------------------------------------------- gunicornc

const GC_TOKENS: &[&[u8]] = &[
    b"\"id\": ",
    b"\"command\": ",
    b"\"args\": [",
    b"\"show workers\"",
    b"\"worker kill\"",
    b"\"worker add\"",
    b"\"shutdown\"",
    b"\"reload\"",
    b"'",
    b"\"",
    b"\\",
    b"\\ud800",
    b"1e999",
    b"-0",
    b"99999999999999999999",
    b"null",
    b"[]",
    b"{}",
    b"\xff",
    b"\x00\x00\x00",
    b" ",
];

const COMMANDS: &[&str] = &[
    "show all",
    "show workers",
    "show stats",
    "show config",
    "show listeners",
    "show dirty",
    "worker add",
    "worker add 3",
    "worker remove 2",
    "worker kill 1234",
    "worker kill",
    "worker kill x",
    "dirty add 1",
    "reload",
    "reopen",
    "shutdown",
    "shutdown quick",
    "help",
    "",
    "SHOW Workers",
    "worker 'add' \"2\"",
    "frobnicate",
    "worker kill -1",
    "worker add 99999999999999999999",
];

fn gc_frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn gc_valid(rng: &mut Rng) -> Vec<u8> {
    let id = match rng.below(5) {
        0 => Value::from(rng.next() % 1000),
        1 => Value::from("abc"),
        2 => Value::Null,
        3 => serde_json::json!(1.5),
        _ => serde_json::json!([1, {"x": -2}]),
    };
    let cmd = *rng.pick(COMMANDS);
    let msg = match rng.below(3) {
        0 => serde_json::json!({"id": id, "command": cmd}),
        1 => serde_json::json!({"id": id, "command": cmd, "args": ["7"]}),
        _ => serde_json::json!({"command": cmd, "args": []}),
    };
    gc_frame(msg.to_string().as_bytes())
}

fn canned_responses() -> Vec<Response> {
    vec![
        Response::ok(Reply::Scaled {
            from: 2,
            to: 5,
            min: None,
            max: None,
        }),
        Response::ok(Reply::Scaled {
            from: u64::MAX,
            to: 0,
            min: Some(1),
            max: Some(u64::MAX),
        }),
        Response::ok(Reply::Killed {
            pid: 1234,
            signal: "TERM".into(),
        }),
        Response::ok(Reply::Reloaded {
            generation: 3,
            took_secs: f64::NAN,
        }),
        Response::ok(Reply::Reopened),
        Response::ok(Reply::Stopped { pid: 1 }),
        Response::ok(Reply::Pong {
            pid: 1,
            name: "é\"\u{1}".into(),
        }),
        Response::err(ErrorKind::Refused, "no worker with pid 1234"),
        Response::err(ErrorKind::Failed, "reload failed: \"x\"\n\u{7f}💥"),
        Response {
            v: 1,
            ok: true,
            reply: None,
            error: None,
        },
    ]
}

/// A gunicornc answer: a 4-byte length and that much JSON, an object with `id`
/// and `status` "ok" or "error".
fn check_answer(out: &[u8]) -> Value {
    assert!(out.len() >= 4, "short answer {out:?}");
    let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
    assert_eq!(len, out.len() - 4, "length prefix");
    let v: Value = serde_json::from_slice(&out[4..]).unwrap_or_else(|e| {
        panic!(
            "answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&out[4..])
        )
    });
    assert!(v.get("id").is_some(), "{v}");
    match v.get("status").and_then(Value::as_str) {
        Some("ok") => assert!(v.get("data").is_some(), "{v}"),
        Some("error") => assert!(v.get("error").and_then(Value::as_str).is_some(), "{v}"),
        _ => panic!("bad status: {v}"),
    }
    v
}

/// One execution: take frames off `input` until Incomplete or Invalid, rendering
/// each request against every canned response.
fn check_gunicornc(input: &[u8], responses: &[Response]) {
    let mut buf = input.to_vec();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(
            steps <= input.len() / 4 + 2,
            "take_frame did not make progress"
        );
        let before = buf.len();
        match take_frame(&mut buf) {
            Frame::Incomplete => {
                assert_eq!(buf.len(), before, "Incomplete consumed input");
                if before >= 4 {
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    assert!(len <= MAX_BODY && before - 4 < len);
                }
                break;
            }
            Frame::Invalid(out) => {
                check_answer(&out);
                break;
            }
            Frame::Answer(out) => {
                assert!(buf.len() < before);
                check_answer(&out);
            }
            Frame::Request(shape, _req) => {
                assert!(buf.len() < before);
                for resp in responses {
                    check_answer(&render(&shape, resp));
                }
            }
        }
    }
}

fn run_gunicornc(iters: u64, seed: u64) {
    let responses = canned_responses();
    let seeds = corpus("gunicornc");
    let mut rng = Rng::new(seed);
    for _ in 0..iters {
        let input = match rng.below(6) {
            0 => rng.bytes(24),
            1 => {
                // A valid frame whose length prefix is altered.
                let mut f = gc_valid(&mut rng);
                let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
                let new = match rng.below(4) {
                    0 => len.wrapping_sub(1 + rng.below(4) as u32),
                    1 => len + 1 + rng.below(4) as u32,
                    2 => MAX_BODY as u32 + rng.below(3) as u32,
                    _ => rng.next() as u32,
                };
                f[..4].copy_from_slice(&new.to_be_bytes());
                f
            }
            2 => rng.pick(&seeds).clone(),
            _ => {
                let mut v = Vec::new();
                for _ in 0..=rng.below(3) {
                    v.extend(gc_valid(&mut rng));
                }
                // Mutate the bodies more than the prefixes: keep the first 4 bytes.
                let (head, body) = v.split_at(4);
                let mut out = head.to_vec();
                out.extend(mutate(&mut rng, body, GC_TOKENS));
                out
            }
        };
        check_gunicornc(&input, &responses);
    }
}

#[test]
fn gunicornc_corpus() {
    let responses = canned_responses();
    for input in corpus("gunicornc") {
        check_gunicornc(&input, &responses);
    }
}

#[test]
fn gunicornc_fuzz() {
    run_gunicornc(CI_ITERS, 11);
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn gunicornc_fuzz_long() {
    run_gunicornc(LONG_ITERS, 0xB1);
}

// ------------------------------------------------------------------ notify

const NOTIFY_TOKENS: &[&[u8]] = &[
    b"READY=1",
    b"WATCHDOG=1",
    b"WATCHDOG=trigger",
    b"STOPPING=1",
    b"STATUS=",
    b"EXTEND_TIMEOUT_USEC=",
    b"18446744073709551616",
    b"\n",
    b"=",
    b"\xe2\x82\xac",
    b"\xff",
    b"\x00",
    b"\r",
];

fn check_notify(datagram: &[u8]) {
    let msgs = parse(datagram);
    let lines = datagram.split(|&b| b == b'\n').count();
    assert!(msgs.len() <= lines);
    for m in msgs {
        if let Message::Status(s) = m {
            assert!(s.len() <= 256, "STATUS kept {} bytes", s.len());
            assert!(!s.chars().any(char::is_control), "{s:?}");
        }
    }
}

fn run_notify(iters: u64, seed: u64) {
    let seeds = corpus("notify");
    let mut rng = Rng::new(seed);
    for _ in 0..iters {
        let input = match rng.below(5) {
            0 => rng.bytes(64),
            1 => {
                // A long STATUS with multi-byte characters around the cut.
                let mut v = b"STATUS=".to_vec();
                for _ in 0..rng.below(400) {
                    v.extend_from_slice(rng.pick::<&[u8]>(&[
                        &b"a"[..],
                        "é".as_bytes(),
                        "€".as_bytes(),
                        "💥".as_bytes(),
                        b"\x01",
                    ]));
                }
                v
            }
            _ => {
                let s = rng.pick(&seeds).clone();
                mutate(&mut rng, &s, NOTIFY_TOKENS)
            }
        };
        check_notify(&input);
    }
}

#[test]
fn notify_corpus() {
    for input in corpus("notify") {
        check_notify(&input);
    }
    let msgs = parse(b"READY=1\nSTATUS=ok\nEXTEND_TIMEOUT_USEC=5\nWATCHDOG=1");
    assert_eq!(msgs.len(), 4);
}

#[test]
fn notify_fuzz() {
    run_notify(CI_ITERS, 21);
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn notify_fuzz_long() {
    run_notify(LONG_ITERS, 0xC1);
}

// -------------------------------------------------------------------- bind

/// Outcome of one bind execution, for the counts in the report.
#[derive(Default, Debug)]
struct BindStats {
    ok: u64,
    err: u64,
    /// Of `ok`: a host name, which `parse_bind` would then look up.
    host: u64,
}

fn check_bind(s: &str, stats: &mut BindStats) {
    match parse_bind_form(s) {
        Ok(BindForm::Spec(spec)) => {
            stats.ok += 1;
            let shown = spec.to_string();
            let again = parse_bind(&shown)
                .unwrap_or_else(|e| panic!("{s:?} -> {shown:?} does not parse back: {}", e.0));
            assert_eq!(again, spec, "{s:?} -> {shown:?}");
        }
        Ok(BindForm::Host(host, port)) => {
            stats.ok += 1;
            stats.host += 1;
            assert!(!host.is_empty(), "{s:?}: empty host");
            assert!(
                host.parse::<std::net::IpAddr>().is_err(),
                "{s:?}: IP literal {host:?} taken for a host name"
            );
            assert!(
                s.contains(&host) && (s.contains(&port.to_string()) || port == 8000),
                "{s:?} -> {host:?} {port}"
            );
        }
        Err(e) => {
            stats.err += 1;
            assert!(e.0.starts_with("--bind "), "{}", e.0);
            assert!(e.0.contains(s), "the error names the input: {}", e.0);
        }
    }
}

const BIND_TOKENS: &[&[u8]] = &[
    b"unix:",
    b"unix://",
    b"fd://",
    b"tcp://",
    b"[",
    b"]",
    b":",
    b"::",
    b"%",
    b"/",
    b"0",
    b"65535",
    b"65536",
    b"-",
    b"+",
    b"127.0.0.1",
    b"::ffff:1.2.3.4",
    b"\xc3\xa9",
];

fn run_bind(iters: u64, seed: u64) -> BindStats {
    let seeds = corpus("bind");
    let mut rng = Rng::new(seed);
    let mut stats = BindStats::default();
    while stats.ok + stats.err < iters {
        let raw = match rng.below(5) {
            0 => rng.bytes(16),
            1 => {
                let mut v = *rng.pick(BIND_TOKENS);
                let mut out = v.to_vec();
                for _ in 0..rng.below(5) {
                    v = *rng.pick(BIND_TOKENS);
                    out.extend_from_slice(v);
                }
                out
            }
            _ => {
                let s = rng.pick(&seeds).clone();
                mutate(&mut rng, &s, BIND_TOKENS)
            }
        };
        check_bind(&String::from_utf8_lossy(&raw), &mut stats);
    }
    stats
}

#[test]
fn bind_corpus() {
    let mut stats = BindStats::default();
    for input in corpus("bind") {
        check_bind(&String::from_utf8_lossy(&input), &mut stats);
    }
}

#[test]
fn bind_fuzz() {
    let stats = run_bind(CI_ITERS, 31);
    assert!(stats.ok > 100 && stats.err > 100, "{stats:?}");
}

#[test]
fn bind_round_trips() {
    let mut rng = Rng::new(32);
    for _ in 0..CI_ITERS {
        let spec = match rng.below(4) {
            0 => BindSpec::Fd((rng.next() >> 33) as i32),
            1 => BindSpec::Unix(PathBuf::from(format!("/tmp/s{}.sock", rng.next() % 1000))),
            2 => BindSpec::Tcp(std::net::SocketAddr::new(
                std::net::Ipv4Addr::from(rng.next() as u32).into(),
                rng.next() as u16,
            )),
            _ => BindSpec::Tcp(std::net::SocketAddr::new(
                std::net::Ipv6Addr::from(((rng.next() as u128) << 64) | rng.next() as u128).into(),
                rng.next() as u16,
            )),
        };
        assert_eq!(parse_bind(&spec.to_string()).unwrap(), spec);
    }
}

/// Found by reading the code while fuzzing: `Unix("//x")` (from `unix:////x`) was
/// shown as `unix://x`, which reads back as `Unix("x")`, another path.
#[test]
fn bind_unix_double_slash() {
    let spec = parse_bind("unix:////x").unwrap();
    assert_eq!(spec, BindSpec::Unix(PathBuf::from("//x")));
    assert_eq!(parse_bind(&spec.to_string()).unwrap(), spec);
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn bind_fuzz_long() {
    let stats = run_bind(LONG_ITERS, 0xD1);
    eprintln!("bind_fuzz_long: {stats:?}");
}

// ------------------------------------------------------------------ config

const TOML_TOKENS: &[&[u8]] = &[
    b"workers = ",
    b"timeout = ",
    b"graceful-timeout = ",
    b"graceful_timeout = ",
    b"boot-timeout = ",
    b"max-worker-age = ",
    b"max-worker-rss = ",
    b"backlog = ",
    b"umask = ",
    b"ready = ",
    b"log-level = ",
    b"name = ",
    b"reuse-port = ",
    b"daemon = ",
    b"command = ",
    b"bind = ",
    b"pid = ",
    b"control = ",
    b"\n",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b"=",
    b"#",
    b"1e308",
    b"-1",
    b"nan",
    b"inf",
    b"-0.0",
    b"18446744073709551616",
    b"0o777",
    b"0x",
    b"true",
    b"\\u",
    b"\xe2\x82\xac",
    b"\xff",
    b"[table]",
    b"[[x]]",
    b"\r\n",
    b".",
];

struct ConfigHarness {
    dir: PathBuf,
    path: PathBuf,
    loader: Loader,
}

impl ConfigHarness {
    fn new(tag: &str) -> ConfigHarness {
        let dir = std::env::temp_dir().join(format!("arbiter-fuzz-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        // The bind on the command line wins over the file's, so a mutated `bind`
        // never reaches DNS. Everything else comes from the file.
        let loader = Loader::from_argv([
            "arbiterd",
            "-c",
            path.to_str().unwrap(),
            "-b",
            "127.0.0.1:9",
        ])
        .unwrap();
        ConfigHarness { dir, path, loader }
    }

    /// One execution: returns whether the file was accepted.
    fn check(&self, text: &[u8]) -> bool {
        std::fs::write(&self.path, text).unwrap();
        match self.loader.load() {
            Ok(cfg) => {
                assert!(cfg.workers >= 1);
                true
            }
            Err(e) => {
                assert!(!e.0.is_empty());
                if std::str::from_utf8(text).is_err() {
                    assert!(e.0.starts_with("config file "), "{}", e.0);
                }
                false
            }
        }
    }
}

impl Drop for ConfigHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_config(iters: u64, seed: u64, tag: &str) -> (u64, u64) {
    let h = ConfigHarness::new(tag);
    let seeds = corpus("config");
    let mut rng = Rng::new(seed);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..iters {
        let input = match rng.below(6) {
            0 => rng.bytes(32),
            1 => {
                let mut v = Vec::new();
                for _ in 0..=rng.below(6) {
                    v.extend_from_slice(rng.pick::<&[u8]>(TOML_TOKENS));
                    v.extend_from_slice(rng.pick::<&[u8]>(TOML_TOKENS));
                }
                v
            }
            _ => {
                let s = rng.pick(&seeds).clone();
                mutate(&mut rng, &s, TOML_TOKENS)
            }
        };
        if h.check(&input) {
            ok += 1;
        } else {
            err += 1;
        }
    }
    (ok, err)
}

#[test]
fn config_corpus() {
    let h = ConfigHarness::new("corpus");
    let accepted: Vec<bool> = corpus("config").iter().map(|t| h.check(t)).collect();
    assert!(accepted.iter().any(|&a| a) && accepted.iter().any(|&a| !a));
}

#[test]
fn config_fuzz() {
    let (ok, err) = run_config(CI_ITERS / 3, 41, "ci");
    assert!(ok > 0 && err > 0, "ok {ok} err {err}");
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn config_fuzz_long() {
    let (ok, err) = run_config(LONG_ITERS, 0xE1, "long");
    eprintln!("config_fuzz_long: accepted {ok}, refused {err}");
}
