//! One control connection: its buffers, its framing and its deadline.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use arbiter_proto::control::{ErrorKind, Response};

use super::{ClientId, Peer};

pub(super) struct Client {
    pub(super) id: ClientId,
    pub(super) stream: UnixStream,
    pub(super) peer: Peer,
    pub(super) input: Vec<u8>,
    pub(super) output: Vec<u8>,
    pub(super) deadline: Instant,
    /// A request is being carried out (reload, stop): read nothing more until it is
    /// answered, so replies stay in order.
    pub(super) waiting: bool,
    /// Close once the output is flushed.
    pub(super) closing: bool,
    /// The peer finished sending (EOF): answer what it asked, then close.
    pub(super) eof: bool,
    /// The gunicornc framing was detected on this connection.
    pub(super) gunicorn: bool,
    /// The framing is decided by the connection's first byte, once: a later NUL
    /// (after a JSON line, say) must not switch it.
    pub(super) framing_known: bool,
    /// For a gunicornc request in flight: how to shape its answer.
    pub(super) shape: Option<crate::gunicornc::Shape>,
    /// Not to be served (another user): answered with this error once its first
    /// bytes show which framing it speaks, then closed. Answering before it writes
    /// would make its write fail, and many clients then never read the answer.
    pub(super) refused: Option<(ErrorKind, &'static str)>,
}

impl Client {
    pub(super) fn send(&mut self, resp: &Response) {
        // Straight into the output buffer, which keeps its capacity: a status at
        // thousands of workers is a megabyte or more, and a line of its own
        // would be grown and then copied over each time.
        let start = self.output.len();
        if serde_json::to_writer(&mut self.output, resp).is_ok() {
            self.output.push(b'\n');
        } else {
            self.output.truncate(start);
            self.output.extend_from_slice(b"{\"v\":1,\"ok\":false}\n");
        }
    }

    pub(super) fn flush(&mut self) {
        // What was written goes from the buffer once, at the end: removed after
        // each partial write, the rest of a megabyte-sized reply was moved up
        // every time.
        let mut sent = 0;
        while sent < self.output.len() {
            match self.stream.write(&self.output[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The peer is gone: nothing more to say to it.
                    self.output.clear();
                    self.closing = true;
                    return;
                }
            }
        }
        self.output.drain(..sent);
    }
}

pub(super) fn has_complete_request(c: &Client) -> bool {
    if c.gunicorn {
        // A whole frame, or a length prefix the parser refuses outright: either
        // way there is an answer to give. A partial frame at EOF never completes.
        match c.input.get(..4) {
            Some(&[a, b, x, y]) => {
                let len = u32::from_be_bytes([a, b, x, y]) as usize;
                len > crate::gunicornc::MAX_BODY || c.input.len() - 4 >= len
            }
            _ => false,
        }
    } else {
        c.input.contains(&b'\n')
    }
}
