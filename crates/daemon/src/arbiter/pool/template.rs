//! `--preload`: one template per generation, which loads the application once and
//! forks workers when asked (protocol in docs/workers.md, "Preloading").
//!
//! The pool asks for a worker with a `FORK` datagram carrying the worker's
//! environment and fds (its output pipe, heartbeat file, scoreboard, cgroup), and
//! keeps what it prepared as a [`Pending`] fork until the template answers
//! `FORKED id pid`; only then does the worker exist for the pool, supervised as an
//! exec'd one. The template forks twice, so the worker is an orphan that comes to
//! the master (a child subreaper) and is reaped with its exit status; an exit that
//! arrives before the `FORKED` line is kept briefly and matched then.
//!
//! Scale-up waits for the generation's template to be ready (it does not fall back
//! to exec: a preloading application may not even start as a plain worker). A
//! template that dies is restarted with backoff; the workers it forked serve on.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;

use arbiter_proto::worker as contract;

use super::spawn::WorkerParts;
use super::{Death, Exit, Phase, Pool, SpawnContext, backoff};
use crate::arbiter::events::{Events, Source};
use crate::config::WorkerProgram;
use crate::notify::Message;
use crate::relay::{self, Relay};
use crate::spawn::{Plan, Prepared};
use crate::trees::Tree;
use crate::{error, info, warning};

/// How long a worker's exit is kept while its `FORKED` line may still come.
const UNCLAIMED_FOR: Duration = Duration::from_secs(10);
/// At most this many such exits are kept (a flood of strangers' orphans).
const UNCLAIMED_MAX: usize = 4096;

pub struct Template {
    /// Its key for the event set and its output relay (it took a worker id).
    pub id: u64,
    pub pid: Pid,
    pub generation: u64,
    sock: OwnedFd,
    pub state: TemplateState,
    pub started: Instant,
    tree: Tree,
    /// Forks asked for and not answered yet.
    pending: Vec<Pending>,
    /// TERM sent (its generation is gone, or the master stops).
    pub stopping: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateState {
    /// Started; loading the application.
    Loading,
    /// Said `READY`: forks on request.
    Ready { at: Instant },
    /// Killed for not loading within `--boot-timeout`: its exit is a failure.
    Overdue,
}

/// What a template's answers brought besides workers: exits and notify messages
/// of workers that came before their `FORKED` line, to be handled now.
#[derive(Default)]
pub struct Early {
    pub deaths: Vec<(Pid, Death)>,
    pub notes: Vec<(i32, Vec<Message>)>,
}

/// What was prepared for a worker the template has been asked to fork.
pub struct Pending {
    slot: usize,
    parts: WorkerParts,
}

/// A template's status line (`status`).
pub struct TemplateView {
    pub pid: i32,
    pub generation: u64,
    pub ready: bool,
    pub rss_bytes: Option<u64>,
}

impl Pool {
    /// The current generation's template, if it is ready to fork.
    fn ready_template(&mut self) -> Option<&mut Template> {
        let generation = self.generation;
        self.templates
            .iter_mut()
            .find(|t| t.generation == generation && !t.stopping)
            .filter(|t| matches!(t.state, TemplateState::Ready { .. }))
    }

    /// Slots of the current generation with a fork asked for.
    pub(super) fn pending_slots(&self) -> Vec<usize> {
        self.templates
            .iter()
            .filter(|t| t.generation == self.generation)
            .flat_map(|t| t.pending.iter().map(|p| p.slot))
            .collect()
    }

