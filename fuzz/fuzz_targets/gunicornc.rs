#![no_main]
//! take_frame in a loop until Incomplete/Invalid; every request rendered against
//! canned responses; every answer a well-formed length-prefixed JSON object.
use arbiter_daemon::gunicornc::{Frame, render, take_frame};
use arbiter_proto::control::{ErrorKind, Reply, Response};
use libfuzzer_sys::fuzz_target;

fn check(out: &[u8]) {
    assert!(out.len() >= 4);
    let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
    assert_eq!(len, out.len() - 4);
    let v: serde_json::Value = serde_json::from_slice(&out[4..]).expect("answer is JSON");
    assert!(v.get("id").is_some());
    assert!(matches!(
        v.get("status").and_then(|s| s.as_str()),
        Some("ok") | Some("error")
    ));
}

fuzz_target!(|data: &[u8]| {
    let responses = [
        Response::ok(Reply::Scaled { from: 2, to: 5, min: None, max: None }),
        Response::ok(Reply::Killed {
            pid: 1234,
            signal: "TERM".into(),
        }),
        Response::ok(Reply::Reloaded {
            generation: 3,
            took_secs: 0.5,
        }),
        Response::ok(Reply::Reopened),
        Response::ok(Reply::Stopped { pid: 1 }),
        Response::err(ErrorKind::Refused, "no worker with pid 1234"),
        Response::err(ErrorKind::Failed, "reload failed: \"x\"\n\u{7f}"),
    ];
    let mut buf = data.to_vec();
    loop {
        let before = buf.len();
        match take_frame(&mut buf) {
            Frame::Incomplete => {
                assert_eq!(buf.len(), before);
                break;
            }
            Frame::Invalid(out) => {
                check(&out);
                break;
            }
            Frame::Answer(out) => {
                assert!(buf.len() < before);
                check(&out);
            }
            Frame::Request(shape, _) => {
                assert!(buf.len() < before);
                for r in &responses {
                    check(&render(&shape, r));
                }
            }
        }
    }
});
