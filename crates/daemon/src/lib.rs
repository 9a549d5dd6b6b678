//! arbiterd: the pre-fork master.
//!
//! `main` turns the command line into a validated [`config::Config`], binds the
//! listeners and writes the pidfile (each failure is one line and exit status 1,
//! with nothing left behind), then hands over to [`arbiter::Arbiter`].

pub mod arbiter;
pub mod builtin;
pub mod config;
pub mod control;
pub mod gunicornc;
pub mod listeners;
pub mod log;
pub mod notify;
pub mod pidfile;
pub mod signals;
pub mod spawn;
pub mod workers;

use std::process::ExitCode;

use clap::Parser;

/// argv[1] with which the master execs its own binary as the built-in worker.
pub const BUILTIN_WORKER_ARG: &str = "--builtin-worker";

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
    let cli = match config::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // SPEC: a bad flag is one line and exit status 1 (clap's default is 2).
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    if let Some(dir) = &cli.chdir
        && let Err(e) = std::env::set_current_dir(dir)
    {
        return fail(format!("--chdir {}: {e}", dir.display()));
    }
    let cfg = match config::Config::from_cli(cli) {
        Ok(cfg) => cfg,
        Err(e) => return fail(e),
    };
    if let Some(mask) = cfg.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if let Err(e) = log::init(cfg.log_level, Some(&cfg.log_file)) {
        return fail(format!("--log-file {}: {e}", cfg.log_file.display()));
    }
    // Nothing the master inherited may leak into a worker.
    listeners::mark_inherited_fds_cloexec();
    spawn::raise_nofile_limit();

    let opts = listeners::BindOptions {
        backlog: cfg.backlog,
        reuse_port: cfg.reuse_port,
    };
    let mut socks = match listeners::from_systemd(cfg.backlog) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if socks.is_empty() || !cfg.default_bind {
        if !socks.is_empty() {
            info!(
                "Using {} socket(s) from systemd and the --bind addresses",
                socks.len()
            );
        }
        match listeners::bind_all(&cfg.binds, &opts) {
            Ok(more) => socks.extend(more),
            Err(e) => {
                listeners::close_all(socks);
                return fail(e);
            }
        }
    }
    let pidfile = match &cfg.pidfile {
        Some(path) => match pidfile::Pidfile::create(path) {
            Ok(p) => Some(p),
            Err(e) => {
                listeners::close_all(socks);
                return fail(e);
            }
        },
        None => None,
    };
    let control = match control::ControlServer::bind(&cfg.control) {
        Ok(c) => c,
        Err(e) => {
            listeners::close_all(socks);
            if let Some(p) = pidfile {
                p.remove();
            }
            return fail(e);
        }
    };
    let arbiter = match arbiter::Arbiter::new(cfg, socks, pidfile, Some(control)) {
        Ok(a) => a,
        Err(e) => return fail(format!("cannot set up signal handling: {e}")),
    };
    ExitCode::from(arbiter.run())
}
