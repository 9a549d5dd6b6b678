//! An arbiterd worker in Rust, std plus two small crates.
//!
//! * `listenfd` takes the listener: arbiterd passes it as fd 3 with `LISTEN_FDS`
//!   and `LISTEN_PID`, exactly as systemd socket activation does, so this binary
//!   also runs unchanged under `systemd-socket-activate` or a `.socket` unit.
//! * `arbiter_proto::worker` sends `READY=1` to `NOTIFY_SOCKET` (run arbiterd with
//!   `--ready notify`) and beats the heartbeat (`ARBITER_HEARTBEAT_FD`).
//!
//! `GET /` answers `{"app":"rust-listenfd","pid":..,"worker_id":..,"generation":..}`,
//! `GET /sleep?ms=N` the same after N ms. TERM: stop accepting, finish what is in
//! flight (at most 30 s), exit 0. QUIT and INT: exit at once.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arbiter_proto::worker::{self as contract, Heartbeat};

/// sysexits' EX_CONFIG: arbiterd does not restart a worker that exits with it.
const EX_CONFIG: u8 = 78;

static TERMINATING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERMINATING.store(true, Ordering::SeqCst);
}

extern "C" fn on_quit(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid;
    // no SA_RESTART, so a blocking poll returns EINTR at once.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn identity() -> String {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "0".into());
    format!(
        r#"{{"app":"rust-listenfd","pid":{},"worker_id":{},"slot":{},"generation":{}}}"#,
        std::process::id(),
        var(contract::ENV_WORKER_ID),
        var(contract::ENV_SLOT),
        var(contract::ENV_GENERATION),
    )
}

fn serve(stream: TcpStream, body: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    if let Some(query) = target.strip_prefix("/sleep") {
        let ms = query
            .trim_start_matches('?')
            .split('&')
            .find_map(|kv| kv.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Wait until `fd` is readable or `timeout` passes (or a signal arrives).
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0 && p.revents & libc::POLLIN != 0
}

fn main() -> ExitCode {
    let mut fds = listenfd::ListenFd::from_env();
    let listener: TcpListener = match fds.take_tcp_listener(0) {
        Ok(Some(l)) => l,
        Ok(None) | Err(_) => {
            eprintln!(
                "listenfd-worker: no TCP listener at fd 3 (LISTEN_FDS); run it under arbiterd"
            );
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Non-blocking once and for all (as asyncio and gunicorn do): every worker
    // shares this socket's flags, so toggling them per accept would race.
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("listenfd-worker: fd 3: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    install(libc::SIGTERM, on_term);
    install(libc::SIGQUIT, on_quit);
    install(libc::SIGINT, on_quit);

    let body: Arc<str> = identity().into();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut heartbeat = Heartbeat::from_env();
    // Beat well inside ARBITER_TIMEOUT; arbiterd checks the file's ctime.
    let beat_every = std::env::var(contract::ENV_TIMEOUT)
        .ok()
        .and_then(|t| t.parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .map(|t| Duration::from_secs_f64(t / 4.0))
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut last_beat = Instant::now() - beat_every;

    contract::notify("READY=1");
    while !TERMINATING.load(Ordering::SeqCst) {
        if last_beat.elapsed() >= beat_every {
            if let Some(h) = heartbeat.as_mut() {
                h.beat();
            }
            last_beat = Instant::now();
        }
        if !readable(listener.as_raw_fd(), beat_every) {
            continue;
        }
        // Several workers poll one socket: another may have taken the connection
        // (WouldBlock), and a signal may interrupt us: both mean "loop again".
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        stream.set_nonblocking(false).ok();
        let body = body.clone();
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = serve(stream, &body);
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // TERM: the listener closes (other workers keep serving it), what is in
    // flight finishes.
    contract::notify("STOPPING=1");
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    ExitCode::SUCCESS
}
