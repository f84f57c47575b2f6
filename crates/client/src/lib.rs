//! drover-client: the `drover` command line.
//!
//! # Layout
//!
//! - [`Cli`]: the commands and their flags (clap).
//! - [`session`]: connecting to the controller (mutual TLS, Hello) and sending requests.
//! - [`output`]: zeek-client's JSON output shapes, so scripts written for it keep working.
//! - [`ca`]: `drover ca init|issue`, the cluster PKI.
//! - [`settings`]: defaults, config file, environment and flags, with zeek-client's
//!   precedence.
//! - [`table`]: human-readable tables (`-o table`, `status`).
//! - [`stdio`]: stdout and stderr, whose readers may go away (`drover status | head`).
//! - [`visible`]: text from nodes made safe to show on a terminal.
//!
//! Errors are printed as one line on stderr (`error: ...`) with exit status 1; never a
//! backtrace.

// Output goes through `stdio`, which survives a reader that went away.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod ca;
mod follow;
mod interrupt;
pub mod output;
pub mod session;
pub mod settings;
pub mod stdio;
pub mod table;
pub mod visible;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::session::Session;
use crate::settings::Settings;

/// drover: run long-lived processes across hosts.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about)]
pub struct Cli {
    /// Settings file [default: ~/.config/drover/client.toml].
    #[arg(short = 'c', long, global = true, env = "DROVER_CLIENT_CONFIG")]
    pub config_file: Option<PathBuf>,
    /// Override a setting (repeatable), e.g. --set client.pretty_json=false.
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// The controller, as HOST:PORT (either part may be left out) [default: 127.0.0.1:2150].
    #[arg(long, global = true, env = "DROVER_CONTROLLER")]
    pub controller: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, global = true, env = "DROVER_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "DROVER_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM, mode 0600).
    #[arg(long, global = true, env = "DROVER_KEY")]
    pub key: Option<PathBuf>,
    /// How long to wait for the controller's answer [default: 20s].
    #[arg(long, global = true, env = "DROVER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Output format of get-nodes and get-instances (status always prints a table).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Json)]
    pub output: Format,
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
    /// Validate a cluster file and store it as the staged configuration.
    StageConfig {
        /// The cluster file (TOML or Zeek INI), or - for standard input.
        file: String,
        /// Role templates and node defaults for the nodes of a Zeek INI file, which name
        /// no command (TOML with [defaults] and [roles.NAME], as the controller's
        /// --zeek-roles); a TOML cluster file has these tables itself.
        #[arg(long, env = "DROVER_ROLES", value_name = "FILE")]
        roles: Option<PathBuf>,
        /// Accept a file without instances or nodes: deployed, it stops and removes
        /// every node.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Deploy the staged configuration: it becomes the desired state under a new
    /// generation, which every agent is brought to.
    Deploy {
        /// Restart every node, not only those whose spec changed.
        #[arg(long)]
        restart_all: bool,
        /// Deploy only if the staged configuration still has this id (another client
        /// may have staged since).
        #[arg(long, value_name = "ID")]
        expect_id: Option<String>,
    },
    /// Stage a cluster file and deploy it (and nothing another client staged meanwhile).
    DeployConfig {
        /// The cluster file (TOML or Zeek INI), or - for standard input.
        file: String,
        /// Role templates and node defaults for the nodes of a Zeek INI file, which name
        /// no command (TOML with [defaults] and [roles.NAME], as the controller's
        /// --zeek-roles); a TOML cluster file has these tables itself.
        #[arg(long, env = "DROVER_ROLES", value_name = "FILE")]
        roles: Option<PathBuf>,
        /// Restart every node, not only those whose spec changed.
        #[arg(long)]
        restart_all: bool,
        /// Accept a file without instances or nodes: deployed, it stops and removes
        /// every node.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Show the staged (default) or deployed configuration, as Zeek INI by default.
    GetConfig {
        /// The deployed configuration.
        #[arg(long, conflicts_with = "staged")]
        deployed: bool,
        /// The staged configuration (the default).
        #[arg(long)]
        staged: bool,
        /// Print JSON (zeek-client's --as-json shape).
        #[arg(long, conflicts_with = "as_toml")]
        as_json: bool,
        /// Print drover's TOML cluster file, the lossless form.
        #[arg(long)]
        as_toml: bool,
        /// Write to this file instead of standard output.
        #[arg(short = 'f', long = "filename")]
        filename: Option<PathBuf>,
    },
    /// The status of every node on every connected instance, as agents last reported it
    /// (an agent is asked directly right after an operation on it).
    GetNodes {
        /// Ask every agent now, for current RSS and CPU figures.
        #[arg(long)]
        fresh: bool,
        /// Every field agents report for each node (restarts, start time, memory and
        /// CPU, generation, how it last ended, its status text, ...), not only those
        /// of zeek-client's shape.
        #[arg(long)]
        full: bool,
    },
    /// Ask running nodes for the value of an identifier (all nodes when none are named).
    GetIdValue {
        /// The identifier.
        id: String,
        /// Targets: node names (`*` and `?` match as in a shell), role:ROLE or
        /// instance:NAME.
        nodes: Vec<String>,
    },
    /// Restart nodes (all when none are named); each is reported once ready again,
    /// waited for as long as its stop_timeout and readiness timeout allow.
    Restart {
        /// Targets: node names (`*` and `?` match as in a shell), role:ROLE or
        /// instance:NAME.
        nodes: Vec<String>,
        /// Rolling restart: this many nodes at a time, stopping at the first failure.
        #[arg(long, value_parser = at_least_one)]
        batch: Option<usize>,
        /// Wait for each batch to be ready before the next (always the case; accepted
        /// for clarity in scripts).
        #[arg(long)]
        wait_ready: bool,
    },
    /// Stop nodes (all when none are named); they stay stopped until started. Each is
    /// reported once its processes have ended: at most its stop_timeout, then killed.
    Stop {
        /// Targets: node names (`*` and `?` match as in a shell), role:ROLE or
        /// instance:NAME.
        nodes: Vec<String>,
    },
    /// Start stopped nodes (all when none are named); each is reported once ready,
    /// waited for as long as its readiness timeout allows.
    Start {
        /// Targets: node names (`*` and `?` match as in a shell), role:ROLE or
        /// instance:NAME.
        nodes: Vec<String>,
    },
    /// Show a node's output: the last lines of its stdout (on stdout) and stderr (on
    /// stderr); with -f, keep following new lines until interrupted.
    Logs {
        /// The node.
        #[arg(value_parser = node_name)]
        node: String,
        /// How many lines of each stream to show first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Follow new lines as they are written.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this stream.
        #[arg(long, value_enum)]
        stream: Option<StreamArg>,
        /// Print the lines exactly as written, also to a terminal. Without it, control
        /// characters other than tab (escape sequences, carriage returns) and
        /// bidirectional overrides are printed written out, as `\x1b`, where the output
        /// is a terminal; to a pipe or a file the lines always go as written.
        #[arg(long)]
        raw: bool,
    },
    /// A human overview: every instance and node with state, pid, restarts, uptime and
    /// current memory (it asks every agent, as `get-nodes --fresh`).
    Status {
        /// Only these: node names (`*` matches any run of characters and `?` any one;
        /// quote them from the shell), role:ROLE or instance:NAME. A target that
        /// matches no node is an error.
        targets: Vec<String>,
    },
    /// Print the effective client settings.
    ShowSettings,
    /// Print cluster events as they happen, one JSON object per line, until interrupted.
    Monitor {
        /// Also print every deployed node's output lines as events.
        #[arg(long)]
        logs: bool,
    },
    /// The controller's audit trail: every request that changed something or was
    /// refused, oldest first, one JSON object per line.
    Audit {
        /// Only entries since this time: a duration back from now (`1h`, `30m`) or an
        /// RFC 3339 time (`2026-01-31T12:00:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
        /// Only entries of this client: its name, `client/NAME`, or a certificate
        /// serial (`serial:HEX`).
        #[arg(long, value_parser = parse_who)]
        who: Option<String>,
        /// At most this many entries, the newest.
        #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
        limit: usize,
    },
    /// Send a signal to nodes (all when none are named), e.g. `drover signal HUP w1`.
    Signal {
        /// The signal, by name (HUP, SIGUSR1) or number.
        signal: String,
        /// Targets: node names (`*` and `?` match as in a shell), role:ROLE or
        /// instance:NAME.
        nodes: Vec<String>,
    },
    /// Test request timeouts.
    TestTimeout {
        /// Let the controller answer with a timeout result instead of staying silent.
        #[arg(long)]
        with_state: bool,
    },
}

/// A `--who`: a name, `ROLE/NAME`, or `serial:HEX` whose serial is hex, so that a
/// mistyped serial is an error rather than an empty answer.
fn parse_who(s: &str) -> Result<String, String> {
    if let Some(serial) = s.strip_prefix("serial:") {
        let hex = serial.replace(':', "");
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "'{serial}' is not a hex serial (such as 1a2b or 1A:2B)"
            ));
        }
        // A controller that predates colons in serials compares the bare hex.
        return Ok(format!("serial:{hex}"));
    }
    if s.is_empty() {
        return Err("names nobody".to_owned());
    }
    let (role, name) = s.split_once('/').unwrap_or(("client", s));
    let hex_with_colons = s.contains(':')
        && s.chars().all(|c| c == ':' || c.is_ascii_hexdigit())
        && s.chars().any(|c| c.is_ascii_hexdigit());
    let known = ["client", "agent", "controller"].contains(&role)
        && drover_proto::name::check(name).is_ok();
    if known || hex_with_colons {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' names no certificate: give its name, ROLE/NAME (client/ops) or serial:HEX"
        ))
    }
}

