//! Black-box tests: the real `arbiterd` and `arbiterctl`, driven from outside.

mod ctl;
mod daemon_mode;
mod gunicornc;
mod harness;
mod health;
mod master;
mod ops;
mod upgrade;
