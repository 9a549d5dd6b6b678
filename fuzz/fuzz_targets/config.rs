#![no_main]
//! The config file: arbitrary bytes as a TOML file, through Loader::load (the TOML
//! layer is private). The bind is given on the command line, so the file's bind
//! never reaches DNS.
use std::path::PathBuf;
use std::sync::OnceLock;

use arbiter_daemon::config::Loader;
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (PathBuf, Loader) {
    static S: OnceLock<(PathBuf, Loader)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("arbiter-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        let loader = Loader::from_argv([
            "arbiterd",
            "-c",
            path.to_str().unwrap(),
            "-b",
            "127.0.0.1:9",
        ])
        .unwrap();
        (path, loader)
    })
}

fuzz_target!(|data: &[u8]| {
    let (path, loader) = setup();
    std::fs::write(path, data).unwrap();
    match loader.load() {
        Ok(cfg) => assert!(cfg.workers >= 1),
        Err(e) => assert!(!e.0.is_empty()),
    }
});
