//! Which bind a socket from systemd answers. A socket unit binds its address
//! before the master starts, so binding the same address again fails ("address
//! already in use, held by pid 1"): a bind that names the address an inherited
//! socket listens on is that socket, as gunicorn does with `LISTEN_FDS`. The
//! match is on what the socket is really bound to (`getsockname`), against the
//! bind as binding resolves it (the configuration resolves host names once, so
//! `localhost:8000` is whatever address binding it would take).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, SockaddrStorage};

use super::{BindError, Listener, Origin};
use crate::config::BindSpec;
use crate::info;

/// What a socket is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// Unnamed, abstract, or a family no bind makes: no bind names it.
    Other,
}

impl Local {
    pub fn of(fd: BorrowedFd<'_>) -> Local {
        let Ok(addr) = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
            return Local::Other;
        };
        if let Some(v4) = addr.as_sockaddr_in() {
            Local::Tcp(SocketAddr::V4((*v4).into()))
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            Local::Tcp(SocketAddr::V6((*v6).into()))
        } else if let Some(path) = addr.as_unix_addr().and_then(|u| u.path()) {
            Local::Unix(path.to_path_buf())
        } else {
            Local::Other
        }
    }
}

/// Whether binding `spec` would ask for the address a socket bound to `local`
/// already has.
pub fn answers(local: &Local, spec: &BindSpec) -> bool {
    match (local, spec) {
        // Port 0 asks for a port nobody holds yet, never one already bound.
        (Local::Tcp(have), BindSpec::Tcp(want)) => want.port() != 0 && same_tcp(*have, *want),
        (Local::Unix(have), BindSpec::Unix(want)) => same_socket_file(have, want),
        _ => false,
    }
}

fn same_tcp(have: SocketAddr, want: SocketAddr) -> bool {
    match (have, want) {
        (SocketAddr::V4(h), SocketAddr::V4(w)) => h == w,
        // The flow label is not part of what a socket is bound to; the scope is
        // (fe80::1 on two interfaces are two addresses).
        (SocketAddr::V6(h), SocketAddr::V6(w)) => {
            h.ip() == w.ip() && h.port() == w.port() && h.scope_id() == w.scope_id()
        }
        // 0.0.0.0:8000 and [::]:8000 are different sockets, even where the second
        // also takes IPv4: binding one beside the other is the operator's call.
        _ => false,
    }
}

/// The same path, or two paths to the same socket file (`/var/run/app.sock` and
/// `/run/app.sock` through the usual symlink).
fn same_socket_file(have: &Path, want: &Path) -> bool {
    if have == want {
        return true;
    }
    match (std::fs::metadata(have), std::fs::metadata(want)) {
        (Ok(h), Ok(w)) => h.file_type().is_socket() && h.dev() == w.dev() && h.ino() == w.ino(),
        _ => false,
    }
}

impl Listener {
    /// Whether `spec` asks for this socket: its address, or for `fd://N` the
    /// number it was passed as (taking fd N a second time would own it twice).
    fn named_by(&self, spec: &BindSpec) -> bool {
        match spec {
            BindSpec::Fd(n) => self.passed_as == Some(*n),
            _ => answers(&Local::of(self.as_fd()), spec),
        }
    }
}

/// Give each of `binds` to the systemd socket in `socks` that it names (one
/// bind per socket: a bind written twice is bound twice, and fails as it would
/// without systemd). Returns the binds no socket answers, in order, for the
/// caller to bind.
pub fn claim(socks: &mut [Listener], binds: &[BindSpec]) -> Vec<BindSpec> {
    let mut left = Vec::new();
    for spec in binds {
        let free = socks
            .iter_mut()
            .find(|l| l.origin == Origin::Systemd && l.spec.is_none() && l.named_by(spec));
        match free {
            Some(l) => l.spec = Some(spec.clone()),
            None => left.push(spec.clone()),
        }
    }
    left
}

/// Say which bind each of systemd's sockets serves, once the listeners are all
/// there (a start that fails says only why). An unnamed one is worth a line only
/// where binds were given: the operator may have meant one of them.
pub fn log_systemd(socks: &[Listener], binds_given: bool) {
    for l in socks.iter().filter(|l| l.origin == Origin::Systemd) {
        match &l.spec {
            Some(spec) => info!(
                "Bind {spec}: systemd's socket {:?} listens there; serving it",
                l.name
            ),
            None if binds_given => info!(
                "Serving systemd's socket {:?} at {}, which no bind names",
                l.name, l.display
            ),
            None => {}
        }
    }
}

