//! `arbiterctl top`: a live view of one master, refreshed every second, as
//! uwsgitop, `pm2 monit` and htop give: the listeners with their accept queues,
//! then one line per worker (state, busy, requests, CPU%, RSS, beat age).
//!
//! On a terminal it redraws in place (the alternate screen, as htop) and `q`
//! (or Ctrl-C) quits; the terminal is put back however it ends. Elsewhere (a pipe,
//! a file, ssh without a tty) it prints plain frames one after another; `--once`
//! prints one and exits, for scripts. Each frame is one `status` request, so the
//! master's CPU% is measured over the refresh interval.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use arbiter_proto::control::{Reply, Request};
use arbiter_proto::status::{Status, WorkerStatus};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use unicode_width::UnicodeWidthStr;

use crate::render::{beat_cell, cpu_cell, human_bytes, master_line};
use crate::{Cli, DEFAULT_TIMEOUT, Fail, Report, bound, connect_target, json_line};

/// One status snapshot from the master.
fn fetch(cli: &Cli) -> Result<Status, Fail> {
    let (_, mut client) = connect_target(cli)?;
    match crate::ask(&mut client, &Request::Status, bound(cli, DEFAULT_TIMEOUT))? {
        Reply::Status(st) => Ok(*st),
        other => Err(crate::unexpected("status", &other)),
    }
}

pub(crate) fn run(cli: &Cli, once: bool, interval: Duration) -> Report {
    let interactive = !once && !cli.json && io::stdout().is_terminal() && io::stdin().is_terminal();
    if interactive {
        return live(cli, interval);
    }
    let mut out = io::stdout().lock();
    loop {
        let st = match fetch(cli) {
            Ok(st) => st,
            Err(fail) => return fail_report(cli, &fail),
        };
        let text = if cli.json {
            json_line(&st)
        } else {
            frame(&st, usize::MAX, usize::MAX)
        };
        let written = out.write_all(text.as_bytes()).and_then(|()| {
            if !once && !cli.json {
                out.write_all(b"\n")?;
            }
            out.flush()
        });
        if let Err(e) = written {
            // A reader that went away (`| head`) ends the view; that is not a failure.
            return Report {
                code: if e.kind() == io::ErrorKind::BrokenPipe {
                    0
                } else {
                    1
                },
                ..Report::default()
            };
        }
        if once {
            return Report::default();
        }
        std::thread::sleep(interval);
    }
}

fn fail_report(cli: &Cli, fail: &Fail) -> Report {
    Report {
        stdout: if cli.json {
            json_line(&fail.json())
        } else {
            String::new()
        },
        stderr: vec![fail.message()],
        code: fail.code(),
    }
}

/// The terminal view: redraw every `interval` until `q`.
fn live(cli: &Cli, interval: Duration) -> Report {
    let Some(_raw) = RawMode::enter() else {
        // No way to read single keys: the plain view still works.
        return run(cli, false, interval);
    };
    let mut out = io::stdout();
    loop {
        let (cols, rows) = terminal_size();
        let text = match fetch(cli) {
            Ok(st) => frame(&st, cols, rows.saturating_sub(1)),
            Err(fail) => format!(
                "{}\n(trying again every {:.0?}; q quits)\n",
                fail.message(),
                interval
            ),
        };
        // Home, clear, draw: lines end in \r\n as the terminal is raw.
        let mut screen = String::from("\x1b[H\x1b[2J");
        for line in text.lines() {
            screen.push_str(line);
            screen.push_str("\r\n");
        }
        if out
            .write_all(screen.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Report::default();
        }
        if wait_for_quit(interval) {
            return Report::default();
        }
    }
}

