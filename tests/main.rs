//! Black-box tests: the real `arbiterd` and `arbiterctl`, driven from outside.

mod gunicornc;
mod harness;
mod master;
