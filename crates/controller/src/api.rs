//! The controller's API: what each client request does.
//!
//! Semantics and error strings follow Zeek's Management framework, so that zeek-client
//! and scripts around it see what they expect: results the controller produced carry no
//! instance, results an agent produced always do, and a failure of one agent or node is a
//! result like any other, never the failure of the whole request.
//!
//! Timeouts nest: an agent answers within its own limit (5 s by default), the controller
//! waits for agents at most [`Config::request_timeout`](crate::Config) (10 s), and the
//! client at most its own (20 s); each side also shortens its limit to what the requester
//! said it would wait. A request to an agent that is not connected fails at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use drover_net::conn::{self, Answer};
use drover_proto::access::{self, AuditRecord, Outcome};
use drover_proto::config::validate;
use drover_proto::model::{
    Configuration, Instance, LogStream, MgmtResult, MgmtRole, NodeStatus, ResultData, State,
};
use drover_proto::msg::FOLLOWS_PER_AGENT;
use drover_proto::msg::{
    AgentResponse, ClientRequest, ClientResponse, ControllerRequest, ErrorCode, Event, EventRecord,
    Progress, Request, WireError,
};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::audit::{self, Caller};
use crate::refused;
use crate::store::Deploy;
use crate::view::Ask;

/// Answers one request of `caller`: refused when its scope does not allow it, and
/// written to the audit trail, before it is answered, when it changes something (or was
/// refused).
pub(crate) async fn handle_as(
    shared: &Arc<Shared>,
    caller: &Caller,
    req: Request<ClientRequest>,
) -> Result<Answer<ClientResponse>, WireError> {
    let checked = access::check(&req.body, caller.scope);
    if !access::mutates(&req.body) {
        // Nothing to record; a viewer may do all of this.
        checked.map_err(|m| WireError::new(ErrorCode::Forbidden, m))?;
        let mut answer = handle(shared, req).await;
        if caller.scope < access::Scope::Operator
            && let Answer::One(reply) = &mut answer
        {
            hide_env_values(reply);
        }
        return Ok(answer);
    }
    let what = req.body.kind();
    let args = audit::args(&req.body);
    if let Err(message) = checked {
        return Err(refuse(shared, caller, what, args, message).await);
    }
    // A leader cut off from etcd changes nothing: it may not lead any more. Not
    // recorded: the audit trail is in etcd too.
    if let Some(gate) = &shared.gate
        && let Err(message) = gate.serving()
    {
        warn!(client = %caller.name, addr = %caller.addr, front = caller.front, "refused {what}: {message}");
        return Err(WireError::new(ErrorCode::Unavailable, message));
    }
    let id = req.id.clone();
    // A deploy's record may be written with its deployed deploy, in one etcd write; the
    // desired deploy keeps who asked for it (see `store::Deploy::by`).
    let fold = matches!(req.body, ClientRequest::Deploy { .. })
        .then(|| audit::Fold::new(caller, what, args.clone()));
    Ok(match handle_folding(shared, req, fold.clone()).await {
        Answer::One(mut reply) => {
            audit_answer(shared, caller, what, args, &id, &mut reply, fold.as_deref()).await;
            Answer::One(reply)
        }
        // A deploy with progress: its answer is the frame after the progress counts,
        // recorded before it is passed on, like a single reply.
        Answer::Stream(mut frames) => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let shared = shared.clone();
            let caller = caller.clone();
            tokio::spawn(async move {
                while let Some(mut frame) = frames.recv().await {
                    if !matches!(frame, ClientResponse::Progress(_)) {
                        let fold = fold.as_deref();
                        audit_answer(&shared, &caller, what, args.clone(), &id, &mut frame, fold)
                            .await;
                    }
                    if tx.send(frame).await.is_err() {
                        // The client went away; the request still ran to its end.
                        while let Some(mut frame) = frames.recv().await {
                            if !matches!(frame, ClientResponse::Progress(_)) {
                                let fold = fold.as_deref();
                                audit_answer(
                                    &shared,
                                    &caller,
                                    what,
                                    args.clone(),
                                    &id,
                                    &mut frame,
                                    fold,
                                )
                                .await;
                            }
                        }
                        return;
                    }
                }
            });
            Answer::Stream(rx)
        }
    })
}

/// Replaces every environment value in a configuration `reply` carries (nodes' and
/// role templates') with [`drover_proto::argv::HIDDEN`], which stage refuses; the names stay. Node
/// environments hold secrets (tokens, passwords), and a viewer certificate is the one
/// given to dashboards and people who only look.
fn hide_env_values(reply: &mut ClientResponse) {
    let ClientResponse::Result(MgmtResult {
        data: Some(ResultData::Configuration(config)),
        ..
    }) = reply
    else {
        return;
    };
    let envs = config
        .nodes
        .iter_mut()
        .map(|n| &mut n.env)
        .chain(config.roles.values_mut().map(|t| &mut t.env));
    for env in envs {
        for value in env.values_mut() {
            drover_proto::argv::HIDDEN.clone_into(value);
        }
    }
}

/// Writes the audit record of a carried-out request from its answer (unless the
/// request's own last write carried it, `fold`); a record that cannot be written turns
/// into an error result of the answer.
async fn audit_answer(
    shared: &Arc<Shared>,
    caller: &Caller,
    what: &'static str,
    args: String,
    id: &str,
    reply: &mut ClientResponse,
    fold: Option<&audit::Fold>,
) {
    if let Some(record) = fold.and_then(audit::Fold::take_written) {
        shared.audit.folded().await;
        published(shared, record);
        return;
    }
    let (outcome, message) = outcome_of(reply);
    let mut record = audit::record(
        caller,
        now_ms(),
        what,
        args,
        generation(shared),
        outcome,
        message,
    );
    record.nodes = acted_on(what, reply);
    if let Err(e) = write_audit(shared, record).await {
        // Said after the request's own results, which stay: a request that failed
        // (a stage that could not be stored, on the same full disk) says why.
        let some_done = match reply {
            ClientResponse::Results(rs) => rs.iter().any(|r| r.success),
            _ => false,
        };
        let text = match outcome {
            Outcome::Ok => format!("the request was carried out, but {e}"),
            Outcome::Failed if some_done => format!("the request was carried out in part, but {e}"),
            Outcome::Failed | Outcome::Refused => e,
        };
        let error = MgmtResult::err(id, text);
        match reply {
            ClientResponse::Results(rs) => rs.push(error),
            ClientResponse::Result(r) => {
                *reply = ClientResponse::Results(vec![r.clone(), error]);
            }
            other => *other = ClientResponse::Results(vec![error]),
        }
    }
}

/// Records a refused request in the audit trail; the error that answers it.
pub(crate) async fn refuse(
    shared: &Arc<Shared>,
    caller: &Caller,
    what: &str,
    args: String,
    message: String,
) -> WireError {
    let at_ms = now_ms();
    let client = format!("{}/{}/{}", caller.role, caller.name, caller.serial);
    let clock = refused::clock_ms();
    let admit = shared
        .refused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .admit(&client, clock);
    let unrecorded = match admit {
        refused::Admit::Record { unrecorded } => unrecorded,
        refused::Admit::Skip => {
            debug!(client = %caller.name, addr = %caller.addr, front = caller.front, "refused (not recorded one by one): {message}");
            unrecorded_refusals(&shared.metrics).inc();
            return WireError::new(ErrorCode::Forbidden, message);
        }
    };
    warn!(client = %caller.name, addr = %caller.addr, front = caller.front, "refused: {message}");
    if let Some((count, since_ms)) = unrecorded {
        let summary = audit::record(
            caller,
            at_ms,
            what,
            String::new(),
            generation(shared),
            Outcome::Refused,
            Some(format!(
                "{count} more refused requests of this client in the {} before this record were not recorded one by one (at most {} in a row, then one a minute, are)",
                drover_net::humanize(Duration::from_millis(clock.saturating_sub(since_ms))),
                refused::BURST,
            )),
        );
        let _ = write_audit(shared, summary).await;
    }
    let record = audit::record(
        caller,
        at_ms,
        what,
        args,
        generation(shared),
        Outcome::Refused,
        Some(message.clone()),
    );
    match write_audit(shared, record).await {
        Ok(()) => WireError::new(ErrorCode::Forbidden, message),
        Err(e) => WireError::new(ErrorCode::Forbidden, format!("{message} (and {e})")),
    }
}

/// Records a request that failed before it reached the API (a zeek-client
/// configuration its role templates cannot complete).
pub(crate) async fn record_failure(
    shared: &Arc<Shared>,
    caller: &Caller,
    what: &str,
    message: String,
) {
    let record = audit::record(
        caller,
        now_ms(),
        what,
        String::new(),
        generation(shared),
        Outcome::Failed,
        Some(message),
    );
    // A failure to write is logged and published by write_audit; the request fails
    // anyway.
    let _ = write_audit(shared, record).await;
}

/// The desired deploy generation, if there is one.
fn generation(shared: &Shared) -> Option<u64> {
    Some(shared.store.desired_generation()).filter(|g| *g > 0)
}

/// The deployed nodes a restart, stop, start or signal targeted, by the results of its
/// reply: what an auditor asks after (`restart 'w*'` names no node). A name that is no
/// node's ([`unmatched_target`]'s results) is not one. Sorted, at most
/// [`drover_proto::access::AUDIT_NODES_MAX`], then `...`.
fn acted_on(what: &str, reply: &ClientResponse) -> Vec<String> {
    if !matches!(what, "restart" | "stop" | "start" | "signal") {
        return Vec::new();
    }
    let ClientResponse::Results(results) = reply else {
        return Vec::new();
    };
    let names: BTreeSet<&str> = results
        .iter()
        .filter(|r| {
            !r.error
                .as_deref()
                .is_some_and(|e| e == UNKNOWN_NODE || e.starts_with(NO_MATCH))
        })
        .filter_map(|r| r.node.as_deref())
        .collect();
    let max = access::AUDIT_NODES_MAX;
    let mut nodes: Vec<String> = names.iter().take(max).map(|n| (*n).to_owned()).collect();
    if names.len() > max {
        nodes.push("...".to_owned());
    }
    nodes
}

/// How a reply says its request ended: every result a success, or the first failure.
fn outcome_of(reply: &ClientResponse) -> (Outcome, Option<String>) {
    let results: Vec<&MgmtResult> = match reply {
        ClientResponse::Result(r) => vec![r],
        ClientResponse::Results(rs) => rs.iter().collect(),
        ClientResponse::Event(_) | ClientResponse::Audit(_) | ClientResponse::Progress(_) => {
            Vec::new()
        }
    };
    match results.iter().find(|r| !r.success) {
        None => (Outcome::Ok, None),
        Some(r) => {
            let node = r
                .node
                .as_deref()
                .map(|n| format!("{n}: "))
                .unwrap_or_default();
            let error = r.error.as_deref().unwrap_or("failed");
            (Outcome::Failed, Some(format!("{node}{error}")))
        }
    }
}

/// Appends a record to the audit trail (durably, off the async threads) and publishes
/// it to `monitor`; `Err` says why it could not be written.
pub(crate) async fn write_audit(shared: &Arc<Shared>, record: AuditRecord) -> Result<(), String> {
    let written = shared.audit.append(&record).await;
    if written.is_ok() {
        published(shared, record);
    } else {
        // The change was made: `monitor` still hears of it; the count is of records
        // the trail holds, its failures counted apart.
        audit_write_failures(&shared.metrics).inc();
        shared.emit(Event::Audit { record });
    }
    let failed = match written {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let message = format!(
        "the audit trail {} could not be written: {failed}",
        shared.audit.describe()
    );
    warn!("{message}");
    shared.emit(Event::Error {
        message: message.clone(),
    });
    Err(message)
}

/// Counts a record written to the audit trail and publishes it to `monitor`.
fn published(shared: &Shared, record: AuditRecord) {
    let outcome = match record.outcome {
        Outcome::Ok => "ok",
        Outcome::Failed => "failed",
        Outcome::Refused => "refused",
    };
    audit_records(&shared.metrics, outcome).inc();
    shared.emit(Event::Audit { record });
}

fn audit_records(metrics: &drover_metrics::Registry, outcome: &str) -> drover_metrics::Counter {
    metrics.counter(
        "drover_audit_records_total",
        "Requests written to the audit trail, by outcome.",
        &[("outcome", outcome)],
    )
}

fn audit_write_failures(metrics: &drover_metrics::Registry) -> drover_metrics::Counter {
    metrics.counter(
        "drover_audit_write_failures_total",
        "Audit records that could not be written to the trail.",
        &[],
    )
}

fn unrecorded_refusals(metrics: &drover_metrics::Registry) -> drover_metrics::Counter {
    metrics.counter(
        "drover_audit_refusals_unrecorded_total",
        "Refused requests counted but not recorded one by one: their client's budget was spent.",
        &[],
    )
}

/// Makes the audit trail's counters, at zero: an alert on their increase (a trail that
/// cannot be written) must see the first one.
pub(crate) fn register_audit_metrics(metrics: &drover_metrics::Registry) {
    for outcome in ["ok", "failed", "refused"] {
        audit_records(metrics, outcome);
    }
    audit_write_failures(metrics);
    unrecorded_refusals(metrics);
}

/// Answers one client request.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    req: Request<ClientRequest>,
) -> Answer<ClientResponse> {
    handle_folding(shared, req, None).await
}

