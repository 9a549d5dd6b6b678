//! arbiterd: the pre-fork master.

pub mod builtin;
pub mod signals;

/// argv[1] with which the master execs its own binary as the built-in worker.
pub const BUILTIN_WORKER_ARG: &str = "--builtin-worker";

pub fn main() -> std::process::ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == BUILTIN_WORKER_ARG) {
        return builtin::run();
    }
    std::process::ExitCode::SUCCESS
}
