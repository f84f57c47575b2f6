//! Checks of what a node's exec gets from its configuration: its command line and its
//! environment, after role templates fill them in.
//!
//! Each catches at stage what would otherwise show only once a deploy had stopped the
//! nodes it replaces, or never:
//!
//! - a misspelt placeholder (`{nme}`, `{prot}`) in a command or an environment value,
//!   which would reach the program as it is written;
//! - `{interface}` or `{port}` in the command or environment of a node that has none,
//!   which would give the program an empty string (`-i ""`), but for Zeek's roles;
//! - a variable the agent sets itself (`DROVER_NODE`, `NOTIFY_SOCKET`, ...), which
//!   would be replaced without a word;
//! - an environment value `<hidden>`: a viewer's copy, whose secrets it would replace;
//! - an argument or an environment entry longer than one exec takes, which would fail
//!   every start with "argument list too long".

use crate::config::Issue;
use crate::model::{ClusterRole, Configuration, Node};

/// The placeholders role templates fill in (see [`crate::model::RoleTemplate`]).
pub const PLACEHOLDERS: [&str; 6] = ["name", "instance", "role", "interface", "port", "scripts"];

/// Variables the agent sets in node processes' environments (and in exec probes'), some
/// only where they apply (`WATCHDOG_*` with a watchdog), whatever the configuration says.
pub const AGENT_SET: [&str; 10] = [
    "DROVER_NODE",
    "DROVER_INSTANCE",
    "DROVER_ROLE",
    "DROVER_QUERY_SOCKET",
    "DROVER_NODE_TOKEN",
    "DROVER_NODE_PID",
    "DROVER_PROBE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The longest argument or environment entry (`NAME=value`) one exec takes: Linux's
/// `MAX_ARG_STRLEN`, 32 pages with the terminating NUL, here of 4 KiB pages: the limit
/// on every host (kernels with larger pages take more).
pub const MAX_STRING: usize = 32 * 4096 - 1;

/// Adds the problems of `config`'s commands and environments to `issues`.
pub(crate) fn check(config: &Configuration, issues: &mut Vec<Issue>) {
    for (role, t) in &config.roles {
        let key = format!("roles.{}", role.escape_default());
        as_written(issues, &key, &t.command, &t.env);
    }
    for node in &config.nodes {
        let key = format!("nodes.{}", node.name.escape_default());
        as_written(issues, &key, &node.command, &node.env);
        gaps(config, node, &key, issues);
        // Filling in costs a copy of the node: only when a string could grow too long.
        if might_grow_too_long(config, node) {
            sizes(&config.resolve(node), &key, issues);
        }
    }
}

/// What a role template's or a node's own command and environment (at `key`) hold as
/// written: misspelt placeholders, variables the agent sets, a viewer's `<hidden>`.
fn as_written(
    issues: &mut Vec<Issue>,
    key: &str,
    command: &[String],
    env: &std::collections::BTreeMap<String, String>,
) {
    for arg in command {
        misspelt(issues, &format!("{key}.command"), arg);
    }
    for (var, value) in env {
        let key = format!("{key}.env.{}", var.escape_default());
        agent_set(issues, &key, var);
        misspelt(issues, &key, value);
        hidden(issues, &key, value);
    }
}

/// A `{word}` in `text` that is not a placeholder but nearly one: a slip, since a
/// program is unlikely to want a literal `{nme}`. Only slips a hand makes count: see
/// [`slip_of`]. Braces that belong to something else are left alone: after `$`, `%` or
/// `#` (a shell's `${PORT}`, systemd's `%{name}`), doubled (`{{Name}}`, Mustache's), and
/// around an all-capitals word (`{PORT}`, an environment variable's name).
fn misspelt(issues: &mut Vec<Issue>, key: &str, text: &str) {
    let mut from = 0;
    while let Some(found) = text[from..].find('{') {
        let open = from + found;
        from = open + 1;
        if text[..open].ends_with(['$', '%', '#', '{']) {
            continue;
        }
        let rest = &text[open + 1..];
        let Some(close) = rest.find(['}', '{']) else {
            return;
        };
        if rest.as_bytes()[close] == b'{' || rest[close + 1..].starts_with('}') {
            continue;
        }
        let word = &rest[..close];
        if word.is_empty()
            || !word.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
            || (word.len() > 1 && !word.bytes().any(|b| b.is_ascii_lowercase()))
            || PLACEHOLDERS.contains(&word)
        {
            continue;
        }
        let lower = word.to_ascii_lowercase();
        // `{Name}`: a placeholder in the wrong case.
        let same = PLACEHOLDERS.into_iter().find(|p| *p == lower);
        if let Some(meant) = same.or_else(|| slip_of(&lower)) {
            issues.push(Issue::at_key(
                key,
                format!("'{{{word}}}' is not a placeholder (did you mean '{{{meant}}}'?)"),
            ));
        }
    }
}

/// The placeholder `word` (lower-cased) is a slip of: the placeholder with a letter left
/// out (`nme`) or two neighbours swapped (`prot`), or for the longer placeholders two
/// such slips (`intrface`). A letter changed or added makes a word of its own, which a
/// program may well want in braces (jq's `{ports}`, `{sort}`, a password hash's
/// `{scrypt}`, a log format's `{instant}`), and is never taken for one.
fn slip_of(word: &str) -> Option<&'static str> {
    PLACEHOLDERS.into_iter().find(|p| {
        let most = if p.len() <= 5 { 1 } else { 2 };
        let mut near = vec![p.as_bytes().to_vec()];
        for _ in 0..most {
            let mut next = Vec::new();
            for v in &near {
                for i in 0..v.len() {
                    let mut out = v.clone();
                    out.remove(i);
                    next.push(out);
                    if i + 1 < v.len() {
                        let mut swapped = v.clone();
                        swapped.swap(i, i + 1);
                        next.push(swapped);
                    }
                }
            }
            near.extend(next);
        }
        // `{script}` is a word of its own too.
        word != *p
            && format!("{word}s") != *p
            && near.iter().any(|v| v.as_slice() == word.as_bytes())
    })
}

