//! A node's book: which of the node's processes the agent follows, and what each event
//! about them (a spawn's outcome, an exit, readiness, a notify message, a failed health
//! check) changes.
//!
//! The node's [`Machine`] decides its lifecycle; the book ties that lifecycle to real
//! processes. It numbers spawns (and adoptions), so that news of a process that has
//! since been replaced is told apart and changes nothing; it holds the notify messages
//! that arrive while the node's process is being spawned, until their sender can be
//! checked against it; and it keeps what status shows of the node's past: how its last
//! process ended, why its last start failed, its OOM kills and failed health checks.
//!
//! Pure, like the machine: times come in, decisions go out, nothing here does I/O. The
//! process itself (`P`, the supervisor's handles on it) and a message's sender (`S`)
//! are opaque: the supervisor reads `/proc` to check a sender, kills what the book hands
//! back, writes records and starts monitors as the returned actions say.
//!
//! # Invariants (the simulation test below checks them after every step)
//! * The book follows a process exactly when the machine knows a pid, the same one:
//!   a spawn's outcome or an adoption sets both, the exit clears both.
//! * News about any process but the followed one changes nothing. A spawn's outcome
//!   that is not the one awaited hands its process back, to be killed: every process
//!   made for the node is followed, handed back, or has exited.
//! * At most [`NOTIFY_QUEUE`] messages are held, and only while a spawn is under way;
//!   its outcome hands them back to be checked, or drops them with a failed spawn.

use drover_proto::model;

use crate::machine::{Action, ExitStatus, Machine, Millis, Readiness};
use crate::probe::Notice;

/// Notify messages of one node that may wait, in the supervisor's queue or here while
/// a spawn is under way; further ones wait in the node's socket (whose kernel buffer is
/// bounded).
pub const NOTIFY_QUEUE: usize = 16;

/// One node's book (see the module docs).
#[derive(Debug)]
pub struct Book<P, S> {
    /// The node's lifecycle, told of every event the book lets through.
    pub machine: Machine,
    /// Spawns asked for and processes adopted so far: each process is known by its
    /// number, so that news of an old one is told apart.
    spawns: u64,
    /// The spawn whose outcome is awaited: any other outcome is refused, also a second
    /// one of the same spawn.
    awaited: Option<u64>,
    /// The token of the spawn under way, once its record announces it.
    spawning: Option<u64>,
    live: Option<Live<P>>,
    held: Vec<(String, S)>,
    /// How its last process ended (not known for an adopted one).
    pub last_exit: Option<model::ExitStatus>,
    /// Why its last start failed, or why its last process was killed, until it next runs.
    pub last_error: Option<String>,
    /// Why its process last ended unasked (OOM kill, liveness), and how often each.
    pub last_failure: Option<String>,
    pub oom_kills: u32,
    pub liveness_failures: u32,
    /// The last `STATUS=` its process sent.
    pub status_text: Option<String>,
}

/// The followed process: its number (see [`Book::spawns`]) and pid.
#[derive(Debug)]
struct Live<P> {
    spawn: u64,
    pid: u32,
    process: P,
    /// OOM kills in its memory cgroup counted already, while it ran (of a process of
    /// the node other than the main one, as it seemed), and when the last was seen.
    oom_seen: u64,
    oom_seen_at: Option<Millis>,
}

/// What a spawn's outcome does (see [`Book::spawned`]).
#[derive(Debug)]
pub enum Spawned<P, S> {
    /// Not the spawn the node waits for: its process is nobody's, kill it.
    Stale(P),
    /// The book follows the process now: carry out the machine's actions, then check
    /// the messages that came during the spawn (with [`Book::notified`]).
    Taken {
        actions: Vec<Action>,
        held: Vec<(String, S)>,
    },
}

/// What a notify message from the node's process does (see [`Book::notice`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Noticed {
    /// `WATCHDOG=1`: feed the process's watchdog.
    pub ping: bool,
    /// `STATUS=` changed the status text.
    pub status_changed: bool,
    /// The machine's actions (readiness).
    pub actions: Vec<Action>,
    /// `WATCHDOG=trigger` from a process with a watchdog: it is to be treated as hung
    /// ([`Book::unhealthy`], once the actions are carried out).
    pub trigger: bool,
}

impl<P, S> Book<P, S> {
    /// A book for a node that has no process yet.
    pub fn new(machine: Machine) -> Self {
        Self {
            machine,
            spawns: 0,
            awaited: None,
            spawning: None,
            live: None,
            held: Vec::new(),
            last_exit: None,
            last_error: None,
            last_failure: None,
            oom_kills: 0,
            liveness_failures: 0,
            status_text: None,
        }
    }

