//! The controller API events (`Management::Controller::API::*`) that zeek-client sends,
//! and the response events it expects back.
//!
//! Each request is an event whose first argument is the client's request id; its
//! response has the same name with `_response` and echoes the id. Single-result
//! responses (get_instances, get_configuration, test_timeout) carry one `Result`, the
//! others a vector of them.

use drover_proto::model::MgmtResult;
use drover_proto::msg::ClientResponse;

use super::broker::{Data, Event};
use super::records::{self, ZeekConfig};

/// The topic requests and responses travel on.
pub(crate) const TOPIC: &str = "zeek/management/controller";

/// Prefix of every controller API event name.
const PREFIX: &str = "Management::Controller::API::";

/// A request zeek-client (or any client) sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ZeekRequest {
    /// `get_instances_request(reqid)`.
    GetInstances,
    /// `stage_configuration_request(reqid, config)`.
    StageConfiguration(ZeekConfig),
    /// `stage_configuration_request(reqid, config)` whose configuration drover cannot
    /// take (a `cpu_affinity` of -1, say): the request has an id and zeek-client waits
    /// for its answer, so it is refused in one, with what is wrong, not by silence.
    StageRefused(String),
    /// `get_configuration_request(reqid, deployed)`.
    GetConfiguration {
        /// True for the deployed configuration.
        deployed: bool,
    },
    /// `deploy_request(reqid)`.
    Deploy,
    /// `get_nodes_request(reqid)`.
    GetNodes,
    /// `get_id_value_request(reqid, id, nodes)`.
    GetIdValue {
        /// The identifier.
        id: String,
        /// Node names; empty = all.
        nodes: Vec<String>,
    },
    /// `restart_request(reqid, nodes)`.
    Restart {
        /// Node names; empty = all.
        nodes: Vec<String>,
    },
    /// `test_timeout_request(reqid, with_state)`.
    TestTimeout {
        /// When false, nothing is ever answered.
        with_state: bool,
    },
    /// `test_noop_request(reqid)`: zeek-client knows it; Zeek has no handler for it.
    TestNoop,
}

impl ZeekRequest {
    /// The request's short name, for logs and metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::GetInstances => "get_instances",
            Self::StageConfiguration(_) | Self::StageRefused(_) => "stage_configuration",
            Self::GetConfiguration { .. } => "get_configuration",
            Self::Deploy => "deploy",
            Self::GetNodes => "get_nodes",
            Self::GetIdValue { .. } => "get_id_value",
            Self::Restart { .. } => "restart",
            Self::TestTimeout { .. } => "test_timeout",
            Self::TestNoop => "test_noop",
        }
    }

    /// Whether the response carries one `Result` rather than a vector.
    fn single_result(&self) -> bool {
        matches!(
            self,
            Self::GetInstances | Self::GetConfiguration { .. } | Self::TestTimeout { .. }
        )
    }
}

/// What an incoming event is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// A request, with its id.
    Request(String, ZeekRequest),
    /// An event Zeek's controller knows but does nothing with when a client sends it
    /// (a response name, say).
    Ignored,
}

