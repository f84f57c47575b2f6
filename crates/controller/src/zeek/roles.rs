//! What turns a Zeek-style configuration into one drover can deploy.
//!
//! A Zeek `Management::Node` names a role, an instance and Zeek's own settings, but no
//! program: Zeek's agents always start `zeek`. drover nodes need a command, so the
//! controller takes one per role from a file given with `--zeek-roles`:
//!
//! ```toml
//! [defaults]                     # optional: node keys every Zeek node gets
//! readiness = { kind = "start-period", period = "2s" }
//! restart = "always"
//!
//! [roles.worker]                 # the command template of each role
//! command = ["/usr/local/zeek/bin/zeek", "-i", "{interface}", "local"]
//! env = { ZEEK_CLUSTER_NODE = "{name}" }
//!
//! [roles.manager]
//! command = ["/usr/local/zeek/bin/zeek", "local"]
//! # resources and liveness: for nodes of the role that set none
//! memory = { max = "4G", high = "3G" }
//! watchdog = "30s"
//! ```
//!
//! `[defaults]` takes the keys of a cluster file's `[defaults]` (see `drover_proto::config`)
//! except those a Zeek node sets itself; the role templates become the configuration's
//! `roles`, so they are stored, shown and deployed with it.

use std::collections::BTreeMap;
use std::path::Path;

use drover_proto::config::NODE_KEYS;
use drover_proto::model::{Configuration, Node, RoleTemplate};
use serde::Deserialize;

use super::records::{ZeekConfig, ZeekNode};

/// Keys a Zeek node always sets itself, so `[defaults]` cannot.
const ZEEK_KEYS: &[&str] = &["instance", "role", "command"];

/// Role templates and node defaults for Zeek-style configurations.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Roles {
    defaults: toml::Table,
    templates: BTreeMap<String, RoleTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolesFile {
    #[serde(default)]
    defaults: toml::Table,
    #[serde(default)]
    roles: BTreeMap<String, RoleTemplate>,
}