/// A node's name, as cluster files allow them.
fn node_name(s: &str) -> Result<String, String> {
    drover_proto::name::check(s).map(|()| s.to_owned())
}

/// A count of at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--since`: a duration back from now or an RFC 3339 time, as milliseconds since the
/// Unix epoch.
fn parse_since(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now();
    let at = match humantime::parse_duration(s) {
        Ok(back) => now.checked_sub(back).ok_or("reaches before 1970")?,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!(
                "'{s}' is neither a duration such as 1h nor a time such as 2026-01-31T12:00:00Z"
            )
        })?,
    };
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "reaches before 1970".to_owned())?
        .as_millis();
    Ok(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// zeek-client's JSON.
    Json,
    /// A human-readable table.
    Table,
}

/// A node's output stream, on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StreamArg {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl StreamArg {
    fn stream(self) -> drover_proto::model::LogStream {
        match self {
            Self::Stdout => drover_proto::model::LogStream::Stdout,
            Self::Stderr => drover_proto::model::LogStream::Stderr,
        }
    }
}

/// Parses the command line, runs it, and reports errors; the exit code of `drover`.
pub fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `ca renew --key` names the key to renew; the client's own key (DROVER_KEY, or
    // `--key` before the command) must not stand in for it.
    if let Command::Ca(ca::CaCommand::Renew { key, .. }) = &mut cli.command
        && !renew_key_given(
            matches
                .subcommand_matches("ca")
                .and_then(|m| m.subcommand_matches("renew"))
                .and_then(|m| m.value_source("key")),
            std::env::args_os(),
        )
    {
        *key = None;
    }
    // A script asking `status` for JSON must not get a table as if it were.
    if matches!(cli.command, Command::Status { .. })
        && cli.output == Format::Json
        && matches.value_source("output") == Some(clap::parser::ValueSource::CommandLine)
    {
        clap::Error::raw(
            clap::error::ErrorKind::ArgumentConflict,
            "status prints a table; `drover get-nodes` prints zeek-client's JSON\n",
        )
        .exit();
    }
    let ran = run(cli);
    interrupt::await_death_if_signalled();
    match ran {
        Ok(code) => code,
        Err(e) => {
            if let Some(refused) = e.downcast_ref::<FileHasErrors>() {
                // Best effort: the error on stderr says it all for a person.
                let _ = refused.print_json();
            }
            // What a file or a peer put in an error (a key path, a name) may hold
            // characters that would rewrite the terminal: written out, line by line.
            let text = drover_proto::error_text::one_line(e.as_ref());
            let lines: Vec<_> = text.split('\n').map(visible::visible).collect();
            stdio::errln(&format!("error: {}", lines.join("\n")));
            ExitCode::FAILURE
        }
    }
}

