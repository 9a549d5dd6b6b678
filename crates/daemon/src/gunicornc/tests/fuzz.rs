//! Random bytes and random commands: never a panic, a loop or a bad frame.

use super::*;

/// A tiny deterministic PRNG for the fuzz-ish tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Drain a buffer the way the control server does; must never panic or loop.
fn drain(mut buf: Vec<u8>) {
    for _ in 0..buf.len() + 2 {
        let before = buf.len();
        match take_frame(&mut buf) {
            Frame::Incomplete => return,
            Frame::Invalid(a) => {
                decode(&a);
                return;
            }
            Frame::Answer(a) => {
                decode(&a);
            }
            Frame::Request(shape, _) => {
                for resp in responses() {
                    decode(&render(&shape, &resp));
                }
            }
        }
        assert!(buf.len() < before, "no progress");
    }
    panic!("take_frame loops");
}

fn responses() -> Vec<Response> {
    let mut odd = status();
    odd.master.uptime_secs = f64::INFINITY;
    odd.master.timeout_secs = Some(f64::NAN);
    odd.master.name = "\u{0}\u{ffff}💥".into();
    odd.master.listeners[0].address = "weird".into();
    odd.workers
        .push(worker(u64::MAX, i32::MIN, "", Some(f64::NAN)));
    vec![
        Response::ok(Reply::Status(Box::new(status()))),
        Response::ok(Reply::Status(Box::new(odd))),
        Response::ok(Reply::Scaled {
            from: 5,
            to: 2,
            min: None,
            max: None,
        }),
        Response::ok(Reply::Killed {
            pid: -1,
            signal: String::new(),
        }),
        Response::ok(Reply::Reloaded {
            generation: 0,
            took_secs: -1.0,
        }),
        Response::ok(Reply::Stopped { pid: 0 }),
        Response::ok(Reply::Pong {
            pid: 1,
            name: "x".into(),
        }),
        Response::err(ErrorKind::TooLarge, "\u{7f}\"x"),
        Response {
            v: 9,
            ok: true,
            reply: None,
            error: None,
        },
    ]
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let n = rng.below(64);
        let mut buf: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 && buf.len() >= 4 {
            // A plausible header over random bytes.
            let len = rng.below(buf.len()) as u32;
            buf[..4].copy_from_slice(&len.to_be_bytes());
        }
        drain(buf);
    }
}

#[test]
fn fuzz_commands() {
    const WORDS: [&str; 24] = [
        "show",
        "workers",
        "all",
        "stats",
        "config",
        "listeners",
        "dirty",
        "worker",
        "add",
        "remove",
        "kill",
        "reload",
        "reopen",
        "shutdown",
        "quick",
        "graceful",
        "help",
        "-1",
        "0",
        "99999999999999999999",
        "'",
        "\"",
        "\\",
        "é",
    ];
    let mut rng = Rng(42);
    for _ in 0..3000 {
        let words: Vec<&str> = (0..rng.below(5))
            .map(|_| WORDS[rng.below(WORDS.len())])
            .collect();
        let command = words.join(if rng.below(3) == 0 { "\t" } else { " " });
        let args = match rng.below(6) {
            0 => serde_json::json!(["1"]),
            1 => serde_json::json!([1, null, true, 2.5, {"k": []}]),
            2 => serde_json::json!("12"),
            3 => serde_json::json!(3),
            4 => serde_json::json!(null),
            _ => serde_json::json!([]),
        };
        let id = match rng.below(3) {
            0 => serde_json::json!(rng.next()),
            1 => serde_json::json!("req"),
            _ => serde_json::json!({"nested": [1, 2]}),
        };
        let msg = serde_json::json!({"id": id, "command": command, "args": args});
        let whole = frame(msg.to_string().as_bytes());
        // Whole, doubled, and truncated anywhere.
        drain(whole.clone());
        drain([whole.clone(), whole.clone()].concat());
        drain(whole[..rng.below(whole.len())].to_vec());
    }
}
