//! Output in zeek-client's JSON shapes.
//!
//! zeek-client prints `json.dumps(obj, sort_keys=True, indent=2)` plus a newline; scripts
//! parse that. serde_json's pretty printer with a sorted map produces the same text once
//! non-ASCII characters are escaped as Python's `ensure_ascii` does (a command line or
//! environment value in a configuration may hold them).

use drover_proto::model::{MgmtResult, ResultData};
use drover_proto::msg::ClientResponse;
use serde_json::{Map, Value, json};

use crate::stdio;
use crate::visible::visible;

/// Prints a JSON value with sorted keys and 2-space indentation (one line when not
/// `pretty`), plus a newline.
pub fn print_json(v: &Value, pretty: bool) -> anyhow::Result<()> {
    stdio::outln(&json_text(v, pretty)?)
}

/// The text zeek-client prints for `v` (without the newline): 2-space indentation, or
/// `json.dumps`'s one-line spacing (`{"a": 1, "b": 2}`) when not `pretty`.
pub fn json_text(v: &Value, pretty: bool) -> anyhow::Result<String> {
    let text = if pretty {
        serde_json::to_string_pretty(v)?
    } else {
        zeek_compact(v)
    };
    Ok(ascii_escaped(&text))
}

/// `text` with every non-ASCII character written as `\uXXXX` (a surrogate pair beyond
/// the basic plane), as Python's JSON encoder writes them. Such characters occur only
/// inside JSON strings, where the escape means the same character.
fn ascii_escaped(text: &str) -> String {
    // Python escapes DEL too, which serde writes as it is.
    let plain = |c: char| c.is_ascii() && c != '\x7f';
    if text.chars().all(plain) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if plain(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn single(reply: &ClientResponse) -> Option<&MgmtResult> {
    match reply {
        ClientResponse::Result(r) => Some(r),
        ClientResponse::Results(rs) => rs.first(),
        ClientResponse::Event(_) | ClientResponse::Progress(_) | ClientResponse::Audit(_) => None,
    }
}

/// get-instances: an object keyed by instance name, each value the instance minus its
/// name (`host`, and `port` when the controller dials that agent). Returns the JSON and
/// whether the command succeeded.
pub fn get_instances(reply: &ClientResponse) -> (Value, bool) {
    let Some(result) = single(reply) else {
        return (json!({}), false);
    };
    let Some(ResultData::Instances(instances)) = result.data.as_ref().filter(|_| result.success)
    else {
        if let Some(e) = &result.error {
            stdio::errln(&format!("error: {e}"));
        }
        return (json!({}), false);
    };
    let mut obj = Map::new();
    for inst in instances {
        let mut v = Map::new();
        let unspecified = inst.host.is_none_or(|h| h.is_unspecified());
        if let Some(host) = inst.host
            && !(unspecified && inst.port.is_none())
        {
            v.insert("host".into(), json!(host.to_string()));
        }
        if let Some(port) = inst.port {
            v.insert("port".into(), json!(port));
        }
        obj.insert(inst.name.clone(), Value::Object(v));
    }
    (Value::Object(obj), true)
}

/// Compact JSON as Python's `json.dumps(indent=None)`: `", "` and `": "` separators.
fn zeek_compact(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(zeek_compact)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), zeek_compact(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// Every result in a reply.
pub fn results(reply: &ClientResponse) -> Vec<&MgmtResult> {
    match reply {
        ClientResponse::Result(r) => vec![r],
        ClientResponse::Results(rs) => rs.iter().collect(),
        ClientResponse::Event(_) | ClientResponse::Progress(_) | ClientResponse::Audit(_) => {
            Vec::new()
        }
    }
}

/// stage-config: `{"errors": [...], "results": {"id": ...}}`.
pub fn stage_config(reply: &ClientResponse) -> (Value, bool) {
    let mut errors = Vec::new();
    let mut res = Map::new();
    for r in results(reply) {
        if !r.success {
            errors.push(json!(r.error.as_deref().unwrap_or("no reason given")));
        }
        if let Some(ResultData::ConfigId(id)) = &r.data {
            res.insert("id".into(), json!(id));
        }
    }
    let ok = errors.is_empty();
    (json!({"errors": errors, "results": res}), ok)
}

/// What the controller refused in a configuration, a line each, for stderr: the JSON on
/// stdout carries the same errors, but a person reads stderr (as for errors found
/// before sending).
pub fn stage_refusals(reply: &ClientResponse) -> String {
    results(reply)
        .into_iter()
        .filter(|r| !r.success)
        .map(|r| {
            format!(
                "error: the controller refused the configuration: {}\n",
                visible(r.error.as_deref().unwrap_or("no reason given"))
            )
        })
        .collect()
}

/// deploy and deploy-config: `{"errors": [...], "results": {"id": ..., "nodes": {...}}}`.
pub fn deploy(reply: &ClientResponse) -> (Value, bool) {
    let mut errors = Vec::new();
    let mut res = Map::new();
    let mut nodes = Map::new();
    let mut ok = true;
    for r in results(reply) {
        ok &= r.success;
        if !r.success && r.node.is_none() {
            let why = r.error.as_deref().unwrap_or("no reason given");
            // An instance that failed as a whole (it did not answer, say) is named,
            // unless its agent's own words name it already.
            let text = match &r.instance {
                Some(i) if !why.contains(&format!("'{i}'")) => format!("{i}: {why}"),
                _ => why.to_owned(),
            };
            errors.push(json!(text));
            continue;
        }
        match (&r.instance, &r.node) {
            (None, _) => {
                if let Some(ResultData::ConfigId(id)) = &r.data {
                    res.insert("id".into(), json!(id));
                }
            }
            (Some(_), None) => {}
            (Some(instance), Some(node)) => {
                let mut v = Map::new();
                v.insert("instance".into(), json!(instance));
                v.insert("success".into(), json!(r.success));
                if let Some(ResultData::NodeOutputs(o)) = &r.data {
                    v.insert("stdout".into(), json!(o.stdout));
                    v.insert("stderr".into(), json!(o.stderr));
                }
                nodes.insert(node.clone(), Value::Object(v));
            }
        }
    }
    if !nodes.is_empty() {
        res.insert("nodes".into(), Value::Object(nodes));
    }
    (json!({"errors": errors, "results": res}), ok)
}

/// The configuration in a get-config reply, or `None` after printing why there is none.
pub fn configuration(reply: &ClientResponse) -> Option<&drover_proto::Configuration> {
    let r = single(reply)?;
    match &r.data {
        Some(ResultData::Configuration(c)) => Some(c),
        _ => {
            stdio::errln(&format!(
                "error: {}",
                r.error
                    .as_deref()
                    .unwrap_or("no configuration in the reply")
            ));
            None
        }
    }
}

/// get-config --as-json: the configuration with instances and nodes as lists, in
/// zeek-client's shape (Zeek's node fields only; `--as-toml` is the lossless form).
pub fn get_config(c: &drover_proto::Configuration) -> Value {
    let instances: Vec<Value> = c
        .instances
        .iter()
        .map(|i| {
            let mut v = Map::new();
            v.insert("name".into(), json!(i.name));
            if let Some(h) = i.host
                && !(h.is_unspecified() && i.port.is_none())
            {
                v.insert("host".into(), json!(h.to_string()));
            }
            if let Some(p) = i.port {
                v.insert("port".into(), json!(p));
            }
            Value::Object(v)
        })
        .collect();
    let nodes: Vec<Value> = c
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "instance": n.instance,
                "role": zeek_role(&n.role),
                "port": n.port,
                "metrics_port": n.metrics_port,
                "interface": n.interface,
                "cpu_affinity": n.cpu_affinity.as_ref().map(|a| match a {
                    drover_proto::model::CpuAffinity::One(c) => json!(c),
                    drover_proto::model::CpuAffinity::Many(v) => json!(v),
                }),
                "env": n.env,
                "scripts": if n.scripts.is_empty() { Value::Null } else { json!(n.scripts) },
                "options": Value::Null,
            })
        })
        .collect();
    json!({"id": c.id, "instances": instances, "nodes": nodes})
}

