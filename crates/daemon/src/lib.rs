//! arbiterd: the pre-fork master.
//!
//! [`main`] (in `startup.rs`) turns the command line into a validated
//! [`config::Config`], binds the listeners and writes the pidfile (each failure is
//! one line and exit status 1, with nothing left behind), then hands over to
//! [`arbiter::Arbiter`].

pub mod arbiter;
pub mod builtin;
mod clone;
pub mod code_watch;
pub mod config;
pub mod control;
pub mod daemonize;
pub mod guardian;
pub mod gunicornc;
pub mod listeners;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod pidfile;
pub mod queue;
pub mod ratelimit;
pub mod relay;
pub mod reserve;
pub mod scoreboard;
pub mod signals;
pub mod spawn;
mod startup;
pub mod trees;
pub mod upgrade;
pub mod userpath;
pub mod workers;

pub use startup::main;

/// argv[1] with which the master execs its own binary as the built-in worker.
pub const BUILTIN_WORKER_ARG: &str = "--builtin-worker";
