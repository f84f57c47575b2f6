//! Zeek's Management records (`policy/frameworks/management/types.zeek`) in Broker's data
//! model, to and from drover's model.
//!
//! Records are positional vectors in declaration order, with `none` for unset optional
//! fields; enums are fully qualified (`Management::RUNNING`, `Supervisor::WORKER`); ports
//! are `N/tcp` and never 0. Layouts:
//!
//! | record | fields |
//! |---|---|
//! | Instance | name, host, listen_port |
//! | Node | name, instance, role, state, p, scripts, options, interface, cpu_affinity, env, metrics_port |
//! | Configuration | id, set of Instance, set of Node |
//! | NodeStatus | node, state, mgmt_role, cluster_role, pid, p, metrics_port |
//! | Result | reqid, success, instance, data, error, node |
//! | NodeOutputs | stdout, stderr |
//!
//! Decoding follows what Zeek accepts from a client: missing trailing optional fields and
//! extra trailing elements are fine, a value of the wrong type is an error.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use drover_proto::model::{
    ClusterRole, Configuration, CpuAffinity, Instance, MgmtResult, MgmtRole, Node, NodeOutputs,
    NodeStatus, ResultData, State,
};

use super::broker::{Data, DecodeError};

/// `Management::State` as an enum value.
pub(crate) fn state(s: State) -> Data {
    Data::Enum(format!("Management::{}", s.as_str()))
}

/// `Management::Role` as an enum value.
pub(crate) fn mgmt_role(r: MgmtRole) -> Data {
    let name = match r {
        MgmtRole::None => "NONE",
        MgmtRole::Agent => "AGENT",
        MgmtRole::Controller => "CONTROLLER",
        MgmtRole::Node => "NODE",
    };
    Data::Enum(format!("Management::{name}"))
}

/// `Supervisor::ClusterRole` as an enum value. drover's free-form roles have no Zeek
/// equivalent and show as `NONE`.
pub(crate) fn cluster_role(r: &ClusterRole) -> Data {
    let name = match r {
        ClusterRole::Logger => "LOGGER",
        ClusterRole::Manager => "MANAGER",
        ClusterRole::Proxy => "PROXY",
        ClusterRole::Worker => "WORKER",
        ClusterRole::None | ClusterRole::Other(_) => "NONE",
    };
    Data::Enum(format!("Supervisor::{name}"))
}

/// The unqualified name of an enum value of module `scope` (an unqualified name is
/// accepted too).
fn enum_name<'a>(d: &'a Data, scope: &str, what: &str) -> Result<&'a str, DecodeError> {
    let Data::Enum(full) = d else {
        return Err(DecodeError::new(format!(
            "{what} is a {}, not an enum value",
            d.type_name()
        )));
    };
    match full.rsplit_once("::") {
        Some((s, name)) if s == scope => Ok(name),
        Some(_) => Err(DecodeError::new(format!(
            "{what} '{full}' is not a {scope}:: enum value"
        ))),
        None => Ok(full),
    }
}

fn parse_cluster_role(d: &Data) -> Result<ClusterRole, DecodeError> {
    let name = enum_name(d, "Supervisor", "role")?;
    match name {
        "NONE" => Ok(ClusterRole::None),
        "LOGGER" => Ok(ClusterRole::Logger),
        "MANAGER" => Ok(ClusterRole::Manager),
        "PROXY" => Ok(ClusterRole::Proxy),
        "WORKER" => Ok(ClusterRole::Worker),
        other => Err(DecodeError::new(format!("unknown cluster role '{other}'"))),
    }
}

fn parse_state(d: &Data) -> Result<State, DecodeError> {
    let name = enum_name(d, "Management", "state")?;
    State::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| DecodeError::new(format!("unknown state '{name}'")))
}

#[cfg(test)]
fn parse_mgmt_role(d: &Data) -> Result<MgmtRole, DecodeError> {
    match enum_name(d, "Management", "management role")? {
        "NONE" => Ok(MgmtRole::None),
        "AGENT" => Ok(MgmtRole::Agent),
        "CONTROLLER" => Ok(MgmtRole::Controller),
        "NODE" => Ok(MgmtRole::Node),
        other => Err(DecodeError::new(format!(
            "unknown management role '{other}'"
        ))),
    }
}

