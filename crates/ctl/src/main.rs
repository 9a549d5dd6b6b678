fn main() -> std::process::ExitCode {
    arbiter_ctl::main()
}
