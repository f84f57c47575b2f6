//! Messages of the native protocol and the envelopes that carry them.
//!
//! Every request travels on its own bidirectional QUIC stream: one [`Request`] frame from
//! the side that opened the stream, then one [`Reply`] frame back (or a stream of frames
//! for subscriptions). A request id, chosen by the requester, is echoed by the reply.
//!
//! The first stream of every connection carries a [`Hello`] from the dialing side and a
//! [`Welcome`] back. A connection counts as established only once the Welcome arrived:
//! with TLS 1.3 a refused client certificate shows only on the first stream, never at
//! connect. What follows the Hello depends on the peer's role, which the certificate
//! proves: agents send [`AgentRequest`]s, clients send [`ClientRequest`]s, and the
//! controller sends [`ControllerRequest`]s to agents.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Configuration, LogChunk, LogStream, MgmtResult, NodeStatus, State};

/// The protocol version spoken by this build. Peers with another version are refused.
pub const API_VERSION: u32 = 1;

/// How a controller that does not lead its HA group starts its refusal of a Hello; the
/// leader's address follows, and dialers try it next.
pub const NOT_LEADER: &str = "not the leader; the leader is ";

/// How the controller refuses an agent while another live connection holds the same
/// agent identity: a second process with the agent's certificate. The refused agent
/// recognises it ([`is_already_connected`]) and stops its nodes until it is accepted,
/// so that they do not run twice.
pub fn already_connected(agent: &str, from: &str) -> String {
    format!("agent {agent}{ALREADY_CONNECTED}{from}")
}

/// Whether a refusal (or an error that quotes one) is [`already_connected`]'s.
pub fn is_already_connected(message: &str) -> bool {
    message.contains(ALREADY_CONNECTED)
}

const ALREADY_CONNECTED: &str = " is already connected from ";

/// Why the controller closes the connection of an agent that answered its probe
/// `StandingBy` when another connection claimed the agent's name.
pub const REPLACED_STANDING_BY: &str = "replaced: it stands by";

/// The leader's address in a refusal that starts with [`NOT_LEADER`].
pub fn leader_hint(message: &str) -> Option<&str> {
    message
        .strip_prefix(NOT_LEADER)
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains(char::is_whitespace))
}

/// The ALPN protocol id; its suffix is the major protocol version.
pub const ALPN: &[u8] = b"drover/1";

/// The largest frame accepted, in bytes. A larger one is an error for that stream only.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Log follows a controller keeps open to one agent at most: an agent serves at most
/// 256 streams of the controller, and its other requests need some of them. The agent
/// keeps room in its open-file limit for this many.
pub const FOLLOWS_PER_AGENT: usize = 192;

/// Who a peer is, as its certificate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// The controller.
    Controller,
    /// An agent (one per instance).
    Agent,
    /// An operator's client.
    Client,
}

impl PeerRole {
    /// The lower-case name, as used in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Controller => "controller",
            Self::Agent => "agent",
            Self::Client => "client",
        }
    }

    /// Parses a lower-case role name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "controller" => Some(Self::Controller),
            "agent" => Some(Self::Agent),
            "client" => Some(Self::Client),
            _ => None,
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<T> {
    /// Chosen by the requester, echoed in the reply.
    pub id: String,
    /// How long the requester will wait, so the responder can give up before it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The request itself.
    pub body: T,
}

/// A reply frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    /// The id of the request answered.
    pub id: String,
    /// The answer, or why there is none.
    pub result: Result<T, WireError>,
    /// What the requester should know about the answer: a controller of a
    /// high-availability group that cannot reach etcd says that its answer may be stale.
    /// Absent otherwise, and ignored by peers that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Why a request failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// Machine-readable class.
    pub code: ErrorCode,
    /// Human-readable, lower-case message.
    pub message: String,
}

