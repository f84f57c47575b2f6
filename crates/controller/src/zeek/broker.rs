//! Broker's JSON data model, as spoken on Zeek's WebSocket API ("v1").
//!
//! Every value is an object `{"@data-type": T, "data": D}` ([`Data`]); messages are the
//! client's subscription array (the handshake), the server's `ack`, data messages
//! (`{"type":"data-message","topic":…}` with the value flattened into the envelope) and
//! error messages (`{"type":"error","code":…,"context":…}`). A Zeek event is a vector
//! `[count 1, count 1, [name, [args…], metadata?]]` ([`Event`]).
//!
//! Encoding is strict and compact, in Zeek's own field order; decoding is tolerant in
//! what Broker tolerates (key order, extra keys) and strict in types. Pure: no I/O.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use serde_json::Value;

/// A value of Broker's data model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Data {
    /// `none`: an unset optional field.
    None,
    /// `boolean`.
    Boolean(bool),
    /// `count`: unsigned.
    Count(u64),
    /// `integer`: signed.
    Integer(i64),
    /// `real`.
    Real(f64),
    /// `timespan`, as Broker writes it (`"10s"`).
    Timespan(String),
    /// `timestamp`, as Broker writes it (`"2025-11-24T16:59:01.123"`).
    Timestamp(String),
    /// `string`.
    String(String),
    /// `enum-value`, fully qualified (`"Supervisor::WORKER"`).
    Enum(String),
    /// `address`.
    Address(IpAddr),
    /// `subnet` (`"10.0.0.0/8"`).
    Subnet(String),
    /// `port`.
    Port(Port),
    /// `vector`; also every record, positionally.
    Vector(Vec<Data>),
    /// `set`.
    Set(Vec<Data>),
    /// `table`, as key/value pairs.
    Table(Vec<(Data, Data)>),
}

/// A transport-layer port. Number 0 is never encoded: "no port" is [`Data::None`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Port {
    /// 1–65535.
    pub(crate) number: u16,
    /// The protocol.
    pub(crate) proto: Proto,
}

/// A port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// `tcp`.
    Tcp,
    /// `udp`.
    Udp,
    /// `icmp`.
    Icmp,
    /// `?`.
    Unknown,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Unknown => "?",
        }
    }
}

/// Why a message or value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DecodeError(pub(crate) String);

impl DecodeError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl Data {
    /// A string value.
    pub(crate) fn string(s: impl Into<String>) -> Self {
        Self::String(s.into())
    }

    /// An optional string: `none` when absent.
    pub(crate) fn opt_string(s: Option<&str>) -> Self {
        s.map_or(Self::None, |s| Self::String(s.to_owned()))
    }

    /// A TCP port, `none` when absent or 0 (Zeek's `0/unknown` means "no port").
    pub(crate) fn tcp_port(p: Option<u16>) -> Self {
        match p {
            Some(number) if number != 0 => Self::Port(Port {
                number,
                proto: Proto::Tcp,
            }),
            _ => Self::None,
        }
    }