/// The fields of a record, at least `min` of them.
fn fields<'a>(d: &'a Data, record: &str, min: usize) -> Result<&'a [Data], DecodeError> {
    match d {
        Data::Vector(f) if f.len() >= min => Ok(f),
        Data::Vector(f) => Err(DecodeError::new(format!(
            "a {record} record needs at least {min} fields, not {}",
            f.len()
        ))),
        other => Err(DecodeError::new(format!(
            "a {record} record is a vector, not a {}",
            other.type_name()
        ))),
    }
}

/// Field `i`, `None` when absent or `none`.
fn opt(f: &[Data], i: usize) -> Option<&Data> {
    f.get(i).filter(|d| **d != Data::None)
}

fn string(d: &Data, what: &str) -> Result<String, DecodeError> {
    match d {
        Data::String(s) => Ok(s.clone()),
        other => Err(DecodeError::new(format!(
            "{what} is a {}, not a string",
            other.type_name()
        ))),
    }
}

fn opt_string(f: &[Data], i: usize, what: &str) -> Result<Option<String>, DecodeError> {
    opt(f, i).map(|d| string(d, what)).transpose()
}

/// A port field: its number, `None` for none or 0.
fn opt_port(f: &[Data], i: usize, what: &str) -> Result<Option<u16>, DecodeError> {
    match opt(f, i) {
        None => Ok(None),
        Some(Data::Port(p)) => Ok((p.number != 0).then_some(p.number)),
        Some(other) => Err(DecodeError::new(format!(
            "{what} is a {}, not a port",
            other.type_name()
        ))),
    }
}

/// Strings of a vector or set.
fn strings(d: &Data, what: &str) -> Result<Vec<String>, DecodeError> {
    d.elements()
        .ok_or_else(|| {
            DecodeError::new(format!(
                "{what} is a {}, not a vector or set",
                d.type_name()
            ))
        })?
        .iter()
        .map(|s| string(s, what))
        .collect()
}

/// `Management::Instance`.
pub(crate) fn instance(i: &Instance) -> Data {
    Data::Vector(vec![
        Data::string(&i.name),
        Data::Address(i.host.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
        Data::tcp_port(i.port),
    ])
}

/// Reads a `Management::Instance`; an unspecified host (`0.0.0.0`) is no host.
pub(crate) fn parse_instance(d: &Data) -> Result<Instance, DecodeError> {
    let f = fields(d, "Instance", 2)?;
    let name = string(&f[0], "an instance name")?;
    let host = match opt(f, 1) {
        None => None,
        Some(Data::Address(a)) => Some(*a).filter(|a| !a.is_unspecified()),
        Some(other) => {
            return Err(DecodeError::new(format!(
                "the host of instance '{name}' is a {}, not an address",
                other.type_name()
            )));
        }
    };
    let port = opt_port(f, 2, "an instance's listen_port")?;
    Ok(Instance { name, host, port })
}

/// A `Management::Node` as a client sends it: Zeek's fields only (no command).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ZeekNode {
    pub(crate) name: String,
    pub(crate) instance: String,
    pub(crate) role: ClusterRole,
    pub(crate) port: Option<u16>,
    pub(crate) scripts: Vec<String>,
    pub(crate) interface: Option<String>,
    pub(crate) cpu_affinity: Option<u32>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) metrics_port: Option<u16>,
}

