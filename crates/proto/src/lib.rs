//! What both sides of every arbiter boundary agree on.
//!
//! - [`control`]: the control protocol (requests, responses, errors, version).
//! - [`status`]: the status snapshot.
//! - [`frame`]: newline-delimited framing with a size bound.
//! - [`client`]: a blocking client with timeouts (arbiterctl and the tests use it).
//! - [`metrics`]: the status snapshot as Prometheus text (arbiterctl and arbiterd).
//! - [`options`]: arbiterd's options as data (which take a value, which are
//!   config-file keys), for arbiterctl and the config file.
//! - [`paths`]: default locations (the control socket).
//! - [`scoreboard`]: the shared memory where workers say busy or idle.
//! - [`signal`]: signal names and numbers as `kill` takes them.
//! - [`worker`]: the worker contract (environment, file descriptors, exit codes,
//!   heartbeat and readiness helpers a Rust worker can call).

pub mod client;
pub mod control;
pub mod frame;
pub mod metrics;
pub mod options;
pub mod paths;
pub mod scoreboard;
pub mod signal;
pub mod status;
pub mod worker;
