//! Start-up: from the command line to a running [`Arbiter`]. A usage error (a bad
//! flag or flag value) is clap's message and exit status 2; every other failure
//! here is one line and exit status 1. Either way nothing is left behind (no
//! socket file, no pidfile, no half-started daemon).

use crate::arbiter;
use crate::listeners::Origin;
use crate::{
    BUILTIN_WORKER_ARG, builtin, config, control, daemonize, error, info, listeners, log, metrics,
    pidfile, spawn, upgrade,
};

use std::process::ExitCode;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("arbiterd: {msg}");
    ExitCode::from(1)
}

pub fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == BUILTIN_WORKER_ARG)
    {
        return builtin::run();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == crate::guardian::GUARDIAN_ARG)
    {
        return crate::guardian::run();
    }
    let mut loader = match config::Loader::from_args() {
        Ok(l) => l,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // A usage error: clap's own words, its "tip:" (did you mean ...) and
            // usage line included, and its exit status 2, as arbiterctl's. A bad
            // config file or an unbindable address stays exit status 1.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // Before --chdir: where an upgrade must start the new master.
    let start = upgrade::StartContext::capture();
    if let Some(dir) = loader.chdir()
        && let Err(e) = std::env::set_current_dir(dir)
    {
        return fail(format!("--chdir {}: {e}", dir.display()));
    }
    loader.pin_base_dir();
    let cfg = match loader.load() {
        Ok(cfg) => cfg,
        Err(e) => return fail(e),
    };
    if let Some(dir) = &cfg.chdir
        && let Err(e) = std::env::set_current_dir(dir)
    {
        return fail(format!("chdir {}: {e}", dir.display()));
    }
    if let Some(mask) = cfg.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if let Err(e) = log::init(cfg.log_level, Some(&cfg.log_file)) {
        return fail(format!("--log-file {}: {e}", cfg.log_file.display()));
    }
    // Nothing the master inherited may leak into a worker.
    listeners::mark_inherited_fds_cloexec();
    spawn::raise_nofile_limit();

    if cfg.check_config {
        println!("arbiterd: configuration ok");
        return ExitCode::SUCCESS;
    }
    // Set by an old master that execs us as its replacement.
    let mut inherited = upgrade::Inherited::from_env();

    let opts = listeners::BindOptions {
        backlog: cfg.backlog,
        reuse_port: cfg.reuse_port,
    };
    let mut socks = match listeners::from_systemd(cfg.backlog) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Some(inh) = &inherited {
        // The old master's own binds come back as they were; ones the (possibly
        // edited) configuration no longer names are dropped. systemd's come
        // without a bind and are matched below, as at a first start.
        for (l, spec) in socks.iter_mut().zip(&inh.specs) {
            if let Some(spec) = spec.as_deref().and_then(|s| config::parse_bind(s).ok()) {
                l.origin = match spec {
                    config::BindSpec::Fd(_) => Origin::Fd,
                    _ => Origin::HandedOver,
                };
                l.spec = Some(spec);
            }
        }
        socks.retain(|l| {
            l.origin == Origin::Systemd || l.spec.as_ref().is_some_and(|s| cfg.binds.contains(s))
        });
    }
    let has_systemd = socks.iter().any(|l| l.origin == Origin::Systemd);
    // systemd's sockets and no bind given: they are all there is to serve.
    let wanted: Vec<config::BindSpec> = if has_systemd && cfg.default_bind {
        Vec::new()
    } else {
        cfg.binds
            .iter()
            .filter(|b| !socks.iter().any(|l| l.spec.as_ref() == Some(b)))
            .cloned()
            .collect()
    };
    let to_bind = listeners::claim(&mut socks, &wanted);
    match listeners::bind_all(&to_bind, &opts) {
        Ok(more) => {
            listeners::log_systemd(&socks, !cfg.default_bind);
            socks.extend(more);
        }
        Err(e) => {
            let msg = match listeners::near_miss(&socks, &e) {
                Some(hint) => format!("{e}; {hint}"),
                None => e.to_string(),
            };
            listeners::close_all(socks);
            return fail(msg);
        }
    }
    // Until promoted, a new master lives beside the old one under `.2` names.
    let (pid_path, control_path) = match &inherited {
        Some(_) => (
            cfg.pidfile.as_deref().map(upgrade::second),
            upgrade::second(&cfg.control),
        ),
        None => (cfg.pidfile.clone(), cfg.control.clone()),
    };
    // A live master's pidfile, or something at its path we will not open (a
    // FIFO, another user's file), is refused before anything else is created,
    // and before detaching, so the refusal reaches the terminal.
    if let Some(path) = &pid_path {
        let refusal = match pidfile::is_held(path) {
            Ok(false) => None,
            Ok(true) => Some(pidfile::PidfileError::Held {
                path: path.clone(),
                pid: pidfile::read_pid(path),
            }),
            Err(err) => Some(pidfile::PidfileError::Io {
                path: path.clone(),
                err,
            }),
        };
        if let Some(e) = refusal {
            listeners::close_all(socks);
            return fail(e);
        }
    }
    let control = match control::ControlServer::bind(&control_path) {
        Ok(c) => c,
        Err(e) => {
            listeners::close_all(socks);
            return fail(e);
        }
    };
    // Bound before detaching, so that a busy port is reported to the terminal.
    let metrics = match bind_metrics(&cfg, inherited.as_mut()) {
        Ok(m) => m,
        Err(e) => {
            listeners::close_all(socks);
            control.shutdown(true);
            return fail(e);
        }
    };
    // Whatever fails from here on closes it (and removes its socket file).
    let close_metrics = |m: Option<metrics::MetricsServer>| {
        if let Some(m) = m {
            m.close(true);
        }
    };
    let under_systemd =
        std::env::var_os("NOTIFY_SOCKET").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    let ready_pipe = inherited.as_mut().and_then(|i| i.ready.take());
    let report = if let Some(fd) = ready_pipe {
        // The old master waits on this pipe, exactly as -D's launcher does.
        Some(daemonize::Report::from_fd(fd))
    } else if cfg.daemon && under_systemd {
        info!("Not detaching (-D): started by systemd (NOTIFY_SOCKET or INVOCATION_ID is set)");
        None
    } else if cfg.daemon {
        if cfg.log_file.as_os_str() == "-" {
            // stderr becomes /dev/null: say so while someone can still read it.
            eprintln!(
                "arbiterd: warning: -D without --log-file: the daemon's log goes to /dev/null (give --log-file PATH to keep it)"
            );
        }
        match daemonize::detach() {
            Ok(r) => Some(r),
            Err(e) => {
                listeners::close_all(socks);
                control.shutdown(true);
                close_metrics(metrics);
                return fail(format!("cannot detach: {e}"));
            }
        }
    } else {
        None
    };
    // Written by the process that stays: after detaching, the daemon's own pid.
    let pidfile = match &pid_path {
        Some(path) => match pidfile::Pidfile::create(path) {
            Ok(p) => Some(p),
            Err(e) => {
                listeners::close_all(socks);
                control.shutdown(true);
                close_metrics(metrics);
                return startup_failed(report, e);
            }
        },
        None => None,
    };
    let detached = cfg.daemon && inherited.is_none() && report.is_some()
        || inherited.is_some() && cfg.daemon
        || under_systemd;
    let setup = arbiter::Setup {
        loader,
        cfg,
        listeners: socks,
        pidfile,
        control: Some(control),
        metrics,
        report,
        detached,
        start,
        scaled: inherited.as_ref().and_then(|i| i.scaled),
        predecessor: inherited.map(|i| (i.from, i.parent)),
    };
    match arbiter::Arbiter::new(setup) {
        Ok(a) => ExitCode::from(a.run()),
        Err((e, report)) => startup_failed(report, format!("cannot set up the master: {e}")),
    }
}