/// Wait up to `d` for a key; true if it was `q`, `Q` or Ctrl-C (or stdin ended).
fn wait_for_quit(d: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + d;
    let stdin = io::stdin();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return false,
            Ok(_) => {
                let mut key = [0u8; 1];
                match stdin.lock().read(&mut key) {
                    Ok(0) | Err(_) => return true,
                    Ok(_) if matches!(key[0], b'q' | b'Q' | 0x03) => return true,
                    // Any other key redraws at once.
                    Ok(_) => return false,
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Keys one at a time, no echo, Ctrl-C as a key (so that quitting always goes
/// through the restore), on the alternate screen with the cursor hidden; all
/// undone on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        let mut out = io::stdout();
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l");
        let _ = out.flush();
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let mut out = io::stdout();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Columns and rows of the terminal on stdout; 80x24 if it does not say.
fn terminal_size() -> (usize, usize) {
    let mut ws = libc_winsize::default();
    // SAFETY: TIOCGWINSZ writes one struct winsize into `ws`.
    let rc = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &raw mut ws) };
    if rc == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
        (usize::from(ws.ws_col), usize::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

#[allow(non_camel_case_types)]
type libc_winsize = nix::libc::winsize;

/// Column headers of the worker lines.
const WORKER_COLUMNS: [&str; 9] = [
    "ID", "PID", "GEN", "STATE", "BUSY", "REQS", "CPU%", "RSS", "BEAT",
];

/// One screen: the master line, the listeners and their queues, the workers.
/// Lines are cut to `cols`; past `rows` lines the rest of the workers is counted.
pub fn frame(st: &Status, cols: usize, rows: usize) -> String {
    let m = &st.master;
    let mut lines: Vec<String> = Vec::new();
    let mut head = master_line(m);
    let reporting = m.workers_busy + m.workers_idle;
    if reporting > 0 {
        let _ = write!(head, ", busy {}/{reporting}", m.workers_busy);
    }
    if let Some(a) = &m.autoscale {
        let _ = write!(head, ", adapting within {}..{}", a.min, a.max);
    }
    lines.push(head);
    let addr_width = m
        .listeners
        .iter()
        .map(|l| l.address.width())
        .chain(["LISTENER".width()])
        .max()
        .unwrap_or(0);
    lines.push(format!(
        "{:<addr_width$}  {:>6}  {:>6}",
        "LISTENER", "QUEUE", "LIMIT"
    ));
    let num = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    for l in &m.listeners {
        lines.push(format!(
            "{:<addr_width$}  {:>6}  {:>6}",
            l.address,
            num(l.queue),
            num(l.queue_limit)
        ));
    }
    lines.push(String::new());
    let mut workers: Vec<&WorkerStatus> = st.workers.iter().collect();
    workers.sort_by_key(|w| (w.id, w.pid));
    let cells: Vec<[String; 9]> = workers
        .iter()
        .map(|w| {
            [
                w.id.to_string(),
                w.pid.to_string(),
                w.generation.to_string(),
                w.state.to_string(),
                match w.busy {
                    Some(true) => "busy".into(),
                    Some(false) => "idle".into(),
                    None => "-".into(),
                },
                num(w.requests),
                cpu_cell(w.cpu_percent),
                human_bytes(w.rss_bytes),
                beat_cell(w.last_beat_secs, m.timeout_secs),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..9)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].width())
                .chain([WORKER_COLUMNS[i].width()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let row = |c: &[String]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            let w = widths[i];
            // Text columns (STATE, BUSY) left, numbers right.
            if i == 3 || i == 4 {
                let _ = write!(s, "{cell:<w$}  ");
            } else {
                let _ = write!(s, "{cell:>w$}  ");
            }
        }
        s.trim_end().to_string()
    };
    let header: Vec<String> = WORKER_COLUMNS.iter().map(|c| c.to_string()).collect();
    lines.push(row(&header));
    let room = rows.saturating_sub(lines.len() + 1);
    let shown = if cells.len() > room && rows != usize::MAX {
        room
    } else {
        cells.len()
    };
    for c in &cells[..shown] {
        lines.push(row(c));
    }
    if shown < cells.len() {
        lines.push(format!("... {} more workers", cells.len() - shown));
    }
    let mut out = String::new();
    for line in lines {
        out.push_str(&cut(&line, cols));
        out.push('\n');
    }
    out
}

/// `line` cut to `cols` columns of the terminal.
fn cut(line: &str, cols: usize) -> String {
    if line.width() <= cols {
        return line.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for ch in line.chars() {
        let w = unicode_width::UnicodeWidthChar::width(ch).unwrap_or(0);
        if used + w > cols {
            break;
        }
        used += w;
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::fixture;

    #[test]
    fn a_frame_shows_queues_and_workers() {
        let text = frame(&fixture(), usize::MAX, usize::MAX);
        assert!(
            text.contains("http://127.0.0.1:8000       3    2048"),
            "{text}"
        );
        let header = text
            .lines()
            .find(|l| l.trim_start().starts_with("ID"))
            .unwrap();
        assert_eq!(
            header.split_whitespace().collect::<Vec<_>>(),
            WORKER_COLUMNS
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.trim_start().starts_with(char::is_numeric))
                .count(),
            4,
            "{text}"
        );
    }

    #[test]
    fn a_small_terminal_counts_what_does_not_fit() {
        let text = frame(&fixture(), 30, 8);
        assert!(text.lines().all(|l| l.width() <= 30), "{text}");
        assert!(text.contains("more workers"), "{text}");
        assert!(text.lines().count() <= 8, "{text}");
    }
}
