//! `drover ca`: create the cluster CA, issue certificates and renew them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use drover_pki::{LeafSpec, Validity};
use drover_proto::access::Scope;
use drover_proto::msg::PeerRole;

/// The `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Directory for the PKI files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = drover_pki::CA_DAYS, allow_negative_numbers = true)]
        days: i64,
    },
    /// Issue a certificate signed by the CA in DIR: DIR/NAME.crt and DIR/NAME.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// What the holder is.
        #[arg(long, value_enum)]
        role: Role,
        /// The holder's name: for an agent, its instance name.
        #[arg(long)]
        name: String,
        /// Extra DNS name or IP address the holder is reached at (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
        days: i64,
        /// For a client: what it may do. viewer: look (get-*, status, logs, monitor,
        /// audit); operator: also restart, stop, start, signal; admin: everything. A
        /// client certificate without a scope is admin.
        #[arg(long, value_enum)]
        scope: Option<ScopeArg>,
    },
    /// Renew a certificate in place with the CA in DIR (the same CA, or a new one during
    /// a CA rollover): a new key and certificate with the same role, name, names and
    /// extensions replace FILE and its key; the previous pair stays as `.prev`. Then
    /// reload the daemon that uses it (SIGHUP, `systemctl reload`).
    Renew {
        /// Directory holding the issuing CA's ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to renew (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key [default: the certificate's path with the extension `.key`].
        #[arg(long)]
        key: Option<PathBuf>,
        /// Validity of the successor in days (1 to 36500).
        #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
        days: i64,
    },
}

/// Certificate roles.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// The controller.
    Controller,
    /// An agent.
    Agent,
    /// An operator's client.
    Client,
}

/// Client scopes, as `--scope` takes them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    /// Look: get-*, status, logs, monitor, audit.
    Viewer,
    /// Also restart, stop, start, signal.
    Operator,
    /// Everything, staging and deploying included.
    Admin,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Self {
        match s {
            ScopeArg::Viewer => Self::Viewer,
            ScopeArg::Operator => Self::Operator,
            ScopeArg::Admin => Self::Admin,
        }
    }
}

impl From<Role> for PeerRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Controller => Self::Controller,
            Role::Agent => Self::Agent,
            Role::Client => Self::Client,
        }
    }
}

/// Runs a `ca` subcommand.
pub fn run(cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init { dir, days } => {
            let (cert, key) = drover_pki::init_dir_for(dir, validity(*days)?)?;
            crate::stdio::errln(&format!("created {} and {}", cert.display(), key.display()));
        }
        CaCommand::Issue {
            dir,
            role,
            name,
            sans,
            days,
            scope,
        } => {
            if scope.is_some() && !matches!(role, Role::Client) {
                anyhow::bail!("--scope is for client certificates (--role client)");
            }
            let spec = LeafSpec {
                role: (*role).into(),
                name: name.clone(),
                sans: sans.clone(),
                validity: validity(*days)?,
                scope: scope.map(Scope::from),
            };
            let (cert, key) = drover_pki::issue_in_dir(dir, &spec)?;
            crate::stdio::errln(&format!("issued {} and {}", cert.display(), key.display()));
        }
        CaCommand::Renew {
            dir,
            cert,
            key,
            days,
        } => {
            let key = key.clone().unwrap_or_else(|| cert.with_extension("key"));
            let validity = validity(*days)?;
            let before = describe(cert)?;
            let drover_pki::Renewal {
                cert_prev,
                key_prev,
                finished_earlier,
            } = drover_pki::renew_in_place(dir, cert, &key, validity)?;
            let after = describe(cert)?;
            if finished_earlier {
                crate::stdio::errln(&format!(
                    "{} was the key of {}.new: an earlier renewal stopped between its renames; finished it, and issued nothing new",
                    key.display(),
                    cert.display()
                ));
            }
            crate::stdio::errln(&format!(
                "renewed {} ({}): serial {} -> {}, issued by {}; the previous pair is {} and {}",
                cert.display(),
                after.identity,
                before.serial,
                after.serial,
                after.issuer,
                cert_prev.display(),
                key_prev.display()
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Serial, issuer and identity of a certificate file.
fn describe(cert: &std::path::Path) -> anyhow::Result<drover_pki::Issued> {
    let pem = std::fs::read_to_string(cert)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cert.display()))?;
    drover_pki::describe(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))
}

/// The validity `--days` asks for, or an error naming the flag and its range.
fn validity(days: i64) -> anyhow::Result<Validity> {
    Validity::for_days(days).map_err(|_| {
        anyhow::anyhow!(
            "--days {days} is out of range: a certificate is valid for 1 to {} days",
            drover_pki::MAX_DAYS
        )
    })
}