impl WireError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Classes of [`WireError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded, or the request makes no sense.
    BadRequest,
    /// The peer's certificate does not allow this.
    Forbidden,
    /// The peers speak different API versions.
    VersionMismatch,
    /// The request did not finish in time.
    Timeout,
    /// Something needed is not connected or not available.
    Unavailable,
    /// A bug or an I/O failure on the responder's side.
    Internal,
}

/// The first request on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The dialer's [`API_VERSION`].
    pub api_version: u32,
    /// The role the dialer wants to act in; must match its certificate.
    pub role: PeerRole,
    /// The dialer's name; must match its certificate.
    pub name: String,
    /// Software and version, for logs.
    pub software: String,
    /// The term (see [`Welcome::term`]) of a leader whose connection the dialer just
    /// lost. A follower that still knows that term as the leader's, or knows no leader,
    /// holds its answer until it learns of another (or leads itself), rather than name
    /// a leader that is probably gone. Absent on a first connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_term: Option<i64>,
}

/// The answer to a [`Hello`]: the connection is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The accepting side's [`API_VERSION`].
    pub api_version: u32,
    /// The accepting side's name.
    pub name: String,
    /// Software and version, for logs.
    pub software: String,
    /// A reason to prefer another peer: a controller of a high-availability group that
    /// cannot reach etcd welcomes clients, but its answers may be stale and it refuses
    /// changes. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The leader's term in a high-availability group (the create revision of its
    /// leader key in etcd); absent with one controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<i64>,
}

/// Requests an operator's client sends to the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientRequest {
    /// The connected agents (Zeek's `get_instances_request`).
    GetInstances,
    /// Validate and store a configuration as the staged one.
    StageConfig {
        /// The configuration.
        config: Box<Configuration>,
    },
    /// The staged or the deployed configuration.
    GetConfig {
        /// True for the deployed one.
        deployed: bool,
    },
    /// Deploy the staged configuration.
    Deploy {
        /// Restart every node, not only those whose spec changed.
        #[serde(default)]
        restart_all: bool,
        /// Deploy only if the staged configuration still has this id (compare and
        /// swap); any staged configuration when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect_id: Option<String>,
        /// Deploy only if the staged configuration was staged by the request with this
        /// id (the `reqid` of its stage-config reply): ids are labels a file carries, so
        /// two files exported from one configuration share theirs, and only the stage
        /// tells what one client staged from what another staged meanwhile. A controller
        /// that does not know which request staged it (started since) checks the id only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect_stage: Option<String>,
        /// Answer with a stream: [`ClientResponse::Progress`] frames while nodes start,
        /// then the results. Such a deploy times out only once no node has settled for
        /// the request timeout, however long the whole takes.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    /// The status of every node on every connected agent: from the statuses agents
    /// report on every change, asking an agent directly when its reports cannot be
    /// trusted yet (just connected, or an operation since), or every agent when `fresh`.
    GetNodes {
        /// Ask every agent now (current resource figures), not the reported statuses.
        #[serde(default)]
        fresh: bool,
    },
    /// Restart nodes (all when the list is empty), each restart answered once the node is
    /// ready again (or has failed).
    Restart {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
        /// Restart this many nodes at a time, batch after batch, stopping at the first
        /// batch with a failure (a rolling restart); all at once when absent.
        #[serde(default)]
        batch: Option<usize>,
        /// Answer with a stream: [`ClientResponse::Progress`] frames at least every
        /// second while it waits, then the results. Such a request waits for its nodes'
        /// `stop_timeout` however long it is, instead of ending at the request timeout.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    /// Ask running nodes for a value (Zeek's get_id_value); all nodes when the list is
    /// empty. Nodes answer through the value-query protocol on `DROVER_QUERY_SOCKET`.
    GetIdValue {
        /// The identifier.
        id: String,
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// Stop nodes (all when the list is empty); they stay stopped until started.
    Stop {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
        /// Answer with a stream: [`ClientResponse::Progress`] frames at least every
        /// second while it waits, then the results. Such a request waits for its nodes'
        /// `stop_timeout` however long it is, instead of ending at the request timeout.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    /// Start stopped nodes (all when the list is empty).
    Start {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
        /// Answer with a stream: [`ClientResponse::Progress`] frames at least every
        /// second while it waits, then the results. Such a request waits for its nodes'
        /// `stop_timeout` however long it is, instead of ending at the request timeout.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    /// Send a signal to nodes' process groups (all nodes when the list is empty).
    Signal {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
        /// The signal, by name (`HUP`, `SIGUSR1`) or number.
        signal: String,
    },
    /// The last lines of a node's output, then, with `follow`, new lines as they come
    /// (one reply frame per batch, until the client closes the stream).
    Logs {
        /// The node.
        node: String,
        /// How many lines of each stream to send first.
        #[serde(default = "default_log_lines")]
        lines: usize,
        /// Keep the stream open and send new lines.
        #[serde(default)]
        follow: bool,
        /// Only this stream (both when absent).
        #[serde(default)]
        stream: Option<LogStream>,
        /// With `follow` and no `lines`: take up a follow broken off (its controller
        /// went away), from where its last reply said it stood in each stream (see
        /// [`crate::model::LogChunk::end`]), at most the last MiB of what came since.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<crate::model::LogResume>,
    },
    /// Subscribe to cluster events: one reply frame per event until the client closes
    /// the stream.
    Monitor {
        /// Also stream every deployed node's output lines as events.
        #[serde(default)]
        logs: bool,
    },
    /// Entries of the controller's audit trail, oldest first: the newest `limit` (1000
    /// when absent) of those at or after `since_ms` by caller `who` (a name,
    /// `role/name` or certificate serial).
    GetAudit {
        /// Only entries at or after this time, in milliseconds since the Unix epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        /// Only entries of this caller.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        who: Option<String>,
        /// At most this many (the newest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        /// Answer in batches: several [`ClientResponse::Audit`] replies, oldest first,
        /// each well under the frame limit, the stream ending after the last, so that
        /// a trail of any size can be read. A controller that predates this answers
        /// with one reply.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batches: bool,
    },
    /// Tests request timeouts: no answer until the controller's request timeout.
    TestTimeout {
        /// When true, the controller answers with a timeout result; when false, never.
        with_state: bool,
    },
}

impl ClientRequest {
    /// The request's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::GetInstances => "get_instances",
            Self::StageConfig { .. } => "stage_config",
            Self::GetConfig { .. } => "get_config",
            Self::Deploy { .. } => "deploy",
            Self::GetNodes { .. } => "get_nodes",
            Self::Restart { .. } => "restart",
            Self::GetIdValue { .. } => "get_id_value",
            Self::Stop { .. } => "stop",
            Self::Start { .. } => "start",
            Self::Signal { .. } => "signal",
            Self::Logs { .. } => "logs",
            Self::Monitor { .. } => "monitor",
            Self::GetAudit { .. } => "get_audit",
            Self::TestTimeout { .. } => "test_timeout",
        }
    }
}

/// Replies of the controller to a [`ClientRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ClientResponse {
    /// A single-result answer.
    Result(MgmtResult),
    /// A multi-result answer.
    Results(Vec<MgmtResult>),
    /// One cluster event (to `Monitor` subscribers).
    Event(EventRecord),
    /// How far a deploy asked with `progress` has got; the results follow.
    Progress(Progress),
    /// Entries of the audit trail (to `GetAudit`).
    Audit(Vec<crate::access::AuditRecord>),
}

/// How far an operation on many nodes has got, sent ahead of its results when the
/// requester asked for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Nodes settled so far: running, or failed.
    pub done: u32,
    /// Nodes the operation waits for.
    pub total: u32,
}

