//! How many connections wait in a listening socket's accept queue, and its limit:
//! the queue in front of every worker, which only the master that owns the socket
//! can see. Read when asked (a status, a scrape, the autoscaler), never polled.
//!
//! TCP: `TCP_INFO` on the listening socket, where the kernel reports the current
//! accept backlog in `tcpi_unacked` and its limit in `tcpi_sacked`. Unix: sock_diag
//! (`UNIX_DIAG_RQLEN`: pending connections and the limit), asked by inode.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An accept queue, now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Connections the kernel accepted that no worker has taken yet.
    pub len: u32,
    /// The most it holds (`--backlog`, capped by `net.core.somaxconn`); past it,
    /// new connections are dropped or refused.
    pub limit: u32,
}

/// The accept queue of the listening socket `fd`, if its family has one we can read.
pub fn of(fd: BorrowedFd<'_>) -> io::Result<Queue> {
    match domain(fd)? {
        libc::AF_INET | libc::AF_INET6 => tcp(fd),
        libc::AF_UNIX => unix(fd),
        d => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no accept queue to read for address family {d}"),
        )),
    }
}

/// Connections waiting in all these queues together; one that cannot be read
/// counts as empty.
pub fn queued<'a>(fds: impl IntoIterator<Item = BorrowedFd<'a>>) -> u64 {
    fds.into_iter()
        .filter_map(|fd| of(fd).ok())
        .map(|q| u64::from(q.len))
        .sum()
}

