//! `arbiterctl upgrade`: ask for the new master, wait until it answers on the
//! control socket, and make sense of an old master that went without answering.

use std::path::Path;
use std::time::{Duration, Instant};

use arbiter_proto::client::{Client, ClientError};
use arbiter_proto::control::{Reply, Request};

use crate::cli::{Cli, Timeout};
use crate::resolve::{self, Target};
use crate::{DEFAULT_TIMEOUT, Done, Fail, ask, bound, pong_pid, unexpected, wait_for};

/// `upgrade`: how long the new master may take to be ready, by default (the
/// master's own default).
pub const UPGRADE_READY_DEFAULT: Duration = Duration::from_secs(60);
/// `upgrade`: added to the readiness bound for the old master's graceful stop.
pub const UPGRADE_SLACK: Duration = Duration::from_secs(120);
/// After `upgraded`: how long the new master may take to answer on the socket.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// `upgrade`: the old master answers `upgraded` just before it exits; then wait
/// until the socket answers from the new master.
pub(crate) fn upgrade(
    cli: &Cli,
    target: &Target,
    mut client: Client,
    binary: Option<&Path>,
) -> Result<Done, Fail> {
    let (ready, wait) = match cli.timeout {
        Some(Timeout(None)) => (None, None),
        Some(Timeout(Some(t))) => (Some(t), Some(t + UPGRADE_SLACK)),
        None => (None, Some(UPGRADE_READY_DEFAULT + UPGRADE_SLACK)),
    };
    let req = Request::Upgrade {
        binary: binary.map(|b| {
            std::path::absolute(b)
                .unwrap_or_else(|_| b.to_path_buf())
                .to_string_lossy()
                .into_owned()
        }),
        timeout_secs: ready.map(|t| t.as_secs_f64().ceil() as u64),
    };
    // Who the old master is: if it goes without answering, whoever answers
    // afterwards can be told apart from it.
    let known = match ask(&mut client, &Request::Ping, bound(cli, DEFAULT_TIMEOUT))? {
        Reply::Pong { pid, .. } => pid,
        other => return Err(unexpected("ping", &other)),
    };
    let takeover = || match cli.timeout {
        Some(Timeout(None)) => None,
        _ => Instant::now().checked_add(TAKEOVER_TIMEOUT),
    };
    let (old_pid, new_pid, workers, reply) = match ask(&mut client, &req, wait) {
        Ok(
            r @ Reply::Upgraded {
                old_pid,
                new_pid,
                workers,
            },
        ) => (old_pid, new_pid, workers, r),
        Ok(other) => return Err(unexpected("upgrade", &other)),
        // The request was taken, then the old master went (stopped mid-upgrade):
        // the upgrade may still have completed. Ask the masters, not the socket
        // that just closed.
        Err(Fail::Client(ClientError::Closed { .. })) => {
            return upgrade_outcome_unheard(cli, target, known, takeover());
        }
        Err(e) => return Err(e),
    };
    drop(client);
    let takeover = takeover();
    let served = wait_for(
        takeover,
        || matches!(pong_pid(cli, &target.path), Some(Ok(p)) if p == new_pid),
    );
    if !served {
        return Err(Fail::Other {
            kind: "failed",
            message: format!(
                "the old master (pid {old_pid}) handed over, but the new one (pid {new_pid}) does not answer on {}",
                target.path.display()
            ),
        });
    }
    let count = workers.map_or(String::new(), |n| {
        format!(", {n} worker{}", if n == 1 { "" } else { "s" })
    });
    Ok(Done::reply(
        format!("upgraded: master {old_pid} -> {new_pid}{count}"),
        &reply,
    ))
}

/// `upgrade` when the old master (`old_pid`) closed the connection without
/// answering: a master other than it answering on the usual path means the new
/// one took over (exit 0); otherwise say what is known (exit 1). The new master
/// may still be starting, so wait until `deadline` for it to be promoted.
fn upgrade_outcome_unheard(
    cli: &Cli,
    target: &Target,
    old_pid: i32,
    deadline: Option<Instant>,
) -> Result<Done, Fail> {
    let mut second = target.path.clone().into_os_string();
    second.push(".2");
    let second = std::path::PathBuf::from(second);
    let mut serving = None;
    let mut beside = None;
    let mut refused = None;
    wait_for(deadline, || {
        match pong_pid(cli, &target.path) {
            Some(Ok(p)) if p != old_pid => serving = Some(p),
            Some(Err(e @ ClientError::Untrusted { .. })) => refused = Some(e),
            _ => {}
        }
        if let Some(Ok(p)) = pong_pid(cli, &second) {
            beside = Some(p);
        }
        serving.is_some() || refused.is_some()
    });
    if let Some(e) = refused {
        return Err(Fail::Client(e));
    }
    let note = format!(
        "the old master (pid {old_pid}) closed the connection without answering (stopped during the upgrade?)"
    );
    let old_alive = resolve::pid_alive(old_pid);
    match serving {
        Some(new_pid) => {
            let reply = Reply::Upgraded {
                old_pid,
                new_pid,
                workers: None,
            };
            let mut done = Done::reply(
                format!(
                    "upgraded: master {old_pid} -> {new_pid} (pid {new_pid} answers on {})",
                    target.path.display()
                ),
                &reply,
            );
            done.note = Some(note);
            Ok(done)
        }
        None => Err(Fail::Other {
            kind: "failed",
            message: match (beside, old_alive) {
                (Some(p), _) => format!(
                    "{note}; a new master (pid {p}) answers on {} but has not taken over",
                    second.display()
                ),
                (None, true) => format!(
                    "{note}; it is still running, and no new master answers on {} or {}",
                    target.path.display(),
                    second.display()
                ),
                (None, false) => format!(
                    "{note}; it is gone, and no master answers on {} or {}",
                    target.path.display(),
                    second.display()
                ),
            },
        }),
    }
}
