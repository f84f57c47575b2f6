//! drover-client: the `drover` command line.
//!
//! # Layout
//!
//! - [`Cli`]: the commands and their flags (clap).
//! - [`session`]: connecting to the controller (mutual TLS, Hello) and sending requests.
//! - [`output`]: zeek-client's JSON output shapes, so scripts written for it keep working.
//! - [`ca`]: `drover ca init|issue`, the cluster PKI.
//!
//! Errors are printed as one line on stderr (`error: ...`) with exit status 1; never a
//! backtrace.

pub mod ca;
pub mod output;
pub mod session;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use drover_proto::msg::ClientRequest;

use crate::session::Session;

/// The default controller address.
pub const DEFAULT_CONTROLLER: &str = "127.0.0.1:2150";

/// drover: run long-lived processes across hosts.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about)]
pub struct Cli {
    /// The controller, as HOST:PORT.
    #[arg(long, global = true, env = "DROVER_CONTROLLER", default_value = DEFAULT_CONTROLLER)]
    pub controller: String,
    /// Cluster CA certificate (PEM).
    #[arg(long, global = true, env = "DROVER_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "DROVER_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM, mode 0600).
    #[arg(long, global = true, env = "DROVER_KEY")]
    pub key: Option<PathBuf>,
    /// How long to wait for the controller's answer.
    #[arg(long, global = true, env = "DROVER_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the cluster's certificate authority.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// List the instances (agents) connected to the controller.
    GetInstances,
}

/// Parses the command line, runs it, and reports errors; the exit code of `drover`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Ca(cmd) => ca::run(cmd),
        Command::GetInstances => {
            let rt = runtime()?;
            rt.block_on(async {
                let session = Session::connect(&cli).await?;
                let reply = session.request(&ClientRequest::GetInstances).await?;
                session.close().await;
                let (json, ok) = output::get_instances(&reply);
                output::print_json(&json)?;
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}