/// A cluster role as zeek-client prints it: upper-case, or null for none.
fn zeek_role(role: &drover_proto::ClusterRole) -> Value {
    if role.is_none() {
        Value::Null
    } else {
        json!(role.as_str().to_uppercase())
    }
}

/// get-nodes: `{"errors": [{"source", "error"}], "results": {instance: {node: {...}}}}`.
pub fn get_nodes(reply: &ClientResponse, full: bool) -> (Value, bool) {
    use drover_proto::MgmtRole;
    let mut errors = Vec::new();
    let mut res = Map::new();
    for r in results(reply) {
        if !r.success {
            errors.push(json!({"source": r.instance, "error": r.error.as_deref().unwrap_or("no reason given")}));
            // A lost agent's nodes still show, as UNKNOWN.
            if !matches!(r.data, Some(ResultData::NodeStatuses(_))) {
                continue;
            }
        }
        let Some(ResultData::NodeStatuses(statuses)) = &r.data else {
            errors.push(
                json!({"source": r.instance, "error": "result does not contain node status data"}),
            );
            continue;
        };
        let mut nodes = Map::new();
        for s in statuses {
            let mut v = Map::new();
            v.insert("state".into(), json!(s.state.as_str()));
            v.insert(
                "mgmt_role".into(),
                match s.mgmt_role {
                    MgmtRole::None => Value::Null,
                    MgmtRole::Agent => json!("AGENT"),
                    MgmtRole::Controller => json!("CONTROLLER"),
                    MgmtRole::Node => json!("NODE"),
                },
            );
            v.insert("cluster_role".into(), zeek_role(&s.cluster_role));
            if let Some(pid) = s.pid {
                v.insert("pid".into(), json!(pid));
            }
            if let Some(p) = s.port {
                v.insert("port".into(), json!(p));
            }
            if let Some(p) = s.metrics_port {
                v.insert("metrics_port".into(), json!(p));
            }
            // Not in zeek-client's shape: only there when a start failed.
            if let Some(e) = &s.last_error {
                v.insert("last_error".into(), json!(e));
            }
            // Likewise only there once the node failed a limit or a liveness check.
            if let Some(f) = &s.last_failure {
                v.insert("last_failure".into(), json!(f));
            }
            // And while a stop is under way: when its signal was sent (epoch ms).
            if let Some(since) = s.stopping_since_ms {
                v.insert("stopping_since_ms".into(), json!(since));
            }
            // And while a crashed node waits out its backoff: when it starts again.
            if let Some(at) = s.restart_at_ms {
                v.insert("restart_at_ms".into(), json!(at));
            }
            if s.oom_kills > 0 {
                v.insert("oom_kills".into(), json!(s.oom_kills));
            }
            if s.liveness_failures > 0 {
                v.insert("liveness_failures".into(), json!(s.liveness_failures));
            }
            // With `full`, the rest of what the agent reported, under the protocol's
            // names; zeek-client's keys keep their own form.
            if full && let Ok(Value::Object(all)) = serde_json::to_value(s) {
                for (k, value) in all {
                    if k != "node" && !v.contains_key(&k) {
                        v.insert(k, value);
                    }
                }
            }
            nodes.insert(s.node.clone(), Value::Object(v));
        }
        // An agent named as the controller is: both under that name, the agent's
        // entries first (its own AGENT entry over the controller's, which share it).
        let instance = r.instance.clone().unwrap_or_default();
        let controller =
            |m: &Map<String, Value>| m.values().all(|v| v["mgmt_role"] == json!("CONTROLLER"));
        match res.get_mut(&instance) {
            Some(Value::Object(had)) if controller(had) => {
                had.extend(nodes);
            }
            Some(Value::Object(had)) if controller(&nodes) => {
                for (k, v) in nodes {
                    had.entry(k).or_insert(v);
                }
            }
            _ => {
                res.insert(instance, Value::Object(nodes));
            }
        }
    }
    let ok = errors.is_empty();
    (json!({"errors": errors, "results": res}), ok)
}

