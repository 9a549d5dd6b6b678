//! Hot upgrade, seen from either master: which master we are in a lineage, as one
//! state, so that what status says, whether a second USR2 is taken, and whether
//! shared paths may be unlinked can never disagree.
//!
//! ```text
//!   Solo --USR2/upgrade--> Upgrading --ready--> Beside (USR2) ---new master exits--> Solo
//!     ^                        |           \--> HandingOver (arbiterctl upgrade) --> exit
//!     |                        +--fails--> Solo (the new master is abandoned)
//!   Unpromoted --old master gone--> Solo
//! ```

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use arbiter_proto::worker as contract;

use super::events::{Events, Source};
use super::pool::Death;
use crate::control::ClientId;
use crate::daemonize::Word;
use crate::listeners::Listener;
use crate::notify::ServiceManager;
use crate::pidfile::Pidfile;
use crate::relay;
use crate::spawn::{ChildEnv, Plan, Prepared};
use crate::upgrade::{self, StartContext};
use crate::{info, warning};

/// How long an abandoned new master has to quit before KILL.
const ABANDON_GRACE: Duration = Duration::from_secs(10);

enum Stage {
    /// The only master.
    Solo,
    /// We are a new master and the old one still runs; EOF on `pipe` (held by the
    /// old master for its life) promotes us.
    Unpromoted { old: i32, pipe: Option<OwnedFd> },
    /// We are checking, then starting, a new master.
    Upgrading(Upgrade),
    /// After USR2: the new master serves beside us until the operator QUITs one.
    Beside {
        pid: Pid,
        /// Held for our life: its EOF promotes the new master.
        _alive: OwnedFd,
        renamed_pidfile: bool,
    },
    /// After `arbiterctl upgrade`: the new master serves, we drain and exit, and
    /// tell these clients it is done.
    HandingOver {
        pid: Pid,
        waiters: Vec<ClientId>,
        /// The new master's worker count, as it said when ready.
        workers: Option<usize>,
    },
}

struct Upgrade {
    binary: PathBuf,
    /// `arbiterctl upgrade`: stop this master once the new one is ready. USR2: leave
    /// both running (the operator's WINCH/QUIT dance).
    handover: bool,
    deadline: Instant,
    waiters: Vec<ClientId>,
    step: Step,
    /// The pidfile was renamed to `.oldbin` and must come back if this fails.
    renamed_pidfile: bool,
}

enum Step {
    /// `NEW --check-config ARGS`: does the new binary accept our configuration?
    Checking { pid: Pid, output: Option<OwnedFd> },
    /// The new master booting its first generation.
    Starting {
        pid: Pid,
        ready: Option<OwnedFd>,
        alive: OwnedFd,
    },
}

impl Step {
    fn pid(&self) -> Pid {
        match self {
            Step::Checking { pid, .. } | Step::Starting { pid, .. } => *pid,
        }
    }

    fn pipe(&mut self) -> &mut Option<OwnedFd> {
        match self {
            Step::Checking { output, .. } => output,
            Step::Starting { ready, .. } => ready,
        }
    }
}

pub struct Lineage {
    stage: Stage,
    /// What the checker or the new master wrote into its pipe so far.
    said: Vec<u8>,
    /// A failed new master asked to quit; KILL it at the deadline.
    abandoned: Option<Abandoned>,
    /// New masters that became ready.
    pub upgrades: u64,
}

/// A new master given up on.
struct Abandoned {
    pid: Pid,
    kill_at: Instant,
    /// Its end of the pipe whose EOF promotes it, held until it is gone: let go
    /// before, it would take itself for promoted (the old master gone) as it
    /// quits, and claim the control socket's path and systemd's main pid.
    _alive: Option<OwnedFd>,
}

/// What the upgrade's pipe said.
pub enum PipeOutcome {
    /// The new master is ready: hand over (stop this master) or run beside it.
    Ready {
        handover: bool,
    },
    Failed(String),
}

/// What the death of a child meant to the lineage.
pub enum ChildExit {
    NotOurs,
    /// The configuration check passed: start the new master.
    CheckPassed,
    Failed(String),
    /// The new master that had taken over is gone; we are the only master again.
    /// `waiters`: clients told nothing yet.
    SuccessorGone {
        reason: String,
        renamed_pidfile: bool,
        waiters: Vec<ClientId>,
    },
    /// The abandoned new master is gone.
    Abandoned,
}

