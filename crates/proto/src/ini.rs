//! Zeek's INI cluster files, as zeek-client 1.5.0 reads and prints them, and the writer of
//! drover's native TOML cluster files.
//!
//! - [`parse_ini`] reads a Zeek cluster file into a [`Configuration`];
//!   [`parse_ini_with`] does the same with the local host name for instance-free files.
//! - [`to_ini`] prints a configuration the way `zeek-client get-config` does.
//! - [`to_toml`] prints the lossless native form: `parse_toml(to_toml(c)) == c`.
//! - [`parse_any`] picks the format from the file name, else from the content.
//! - [`with_roles`] adds a roles file's templates and defaults, so Zeek-style nodes get
//!   their commands.
//! - [`validate_without_commands`] is [`config::validate`] minus the one check an INI file
//!   cannot satisfy: that a node without a command has a role template.
//!
//! # The format
//!
//! ```ini
//! [instances]                    ; optional: each key is an instance, i.e. an agent
//! agent-1                        ; no value: the agent connects to the controller
//! agent-2 = 10.0.0.2:2151        ; host:port: the controller connects to the agent
//!
//! [manager]                      ; every other section is a node, named like the section
//! instance = agent-1
//! role = manager                 ; manager, logger, proxy or worker, in any case
//! port = 5000                    ; or 5000/tcp
//!
//! [worker-01]
//! instance = agent-2
//! role = worker
//! interface = eth0
//! cpu_affinity = 3
//! env = FOO=BAR BLUM="a b"       ; shell-quoted KEY=VALUE words
//! scripts = a.zeek "b c.zeek"    ; shell-quoted words, kept sorted
//! metrics_port = 9100
//! ```
//!
//! (The `;` comments above are for this page only: the format has full-line comments, no
//! inline ones.) A node section may also carry drover's identity, capability and limit
//! keys ([`INI_EXEC_KEYS`]: `user = zeek`, `group`, `supplementary_groups = pcap adm`,
//! `umask = 0027`, `capabilities = CAP_NET_RAW CAP_NET_ADMIN`, `no_new_privileges = yes`,
//! `limits = nofile=65536 core=unlimited`), which zeek-client ignores and [`to_ini`] does
//! not print. Nodes read from INI have no command and no other drover-only settings: they take
//! their command from the role templates of [`Configuration::roles`], which an INI file
//! cannot state. The caller merges templates in before staging; that is why [`parse_ini`]
//! validates with [`validate_without_commands`].
//!
//! # zeek-client's behaviour reproduced
//!
//! - Python configparser syntax: `key = value` or `key: value` (split at the first `=` or
//!   `:`); full-line `#` and `;` comments only, so `name ; x` is the key `name ; x`; values
//!   continue on lines indented deeper than their key, joined with newlines (blank lines
//!   inside such a value are kept); keys are case-insensitive (lower-cased), section names
//!   are not; `[DEFAULT]` keys apply to every section, `[instances]` included; `%`
//!   interpolation is active (`%%` is a `%`, `%(key)s` the value of another key of the
//!   section or of `[DEFAULT]`).
//! - `[instances]` keys are lower-cased, while `instance =` values keep their case (so
//!   `Agent-1` in both places fails validation, with a hint); `host:port` is split at the
//!   last `:` and `[` `]` around the host are dropped (`[::2]:2151` and `::2:2151` both
//!   work); hosts must be IP addresses.
//! - Without `[instances]`, the instances are the nodes' `instance` values, all connecting
//!   to the controller. If no node states an instance, every node goes to
//!   `agent-<hostname>` (see [`IniOptions`]), and `[instances]` must be absent; mixing is an
//!   error. `instance =` with an empty value also means `agent-<hostname>`.
//! - `role` (alias `type`) is required and is one of Zeek's roles, case-insensitively, with
//!   `Supervisor::` or `Foo.` prefixes ignored; `none` is accepted. `state` is ignored.
//! - Ports are Python integers (`+5_000` is 5000) from 1 to 65535. `scripts` and `env` are
//!   split like a POSIX shell (`shlex`); scripts are sorted; `env` words without `=` are
//!   errors. The error texts are zeek-client's (`node requires a role`,
//!   `role "x" is invalid`, `cannot convert "manager.port" value "eighty" to int`,
//!   `port 70000 outside valid range`, `invalid spec for instance ...`,
//!   `either all or no nodes must state instances`, ...).
//! - [`to_ini`] prints exactly what `get-config` prints: `[instances]` first (sorted,
//!   keys lower-cased, IPv6 hosts not bracketed, an unknown host as `0.0.0.0`), then the
//!   nodes sorted by name with keys in the order `instance`, `role` (upper-case), `port`,
//!   `scripts`, `interface`, `cpu_affinity`, `env`, `metrics_port`, unset keys left out,
//!   each section followed by a blank line.
//!
//! # zeek-client's behaviour refused
//!
//! - Every problem is an error, and all are reported at once with file, line and key,
//!   where zeek-client stops at the first, prints a Python traceback for some (duplicate
//!   sections or keys, a host that is not an IP address, a lone `%`), or only warns:
//!   unknown keys are errors here (drover's TOML rejects them too), not ignored.
//! - A key without a value in a node section is an error (`config item manager.port needs
//!   a value`): zeek-client means to say so, but 1.5.0 treats it as absent.
//! - The metrics port range error names the metrics port (1.5.0 prints the Broker port).
//! - A leading byte-order mark is skipped (configparser fails on it).
//! - Host `0.0.0.0`, Zeek's "unknown", is read as no host.
//! - `cpu_affinity` may also list several CPUs (`0,1` or `0 1`), which drover can pin to,
//!   and ports may be written `5000/tcp`, as Zeek prints them.
//! - [`to_ini`] writes `%` as `%%` (zeek-client fails on it), prints a list of CPUs as
//!   `0,1`, and quotes an env value or script properly where zeek-client's quoting (double
//!   quotes around anything with white space, nothing else escaped) would not read back
//!   as the same value. Values containing line breaks are written as configparser writes
//!   them and may not read back identically.
//!
//! # What INI cannot carry
//!
//! [`to_ini`] prints only what Zeek's `Management::Node` has: `command`, `workdir`,
//! `restart`, `backoff`, `max_failed_starts`, `success_exit_codes`, `readiness`,
//! `stop_signal`, `stop_timeout`, role templates, the configuration id and the host of an
//! instance without a port are not printed. Nor can INI say what Zeek cannot: a role other
//! than Zeek's is printed upper-cased but not read back, and instance names with capitals
//! come back lower-cased in `[instances]`. `get-config --as-toml` ([`to_toml`]) is the
//! lossless form.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::config::{self, Issue, Issues};
use crate::exec::{self, Umask};
use crate::model::{ClusterRole, Configuration, CpuAffinity, Instance, Node, RoleTemplate, new_id};

/// Keys a node section may hold (besides `type`, an alias of `role`, and `state`, which is
/// ignored), in the order [`to_ini`] prints them.
pub const INI_NODE_KEYS: &[&str] = &[
    "instance",
    "role",
    "port",
    "scripts",
    "interface",
    "cpu_affinity",
    "env",
    "metrics_port",
];

/// Keys zeek-client accepts besides [`INI_NODE_KEYS`]: `type` (an alias of `role`) and
/// `state` (ignored).
const INI_OTHER_KEYS: &[&str] = &["type", "state"];

/// drover's identity, capability and limit keys (see [`crate::exec`]), which a node
/// section may hold too; [`to_ini`] leaves them out, as Zeek knows none of them.
pub const INI_EXEC_KEYS: &[&str] = &[
    "user",
    "group",
    "supplementary_groups",
    "umask",
    "capabilities",
    "no_new_privileges",
    "limits",
];

/// configparser's limit on nested `%(name)s` references.
const MAX_INTERPOLATION_DEPTH: usize = 10;

/// How to read an INI file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IniOptions {
    /// The name of the machine reading the file. A file whose nodes name no instance puts
    /// them all on `agent-<hostname>`, as zeek-client does with the host it runs on; when
    /// `None` or empty, `localhost` (zeek-client's fallback).
    pub hostname: Option<String>,
}

impl IniOptions {
    /// The instance of nodes that name none: `agent-<hostname>`.
    pub fn default_instance(&self) -> String {
        let host = self
            .hostname
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost");
        format!("agent-{host}")
    }
}

/// The two cluster-file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// drover's native TOML.
    Toml,
    /// Zeek's INI.
    Ini,
}

/// Parses a Zeek INI cluster file into a configuration, reproducing zeek-client 1.5.0's
/// syntax, defaults and error texts (see the [module docs](self) for the quirks kept and
/// refused). `file` names the source in errors; every problem is reported, sorted, with
/// the line and the INI key (`section.key`, or `section`) it concerns.
///
/// Nodes without an `instance` go to `agent-localhost`; use [`parse_ini_with`] to give
/// the real host name. The configuration gets a fresh id. It is validated with
/// [`validate_without_commands`]: nodes get their commands from role templates, which
/// the caller merges in.
pub fn parse_ini(file: &str, text: &str) -> Result<Configuration, Issues> {
    parse_ini_with(file, text, &IniOptions::default())
}

