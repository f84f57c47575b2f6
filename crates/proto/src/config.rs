//! Cluster files and configuration validation.
//!
//! A cluster file in TOML looks like this:
//!
//! ```toml
//! id = "optional-config-id"           # a new UUID when absent
//!
//! [defaults]                          # optional: keys every node inherits
//! restart = "always"
//!
//! [instances.agent-1]                 # optional keys: host = "10.0.0.2", port = 2151
//!
//! [roles.worker]                      # optional: command template for a role
//! command = ["/usr/bin/zeek", "-i", "{interface}"]
//!
//! [nodes.worker-1]
//! instance = "agent-1"
//! command = ["/usr/bin/sleep", "infinity"]
//! role = "worker"
//! env = { FOO = "bar" }
//! ```
//!
//! Node keys are the fields of [`Node`] (`port`, `metrics_port`, `interface`, `scripts`,
//! `cpu_affinity`, `workdir`, `restart`, `backoff`, `max_failed_starts`,
//! `success_exit_codes`, `readiness`, `stop_signal`, `stop_timeout`, the identity,
//! capability and limit keys of [`crate::exec`], and the resource and liveness keys of
//! [`crate::resources`]); unknown keys are
//! errors. [`parse_toml`] reports every problem of a file at once (unknown keys, values
//! of the wrong type, and what [`validate`] finds), sorted by line, each with the file,
//! the key's line and its key path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::de::DeTable;

use crate::exec;
use crate::model::{Configuration, Instance, Node, Readiness, RoleTemplate, new_id};
use crate::name;
use crate::schema::{self, Checked, Lines};

/// Keys a `[nodes.NAME]` or `[defaults]` table may hold.
pub const NODE_KEYS: &[&str] = &[
    "instance",
    "role",
    "command",
    "env",
    "workdir",
    "port",
    "metrics_port",
    "interface",
    "scripts",
    "cpu_affinity",
    // identity, capabilities and process limits (see `crate::exec`)
    "user",
    "group",
    "supplementary_groups",
    "umask",
    "capabilities",
    "no_new_privileges",
    "limits",
    // end of identity, capabilities and process limits
    "restart",
    "backoff",
    "max_failed_starts",
    "success_exit_codes",
    "readiness",
    "stop_signal",
    "stop_timeout",
    // --- resources and liveness ---
    "memory",
    "cpus",
    "cpu_weight",
    "pids_max",
    "io_weight",
    "watchdog",
    "liveness",
];

/// Keys of a `[roles.NAME]` template besides `command` and `env`.
pub const ROLE_RESOURCE_KEYS: &[&str] = &[
    "memory",
    "cpus",
    "cpu_weight",
    "pids_max",
    "io_weight",
    "watchdog",
    "liveness",
];

/// One problem in a cluster file or configuration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Issue {
    /// The file it was found in, when it came from one.
    pub file: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path (`nodes.worker-1.instance`), when it concerns one.
    pub key: Option<String>,
    /// What is wrong, lower-case.
    pub message: String,
}