/// restart, stop, start: `{"errors": [{"source", "error"}], "results": {node: bool}}`.
/// zeek-client's restart fails only on error entries; with `strict` (drover's own
/// commands) a node that reports failure fails the command too. A node whose agent is
/// not connected fails it either way: nothing was done to it.
pub fn node_results(reply: &ClientResponse, strict: bool) -> (Value, bool) {
    let mut errors = Vec::new();
    let mut res = Map::new();
    // A node whose agent is not connected was not acted on: whatever `strict` says,
    // the command did not do what it was asked.
    let mut untouched = false;
    for r in results(reply) {
        untouched |= r.node.is_some() && r.is_not_connected();
        if !r.success && r.instance.is_none() {
            errors.push(
                json!({"source": r.node, "error": r.error.as_deref().unwrap_or("no reason given")}),
            );
            continue;
        }
        match &r.node {
            Some(node) => {
                res.insert(node.clone(), json!(r.success));
            }
            None => errors.push(json!({"source": r.instance, "error": r.error.as_deref().unwrap_or("result lacking node")})),
        }
    }
    let ok =
        errors.is_empty() && !untouched && (!strict || res.values().all(|v| v == &json!(true)));
    (json!({"errors": errors, "results": res}), ok)
}

/// What [`node_failures`] tells, by the command's JSON shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// deploy, deploy-config: the JSON's errors are bare strings, so instances that
    /// failed as a whole are named too; the nodes' outputs are in the JSON.
    Deploy,
    /// start, restart: the failed nodes' last lines too.
    Start,
    /// stop, signal: the reasons alone.
    Plain,
}