    /// The type name on the wire.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Boolean(_) => "boolean",
            Self::Count(_) => "count",
            Self::Integer(_) => "integer",
            Self::Real(_) => "real",
            Self::Timespan(_) => "timespan",
            Self::Timestamp(_) => "timestamp",
            Self::String(_) => "string",
            Self::Enum(_) => "enum-value",
            Self::Address(_) => "address",
            Self::Subnet(_) => "subnet",
            Self::Port(_) => "port",
            Self::Vector(_) => "vector",
            Self::Set(_) => "set",
            Self::Table(_) => "table",
        }
    }

    /// Compact JSON, Zeek's style (`{"@data-type":…,"data":…}`).
    #[cfg(test)]
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        out.push_str("{\"@data-type\":\"");
        out.push_str(self.type_name());
        out.push_str("\",\"data\":");
        self.write_payload(out);
        out.push('}');
    }

    /// Writes only the `data` part.
    fn write_payload(&self, out: &mut String) {
        match self {
            Self::None => out.push_str("{}"),
            Self::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
            Self::Count(n) => {
                let _ = write!(out, "{n}");
            }
            Self::Integer(n) => {
                let _ = write!(out, "{n}");
            }
            // JSON has no NaN or infinities; serde_json writes them as null.
            Self::Real(x) => out.push_str(&Value::from(*x).to_string()),
            Self::Timespan(s)
            | Self::Timestamp(s)
            | Self::String(s)
            | Self::Enum(s)
            | Self::Subnet(s) => write_str(out, s),
            Self::Address(a) => write_str(out, &a.to_string()),
            Self::Port(p) => write_str(out, &format!("{}/{}", p.number, p.proto.as_str())),
            Self::Vector(items) | Self::Set(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Self::Table(pairs) => {
                out.push('[');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str("{\"key\":");
                    k.write_json(out);
                    out.push_str(",\"value\":");
                    v.write_json(out);
                    out.push('}');
                }
                out.push(']');
            }
        }
    }

    /// Decodes a value from parsed JSON.
    pub(crate) fn from_json(v: &Value) -> Result<Self, DecodeError> {
        let obj = v
            .as_object()
            .ok_or_else(|| DecodeError::new("a value is not a JSON object"))?;
        let ty = obj
            .get("@data-type")
            .and_then(Value::as_str)
            .ok_or_else(|| DecodeError::new("a value has no string @data-type"))?;
        let data = obj.get("data");
        Self::from_parts(ty, data)
    }

    /// Decodes a value from its type name and payload.
    fn from_parts(ty: &str, data: Option<&Value>) -> Result<Self, DecodeError> {
        if ty == "none" {
            return Ok(Self::None);
        }
        let data = data.ok_or_else(|| DecodeError::new(format!("a {ty} value has no data")))?;
        let wrong = || DecodeError::new(format!("invalid data for a {ty} value: {data}"));
        let text = || data.as_str().map(str::to_owned).ok_or_else(wrong);
        Ok(match ty {
            "boolean" => Self::Boolean(data.as_bool().ok_or_else(wrong)?),
            "count" => Self::Count(data.as_u64().ok_or_else(wrong)?),
            "integer" => Self::Integer(data.as_i64().ok_or_else(wrong)?),
            "real" => Self::Real(data.as_f64().ok_or_else(wrong)?),
            "timespan" => Self::Timespan(text()?),
            "timestamp" => Self::Timestamp(text()?),
            "string" => Self::String(text()?),
            "enum-value" => Self::Enum(text()?),
            "subnet" => Self::Subnet(text()?),
            "address" => Self::Address(text()?.parse().map_err(|_| wrong())?),
            "port" => Self::Port(parse_port(&text()?).ok_or_else(wrong)?),
            "vector" | "set" => {
                let items = data
                    .as_array()
                    .ok_or_else(wrong)?
                    .iter()
                    .map(Self::from_json)
                    .collect::<Result<Vec<_>, _>>()?;
                if ty == "set" {
                    Self::Set(items)
                } else {
                    Self::Vector(items)
                }
            }
            "table" => Self::Table(
                data.as_array()
                    .ok_or_else(wrong)?
                    .iter()
                    .map(|entry| {
                        let key = entry.get("key").ok_or_else(wrong)?;
                        let value = entry.get("value").ok_or_else(wrong)?;
                        Ok((Self::from_json(key)?, Self::from_json(value)?))
                    })
                    .collect::<Result<Vec<_>, DecodeError>>()?,
            ),
            other => return Err(DecodeError::new(format!("unknown @data-type '{other}'"))),
        })
    }

    /// The elements of a vector or set.
    pub(crate) fn elements(&self) -> Option<&[Data]> {
        match self {
            Self::Vector(v) | Self::Set(v) => Some(v),
            _ => None,
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push_str(&Value::from(s).to_string());
}

fn parse_port(s: &str) -> Option<Port> {
    let (number, proto) = s.split_once('/')?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        "?" | "unknown" => Proto::Unknown,
        _ => return None,
    };
    Some(Port {
        number: number.parse().ok()?,
        proto,
    })
}

/// A Zeek event: a name and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    /// The fully qualified event name.
    pub(crate) name: String,
    /// The arguments, in order.
    pub(crate) args: Vec<Data>,
}

impl Event {
    /// Reads an event from Broker's layout `[count, count, [name, [args…], metadata?]]`.
    /// Like Zeek and zeek-client, the two leading counts are not checked.
    pub(crate) fn from_data(data: &Data) -> Result<Self, DecodeError> {
        let bad = || DecodeError::new("the data is not a Zeek event");
        let Data::Vector(outer) = data else {
            return Err(bad());
        };
        let Some(Data::Vector(inner)) = outer.get(2) else {
            return Err(bad());
        };
        match (inner.first(), inner.get(1)) {
            (Some(Data::String(name)), Some(Data::Vector(args))) => Ok(Self {
                name: name.clone(),
                args: args.clone(),
            }),
            _ => Err(bad()),
        }
    }