/// [`parse_ini`] with options.
pub fn parse_ini_with(
    file: &str,
    text: &str,
    options: &IniOptions,
) -> Result<Configuration, Issues> {
    let mut issues = Vec::new();
    let doc = read_document(text, &mut issues);
    // INI key (`section`, `section.key`, `instances.name`) -> line.
    let mut lines: BTreeMap<String, usize> = BTreeMap::new();

    let mut declared: Option<(usize, Vec<Instance>)> = None;
    let mut nodes = Vec::new();
    // Keys of node values that could not be read (see below).
    let mut unread: Vec<String> = Vec::new();
    let mut node_sections = 0usize;
    let mut instance_free = BTreeSet::new();
    for section in &doc.sections {
        lines.insert(section.name.clone(), section.line);
        let entries = effective(&section.entries, &doc.defaults);
        for (entry, _) in &entries {
            lines.insert(format!("{}.{}", section.name, entry.key), entry.line);
        }
        if section.name == "instances" {
            let list = entries
                .into_iter()
                .map(|(entry, from_default)| {
                    read_instance(section, &doc.defaults, entry, from_default, &mut issues)
                })
                .collect();
            declared = Some((section.line, list));
            continue;
        }
        node_sections += 1;
        if !entries.iter().any(|(e, _)| e.key == "instance") {
            instance_free.insert(section.name.clone());
        }
        let before = issues.len();
        if let Some(node) = read_node(section, &doc.defaults, options, &mut issues) {
            // A value that could not be read was left at its default: what validation
            // would say of that default is noise next to the error already reported (a
            // bad role, of the whole node).
            for found in &issues[before..] {
                let Some(key) = &found.key else { continue };
                let field = key
                    .strip_prefix("DEFAULT.")
                    .or_else(|| key.strip_prefix(&format!("{}.", node.name)))
                    .unwrap_or(key);
                unread.push(if matches!(field, "role" | "type") {
                    node.name.clone()
                } else {
                    format!("{}.{field}", node.name)
                });
            }
            nodes.push(node);
        }
    }

    if !instance_free.is_empty() {
        let mut broken = false;
        if instance_free.len() != node_sections {
            broken = true;
            // At the first node without one, where a person adds it.
            let first = instance_free
                .iter()
                .filter_map(|name| Some((*lines.get(name)?, name)))
                .min();
            issues.push(issue(
                first.map(|(line, _)| line),
                first.map(|(_, name)| name.clone()),
                "either all or no nodes must state instances".to_owned(),
            ));
        }
        if let Some((line, _)) = &declared {
            broken = true;
            issues.push(issue(
                Some(*line),
                Some("instances".to_owned()),
                "omit instances section when skipping instances in node definitions".to_owned(),
            ));
        }
        if broken {
            // Their made-up instance would only add noise to the validation below.
            nodes.retain(|n| !instance_free.contains(&n.name));
        }
    }

    let mut instances = match declared {
        Some((_, list)) => list,
        None => {
            // Implied by the nodes; all of them connect to the controller.
            let mut names = BTreeSet::new();
            for node in &nodes {
                if names.insert(node.instance.clone())
                    && let Some(line) = lines.get(&format!("{}.instance", node.name)).copied()
                {
                    lines
                        .entry(format!("instances.{}", node.instance))
                        .or_insert(line);
                }
            }
            names
                .into_iter()
                .map(|name| Instance {
                    name,
                    host: None,
                    port: None,
                })
                .collect()
        }
    };
    instances.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let config = Configuration {
        id: new_id(),
        instances,
        nodes,
        roles: BTreeMap::new(),
    };

    for mut found in validate_without_commands(&config) {
        if let Some(key) = found.key.take() {
            found.message.push_str(&case_hint(&config, &key));
            let key = key.strip_prefix("nodes.").unwrap_or(&key).to_owned();
            let below = |p: &String| {
                key == *p
                    || key
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            };
            if unread.iter().any(below) {
                continue;
            }
            found.key = Some(key);
        }
        issues.push(found);
    }
    if issues.is_empty() {
        return Ok(config);
    }
    Err(finish(file, issues, &lines))
}

/// Checks a configuration like [`config::validate`], except that a node without a command
/// whose role has no command template is fine: the caller merges templates in before the
/// configuration is staged, and validates it fully then. Everything else is checked,
/// including the templates that exist.
pub fn validate_without_commands(config: &Configuration) -> Vec<Issue> {
    let missing: BTreeSet<&str> = config
        .nodes
        .iter()
        .filter(|n| n.command.is_empty() && !config.roles.contains_key(n.role.as_str()))
        .map(|n| n.role.as_str())
        .collect();
    if missing.is_empty() {
        return config::validate(config);
    }
    // Validate as if each of those roles had a template; no issue concerns a stand-in.
    let mut stand_in = config.clone();
    for role in missing {
        stand_in.roles.insert(
            role.to_owned(),
            RoleTemplate {
                command: vec!["/bin/true".to_owned()],
                env: BTreeMap::new(),
                ..RoleTemplate::default()
            },
        );
    }
    config::validate(&stand_in)
}

/// Renders a configuration as `zeek-client get-config` prints it, byte for byte for what
/// Zeek's records hold (see the [module docs](self)). drover-only settings (command,
/// workdir, restart policy, backoff, readiness, stop signal and timeout, role templates,
/// the id) are not printed: [`to_toml`] is the lossless form.
pub fn to_ini(config: &Configuration) -> String {
    let mut out = String::new();
    if !config.instances.is_empty() {
        out.push_str("[instances]\n");
        let mut instances: Vec<&Instance> = config.instances.iter().collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        // configparser lower-cases keys when they are set, too: names equal but for case
        // share one key, where the first was, with the last one's value.
        let mut items: Vec<(String, Option<String>)> = Vec::new();
        for inst in instances {
            let key = inst.name.to_lowercase();
            let value = inst.port.map(|port| {
                let host = inst
                    .host
                    .map_or_else(|| "0.0.0.0".to_owned(), |h| h.to_string());
                format!("{host}:{port}")
            });
            match items.iter_mut().find(|(k, _)| *k == key) {
                Some(item) => item.1 = value,
                None => items.push((key, value)),
            }
        }
        for (key, value) in items {
            match value {
                Some(value) => push_ini_item(&mut out, &key, &value),
                None => {
                    out.push_str(&key);
                    out.push('\n');
                }
            }
        }
        out.push('\n');
    }
    let mut nodes: Vec<&Node> = config.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for node in nodes {
        out.push('[');
        out.push_str(&node.name);
        out.push_str("]\n");
        push_ini_item(&mut out, "instance", &node.instance);
        push_ini_item(&mut out, "role", &node.role.as_str().to_uppercase());
        if let Some(port) = node.port {
            push_ini_item(&mut out, "port", &port.to_string());
        }
        if !node.scripts.is_empty() {
            let mut scripts: Vec<&String> = node.scripts.iter().collect();
            scripts.sort();
            let words: Vec<String> = scripts.iter().map(|s| shell_word(s)).collect();
            push_ini_item(&mut out, "scripts", &words.join(" "));
        }
        if let Some(interface) = &node.interface {
            push_ini_item(&mut out, "interface", interface);
        }
        match &node.cpu_affinity {
            Some(CpuAffinity::One(cpu)) => {
                push_ini_item(&mut out, "cpu_affinity", &cpu.to_string())
            }
            Some(CpuAffinity::Many(cpus)) if !cpus.is_empty() => {
                let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
                push_ini_item(&mut out, "cpu_affinity", &list.join(","));
            }
            _ => {}
        }
        if !node.env.is_empty() {
            let words: Vec<String> = node.env.iter().map(|(k, v)| env_word(k, v)).collect();
            push_ini_item(&mut out, "env", &words.join(" "));
        }
        if let Some(port) = node.metrics_port {
            push_ini_item(&mut out, "metrics_port", &port.to_string());
        }
        out.push('\n');
    }
    out
}

/// Renders a configuration as drover's native TOML cluster file: the id, then
/// `[instances.NAME]`, `[roles.NAME]` and `[nodes.NAME]` tables (sorted by name), each
/// node with its `instance` and only the keys whose values differ from the defaults.
///
/// For a valid configuration whose instances and nodes are sorted by name (as every
/// parser returns them), `parse_toml(file, &to_toml(c)) == Ok(c)`.
pub fn to_toml(config: &Configuration) -> String {
    let mut out = format!("id = {}\n", toml_value(&config.id));
    let mut instances: Vec<&Instance> = config.instances.iter().collect();
    instances.sort_by(|a, b| a.name.cmp(&b.name));
    for inst in instances {
        out.push_str(&format!("\n[instances.{}]\n", toml_key(&inst.name)));
        if let Some(host) = inst.host {
            out.push_str(&format!("host = {}\n", toml_value(&host.to_string())));
        }
        if let Some(port) = inst.port {
            out.push_str(&format!("port = {port}\n"));
        }
    }
    for (role, template) in &config.roles {
        out.push_str(&format!("\n[roles.{}]\n", toml_key(role)));
        push_toml_table(&mut out, template, &[]);
    }
    let mut nodes: Vec<&Node> = config.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for node in nodes {
        out.push_str(&format!("\n[nodes.{}]\n", toml_key(&node.name)));
        let defaults = toml::Value::try_from(Node::new(&node.name, &node.instance));
        let defaults = match defaults {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let mut skip: Vec<(String, toml::Value)> = defaults.into_iter().collect();
        skip.retain(|(k, _)| k != "instance");
        push_toml_table(&mut out, node, &skip);
    }
    out
}

/// The format of a cluster file: `.toml` is TOML; `.ini`, `.cfg` and `.conf` are INI;
/// otherwise (standard input, say) the content decides: TOML when it parses as TOML with
/// only drover's top-level keys, or has drover's table headers (`[nodes.…]`,
/// `[instances.…]`, `[roles.…]`, `[defaults]`) or a top-level `id =` (then TOML's errors
/// are the ones that help); INI otherwise.
pub fn detect_format(file: &str, text: &str) -> Format {
    let ext = Path::new(file)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("toml") => return Format::Toml,
        Some("ini" | "cfg" | "conf") => return Format::Ini,
        _ => {}
    }
    const TOP: &[&str] = &["id", "defaults", "instances", "roles", "nodes"];
    if let Ok(table) = toml::from_str::<toml::Table>(text)
        && table.keys().all(|k| TOP.contains(&k.as_str()))
    {
        return Format::Toml;
    }
    // drover's table headers anywhere, or a top-level `id` before the first table.
    let mut before_tables = true;
    let toml_like = text.lines().map(str::trim_start).any(|l| {
        let header = ["[nodes.", "[instances.", "[roles.", "[defaults]", "[["]
            .iter()
            .any(|p| l.starts_with(p));
        let id = before_tables && (l.starts_with("id =") || l.starts_with("id="));
        before_tables &= !l.starts_with('[');
        header || id
    });
    if toml_like { Format::Toml } else { Format::Ini }
}

/// Parses a cluster file in either format, chosen by [`detect_format`].
pub fn parse_any(file: &str, text: &str) -> Result<Configuration, Issues> {
    parse_any_with(file, text, &IniOptions::default())
}

/// [`parse_any`] with options for INI files.
pub fn parse_any_with(
    file: &str,
    text: &str,
    options: &IniOptions,
) -> Result<Configuration, Issues> {
    match detect_format(file, text) {
        Format::Toml => config::parse_toml(file, text),
        Format::Ini => parse_ini_with(file, text, options),
    }
}

