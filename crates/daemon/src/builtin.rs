//! The built-in HTTP worker (being written).

pub fn run() -> std::process::ExitCode {
    eprintln!("arbiterd: the built-in worker is not built yet");
    std::process::ExitCode::from(3)
}