/// Whether `--key` was given to `ca renew` itself: on its command line after `renew`,
/// not from DROVER_KEY or as the client's own `--key` before the command (clap takes
/// both for one argument).
fn renew_key_given(
    source: Option<clap::parser::ValueSource>,
    args: impl Iterator<Item = std::ffi::OsString>,
) -> bool {
    if source != Some(clap::parser::ValueSource::CommandLine) {
        return false;
    }
    args.skip_while(|a| a != "renew")
        .any(|a| a == "--key" || a.to_string_lossy().starts_with("--key="))
}

/// The JSON of a reply that acts on nodes, with why each failed node failed told on
/// stderr first (see [`output::node_failures`]).
fn told(
    reply: &drover_proto::msg::ClientResponse,
    what: output::Told,
    json: impl FnOnce(&drover_proto::msg::ClientResponse) -> (serde_json::Value, bool),
) -> (serde_json::Value, bool) {
    stdio::err(&output::node_failures(reply, what));
    json(reply)
}

/// An I/O error as a message part: lower case, without Rust's "(os error N)".
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text
        .rfind(" (os error ")
        .map_or(text.as_str(), |i| &text[..i])
        .to_owned();
    let mut chars = text.chars();
    chars
        .next()
        .map_or_else(String::new, |c| c.to_lowercase().chain(chars).collect())
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Ca(cmd) = &cli.command {
        return ca::run(cmd);
    }
    let settings = Settings::load(&cli)?;
    if let Command::ShowSettings = &cli.command {
        stdio::outln(settings.render()?.trim_end())?;
        return Ok(ExitCode::SUCCESS);
    }
    // Before the runtime starts its threads, which inherit the blocked signals.
    interrupt::install();
    let rt = runtime()?;
    rt.block_on(async {
        let (staged, session) = match &cli.command {
            Command::StageConfig {
                file,
                roles,
                allow_empty,
            }
            | Command::DeployConfig {
                file,
                roles,
                allow_empty,
                ..
            } => {
                let (file, roles, allow_empty) = (file.clone(), roles.clone(), *allow_empty);
                let read = move || {
                    read_cluster_file(&file, roles.as_deref())
                        .and_then(|c| not_empty(c, &file, allow_empty))
                        .and_then(fits_in_a_frame)
                };
                let (config, session) =
                    read_while_connecting(&settings, read)
                        .await
                        .map_err(|mut e| {
                            if let Some(refused) = e.downcast_mut::<FileHasErrors>() {
                                refused.pretty = settings.client.pretty_json;
                            }
                            e
                        })?;
                (Some(config), session)
            }
            _ => (None, Session::connect(&settings).await?),
        };
        if let Some(what) = following(&cli.command) {
            return follow::run(&settings, session, &what).await;
        }
        let result = command(&cli, &settings, &session, staged)
            .await
            .map_err(
                |e| match (session.lost_under_way(), unknown_outcome(&cli.command)) {
                    (true, Some(hint)) => anyhow::anyhow!(
                        "{}; {hint}",
                        drover_proto::error_text::one_line(e.as_ref())
                    ),
                    _ => e,
                },
            );
        session.close().await;
        result
    })
}

