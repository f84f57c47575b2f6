//! Output in zeek-client's JSON shapes.
//!
//! zeek-client prints `json.dumps(obj, sort_keys=True, indent=2)` plus a newline; scripts
//! parse that. serde_json's pretty printer with a sorted map produces the same text for
//! the ASCII data drover emits.

use std::io::Write;

use drover_proto::model::{MgmtResult, ResultData};
use drover_proto::msg::ClientResponse;
use serde_json::{Map, Value, json};

/// Prints a JSON value with 2-space indentation and sorted keys, plus a newline.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let text = serde_json::to_string_pretty(v)?;
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn single(reply: &ClientResponse) -> Option<&MgmtResult> {
    match reply {
        ClientResponse::Result(r) => Some(r),
        ClientResponse::Results(rs) => rs.first(),
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
            eprintln!("error: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::model::Instance;

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

    #[test]
    fn failure_is_reported() {
        let reply = ClientResponse::Result(MgmtResult::err("r", "boom"));
        let (v, ok) = get_instances(&reply);
        assert!(!ok);
        assert_eq!(v, json!({}));
    }
}
