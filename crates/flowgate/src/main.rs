//! The `flowgate` binary: see `flowgate --help` and the README.

fn main() -> std::process::ExitCode {
    flowgate::cli::main()
}