impl Issue {
    pub(crate) fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, sorted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Issues(pub Vec<Issue>);

impl fmt::Display for Issues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    id: Option<String>,
    #[serde(default)]
    defaults: Option<toml::Table>,
    #[serde(default)]
    instances: BTreeMap<String, toml::Spanned<InstanceToml>>,
    #[serde(default)]
    roles: BTreeMap<String, toml::Spanned<toml::Table>>,
    #[serde(default)]
    nodes: BTreeMap<String, toml::Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceToml {
    host: Option<IpAddr>,
    port: Option<u16>,
}

/// The key path of a key the TOML parser found twice, `span` being the last part of
/// it: the table header above it, the inline table it is in and its dotted prefix
/// (`nodes.w1.env.A`); for a table header given twice, the header.
fn duplicate_key_path(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let unquote = |k: &str| {
        k.split('.')
            .map(|p| p.trim().trim_matches(['"', '\'']))
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(".")
    };
    let line_start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
    let head = text.get(line_start..span.start)?;
    let token = text.get(span.clone())?;
    if head.trim_start().starts_with('[') {
        return Some(unquote(&format!(
            "{}{token}",
            head.trim_start().trim_start_matches('[')
        )));
    }
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| {
            unquote(
                h.trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    let (outer, inner) = match head.find('{') {
        Some(at) => {
            let after = &head[at + 1..];
            let inner = after.rsplit([',', '{']).next().unwrap_or_default();
            (head[..at].trim().trim_end_matches('=').to_owned(), inner)
        }
        None => (String::new(), head),
    };
    let path = [
        section,
        unquote(&outer),
        unquote(&format!("{inner}{token}")),
    ]
    .into_iter()
    .filter(|p| !p.is_empty())
    .collect::<Vec<_>>()
    .join(".");
    Some(path)
}

/// Parses and validates a TOML cluster file. `file` names it in error messages.
///
/// Every problem is reported in one pass, sorted by line: unknown keys and values of the
/// wrong type (found by the `schema` module before deserializing) together with
/// problems of meaning (found by [`validate`]), each at its key's line with its key path.
pub fn parse_toml(file: &str, text: &str) -> Result<Configuration, Issues> {
    let lines = Lines::new(text);
    let with_file = |mut issue: Issue| {
        issue.file = Some(file.to_owned());
        issue
    };
    let syntax = |e: toml::de::Error| Issue {
        file: Some(file.to_owned()),
        line: e.span().map(|s| lines.line_of(s.start)),
        key: e
            .span()
            .filter(|_| e.message().trim_end() == "duplicate key")
            .and_then(|s| duplicate_key_path(text, s)),
        message: e.message().trim_end().to_owned(),
    };
    let mut doc = DeTable::parse(text).map_err(|e| Issues(vec![syntax(e)]))?;
    let Checked {
        mut issues,
        lines: line_of_key,
        removed,
    } = schema::check(doc.get_mut(), &lines);
    let parsed = match FileToml::deserialize(doc.into_deserializer()) {
        Ok(parsed) => parsed,
        Err(e) => {
            // The type check should have left only what deserializes; report what it
            // missed with everything it found.
            let mut all: Vec<Issue> = issues.into_iter().map(with_file).collect();
            all.push(syntax(e));
            all.sort();
            return Err(Issues(all));
        }
    };

    let instances = parsed
        .instances
        .into_iter()
        .map(|(name, spanned)| {
            let inst = spanned.into_inner();
            Instance {
                name,
                host: inst.host,
                port: inst.port,
            }
        })
        .collect();

    let mut roles = BTreeMap::new();
    let mut seen_roles: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (role, spanned) in parsed.roles {
        let key = format!("roles.{role}");
        let line = lines.line_of(spanned.span().start);
        let mut table = spanned.into_inner();
        // A missing or wrong command is reported already; an empty one keeps the role
        // known, so that its nodes are not also reported for lacking a template.
        table
            .entry("command")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        match toml::Value::Table(table).try_into::<RoleTemplate>() {
            Ok(t) => {
                // Role names are compared without case: two spellings of one would
                // leave one template unused without a word.
                // Said at the later of the two.
                match seen_roles.insert(role.to_ascii_lowercase(), (line, role.clone())) {
                    Some((first, first_role)) => {
                        let (line, role) = if first > line {
                            (first, first_role)
                        } else {
                            (line, role.clone())
                        };
                        issues.push(Issue {
                            file: None,
                            line: Some(line),
                            key: Some(format!("roles.{role}")),
                            message: format!(
                                "role '{role}' is given a second time (role names are \
                                 compared without case)"
                            ),
                        });
                    }
                    None => {
                        roles.insert(role.to_ascii_lowercase(), t);
                    }
                }
            }
            Err(e) => issues.push(Issue {
                file: None,
                line: Some(line),
                key: Some(key),
                message: e.message().trim_end().to_owned(),
            }),
        }
    }

    let defaults = parsed.defaults.unwrap_or_default();
    let mut nodes = Vec::new();
    // Nodes checked with a stand-in instance, since theirs is missing or was wrong:
    // what validation says of that instance is noise.
    let mut stand_ins = BTreeSet::new();
    for (name, spanned) in parsed.nodes {
        let key = format!("nodes.{name}");
        let line = lines.line_of(spanned.span().start);
        let mut table = spanned.into_inner();
        inherit_defaults(&mut table, &defaults);
        if !table.contains_key("instance") {
            if !removed.contains(&format!("{key}.instance")) {
                issues.push(Issue {
                    file: None,
                    line: Some(line),
                    key: Some(format!("{key}.instance")),
                    message: "missing key 'instance': every node names the instance it runs on"
                        .to_owned(),
                });
            }
            // Its other keys are still checked, in the same pass.
            stand_ins.insert(format!("{key}.instance"));
            table.insert(
                "instance".to_owned(),
                toml::Value::String(format!("{name}.instance-missing")),
            );
        }
        table.insert("name".to_owned(), toml::Value::String(name.clone()));
        match toml::Value::Table(table).try_into::<Node>() {
            Ok(node) => nodes.push(node),
            Err(e) => issues.push(Issue {
                file: None,
                line: Some(line),
                key: Some(key),
                message: e.message().trim_end().to_owned(),
            }),
        }
    }

    let config = Configuration {
        id: parsed.id.unwrap_or_else(new_id),
        instances,
        nodes,
        roles,
    };
    // A removed value was replaced by its default; what validation says about that
    // default is noise next to the type error already reported.
    let below_removed = |key: &str| {
        removed.iter().chain(&stand_ins).any(|r| {
            key == r
                || key
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    };
    issues.extend(
        validate(&config)
            .into_iter()
            .filter(|i| !i.key.as_deref().is_some_and(below_removed)),
    );
    if issues.is_empty() {
        return Ok(config);
    }
    let written = |k: &str| written_at(&line_of_key, k);
    let node_names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut issues: Vec<Issue> = issues
        .into_iter()
        .map(|mut issue| {
            if issue.line.is_none()
                && let Some(k) = issue.key.clone()
            {
                // A node's value the node does not write came from `[defaults]`: the
                // problem is said once, there, not at every node that inherits it.
                let inherited = node_names.iter().find_map(|name| {
                    let node = format!("nodes.{name}");
                    let rest = k.strip_prefix(&node)?.strip_prefix('.')?;
                    let in_defaults = format!("defaults.{rest}");
                    let (known, line) = written(&in_defaults)?;
                    // Whichever writes more of the key's path wrote it: a node's own
                    // `env` table, say, and `[defaults]`' variable merged into it.
                    let at_node = written(&k).map_or(0, |(at, _)| at.len() - node.len());
                    let in_defaults_len = known.len() - "defaults".len();
                    (in_defaults_len > at_node).then_some((in_defaults, line))
                });
                match inherited {
                    Some((key, line)) => {
                        issue.key = Some(key);
                        issue.line = Some(line);
                    }
                    None => issue.line = written(&k).map(|(_, line)| line),
                }
            }
            with_file(issue)
        })
        .collect();
    issues.sort();
    issues.dedup();
    Err(Issues(issues))
}

/// The tables of `[defaults]` a node's own table of the same key is merged with, name
/// by name (the node's own entries win), as a role template's are: a node that sets
/// one variable or limit of its own keeps the others every node is given.
const MERGED_DEFAULTS: [&str; 2] = ["env", "limits"];

/// Gives a node's table what `[defaults]` has and it leaves unset.
fn inherit_defaults(node: &mut toml::Table, defaults: &toml::Table) {
    for (k, v) in defaults {
        match (node.get_mut(k), v) {
            (None, _) => {
                node.insert(k.clone(), v.clone());
            }
            (Some(toml::Value::Table(own)), toml::Value::Table(inherited))
                if MERGED_DEFAULTS.contains(&k.as_str()) =>
            {
                for (name, value) in inherited {
                    own.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
            (Some(_), _) => {}
        }
    }
}

/// The longest key path of `lines` (key path to line) that is `key` or a parent of it,
/// and its line: where a problem of `key` is said.
pub(crate) fn written_at<'a>(
    lines: &'a BTreeMap<String, usize>,
    key: &str,
) -> Option<(&'a str, usize)> {
    lines
        .iter()
        .filter(|(known, _)| {
            key == known.as_str()
                || key
                    .strip_prefix(known.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .max_by_key(|(known, _)| known.len())
        .map(|(known, line)| (known.as_str(), *line))
}

/// "unknown key 'x'", with the closest of `known` as a suggestion when it is at most two
/// edits away.
pub(crate) fn unknown_key_with_suggestion<'a>(
    key: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> String {
    match suggestion(key, known) {
        Some(s) => format!("unknown key '{key}' (did you mean '{s}'?)"),
        None => format!("unknown key '{key}'"),
    }
}

/// The closest of `known` to `key`, when it is at most two edits away.
pub(crate) fn suggestion<'a>(
    key: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (edit_distance(k, key), k))
        .min()
        .filter(|(d, _)| *d <= 2)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Bounds on a node's timing keys, checked by [`validate`]: wide enough for any real
/// program, narrow enough that a slip (a zero backoff with unlimited retries, a stop
/// timeout of a year) cannot make an agent spin or hang.
///
/// The shortest backoff: none. A crash loop cannot spin all the same, since the agent
/// never starts a node twice within its start interval (20 ms).
pub const MIN_BACKOFF: Duration = Duration::ZERO;
/// Longest `backoff.initial` and `backoff.max`.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Largest `backoff.multiplier` (the smallest is 1).
pub const MAX_BACKOFF_MULTIPLIER: f64 = 10.0;
/// Longest `backoff.reset_after`.
pub const MAX_RESET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Shortest `stop_timeout`.
pub const MIN_STOP_TIMEOUT: Duration = Duration::from_millis(1);
/// Longest `stop_timeout`.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Shortest readiness timeout (`notify`, `tcp`).
pub const MIN_READINESS_TIMEOUT: Duration = Duration::from_millis(1);
/// Longest readiness timeout or start period.
pub const MAX_READINESS: Duration = Duration::from_secs(3600);
/// Largest `max_failed_starts` (0 never gives up).
pub const MAX_FAILED_STARTS: u32 = 1000;

/// Pushes an issue for `node_key.what` when `value` is outside `lo..=hi`.
fn check_duration(
    issues: &mut Vec<Issue>,
    node_key: &str,
    what: &str,
    value: Duration,
    lo: Duration,
    hi: Duration,
) {
    if let Some(message) = duration_out_of_range(what, value, lo, hi) {
        issues.push(Issue::at_key(format!("{node_key}.{what}"), message));
    }
}

/// What is wrong with duration `what` when `value` is outside `lo..=hi`.
pub(crate) fn duration_out_of_range(
    what: &str,
    value: Duration,
    lo: Duration,
    hi: Duration,
) -> Option<String> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    (!(lo..=hi).contains(&value)).then(|| {
        format!(
            "{what} {} is out of range: allowed {} to {}",
            show(value),
            show(lo),
            show(hi)
        )
    })
}

/// Linux signal numbers for the names a node may use as its stop signal.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
    ("CONT", 18),
    ("STOP", 19),
    ("WINCH", 28),
];

/// The number of a signal named `TERM`, `SIGTERM` or `sigterm`, or given as a number
/// of a standard signal (1 to 31: real-time signals are not sent).
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=31).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(n, _)| *n == bare).map(|(_, v)| *v)
}

/// Pushes the problems of a node's or template's identity, capabilities and limits.
fn check_exec(issues: &mut Vec<Issue>, prefix: &str, e: exec::ExecRef<'_>) {
    for (key, message) in exec::check(e) {
        issues.push(Issue::at_key(format!("{prefix}.{key}"), message));
    }
}

/// Checks a configuration, returning every problem found, sorted by message.
///
/// Messages that Zeek's controller also produces use Zeek's exact wording, since scripts
/// compare them.
pub fn validate(config: &Configuration) -> Vec<Issue> {
    let mut issues = Vec::new();
    let mut seen_instances = BTreeSet::new();
    let mut dup_instances = BTreeSet::new();
    for inst in &config.instances {
        if !seen_instances.insert(inst.name.as_str()) {
            dup_instances.insert(inst.name.as_str());
        }
        if let Err(e) = name::check(&inst.name) {
            issues.push(Issue::at_key(format!("instances.{}", inst.name), e));
        }
    }
    for name in dup_instances {
        issues.push(Issue::at_key(
            format!("instances.{name}"),
            format!("multiple instances named '{name}'"),
        ));
    }

    let mut seen_nodes = BTreeSet::new();
    let mut dup_nodes = BTreeSet::new();
    for node in &config.nodes {
        if !seen_nodes.insert(node.name.as_str()) {
            dup_nodes.insert(node.name.as_str());
        }
    }
    for name in dup_nodes {
        issues.push(Issue::at_key(
            format!("nodes.{name}"),
            format!("multiple nodes named '{name}'"),
        ));
    }
    // Zeek's text (the zeek-client front shows it as Zeek does), at the first such
    // node's own table.
    let collisions: Vec<&str> = seen_nodes.intersection(&seen_instances).copied().collect();
    if let Some(first) = collisions.first() {
        issues.push(Issue::at_key(
            format!("nodes.{first}"),
            format!("node and instance names collide: {}", collisions.join(", ")),
        ));
    }

    for (role, template) in &config.roles {
        if template.command.is_empty() || template.command[0].is_empty() {
            issues.push(Issue::at_key(
                format!("roles.{role}.command"),
                "a role template needs a non-empty command",
            ));
        }
        // What a template puts into its nodes' commands and environments: no NUL can
        // go there, and it is refused here rather than at deploy.
        if role.contains('\0') || template.command.iter().any(|a| a.contains('\0')) {
            issues.push(Issue::at_key(
                format!("roles.{}.command", role.escape_default()),
                "a role's name or command contains a NUL byte",
            ));
        }
        for (var, value) in &template.env {
            if var.is_empty() || var.contains('=') || var.contains('\0') || value.contains('\0') {
                issues.push(Issue::at_key(
                    format!("roles.{role}.env.{}", var.escape_default()),
                    format!(
                        "invalid environment variable '{}': a name without '=' and no NUL bytes",
                        var.escape_default()
                    ),
                ));
            }
        }
        check_exec(&mut issues, &format!("roles.{role}"), template.exec_ref());
        for (k, message) in crate::resources::check(
            template.memory.as_ref(),
            template.cpus,
            template.cpu_weight,
            template.pids_max,
            template.io_weight,
            template.watchdog,
            template.liveness.as_ref(),
        ) {
            issues.push(Issue::at_key(format!("roles.{role}.{k}"), message));
        }
    }

    // (instance, port) -> the nodes using it, and as which key.
    let mut ports: BTreeMap<(&str, u16), Vec<(&str, &str)>> = BTreeMap::new();
    for node in &config.nodes {
        let key = format!("nodes.{}", node.name);
        if let Err(e) = name::check(&node.name) {
            issues.push(Issue::at_key(&key, e));
        }
        let instance = config.instances.iter().find(|i| i.name == node.instance);
        match instance {
            None => issues.push(Issue::at_key(
                format!("{key}.instance"),
                format!(
                    "node '{}' has undeclared instance name '{}'",
                    node.name, node.instance
                ),
            )),
            Some(inst) => {
                if node.port.is_some() && node.port == inst.port {
                    issues.push(Issue::at_key(
                        format!("{key}.port"),
                        format!(
                            "node '{}' port {}/tcp conflicts with agent port on instance '{}'",
                            node.name,
                            inst.port.unwrap_or_default(),
                            inst.name
                        ),
                    ));
                }
            }
        }
        for (field, port) in [("port", node.port), ("metrics_port", node.metrics_port)] {
            let Some(port) = port else { continue };
            let users = ports.entry((node.instance.as_str(), port)).or_default();
            if !users.iter().any(|(n, _)| *n == node.name) {
                users.push((&node.name, field));
            }
        }
        if node.port.is_some() && node.port == node.metrics_port {
            issues.push(Issue::at_key(
                format!("{key}.metrics_port"),
                format!(
                    "node '{}' uses one port as port and metrics_port",
                    node.name
                ),
            ));
        }

        if node.command.is_empty() {
            let role = node.role.as_str();
            if !config.roles.contains_key(role) {
                issues.push(Issue::at_key(
                    format!("{key}.command"),
                    format!(
                        "node '{}' has no command and role '{role}' has no command template",
                        node.name
                    ),
                ));
            }
        } else if node.command[0].is_empty() {
            issues.push(Issue::at_key(
                format!("{key}.command"),
                "the program (first element of command) is empty",
            ));
        }
        if node.command.iter().any(|a| a.contains('\0')) {
            issues.push(Issue::at_key(
                format!("{key}.command"),
                "command contains a NUL byte",
            ));
        }
        // Role templates put these into the command and the environment, which cannot
        // carry a NUL: refused here, not when the deploy has already stopped the nodes
        // it replaces.
        if node.interface.as_deref().is_some_and(|i| i.contains('\0')) {
            issues.push(Issue::at_key(
                format!("{key}.interface"),
                format!(
                    "node '{}': interface contains a NUL byte",
                    node.name.escape_default()
                ),
            ));
        }
        if node.role.as_str().contains('\0') {
            issues.push(Issue::at_key(
                format!("{key}.role"),
                format!(
                    "node '{}': role contains a NUL byte",
                    node.name.escape_default()
                ),
            ));
        }
        if node.scripts.iter().any(|s| s.contains('\0')) {
            issues.push(Issue::at_key(
                format!("{key}.scripts"),
                format!(
                    "node '{}': a script contains a NUL byte",
                    node.name.escape_default()
                ),
            ));
        }
        // Each at its variable's own key, so that one merged from `[defaults]` is told
        // there, once.
        for (var, value) in &node.env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                issues.push(Issue::at_key(
                    format!("{key}.env.{var}"),
                    format!(
                        "invalid environment variable name '{}'",
                        var.escape_default()
                    ),
                ));
            }
            if value.contains('\0') {
                issues.push(Issue::at_key(
                    format!("{key}.env.{var}"),
                    "an environment value contains a NUL byte",
                ));
            }
        }
        // A relative one would be taken from the agent's own working directory, which
        // is no place a cluster file can know (`/` under systemd).
        if let Some(dir) = &node.workdir
            && (dir.contains('\0') || !dir.starts_with('/'))
        {
            issues.push(Issue::at_key(
                format!("{key}.workdir"),
                format!(
                    "workdir must be an absolute path without NUL bytes, not '{}'",
                    dir.escape_default()
                ),
            ));
        }
        for (k, message) in crate::resources::check(
            node.memory.as_ref(),
            node.cpus,
            node.cpu_weight,
            node.pids_max,
            node.io_weight,
            node.watchdog,
            node.liveness.as_ref(),
        ) {
            issues.push(Issue::at_key(format!("{key}.{k}"), message));
        }
        if signal_number(&node.stop_signal).is_none() {
            issues.push(Issue::at_key(
                format!("{key}.stop_signal"),
                format!(
                    "unknown signal '{}': a name such as TERM or INT, or a number from 1 to 31",
                    node.stop_signal
                ),
            ));
        }
        let b = &node.backoff;
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            issues.push(Issue::at_key(
                format!("{key}.backoff.multiplier"),
                format!(
                    "backoff multiplier must be at least 1, not {}",
                    b.multiplier
                ),
            ));
        }
        if b.multiplier.is_finite() && b.multiplier > MAX_BACKOFF_MULTIPLIER {
            issues.push(Issue::at_key(
                format!("{key}.backoff.multiplier"),
                format!(
                    "backoff multiplier {} is out of range: allowed 1 to {MAX_BACKOFF_MULTIPLIER}",
                    b.multiplier
                ),
            ));
        }
        let in_range = |issues: &mut Vec<Issue>, what: &str, value: Duration, lo, hi| {
            check_duration(issues, &key, what, value, lo, hi);
        };
        in_range(
            &mut issues,
            "backoff.initial",
            b.initial,
            MIN_BACKOFF,
            MAX_BACKOFF,
        );
        if b.max < b.initial {
            issues.push(Issue::at_key(
                format!("{key}.backoff.max"),
                "backoff max is smaller than backoff initial",
            ));
        } else if b.max != b.initial || b.initial <= MAX_BACKOFF {
            // Left out, max is initial when that is above 30 s: initial's error says it.
            in_range(&mut issues, "backoff.max", b.max, MIN_BACKOFF, MAX_BACKOFF);
        }
        in_range(
            &mut issues,
            "backoff.reset_after",
            b.reset_after,
            Duration::ZERO,
            MAX_RESET_AFTER,
        );
        in_range(
            &mut issues,
            "stop_timeout",
            node.stop_timeout,
            MIN_STOP_TIMEOUT,
            MAX_STOP_TIMEOUT,
        );
        match &node.readiness {
            Readiness::StartPeriod { period } => in_range(
                &mut issues,
                "readiness.period",
                *period,
                Duration::ZERO,
                MAX_READINESS,
            ),
            Readiness::Notify { timeout } => in_range(
                &mut issues,
                "readiness.timeout",
                *timeout,
                MIN_READINESS_TIMEOUT,
                MAX_READINESS,
            ),
            Readiness::Tcp { port, timeout } => {
                in_range(
                    &mut issues,
                    "readiness.timeout",
                    *timeout,
                    MIN_READINESS_TIMEOUT,
                    MAX_READINESS,
                );
                if *port == 0 {
                    issues.push(Issue::at_key(
                        format!("{key}.readiness.port"),
                        "port 0 is out of range: allowed 1 to 65535",
                    ));
                }
            }
        }
        for (what, port) in [("port", node.port), ("metrics_port", node.metrics_port)] {
            if port == Some(0) {
                issues.push(Issue::at_key(
                    format!("{key}.{what}"),
                    format!("{what} 0 is out of range: allowed 1 to 65535"),
                ));
            }
        }
        if node.max_failed_starts > MAX_FAILED_STARTS {
            issues.push(Issue::at_key(
                format!("{key}.max_failed_starts"),
                format!(
                    "max_failed_starts {} is out of range: allowed 0 (never give up) to {MAX_FAILED_STARTS}",
                    node.max_failed_starts
                ),
            ));
        }
        for code in node
            .success_exit_codes
            .iter()
            .filter(|c| !(0..=255).contains(*c))
        {
            issues.push(Issue::at_key(
                format!("{key}.success_exit_codes"),
                format!("exit code {code} is outside 0..=255"),
            ));
        }
        check_exec(&mut issues, &key, node.exec_ref());
        if let Some(aff) = &node.cpu_affinity {
            let cpus = aff.cpus();
            if cpus.is_empty() {
                issues.push(Issue::at_key(
                    format!("{key}.cpu_affinity"),
                    "cpu_affinity lists no CPU",
                ));
            } else if let Some(cpu) = cpus.iter().find(|c| **c >= 1024) {
                issues.push(Issue::at_key(
                    format!("{key}.cpu_affinity"),
                    format!("cpu {cpu} is out of range (0..1024)"),
                ));
            }
        }
    }
    for ((instance, port), users) in ports {
        if let Some((second, field)) = users.get(1) {
            issues.push(Issue::at_key(
                format!("nodes.{second}.{field}"),
                format!("multiple nodes on instance '{instance}' using port {port}/tcp"),
            ));
        }
    }
    crate::argv::check(config, &mut issues);