    /// Spawns asked for and processes adopted so far.
    pub fn spawns(&self) -> u64 {
        self.spawns
    }

    /// The token of the spawn under way, if one is and its record announced it.
    pub fn spawning(&self) -> Option<u64> {
        self.spawning
    }

    /// The followed process.
    pub fn process(&self) -> Option<&P> {
        self.live.as_ref().map(|l| &l.process)
    }

    /// The followed process.
    pub fn process_mut(&mut self) -> Option<&mut P> {
        self.live.as_mut().map(|l| &mut l.process)
    }

    /// The number of the followed process.
    pub fn live_spawn(&self) -> Option<u64> {
        self.live.as_ref().map(|l| l.spawn)
    }

    /// The pid of the followed process.
    pub fn pid(&self) -> Option<u32> {
        self.live.as_ref().map(|l| l.pid)
    }

    /// The machine asked for a spawn: its number, which its outcome must bring back.
    /// Every attempt counts, so that a restart whose spawn fails is told apart from the
    /// process before it.
    pub fn next_spawn(&mut self) -> u64 {
        self.spawns += 1;
        self.awaited = Some(self.spawns);
        self.spawns
    }

    /// The record of the spawn under way announces `token`.
    pub fn announce(&mut self, token: u64) {
        self.spawning = Some(token);
    }

    /// Why its last start failed, or why its last process was killed, until it next
    /// runs: what it is told ([`Book::last_error`]), or the readiness its process did
    /// not reach in time.
    pub fn error(&self) -> Option<String> {
        self.last_error.clone().or_else(|| {
            self.machine.unready().map(|readiness| {
                let within = drover_net::humanize(std::time::Duration::from_millis(
                    readiness.deadline_ms(),
                ));
                match readiness {
                    Readiness::Tcp { .. } => format!(
                        "not ready within {within}: its readiness port accepted no connection; killed"
                    ),
                    Readiness::Notify { .. } | Readiness::StartPeriod { .. } => format!(
                        "not ready within {within}: it sent no READY=1 on its NOTIFY_SOCKET; killed"
                    ),
                }
            })
        })
    }

    /// Whether the node's status is about to change again: its spawn is under way and
    /// its outcome will be reported with it.
    pub fn awaits_spawn(&self) -> bool {
        self.spawning.is_some() && self.live.is_none()
    }

    /// Spawn `spawn` made `process`, whose pid is `pid`.
    pub fn spawned(&mut self, now: Millis, spawn: u64, pid: u32, process: P) -> Spawned<P, S> {
        if self.awaited != Some(spawn) || self.live.is_some() {
            return Spawned::Stale(process);
        }
        self.awaited = None;
        self.spawning = None;
        self.status_text = None;
        self.last_error = None;
        self.live = Some(Live {
            spawn,
            pid,
            process,
            oom_seen: 0,
            oom_seen_at: None,
        });
        let actions = self.machine.spawned(now, pid);
        Spawned::Taken {
            actions,
            held: std::mem::take(&mut self.held),
        }
    }

    /// Spawn `spawn` failed: `None` when it is not the one the node waits for.
    pub fn spawn_failed(&mut self, now: Millis, spawn: u64, error: String) -> Option<Vec<Action>> {
        if self.awaited != Some(spawn) || self.live.is_some() {
            return None;
        }
        self.awaited = None;
        self.spawning = None;
        self.held.clear();
        self.last_error = Some(error.clone());
        Some(self.machine.spawn_failed(now, error))
    }

    /// The node's process `pid`, found running (started by an earlier agent process),
    /// is followed from now on; `was_ready`: its record says it was.
    pub fn adopted(&mut self, now: Millis, pid: u32, was_ready: bool, process: P) -> Vec<Action> {
        self.spawns += 1;
        let spawn = self.spawns;
        self.live = Some(Live {
            spawn,
            pid,
            process,
            oom_seen: 0,
            oom_seen_at: None,
        });
        self.machine.adopt(now, pid, was_ready)
    }