/// `Management::Node` from one of drover's nodes (`state` is always RUNNING, the state
/// a configuration asks for; `options` is never set). A node pinned to several CPUs
/// has no Zeek `cpu_affinity`.
pub(crate) fn node(n: &Node) -> Data {
    let cpu = match &n.cpu_affinity {
        Some(CpuAffinity::One(c)) => Data::Integer(i64::from(*c)),
        Some(CpuAffinity::Many(cs)) if cs.len() == 1 => Data::Integer(i64::from(cs[0])),
        _ => Data::None,
    };
    Data::Vector(vec![
        Data::string(&n.name),
        Data::string(&n.instance),
        cluster_role(&n.role),
        state(State::Running),
        Data::tcp_port(n.port),
        if n.scripts.is_empty() {
            Data::None
        } else {
            Data::Vector(n.scripts.iter().map(Data::string).collect())
        },
        Data::None,
        Data::opt_string(n.interface.as_deref()),
        cpu,
        Data::Table(
            n.env
                .iter()
                .map(|(k, v)| (Data::string(k), Data::string(v)))
                .collect(),
        ),
        Data::tcp_port(n.metrics_port),
    ])
}

/// Reads a `Management::Node`.
pub(crate) fn parse_node(d: &Data) -> Result<ZeekNode, DecodeError> {
    let f = fields(d, "Node", 3)?;
    let name = string(&f[0], "a node name")?;
    let ctx = |e: DecodeError| DecodeError::new(format!("node '{name}': {e}"));
    let instance = string(&f[1], "its instance").map_err(ctx)?;
    let role = parse_cluster_role(&f[2]).map_err(ctx)?;
    if let Some(s) = opt(f, 3) {
        parse_state(s).map_err(ctx)?;
    }
    let port = opt_port(f, 4, "its port").map_err(ctx)?;
    let scripts = opt(f, 5)
        .map(|d| strings(d, "its scripts"))
        .transpose()
        .map_err(ctx)?
        .unwrap_or_default();
    if let Some(o) = opt(f, 6)
        && o.elements().is_none()
    {
        return Err(ctx(DecodeError::new(format!(
            "its options are a {}, not a set",
            o.type_name()
        ))));
    }
    let interface = opt_string(f, 7, "its interface").map_err(ctx)?;
    let cpu_affinity = match opt(f, 8) {
        None => None,
        Some(Data::Integer(c)) => Some(u32::try_from(*c).map_err(|_| {
            ctx(DecodeError::new(format!(
                "its cpu_affinity {c} is not a CPU"
            )))
        })?),
        Some(Data::Count(c)) => Some(u32::try_from(*c).map_err(|_| {
            ctx(DecodeError::new(format!(
                "its cpu_affinity {c} is not a CPU"
            )))
        })?),
        Some(other) => {
            return Err(ctx(DecodeError::new(format!(
                "its cpu_affinity is a {}, not an integer",
                other.type_name()
            ))));
        }
    };
    let env = match opt(f, 9) {
        None => BTreeMap::new(),
        Some(Data::Table(pairs)) => pairs
            .iter()
            .map(|(k, v)| Ok((string(k, "an env name")?, string(v, "an env value")?)))
            .collect::<Result<_, DecodeError>>()
            .map_err(ctx)?,
        Some(other) => {
            return Err(ctx(DecodeError::new(format!(
                "its env is a {}, not a table",
                other.type_name()
            ))));
        }
    };
    let metrics_port = opt_port(f, 10, "its metrics_port").map_err(ctx)?;
    Ok(ZeekNode {
        name,
        instance,
        role,
        port,
        scripts,
        interface,
        cpu_affinity,
        env,
        metrics_port,
    })
}

/// A `Management::Configuration` as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ZeekConfig {
    pub(crate) id: String,
    pub(crate) instances: Vec<Instance>,
    pub(crate) nodes: Vec<ZeekNode>,
}

/// `Management::Configuration` from drover's; instances and nodes sorted by name.
pub(crate) fn configuration(c: &Configuration) -> Data {
    let mut instances: Vec<&Instance> = c.instances.iter().collect();
    instances.sort_by(|a, b| a.name.cmp(&b.name));
    let mut nodes: Vec<&Node> = c.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Data::Vector(vec![
        Data::string(&c.id),
        Data::Set(instances.into_iter().map(instance).collect()),
        Data::Set(nodes.into_iter().map(node).collect()),
    ])
}