/// As [`handle`]; a deploy writes its audit record through `fold` when it can (see
/// [`audit::Fold`]).
async fn handle_folding(
    shared: &Arc<Shared>,
    req: Request<ClientRequest>,
    fold: Option<Arc<audit::Fold>>,
) -> Answer<ClientResponse> {
    if let ClientRequest::Logs {
        node,
        lines,
        follow,
        stream,
        resume,
    } = req.body
    {
        return logs(shared, req.id, node, (lines, follow, stream), resume);
    }
    if let ClientRequest::Monitor { logs } = req.body {
        return monitor(shared, logs);
    }
    if let ClientRequest::GetAudit {
        since_ms,
        who,
        limit,
        batches: true,
    } = req.body
    {
        return audit_in_batches(shared, req.id, since_ms, who, limit);
    }
    if let ClientRequest::Restart { progress: true, .. }
    | ClientRequest::Stop { progress: true, .. }
    | ClientRequest::Start { progress: true, .. } = req.body
    {
        return act_with_heartbeats(shared, req);
    }
    if let ClientRequest::Deploy {
        progress: true,
        restart_all,
        expect_id,
        expect_stage,
    } = req.body
    {
        return deploy_with_progress(
            shared,
            req.id,
            restart_all,
            Expect {
                id: expect_id,
                stage: expect_stage,
            },
            budget(shared, req.timeout_ms),
            fold,
        );
    }
    Answer::One(handle_one(shared, req, fold).await)
}

/// How long the controller may take over a request: its own limit, shortened to answer
/// before the client gives up, so that a timeout is a result, not a hang.
fn budget(shared: &Shared, client_timeout_ms: Option<u64>) -> Duration {
    client_timeout_ms.map_or(shared.request_timeout, |ms| {
        shared
            .request_timeout
            .min(Duration::from_millis(ms.saturating_mul(9) / 10))
    })
}

/// The most often a deploy that reports progress sends the client a count.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// How long a stop, start or restart may wait for its agents.
#[derive(Debug, Clone, Copy)]
enum Waits {
    /// The request's budget, whatever its nodes' timeouts (a signal).
    Budget,
    /// Longer, for nodes' own stop and readiness timeouts, up to this (what the client
    /// waits for a single answer), or without a bound when the client is sent
    /// heartbeats.
    Settle(Option<Duration>),
}

impl Waits {
    /// For a client that waits `timeout_ms` for its single answer; one that says
    /// nothing (zeek-client) gets the controller's own timeout, as from Zeek's.
    fn until(timeout_ms: Option<u64>) -> Self {
        timeout_ms.map_or(Self::Budget, |ms| {
            Self::Settle(Some(Duration::from_millis(ms.saturating_mul(9) / 10)))
        })
    }
}

/// What the controller allows an agent beyond its nodes' own timeouts: the agent's
/// grace for the kill and the report that follow them, and the answer's way back. The
/// agent answers by four fifths of the time it is given, hence the factor.
fn agent_allowance(settle: Duration) -> Duration {
    (settle + Duration::from_secs(3)).mul_f64(1.25)
}

/// The most time between two frames of a stop, start or restart answered as a stream
/// (see [`act_with_heartbeats`]).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A stop, start or restart answered as a stream: a [`ClientResponse::Progress`] frame
/// at least every [`HEARTBEAT_EVERY`] (or a third of the client's timeout) while it
/// waits, then the results. The client's timeout then applies between frames, so the
/// request may wait as long as its nodes' stop and readiness timeouts allow.
fn act_with_heartbeats(
    shared: &Arc<Shared>,
    req: Request<ClientRequest>,
) -> Answer<ClientResponse> {
    let shared = shared.clone();
    let id = req.id.clone();
    let budget = budget(&shared, req.timeout_ms);
    let every = req.timeout_ms.map_or(HEARTBEAT_EVERY, |ms| {
        HEARTBEAT_EVERY.min(Duration::from_millis(ms / 3).max(Duration::from_millis(10)))
    });
    let work = async move {
        stop_start_restart(&shared, &id, req.body, budget, Waits::Settle(None)).await
    };
    let (beats, rx) = tokio::sync::watch::channel(Progress::default());
    Answer::Stream(conn::progress_stream(
        conn::with_heartbeats(work, beats, every, None),
        rx,
        every,
        ClientResponse::Progress,
        ClientResponse::Results,
    ))
}

/// Carries out a stop, start or restart (a rolling one with `batch`).
async fn stop_start_restart(
    shared: &Arc<Shared>,
    id: &str,
    body: ClientRequest,
    budget: Duration,
    waits: Waits,
) -> Vec<MgmtResult> {
    let (nodes, make): (_, fn(Vec<String>) -> ControllerRequest) = match body {
        ClientRequest::Restart { nodes, batch, .. } => {
            return restart(shared, id, nodes, batch, budget, waits).await;
        }
        ClientRequest::Stop { nodes, .. } => (nodes, |nodes| ControllerRequest::Stop { nodes }),
        ClientRequest::Start { nodes, .. } => (nodes, |nodes| ControllerRequest::Start { nodes }),
        _ => return vec![MgmtResult::err(id, "not a stop, start or restart")],
    };
    act(shared, id, nodes, budget, waits, make).await
}

/// A deploy answered as a stream: a [`ClientResponse::Progress`] as the agents'
/// counts of settled nodes move, then the results. It waits for each agent until that
/// agent has gone `budget` without progress, however long the whole takes.
fn deploy_with_progress(
    shared: &Arc<Shared>,
    id: String,
    restart_all: bool,
    expect: Expect,
    budget: Duration,
    fold: Option<Arc<audit::Fold>>,
) -> Answer<ClientResponse> {
    let (counts_tx, counts) = tokio::sync::watch::channel(Progress::default());
    let shared = shared.clone();
    let work = async move {
        deploy(
            &shared,
            &id,
            restart_all,
            expect,
            budget,
            Some(counts_tx),
            fold.as_deref(),
        )
        .await
    };
    let rx = conn::progress_stream(
        work,
        counts,
        PROGRESS_EVERY,
        ClientResponse::Progress,
        ClientResponse::Results,
    );
    Answer::Stream(rx)
}

/// Answers a request with one reply.
async fn handle_one(
    shared: &Arc<Shared>,
    req: Request<ClientRequest>,
    fold: Option<Arc<audit::Fold>>,
) -> ClientResponse {
    let id = req.id.clone();
    let budget = budget(shared, req.timeout_ms);
    match req.body {
        ClientRequest::GetInstances => ClientResponse::Result(MgmtResult::ok(
            id,
            Some(ResultData::Instances(instances(shared))),
        )),
        ClientRequest::StageConfig { config } => {
            ClientResponse::Results(stage(shared, &id, *config).await)
        }
        ClientRequest::GetConfig { deployed } => {
            let (config, which) = if deployed {
                (shared.store.deployed_config(), "deployed")
            } else {
                (shared.store.staged(), "staged")
            };
            ClientResponse::Result(match config {
                Some(c) => MgmtResult::ok(id, Some(ResultData::Configuration(Box::new(c)))),
                None => MgmtResult::err(id, format!("no {which} configuration available")),
            })
        }
        ClientRequest::Deploy {
            restart_all,
            expect_id,
            expect_stage,
            progress: _,
        } => {
            let fold = fold.as_deref();
            let expect = Expect {
                id: expect_id,
                stage: expect_stage,
            };
            ClientResponse::Results(
                deploy(shared, &id, restart_all, expect, budget, None, fold).await,
            )
        }
        ClientRequest::GetNodes { fresh } => {
            ClientResponse::Results(get_nodes(shared, &id, fresh, budget).await)
        }
        ClientRequest::GetIdValue { id: ident, nodes } => {
            ClientResponse::Results(get_id_value(shared, &id, ident, nodes, budget).await)
        }
        body @ (ClientRequest::Restart { .. }
        | ClientRequest::Stop { .. }
        | ClientRequest::Start { .. }) => {
            let waits = Waits::until(req.timeout_ms);
            ClientResponse::Results(stop_start_restart(shared, &id, body, budget, waits).await)
        }
        ClientRequest::Signal { nodes, signal } => {
            let Some(number) = drover_proto::config::signal_number(&signal) else {
                return ClientResponse::Results(vec![MgmtResult::err(
                    id,
                    format!("unknown signal '{signal}'"),
                )]);
            };
            ClientResponse::Results(
                act(shared, &id, nodes, budget, Waits::Budget, |nodes| {
                    ControllerRequest::Signal {
                        nodes,
                        signal: number,
                    }
                })
                .await,
            )
        }
        ClientRequest::Logs { .. } | ClientRequest::Monitor { .. } => {
            unreachable!("streamed by handle")
        }
        ClientRequest::GetAudit {
            since_ms,
            who,
            limit,
            ..
        } => {
            let limit = limit.unwrap_or(audit::DEFAULT_READ_LIMIT);
            match shared.audit.read(since_ms, who, limit).await {
                Ok(records) => ClientResponse::Audit(records),
                Err(e) => ClientResponse::Result(MgmtResult::err(
                    id,
                    format!(
                        "cannot read the audit trail {}: {e}",
                        shared.audit.describe()
                    ),
                )),
            }
        }
        ClientRequest::TestTimeout { with_state } => {
            if with_state {
                tokio::time::sleep(budget).await;
            } else {
                // Nothing to answer; wait until the client has given up, then let the
                // stream go.
                let client = req.timeout_ms.map_or(budget, Duration::from_millis);
                tokio::time::sleep(client + Duration::from_secs(1)).await;
            }
            ClientResponse::Result(MgmtResult::err(id, "request timed out"))
        }
    }
}

/// Most bytes (as JSON) of the records in one batch of an audit reply: far below the
/// frame limit.
const AUDIT_BATCH_BYTES: usize = 1024 * 1024;

/// The audit records asked for, in batches of about [`AUDIT_BATCH_BYTES`] (see
/// `ClientRequest::GetAudit::batches`); none make one empty batch.
fn audit_in_batches(
    shared: &Arc<Shared>,
    id: String,
    since_ms: Option<u64>,
    who: Option<String>,
    limit: Option<usize>,
) -> Answer<ClientResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let limit = limit.unwrap_or(audit::DEFAULT_READ_LIMIT);
        let records = match shared.audit.read(since_ms, who, limit).await {
            Ok(records) => records,
            Err(e) => {
                let why = format!(
                    "cannot read the audit trail {}: {e}",
                    shared.audit.describe()
                );
                let _ = tx
                    .send(ClientResponse::Result(MgmtResult::err(id, why)))
                    .await;
                return;
            }
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        for record in records {
            let size = serde_json::to_vec(&record).map_or(0, |v| v.len() + 1);
            if !batch.is_empty() && bytes + size > AUDIT_BATCH_BYTES {
                if tx
                    .send(ClientResponse::Audit(std::mem::take(&mut batch)))
                    .await
                    .is_err()
                {
                    return;
                }
                bytes = 0;
            }
            bytes += size;
            batch.push(record);
        }
        let _ = tx.send(ClientResponse::Audit(batch)).await;
    });
    Answer::Stream(rx)
}

/// Log follows open per agent connection (by quinn's stable id).
static FOLLOWS: std::sync::Mutex<BTreeMap<usize, Arc<tokio::sync::Semaphore>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// One of the agent's [`FOLLOWS_PER_AGENT`] follows, if one is free; held as long as the
/// follow runs.
fn follow_permit(conn: &quinn::Connection) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let mut follows = FOLLOWS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Forget connections without follows (their ids may be reused).
    follows.retain(|_, s| s.available_permits() < FOLLOWS_PER_AGENT);
    follows
        .entry(conn.stable_id())
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(FOLLOWS_PER_AGENT)))
        .clone()
        .try_acquire_owned()
        .ok()
}

