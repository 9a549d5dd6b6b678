//! Where things live by default, computed the same way by arbiterd and arbiterctl.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The control socket of the instance `name`, for this process:
/// `$XDG_RUNTIME_DIR/arbiter/NAME.sock`, else `/run/arbiter/NAME.sock` for root,
/// else `/tmp/arbiter-UID/NAME.sock`.
pub fn default_control_path(name: &str) -> PathBuf {
    default_control_path_for(
        OsStr::new(name),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        nix::unistd::getuid().as_raw(),
    )
}

/// [`default_control_path`] of a process with this `XDG_RUNTIME_DIR` (`None` if
/// unset) and real uid: arbiterctl computes it for a master it found by pid.
pub fn default_control_path_for(name: &OsStr, runtime_dir: Option<&OsStr>, uid: u32) -> PathBuf {
    let mut file = name.to_os_string();
    file.push(".sock");
    // Empty counts as unset, as in the XDG base directory spec.
    if let Some(dir) = runtime_dir.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("arbiter").join(file);
    }
    if uid == 0 {
        PathBuf::from("/run/arbiter").join(file)
    } else {
        PathBuf::from(format!("/tmp/arbiter-{uid}")).join(file)
    }
}

/// Every place a master named `name` may have its control socket, as seen by a
/// process with this `XDG_RUNTIME_DIR` and uid, the default first: a root SSH
/// session usually has `XDG_RUNTIME_DIR=/run/user/0`, while the master systemd
/// started for it has none and sits at `/run/arbiter`.
pub fn control_path_candidates(
    name: &OsStr,
    runtime_dir: Option<&OsStr>,
    uid: u32,
) -> Vec<PathBuf> {
    let mut all = vec![default_control_path_for(name, runtime_dir, uid)];
    let without_runtime_dir = default_control_path_for(name, None, uid);
    if !all.contains(&without_runtime_dir) {
        all.push(without_runtime_dir);
    }
    all
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths() {
        let uid = nix::unistd::getuid().as_raw();
        let rt = std::env::var_os("XDG_RUNTIME_DIR");
        assert_eq!(
            default_control_path_for(OsStr::new("web"), rt.as_deref(), uid),
            default_control_path("web")
        );
        assert_eq!(
            default_control_path_for(OsStr::new("web"), Some(OsStr::new("/run/user/7")), 7),
            PathBuf::from("/run/user/7/arbiter/web.sock")
        );
        assert_eq!(
            default_control_path_for(OsStr::new("web"), Some(OsStr::new("")), 0),
            PathBuf::from("/run/arbiter/web.sock")
        );
        assert_eq!(
            default_control_path_for(OsStr::new("web"), None, 1000),
            PathBuf::from("/tmp/arbiter-1000/web.sock")
        );
    }

    #[test]
    fn candidates() {
        let web = OsStr::new("web");
        assert_eq!(
            control_path_candidates(web, Some(OsStr::new("/run/user/0")), 0),
            [
                PathBuf::from("/run/user/0/arbiter/web.sock"),
                PathBuf::from("/run/arbiter/web.sock")
            ]
        );
        assert_eq!(
            control_path_candidates(web, Some(OsStr::new("/run/user/7")), 7),
            [
                PathBuf::from("/run/user/7/arbiter/web.sock"),
                PathBuf::from("/tmp/arbiter-7/web.sock")
            ]
        );
        assert_eq!(
            control_path_candidates(web, None, 7),
            [PathBuf::from("/tmp/arbiter-7/web.sock")]
        );
    }
}
