//! The `hybridlet` binary: parse, load configuration, run, map errors to exit codes.
//! Everything else lives in the library crates.

fn main() -> std::process::ExitCode {
    hybridlet::main_entry(std::env::args_os())
}