/// Reads and checks a cluster file (`read`, on a thread of its own) while the connection
/// is made, which takes about as long: a deploy starts sooner. A bad file is told
/// alone, at once, whatever becomes of the connection (dropped unused), as if it had
/// been read first; so is the controller's warning, only once the file is good.
async fn read_while_connecting<T: Send + 'static>(
    settings: &Settings,
    read: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<(T, Session)> {
    let mut reading = tokio::task::spawn_blocking(read);
    let mut connecting = std::pin::pin!(Session::connect_untold(settings));
    let mut connected = None;
    let read = loop {
        tokio::select! {
            read = &mut reading => {
                break read.map_err(|e| anyhow::anyhow!("reading the cluster file failed: {e}"))??;
            }
            session = &mut connecting, if connected.is_none() => connected = Some(session),
        }
    };
    let session = match connected {
        Some(session) => session?,
        None => connecting.await?,
    };
    session.tell_welcome();
    Ok((read, session))
}

/// For a command that changes something, what to tell when its connection was lost
/// before the answer came: it may have been carried out.
fn unknown_outcome(command: &Command) -> Option<&'static str> {
    match command {
        Command::Deploy { .. } | Command::DeployConfig { .. } => Some(
            "it went away before it answered, so whether the deploy was recorded is not \
             known: `drover status` shows the generation in effect and `drover get-config \
             --deployed` its configuration",
        ),
        Command::StageConfig { .. } => Some(
            "it went away before it answered, so whether the configuration was staged is \
             not known: `drover get-config` shows the staged one",
        ),
        Command::Restart { .. }
        | Command::Stop { .. }
        | Command::Start { .. }
        | Command::Signal { .. } => Some(
            "it went away before it answered, so whether the request was carried out is \
             not known: `drover status` shows the nodes",
        ),
        _ => None,
    }
}