/// An upgrade that failed: who to tell, and whether the pidfile must get its name
/// back.
pub struct Failure {
    pub waiters: Vec<ClientId>,
    pub renamed_pidfile: bool,
}

impl Lineage {
    pub fn new(predecessor: Option<(i32, Option<OwnedFd>)>, ev: &mut Events) -> Lineage {
        let stage = match predecessor {
            Some((old, pipe)) => {
                if let Some(p) = &pipe {
                    ev.add(p.as_fd(), Source::Predecessor);
                }
                Stage::Unpromoted { old, pipe }
            }
            None => Stage::Solo,
        };
        Lineage {
            stage,
            said: Vec::new(),
            abandoned: None,
            upgrades: 0,
        }
    }

    /// A new master not promoted yet: the old master owns the usual names.
    pub fn is_unpromoted(&self) -> bool {
        matches!(self.stage, Stage::Unpromoted { .. })
    }

    /// The new master that took over from us (or serves beside us).
    pub fn successor(&self) -> Option<Pid> {
        match self.stage {
            Stage::Beside { pid, .. } | Stage::HandingOver { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// How many workers the master we hand over to runs, if it said.
    pub fn successor_workers(&self) -> Option<usize> {
        match self.stage {
            Stage::HandingOver { workers, .. } => workers,
            _ => None,
        }
    }

    /// Another master shares our unix socket files and control path: never
    /// unlink them.
    pub fn shares_paths(&self) -> bool {
        self.is_unpromoted() || self.successor().is_some()
    }

    /// We are the service's main process to systemd, and speak for it: the
    /// master systemd started (or was handed) stays so until it exits, through an
    /// upgrade's overlap, so systemd always supervises a child of its own; a new
    /// master is silent until the old one is gone. See docs/upgrade.md.
    pub fn is_main_process(&self) -> bool {
        !self.is_unpromoted()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let upgrade = match &self.stage {
            Stage::Upgrading(u) => Some(u.deadline),
            _ => None,
        };
        [upgrade, self.abandoned.as_ref().map(|a| a.kill_at)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Why a second upgrade cannot start now.
    fn refusal(&self) -> Option<String> {
        match &self.stage {
            Stage::Solo => None,
            Stage::Upgrading(u) => Some(format!(
                "Child exists: an upgrade is already in flight (pid {}).",
                u.step.pid()
            )),
            Stage::Unpromoted { old, .. } => Some(format!(
                "Parent exists: this master is itself an upgrade, and the old master (pid {old}) still runs."
            )),
            Stage::Beside { pid, .. } | Stage::HandingOver { pid, .. } => {
                Some(format!("A new master (pid {pid}) already took over."))
            }
        }
    }

    /// Start replacing this master: vet the new binary with `--check-config`
    /// first (see `upgrade.rs`).
    pub fn begin(
        &mut self,
        ev: &mut Events,
        start: &StartContext,
        env: &ChildEnv,
        binary: Option<PathBuf>,
        timeout: Duration,
        handover: bool,
    ) -> Result<(), String> {
        if let Some(why) = self.refusal() {
            return Err(why);
        }
        let binary = binary
            .map(|b| std::path::absolute(&b).unwrap_or(b))
            .unwrap_or_else(|| start.exe.clone());
        let (out_r, out_w) = relay::pipe().map_err(|e| format!("pipe: {e}"))?;
        let mut argv: Vec<&OsStr> = start.argv.iter().map(|a| a.as_os_str()).collect();
        // Right after argv[0]: everything after `--` belongs to COMMAND.
        argv.insert(1.min(argv.len()), OsStr::new("--check-config"));
        let mut checker = Prepared::new(Plan {
            path: binary.as_os_str(),
            argv: &argv,
            env: env.env.clone(),
            pid_keys: &[],
            fds: Vec::new(),
            stdio: Some(out_w.as_raw_fd()),
            credentials: None,
            contained: true,
            dir: start.dir.as_deref(),
        })
        .map_err(|e| format!("{}: {e}", binary.display()))?;
        let (pid, _exec_status) = checker
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        drop(out_w);
        info!(
            "Upgrade: checking {} against the configuration (pid:{pid})",
            binary.display()
        );
        ev.add(out_r.as_fd(), Source::Upgrade);
        self.said.clear();
        self.stage = Stage::Upgrading(Upgrade {
            binary,
            handover,
            deadline: Instant::now() + timeout,
            waiters: Vec::new(),
            step: Step::Checking {
                pid,
                output: Some(out_r),
            },
            renamed_pidfile: false,
        });
        Ok(())
    }

    /// A client to answer when the upgrade in flight ends.
    pub fn add_waiter(&mut self, id: ClientId) {
        if let Stage::Upgrading(u) = &mut self.stage {
            u.waiters.push(id);
        }
    }

    /// The check passed: exec the new master with our sockets.
    pub fn start_new_master(
        &mut self,
        ev: &mut Events,
        start: &StartContext,
        sockets: Sockets<'_>,
        base: &ChildEnv,
        manager: Option<&ServiceManager>,
        pidfile: Option<&mut Pidfile>,
    ) -> Result<(), String> {
        let Stage::Upgrading(u) = &mut self.stage else {
            return Ok(());
        };
        let Sockets { listeners, metrics } = sockets;
        let binary = u.binary.clone();
        let (ready_r, ready_w) = relay::pipe().map_err(|e| format!("pipe: {e}"))?;
        let (alive_r, alive_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let mut fds: Vec<i32> = listeners.iter().map(|l| l.as_fd().as_raw_fd()).collect();
        let n = fds.len() as i32;
        fds.push(ready_w.as_raw_fd());
        fds.push(alive_r.as_raw_fd());
        let specs: Vec<Option<String>> = listeners.iter().map(|l| l.handover_spec()).collect();
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        let mut env = base.clone();
        env.listeners(&names);
        env.set(upgrade::ENV_FROM, nix::unistd::getpid());
        env.set(
            upgrade::ENV_SPECS,
            serde_json::to_string(&specs).unwrap_or_else(|_| "[]".into()),
        );
        env.set(upgrade::ENV_READY_FD, contract::LISTEN_FDS_START + n);
        env.set(upgrade::ENV_PARENT_FD, contract::LISTEN_FDS_START + n + 1);
        // The metrics address is handed over too: the new master could not bind
        // it while we hold it, and scrapes must not fail during the handover.
        if let Some(m) = metrics
            && let Some(spec) = &m.spec
        {
            fds.push(m.as_fd().as_raw_fd());
            env.set(upgrade::ENV_METRICS_FD, contract::LISTEN_FDS_START + n + 2);
            env.set(upgrade::ENV_METRICS_SPEC, spec.to_string());
        }
        if let Some(m) = manager {
            env.set(contract::ENV_NOTIFY_SOCKET, m.address());
            // The unit's watchdog must stay fed by whoever is the main process.
            if let Some(usec) = m.watchdog_usec {
                env.watchdog(usec);
            }
        }
        let argv: Vec<&OsStr> = start.argv.iter().map(|a| a.as_os_str()).collect();
        let mut prepared = Prepared::new(Plan {
            path: binary.as_os_str(),
            argv: &argv,
            env: env.env,
            pid_keys: &env.pid_keys,
            fds,
            stdio: None,
            credentials: None,
            contained: false,
            dir: start.dir.as_deref(),
        })
        .map_err(|e| format!("{}: {e}", binary.display()))?;
        // Move aside before the new master writes PIDFILE.2, as gunicorn and
        // unicorn do, so both pids can be found during the handover.
        let mut renamed = None;
        if let Some(p) = pidfile {
            let back = p.path().to_path_buf();
            let to = upgrade::oldbin(&back);
            match p.rename_to(&to) {
                Ok(()) => renamed = Some((p, back)),
                Err(e) => warning!(
                    "Upgrade: cannot rename the pidfile to {}: {e}",
                    to.display()
                ),
            }
        }
        let (pid, _exec_status) = match prepared.spawn() {
            Ok(s) => s,
            Err(e) => {
                if let Some((p, back)) = renamed {
                    let _ = p.rename_to(&back);
                }
                return Err(format!("cannot start {}: {e}", binary.display()));
            }
        };
        drop(ready_w);
        drop(alive_r);
        info!(
            "Upgrade: started the new master (pid:{pid}) from {}",
            binary.display()
        );
        if let Some(fd) = u.step.pipe().take() {
            ev.remove(fd.as_fd());
        }
        ev.add(ready_r.as_fd(), Source::Upgrade);
        self.said.clear();
        u.renamed_pidfile = renamed.is_some();
        u.step = Step::Starting {
            pid,
            ready: Some(ready_r),
            alive: alive_w,
        };
        Ok(())
    }

    /// Output of the checker, or the new master's "ready".
    pub fn on_pipe(&mut self, ev: &mut Events) -> Option<PipeOutcome> {
        let Stage::Upgrading(u) = &mut self.stage else {
            return None;
        };
        let pipe = u.step.pipe();
        let fd = pipe.as_ref()?;
        let mut buf = [0u8; 4096];
        let eof = match nix::unistd::read(fd, &mut buf) {
            Ok(0) => true,
            Ok(k) => {
                if self.said.len() < 4096 {
                    self.said.extend_from_slice(&buf[..k]);
                }
                false
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        };
        if eof && let Some(fd) = pipe.take() {
            ev.remove(fd.as_fd());
        }
        if !matches!(u.step, Step::Starting { .. }) {
            return None;
        }
        let text = String::from_utf8_lossy(&self.said).to_string();
        let word = Word::parse(&text);
        if let Some(Word::Ready { workers }) = word {
            if let Some(fd) = u.step.pipe().take() {
                ev.remove(fd.as_fd());
            }
            Some(self.ready(workers))
        } else if let Some(Word::Error { msg, .. }) = word {
            Some(PipeOutcome::Failed(format!(
                "the new master failed to start: {}",
                msg.trim()
            )))
        } else if eof {
            Some(PipeOutcome::Failed(
                "the new master exited before it was ready".into(),
            ))
        } else {
            None
        }
    }

    fn ready(&mut self, workers: Option<usize>) -> PipeOutcome {
        let Stage::Upgrading(u) = std::mem::replace(&mut self.stage, Stage::Solo) else {
            unreachable!("ready() is reached from the Upgrading stage only");
        };
        let Step::Starting { pid, alive, .. } = u.step else {
            unreachable!("ready() is reached from the Starting step only");
        };
        self.upgrades += 1;
        info!("Upgrade: the new master (pid:{pid}) is ready");
        if u.handover {
            // Our workers drain while the new master's serve; we exit when they are
            // gone, and the new master is promoted when our end of the pipe
            // closes, which is when we exit.
            info!("Upgrade: handing over to the new master (pid:{pid}); stopping this one");
            std::mem::forget(alive);
            self.stage = Stage::HandingOver {
                pid,
                waiters: u.waiters,
                workers,
            };
        } else {
            info!(
                "Upgrade: both masters serve now; WINCH then QUIT this one (pid:{}) to finish, or HUP this one and QUIT the new one to roll back",
                nix::unistd::getpid()
            );
            self.stage = Stage::Beside {
                pid,
                _alive: alive,
                renamed_pidfile: u.renamed_pidfile,
            };
        }
        PipeOutcome::Ready {
            handover: u.handover,
        }
    }

    /// A child of ours exited: was it part of an upgrade?
    pub fn on_child_exit(&mut self, pid: Pid, death: Death) -> ChildExit {
        if self.abandoned.as_ref().is_some_and(|a| a.pid == pid) {
            self.abandoned = None;
            info!("The abandoned new master (pid:{pid}) {}", death.describe());
            return ChildExit::Abandoned;
        }
        match &self.stage {
            Stage::Upgrading(u) if u.step.pid() == pid => match (&u.step, death) {
                (Step::Checking { .. }, Death::Code(0)) => ChildExit::CheckPassed,
                (Step::Checking { .. }, _) => {
                    let said = String::from_utf8_lossy(&self.said);
                    // Up to the first blank line: a usage error is clap's message,
                    // then its tip and usage after blank lines, which a reply's
                    // reason does not need.
                    let said = said.trim().split("\n\n").next().unwrap_or_default();
                    let said = said.trim();
                    ChildExit::Failed(if said.is_empty() {
                        format!("the new binary's configuration check {}", death.describe())
                    } else {
                        format!("the new binary refused the configuration: {said}")
                    })
                }
                (Step::Starting { .. }, _) => {
                    ChildExit::Failed(format!("the new master (pid:{pid}) {}", death.describe()))
                }
            },
            Stage::Beside { pid: p, .. } | Stage::HandingOver { pid: p, .. } if *p == pid => {
                let (renamed_pidfile, waiters) =
                    match std::mem::replace(&mut self.stage, Stage::Solo) {
                        Stage::Beside {
                            renamed_pidfile, ..
                        } => (renamed_pidfile, Vec::new()),
                        Stage::HandingOver { waiters, .. } => (false, waiters),
                        _ => (false, Vec::new()),
                    };
                ChildExit::SuccessorGone {
                    reason: format!("the new master (pid:{pid}) {}", death.describe()),
                    renamed_pidfile,
                    waiters,
                }
            }
            _ => ChildExit::NotOurs,
        }
    }

    /// Give up on the upgrade in flight: the new master (or checker) is asked to
    /// quit, with KILL to follow.
    pub fn fail(&mut self, ev: &mut Events) -> Option<Failure> {
        let Stage::Upgrading(mut u) = std::mem::replace(&mut self.stage, Stage::Solo) else {
            return None;
        };
        if let Some(fd) = u.step.pipe().take() {
            ev.remove(fd.as_fd());
        }
        let pid = u.step.pid();
        if nix::sys::signal::kill(pid, Signal::SIGQUIT).is_ok() {
            self.abandoned = Some(Abandoned {
                pid,
                kill_at: Instant::now() + ABANDON_GRACE,
                _alive: match u.step {
                    Step::Starting { alive, .. } => Some(alive),
                    Step::Checking { .. } => None,
                },
            });
        }
        Some(Failure {
            waiters: u.waiters,
            renamed_pidfile: u.renamed_pidfile,
        })
    }

    /// The upgrade's deadline passed (the caller fails it), or the abandoned
    /// master's: KILL.
    pub fn check_deadlines(&mut self, now: Instant) -> Option<String> {
        if let Some(Abandoned { pid, kill_at, .. }) = self.abandoned
            && now >= kill_at
        {
            warning!("The abandoned new master (pid:{pid}) did not exit; sending SIGKILL");
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            self.abandoned = None;
        }
        match &self.stage {
            Stage::Upgrading(u) if now >= u.deadline => {
                Some("the new master was not ready in time".into())
            }
            _ => None,
        }
    }

    /// The old master is gone: we are the only master now. Returns its pid.
    pub fn promote(&mut self, ev: &mut Events) -> Option<i32> {
        let Stage::Unpromoted { old, pipe } = std::mem::replace(&mut self.stage, Stage::Solo)
        else {
            return None;
        };
        if let Some(p) = &pipe {
            ev.remove(p.as_fd());
        }
        Some(old)
    }

    /// Clients to tell, as we exit, that the new master took over.
    pub fn take_handover_waiters(&mut self) -> Vec<ClientId> {
        match &mut self.stage {
            Stage::HandingOver { waiters, .. } => std::mem::take(waiters),
            _ => Vec::new(),
        }
    }

    pub fn describe(&self) -> Option<String> {
        match &self.stage {
            Stage::Solo => None,
            Stage::Unpromoted { old, .. } => Some(format!(
                "new master, not promoted yet (old master pid {old})"
            )),
            Stage::Upgrading(u) => Some(match u.step {
                Step::Checking { pid, .. } => {
                    format!("checking {} (pid {pid})", u.binary.display())
                }
                Step::Starting { pid, .. } => format!("new master starting (pid {pid})"),
            }),
            Stage::Beside { pid, .. } => {
                Some(format!("new master running beside this one (pid {pid})"))
            }
            Stage::HandingOver { pid, .. } => {
                Some(format!("handing over to the new master (pid {pid})"))
            }
        }
    }
}

/// The sockets a new master takes over: the listeners, and the `--metrics-bind` one.
pub struct Sockets<'a> {
    pub listeners: &'a [Listener],
    pub metrics: Option<&'a Listener>,
}
