//! Port checks and auto-assignment for Zeek clusters, with the rules of Zeek's controller
//! (`config_assign_broker_ports`, `config_assign_metrics_ports` and the port checks of
//! its configuration validation).
//!
//! A configuration is a Zeek cluster when one of its nodes has the role `manager` (the
//! same test as the controller's cluster layout); only then, and only for nodes with a
//! Zeek role, does anything here apply. Other configurations keep the ports they give.
//!
//! - Broker ports: managers, loggers and proxies without a `port` get one, never workers.
//!   Candidates are sorted by instance name, then role (manager, logger, proxy), then
//!   name, and numbered from the start port (Zeek's 2200) across all instances, skipping
//!   every agent port, every port and metrics port a node already has, and the
//!   controller's own port.
//! - Metrics ports: every Zeek node without a `metrics_port` gets one, in the same order
//!   (workers last), numbered from the start port (Zeek's 9000) once per host address:
//!   instances on one address share a pool, instances whose address is unknown share
//!   one. A pool skips the agent ports, Broker ports and metrics ports at its address.
//! - Checks: a node `port` equal to the controller's port is refused; with Broker port
//!   assignment off, managers, loggers and proxies without a port are refused.
//!
//! Zeek's controller skips neither its own port nor given metrics ports when assigning
//! Broker ports; drover skips both, since either would be a conflict (the first one
//! refused by the check above).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::config::Issue;
use crate::model::{ClusterRole, Configuration, Node};

/// Zeek's first auto-assigned Broker port.
pub const BROKER_START: u16 = 2200;
/// Zeek's first auto-assigned metrics port.
pub const METRICS_START: u16 = 9000;

/// What the controller assigns and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// First Broker port to assign; `None` turns Broker port assignment off.
    pub broker_start: Option<u16>,
    /// First metrics port to assign; `None` turns metrics port assignment off.
    pub metrics_start: Option<u16>,
    /// The controller's own port (Zeek's Broker port, drover's listening port).
    pub controller_port: Option<u16>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self {
            broker_start: Some(BROKER_START),
            metrics_start: Some(METRICS_START),
            controller_port: None,
        }
    }
}

/// Assignment order of the Zeek roles; `None` for roles that get no ports.
fn rank(role: &ClusterRole) -> Option<u8> {
    match role {
        ClusterRole::Manager => Some(0),
        ClusterRole::Logger => Some(1),
        ClusterRole::Proxy => Some(2),
        ClusterRole::Worker => Some(3),
        ClusterRole::None | ClusterRole::Other(_) => None,
    }
}

/// Whether a node of this role listens for Broker peers.
fn needs_broker_port(role: &ClusterRole) -> bool {
    matches!(
        role,
        ClusterRole::Manager | ClusterRole::Logger | ClusterRole::Proxy
    )
}

/// Whether `config` is a Zeek cluster: one of its nodes is a manager.
pub fn is_zeek_cluster(config: &Configuration) -> bool {
    config.nodes.iter().any(|n| n.role == ClusterRole::Manager)
}

fn issue(key: String, message: String) -> Issue {
    Issue {
        file: None,
        line: None,
        key: Some(key),
        message,
    }
}

/// The port problems of `config` under `policy`, with Zeek's wording; empty when there
/// are none. Run beside [`crate::config::validate`] when a configuration is staged.
pub fn check(config: &Configuration, policy: &PortPolicy) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Some(cp) = policy.controller_port {
        for n in config.nodes.iter().filter(|n| n.port == Some(cp)) {
            issues.push(issue(
                format!("nodes.{}.port", n.name),
                format!(
                    "node '{}' port {cp}/tcp conflicts with controller port",
                    n.name
                ),
            ));
        }
    }
    if policy.broker_start.is_none() && is_zeek_cluster(config) {
        let lacking: BTreeSet<&str> = config
            .nodes
            .iter()
            .filter(|n| needs_broker_port(&n.role) && n.port.is_none())
            .map(|n| n.name.as_str())
            .collect();
        if !lacking.is_empty() {
            let names: Vec<&str> = lacking.into_iter().collect();
            issues.push(Issue {
                file: None,
                line: None,
                key: None,
                message: format!(
                    "Broker port auto-assignment disabled but nodes {} lack ports",
                    names.join(", ")
                ),
            });
        }
    }
    issues
}

