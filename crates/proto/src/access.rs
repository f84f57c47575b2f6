//! Client scopes: what a client certificate allows.
//!
//! A client certificate may carry a scope in a URI subject alternative name
//! `urn:drover:scope:<scope>` next to its identity. `viewer` may only look (get-*,
//! status, logs, monitor, the audit trail), `operator` may also act on running nodes
//! (restart, stop, start, signal), `admin` may do everything, staging and deploying
//! included. A client certificate without a scope is `admin`: certificates issued before
//! scopes existed keep the power they had.
//!
//! Which scope each request needs is decided here, once, for both fronts (the native
//! protocol and zeek-client), so that they cannot disagree. Every request that needs
//! more than `viewer` changes something and is written to the controller's audit trail
//! as an [`AuditRecord`], whether it was carried out, failed or refused.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::msg::{ClientRequest, PeerRole};

/// The URI prefix of the subject alternative name that carries a client's scope.
pub const SCOPE_URI_PREFIX: &str = "urn:drover:scope:";

/// What a client may do; each scope allows everything the ones below it allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Look: get-*, status, logs, monitor, audit.
    Viewer,
    /// Also act on running nodes: restart, stop, start, signal.
    Operator,
    /// Also stage and deploy configurations: everything.
    Admin,
}

impl Scope {
    /// Every scope, from least to most.
    pub const ALL: [Self; 3] = [Self::Viewer, Self::Operator, Self::Admin];

    /// The lower-case name, as in certificates and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// Parses a lower-case scope name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    /// The subject alternative name URI that carries this scope.
    pub fn uri(self) -> String {
        format!("{SCOPE_URI_PREFIX}{}", self.as_str())
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
            .ok_or_else(|| format!("unknown scope '{s}': expected viewer, operator or admin"))
    }
}

/// Whether a request changes something; such requests are written to the audit trail.
pub fn mutates(req: &ClientRequest) -> bool {
    required(req) > Scope::Viewer
}

/// The least scope a request needs.
pub fn required(req: &ClientRequest) -> Scope {
    match req {
        ClientRequest::GetInstances
        | ClientRequest::GetConfig { .. }
        | ClientRequest::GetNodes { .. }
        | ClientRequest::GetIdValue { .. }
        | ClientRequest::Logs { .. }
        | ClientRequest::Monitor { .. }
        | ClientRequest::GetAudit { .. }
        | ClientRequest::TestTimeout { .. } => Scope::Viewer,
        ClientRequest::Restart { .. }
        | ClientRequest::Stop { .. }
        | ClientRequest::Start { .. }
        | ClientRequest::Signal { .. } => Scope::Operator,
        ClientRequest::StageConfig { .. } | ClientRequest::Deploy { .. } => Scope::Admin,
    }
}

/// Checks a caller's scope against a request: `Err` is the refusal's message, naming
/// the request, the scope it needs and the caller's.
pub fn check(req: &ClientRequest, have: Scope) -> Result<(), String> {
    let need = required(req);
    if have >= need {
        Ok(())
    } else {
        Err(refusal(req.kind(), need, have))
    }
}

/// The message refusing request `what` (a [`ClientRequest::kind`]) that needs scope
/// `need` to a client with scope `have`.
pub fn refusal(what: &str, need: Scope, have: Scope) -> String {
    format!(
        "{} needs scope {need}; this client's certificate has scope {have}",
        what.replace('_', "-")
    )
}

/// How a request that changes something ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Carried out; every result a success.
    Ok,
    /// Carried out, with at least one failed result (the first is the record's message).
    Failed,
    /// Not carried out: the caller's scope does not allow it.
    Refused,
}

