//! What both sides of every arbiter boundary agree on.
//!
//! - [`worker`]: the worker contract (environment, file descriptors, exit codes,
//!   heartbeat and readiness helpers a Rust worker can call).
//!
//! The control protocol (request/response, status snapshot, framing, client) lives
//! here too once the control socket exists.

pub mod worker;
