#![no_main]
//! read_line over arbitrary bytes through a small BufReader (capacity from the
//! first byte): the lines are exactly the newline-terminated pieces, then Closed.
use std::io::{BufReader, Cursor};

use arbiter_proto::frame::{FrameError, read_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cap, data)) = data.split_first() else {
        return;
    };
    let mut r = BufReader::with_capacity(1 + (cap as usize % 16), Cursor::new(data));
    let mut expect = data.split(|&b| b == b'\n');
    let mut complete = data.iter().filter(|&&b| b == b'\n').count();
    loop {
        match read_line(&mut r) {
            Ok(line) => {
                assert!(complete > 0);
                complete -= 1;
                assert_eq!(line, expect.next().unwrap());
            }
            Err(FrameError::Closed) => {
                assert_eq!(complete, 0);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
});