    /// Process `spawn` ended with `exit` (`Code(-1)`: unknown, as for an adopted
    /// process, which is not this agent's child), after `oom` kills by the kernel for
    /// its memory limit. The process, to clean up after, and the machine's actions;
    /// `None` when it was not the followed process.
    pub fn exited(
        &mut self,
        now: Millis,
        spawn: u64,
        exit: ExitStatus,
        oom: u64,
    ) -> Option<(P, Vec<Action>)> {
        if self.live_spawn() != Some(spawn) {
            return None;
        }
        let live = self.live.take()?;
        if exit != ExitStatus::Code(-1) {
            self.last_exit = Some(to_model_exit(exit));
        }
        // Those not counted while it ran: its own end, most likely, unless a stop was
        // asked for (a process of the node killed just before is no reason the node
        // stopped). So is a SIGKILL right after a kill was counted: the kernel counts
        // the kill before the process has gone, and the check may fall in between.
        let new = oom.saturating_sub(live.oom_seen);
        if new > 0 {
            self.oom_kills = self
                .oom_kills
                .saturating_add(u32::try_from(new).unwrap_or(u32::MAX));
        }
        let just_seen = live
            .oom_seen_at
            .is_some_and(|at| now.saturating_sub(at) <= OOM_SEEN_RECENTLY_MS);
        if (new > 0 || (just_seen && exit == ExitStatus::Signal(9))) && !self.machine.is_stopping()
        {
            self.last_failure = Some("oom-killed".to_owned());
            self.last_error = Some("oom-killed".to_owned());
        }
        Some((live.process, self.machine.exited(now, exit)))
    }

    /// The memory cgroup of process `spawn`, still running, has seen `oom` OOM kills
    /// since it started: a process of the node other than its main one was killed (the
    /// node runs on). The kills not counted yet, now counted; 0 when it is not the
    /// followed process.
    pub fn oom_while_running(&mut self, now: Millis, spawn: u64, oom: u64) -> u64 {
        let Some(live) = self.live.as_mut().filter(|l| l.spawn == spawn) else {
            return 0;
        };
        let new = oom.saturating_sub(live.oom_seen);
        live.oom_seen = live.oom_seen.max(oom);
        if new > 0 {
            live.oom_seen_at = Some(now);
        }
        if new > 0 {
            self.oom_kills = self
                .oom_kills
                .saturating_add(u32::try_from(new).unwrap_or(u32::MAX));
            self.last_failure = Some("oom-killed: a process of the node".to_owned());
        }
        new
    }

    /// Process `spawn` is ready (its TCP port answered).
    pub fn ready(&mut self, now: Millis, spawn: u64) -> Vec<Action> {
        if self.live_spawn() != Some(spawn) {
            return Vec::new();
        }
        self.machine.ready(now)
    }

    /// A health check of process `spawn` failed for `reason` (its monitors stop):
    /// `None` when it is not the followed process; no actions when the machine has
    /// nothing to restart (not ready yet, or being stopped), and then it does not count.
    pub fn unhealthy(&mut self, now: Millis, spawn: u64, reason: String) -> Option<Vec<Action>> {
        if self.live_spawn() != Some(spawn) {
            return None;
        }
        let actions = self.machine.unhealthy(now);
        if !actions.is_empty() {
            self.liveness_failures = self.liveness_failures.saturating_add(1);
            self.last_failure = Some(reason.clone());
            self.last_error = Some(reason);
        }
        Some(actions)
    }

    /// A notify message came: `Some` to check its sender now; `None` when it is held
    /// (a spawn is under way, and its sender may be the process being spawned) or,
    /// with [`NOTIFY_QUEUE`] held already, dropped.
    pub fn notified(&mut self, text: String, sender: S) -> Option<(String, S)> {
        if self.awaits_spawn() {
            if self.held.len() < NOTIFY_QUEUE {
                self.held.push((text, sender));
            }
            return None;
        }
        Some((text, sender))
    }

    /// A message from the followed process (its sender checked): `by_notify`, the
    /// node's readiness is `READY=1`; `watchdog`, the process has a watchdog.
    pub fn notice(
        &mut self,
        now: Millis,
        notice: Notice,
        by_notify: bool,
        watchdog: bool,
    ) -> Noticed {
        if self.live.is_none() {
            return Noticed::default();
        }
        let mut out = Noticed {
            ping: notice.watchdog,
            trigger: notice.trigger && watchdog,
            ..Noticed::default()
        };
        if let Some(status) = notice.status {
            self.status_text = Some(status);
            out.status_changed = true;
        }
        if notice.ready && by_notify {
            out.actions = self.machine.ready(now);
        }
        out
    }
}

/// How long after an OOM kill was counted while its node ran a SIGKILL of the main
/// process is taken for that kill (see [`Book::exited`]).
const OOM_SEEN_RECENTLY_MS: Millis = 2_000;

/// The wire's form of an exit status.
pub fn to_model_exit(e: ExitStatus) -> model::ExitStatus {
    match e {
        ExitStatus::Code(c) => model::ExitStatus::Code(c),
        ExitStatus::Signal(s) => model::ExitStatus::Signal(s),
    }
}

#[cfg(test)]
mod tests;