fn too_many_follows(instance: &str) -> String {
    format!(
        "instance '{instance}' already serves {FOLLOWS_PER_AGENT} log follows, the most it may have; try again once some end"
    )
}

/// A node's output from its agent, relayed frame by frame; the relay ends when the
/// client goes away. A follow goes on when the agent goes away and comes back (its
/// nodes run on, adopted by its next process), saying so in marker lines; it ends when
/// a deploy takes the node away from its instance. Each chunk carries where its stream
/// stands after it, so that a client whose controller went away takes up the follow,
/// through the next one, with `resume`.
fn logs(
    shared: &Arc<Shared>,
    id: String,
    node: String,
    (lines, follow, stream): (usize, bool, Option<LogStream>),
    resume: Option<drover_proto::model::LogResume>,
) -> Answer<ClientResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let one = |r: MgmtResult| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.try_send(ClientResponse::Result(r));
        Answer::Stream(rx)
    };
    let Some(instance) = shared
        .store
        .desired()
        .and_then(|d| d.config.node(&node).map(|n| n.instance.clone()))
    else {
        return one(MgmtResult::err(id, "unknown cluster node").on_node(node));
    };
    // A follow of a node whose agent is away waits for it, as a follow under way does
    // when its agent goes (and one taken up by a client whose controller went away
    // may come to one that has just started, before the agent is back).
    let conn = shared.registry.get(&instance);
    if conn.is_none() && !follow {
        return one(MgmtResult::err(id, not_connected(&instance))
            .on_instance(instance)
            .on_node(node));
    }
    let permit = match &conn {
        Some(c) if follow => {
            let Some(permit) = follow_permit(c) else {
                return one(MgmtResult::err(id, too_many_follows(&instance))
                    .on_instance(instance)
                    .on_node(node));
            };
            Some(permit)
        }
        _ => None,
    };
    let timeout = shared.request_timeout;
    // A follow ends when a deploy takes its node away from that instance.
    let deploys = follow.then(|| (shared.events.subscribe(), Arc::clone(shared)));
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut permit = permit;
        let gone = deployed_away(deploys, &instance, &node);
        tokio::pin!(gone);
        let to_client =
            |r: MgmtResult| ClientResponse::Result(r.on_instance(&instance).on_node(&node));
        // On stderr whatever is followed: drover's words, not the node's output.
        let note = |text: String| {
            let chunk = drover_proto::model::LogChunk {
                stream: LogStream::Stderr,
                lines: vec![text],
                end: None,
            };
            to_client(MgmtResult::ok(&id, Some(ResultData::Log(chunk))))
        };
        let reply: (_, _, &(dyn Fn(MgmtResult) -> ClientResponse + Sync)) =
            (&tx, id.as_str(), &to_client);
        let conn = match conn {
            Some(c) => c,
            None => {
                let waits = format!(
                    "[drover: instance '{instance}' is not connected; following once it is]"
                );
                if resume.is_none() && tx.send(note(waits)).await.is_err() {
                    return;
                }
                let Some((back, p)) =
                    follow_again(&shared, &instance, None, reply, &mut gone).await
                else {
                    return;
                };
                permit = Some(p);
                back
            }
        };
        let (mut conn, mut lines) = (conn, lines);
        // Where the agent said each stream stands after the lines relayed so far.
        let mut stands = resume.unwrap_or_default();
        let mut resume = resume.filter(|_| follow);
        // Whether the agent answered anything of this follow yet: until it has, a follow
        // whose agent went away is asked again as it was first asked (its last lines
        // included), since nothing of it reached the client.
        let mut answered = false;
        loop {
            let req = ControllerRequest::Logs {
                node: node.clone(),
                lines,
                follow,
                stream,
                from_start: false,
                resume,
            };
            let ended = relay_logs(
                &conn,
                &req,
                timeout,
                (&tx, &id, &to_client),
                (&mut stands, &mut answered),
                &mut gone,
            )
            .await;
            let lost = match ended {
                Relayed::ClientLeft => return,
                Relayed::Failed(why) => {
                    let _ = tx.send(to_client(MgmtResult::err(&id, why))).await;
                    return;
                }
                Relayed::Ended if !follow => return,
                // An agent ends a follow's stream only as it goes away (its connection
                // may close a moment later).
                Relayed::Ended => None,
                Relayed::Lost(e) if !follow => {
                    let _ = tx
                        .send(to_client(MgmtResult::err(&id, e.to_string())))
                        .await;
                    return;
                }
                Relayed::Lost(e) => Some(e),
            };
            // The agent went away (restarted, upgraded, its network lost): the node
            // runs on, adopted by the next agent process, and so does the follow.
            let _ = permit.take();
            let old = conn.stable_id();
            let anew = replaced(&shared, &instance, &conn);
            let why = match lost {
                // The old connection was closed for the new one.
                _ if anew => "it connected anew".to_owned(),
                Some(e) => e.to_string(),
                None => "its connection ended".to_owned(),
            };
            debug!(instance = %instance, node = %node, "a relayed follow waits for its agent: {why}");
            let away = note(format!(
                "[drover: instance '{instance}' went away ({why}); following again once it is back]"
            ));
            if tx.send(away).await.is_err() {
                return;
            }
            let Some((back, p)) =
                follow_again(&shared, &instance, Some(old), reply, &mut gone).await
            else {
                return;
            };
            permit = Some(p);
            conn = back;
            if !answered {
                let back = note(format!("[drover: instance '{instance}' is back]"));
                if tx.send(back).await.is_err() {
                    return;
                }
                continue;
            }
            lines = 0;
            // Taken up where the agent said it stood: what the node wrote meanwhile
            // comes first (an agent that did not say begins at the end).
            let followed = match stream {
                Some(LogStream::Stdout) => [stands.stdout].to_vec(),
                Some(LogStream::Stderr) => [stands.stderr].to_vec(),
                None => [stands.stdout, stands.stderr].to_vec(),
            };
            resume = Some(stands);
            let again = if followed.iter().all(Option::is_some) {
                note(format!(
                    "[drover: instance '{instance}' is back; what the node wrote while it was away follows]"
                ))
            } else {
                note(format!(
                    "[drover: instance '{instance}' is back; what the node wrote while it was away is not shown]"
                ))
            };
            if tx.send(again).await.is_err() {
                return;
            }
        }
    });
    Answer::Stream(rx)
}

/// How a relay of a node's output from its agent ended.
enum Relayed {
    /// The client went away.
    ClientLeft,
    /// The agent's stream ended.
    Ended,
    /// The agent's connection failed under it.
    Lost(drover_net::NetError),
    /// The agent refused, or a deploy took the node away: the reason.
    Failed(String),
}

/// Relays one request's output frames from the agent to the client until one side
/// goes away, or `gone` (a deploy took the node away) resolves.
/// `stands` keeps where the agent said each stream stands after what was relayed;
/// `answered` becomes true with the agent's first output frame.
async fn relay_logs(
    conn: &quinn::Connection,
    req: &ControllerRequest,
    timeout: Duration,
    (tx, id, to_client): (
        &tokio::sync::mpsc::Sender<ClientResponse>,
        &str,
        &(dyn Fn(MgmtResult) -> ClientResponse + Sync),
    ),
    (stands, answered): (&mut drover_proto::model::LogResume, &mut bool),
    gone: &mut std::pin::Pin<&mut impl Future<Output = String>>,
) -> Relayed {
    let failed = |e: drover_net::NetError| {
        if conn.close_reason().is_some() {
            Relayed::Lost(e)
        } else {
            Relayed::Failed(e.to_string())
        }
    };
    let mut replies = tokio::select! {
        r = conn::call_stream(conn, req, timeout) => match r {
            Ok(r) => r,
            Err(e) => return failed(e),
        },
        () = tx.closed() => return Relayed::ClientLeft,
    };
    loop {
        // A quiet node sends nothing that would fail on a client that left: watch for
        // it too, so that the agent's stream is let go at once.
        let reply = tokio::select! {
            reply = replies.next::<AgentResponse>() => reply,
            () = tx.closed() => return Relayed::ClientLeft,
            why = gone.as_mut() => return Relayed::Failed(why),
        };
        let reply = match reply {
            Ok(Some(reply)) => reply,
            Ok(None) => return Relayed::Ended,
            Err(e) => return failed(e),
        };
        if let AgentResponse::Log(chunk) = reply {
            *answered = true;
            // Kept here too, for a follow taken up after its agent's absence.
            let (end, of) = (chunk.end, chunk.stream);
            let r = to_client(MgmtResult::ok(id, Some(ResultData::Log(chunk))));
            if tx.send(r).await.is_err() {
                return Relayed::ClientLeft;
            }
            if end.is_some() {
                match of {
                    LogStream::Stdout => stands.stdout = end,
                    LogStream::Stderr => stands.stderr = end,
                }
            }
        }
    }
}

/// The agent's connection once it is back (connected anew, not on `old`), with one of
/// its follows; None once the client left, or once told why the follow ends: a deploy
/// took the node away (`gone`), or the agent serves the most follows it may.
async fn follow_again(
    shared: &Shared,
    instance: &str,
    old: Option<usize>,
    (tx, id, to_client): (
        &tokio::sync::mpsc::Sender<ClientResponse>,
        &str,
        &(dyn Fn(MgmtResult) -> ClientResponse + Sync),
    ),
    gone: &mut std::pin::Pin<&mut impl Future<Output = String>>,
) -> Option<(quinn::Connection, tokio::sync::OwnedSemaphorePermit)> {
    let back = tokio::select! {
        c = agent_back(shared, instance, old) => c,
        () = tx.closed() => return None,
        why = gone.as_mut() => {
            let _ = tx.send(to_client(MgmtResult::err(id, why))).await;
            return None;
        }
    };
    let Some(permit) = follow_permit(&back) else {
        let r = MgmtResult::err(id, too_many_follows(instance));
        let _ = tx.send(to_client(r)).await;
        return None;
    };
    Some((back, permit))
}