/// A cluster event with the time the controller saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub event: Event,
}

/// What the controller tells `monitor` subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An agent connected.
    AgentJoined {
        /// Its instance name.
        instance: String,
        /// Where it connected from.
        addr: String,
    },
    /// An agent's connection was lost; its nodes are UNKNOWN until it returns.
    AgentLost {
        /// Its instance name.
        instance: String,
        /// Why.
        reason: String,
    },
    /// A node changed state.
    NodeState {
        /// Its instance.
        instance: String,
        /// The node.
        node: String,
        /// The new state.
        state: State,
        /// The state before, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<State>,
        /// Its process, if it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Its automatic restarts so far (a crash loop shows as a rising count even when
        /// every report finds it in the same state).
        #[serde(default)]
        restarts: u32,
        /// Why its process last ended unasked (`oom-killed`, a watchdog timeout, a
        /// failed liveness probe), when that is news or it is CRASHED or FAILED.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// For a CRASHED node waiting out its backoff: when it is to be started again,
        /// in milliseconds since the Unix epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart_at_ms: Option<u64>,
    },
    /// A stop of a node's process began (a stop, restart or redeploy sent its stop
    /// signal). Its state stays what it was until the process has ended, which a
    /// [`Event::NodeState`] then tells.
    NodeStopping {
        /// Its instance.
        instance: String,
        /// The node.
        node: String,
        /// Its process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// When the stop signal was sent, in milliseconds since the Unix epoch.
        since_ms: u64,
    },
    /// A deploy started.
    DeployStarted {
        /// The configuration.
        config_id: String,
        /// Instances it goes to.
        instances: Vec<String>,
    },
    /// A deploy finished.
    DeployFinished {
        /// The configuration.
        config_id: String,
        /// Node results that failed.
        failed: usize,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// Something went wrong that no request reports.
    Error {
        /// What.
        message: String,
    },
    /// Lines a node wrote (to `monitor --logs` subscribers).
    LogLines {
        /// Its instance.
        instance: String,
        /// The node.
        node: String,
        /// The lines.
        #[serde(flatten)]
        chunk: LogChunk,
    },
    /// This subscriber fell behind and missed events.
    Lagged {
        /// How many.
        missed: u64,
    },
    /// Written by `drover monitor` itself, never sent by a controller: its controller
    /// went away and it subscribed again through `controller`. The events of the gap
    /// are missing, so a consumer that keeps state reads it afresh (as after
    /// [`Event::Lagged`]).
    Resubscribed {
        /// The controller subscribed to now.
        controller: String,
        /// Why the last one was left.
        reason: String,
    },
    /// A request that changes something was answered (or refused), as written to the
    /// audit trail.
    Audit {
        /// The audit entry.
        record: crate::access::AuditRecord,
    },
    /// An event of a newer controller this build does not know; subscribers skip it.
    #[serde(other)]
    Unknown,
}

