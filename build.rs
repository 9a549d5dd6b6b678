//! Which tools the black-box tests can use here, decided when they are built, so a
//! test that needs a missing tool shows in `cargo test`'s own summary as
//! `ignored, needs gunicorn ...` (libtest has no "skipped" result a test can pick
//! at run time, and a test that returns early reads `ok`).
//!
//! Under CI (`CI=true`, or `ARBITER_REQUIRE_EXAMPLES=1`) every tool counts as
//! present: the test runs, and its own check fails it when the tool is missing, so
//! a broken install cannot hide as a skip.
//!
//! Installing a tool changes the directory it lands in (a PATH directory, Python's
//! site-packages), which reruns this script.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in ["CI", "ARBITER_REQUIRE_EXAMPLES", "PATH", "GUNICORNC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("ARBITER_REQUIRE_EXAMPLES").is_ok_and(|v| v == "1");

    let mut dirs = path_dirs();
    let pythons = pythons();
    for py in &pythons {
        dirs.extend(site_dirs(py));
    }
    dirs.sort();
    dirs.dedup();
    for d in dirs.iter().filter(|d| d.is_dir()) {
        println!("cargo::rerun-if-changed={}", d.display());
    }

    let tools: [(&str, bool); 12] = [
        ("script", binary("script")),
        ("socat", binary("socat")),
        ("logrotate", binary("logrotate")),
        ("man", binary("man")),
        ("zsh", binary("zsh")),
        ("fish", binary("fish")),
        (
            "gunicornc",
            std::env::var_os("GUNICORNC").is_some() || binary("gunicornc"),
        ),
        ("py_gunicorn", imports(&pythons, "gunicorn")),
        ("py_uvicorn", imports(&pythons, "uvicorn")),
        ("node", binary("node")),
        ("go", binary("go")),
        // tests/systemd: a real systemd booted in namespaces of its own.
        (
            "systemd_tier",
            Path::new("/lib/systemd/systemd").exists()
                && binary("unshare")
                && binary("nsenter")
                && nix_is_root(),
        ),
    ];
    for (tool, present) in tools {
        println!("cargo::rustc-check-cfg=cfg(has_{tool})");
        if present || required {
            println!("cargo::rustc-cfg=has_{tool}");
        }
    }
}

/// Root: only root makes the namespaces, mounts and cgroups a booted systemd needs.
fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The PATH directories, and the sbin ones a non-root PATH lacks.
fn path_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs
}

fn binary(name: &str) -> bool {
    path_dirs().iter().any(|d| d.join(name).is_file())
}

/// The interpreters the tests try (`harness::python3`, then `python3` on PATH).
fn pythons() -> Vec<OsString> {
    let mut all: Vec<OsString> = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .map(OsString::from)
        .take(1)
        .collect();
    all.push("python3".into());
    all
}

fn imports(pythons: &[OsString], module: &str) -> bool {
    pythons.iter().any(|py| {
        Command::new(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Where `pip install` puts packages for `py`.
fn site_dirs(py: &OsString) -> Vec<PathBuf> {
    let Ok(out) = Command::new(py)
        .args([
            "-c",
            "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))",
        ])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}