/// Let the queue of listening socket `fd` take no more connections than it holds
/// (`listen` again with a backlog of 0: the kernel then drops a SYN while one
/// connection waits, and the client sends it again a second later). The socket
/// keeps what is queued, for its workers to take.
pub fn refuse_more(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain listen(2) on a socket that is listening already: it only
    // changes the backlog.
    if unsafe { libc::listen(fd.as_raw_fd(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn domain(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut d: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN writes one c_int into `d`, whose size `len` gives.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut d).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(d)
}

/// The kernel's `TCP_INFO` for a TCP socket (a listener or a connection).
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

fn tcp(fd: BorrowedFd<'_>) -> io::Result<Queue> {
    let info = tcp_info(fd)?;
    if u32::from(info.tcpi_state) != TCP_LISTEN_STATE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    Ok(Queue {
        len: info.tcpi_unacked,
        limit: info.tcpi_sacked,
    })
}

/// `TcpExt: ListenOverflows` from /proc/net/netstat: connections dropped for a full
/// accept queue by any listener of this host (there is no per-socket counter).
pub fn host_listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_listen_overflows(&text)
}

/// The file has a header line of names and a line of values per group.
fn parse_listen_overflows(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

// linux/sock_diag.h and linux/unix_diag.h: not in the libc crate.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
/// TCP_LISTEN in the kernel's socket states (unix sockets use them too).
const TCP_LISTEN_STATE: u32 = 10;

#[repr(C)]
struct UnixDiagReq {
    sdiag_family: u8,
    sdiag_protocol: u8,
    pad: u16,
    udiag_states: u32,
    udiag_ino: u32,
    udiag_show: u32,
    udiag_cookie: [u32; 2],
}

#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    body: UnixDiagReq,
}

/// struct unix_diag_msg: family, type, state, pad, inode, cookie.
const UNIX_DIAG_MSG_LEN: usize = 16;
const NLMSG_HDR_LEN: usize = size_of::<libc::nlmsghdr>();

fn unix(fd: BorrowedFd<'_>) -> io::Result<Queue> {
    let ino = nix::sys::stat::fstat(fd).map_err(io::Error::from)?.st_ino as u32;
    // SAFETY: plain socket(2); the fd is owned at once.
    let nl = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if nl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `nl` is a fresh fd nobody else owns.
    let nl = unsafe { OwnedFd::from_raw_fd(nl) };
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body: UnixDiagReq {
            sdiag_family: libc::AF_UNIX as u8,
            sdiag_protocol: 0,
            pad: 0,
            udiag_states: 1 << TCP_LISTEN_STATE,
            udiag_ino: ino,
            udiag_show: UDIAG_SHOW_RQLEN,
            // INET_DIAG_NOCOOKIE: look the socket up by inode only.
            udiag_cookie: [!0, !0],
        },
    };
    // SAFETY: sends the bytes of `req`, a repr(C) struct, to the kernel.
    let sent = unsafe {
        libc::send(
            nl.as_raw_fd(),
            (&raw const req).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel answers within the send: nothing to wait for.
    let mut buf = [0u8; 1024];
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let got = unsafe {
        libc::recv(
            nl.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_unix_reply(&buf[..got as usize]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "sock_diag did not report the socket's queue",
        )
    })
}

/// The `UNIX_DIAG_RQLEN` attribute of the first message of a sock_diag reply.
fn parse_unix_reply(reply: &[u8]) -> Option<Queue> {
    let u16_at = |b: &[u8], i: usize| Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], i: usize| Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let msg_len = u32_at(reply, 0)? as usize;
    let msg_type = u16_at(reply, 4)?;
    if msg_type != SOCK_DIAG_BY_FAMILY || msg_len > reply.len() {
        return None;
    }
    let msg = &reply[..msg_len];
    let mut at = NLMSG_HDR_LEN + UNIX_DIAG_MSG_LEN;
    while at + 4 <= msg.len() {
        let len = u16_at(msg, at)? as usize;
        let kind = u16_at(msg, at + 2)?;
        if len < 4 {
            return None;
        }
        if kind == UNIX_DIAG_RQLEN {
            return Some(Queue {
                len: u32_at(msg, at + 4)?,
                limit: u32_at(msg, at + 8)?,
            });
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn listen(fd: &OwnedFd, backlog: i32) {
        // SAFETY: plain listen(2) on a socket we own.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, 0);
    }

    #[test]
    fn tcp_queue_counts_connections_nobody_accepted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd: OwnedFd = l.try_clone().unwrap().into();
        listen(&fd, 7);
        let addr = l.local_addr().unwrap();
        assert_eq!(of(l.as_fd()).unwrap(), Queue { len: 0, limit: 7 });
        let _c: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // The handshake completes in the kernel before connect returns.
        assert_eq!(of(l.as_fd()).unwrap(), Queue { len: 3, limit: 7 });
        drop(l.accept().unwrap());
        assert_eq!(of(l.as_fd()).unwrap().len, 2);
    }

    #[test]
    fn a_queue_told_to_refuse_more_keeps_what_it_holds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        refuse_more(l.as_fd()).unwrap();
        assert_eq!(of(l.as_fd()).unwrap(), Queue { len: 3, limit: 0 });
        for _ in 0..3 {
            drop(l.accept().unwrap());
        }
        assert_eq!(of(l.as_fd()).unwrap().len, 0);
    }

    #[test]
    fn unix_queue_counts_connections_nobody_accepted() {
        let dir = std::env::temp_dir().join(format!("queue-test-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd: OwnedFd = l.try_clone().unwrap().into();
        listen(&fd, 9);
        assert_eq!(of(l.as_fd()).unwrap(), Queue { len: 0, limit: 9 });
        let _c: Vec<_> = (0..4)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        assert_eq!(of(l.as_fd()).unwrap(), Queue { len: 4, limit: 9 });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listen_overflows_from_netstat() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 17\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_overflows(text), Some(17));
        assert_eq!(parse_listen_overflows("IpExt: A\nIpExt: 1\n"), None);
    }

    #[test]
    fn a_reply_without_the_attribute_is_none() {
        assert_eq!(parse_unix_reply(&[]), None);
        assert_eq!(parse_unix_reply(&[0u8; 40]), None);
    }
}
