//! Deterministic robustness tests for the control protocol: a fixed-seed xorshift
//! PRNG feeds `control::parse_request` and `frame::read_line` random bytes and
//! structured mutations of valid requests. They assert that nothing panics, every
//! call returns, error answers are well-formed and valid requests round-trip.
//!
//! The CI variants run a few thousand inputs each (well under 2 s in debug). The
//! `#[ignore]`d `*_long` variants run 1,000,000 executions per target; see
//! bench/reliability-fuzz.md. The seed corpus is fuzz/corpus/<target>/ (shared with
//! the cargo-fuzz targets under fuzz/).

use std::io::{BufReader, Cursor};
use std::path::PathBuf;

use arbiter_proto::control::{
    ErrorKind, MAX_LINE, PROTOCOL_VERSION, Request, RequestEnvelope, Response, parse_request,
};
use arbiter_proto::frame::{FrameError, read_line};

const CI_ITERS: u64 = 20_000;
const LONG_ITERS: u64 = 1_000_000;

#[path = "support/fuzzgen.rs"]
mod fuzzgen;
use fuzzgen::{Rng, mutate};

/// Interesting tokens spliced in by the mutator.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"false",
    b"-1",
    b"0",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\"v\":1",
    b"\"v\":2",
    b"\"cmd\"",
    b"\"scale\"",
    b"\"kill\"",
    b"\"pid\"",
    b"\"by\"",
    b"\"to\"",
    b"\"fast\"",
    b"\"signal\"",
    b"\"upgrade\"",
    b"\"binary\"",
    b"\n",
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b" ",
];

fn random_string(rng: &mut Rng) -> String {
    const PARTS: &[&str] = &[
        "TERM",
        "KILL",
        "",
        "é",
        "\u{0}",
        "\"",
        "\\",
        "/usr/bin/x",
        "💥",
        "\n",
    ];
    (0..rng.below(4)).map(|_| *rng.pick(PARTS)).collect()
}

fn random_request(rng: &mut Rng) -> Request {
    let opt_i64 = |rng: &mut Rng| match rng.below(4) {
        0 => None,
        1 => Some(i64::MIN),
        2 => Some(i64::MAX),
        _ => Some(rng.next() as i64 % 100),
    };
    let opt_u64 = |rng: &mut Rng| match rng.below(3) {
        0 => None,
        1 => Some(u64::MAX),
        _ => Some(rng.next() % 100),
    };
    match rng.below(9) {
        0 => Request::Status,
        1 => Request::Scale {
            by: opt_i64(rng),
            to: opt_u64(rng),
            min: None,
            max: None,
        },
        2 => Request::Reload,
        3 => Request::Reopen,
        4 => Request::Stop {
            fast: rng.below(2) == 0,
        },
        5 => Request::Kill {
            pid: rng.next() as i32,
            signal: if rng.below(2) == 0 {
                None
            } else {
                Some(random_string(rng))
            },
        },
        6 => Request::Upgrade {
            binary: if rng.below(2) == 0 {
                None
            } else {
                Some(random_string(rng))
            },
            timeout_secs: opt_u64(rng),
        },
        7 => Request::Ping,
        _ => Request::Version,
    }
}

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