/// What a viewer is shown for an environment value (`get-config` as scope viewer): a
/// configuration with it is a viewer's copy, whose secrets would be replaced by it.
pub const HIDDEN: &str = "<hidden>";

fn hidden(issues: &mut Vec<Issue>, key: &str, value: &str) {
    if value == HIDDEN {
        issues.push(Issue::at_key(
            key,
            format!(
                "the value is '{HIDDEN}', as a viewer's copy of a configuration shows every \
                 value: stage the configuration an operator or an admin gets"
            ),
        ));
    }
}

fn agent_set(issues: &mut Vec<Issue>, key: &str, var: &str) {
    if AGENT_SET.contains(&var) {
        issues.push(Issue::at_key(
            key,
            format!("'{var}' is set by the agent for the nodes it runs: choose another name"),
        ));
    }
}

/// `{interface}` or `{port}` in the command `node` runs (its own, or its role's) when it
/// has no such value. Not for Zeek's roles (manager, logger, proxy, worker), which
/// zeek-client stages with Zeek's checks and no others: a Zeek worker may go without an
/// interface, and managers, loggers and proxies get ports from the controller.
fn gaps(config: &Configuration, node: &Node, key: &str, issues: &mut Vec<Issue>) {
    if !matches!(node.role, ClusterRole::None | ClusterRole::Other(_)) {
        return;
    }
    let template = config.roles.get(node.role.as_str());
    let role = || format!("role '{}''s", node.role.as_str().escape_default());
    // Where each string comes from, for the message.
    let mut strings: Vec<(String, &str)> = Vec::new();
    if node.command.is_empty() {
        if let Some(t) = template {
            strings.extend(
                t.command
                    .iter()
                    .map(|a| (format!("{} command", role()), a.as_str())),
            );
        }
    } else {
        strings.extend(
            node.command
                .iter()
                .map(|a| ("its command".to_owned(), a.as_str())),
        );
    }
    for (var, value) in &node.env {
        strings.push((format!("its env {}", var.escape_default()), value));
    }
    for (var, value) in template.iter().flat_map(|t| &t.env) {
        if !node.env.contains_key(var) {
            strings.push((format!("{} env {}", role(), var.escape_default()), value));
        }
    }
    let has_port = node.port.is_some();
    let has_interface = node.interface.as_deref().is_some_and(|i| !i.is_empty());
    for (placeholder, what, has) in [
        ("{interface}", "interface", has_interface),
        ("{port}", "port", has_port),
    ] {
        if has {
            continue;
        }
        if let Some((whose, _)) = strings.iter().find(|(_, s)| s.contains(placeholder)) {
            issues.push(Issue::at_key(
                key,
                format!(
                    "node '{}' has no {what}, which {whose} puts in with '{placeholder}'",
                    node.name.escape_default()
                ),
            ));
        }
    }
}

