//! Where things live by default, computed the same way by arbiterd and arbiterctl.

use std::path::PathBuf;

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
