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
//! `success_exit_codes`, `readiness`, `stop_signal`, `stop_timeout`); unknown keys are
//! errors. Parse errors name the file, the line and the key; [`validate`] reports every
//! semantic problem at once, sorted, each with the key it concerns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use crate::model::{Configuration, Instance, Node, RoleTemplate, new_id};
use crate::name;

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
    "restart",
    "backoff",
    "max_failed_starts",
    "success_exit_codes",
    "readiness",
    "stop_signal",
    "stop_timeout",
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
    fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
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

/// Maps byte offsets to 1-based line numbers.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Self(
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }

    fn line_of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// Parses and validates a TOML cluster file. `file` names it in error messages.
pub fn parse_toml(file: &str, text: &str) -> Result<Configuration, Issues> {
    let lines = Lines::new(text);
    let with_file = |mut issue: Issue| {
        issue.file = Some(file.to_owned());
        issue
    };
    let parsed: FileToml = toml::from_str(text).map_err(|e| {
        Issues(vec![with_file(Issue {
            file: None,
            line: e.span().map(|s| lines.line_of(s.start)),
            key: None,
            message: e.message().trim_end().to_owned(),
        })])
    })?;

    let mut issues = Vec::new();
    let mut line_of_key: BTreeMap<String, usize> = BTreeMap::new();

    let instances = parsed
        .instances
        .into_iter()
        .map(|(name, spanned)| {
            line_of_key.insert(
                format!("instances.{name}"),
                lines.line_of(spanned.span().start),
            );
            let inst = spanned.into_inner();
            Instance {
                name,
                host: inst.host,
                port: inst.port,
            }
        })
        .collect();

    let mut roles = BTreeMap::new();
    for (role, spanned) in parsed.roles {
        let key = format!("roles.{role}");
        let line = lines.line_of(spanned.span().start);
        line_of_key.insert(key.clone(), line);
        match toml::Value::Table(spanned.into_inner()).try_into::<RoleTemplate>() {
            Ok(t) => {
                roles.insert(role.to_ascii_lowercase(), t);
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
    for key in defaults.keys() {
        if !NODE_KEYS.contains(&key.as_str()) || key == "instance" {
            issues.push(Issue::at_key(
                format!("defaults.{key}"),
                unknown_key_message(key),
            ));
        }
    }

    let mut nodes = Vec::new();
    for (name, spanned) in parsed.nodes {
        let key = format!("nodes.{name}");
        let line = lines.line_of(spanned.span().start);
        line_of_key.insert(key.clone(), line);
        let mut table = spanned.into_inner();
        let mut bad_key = false;
        for k in table.keys() {
            if !NODE_KEYS.contains(&k.as_str()) {
                bad_key = true;
                issues.push(Issue {
                    file: None,
                    line: Some(line),
                    key: Some(format!("{key}.{k}")),
                    message: unknown_key_message(k),
                });
            }
        }
        if bad_key {
            continue;
        }
        for (k, v) in &defaults {
            if k != "instance" && !table.contains_key(k) {
                table.insert(k.clone(), v.clone());
            }
        }
        if !table.contains_key("instance") {
            issues.push(Issue {
                file: None,
                line: Some(line),
                key: Some(format!("{key}.instance")),
                message: "missing key 'instance': every node names the instance it runs on"
                    .to_owned(),
            });
            continue;
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
    issues.extend(validate(&config));
    if issues.is_empty() {
        return Ok(config);
    }
    let mut issues: Vec<Issue> = issues
        .into_iter()
        .map(|mut issue| {
            if issue.line.is_none() {
                issue.line = issue.key.as_deref().and_then(|k| {
                    // The longest known table prefix of the key gives the line.
                    line_of_key
                        .iter()
                        .filter(|(table, _)| {
                            k == table.as_str()
                                || k.strip_prefix(table.as_str())
                                    .is_some_and(|rest| rest.starts_with('.'))
                        })
                        .max_by_key(|(table, _)| table.len())
                        .map(|(_, line)| *line)
                });
            }
            with_file(issue)
        })
        .collect();
    issues.sort_by(|a, b| a.message.cmp(&b.message).then_with(|| a.key.cmp(&b.key)));
    issues.dedup();
    Err(Issues(issues))
}

fn unknown_key_message(key: &str) -> String {
    let known = NODE_KEYS.iter().copied().filter(|k| *k != "instance");
    unknown_key_with_suggestion(key, known)
}

/// "unknown key 'x'", with the closest of `known` as a suggestion when it is at most two
/// edits away.
pub(crate) fn unknown_key_with_suggestion<'a>(
    key: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> String {
    let suggestion = known
        .into_iter()
        .map(|k| (edit_distance(k, key), k))
        .min()
        .filter(|(d, _)| *d <= 2);
    match suggestion {
        Some((_, s)) => format!("unknown key '{key}' (did you mean '{s}'?)"),
        None => format!("unknown key '{key}'"),
    }
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

/// The number of a signal named `TERM`, `SIGTERM` or `sigterm`, or given as a number.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(n, _)| *n == bare).map(|(_, v)| *v)
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
    let collisions: Vec<&str> = seen_nodes.intersection(&seen_instances).copied().collect();
    if !collisions.is_empty() {
        issues.push(Issue {
            file: None,
            line: None,
            key: None,
            message: format!("node and instance names collide: {}", collisions.join(", ")),
        });
    }

    for (role, template) in &config.roles {
        if template.command.is_empty() || template.command[0].is_empty() {
            issues.push(Issue::at_key(
                format!("roles.{role}.command"),
                "a role template needs a non-empty command",
            ));
        }
    }

    // (instance, port) -> node names using it.
    let mut ports: BTreeMap<(&str, u16), Vec<&str>> = BTreeMap::new();
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
        for port in [node.port, node.metrics_port].into_iter().flatten() {
            let users = ports.entry((node.instance.as_str(), port)).or_default();
            if !users.contains(&node.name.as_str()) {
                users.push(&node.name);
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
        for var in node.env.keys() {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                issues.push(Issue::at_key(
                    format!("{key}.env"),
                    format!(
                        "invalid environment variable name '{}'",
                        var.escape_default()
                    ),
                ));
            }
        }
        if node.env.values().any(|v| v.contains('\0')) {
            issues.push(Issue::at_key(
                format!("{key}.env"),
                "an environment value contains a NUL byte",
            ));
        }
        if signal_number(&node.stop_signal).is_none() {
            issues.push(Issue::at_key(
                format!("{key}.stop_signal"),
                format!("unknown signal '{}'", node.stop_signal),
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
        if b.max < b.initial {
            issues.push(Issue::at_key(
                format!("{key}.backoff.max"),
                "backoff max is smaller than backoff initial",
            ));
        }
        if let Some(code) = node
            .success_exit_codes
            .iter()
            .find(|c| !(0..=255).contains(*c))
        {
            issues.push(Issue::at_key(
                format!("{key}.success_exit_codes"),
                format!("exit code {code} is outside 0..=255"),
            ));
        }
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
        if users.len() > 1 {
            issues.push(Issue::at_key(
                format!("nodes.{}", users[1]),
                format!("multiple nodes on instance '{instance}' using port {port}/tcp"),
            ));
        }
    }

    issues.sort_by(|a, b| a.message.cmp(&b.message).then_with(|| a.key.cmp(&b.key)));
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterRole, CpuAffinity, Readiness, RestartPolicy};
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
            "c.toml:3: nodes.x.comand: unknown key 'comand' (did you mean 'command'?)"
        );
    }

    #[test]
    fn bad_values_name_the_node() {
        let text = "[instances.a]\n[nodes.x]\ninstance = \"a\"\ncommand = [\"x\"]\nrestart = \"sometimes\"\n";
        let err = parse_toml("c.toml", text).unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2: nodes.x: "), "{err}");
        assert!(err.contains("sometimes"), "{err}");
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
        let messages: Vec<&str> = err.0.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            vec![
                "backoff multiplier must be at least 1, not 0.5",
                "multiple nodes on instance 'a' using port 2151/tcp",
                "node 'w2' has undeclared instance name 'nowhere'",
                "node 'w3' port 2151/tcp conflicts with agent port on instance 'a'",
                "node 'w4' has no command and role 'worker' has no command template",
                "node 'w4' port 2151/tcp conflicts with agent port on instance 'a'",
                "node and instance names collide: w1",
                "unknown signal 'SIGNOPE'",
            ]
        );
        assert!(err.0.iter().all(|i| i.file.as_deref() == Some("c.toml")));
        let w2 = err.0.iter().find(|i| i.message.contains("w2")).unwrap();
        assert_eq!(w2.key.as_deref(), Some("nodes.w2.instance"));
        assert_eq!(w2.line, Some(8));
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
        assert_eq!(signal_number("SIGFOO"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse_toml("f.toml", &text);
        }

        #[test]
        fn arbitrary_tomlish_text_never_panics(
            text in "(\\[(nodes|instances|roles|defaults)(\\.[a-z]{1,3})?\\]\n([a-z_]{1,12} = (\"[a-z]{0,4}\"|[0-9]{1,5}|\\[\\]|\\{\\})\n){0,4}){0,5}"
        ) {
            let _ = parse_toml("f.toml", &text);
        }
    }
}
