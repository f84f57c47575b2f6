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
    /// Every controller of `--controller A,B,...` (a high-availability group), as
    /// `HOST:PORT`; empty when one was given (then `controller` says which).
    #[serde(skip)]
    pub controllers: Vec<String>,
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
            controllers: Vec::new(),
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
    let bracketed = s.starts_with('[');
    if bracketed && !host.is_empty() && host.parse::<std::net::Ipv6Addr>().is_err() {
        bail!("--controller '{s}': '{host}' in brackets is not an IPv6 address");
    }
    if !bracketed && host.contains(':') {
        bail!("--controller '{s}': an IPv6 address goes in brackets, as [ADDRESS]:PORT");
    }
    if !bracketed
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        bail!("--controller '{s}': '{host}' is not a host name or address");
    }
    let port = match port.filter(|p| !p.is_empty()) {
        Some(p) => Some(
            p.parse()
                .ok()
                .filter(|p: &u16| *p != 0)
                .with_context(|| format!("--controller '{s}': '{p}' is not a port (1-65535)"))?,
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
        match std::env::var("DROVER_CLIENT_SETTINGS") {
            Ok(env) => {
                for a in env.split_whitespace() {
                    set(&mut table, a, "DROVER_CLIENT_SETTINGS")?;
                }
            }
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("DROVER_CLIENT_SETTINGS is not valid UTF-8")
            }
        }
        for a in &cli.set {
            set(&mut table, a, "--set")?;
        }
        check_types(&table)?;
        let mut s: Self = table.try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("invalid settings: {}", e.message().trim_end())
        })?;
        if let Some(list) = cli.controller.as_ref().filter(|c| c.contains(',')) {
            for c in list.split(',').map(str::trim) {
                anyhow::ensure!(
                    !c.is_empty(),
                    "--controller '{list}': an empty entry in the list of controllers"
                );
                let (host, port) = split_controller(c)?;
                let mut one = s.clone();
                one.controller.host = host.unwrap_or(one.controller.host);
                one.controller.port = port.unwrap_or(one.controller.port);
                s.controllers.push(one.controller_addr());
            }
        }
        if let Some(c) = &cli.controller {
            let c = c.split(',').next().unwrap_or_default().trim();
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
            let secs = t.as_secs_f64();
            if !(secs > 0.0 && secs <= MAX_REQUEST_TIMEOUT_SECS) {
                bail!(
                    "--timeout {} is out of range: allowed more than 0s, up to 1day",
                    humantime::format_duration(t)
                );
            }
            s.client.request_timeout_secs = secs;
        }
        let t = s.client.request_timeout_secs;
        if !(t.is_finite() && t > 0.0 && t <= MAX_REQUEST_TIMEOUT_SECS) {
            bail!(
                "client.request_timeout_secs must be a positive number of seconds up to \
                 {MAX_REQUEST_TIMEOUT_SECS} (a day), not {t:?}"
            );
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

    /// Every controller to try, as `HOST:PORT`.
    pub fn controller_addrs(&self) -> Vec<String> {
        if self.controllers.is_empty() {
            vec![self.controller_addr()]
        } else {
            self.controllers.clone()
        }
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.client.request_timeout_secs)
    }

    /// The settings as a TOML file (what `show-settings` prints); an error when a path
    /// is not UTF-8, which TOML cannot express.
    pub fn render(&self) -> anyhow::Result<String> {
        toml::to_string(self).map_err(|e| anyhow::anyhow!("cannot print the settings: {e}"))
    }
}

/// The longest request timeout: a day, which is also far below what durations and
/// timers can hold.
pub const MAX_REQUEST_TIMEOUT_SECS: f64 = 86_400.0;