/// Indexes of the nodes `wanted` picks, in Zeek's assignment order.
fn candidates(config: &Configuration, wanted: impl Fn(&Node) -> bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..config.nodes.len())
        .filter(|&i| rank(&config.nodes[i].role).is_some() && wanted(&config.nodes[i]))
        .collect();
    idx.sort_by(|&a, &b| {
        let (a, b) = (&config.nodes[a], &config.nodes[b]);
        (&a.instance, rank(&a.role), &a.name).cmp(&(&b.instance, rank(&b.role), &b.name))
    });
    idx
}

/// The next port from `next` that `used` lacks, marked used; `None` when none is left.
fn take(next: &mut u32, used: &mut BTreeSet<u16>) -> Option<u16> {
    loop {
        let port = u16::try_from(*next).ok()?;
        *next += 1;
        if port != 0 && used.insert(port) {
            return Some(port);
        }
    }
}

/// Fills in the ports Zeek's controller would assign to a Zeek cluster; a node left
/// without one because the port range ran out is an issue.
pub fn assign(config: &mut Configuration, policy: &PortPolicy) -> Vec<Issue> {
    let mut issues = Vec::new();
    if !is_zeek_cluster(config) {
        return issues;
    }
    if let Some(start) = policy.broker_start {
        let mut used: BTreeSet<u16> = config
            .instances
            .iter()
            .filter_map(|i| i.port)
            .chain(config.nodes.iter().filter_map(|n| n.port))
            .chain(config.nodes.iter().filter_map(|n| n.metrics_port))
            .chain(policy.controller_port)
            .collect();
        let mut next = u32::from(start);
        for i in candidates(config, |n| needs_broker_port(&n.role) && n.port.is_none()) {
            let node = &mut config.nodes[i];
            match take(&mut next, &mut used) {
                Some(p) => node.port = Some(p),
                None => issues.push(exhausted(node, "port", start)),
            }
        }
    }
    if let Some(start) = policy.metrics_start {
        // Unknown and unspecified addresses share one pool, as Zeek's 0.0.0.0 does.
        let host_of: BTreeMap<&str, Option<IpAddr>> = config
            .instances
            .iter()
            .map(|i| (i.name.as_str(), i.host.filter(|h| !h.is_unspecified())))
            .collect();
        let host = |instance: &str| host_of.get(instance).copied().flatten();
        let mut pools: BTreeMap<Option<IpAddr>, (u32, BTreeSet<u16>)> = BTreeMap::new();
        for inst in &config.instances {
            let pool = pools
                .entry(host(&inst.name))
                .or_insert_with(|| (u32::from(start), BTreeSet::new()));
            pool.1.extend(inst.port);
        }
        for n in &config.nodes {
            let pool = pools
                .entry(host(&n.instance))
                .or_insert_with(|| (u32::from(start), BTreeSet::new()));
            pool.1.extend(n.port);
            pool.1.extend(n.metrics_port);
        }
        for i in candidates(config, |n| n.metrics_port.is_none()) {
            let h = host(&config.nodes[i].instance);
            let (next, used) = pools.get_mut(&h).expect("a pool for every node's address");
            let node = &mut config.nodes[i];
            match take(next, used) {
                Some(p) => node.metrics_port = Some(p),
                None => issues.push(exhausted(node, "metrics_port", start)),
            }
        }
    }
    issues
}

