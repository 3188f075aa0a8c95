//! Command-line interface (being written).

/// Runs the CLI.
#[must_use]
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