/// One execution of the parse_request target: never panics, errors well-formed.
fn check_request(line: &[u8]) {
    match parse_request(line) {
        Ok(req) => {
            // Whatever parses re-serializes and parses back to the same request.
            let again = serde_json::to_vec(&RequestEnvelope::new(req.clone())).unwrap();
            assert_eq!(
                parse_request(&again).unwrap(),
                req,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        Err(resp) => {
            assert_eq!(resp.v, PROTOCOL_VERSION);
            assert!(!resp.ok);
            assert!(resp.reply.is_none());
            let e = resp
                .error
                .as_ref()
                .expect("an error response carries an error");
            assert!(
                matches!(
                    e.kind,
                    ErrorKind::BadRequest | ErrorKind::UnsupportedVersion
                ),
                "{:?}",
                e.kind
            );
            assert!(!e.message.is_empty());
            // The error is itself a valid response line.
            let wire = serde_json::to_string(&resp).unwrap();
            assert!(!wire.contains('\n'));
            let back: Response = serde_json::from_str(&wire).unwrap();
            assert_eq!(back, resp);
        }
    }
}

/// One execution of the frame target: read_line over `data` through a BufReader
/// of capacity `cap`, to the end. Checks the lines against a plain split.
fn check_frame(data: &[u8], cap: usize) {
    let mut r = BufReader::with_capacity(cap.max(1), Cursor::new(data));
    let mut expect = data.split(|&b| b == b'\n');
    let mut complete = data.iter().filter(|&&b| b == b'\n').count();
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps <= data.len() + 2, "read_line did not make progress");
        match read_line(&mut r) {
            Ok(line) => {
                assert!(complete > 0, "a line without a newline");
                complete -= 1;
                assert!(line.len() < MAX_LINE);
                assert_eq!(line, expect.next().unwrap());
            }
            Err(FrameError::Closed) => {
                assert_eq!(complete, 0, "closed before all lines were read");
                break;
            }
            Err(FrameError::TooLarge) => {
                assert!(data.len() >= MAX_LINE);
                break;
            }
            Err(FrameError::Io(e)) => panic!("io error from a Cursor: {e}"),
        }
    }
}

fn valid_lines() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(7);
    let mut out: Vec<Vec<u8>> = (0..64)
        .map(|_| serde_json::to_vec(&RequestEnvelope::new(random_request(&mut rng))).unwrap())
        .collect();
    out.extend(corpus("control_request"));
    out
}

fn run_request(iters: u64, seed: u64) {
    let seeds = valid_lines();
    let mut rng = Rng::new(seed);
    for _ in 0..iters {
        let input = match rng.below(4) {
            0 => rng.bytes(64),
            _ => {
                let s = rng.pick(&seeds).clone();
                mutate(&mut rng, &s, TOKENS)
            }
        };
        check_request(&input);
    }
}

fn run_frame(iters: u64, seed: u64) {
    let seeds = valid_lines();
    let mut rng = Rng::new(seed);
    for _ in 0..iters {
        let mut data = Vec::new();
        for _ in 0..rng.below(5) {
            if rng.below(3) == 0 {
                data.extend(rng.bytes(32));
            } else {
                data.extend(rng.pick(&seeds));
            }
            if rng.below(4) != 0 {
                data.push(b'\n');
            }
        }
        let data = mutate(&mut rng, &data, TOKENS);
        check_frame(&data, 1 + rng.below(16));
    }
}

#[test]
fn request_corpus() {
    for input in corpus("control_request") {
        check_request(&input);
    }
}

#[test]
fn request_round_trip() {
    let mut rng = Rng::new(1);
    for _ in 0..CI_ITERS {
        let req = random_request(&mut rng);
        let line = serde_json::to_vec(&RequestEnvelope::new(req.clone())).unwrap();
        assert_eq!(parse_request(&line).unwrap(), req);
        // The NDJSON frame: never a raw newline inside one request line.
        assert!(!line.contains(&b'\n'));
        let mut framed = line.clone();
        framed.push(b'\n');
        assert_eq!(read_line(&mut Cursor::new(framed)).unwrap(), line);
    }
}

#[test]
fn request_fuzz() {
    run_request(CI_ITERS, 2);
}

#[test]
fn frame_corpus() {
    for input in corpus("frame") {
        for cap in [1, 2, 3, 7, 8192] {
            check_frame(&input, cap);
        }
    }
}

#[test]
fn frame_fuzz() {
    run_frame(CI_ITERS, 3);
}

#[test]
fn frame_too_large_small_buffer() {
    // An oversize line through a tiny buffer is refused, not accumulated forever.
    let data = vec![b'x'; MAX_LINE + 1];
    let mut r = BufReader::with_capacity(4096, Cursor::new(&data));
    assert!(matches!(read_line(&mut r), Err(FrameError::TooLarge)));
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn request_fuzz_long() {
    run_request(LONG_ITERS, 0xA5);
}

#[test]
#[ignore = "long: 1,000,000 executions; see bench/reliability-fuzz.md"]
fn frame_fuzz_long() {
    run_frame(LONG_ITERS, 0x5A);
}