/// Whether a string of `node`'s command or environment (its own or its role's) could be
/// longer than [`MAX_STRING`] once its placeholders are filled in: its length with every
/// `{` taken for the longest value a placeholder could give.
fn might_grow_too_long(config: &Configuration, node: &Node) -> bool {
    let fill = [
        node.name.len(),
        node.instance.len(),
        node.role.as_str().len(),
        node.interface.as_deref().map_or(0, str::len),
        5,
        node.scripts.iter().map(|s| s.len() + 1).sum(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let bound = |s: &str| s.len() + s.matches('{').count() * fill;
    let template = config.roles.get(node.role.as_str());
    let args = node
        .command
        .iter()
        .chain(template.iter().flat_map(|t| &t.command));
    let env = node.env.iter().chain(template.iter().flat_map(|t| &t.env));
    args.map(|a| bound(a))
        .chain(env.map(|(k, v)| k.len() + 1 + bound(v)))
        .any(|n| n > MAX_STRING)
}

/// An argument or environment entry of the filled-in node longer than one exec takes.
fn sizes(resolved: &Node, key: &str, issues: &mut Vec<Issue>) {
    if let Some(arg) = resolved.command.iter().find(|a| a.len() > MAX_STRING) {
        issues.push(Issue::at_key(
            format!("{key}.command"),
            format!(
                "an argument of {} bytes is longer than an exec takes ({MAX_STRING} bytes)",
                arg.len()
            ),
        ));
    }
    for (var, value) in &resolved.env {
        let len = var.len() + 1 + value.len();
        if len > MAX_STRING {
            issues.push(Issue::at_key(
                format!("{key}.env.{}", var.escape_default()),
                format!(
                    "'{}=...' is {len} bytes, longer than an exec takes ({MAX_STRING} bytes)",
                    var.escape_default()
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, RoleTemplate};

    fn config(nodes: Vec<Node>, roles: &[(&str, &[&str])]) -> Configuration {
        Configuration {
            instances: vec![Instance {
                name: "a".into(),
                host: None,
                port: None,
            }],
            nodes,
            ..Configuration::empty()
        }
        .with_roles(roles)
    }

    trait WithRoles {
        fn with_roles(self, roles: &[(&str, &[&str])]) -> Self;
    }

    impl WithRoles for Configuration {
        fn with_roles(mut self, roles: &[(&str, &[&str])]) -> Self {
            self.roles = roles
                .iter()
                .map(|(r, c)| {
                    (
                        (*r).to_owned(),
                        RoleTemplate {
                            command: c.iter().map(|s| (*s).to_owned()).collect(),
                            ..RoleTemplate::default()
                        },
                    )
                })
                .collect();
            self
        }
    }

    fn node(name: &str, role: ClusterRole, command: &[&str]) -> Node {
        Node {
            role,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..Node::new(name, "a")
        }
    }

    fn messages(c: &Configuration) -> Vec<String> {
        let mut issues = Vec::new();
        check(c, &mut issues);
        issues
            .into_iter()
            .map(|i| format!("{}: {}", i.key.unwrap_or_default(), i.message))
            .collect()
    }

    #[test]
    fn near_misses_of_placeholders_are_refused_and_other_braces_left_alone() {
        let fine = [
            "awk",
            "{print}",
            "{}",
            "{\"a\": 1}",
            "${HOME}",
            "{{json}}",
            "${PORT}",
            "${NAME}",
            "%{instance}",
            "{PORTS}",
            "{ports}",
            "{sort}",
            "{scrypt}$e0801$x",
            "{instant} {level}",
            "{interact}",
            "{strips}",
            "{{Name}}",
            "{{ name }}",
            "{rule}",
            "{names}",
            "{same}",
            "{script}",
            "{instances}",
            "{post}",
            "{part}",
            "{time}",
        ];
        let mut command = fine.to_vec();
        command.push("{nme}");
        let c = config(
            vec![node("n", ClusterRole::None, &command)],
            &[(
                "worker",
                &[
                    "zeek",
                    "-i",
                    "{interfce}",
                    "--p={prot}",
                    "{Name}",
                    "{intrface}",
                    "{nstance}",
                ],
            )],
        );
        assert_eq!(
            messages(&c),
            [
                "roles.worker.command: '{interfce}' is not a placeholder (did you mean '{interface}'?)",
                "roles.worker.command: '{prot}' is not a placeholder (did you mean '{port}'?)",
                "roles.worker.command: '{Name}' is not a placeholder (did you mean '{name}'?)",
                "roles.worker.command: '{intrface}' is not a placeholder (did you mean '{interface}'?)",
                "roles.worker.command: '{nstance}' is not a placeholder (did you mean '{instance}'?)",
                "nodes.n.command: '{nme}' is not a placeholder (did you mean '{name}'?)",
            ]
        );
    }

    #[test]
    fn an_interface_or_port_the_command_needs_and_the_node_lacks_is_refused() {
        let w = ClusterRole::Other("sensor".into());
        let mut with = node("w2", w.clone(), &[]);
        let mut w = node("w", w, &[]);
        with.interface = Some("eth0".into());
        with.port = Some(2000);
        let own = node("o", ClusterRole::None, &["prog", "--port={port}"]);
        w.env.insert("X".into(), "{port}".into());
        // In the environment alone.
        let mut env = node("e", ClusterRole::None, &["prog"]);
        env.env.insert("LISTEN".into(), ":{port}".into());
        let c = config(
            vec![w, with, own, env],
            &[("sensor", &["snort", "-i", "{interface}", "-p", "{port}"])],
        );
        assert_eq!(
            messages(&c),
            [
                "nodes.w: node 'w' has no interface, which role 'sensor''s command puts in with '{interface}'",
                "nodes.w: node 'w' has no port, which role 'sensor''s command puts in with '{port}'",
                "nodes.o: node 'o' has no port, which its command puts in with '{port}'",
                "nodes.e: node 'e' has no port, which its env LISTEN puts in with '{port}'",
            ]
        );
    }

    #[test]
    fn zeeks_roles_keep_zeeks_checks_alone() {
        // A manager gets a port from the controller; a worker may have no interface.
        let m = node("m", ClusterRole::Manager, &[]);
        let w = node("w", ClusterRole::Worker, &[]);
        let c = config(
            vec![m, w],
            &[
                ("manager", &["zeek", "-p", "{port}"]),
                ("worker", &["zeek", "-i", "{interface}"]),
            ],
        );
        assert!(messages(&c).is_empty(), "{:?}", messages(&c));
    }

    #[test]
    fn variables_the_agent_sets_are_refused() {
        let mut n = node("n", ClusterRole::None, &["prog"]);
        n.env.insert("DROVER_NODE".into(), "spoof".into());
        n.env.insert("PATH".into(), String::new());
        let mut c = config(vec![n], &[]);
        c.roles.insert(
            "r".into(),
            RoleTemplate {
                command: vec!["x".into()],
                env: [("NOTIFY_SOCKET".to_owned(), "/x".to_owned())].into(),
                ..RoleTemplate::default()
            },
        );
        assert_eq!(
            messages(&c),
            [
                "roles.r.env.NOTIFY_SOCKET: 'NOTIFY_SOCKET' is set by the agent for the nodes it runs: choose another name",
                "nodes.n.env.DROVER_NODE: 'DROVER_NODE' is set by the agent for the nodes it runs: choose another name",
            ]
        );
    }

    #[test]
    fn strings_longer_than_an_exec_takes_are_refused_at_their_key() {
        let mut n = node("n", ClusterRole::None, &["prog", &"a".repeat(MAX_STRING)]);
        n.env.insert("BIG".into(), "b".repeat(MAX_STRING - 3));
        n.env.insert("FITS".into(), "b".repeat(MAX_STRING - 5));
        let c = config(vec![n], &[]);
        assert_eq!(
            messages(&c),
            [format!(
                "nodes.n.env.BIG: 'BIG=...' is {} bytes, longer than an exec takes ({MAX_STRING} bytes)",
                MAX_STRING + 1
            )]
        );
        let long = node(
            "l",
            ClusterRole::None,
            &["prog", &"a".repeat(MAX_STRING + 1)],
        );
        assert_eq!(
            messages(&config(vec![long], &[])),
            [format!(
                "nodes.l.command: an argument of {} bytes is longer than an exec takes ({MAX_STRING} bytes)",
                MAX_STRING + 1
            )]
        );
    }

    #[test]
    fn a_viewers_copy_is_not_staged_back() {
        let mut n = node("n", ClusterRole::None, &["prog"]);
        n.env.insert("TOKEN".into(), HIDDEN.into());
        n.env.insert("OTHER".into(), "<hidden> or not".into());
        let found = messages(&config(vec![n], &[]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("nodes.n.env.TOKEN: the value is '<hidden>'"),
            "{found:?}"
        );
    }
}