/// The `--metrics-bind` server: the old master's listener when it was bound from
/// the same address (an upgrade), else a new one. The error names the address.
fn bind_metrics(
    cfg: &config::Config,
    inherited: Option<&mut upgrade::Inherited>,
) -> Result<Option<metrics::MetricsServer>, String> {
    let handed = inherited.and_then(|i| i.metrics.take());
    let Some(spec) = &cfg.metrics_bind else {
        return Ok(None);
    };
    if let Some((fd, from)) = handed
        && from == spec.to_string()
    {
        let listener = listeners::Listener::adopted(fd, spec.clone());
        return metrics::MetricsServer::serve(listener)
            .map(Some)
            .map_err(|e| format!("--metrics-bind {spec}: {e}"));
    }
    // The error names the address: `cannot listen on ADDR: why`.
    metrics::MetricsServer::bind(spec)
        .map(Some)
        .map_err(|e| format!("--metrics-bind: {e}"))
}

/// A startup failure after the point where a daemon may have detached: tell the
/// launcher through the pipe, or the terminal.
fn startup_failed(report: Option<daemonize::Report>, msg: impl std::fmt::Display) -> ExitCode {
    match report {
        Some(r) => {
            error!("{msg}");
            r.error(1, &msg.to_string());
            ExitCode::from(1)
        }
        None => fail(msg),
    }
}
