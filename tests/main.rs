//! Black-box tests: the real `arbiterd` and `arbiterctl`, driven from outside.

mod adopt;
mod capacity;
mod cli_table;
mod config_file;
mod control;
mod ctl;
mod daemon_mode;
mod examples;
mod gunicornc;
mod hardening;
mod harness;
mod health;
mod listener_flags;
mod manpages;
mod master;
mod metrics_http;
mod ops;
mod preload;
mod recycle;
mod reliability;
mod scoreboard;
mod table;
mod trees;
mod upgrade;