/// Resolves to the agent's connection once it is back: connected anew, not on `old`.
async fn agent_back(shared: &Shared, instance: &str, old: Option<usize>) -> quinn::Connection {
    let mut events = shared.events.subscribe();
    loop {
        if let Some(c) = shared.registry.get(instance)
            && Some(c.stable_id()) != old
            && c.close_reason().is_none()
        {
            return c;
        }
        // Its return is an event; a second's wait covers a race with it, and a lag.
        let waited = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        if let Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) = waited {
            // No more events (the controller is stopping): look every second.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Resolves, with the reason, once a deploy has taken `node` away from `instance`:
/// removed it, or moved it to another instance. Never without `deploys` (a follow's
/// subscription to the events, and where the desired deploy is read).
async fn deployed_away(
    deploys: Option<(tokio::sync::broadcast::Receiver<EventRecord>, Arc<Shared>)>,
    instance: &str,
    node: &str,
) -> String {
    use tokio::sync::broadcast::error::RecvError;
    let Some((mut events, shared)) = deploys else {
        return std::future::pending().await;
    };
    loop {
        match events.recv().await {
            Ok(EventRecord {
                event: Event::DeployStarted { .. },
                ..
            })
            | Err(RecvError::Lagged(_)) => {}
            Ok(_) => continue,
            Err(RecvError::Closed) => return std::future::pending().await,
        }
        let Some(desired) = shared.store.desired() else {
            continue;
        };
        match desired.config.node(node).map(|n| n.instance.as_str()) {
            None => {
                return format!(
                    "node '{node}' was removed by deploy generation {}; nothing more to follow",
                    desired.generation
                );
            }
            Some(other) if other != instance => {
                return format!(
                    "node '{node}' moved to instance '{other}' with deploy generation {}; follow it again",
                    desired.generation
                );
            }
            Some(_) => {}
        }
    }
}

/// Relays cluster events to one subscriber until it goes away; with `logs`, also the
/// output of every deployed node (followed on its agent only while someone listens).
fn monitor(shared: &Arc<Shared>, logs: bool) -> Answer<ClientResponse> {
    let mut events = shared.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut follows = logs.then(|| LogFollows::new(Arc::clone(shared), tx.clone()));
    if let Some(f) = &mut follows {
        f.sync(true);
    }
    tokio::spawn(async move {
        // Besides the events that change what to follow: a connection handed over to a
        // new one (no event) ends the follows on the old one.
        let mut resync = tokio::time::interval(LogFollows::RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let received = tokio::select! {
                r = events.recv() => r,
                () = tx.closed() => return,
                _ = resync.tick(), if follows.is_some() => {
                    if let Some(f) = &mut follows {
                        f.sync(false);
                    }
                    continue;
                }
            };
            let record = match received {
                Ok(r) => r,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => EventRecord {
                    at_ms: 0,
                    event: Event::Lagged { missed },
                },
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            // A deploy's new nodes exist on their agents once it finished; its removed
            // ones go at its start.
            if let Some(f) = &mut follows
                && matches!(
                    record.event,
                    Event::DeployStarted { .. }
                        | Event::DeployFinished { .. }
                        | Event::AgentJoined { .. }
                        | Event::Lagged { .. }
                )
            {
                f.sync(true);
            }
            if tx.send(ClientResponse::Event(record)).await.is_err() {
                return;
            }
        }
    });
    Answer::Stream(rx)
}

/// The log follows of one `monitor --logs` subscriber: one per node of the desired
/// deploy whose agent is connected, each on that agent's current connection. Dropped
/// with the subscriber's task, which ends them all.
///
/// The nodes deployed when the subscriber came are followed from where their output
/// stood then. A node a later deploy adds (or moves to another instance) is new to the
/// subscriber: its first follow begins with the node's first output, which it wrote
/// before the deploy finished and the follow could begin. A later follow of a node (its
/// agent came back) takes up where the last one stood, so that nothing it wrote
/// meanwhile is missed.
struct LogFollows {
    shared: Arc<Shared>,
    tx: tokio::sync::mpsc::Sender<ClientResponse>,
    /// (instance, node) to the follow's task and the connection it runs on.
    running: BTreeMap<(String, String), (tokio::task::AbortHandle, usize)>,
    /// The nodes deployed when the subscriber came (still deployed), once known.
    initial: Option<BTreeSet<(String, String)>>,
    /// The nodes (still deployed) whose follow an agent has begun, and where in their
    /// streams the last one stood: kept by the follow tasks.
    stood: Stood,
}

/// See [`LogFollows::stood`].
type Stood = Arc<std::sync::Mutex<BTreeMap<(String, String), drover_proto::model::LogResume>>>;

impl LogFollows {
    /// How often the follows are checked against the agents' connections anyway.
    const RESYNC: Duration = Duration::from_secs(2);

    fn new(shared: Arc<Shared>, tx: tokio::sync::mpsc::Sender<ClientResponse>) -> Self {
        Self {
            shared,
            tx,
            running: BTreeMap::new(),
            initial: None,
            stood: Arc::default(),
        }
    }

    /// Ends the follows of nodes no longer deployed there, or on a connection the agent
    /// no longer uses; starts the missing ones, and with `retry` those that ended (the
    /// node was not there yet, or the agent refused: too many follows). Without it, an
    /// ended follow stays ended while its connection lasts, so that a refusal is not
    /// repeated at every look.
    fn sync(&mut self, retry: bool) {
        let wanted: BTreeSet<(String, String)> = self
            .shared
            .store
            .desired()
            .map(|d| {
                d.config
                    .nodes
                    .iter()
                    .map(|n| (n.instance.clone(), n.name.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let initial = self.initial.get_or_insert_with(|| wanted.clone());
        // A node deployed again after a deploy removed it is new again.
        initial.retain(|key| wanted.contains(key));
        let mut stood = self
            .stood
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stood.retain(|key, _| wanted.contains(key));
        let registry = &self.shared.registry;
        self.running.retain(|key, (task, conn_id)| {
            let current = registry.get(&key.0).map(|c| c.stable_id());
            let keep =
                wanted.contains(key) && current == Some(*conn_id) && !(retry && task.is_finished());
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let Some(conn) = registry.get(&key.0) else {
                continue;
            };
            let conn_id = conn.stable_id();
            let begin = match stood.get(&key) {
                Some(at) => Begin::Resume(*at),
                None if initial.contains(&key) => Begin::End,
                None => Begin::FirstOutput,
            };
            let task = tokio::spawn(follow_into_events(
                conn,
                key.clone(),
                (begin, Arc::clone(&self.stood)),
                self.tx.clone(),
                self.shared.request_timeout,
            ));
            self.running.insert(key, (task.abort_handle(), conn_id));
        }
    }
}

impl Drop for LogFollows {
    fn drop(&mut self) {
        for (task, _) in self.running.values() {
            task.abort();
        }
    }
}

/// Where a follow of `monitor --logs` begins.
#[derive(Debug, Clone, Copy)]
enum Begin {
    /// At the end of the node's output.
    End,
    /// With the node's first output.
    FirstOutput,
    /// Where an earlier follow of the node stood.
    Resume(drover_proto::model::LogResume),
}

/// Follows one node's output from `begin` and sends it as events until the subscriber
/// leaves, keeping where it stands in `stood`.
async fn follow_into_events(
    conn: quinn::Connection,
    (instance, node): (String, String),
    (begin, stood): (Begin, Stood),
    tx: tokio::sync::mpsc::Sender<ClientResponse>,
    timeout: Duration,
) {
    let Some(_permit) = follow_permit(&conn) else {
        let record = EventRecord {
            at_ms: now_ms(),
            event: Event::Error {
                message: format!(
                    "not following node '{node}': {}",
                    too_many_follows(&instance)
                ),
            },
        };
        let _ = tx.send(ClientResponse::Event(record)).await;
        return;
    };
    let req = ControllerRequest::Logs {
        node: node.clone(),
        lines: 0,
        follow: true,
        stream: None,
        from_start: matches!(begin, Begin::FirstOutput),
        resume: match begin {
            Begin::Resume(at) => Some(at),
            Begin::End | Begin::FirstOutput => None,
        },
    };
    let key = (instance.clone(), node.clone());
    let replies = tokio::select! {
        r = conn::call_stream(&conn, &req, timeout) => r,
        () = tx.closed() => return,
    };
    let Ok(mut replies) = replies else {
        return;
    };
    loop {
        // The subscriber may leave while the node is quiet: then let the agent's stream
        // go at once rather than at the node's next line.
        let reply = tokio::select! {
            r = replies.next::<AgentResponse>() => r,
            () = tx.closed() => return,
        };
        let Ok(Some(AgentResponse::Log(mut chunk))) = reply else {
            return;
        };
        // Kept for a later follow (once the lines are out), not shown to the subscriber.
        let (end, of) = (chunk.end.take(), chunk.stream);
        let keep = || {
            let mut stood = stood
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = stood.entry(key.clone()).or_insert_with(|| match begin {
                Begin::Resume(at) => at,
                Begin::End | Begin::FirstOutput => Default::default(),
            });
            if end.is_some() {
                match of {
                    LogStream::Stdout => at.stdout = end,
                    LogStream::Stderr => at.stderr = end,
                }
            }
        };
        if chunk.lines.is_empty() {
            keep();
            continue;
        }
        let record = EventRecord {
            at_ms: now_ms(),
            event: Event::LogLines {
                instance: instance.clone(),
                node: node.clone(),
                chunk,
            },
        };
        if tx.send(ClientResponse::Event(record)).await.is_err() {
            return;
        }
        keep();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Connected agents, sorted by name, with the address they connected from.
fn instances(shared: &Shared) -> Vec<Instance> {
    shared
        .registry
        .snapshot()
        .into_iter()
        .map(|a| Instance {
            name: a.name,
            host: Some(a.addr.ip()),
            port: a.dialled_port,
        })
        .collect()
}

/// Validates and records a staged configuration. A stage while a deploy runs is
/// refused (the deploy sends what was staged when it began); stages wait for each other.
async fn stage(shared: &Arc<Shared>, id: &str, config: Configuration) -> Vec<MgmtResult> {
    // Thousands of nodes take a while to check: off the runtime's workers, as writes.
    let mut issues = blocking(|| {
        let mut issues = validate(&config);
        // zeek: port checks that depend on the controller's settings (drover_proto::ports).
        issues.extend(drover_proto::ports::check(&config, &shared.ports));
        issues
    });
    issues.sort_by(|a, b| a.message.cmp(&b.message).then_with(|| a.key.cmp(&b.key)));
    if !issues.is_empty() {
        return issues
            .into_iter()
            .map(|i| MgmtResult::err(id, i.message))
            .collect();
    }
    if let Some(refusal) = blocking(|| too_large_to_show(&config, "staged")) {
        return vec![MgmtResult::err(id, refusal)];
    }
    if let Some(refusal) = deploy_in_progress(shared) {
        return vec![MgmtResult::err(id, refusal)];
    }
    let _ops = shared.config_ops.lock().await;
    let config_id = config.id.clone();
    let listening = config.clone();
    match blocking(|| shared.store.set_staged(config)) {
        Ok(()) => {
            *shared
                .staged_by
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id.to_owned());
            crate::dial::ensure(shared, &listening);
            info!(config = %config_id, "configuration staged");
            vec![MgmtResult::ok(id, Some(ResultData::ConfigId(config_id)))]
        }
        Err(e) => {
            warn!("cannot store the staged configuration: {e}");
            vec![MgmtResult::err(
                id,
                format!("cannot store the configuration: {e}"),
            )]
        }
    }
}

/// Runs blocking work (a store write: a file synced, or an etcd transaction waited for;
/// the checks of a large configuration) from a request's task, having the runtime move
/// its other tasks to other threads first: a large configuration takes seconds to check,
/// serialize and compress in a debug build, and with every worker held, the QUIC
/// endpoints stop acknowledging and clients' and agents' connections reach their idle
/// timeout.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Why a stage is refused now: a deploy is running.
fn deploy_in_progress(shared: &Shared) -> Option<String> {
    let deploying = shared.deploying.lock().unwrap_or_else(|p| p.into_inner());
    deploying.as_ref().map(|pending| {
        format!(
            "cannot stage while deployment {pending} is in progress; stage again once it finished"
        )
    })
}

/// Whether a request may change an agent's nodes, so that the controller's view of
/// them is not to be trusted until the agent is asked again.
fn changes_nodes(req: &ControllerRequest) -> bool {
    !matches!(
        req,
        ControllerRequest::GetNodes
            | ControllerRequest::GetIdValue { .. }
            | ControllerRequest::Logs { .. }
    )
}

/// An operator's action on nodes: a stop, start, restart or signal.
fn acts_on_nodes(req: &ControllerRequest) -> bool {
    matches!(
        req,
        ControllerRequest::Stop { .. }
            | ControllerRequest::Start { .. }
            | ControllerRequest::Restart { .. }
            | ControllerRequest::Signal { .. }
    )
}

/// An operation that may change an agent's nodes, tracked in the view from before it is
/// sent until it ends; the tracking ends even if the calling task is dropped half-way.
struct Tracked<'a>(&'a Shared, &'a str);

impl<'a> Tracked<'a> {
    fn start(shared: &'a Shared, name: &'a str, req: &ControllerRequest) -> Option<Self> {
        changes_nodes(req).then(|| {
            shared.view().op_started(name);
            Self(shared, name)
        })
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.0.view().op_finished(self.1);
    }
}

/// Past two thirds of its lease without a renewal another controller may lead soon:
/// nothing that changes nodes leaves a controller unless it leads on a fresh lease.
fn may_send(shared: &Shared, req: &ControllerRequest) -> Result<(), String> {
    match &shared.gate {
        Some(gate) if changes_nodes(req) => gate.serving().map(drop),
        _ => Ok(()),
    }
}

/// Sends one request to an agent; an operation that may change its nodes is tracked in
/// the view from before it is sent until it ends, however it ends.
pub(crate) async fn call_agent(
    shared: &Shared,
    name: &str,
    conn: &quinn::Connection,
    req: &ControllerRequest,
    budget: Duration,
) -> Result<AgentResponse, String> {
    may_send(shared, req)?;
    let _tracked = Tracked::start(shared, name, req);
    let deadline = tokio::time::Instant::now() + budget;
    let mut conn = conn.clone();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match conn::call::<_, AgentResponse>(&conn, req, left).await {
            Ok(answer) => return Ok(answer),
            Err(e) => match replacement(shared, name, &conn, req) {
                Some(newer) => conn = newer,
                None if replaced(shared, name, &conn) => {
                    // Closed here for the agent's new connection: "closed locally" would
                    // say nothing to the operator.
                    return Err(format!(
                        "agent '{name}' connected anew while the request was under way (it restarted, or its address changed): its old connection closed, so whether the request was carried out is not known; `drover status` shows its nodes"
                    ));
                }
                None => {
                    return Err(match e {
                        drover_net::NetError::Timeout { .. } => "request timed out".to_owned(),
                        // The agent may have carried it out before its connection went
                        // (or will, if it was only paused): say so, rather than leave
                        // "failed" to be read as "not done".
                        other @ drover_net::NetError::Connection(_) if acts_on_nodes(req) => {
                            format!(
                                "{other}: the connection to agent '{name}' was lost under the request, so whether it was carried out is not known; `drover status` shows its nodes once it is back"
                            )
                        }
                        other => other.to_string(),
                    });
                }
            },
        }
    }
}

/// Whether `conn` is closed and the agent `name` has another connection now.
fn replaced(shared: &Shared, name: &str, conn: &quinn::Connection) -> bool {
    conn.close_reason().is_some()
        && shared
            .registry
            .get(name)
            .is_some_and(|c| c.stable_id() != conn.stable_id())
}

/// The agent's new connection, when `conn` closed under a request that may be sent
/// again: an agent that restarted, or moved after a network change, while the
/// controller was giving up its old connection gets the request there, rather than the
/// request failing with the old connection's end. Only requests whose second copy
/// changes nothing the first did: an Apply of a generation (carried out once however
/// often it comes), a stop or a start (each brings its nodes to a state, which a node
/// already in it keeps), and those that only read. A restart or a signal acts each
/// time, and the agent may have had the first copy, so those fail as before.
fn replacement(
    shared: &Shared,
    name: &str,
    conn: &quinn::Connection,
    req: &ControllerRequest,
) -> Option<quinn::Connection> {
    let repeatable = match req {
        ControllerRequest::Apply { generation, .. } => *generation > 0,
        ControllerRequest::Stop { .. }
        | ControllerRequest::Start { .. }
        | ControllerRequest::GetNodes
        | ControllerRequest::Ping
        | ControllerRequest::GetIdValue { .. } => true,
        _ => false,
    };
    if !repeatable || conn.close_reason().is_none() {
        return None;
    }
    let newer = shared
        .registry
        .get(name)
        .filter(|c| c.stable_id() != conn.stable_id())?;
    debug!(
        agent = %name,
        "the connection of agent '{name}' from {} closed under a request; sending it again on its connection from {}",
        conn.remote_address(),
        newer.remote_address()
    );
    Some(newer)
}

/// Sends each agent its request, concurrently, and waits at most `budget` for all
/// answers; a late or failed agent is an error entry, sorted by agent name.
async fn fan_out(
    shared: &Arc<Shared>,
    requests: Vec<(String, quinn::Connection, ControllerRequest)>,
    budget: Duration,
) -> Vec<(String, Result<AgentResponse, String>)> {
    let mut set = JoinSet::new();
    for (name, conn, req) in requests {
        let shared = shared.clone();
        set.spawn(async move {
            let r = call_agent(&shared, &name, &conn, &req, budget).await;
            (name, r)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// As [`fan_out`], for requests that report progress: waits for each agent until it has
/// sent nothing for `budget` (not for `budget` in all), and publishes the sum of the
/// agents' latest counts to `progress`. Agents that answer at once are waited for as
/// in [`fan_out`].
async fn fan_out_with_progress(
    shared: &Arc<Shared>,
    requests: Vec<(String, quinn::Connection, ControllerRequest)>,
    budget: Duration,
    progress: tokio::sync::watch::Sender<Progress>,
) -> Vec<(String, Result<AgentResponse, String>)> {
    let (counts_tx, mut counts_rx) = tokio::sync::mpsc::channel::<(String, Progress)>(64);
    let mut set = JoinSet::new();
    for (name, conn, req) in requests {
        let shared = shared.clone();
        let counts = counts_tx.clone();
        set.spawn(async move {
            let r = call_agent_with_progress(&shared, &name, &conn, &req, budget, &counts).await;
            (name, r)
        });
    }
    drop(counts_tx);
    let mut latest: BTreeMap<String, Progress> = BTreeMap::new();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            Some((name, p)) = counts_rx.recv() => {
                latest.insert(name, p);
                let sum = latest.values().fold(Progress::default(), |a, p| Progress {
                    done: a.done.saturating_add(p.done),
                    total: a.total.saturating_add(p.total),
                });
                progress.send_replace(sum);
            }
            r = set.join_next() => match r {
                Some(Ok(r)) => out.push(r),
                Some(Err(_)) => {}
                None => break,
            },
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Sends one request that reports progress to an agent and reads its replies, each
/// within `budget`, passing progress on to `counts`, until the answer.
async fn call_agent_with_progress(
    shared: &Shared,
    name: &str,
    conn: &quinn::Connection,
    req: &ControllerRequest,
    budget: Duration,
    counts: &tokio::sync::mpsc::Sender<(String, Progress)>,
) -> Result<AgentResponse, String> {
    may_send(shared, req)?;
    let _tracked = Tracked::start(shared, name, req);
    let mut conn = conn.clone();
    loop {
        match stream_from(name, &conn, req, budget, counts).await {
            Err(e) => match replacement(shared, name, &conn, req) {
                Some(newer) => conn = newer,
                None => return Err(e),
            },
            answer => return answer,
        }
    }
}

/// One try of [`call_agent_with_progress`] on one connection.
async fn stream_from(
    name: &str,
    conn: &quinn::Connection,
    req: &ControllerRequest,
    budget: Duration,
    counts: &tokio::sync::mpsc::Sender<(String, Progress)>,
) -> Result<AgentResponse, String> {
    let explain = |e: drover_net::NetError| e.to_string();
    let mut replies = tokio::time::timeout(budget, conn::call_stream(conn, req, budget))
        .await
        .map_err(|_| "request timed out".to_owned())?
        .map_err(explain)?;
    loop {
        match tokio::time::timeout(budget, replies.next::<AgentResponse>()).await {
            Err(_) => return Err("request timed out".to_owned()),
            Ok(Err(e)) => return Err(explain(e)),
            Ok(Ok(None)) => return Err("the agent ended the request without an answer".to_owned()),
            Ok(Ok(Some(AgentResponse::Progress(p)))) => {
                let _ = counts.send((name.to_owned(), p)).await;
            }
            Ok(Ok(Some(answer))) => return Ok(answer),
        }
    }
}

/// Turns agents' answers into per-node results.
fn agent_results(
    id: &str,
    answers: Vec<(String, Result<AgentResponse, String>)>,
) -> Vec<MgmtResult> {
    let mut results = Vec::new();
    for (instance, answer) in answers {
        match answer {
            Ok(AgentResponse::Results(rs)) => {
                results.extend(rs.into_iter().map(|mut r| {
                    r.instance = Some(instance.clone());
                    r
                }));
            }
            Ok(other) => results.push(
                MgmtResult::err(id, format!("unexpected answer from the agent: {other:?}"))
                    .on_instance(&instance),
            ),
            Err(e) => results.push(MgmtResult::err(id, e).on_instance(&instance)),
        }
    }
    results
}

/// The error of a request's part for an agent that is not connected.
pub(crate) fn not_connected(instance: &str) -> String {
    drover_proto::model::not_connected(instance)
}

/// Clears the deploy-in-progress marker however the deploy ends, also when its task is
/// dropped half-way.
pub(crate) struct Pending<'a>(&'a Shared);

impl<'a> Pending<'a> {
    /// Marks deploy `id` as under way, or says which earlier one still is (Zeek's
    /// text): one deploy at a time.
    pub(crate) fn claim(shared: &'a Shared, id: &str) -> Result<Self, String> {
        let mut deploying = shared.deploying.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = deploying.as_ref() {
            return Err(format!("earlier deployment {pending} still pending"));
        }
        *deploying = Some(id.to_owned());
        Ok(Self(shared))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        *self.0.deploying.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// What a deploy expects of the staged configuration (compare and swap).
#[derive(Debug, Default)]
struct Expect {
    /// Its id (`drover deploy --expect-id`).
    id: Option<String>,
    /// The request that staged it: what `deploy-config` staged itself.
    stage: Option<String>,
}

/// deploy: the staged configuration becomes the desired deploy under a new generation,
/// recorded before any agent is told, then goes to every connected agent; only if the
/// staged configuration is what `expect` says.
async fn deploy(
    shared: &Arc<Shared>,
    id: &str,
    restart_all: bool,
    expect: Expect,
    budget: Duration,
    progress: Option<tokio::sync::watch::Sender<Progress>>,
    fold: Option<&audit::Fold>,
) -> Vec<MgmtResult> {
    if shared.store.staged().is_none() {
        return vec![MgmtResult::err(id, "no configuration available to deploy")];
    }
    let _pending = match Pending::claim(shared, id) {
        Ok(p) => p,
        Err(e) => return vec![MgmtResult::err(id, e)],
    };
    // A stage that began before this deploy ends first; later ones are refused.
    let _ops = shared.config_ops.lock().await;
    let Some(config) = shared.store.staged() else {
        return vec![MgmtResult::err(id, "no configuration available to deploy")];
    };
    if let Some(expected) = expect.id
        && config.id != expected
    {
        return vec![MgmtResult::err(
            id,
            format!(
                "the staged configuration is '{}', not '{expected}' as expected; nothing was deployed",
                config.id
            ),
        )];
    }
    let staged_by = shared
        .staged_by
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let (Some(expected), Some(by)) = (expect.stage, staged_by)
        && by != expected
    {
        return vec![MgmtResult::err(
            id,
            format!(
                "the staged configuration '{}' is not the one this client staged: another \
                 client staged one meanwhile (perhaps with the same id); nothing was deployed",
                config.id
            ),
        )];
    }
    deploy_locked(shared, id, config, restart_all, budget, progress, fold).await
}

/// Nodes pinned to a CPU their instance does not have (`cpus`: how many an instance's
/// agent said it has), as error messages. Instances whose agent did not say (older
/// agents) are not checked.
fn impossible_affinities(
    config: &Configuration,
    cpus: impl Fn(&str) -> Option<u32>,
) -> Vec<String> {
    let mut out = Vec::new();
    for node in &config.nodes {
        let Some(affinity) = &node.cpu_affinity else {
            continue;
        };
        let Some(count) = cpus(&node.instance) else {
            continue;
        };
        for cpu in affinity.cpus().into_iter().filter(|c| *c >= count) {
            out.push(format!(
                "node '{}' is pinned to CPU {cpu}, but instance '{}' has {count} CPUs (numbered from 0); nothing was deployed",
                node.name, node.instance
            ));
        }
    }
    out
}

/// Nodes using a resource setting their instance's host cannot enforce (as its agent
/// said), as error messages in the agent's own words. Agents that did not say (older
/// ones, or not connected) are not checked here; the agent still refuses.
fn unenforceable_limits(
    config: &Configuration,
    unenforceable: impl Fn(&str) -> BTreeMap<String, String>,
) -> Vec<String> {
    let mut hosts: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    let mut out = Vec::new();
    for node in &config.nodes {
        let host = hosts
            .entry(node.instance.as_str())
            .or_insert_with(|| unenforceable(&node.instance));
        if host.is_empty() {
            continue;
        }
        // With what its role's template gives it, as the agent runs it.
        let node = &config.resolve(node);
        let used = [
            ("memory.max", node.memory.is_some_and(|m| m.max.is_some())),
            ("memory.high", node.memory.is_some_and(|m| m.high.is_some())),
            ("cpus", node.cpus.is_some()),
            ("cpu_weight", node.cpu_weight.is_some()),
            ("pids_max", node.pids_max.is_some()),
            ("io_weight", node.io_weight.is_some()),
        ];
        for (setting, _) in used.into_iter().filter(|(_, set)| *set) {
            if let Some(why) = host.get(setting) {
                out.push(format!(
                    "node '{}': {why} (instance '{}'); nothing was deployed",
                    node.name, node.instance
                ));
            }
        }
    }
    out
}

/// Instances given more nodes than their agent said it has room for (`nodes_max`: its
/// open-file limit), as error messages. Instances whose agent did not say (older
/// agents) are not checked.
fn overfull_instances(
    config: &Configuration,
    nodes_max: impl Fn(&str) -> Option<u32>,
) -> Vec<String> {
    let mut count: BTreeMap<&str, u64> = BTreeMap::new();
    for node in &config.nodes {
        *count.entry(node.instance.as_str()).or_default() += 1;
    }
    count
        .into_iter()
        .filter_map(|(instance, n)| {
            let max = nodes_max(instance)?;
            (n > u64::from(max)).then(|| {
                format!(
                    "instance '{instance}' is given {n} nodes, but its agent's open-file limit leaves room for {max}; raise the agent's limit (LimitNOFILE= in its unit, `ulimit -n`) or spread the nodes; nothing was deployed"
                )
            })
        })
        .collect()
}

async fn deploy_locked(
    shared: &Arc<Shared>,
    id: &str,
    mut config: Configuration,
    restart_all: bool,
    budget: Duration,
    progress: Option<tokio::sync::watch::Sender<Progress>>,
    fold: Option<&audit::Fold>,
) -> Vec<MgmtResult> {
    // zeek: wait for agents the controller dials (bounded by the budget), as Zeek's
    // controller does; the rest of the budget is the agents'.
    let deadline = tokio::time::Instant::now() + budget;
    crate::dial::wait_for_dialled(shared, &config, deadline).await;
    let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
    let connected: BTreeMap<String, quinn::Connection> =
        shared.registry.connections().into_iter().collect();
    let missing: Vec<&str> = config
        .instances
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !connected.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        return vec![MgmtResult::err(
            id,
            format!("instances not connected: {}", missing.join(", ")),
        )];
    }
    let stranded = stranded_nodes(shared, &config, &connected);
    // The deployed form records where each instance was reached.
    let hosts: BTreeMap<String, std::net::IpAddr> = shared
        .registry
        .snapshot()
        .into_iter()
        .map(|a| (a.name, a.addr.ip()))
        .collect();
    for inst in &mut config.instances {
        if inst.host.is_none_or(|h| h.is_unspecified())
            && let Some(h) = hosts.get(&inst.name)
        {
            inst.host = Some(*h);
        }
    }
    // zeek: Broker and metrics ports, as Zeek's controller assigns them
    // (drover_proto::ports); the staged form keeps the ports it was given.
    let port_issues = drover_proto::ports::assign(&mut config, &shared.ports);
    if !port_issues.is_empty() {
        return port_issues
            .into_iter()
            .map(|i| MgmtResult::err(id, i.message))
            .collect();
    }
    let refusals = {
        let too_large = blocking(|| too_large_to_show(&config, "deployed"));
        let view = shared.view();
        let mut refusals = impossible_affinities(&config, |instance| view.cpus(instance));
        refusals.extend(too_large);
        refusals.extend(overfull_instances(&config, |instance| {
            view.nodes_max(instance)
        }));
        refusals.extend(unenforceable_limits(&config, |instance| {
            view.unenforceable(instance)
        }));
        refusals
    };
    if !refusals.is_empty() {
        return refusals
            .into_iter()
            .map(|m| MgmtResult::err(id, m))
            .collect();
    }
    // Recorded before any agent hears of it: a deploy that cannot be recorded changes
    // nothing, and one that was told to agents survives a controller restart. The new
    // generation is above any an agent reports, so that no agent ignores it as older.
    let floor = shared
        .view()
        .applied_all()
        .map(|(_, g)| g)
        .max()
        .unwrap_or(0);
    let by = fold.map(|f| Box::new(f.record(now_ms(), None, Outcome::Ok, None)));
    let deploy = match blocking(|| {
        let trail = match &shared.audit {
            audit::Trail::File(log) => log.mark(),
            audit::Trail::Etcd(_) => None,
        };
        shared
            .store
            .set_desired(config, floor, restart_all, by, trail)
    }) {
        Ok(d) => d,
        Err(e) => {
            let message = format!("cannot record the deploy, nothing was deployed: {e}");
            warn!("{message}");
            shared.emit(Event::Error {
                message: message.clone(),
            });
            return vec![MgmtResult::err(id, message)];
        }
    };
    let config = &deploy.config;
    let generation = deploy.generation;
    info!(config = %config.id, generation, restart_all, "deploying");
    shared.emit(Event::DeployStarted {
        config_id: config.id.clone(),
        instances: connected.keys().cloned().collect(),
    });
    let started = std::time::Instant::now();
    // Every connected agent gets the configuration: those without nodes in it stop
    // whatever they ran before.
    let mut shares = crate::zeek::layout::shares(config, connected.keys().map(String::as_str));
    let told: BTreeSet<String> = connected.keys().cloned().collect();
    let requests = connected
        .into_iter()
        .map(|(name, conn)| {
            let share = shares
                .remove(&name)
                .expect("a share for every connected agent");
            let req = ControllerRequest::Apply {
                generation,
                config: Box::new(share),
                restart_all,
                restart_since: deploy.restart_since,
                progress: progress.is_some(),
                catch_up: false,
            };
            (name, conn, req)
        })
        .collect();
    let answers = match progress {
        Some(progress) => fan_out_with_progress(shared, requests, budget, progress).await,
        None => fan_out(shared, requests, budget).await,
    };
    // An agent that connected while this deploy was prepared may have been brought to the
    // previous desired deploy; bring it to this one (a repeat changes nothing).
    for (name, conn) in shared.registry.connections() {
        if !told.contains(&name) {
            let shared = shared.clone();
            let deploy = deploy.clone();
            tokio::spawn(async move { reapply(&shared, &name, &conn, &deploy).await });
        }
    }
    // An agent that answered acknowledged the generation, even if some of its nodes
    // failed (those are results of their own, as in Zeek); one that did not answer in
    // time, could not be reached, or answered that it did not apply it, did not. The
    // deploy is the deployed one once every instance it names acknowledged it; other
    // agents' failures are reported, and they are brought to it when they reconnect, or
    // while they lag (`catchup`).
    let mut unacknowledged = Vec::new();
    {
        let named: BTreeSet<&str> = config.instances.iter().map(|i| i.name.as_str()).collect();
        let mut view = shared.view();
        for (name, answer) in &answers {
            if matches!(answer, Ok(AgentResponse::Results(rs)) if acknowledges(rs)) {
                view.acknowledged(name, generation);
            } else if named.contains(name.as_str()) {
                unacknowledged.push(name.clone());
            }
        }
    }
    let mut results = agent_results(id, answers);
    let failed = results.iter().filter(|r| !r.success).count();
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut ok = failed == 0;
    if unacknowledged.is_empty() {
        let done = MgmtResult::ok(id, Some(ResultData::ConfigId(config.id.clone())));
        // The request's audit record, as its answer will read, in the same write: the
        // answer waits for one etcd write, not two.
        let record = fold.filter(|_| shared.audit.folds()).map(|f| {
            let mut answer = results.clone();
            answer.push(done.clone());
            let (outcome, message) = outcome_of(&ClientResponse::Results(answer));
            f.record(now_ms(), Some(generation), outcome, message)
        });
        let also = record.as_ref().and_then(|r| shared.audit.put(r));
        match blocking(|| shared.store.set_deployed_with(&deploy, also)) {
            Ok(carried) => {
                info!(config = %config.id, generation, failed, elapsed_ms, "deployed");
                if carried == Some(true)
                    && let (Some(f), Some(r)) = (fold, record)
                {
                    f.written(r);
                }
                results.push(done);
            }
            Err(e) => {
                ok = false;
                let message = format!(
                    "generation {generation} was applied, but cannot be recorded as the deployed configuration: {e}"
                );
                warn!("{message}");
                shared.emit(Event::Error {
                    message: message.clone(),
                });
                results.push(MgmtResult::err(id, message));
            }
        }
    } else {
        ok = false;
        let message = format!(
            "configuration '{}' (generation {generation}) is not deployed yet: no acknowledgement from {}; agents are brought to it as they catch up or reconnect",
            config.id,
            unacknowledged.join(", ")
        );
        warn!("{message}");
        results.push(MgmtResult::err(id, message));
    }
    for (instance, nodes) in &stranded {
        ok = false;
        let message = format!(
            "instance '{instance}' is not in configuration '{}', but its agent is not \
             connected: its nodes ({}) may run on until it connects again and is told to stop \
             them",
            config.id,
            nodes.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        warn!("{message}");
        results.push(MgmtResult::err(id, message));
    }
    shared.emit(Event::DeployFinished {
        config_id: config.id.clone(),
        failed,
        elapsed_ms,
    });
    shared
        .metrics
        .histogram(
            "drover_deploy_duration_seconds",
            "From deploy request to every agent's answer.",
            &[],
        )
        .observe(started.elapsed());
    shared
        .metrics
        .counter(
            "drover_deploys_total",
            "Deploys by outcome.",
            &[("result", if ok { "ok" } else { "failed" })],
        )
        .inc();
    results
}

/// The nodes a deploy of `config` would leave running out of reach: the desired
/// deploy's nodes on instances `config` leaves out whose agent is not connected. A
/// connected agent left out is told to stop its nodes; one away is told when it connects
/// again. Said once, by the deploy that removes them: a host gone for good does not fail
/// every later deploy.
fn stranded_nodes(
    shared: &Arc<Shared>,
    config: &Configuration,
    connected: &BTreeMap<String, quinn::Connection>,
) -> BTreeMap<String, BTreeSet<String>> {
    let named: BTreeSet<&str> = config.instances.iter().map(|i| i.name.as_str()).collect();
    let away = |instance: &str| !named.contains(instance) && !connected.contains_key(instance);
    let mut stranded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if let Some(desired) = shared.store.desired() {
        for node in &desired.config.nodes {
            if away(&node.instance) {
                stranded
                    .entry(node.instance.clone())
                    .or_default()
                    .insert(node.name.clone());
            }
        }
    }
    stranded
}

/// Whether an agent's answer to an Apply says it applied the Apply's generation. Failed
/// nodes are results of their own and do not change that; an error about the agent
/// rather than a node (it could not write its desired state, it refused the Apply) says
/// it did not, and it still lags.
pub(crate) fn acknowledges(results: &[MgmtResult]) -> bool {
    results.iter().all(|r| r.success || r.node.is_some())
}

/// Brings an agent that (re)connected, or still lags, up to the desired deploy.
pub(crate) async fn reapply(
    shared: &Arc<Shared>,
    name: &str,
    conn: &quinn::Connection,
    desired: &Arc<Deploy>,
) {
    // An agent that missed a deploy restarting every node restarts them now (agents
    // that predate `restart_since` restart only what changed); one that has the deploy
    // restarts nothing.
    let req = ControllerRequest::Apply {
        generation: desired.generation,
        config: Box::new(shared.share_of(desired, name)),
        restart_all: false,
        restart_since: desired.restart_since,
        progress: false,
        catch_up: true,
    };
    match call_agent(shared, name, conn, &req, shared.request_timeout).await {
        Ok(AgentResponse::Results(rs)) if !acknowledges(&rs) => {
            // A deploy that came meanwhile may have reached the agent first, which then
            // refuses this older generation, rightly: nothing to warn about.
            let superseded = shared
                .store
                .desired()
                .is_some_and(|d| d.generation > desired.generation);
            for r in rs.iter().filter(|r| !r.success && r.node.is_none()) {
                if superseded {
                    debug!(
                        agent = %name,
                        generation = desired.generation,
                        "a superseded re-apply was not applied: {}",
                        r.error.as_deref().unwrap_or("no reason given")
                    );
                    continue;
                }
                let reason = r.error.as_deref().unwrap_or("no reason given");
                let ahead = shared
                    .view()
                    .applied(name)
                    .filter(|&g| g > desired.generation);
                let again = shared
                    .refusals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.to_owned(), (desired.generation, reason.to_owned()))
                    .is_some_and(|last| last == (desired.generation, reason.to_owned()));
                if again {
                    debug!(
                        agent = %name,
                        generation = desired.generation,
                        "agent '{name}' still does not apply the desired generation {}: {reason}",
                        desired.generation
                    );
                    continue;
                }
                if ahead.is_some() {
                    // Never sent again: no agent takes an older generation. Its reports
                    // say so (see `Shared::note_ahead`), also when they come after this.
                    continue;
                }
                warn!(
                    agent = %name,
                    generation = desired.generation,
                    "agent '{name}' did not apply the desired generation {}: {reason}; it is sent it again later",
                    desired.generation
                );
            }
        }
        Ok(AgentResponse::Results(rs)) => {
            // Every returning agent gets here: after a failover, a thousand lines at once
            // that say nothing the agent's connection line did not.
            debug!(
                agent = %name,
                generation = desired.generation,
                "agent '{name}' brought to the desired generation {}",
                desired.generation
            );
            shared
                .refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(name);
            shared.view().acknowledged(name, desired.generation);
            converge(shared);
            for r in rs.iter().filter(|r| !r.success) {
                warn!(
                    agent = %name,
                    node = r.node.as_deref().unwrap_or("?"),
                    generation = desired.generation,
                    "re-applying the desired configuration: {}",
                    r.error.as_deref().unwrap_or("failed")
                );
            }
        }
        Ok(_) => {}
        Err(e) => warn!(agent = %name, "cannot re-apply the desired configuration: {e}"),
    }
}

/// Records the desired deploy as deployed once every instance it names has applied it
/// (answered its apply, or reported it): a deploy that some agent did not acknowledge in
/// time becomes the deployed configuration when that agent catches up. Nothing to do while a deploy runs (it
/// records its own outcome).
pub(crate) fn converge(shared: &Arc<Shared>) {
    let Some(desired) = shared.store.desired() else {
        return;
    };
    if shared
        .store
        .deployed()
        .is_some_and(|d| d.generation >= desired.generation)
    {
        return;
    }
    if shared.is_deploying() {
        return;
    }
    let caught_up = {
        let view = shared.view();
        desired.config.instances.iter().all(|i| {
            view.applied(&i.name)
                .is_some_and(|g| g >= desired.generation)
        })
    };
    if !caught_up {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        // The request that made it has ended: its requester's record says so now, with
        // the deployed deploy in one etcd write, or after it in the state dir's trail.
        let record = desired.by.as_deref().map(|by| {
            audit::deployed_later(
                by,
                desired.generation,
                now_ms(),
                ": every instance it names applied it after its request had ended",
            )
        });
        let also = record.as_ref().and_then(|r| shared.audit.put(r));
        let written = {
            let shared = shared.clone();
            let desired = desired.clone();
            tokio::task::spawn_blocking(move || shared.store.set_deployed_with(&desired, also))
                .await
        };
        match written {
            // Another call recorded it meanwhile.
            Ok(Ok(None)) => {}
            Ok(Ok(Some(carried))) => {
                info!(
                    config = %desired.config.id,
                    generation = desired.generation,
                    "every instance applied the desired configuration; it is the deployed one now"
                );
                let Some(record) = record else { return };
                if carried {
                    shared.audit.folded().await;
                    published(&shared, record);
                } else if let Err(e) = write_audit(&shared, record).await {
                    warn!(
                        generation = desired.generation,
                        "cannot write the audit record of the deploy: {e}"
                    );
                }
            }
            Ok(Err(e)) => warn!("cannot record the deployed configuration: {e}"),
            Err(e) => warn!("cannot record the deployed configuration: {e}"),
        }
    });
}

/// Why `config` cannot be taken (as `which`, its staged or deployed form): the reply
/// of a `get-config` of it would not fit in a frame, so it could be neither shown nor
/// exported. Counted with the longest id and warning a reply carries.
fn too_large_to_show(config: &Configuration, which: &str) -> Option<String> {
    use drover_proto::msg::{MAX_FRAME_LEN, Reply, WireError};
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let id = "x".repeat(64);
    let shown = MgmtResult::ok(
        id.clone(),
        Some(ResultData::Configuration(Box::new(config.clone()))),
    );
    let reply: Reply<ClientResponse> = Reply {
        id,
        result: Ok::<_, WireError>(ClientResponse::Result(shown)),
        warning: Some("w".repeat(512)),
    };
    let mut count = Count(0);
    serde_json::to_writer(&mut count, &reply).ok()?;
    (count.0 > MAX_FRAME_LEN).then(|| {
        format!(
            "configuration is too large: `get-config` of its {which} form would answer {} bytes, over the frame limit of {MAX_FRAME_LEN} bytes",
            count.0
        )
    })
}

/// At start, with the state dir's trail: the deployed deploy's record, if the trail
/// lacks it (a controller that ended between recording the deploy as deployed and
/// appending its request's record). With etcd the two are written together.
pub(crate) async fn record_unrecorded_deploy(shared: Arc<Shared>) {
    let audit::Trail::File(log) = &shared.audit else {
        return;
    };
    let Some(deployed) = shared.store.deployed() else {
        return;
    };
    let Some(by) = deployed.by.as_deref() else {
        return;
    };
    // A trail rotated past the deploy's time, or moved away since, lacks its record
    // whether it was written or not: only a trail that holds everything since can say.
    if !deployed.trail.is_some_and(|m| log.holds_since(&m)) {
        info!(
            generation = deployed.generation,
            "the audit trail was rotated or moved since the deployed deploy began: \
             its record is not looked for"
        );
        return;
    }
    let recorded = match shared.audit.read(Some(by.at_ms), None, usize::MAX).await {
        Ok(records) => records
            .iter()
            .any(|r| r.what == "deploy" && r.generation == Some(deployed.generation)),
        Err(e) => {
            warn!("cannot read the audit trail: {e}");
            return;
        }
    };
    if recorded {
        return;
    }
    let r = audit::deployed_later(
        by,
        deployed.generation,
        now_ms(),
        "; the record of its request was not written (the controller ended first)",
    );
    if let Err(e) = write_audit(&shared, r).await {
        warn!(
            generation = deployed.generation,
            "cannot write the audit record of the deploy: {e}"
        );
    }
}

/// get-nodes: each connected agent's nodes from the view where it is current (see
/// [`crate::view`]), from the agent itself otherwise or when `fresh`; the nodes of
/// deployed instances whose agent is away as UNKNOWN; the controller's own entry.
async fn get_nodes(
    shared: &Arc<Shared>,
    id: &str,
    fresh: bool,
    budget: Duration,
) -> Vec<MgmtResult> {
    let agents = shared.registry.connections();
    let stale = shared.gate.as_ref().is_some_and(|g| g.stale().is_some());
    // Deployed instances whose agent is away: their nodes are UNKNOWN, not gone.
    let mut away = Vec::new();
    if let Some(desired) = shared.store.desired() {
        let deployed = &desired.config;
        let connected: BTreeSet<&str> = agents.iter().map(|(n, _)| n.as_str()).collect();
        let mut away_nodes: BTreeMap<&str, Vec<&drover_proto::model::Node>> = deployed
            .instances
            .iter()
            .filter(|i| !connected.contains(i.name.as_str()))
            .map(|i| (i.name.as_str(), Vec::new()))
            .collect();
        if !away_nodes.is_empty() {
            for n in &deployed.nodes {
                if let Some(v) = away_nodes.get_mut(n.instance.as_str()) {
                    v.push(n);
                }
            }
        }
        for inst in &deployed.instances {
            let Some(deployed_nodes) = away_nodes.get(inst.name.as_str()) else {
                continue;
            };
            let mut nodes = shared.view().last(&inst.name);
            if stale && !nodes.is_empty() {
                // Cut off from etcd, this controller let its agents go; what they last
                // reported is the best it knows, and the reply says it may be stale.
                away.push(
                    MgmtResult::ok(id, Some(ResultData::NodeStatuses(nodes)))
                        .on_instance(&inst.name),
                );
                continue;
            }
            let known: BTreeSet<String> = nodes.iter().map(|s| s.node.clone()).collect();
            for n in deployed_nodes {
                if !known.contains(&n.name) {
                    let mut s = NodeStatus::new(&n.name, State::Unknown, MgmtRole::None);
                    s.cluster_role = n.role.clone();
                    nodes.push(s);
                }
            }
            for s in &mut nodes {
                s.state = State::Unknown;
            }
            let mut r = MgmtResult::err(id, not_connected(&inst.name)).on_instance(&inst.name);
            r.data = Some(ResultData::NodeStatuses(nodes));
            away.push(r);
        }
    }
    if agents.is_empty() && away.is_empty() {
        return vec![MgmtResult::err(id, "no instances connected")];
    }
    let mut known = Vec::new();
    let mut asks: BTreeMap<String, (Ask, usize)> = BTreeMap::new();
    let mut requests = Vec::new();
    {
        let view = shared.view();
        for (name, conn) in agents {
            match view.current(&name, conn.stable_id()).filter(|_| !fresh) {
                Some(nodes) => known.push((name, nodes)),
                None => {
                    asks.insert(name.clone(), (view.ask(&name), conn.stable_id()));
                    requests.push((name, conn, ControllerRequest::GetNodes));
                }
            }
        }
    }
    let answers = fan_out(shared, requests, budget).await;
    let mut results: Vec<MgmtResult> = answers
        .into_iter()
        .map(|(instance, answer)| match answer {
            Ok(AgentResponse::Nodes(nodes)) => {
                // A direct answer is as good as a report: it keeps the view current.
                if let Some((a, conn)) = asks.get(&instance) {
                    let events = shared.view().answered(&instance, *conn, *a, nodes.clone());
                    shared.emit_all(events);
                }
                MgmtResult::ok(id, Some(ResultData::NodeStatuses(nodes))).on_instance(instance)
            }
            Ok(other) => {
                MgmtResult::err(id, format!("unexpected answer from the agent: {other:?}"))
                    .on_instance(instance)
            }
            Err(e) => {
                // Unreachable right now: what we last knew, as UNKNOWN (as it was when
                // the reply says it may be stale anyway).
                let mut nodes = shared.view().last(&instance);
                for n in nodes.iter_mut().filter(|_| !stale) {
                    n.state = State::Unknown;
                }
                let mut r = MgmtResult::err(id, e).on_instance(instance);
                if !nodes.is_empty() {
                    r.data = Some(ResultData::NodeStatuses(nodes));
                }
                r
            }
        })
        .collect();
    results.extend(known.into_iter().map(|(instance, nodes)| {
        MgmtResult::ok(id, Some(ResultData::NodeStatuses(nodes))).on_instance(instance)
    }));
    results.sort_by(|a, b| a.instance.cmp(&b.instance));
    // An agent's own entry carries the generation it applied as the controller knows it:
    // the higher of what it reported and the last apply it answered.
    {
        let view = shared.view();
        for r in &mut results {
            let (Some(instance), Some(ResultData::NodeStatuses(statuses))) =
                (&r.instance, &mut r.data)
            else {
                continue;
            };
            let applied = view.applied(instance);
            // The certificate the agent's connection presented.
            let cert = shared
                .registry
                .get(instance)
                .and_then(|c| drover_net::tls::peer_cert_info(&c).ok());
            for s in statuses
                .iter_mut()
                .filter(|s| s.mgmt_role == MgmtRole::Agent)
            {
                s.generation = applied;
                s.cert_not_after = cert.as_ref().map(|c| c.not_after);
            }
        }
    }
    let mut me = NodeStatus::new(&shared.name, State::Running, MgmtRole::Controller);
    me.pid = Some(std::process::id());
    // The controller's own entry carries the desired generation, which every agent's
    // own entry is compared with.
    me.generation = Some(shared.store.desired_generation()).filter(|g| *g > 0);
    me.cert_not_after = shared
        .trust
        .credentials()
        .cert_info()
        .ok()
        .map(|c| c.not_after);
    results.push(
        MgmtResult::ok(id, Some(ResultData::NodeStatuses(vec![me]))).on_instance(&shared.name),
    );
    results.extend(away);
    results
}

/// get-id-value: Zeek's semantics; nodes not in the deployed configuration are errors
/// without an instance, the others are asked through their agents.
async fn get_id_value(
    shared: &Arc<Shared>,
    id: &str,
    ident: String,
    nodes: Vec<String>,
    budget: Duration,
) -> Vec<MgmtResult> {
    // As Zeek's: a deployed configuration without instances manages no cluster.
    let Some(deployed) = shared
        .store
        .desired_config()
        .filter(|d| !d.instances.is_empty())
    else {
        return vec![MgmtResult::err(id, "no cluster deployed")];
    };
    let (known, unmatched) = deployed.select(&nodes);
    let mut results: Vec<MgmtResult> = unmatched
        .into_iter()
        .map(|t| unmatched_target(id, t))
        .collect();
    if !results.is_empty() && known.is_empty() {
        return results;
    }
    let instances: BTreeSet<String> = deployed
        .nodes
        .iter()
        .filter(|n| known.is_empty() || known.contains(&n.name))
        .map(|n| n.instance.clone())
        .collect();
    let mut requests = Vec::new();
    for instance in instances {
        let names: Vec<String> = deployed
            .nodes_on(&instance)
            .map(|n| n.name.clone())
            .filter(|n| known.is_empty() || known.contains(n))
            .collect();
        match shared.registry.get(&instance) {
            Some(conn) => requests.push((
                instance,
                conn,
                ControllerRequest::GetIdValue {
                    id: ident.clone(),
                    nodes: names,
                },
            )),
            None => results.extend(names.into_iter().map(|n| {
                MgmtResult::err(id, not_connected(&instance))
                    .on_instance(&instance)
                    .on_node(n)
            })),
        }
    }
    results.extend(agent_results(id, fan_out(shared, requests, budget).await));
    results
}

/// Restarts nodes, all at once or `batch` at a time; see [`rolling_restart`].
async fn restart(
    shared: &Arc<Shared>,
    id: &str,
    nodes: Vec<String>,
    batch: Option<usize>,
    budget: Duration,
    waits: Waits,
) -> Vec<MgmtResult> {
    match batch {
        Some(batch) => rolling_restart(shared, id, nodes, batch, budget, waits).await,
        None => {
            act(shared, id, nodes, budget, waits, |nodes| {
                ControllerRequest::Restart { nodes }
            })
            .await
        }
    }
}

/// Restarts nodes `batch` at a time; a batch starts once the previous one is ready
/// again, and the first batch with a failure ends the rollout (the rest are reported as
/// not restarted). For a client sent heartbeats, each batch has the whole budget (and
/// its nodes' timeouts); otherwise they share it.
async fn rolling_restart(
    shared: &Arc<Shared>,
    id: &str,
    nodes: Vec<String>,
    batch: usize,
    budget: Duration,
    waits: Waits,
) -> Vec<MgmtResult> {
    let Some(deployed) = shared.store.desired_config() else {
        return vec![MgmtResult::err(id, "no active cluster deployment")];
    };
    let mut results = Vec::new();
    let names: Vec<String> = if nodes.is_empty() {
        deployed.nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        let (names, unmatched) = deployed.select(&nodes);
        results.extend(unmatched.into_iter().map(|t| unmatched_target(id, t)));
        names
    };
    let began = tokio::time::Instant::now();
    let mut failed = false;
    for chunk in names.chunks(batch.max(1)) {
        if failed {
            results.extend(chunk.iter().map(|n| {
                MgmtResult::err(id, "not restarted: an earlier batch failed").on_node(n.clone())
            }));
            continue;
        }
        let spent = began.elapsed();
        let (left, waits) = match waits {
            Waits::Settle(None) => (budget, waits),
            Waits::Settle(Some(limit)) => (
                budget.saturating_sub(spent),
                Waits::Settle(Some(limit.saturating_sub(spent))),
            ),
            Waits::Budget => (budget.saturating_sub(spent), waits),
        };
        let batch_results = act(shared, id, chunk.to_vec(), left, waits, |nodes| {
            ControllerRequest::Restart { nodes }
        })
        .await;
        failed = batch_results.iter().any(|r| !r.success);
        info!(nodes = ?chunk, failed, "restart batch done");
        results.extend(batch_results);
    }
    results
}

/// The error result for a target that matched no node: Zeek's wording for a plain
/// name, a clearer one for a selector or a pattern.
fn unmatched_target(id: &str, target: String) -> MgmtResult {
    if target.contains([':', '*', '?']) {
        MgmtResult::err(id, format!("{NO_MATCH}'{target}'")).on_node(target)
    } else {
        MgmtResult::err(id, UNKNOWN_NODE).on_node(target)
    }
}

/// The error of a name that is no node's (Zeek's wording).
const UNKNOWN_NODE: &str = "unknown cluster node";
/// The start of the error of a selector or pattern that matches no node.
const NO_MATCH: &str = "no node matches ";

/// Stop, start or restart: unknown names are per-node errors; the rest goes to the
/// agents that run them.
async fn act(
    shared: &Arc<Shared>,
    id: &str,
    nodes: Vec<String>,
    budget: Duration,
    waits: Waits,
    make: impl Fn(Vec<String>) -> ControllerRequest,
) -> Vec<MgmtResult> {
    if shared.registry.snapshot().is_empty() {
        return vec![MgmtResult::err(id, "no instances connected")];
    }
    let Some(deployed) = shared.store.desired_config() else {
        return vec![MgmtResult::err(id, "no active cluster deployment")];
    };
    let mut results = Vec::new();
    // instance -> node names (empty = all of that instance's nodes)
    let mut by_instance: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if nodes.is_empty() {
        for inst in deployed
            .nodes
            .iter()
            .map(|n| n.instance.clone())
            .collect::<BTreeSet<_>>()
        {
            by_instance.insert(inst, Vec::new());
        }
    } else {
        let (names, unmatched) = deployed.select(&nodes);
        results.extend(unmatched.into_iter().map(|t| unmatched_target(id, t)));
        for name in names {
            match deployed.node(&name) {
                Some(n) => by_instance
                    .entry(n.instance.clone())
                    .or_default()
                    .push(name),
                None => results.push(MgmtResult::err(id, UNKNOWN_NODE).on_node(name)),
            }
        }
    }
    // Its nodes may take their stop_timeout to stop and readiness timeout to start,
    // and the agents wait for that: so does the controller, as far as its client does.
    let budget = match (waits, make(Vec::new())) {
        (Waits::Settle(limit), kind) => {
            let (stops, starts) = match kind {
                ControllerRequest::Stop { .. } => (true, false),
                // A stop may be under way: the start comes once it is done.
                ControllerRequest::Start { .. } | ControllerRequest::Restart { .. } => (true, true),
                _ => (false, false),
            };
            let settle = deployed
                .nodes
                .iter()
                .filter(|n| {
                    by_instance
                        .get(&n.instance)
                        .is_some_and(|names| names.is_empty() || names.contains(&n.name))
                })
                .map(|n| n.settle_within(stops, starts))
                .max()
                .unwrap_or_default();
            let longer = if settle.is_zero() {
                budget
            } else {
                budget + agent_allowance(settle)
            };
            limit.map_or(longer, |l| longer.min(l.max(budget)))
        }
        (Waits::Budget, _) => budget,
    };
    let mut requests = Vec::new();
    for (instance, names) in by_instance {
        match shared.registry.get(&instance) {
            Some(conn) => requests.push((instance, conn, make(names))),
            None => {
                let names = if names.is_empty() {
                    deployed
                        .nodes_on(&instance)
                        .map(|n| n.name.clone())
                        .collect()
                } else {
                    names
                };
                for n in names {
                    results.push(
                        MgmtResult::err(id, not_connected(&instance))
                            .on_instance(&instance)
                            .on_node(n),
                    );
                }
            }
        }
    }
    let answers = fan_out(shared, requests, budget).await;
    results.extend(agent_results(id, answers));
    results
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{CpuAffinity, Node};

    use super::*;

    #[test]
    fn settings_an_instance_cannot_enforce_are_refused_per_node() {
        let mut config = Configuration::empty();
        for (name, instance) in [("w1", "a"), ("w3", "b")] {
            let mut node = Node::new(name, instance);
            node.io_weight = Some(100);
            node.pids_max = Some(10);
            config.nodes.push(node);
        }
        // w2's comes from its role's template.
        let template = drover_proto::model::RoleTemplate {
            io_weight: Some(100),
            ..Default::default()
        };
        config.roles.insert("worker".into(), template);
        let mut w2 = Node::new("w2", "a");
        w2.role = drover_proto::ClusterRole::Worker;
        config.nodes.insert(1, w2);
        let refusals = unenforceable_limits(&config, |instance| {
            if instance == "a" {
                [(
                    "io_weight".to_owned(),
                    "io_weight cannot be enforced on this host: no".to_owned(),
                )]
                .into()
            } else {
                BTreeMap::new()
            }
        });
        assert_eq!(
            refusals,
            [
                "node 'w1': io_weight cannot be enforced on this host: no (instance 'a'); nothing was deployed",
                "node 'w2': io_weight cannot be enforced on this host: no (instance 'a'); nothing was deployed",
            ]
        );
    }

    /// A configuration whose stage request fits in a frame, but whose `get-config`
    /// answer would not, is refused (it could be neither shown nor exported).
    #[test]
    fn a_configuration_too_large_to_show_is_refused() {
        let mut config = Configuration::empty();
        config.instances.push(Instance {
            name: "a".into(),
            host: None,
            port: None,
        });
        let mut node = Node::new("w1", "a");
        node.command = vec!["x".into()];
        node.env.insert(
            "BIG".into(),
            "v".repeat(drover_proto::msg::MAX_FRAME_LEN - 200),
        );
        config.nodes.push(node);
        let why = too_large_to_show(&config, "staged").expect("refused");
        assert!(
            why.starts_with(
                "configuration is too large: `get-config` of its staged form would answer"
            ),
            "{why}"
        );
        config.nodes[0].env.insert("BIG".into(), "v".repeat(1000));
        assert_eq!(too_large_to_show(&config, "staged"), None);
    }

    #[test]
    fn the_audit_lists_the_nodes_an_operation_reached_sorted_and_capped() {
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("", None).on_instance("a").on_node("w2"),
            MgmtResult::err("", "not running")
                .on_instance("b")
                .on_node("w1"),
            MgmtResult::err("", "instance 'c' is not connected").on_instance("c"),
            MgmtResult::ok("", None).on_instance("a").on_node("w2"),
            // A name that is no node's, and one matching none.
            MgmtResult::err("", "unknown cluster node").on_node("nosuch"),
            MgmtResult::err("", "no node matches 'x*'").on_node("x*"),
            // A deployed node a rolling restart did not get to.
            MgmtResult::err("", "not restarted: an earlier batch failed").on_node("w3"),
        ]);
        assert_eq!(acted_on("restart", &reply), ["w1", "w2", "w3"]);
        assert_eq!(acted_on("signal", &reply), ["w1", "w2", "w3"]);
        assert!(acted_on("deploy", &reply).is_empty(), "a deploy lists none");
        let many = ClientResponse::Results(
            (0..access::AUDIT_NODES_MAX + 5)
                .map(|i| {
                    MgmtResult::ok("", None)
                        .on_instance("a")
                        .on_node(format!("n{i:05}"))
                })
                .collect(),
        );
        let listed = acted_on("stop", &many);
        assert_eq!(listed.len(), access::AUDIT_NODES_MAX + 1);
        assert_eq!(listed[0], "n00000");
        assert_eq!(listed.last().map(String::as_str), Some("..."));
    }

    #[test]
    fn an_apply_answer_acknowledges_unless_an_error_is_about_the_agent() {
        let ok = MgmtResult::ok("", None).on_instance("a").on_node("n1");
        let node_failed = MgmtResult::err("", "node exited with code 3")
            .on_instance("a")
            .on_node("n2");
        let not_written =
            MgmtResult::err("", "cannot record the desired state: no space").on_instance("a");
        assert!(acknowledges(&[]), "an agent without nodes");
        assert!(acknowledges(&[ok.clone(), node_failed.clone()]));
        assert!(!acknowledges(std::slice::from_ref(&not_written)));
        assert!(!acknowledges(&[ok, node_failed, not_written]));
    }

    #[test]
    fn more_nodes_than_an_agents_open_file_limit_allows_are_refused() {
        let mut config = Configuration::empty();
        for (name, instance) in [
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("o1", "old"),
        ] {
            config.nodes.push(Node::new(name, instance));
        }
        let room = |instance: &str| match instance {
            "a" | "b" => Some(2),
            _ => None,
        };
        assert_eq!(
            overfull_instances(&config, room),
            [
                "instance 'a' is given 3 nodes, but its agent's open-file limit leaves room for 2; raise the agent's limit (LimitNOFILE= in its unit, `ulimit -n`) or spread the nodes; nothing was deployed"
            ]
        );
        assert!(overfull_instances(&config, |_| Some(3)).is_empty());
    }

    #[test]
    fn pinning_beyond_an_instances_cpus_is_refused_naming_node_cpu_and_count() {
        let mut config = Configuration::empty();
        for (name, instance, affinity) in [
            ("fits", "small", Some(CpuAffinity::Many(vec![0, 1]))),
            ("edge", "small", Some(CpuAffinity::One(2))),
            ("free", "small", None),
            ("old", "unknown", Some(CpuAffinity::One(99))),
            ("big", "large", Some(CpuAffinity::Many(vec![1, 63, 64]))),
        ] {
            let mut n = Node::new(name, instance);
            n.cpu_affinity = affinity;
            config.nodes.push(n);
        }
        let cpus = |instance: &str| match instance {
            "small" => Some(2),
            "large" => Some(64),
            _ => None,
        };
        assert_eq!(
            impossible_affinities(&config, cpus),
            [
                "node 'edge' is pinned to CPU 2, but instance 'small' has 2 CPUs (numbered from 0); nothing was deployed",
                "node 'big' is pinned to CPU 64, but instance 'large' has 64 CPUs (numbered from 0); nothing was deployed",
            ]
        );
    }
}