/// Requests an agent sends to the controller after its Hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Statuses that changed since the last report, or all of them (`full`), with the
    /// agent's own entry (management role AGENT). An agent sends a full report first on
    /// every connection and after a report failed, and waits for each report's answer
    /// before the next, so a controller may apply partial reports in order on top of
    /// the full one sent over the same connection.
    Status {
        /// The statuses.
        statuses: Vec<NodeStatus>,
        /// True when this is the full set rather than a delta.
        full: bool,
    },
}

/// Requests the controller sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControllerRequest {
    /// The agent's node statuses, its own entry included.
    GetNodes,
    /// Are you there? Answered with `Ack` at once, without asking the supervisor. The
    /// controller asks a connected agent this when another connection claims its name;
    /// an agent too old to know it answers with an error, which proves as much. An
    /// agent that is moving to a new connection answers `HandingOver` on the old one, and
    /// one that stands by answers `StandingBy`.
    Ping,
    /// Open a new connection and move to it, as after reloading certificates: the
    /// controller asks this of every agent after its own certificate or CA bundle
    /// changed, so that established connections come to use the new material before an
    /// old CA is removed. An agent too old to know it answers with an error.
    Reconnect,
    /// Make this configuration's nodes for the agent's instance run: start new nodes,
    /// restart changed ones, stop removed ones, leave the rest alone. Answered with one
    /// result per node started or restarted, once each is running or has failed.
    Apply {
        /// The whole configuration; the agent picks its own nodes.
        config: Box<Configuration>,
        /// Restart every node even if unchanged: this generation's deploy asked for it.
        /// For agents that predate `restart_since`.
        #[serde(default)]
        restart_all: bool,
        /// The deploy generation, strictly increasing per controller history: an agent
        /// applies a generation once (a repeat is answered without changes) and never
        /// lets an older one override a newer. 0 from peers that predate generations.
        #[serde(default)]
        generation: u64,
        /// The generation of the latest deploy, up to this one, that asked for every
        /// node to be restarted (0: none, or a controller that predates it). An agent
        /// that has applied neither it nor a later generation restarts every node, as
        /// it would have had that deploy reached it; one that has restarts none for it,
        /// so a deploy that restarted everything is carried out once per agent, however
        /// often it is sent again.
        #[serde(default, skip_serializing_if = "is_zero")]
        restart_since: u64,
        /// Answer with a stream: [`AgentResponse::Progress`] whenever another node
        /// settles, then the results; the wait for nodes then ends only once none has
        /// settled for the request's timeout. Agents that predate it answer once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
        /// Sent to bring a (re)connecting agent to the desired deploy, not on behalf of
        /// a client: a repeat of the generation the agent has applied is answered at
        /// once, without results, rather than with its nodes once they settle. Agents
        /// that predate it answer as for a deploy.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        catch_up: bool,
    },
    /// Restart nodes (all of the agent's when empty).
    Restart {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// Stop nodes (all of the agent's when empty).
    Stop {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// Start stopped nodes (all of the agent's when empty).
    Start {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// Signal nodes (all of the agent's when empty).
    Signal {
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
        /// The signal number.
        signal: i32,
    },
    /// Ask the agent's running nodes for a value (all of them when `nodes` is empty).
    GetIdValue {
        /// The identifier.
        id: String,
        /// Node names.
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// A node's output, as [`ClientRequest::Logs`].
    Logs {
        /// The node.
        node: String,
        /// How many lines of each stream to send first.
        lines: usize,
        /// Keep the stream open and send new lines.
        follow: bool,
        /// Only this stream (both when absent).
        stream: Option<LogStream>,
        /// With `follow` and no `lines`: begin with what the node wrote since the agent
        /// first started it (at most the last MiB), not at the end. For nodes new to a
        /// follower, whose first lines came before the follow did. An agent that does
        /// not know where that is (it adopted the node) begins at the end.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_start: bool,
        /// With `follow` and no `lines`: take up a follow broken off, from where its
        /// last reply said it stood in each stream (see [`crate::model::LogChunk::end`]),
        /// at most the last MiB of what came since.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<crate::model::LogResume>,
    },
}

/// How many log lines a request without a count gets.
pub fn default_log_lines() -> usize {
    10
}

/// Replies to requests that need no payload, and to agent requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum AgentResponse {
    /// Nothing to say beyond success.
    Ack,
    /// Node statuses.
    Nodes(Vec<NodeStatus>),
    /// One result per node.
    Results(Vec<MgmtResult>),
    /// Lines of a node's output.
    Log(LogChunk),
    /// How far an Apply asked with `progress` has got; the results follow.
    Progress(Progress),
    /// The answer to `Ping` on a connection the agent is replacing with a new one (after
    /// a certificate reload): the new connection that claims its name is its own.
    HandingOver,
    /// The answer to `Ping` of an agent that stands by: it was refused because another
    /// process with its certificate was connected, keeps its nodes stopped, and was
    /// admitted since (that process lost the controller, which restarted, say) but has
    /// not started them yet. The process that claims its name now, probably the one
    /// that runs the nodes, is let in instead.
    StandingBy,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_a_newer_controller_decode_as_unknown() {
        let record: EventRecord = serde_json::from_str(
            r#"{"at_ms":1,"event":{"type":"certificate_rotated","serial":"ab"}}"#,
        )
        .unwrap();
        assert_eq!(record.event, Event::Unknown);
        let audit = r#"{"type":"audit","record":{"at_ms":5,"role":"client","name":"ops","scope":"viewer","from":"127.0.0.1:1","front":"native","what":"deploy","outcome":"refused","some_new_field":1}}"#;
        let Event::Audit { record } = serde_json::from_str::<Event>(audit).unwrap() else {
            panic!("not an audit event");
        };
        assert_eq!(record.serial, "");
        assert_eq!(record.outcome, crate::access::Outcome::Refused);
    }

    /// A later release adds fields anywhere in a configuration, nested tables too; an
    /// older peer takes its Apply and ignores them, rather than refusing every node.
    #[test]
    fn a_configuration_with_fields_of_a_later_release_decodes() {
        let text = r#"
[instances.a]
[roles.worker]
command = ["z"]
memory = { max = "1G" }
[nodes.w]
instance = "a"
role = "worker"
readiness = { kind = "notify", timeout = "5s" }
backoff = { initial = "1s" }
memory = { max = "2G" }
liveness = { kind = "tcp", port = 9 }
"#;
        let config = crate::config::parse_toml("c.toml", text).unwrap();
        let mut json = serde_json::to_value(&config).unwrap();
        let later = |v: &mut serde_json::Value| {
            v.as_object_mut()
                .unwrap()
                .insert("from_a_later_release".into(), true.into());
        };
        later(&mut json);
        later(&mut json["roles"]["worker"]);
        later(&mut json["roles"]["worker"]["memory"]);
        let node = &mut json["nodes"][0];
        later(node);
        for key in ["readiness", "backoff", "memory", "liveness"] {
            later(&mut node[key]);
        }
        let req = serde_json::json!({ "type": "apply", "generation": 3, "config": json });
        let decoded: ControllerRequest = serde_json::from_value(req).unwrap();
        let ControllerRequest::Apply { config: got, .. } = decoded else {
            panic!("not an apply");
        };
        assert_eq!(*got, config);
    }

    #[test]
    fn a_not_leader_refusal_names_the_leader_or_nothing() {
        let m = format!("{NOT_LEADER}10.0.0.2:2150");
        assert_eq!(leader_hint(&m), Some("10.0.0.2:2150"));
        assert_eq!(
            leader_hint("not the leader; no leader is elected yet"),
            None
        );
        assert_eq!(leader_hint(NOT_LEADER), None);
        assert_eq!(leader_hint(&format!("{NOT_LEADER}a b")), None);
        assert_eq!(leader_hint("agent a1 is already connected"), None);
        let refusal = already_connected("a1", "10.0.0.9:4000");
        assert_eq!(refusal, "agent a1 is already connected from 10.0.0.9:4000");
        assert!(is_already_connected(&refusal));
        assert!(is_already_connected(&format!(
            "no controller welcomed us as the leader (c1: refused: {refusal}; c2: timed out)"
        )));
        assert!(!is_already_connected(
            "not the leader; the leader is c2:4433"
        ));
    }

    #[test]
    fn request_envelope_shape_is_stable() {
        let req = Request {
            id: "r1".into(),
            timeout_ms: Some(1000),
            body: ClientRequest::GetInstances,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"id":"r1","timeout_ms":1000,"body":{"type":"get_instances"}}"#
        );
        let back: Request<ClientRequest> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn reply_carries_errors() {
        let reply: Reply<Welcome> = Reply {
            id: "x".into(),
            result: Err(WireError::new(ErrorCode::VersionMismatch, "nope")),
            warning: None,
        };
        let json = serde_json::to_string(&reply).unwrap();
        let back: Reply<Welcome> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
        assert!(json.contains("version_mismatch"), "{json}");
    }

    #[test]
    fn unknown_request_types_are_errors() {
        let r = serde_json::from_str::<ClientRequest>(r#"{"type":"format_disk"}"#);
        assert!(r.is_err());
    }
}
