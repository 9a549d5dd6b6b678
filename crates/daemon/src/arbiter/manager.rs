//! What systemd hears from us: readiness, reloads, stopping, `STATUS=` and the
//! watchdog, when it started us with `NOTIFY_SOCKET`.

use std::time::Instant;

use crate::notify::ServiceManager;

pub struct Manager {
    manager: Option<ServiceManager>,
    /// When `WATCHDOG=1` is next due.
    watchdog_at: Option<Instant>,
    /// The last `STATUS=` sent, to send only changes.
    status: String,
}

impl Manager {
    pub fn from_env() -> Manager {
        let manager = ServiceManager::from_env();
        let watchdog_at = manager
            .as_ref()
            .and_then(|m| m.watchdog_interval)
            .map(|i| Instant::now() + i);
        Manager {
            manager,
            watchdog_at,
            status: String::new(),
        }
    }

    pub fn service_manager(&self) -> Option<&ServiceManager> {
        self.manager.as_ref()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.watchdog_at
    }

    /// Feed the unit's watchdog when due. `speaking`: we are the service's main
    /// process; a new master whose old one still runs is not yet, but the
    /// deadline still moves, or the loop would spin on it.
    pub fn check(&mut self, now: Instant, speaking: bool) {
        let (Some(m), Some(t)) = (&self.manager, self.watchdog_at) else {
            return;
        };
        if now < t {
            return;
        }
        if speaking {
            m.send("WATCHDOG=1");
        }
        self.watchdog_at = m.watchdog_interval.map(|i| now + i);
    }

    /// Send `extra` (if any) with `status` as `STATUS=`; a bare status is sent only
    /// when it changed. Nothing when not `speaking` (see [`Manager::check`]): a
    /// word from us, STOPPING=1 above all, would be taken as the service's.
    pub fn tell(&mut self, extra: &str, status: String, speaking: bool) {
        let Some(m) = &self.manager else { return };
        if !speaking {
            return;
        }
        let status = format!("STATUS={status}");
        if extra.is_empty() && status == self.status {
            return;
        }
        if extra.is_empty() {
            m.send(&status);
        } else {
            m.send(&format!("{extra}\n{status}"));
        }
        self.status = status;
    }
}
