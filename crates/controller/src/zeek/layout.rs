//! What Zeek's Supervisor gives every cluster node, for nodes that drover starts.
//!
//! Under Zeek's Management framework, the agent hands each node's `Supervisor::NodeConfig`
//! the whole cluster as `$cluster` (a `Supervisor::ClusterEndpoint` per node: role, host,
//! port, metrics port), and the Supervisor starts the node with `CLUSTER_NODE=<name>`
//! and fills its `Cluster::nodes` from that table
//! (`base/frameworks/cluster/supervisor.zeek`: `$manager` on every node but the manager,
//! `Cluster::manager_is_logger = F` when there is a logger).
//!
//! drover's nodes are plain processes, so the controller puts the same facts where a
//! `zeek` started without a Supervisor looks for them: `CLUSTER_NODE` in the node's
//! environment, and a `cluster-layout.zeek` in its working directory, which the cluster
//! framework loads (`@load cluster-layout`, found through `ZEEKPATH`, whose default
//! starts with `.`). The file goes to the agent in the node's `files`; the agent writes
//! it before every start.
//!
//! A configuration is a Zeek cluster when one of its nodes has the role `manager`; then
//! every node with a Zeek role (manager, logger, proxy, worker) gets both, and the layout
//! lists exactly those nodes. Other configurations are left as they are. The layout holds
//! only what the Supervisor's does, so changing a node's env, interface or command
//! restarts that node alone, while adding or removing a Zeek node, or changing a role,
//! host or port, changes every node's layout and so restarts all of them (Zeek restarts
//! every node of a new configuration anyway). A worker's interface is not in the layout
//! (Zeek's `Cluster::Node` has no such field any more): the role template passes it, as
//! `-i {interface}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use drover_proto::model::{ClusterRole, Configuration, Node};

/// The file Zeek's cluster framework loads when `Cluster::nodes` is not filled by a
/// Supervisor.
pub(crate) const LAYOUT_FILE: &str = "cluster-layout.zeek";

/// The environment variable naming the node to Zeek.
pub(crate) const NODE_ENV: &str = "CLUSTER_NODE";

/// Zeek's `Cluster::NodeType` for a Zeek role, `None` for any other role.
fn node_type(role: &ClusterRole) -> Option<&'static str> {
    match role {
        ClusterRole::Manager => Some("Cluster::MANAGER"),
        ClusterRole::Logger => Some("Cluster::LOGGER"),
        ClusterRole::Proxy => Some("Cluster::PROXY"),
        ClusterRole::Worker => Some("Cluster::WORKER"),
        ClusterRole::None | ClusterRole::Other(_) => None,
    }
}

/// A Zeek string literal.
fn string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c) & 0xff);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Zeek address literal (IPv6 in brackets).
fn addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The Zeek nodes of `config`, by name, when it is a Zeek cluster (it has a manager).
fn zeek_nodes(config: &Configuration) -> Option<BTreeMap<&str, &Node>> {
    let nodes: BTreeMap<&str, &Node> = config
        .nodes
        .iter()
        .filter(|n| node_type(&n.role).is_some())
        .map(|n| (n.name.as_str(), n))
        .collect();
    nodes
        .values()
        .any(|n| n.role == ClusterRole::Manager)
        .then_some(nodes)
}

/// The text of `cluster-layout.zeek` for `config`, or `None` when it is not a Zeek
/// cluster. A node's host is its instance's; an instance whose address is unknown
/// (the controller fills it in from the agent's connection at deploy time) is
/// `0.0.0.0`, as in Zeek.
pub(crate) fn layout(config: &Configuration) -> Option<String> {
    let nodes = zeek_nodes(config)?;
    let hosts: BTreeMap<&str, IpAddr> = config
        .instances
        .iter()
        .filter_map(|i| Some((i.name.as_str(), i.host?)))
        .collect();
    let manager = nodes
        .values()
        .find(|n| n.role == ClusterRole::Manager)
        .map(|n| n.name.as_str());
    let mut out = String::from(
        "# The layout of this Zeek cluster, written by drover into the working directory of\n\
         # each of its nodes before every start, as Zeek's Supervisor would give it. Do not edit.\n",
    );
    if nodes.values().any(|n| n.role == ClusterRole::Logger) {
        out.push_str("redef Cluster::manager_is_logger = F;\n");
    }
    out.push_str("\nredef Cluster::nodes = {\n");
    for (name, n) in &nodes {
        let host = hosts
            .get(n.instance.as_str())
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut fields = vec![
            format!(
                "$node_type={}",
                node_type(&n.role).unwrap_or("Cluster::NONE")
            ),
            format!("$ip={}", addr(host)),
        ];
        if let Some(p) = n.port {
            fields.push(format!("$p={p}/tcp"));
        }
        if let Some(m) = manager.filter(|_| n.role != ClusterRole::Manager) {
            fields.push(format!("$manager={}", string(m)));
        }
        if let Some(p) = n.metrics_port {
            fields.push(format!("$metrics_port={p}/tcp"));
        }
        let _ = writeln!(out, "\t[{}] = [{}],", string(name), fields.join(", "));
    }
    out.push_str("};\n");
    Some(out)
}

/// The share of `config` for the agent of `instance` ([`Configuration::share_for`]),
/// with every Zeek node of a Zeek cluster given `CLUSTER_NODE` and the layout.
pub(crate) fn share_for(config: &Configuration, instance: &str) -> Configuration {
    let mut share = config.share_for(instance);
    if let Some(text) = layout(config) {
        add_layout(&mut share, &text);
    }
    share
}