    /// `--preload`: a worker for `slot`, forked by the current generation's
    /// template (started first if there is none). False if none can be asked for
    /// now: the caller stops spawning this turn.
    pub(super) fn fork_from_template(
        &mut self,
        slot: usize,
        now: Instant,
        ctx: &SpawnContext<'_>,
        ev: &mut Events,
    ) -> bool {
        self.ensure_template(now, ctx, ev);
        if self.ready_template().is_none() {
            return false;
        }
        let Some(parts) = self
            .worker_parts(ctx, now)
            .and_then(WorkerParts::with_write_end)
        else {
            return false;
        };
        let (parts, relay_write) = parts;
        let (id, board) = (parts.id, parts.board);
        // The worker's environment: what an exec'd worker gets that is its own.
        let listeners = ctx.listeners.len() as i32;
        let mut lines = vec![
            format!("FORK {id}"),
            format!("{}={id}", contract::ENV_WORKER_ID),
            format!("{}={slot}", contract::ENV_SLOT),
            format!(
                "{}={}",
                contract::ENV_HEARTBEAT_FD,
                contract::LISTEN_FDS_START + listeners
            ),
        ];
        let mut fds: Vec<RawFd> = vec![relay_write.as_raw_fd(), parts.heartbeat.fd()];
        let mut names = vec!["stdio", "heartbeat"];
        if let Some((index, fd)) = board {
            lines.push(format!(
                "{}={}",
                contract::ENV_SCOREBOARD_FD,
                contract::LISTEN_FDS_START + listeners + 1
            ));
            lines.push(format!("{}={index}", contract::ENV_SCOREBOARD_SLOT));
            fds.push(fd);
            names.push("scoreboard");
        }
        if let Some(c) = &parts.cgroup {
            fds.push(c.procs.as_raw_fd());
            names.push("cgroup");
        }
        if let Some(t) = ctx.cfg.timeout {
            lines.push(format!("{}={}", contract::ENV_WATCHDOG_USEC, t.as_micros()));
        }
        lines.push(format!("FDS={}", names.join(",")));
        let message = lines.join("\n");
        let Some(t) = self.ready_template() else {
            self.discard(parts);
            return false;
        };
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = socket::sendmsg::<()>(
            t.sock.as_raw_fd(),
            &[IoSlice::new(message.as_bytes())],
            &cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        // The template holds its copies now; ours of the write end must go, so
        // EOF on the relay means the worker (and its children) are gone.
        drop(relay_write);
        if let Err(e) = sent {
            self.discard(parts);
            self.spawn_failed(format!("cannot ask the template to fork: {e}"), now);
            return false;
        }
        let template_pid = t.pid;
        t.pending.push(Pending { slot, parts });
        info!(
            "Asked the template (pid:{template_pid}) for worker id:{id} slot:{slot} gen:{}",
            self.generation
        );
        true
    }

    /// The current generation has a template, or one is started (once a restart
    /// backoff has passed): also with no worker missing, so that a template that
    /// died is back before it is needed.
    pub(super) fn ensure_template(
        &mut self,
        now: Instant,
        ctx: &SpawnContext<'_>,
        ev: &mut Events,
    ) {
        let generation = self.generation;
        let has = self
            .templates
            .iter()
            .any(|t| t.generation == generation && !t.stopping);
        if !has && self.template_retry_at.is_none_or(|t| now >= t) {
            self.start_template(now, ctx, ev);
        }
    }

    /// Start the current generation's template: the COMMAND, as a worker is started,
    /// with the template socket instead of the per-worker items.
    fn start_template(&mut self, now: Instant, ctx: &SpawnContext<'_>, ev: &mut Events) {
        let WorkerProgram::Command { path, argv } = &ctx.cfg.program else {
            return;
        };
        let (ours, theirs) = match socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(p) => p,
            Err(e) => {
                self.template_failed(format!("socketpair: {e}"), now);
                return;
            }
        };
        // The template's end blocks: it waits for work.
        let _ = nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        );
        let (relay_read, relay_write) = match relay::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.template_failed(format!("cannot create the output pipe: {e}"), now);
                return;
            }
        };
        let id = self.next_worker_id;
        let cgroup = match self.containment.prepare(id) {
            Ok(c) => c,
            Err(e) => {
                self.template_failed(format!("cannot make its cgroup: {e}"), now);
                return;
            }
        };
        let mut fds: Vec<RawFd> = ctx
            .listeners
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .collect();
        let sock_target = contract::LISTEN_FDS_START + fds.len() as i32;
        fds.push(theirs.as_raw_fd());
        let names: Vec<&str> = ctx.listeners.iter().map(|l| l.name.as_str()).collect();
        let mut env = ctx.env.clone();
        env.overlay(&ctx.cfg.env);
        env.listeners(&names);
        env.set(contract::ENV_GENERATION, self.generation);
        env.set(contract::ENV_MASTER_PID, ctx.master_pid);
        env.set(
            contract::ENV_TIMEOUT,
            ctx.cfg.timeout.map_or(0.0, |t| t.as_secs_f64()),
        );
        env.set(contract::ENV_NOTIFY_SOCKET, ctx.notify_address);
        env.set(contract::ENV_TEMPLATE_FD, sock_target);
        let argv: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        let prepared = Prepared::new(Plan {
            path: path.as_os_str(),
            argv: &argv,
            env: env.env,
            pid_keys: &env.pid_keys,
            fds,
            stdio: Some(relay_write.as_raw_fd()),
            credentials: ctx.cfg.worker_credentials(),
            contained: true,
            dir: None,
        });
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.template_failed(format!("cannot prepare it: {e}"), now);
                return;
            }
        };
        if let Some(c) = &cgroup {
            prepared.join_cgroup(c.dir_fd.as_raw_fd(), c.procs.as_raw_fd());
        }
        let spawned = prepared.spawn();
        drop(relay_write);
        drop(theirs);
        let (pid, _exec_status) = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.template_failed(format!("fork failed: {e}"), now);
                return;
            }
        };
        let relay_read = crate::spawn::keep_from_children(relay_read);
        let ours = crate::spawn::keep_from_children(ours);
        ev.add(relay_read.as_fd(), Source::Relay(id));
        ev.add(ours.as_fd(), Source::Template(id));
        self.relays.push(Relay::new(relay_read, pid.as_raw(), id));
        self.next_worker_id += 1;
        if let Some(g) = &mut self.guardian {
            g.watch(pid);
        }
        info!(
            "Booting the template with pid: {pid} (id:{id} gen:{}): it loads the application once, then forks the workers",
            self.generation
        );
        self.templates.push(Template {
            id,
            pid,
            generation: self.generation,
            sock: ours,
            state: TemplateState::Loading,
            started: now,
            tree: Tree::of_live_worker(pid, cgroup.map(|c| c.dir)),
            pending: Vec::new(),
            stopping: false,
        });
    }

    fn template_failed(&mut self, what: String, now: Instant) {
        self.template_failures += 1;
        let delay = backoff(self.template_failures);
        error!(
            "Cannot start the template: {what}; retrying in {:.1}s",
            delay.as_secs_f64()
        );
        self.template_retry_at = Some(now + delay);
    }

    /// The template `id`'s socket is readable: its answers. Returns exits of
    /// workers that died before their `FORKED` line was read, for the caller to
    /// handle now.
    pub fn on_template(&mut self, id: u64, now: Instant, ev: &mut Events) -> Early {
        let mut early = Early::default();
        let Some(i) = self.templates.iter().position(|t| t.id == id) else {
            return early;
        };
        let mut buf = [0u8; 4096];
        // Bounded: a template that floods us waits for the next turn.
        for _ in 0..256 {
            let got = nix::sys::socket::recv(
                self.templates[i].sock.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            );
            let n = match got {
                Ok(0) => {
                    // EOF: it is exiting; its reaping says the rest.
                    let t = &self.templates[i];
                    ev.remove(t.sock.as_fd());
                    return early;
                }
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return early,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warning!("Template (pid:{}): {e}", self.templates[i].pid);
                    ev.remove(self.templates[i].sock.as_fd());
                    return early;
                }
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut words = text.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("READY"), Some("1"), _) => {
                    let t = &mut self.templates[i];
                    if t.state == TemplateState::Loading {
                        info!(
                            "Template (pid:{}) for generation {} loaded the application in {:.2}s",
                            t.pid,
                            t.generation,
                            now.saturating_duration_since(t.started).as_secs_f64()
                        );
                        t.state = TemplateState::Ready { at: now };
                        self.template_failures = 0;
                    }
                }
                (Some("READY"), version, _) => {
                    warning!(
                        "Template (pid:{}) speaks protocol {:?}, this master 1; stopping it",
                        self.templates[i].pid,
                        version.unwrap_or("")
                    );
                    let _ = self.templates[i].tree.signal_main(Signal::SIGTERM);
                    self.templates[i].stopping = true;
                }
                (Some("FORKED"), Some(wid), Some(pid)) => {
                    let (Ok(wid), Ok(pid)) = (wid.parse::<u64>(), pid.parse::<i32>()) else {
                        continue;
                    };
                    if self.forked(i, wid, Pid::from_raw(pid), now, ev) {
                        let at = self
                            .unclaimed
                            .iter()
                            .position(|(p, _, _)| p.as_raw() == pid);
                        if let Some(at) = at {
                            let (p, death, _) = self.unclaimed.swap_remove(at);
                            early.deaths.push((p, death));
                        }
                        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_notes)
                            .into_iter()
                            .partition(|(p, _, _)| *p == pid);
                        self.early_notes = rest;
                        early.notes.extend(mine.into_iter().map(|(p, m, _)| (p, m)));
                    }
                }
                (Some("FAILED"), Some(wid), _) => {
                    let reason = text.splitn(3, ' ').nth(2).unwrap_or("").trim().to_string();
                    if let Ok(wid) = wid.parse::<u64>()
                        && let Some(p) = take_pending(&mut self.templates[i], wid)
                    {
                        self.discard(p.parts);
                        self.spawn_failed(format!("the template could not fork: {reason}"), now);
                    }
                }
                _ => warning!(
                    "Template (pid:{}) said something not in the protocol: {:?}",
                    self.templates[i].pid,
                    text.chars().take(80).collect::<String>()
                ),
            }
        }
        early
    }

    /// `FORKED wid pid`: the worker exists (false: it was not asked for).
    fn forked(&mut self, i: usize, wid: u64, pid: Pid, now: Instant, ev: &mut Events) -> bool {
        let generation = self.templates[i].generation;
        let Some(p) = take_pending(&mut self.templates[i], wid) else {
            warning!("Template said it forked worker id:{wid}, which was not asked for");
            return false;
        };
        info!(
            "Booting worker with pid: {pid} (id:{wid} slot:{} gen:{generation}, forked from the template)",
            p.slot
        );
        self.spawn_trouble = None;
        self.adopt(p.parts, p.slot, pid, None, now, ev);
        // Forked, not exec'd: with exec readiness it counts from now, as an exec'd
        // worker counts from its exec.
        if self.ready_mode == crate::config::ReadyMode::Exec
            && let Some(w) = self.workers.last_mut()
        {
            w.mark_ready(now);
        }
        true
    }

    /// Notify messages from a pid that is nobody's, while a fork is pending: kept
    /// briefly. False if they were not kept.
    pub(super) fn keep_early_notes(
        &mut self,
        pid: i32,
        messages: Vec<Message>,
        now: Instant,
    ) -> bool {
        if !self.templates.iter().any(|t| !t.pending.is_empty()) {
            return false;
        }
        self.early_notes
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < UNCLAIMED_FOR);
        if self.early_notes.len() >= UNCLAIMED_MAX {
            return false;
        }
        self.early_notes.push((pid, messages, now));
        true
    }

    /// A child we do not know exited: perhaps a worker whose `FORKED` line is on
    /// its way. Kept briefly.
    pub(super) fn keep_unclaimed(&mut self, pid: Pid, death: Death, now: Instant) {
        self.unclaimed
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < UNCLAIMED_FOR);
        if self.unclaimed.len() < UNCLAIMED_MAX && !self.templates.is_empty() {
            self.unclaimed.push((pid, death, now));
        }
    }

    /// If `pid` is a template, its exit: the forks it owed are dropped (their slots
    /// are asked for again from the next template), and a template of the current
    /// generation is started again after a backoff. A first generation whose
    /// template cannot load the application halts the master as a worker's exit
    /// 3 or 4 does; a reload whose template dies before it is ready fails.
    pub(super) fn template_exited(
        &mut self,
        pid: Pid,
        death: Death,
        now: Instant,
        phase: Phase,
    ) -> Option<Exit> {
        let i = self.templates.iter().position(|t| t.pid == pid)?;
        let t = self.templates.remove(i);
        let loaded = matches!(t.state, TemplateState::Ready { .. });
        if t.state == TemplateState::Overdue {
            info!("Template (pid:{pid}) killed for loading too long");
        }
        for p in t.pending {
            self.discard(p.parts);
        }
        // Its own helpers, if any are left; the workers it forked live on in
        // their own groups and cgroups.
        let _ = t.tree.signal_all(Signal::SIGKILL);
        self.forget_tree(&t.tree);
        if t.stopping || phase.stopping {
            info!("Template (pid:{pid}) of generation {} exited", t.generation);
            return Some(Exit::Handled);
        }
        let current = t.generation == self.generation;
        if !current {
            return Some(Exit::Handled);
        }
        if !loaded {
            if let Death::Code(code @ (contract::EXIT_BOOT_ERROR | contract::EXIT_APP_LOAD_ERROR)) =
                death
                && !self.served
            {
                return Some(Exit::Halt {
                    status: code as u8,
                    reason: if code == contract::EXIT_BOOT_ERROR {
                        "The template failed to boot."
                    } else {
                        "The template failed to load the application."
                    },
                });
            }
            if phase.reloading {
                return Some(Exit::NewGenerationFailed(format!(
                    "its template (pid:{pid}) {} before it loaded the application",
                    death.describe()
                )));
            }
        }
        self.template_failures += 1;
        let delay = backoff(self.template_failures);
        error!(
            "Template (pid:{pid}) of generation {} {}; its workers serve on; starting a new one in {:.1}s",
            t.generation,
            death.describe(),
            delay.as_secs_f64()
        );
        self.template_retry_at = Some(now + delay);
        Some(Exit::Handled)
    }

    /// Templates of generations that have no worker left, or no longer a reason
    /// to exist (`--preload` off after a reload), are stopped.
    pub(super) fn retire_templates(&mut self, preload: bool) {
        let generation = self.generation;
        for t in &mut self.templates {
            let needed = preload
                && (t.generation == generation
                    || self
                        .workers
                        .iter()
                        .any(|w| w.generation == t.generation && w.state.is_active()));
            // An old generation's template is of no more use once its workers
            // are retiring: only the current one forks.
            if !t.stopping && (!needed || t.generation != generation) {
                let _ = t.tree.signal_main(Signal::SIGTERM);
                t.stopping = true;
            }
        }
    }

    /// Every template: TERM (shutdown), or KILL (its deadline).
    pub(super) fn signal_templates(&mut self, sig: Signal) {
        for t in &mut self.templates {
            let _ = t.tree.signal_main(sig);
            t.stopping = true;
        }
    }

    /// When a loading template overstays `boot_timeout`, or a dead one is due
    /// for a restart.
    pub(super) fn template_deadline(&self, boot_timeout: Duration) -> Option<Instant> {
        let loading = self
            .templates
            .iter()
            .filter(|t| t.state == TemplateState::Loading && !t.stopping)
            .map(|t| t.started + boot_timeout)
            .min();
        [loading, self.template_retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// A template still loading past `boot_timeout` is killed (its exit then
    /// counts as a failure to load); a passed restart time is cleared.
    pub(super) fn check_templates(&mut self, now: Instant, boot_timeout: Duration) {
        if self.template_retry_at.is_some_and(|t| now >= t) {
            self.template_retry_at = None;
        }
        for t in &mut self.templates {
            if t.state == TemplateState::Loading && !t.stopping && now >= t.started + boot_timeout {
                error!(
                    "Template (pid:{}) did not load the application within --boot-timeout ({:.0}s); sending SIGKILL",
                    t.pid,
                    boot_timeout.as_secs_f64()
                );
                let _ = t.tree.signal_main(Signal::SIGKILL);
                // Not `stopping`: its exit is a failure to load.
                t.state = TemplateState::Overdue;
            }
        }
    }

    pub fn templates(&self) -> Vec<TemplateView> {
        self.templates
            .iter()
            .map(|t| TemplateView {
                pid: t.pid.as_raw(),
                generation: t.generation,
                ready: matches!(t.state, TemplateState::Ready { .. }),
                rss_bytes: rss_of(t.pid),
            })
            .collect()
    }
}

/// Resident set size of `pid`, from `/proc/PID/statm`.
fn rss_of(pid: Pid) -> Option<u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page as u64)
}

fn take_pending(t: &mut Template, wid: u64) -> Option<Pending> {
    let at = t.pending.iter().position(|p| p.parts.id == wid)?;
    Some(t.pending.swap_remove(at))
}
