//! `sealvol` command-line entry point: parse arguments, run, map errors to exit codes.

fn main() -> std::process::ExitCode {
    sealvol::cli::main()
}