/// Adds the node defaults and role templates of a roles file to a configuration, so that
/// nodes from a Zeek-style file, which name no program, get their commands.
///
/// A roles file is TOML with a `[defaults]` table (the keys of a cluster file's
/// `[defaults]`) and `[roles.NAME]` templates, the format of the controller's
/// `--zeek-roles` file:
///
/// ```toml
/// [defaults]
/// restart = "always"
///
/// [roles.worker]
/// command = ["/usr/local/zeek/bin/zeek", "-i", "{interface}", "local"]
/// ```
///
/// A template the configuration already has wins over the file's; a default applies to
/// every node key left at drover's default. The result is validated fully; `file` names
/// the cluster file in the issues, which carry no line numbers for what the merge
/// produced.
pub fn with_roles(
    config: &Configuration,
    file: &str,
    roles_file: &str,
    roles_text: &str,
) -> Result<Configuration, Issues> {
    let at = |key: Option<String>, message: String| {
        Issues(vec![Issue {
            file: Some(roles_file.to_owned()),
            line: None,
            key,
            message,
        }])
    };
    let roles: toml::Table = toml::from_str(roles_text).map_err(|e| {
        let line = e.span().map(|s| {
            roles_text[..s.start.min(roles_text.len())]
                .matches('\n')
                .count()
                + 1
        });
        Issues(vec![Issue {
            file: Some(roles_file.to_owned()),
            line,
            key: None,
            message: e.message().trim().to_owned(),
        }])
    })?;
    let mut cluster: toml::Table = toml::from_str(&to_toml(config)).map_err(|e| {
        at(
            None,
            format!("cannot merge the roles file: {}", e.message()),
        )
    })?;
    for (key, value) in roles {
        let toml::Value::Table(table) = value else {
            return Err(at(Some(key), "expected a table".to_owned()));
        };
        match key.as_str() {
            "defaults" => {
                cluster.insert(key, toml::Value::Table(table));
            }
            "roles" => {
                let mine = cluster
                    .entry("roles")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(mine) = mine {
                    for (role, template) in table {
                        mine.entry(role).or_insert(template);
                    }
                }
            }
            _ => {
                return Err(at(
                    Some(key),
                    "unknown table: a roles file has [defaults] and [roles.NAME] only".to_owned(),
                ));
            }
        }
    }
    // Checked on its own first, so that its problems carry its own line numbers.
    config::parse_toml(roles_file, roles_text)?;
    let text = toml::to_string(&cluster)
        .map_err(|e| at(None, format!("cannot merge the roles file: {e}")))?;
    config::parse_toml(file, &text).map_err(|Issues(issues)| {
        Issues(
            issues
                .into_iter()
                .map(|i| Issue {
                    file: Some(format!("{file} (with roles from {roles_file})")),
                    line: None,
                    ..i
                })
                .collect(),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Reading: Python's configparser (allow_no_value=True, strict, BasicInterpolation).

/// One `key = value` or bare `key` of a section.
#[derive(Debug)]
struct Entry {
    /// Lower-cased.
    key: String,
    /// Raw (not interpolated), continuation lines joined with `\n`; `None` for a bare key.
    value: Option<String>,
    line: usize,
}

#[derive(Debug)]
struct Section {
    name: String,
    line: usize,
    entries: Vec<Entry>,
}

#[derive(Debug, Default)]
struct Document {
    defaults: Vec<Entry>,
    sections: Vec<Section>,
}

/// Where lines go while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Defaults,
    Section(usize),
    /// A duplicate section's or key's lines: read, then dropped.
    Discard,
}

/// An entry being read, its value lines not yet joined.
struct RawEntry {
    key: String,
    parts: Option<Vec<String>>,
    line: usize,
}

fn read_document(text: &str, issues: &mut Vec<Issue>) -> Document {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut defaults: Vec<RawEntry> = Vec::new();
    let mut sections: Vec<(String, usize, Vec<RawEntry>)> = Vec::new();
    let mut section_lines: BTreeMap<String, usize> = BTreeMap::new();
    let mut discard: Vec<RawEntry> = Vec::new();
    let mut current: Option<Target> = None;
    // The entry that continuation lines extend: its target and index.
    let mut option: Option<(Target, usize)> = None;
    let mut indent_level = 0usize;
    let mut reported_headerless = false;

    for (index, line) in split_lines(text).enumerate() {
        let lineno = index + 1;
        let value = py_strip(line);
        let comment = value.starts_with('#') || value.starts_with(';');
        if comment || value.is_empty() {
            // A blank line may be part of a multi-line value; a comment never is.
            if !comment
                && current.is_some()
                && let Some((target, i)) = option
                && let Some(parts) = entries_of(target, &mut defaults, &mut sections, &mut discard)
                    [i]
                    .parts
                    .as_mut()
            {
                parts.push(String::new());
            }
            continue;
        }
        let indent = line.chars().take_while(|c| py_space(*c)).count();
        if current.is_some()
            && let Some((target, i)) = option
            && indent > indent_level
        {
            let entry = &mut entries_of(target, &mut defaults, &mut sections, &mut discard)[i];
            match entry.parts.as_mut() {
                Some(parts) => parts.push(value.to_owned()),
                None => {
                    let key = entry.key.clone();
                    issues.push(issue(
                        Some(lineno),
                        None,
                        format!(
                            "indented line continues key '{key}', which has no value: '{value}'"
                        ),
                    ));
                }
            }
            continue;
        }
        indent_level = indent;
        if let Some(name) = section_header(value) {
            option = None;
            if name == "DEFAULT" {
                current = Some(Target::Defaults);
            } else if let Some(first) = section_lines.get(name) {
                issues.push(issue(
                    Some(lineno),
                    Some(name.to_owned()),
                    format!("duplicate section '{name}' (first defined at line {first})"),
                ));
                current = Some(Target::Discard);
            } else {
                section_lines.insert(name.to_owned(), lineno);
                sections.push((name.to_owned(), lineno, Vec::new()));
                current = Some(Target::Section(sections.len() - 1));
            }
            continue;
        }
        let Some(target) = current else {
            if !reported_headerless {
                reported_headerless = true;
                issues.push(issue(
                    Some(lineno),
                    None,
                    format!("'{value}' comes before any [section] header"),
                ));
            }
            continue;
        };
        let (name, val) = split_option(value);
        if name.is_empty() {
            issues.push(issue(
                Some(lineno),
                None,
                format!("line has no key before its '=' or ':': '{value}'"),
            ));
            option = None;
            continue;
        }
        let key = name.to_lowercase();
        let raw = RawEntry {
            key: key.clone(),
            parts: val.map(|v| vec![v.to_owned()]),
            line: lineno,
        };
        let (section, earlier) = match target {
            Target::Defaults => ("DEFAULT", defaults.as_slice()),
            Target::Section(i) => (sections[i].0.as_str(), sections[i].2.as_slice()),
            Target::Discard => ("", [].as_slice()),
        };
        if let Some(first) = earlier.iter().find(|e| e.key == key) {
            issues.push(issue(
                Some(lineno),
                Some(format!("{section}.{key}")),
                format!(
                    "duplicate key '{key}' in section '{section}' (first defined at line {})",
                    first.line
                ),
            ));
            discard.push(raw);
            option = Some((Target::Discard, discard.len() - 1));
            continue;
        }
        let entries = entries_of(target, &mut defaults, &mut sections, &mut discard);
        entries.push(raw);
        option = Some((target, entries.len() - 1));
    }

    let join = |raw: Vec<RawEntry>| -> Vec<Entry> {
        raw.into_iter()
            .map(|e| Entry {
                key: e.key,
                value: e
                    .parts
                    .map(|p| p.join("\n").trim_end_matches(py_space).to_owned()),
                line: e.line,
            })
            .collect()
    };
    Document {
        defaults: join(defaults),
        sections: sections
            .into_iter()
            .map(|(name, line, entries)| Section {
                name,
                line,
                entries: join(entries),
            })
            .collect(),
    }
}

fn entries_of<'a>(
    target: Target,
    defaults: &'a mut Vec<RawEntry>,
    sections: &'a mut [(String, usize, Vec<RawEntry>)],
    discard: &'a mut Vec<RawEntry>,
) -> &'a mut Vec<RawEntry> {
    match target {
        Target::Defaults => defaults,
        Target::Section(i) => &mut sections[i].2,
        Target::Discard => discard,
    }
}

/// Lines as Python's universal newlines split them (`\n`, `\r\n`, `\r`).
fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.find(['\r', '\n']) {
            None => Some(std::mem::take(&mut rest)),
            Some(i) => {
                let line = &rest[..i];
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
                Some(line)
            }
        }
    })
}

/// configparser's `\[(?P<header>.+)\]`, matched at the start of the stripped line.
fn section_header(value: &str) -> Option<&str> {
    let inner = value.strip_prefix('[')?;
    let end = inner.rfind(']')?;
    (end > 0).then(|| &inner[..end])
}

/// configparser's option pattern with `allow_no_value`: the key runs to the first `=` or
/// `:`; without either, the whole line is a key without a value.
fn split_option(value: &str) -> (&str, Option<&str>) {
    match value.find(['=', ':']) {
        Some(i) => (
            value[..i].trim_end_matches(py_space),
            Some(py_strip(&value[i + 1..])),
        ),
        None => (value, None),
    }
}

/// Python's `str.isspace()`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// A section's keys with `[DEFAULT]`'s, as `ConfigParser.items(section)` lists them:
/// defaults first (a section's own value wins), then the section's other keys. The flag
/// says the entry came from `[DEFAULT]`.
fn effective<'a>(section: &'a [Entry], defaults: &'a [Entry]) -> Vec<(&'a Entry, bool)> {
    let mut out: Vec<(&Entry, bool)> = defaults
        .iter()
        .map(|d| match section.iter().find(|e| e.key == d.key) {
            Some(own) => (own, false),
            None => (d, true),
        })
        .collect();
    out.extend(
        section
            .iter()
            .filter(|e| !defaults.iter().any(|d| d.key == e.key))
            .map(|e| (e, false)),
    );
    out
}