/// Lines of each stream [`node_failures`] shows of a failed node's output.
const FAILURE_LINES: usize = 5;

/// Why each node of a reply failed, for a person: one line per failed node with its
/// instance and the agent's reason (how its process ended, or why it could not start),
/// one per refusal of the controller's own (an unknown node, a deploy refused before
/// anything changed), and, after a deploy, one per instance that failed as a whole (it
/// did not answer, say); after a start or restart, each failed node's last lines of stdout and stderr
/// when the reply carries them. Printed to stderr by drover's own commands; the JSON on stdout keeps
/// zeek-client's shape, which has no room for either.
pub fn node_failures(reply: &ClientResponse, told: Told) -> String {
    let mut out = String::new();
    for r in results(reply) {
        if r.success {
            continue;
        }
        let why = visible(r.error.as_deref().unwrap_or("no reason given"));
        // The controller's own refusal (an unknown node or signal, a deploy refused
        // before anything changed): in the JSON's errors too, but a person reads
        // stderr.
        let Some(instance) = &r.instance else {
            match r.node.as_deref().map(visible) {
                Some(node) if !why.contains(&format!("'{node}'")) => {
                    out.push_str(&format!("error: {node}: {why}\n"));
                }
                _ => out.push_str(&format!("error: {why}\n")),
            }
            continue;
        };
        let Some(node) = &r.node else {
            if told == Told::Deploy {
                out.push_str(&format!("error: {instance}: {why}\n"));
            }
            continue;
        };
        out.push_str(&format!("error: {node} on {instance}: {why}\n"));
        if told != Told::Start {
            continue;
        }
        let Some(ResultData::NodeOutputs(o)) = &r.data else {
            continue;
        };
        for (name, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(FAILURE_LINES)..];
            if tail.is_empty() {
                continue;
            }
            out.push_str(&format!("  its last {name}:\n"));
            for line in tail {
                out.push_str(&format!("    {}\n", visible(line)));
            }
        }
    }
    out
}

