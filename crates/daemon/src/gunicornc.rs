//! gunicorn's control-socket protocol (`gunicornc`), spoken on the same socket as
//! our JSON lines: a 4-byte big-endian length, then a JSON message. Each command is
//! translated into one of our [`Request`]s, so it goes through the same master
//! methods, and the answer is shaped the way gunicornc expects.
//!
//! Not translated yet: every frame gets a framed error saying so.

use arbiter_proto::control::{Request, Response};

/// What a gunicornc command asked for, kept until its answer is rendered.
#[derive(Clone, Debug)]
pub struct Shape {
    _command: String,
}

/// The result of looking at a client's input buffer.
pub enum Frame {
    /// Not a whole frame yet.
    Incomplete,
    /// A command for the master; answer with [`render`].
    Request(Shape, Request),
    /// A command answered without the master (help, an unknown command).
    Answer(Vec<u8>),
    /// Garbage or an oversize frame: send these bytes and close.
    Invalid(Vec<u8>),
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Take one frame off the front of `input`.
pub fn take_frame(input: &mut Vec<u8>) -> Frame {
    if input.len() < 4 {
        return Frame::Incomplete;
    }
    input.clear();
    Frame::Invalid(framed(
        br#"{"status":"error","error":"gunicornc commands are not supported by this arbiterd yet"}"#,
    ))
}

/// The gunicornc-shaped answer to a translated command.
pub fn render(_shape: &Shape, _resp: &Response) -> Vec<u8> {
    framed(br#"{"status":"error","error":"not supported yet"}"#)
}