/// configparser's BasicInterpolation of a raw value.
fn interpolate(
    raw: &str,
    section: &Section,
    defaults: &[Entry],
    depth: usize,
) -> Result<String, String> {
    if depth > MAX_INTERPOLATION_DEPTH {
        return Err(format!(
            "cannot interpolate '{raw}': references nest more than {MAX_INTERPOLATION_DEPTH} deep"
        ));
    }
    let mut out = String::new();
    let mut rest = raw;
    while let Some(p) = rest.find('%') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let after = &rest[1..];
        if let Some(r) = after.strip_prefix('%') {
            out.push('%');
            rest = r;
        } else if let Some(inner) = after.strip_prefix('(') {
            let reference = inner
                .find(')')
                .filter(|&close| close > 0 && inner[close + 1..].starts_with('s'));
            let Some(close) = reference else {
                return Err(format!(
                    "cannot interpolate '{raw}': bad reference '{rest}' (write '%%' for '%')"
                ));
            };
            let name = inner[..close].to_lowercase();
            rest = &inner[close + 2..];
            let found = section
                .entries
                .iter()
                .chain(defaults)
                .find(|e| e.key == name)
                .map(|e| e.value.as_deref());
            match found {
                None => {
                    return Err(format!(
                        "cannot interpolate '{raw}': no key '{name}' in section '{}' or [DEFAULT]",
                        section.name
                    ));
                }
                Some(None) => {
                    return Err(format!(
                        "cannot interpolate '{raw}': key '{name}' has no value"
                    ));
                }
                Some(Some(v)) if v.contains('%') => {
                    out.push_str(&interpolate(v, section, defaults, depth + 1)?);
                }
                Some(Some(v)) => out.push_str(v),
            }
        } else {
            return Err(format!(
                "cannot interpolate '{raw}': '%' must be followed by '%' or '(', found: '{rest}'"
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// From sections to instances and nodes (zeek-client's Configuration.from_config_parser).

fn issue(line: Option<usize>, key: Option<String>, message: String) -> Issue {
    Issue {
        file: None,
        line,
        key,
        message,
    }
}

/// One key of `[instances]`.
fn read_instance(
    section: &Section,
    defaults: &[Entry],
    entry: &Entry,
    from_default: bool,
    issues: &mut Vec<Issue>,
) -> Instance {
    let name = entry.key.clone();
    let mut inst = Instance {
        name: name.clone(),
        host: None,
        port: None,
    };
    let key = Some(format!("instances.{name}"));
    let line = Some(entry.line);
    let hint = if from_default {
        " ([DEFAULT] keys apply to [instances] too)"
    } else {
        ""
    };
    let Some(raw) = &entry.value else {
        return inst;
    };
    let spec = match interpolate(raw, section, defaults, 1) {
        Ok(spec) => spec,
        Err(e) => {
            issues.push(issue(line, key, e));
            return inst;
        }
    };
    if spec.is_empty() {
        return inst;
    }
    let (host, port) = spec.rsplit_once(':').unwrap_or(("", &spec));
    if host.is_empty() || port.is_empty() {
        issues.push(issue(
            line,
            key,
            format!(
                "invalid spec for instance \"{name}\": \"{spec}\" should be <host>:<port>{hint}"
            ),
        ));
        return inst;
    }
    let host = host.trim_matches(['[', ']', ' ']);
    match host.parse::<IpAddr>() {
        Ok(ip) => inst.host = (ip != IpAddr::V4(Ipv4Addr::UNSPECIFIED)).then_some(ip),
        Err(_) => issues.push(issue(
            line,
            key.clone(),
            format!(
                "invalid spec for instance \"{name}\": '{host}' does not appear to be an IPv4 or \
                 IPv6 address (host names are not supported){hint}"
            ),
        )),
    }
    match parse_port(port) {
        Ok(p) => inst.port = Some(p),
        Err(_) => issues.push(issue(
            line,
            key,
            format!(
                "invalid spec for instance \"{name}\": port \"{}\" is not a number from 1 to \
                 65535{hint}",
                py_strip(port)
            ),
        )),
    }
    inst
}

/// Why a port value was refused.
enum PortError {
    /// Not an integer.
    NotInt,
    /// An integer outside 1..=65535.
    Range(i128),
    /// A protocol other than tcp.
    Protocol,
}

/// A port: a Python integer from 1 to 65535, optionally followed by `/tcp`.
fn parse_port(text: &str) -> Result<u16, PortError> {
    let text = py_strip(text);
    let number = match text.split_once('/') {
        Some((n, proto)) if py_strip(proto).eq_ignore_ascii_case("tcp") => n,
        Some(_) => return Err(PortError::Protocol),
        None => text,
    };
    let n = py_int(number).ok_or(PortError::NotInt)?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(PortError::Range(n))
}

/// Python's `int(text)` for base-10 ASCII digits (sign, surrounding white space and
/// single underscores between digits allowed); saturates instead of growing.
fn py_int(text: &str) -> Option<i128> {
    let text = py_strip(text);
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'+') => (false, &text[1..]),
        Some(b'-') => (true, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let mut n: i128 = 0;
    for c in digits.chars().filter(|c| *c != '_') {
        let d = c.to_digit(10)?;
        n = n.saturating_mul(10).saturating_add(i128::from(d));
    }
    Some(if negative { -n } else { n })
}

/// A Zeek role name: case-insensitive, `Supervisor::` and `Foo.` prefixes dropped.
fn zeek_role(text: &str) -> Option<ClusterRole> {
    let last = text.rsplit("::").next().unwrap_or(text);
    let last = last.rsplit('.').next().unwrap_or(last);
    match last.to_uppercase().as_str() {
        "NONE" => Some(ClusterRole::None),
        "LOGGER" => Some(ClusterRole::Logger),
        "MANAGER" => Some(ClusterRole::Manager),
        "PROXY" => Some(ClusterRole::Proxy),
        "WORKER" => Some(ClusterRole::Worker),
        _ => None,
    }
}

/// One node section, with issues for what could not be read (such values are left at
/// their defaults); `None` when it is not usable at all.
fn read_node(
    section: &Section,
    defaults: &[Entry],
    options: &IniOptions,
    issues: &mut Vec<Issue>,
) -> Option<Node> {
    let name = section.name.as_str();
    // key -> (interpolated value, line)
    let mut values: BTreeMap<&str, (String, usize)> = BTreeMap::new();
    for (entry, from_default) in effective(&section.entries, defaults) {
        let key = if from_default {
            format!("DEFAULT.{}", entry.key)
        } else {
            format!("{name}.{}", entry.key)
        };
        let known = INI_NODE_KEYS.contains(&entry.key.as_str())
            || INI_OTHER_KEYS.contains(&entry.key.as_str())
            || INI_EXEC_KEYS.contains(&entry.key.as_str());
        if !known {
            issues.push(issue(
                Some(entry.line),
                Some(key),
                unknown_key_message(&entry.key),
            ));
            continue;
        }
        let Some(raw) = &entry.value else {
            issues.push(issue(
                Some(entry.line),
                Some(key),
                format!("config item {name}.{} needs a value", entry.key),
            ));
            continue;
        };
        match interpolate(raw, section, defaults, 1) {
            Ok(v) => {
                values.insert(entry.key.as_str(), (v, entry.line));
            }
            Err(e) => issues.push(issue(Some(entry.line), Some(key), e)),
        }
    }
    let mut fail = |line: usize, key: &str, message: String| {
        issues.push(issue(Some(line), Some(format!("{name}.{key}")), message));
    };

    let instance = values
        .get("instance")
        .map(|(v, _)| v.as_str())
        .filter(|v| !v.is_empty());
    let mut node = Node::new(
        name,
        instance.map_or_else(|| options.default_instance(), str::to_owned),
    );

    match values.get("role").or_else(|| values.get("type")) {
        Some((role, line)) if !role.is_empty() => match zeek_role(role) {
            Some(r) => node.role = r,
            None => fail(*line, "role", format!("role \"{role}\" is invalid")),
        },
        Some((_, line)) => fail(*line, "role", "node requires a role".to_owned()),
        None => fail(section.line, "role", "node requires a role".to_owned()),
    }

    for (key, what) in [("port", "port"), ("metrics_port", "metrics port")] {
        let Some((text, line)) = values.get(key) else {
            continue;
        };
        match parse_port(text) {
            Ok(p) if key == "port" => node.port = Some(p),
            Ok(p) => node.metrics_port = Some(p),
            Err(PortError::NotInt) => fail(
                *line,
                key,
                format!("cannot convert \"{name}.{key}\" value \"{text}\" to int"),
            ),
            Err(PortError::Range(n)) => fail(*line, key, format!("{what} {n} outside valid range")),
            Err(PortError::Protocol) => {
                fail(*line, key, format!("{what} \"{text}\" is not a tcp port"))
            }
        }
    }

    if let Some((text, _)) = values.get("interface") {
        node.interface = Some(text.clone());
    }

    if let Some((text, line)) = values.get("cpu_affinity") {
        match parse_cpus(text) {
            Ok(cpus) => node.cpu_affinity = Some(cpus),
            Err(None) => fail(
                *line,
                "cpu_affinity",
                format!("cannot convert \"{name}.cpu_affinity\" value \"{text}\" to int"),
            ),
            Err(Some(n)) => fail(
                *line,
                "cpu_affinity",
                format!("cpu_affinity {n} outside valid range"),
            ),
        }
    }

    if let Some((text, line)) = values.get("scripts") {
        match shlex_split(text) {
            Ok(mut scripts) => {
                scripts.sort();
                node.scripts = scripts;
            }
            Err(e) => fail(
                *line,
                "scripts",
                format!("scripts value \"{text}\" is invalid: {e}"),
            ),
        }
    }

    if let Some((text, line)) = values.get("env") {
        let pairs = shlex_split(text).ok().and_then(|words| {
            words
                .iter()
                .map(|w| w.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect::<Option<Vec<_>>>()
        });
        match pairs {
            Some(pairs) => node.env.extend(pairs),
            None => fail(*line, "env", format!("env value \"{text}\" is invalid")),
        }
    }
    read_exec(&values, &mut node, &mut fail);

    // Read errors are reported; the node is kept for the rest of its checks, so that a
    // file's every problem is reported in one pass.
    Some(node)
}

/// The identity, capability and limit keys of a node section: `user = zeek`,
/// `supplementary_groups = pcap adm`, `umask = 0027`,
/// `capabilities = CAP_NET_RAW CAP_NET_ADMIN` (or comma-separated),
/// `no_new_privileges = yes` (configparser's booleans) and
/// `limits = nofile=65536 core=unlimited` (shell words).
fn read_exec(
    values: &BTreeMap<&str, (String, usize)>,
    node: &mut Node,
    fail: &mut impl FnMut(usize, &str, String),
) {
    if let Some((text, _)) = values.get("user") {
        node.user = Some(text.clone());
    }
    if let Some((text, _)) = values.get("group") {
        node.group = Some(text.clone());
    }
    if let Some((text, line)) = values.get("supplementary_groups") {
        match shlex_split(text) {
            Ok(groups) => node.supplementary_groups = Some(groups),
            Err(e) => fail(
                *line,
                "supplementary_groups",
                format!("supplementary_groups value \"{text}\" is invalid: {e}"),
            ),
        }
    }
    if let Some((text, line)) = values.get("umask") {
        match Umask::parse(text) {
            Ok(u) => node.umask = Some(u),
            Err(e) => fail(*line, "umask", e),
        }
    }
    if let Some((text, line)) = values.get("capabilities") {
        let caps: Vec<String> = text
            .split(|c: char| c == ',' || py_space(c))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        for c in &caps {
            if exec::capability_number(c).is_none() {
                fail(*line, "capabilities", exec::unknown_capability(c));
            }
        }
        node.capabilities = Some(caps);
    }
    if let Some((text, line)) = values.get("no_new_privileges") {
        match text.to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => node.no_new_privileges = Some(true),
            "0" | "no" | "false" | "off" => node.no_new_privileges = Some(false),
            _ => fail(*line, "no_new_privileges", format!("not a boolean: {text}")),
        }
    }
    if let Some((text, line)) = values.get("limits") {
        let Ok(words) = shlex_split(text) else {
            fail(
                *line,
                "limits",
                format!("limits value \"{text}\" is invalid"),
            );
            return;
        };
        for word in words {
            let Some((name, value)) = word.split_once('=') else {
                fail(*line, "limits", format!("limit '{word}' is not NAME=VALUE"));
                continue;
            };
            match exec::LIMITS.iter().find(|(n, _)| *n == name) {
                None => fail(
                    *line,
                    "limits",
                    config::unknown_key_with_suggestion(name, exec::LIMITS.iter().map(|(n, _)| *n))
                        .replace("unknown key", "unknown limit"),
                ),
                Some((_, bytes)) => match exec::Limit::parse(value, *bytes) {
                    Ok(l) => {
                        node.limits.insert(name.to_owned(), l);
                    }
                    Err(e) => fail(*line, "limits", format!("limit {name}: {e}")),
                },
            }
        }
    }
}

/// `cpu_affinity`: one CPU (Zeek), or several separated by commas or white space (drover).
/// The error carries the out-of-range number, or `None` for a non-number.
fn parse_cpus(text: &str) -> Result<CpuAffinity, Option<i128>> {
    let cpu = |word: &str| {
        let n = py_int(word).ok_or(None)?;
        u32::try_from(n).map_err(|_| Some(n))
    };
    let text = py_strip(text);
    if !text.contains(|c: char| c == ',' || py_space(c)) {
        return cpu(text).map(CpuAffinity::One);
    }
    let cpus = text
        .split(|c: char| c == ',' || py_space(c))
        .filter(|w| !w.is_empty())
        .map(cpu)
        .collect::<Result<Vec<u32>, _>>()?;
    if cpus.is_empty() {
        return Err(None);
    }
    Ok(CpuAffinity::Many(cpus))
}

fn unknown_key_message(key: &str) -> String {
    if config::NODE_KEYS.contains(&key) {
        return format!(
            "unknown key '{key}': Zeek's INI format has no '{key}'; drover-only settings need \
             the TOML format"
        );
    }
    config::unknown_key_with_suggestion(key, INI_NODE_KEYS.iter().copied())
}

/// A hint for "undeclared instance" issues that only a letter case explains.
fn case_hint(config: &Configuration, key: &str) -> String {
    let Some(node) = key
        .strip_prefix("nodes.")
        .and_then(|k| k.strip_suffix(".instance"))
        .and_then(|n| config.node(n))
    else {
        return String::new();
    };
    let lower = node.instance.to_lowercase();
    if lower != node.instance && config.instances.iter().any(|i| i.name == lower) {
        " (keys in [instances] are lower-cased, as zeek-client does: use lower-case instance \
         names)"
            .to_owned()
    } else {
        String::new()
    }
}

/// Puts the file and missing lines on the issues, sorts them by line and de-duplicates
/// them.
fn finish(file: &str, issues: Vec<Issue>, lines: &BTreeMap<String, usize>) -> Issues {
    let mut issues: Vec<Issue> = issues
        .into_iter()
        .map(|mut found| {
            found.file = Some(file.to_owned());
            if found.line.is_none() {
                found.line = found
                    .key
                    .as_deref()
                    .and_then(|k| config::written_at(lines, k))
                    .map(|(_, line)| line);
            }
            found
        })
        .collect();
    // By line, as TOML files' problems are: the order an editor walks the file in.
    issues.sort();
    issues.dedup();
    Issues(issues)
}

/// Python's `shlex.split(text)` (POSIX mode, no comments).
fn shlex_split(text: &str) -> Result<Vec<String>, &'static str> {
    const WS: [char; 4] = [' ', '\t', '\r', '\n'];
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| WS.contains(c)).is_some() {}
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut word = String::new();
        while let Some(c) = chars.next() {
            match c {
                c if WS.contains(&c) => break,
                '\\' => word.push(chars.next().ok_or("no escaped character")?),
                '\'' => loop {
                    match chars.next() {
                        None => return Err("no closing quotation"),
                        Some('\'') => break,
                        Some(q) => word.push(q),
                    }
                },
                '"' => loop {
                    match chars.next() {
                        None => return Err("no closing quotation"),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            None => return Err("no escaped character"),
                            Some(e @ ('"' | '\\')) => word.push(e),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                        },
                        Some(q) => word.push(q),
                    }
                },
                c => word.push(c),
            }
        }
        words.push(word);
    }
}

