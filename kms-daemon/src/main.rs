//! `kms-daemon` binary entry point.
fn main() {
    eprintln!("kms-daemon: not built yet");
    std::process::exit(2);
}