/// [`share_for`] for many instances at once: one pass over the nodes, and the layout
/// computed once, so a deploy to N agents stays linear in the cluster's size.
pub(crate) fn shares<'a>(
    config: &Configuration,
    instances: impl Iterator<Item = &'a str>,
) -> BTreeMap<String, Configuration> {
    let mut shares = config.shares(instances);
    if let Some(text) = layout(config) {
        for share in shares.values_mut() {
            add_layout(share, &text);
        }
    }
    shares
}

/// Gives every Zeek node of `share` `CLUSTER_NODE` and the layout file.
fn add_layout(share: &mut Configuration, text: &str) {
    for n in &mut share.nodes {
        if node_type(&n.role).is_some() {
            n.env.insert(NODE_ENV.to_owned(), n.name.clone());
            n.files.insert(LAYOUT_FILE.to_owned(), text.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use drover_proto::model::Instance;

    use super::*;

    fn node(name: &str, instance: &str, role: &str, port: Option<u16>) -> Node {
        let mut n = Node::new(name, instance);
        n.role = ClusterRole::parse(role);
        n.port = port;
        n
    }

    fn cluster() -> Configuration {
        let mut c = Configuration::empty();
        c.instances = vec![
            Instance {
                name: "a".into(),
                host: Some("10.0.0.1".parse().unwrap()),
                port: None,
            },
            Instance {
                name: "b".into(),
                host: Some("2001:db8::2".parse().unwrap()),
                port: None,
            },
            Instance {
                name: "c".into(),
                host: None,
                port: None,
            },
        ];
        let mut w2 = node("worker-2", "b", "worker", None);
        w2.metrics_port = Some(9100);
        w2.interface = Some("eth1".into());
        c.nodes = vec![
            node("logger", "a", "logger", Some(5001)),
            node("manager", "a", "manager", Some(5000)),
            node("proxy", "c", "proxy", Some(5002)),
            node("web", "a", "web", Some(80)),
            node("worker-1", "a", "worker", None),
            w2,
        ];
        c
    }

    #[test]
    fn the_layout_lists_every_zeek_node_as_the_supervisor_would() {
        assert_eq!(
            layout(&cluster()).unwrap(),
            "# The layout of this Zeek cluster, written by drover into the working directory of\n\
             # each of its nodes before every start, as Zeek's Supervisor would give it. Do not edit.\n\
             redef Cluster::manager_is_logger = F;\n\
             \n\
             redef Cluster::nodes = {\n\
             \t[\"logger\"] = [$node_type=Cluster::LOGGER, $ip=10.0.0.1, $p=5001/tcp, $manager=\"manager\"],\n\
             \t[\"manager\"] = [$node_type=Cluster::MANAGER, $ip=10.0.0.1, $p=5000/tcp],\n\
             \t[\"proxy\"] = [$node_type=Cluster::PROXY, $ip=0.0.0.0, $p=5002/tcp, $manager=\"manager\"],\n\
             \t[\"worker-1\"] = [$node_type=Cluster::WORKER, $ip=10.0.0.1, $manager=\"manager\"],\n\
             \t[\"worker-2\"] = [$node_type=Cluster::WORKER, $ip=[2001:db8::2], $manager=\"manager\", $metrics_port=9100/tcp],\n\
             };\n"
        );
    }

    #[test]
    fn without_a_logger_the_manager_logs() {
        let mut c = cluster();
        c.nodes.retain(|n| n.role != ClusterRole::Logger);
        let text = layout(&c).unwrap();
        assert!(!text.contains("manager_is_logger"), "{text}");
    }

    #[test]
    fn shares_are_each_instances_share_for() {
        let mut plain = cluster();
        plain.nodes.retain(|n| n.role != ClusterRole::Manager);
        for c in [cluster(), plain] {
            let names: Vec<String> = c.instances.iter().map(|i| i.name.clone()).collect();
            let all = shares(&c, names.iter().map(String::as_str));
            assert_eq!(all.len(), names.len());
            for name in &names {
                assert_eq!(all[name], share_for(&c, name), "instance {name}");
            }
        }
    }

    #[test]
    fn only_zeek_nodes_of_a_zeek_cluster_get_the_layout() {
        let c = cluster();
        let share = share_for(&c, "a");
        let names: Vec<&str> = share.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["logger", "manager", "web", "worker-1"]);
        for n in &share.nodes {
            if n.name == "web" {
                assert!(n.env.is_empty() && n.files.is_empty());
            } else {
                assert_eq!(n.env[NODE_ENV], n.name);
                assert_eq!(n.files[LAYOUT_FILE], layout(&c).unwrap());
            }
        }
        // No manager: not a Zeek cluster (e.g. programs that merely call their role
        // "worker"), nothing is added.
        let mut plain = c.clone();
        plain.nodes.retain(|n| n.role != ClusterRole::Manager);
        assert!(layout(&plain).is_none());
        assert_eq!(share_for(&plain, "a"), plain.share_for("a"));
    }

    #[test]
    fn the_layout_depends_on_the_topology_only() {
        let c = cluster();
        let mut changed = c.clone();
        changed.id = "another id".into();
        for n in &mut changed.nodes {
            n.env.insert("X".into(), "1".into());
            n.interface = Some("eth9".into());
            n.command = vec!["/bin/zeek".into()];
        }
        assert_eq!(layout(&changed), layout(&c));
        changed.nodes[0].port = Some(6000);
        assert_ne!(layout(&changed), layout(&c));
    }

    #[test]
    fn names_are_zeek_string_literals() {
        assert_eq!(string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(string("x\ny"), r#""x\x0ay""#);
    }
}
