//! Human-readable tables for `-o table` and `drover status`.
//!
//! Colour only on a terminal, and never when `NO_COLOR` is set.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use comfy_table::{Cell, Color, ContentArrangement, Table, presets};
use drover_proto::model::{
    ClusterRole, ExitStatus, MgmtResult, MgmtRole, NodeStatus, ResultData, State,
};

fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn new_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(Cell::new));
    t
}

fn state_cell(state: State, colour: bool) -> Cell {
    let cell = Cell::new(state.as_str());
    if !colour {
        return cell;
    }
    cell.fg(match state {
        State::Running => Color::Green,
        State::Pending => Color::Yellow,
        State::Stopped => Color::Grey,
        State::Crashed | State::Failed => Color::Red,
        State::Unknown => Color::Magenta,
    })
}

fn age(started_at_ms: Option<u64>) -> String {
    let Some(start) = started_at_ms else {
        return "-".into();
    };
    let secs = now_ms().saturating_sub(start) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// `text`, and when a crashed node is to start again (`at`, epoch ms): "restart in
/// 12s", or "restart due" once that time has come.
fn with_restart(text: String, at: Option<u64>) -> String {
    let Some(at) = at else {
        return text;
    };
    let when = match at.saturating_sub(now_ms()).div_ceil(1000) {
        0 => "restart due".to_owned(),
        secs @ 1..60 => format!("restart in {secs}s"),
        secs => format!("restart in {}m{}s", secs / 60, secs % 60),
    };
    if text.is_empty() {
        when
    } else {
        format!("{text}; {when}")
    }
}

/// Milliseconds since the Unix epoch, as nodes' times are given.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        format!("{:.1}", b as f64 / (1024.0 * 1024.0))
    })
}

/// The desired generation, from the controller's own entry in a get-nodes reply.
pub fn desired_generation(results: &[&MgmtResult]) -> Option<u64> {
    results
        .iter()
        .filter_map(|r| match &r.data {
            Some(ResultData::NodeStatuses(s)) => Some(s),
            _ => None,
        })
        .flatten()
        .find(|s| s.mgmt_role == MgmtRole::Controller)
        .and_then(|s| s.generation)
}

/// Each agent's applied generation, from its own entry in a get-nodes reply.
pub fn applied_generations(results: &[&MgmtResult]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in results {
        let (Some(instance), Some(ResultData::NodeStatuses(statuses))) = (&r.instance, &r.data)
        else {
            continue;
        };
        if let Some(g) = statuses
            .iter()
            .find(|s| s.mgmt_role == MgmtRole::Agent)
            .and_then(|s| s.generation)
        {
            out.insert(instance.clone(), g);
        }
    }
    out
}

/// A generation for the GEN column: an agent's applied one says when it lags the
/// desired one, or is ahead of it.
fn generation(applied: Option<u64>, desired: Option<u64>) -> String {
    match (applied, desired) {
        (None, _) => "-".into(),
        (Some(g), Some(d)) if g < d => format!("{g} (lags {d})"),
        (Some(g), Some(d)) if g > d => format!("{g} (ahead of {d})"),
        (Some(g), _) => g.to_string(),
    }
}

/// The warning for an agent that applied a generation newer than the desired one: the
/// controller's state is older than what was deployed.
fn ahead_warning(agent: &str, applied: Option<u64>, desired: Option<u64>) -> Option<String> {
    let (g, d) = (applied?, desired?);
    (g > d).then(|| {
        format!(
            "agent '{agent}' has applied generation {g}, newer than the controller's desired generation {d}: the controller's state is older than what was deployed (restored from an older copy?); the agent keeps what it runs until a deploy makes a newer generation"
        )
    })
}

/// A table and what goes with it: errors and warnings, one line each (`error: ...`,
/// `warning: ...`), which go to stderr so that the table on stdout stays the table.
#[derive(Debug, Default)]
pub struct Shown {
    pub table: String,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Shown {
    /// Whether the command succeeded: no error.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The error and warning lines, errors first.
    pub fn notes(&self) -> impl Iterator<Item = String> + '_ {
        self.errors
            .iter()
            .map(|e| format!("error: {e}"))
            .chain(self.warnings.iter().map(|w| format!("warning: {w}")))
    }
}