/// logs: prints each batch of lines to stdout or stderr, as the node wrote them (with
/// control characters written out where `escapes` says, see [`crate::visible`]), and
/// keeps in `stands` where each stream stands after them. Done with false if the
/// controller or agent reported an error. With `follow`, it also ends (done with true)
/// once stdout's reader goes away, e.g. `logs -f | head`, and any other end of the
/// stream is a break (see [`Ended`]).
pub async fn print_logs(
    replies: &mut drover_net::conn::ReplyStream,
    follow: bool,
    stands: &mut drover_proto::model::LogResume,
    escapes: crate::visible::Escapes,
) -> anyhow::Result<Ended> {
    use drover_proto::model::LogStream;
    let closed = stdio::stdout_closed();
    tokio::pin!(closed);
    loop {
        let reply = tokio::select! {
            reply = replies.next::<ClientResponse>() => reply,
            () = &mut closed, if follow => return Ok(Ended::Done(true)),
        };
        let reply = match reply {
            Ok(Some(reply)) => reply,
            Ok(None) if follow => return Ok(Ended::Broken(None)),
            Ok(None) => return Ok(Ended::Done(true)),
            Err(e) => return Ok(Ended::Broken(Some(e.into()))),
        };
        for r in results(&reply) {
            if !r.success {
                // Which agent failed to answer, as other node commands say it.
                let on = match (r.node.as_deref(), r.instance.as_deref()) {
                    (Some(n), Some(i)) => format!("{n} on {i}: "),
                    (Some(n), None) => format!("{n}: "),
                    (None, _) => String::new(),
                };
                stdio::errln(&format!(
                    "error: {on}{}",
                    r.error.as_deref().unwrap_or("no reason given")
                ));
                return Ok(Ended::Done(false));
            }
            if let Some(ResultData::Log(chunk)) = &r.data {
                let escape = match chunk.stream {
                    LogStream::Stdout => escapes.stdout,
                    LogStream::Stderr => escapes.stderr,
                };
                let text: String = chunk
                    .lines
                    .iter()
                    .map(|l| {
                        if escape {
                            format!("{}\n", visible(l))
                        } else {
                            format!("{l}\n")
                        }
                    })
                    .collect();
                match chunk.stream {
                    LogStream::Stdout => stdio::out(&text)?,
                    LogStream::Stderr => stdio::err(&text),
                }
                if let Some(end) = chunk.end {
                    match chunk.stream {
                        LogStream::Stdout => stands.stdout = Some(end),
                        LogStream::Stderr => stands.stderr = Some(end),
                    }
                }
            }
        }
        if follow && stdio::stdout_gone() {
            return Ok(Ended::Done(true));
        }
    }
}

/// How printing a stream of replies ended.
#[derive(Debug)]
pub enum Ended {
    /// The command is over: whether it succeeded.
    Done(bool),
    /// The stream broke off under a follow: it failed (the error), or the controller
    /// ended it without a word, which it does only as it stops.
    Broken(Option<anyhow::Error>),
}

/// get-id-value: `{"errors": [{"source", "error"}], "results": {node: <value>}}`.
pub fn get_id_value(reply: &ClientResponse) -> (Value, bool) {
    let mut errors = Vec::new();
    let mut res = Map::new();
    for r in results(reply) {
        if !r.success {
            errors.push(
                json!({"source": r.node, "error": r.error.as_deref().unwrap_or("no reason given")}),
            );
            continue;
        }
        let Some(node) = &r.node else {
            errors.push(json!({"source": null, "error": format!("result lacking node: {r:?}")}));
            continue;
        };
        match &r.data {
            Some(ResultData::Json(text)) => match serde_json::from_str::<Value>(text) {
                Ok(v) => {
                    res.insert(node.clone(), v);
                }
                Err(e) => {
                    errors.push(json!({"source": node, "error": format!("JSON decode error: {e}")}))
                }
            },
            other => errors.push(
                json!({"source": node, "error": format!("invalid result data type {other:?}")}),
            ),
        }
    }
    let ok = errors.is_empty();
    (json!({"errors": errors, "results": res}), ok)
}

/// monitor: one JSON object per line for each event, until interrupted or until
/// stdout's reader goes away (`monitor | head -5`); any other end is a break.
pub async fn print_events(replies: &mut drover_net::conn::ReplyStream) -> anyhow::Result<Ended> {
    let closed = stdio::stdout_closed();
    tokio::pin!(closed);
    loop {
        let reply = tokio::select! {
            reply = replies.next::<ClientResponse>() => reply,
            () = &mut closed => return Ok(Ended::Done(true)),
        };
        let reply = match reply {
            Ok(Some(reply)) => reply,
            Ok(None) => return Ok(Ended::Broken(None)),
            Err(e) => return Ok(Ended::Broken(Some(e.into()))),
        };
        if let ClientResponse::Event(record) = reply {
            stdio::outln(&crate::visible::json_line(&record)?)?;
            if stdio::stdout_gone() {
                return Ok(Ended::Done(true));
            }
        }
    }
}