    /// The event as Broker data, with Zeek's network-time metadata when `network_time`
    /// is given (Zeek ≥ 6 sends `[[count 1, timestamp]]`).
    pub(crate) fn to_data(&self, network_time: Option<SystemTime>) -> Data {
        let mut inner = vec![Data::string(&self.name), Data::Vector(self.args.clone())];
        if let Some(t) = network_time {
            inner.push(Data::Vector(vec![Data::Vector(vec![
                Data::Count(1),
                Data::Timestamp(timestamp(t)),
            ])]));
        }
        Data::Vector(vec![Data::Count(1), Data::Count(1), Data::Vector(inner)])
    }
}

/// A time as Broker writes timestamps: `YYYY-MM-DDThh:mm:ss.sss`, UTC.
pub(crate) fn timestamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The server's handshake answer.
pub(crate) fn ack(endpoint: &str, version: &str) -> String {
    let mut out = String::from("{\"type\":\"ack\",\"endpoint\":");
    write_str(&mut out, endpoint);
    out.push_str(",\"version\":");
    write_str(&mut out, version);
    out.push('}');
    out
}

/// A Broker error message (`code` is a Broker error code such as
/// `deserialization_failed`).
pub(crate) fn error_message(code: &str, context: &str) -> String {
    let mut out = String::from("{\"type\":\"error\",\"code\":");
    write_str(&mut out, code);
    out.push_str(",\"context\":");
    write_str(&mut out, context);
    out.push('}');
    out
}

/// A data message carrying `data` on `topic`.
pub(crate) fn data_message(topic: &str, data: &Data) -> String {
    let mut out = String::from("{\"type\":\"data-message\",\"topic\":");
    write_str(&mut out, topic);
    out.push_str(",\"@data-type\":\"");
    out.push_str(data.type_name());
    out.push_str("\",\"data\":");
    data.write_payload(&mut out);
    out.push('}');
    out
}

/// Reads the client's handshake: a JSON array of topic prefixes (possibly empty).
pub(crate) fn parse_handshake(text: &str) -> Result<Vec<String>, DecodeError> {
    let v: Value =
        serde_json::from_str(text).map_err(|_| DecodeError::new("failed to decode JSON object"))?;
    let Value::Array(items) = v else {
        return Err(DecodeError::new(
            "the first message must be a JSON array of topics",
        ));
    };
    items
        .into_iter()
        .map(|t| match t {
            Value::String(s) => Ok(s),
            _ => Err(DecodeError::new("topics must be JSON strings")),
        })
        .collect()
}