pub(crate) fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The commands that follow until interrupted, through a change of controller.
fn following(command: &Command) -> Option<follow::Follow> {
    match command {
        Command::Logs {
            node,
            lines,
            follow: true,
            stream,
            raw,
        } => Some(follow::Follow::Logs {
            node: node.clone(),
            lines: *lines,
            stream: stream.map(StreamArg::stream),
            escapes: visible::Escapes::for_terminals(*raw),
        }),
        Command::Monitor { logs } => Some(follow::Follow::Monitor { logs: *logs }),
        _ => None,
    }
}

/// Prints a table on stdout, then its errors and warnings on stderr.
fn show(shown: &table::Shown) -> anyhow::Result<ExitCode> {
    if !shown.table.is_empty() {
        stdio::outln(&shown.table)?;
    }
    for note in shown.notes() {
        stdio::errln(&note);
    }
    Ok(exit(shown.ok()))
}

async fn command(
    cli: &Cli,
    settings: &Settings,
    session: &Session,
    staged: Option<drover_proto::Configuration>,
) -> anyhow::Result<ExitCode> {
    use drover_proto::msg::ClientRequest as R;
    let (json, ok) = match &cli.command {
        Command::Ca(_) | Command::ShowSettings => unreachable!("handled before connecting"),
        Command::GetInstances if cli.output == Format::Table => {
            let reply = session.request(&R::GetInstances).await?;
            // The agents' applied generations are in their own get-nodes entries; the
            // table goes without them if that request fails.
            let nodes = session.request(&R::GetNodes { fresh: false }).await.ok();
            let nodes = nodes.as_ref().map(output::results).unwrap_or_default();
            let shown = table::instances(output::results(&reply).first().copied(), &nodes);
            return show(&shown);
        }
        Command::GetNodes { .. } | Command::Status { .. }
            if cli.output == Format::Table || matches!(cli.command, Command::Status { .. }) =>
        {
            let (fresh, only) = match &cli.command {
                Command::GetNodes { fresh, .. } => (*fresh, &[][..]),
                Command::Status { targets } => (true, &targets[..]),
                _ => (true, &[][..]),
            };
            let reply = session.request(&R::GetNodes { fresh }).await?;
            return show(&table::nodes(&output::results(&reply), only));
        }
        Command::Status { .. } => unreachable!("always a table"),
        Command::GetInstances => output::get_instances(&session.request(&R::GetInstances).await?),
        Command::StageConfig { .. } => {
            let config = Box::new(staged.expect("read above"));
            let reply = session.request(&R::StageConfig { config }).await?;
            stdio::err(&output::stage_refusals(&reply));
            output::stage_config(&reply)
        }
        Command::Deploy {
            restart_all,
            expect_id,
        } => told(
            &deploy(
                session,
                *restart_all,
                Expect {
                    id: expect_id.clone(),
                    stage: None,
                },
            )
            .await?,
            output::Told::Deploy,
            output::deploy,
        ),
        Command::DeployConfig { restart_all, .. } => {
            let config = Box::new(staged.expect("read above"));
            let reply = session.request(&R::StageConfig { config }).await?;
            let (json, ok) = output::stage_config(&reply);
            if !ok {
                stdio::err(&output::stage_refusals(&reply));
                output::print_json(&json, settings.client.pretty_json)?;
                return Ok(exit(false));
            }
            // Deploy what was just staged, not what another client staged since: by the
            // stage request, as two files may carry one id (an older controller, which
            // does not know it, compares the id only).
            let stage = match &reply {
                drover_proto::msg::ClientResponse::Results(r) => r.first().map(|m| m.reqid.clone()),
                drover_proto::msg::ClientResponse::Result(m) => Some(m.reqid.clone()),
                _ => None,
            };
            let expect = Expect {
                id: json["results"]["id"].as_str().map(str::to_owned),
                stage,
            };
            told(
                &deploy(session, *restart_all, expect).await?,
                output::Told::Deploy,
                output::deploy,
            )
        }
        Command::GetConfig {
            deployed,
            as_json,
            as_toml,
            filename,
            ..
        } => {
            let reply = session
                .request(&R::GetConfig {
                    deployed: *deployed,
                })
                .await?;
            let Some(config) = output::configuration(&reply) else {
                return Ok(exit(false));
            };
            let text = if *as_json {
                let json = output::get_config(config);
                output::json_text(&json, settings.client.pretty_json)? + "\n"
            } else if *as_toml {
                drover_proto::ini::to_toml(config)
            } else {
                drover_proto::ini::to_ini(config)
            };
            match filename {
                // Private when made here: a configuration holds node environments.
                Some(path) => write_private(path, text.as_bytes()).map_err(|e| {
                    anyhow::anyhow!("cannot write {}: {}", path.display(), io_text(&e))
                })?,
                None => stdio::out(&text)?,
            }
            return Ok(exit(true));
        }
        Command::GetNodes { fresh, full } => output::get_nodes(
            &session.request(&R::GetNodes { fresh: *fresh }).await?,
            *full,
        ),
        Command::GetIdValue { id, nodes } => output::get_id_value(
            &session
                .request(&R::GetIdValue {
                    id: id.clone(),
                    nodes: nodes.clone(),
                })
                .await?,
        ),
        // As streams with heartbeats: a node may take its stop_timeout to stop and its
        // readiness timeout to start, however long those are.
        Command::Restart { nodes, batch, .. } => told(
            &session
                .request_with_progress(
                    &R::Restart {
                        nodes: nodes.clone(),
                        batch: *batch,
                        progress: true,
                    },
                    drop,
                )
                .await?,
            output::Told::Start,
            |r| output::node_results(r, batch.is_some()),
        ),
        Command::Stop { nodes } => told(
            &session
                .request_with_progress(
                    &R::Stop {
                        nodes: nodes.clone(),
                        progress: true,
                    },
                    drop,
                )
                .await?,
            output::Told::Plain,
            |r| output::node_results(r, true),
        ),
        Command::Start { nodes } => told(
            &session
                .request_with_progress(
                    &R::Start {
                        nodes: nodes.clone(),
                        progress: true,
                    },
                    drop,
                )
                .await?,
            output::Told::Start,
            |r| output::node_results(r, true),
        ),
        Command::Logs {
            node,
            lines,
            follow: false,
            stream,
            raw,
        } => {
            let req = R::Logs {
                node: node.clone(),
                lines: *lines,
                follow: false,
                stream: stream.map(StreamArg::stream),
                resume: None,
            };
            let mut replies = session.request_stream(&req).await?;
            let mut stands = drover_proto::model::LogResume::default();
            let escapes = visible::Escapes::for_terminals(*raw);
            return match output::print_logs(&mut replies, false, &mut stands, escapes).await? {
                output::Ended::Done(ok) => Ok(exit(ok)),
                output::Ended::Broken(e) => Err(e.unwrap_or_else(|| {
                    anyhow::anyhow!("the controller ended the request without an answer")
                })),
            };
        }
        Command::Signal { signal, nodes } => told(
            &session
                .request(&R::Signal {
                    nodes: nodes.clone(),
                    signal: signal.clone(),
                })
                .await?,
            output::Told::Plain,
            |r| output::node_results(r, true),
        ),
        Command::Logs { follow: true, .. } | Command::Monitor { .. } => {
            unreachable!("followed by `follow::run`")
        }
        Command::Audit { since, who, limit } => {
            let mut replies = session
                .request_stream(&R::GetAudit {
                    since_ms: *since,
                    who: who.clone(),
                    limit: Some(*limit),
                    batches: true,
                })
                .await?;
            return output::print_audit(&mut replies, session.timeout())
                .await
                .map(exit);
        }
        Command::TestTimeout { with_state } => output::test_timeout(
            &session
                .request(&R::TestTimeout {
                    with_state: *with_state,
                })
                .await?,
        ),
    };
    output::print_json(&json, settings.client.pretty_json)?;
    Ok(exit(ok))
}