/// audit: one JSON object per entry and line, oldest first, printed batch by batch as
/// the replies come (a controller that predates batches sends one); each within
/// `timeout` of the last.
pub async fn print_audit(
    replies: &mut drover_net::conn::ReplyStream,
    timeout: std::time::Duration,
) -> anyhow::Result<bool> {
    let mut any = false;
    loop {
        let Ok(reply) = tokio::time::timeout(timeout, replies.next::<ClientResponse>()).await
        else {
            anyhow::bail!(
                "the audit request timed out after {}",
                drover_net::humanize(timeout)
            );
        };
        let Some(reply) = reply? else { break };
        let records = match reply {
            ClientResponse::Audit(records) => records,
            ClientResponse::Result(r) if !r.success => {
                anyhow::bail!("{}", r.error.as_deref().unwrap_or("no reason given"))
            }
            _ => anyhow::bail!("the controller answered the audit request with something else"),
        };
        any = true;
        let mut text = String::new();
        for record in records {
            text.push_str(&crate::visible::json_line(&record)?);
            text.push('\n');
        }
        stdio::out(&text)?;
        if stdio::stdout_gone() {
            return Ok(true);
        }
    }
    anyhow::ensure!(
        any,
        "the controller ended the audit request without an answer"
    );
    Ok(true)
}

