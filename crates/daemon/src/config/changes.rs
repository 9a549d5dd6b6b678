//! What a reload would change, said before it is applied.

use super::Config;

/// What a reload changes, one line each (`workers 2 -> 3`), and what it cannot
/// change without a restart.
pub fn describe_changes(old: &Config, new: &Config) -> (Vec<String>, Vec<&'static str>) {
    let mut changed = Vec::new();
    let mut restart = Vec::new();
    macro_rules! diff {
        ($label:literal, $field:ident) => {
            if old.$field != new.$field {
                changed.push(format!("{} {:?} -> {:?}", $label, old.$field, new.$field));
            }
        };
    }
    let count = |c: &Config| c.autoscale.map_or(c.workers.to_string(), |r| r.to_string());
    if count(old) != count(new) {
        changed.push(format!("workers {} -> {}", count(old), count(new)));
    }
    if old.max_workers != new.max_workers {
        changed.push(format!(
            "max-workers {} -> {}",
            old.max_workers, new.max_workers
        ));
    }
    diff!("bind", binds);
    diff!("timeout", timeout);
    diff!("graceful-timeout", graceful_timeout);
    diff!("shutdown-delay", shutdown_delay);
    diff!("ready-min", ready_min);
    diff!("boot-timeout", boot_timeout);
    diff!("kill-mode", kill_mode);
    diff!("ready", ready);
    diff!("log-file", log_file);
    diff!("log-level", log_level);
    diff!("backlog", backlog);
    diff!("max-worker-rss", max_worker_rss);
    diff!("max-worker-age", max_worker_age);
    diff!("max-requests", max_requests);
    diff!("max-requests-jitter", max_requests_jitter);
    if old.env != new.env {
        // Names only: values may be secrets.
        let keys = |c: &Config| c.env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        changed.push(format!("env {:?} -> {:?}", keys(old), keys(new)));
    }
    diff!("reuse-port", reuse_port);
    diff!("reload-on-change", reload_on_change);
    if old.program != new.program {
        // Not the arguments themselves: they may carry secrets.
        changed.push("command changed".to_string());
    }
    let user = |c: &Config| c.user.as_ref().map(|u| u.name.clone());
    let group = |c: &Config| c.group.as_ref().map(|g| g.name.clone());
    if user(old) != user(new) {
        changed.push(format!("user {:?} -> {:?}", user(old), user(new)));
    }
    if group(old) != group(new) {
        changed.push(format!("group {:?} -> {:?}", group(old), group(new)));
    }
    for (differs, name) in [
        (old.name != new.name, "name"),
        (old.pidfile != new.pidfile, "pid"),
        (old.control != new.control, "control"),
        (old.metrics_bind != new.metrics_bind, "metrics-bind"),
        (old.daemon != new.daemon, "daemon"),
        (old.umask != new.umask, "umask"),
        (old.chdir != new.chdir, "chdir"),
    ] {
        if differs {
            restart.push(name);
        }
    }
    (changed, restart)
}