/// What a deploy expects of the staged configuration: its id, the request that
/// staged it.
struct Expect {
    id: Option<String>,
    stage: Option<String>,
}

/// Deploys the staged configuration, showing on a terminal how many nodes have settled
/// so far; waits as long as the deploy makes progress (see
/// [`Session::request_with_progress`]).
async fn deploy(
    session: &Session,
    restart_all: bool,
    expect: Expect,
) -> anyhow::Result<drover_proto::msg::ClientResponse> {
    let spinner = Spinner::start("deploying");
    let req = drover_proto::msg::ClientRequest::Deploy {
        restart_all,
        expect_id: expect.id,
        expect_stage: expect.stage,
        progress: true,
    };
    session
        .request_with_progress(&req, |p| spinner.say(&progress_message(p)))
        .await
}

fn progress_message(p: drover_proto::msg::Progress) -> String {
    format!("deploying: {} of {} nodes settled", p.done, p.total)
}

/// A spinner on stderr while a long request runs, only on a terminal; it never touches
/// stdout, so JSON output stays clean. Cleared when dropped.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn start(what: &str) -> Self {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    fn say(&self, message: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(message.to_owned());
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Reads and validates a cluster file (`-` for standard input), TOML or Zeek INI, with
/// the templates and defaults of a roles file merged in when one is given.
fn read_cluster_file(
    file: &str,
    roles: Option<&std::path::Path>,
) -> anyhow::Result<drover_proto::Configuration> {
    let (name, text) = if file == "-" {
        let text = read_bounded(std::io::stdin().lock(), "standard input")?;
        ("<stdin>".to_owned(), text)
    } else {
        let f = std::fs::File::open(file)
            .map_err(|e| anyhow::anyhow!("cannot read cluster file {file}: {}", io_text(&e)))?;
        let text = read_bounded(f, &format!("cluster file {file}"))?;
        (file.to_owned(), text)
    };
    let refuse = |issues| {
        anyhow::Error::new(FileHasErrors {
            issues,
            pretty: true,
        })
    };
    let options = drover_proto::ini::IniOptions {
        hostname: hostname(),
    };
    let format = drover_proto::ini::detect_format(&name, &text);
    let roles = match (roles, format) {
        // DROVER_ROLES, set for the INI files of a Zeek cluster, is no fault of a TOML
        // file's; `--roles` given for one would be ignored without a word.
        (Some(r), drover_proto::ini::Format::Toml)
            if std::env::var_os("DROVER_ROLES").is_none_or(|env| env != r.as_os_str()) =>
        {
            anyhow::bail!(
                "--roles applies to Zeek INI files; {name} is a TOML cluster file, which \
                 gives its node defaults and role templates in its own [defaults] and \
                 [roles.NAME] tables"
            )
        }
        (_, drover_proto::ini::Format::Toml) => None,
        (roles, drover_proto::ini::Format::Ini) => roles,
    };
    let config = drover_proto::ini::parse_any_with(&name, &text, &options).map_err(refuse)?;
    let Some(roles) = roles else {
        // An INI file is checked without its commands: the controller may have role
        // templates of its own; it validates everything again before staging.
        return Ok(config);
    };
    let what = format!("roles file {}", roles.display());
    let roles_text = std::fs::File::open(roles)
        .map_err(|e| anyhow::anyhow!("cannot read {what}: {}", io_text(&e)))
        .and_then(|f| read_bounded(f, &what))?;
    drover_proto::ini::with_roles(&config, &name, &roles.display().to_string(), &roles_text)
        .map_err(refuse)
}