/// Reads a `Management::Configuration` (sets or vectors of records; absent = empty).
pub(crate) fn parse_configuration(d: &Data) -> Result<ZeekConfig, DecodeError> {
    let f = fields(d, "Configuration", 1)?;
    let id = string(&f[0], "the configuration id")?;
    let list = |i: usize, what: &str| -> Result<&[Data], DecodeError> {
        match opt(f, i) {
            None => Ok(&[]),
            Some(d) => d.elements().ok_or_else(|| {
                DecodeError::new(format!("the {what} are a {}, not a set", d.type_name()))
            }),
        }
    };
    let instances = list(1, "instances")?
        .iter()
        .map(parse_instance)
        .collect::<Result<_, _>>()?;
    let nodes = list(2, "nodes")?
        .iter()
        .map(parse_node)
        .collect::<Result<_, _>>()?;
    Ok(ZeekConfig {
        id,
        instances,
        nodes,
    })
}

/// `Management::NodeStatus`.
pub(crate) fn node_status(s: &NodeStatus) -> Data {
    Data::Vector(vec![
        Data::string(&s.node),
        state(s.state),
        mgmt_role(s.mgmt_role),
        cluster_role(&s.cluster_role),
        s.pid.map_or(Data::None, |p| Data::Integer(i64::from(p))),
        Data::tcp_port(s.port),
        Data::tcp_port(s.metrics_port),
    ])
}

/// Reads a `Management::NodeStatus` (Zeek's fields only).
#[cfg(test)]
pub(crate) fn parse_node_status(d: &Data) -> Result<NodeStatus, DecodeError> {
    let f = fields(d, "NodeStatus", 4)?;
    let mut s = NodeStatus::new(
        string(&f[0], "a node name")?,
        parse_state(&f[1])?,
        parse_mgmt_role(&f[2])?,
    );
    s.cluster_role = parse_cluster_role(&f[3])?;
    s.pid = match opt(f, 4) {
        None => None,
        Some(Data::Integer(p)) => u32::try_from(*p).ok(),
        Some(Data::Count(p)) => u32::try_from(*p).ok(),
        Some(other) => {
            return Err(DecodeError::new(format!(
                "a pid is a {}, not an integer",
                other.type_name()
            )));
        }
    };
    s.port = opt_port(f, 5, "a node's port")?;
    s.metrics_port = opt_port(f, 6, "a node's metrics_port")?;
    Ok(s)
}

/// `Management::NodeOutputs`.
pub(crate) fn node_outputs(o: &NodeOutputs) -> Data {
    Data::Vector(vec![Data::string(&o.stdout), Data::string(&o.stderr)])
}

/// Reads a `Management::NodeOutputs`.
#[cfg(test)]
pub(crate) fn parse_node_outputs(d: &Data) -> Result<NodeOutputs, DecodeError> {
    let f = fields(d, "NodeOutputs", 2)?;
    Ok(NodeOutputs {
        stdout: string(&f[0], "stdout")?,
        stderr: string(&f[1], "stderr")?,
    })
}

/// A result's `data: any`: a string, a vector of records or a record.
pub(crate) fn result_data(d: &ResultData) -> Data {
    match d {
        ResultData::ConfigId(s) | ResultData::Json(s) => Data::string(s),
        ResultData::Instances(is) => Data::Vector(is.iter().map(instance).collect()),
        ResultData::Configuration(c) => configuration(c),
        ResultData::NodeStatuses(ss) => Data::Vector(ss.iter().map(node_status).collect()),
        ResultData::NodeOutputs(o) => node_outputs(o),
        ResultData::Log(chunk) => Data::Vector(chunk.lines.iter().map(Data::string).collect()),
    }
}

/// `Management::Result`: always six fields.
pub(crate) fn result(r: &MgmtResult) -> Data {
    Data::Vector(vec![
        Data::string(&r.reqid),
        Data::Boolean(r.success),
        Data::opt_string(r.instance.as_deref()),
        r.data.as_ref().map_or(Data::None, result_data),
        Data::opt_string(r.error.as_deref()),
        Data::opt_string(r.node.as_deref()),
    ])
}

