//! Control requests: each one goes through the same verbs as the signals, so
//! `kill -HUP` and `arbiterctl reload` cannot behave differently.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbiter_proto::control::{ErrorKind, Reply, Request, Response};

use super::shutdown::How;
use super::{Arbiter, DEFAULT_UPGRADE_TIMEOUT, MAX_WORKERS, parse_signal};
use crate::control::{ClientId, Peer};
use crate::info;
use crate::signals;

impl Arbiter {
    pub(super) fn handle_request(&mut self, id: ClientId, peer: Peer, req: Request) {
        if req.is_mutating() {
            info!(
                "Control: {} requested by uid {} pid {}",
                request_name(&req),
                peer.uid,
                peer.pid
            );
        }
        let resp = match req {
            Request::Status => {
                self.pool.check_heartbeats(Instant::now());
                Response::ok(Reply::Status(Box::new(self.snapshot())))
            }
            Request::Ping => Response::ok(Reply::Pong {
                pid: self.master_pid.as_raw(),
                name: self.cfg.name.clone(),
            }),
            Request::Version => Response::ok(Reply::Version {
                version: env!("CARGO_PKG_VERSION").to_string(),
                protocol: arbiter_proto::control::PROTOCOL_VERSION,
            }),
            Request::Scale {
                by,
                to,
                min: None,
                max: None,
            } => self.scale_request(by, to),
            Request::Scale {
                by: None,
                to: None,
                min: Some(min),
                max: Some(max),
            } => self.autoscale_request(min, max),
            Request::Scale { .. } => Response::err(
                ErrorKind::BadRequest,
                "scale takes \"by\", \"to\", or both \"min\" and \"max\"",
            ),
            Request::Reopen => reopen_request(),
            Request::Kill { pid, signal } => self.kill_request(pid, signal.as_deref()),
            Request::Reload => match self.reload() {
                Ok(()) => {
                    self.reloads.add_waiter(id);
                    return;
                }
                Err(e) if self.shutdown.is_some() => Response::err(ErrorKind::Refused, e),
                Err(e) => Response::err(ErrorKind::Failed, format!("reload failed: {e}")),
            },
            Request::Upgrade {
                binary,
                timeout_secs,
            } => {
                let timeout = timeout_secs.map_or(DEFAULT_UPGRADE_TIMEOUT, Duration::from_secs);
                match self.begin_upgrade(binary.map(PathBuf::from), timeout, true) {
                    Ok(()) => {
                        self.lineage.add_waiter(id);
                        return;
                    }
                    Err(e) => Response::err(ErrorKind::Refused, e),
                }
            }
            Request::Stop { fast } => {
                self.begin_shutdown(if fast { How::Quick } else { How::Graceful });
                self.stop_waiters.push(id);
                return;
            }
        };
        self.reply(id, &resp);
    }

    pub(super) fn reply(&mut self, id: ClientId, resp: &Response) {
        if let Some(c) = &mut self.control {
            c.reply(id, resp);
        }
    }

    fn scale_request(&mut self, by: Option<i64>, to: Option<u64>) -> Response {
        if self.shutdown.is_some() {
            return Response::err(ErrorKind::Refused, "the master is shutting down");
        }
        let from = self.pool.target() as i64;
        let wanted = match (by, to) {
            (Some(by), None) => from.saturating_add(by),
            (None, Some(to)) => to.min(i64::MAX as u64) as i64,
            _ => {
                return Response::err(
                    ErrorKind::BadRequest,
                    "scale takes exactly one of \"by\" or \"to\"",
                );
            }
        };
        if wanted > self.cfg.max_workers as i64 {
            return Response::err(
                ErrorKind::Refused,
                format!(
                    "scale {wanted}: more than --max-workers ({})",
                    self.cfg.max_workers
                ),
            );
        }
        // Never below 1, as TTOU; the master owns the clamp.
        let n = wanted.clamp(1, MAX_WORKERS as i64) as usize;
        self.scale_to(n);
        Response::ok(Reply::Scaled {
            from: from as u64,
            to: n as u64,
            min: None,
            max: None,
        })
    }

    /// `scale MIN..MAX`: adapt the count to the load within the bounds, starting
    /// from the current count brought inside them.
    fn autoscale_request(&mut self, min: u64, max: u64) -> Response {
        if self.shutdown.is_some() {
            return Response::err(ErrorKind::Refused, "the master is shutting down");
        }
        let limit = self.cfg.max_workers as u64;
        if min == 0 || min > max || max > limit {
            return Response::err(
                ErrorKind::Refused,
                format!("scale {min}..{max}: expected 1 <= MIN <= MAX <= --max-workers ({limit})"),
            );
        }
        let bounds = crate::config::WorkerCount {
            min: min as usize,
            max: max as usize,
        };
        let from = self.pool.target();
        let to = from.clamp(bounds.min, bounds.max);
        info!("Autoscaling within {bounds} (asked by a control client); workers {from} -> {to}");
        self.autoscaler
            .set_bounds(bounds.range(), std::time::Instant::now());
        self.pool.set_target(to);
        Response::ok(Reply::Scaled {
            from: from as u64,
            to: to as u64,
            min: Some(min),
            max: Some(max),
        })
    }

    fn kill_request(&mut self, pid: i32, signal: Option<&str>) -> Response {
        let Some(sig) = signal.map_or(Some(nix::sys::signal::Signal::SIGTERM), parse_signal) else {
            return Response::err(
                ErrorKind::BadRequest,
                format!("unknown signal {:?}", signal.unwrap_or_default()),
            );
        };
        match self.pool.signal_worker(pid, sig, &self.cfg) {
            Ok(true) => Response::ok(Reply::Killed {
                pid,
                signal: signals::short_name(sig).to_string(),
            }),
            Ok(false) => Response::err(ErrorKind::Refused, format!("no worker with pid {pid}")),
            Err(e) => Response::err(ErrorKind::Failed, format!("kill {pid}: {e}")),
        }
    }
}

fn reopen_request() -> Response {
    match crate::log::reopen() {
        Ok(()) => {
            info!("Reopened the log file");
            // The open can succeed on a disk that is still full: the line just
            // written says whether the log takes lines again, and a logrotate
            // postrotate or a cron job should hear it if not.
            match crate::log::health().1 {
                None => Response::ok(Reply::Reopened),
                Some(e) => Response::err(
                    ErrorKind::Failed,
                    format!("reopened the log file, but it refuses lines: {e}"),
                ),
            }
        }
        Err(e) => Response::err(
            ErrorKind::Failed,
            format!("cannot reopen the log file: {e}"),
        ),
    }
}

fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Status => "status",
        Request::Scale { .. } => "scale",
        Request::Reload => "reload",
        Request::Reopen => "reopen",
        Request::Stop { fast: false } => "stop",
        Request::Stop { fast: true } => "stop --fast",
        Request::Kill { .. } => "kill",
        Request::Upgrade { .. } => "upgrade",
        Request::Ping => "ping",
        Request::Version => "version",
    }
}