/// get-nodes as a table: one row per node, agents and the controller included. GEN is
/// the deploy generation: a node's spec, an agent's applied one, the controller's
/// desired one.
pub fn nodes(results: &[&MgmtResult], only: &[String]) -> Shown {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    nodes_at(results, now, only)
}

/// Days before expiry from which `status` warns about a certificate.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Whether `target` picks node `s` of `instance`: as the targets of `restart` and the
/// like (a name or a pattern of names, `role:ROLE`, `instance:NAME`).
fn selects(target: &str, instance: Option<&str>, s: &NodeStatus) -> bool {
    if let Some(role) = target.strip_prefix("role:") {
        s.mgmt_role == MgmtRole::None && s.cluster_role == ClusterRole::parse(role)
    } else if let Some(name) = target.strip_prefix("instance:") {
        instance == Some(name)
    } else {
        drover_proto::model::wildcard(target, &s.node)
    }
}

/// [`nodes`] as of `now` (Unix seconds), which decides the certificate warnings: one
/// line for the controller's or an agent's certificate that expires within
/// [`EXPIRY_WARNING_DAYS`] (or has expired). With `only` (targets, see [`selects`]),
/// the rows they pick; a target that picks none is an error.
pub fn nodes_at(results: &[&MgmtResult], now: i64, only: &[String]) -> Shown {
    let mut matched = vec![false; only.len()];
    let colour = colour();
    let mut warnings = Vec::new();
    let desired = desired_generation(results);
    let mut t = new_table(&[
        "INSTANCE", "NODE", "ROLE", "STATE", "PID", "RESTARTS", "UPTIME", "MEM MIB", "CPU S",
        "GEN", "STATUS",
    ]);
    let mut errors = Vec::new();
    for r in results {
        if !r.success {
            errors.push(format!(
                "{}: {}",
                r.instance.as_deref().unwrap_or("controller"),
                r.error.as_deref().unwrap_or("no reason given")
            ));
        }
        let Some(ResultData::NodeStatuses(statuses)) = &r.data else {
            continue;
        };
        let mut statuses: Vec<&NodeStatus> = statuses.iter().collect();
        statuses.sort_by(|a, b| {
            (a.mgmt_role == MgmtRole::None)
                .cmp(&(b.mgmt_role == MgmtRole::None))
                .then(a.node.cmp(&b.node))
        });
        for s in statuses {
            let hits: Vec<usize> = (0..only.len())
                .filter(|&i| selects(&only[i], r.instance.as_deref(), s))
                .collect();
            if !only.is_empty() && hits.is_empty() {
                continue;
            }
            for i in hits {
                matched[i] = true;
            }
            if let Some(not_after) = s.cert_not_after
                && matches!(s.mgmt_role, MgmtRole::Agent | MgmtRole::Controller)
            {
                let info = drover_net::tls::CertInfo {
                    serial: String::new(),
                    not_after,
                };
                let what = match s.mgmt_role {
                    MgmtRole::Agent => format!("the certificate of agent '{}'", s.node),
                    _ => format!("the certificate of controller '{}'", s.node),
                };
                warnings.extend(drover_net::tls::expiry_warning(
                    &what,
                    &info,
                    now,
                    EXPIRY_WARNING_DAYS,
                ));
            }
            if s.mgmt_role == MgmtRole::Agent {
                warnings.extend(ahead_warning(&s.node, s.generation, desired));
            }
            let role = match s.mgmt_role {
                MgmtRole::Agent => "(agent)".to_owned(),
                MgmtRole::Controller => "(controller)".to_owned(),
                _ if s.cluster_role.is_none() => "-".to_owned(),
                _ => s.cluster_role.as_str().to_owned(),
            };
            t.add_row(vec![
                Cell::new(r.instance.as_deref().unwrap_or("-")),
                Cell::new(&s.node),
                Cell::new(role),
                state_cell(s.state, colour),
                Cell::new(s.pid.map_or("-".into(), |p| p.to_string())),
                Cell::new(s.restarts),
                Cell::new(age(s.started_at_ms)),
                // The cgroup's figures cover the node's children too.
                Cell::new(mib(s.memory_bytes.or(s.rss_bytes))),
                Cell::new(
                    s.cgroup_cpu_ms
                        .or(s.cpu_ms)
                        .map_or("-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0)),
                ),
                Cell::new(match s.mgmt_role {
                    MgmtRole::Agent => generation(s.generation, desired),
                    _ => generation(s.generation, None),
                }),
                // A stop under way first: the state stays RUNNING until the process
                // has ended. Why the last start failed says more than the node's own
                // status; a crashed or failed node without either says how its
                // process ended.
                // What a node wrote, shown with its control characters written out.
                Cell::new(crate::visible::visible(&with_restart(
                    match (&s.last_error, &s.last_failure, &s.status_text) {
                        _ if s.stopping_since_ms.is_some() => {
                            format!("stopping for {}", age(s.stopping_since_ms))
                        }
                        (Some(e), _, _) => format!("error: {e}"),
                        (None, Some(f), _) => format!("last failure: {f}"),
                        (None, None, Some(t)) => t.clone(),
                        (None, None, None) => match (s.state, s.last_exit) {
                            (State::Crashed | State::Failed, Some(exit)) => exit_text(exit),
                            _ => String::new(),
                        },
                    },
                    s.restart_at_ms,
                ))),
            ]);
        }
    }
    for (pattern, _) in only.iter().zip(&matched).filter(|(_, m)| !**m) {
        errors.push(format!("no node matches '{pattern}'"));
    }
    // Targets that pick nothing show no table, only why.
    let picked = !only.is_empty() && matched.iter().any(|m| *m);
    Shown {
        table: if only.is_empty() || picked {
            t.to_string()
        } else {
            String::new()
        },
        errors,
        warnings,
    }
}

/// How a node's last process ended, for the STATUS column.
fn exit_text(exit: ExitStatus) -> String {
    const NAMES: &[(i32, &str)] = &[
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (3, "SIGQUIT"),
        (4, "SIGILL"),
        (6, "SIGABRT"),
        (7, "SIGBUS"),
        (8, "SIGFPE"),
        (9, "SIGKILL"),
        (11, "SIGSEGV"),
        (13, "SIGPIPE"),
        (15, "SIGTERM"),
    ];
    match exit {
        ExitStatus::Code(c) => format!("exited with code {c}"),
        ExitStatus::Signal(n) => match NAMES.iter().find(|(v, _)| *v == n) {
            Some((_, name)) => format!("killed by {name}"),
            None => format!("killed by signal {n}"),
        },
    }
}

/// get-instances as a table, with each instance's applied deploy generation (from a
/// get-nodes reply, when there is one).
pub fn instances(result: Option<&MgmtResult>, nodes: &[&MgmtResult]) -> Shown {
    let desired = desired_generation(nodes);
    let applied = applied_generations(nodes);
    let mut t = new_table(&["INSTANCE", "HOST", "PORT", "GENERATION"]);
    let Some(ResultData::Instances(list)) = result.and_then(|r| r.data.as_ref()) else {
        return Shown {
            errors: vec![
                result
                    .and_then(|r| r.error.as_deref())
                    .unwrap_or("no instances in the reply")
                    .to_owned(),
            ],
            ..Shown::default()
        };
    };
    for i in list {
        t.add_row(vec![
            i.name.clone(),
            i.host.map_or("-".into(), |h| h.to_string()),
            i.port.map_or("-".into(), |p| p.to_string()),
            generation(applied.get(&i.name).copied(), desired),
        ]);
    }
    Shown {
        table: t.to_string(),
        ..Shown::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::model::ResultData;

    #[test]
    fn certificates_close_to_expiry_are_warned_about() {
        let day = 86_400;
        let now = 1_000 * day;
        let mut ctl = NodeStatus::new("controller", State::Running, MgmtRole::Controller);
        ctl.cert_not_after = Some(now + 300 * day);
        let mut a1 = NodeStatus::new("a1", State::Running, MgmtRole::Agent);
        a1.cert_not_after = Some(now + 12 * day + 5);
        let mut a2 = NodeStatus::new("a2", State::Running, MgmtRole::Agent);
        a2.cert_not_after = Some(now - 2 * day);
        // A node's entry never carries one; an agent's without it is not warned about.
        let a3 = NodeStatus::new("a3", State::Running, MgmtRole::Agent);
        let results = [
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![ctl]))),
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![a1, a2, a3]))),
        ];
        let refs: Vec<&MgmtResult> = results.iter().collect();
        let shown = nodes_at(&refs, now, &[]);
        assert!(shown.ok());
        assert!(!shown.table.contains("warning"), "{}", shown.table);
        let warnings: Vec<String> = shown.notes().collect();
        assert_eq!(
            warnings,
            [
                "warning: the certificate of agent 'a1' expires in 12 days; renew it with `drover ca renew`",
                "warning: the certificate of agent 'a2' expired 2 days ago",
            ]
        );
        let shown = nodes_at(&refs, now - 400 * day, &[]);
        assert!(shown.warnings.is_empty(), "{shown:?}");
    }

    #[test]
    fn an_agent_ahead_of_the_desired_generation_is_shown_and_warned_about() {
        let mut ctl = NodeStatus::new("controller", State::Running, MgmtRole::Controller);
        ctl.generation = Some(5);
        let agent = |name: &str, g: u64| {
            let mut a = NodeStatus::new(name, State::Running, MgmtRole::Agent);
            a.generation = Some(g);
            a
        };
        let results = [
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![ctl]))),
            MgmtResult::ok(
                "r",
                Some(ResultData::NodeStatuses(vec![
                    agent("a1", 4),
                    agent("a2", 5),
                    agent("a3", 7),
                ])),
            ),
        ];
        let refs: Vec<&MgmtResult> = results.iter().collect();
        let shown = nodes_at(&refs, 0, &[]);
        let row = |name: &str| {
            shown
                .table
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap()
                .to_owned()
        };
        assert!(row("a1").contains("4 (lags 5)"), "{}", shown.table);
        assert!(row("a2").contains(" 5 "), "{}", shown.table);
        assert!(row("a3").contains("7 (ahead of 5)"), "{}", shown.table);
        assert_eq!(
            shown.warnings,
            [
                "agent 'a3' has applied generation 7, newer than the controller's desired generation 5: the controller's state is older than what was deployed (restored from an older copy?); the agent keeps what it runs until a deploy makes a newer generation"
            ]
        );
    }

    #[test]
    fn a_crashed_or_failed_node_shows_how_its_process_ended_unless_something_says_more() {
        let node = |name: &str, state, exit, error: Option<&str>| {
            let mut n = NodeStatus::new(name, state, MgmtRole::None);
            n.last_exit = exit;
            n.last_error = error.map(str::to_owned);
            n
        };
        let statuses = vec![
            node("a-crashed", State::Crashed, Some(ExitStatus::Code(3)), None),
            node(
                "b-failed",
                State::Failed,
                Some(ExitStatus::Signal(11)),
                None,
            ),
            node("c-odd", State::Failed, Some(ExitStatus::Signal(40)), None),
            node(
                "d-exec",
                State::Failed,
                None,
                Some("cannot execute /x: no such file"),
            ),
            // Stopped by an operator: its SIGTERM is no news.
            node(
                "e-stopped",
                State::Stopped,
                Some(ExitStatus::Signal(15)),
                None,
            ),
        ];
        let results = [MgmtResult::ok(
            "r",
            Some(ResultData::NodeStatuses(statuses)),
        )];
        let refs: Vec<&MgmtResult> = results.iter().collect();
        let text = nodes_at(&refs, 0, &[]).table;
        let row = |name: &str| text.lines().find(|l| l.contains(name)).unwrap().to_owned();
        assert!(row("a-crashed").contains("exited with code 3"), "{text}");
        assert!(row("b-failed").contains("killed by SIGSEGV"), "{text}");
        assert!(row("c-odd").contains("killed by signal 40"), "{text}");
        assert!(row("d-exec").contains("error: cannot execute /x"), "{text}");
        assert!(!row("e-stopped").contains("killed"), "{text}");
    }

    #[test]
    fn targets_pick_rows_and_one_picking_none_is_an_error() {
        let node = |name: &str, role: &str| {
            let mut n = NodeStatus::new(name, State::Running, MgmtRole::None);
            n.cluster_role = ClusterRole::parse(role);
            n
        };
        let mut on_1 = MgmtResult::ok(
            "r",
            Some(ResultData::NodeStatuses(vec![
                NodeStatus::new("agent-1", State::Running, MgmtRole::Agent),
                node("worker-1", "worker"),
                node("worker-2", "worker"),
            ])),
        );
        on_1.instance = Some("agent-1".into());
        let mut on_2 = MgmtResult::ok(
            "r",
            Some(ResultData::NodeStatuses(vec![
                NodeStatus::new("agent-2", State::Running, MgmtRole::Agent),
                node("logger", "logger"),
            ])),
        );
        on_2.instance = Some("agent-2".into());
        let results = [on_1, on_2];
        let refs: Vec<&MgmtResult> = results.iter().collect();
        let rows = |shown: &Shown| -> Vec<String> {
            shown
                .table
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .collect()
        };
        let only = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let shown = nodes_at(&refs, 0, &only(&["worker-*", "logger"]));
        assert!(shown.ok(), "{shown:?}");
        assert_eq!(
            rows(&shown),
            ["worker-1", "worker-2", "logger"],
            "{shown:?}"
        );
        let shown = nodes_at(&refs, 0, &only(&["worker-2", "proxy*"]));
        assert!(!shown.ok(), "{shown:?}");
        assert_eq!(rows(&shown), ["worker-2"], "{shown:?}");
        assert_eq!(
            shown.notes().collect::<Vec<_>>(),
            ["error: no node matches 'proxy*'"]
        );
        let shown = nodes_at(&refs, 0, &only(&["role:worker"]));
        assert!(shown.ok(), "{shown:?}");
        assert_eq!(rows(&shown), ["worker-1", "worker-2"], "{shown:?}");
        let shown = nodes_at(&refs, 0, &only(&["instance:agent-2", "role:proxy"]));
        assert!(!shown.ok(), "{shown:?}");
        assert_eq!(rows(&shown), ["agent-2", "logger"], "{shown:?}");
        assert_eq!(shown.errors, ["no node matches 'role:proxy'"]);
        let shown = nodes_at(&refs, 0, &[]);
        assert!(shown.ok());
        assert_eq!(rows(&shown).len(), 5, "{shown:?}");
        // Targets that pick nothing: no table, only why.
        let shown = nodes_at(&refs, 0, &only(&["nope"]));
        assert!(!shown.ok());
        assert_eq!(shown.table, "", "{shown:?}");
        assert_eq!(shown.errors, ["no node matches 'nope'"]);
    }

    #[test]
    fn a_pending_restart_shows_when_it_comes() {
        let now_ms = now_ms();
        assert_eq!(with_restart("x".into(), None), "x");
        assert_eq!(
            with_restart("exited with code 3".into(), Some(now_ms + 89_500)),
            "exited with code 3; restart in 1m30s"
        );
        assert_eq!(
            with_restart(String::new(), Some(now_ms + 4_200)),
            "restart in 5s"
        );
        assert_eq!(
            with_restart("x".into(), Some(now_ms - 10)),
            "x; restart due"
        );
    }

    #[test]
    fn a_stop_under_way_shows_how_long_it_has_taken() {
        let now_ms = now_ms();
        let mut stopping = NodeStatus::new("a-stopping", State::Running, MgmtRole::None);
        stopping.pid = Some(7);
        stopping.status_text = Some("serving".into());
        stopping.stopping_since_ms = Some(now_ms - 125_000);
        let mut running = NodeStatus::new("b-running", State::Running, MgmtRole::None);
        running.status_text = Some("serving".into());
        let results = [MgmtResult::ok(
            "r",
            Some(ResultData::NodeStatuses(vec![stopping, running])),
        )];
        let refs: Vec<&MgmtResult> = results.iter().collect();
        let text = nodes_at(&refs, 0, &[]).table;
        let row = |name: &str| text.lines().find(|l| l.contains(name)).unwrap().to_owned();
        assert!(row("a-stopping").contains("stopping for 2m"), "{text}");
        assert!(row("a-stopping").contains("RUNNING"), "{text}");
        assert!(!row("b-running").contains("stopping"), "{text}");
        assert!(row("b-running").contains("serving"), "{text}");
    }
}