/// For a bind refused as "address already in use": the systemd socket that
/// listens on the same port at another address, which the operator most likely
/// meant (`ListenStream=8000` listens on `[::]:8000`, not on `127.0.0.1:8000`).
pub fn near_miss(socks: &[Listener], err: &BindError) -> Option<String> {
    if err.err.raw_os_error() != Some(libc::EADDRINUSE) {
        return None;
    }
    let want: SocketAddr = err.addr.parse().ok()?;
    let (l, have) = socks.iter().find_map(|l| match Local::of(l.as_fd()) {
        Local::Tcp(have) if l.origin == Origin::Systemd && have.port() == want.port() => {
            Some((l, have))
        }
        _ => None,
    })?;
    Some(format!(
        "systemd's socket {:?} listens on {have}, not {want}: bind {have} to serve it, \
         or make the socket unit listen on {want}",
        l.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn tcp(s: &str) -> BindSpec {
        BindSpec::Tcp(s.parse().unwrap())
    }

    fn local(s: &str) -> Local {
        Local::Tcp(s.parse().unwrap())
    }

    fn systemd(fd: OwnedFd, name: &str) -> Listener {
        Listener {
            display: super::super::display_of(fd.as_fd()),
            fd,
            name: name.into(),
            owned_path: None,
            spec: None,
            origin: Origin::Systemd,
            passed_as: Some(3),
        }
    }

    #[test]
    fn a_tcp_bind_answers_its_own_address_only() {
        assert!(answers(&local("127.0.0.1:8000"), &tcp("127.0.0.1:8000")));
        assert!(answers(&local("[::1]:8000"), &tcp("[::1]:8000")));
        assert!(!answers(&local("127.0.0.1:8000"), &tcp("127.0.0.1:8001")));
        assert!(!answers(&local("127.0.0.1:8000"), &tcp("127.0.0.2:8000")));
        assert!(!answers(&local("0.0.0.0:8000"), &tcp("127.0.0.1:8000")));
        assert!(!answers(&local("[::]:8000"), &tcp("0.0.0.0:8000")));
        assert!(!answers(&local("[::1]:8000"), &tcp("127.0.0.1:8000")));
        assert!(!answers(&local("[fe80::1%2]:80"), &tcp("[fe80::1%3]:80")));
        assert!(!answers(
            &Local::Unix("/run/x.sock".into()),
            &tcp("127.0.0.1:8000")
        ));
        assert!(!answers(&Local::Other, &tcp("127.0.0.1:8000")));
    }

    #[test]
    fn port_zero_never_answers() {
        assert!(!answers(&local("127.0.0.1:0"), &tcp("127.0.0.1:0")));
        assert!(!answers(&local("127.0.0.1:41234"), &tcp("127.0.0.1:0")));
    }

    #[test]
    fn a_host_name_answers_the_address_it_resolves_to() {
        let spec = crate::config::parse_bind("localhost:8000").unwrap();
        let BindSpec::Tcp(resolved) = spec else {
            panic!("localhost resolves to an address: {spec:?}")
        };
        assert!(answers(&Local::Tcp(resolved), &spec));
    }

    /// A directory of this test process's own, removed on drop (the crate has no
    /// tempfile dependency).
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_unix_bind_answers_the_same_file_by_any_path() {
        let dir = Dir(std::env::temp_dir().join(format!("adopt-test-{}", std::process::id())));
        let real = dir.0.join("real");
        std::fs::create_dir_all(&real).unwrap();
        let path = real.join("app.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let via = dir.0.join("via");
        std::os::unix::fs::symlink(&real, &via).unwrap();
        let have = Local::Unix(path.clone());
        assert!(answers(&have, &BindSpec::Unix(path.clone())));
        assert!(answers(&have, &BindSpec::Unix(via.join("app.sock"))));
        assert!(!answers(&have, &BindSpec::Unix(real.join("other.sock"))));
        // A regular file at the path is not the socket, whatever the inode says.
        let file = real.join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(!answers(
            &Local::Unix(file.clone()),
            &BindSpec::Unix(via.join("plain"))
        ));
    }

    #[test]
    fn claim_gives_each_bind_to_the_socket_on_its_address_once() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut socks = vec![
            systemd(OwnedFd::from(a), "a"),
            systemd(OwnedFd::from(b), "b"),
        ];
        assert_eq!(Local::of(socks[0].as_fd()), Local::Tcp(pa));
        let other = tcp("127.0.0.1:0");
        let left = claim(
            &mut socks,
            &[
                BindSpec::Tcp(pb),
                other.clone(),
                BindSpec::Tcp(pb),
                BindSpec::Unix("/nonexistent/x.sock".into()),
            ],
        );
        assert_eq!(socks[0].spec, None, "no bind names a");
        assert_eq!(socks[1].spec, Some(BindSpec::Tcp(pb)));
        // The second bind of the same address is left to bind (and fail) as
        // without systemd; nothing else is claimed.
        assert_eq!(
            left,
            vec![
                other,
                BindSpec::Tcp(pb),
                BindSpec::Unix("/nonexistent/x.sock".into())
            ]
        );
        assert!(claim(&mut socks, &[BindSpec::Tcp(pa)]).is_empty());
        assert_eq!(socks[0].spec, Some(BindSpec::Tcp(pa)));
    }

    #[test]
    fn fd_n_names_the_socket_passed_as_n() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut socks = vec![systemd(OwnedFd::from(a), "a")];
        assert_eq!(claim(&mut socks, &[BindSpec::Fd(4)]), vec![BindSpec::Fd(4)]);
        assert!(claim(&mut socks, &[BindSpec::Fd(3)]).is_empty());
        assert_eq!(socks[0].spec, Some(BindSpec::Fd(3)));
    }

    #[test]
    fn only_systemd_sockets_are_claimed() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pa = a.local_addr().unwrap();
        let mut socks = vec![systemd(OwnedFd::from(a), "a")];
        socks[0].origin = Origin::HandedOver;
        assert_eq!(claim(&mut socks, &[BindSpec::Tcp(pa)]).len(), 1);
    }

    #[test]
    fn a_busy_port_names_the_systemd_socket_on_it() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pa = a.local_addr().unwrap();
        let socks = vec![systemd(OwnedFd::from(a), "http")];
        let busy = |addr: String| BindError {
            addr,
            err: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        };
        let want = format!("127.0.0.2:{}", pa.port());
        let hint = near_miss(&socks, &busy(want.clone())).expect("a hint");
        assert_eq!(
            hint,
            format!(
                "systemd's socket \"http\" listens on {pa}, not {want}: bind {pa} to serve it, \
                 or make the socket unit listen on {want}"
            )
        );
        assert_eq!(near_miss(&socks, &busy("127.0.0.1:1".into())), None);
        assert_eq!(near_miss(&socks, &busy("unix:/run/x.sock".into())), None);
        let denied = BindError {
            addr: want,
            err: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(near_miss(&socks, &denied), None);
    }
}