/// test-timeout: `{"error": ..., "success": ...}`.
pub fn test_timeout(reply: &ClientResponse) -> (Value, bool) {
    match single(reply) {
        Some(r) => (json!({"error": r.error, "success": r.success}), true),
        None => (json!({"error": null, "success": false}), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::model::Instance;

    /// An agent named as the controller is does not hide, nor is hidden by, the
    /// controller's entry, whichever comes first.
    #[test]
    fn an_agent_named_as_the_controller_keeps_its_nodes() {
        use drover_proto::MgmtRole;
        use drover_proto::model::{NodeStatus, State};
        let me = NodeStatus::new("controller", State::Running, MgmtRole::Controller);
        let agent = NodeStatus::new("controller", State::Running, MgmtRole::Agent);
        let web = NodeStatus::new("web", State::Running, MgmtRole::None);
        let mine =
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![me]))).on_instance("controller");
        let its = MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![agent, web])))
            .on_instance("controller");
        for order in [vec![mine.clone(), its.clone()], vec![its, mine]] {
            let (v, ok) = get_nodes(&ClientResponse::Results(order), false);
            assert!(ok);
            let under = &v["results"]["controller"];
            assert_eq!(under["web"]["state"], "RUNNING", "{v}");
            assert_eq!(under["controller"]["mgmt_role"], "AGENT", "{v}");
        }
    }

    #[test]
    fn a_deploy_names_an_instance_that_failed_as_a_whole() {
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("r", None).on_instance("a1").on_node("x1"),
            MgmtResult::err(
                "r",
                "no answer from peer 127.0.0.1:9 within the idle timeout",
            )
            .on_instance("a2"),
            MgmtResult::err("r", "agent 'a3' cannot write its desired state").on_instance("a3"),
            MgmtResult::err("r", "instances not connected: a4"),
        ]);
        let (v, ok) = deploy(&reply);
        assert!(!ok);
        assert_eq!(
            v["errors"],
            json!([
                "a2: no answer from peer 127.0.0.1:9 within the idle timeout",
                "agent 'a3' cannot write its desired state",
                "instances not connected: a4"
            ])
        );
        assert_eq!(v["results"]["nodes"]["x1"]["success"], true);
    }

    #[test]
    fn a_restart_fails_a_node_it_could_not_act_on_and_not_one_that_failed_to_come_back() {
        let came_back = MgmtResult::ok("r", None).on_instance("a1").on_node("w1");
        let failed = MgmtResult::err("r", "node exited with code 3")
            .on_instance("a1")
            .on_node("w2");
        let away = MgmtResult::not_connected("r", "a2").on_node("w3");
        let reply = ClientResponse::Results(vec![came_back.clone(), failed.clone()]);
        let (v, ok) = node_results(&reply, false);
        assert!(ok, "acted on, as zeek-client's: {v}");
        assert_eq!(v["results"]["w2"], false);
        assert!(!node_results(&reply, true).1, "strict");
        let reply = ClientResponse::Results(vec![came_back, away]);
        let (v, ok) = node_results(&reply, false);
        assert!(!ok, "w3 was not acted on: {v}");
        assert_eq!(v["results"]["w3"], false, "the shape is zeek-client's");
    }

    #[test]
    fn instances_are_keyed_by_name_and_sorted() {
        let reply = ClientResponse::Result(MgmtResult::ok(
            "r",
            Some(ResultData::Instances(vec![
                Instance {
                    name: "b".into(),
                    host: Some("127.0.0.1".parse().unwrap()),
                    port: Some(2152),
                },
                Instance {
                    name: "a".into(),
                    host: Some("127.0.0.1".parse().unwrap()),
                    port: None,
                },
                Instance {
                    name: "c".into(),
                    host: Some("0.0.0.0".parse().unwrap()),
                    port: None,
                },
            ])),
        ));
        let (v, ok) = get_instances(&reply);
        assert!(ok);
        assert_eq!(
            serde_json::to_string_pretty(&v).unwrap(),
            "{\n  \"a\": {\n    \"host\": \"127.0.0.1\"\n  },\n  \"b\": {\n    \"host\": \"127.0.0.1\",\n    \"port\": 2152\n  },\n  \"c\": {}\n}"
        );
    }

    /// The texts Python's `json.dumps(v, sort_keys=True)` and `indent=2` give.
    #[test]
    fn json_text_is_pythons() {
        let v = json!({"a": ["é", "😀", "x\"y", "\u{7f}"], "b": 1, "c": {}});
        assert_eq!(
            json_text(&v, false).unwrap(),
            r#"{"a": ["\u00e9", "\ud83d\ude00", "x\"y", "\u007f"], "b": 1, "c": {}}"#
        );
        assert_eq!(
            json_text(&json!({"a": ["é"]}), true).unwrap(),
            "{\n  \"a\": [\n    \"\\u00e9\"\n  ]\n}"
        );
    }

    #[test]
    fn failure_is_reported() {
        let reply = ClientResponse::Result(MgmtResult::err("r", "boom"));
        let (v, ok) = get_instances(&reply);
        assert!(!ok);
        assert_eq!(v, json!({}));
    }

    #[test]
    fn failures_are_told_as_each_shape_lacks_them() {
        use drover_proto::model::NodeOutputs;
        let outputs = NodeOutputs {
            stdout: "a\nb\nc\nd\ne\nf".into(),
            stderr: String::new(),
        };
        let mut crashed = MgmtResult::err("r", "node exited with code 3")
            .on_instance("i1")
            .on_node("n1");
        crashed.data = Some(ResultData::NodeOutputs(outputs));
        let reply = ClientResponse::Results(vec![
            crashed,
            MgmtResult::ok("r", None).on_instance("i1").on_node("fine"),
            // Refused by the controller: in the JSON's errors, and told too.
            MgmtResult::err("r", "unknown cluster node").on_node("nope"),
            MgmtResult::err("r", "unknown signal 'FOO'"),
            // An instance that did not answer.
            MgmtResult::err("r", "request timed out").on_instance("i2"),
        ]);
        let refused = "error: nope: unknown cluster node\nerror: unknown signal 'FOO'\n";
        assert_eq!(
            node_failures(&reply, Told::Start),
            format!(
                "error: n1 on i1: node exited with code 3\n  its last stdout:\n    b\n    c\n    d\n    e\n    f\n{refused}"
            )
        );
        assert_eq!(
            node_failures(&reply, Told::Plain),
            format!("error: n1 on i1: node exited with code 3\n{refused}")
        );
        assert_eq!(
            node_failures(&reply, Told::Deploy),
            format!(
                "error: n1 on i1: node exited with code 3\n{refused}error: i2: request timed out\n"
            )
        );
        // A reason that names the node already is not prefixed with it.
        let named = ClientResponse::Results(vec![
            MgmtResult::err("r", "node 'aff' is pinned to CPU 7; nothing was deployed")
                .on_node("aff"),
        ]);
        assert_eq!(
            node_failures(&named, Told::Deploy),
            "error: node 'aff' is pinned to CPU 7; nothing was deployed\n"
        );
        let ok = ClientResponse::Results(vec![
            MgmtResult::ok("r", None).on_instance("i1").on_node("n"),
        ]);
        assert_eq!(node_failures(&ok, Told::Deploy), "");
    }
}