/// Checks every key and value type of merged settings, so that a mistake names its key
/// (`controller.port: expected an integer 1-65535, found string "abc"`); all mistakes are
/// reported at once.
fn check_types(table: &toml::Table) -> anyhow::Result<()> {
    use toml::Value as V;
    const KEYS: &[(&str, &[&str])] = &[
        ("client", &["request_timeout_secs", "pretty_json"]),
        ("controller", &["host", "port"]),
        ("tls", &["ca", "cert", "key"]),
    ];
    let found = |v: &V| match v {
        V::String(s) => format!("string \"{}\"", s.escape_default()),
        V::Integer(i) => format!("integer {i}"),
        V::Float(f) => format!("float {f}"),
        V::Boolean(b) => format!("boolean {b}"),
        V::Datetime(d) => format!("datetime {d}"),
        V::Array(_) => "an array".to_owned(),
        V::Table(_) => "a table".to_owned(),
    };
    let mut problems = Vec::new();
    for (section, value) in table {
        let Some((_, keys)) = KEYS.iter().find(|(s, _)| s == section) else {
            problems.push(format!("unknown section '{section}'"));
            continue;
        };
        let V::Table(entries) = value else {
            problems.push(format!(
                "{section}: expected a section, found {}",
                found(value)
            ));
            continue;
        };
        for (key, v) in entries {
            if !keys.contains(&key.as_str()) {
                problems.push(format!(
                    "{section}.{key}: unknown key '{key}' (known: {})",
                    keys.join(", ")
                ));
                continue;
            }
            let expected = match (key.as_str(), v) {
                ("request_timeout_secs", V::Integer(_) | V::Float(_))
                | ("pretty_json", V::Boolean(_))
                | ("host" | "ca" | "cert" | "key", V::String(_)) => continue,
                ("port", V::Integer(p)) if (1..=65_535).contains(p) => continue,
                ("request_timeout_secs", _) => "a number of seconds",
                ("pretty_json", _) => "true or false",
                ("port", _) => "an integer 1-65535",
                ("host", _) => "a host name or address",
                _ => "a file name",
            };
            problems.push(format!(
                "{section}.{key}: expected {expected}, found {}",
                found(v)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("invalid settings: {}", problems.join("; "))
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
        for (bad, why) in [
            ("::1", "an IPv6 address goes in brackets, as [ADDRESS]:PORT"),
            ("[nope]:1", "'nope' in brackets is not an IPv6 address"),
            ("no such:1", "'no such' is not a host name or address"),
        ] {
            let err = split_controller(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(
            split_controller("[fe80::1]:2222").unwrap(),
            (Some("fe80::1".into()), Some(2222))
        );
        assert_eq!(
            split_controller("[fe80::1]").unwrap(),
            (Some("fe80::1".into()), None)
        );
        assert!(split_controller("foo:bar").is_err());
        for bad in ["foo:0", ":65536", "[::1]:-1"] {
            let err = split_controller(bad).unwrap_err().to_string();
            assert!(err.ends_with("is not a port (1-65535)"), "{err}");
        }
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
    fn wrong_keys_and_types_name_the_key_all_at_once() {
        let mut t = toml::Table::try_from(Settings::default()).unwrap();
        for a in [
            "controller.port=abc",
            "client.pretty_json=yes",
            "client.colour=1",
            "tls.ca=5",
            "nope.x=1",
        ] {
            set(&mut t, a, "--set").unwrap();
        }
        let err = check_types(&t).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid settings: client.colour: unknown key 'colour' (known: \
             request_timeout_secs, pretty_json); client.pretty_json: expected true or false, \
             found string \"yes\"; controller.port: expected an integer 1-65535, found string \
             \"abc\"; unknown section 'nope'; tls.ca: expected a file name, found integer 5"
        );
        let mut t = toml::Table::try_from(Settings::default()).unwrap();
        set(&mut t, "controller.port=0", "--set").unwrap();
        assert!(
            check_types(&t)
                .unwrap_err()
                .to_string()
                .contains("found integer 0")
        );
        set(&mut t, "controller.port=65535", "--set").unwrap();
        check_types(&t).unwrap();
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut s = Settings::default();
        s.controller.host = "::1".into();
        assert_eq!(s.controller_addr(), "[::1]:2150");
    }
}
