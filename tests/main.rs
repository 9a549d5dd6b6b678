//! Black-box tests: the real `arbiterd` and `arbiterctl`, driven from outside.

mod ctl;
mod gunicornc;
mod harness;
mod master;
mod ops;
mod upgrade;
