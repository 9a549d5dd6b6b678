//! What is left of an exited worker's tree, and the guardian: a worker's
//! processes that outlive it are TERMed, then KILLed after a bounded grace, and
//! forgotten once gone; the guardian is told of every tree, and started again if
//! it is found gone.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::Pool;
use crate::config::{Config, KillMode};
use crate::guardian::Guardian;
use crate::spawn::ChildEnv;
use crate::trees::Tree;
use crate::workers::Worker;
use crate::{error, info, warning};

/// How long what is left of an exited worker's tree has between TERM and KILL
/// (or `--graceful-timeout`, if shorter).
const TREE_GRACE: Duration = Duration::from_secs(2);
/// How often a KILLed tree is looked at until it is empty.
const TREE_RECHECK: Duration = Duration::from_millis(20);

/// What is left of an exited worker's tree.
pub(super) struct Remains {
    tree: Tree,
    /// When to KILL it (after the TERM), or, once killed, look again.
    next: Instant,
    killed: bool,
    /// The worker's scoreboard entry: a process of its tree may still write to
    /// it, so it is handed out again only once the tree is gone.
    board: Option<u32>,
}

impl Pool {
    /// The guardian was found gone: start another and tell it of every tree.
    pub(super) fn revive_guardian(&mut self, cfg: &Config, env: &ChildEnv) {
        if !self.guardian.as_ref().is_some_and(|g| g.is_lost()) {
            return;
        }
        error!("The guardian is gone; starting another");
        // Off while it starts, so that it is not adopted back by us.
        let _ = nix::sys::prctl::set_child_subreaper(false);
        self.guardian = Guardian::start(&cfg.name, self.containment.cgroup_root(), env)
            .inspect_err(|e| error!("Cannot start the guardian: {e}"))
            .ok();
        let _ = nix::sys::prctl::set_child_subreaper(true);
        if let Some(g) = &mut self.guardian {
            for w in &self.workers {
                g.watch(w.pid);
            }
            for r in &self.remains {
                g.watch(r.tree.pid);
            }
        }
    }

    /// The master exits on its own: the guardian has nothing to do, our cgroups go.
    pub fn tear_down(&mut self) {
        if let Some(g) = self.guardian.take() {
            g.dismiss();
        }
        self.containment.tear_down();
    }

    /// An exited worker's tree: gone, or TERMed with KILL to follow.
    pub(super) fn bury(&mut self, w: &Worker, now: Instant, cfg: &Config) {
        let left = w.tree.remaining();
        if left.is_empty() {
            self.forget_tree(&w.tree);
            self.release_board(w.board);
            return;
        }
        let shown: Vec<String> = left.iter().map(|(p, c)| format!("{p} ({c})")).collect();
        if w.kill_mode == KillMode::Process {
            info!(
                "Worker (pid:{}) exited; --kill-mode process leaves its processes running: {}",
                w.pid,
                shown.join(", ")
            );
            // Left running for good: holding the entry back would lose it for
            // the master's life. A stray writer can only mislead its next owner.
            self.release_board(w.board);
            return;
        }
        warning!(
            "Worker (pid:{}) exited but left processes running: {}; sending SIGTERM",
            w.pid,
            shown.join(", ")
        );
        let tree = Tree::new(w.pid, w.tree.cgroup.clone());
        let _ = tree.signal_all(Signal::SIGTERM);
        self.remains.push(Remains {
            tree,
            next: now + cfg.graceful_timeout.min(TREE_GRACE),
            killed: false,
            board: w.board,
        });
    }

    pub(super) fn release_board(&mut self, board: Option<u32>) {
        if let (Some(sb), Some(i)) = (&mut self.scoreboard, board) {
            sb.release(i);
        }
    }

    pub(super) fn forget_tree(&mut self, tree: &Tree) {
        tree.remove();
        if let Some(g) = &mut self.guardian {
            g.forget(tree.pid);
        }
    }

    /// What is left of exited workers' trees: gone (forget it), or due for KILL.
    pub(super) fn check_remains(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (i, r) in self.remains.iter_mut().enumerate() {
            if now < r.next {
                continue;
            }
            if !r.tree.is_populated() {
                gone.push(i);
                continue;
            }
            if !r.killed {
                let left: Vec<String> = r
                    .tree
                    .remaining()
                    .iter()
                    .map(|(p, c)| format!("{p} ({c})"))
                    .collect();
                warning!(
                    "What worker (pid:{}) left still runs after SIGTERM: {}; sending SIGKILL",
                    r.tree.pid,
                    left.join(", ")
                );
                let _ = r.tree.signal_all(Signal::SIGKILL);
                r.killed = true;
            }
            r.next = now + TREE_RECHECK;
        }
        for i in gone.into_iter().rev() {
            let r = self.remains.swap_remove(i);
            self.forget_tree(&r.tree);
            self.release_board(r.board);
        }
    }

    /// When something left of an exited worker's tree is next due.
    pub(super) fn remains_due(&self) -> Option<Instant> {
        self.remains.iter().map(|r| r.next).min()
    }

    /// The shutdown deadline passed: KILL what is left of every tree.
    pub(super) fn kill_remains(&mut self) {
        for r in &mut self.remains {
            let _ = r.tree.signal_all(Signal::SIGKILL);
            r.killed = true;
        }
    }
}
