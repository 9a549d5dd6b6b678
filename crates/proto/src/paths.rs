//! Where things live by default, computed the same way by arbiterd and arbiterctl.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The control socket of the instance `name`:
/// `$XDG_RUNTIME_DIR/arbiter/NAME.sock`, else `/run/arbiter/NAME.sock` for root,
/// else `/tmp/arbiter-UID/NAME.sock`.
pub fn default_control_path(name: &str) -> PathBuf {
    let file = format!("{name}.sock");
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("arbiter").join(file);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/arbiter").join(file)
    } else {
        PathBuf::from(format!("/tmp/arbiter-{uid}")).join(file)
    }
}

/// Read a small regular file (a pidfile, a config file) without ever waiting: a
/// FIFO at the path would block a plain open until someone writes to it, so the
/// open is non-blocking and anything but a regular file is an error.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(text)
}