    issues.sort_by(|a, b| a.message.cmp(&b.message).then_with(|| a.key.cmp(&b.key)));
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backoff, ClusterRole, CpuAffinity, Readiness, RestartPolicy, Umask};
    use std::time::Duration;

    const GOOD: &str = r#"
id = "c1"

[defaults]
restart = "always"

[instances.agent-1]
[instances.agent-2]
host = "10.0.0.2"
port = 2151

[roles.worker]
command = ["/bin/sleep", "infinity"]

[nodes.worker-1]
instance = "agent-1"
command = ["/usr/bin/sleep", "infinity"]
role = "worker"
env = { FOO = "bar" }
cpu_affinity = 1

[nodes.worker-2]
instance = "agent-2"
role = "worker"
port = 5000
restart = "never"
readiness = { kind = "notify", timeout = "5s" }
stop_timeout = "2s"
"#;

    #[test]
    fn parses_the_documented_shape() {
        let c = parse_toml("cluster.toml", GOOD).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.instances.len(), 2);
        assert_eq!(c.instances[1].port, Some(2151));
        let w1 = &c.nodes[0];
        assert_eq!(w1.name, "worker-1");
        assert_eq!(w1.role, ClusterRole::Worker);
        assert_eq!(w1.env["FOO"], "bar");
        assert_eq!(w1.cpu_affinity, Some(CpuAffinity::One(1)));
        assert_eq!(
            w1.restart,
            RestartPolicy::Always,
            "inherited from [defaults]"
        );
        let w2 = &c.nodes[1];
        assert!(w2.command.is_empty(), "takes the role template");
        assert_eq!(w2.restart, RestartPolicy::Never, "own key beats default");
        assert_eq!(
            w2.readiness,
            Readiness::Notify {
                timeout: Duration::from_secs(5)
            }
        );
        assert_eq!(w2.stop_timeout, Duration::from_secs(2));
    }

    /// `env` and `limits` of `[defaults]` are merged into a node's own, name by name,
    /// as a role template's are; other keys a node sets replace the default whole.
    #[test]
    fn defaults_env_and_limits_merge_name_by_name() {
        let text = r#"
[defaults]
env = { A = "1", B = "defaults" }
limits = { core = 0, nofile = 1024 }
memory = { max = "1G" }

[instances.a]

[nodes.own]
instance = "a"
command = ["/bin/true"]
env = { B = "own", C = "3" }
limits = { nofile = 4096 }
memory = { high = "512M" }

[nodes.plain]
instance = "a"
command = ["/bin/true"]
"#;
        let c = parse_toml("c.toml", text).unwrap();
        let own = c.node("own").unwrap();
        let env: Vec<(&str, &str)> = own
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(env, [("A", "1"), ("B", "own"), ("C", "3")]);
        let limits: Vec<&str> = own.limits.keys().map(String::as_str).collect();
        assert_eq!(limits, ["core", "nofile"]);
        assert_eq!(own.limits["nofile"].soft, Some(4096), "its own wins");
        assert_eq!(c.node("plain").unwrap().limits["nofile"].soft, Some(1024));
        let memory = own.memory.unwrap();
        assert!(memory.max.is_none() && memory.high.is_some(), "{memory:?}");
        let plain = c.node("plain").unwrap();
        assert_eq!(plain.env.len(), 2);
        assert!(plain.memory.unwrap().max.is_some());

        // A bad value merged from `[defaults]` is told once, at its own line there.
        let bad = text.replace("core = 0", "core = \"lots\"");
        let err = parse_toml("c.toml", &bad).unwrap_err().to_string();
        assert!(err.starts_with("c.toml:4: defaults.limits.core: "), "{err}");
        assert!(!err.contains("nodes."), "{err}");
        let bad = text.replace("B = \"defaults\"", "\"B=X\" = \"defaults\"");
        let err = parse_toml("c.toml", &bad).unwrap_err().to_string();
        assert_eq!(
            err, "c.toml:3: defaults.env.B=X: invalid environment variable name 'B=X'",
            "once, where it is written"
        );
    }

    /// A misspelling of a key that is there too hides none of that key's problems.
    #[test]
    fn a_misspelt_key_beside_the_right_one_hides_nothing_of_it() {
        let text = "[instances.a]\n[nodes.w]\ninstance = \"a\"\ncommand = [\"/bin/true\"]\n\
                    memory = { max = \"512K\" }\nmemroy = 1\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5: nodes.w.memory.max: memory.max 512K is too small: at least 1M\n\
             c.toml:6: nodes.w.memroy: unknown key 'memroy' (did you mean 'memory'?)"
        );
    }

    #[test]
    fn missing_id_gets_a_fresh_one() {
        let a = parse_toml("a.toml", "[instances.a]\n").unwrap();
        let b = parse_toml("a.toml", "[instances.a]\n").unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let err = parse_toml("c.toml", "[instances.a]\n\n[nodes.x\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("c.toml:3: "), "{text}");
    }

    #[test]
    fn unknown_keys_name_line_and_key_with_a_suggestion() {
        let text = "[instances.a]\n\n[nodes.x]\ninstance = \"a\"\ncomand = [\"x\"]\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5: nodes.x.comand: unknown key 'comand' (did you mean 'command'?)"
        );
    }

    #[test]
    fn bad_values_name_the_node() {
        let text = "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nrestart = \"sometimes\"\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5: nodes.x.restart: expected one of \"never\", \"on-failure\", \"always\", found string \"sometimes\""
        );
    }

    /// A table made unusable by one bad key (a probe without a valid port), or a node
    /// by its instance, still has its other keys' bounds checked in the same pass.
    #[test]
    fn bounds_beside_a_key_that_spoils_its_table_or_node_are_reported_too() {
        let text = r#"
[instances.a]
[nodes.x]
instance = "a"
command = ["x"]
liveness = { kind = "http", port = 0, interval = "10ms", timeout = "0s", failures = 0 }
[nodes.y]
instance = "a"
command = ["x"]
readiness = { kind = "tcp", port = "p", timeout = "2h" }
[nodes.z1]
instance = 7
command = ["x"]
port = 4000
stop_timeout = "2h"
[nodes.z2]
command = ["x"]
port = 4000
stop_timeout = "3h"
"#;
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        for want in [
            "c.toml:6: nodes.x.liveness.failures: expected an integer 1-100, found integer 0",
            "c.toml:6: nodes.x.liveness.interval: liveness.interval 10ms is out of range: allowed 100ms to 1h",
            "c.toml:6: nodes.x.liveness.port: expected an integer 1-65535, found integer 0",
            "c.toml:6: nodes.x.liveness.timeout: liveness.timeout 0s is out of range: allowed 1ms to 1h",
            "c.toml:10: nodes.y.readiness.port: expected an integer 1-65535, found string \"p\"",
            "c.toml:10: nodes.y.readiness.timeout: readiness.timeout 2h is out of range: allowed 1ms to 1h",
            // A node whose instance is wrong or missing has its other keys checked.
            "c.toml:12: nodes.z1.instance: expected a string, found integer 7",
            "c.toml:15: nodes.z1.stop_timeout: stop_timeout 2h is out of range: allowed 1ms to 1h",
            "c.toml:16: nodes.z2.instance: missing key 'instance': every node names the instance it runs on",
            "c.toml:19: nodes.z2.stop_timeout: stop_timeout 3h is out of range: allowed 1ms to 1h",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        // Each once, and nothing said of the instances put in their place.
        assert_eq!(err.matches("is out of range").count(), 5, "{err}");
        assert_eq!(err.lines().count(), 10, "{err}");
    }

    #[test]
    fn every_validation_error_is_reported_sorted() {
        let text = r#"
[instances.a]
port = 2151
[instances.w1]
[nodes.w1]
instance = "a"
command = ["x"]
[nodes.w2]
instance = "nowhere"
command = ["x"]
[nodes.w3]
instance = "a"
port = 2151
command = ["x"]
stop_signal = "SIGNOPE"
[nodes.w4]
instance = "a"
port = 2151
role = "worker"
[nodes.w5]
instance = "a"
command = ["x"]
backoff = { multiplier = 0.5 }
"#;
        let err = parse_toml("c.toml", text).unwrap_err();
        let messages: Vec<(Option<usize>, &str)> =
            err.0.iter().map(|i| (i.line, i.message.as_str())).collect();
        assert_eq!(
            messages,
            vec![
                (Some(5), "node and instance names collide: w1"),
                (Some(9), "node 'w2' has undeclared instance name 'nowhere'"),
                (
                    Some(13),
                    "node 'w3' port 2151/tcp conflicts with agent port on instance 'a'"
                ),
                (
                    Some(15),
                    "unknown signal 'SIGNOPE': a name such as TERM or INT, or a number from 1 to 31"
                ),
                (
                    Some(16),
                    "node 'w4' has no command and role 'worker' has no command template"
                ),
                // At the second user's own `port` line.
                (
                    Some(18),
                    "multiple nodes on instance 'a' using port 2151/tcp"
                ),
                (
                    Some(18),
                    "node 'w4' port 2151/tcp conflicts with agent port on instance 'a'"
                ),
                (Some(23), "backoff multiplier must be at least 1, not 0.5"),
            ]
        );
        assert!(err.0.iter().all(|i| i.file.as_deref() == Some("c.toml")));
        let w2 = err.0.iter().find(|i| i.message.contains("w2")).unwrap();
        assert_eq!(w2.key.as_deref(), Some("nodes.w2.instance"));
    }

    #[test]
    fn type_errors_and_meaning_errors_come_together_sorted_by_line() {
        let text = r#"idd = "x"
[instances.a]
port = 70000
host = "not-an-ip"
[instances.b]
[defaults]
stop_timeout = true
[roles.worker]
command = "zeek"
[nodes.w1]
instance = "a"
command = ["x", 5]
port = "abc"
cpu_affinity = "x"
env = { A = 1 }
backoff = { initial = 5, max = "soon", multiplier = 0.5 }
[nodes.w2]
instance = "nowhere"
command = ["x"]
readiness = { kind = "tcp", timeout = "1s" }
stop_signal = "SIGNOPE"
[nodes.w3]
instance = "b"
role = "worker"
restart = "sometimes"
success_exit_codes = [0, "1"]
max_failed_starts = -1
"#;
        let err = parse_toml("c.toml", text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "c.toml:1: idd: unknown key 'idd' (did you mean 'id'?)",
                "c.toml:3: instances.a.port: expected an integer 1-65535, found integer 70000",
                "c.toml:4: instances.a.host: expected an IP address, found string \"not-an-ip\"",
                "c.toml:7: defaults.stop_timeout: expected a duration such as \"10s\" or \"250ms\", found boolean true",
                "c.toml:9: roles.worker.command: expected an array of strings, found string \"zeek\"",
                "c.toml:12: nodes.w1.command: expected an array of strings, found integer 5 in the array",
                "c.toml:13: nodes.w1.port: expected an integer 1-65535, found string \"abc\"",
                "c.toml:14: nodes.w1.cpu_affinity: expected a CPU number 0-1023 or an array of them, found string \"x\"",
                "c.toml:15: nodes.w1.env: expected a table of strings, found integer 1 for 'A'",
                "c.toml:16: nodes.w1.backoff.initial: expected a duration such as \"10s\" or \"250ms\", found integer 5",
                "c.toml:16: nodes.w1.backoff.max: expected a duration such as \"10s\" or \"250ms\", found string \"soon\"",
                "c.toml:16: nodes.w1.backoff.multiplier: backoff multiplier must be at least 1, not 0.5",
                "c.toml:18: nodes.w2.instance: node 'w2' has undeclared instance name 'nowhere'",
                "c.toml:20: nodes.w2.readiness: missing key 'port' (the port to probe)",
                "c.toml:21: nodes.w2.stop_signal: unknown signal 'SIGNOPE': a name such as TERM or INT, or a number from 1 to 31",
                "c.toml:25: nodes.w3.restart: expected one of \"never\", \"on-failure\", \"always\", found string \"sometimes\"",
                "c.toml:26: nodes.w3.success_exit_codes: expected an array of integers, found string \"1\" in the array",
                "c.toml:27: nodes.w3.max_failed_starts: expected an integer 0 or more, found integer -1",
            ]
        );
    }

    #[test]
    fn misspelt_keys_do_not_also_count_as_missing() {
        let text = "[instances.a]\n[nodes.x]\ninstanc = \"a\"\ncomand = [\"x\"]\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:3: nodes.x.instanc: unknown key 'instanc' (did you mean 'instance'?)\n\
             c.toml:4: nodes.x.comand: unknown key 'comand' (did you mean 'command'?)"
        );
    }

    #[test]
    fn wrong_shapes_of_tables_are_reported_not_fatal() {
        for (text, want) in [
            (
                "nodes = 5\n",
                "c.toml:1: nodes: expected a table, found integer 5",
            ),
            (
                "[instances]\na = \"x\"\n",
                "c.toml:2: instances.a: expected a table, found string \"x\"",
            ),
            (
                "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nreadiness = \"tcp\"\n",
                "c.toml:5: nodes.x.readiness: expected a table, found string \"tcp\"",
            ),
            (
                "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nreadiness = { period = \"1s\" }\n",
                "c.toml:5: nodes.x.readiness: missing key 'kind' (one of \"start-period\", \"notify\", \"tcp\")",
            ),
            (
                "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nreadiness = { kind = \"notify\", period = \"1s\" }\n",
                "c.toml:5: nodes.x.readiness.period: readiness kind 'notify' takes no 'period'",
            ),
            (
                "[instances.a]\n[nodes.x]\ninstance = 7\ncommand = [\"x\"]\n",
                "c.toml:3: nodes.x.instance: expected a string, found integer 7",
            ),
            (
                "[roles.w]\nenv = {}\n",
                "c.toml:1: roles.w: missing key 'command': a role template needs a command",
            ),
        ] {
            let err = parse_toml("c.toml", text).unwrap_err().to_string();
            assert_eq!(err, want, "{text}");
        }
    }

    #[test]
    fn resource_and_liveness_keys_parse_and_bad_values_name_their_line() {
        let good = r#"
[instances.a]
[roles.worker]
command = ["zeek"]
memory = { max = "2G" }
watchdog = "20s"
[nodes.x]
instance = "a"
command = ["x"]
memory = { max = "4G", high = "3G" }
cpus = 1.5
cpu_weight = 200
pids_max = 64
io_weight = 50
watchdog = "30s"
liveness = { kind = "http", port = 8080, path = "/health", interval = "5s", failures = 2 }
[nodes.w]
instance = "a"
role = "worker"
liveness = { kind = "exec", command = ["check"] }
"#;
        let c = parse_toml("c.toml", good).unwrap();
        let x = c.node("x").unwrap();
        let m = x.memory.unwrap();
        assert_eq!(m.max, Some(crate::resources::ByteSize(4 << 30)));
        assert_eq!(m.high, Some(crate::resources::ByteSize(3 << 30)));
        assert_eq!(x.cpus, Some(1.5));
        assert_eq!(
            (x.cpu_weight, x.pids_max, x.io_weight),
            (Some(200), Some(64), Some(50))
        );
        assert_eq!(x.watchdog, Some(Duration::from_secs(30)));
        assert_eq!(
            x.liveness.as_ref().unwrap().timing(),
            (Duration::from_secs(5), Duration::from_secs(1), 2)
        );
        let w = c.resolve(c.node("w").unwrap());
        assert_eq!(
            w.memory.unwrap().max,
            Some(crate::resources::ByteSize(2 << 30))
        );
        assert_eq!(w.watchdog, Some(Duration::from_secs(20)));
        assert_eq!(w.liveness.unwrap().kind(), "exec");
        // The lossless TOML form reads back the same.
        let again = parse_toml("again.toml", &crate::ini::to_toml(&c)).unwrap();
        assert_eq!(again.nodes, c.nodes);
        assert_eq!(again.roles, c.roles);

        let bad = r#"[instances.a]
[roles.worker]
command = ["zeek"]
pids_max = 0
[nodes.x]
instance = "a"
command = ["x"]
memory = { max = "4X", hgih = "1G" }
cpus = "two"
cpu_weight = 0
io_weight = 10001
watchdog = "soon"
liveness = { kind = "http", path = "/" }
[nodes.y]
instance = "a"
command = ["x"]
memory = { max = "2M", high = "3M" }
cpus = 0.001
liveness = { kind = "tcp", port = 1, command = ["c"], failures = 0 }
[nodes.z]
instance = "a"
command = ["x"]
liveness = { kind = "exec", command = [""], interval = "1ms" }
"#;
        let err = parse_toml("c.toml", bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:4: roles.worker.pids_max: expected an integer 1-4194304, found integer 0\n\
             c.toml:8: nodes.x.memory.hgih: unknown key 'hgih' (did you mean 'high'?)\n\
             c.toml:8: nodes.x.memory.max: expected a size such as \"512M\" or \"4G\" (K, M, G, T) or bytes, found string \"4X\"\n\
             c.toml:9: nodes.x.cpus: expected a number, found string \"two\"\n\
             c.toml:10: nodes.x.cpu_weight: expected an integer 1-10000, found integer 0\n\
             c.toml:11: nodes.x.io_weight: expected an integer 1-10000, found integer 10001\n\
             c.toml:12: nodes.x.watchdog: expected a duration such as \"10s\" or \"250ms\", found string \"soon\"\n\
             c.toml:13: nodes.x.liveness: missing key 'port': a 'http' probe needs one\n\
             c.toml:17: nodes.y.memory.high: memory.high 3M is above memory.max 2M\n\
             c.toml:18: nodes.y.cpus: cpus 0.001 is out of range: allowed 0.01 to 4096\n\
             c.toml:19: nodes.y.liveness.command: liveness kind 'tcp' takes no 'command'\n\
             c.toml:19: nodes.y.liveness.failures: expected an integer 1-100, found integer 0\n\
             c.toml:23: nodes.z.liveness.command: liveness.command needs a program and no NUL bytes\n\
             c.toml:23: nodes.z.liveness.interval: liveness.interval 1ms is out of range: allowed 100ms to 1h"
        );
    }

    #[test]
    fn a_workdir_is_an_absolute_path() {
        let text = r#"[instances.a]
[nodes.x]
instance = "a"
command = ["x"]
workdir = "data"
[nodes.y]
instance = "a"
command = ["x"]
workdir = "/srv/y\u0000"
[nodes.z]
instance = "a"
command = ["x"]
workdir = "/srv/z"
"#;
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5: nodes.x.workdir: workdir must be an absolute path without NUL bytes, not 'data'\n\
             c.toml:9: nodes.y.workdir: workdir must be an absolute path without NUL bytes, not '/srv/y\\u{0}'"
        );
        let fixed = text
            .replace("\"data\"", "\"/srv/x\"")
            .replace("\\u0000", "");
        let c = parse_toml("c.toml", &fixed).unwrap();
        assert_eq!(c.node("z").unwrap().workdir.as_deref(), Some("/srv/z"));
    }

    /// What role templates put into a command cannot hold a NUL either: refused at
    /// stage, as a command's own NUL is, not at deploy once the old nodes are stopped.
    #[test]
    fn a_nul_in_what_templates_use_is_refused() {
        let text = r#"
[instances.a]
[roles.worker]
command = ["zeek", "-i", "{interface}", "{scripts}"]
[nodes.w1]
instance = "a"
role = "worker"
interface = "eth0\u0000"
[nodes.w2]
instance = "a"
role = "worker"
interface = "eth1"
scripts = ["ok.zeek", "bad\u0000.zeek"]
"#;
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:8: nodes.w1.interface: node 'w1': interface contains a NUL byte\n\
             c.toml:13: nodes.w2.scripts: node 'w2': a script contains a NUL byte"
        );
        let mut config = parse_toml("c.toml", &text.replace("\\u0000", "")).unwrap();
        config.nodes[0].interface = Some("lo\0".into());
        let issues = Issues(validate(&config)).to_string();
        assert!(issues.contains("interface contains a NUL byte"), "{issues}");
        // The template's own command and environment, and a role's name.
        let mut config = parse_toml("c.toml", &text.replace("\\u0000", "")).unwrap();
        let t = config.roles.get_mut("worker").unwrap();
        t.command.push("x\0".into());
        t.env.insert("A".into(), "b\0".into());
        config.nodes[1].role = ClusterRole::Other("w\0".into());
        let issues = Issues(validate(&config)).to_string();
        for want in [
            "roles.worker.command: a role's name or command contains a NUL byte",
            "roles.worker.env.A: invalid environment variable 'A'",
            "nodes.w2.role: node 'w2': role contains a NUL byte",
        ] {
            assert!(issues.contains(want), "{want}: {issues}");
        }
    }

    #[test]
    fn nested_arrays_are_a_type_error() {
        let deep = format!("{}1{}", "[".repeat(30), "]".repeat(30));
        let text = format!(
            "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\ncpu_affinity = {deep}\n"
        );
        let err = parse_toml("c.toml", &text).unwrap_err().to_string();
        assert_eq!(
            err,
            "c.toml:5: nodes.x.cpu_affinity: expected a CPU number 0-1023 or an array of them, found an array in the array"
        );
    }

    #[test]
    fn bounds_name_the_key_and_the_range() {
        let text = r#"[instances.a]
[nodes.x]
instance = "a"
command = ["x"]
stop_timeout = "2h"
backoff = { initial = "2h", max = "3h", multiplier = 11.0, reset_after = "2days" }
max_failed_starts = 1001
readiness = { kind = "notify", timeout = "0s" }
[nodes.y]
instance = "a"
command = ["x"]
stop_timeout = "0s"
readiness = { kind = "start-period", period = "61m" }
"#;
        let err = parse_toml("c.toml", text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "c.toml:5: nodes.x.stop_timeout: stop_timeout 2h is out of range: allowed 1ms to 1h",
                "c.toml:6: nodes.x.backoff.initial: backoff.initial 2h is out of range: allowed 0s to 1h",
                "c.toml:6: nodes.x.backoff.max: backoff.max 3h is out of range: allowed 0s to 1h",
                "c.toml:6: nodes.x.backoff.multiplier: backoff multiplier 11 is out of range: allowed 1 to 10",
                "c.toml:6: nodes.x.backoff.reset_after: backoff.reset_after 2days is out of range: allowed 0s to 1day",
                "c.toml:7: nodes.x.max_failed_starts: max_failed_starts 1001 is out of range: allowed 0 (never give up) to 1000",
                "c.toml:8: nodes.x.readiness.timeout: readiness.timeout 0s is out of range: allowed 1ms to 1h",
                "c.toml:12: nodes.y.stop_timeout: stop_timeout 0s is out of range: allowed 1ms to 1h",
                "c.toml:13: nodes.y.readiness.period: readiness.period 1h 1m is out of range: allowed 0s to 1h",
            ]
        );
        // A max left out follows initial: only initial is named.
        let text = "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nbackoff = { initial = \"2h\" }\n";
        let err = parse_toml("c.toml", text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "c.toml:5: nodes.x.backoff.initial: backoff.initial 2h is out of range: allowed 0s to 1h"
            ]
        );
        // The edges themselves are allowed.
        let edges = r#"[instances.a]