/// What a client sent after the handshake, and why it could not be used. The error
/// contexts are Zeek's where Zeek has one.
pub(crate) fn parse_data_message(text: &str) -> Result<(String, Data), DecodeError> {
    let v: Value =
        serde_json::from_str(text).map_err(|_| DecodeError::new("failed to decode JSON object"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| DecodeError::new("failed to decode JSON object"))?;
    if let Some(ty) = obj.get("type")
        && ty.as_str() != Some("data-message")
    {
        return Err(DecodeError::new(format!(
            "unexpected message type {ty}: clients send only data messages"
        )));
    }
    let topic = obj
        .get("topic")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError::new("no topic in top-level JSON object"))?;
    let ty = obj
        .get("@data-type")
        .and_then(Value::as_str)
        .ok_or_else(|| DecodeError::new("no @data-type in top-level JSON object"))?;
    let data = Data::from_parts(ty, obj.get("data"))?;
    Ok((topic.to_owned(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(d: &Data) {
        let json = d.to_json();
        let back = Data::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(&back, d, "{json}");
    }

    #[test]
    fn every_data_type_round_trips() {
        let all = vec![
            Data::None,
            Data::Boolean(true),
            Data::Boolean(false),
            Data::Count(u64::MAX),
            Data::Integer(-42),
            Data::Real(1.5),
            Data::Timespan("10s".into()),
            Data::Timestamp("2025-11-24T16:59:01.123".into()),
            Data::string("a \"quoted\"\nline ü"),
            Data::Enum("Supervisor::WORKER".into()),
            Data::Address("127.0.0.1".parse().unwrap()),
            Data::Address("2001:db8::1".parse().unwrap()),
            Data::Subnet("10.0.0.0/8".into()),
            Data::tcp_port(Some(2150)),
            Data::Port(Port {
                number: 53,
                proto: Proto::Udp,
            }),
            Data::Port(Port {
                number: 8,
                proto: Proto::Icmp,
            }),
            Data::Port(Port {
                number: 1,
                proto: Proto::Unknown,
            }),
            Data::Vector(vec![]),
            Data::Set(vec![Data::string("a"), Data::string("b")]),
            Data::Table(vec![(Data::string("K"), Data::string("V"))]),
        ];
        for d in &all {
            round_trip(d);
        }
        round_trip(&Data::Vector(all));
    }

    #[test]
    fn encoding_is_zeeks_compact_style() {
        assert_eq!(Data::None.to_json(), r#"{"@data-type":"none","data":{}}"#);
        assert_eq!(
            Data::tcp_port(Some(2150)).to_json(),
            r#"{"@data-type":"port","data":"2150/tcp"}"#
        );
        assert_eq!(Data::tcp_port(Some(0)), Data::None);
        assert_eq!(Data::tcp_port(None), Data::None);
        assert_eq!(
            Data::Table(vec![(Data::string("A"), Data::string("b c"))]).to_json(),
            r#"{"@data-type":"table","data":[{"key":{"@data-type":"string","data":"A"},"value":{"@data-type":"string","data":"b c"}}]}"#
        );
        assert_eq!(
            ack("e-1", "v"),
            r#"{"type":"ack","endpoint":"e-1","version":"v"}"#
        );
        assert_eq!(
            error_message(
                "deserialization_failed",
                "no topic in top-level JSON object"
            ),
            r#"{"type":"error","code":"deserialization_failed","context":"no topic in top-level JSON object"}"#
        );
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        for bad in [
            r#"[]"#,
            r#"{"data":1}"#,
            r#"{"@data-type":"count","data":-1}"#,
            r#"{"@data-type":"count","data":1.5}"#,
            r#"{"@data-type":"integer","data":"1"}"#,
            r#"{"@data-type":"port","data":"80"}"#,
            r#"{"@data-type":"port","data":"99999/tcp"}"#,
            r#"{"@data-type":"port","data":"80/sctp"}"#,
            r#"{"@data-type":"address","data":"localhost"}"#,
            r#"{"@data-type":"vector","data":{}}"#,
            r#"{"@data-type":"vector","data":[1]}"#,
            r#"{"@data-type":"table","data":[{"key":{"@data-type":"none","data":{}}}]}"#,
            r#"{"@data-type":"mystery","data":1}"#,
            r#"{"@data-type":"string"}"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(Data::from_json(&v).is_err(), "{bad}");
        }
    }

    #[test]
    fn handshake_and_messages() {
        assert_eq!(
            parse_handshake(r#"["zeek/management/controller"]"#).unwrap(),
            vec!["zeek/management/controller"]
        );
        assert_eq!(parse_handshake("[]").unwrap(), Vec::<String>::new());
        assert!(parse_handshake(r#"{"topics":[]}"#).is_err());
        assert!(parse_handshake(r#"[1]"#).is_err());
        assert!(parse_handshake("nope").is_err());

        let e = parse_data_message("{").unwrap_err();
        assert_eq!(e.0, "failed to decode JSON object");
        let e = parse_data_message(r#"{"type":"data-message","@data-type":"none","data":{}}"#)
            .unwrap_err();
        assert_eq!(e.0, "no topic in top-level JSON object");
        assert!(
            parse_data_message(r#"{"type":"ack","endpoint":"x","version":"y"}"#).is_err(),
            "a client cannot send an ack"
        );
        let (topic, data) = parse_data_message(
            r#"{"@data-type": "count", "data": 3, "topic": "t", "type": "data-message"}"#,
        )
        .unwrap();
        assert_eq!((topic.as_str(), data), ("t", Data::Count(3)));
    }

    #[test]
    fn events_round_trip_with_and_without_metadata() {
        let ev = Event {
            name: "Management::Controller::API::get_nodes_request".into(),
            args: vec![Data::string("r1")],
        };
        assert_eq!(Event::from_data(&ev.to_data(None)).unwrap(), ev);
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_003_541_123);
        let with_meta = ev.to_data(Some(t));
        assert_eq!(Event::from_data(&with_meta).unwrap(), ev);
        assert!(with_meta.to_json().contains(
            r#"{"@data-type":"vector","data":[{"@data-type":"vector","data":[{"@data-type":"count","data":1},{"@data-type":"timestamp","data":"2025-11-24T16:59:01.123"}]}]}"#
        ));
        for not_event in [
            Data::Count(1),
            Data::Vector(vec![Data::Count(1), Data::Count(1)]),
            Data::Vector(vec![
                Data::Count(1),
                Data::Count(1),
                Data::Vector(vec![Data::Count(1), Data::Vector(vec![])]),
            ]),
            Data::Vector(vec![
                Data::Count(1),
                Data::Count(1),
                Data::Vector(vec![Data::string("x"), Data::string("y")]),
            ]),
        ] {
            assert!(Event::from_data(&not_event).is_err());
        }
    }
}