/// Why an event cannot be turned into a request. Both are Zeek's
/// `deserialization_failed` ("failed to create Zeek event").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// No such event.
    #[error("unknown event '{0}'")]
    UnknownEvent(String),
    /// Wrong number or types of arguments.
    #[error("failed to create Zeek event {name}: {reason}")]
    BadArguments {
        /// The event.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Response event names zeek-client registers: a client may send them (Zeek raises
/// them locally, to no effect).
const RESPONSES: &[&str] = &[
    "deploy_response",
    "get_configuration_response",
    "get_id_value_response",
    "get_instances_response",
    "get_nodes_response",
    "restart_response",
    "stage_configuration_response",
    "test_timeout_response",
];

/// Reads a request from an event.
pub(crate) fn decode(ev: &Event) -> Result<Incoming, RequestError> {
    let Some(short) = ev.name.strip_prefix(PREFIX) else {
        return Err(RequestError::UnknownEvent(ev.name.clone()));
    };
    if RESPONSES.contains(&short) {
        return Ok(Incoming::Ignored);
    }
    let bad = |reason: String| RequestError::BadArguments {
        name: ev.name.clone(),
        reason,
    };
    // Arity: (required, allowed); trailing `&default` arguments may be left out.
    let (required, allowed) = match short {
        "get_instances_request" | "deploy_request" | "get_nodes_request" | "test_noop_request" => {
            (1, 1)
        }
        "stage_configuration_request" | "get_configuration_request" | "test_timeout_request" => {
            (2, 2)
        }
        "get_id_value_request" => (2, 3),
        "restart_request" => (1, 2),
        _ => return Err(RequestError::UnknownEvent(ev.name.clone())),
    };
    let n = ev.args.len();
    if n < required || n > allowed {
        return Err(bad(if required == allowed {
            format!("expected {required} arguments, got {n}")
        } else {
            format!("expected {required} to {allowed} arguments, got {n}")
        }));
    }
    let Data::String(reqid) = &ev.args[0] else {
        return Err(bad(format!(
            "the request id is a {}, not a string",
            ev.args[0].type_name()
        )));
    };
    let boolean = |i: usize| match &ev.args[i] {
        Data::Boolean(b) => Ok(*b),
        other => Err(bad(format!(
            "argument {} is a {}, not a boolean",
            i + 1,
            other.type_name()
        ))),
    };
    let names = |i: usize| -> Result<Vec<String>, RequestError> {
        let Some(arg) = ev.args.get(i) else {
            return Ok(Vec::new());
        };
        let items = arg.elements().ok_or_else(|| {
            bad(format!(
                "argument {} is a {}, not a set",
                i + 1,
                arg.type_name()
            ))
        })?;
        let mut out = items
            .iter()
            .map(|d| match d {
                Data::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "argument {} holds a {}, not strings",
                    i + 1,
                    other.type_name()
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    };
    let req = match short {
        "get_instances_request" => ZeekRequest::GetInstances,
        "deploy_request" => ZeekRequest::Deploy,
        "get_nodes_request" => ZeekRequest::GetNodes,
        "test_noop_request" => ZeekRequest::TestNoop,
        "stage_configuration_request" => match records::parse_configuration(&ev.args[1]) {
            Ok(config) => ZeekRequest::StageConfiguration(config),
            // Not a record at all: Zeek cannot make the event either.
            Err(e) if !matches!(ev.args[1], Data::Vector(_)) => return Err(bad(e.to_string())),
            Err(e) => ZeekRequest::StageRefused(e.to_string()),
        },
        "get_configuration_request" => ZeekRequest::GetConfiguration {
            deployed: boolean(1)?,
        },
        "test_timeout_request" => ZeekRequest::TestTimeout {
            with_state: boolean(1)?,
        },
        "get_id_value_request" => {
            let Data::String(id) = &ev.args[1] else {
                return Err(bad(format!(
                    "argument 2 is a {}, not a string",
                    ev.args[1].type_name()
                )));
            };
            ZeekRequest::GetIdValue {
                id: id.clone(),
                nodes: names(2)?,
            }
        }
        "restart_request" => ZeekRequest::Restart { nodes: names(1)? },
        _ => return Err(RequestError::UnknownEvent(ev.name.clone())),
    };
    Ok(Incoming::Request(reqid.clone(), req))
}

/// The response event to `req`, from drover's answer. A single-result response takes
/// the first result (drover gives exactly one for those requests); a multi-result one
/// wraps a single result in a vector.
pub(crate) fn response(reqid: &str, req: &ZeekRequest, answer: ClientResponse) -> Event {
    let results: Vec<MgmtResult> = match answer {
        ClientResponse::Result(r) => vec![r],
        ClientResponse::Results(rs) => rs,
        ClientResponse::Event(_) | ClientResponse::Progress(_) | ClientResponse::Audit(_) => {
            Vec::new()
        }
    };
    let payload = if req.single_result() {
        let r = results
            .into_iter()
            .next()
            .unwrap_or_else(|| MgmtResult::err(reqid, "the controller produced no result"));
        records::result(&r)
    } else {
        Data::Vector(results.iter().map(records::result).collect())
    };
    let name = req.kind().trim_end_matches("_request");
    Event {
        name: format!("{PREFIX}{name}_response"),
        args: vec![Data::string(reqid), payload],
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use drover_proto::model::{
        ClusterRole, Instance, MgmtRole, NodeOutputs, NodeStatus, ResultData, State,
    };

    use super::*;
    use crate::zeek::broker::{data_message, parse_data_message};

    /// The network time in the reference's examples.
    fn example_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_003_541_123)
    }

    fn request(frame: &str) -> (String, ZeekRequest) {
        let (topic, data) = parse_data_message(frame).unwrap();
        assert_eq!(topic, TOPIC);
        match decode(&Event::from_data(&data).unwrap()).unwrap() {
            Incoming::Request(id, req) => (id, req),
            Incoming::Ignored => panic!("not a request"),
        }
    }

    fn encode(reqid: &str, req: &ZeekRequest, answer: ClientResponse, meta: bool) -> String {
        let ev = response(reqid, req, answer);
        data_message(TOPIC, &ev.to_data(meta.then(example_time)))
    }

    const REQID: &str = "9befc56c-f7e8-11ec-8626-7c10c94416bb";

    #[test]
    fn literal_client_requests_decode() {
        assert_eq!(
            request(include_str!("testdata/get_instances_request.json")),
            (REQID.to_owned(), ZeekRequest::GetInstances)
        );
        assert_eq!(
            request(include_str!("testdata/deploy_request.json")),
            ("reqid-2".to_owned(), ZeekRequest::Deploy)
        );
        assert_eq!(
            request(include_str!("testdata/restart_request.json")),
            (
                "reqid-4".to_owned(),
                ZeekRequest::Restart {
                    nodes: vec!["manager".into(), "worker-01".into()]
                }
            )
        );
    }

    #[test]
    fn literal_get_instances_response_encodes() {
        let instances = vec![
            Instance {
                name: "agent-testbox".into(),
                host: Some("127.0.0.1".parse().unwrap()),
                port: None,
            },
            Instance {
                name: "instance-2".into(),
                host: Some("127.0.0.1".parse().unwrap()),
                port: Some(2152),
            },
        ];
        let answer = ClientResponse::Result(MgmtResult::ok(
            REQID,
            Some(ResultData::Instances(instances)),
        ));
        assert_eq!(
            encode(REQID, &ZeekRequest::GetInstances, answer, true),
            include_str!("testdata/get_instances_response.json").trim_end()
        );
    }

    #[test]
    fn literal_deploy_response_encodes() {
        let mut failed = MgmtResult::err("Kx3cUTdHk2b", "x")
            .on_instance("agent-testbox")
            .on_node("worker-02");
        failed.error = None;
        failed.data = Some(ResultData::NodeOutputs(NodeOutputs {
            stdout: String::new(),
            stderr: "fatal error: problem with interface foo".into(),
        }));
        let results = vec![
            MgmtResult::ok("Kx3cUTdHk2b", None)
                .on_instance("agent-testbox")
                .on_node("manager"),
            failed,
            MgmtResult::err("Kx3cUTdHk2b", "request timed out").on_instance("agent-testbox"),
            MgmtResult::ok(
                REQID,
                Some(ResultData::ConfigId(
                    "eed87b02-f851-11ec-80e7-7c10c94416bb".into(),
                )),
            ),
        ];
        assert_eq!(
            encode(
                REQID,
                &ZeekRequest::Deploy,
                ClientResponse::Results(results),
                true
            ),
            include_str!("testdata/deploy_response.json").trim_end()
        );
    }

    #[test]
    fn literal_get_nodes_response_encodes() {
        let mut manager = NodeStatus::new("manager", State::Running, MgmtRole::None);
        manager.cluster_role = ClusterRole::Manager;
        manager.pid = Some(54073);
        manager.port = Some(2200);
        manager.metrics_port = Some(9000);
        let mut agent = NodeStatus::new("agent-testbox", State::Running, MgmtRole::Agent);
        agent.pid = Some(52076);
        let results = vec![
            MgmtResult::ok(
                "Q9mLeXgWuGc",
                Some(ResultData::NodeStatuses(vec![manager, agent])),
            )
            .on_instance("agent-testbox"),
        ];
        assert_eq!(
            encode(
                REQID,
                &ZeekRequest::GetNodes,
                ClientResponse::Results(results),
                true
            ),
            include_str!("testdata/get_nodes_response.json").trim_end()
        );
    }

    #[test]
    fn literal_stage_configuration_response_encodes() {
        let ok = MgmtResult::ok(
            REQID,
            Some(ResultData::ConfigId(
                "eed87b02-f851-11ec-80e7-7c10c94416bb".into(),
            )),
        );
        let config = records::parse_configuration(&Data::Vector(vec![Data::string("c")])).unwrap();
        assert_eq!(
            encode(
                REQID,
                &ZeekRequest::StageConfiguration(config),
                ClientResponse::Results(vec![ok]),
                false
            ),
            include_str!("testdata/stage_configuration_response.json").trim_end()
        );
    }

    #[test]
    fn other_requests_decode() {
        let ev = |name: &str, args: Vec<Data>| Event {
            name: format!("{PREFIX}{name}"),
            args,
        };
        let id = || Data::string("r");
        let cases = [
            // A record the controller cannot take is answered, not dropped.
            (
                ev(
                    "stage_configuration_request",
                    vec![id(), Data::Vector(vec![Data::Count(1)])],
                ),
                ZeekRequest::StageRefused("the configuration id is a count, not a string".into()),
            ),
            (
                ev("get_configuration_request", vec![id(), Data::Boolean(true)]),
                ZeekRequest::GetConfiguration { deployed: true },
            ),
            (
                ev(
                    "get_id_value_request",
                    vec![id(), Data::string("bits_per_uid"), Data::Set(vec![])],
                ),
                ZeekRequest::GetIdValue {
                    id: "bits_per_uid".into(),
                    nodes: vec![],
                },
            ),
            (
                ev("get_id_value_request", vec![id(), Data::string("x")]),
                ZeekRequest::GetIdValue {
                    id: "x".into(),
                    nodes: vec![],
                },
            ),
            (
                ev("test_timeout_request", vec![id(), Data::Boolean(false)]),
                ZeekRequest::TestTimeout { with_state: false },
            ),
            (
                ev("restart_request", vec![id()]),
                ZeekRequest::Restart { nodes: vec![] },
            ),
            (ev("get_nodes_request", vec![id()]), ZeekRequest::GetNodes),
            (ev("test_noop_request", vec![id()]), ZeekRequest::TestNoop),
        ];
        for (event, want) in cases {
            assert_eq!(
                decode(&event).unwrap(),
                Incoming::Request("r".into(), want),
                "{}",
                event.name
            );
        }
        assert_eq!(
            decode(&ev("get_nodes_response", vec![id(), Data::Vector(vec![])])).unwrap(),
            Incoming::Ignored
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        let ev = |name: &str, args: Vec<Data>| Event {
            name: name.to_owned(),
            args,
        };
        let p = |s: &str| format!("{PREFIX}{s}");
        assert_eq!(
            decode(&ev("Foo::bar", vec![])).unwrap_err(),
            RequestError::UnknownEvent("Foo::bar".into())
        );
        assert!(matches!(
            decode(&ev(&p("nope_request"), vec![])),
            Err(RequestError::UnknownEvent(_))
        ));
        for (name, args) in [
            (p("get_nodes_request"), vec![]),
            (p("get_nodes_request"), vec![Data::Count(1)]),
            (
                p("get_nodes_request"),
                vec![Data::string("r"), Data::string("extra")],
            ),
            (
                p("get_configuration_request"),
                vec![Data::string("r"), Data::string("yes")],
            ),
            (
                p("restart_request"),
                vec![Data::string("r"), Data::Set(vec![Data::Count(1)])],
            ),
            (
                p("restart_request"),
                vec![Data::string("r"), Data::string("all")],
            ),
            (
                p("stage_configuration_request"),
                vec![Data::string("r"), Data::Count(1)],
            ),
            (
                p("get_id_value_request"),
                vec![Data::string("r"), Data::Count(1)],
            ),
        ] {
            let e = decode(&ev(&name, args)).unwrap_err();
            assert!(
                matches!(e, RequestError::BadArguments { .. }),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn response_names_and_shapes() {
        let single = response(
            "r",
            &ZeekRequest::TestTimeout { with_state: true },
            ClientResponse::Result(MgmtResult::err("r", "request timed out")),
        );
        assert_eq!(
            single.name,
            "Management::Controller::API::test_timeout_response"
        );
        assert!(matches!(&single.args[1], Data::Vector(f) if f.len() == 6));
        let multi = response(
            "r",
            &ZeekRequest::Restart { nodes: vec![] },
            ClientResponse::Result(MgmtResult::err("r", "no instances connected")),
        );
        assert_eq!(multi.name, "Management::Controller::API::restart_response");
        assert!(
            matches!(&multi.args[1], Data::Vector(rs) if rs.len() == 1 && matches!(&rs[0], Data::Vector(f) if f.len() == 6))
        );
        let stage = response(
            "r",
            &ZeekRequest::StageConfiguration(
                records::parse_configuration(&Data::Vector(vec![Data::string("c")])).unwrap(),
            ),
            ClientResponse::Results(vec![]),
        );
        assert_eq!(
            stage.name,
            "Management::Controller::API::stage_configuration_response"
        );
    }
}