// ---------------------------------------------------------------------------------------
// Writing INI (zeek-client's Configuration.to_config_parser and ConfigParser.write).

/// `key = value` as ConfigParser.write prints it, `%` doubled so that it reads back.
fn push_ini_item(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str(" = ");
    out.push_str(&value.replace('%', "%%").replace('\n', "\n\t"));
    out.push('\n');
}

/// zeek-client's quoting: double quotes around a value with white space in it.
fn zeek_quote(value: &str) -> String {
    if value.split(py_space).filter(|w| !w.is_empty()).count() > 1 {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

/// A script for `scripts =`: zeek-client's quoting when it reads back as the same
/// script, else proper shell quoting.
fn shell_word(script: &str) -> String {
    let zeek = zeek_quote(script);
    if shlex_split(&zeek).is_ok_and(|w| w == [script]) {
        zeek
    } else {
        shell_quote(script)
    }
}

/// `KEY=VALUE` for `env =`, quoted like [`shell_word`].
fn env_word(key: &str, value: &str) -> String {
    let zeek = format!("{key}={}", zeek_quote(value));
    let want = format!("{key}={value}");
    if shlex_split(&zeek).is_ok_and(|w| w == [want.as_str()]) {
        zeek
    } else {
        format!("{}={}", shell_quote(key), shell_quote(value))
    }
}

/// A word shlex reads back as `s`: as is when it is made of safe characters, else in
/// single quotes.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------
// Writing TOML.

/// A TOML key: bare when it can be, else a basic string.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return key.to_owned();
    }
    let mut out = String::from("\"");
    for c in key.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A string as a TOML value.
fn toml_value(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The fields of `value` as `key = value` lines, in [`config::NODE_KEYS`] order and then
/// sorted, leaving out those equal to an entry of `skip`.
fn push_toml_table<T: serde::Serialize>(
    out: &mut String,
    value: &T,
    skip: &[(String, toml::Value)],
) {
    let table = match toml::Value::try_from(value) {
        Ok(toml::Value::Table(table)) => table,
        Ok(_) => return,
        Err(e) => {
            out.push_str(&format!("# cannot render: {e}\n"));
            return;
        }
    };
    let mut fields: Vec<(String, toml::Value)> = table.into_iter().collect();
    fields.retain(|(k, v)| k != "name" && !skip.iter().any(|(sk, sv)| sk == k && sv == v));
    let rank = |k: &str| {
        config::NODE_KEYS
            .iter()
            .position(|n| *n == k)
            .unwrap_or(usize::MAX)
    };
    fields.sort_by(|(a, _), (b, _)| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    for (k, v) in fields {
        out.push_str(&format!("{} = {v}\n", toml_key(&k)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::parse_toml;
    use crate::model::{Backoff, Readiness, RestartPolicy};

    #[test]
    fn node_sections_carry_identity_capabilities_and_limits() {
        let text = "[worker-01]\nrole = worker\nuser = zeek\ngroup = 65533\n\
                    supplementary_groups = pcap \"adm\"\numask = 0027\n\
                    capabilities = CAP_NET_RAW, CAP_NET_ADMIN\nno_new_privileges = yes\n\
                    limits = nofile=65536 core=unlimited memlock=64M\n";
        let c = parse_ini_with("c.ini", text, &sensor()).unwrap();
        let w = node(&c, "worker-01");
        assert_eq!(w.user.as_deref(), Some("zeek"));
        assert_eq!(w.group.as_deref(), Some("65533"));
        assert_eq!(
            w.supplementary_groups,
            Some(vec!["pcap".to_owned(), "adm".to_owned()])
        );
        assert_eq!(w.umask, Some(Umask(0o27)));
        assert_eq!(
            w.capabilities.as_deref(),
            Some(&["CAP_NET_RAW".to_owned(), "CAP_NET_ADMIN".to_owned()][..])
        );
        assert_eq!(w.no_new_privileges, Some(true));
        assert_eq!(w.limits["nofile"].to_string(), "65536");
        assert_eq!(w.limits["core"].to_string(), "unlimited");
        assert_eq!(w.limits["memlock"].to_string(), (64u64 << 20).to_string());
        assert!(
            !to_ini(&c).contains("user"),
            "zeek-client's output knows none of them"
        );

        let bad = "[w]\nrole = worker\nuser = nobody\numask = 9\ncapabilities = CAP_NOPE\n\
                   no_new_privileges = maybe\nlimits = nofile=many nofiles=1 core\n";
        let errs = errors(bad);
        let want = [
            "c.ini:4: w.umask: umask '9' is not an octal mask such as \"0027\" (0000-0777)",
            "c.ini:5: w.capabilities: unknown capability 'CAP_NOPE'",
            "c.ini:6: w.no_new_privileges: not a boolean: maybe",
            "c.ini:7: w.limits: limit 'core' is not NAME=VALUE",
            "c.ini:7: w.limits: limit nofile: 'many' is not a limit: expected a number or \"unlimited\"",
            "c.ini:7: w.limits: unknown limit 'nofiles' (did you mean 'nofile'?)",
        ];
        assert_eq!(errs, want);
        // What only validation finds, at its line too.
        assert_eq!(
            errors("[w]\nrole = worker\nuser = a:b\n"),
            ["c.ini:3: w.user: user 'a:b' is not a valid name"]
        );
    }

    /// `no_new_privileges = no` on an INI node is its own: a roles file's default or
    /// template of `true` does not override it.
    #[test]
    fn an_ini_node_that_turns_off_what_a_roles_file_sets_keeps_it_off() {
        let ini = "[w1]\ninstance = agent-a\nrole = worker\nno_new_privileges = no\n\n\
                   [w2]\ninstance = agent-a\nrole = worker\n";
        let config = parse_ini("c.ini", ini).unwrap();
        for roles in [
            "[defaults]\nno_new_privileges = true\n[roles.worker]\ncommand = [\"/bin/zeek\"]\n",
            "[roles.worker]\ncommand = [\"/bin/zeek\"]\nno_new_privileges = true\n",
        ] {
            let merged = with_roles(&config, "c.ini", "roles.toml", roles).unwrap();
            let nnp = |n: &str| merged.resolve(merged.node(n).unwrap()).no_new_privileges;
            assert_eq!(nnp("w1"), None, "off: {roles}");
            assert_eq!(nnp("w2"), Some(true), "{roles}");
        }
    }

    #[test]
    fn a_roles_file_gives_ini_nodes_their_commands() {
        let ini = "[manager]\ninstance = agent-a\nrole = manager\nport = 5000\n\n\
                   [worker-01]\ninstance = agent-a\nrole = worker\ninterface = eth0\n";
        let config = parse_ini("c.ini", ini).unwrap();
        let roles = "[defaults]\nrestart = \"always\"\n\n[roles.worker]\n\
                     command = [\"/bin/zeek\", \"-i\", \"{interface}\"]\n\n\
                     [roles.manager]\ncommand = [\"/bin/zeek\"]\n";
        let merged = with_roles(&config, "c.ini", "roles.toml", roles).unwrap();
        assert_eq!(merged.nodes, {
            let mut c = config.clone();
            for n in &mut c.nodes {
                n.restart = RestartPolicy::Always;
            }
            c.nodes
        });
        assert_eq!(
            merged.roles["worker"].command,
            ["/bin/zeek", "-i", "{interface}"]
        );
        assert!(config::validate(&merged).is_empty());
        assert_eq!(merged.id, config.id);

        // Without a template for every role, the merged configuration is refused.
        let partial = "[roles.worker]\ncommand = [\"/bin/zeek\"]\n";
        let err = with_roles(&config, "c.ini", "roles.toml", partial).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("c.ini (with roles from roles.toml)"),
            "{text}"
        );
        assert!(text.contains("manager"), "{text}");

        // A template of the configuration's own wins.
        let mut own = config.clone();
        own.roles.insert(
            "manager".into(),
            RoleTemplate {
                command: vec!["/bin/mine".into()],
                env: BTreeMap::new(),
                ..RoleTemplate::default()
            },
        );
        let merged = with_roles(&own, "c.ini", "roles.toml", roles).unwrap();
        assert_eq!(merged.roles["manager"].command, ["/bin/mine"]);

        // Bad roles files name the file and what is wrong.
        let err = with_roles(&config, "c.ini", "roles.toml", "[nodes.x]\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("roles.toml: nodes: unknown table"),
            "{err}"
        );
        let err = with_roles(&config, "c.ini", "roles.toml", "\n[roles\n").unwrap_err();
        assert!(err.to_string().starts_with("roles.toml:2: "), "{err}");
        let typed = "[defaults]\nstop_timeout = 5\n[roles.worker]\ncommand = \"zeek\"\n";
        let err = with_roles(&config, "c.ini", "roles.toml", typed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "roles.toml:2: defaults.stop_timeout: expected a duration such as \"10s\" or \"250ms\", found integer 5\n\
             roles.toml:4: roles.worker.command: expected an array of strings, found string \"zeek\""
        );
    }

    const FULL_CONFIG: &str = include_str!("../tests/data/ini/reference-full-config.ini");
    const QUICK_START: &str = include_str!("../tests/data/ini/reference-quick-start.ini");
    const GET_CONFIG: &str = include_str!("../tests/data/ini/reference-get-config.ini");
    const ALL_KEYS: &str = include_str!("../tests/data/ini/all-keys.ini");
    const ALL_KEYS_OUT: &str = include_str!("../tests/data/ini/all-keys.expected.ini");
    const HOSTS: &str = include_str!("../tests/data/ini/hosts.ini");
    const HOSTS_OUT: &str = include_str!("../tests/data/ini/hosts.expected.ini");
    const CLUSTER_INI: &str = include_str!("../tests/data/ini/cluster.ini");
    const CLUSTER_TOML: &str = include_str!("../tests/data/ini/cluster.toml");

    fn sensor() -> IniOptions {
        IniOptions {
            hostname: Some("sensor".to_owned()),
        }
    }

    fn ok(text: &str) -> Configuration {
        parse_ini("c.ini", text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The issues of a file that must fail, one display line each.
    fn errors(text: &str) -> Vec<String> {
        match parse_ini("c.ini", text) {
            Ok(c) => panic!("parsed: {c:?}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn node<'a>(c: &'a Configuration, name: &str) -> &'a Node {
        c.node(name).unwrap_or_else(|| panic!("no node {name}"))
    }

    fn inst(name: &str, host: Option<&str>, port: Option<u16>) -> Instance {
        Instance {
            name: name.to_owned(),
            host: host.map(|h| h.parse().unwrap()),
            port,
        }
    }

    fn zeek_node(name: &str, instance: &str, role: ClusterRole) -> Node {
        let mut n = Node::new(name, instance);
        n.role = role;
        n
    }

    #[test]
    fn reference_full_config_parses() {
        let c = ok(FULL_CONFIG);
        assert_eq!(c.instances, vec![inst("agent-testbox", None, None)]);
        let mut worker = zeek_node("worker1", "agent-testbox", ClusterRole::Worker);
        worker.interface = Some("eth0".into());
        worker.cpu_affinity = Some(CpuAffinity::One(3));
        assert_eq!(
            c.nodes,
            vec![
                zeek_node("manager", "agent-testbox", ClusterRole::Manager),
                worker
            ]
        );
        assert!(c.roles.is_empty());
        assert!(!c.id.is_empty());
    }

    #[test]
    fn reference_quick_start_goes_to_agent_hostname() {
        let c = parse_ini_with("q.ini", QUICK_START, &sensor()).unwrap();
        assert_eq!(c.instances, vec![inst("agent-sensor", None, None)]);
        let mut worker = zeek_node("worker-01", "agent-sensor", ClusterRole::Worker);
        worker.interface = Some("lo".into());
        assert_eq!(
            c.nodes,
            vec![
                zeek_node("logger", "agent-sensor", ClusterRole::Logger),
                zeek_node("manager", "agent-sensor", ClusterRole::Manager),
                worker
            ]
        );
        // Without a host name: zeek-client's fallback.
        let c = ok(QUICK_START);
        assert_eq!(c.instances, vec![inst("agent-localhost", None, None)]);
        assert!(c.nodes.iter().all(|n| n.instance == "agent-localhost"));
    }

    #[test]
    fn reference_stage_request_config_parses() {
        // The INI behind the stage_configuration_request captured in the reference (§7.7).
        let text = "[manager]\nrole=manager\ninstance=agent-a\nport=5000\n\
                    [worker-01]\nrole=worker\ninstance=agent-a\ninterface=eth0\n\
                    env=FOO=BAR BAZ=\"a b\"\nscripts=policy/misc/loaded-scripts\n\
                    cpu_affinity=2\nmetrics_port=9100\n";
        let c = ok(text);
        assert_eq!(c.instances, vec![inst("agent-a", None, None)]);
        let mut manager = zeek_node("manager", "agent-a", ClusterRole::Manager);
        manager.port = Some(5000);
        let mut worker = zeek_node("worker-01", "agent-a", ClusterRole::Worker);
        worker.interface = Some("eth0".into());
        worker.env = BTreeMap::from([("BAZ".into(), "a b".into()), ("FOO".into(), "BAR".into())]);
        worker.scripts = vec!["policy/misc/loaded-scripts".into()];
        worker.cpu_affinity = Some(CpuAffinity::One(2));
        worker.metrics_port = Some(9100);
        assert_eq!(c.nodes, vec![manager, worker]);
    }

    #[test]
    fn to_ini_reproduces_the_reference_get_config_output() {
        let mut c = Configuration::empty();
        c.instances.push(inst("instance-1", None, None));
        let mut logger = zeek_node("logger-01", "instance-1", ClusterRole::Logger);
        logger.port = Some(5001);
        let mut worker = zeek_node("worker-01", "instance-1", ClusterRole::Worker);
        worker.interface = Some("eth0".into());
        // Given out of order: get-config sorts.
        c.nodes = vec![worker, logger];
        assert_eq!(to_ini(&c), GET_CONFIG);
    }

    #[test]
    fn to_ini_prints_what_zeek_client_prints() {
        // The expected files are zeek-client 1.5.0's own output for these inputs.
        assert_eq!(to_ini(&ok(ALL_KEYS)), ALL_KEYS_OUT);
        assert_eq!(to_ini(&ok(HOSTS)), HOSTS_OUT);
        let free = "[m]\nrole = manager\n[w]\nrole = worker\ninterface = eth0\n";
        let c = parse_ini_with("c.ini", free, &sensor()).unwrap();
        assert_eq!(
            to_ini(&c),
            "[instances]\nagent-sensor\n\n[m]\ninstance = agent-sensor\nrole = MANAGER\n\n\
             [w]\ninstance = agent-sensor\nrole = WORKER\ninterface = eth0\n\n"
        );
        // Instance names are keys, which configparser lower-cases, so names differing in
        // case share one line.
        let c = ok(
            "[w1]\nrole = worker\ninstance = Edge-1\n[w2]\nrole = worker\n\
                    instance = edge-1\n[w0]\nrole = logger\ninstance = core\n",
        );
        assert_eq!(
            to_ini(&c),
            "[instances]\nedge-1\ncore\n\n[w0]\ninstance = core\nrole = LOGGER\n\n\
             [w1]\ninstance = Edge-1\nrole = WORKER\n\n[w2]\ninstance = edge-1\nrole = WORKER\n\n"
        );
        assert_eq!(to_ini(&ok("")), "");
    }

    #[test]
    fn to_ini_leaves_out_what_zeek_does_not_know() {
        let mut c = ok(ALL_KEYS);
        for n in &mut c.nodes {
            n.command = vec!["/bin/zeek".into()];
            n.workdir = Some("/srv".into());
            n.restart = RestartPolicy::Always;
            n.readiness = Readiness::Notify {
                timeout: Duration::from_secs(3),
            };
            n.stop_signal = "SIGINT".into();
            n.stop_timeout = Duration::from_secs(1);
        }
        c.roles.insert(
            "worker".into(),
            RoleTemplate {
                command: vec!["zeek".into()],
                env: BTreeMap::new(),
                ..RoleTemplate::default()
            },
        );
        c.instances[0].host = Some("10.1.1.1".parse().unwrap());
        assert_eq!(to_ini(&c), ALL_KEYS_OUT);
    }

    #[test]
    fn to_ini_quotes_what_zeek_client_would_garble() {
        let mut n = zeek_node("w", "a", ClusterRole::Worker);
        n.env = BTreeMap::from([
            ("PLAIN".into(), "x".into()),
            ("SPACED".into(), "a b".into()),
            ("QUOTE".into(), "q\"r".into()),
            ("APOS".into(), "it's".into()),
            ("BACKSLASH".into(), r"a\z".into()),
            ("LEAD".into(), "  x".into()),
            ("EMPTY".into(), String::new()),
            ("PCT".into(), "50%".into()),
        ]);
        n.scripts = vec!["b c.zeek".into(), "a\"b".into(), "plain.zeek".into()];
        n.interface = Some("eth%0".into());
        let mut c = Configuration::empty();
        c.instances.push(inst("a", None, None));
        c.nodes.push(n);
        let text = to_ini(&c);
        assert!(
            text.contains(
                "env = APOS='it'\\''s' BACKSLASH='a\\z' EMPTY= LEAD='  x' PCT=50%% PLAIN=x \
                 QUOTE='q\"r' SPACED=\"a b\"\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("scripts = 'a\"b' \"b c.zeek\" plain.zeek\n"),
            "{text}"
        );
        assert!(text.contains("interface = eth%%0\n"), "{text}");
        let back = ok(&text);
        assert_eq!(back.nodes[0].env, c.nodes[0].env);
        assert_eq!(back.nodes[0].interface.as_deref(), Some("eth%0"));
        assert_eq!(
            back.nodes[0].scripts,
            vec!["a\"b", "b c.zeek", "plain.zeek"]
        );
    }

    #[test]
    fn to_ini_prints_a_cpu_list_that_reads_back() {
        let mut n = zeek_node("w", "a", ClusterRole::Worker);
        n.cpu_affinity = Some(CpuAffinity::Many(vec![0, 2, 4]));
        let mut c = Configuration::empty();
        c.instances.push(inst("a", None, None));
        c.nodes.push(n);
        let text = to_ini(&c);
        assert!(text.contains("cpu_affinity = 0,2,4\n"), "{text}");
        assert_eq!(ok(&text).nodes, c.nodes);
        assert_eq!(
            ok("[w]\nrole = worker\ninstance = a\ncpu_affinity = 1 3\n").nodes[0].cpu_affinity,
            Some(CpuAffinity::Many(vec![1, 3]))
        );
    }

    #[test]
    fn ini_round_trips() {
        for text in [
            FULL_CONFIG,
            QUICK_START,
            GET_CONFIG,
            ALL_KEYS,
            HOSTS,
            CLUSTER_INI,
        ] {
            let first = ok(text);
            let printed = to_ini(&first);
            let again = ok(&printed);
            assert_eq!(again.instances, first.instances, "{text}");
            assert_eq!(again.nodes, first.nodes, "{text}");
            assert_eq!(to_ini(&again), printed);
        }
    }

    #[test]
    fn toml_round_trips() {
        let mut c = parse_toml("c.toml", CLUSTER_TOML).unwrap();
        assert_eq!(parse_toml("c.toml", &to_toml(&c)).unwrap(), c);

        // Every drover-only setting, odd names and values.
        c.id = "cfg \"7\"".into();
        let w = c.nodes.iter_mut().find(|n| n.name == "worker-1").unwrap();
        w.command = vec!["/bin/sh".into(), "-c".into(), "echo \"$X\" \\ 'y'\n".into()];
        w.workdir = Some("/srv/w 1".into());
        w.restart = RestartPolicy::Never;
        w.backoff = Backoff {
            initial: Duration::from_millis(250),
            multiplier: 1.5,
            ..Backoff::default()
        };
        w.max_failed_starts = 0;
        w.success_exit_codes = vec![0, 3];
        w.readiness = Readiness::Tcp {
            port: 47000,
            timeout: Duration::from_millis(1500),
        };
        w.stop_signal = "SIGINT".into();
        w.stop_timeout = Duration::from_secs(90);
        w.cpu_affinity = Some(CpuAffinity::Many(vec![4, 5]));
        w.env.insert("WEIRD KEY".into(), "ünïcode = \"x\"".into());
        let m = c.nodes.iter_mut().find(|n| n.name == "manager").unwrap();
        m.readiness = Readiness::StartPeriod {
            period: Duration::from_secs(5),
        };
        m.command = vec!["/opt/zeek/bin/zeek".into()];
        c.roles.get_mut("worker").unwrap().env =
            BTreeMap::from([("ZEEK_NODE".into(), "{name}".into())]);
        let mut dotted = Node::new("a.b", "manager-host");
        dotted.command = vec!["x".into()];
        c.nodes.push(dotted);
        c.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let text = to_toml(&c);
        assert_eq!(
            parse_toml("c.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}")),
            c
        );
        assert!(text.starts_with("id = "), "{text}");
        assert!(text.contains("[nodes.\"a.b\"]\ninstance = \"manager-host\"\ncommand = [\"x\"]\n"));
    }

    #[test]
    fn to_toml_writes_only_what_differs_from_the_defaults() {
        let c = parse_toml("c.toml", CLUSTER_TOML).unwrap();
        let text = to_toml(&c);
        assert!(
            text.contains(
                "\n[nodes.proxy-1]\ninstance = \"manager-host\"\nrole = \"proxy\"\nport = 2202\n\n"
            ),
            "{text}"
        );
        assert!(text.contains("\n[instances.manager-host]\n\n"), "{text}");
        assert!(
            text.contains("\n[instances.sensor-1]\nhost = \"10.0.0.11\"\nport = 2151\n"),
            "{text}"
        );
        assert!(!text.contains("restart"), "{text}");
        assert!(!text.contains("stop_"), "{text}");
    }

    #[test]
    fn the_same_cluster_in_toml_and_ini_has_the_same_nodes() {
        let from_toml = parse_toml("cluster.toml", CLUSTER_TOML).unwrap();
        let from_ini = ok(CLUSTER_INI);
        assert_eq!(from_ini.instances, from_toml.instances);
        assert_eq!(from_ini.nodes, from_toml.nodes);
        // INI nodes take their commands from templates merged in by the caller.
        let mut merged = from_ini;
        merged.roles = from_toml.roles.clone();
        assert_eq!(config::validate(&merged), vec![]);
        let w = merged.resolve(node(&merged, "worker-1"));
        assert_eq!(w.command, vec!["/opt/zeek/bin/zeek", "-i", "eth1", "local"]);
        assert_eq!(w.env["LABEL"], "sensor one");
        assert_eq!(
            to_ini(&from_toml),
            to_ini(&merged),
            "get-config prints both alike"
        );
    }

    #[test]
    fn nodes_without_commands_are_fine_until_templates_are_merged() {
        let c = ok(GET_CONFIG);
        let messages: Vec<String> = config::validate(&c)
            .into_iter()
            .map(|i| i.message)
            .collect();
        assert_eq!(
            messages,
            vec![
                "node 'logger-01' has no command and role 'logger' has no command template",
                "node 'worker-01' has no command and role 'worker' has no command template",
            ]
        );
        assert_eq!(validate_without_commands(&c), vec![]);
        // Everything else is still checked, and templates that exist are too.
        let mut bad = c.clone();
        bad.nodes[1].port = Some(5001);
        bad.roles.insert("proxy".into(), RoleTemplate::default());
        let messages: Vec<String> = validate_without_commands(&bad)
            .into_iter()
            .map(|i| i.message)
            .collect();
        assert_eq!(
            messages,
            vec![
                "a role template needs a non-empty command",
                "multiple nodes on instance 'instance-1' using port 5001/tcp",
            ]
        );
    }

    #[test]
    fn configparser_syntax_is_reproduced() {
        // [DEFAULT] keys would be instances in [instances], so the instances are implied.
        let text = "\u{feff}; comment\n# comment\n\
                    [DEFAULT]\nrole = worker\n\n[w1]\nINSTANCE: agent-1\nRole = Supervisor::WORKER\n\
                    env = A=1\n  B=2\n\n  # not part of it\n  C=%(role)s-50%%\n\
                    [w2]\ninstance=agent-1\ntype = proxy\nstate = RUNNING\n\
                    interface = eth0 ; no inline comments\n";
        let c = ok(text);
        assert_eq!(c.instances, vec![inst("agent-1", None, None)]);
        let w1 = node(&c, "w1");
        assert_eq!(w1.role, ClusterRole::Worker);
        assert_eq!(
            w1.env,
            BTreeMap::from([
                ("A".into(), "1".into()),
                ("B".into(), "2".into()),
                ("C".into(), "Supervisor::WORKER-50%".into()),
            ])
        );
        let w2 = node(&c, "w2");
        assert_eq!(
            w2.role,
            ClusterRole::Worker,
            "[DEFAULT] role beats the type alias"
        );
        assert_eq!(w2.interface.as_deref(), Some("eth0 ; no inline comments"));
        let typed = ok("[p]\ninstance = a\ntype = proxy\n");
        assert_eq!(typed.nodes[0].role, ClusterRole::Proxy);
        let crlf = ok("[m]\r\nrole = logger\r\ninstance = a\r\nport = +5_000\r\n");
        assert_eq!(crlf.nodes[0].port, Some(5000));
        assert_eq!(crlf.nodes[0].role, ClusterRole::Logger);
        let slash =
            ok("[m]\nrole = x.manager\ninstance = a\nport = 5000/tcp\nmetrics_port = 9000/TCP\n");
        assert_eq!(slash.nodes[0].role, ClusterRole::Manager);
        assert_eq!(slash.nodes[0].port, Some(5000));
        assert_eq!(slash.nodes[0].metrics_port, Some(9000));
        assert_eq!(
            ok("[n]\nrole = none\ninstance = a\n").nodes[0].role,
            ClusterRole::None
        );
        // An empty file, or one with only comments, is an empty cluster.
        for empty in ["", "# nothing\n\n", "[instances]\n"] {
            let c = ok(empty);
            assert!(c.instances.is_empty() && c.nodes.is_empty(), "{empty:?}");
        }
    }

    #[test]
    fn instance_specs_are_read_like_zeek_client() {
        let c = ok(HOSTS);
        assert_eq!(
            c.instances,
            vec![
                inst("in", None, None),
                inst("v4", Some("198.51.100.1"), Some(2151)),
                inst("v6-bare", Some("2001:db8::5"), Some(2152)),
                inst("v6-bracket", Some("2001:db8::6"), Some(2153)),
            ]
        );
        let c = ok("[instances]\nx = 0.0.0.0:2151\n");
        assert_eq!(c.instances, vec![inst("x", None, Some(2151))]);
        assert_eq!(to_ini(&c), "[instances]\nx = 0.0.0.0:2151\n\n");
    }

    #[test]
    fn empty_instance_value_means_the_local_agent() {
        // Not "instance-free" (the key is there), so mixing is allowed: zeek-client's quirk.
        let c = parse_ini_with(
            "c.ini",
            "[m]\nrole = manager\ninstance =\n[w]\nrole = worker\ninstance = x\n",
            &sensor(),
        )
        .unwrap();
        assert_eq!(node(&c, "m").instance, "agent-sensor");
        assert_eq!(
            c.instances,
            vec![inst("agent-sensor", None, None), inst("x", None, None)]
        );
    }

    #[test]
    fn node_errors_name_file_line_and_key() {
        let e = |body: &str| {
            errors(&format!(
                "[instances]\nagent\n\n[manager]\ninstance = agent\n{body}"
            ))
        };
        assert_eq!(
            e("role = manager\nport = eighty\n"),
            vec!["c.ini:7: manager.port: cannot convert \"manager.port\" value \"eighty\" to int"]
        );
        assert_eq!(
            e("role = manager\nport = 70000\n"),
            vec!["c.ini:7: manager.port: port 70000 outside valid range"]
        );
        assert_eq!(
            e("role = manager\nmetrics_port = 0\n"),
            vec!["c.ini:7: manager.metrics_port: metrics port 0 outside valid range"]
        );
        assert_eq!(
            e("role = manager\nport = 5000/udp\n"),
            vec!["c.ini:7: manager.port: port \"5000/udp\" is not a tcp port"]
        );
        assert_eq!(
            e("role = manager\ncpu_affinity = two\n"),
            vec![
                "c.ini:7: manager.cpu_affinity: cannot convert \"manager.cpu_affinity\" value \
                 \"two\" to int"
            ]
        );
        assert_eq!(
            e("role = manager\ncpu_affinity = -1\n"),
            vec!["c.ini:7: manager.cpu_affinity: cpu_affinity -1 outside valid range"]
        );
        assert_eq!(
            e("role = manager\ncpu_affinity = 4096\n"),
            vec!["c.ini:7: manager.cpu_affinity: cpu 4096 is out of range (0..1024)"]
        );
        assert_eq!(
            e("port = 80\n"),
            vec!["c.ini:4: manager.role: node requires a role"]
        );
        assert_eq!(
            e("role = superintendent\n"),
            vec!["c.ini:6: manager.role: role \"superintendent\" is invalid"]
        );
        assert_eq!(
            e("role = manager\nprot = 80\n"),
            vec!["c.ini:7: manager.prot: unknown key 'prot' (did you mean 'port'?)"]
        );
        assert_eq!(
            e("role = manager\ncommand = zeek\n"),
            vec![
                "c.ini:7: manager.command: unknown key 'command': Zeek's INI format has no \
                 'command'; drover-only settings need the TOML format"
            ]
        );
        assert_eq!(
            e("role = manager\nport\n"),
            vec!["c.ini:7: manager.port: config item manager.port needs a value"]
        );
        assert_eq!(
            e("role = manager\nenv = FOO\n"),
            vec!["c.ini:7: manager.env: env value \"FOO\" is invalid"]
        );
        assert_eq!(
            e("role = manager\nscripts = \"a.zeek\n"),
            vec![
                "c.ini:7: manager.scripts: scripts value \"\"a.zeek\" is invalid: no closing \
                 quotation"
            ]
        );
        assert_eq!(
            e("role = manager\ninterface = 50%\n"),
            vec![
                "c.ini:7: manager.interface: cannot interpolate '50%': '%' must be followed by \
                 '%' or '(', found: '%'"
            ]
        );
        assert_eq!(
            e("role = manager\ninterface = %(nic)s\n"),
            vec![
                "c.ini:7: manager.interface: cannot interpolate '%(nic)s': no key 'nic' in \
                 section 'manager' or [DEFAULT]"
            ]
        );
        assert_eq!(
            e("role = manager\nenv = X=%(env)s\n"),
            vec![
                "c.ini:7: manager.env: cannot interpolate 'X=%(env)s': references nest more \
                 than 10 deep"
            ]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(
            errors("[m]\nrole = manager\ninstance = a\n\n[m]\nrole = worker\n"),
            vec!["c.ini:5: m: duplicate section 'm' (first defined at line 1)"]
        );
        assert_eq!(
            errors("[m]\nrole = manager\ninstance = a\nRole = worker\n"),
            vec!["c.ini:4: m.role: duplicate key 'role' in section 'm' (first defined at line 2)"]
        );
        assert_eq!(
            errors("[instances]\nagent\nAGENT\n"),
            vec![
                "c.ini:3: instances.agent: duplicate key 'agent' in section 'instances' (first \
                 defined at line 2)"
            ]
        );
        assert_eq!(
            errors("role = manager\n[m]\nrole = manager\n"),
            vec!["c.ini:1: 'role = manager' comes before any [section] header"]
        );
        assert_eq!(
            errors("[m]\nrole = manager\n= x\n"),
            vec!["c.ini:3: line has no key before its '=' or ':': '= x'"]
        );
        assert_eq!(
            errors("[instances]\nagent\n  more\n"),
            vec!["c.ini:3: indented line continues key 'agent', which has no value: 'more'"]
        );
    }

    #[test]
    fn instance_errors_are_zeek_clients() {
        assert_eq!(
            errors("[instances]\nagent = foo:\n"),
            vec![
                "c.ini:2: instances.agent: invalid spec for instance \"agent\": \"foo:\" should be \
                 <host>:<port>"
            ]
        );
        assert_eq!(
            errors("[instances]\nagent = sensor.example.net:2151\n"),
            vec![
                "c.ini:2: instances.agent: invalid spec for instance \"agent\": \
                 'sensor.example.net' does not appear to be an IPv4 or IPv6 address (host names \
                 are not supported)"
            ]
        );
        assert_eq!(
            errors("[instances]\nagent = 10.0.0.1:http\n"),
            vec![
                "c.ini:2: instances.agent: invalid spec for instance \"agent\": port \"http\" is \
                 not a number from 1 to 65535"
            ]
        );
        assert_eq!(
            errors("[DEFAULT]\nrole = worker\n[instances]\nagent\n"),
            vec![
                "c.ini:2: instances.role: invalid spec for instance \"role\": \"worker\" should \
                 be <host>:<port> ([DEFAULT] keys apply to [instances] too)"
            ]
        );
        assert_eq!(
            errors("[instances]\nagent\n\n[manager]\nrole = manager\n"),
            vec![
                "c.ini:1: instances: omit instances section when skipping instances in node \
                 definitions"
            ]
        );
        assert_eq!(
            errors("[manager]\nrole = manager\n[worker]\nrole = worker\ninstance = agent1\n"),
            vec!["c.ini:1: manager: either all or no nodes must state instances"]
        );
        // At the first node without an instance, by line.
        assert_eq!(
            errors("[w]\nrole = worker\ninstance = a\n[b]\nrole = worker\n[a]\nrole = worker\n"),
            vec!["c.ini:4: b: either all or no nodes must state instances"]
        );
    }

    #[test]
    fn validation_issues_point_into_the_ini_file() {
        let text = "[instances]\nAgent-1\nb = 10.0.0.2:2151\n\n\
                    [m]\nrole = manager\ninstance = Agent-1\n\n\
                    [w]\nrole = worker\ninstance = b\nport = 2151\n\n\
                    [x]\nrole = worker\ninstance = nowhere\n\n\
                    [b]\nrole = proxy\ninstance = b\n";
        assert_eq!(
            errors(text),
            vec![
                "c.ini:7: m.instance: node 'm' has undeclared instance name 'Agent-1' (keys in \
                 [instances] are lower-cased, as zeek-client does: use lower-case instance names)",
                "c.ini:12: w.port: node 'w' port 2151/tcp conflicts with agent port on instance 'b'",
                "c.ini:16: x.instance: node 'x' has undeclared instance name 'nowhere'",
                "c.ini:18: b: node and instance names collide: b",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[a]\nrole = wrker\ninstance = i\n[b]\ninstance = i\nport = x\n\
                    [c]\nrole = worker\ninstance = i\nfoo = 1\n";
        assert_eq!(
            errors(text),
            vec![
                "c.ini:2: a.role: role \"wrker\" is invalid",
                "c.ini:4: b.role: node requires a role",
                "c.ini:6: b.port: cannot convert \"b.port\" value \"x\" to int",
                "c.ini:10: c.foo: unknown key 'foo'",
            ]
        );
    }

    #[test]
    fn a_node_with_a_bad_key_still_has_its_other_problems_reported() {
        let text = "[instances]\ni = 127.0.0.1:2151\n\
                    [w1]\nrole = worker\ninstance = i\ninterface = eth0\nbogus = 1\ncpu_affinity = 5000\n\
                    [w2]\nrole = worker\ninstance = nowhere\ninterface = eth0\nenv = \"unclosed\n";
        let all = errors(text);
        for want in [
            "c.ini:7: w1.bogus: unknown key 'bogus'",
            "c.ini:8: w1.cpu_affinity:",
            "w2.instance: node 'w2' has undeclared instance name 'nowhere'",
            "c.ini:13: w2.env: env value",
        ] {
            assert!(all.iter().any(|e| e.contains(want)), "{want}\n{all:#?}");
        }
    }

    #[test]
    fn formats_are_told_apart() {
        assert_eq!(
            detect_format("c.toml", "[manager]\nrole = manager\n"),
            Format::Toml
        );
        assert_eq!(detect_format("C.INI", ""), Format::Ini);
        assert_eq!(detect_format("zeek.cfg", ""), Format::Ini);
        assert_eq!(detect_format("node.conf", ""), Format::Ini);
        assert_eq!(detect_format("-", CLUSTER_TOML), Format::Toml);
        assert_eq!(detect_format("<stdin>", CLUSTER_INI), Format::Ini);
        assert_eq!(detect_format("<stdin>", QUICK_START), Format::Ini);
        assert_eq!(detect_format("<stdin>", FULL_CONFIG), Format::Ini);
        // Broken TOML is still TOML, so that its errors are TOML's.
        assert_eq!(
            detect_format("-", "[nodes.x\ninstance = \"a\"\n"),
            Format::Toml
        );
        assert_eq!(
            detect_format("-", "id = \"x\"\n[nodes.a]\ncommand = [\n"),
            Format::Toml
        );
        // An agent may be called "id".
        assert_eq!(
            detect_format("-", "[instances]\nid = 10.0.0.1:2151\n"),
            Format::Ini
        );

        let c = parse_any("<stdin>", CLUSTER_INI).unwrap();
        assert_eq!(c.nodes.len(), 5);
        let c = parse_any("cluster", CLUSTER_TOML).unwrap();
        assert_eq!(c.roles.len(), 4);
        let c = parse_any_with("-", QUICK_START, &sensor()).unwrap();
        assert_eq!(c.instances[0].name, "agent-sensor");
        let err = parse_any("x.toml", "[nodes.x\n").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:1: "), "{err}");
    }

    fn name() -> impl proptest::strategy::Strategy<Value = String> {
        "[a-z][a-z0-9_.-]{0,7}"
    }

    prop_compose! {
        fn zeek_config()(
            instances in proptest::collection::btree_map(
                "[a-z][a-z0-9-]{0,6}",
                proptest::option::of(any::<IpAddr>()),
                0..4,
            ),
            nodes in proptest::collection::btree_map(
                name(),
                (
                    0..5usize,
                    0..5u8,
                    any::<(bool, bool)>(),
                    proptest::collection::vec("[ -~]{0,8}", 0..3),
                    proptest::option::of("[!-~]([ -~]{0,6}[!-~])?"),
                    proptest::option::of(proptest::collection::vec(0..1024u32, 1..4)),
                    proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,5}", "[ -~]{0,8}", 0..4),
                ),
                0..6,
            ),
        ) -> Configuration {
            let mut c = Configuration::empty();
            for (port, (name, host)) in (2001u16..).zip(instances) {
                let unspecified = host.is_some_and(|h| h.is_unspecified() && h.is_ipv4());
                c.instances.push(Instance {
                    name,
                    host: host.filter(|_| !unspecified),
                    port: host.map(|_| port),
                });
            }
            if c.instances.is_empty() {
                return c;
            }
            let roles = [
                ClusterRole::None,
                ClusterRole::Logger,
                ClusterRole::Manager,
                ClusterRole::Proxy,
                ClusterRole::Worker,
            ];
            for (i, (name, (inst, role, (p, mp), mut scripts, interface, cpus, env))) in
                nodes.into_iter().enumerate()
            {
                if name == "instances" || c.instances.iter().any(|x| x.name == name) {
                    continue;
                }
                let mut n = Node::new(name, c.instances[inst % c.instances.len()].name.clone());
                n.role = roles[usize::from(role)].clone();
                let base = 10_000 + 2 * u16::try_from(i).unwrap_or(0);
                n.port = p.then_some(base);
                n.metrics_port = mp.then_some(base + 1);
                scripts.sort();
                n.scripts = scripts;
                n.interface = interface;
                n.cpu_affinity = cpus.map(|v| {
                    if v.len() == 1 { CpuAffinity::One(v[0]) } else { CpuAffinity::Many(v) }
                });
                n.env = env;
                c.nodes.push(n);
            }
            c
        }
    }

    use proptest::prelude::{any, prop_compose};

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
            let _ = parse_ini("f.ini", &text);
            let _ = parse_any("f", &text);
        }

        #[test]
        fn arbitrary_iniish_text_never_panics(
            text in "((\\[[a-zA-Z ._-]{0,8}\\]|[ \\t]{0,2}(role|instance|port|env|scripts|cpu_affinity|[a-z_]{1,6})[ ]?([=:][ ]?[ -~]{0,12})?|[#;].{0,5}|)(\r?\n|\r)){0,20}"
        ) {
            let _ = parse_ini("f.ini", &text);
        }

        #[test]
        fn zeek_fields_survive_ini(config in zeek_config()) {
            let text = to_ini(&config);
            let back = parse_ini("f.ini", &text).map_err(|e| {
                proptest::test_runner::TestCaseError::fail(format!("{e}\n{text}"))
            })?;
            proptest::prop_assert_eq!(&back.instances, &config.instances, "{}", text);
            proptest::prop_assert_eq!(&back.nodes, &config.nodes, "{}", text);
            proptest::prop_assert_eq!(to_ini(&back), text);
        }

        #[test]
        fn configurations_survive_toml(config in zeek_config()) {
            let mut config = config;
            for n in &mut config.nodes {
                n.command = vec![format!("/bin/{}", n.name)];
            }
            let text = to_toml(&config);
            let back = parse_toml("f.toml", &text).map_err(|e| {
                proptest::test_runner::TestCaseError::fail(format!("{e}\n{text}"))
            })?;
            proptest::prop_assert_eq!(back, config);
        }
    }
}
