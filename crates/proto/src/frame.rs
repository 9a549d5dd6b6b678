//! Newline-delimited framing with a size bound, for the blocking client side.
//! (The master reads without blocking; it applies the same bound in its own buffers.)

use std::io::{self, BufRead};

use crate::control::MAX_LINE;

#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection before a complete line.
    Closed,
    /// A line longer than the bound.
    TooLarge,
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => f.write_str("connection closed before a complete message"),
            FrameError::TooLarge => write!(f, "message longer than {MAX_LINE} bytes"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Read one line (without its newline), refusing lines longer than [`MAX_LINE`].
pub fn read_line<R: BufRead>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    read_line_up_to(r, MAX_LINE)
}

/// [`read_line`] with another bound.
pub fn read_line_up_to<R: BufRead>(r: &mut R, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        };
        if buf.is_empty() {
            return Err(FrameError::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > limit {
            return Err(FrameError::TooLarge);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let mut r = io::Cursor::new(b"one\ntwo\nthr".to_vec());
        assert_eq!(read_line(&mut r).unwrap(), b"one");
        assert_eq!(read_line(&mut r).unwrap(), b"two");
        assert!(matches!(read_line(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn too_large() {
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        let mut r = io::BufReader::new(io::Cursor::new(big));
        assert!(matches!(read_line(&mut r), Err(FrameError::TooLarge)));
    }
}