/// A decoded `Management::Result`; its `data` stays Broker data, whose type only the
/// request tells.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ZeekResult {
    pub(crate) reqid: String,
    pub(crate) success: bool,
    pub(crate) instance: Option<String>,
    pub(crate) data: Option<Data>,
    pub(crate) error: Option<String>,
    pub(crate) node: Option<String>,
}

/// Reads a `Management::Result`.
#[cfg(test)]
pub(crate) fn parse_result(d: &Data) -> Result<ZeekResult, DecodeError> {
    let f = fields(d, "Result", 6)?;
    let Data::Boolean(success) = f[1] else {
        return Err(DecodeError::new("a result's success is not a boolean"));
    };
    Ok(ZeekResult {
        reqid: string(&f[0], "a reqid")?,
        success,
        instance: opt_string(f, 2, "an instance")?,
        data: opt(f, 3).cloned(),
        error: opt_string(f, 4, "an error")?,
        node: opt_string(f, 5, "a node")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Data {
        Data::from_json(&serde_json::from_str(json).unwrap()).unwrap()
    }

    fn sample_config() -> Configuration {
        let mut c = Configuration::empty();
        c.id = "eed87b02-f851-11ec-80e7-7c10c94416bb".into();
        c.instances = vec![
            Instance {
                name: "agent-a".into(),
                host: None,
                port: None,
            },
            Instance {
                name: "agent-b".into(),
                host: Some("10.0.0.2".parse().unwrap()),
                port: Some(2151),
            },
        ];
        let mut m = Node::new("manager", "agent-a");
        m.role = ClusterRole::Manager;
        m.port = Some(5000);
        let mut w = Node::new("worker-01", "agent-b");
        w.role = ClusterRole::Worker;
        w.interface = Some("eth0".into());
        w.cpu_affinity = Some(CpuAffinity::One(2));
        w.scripts = vec!["policy/misc/loaded-scripts".into()];
        w.env = BTreeMap::from([("BAZ".into(), "a b".into()), ("FOO".into(), "BAR".into())]);
        w.metrics_port = Some(9100);
        c.nodes = vec![w, m];
        c
    }

    #[test]
    fn instances_round_trip() {
        for i in &sample_config().instances {
            assert_eq!(&parse_instance(&instance(i)).unwrap(), i);
        }
        // Zeek's "unknown" host.
        let unknown = parse(
            r#"{"@data-type":"vector","data":[{"@data-type":"string","data":"a"},{"@data-type":"address","data":"0.0.0.0"},{"@data-type":"none","data":{}}]}"#,
        );
        assert_eq!(parse_instance(&unknown).unwrap().host, None);
    }

    #[test]
    fn nodes_round_trip_through_zeeks_fields() {
        for n in &sample_config().nodes {
            let z = parse_node(&node(n)).unwrap();
            assert_eq!(z.name, n.name);
            assert_eq!(z.instance, n.instance);
            assert_eq!(z.role, n.role);
            assert_eq!(z.port, n.port);
            assert_eq!(z.scripts, n.scripts);
            assert_eq!(z.interface, n.interface);
            assert_eq!(z.cpu_affinity.map(CpuAffinity::One), n.cpu_affinity.clone());
            assert_eq!(z.env, n.env);
            assert_eq!(z.metrics_port, n.metrics_port);
        }
    }

    #[test]
    fn configurations_round_trip() {
        let c = sample_config();
        let z = parse_configuration(&configuration(&c)).unwrap();
        assert_eq!(z.id, c.id);
        assert_eq!(z.instances, c.instances);
        let names: Vec<&str> = z.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["manager", "worker-01"], "sorted by name");
    }

    #[test]
    fn node_statuses_round_trip() {
        let mut s = NodeStatus::new("manager", State::Running, MgmtRole::None);
        s.cluster_role = ClusterRole::Manager;
        s.pid = Some(54073);
        s.port = Some(2200);
        s.metrics_port = Some(9000);
        assert_eq!(parse_node_status(&node_status(&s)).unwrap(), s);
        for st in State::ALL {
            let a = NodeStatus::new("agent", st, MgmtRole::Agent);
            assert_eq!(parse_node_status(&node_status(&a)).unwrap(), a);
        }
        // Free-form roles have no Zeek name.
        let mut other = NodeStatus::new("web", State::Running, MgmtRole::None);
        other.cluster_role = ClusterRole::Other("web".into());
        assert_eq!(
            parse_node_status(&node_status(&other))
                .unwrap()
                .cluster_role,
            ClusterRole::None
        );
    }

    #[test]
    fn results_and_outputs_round_trip() {
        let o = NodeOutputs {
            stdout: String::new(),
            stderr: "fatal error".into(),
        };
        assert_eq!(parse_node_outputs(&node_outputs(&o)).unwrap(), o);
        let r = MgmtResult::err("r1", "boom")
            .on_instance("agent-a")
            .on_node("worker");
        let z = parse_result(&result(&r)).unwrap();
        assert_eq!(
            z,
            ZeekResult {
                reqid: "r1".into(),
                success: false,
                instance: Some("agent-a".into()),
                data: None,
                error: Some("boom".into()),
                node: Some("worker".into()),
            }
        );
        let ok = MgmtResult::ok(
            "r2",
            Some(ResultData::Configuration(Box::new(sample_config()))),
        );
        let z = parse_result(&result(&ok)).unwrap();
        assert!(z.success);
        assert_eq!(
            parse_configuration(&z.data.unwrap()).unwrap().id,
            sample_config().id
        );
        let Data::Vector(f) = result(&MgmtResult::ok("r3", None)) else {
            panic!("a result is a vector");
        };
        assert_eq!(f.len(), 6, "a Result always has six fields");
    }

    /// The `stage_configuration_request` argument of the reference, captured from a
    /// real zeek-client run.
    #[test]
    fn the_captured_client_configuration_decodes() {
        let d = parse(include_str!("testdata/stage_config_arg.json"));
        let z = parse_configuration(&d).unwrap();
        assert_eq!(z.id, "7a932ad2-e828-11f1-bf83-02fc00000001");
        assert_eq!(
            z.instances,
            vec![Instance {
                name: "agent-a".into(),
                host: None,
                port: None
            }]
        );
        let w = z.nodes.iter().find(|n| n.name == "worker-01").unwrap();
        assert_eq!(
            w,
            &ZeekNode {
                name: "worker-01".into(),
                instance: "agent-a".into(),
                role: ClusterRole::Worker,
                port: None,
                scripts: vec!["policy/misc/loaded-scripts".into()],
                interface: Some("eth0".into()),
                cpu_affinity: Some(2),
                env: BTreeMap::from([("BAZ".into(), "a b".into()), ("FOO".into(), "BAR".into())]),
                metrics_port: Some(9100),
            }
        );
        let m = z.nodes.iter().find(|n| n.name == "manager").unwrap();
        assert_eq!(m.role, ClusterRole::Manager);
        assert_eq!(m.port, Some(5000));
        assert!(m.env.is_empty());
    }

    #[test]
    fn wrong_types_are_errors() {
        let bad_role = Data::Vector(vec![
            Data::string("n"),
            Data::string("i"),
            Data::Enum("Management::WORKER".into()),
        ]);
        assert!(parse_node(&bad_role).is_err());
        let bad_env = Data::Vector(vec![
            Data::string("n"),
            Data::string("i"),
            Data::Enum("Supervisor::WORKER".into()),
            Data::Enum("Management::RUNNING".into()),
            Data::None,
            Data::None,
            Data::None,
            Data::None,
            Data::Integer(-1),
        ]);
        let e = parse_node(&bad_env).unwrap_err();
        assert_eq!(e.0, "node 'n': its cpu_affinity -1 is not a CPU");
        assert!(parse_configuration(&Data::string("x")).is_err());
        assert!(parse_instance(&Data::Vector(vec![Data::Count(1)])).is_err());
        assert!(parse_result(&Data::Vector(vec![Data::None; 5])).is_err());
    }
}
