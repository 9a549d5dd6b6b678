//! Black-box tests: the real `arbiterd` and `arbiterctl`, driven from outside.

mod harness;
mod master;
