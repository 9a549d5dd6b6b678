//! The master's side of a hot upgrade: what it does with the files, listeners,
//! clients and systemd as [`Lineage`](super::lineage::Lineage) moves.

use std::path::PathBuf;
use std::time::Duration;

use arbiter_proto::control::{ErrorKind, Response};

use super::Arbiter;
use super::lineage::{PipeOutcome, Sockets};
use crate::control::ClientId;
use crate::{error, info};

impl Arbiter {
    pub(super) fn begin_upgrade(
        &mut self,
        binary: Option<PathBuf>,
        timeout: Duration,
        handover: bool,
    ) -> Result<(), String> {
        if self.shutdown.is_some() {
            return Err("The master is shutting down.".into());
        }
        self.lineage.begin(
            &mut self.events,
            &self.start,
            &self.child_env,
            binary,
            timeout,
            handover,
        )
    }

    pub(super) fn start_new_master(&mut self) {
        let mut env = self.child_env.clone();
        let scaled = crate::upgrade::Scaled {
            target: self.pool.target(),
            configured: self.cfg.workers,
        };
        env.set(crate::upgrade::ENV_WORKERS, scaled.encode());
        let started = self.lineage.start_new_master(
            &mut self.events,
            &self.start,
            Sockets {
                listeners: &self.listeners,
                metrics: self.metrics.as_ref().map(|m| m.listener()),
            },
            &env,
            self.manager.service_manager(),
            self.pidfile.as_mut(),
        );
        if let Err(e) = started {
            self.upgrade_failed(e);
        }
    }

    pub(super) fn on_upgrade_pipe(&mut self) {
        match self.lineage.on_pipe(&mut self.events) {
            None | Some(PipeOutcome::Ready { handover: false }) => {}
            Some(PipeOutcome::Ready { handover: true }) => {
                self.begin_shutdown(super::shutdown::How::Immediate)
            }
            Some(PipeOutcome::Failed(reason)) => self.upgrade_failed(reason),
        }
    }

    /// Give up on the new master: it is asked to quit (KILL follows), our pidfile
    /// gets its name back, and this master carries on serving.
    pub(super) fn upgrade_failed(&mut self, reason: String) {
        let Some(failure) = self.lineage.fail(&mut self.events) else {
            return;
        };
        error!(
            "Upgrade failed: {reason}; this master (pid:{}) carries on",
            self.master_pid
        );
        if failure.renamed_pidfile {
            self.restore_pidfile();
        }
        let resp = Response::err(ErrorKind::Failed, format!("upgrade failed: {reason}"));
        for id in failure.waiters {
            self.reply(id, &resp);
        }
    }

    /// The new master that had taken over (or served beside us) is gone: a
    /// rollback. We are the only master, and systemd's main process, again.
    pub(super) fn successor_gone(
        &mut self,
        reason: String,
        renamed_pidfile: bool,
        waiters: Vec<ClientId>,
    ) {
        error!("{reason}; this master (pid:{}) carries on", self.master_pid);
        if renamed_pidfile {
            self.restore_pidfile();
        }
        let resp = Response::err(ErrorKind::Failed, format!("upgrade failed: {reason}"));
        for id in waiters {
            self.reply(id, &resp);
        }
        // We never handed systemd over (that happens as we exit): we were its
        // main process all along, and only the status changes.
        self.tell_manager("");
    }

    fn restore_pidfile(&mut self) {
        if let (Some(p), Some(base)) = (&mut self.pidfile, &self.cfg.pidfile)
            && let Err(e) = p.rename_to(base)
        {
            error!(
                "Cannot give the pidfile its name back ({}): {e}",
                base.display()
            );
        }
    }

    /// The old master is gone: take the pidfile and control socket names, and own
    /// the unix socket files from now on.
    pub(super) fn promote(&mut self) {
        let Some(old) = self.lineage.promote(&mut self.events) else {
            return;
        };
        if let (Some(p), Some(base)) = (&mut self.pidfile, &self.cfg.pidfile)
            && let Err(e) = p.rename_to(base)
        {
            error!(
                "Promotion: cannot rename the pidfile to {}: {e}",
                base.display()
            );
        }
        if let Some(c) = &mut self.control
            && let Err(e) = c.rename_to(&self.cfg.control)
        {
            error!(
                "Promotion: cannot move the control socket to {}: {e}",
                self.cfg.control.display()
            );
        }
        for l in &mut self.listeners {
            l.own_path();
        }
        if let Some(m) = &mut self.metrics {
            m.own_path();
        }
        info!("Master has been promoted (the old master, pid {old}, is gone).");
        // No MAINPID= of ours: systemd takes us from PIDFile= (which the old
        // master pointed at us) as it reaps the old master, when we are its child.
        // Said now, it could reach systemd before the kernel moved us to it (the
        // pipe's EOF comes a moment before), and systemd would take us for a
        // process it cannot watch, and kill rather than stop us later.
    }
}
