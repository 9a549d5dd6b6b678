#![no_main]
//! notify::parse on arbitrary datagrams: no panic, STATUS bounded and clean.
use arbiter_daemon::notify::{Message, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let msgs = parse(data);
    assert!(msgs.len() <= data.split(|&b| b == b'\n').count());
    for m in msgs {
        if let Message::Status(s) = m {
            assert!(s.len() <= 256);
            assert!(!s.chars().any(char::is_control));
        }
    }
});