/// A cluster file (or its roles file) that does not validate: it is not sent.
#[derive(Debug, thiserror::Error)]
#[error("configuration has errors, not sending:\n{issues}")]
struct FileHasErrors {
    issues: drover_proto::config::Issues,
    /// How its JSON is printed (the client's `pretty_json`).
    pretty: bool,
}

impl FileHasErrors {
    /// Prints what Zeek's controller answers a stage it refuses, for scripts that read
    /// the JSON on stdout: each problem's own text (Zeek's, where Zeek has one); the
    /// lines on stderr say where each is.
    fn print_json(&self) -> anyhow::Result<()> {
        let errors: Vec<&str> = self.issues.0.iter().map(|i| i.message.as_str()).collect();
        output::print_json(
            &serde_json::json!({"errors": errors, "results": {}}),
            self.pretty,
        )
    }
}

/// The most a cluster or roles file may hold: a few times what one request may carry,
/// so that a file the request limit refuses is read and measured, but reading a
/// device or a runaway file does not eat the machine's memory first.
const MAX_INPUT_FILE: u64 = 4 * drover_proto::msg::MAX_FRAME_LEN as u64;

/// Reads UTF-8 text of at most [`MAX_INPUT_FILE`] bytes; `what` names it in errors.
fn read_bounded(r: impl std::io::Read, what: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    r.take(MAX_INPUT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot read {what}: {}", io_text(&e)))?;
    if bytes.len() as u64 > MAX_INPUT_FILE {
        anyhow::bail!(
            "{what} is larger than {} ({MAX_INPUT_FILE} bytes): no configuration that large \
             can be sent",
            mebibytes(usize::try_from(MAX_INPUT_FILE).unwrap_or(usize::MAX))
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {what}: it is not UTF-8 text (at byte {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Refuses an empty configuration (no instances, no nodes) unless `allow`: a generator
/// that failed and wrote nothing (`generate | drover deploy-config -`) must not tear the
/// cluster down. One that names instances alone says what it means.
fn not_empty(
    config: drover_proto::Configuration,
    file: &str,
    allow: bool,
) -> anyhow::Result<drover_proto::Configuration> {
    if config.nodes.is_empty() && config.instances.is_empty() && !allow {
        let file = if file == "-" { "standard input" } else { file };
        anyhow::bail!(
            "{file} has no instances and no nodes: deployed, it would stop and remove \
             every node of the cluster; give --allow-empty if that is what you want"
        );
    }
    Ok(config)
}

/// The configuration back when its stage-config request fits in one frame; else an
/// error naming the request's size and the limit, since the controller would refuse it
/// only after receiving it all.
fn fits_in_a_frame(
    config: drover_proto::Configuration,
) -> anyhow::Result<drover_proto::Configuration> {
    use drover_proto::msg::{ClientRequest, MAX_FRAME_LEN, Request};
    let req = ClientRequest::StageConfig {
        config: Box::new(config),
    };
    let envelope = Request {
        // Longer than any id a request carries, so that the count is an upper bound.
        id: "x".repeat(64),
        timeout_ms: Some(u64::MAX),
        body: &req,
    };
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, &envelope)
        .map_err(|e| anyhow::anyhow!("cannot encode the configuration: {e}"))?;
    let size = counter.0;
    if size > MAX_FRAME_LEN {
        anyhow::bail!(
            "configuration is too large to send: its request is {} ({size} bytes), over the \
             limit of {} ({MAX_FRAME_LEN} bytes)",
            mebibytes(size),
            mebibytes(MAX_FRAME_LEN)
        );
    }
    let ClientRequest::StageConfig { config } = req else {
        unreachable!("built above")
    };
    Ok(*config)
}

/// `12.3 MiB`.
fn mebibytes(bytes: usize) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

/// A writer that only counts what is written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// This machine's name, as zeek-client uses it for nodes that name no instance.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Writes `bytes` to `path`, creating it with mode 0600 (an existing file keeps its
/// mode).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_settled_of_total() {
        let p = drover_proto::msg::Progress {
            done: 3,
            total: 2000,
        };
        assert_eq!(progress_message(p), "deploying: 3 of 2000 nodes settled");
    }

    #[test]
    fn only_a_key_given_after_renew_is_the_key_to_renew() {
        use clap::parser::ValueSource::{CommandLine, EnvVariable};
        let args = |s: &str| {
            s.split(' ')
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let line = Some(CommandLine);
        assert!(renew_key_given(
            line,
            args("drover ca renew --cert a.crt --key a.key")
        ));
        assert!(renew_key_given(
            line,
            args("drover ca renew --key=a.key --cert a.crt")
        ));
        assert!(!renew_key_given(
            line,
            args("drover --key ops.key ca renew --cert a.crt")
        ));
        assert!(!renew_key_given(
            Some(EnvVariable),
            args("drover ca renew --cert a.crt")
        ));
        assert!(!renew_key_given(None, args("drover ca renew --cert a.crt")));
    }
}