fn exhausted(node: &Node, key: &str, start: u16) -> Issue {
    issue(
        format!("nodes.{}.{key}", node.name),
        format!(
            "no free {} left from {start}/tcp for node '{}'",
            key.replace('_', " "),
            node.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Instance;

    fn node(name: &str, instance: &str, role: ClusterRole, port: Option<u16>) -> Node {
        let mut n = Node::new(name, instance);
        n.role = role;
        n.port = port;
        n
    }

    fn inst(name: &str, host: Option<&str>, port: Option<u16>) -> Instance {
        Instance {
            name: name.to_owned(),
            host: host.map(|h| h.parse().unwrap()),
            port,
        }
    }

    fn config(instances: Vec<Instance>, nodes: Vec<Node>) -> Configuration {
        let mut c = Configuration::empty();
        c.instances = instances;
        c.nodes = nodes;
        c
    }

    fn ports(c: &Configuration) -> Vec<(String, Option<u16>, Option<u16>)> {
        let mut v: Vec<_> = c
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.port, n.metrics_port))
            .collect();
        v.sort();
        v
    }

    /// The nodes of Zeek's `stage-config-auto-assign-multi-instance` test.
    fn multi_instance() -> Configuration {
        use ClusterRole::{Logger, Manager, Proxy, Worker};
        config(
            vec![
                inst("instance-1", None, None),
                inst("instance-2", None, None),
            ],
            vec![
                node("manager", "instance-1", Manager, None),
                node("logger-01", "instance-1", Logger, None),
                node("proxy-01", "instance-1", Proxy, None),
                node("proxy-02", "instance-1", Proxy, None),
                node("worker-01", "instance-1", Worker, None),
                node("logger-02", "instance-2", Logger, None),
                node("proxy-03", "instance-2", Proxy, None),
                node("proxy-04", "instance-2", Proxy, None),
                node("worker-02", "instance-2", Worker, None),
            ],
        )
    }

    #[test]
    fn broker_ports_are_global_and_in_zeeks_order() {
        let mut c = multi_instance();
        let policy = PortPolicy {
            metrics_start: None,
            ..PortPolicy::default()
        };
        assert!(assign(&mut c, &policy).is_empty());
        let got: BTreeMap<String, Option<u16>> =
            c.nodes.iter().map(|n| (n.name.clone(), n.port)).collect();
        let want: BTreeMap<String, Option<u16>> = [
            ("manager", Some(2200)),
            ("logger-01", Some(2201)),
            ("proxy-01", Some(2202)),
            ("proxy-02", Some(2203)),
            ("logger-02", Some(2204)),
            ("proxy-03", Some(2205)),
            ("proxy-04", Some(2206)),
            ("worker-01", None),
            ("worker-02", None),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_owned(), p))
        .collect();
        assert_eq!(got, want);
        assert!(c.nodes.iter().all(|n| n.metrics_port.is_none()));
    }

    #[test]
    fn used_ports_are_skipped_and_explicit_ones_kept() {
        use ClusterRole::{Logger, Manager, Proxy, Worker};
        let mut c = config(
            vec![inst("a", Some("10.0.0.1"), Some(2201))],
            vec![
                node("manager", "a", Manager, Some(1234)),
                node("logger", "a", Logger, None),
                node("proxy", "a", Proxy, None),
                node("worker", "a", Worker, Some(2203)),
            ],
        );
        let policy = PortPolicy {
            controller_port: Some(2200),
            ..PortPolicy::default()
        };
        assert!(assign(&mut c, &policy).is_empty());
        assert_eq!(
            ports(&c),
            vec![
                ("logger".into(), Some(2202), Some(9001)),
                ("manager".into(), Some(1234), Some(9000)),
                ("proxy".into(), Some(2204), Some(9002)),
                ("worker".into(), Some(2203), Some(9003)),
            ]
        );
    }

    #[test]
    fn metrics_ports_are_numbered_per_host() {
        use ClusterRole::{Logger, Manager, Worker};
        let mut c = config(
            vec![
                inst("inst1", Some("10.0.0.1"), None),
                inst("inst2", Some("10.0.0.2"), None),
                inst("inst3", Some("10.0.0.1"), Some(9001)),
            ],
            vec![
                node("manager", "inst1", Manager, Some(5000)),
                node("logger", "inst1", Logger, Some(5001)),
                node("worker", "inst2", Worker, None),
                node("worker-3", "inst3", Worker, None),
            ],
        );
        assert!(assign(&mut c, &PortPolicy::default()).is_empty());
        assert_eq!(
            ports(&c),
            vec![
                ("logger".into(), Some(5001), Some(9002)),
                ("manager".into(), Some(5000), Some(9000)),
                ("worker".into(), None, Some(9000)),
                ("worker-3".into(), None, Some(9003)),
            ]
        );
    }

    /// docs/zeek.md's worked example on two hosts.
    #[test]
    fn the_docs_example_on_two_hosts() {
        use ClusterRole::{Logger, Manager, Proxy, Worker};
        let mut c = config(
            vec![
                inst("agent-1", Some("10.0.0.1"), None),
                inst("agent-2", Some("10.0.0.2"), None),
            ],
            vec![
                node("manager", "agent-1", Manager, None),
                node("logger", "agent-1", Logger, None),
                node("proxy-01", "agent-1", Proxy, None),
                node("proxy-02", "agent-2", Proxy, None),
                node("worker-01", "agent-1", Worker, None),
                node("worker-02", "agent-1", Worker, None),
                node("worker-03", "agent-2", Worker, None),
                node("worker-04", "agent-2", Worker, None),
            ],
        );
        assert!(assign(&mut c, &PortPolicy::default()).is_empty());
        assert_eq!(
            ports(&c),
            vec![
                ("logger".into(), Some(2201), Some(9001)),
                ("manager".into(), Some(2200), Some(9000)),
                ("proxy-01".into(), Some(2202), Some(9002)),
                ("proxy-02".into(), Some(2203), Some(9000)),
                ("worker-01".into(), None, Some(9003)),
                ("worker-02".into(), None, Some(9004)),
                ("worker-03".into(), None, Some(9001)),
                ("worker-04".into(), None, Some(9002)),
            ]
        );
    }

    #[test]
    fn configurations_without_a_manager_are_left_alone() {
        let mut c = config(
            vec![inst("a", None, None)],
            vec![
                node("w", "a", ClusterRole::Worker, None),
                node("web", "a", ClusterRole::Other("web".into()), None),
            ],
        );
        let before = c.clone();
        assert!(assign(&mut c, &PortPolicy::default()).is_empty());
        assert_eq!(c, before);
        let off = PortPolicy {
            broker_start: None,
            ..PortPolicy::default()
        };
        assert!(check(&c, &off).is_empty());
    }

    #[test]
    fn assignment_never_reuses_a_port_and_reports_exhaustion() {
        let mut c = multi_instance();
        let policy = PortPolicy {
            broker_start: Some(65533),
            metrics_start: Some(65534),
            controller_port: Some(65534),
        };
        let issues = assign(&mut c, &policy);
        let assigned: Vec<u16> = c.nodes.iter().filter_map(|n| n.port).collect();
        assert_eq!(assigned.len(), 2, "65533 and 65535 only");
        assert!(!assigned.contains(&65534));
        let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
        assert!(
            messages.contains(&"no free port left from 65533/tcp for node 'proxy-02'"),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("no free metrics port"))
        );
    }

    #[test]
    fn checks_use_zeeks_wording() {
        use ClusterRole::{Logger, Manager, Proxy, Worker};
        let c = config(
            vec![inst("instance-1", None, None)],
            vec![
                node("manager", "instance-1", Manager, None),
                node("proxy-01", "instance-1", Proxy, None),
                node("logger-01", "instance-1", Logger, None),
                node("worker", "instance-1", Worker, Some(2150)),
                node("logger-02", "instance-1", Logger, Some(5000)),
            ],
        );
        let policy = PortPolicy {
            broker_start: None,
            metrics_start: None,
            controller_port: Some(2150),
        };
        let messages: Vec<String> = check(&c, &policy).into_iter().map(|i| i.message).collect();
        assert_eq!(
            messages,
            vec![
                "node 'worker' port 2150/tcp conflicts with controller port".to_owned(),
                "Broker port auto-assignment disabled but nodes logger-01, manager, proxy-01 \
                 lack ports"
                    .to_owned(),
            ]
        );
        assert_eq!(
            check(&c, &PortPolicy::default()),
            vec![],
            "no controller port given, assignment on"
        );
    }

    /// Given metrics ports, in the range where Broker or metrics ports are assigned.
    fn prop_oneof_ports() -> impl proptest::strategy::Strategy<Value = u16> {
        proptest::prop_oneof![2199u16..2206, 8999u16..9004]
    }

    fn role(i: u8) -> ClusterRole {
        match i % 5 {
            0 => ClusterRole::Manager,
            1 => ClusterRole::Logger,
            2 => ClusterRole::Proxy,
            3 => ClusterRole::Worker,
            _ => ClusterRole::Other("web".into()),
        }
    }

    proptest::proptest! {
        /// Whatever the configuration: given ports stay, every manager, logger and
        /// proxy ends with a port and no worker gets one, no assigned port repeats a
        /// port in use (Broker ports across the cluster, metrics ports on their host),
        /// and assigning again changes nothing.
        #[test]
        fn assignment_keeps_given_ports_and_never_collides(
            hosts in proptest::collection::vec(proptest::option::of(0u8..3), 1..4),
            agent_ports in proptest::collection::vec(proptest::option::of(2199u16..2204), 1..4),
            nodes in proptest::collection::vec(
                (0u8..5, 0usize..4, proptest::option::of(2199u16..2206),
                 proptest::option::of(prop_oneof_ports())),
                1..12,
            ),
            controller in proptest::option::of(2199u16..2203),
        ) {
            let instances: Vec<Instance> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| Instance {
                    name: format!("i{i}"),
                    host: h.map(|h| IpAddr::from([10, 0, 0, h])),
                    port: agent_ports.get(i).copied().flatten(),
                })
                .collect();
            let mut c = config(
                instances,
                nodes
                    .iter()
                    .enumerate()
                    .map(|(k, (r, inst, p, m))| {
                        let mut n = node(
                            &format!("n{k}"),
                            &format!("i{}", inst % hosts.len()),
                            role(*r),
                            *p,
                        );
                        n.metrics_port = *m;
                        n
                    })
                    .collect(),
            );
            let before = c.clone();
            let policy = PortPolicy { controller_port: controller, ..PortPolicy::default() };
            let issues = assign(&mut c, &policy);
            proptest::prop_assert!(issues.is_empty(), "{issues:?}");
            if !is_zeek_cluster(&before) {
                proptest::prop_assert_eq!(&c, &before);
                return Ok(());
            }
            let host = |inst: &str| {
                c.instances.iter().find(|i| i.name == inst).and_then(|i| i.host)
            };
            for (old, new) in before.nodes.iter().zip(&c.nodes) {
                if old.port.is_some() {
                    proptest::prop_assert_eq!(old.port, new.port);
                } else if needs_broker_port(&new.role) {
                    // Nothing else in the cluster uses it.
                    let p = new.port.expect("a port");
                    let uses = c.nodes.iter().filter(|n| n.port == Some(p)).count()
                        + before.nodes.iter().filter(|n| n.metrics_port == Some(p)).count()
                        + c.instances.iter().filter(|i| i.port == Some(p)).count()
                        + usize::from(controller == Some(p));
                    proptest::prop_assert_eq!(uses, 1, "broker port {} of {}", p, &new.name);
                } else {
                    proptest::prop_assert_eq!(new.port, None);
                }
                if old.metrics_port.is_some() {
                    proptest::prop_assert_eq!(old.metrics_port, new.metrics_port);
                } else if rank(&new.role).is_some() {
                    // Nothing else on its host uses it.
                    let p = new.metrics_port.expect("a metrics port");
                    let h = host(&new.instance);
                    let uses: usize = c
                        .nodes
                        .iter()
                        .filter(|n| host(&n.instance) == h)
                        .map(|n| usize::from(n.port == Some(p)) + usize::from(n.metrics_port == Some(p)))
                        .sum::<usize>()
                        + c.instances.iter().filter(|i| i.host == h && i.port == Some(p)).count();
                    proptest::prop_assert_eq!(uses, 1, "metrics port {} of {}", p, &new.name);
                } else {
                    proptest::prop_assert_eq!(new.metrics_port, None);
                }
            }
            let mut again = c.clone();
            proptest::prop_assert!(assign(&mut again, &policy).is_empty());
            proptest::prop_assert_eq!(again, c);
        }
    }
}