/// One entry of the audit trail: who asked for what, from where, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the controller answered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The same instant as RFC 3339 UTC, for people reading the file.
    #[serde(default)]
    pub time: String,
    /// The caller's role (always `client` today).
    pub role: PeerRole,
    /// The caller's name, from its certificate (`zeek-client` on a `ws://` front, which
    /// has no certificates).
    pub name: String,
    /// The serial of the caller's certificate, lower-case hex; empty without one.
    #[serde(default)]
    pub serial: String,
    /// The scope the caller acted with.
    pub scope: Scope,
    /// The caller's address.
    pub from: String,
    /// Which front the request came through: `native` or `zeek`.
    pub front: String,
    /// The request (`stage_config`, `deploy`, `restart`, `stop`, `start`, `signal`).
    pub what: String,
    /// Its arguments, briefly: nodes, signal, configuration id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub args: String,
    /// The nodes a restart, stop, start or signal acted on, as the agents answered
    /// (what `args` picked, wildcards and roles expanded), sorted; at most
    /// [`AUDIT_NODES_MAX`], then `...`. Empty for other requests and when none answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The desired deploy generation once the request was answered (for a deploy, the
    /// generation it created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed or was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The most node names an [`AuditRecord`] lists.
pub const AUDIT_NODES_MAX: usize = 1000;

impl AuditRecord {
    /// Whether `who` names this record's caller: its name, `role/name`, or its
    /// certificate serial (`serial:HEX` or the bare hex, in either case, with or
    /// without the colons `openssl x509 -text` writes between bytes).
    pub fn is_by(&self, who: &str) -> bool {
        let serial = who.strip_prefix("serial:").unwrap_or(who).replace(':', "");
        who == self.name
            || who == format!("{}/{}", self.role, self.name)
            || (!self.serial.is_empty()
                && serial.to_ascii_lowercase().trim_start_matches('0') == self.serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Configuration;

    fn every_request() -> Vec<ClientRequest> {
        vec![
            ClientRequest::GetInstances,
            ClientRequest::StageConfig {
                config: Box::new(Configuration::empty()),
            },
            ClientRequest::GetConfig { deployed: true },
            ClientRequest::Deploy {
                restart_all: false,
                expect_id: None,
                expect_stage: None,
                progress: true,
            },
            ClientRequest::GetNodes { fresh: false },
            ClientRequest::Restart {
                nodes: vec![],
                batch: None,
                progress: true,
            },
            ClientRequest::GetIdValue {
                id: "x".into(),
                nodes: vec![],
            },
            ClientRequest::Stop {
                nodes: vec![],
                progress: true,
            },
            ClientRequest::Start {
                nodes: vec![],
                progress: false,
            },
            ClientRequest::Signal {
                nodes: vec![],
                signal: "HUP".into(),
            },
            ClientRequest::Logs {
                node: "n".into(),
                lines: 10,
                follow: false,
                stream: None,
                resume: None,
            },
            ClientRequest::Monitor { logs: false },
            ClientRequest::GetAudit {
                since_ms: None,
                who: None,
                limit: None,
                batches: false,
            },
            ClientRequest::TestTimeout { with_state: false },
        ]
    }

    #[test]
    fn each_scope_allows_exactly_its_requests() {
        for req in every_request() {
            let kind = req.kind();
            let want = match kind {
                "stage_config" | "deploy" => Scope::Admin,
                "restart" | "stop" | "start" | "signal" => Scope::Operator,
                _ => Scope::Viewer,
            };
            assert_eq!(required(&req), want, "{kind}");
            assert_eq!(mutates(&req), want != Scope::Viewer, "{kind}");
            for have in Scope::ALL {
                let verdict = check(&req, have);
                assert_eq!(verdict.is_ok(), have >= want, "{kind} as {have}");
                if let Err(e) = verdict {
                    assert!(e.contains(&format!("needs scope {want}")), "{e}");
                    assert!(e.contains(&format!("has scope {have}")), "{e}");
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert!(scope.uri().starts_with(SCOPE_URI_PREFIX));
        }
        for bad in ["", "Admin", "root", "viewer "] {
            let err = bad.parse::<Scope>().unwrap_err();
            assert!(err.contains("expected viewer, operator or admin"), "{err}");
        }
    }
}