impl Roles {
    /// Reads a roles file.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        use std::io::Read;
        // Templates of a few roles; reading a device named by mistake must end.
        const MAX: u64 = 16 << 20;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX + 1).read_to_string(&mut text))
            .map_err(|e| e.to_string())?;
        if text.len() as u64 > MAX {
            return Err(format!("larger than {MAX} bytes: not a roles file"));
        }
        Self::parse_named(&path.display().to_string(), &text)
    }

    /// Parses a roles file, checking that its defaults make valid nodes.
    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        Self::parse_named("roles.toml", text)
    }

    /// Parses a roles file named `file` in its problems: every problem of its tables at
    /// once, each at its line with its key path, as a cluster file's are; then what a
    /// roles file alone may not hold, and whether its defaults make valid nodes.
    pub(crate) fn parse_named(file: &str, text: &str) -> Result<Self, String> {
        // A cluster file's other tables are not errors to the cluster-file check.
        if let Ok(top) = toml::from_str::<BTreeMap<String, toml::Spanned<toml::Value>>>(text) {
            for (key, value) in top {
                if matches!(key.as_str(), "id" | "instances" | "nodes") {
                    let line = text[..value.span().start.min(text.len())]
                        .matches('\n')
                        .count()
                        + 1;
                    return Err(format!(
                        "{file}:{line}: {key}: a roles file has [defaults] and [roles.NAME] only"
                    ));
                }
            }
        }
        drover_proto::config::parse_toml(file, text)
            .map_err(|issues| format!("{} problem(s):\n{issues}", issues.0.len()))?;
        let file: RolesFile = toml::from_str(text).map_err(|e| e.message().trim().to_owned())?;
        for key in file.defaults.keys() {
            if !NODE_KEYS.contains(&key.as_str()) || ZEEK_KEYS.contains(&key.as_str()) {
                return Err(format!("defaults: key '{key}' is not allowed here"));
            }
        }
        for (role, t) in &file.roles {
            if t.command.first().is_none_or(String::is_empty) {
                return Err(format!("roles.{role}: a role template needs a command"));
            }
            if let Some((key, message)) = drover_proto::exec::check(t.exec_ref()).first() {
                return Err(format!("roles.{role}.{key}: {message}"));
            }
        }
        let roles = Self {
            defaults: file.defaults,
            templates: file
                .roles
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        };
        roles
            .node(&ZeekNode {
                name: "probe".into(),
                instance: "probe".into(),
                ..ZeekNode::default()
            })
            .map_err(|e| format!("defaults: {e}"))?;
        Ok(roles)
    }

    /// The role names that have a template.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }

    /// One of drover's nodes from a Zeek node: the defaults, overridden by Zeek's
    /// fields; the command comes from the role's template at deploy time.
    fn node(&self, z: &ZeekNode) -> Result<Node, String> {
        let mut t = self.defaults.clone();
        let mut set = |k: &str, v: toml::Value| {
            t.insert(k.to_owned(), v);
        };
        set("name", z.name.clone().into());
        set("instance", z.instance.clone().into());
        if !z.role.is_none() {
            set("role", z.role.as_str().into());
        }
        if let Some(p) = z.port {
            set("port", i64::from(p).into());
        }
        if let Some(p) = z.metrics_port {
            set("metrics_port", i64::from(p).into());
        }
        if let Some(i) = &z.interface {
            set("interface", i.clone().into());
        }
        if !z.scripts.is_empty() {
            set("scripts", z.scripts.clone().into());
        }
        if let Some(c) = z.cpu_affinity {
            set("cpu_affinity", i64::from(c).into());
        }
        if !z.env.is_empty() {
            let mut env = match t.remove("env") {
                Some(toml::Value::Table(e)) => e,
                _ => toml::Table::new(),
            };
            for (k, v) in &z.env {
                env.insert(k.clone(), v.clone().into());
            }
            t.insert("env".to_owned(), env.into());
        }
        toml::Value::Table(t)
            .try_into::<Node>()
            .map_err(|e| e.message().trim().to_owned())
    }

    /// drover's configuration from a Zeek one, with this file's templates as its
    /// roles. Errors are one line each, for the stage response.
    pub(crate) fn configuration(&self, z: ZeekConfig) -> Result<Configuration, Vec<String>> {
        let mut errors = Vec::new();
        let mut nodes = Vec::new();
        for n in &z.nodes {
            match self.node(n) {
                Ok(node) => nodes.push(node),
                Err(e) => errors.push(format!("node '{}': {e}", n.name)),
            }
        }
        if !errors.is_empty() {
            errors.sort();
            return Err(errors);
        }
        let mut instances = z.instances;
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Configuration {
            id: z.id,
            instances,
            nodes,
            roles: self.templates.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use drover_proto::model::{ClusterRole, CpuAffinity, Instance, Readiness, RestartPolicy};

    use super::*;

    const FILE: &str = r#"
[defaults]
restart = "always"
readiness = { kind = "start-period", period = "0s" }
env = { SHARED = "1", OVERRIDE = "default" }

[roles.worker]
command = ["/bin/zeek", "-i", "{interface}"]

[roles.Manager]
command = ["/bin/zeek"]
"#;

    #[test]
    fn zeek_nodes_get_defaults_and_templates() {
        let roles = Roles::parse(FILE).unwrap();
        assert_eq!(roles.names().collect::<Vec<_>>(), ["manager", "worker"]);
        let z = ZeekConfig {
            id: "c1".into(),
            instances: vec![Instance {
                name: "agent-a".into(),
                host: None,
                port: None,
            }],
            nodes: vec![
                ZeekNode {
                    name: "worker-01".into(),
                    instance: "agent-a".into(),
                    role: ClusterRole::Worker,
                    interface: Some("eth0".into()),
                    cpu_affinity: Some(1),
                    env: BTreeMap::from([("OVERRIDE".into(), "node".into())]),
                    metrics_port: Some(9100),
                    ..ZeekNode::default()
                },
                ZeekNode {
                    name: "manager".into(),
                    instance: "agent-a".into(),
                    role: ClusterRole::Manager,
                    port: Some(5000),
                    scripts: vec!["a.zeek".into()],
                    ..ZeekNode::default()
                },
            ],
        };
        let c = roles.configuration(z).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.nodes[0].name, "manager");
        assert_eq!(c.nodes[0].port, Some(5000));
        assert_eq!(c.nodes[0].scripts, ["a.zeek"]);
        let w = &c.nodes[1];
        assert_eq!(w.restart, RestartPolicy::Always);
        assert_eq!(
            w.readiness,
            Readiness::StartPeriod {
                period: Duration::ZERO
            }
        );
        assert_eq!(w.cpu_affinity, Some(CpuAffinity::One(1)));
        assert_eq!(w.env["SHARED"], "1");
        assert_eq!(w.env["OVERRIDE"], "node");
        assert!(w.command.is_empty(), "the template gives it at deploy time");
        assert_eq!(c.resolve(w).command, ["/bin/zeek", "-i", "eth0"]);
        assert!(drover_proto::config::validate(&c).is_empty());
    }

    #[test]
    fn templates_and_defaults_carry_identity_capabilities_and_limits() {
        let roles = Roles::parse(
            r#"
[defaults]
user = "zeek"
limits = { nofile = 65536 }

[roles.worker]
command = ["/bin/zeek", "-i", "{interface}"]
capabilities = ["CAP_NET_RAW", "CAP_NET_ADMIN"]
limits = { memlock = "unlimited" }

[roles.manager]
command = ["/bin/zeek"]
capabilities = []
"#,
        )
        .unwrap();
        let z = ZeekConfig {
            id: "c".into(),
            instances: vec![Instance {
                name: "a".into(),
                host: None,
                port: None,
            }],
            nodes: vec![
                ZeekNode {
                    name: "w".into(),
                    instance: "a".into(),
                    role: ClusterRole::Worker,
                    interface: Some("eth0".into()),
                    ..ZeekNode::default()
                },
                ZeekNode {
                    name: "m".into(),
                    instance: "a".into(),
                    role: ClusterRole::Manager,
                    ..ZeekNode::default()
                },
            ],
        };
        let c = roles.configuration(z).unwrap();
        assert!(drover_proto::config::validate(&c).is_empty());
        let w = c.resolve(c.node("w").unwrap());
        assert_eq!(w.user.as_deref(), Some("zeek"));
        assert_eq!(w.capabilities.as_ref().map(Vec::len), Some(2));
        assert_eq!(w.limits["nofile"].to_string(), "65536");
        assert_eq!(w.limits["memlock"].to_string(), "unlimited");
        let m = c.resolve(c.node("m").unwrap());
        assert_eq!(m.user.as_deref(), Some("zeek"));
        assert_eq!(m.capabilities.as_deref(), Some(&[][..]), "none at all");
        assert!(!m.limits.contains_key("memlock"));
        for (text, want) in [
            (
                "[roles.worker]\ncommand = [\"z\"]\ncapabilities = [\"CAP_NOPE\"]\n",
                "roles.worker",
            ),
            (
                "[defaults]\nlimits = { nofile = \"x\" }\n",
                "roles.toml:2: defaults.limits.nofile:",
            ),
        ] {
            let e = Roles::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn roles_and_defaults_carry_resource_limits_and_liveness() {
        let text = r#"
[defaults]
cpus = 1.5
pids_max = 512

[roles.worker]
command = ["/bin/zeek", "-i", "{interface}"]
memory = { max = "4G", high = "3G" }
watchdog = "30s"
liveness = { kind = "tcp", port = 47761 }
"#;
        let roles = Roles::parse(text).unwrap();
        let z = ZeekConfig {
            id: "c".into(),
            instances: vec![Instance {
                name: "a".into(),
                host: None,
                port: None,
            }],
            nodes: vec![ZeekNode {
                name: "w".into(),
                instance: "a".into(),
                role: ClusterRole::Worker,
                ..ZeekNode::default()
            }],
        };
        let c = roles.configuration(z).unwrap();
        let w = c.resolve(&c.nodes[0]);
        assert_eq!(w.cpus, Some(1.5));
        assert_eq!(w.pids_max, Some(512));
        let m = w.memory.unwrap();
        assert_eq!(m.max.map(|b| b.0), Some(4 << 30));
        assert_eq!(m.high.map(|b| b.0), Some(3 << 30));
        assert_eq!(w.watchdog, Some(Duration::from_secs(30)));
        assert_eq!(w.liveness.unwrap().kind(), "tcp");
        assert!(drover_proto::config::validate(&c).is_empty());
        for (text, want) in [
            (
                "[defaults]\ncpus = \"lots\"\n",
                "roles.toml:2: defaults.cpus: expected a number",
            ),
            (
                "[roles.worker]\ncommand = [\"z\"]\nmemory = { max = \"4X\" }\n",
                "roles.toml:3: roles.worker.memory.max: expected a size",
            ),
            (
                "[roles.worker]\ncommand = [\"z\"]\nliveness = { kind = \"ping\" }\n",
                "roles.toml:3: roles.worker.liveness.kind: expected one of",
            ),
        ] {
            let e = Roles::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn bad_files_are_refused() {
        for (text, want) in [
            (
                "[roles.worker]\ncommand = []\n",
                "roles.toml:2: roles.worker.command: a role template needs a non-empty command",
            ),
            (
                "[defaults]\ninstance = \"a\"\n",
                "roles.toml:2: defaults.instance:",
            ),
            (
                "[defaults]\nrole = \"worker\"\n",
                "key 'role' is not allowed here",
            ),
            (
                "[defaults]\nnope = 1\n",
                "roles.toml:2: defaults.nope: unknown key",
            ),
            (
                "[defaults]\nrestart = \"sometimes\"\n",
                "roles.toml:2: defaults.restart:",
            ),
            (
                "[rolez.worker]\n",
                "roles.toml:1: rolez: unknown key 'rolez' (did you mean 'roles'?)",
            ),
            (
                "[defaults]\n\n[nodes.x]\ninstance = \"a\"\ncommand = [\"z\"]\n",
                "roles.toml:3: nodes: a roles file has [defaults] and [roles.NAME] only",
            ),
        ] {
            let e = Roles::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert_eq!(Roles::parse("").unwrap(), Roles::default());
    }

    /// Every problem of a roles file is said in one go, each at its own line: a
    /// misspelt key inside a template's table too, which the templates' own types
    /// (which ignore unknown fields, for peers of later releases) would let pass.
    #[test]
    fn every_problem_is_reported_at_its_line() {
        let text = "[defaults]\n\
                    restrat = \"always\"\n\
                    readiness = { kind = \"notify\", timeot = \"5s\" }\n\
                    backoff = { intial = \"1s\" }\n\
                    [roles.worker]\n\
                    command = [\"z\"]\n\
                    memory = { max = \"4G\", hihg = \"3G\" }\n\
                    liveness = { kind = \"tcp\", port = 1, intervl = \"1s\" }\n";
        let e = Roles::parse(text).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 6, "{e}");
        assert_eq!(lines[0], "5 problem(s):");
        let lines = &lines[1..];
        for (line, want) in lines.iter().zip([
            "roles.toml:2: defaults.restrat: unknown key 'restrat' (did you mean 'restart'?)",
            "roles.toml:3: defaults.readiness.timeot:",
            "roles.toml:4: defaults.backoff.intial:",
            "roles.toml:7: roles.worker.memory.hihg: unknown key 'hihg' (did you mean 'high'?)",
            "roles.toml:8: roles.worker.liveness.intervl:",
        ]) {
            assert!(line.starts_with(want), "{line}\nwanted {want}");
        }
    }

    #[test]
    fn without_templates_validation_names_the_missing_role() {
        let z = ZeekConfig {
            id: "c".into(),
            instances: vec![Instance {
                name: "a".into(),
                host: None,
                port: None,
            }],
            nodes: vec![ZeekNode {
                name: "w".into(),
                instance: "a".into(),
                role: ClusterRole::Worker,
                ..ZeekNode::default()
            }],
        };
        let c = Roles::default().configuration(z).unwrap();
        let issues = drover_proto::config::validate(&c);
        assert_eq!(
            issues[0].message,
            "node 'w' has no command and role 'worker' has no command template"
        );
    }
}