[nodes.x]
instance = "a"
command = ["x"]
stop_timeout = "1h"
backoff = { initial = "10ms", max = "1h", multiplier = 10, reset_after = "24h" }
max_failed_starts = 1000
readiness = { kind = "tcp", port = 1, timeout = "1h" }
"#;
        parse_toml("c.toml", edges).unwrap();
    }

    #[test]
    fn a_role_given_twice_in_two_cases_is_an_error() {
        // At the later one, whichever spelling sorts first.
        let text = "[roles.worker]\ncommand = [\"a\"]\n[roles.Worker]\ncommand = [\"b\"]\n";
        let err = parse_toml("c.toml", text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "c.toml:3: roles.Worker: role 'Worker' is given a second time (role names are \
              compared without case)"
            ]
        );
    }

    #[test]
    fn a_bad_default_is_said_once_at_its_own_line_not_at_each_node() {
        let text = r#"[instances.a]
[defaults]
stop_timeout = "2h"
backoff = { initial = "2h" }
[nodes."w.1"]
instance = "a"
command = ["x"]
[nodes.w2]
instance = "a"
command = ["x"]
stop_timeout = "3h"
[nodes.w3]
instance = "a"
command = ["x"]
"#;
        let err = parse_toml("c.toml", text).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "c.toml:3: defaults.stop_timeout: stop_timeout 2h is out of range: allowed 1ms to 1h",
                "c.toml:4: defaults.backoff.initial: backoff.initial 2h is out of range: allowed 0s to 1h",
                // Not given, it follows the initial delay given.
                "c.toml:11: nodes.w2.stop_timeout: stop_timeout 3h is out of range: allowed 1ms to 1h",
            ]
        );
    }

    #[test]
    fn a_backoff_max_not_given_is_never_below_the_initial_given() {
        let node = |backoff: &str| {
            let text = format!(
                "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nbackoff = {backoff}\n"
            );
            parse_toml("c.toml", &text).map(|c| c.nodes[0].backoff.clone())
        };
        let b = node(r#"{ initial = "1m" }"#).unwrap();
        assert_eq!(
            (b.initial, b.max),
            (Duration::from_secs(60), Duration::from_secs(60))
        );
        assert_eq!(b.multiplier, Backoff::default().multiplier);
        let b = node(r#"{ initial = "1s" }"#).unwrap();
        assert_eq!(
            b.max,
            Backoff::default().max,
            "the default max when it is longer"
        );
        let b = node(r#"{ multiplier = 3 }"#).unwrap();
        assert_eq!(
            b,
            Backoff {
                multiplier: 3.0,
                ..Backoff::default()
            }
        );
        // Given both, a max below the initial is the user's own mistake, and named.
        let err = node(r#"{ initial = "1m", max = "10s" }"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "c.toml:5: nodes.x.backoff.max: backoff max is smaller than backoff initial"
        );
        let err = node(r#"{ initial = "1s", colour = "red" }"#).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn success_exit_codes_outside_a_byte_are_named() {
        let text = r#"[instances.a]
[nodes.x]
instance = "a"
command = ["x"]
success_exit_codes = [0, 256, -1]
"#;
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert!(
            err.contains("c.toml:5: nodes.x.success_exit_codes"),
            "{err}"
        );
        assert!(err.contains("exit code 256 is outside 0..=255"), "{err}");
        assert!(err.contains("exit code -1 is outside 0..=255"), "{err}");
    }

    #[test]
    fn identity_capabilities_and_limits_parse_and_reach_templates() {
        let text = r#"
[instances.a]

[roles.worker]
command = ["/bin/zeek"]
user = "zeek"
capabilities = ["CAP_NET_RAW", "net_admin"]
limits = { nofile = 65536, core = "unlimited" }

[nodes.w]
instance = "a"
role = "worker"
limits = { nofile = 1024, memlock = "64M", nproc = "100:200" }

[nodes.m]
instance = "a"
command = ["/bin/zeek"]
user = "65534"
group = "nogroup"
supplementary_groups = ["adm"]
umask = "0027"
capabilities = []
no_new_privileges = true
"#;
        let c = parse_toml("c.toml", text).unwrap();
        let m = c.node("m").unwrap();
        assert_eq!(m.user.as_deref(), Some("65534"));
        assert_eq!(m.group.as_deref(), Some("nogroup"));
        assert_eq!(m.supplementary_groups, Some(vec!["adm".to_owned()]));
        assert_eq!(m.umask, Some(Umask(0o27)));
        assert_eq!(m.capabilities.as_deref(), Some(&[][..]));
        assert_eq!(m.no_new_privileges, Some(true));
        let w = c.resolve(c.node("w").unwrap());
        assert_eq!(w.user.as_deref(), Some("zeek"), "from the template");
        assert_eq!(w.capabilities.as_ref().unwrap().len(), 2);
        let l = |s: &str| w.limits[s].to_string();
        assert_eq!(l("nofile"), "1024", "the node's own wins");
        assert_eq!(l("core"), "unlimited", "the template's fills in");
        assert_eq!(l("memlock"), (64u64 << 20).to_string());
        assert_eq!(l("nproc"), "100:200");
        // Lossless through the TOML writer.
        assert_eq!(
            parse_toml("again.toml", &crate::ini::to_toml(&c)).unwrap(),
            c
        );
    }

    /// A node that says `false` or `[]` itself keeps it: only what it leaves unset comes
    /// from its role's template.
    #[test]
    fn a_node_that_turns_off_what_its_role_sets_keeps_it_off() {
        let text = r#"
[instances.a]
[roles.worker]
command = ["/bin/zeek"]
supplementary_groups = ["pcap"]
no_new_privileges = true
[nodes.own]
instance = "a"
role = "worker"
supplementary_groups = []
no_new_privileges = false
[nodes.inherits]
instance = "a"
role = "worker"
"#;
        let c = parse_toml("c.toml", text).unwrap();
        // Off, in the one form a resolved spec has for it (as if never given).
        let own = c.resolve(c.node("own").unwrap());
        assert_eq!(own.no_new_privileges, None);
        assert_eq!(own.supplementary_groups, None);
        let inherits = c.resolve(c.node("inherits").unwrap());
        assert_eq!(inherits.no_new_privileges, Some(true));
        assert_eq!(inherits.supplementary_groups, Some(vec!["pcap".to_owned()]));
        // Kept through the TOML writer.
        let again = parse_toml("again.toml", &crate::ini::to_toml(&c)).unwrap();
        assert_eq!(again, c);
        assert_eq!(again.node("own").unwrap().no_new_privileges, Some(false));
    }

    #[test]
    fn bad_identity_capabilities_and_limits_name_line_and_key() {
        let text = r#"[instances.a]
[roles.worker]
command = ["x"]
capabilities = ["CAP_SYS_NOPE"]
[nodes.x]
instance = "a"
command = ["x"]
user = "a b"
umask = "0999"
capabilities = [
  "CAP_NET_RAW",
  "CAP_NET_RAWW",
]
no_new_privileges = "yes"
limits = { nofile = "64M", core = "lots", nofiles = 5, nproc = -1 }
group = ""
supplementary_groups = ["ok", "x:y"]
"#;
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        let want = [
            "c.toml:4: roles.worker.capabilities: unknown capability 'CAP_SYS_NOPE' (did you mean 'CAP_SYS_NICE'?)",
            "c.toml:8: nodes.x.user: user 'a b' is not a valid name",
            "c.toml:9: nodes.x.umask: expected an octal umask string such as \"0027\" (0000-0777), found string \"0999\"",
            "c.toml:12: nodes.x.capabilities: unknown capability 'CAP_NET_RAWW' (did you mean 'CAP_NET_RAW'?)",
            "c.toml:14: nodes.x.no_new_privileges: expected true or false, found string \"yes\"",
            "c.toml:15: nodes.x.limits.core: limit core: 'lots' is not a limit: expected a number, a size such as \"64M\", or \"unlimited\"",
            "c.toml:15: nodes.x.limits.nofile: limit nofile: '64M' is not a limit: expected a number or \"unlimited\"",
            "c.toml:15: nodes.x.limits.nofiles: unknown limit 'nofiles' (did you mean 'nofile'?)",
            "c.toml:15: nodes.x.limits.nproc: limit nproc: expected a number, \"unlimited\" or \"SOFT:HARD\", found integer -1",
            "c.toml:16: nodes.x.group: group '' is empty",
            "c.toml:17: nodes.x.supplementary_groups: group 'x:y' is not a valid name",
        ];
        assert_eq!(err.lines().collect::<Vec<_>>(), want, "{err}");
    }

    #[test]
    fn bounds_apply_to_configurations_from_any_source() {
        let mut c = Configuration::empty();
        c.instances.push(Instance {
            name: "a".into(),
            host: None,
            port: None,
        });
        let mut n = Node::new("n", "a");
        n.command = vec!["x".into()];
        n.stop_timeout = Duration::ZERO;
        n.port = Some(0);
        c.nodes.push(n);
        let keys: Vec<String> = validate(&c).into_iter().filter_map(|i| i.key).collect();
        assert_eq!(keys, vec!["nodes.n.port", "nodes.n.stop_timeout"]);
    }

    #[test]
    fn unsafe_names_are_rejected() {
        let text = "[instances.\"../x\"]\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert!(err.contains("instances.../x"), "{err}");
    }

    #[test]
    fn duplicates_from_other_sources_are_found() {
        let mut c = Configuration::empty();
        c.instances.push(Instance {
            name: "a".into(),
            host: None,
            port: None,
        });
        c.instances.push(c.instances[0].clone());
        let mut n = Node::new("n", "a");
        n.command = vec!["x".into()];
        c.nodes.push(n.clone());
        c.nodes.push(n);
        let messages: Vec<String> = validate(&c).into_iter().map(|i| i.message).collect();
        assert_eq!(
            messages,
            vec!["multiple instances named 'a'", "multiple nodes named 'n'"]
        );
    }

    #[test]
    fn signals_parse_in_all_spellings() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("31"), Some(31));
        assert_eq!(signal_number("40"), None, "real-time signals are not sent");
        assert_eq!(signal_number("SIGFOO"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse_toml("f.toml", &text);
        }

        #[test]
        fn typed_node_keys_never_panic_and_issues_have_lines(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(NODE_KEYS),
                    proptest::sample::select(&[
                        "\"a\"", "\"10s\"", "\"0s\"", "\"x\"", "0", "-1", "70000",
                        "1.5", "true", "[]", "[1, \"a\"]", "[\"a\"]", "{}",
                        "{ kind = \"tcp\" }", "{ initial = 5 }", "{ A = 1 }",
                        "1979-05-27", "9999999999999999999",
                    ][..]),
                ),
                0..8,
            ),
            in_defaults in proptest::bool::ANY,
        ) {
            let table = if in_defaults { "[defaults]" } else { "[nodes.n]" };
            let mut text = format!("[instances.a]\n{table}\n");
            let mut seen = BTreeSet::new();
            for (key, value) in entries {
                if seen.insert(key) {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            if let Err(Issues(issues)) = parse_toml("f.toml", &text) {
                for issue in issues {
                    proptest::prop_assert!(
                        issue.key.is_none() || issue.line.is_some(),
                        "{issue}\n{text}"
                    );
                }
            }
        }

        #[test]
        fn arbitrary_tomlish_text_never_panics(
            text in "(\\[(nodes|instances|roles|defaults)(\\.[a-z]{1,3})?\\]\n([a-z_]{1,12} = (\"[a-z]{0,4}\"|[0-9]{1,5}|\\[\\]|\\{\\})\n){0,4}){0,5}"
        ) {
            let _ = parse_toml("f.toml", &text);
        }
    }

    #[test]
    fn a_duplicate_key_is_named_by_its_path() {
        let err = |t: &str| parse_toml("d.toml", t).unwrap_err().to_string();
        let node = "[instances.a]\n[nodes.w1]\ninstance = \"a\"\ncommand = [\"/bin/sleep\"]\n";
        assert_eq!(
            err(&format!("{node}command = [\"/bin/true\"]\n")),
            "d.toml:5: nodes.w1.command: duplicate key"
        );
        assert_eq!(
            err(&format!("{node}env = {{ A = \"1\", A = \"2\" }}\n")),
            "d.toml:5: nodes.w1.env.A: duplicate key"
        );
        assert_eq!(
            err(&format!("{node}[nodes.w1]\ninstance = \"a\"\n")),
            "d.toml:5: nodes.w1: duplicate key"
        );
        assert_eq!(
            err(&format!(
                "{node}backoff.initial = \"1s\"\nbackoff.initial = \"2s\"\n"
            )),
            "d.toml:6: nodes.w1.backoff.initial: duplicate key"
        );
        assert_eq!(
            err("[instances.\"a\"]\n[instances.\"a\"]\n"),
            "d.toml:2: instances.a: duplicate key"
        );
    }
}
