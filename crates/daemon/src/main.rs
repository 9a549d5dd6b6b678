fn main() -> std::process::ExitCode {
    arbiter_daemon::main()
}
