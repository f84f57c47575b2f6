//! The client's settings: built-in defaults, a config file, the environment and flags.
//!
//! Precedence, lowest first (as zeek-client's): defaults < the config file
//! (`--config-file`, `DROVER_CLIENT_CONFIG`, or `~/.config/drover/client.toml`; a missing
//! default file is fine) < `DROVER_CLIENT_SETTINGS` (space-separated `section.key=value`)
//! < `--set section.key=value` < the dedicated flags (`--controller`, `--ca`, `--cert`,
//! `--key`, `--timeout`, and their `DROVER_*` variables). `drover show-settings` prints
//! the result.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::Cli;

/// Effective settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Client behaviour.
    pub client: ClientSettings,
    /// Where the controller is.
    pub controller: ControllerSettings,
    /// Certificates.
    pub tls: TlsSettings,
}

/// `[client]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// How long to wait for the controller's answer, in seconds.
    pub request_timeout_secs: f64,
    /// Indent JSON output (2 spaces); compact when false.
    pub pretty_json: bool,
}

/// `[controller]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSettings {
    /// Host name or address.
    pub host: String,
    /// QUIC port.
    pub port: u16,
}

/// `[tls]`: the cluster CA and this client's certificate and key.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// CA certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Client key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            client: ClientSettings {
                request_timeout_secs: 20.0,
                pretty_json: true,
            },
            controller: ControllerSettings {
                host: "127.0.0.1".into(),
                port: 2150,
            },
            tls: TlsSettings::default(),
        }
    }
}

/// The config file used when none is named.
pub fn default_config_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/drover/client.toml"))
}

/// Sets `section.key` in `table` from `value` (TOML syntax when it parses as a TOML
/// value: numbers, booleans, quoted strings; a plain string otherwise).
fn set(table: &mut toml::Table, assignment: &str, origin: &str) -> anyhow::Result<()> {
    let (path, value) = assignment
        .split_once('=')
        .with_context(|| format!("{origin}: '{assignment}' is not section.key=value"))?;
    let (section, key) = path
        .trim()
        .split_once('.')
        .with_context(|| format!("{origin}: '{path}' is not section.key"))?;
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        bail!("{origin}: '{section}' is not a section");
    };
    section_table.insert(key.to_owned(), parsed);
    Ok(())
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Splits `HOST:PORT`, `HOST`, `:PORT`, `[V6]:PORT`.
fn split_controller(s: &str) -> anyhow::Result<(Option<String>, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .with_context(|| format!("--controller '{s}': unclosed '['"))?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (s.to_owned(), None),
        }
    };
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => Some(
            p.parse()
                .with_context(|| format!("--controller '{s}': '{p}' is not a port"))?,
        ),
        None => None,
    };
    Ok(((!host.is_empty()).then_some(host), port))
}

impl Settings {
    /// Computes the effective settings for a command line.
    pub fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut table = toml::Table::try_from(Self::default()).expect("defaults serialize");
        let (file, required) = match &cli.config_file {
            Some(f) => (Some(f.clone()), true),
            None => (default_config_file(), false),
        };
        if let Some(file) = file {
            merge(&mut table, read_file(&file, required)?);
        }
        if let Ok(env) = std::env::var("DROVER_CLIENT_SETTINGS") {
            for a in env.split_whitespace() {
                set(&mut table, a, "DROVER_CLIENT_SETTINGS")?;
            }
        }
        for a in &cli.set {
            set(&mut table, a, "--set")?;
        }
        let mut s: Self = table.try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("invalid settings: {}", e.message().trim_end())
        })?;
        if let Some(c) = &cli.controller {
            let (host, port) = split_controller(c)?;
            if let Some(h) = host {
                s.controller.host = h;
            }
            if let Some(p) = port {
                s.controller.port = p;
            }
        }
        for (flag, slot) in [
            (&cli.ca, &mut s.tls.ca),
            (&cli.cert, &mut s.tls.cert),
            (&cli.key, &mut s.tls.key),
        ] {
            if let Some(v) = flag {
                *slot = Some(v.clone());
            }
        }
        if let Some(t) = cli.timeout {
            s.client.request_timeout_secs = t.as_secs_f64();
        }
        if !(s.client.request_timeout_secs.is_finite() && s.client.request_timeout_secs > 0.0) {
            bail!("client.request_timeout_secs must be a positive number of seconds");
        }
        Ok(s)
    }

    /// `HOST:PORT` of the controller (IPv6 hosts bracketed).
    pub fn controller_addr(&self) -> String {
        let host = &self.controller.host;
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", self.controller.port)
        } else {
            format!("{host}:{}", self.controller.port)
        }
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.client.request_timeout_secs)
    }

    /// The settings as a TOML file (what `show-settings` prints).
    pub fn render(&self) -> String {
        toml::to_string(self).expect("settings serialize")
    }
}

fn read_file(path: &Path, required: bool) -> anyhow::Result<toml::Table> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.parse::<toml::Table>().map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            anyhow::anyhow!(
                "{}{}: {}",
                path.display(),
                line.map(|l| format!(":{l}")).unwrap_or_default(),
                e.message().trim_end()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(toml::Table::new()),
        Err(e) => Err(anyhow::anyhow!(
            "cannot read settings file {}: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_forms() {
        assert_eq!(split_controller("foo").unwrap(), (Some("foo".into()), None));
        assert_eq!(
            split_controller("foo:").unwrap(),
            (Some("foo".into()), None)
        );
        assert_eq!(split_controller(":2222").unwrap(), (None, Some(2222)));
        assert_eq!(
            split_controller("[fe80::1]:2222").unwrap(),
            (Some("fe80::1".into()), Some(2222))
        );
        assert_eq!(
            split_controller("[fe80::1]").unwrap(),
            (Some("fe80::1".into()), None)
        );
        assert!(split_controller("foo:bar").is_err());
    }

    #[test]
    fn assignments_parse_values() {
        let mut t = toml::Table::new();
        set(&mut t, "client.pretty_json=false", "--set").unwrap();
        set(&mut t, "controller.port=9", "--set").unwrap();
        set(&mut t, "controller.host=ctl.example", "--set").unwrap();
        assert_eq!(t["client"]["pretty_json"], toml::Value::Boolean(false));
        assert_eq!(t["controller"]["port"], toml::Value::Integer(9));
        assert_eq!(
            t["controller"]["host"],
            toml::Value::String("ctl.example".into())
        );
        assert!(set(&mut t, "nodot=1", "--set").is_err());
        assert!(set(&mut t, "client.x", "--set").is_err());
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut s = Settings::default();
        s.controller.host = "::1".into();
        assert_eq!(s.controller_addr(), "[::1]:2150");
    }
}
