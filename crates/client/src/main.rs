//! The `drover` command: parses the command line and runs [`drover_client::run`].

fn main() -> std::process::ExitCode {
    drover_client::main()
}
