//! Deterministic lifecycle state machine for **one** supervised node.
//!
//! # Model
//!
//! This module is *sans-IO* (in the style of `quinn-proto`): it never spawns,
//! signals, sleeps or reads a clock. A thin async shell owns the real process
//! and drives a [`Machine`] by
//!
//! 1. calling an event method ([`Machine::start`], [`Machine::spawned`],
//!    [`Machine::exited`], …) whenever something happens, passing the current
//!    monotonic time as `now: `[`Millis`];
//! 2. executing the returned [`Action`]s **in order** (spawn the node, signal
//!    or kill its process group, report a state change to the controller);
//! 3. sleeping until [`Machine::next_deadline`] (if any) and then calling
//!    [`Machine::tick`].
//!
//! Because time is only ever an argument, the machine is fully deterministic
//! and can be driven by a fake clock in simulation tests.
//!
//! # Reported states
//!
//! | [`State`]  | meaning |
//! |------------|---------|
//! | `Pending`  | a start is in progress: [`Action::Spawn`] was issued and not yet answered, or the process exists but is not ready yet |
//! | `Running`  | the process is alive and was declared ready |
//! | `Stopped`  | no process: never started, stopped by request, or exited successfully under [`RestartPolicy::OnFailure`]/[`RestartPolicy::Never`] |
//! | `Crashed`  | no process: it exited or failed to start unexpectedly and an automatic restart is scheduled ([`Machine::next_restart_at`]) |
//! | `Failed`   | no process and no restart scheduled: the crash-loop limit was hit, or the policy is `Never` and the node failed |
//!
//! **Stopping is internal.** While a requested stop is in progress the
//! reported state stays what it was (`Pending` or `Running`) until the
//! process is actually gone, then becomes `Stopped`. So `Stopped`/`Failed`/
//! `Crashed` always mean "no process exists", and `Pending`/`Running` always
//! mean "a process exists (or is being spawned)". [`Machine::is_stopping`]
//! tells the two cases apart for observability. Likewise, after a readiness
//! timeout the machine sends [`Action::Kill`] and keeps reporting `Pending`
//! until the killed process has exited.
//!
//! # Events
//!
//! * [`Machine::start`]: the operator wants the node running. From
//!   `Stopped`/`Failed` it resets the failure streak and issues `Spawn`; from
//!   `Crashed` it spawns at once (skipping the rest of the backoff) but keeps
//!   the streak; while a stop is in progress it schedules a fresh spawn for
//!   when the old process has exited (operator "restart" = `stop` + `start`),
//!   also when the stop came while a spawn was under way: the process of that
//!   spawn is stopped once it exists, and a new one spawned after it. Otherwise
//!   a no-op. [`Machine::reconfigure`] gives a restart for a changed spec the
//!   new settings.
//! * [`Machine::spawned`] / [`Machine::spawn_failed`]: the shell's answer to
//!   exactly one `Spawn`. A spawn failure (e.g. `ENOENT`) counts as a failed
//!   start and goes through backoff like any other; there is no
//!   "non-retryable" class, the crash-loop limit ends hopeless cases.
//! * [`Machine::ready`]: a `READY=1` notification or an accepted TCP
//!   connection. Only meaningful with [`Readiness::Notify`] or
//!   [`Readiness::Tcp`]; **ignored under [`Readiness::StartPeriod`]**, where
//!   readiness is defined purely as "still alive when the period ends".
//! * [`Machine::exited`]: the process is gone; see the policy table below.
//! * [`Machine::stop`]: the operator wants it stopped. A live process gets
//!   [`Action::SignalStop`] and, if still alive after
//!   [`MachineConfig::stop_timeout_ms`], [`Action::Kill`]; a scheduled
//!   restart is cancelled; `Failed` becomes `Stopped`.
//! * [`Machine::unhealthy`]: a liveness check (watchdog, probe) failed while
//!   the node was ready. The process gets [`Action::Kill`], the failure is
//!   counted, and its exit leads to a restart under the policy (or `Failed`),
//!   exactly as a crash after ready would; the state stays `Running` until
//!   the exit is seen.
//! * [`Machine::adopt`]: a fresh agent found the node already running.
//! * [`Machine::tick`]: timers. Calling it early, late or repeatedly is
//!   harmless.
//!
//! Events that make no sense in the current state (an exit with no process, a
//! `ready` after the exit, a second `spawned`, `stop` while stopped, `start`
//! while running, …) are ignored and return no actions. Nothing panics, and
//! all time arithmetic saturates, even for out-of-order times.
//!
//! # Time
//!
//! Every event method first brings the machine up to `now` exactly as
//! `tick(now)` would, then applies the event, then fires any timer that the
//! event armed with a zero delay. Timers take effect *at their deadline*, not
//! at the (possibly later) time the shell noticed them: a start period that
//! ended at `t` sets `ready_at = t` even if the next call arrives at `t + 5s`.
//! A shell that ticks late therefore gets the same decisions as one that
//! ticks on time (except that [`Machine::exited`] does not emit a `Kill`
//! that fell due before it for the very process it reports dead). In
//! particular an exit reported after the start period has
//! elapsed is a crash after readiness, not a failed start; and a `ready()`
//! that arrives after the readiness timeout is too late.
//!
//! After any call at time `t`, [`Machine::next_deadline`] is either `None` or
//! strictly greater than `t`. It is `None` whenever nothing is pending: a
//! steadily running node causes **no** periodic wake-ups (the healthy-uptime
//! rule below is evaluated lazily).
//!
//! # Restart policies
//!
//! An exit that was not requested by [`Machine::stop`]:
//!
//! | exit …                       | `Never`  | `OnFailure` (default) | `Always` |
//! |------------------------------|----------|-----------------------|----------|
//! | before ready (failed start)  | `Failed` | restart               | restart  |
//! | after ready, success code    | `Stopped`| `Stopped`             | restart  |
//! | after ready, failure/signal  | `Failed` | restart               | restart  |
//!
//! "Success" means [`ExitStatus::Code`] listed in
//! [`MachineConfig::success_exit_codes`]; death by signal is never success
//! (a node killed by someone else than this machine did not finish cleanly).
//! Any exit before ready is a failed start whatever its status: a node is
//! expected to become ready. Every "restart" above goes through the backoff
//! and the crash-loop rule, so it may yield `Failed` instead of `Crashed`.
//! An exit after [`Machine::stop`] always yields `Stopped` (or a fresh spawn
//! if `start` was called during the stop).
//!
//! # Backoff and the crash-loop rule
//!
//! The machine keeps a *failure streak* ([`Machine::consecutive_failures`]).
//! It is incremented by every failed start (spawn failure, exit before
//! ready, readiness timeout) **and** by every unrequested exit after ready
//! that leads to a restart or to `Failed` (under `Always` that includes a
//! successful exit, otherwise a node that exits 0 instantly would be
//! restarted in a tight loop forever).
//!
//! * The k-th consecutive failure (k ≥ 1) delays the restart by
//!   `min(backoff_initial_ms * backoff_multiplier^(k-1), backoff_max_ms)`,
//!   rounded to the nearest millisecond, or 0 if `backoff_initial_ms` is 0
//!   (see [`MachineConfig::backoff_delay_ms`]), but never sooner than
//!   [`MIN_START_INTERVAL_MS`] after the previous spawn.
//! * When the streak reaches [`MachineConfig::max_failed_starts`] (unless it
//!   is 0), the machine gives up: `Failed`, no more `Spawn`.
//! * A process that stayed **ready** for at least
//!   [`MachineConfig::reset_after_ms`] resets the streak to 0, so its crash
//!   starts a new streak (k = 1: shortest delay, full budget).
//! * An operator `start` from `Stopped`/`Failed`, and [`Machine::adopt`],
//!   also reset it.
//!
//! This is systemd's `StartLimitBurst` idea: a crash loop, whether the node
//! dies during startup or a few seconds after becoming ready, is stopped
//! after `max_failed_starts` attempts, while a node that crashes once a day
//! is restarted forever with the shortest delay. Setting `reset_after_ms` to
//! 0 makes only consecutive *failed starts* count towards `Failed`.
//!
//! [`Machine::restart_count`] counts only the **automatic** re-spawns (those
//! issued when a backoff delay elapsed); operator `start`s are not counted.
//!
//! # Defaults
//!
//! See [`MachineConfig`]'s fields: restart on failure, backoff 100 ms ×2 up
//! to 30 s, streak reset after 60 s of ready uptime, give up after 5
//! consecutive failures, exit code 0 is success, ready after a 1 s start
//! period, 10 s between the stop signal and `SIGKILL`.
//!
//! # Shell contract
//!
//! * Answer every [`Action::Spawn`] with exactly one `spawned` or
//!   `spawn_failed`; the machine never issues another `Spawn` before that
//!   answer and the exit of the process it produced.
//! * Report the death of the spawned (or adopted) process with `exited`.
//!   After [`Action::Kill`] the machine waits for that exit without any
//!   further deadline.
//! * The machine does not time out a `Spawn` that is never answered.

use std::fmt;

/// Monotonic time in milliseconds since an arbitrary epoch chosen by the
/// shell (e.g. the agent's start). Only differences matter.
pub type Millis = u64;

/// The node state reported to the controller. The variant names are part of
/// the wire protocol; see the module docs for their exact meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// A start is in progress (spawn requested, or process not ready yet).
    Pending,
    /// The process is alive and ready.
    Running,
    /// No process, by request or after a successful exit; the initial state.
    Stopped,
    /// No process after an unexpected exit; a restart is scheduled.
    Crashed,
    /// No process and no restart will be attempted.
    Failed,
}

impl State {
    /// The variant name, exactly as spelled in the enum (`"Pending"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Stopped => "Stopped",
            Self::Crashed => "Crashed",
            Self::Failed => "Failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When an unrequested exit leads to a restart (see the module docs table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestartPolicy {
    /// Never restart: success after ready → `Stopped`, anything else →
    /// `Failed`.
    Never,
    /// Restart after failures only; a successful exit after ready →
    /// `Stopped`. The default, like systemd's common `Restart=on-failure`:
    /// a node that decides to exit cleanly is respected.
    #[default]
    OnFailure,
    /// Restart after every unrequested exit, successful or not.
    Always,
}

/// How the machine decides that a freshly started process is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Readiness {
    /// The node sends a systemd-style `READY=1`; the shell calls
    /// [`Machine::ready`]. No notification within `timeout_ms` of the spawn
    /// is a failed start.
    Notify {
        /// Milliseconds allowed between spawn and notification (> 0).
        timeout_ms: u64,
    },
    /// The shell probes a TCP port and calls [`Machine::ready`] once a
    /// connection is accepted. No success within `timeout_ms` is a failed
    /// start.
    Tcp {
        /// Milliseconds allowed between spawn and the first accepted
        /// connection (> 0).
        timeout_ms: u64,
    },
    /// The process is ready once it has stayed alive for `ms` milliseconds;
    /// [`Machine::ready`] is ignored. `0` means ready as soon as spawned.
    StartPeriod {
        /// Milliseconds the process must survive after the spawn.
        ms: u64,
    },
}

impl Default for Readiness {
    /// `StartPeriod { ms: 1000 }`: needs no cooperation from the node, and
    /// one second is enough to catch the usual immediate failures (bad
    /// flags, missing files, port in use) without delaying reports much.
    fn default() -> Self {
        Self::StartPeriod { ms: 1000 }
    }
}

impl Readiness {
    /// Milliseconds after the spawn at which the readiness deadline falls
    /// (the timeout, or the start period).
    pub const fn deadline_ms(self) -> u64 {
        match self {
            Self::Notify { timeout_ms } | Self::Tcp { timeout_ms } => timeout_ms,
            Self::StartPeriod { ms } => ms,
        }
    }

    /// Whether readiness is signalled through [`Machine::ready`] (`Notify`,
    /// `Tcp`) rather than inferred from survival (`StartPeriod`).
    pub const fn is_signalled(self) -> bool {
        matches!(self, Self::Notify { .. } | Self::Tcp { .. })
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// Normal exit with this exit code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    /// As an operator reads it in the agent's log: `Code(-1)` is how a process that is
    /// not the agent's child (adopted from an earlier agent) ends, its status unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(-1) => f.write_str("status unknown (not this agent's child)"),
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What the shell must do, in the order returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Exec the node now; answer with [`Machine::spawned`] or
    /// [`Machine::spawn_failed`].
    Spawn,
    /// Send the configured stop signal to the process group.
    SignalStop,
    /// `SIGKILL` the process group.
    Kill,
    /// Report the new state to the controller (only emitted on an actual
    /// change).
    StateChanged(State),
}

/// Per-node supervision settings. Check them with
/// [`MachineConfig::validate`]; the machine itself never panics on invalid
/// values but may then behave unhelpfully (e.g. a NaN multiplier yields the
/// maximum delay).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    /// Which unrequested exits lead to a restart. Default
    /// [`RestartPolicy::OnFailure`].
    pub restart: RestartPolicy,
    /// Restart delay after the first failure of a streak. Default 100 ms:
    /// long enough not to spin on an instant failure, short enough that a
    /// one-off crash costs almost nothing. 0 restarts immediately (the
    /// `Spawn` comes in the same call as the exit) and makes every delay 0.
    pub backoff_initial_ms: u64,
    /// Factor applied to the delay for each further consecutive failure.
    /// Default 2.0 (classic exponential backoff). Must be finite and ≥ 1.0.
    pub backoff_multiplier: f64,
    /// Upper bound of the delay. Default 30 000 ms: a broken node is retried
    /// at least twice a minute, so it comes back soon after its cause (a
    /// dependency, a disk, a port) is fixed. Must be ≥ `backoff_initial_ms`.
    pub backoff_max_ms: u64,
    /// Ready uptime after which the failure streak resets. Default 60 000 ms:
    /// a node that served for a minute was genuinely working, so its next
    /// crash is a new incident, not part of a crash loop (systemd's
    /// `StartLimitIntervalSec` plays the same role). 0 = any readiness
    /// resets the streak, so only consecutive failed starts lead to `Failed`.
    pub reset_after_ms: u64,
    /// Consecutive failures (see the module docs) after which the machine
    /// gives up with [`State::Failed`]. Default 5, like systemd's
    /// `StartLimitBurst`: with the default backoff that is ~1.5 s of
    /// retries, enough to ride out a transient hiccup, little enough to
    /// surface a real breakage quickly. 0 = never give up.
    pub max_failed_starts: u32,
    /// Exit codes that count as a successful exit. Default `[0]`, the Unix
    /// convention. May be empty (every exit is a failure).
    pub success_exit_codes: Vec<i32>,
    /// How readiness is established. Default `StartPeriod { ms: 1000 }` (see
    /// [`Readiness::default`]).
    pub readiness: Readiness,
    /// Time between [`Action::SignalStop`] and [`Action::Kill`] when the
    /// process ignores the stop signal. Default 10 000 ms, systemd's and
    /// Docker's order of magnitude for a graceful shutdown (flush, close
    /// connections). 0 kills right after the stop signal.
    pub stop_timeout_ms: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            restart: RestartPolicy::OnFailure,
            backoff_initial_ms: 100,
            backoff_multiplier: 2.0,
            backoff_max_ms: 30_000,
            reset_after_ms: 60_000,
            max_failed_starts: 5,
            success_exit_codes: vec![0],
            readiness: Readiness::default(),
            stop_timeout_ms: 10_000,
        }
    }
}

impl MachineConfig {
    /// Check the values.
    ///
    /// # Errors
    ///
    /// A lower-case message naming the offending field: a
    /// `backoff_multiplier` that is NaN, infinite or < 1.0; a
    /// `backoff_max_ms` below `backoff_initial_ms`; a `Notify`/`Tcp`
    /// readiness `timeout_ms` of 0.
    pub fn validate(&self) -> Result<(), String> {
        let m = self.backoff_multiplier;
        if !m.is_finite() || m < 1.0 {
            return Err(format!(
                "backoff_multiplier must be a finite number >= 1.0, got {m}"
            ));
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(format!(
                "backoff_max_ms ({}) must be >= backoff_initial_ms ({})",
                self.backoff_max_ms, self.backoff_initial_ms
            ));
        }
        if self.readiness.is_signalled() && self.readiness.deadline_ms() == 0 {
            return Err("readiness timeout_ms must be > 0".to_owned());
        }
        Ok(())
    }

    /// Restart delay for the `k`-th consecutive failure (`k` ≥ 1; 0 is
    /// treated as 1): `min(initial * multiplier^(k-1), max)` rounded to the
    /// nearest millisecond, 0 if `initial` is 0.
    pub fn backoff_delay_ms(&self, k: u32) -> u64 {
        if self.backoff_initial_ms == 0 {
            return 0;
        }
        // Beyond ~1100 doublings every finite multiplier > 1 overflows to
        // infinity anyway; clamping keeps the `i32` conversion lossless.
        let exponent = i32::try_from(k.saturating_sub(1).min(4096)).unwrap_or(4096);
        let raw = self.backoff_initial_ms as f64 * self.backoff_multiplier.powi(exponent);
        let max = self.backoff_max_ms;
        if raw.is_nan() || raw >= max as f64 {
            max
        } else {
            // `as` saturates: a negative value (invalid multiplier) gives 0.
            (raw.round() as u64).min(max)
        }
    }

    /// Whether `exit` counts as a successful exit.
    pub fn is_success(&self, exit: ExitStatus) -> bool {
        match exit {
            ExitStatus::Code(code) => self.success_exit_codes.contains(&code),
            ExitStatus::Signal(_) => false,
        }
    }
}

/// Internal phase; finer than [`State`]. The comment names the state
/// reported in each phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No process, nothing scheduled. `Stopped` or `Failed`.
    Idle,
    /// `Spawn` issued, answer not received yet. `Pending`.
    Spawning {
        /// `stop` arrived meanwhile: stop the process as soon as it exists.
        stop_requested: bool,
        /// `start` arrived after that `stop`: once the process is gone, spawn again
        /// (a restart asked for during a spawn wants a process spawned after it).
        then_start: bool,
    },
    /// Process alive, not ready; readiness deadline armed. `Pending`.
    Starting { deadline: Millis },
    /// Process alive and ready. `Running`.
    Running,
    /// Readiness timed out or a liveness check failed, `Kill` sent (failure
    /// already counted), waiting for the exit. `Pending` or `Running`, as
    /// before.
    Aborting,
    /// Requested stop in progress. Reports the state it had (`Pending` or
    /// `Running`).
    Stopping {
        /// When to send `Kill`; `None` once it was sent.
        kill_at: Option<Millis>,
        /// `start` arrived meanwhile: spawn again once the process is gone.
        then_start: bool,
    },
    /// Waiting to restart. `Crashed`.
    Backoff { restart_at: Millis },
}

/// The lifecycle state machine of one supervised node. See the module docs.
#[derive(Debug, Clone)]
pub struct Machine {
    config: MachineConfig,
    phase: Phase,
    state: State,
    pid: Option<u32>,
    started_at: Option<Millis>,
    /// When the last spawn was attempted, for [`MIN_START_INTERVAL_MS`].
    last_spawn: Option<Millis>,
    ready_at: Option<Millis>,
    last_exit: Option<ExitStatus>,
    last_spawn_error: Option<String>,
    /// The readiness that the current or last process was killed for not reaching in
    /// time; until a process is spawned or adopted again.
    unready: Option<Readiness>,
    restart_count: u64,
    consecutive_failures: u32,
}

/// A restart never comes sooner than this after the previous spawn, whatever the
/// backoff says: a zero backoff with unlimited retries then restarts a crash-looping
/// node at most 50 times a second, while a node that ran a while before it died is
/// replaced at once.
pub const MIN_START_INTERVAL_MS: Millis = 20;

impl Machine {
    /// A machine in [`State::Stopped`] with no process; call
    /// [`Machine::start`] or [`Machine::adopt`] next.
    pub fn new(config: MachineConfig) -> Self {
        Self {
            config,
            phase: Phase::Idle,
            state: State::Stopped,
            pid: None,
            started_at: None,
            last_spawn: None,
            ready_at: None,
            last_exit: None,
            last_spawn_error: None,
            unready: None,
            restart_count: 0,
            consecutive_failures: 0,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Takes the settings of a changed spec, after [`Machine::stop`] of its old
    /// process: the stop under way keeps the deadline it was given, and the next spawn
    /// (its readiness) and every exit and restart after it follow `config`.
    pub fn reconfigure(&mut self, config: MachineConfig) {
        self.config = config;
    }

    /// The state as last reported through [`Action::StateChanged`].
    pub fn state(&self) -> State {
        self.state
    }

    /// Automatic re-spawns so far (after a crash or failed start, when the
    /// backoff delay elapsed). Never decreases.
    pub fn restart_count(&self) -> u64 {
        self.restart_count
    }

    /// Current failure streak (see the module docs). A streak reset by
    /// healthy uptime is applied at the first call made after
    /// `ready_at + reset_after_ms`.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// How the most recent process ended, if one ever did.
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// The error of the most recent [`Machine::spawn_failed`], if any.
    pub fn last_spawn_error(&self) -> Option<&str> {
        self.last_spawn_error.as_deref()
    }

    /// The readiness the current or last process was killed for not reaching within
    /// its timeout, until a process is spawned or adopted again: why the start failed.
    pub fn unready(&self) -> Option<Readiness> {
        self.unready
    }

    /// Pid of the current process (also while it is being stopped or
    /// killed); `None` when there is none or it is still being spawned.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// When the current process was spawned (or adopted).
    pub fn started_at(&self) -> Option<Millis> {
        self.started_at
    }

    /// When the current process became ready.
    pub fn ready_at(&self) -> Option<Millis> {
        self.ready_at
    }

    /// When the scheduled automatic restart is due (only in
    /// [`State::Crashed`]).
    pub fn next_restart_at(&self) -> Option<Millis> {
        match self.phase {
            Phase::Backoff { restart_at } => Some(restart_at),
            _ => None,
        }
    }

    /// Whether a requested stop is in progress (the process, or the spawn
    /// answer, has not been seen to end yet).
    pub fn is_stopping(&self) -> bool {
        matches!(
            self.phase,
            Phase::Stopping { .. }
                | Phase::Spawning {
                    stop_requested: true,
                    ..
                }
        )
    }

    /// Whether a requested stop is in progress that is to be followed by a start (a
    /// restart).
    pub fn is_restarting(&self) -> bool {
        matches!(
            self.phase,
            Phase::Stopping {
                then_start: true,
                ..
            } | Phase::Spawning {
                stop_requested: true,
                then_start: true,
            }
        )
    }

    /// Whether the machine believes a process exists or is being spawned.
    /// While this is true it never issues [`Action::Spawn`].
    pub fn has_process(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::Backoff { .. })
    }

    /// The earliest time at which [`Machine::tick`] has something to do, or
    /// `None` if nothing is pending (no wake-ups needed).
    pub fn next_deadline(&self) -> Option<Millis> {
        match self.phase {
            Phase::Starting { deadline } => Some(deadline),
            Phase::Backoff { restart_at } => Some(restart_at),
            Phase::Stopping { kill_at, .. } => kill_at,
            Phase::Idle | Phase::Spawning { .. } | Phase::Running | Phase::Aborting => None,
        }
    }

    /// The operator wants the node running (also the initial deploy).
    #[must_use = "the returned actions must be executed"]
    pub fn start(&mut self, now: Millis) -> Vec<Action> {
        self.step(now, |m, out| match m.phase {
            Phase::Idle => {
                m.consecutive_failures = 0;
                m.spawn(out);
            }
            Phase::Backoff { .. } => m.spawn(out),
            Phase::Spawning {
                stop_requested: true,
                ..
            } => {
                m.phase = Phase::Spawning {
                    stop_requested: true,
                    then_start: true,
                };
            }
            Phase::Spawning { .. } => {}
            Phase::Stopping { kill_at, .. } => {
                m.phase = Phase::Stopping {
                    kill_at,
                    then_start: true,
                };
            }
            Phase::Starting { .. } | Phase::Running | Phase::Aborting => {}
        })
    }

    /// The operator wants the node stopped.
    #[must_use = "the returned actions must be executed"]
    pub fn stop(&mut self, now: Millis) -> Vec<Action> {
        self.step(now, |m, out| match m.phase {
            Phase::Idle => m.set_state(State::Stopped, out),
            Phase::Spawning { .. } => {
                m.phase = Phase::Spawning {
                    stop_requested: true,
                    then_start: false,
                };
            }
            Phase::Starting { .. } | Phase::Running => m.begin_stop(now, out),
            Phase::Aborting => {
                m.phase = Phase::Stopping {
                    kill_at: None,
                    then_start: false,
                };
            }
            Phase::Stopping { kill_at, .. } => {
                m.phase = Phase::Stopping {
                    kill_at,
                    then_start: false,
                };
            }
            Phase::Backoff { .. } => {
                m.phase = Phase::Idle;
                m.set_state(State::Stopped, out);
            }
        })
    }

    /// The shell spawned the process requested by [`Action::Spawn`].
    /// Ignored if no spawn is outstanding.
    #[must_use = "the returned actions must be executed"]
    pub fn spawned(&mut self, now: Millis, pid: u32) -> Vec<Action> {
        self.step(now, |m, out| {
            if let Phase::Spawning {
                stop_requested,
                then_start,
            } = m.phase
            {
                m.pid = Some(pid);
                m.started_at = Some(now);
                m.last_spawn = Some(now);
                m.ready_at = None;
                m.unready = None;
                if stop_requested {
                    m.begin_stop(now, out);
                    if let Phase::Stopping { kill_at, .. } = m.phase {
                        m.phase = Phase::Stopping {
                            kill_at,
                            then_start,
                        };
                    }
                } else {
                    m.arm_readiness(now);
                }
            }
        })
    }

    /// The shell could not spawn the process (e.g. `ENOENT`). Counts as a
    /// failed start. Ignored if no spawn is outstanding.
    #[must_use = "the returned actions must be executed"]
    pub fn spawn_failed(&mut self, now: Millis, error: String) -> Vec<Action> {
        self.step(now, |m, out| {
            if let Phase::Spawning {
                stop_requested,
                then_start,
            } = m.phase
            {
                m.last_spawn_error = Some(error);
                m.last_spawn = Some(now);
                if stop_requested && then_start {
                    // The spawn that failed was asked for before the restart: the
                    // restart's own spawn comes now.
                    m.consecutive_failures = 0;
                    m.spawn(out);
                } else if stop_requested {
                    m.phase = Phase::Idle;
                    m.set_state(State::Stopped, out);
                } else {
                    m.record_failure();
                    m.restart_or_fail(now, out);
                }
            }
        })
    }

    /// The node signalled readiness (notify `READY=1` or TCP accept).
    /// Ignored under [`Readiness::StartPeriod`] and when not waiting for
    /// readiness (already ready, stopping, timed out, no process).
    #[must_use = "the returned actions must be executed"]
    pub fn ready(&mut self, now: Millis) -> Vec<Action> {
        self.step(now, |m, out| {
            if matches!(m.phase, Phase::Starting { .. }) && m.config.readiness.is_signalled() {
                m.become_ready(now, out);
            }
        })
    }

    /// A liveness check failed (see the module docs). Ignored unless the node
    /// is ready and not being stopped.
    #[must_use = "the returned actions must be executed"]
    pub fn unhealthy(&mut self, now: Millis) -> Vec<Action> {
        self.step(now, |m, out| {
            if m.phase == Phase::Running {
                m.reset_streak_if_healthy(now);
                out.push(Action::Kill);
                m.record_failure();
                m.phase = Phase::Aborting;
            }
        })
    }

    /// The process exited. Ignored if the machine knows of no process.
    #[must_use = "the returned actions must be executed"]
    pub fn exited(&mut self, now: Millis, exit: ExitStatus) -> Vec<Action> {
        let mut out = Vec::new();
        self.advance(now, &mut out);
        // A kill deadline (stop timeout, readiness timeout) missed by a late
        // shell must not produce a `Kill` aimed at the process reported dead
        // right here; the decisions are the same either way.
        out.retain(|a| *a != Action::Kill);
        self.on_exited(now, exit, &mut out);
        self.advance(now, &mut out);
        out
    }

    fn on_exited(&mut self, now: Millis, exit: ExitStatus, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting { .. } => {
                self.end_process(exit);
                self.record_failure();
                self.restart_or_fail(now, out);
            }
            Phase::Aborting => {
                // The readiness timeout already counted this failed start.
                self.end_process(exit);
                self.restart_or_fail(now, out);
            }
            Phase::Running => {
                self.reset_streak_if_healthy(now);
                self.end_process(exit);
                let policy = self.config.restart;
                if policy != RestartPolicy::Always && self.config.is_success(exit) {
                    self.phase = Phase::Idle;
                    self.set_state(State::Stopped, out);
                } else {
                    self.record_failure();
                    self.restart_or_fail(now, out);
                }
            }
            Phase::Stopping { then_start, .. } => {
                self.end_process(exit);
                if then_start {
                    self.consecutive_failures = 0;
                    self.spawn(out);
                } else {
                    self.phase = Phase::Idle;
                    self.set_state(State::Stopped, out);
                }
            }
            Phase::Idle | Phase::Spawning { .. } | Phase::Backoff { .. } => {}
        }
    }

    /// A new agent found this node's process `pid` already running. It
    /// becomes `Running` (`was_ready`) or `Pending` with a fresh readiness
    /// deadline, without any `Spawn`; the failure streak starts afresh and
    /// `started_at` is `now` (the real start time is unknown). Ignored
    /// (returns no actions) unless the machine has no process.
    #[must_use = "the returned actions must be executed"]
    pub fn adopt(&mut self, now: Millis, pid: u32, was_ready: bool) -> Vec<Action> {
        self.step(now, |m, out| {
            if m.has_process() {
                return;
            }
            m.consecutive_failures = 0;
            m.pid = Some(pid);
            m.started_at = Some(now);
            m.ready_at = None;
            m.unready = None;
            if was_ready {
                m.become_ready(now, out);
            } else {
                m.arm_readiness(now);
                m.set_state(State::Pending, out);
            }
        })
    }

    /// Restores the backoff a previous agent process recorded for this node: its process
    /// crashed, `streak` failures in a row, and its restart is due at `restart_at`
    /// (`now` or earlier: at once). [`State::Crashed`] until then, and the streak goes
    /// on, so that restarting the agent neither hurries a crash-looping node nor saves
    /// it from [`State::Failed`]. Ignored unless the machine is idle without a process.
    #[must_use = "the returned actions must be executed"]
    pub fn restore_backoff(
        &mut self,
        now: Millis,
        streak: u32,
        restart_at: Millis,
        last_exit: Option<ExitStatus>,
    ) -> Vec<Action> {
        self.step(now, |m, out| {
            if m.phase != Phase::Idle || m.has_process() {
                return;
            }
            m.consecutive_failures = streak;
            m.last_exit = last_exit;
            m.phase = Phase::Backoff { restart_at };
            m.set_state(State::Crashed, out);
        })
    }

    /// Restores the end a previous agent process recorded for this node: its process
    /// ended for good under its policy, as a failure (`failed`, [`State::Failed`]) or a
    /// success ([`State::Stopped`]), with `last_exit`. Ignored unless the machine is
    /// idle without a process.
    #[must_use = "the returned actions must be executed"]
    pub fn restore_ended(
        &mut self,
        now: Millis,
        failed: bool,
        last_exit: Option<ExitStatus>,
    ) -> Vec<Action> {
        self.step(now, |m, out| {
            if m.phase != Phase::Idle || m.has_process() {
                return;
            }
            m.last_exit = last_exit;
            m.set_state(
                if failed {
                    State::Failed
                } else {
                    State::Stopped
                },
                out,
            );
        })
    }

    /// Fire the timers due at `now`. Harmless at any time.
    #[must_use = "the returned actions must be executed"]
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        self.step(now, |_, _| {})
    }

    /// Catch up to `now`, apply `event`, then fire timers the event armed
    /// with a zero delay, so that no deadline `<= now` survives the call.
    fn step(
        &mut self,
        now: Millis,
        event: impl FnOnce(&mut Self, &mut Vec<Action>),
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.advance(now, &mut out);
        event(self, &mut out);
        self.advance(now, &mut out);
        out
    }

    fn advance(&mut self, now: Millis, out: &mut Vec<Action>) {
        // Firing a timer always leads to a phase without a deadline
        // (Running, Aborting, Spawning, Stopping{kill_at: None}), so a
        // single check suffices.
        if let Some(deadline) = self.next_deadline()
            && deadline <= now
        {
            self.fire(deadline, out);
        }
        if self.phase == Phase::Running {
            self.reset_streak_if_healthy(now);
        }
    }

    /// Handle the timer of the current phase, as of its deadline `at`.
    fn fire(&mut self, at: Millis, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting { .. } => {
                if self.config.readiness.is_signalled() {
                    out.push(Action::Kill);
                    self.unready = Some(self.config.readiness);
                    self.record_failure();
                    self.phase = Phase::Aborting;
                } else {
                    self.become_ready(at, out);
                }
            }
            Phase::Backoff { .. } => {
                self.restart_count = self.restart_count.saturating_add(1);
                self.spawn(out);
            }
            Phase::Stopping {
                kill_at: Some(_),
                then_start,
            } => {
                out.push(Action::Kill);
                self.phase = Phase::Stopping {
                    kill_at: None,
                    then_start,
                };
            }
            Phase::Idle
            | Phase::Spawning { .. }
            | Phase::Running
            | Phase::Aborting
            | Phase::Stopping { kill_at: None, .. } => {}
        }
    }

    fn spawn(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::Spawning {
            stop_requested: false,
            then_start: false,
        };
        self.pid = None;
        self.started_at = None;
        self.ready_at = None;
        self.set_state(State::Pending, out);
        out.push(Action::Spawn);
    }

    fn arm_readiness(&mut self, now: Millis) {
        let deadline = now.saturating_add(self.config.readiness.deadline_ms());
        self.phase = Phase::Starting { deadline };
    }

    fn become_ready(&mut self, at: Millis, out: &mut Vec<Action>) {
        self.ready_at = Some(at);
        self.phase = Phase::Running;
        self.set_state(State::Running, out);
    }

    fn begin_stop(&mut self, now: Millis, out: &mut Vec<Action>) {
        out.push(Action::SignalStop);
        self.phase = Phase::Stopping {
            kill_at: Some(now.saturating_add(self.config.stop_timeout_ms)),
            then_start: false,
        };
    }

    fn end_process(&mut self, exit: ExitStatus) {
        self.pid = None;
        self.started_at = None;
        self.ready_at = None;
        self.last_exit = Some(exit);
    }

    fn record_failure(&mut self) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
    }

    fn reset_streak_if_healthy(&mut self, now: Millis) {
        if let Some(ready_at) = self.ready_at
            && now.saturating_sub(ready_at) >= self.config.reset_after_ms
        {
            self.consecutive_failures = 0;
        }
    }

    /// After a counted failure with no process left: schedule a restart or
    /// give up.
    fn restart_or_fail(&mut self, now: Millis, out: &mut Vec<Action>) {
        let limit = self.config.max_failed_starts;
        let give_up = self.config.restart == RestartPolicy::Never
            || (limit != 0 && self.consecutive_failures >= limit);
        if give_up {
            self.phase = Phase::Idle;
            self.set_state(State::Failed, out);
        } else {
            let delay = self.config.backoff_delay_ms(self.consecutive_failures);
            let earliest = self
                .last_spawn
                .map_or(0, |t| t.saturating_add(MIN_START_INTERVAL_MS));
            self.phase = Phase::Backoff {
                restart_at: now.saturating_add(delay).max(earliest),
            };
            self.set_state(State::Crashed, out);
        }
    }

    fn set_state(&mut self, state: State, out: &mut Vec<Action>) {
        if self.state != state {
            self.state = state;
            out.push(Action::StateChanged(state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{Kill, SignalStop, Spawn, StateChanged};
    use ExitStatus::{Code, Signal};

    fn machine(f: impl FnOnce(&mut MachineConfig)) -> Machine {
        let mut config = MachineConfig::default();
        f(&mut config);
        config.validate().expect("test config is valid");
        Machine::new(config)
    }

    #[test]
    fn exits_read_as_words_in_the_log() {
        assert_eq!(Code(3).to_string(), "exit code 3");
        assert_eq!(Signal(9).to_string(), "killed by signal 9");
        assert_eq!(
            Code(-1).to_string(),
            "status unknown (not this agent's child)"
        );
    }

    #[test]
    fn a_restart_asked_for_while_a_spawn_is_under_way_gets_a_process_spawned_after_it() {
        let mut m = machine(|_| {});
        assert_eq!(m.start(0), vec![StateChanged(State::Pending), Spawn]);
        // Restart (stop, then start) before the spawn's answer.
        assert!(m.stop(1).is_empty());
        assert!(m.is_stopping());
        assert!(!m.is_restarting());
        assert!(m.start(1).is_empty());
        assert!(m.is_restarting());
        // The process spawned for the earlier request is stopped once it exists…
        assert_eq!(m.spawned(2, 7), vec![SignalStop]);
        assert!(m.is_restarting());
        // …and a new one spawned once it is gone.
        assert_eq!(m.exited(3, Signal(15)), vec![Spawn]);
        assert!(!m.is_restarting());
        assert_eq!(m.spawned(4, 8), vec![]);
        assert!(!m.is_stopping());
        assert_eq!(m.pid(), Some(8));
        // A stop alone during a spawn stops it; a start alone changes nothing.
        let mut m = machine(|_| {});
        let _ = m.start(0);
        assert!(m.start(1).is_empty());
        assert!(m.spawned(2, 9).is_empty());
        let mut m = machine(|_| {});
        let _ = m.start(0);
        let _ = m.stop(1);
        assert_eq!(m.spawned(2, 10), vec![SignalStop]);
        assert_eq!(m.exited(3, Signal(15)), vec![StateChanged(State::Stopped)]);
        // The earlier request's spawn failing: the restart's spawn follows at once.
        let mut m = machine(|_| {});
        let _ = m.start(0);
        let _ = m.stop(1);
        let _ = m.start(1);
        assert_eq!(m.spawn_failed(2, "no such file".into()), vec![Spawn]);
        assert_eq!(m.consecutive_failures(), 0);
    }

    #[test]
    fn a_restart_for_a_changed_spec_follows_the_new_settings() {
        // Old settings: ready at once, a long stop timeout.
        let mut m = machine(|c| {
            c.readiness = Readiness::StartPeriod { ms: 0 };
            c.stop_timeout_ms = 5_000;
        });
        let _ = m.start(0);
        let _ = m.spawned(0, 7);
        assert_eq!(m.state(), State::Running);
        assert_eq!(m.stop(100), vec![SignalStop]);
        m.reconfigure(MachineConfig {
            readiness: Readiness::StartPeriod { ms: 1_000 },
            stop_timeout_ms: 50,
            ..MachineConfig::default()
        });
        let _ = m.start(100);
        // The stop keeps its own deadline.
        assert_eq!(m.next_deadline(), Some(5_100));
        assert_eq!(
            m.exited(200, Signal(15)),
            vec![StateChanged(State::Pending), Spawn]
        );
        let _ = m.spawned(200, 8);
        // The new process must survive the new start period, and an exit meanwhile is
        // a failed start.
        assert_eq!(m.state(), State::Pending);
        assert_eq!(m.exited(210, Code(1)), vec![StateChanged(State::Crashed)]);
        assert_eq!(m.consecutive_failures(), 1);
    }

    /// Start (or adopt) and bring to Running under the default start period.
    fn running_at(m: &mut Machine, t: Millis) -> Millis {
        let _ = m.start(t);
        assert!(m.spawned(t, 42).is_empty());
        let ready = t + m.config().readiness.deadline_ms();
        assert_eq!(m.tick(ready), vec![StateChanged(State::Running)]);
        ready
    }

    /// Drive a loop where every start fails (exit 10 ms after spawn) until
    /// `Failed` or `max_rounds`; returns (delays observed, Spawn actions).
    fn failed_start_loop(m: &mut Machine, max_rounds: usize) -> (Vec<u64>, usize) {
        let mut t = 0;
        let mut delays = Vec::new();
        assert_eq!(m.start(t), vec![StateChanged(State::Pending), Spawn]);
        let mut spawns = 1;
        for _ in 0..max_rounds {
            assert!(m.spawned(t, 7).is_empty());
            t += 10;
            let out = m.exited(t, Code(1));
            if m.state() == State::Failed {
                assert_eq!(out, vec![StateChanged(State::Failed)]);
                assert_eq!(m.next_deadline(), None);
                break;
            }
            assert_eq!(out, vec![StateChanged(State::Crashed)]);
            let at = m.next_restart_at().expect("restart scheduled");
            assert_eq!(m.next_deadline(), Some(at));
            delays.push(at - t);
            if at > t {
                assert!(m.tick(at - 1).is_empty(), "no spawn before the delay");
            }
            t = at;
            assert_eq!(m.tick(t), vec![StateChanged(State::Pending), Spawn]);
            spawns += 1;
        }
        (delays, spawns)
    }

    #[test]
    fn a_restored_backoff_waits_its_rest_and_keeps_its_streak() {
        // Defaults: backoff 100 ms doubling; 5 failures in a row make it FAILED.
        let mut m = machine(|_| {});
        assert_eq!(
            m.restore_backoff(1_000, 3, 1_400, Some(Code(1))),
            vec![StateChanged(State::Crashed)]
        );
        assert_eq!(m.next_restart_at(), Some(1_400));
        assert_eq!(m.last_exit(), Some(Code(1)));
        assert!(m.tick(1_399).is_empty());
        assert_eq!(m.tick(1_400), vec![StateChanged(State::Pending), Spawn]);
        assert_eq!(m.restart_count(), 1);
        let _ = m.spawned(1_401, 9);
        // Its fourth failure in a row: the fourth delay, 800 ms.
        assert_eq!(m.exited(1_402, Code(1)), vec![StateChanged(State::Crashed)]);
        assert_eq!(m.next_restart_at(), Some(2_202));
        // A restart due already is made at once; one with a process is ignored.
        let mut m = machine(|_| {});
        assert_eq!(
            m.restore_backoff(5_000, 1, 4_000, None),
            vec![
                StateChanged(State::Crashed),
                StateChanged(State::Pending),
                Spawn
            ]
        );
        let _ = m.spawned(5_001, 9);
        assert!(m.restore_backoff(6_000, 1, 7_000, None).is_empty());
    }

    #[test]
    fn crash_loop_backoff_then_failed() {
        let mut m = machine(|_| {});
        let (delays, spawns) = failed_start_loop(&mut m, 100);
        assert_eq!(delays, [100, 200, 400, 800]);
        assert_eq!(spawns, 5, "initial start + 4 automatic restarts");
        assert_eq!(m.restart_count(), 4);
        assert_eq!(m.consecutive_failures(), 5);
        assert_eq!(m.state(), State::Failed);
        assert_eq!(m.last_exit(), Some(Code(1)));
        assert!(m.tick(1_000_000).is_empty(), "Failed is final until start");
    }

    #[test]
    fn backoff_is_capped_and_never_gives_up_with_zero_limit() {
        let mut m = machine(|c| c.max_failed_starts = 0);
        let (delays, spawns) = failed_start_loop(&mut m, 13);
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000, 30_000,
                30_000
            ]
        );
        assert_eq!(spawns, 14);
        assert_eq!(m.restart_count(), 13);
        assert_eq!(m.state(), State::Pending);
    }

    #[test]
    fn backoff_delay_formula() {
        let c = MachineConfig {
            backoff_multiplier: 1.5,
            backoff_max_ms: 1000,
            ..MachineConfig::default()
        };
        let d: Vec<u64> = (0..9).map(|k| c.backoff_delay_ms(k)).collect();
        assert_eq!(d, [100, 100, 150, 225, 338, 506, 759, 1000, 1000]);
        assert_eq!(c.backoff_delay_ms(u32::MAX), 1000);
        let zero = MachineConfig {
            backoff_initial_ms: 0,
            ..MachineConfig::default()
        };
        assert_eq!(zero.backoff_delay_ms(20), 0);
        let nan = MachineConfig {
            backoff_multiplier: f64::NAN,
            ..MachineConfig::default()
        };
        assert_eq!(nan.backoff_delay_ms(3), 30_000, "invalid config: be slow");
    }

    #[test]
    fn crashes_after_ready_count_towards_failed() {
        let mut m = machine(|_| {});
        let mut t = 0;
        for k in 1..=5u32 {
            if k == 1 {
                t = running_at(&mut m, t);
            } else {
                let at = m.next_restart_at().expect("restart scheduled");
                assert_eq!(at - t, 100 << (k - 2), "delay before start {k}");
                t = at;
                assert_eq!(m.tick(t), vec![StateChanged(State::Pending), Spawn]);
                assert!(m.spawned(t, 7).is_empty());
                t += 1000;
                assert_eq!(m.tick(t), vec![StateChanged(State::Running)]);
            }
            t += 5_000; // crash 5 s after ready: well under reset_after_ms
            let out = m.exited(t, Signal(11));
            assert_eq!(m.consecutive_failures(), k);
            if k < 5 {
                assert_eq!(out, vec![StateChanged(State::Crashed)]);
            } else {
                assert_eq!(out, vec![StateChanged(State::Failed)]);
            }
        }
        assert_eq!(m.restart_count(), 4);
    }

    #[test]
    fn healthy_uptime_resets_the_streak() {
        let mut m = machine(|_| {});
        let mut t = running_at(&mut m, 0);
        // Three quick crashes: streak 3, next delay 400.
        for _ in 0..3 {
            t += 10;
            let _ = m.exited(t, Code(1));
            t = m.next_restart_at().expect("scheduled");
            let _ = m.tick(t);
            let _ = m.spawned(t, 7);
            t += 1000;
            let _ = m.tick(t);
        }
        assert_eq!(m.consecutive_failures(), 3);
        // Just under the threshold: the streak goes on (4th failure, 800 ms).
        let ready = m.ready_at().expect("ready");
        let _ = m.exited(ready + 59_999, Code(1));
        assert_eq!(m.consecutive_failures(), 4);
        assert_eq!(m.next_restart_at(), Some(ready + 59_999 + 800));
        t = m.next_restart_at().expect("scheduled");
        let _ = m.tick(t);
        let _ = m.spawned(t, 7);
        let ready = t + 1000;
        let _ = m.tick(ready);
        // The lazy reset happens on any call once the uptime is reached,
        // without any timer.
        assert_eq!(m.next_deadline(), None);
        assert!(m.tick(ready + 60_000).is_empty());
        assert_eq!(m.consecutive_failures(), 0);
        let out = m.exited(ready + 70_000, Code(1));
        assert_eq!(out, vec![StateChanged(State::Crashed)]);
        assert_eq!(m.consecutive_failures(), 1);
        assert_eq!(m.next_restart_at(), Some(ready + 70_000 + 100));
    }

    #[test]
    fn daily_crash_never_gives_up() {
        let mut m = machine(|_| {});
        let mut t = running_at(&mut m, 0);
        for _ in 0..50 {
            t += 86_400_000;
            assert_eq!(m.exited(t, Signal(9)), vec![StateChanged(State::Crashed)]);
            assert_eq!(m.consecutive_failures(), 1);
            assert_eq!(m.next_restart_at(), Some(t + 100));
            t += 100;
            let _ = m.tick(t);
            let _ = m.spawned(t, 8);
            t += 1000;
            assert_eq!(m.tick(t), vec![StateChanged(State::Running)]);
        }
        assert_eq!(m.restart_count(), 50);
    }

    #[test]
    fn zero_initial_backoff_restarts_at_once_but_never_spins() {
        let mut m = machine(|c| c.backoff_initial_ms = 0);
        let t = running_at(&mut m, 0);
        // It ran a while: replaced in the same call.
        assert_eq!(
            m.exited(t + 100, Code(3)),
            vec![
                StateChanged(State::Crashed),
                StateChanged(State::Pending),
                Spawn
            ]
        );
        assert_eq!(m.restart_count(), 1);
        assert_eq!(m.next_deadline(), None);
        // A spawn that fails at once is retried no sooner than the start interval.
        assert_eq!(
            m.spawn_failed(t + 101, "ENOENT".to_owned()),
            vec![StateChanged(State::Crashed)]
        );
        assert_eq!(m.next_deadline(), Some(t + 101 + MIN_START_INTERVAL_MS));
        assert_eq!(
            m.tick(t + 101 + MIN_START_INTERVAL_MS),
            vec![StateChanged(State::Pending), Spawn]
        );
        assert_eq!(m.restart_count(), 2);
        assert_eq!(m.consecutive_failures(), 2);
    }

    #[test]
    fn a_crash_loop_with_zero_backoff_starts_at_most_fifty_times_a_second() {
        let mut m = machine(|c| {
            c.backoff_initial_ms = 0;
            c.max_failed_starts = 0;
        });
        let mut now = 0;
        let mut spawns = 0;
        let mut actions = m.start(now);
        while now < 1000 {
            if actions.contains(&Spawn) {
                spawns += 1;
                let _ = m.spawned(now, 42);
                actions = m.exited(now, Code(1));
            } else {
                now = m.next_deadline().expect("a restart is scheduled");
                actions = m.tick(now);
            }
        }
        assert!(spawns <= 51, "{spawns} starts in a second");
        assert!(
            spawns >= 40,
            "{spawns} starts in a second: restarts must go on"
        );
    }

    fn exit_after_ready(policy: RestartPolicy, exit: ExitStatus) -> (Vec<Action>, Machine) {
        let mut m = machine(|c| {
            c.restart = policy;
            c.success_exit_codes = vec![0, 143];
        });
        let t = running_at(&mut m, 0);
        (m.exited(t + 10, exit), m)
    }

    #[test]
    fn restart_policies_after_ready() {
        use RestartPolicy::{Always, Never, OnFailure};
        let cases = [
            (Never, Code(0), State::Stopped),
            (Never, Code(143), State::Stopped),
            (Never, Code(1), State::Failed),
            (Never, Signal(9), State::Failed),
            (OnFailure, Code(0), State::Stopped),
            (OnFailure, Code(143), State::Stopped),
            (OnFailure, Code(1), State::Crashed),
            (OnFailure, Signal(15), State::Crashed),
            (Always, Code(0), State::Crashed),
            (Always, Code(1), State::Crashed),
            (Always, Signal(6), State::Crashed),
        ];
        for (policy, exit, expected) in cases {
            let (out, m) = exit_after_ready(policy, exit);
            assert_eq!(out, vec![StateChanged(expected)], "{policy:?} {exit:?}");
            assert_eq!(m.state(), expected);
            assert_eq!(m.last_exit(), Some(exit));
            assert_eq!(m.pid(), None);
            assert_eq!(
                m.next_deadline().is_some(),
                expected == State::Crashed,
                "{policy:?} {exit:?}"
            );
        }
    }

    #[test]
    fn exit_before_ready_is_a_failed_start_whatever_the_code() {
        for (policy, expected) in [
            (RestartPolicy::Never, State::Failed),
            (RestartPolicy::OnFailure, State::Crashed),
            (RestartPolicy::Always, State::Crashed),
        ] {
            let mut m = machine(|c| c.restart = policy);
            let _ = m.start(0);
            let _ = m.spawned(0, 5);
            assert_eq!(m.exited(999, Code(0)), vec![StateChanged(expected)]);
            assert_eq!(m.consecutive_failures(), 1);
        }
    }

    #[test]
    fn late_exit_after_start_period_counts_as_after_ready() {
        // The shell never ticked at 1000; the exit at 1500 still happens
        // after readiness (a success under Never → Stopped, not Failed).
        let mut m = machine(|c| c.restart = RestartPolicy::Never);
        let _ = m.start(0);
        let _ = m.spawned(0, 5);
        assert_eq!(
            m.exited(1500, Code(0)),
            vec![StateChanged(State::Running), StateChanged(State::Stopped)]
        );
    }

    #[test]
    fn unhealthy_kills_then_restarts_under_the_policy() {
        for (policy, after) in [
            (RestartPolicy::OnFailure, State::Crashed),
            (RestartPolicy::Always, State::Crashed),
            (RestartPolicy::Never, State::Failed),
        ] {
            let mut m = machine(|c| c.restart = policy);
            let t = running_at(&mut m, 0);
            let restarts = m.restart_count();
            assert_eq!(m.unhealthy(t + 5), vec![Kill], "{policy:?}");
            assert_eq!(m.state(), State::Running, "until the exit is seen");
            assert_eq!(m.consecutive_failures(), 1);
            assert!(m.unhealthy(t + 6).is_empty(), "once");
            // A clean exit on SIGTERM while being killed is still this failure.
            let out = m.exited(t + 10, Code(0));
            assert_eq!(out, vec![StateChanged(after)], "{policy:?}");
            assert_eq!(m.consecutive_failures(), 1, "counted once");
            if after == State::Crashed {
                let due = m.next_restart_at().unwrap();
                assert_eq!(m.tick(due), vec![StateChanged(State::Pending), Spawn]);
                assert_eq!(m.restart_count(), restarts + 1);
            }
        }
        // Not ready yet, stopping, or no process: nothing to do.
        let mut m = machine(|c| c.readiness = Readiness::Notify { timeout_ms: 1_000 });
        assert!(m.unhealthy(0).is_empty());
        let _ = m.start(0);
        let _ = m.spawned(1, 10);
        assert!(m.unhealthy(2).is_empty());
        let _ = m.ready(3);
        let _ = m.stop(4);
        assert!(m.unhealthy(5).is_empty());
    }

    #[test]
    fn stop_with_signal_ignored_kills_at_timeout() {
        let mut m = machine(|_| {});
        let t = running_at(&mut m, 0);
        let stop_at = t + 4_000;
        assert_eq!(m.stop(stop_at), vec![SignalStop]);
        assert_eq!(m.state(), State::Running, "reported until it is gone");
        assert!(m.is_stopping());
        assert_eq!(m.next_deadline(), Some(stop_at + 10_000));
        assert!(m.stop(stop_at + 1).is_empty(), "second stop is a no-op");
        assert!(m.tick(stop_at + 9_999).is_empty());
        assert_eq!(m.tick(stop_at + 10_000), vec![Kill]);
        assert_eq!(m.next_deadline(), None);
        assert!(m.tick(stop_at + 20_000).is_empty(), "Kill sent once");
        assert_eq!(
            m.exited(stop_at + 20_001, Signal(9)),
            vec![StateChanged(State::Stopped)]
        );
        assert_eq!(m.next_deadline(), None);
        assert_eq!(m.consecutive_failures(), 0);
        assert_eq!(m.restart_count(), 0);
        assert!(!m.is_stopping());
    }

    #[test]
    fn graceful_stop_never_kills() {
        let mut m = machine(|c| c.restart = RestartPolicy::Always);
        let t = running_at(&mut m, 0);
        assert_eq!(m.stop(t), vec![SignalStop]);
        assert_eq!(
            m.exited(t + 50, Code(1)),
            vec![StateChanged(State::Stopped)]
        );
        assert!(m.tick(t + 100_000).is_empty());
        assert!(m.stop(t + 100_001).is_empty(), "stop while stopped");
    }

    #[test]
    fn stop_during_backoff_cancels_the_restart() {
        let mut m = machine(|_| {});
        let t = running_at(&mut m, 0);
        let _ = m.exited(t + 10, Code(1));
        assert_eq!(m.state(), State::Crashed);
        assert_eq!(m.stop(t + 20), vec![StateChanged(State::Stopped)]);
        assert_eq!(m.next_deadline(), None);
        assert_eq!(m.next_restart_at(), None);
        assert!(m.tick(t + 1_000_000).is_empty());
        assert_eq!(m.restart_count(), 0);
    }

    #[test]
    fn start_during_backoff_spawns_now_and_keeps_the_streak() {
        let mut m = machine(|_| {});
        let t = running_at(&mut m, 0);
        let _ = m.exited(t + 10, Code(1));
        assert_eq!(m.start(t + 20), vec![StateChanged(State::Pending), Spawn]);
        assert_eq!(m.consecutive_failures(), 1);
        assert_eq!(m.restart_count(), 0, "operator start is not automatic");
    }

    #[test]
    fn readiness_notify_timeout_kills_and_counts_a_failed_start() {
        let mut m = machine(|c| c.readiness = Readiness::Notify { timeout_ms: 5_000 });
        let _ = m.start(0);
        assert!(m.spawned(0, 9).is_empty());
        assert_eq!(m.next_deadline(), Some(5_000));
        assert!(m.tick(4_999).is_empty());
        assert_eq!(m.tick(5_000), vec![Kill]);
        assert_eq!(m.consecutive_failures(), 1);
        assert_eq!(m.state(), State::Pending, "until the process is gone");
        assert_eq!(m.next_deadline(), None);
        assert!(m.ready(5_001).is_empty(), "too late");
        assert!(m.start(5_001).is_empty());
        assert_eq!(
            m.exited(5_002, Signal(9)),
            vec![StateChanged(State::Crashed)]
        );
        assert_eq!(m.consecutive_failures(), 1, "counted once");
        assert_eq!(m.next_restart_at(), Some(5_102));
    }

    #[test]
    fn a_readiness_timeout_is_told_until_a_process_runs_again() {
        for readiness in [
            Readiness::Notify { timeout_ms: 500 },
            Readiness::Tcp { timeout_ms: 500 },
        ] {
            let mut m = machine(|c| c.readiness = readiness);
            let _ = m.start(0);
            let _ = m.spawned(0, 9);
            assert_eq!(m.unready(), None);
            assert_eq!(m.tick(500), vec![Kill]);
            assert_eq!(m.unready(), Some(readiness));
            let _ = m.exited(501, Signal(9));
            let _ = m.tick(1_000);
            assert_eq!(m.unready(), Some(readiness), "while it waits to restart");
            let _ = m.spawned(1_000, 10);
            assert_eq!(m.unready(), None, "a new process");
            // Killed for a failed liveness check, or at the end of a stop: not this.
            let _ = m.ready(1_001);
            let _ = m.unhealthy(1_002);
            assert_eq!(m.unready(), None);
            let _ = m.exited(1_003, Signal(9));
            let _ = m.tick(5_000);
            let _ = m.spawned(5_000, 11);
            let _ = m.stop(5_001);
            let _ = m.tick(20_000);
            assert_eq!(m.unready(), None);
        }
    }

    #[test]
    fn readiness_notify_and_tcp_in_time() {
        for readiness in [
            Readiness::Notify { timeout_ms: 5_000 },
            Readiness::Tcp { timeout_ms: 5_000 },
        ] {
            let mut m = machine(|c| c.readiness = readiness);
            let _ = m.start(0);
            let _ = m.spawned(10, 9);
            assert_eq!(m.ready(3_000), vec![StateChanged(State::Running)]);
            assert_eq!(m.ready_at(), Some(3_000));
            assert_eq!(m.started_at(), Some(10));
            assert_eq!(m.next_deadline(), None);
            assert!(m.ready(3_001).is_empty(), "duplicate ready");
            assert!(m.tick(10_000).is_empty());
        }
    }

    #[test]
    fn start_period_elapses_then_idle() {
        let mut m = machine(|_| {});
        assert_eq!(m.next_deadline(), None, "idle when stopped");
        assert_eq!(m.start(0), vec![StateChanged(State::Pending), Spawn]);
        assert_eq!(m.next_deadline(), None, "waiting for the spawn answer");
        let _ = m.spawned(10, 42);
        assert_eq!(m.pid(), Some(42));
        assert_eq!(m.next_deadline(), Some(1_010));
        assert!(m.ready(500).is_empty(), "ready() ignored under StartPeriod");
        assert_eq!(m.state(), State::Pending);
        assert!(m.tick(1_009).is_empty());
        assert_eq!(m.tick(1_010), vec![StateChanged(State::Running)]);
        assert_eq!(m.ready_at(), Some(1_010));
        assert_eq!(m.next_deadline(), None, "steady Running: no wake-ups");
        assert!(m.tick(5_000_000).is_empty());
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn zero_start_period_is_ready_when_spawned() {
        let mut m = machine(|c| c.readiness = Readiness::StartPeriod { ms: 0 });
        let _ = m.start(0);
        assert_eq!(m.spawned(3, 1), vec![StateChanged(State::Running)]);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn adopt_ready_and_not_ready() {
        let mut m = machine(|_| {});
        assert_eq!(m.adopt(100, 7, true), vec![StateChanged(State::Running)]);
        assert_eq!(m.pid(), Some(7));
        assert_eq!(m.started_at(), Some(100));
        assert_eq!(m.next_deadline(), None);
        assert!(m.adopt(200, 8, true).is_empty(), "already has a process");
        assert_eq!(m.pid(), Some(7));
        // An adopted process that crashes is restarted with a Spawn.
        assert_eq!(m.exited(300, Code(1)), vec![StateChanged(State::Crashed)]);
        assert_eq!(m.tick(400), vec![StateChanged(State::Pending), Spawn]);

        let mut m = machine(|_| {});
        assert_eq!(m.adopt(100, 7, false), vec![StateChanged(State::Pending)]);
        assert_eq!(m.next_deadline(), Some(1_100));
        assert_eq!(m.tick(1_100), vec![StateChanged(State::Running)]);

        let mut m = machine(|c| c.readiness = Readiness::Notify { timeout_ms: 50 });
        let _ = m.adopt(100, 7, false);
        assert_eq!(m.ready(120), vec![StateChanged(State::Running)]);
    }

    #[test]
    fn stray_and_duplicate_events_are_harmless() {
        let mut m = machine(|_| {});
        assert!(m.exited(1, Code(1)).is_empty());
        assert!(m.ready(2).is_empty());
        assert!(m.spawned(3, 4).is_empty());
        assert!(m.spawn_failed(4, "x".to_owned()).is_empty());
        assert!(m.tick(5).is_empty());
        assert!(m.stop(6).is_empty());
        assert_eq!(m.state(), State::Stopped);
        assert_eq!(m.pid(), None);

        let t = running_at(&mut m, 10);
        assert!(m.start(t).is_empty(), "start while running");
        assert!(m.spawned(t, 99).is_empty(), "duplicate spawned");
        assert_eq!(m.pid(), Some(42));
        let _ = m.exited(t + 1, Code(1));
        assert!(m.exited(t + 2, Code(1)).is_empty(), "duplicate exit");
        assert!(m.ready(t + 3).is_empty(), "ready after exit");
        assert_eq!(m.consecutive_failures(), 1);
        // Time going backwards must not panic either.
        let _ = m.tick(0);
        let _ = m.stop(0);
        let _ = m.start(0);
    }

    #[test]
    fn start_during_stop_restarts_after_exit() {
        let mut m = machine(|_| {});
        let t = running_at(&mut m, 0);
        assert_eq!(m.stop(t), vec![SignalStop]);
        assert!(m.start(t + 1).is_empty());
        assert_eq!(
            m.exited(t + 2, Code(0)),
            vec![StateChanged(State::Pending), Spawn]
        );
        assert_eq!(m.restart_count(), 0);
        // And stop → start → stop ends stopped.
        let _ = m.spawned(t + 3, 43);
        let _ = m.stop(t + 4);
        let _ = m.start(t + 5);
        assert!(m.stop(t + 6).is_empty());
        assert_eq!(m.exited(t + 7, Code(0)), vec![StateChanged(State::Stopped)]);
    }

    #[test]
    fn stop_while_spawn_in_flight() {
        let mut m = machine(|_| {});
        let _ = m.start(0);
        assert!(m.stop(1).is_empty());
        assert!(m.is_stopping());
        assert_eq!(m.spawned(2, 5), vec![SignalStop]);
        assert_eq!(m.next_deadline(), Some(10_002));
        assert_eq!(m.exited(3, Code(0)), vec![StateChanged(State::Stopped)]);

        let _ = m.start(10);
        let _ = m.stop(11);
        assert_eq!(
            m.spawn_failed(12, "ENOENT".to_owned()),
            vec![StateChanged(State::Stopped)]
        );
        assert_eq!(m.consecutive_failures(), 0);
    }

    #[test]
    fn late_exit_past_a_kill_deadline_sends_no_kill() {
        // Readiness timeout missed by the shell, process reported dead.
        let mut m = machine(|c| c.readiness = Readiness::Notify { timeout_ms: 100 });
        let _ = m.start(0);
        let _ = m.spawned(0, 5);
        assert_eq!(m.exited(500, Code(1)), vec![StateChanged(State::Crashed)]);
        assert_eq!(m.consecutive_failures(), 1);
        // Stop timeout missed by the shell.
        let mut m = machine(|_| {});
        let t = running_at(&mut m, 0);
        let _ = m.stop(t);
        assert_eq!(
            m.exited(t + 60_000, Signal(15)),
            vec![StateChanged(State::Stopped)]
        );
    }

    #[test]
    fn stop_while_aborting_after_readiness_timeout() {
        let mut m = machine(|c| c.readiness = Readiness::Tcp { timeout_ms: 10 });
        let _ = m.start(0);
        let _ = m.spawned(0, 5);
        assert_eq!(m.tick(10), vec![Kill]);
        assert!(m.stop(11).is_empty(), "already killed");
        assert_eq!(m.next_deadline(), None);
        assert_eq!(m.exited(12, Signal(9)), vec![StateChanged(State::Stopped)]);
    }

    #[test]
    fn spawn_failures_lead_to_failed_and_start_resets() {
        let mut m = machine(|_| {});
        let mut t = 0;
        let mut spawns = usize::from(m.start(t).contains(&Spawn));
        while m.state() != State::Failed {
            let _ = m.spawn_failed(t, "ENOENT".to_owned());
            if let Some(at) = m.next_restart_at() {
                t = at;
                spawns += m.tick(t).iter().filter(|a| **a == Spawn).count();
            }
        }
        assert_eq!(spawns, 5);
        assert_eq!(m.last_spawn_error(), Some("ENOENT"));
        assert_eq!(m.start(t), vec![StateChanged(State::Pending), Spawn]);
        assert_eq!(m.consecutive_failures(), 0, "start from Failed resets");

        let mut never = machine(|c| c.restart = RestartPolicy::Never);
        let _ = never.start(0);
        assert_eq!(
            never.spawn_failed(1, "EACCES".to_owned()),
            vec![StateChanged(State::Failed)]
        );
        assert_eq!(never.stop(2), vec![StateChanged(State::Stopped)]);
    }

    #[test]
    fn validate() {
        assert_eq!(MachineConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut MachineConfig)| {
            let mut c = MachineConfig::default();
            f(&mut c);
            c.validate().expect_err("invalid")
        };
        assert!(bad(|c| c.backoff_multiplier = f64::NAN).contains("backoff_multiplier"));
        assert!(bad(|c| c.backoff_multiplier = 0.5).contains("backoff_multiplier"));
        assert!(bad(|c| c.backoff_multiplier = f64::INFINITY).contains("backoff_multiplier"));
        assert!(bad(|c| c.backoff_max_ms = 10).contains("backoff_max_ms"));
        assert!(bad(|c| c.readiness = Readiness::Notify { timeout_ms: 0 }).contains("readiness"));
        let ok = MachineConfig {
            backoff_initial_ms: 0,
            backoff_multiplier: 1.0,
            readiness: Readiness::StartPeriod { ms: 0 },
            stop_timeout_ms: 0,
            reset_after_ms: 0,
            max_failed_starts: 0,
            success_exit_codes: Vec::new(),
            ..MachineConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(State::Crashed.to_string(), "Crashed");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn config() -> impl Strategy<Value = MachineConfig> {
            let policy = prop_oneof![
                Just(RestartPolicy::Never),
                Just(RestartPolicy::OnFailure),
                Just(RestartPolicy::Always),
            ];
            let readiness = prop_oneof![
                (1u64..3_000).prop_map(|timeout_ms| Readiness::Notify { timeout_ms }),
                (1u64..3_000).prop_map(|timeout_ms| Readiness::Tcp { timeout_ms }),
                (0u64..3_000).prop_map(|ms| Readiness::StartPeriod { ms }),
            ];
            (
                policy,
                0u64..300,
                1.0f64..3.0,
                0u64..5_000,
                0u64..10_000,
                0u32..6,
                readiness,
                0u64..5_000,
            )
                .prop_map(
                    |(restart, initial, mult, extra, reset, max_failed, readiness, stop)| {
                        MachineConfig {
                            restart,
                            backoff_initial_ms: initial,
                            backoff_multiplier: mult,
                            backoff_max_ms: initial + extra,
                            reset_after_ms: reset,
                            max_failed_starts: max_failed,
                            success_exit_codes: vec![0],
                            readiness,
                            stop_timeout_ms: stop,
                        }
                    },
                )
        }

        fn exit_status() -> impl Strategy<Value = ExitStatus> {
            prop_oneof![
                (0i32..3).prop_map(ExitStatus::Code),
                prop_oneof![Just(9), Just(15)].prop_map(ExitStatus::Signal),
            ]
        }

        #[derive(Debug, Clone)]
        enum Ev {
            Start,
            Stop,
            Spawned(u32),
            SpawnFailed,
            Ready,
            Exited(ExitStatus),
            Tick,
            TickAtDeadline,
            Adopt(u32, bool),
            Unhealthy,
        }

        fn event() -> impl Strategy<Value = Ev> {
            prop_oneof![
                2 => Just(Ev::Start),
                1 => Just(Ev::Stop),
                2 => (1u32..100).prop_map(Ev::Spawned),
                1 => Just(Ev::SpawnFailed),
                2 => Just(Ev::Ready),
                2 => exit_status().prop_map(Ev::Exited),
                1 => Just(Ev::Tick),
                3 => Just(Ev::TickAtDeadline),
                1 => (1u32..100, any::<bool>()).prop_map(|(p, r)| Ev::Adopt(p, r)),
                1 => Just(Ev::Unhealthy),
            ]
        }

        /// Invariants that hold after every call, whatever the events.
        fn check_after(
            m: &Machine,
            t: Millis,
            out: &[Action],
            reported: &mut State,
        ) -> Result<(), TestCaseError> {
            if let Some(d) = m.next_deadline() {
                prop_assert!(d > t, "deadline {d} not after now {t}");
            }
            prop_assert!(out.iter().filter(|a| **a == Action::Spawn).count() <= 1);
            for a in out {
                if let Action::StateChanged(s) = a {
                    prop_assert_ne!(*s, *reported, "StateChanged without change");
                    *reported = *s;
                }
            }
            prop_assert_eq!(*reported, m.state());
            match m.state() {
                State::Stopped | State::Failed => {
                    prop_assert!(!m.has_process());
                    prop_assert_eq!(m.next_deadline(), None);
                }
                State::Crashed => {
                    prop_assert!(!m.has_process());
                    prop_assert!(m.next_restart_at().is_some());
                }
                State::Running => {
                    prop_assert!(m.pid().is_some() && m.ready_at().is_some());
                }
                State::Pending => prop_assert!(m.has_process()),
            }
            Ok(())
        }

        proptest! {
            /// Arbitrary, even nonsensical, event sequences.
            #[test]
            fn chaotic_events(
                config in config(),
                events in prop::collection::vec((event(), 0u64..4_000), 0..80),
            ) {
                let mut m = Machine::new(config);
                let mut t: Millis = 0;
                let mut reported = m.state();
                for (ev, dt) in events {
                    t += dt;
                    if matches!(ev, Ev::TickAtDeadline) {
                        t = t.max(m.next_deadline().unwrap_or(t));
                    }
                    let had_process = m.has_process();
                    let had_pid = m.pid().is_some();
                    let restarts = m.restart_count();
                    let out = match ev.clone() {
                        Ev::Start => m.start(t),
                        Ev::Stop => m.stop(t),
                        Ev::Spawned(pid) => m.spawned(t, pid),
                        Ev::SpawnFailed => m.spawn_failed(t, "ENOENT".to_owned()),
                        Ev::Ready => m.ready(t),
                        Ev::Exited(e) => m.exited(t, e),
                        Ev::Tick | Ev::TickAtDeadline => m.tick(t),
                        Ev::Adopt(pid, ready) => m.adopt(t, pid, ready),
                        Ev::Unhealthy => m.unhealthy(t),
                    };
                    prop_assert!(m.restart_count() >= restarts);
                    if out.contains(&Action::Spawn) {
                        // Only when no process was believed to exist, or the
                        // event itself ended the one that did.
                        let ended = match ev {
                            Ev::Exited(_) => had_pid,
                            Ev::SpawnFailed => had_process && !had_pid,
                            _ => false,
                        };
                        prop_assert!(!had_process || ended, "Spawn over a live process: {ev:?}");
                        prop_assert!(m.has_process() || matches!(ev, Ev::SpawnFailed));
                    }
                    check_after(&m, t, &out, &mut reported)?;
                }
            }

            /// A faithful fake shell: the real world never has two processes,
            /// signals only target a live process, and the machine's view
            /// matches the world.
            #[test]
            fn faithful_shell(
                config in config(),
                ops in prop::collection::vec((0u8..8, exit_status(), any::<bool>(), 0u64..4_000), 0..100),
            ) {
                #[derive(Default)]
                struct World {
                    alive: Option<u32>,
                    spawn_pending: bool,
                    killed: bool,
                    next_pid: u32,
                }
                fn apply(w: &mut World, out: &[Action]) -> Result<(), TestCaseError> {
                    for a in out {
                        match a {
                            Action::Spawn => {
                                prop_assert!(w.alive.is_none() && !w.spawn_pending, "double spawn");
                                w.spawn_pending = true;
                            }
                            Action::SignalStop | Action::Kill => {
                                prop_assert!(w.alive.is_some(), "signal without process");
                                w.killed |= *a == Action::Kill;
                            }
                            Action::StateChanged(_) => {}
                        }
                    }
                    Ok(())
                }
                let mut m = Machine::new(config);
                let mut w = World::default();
                let mut t: Millis = 0;
                let mut reported = m.state();
                for (op, exit, ok, dt) in ops {
                    t += dt;
                    let restarts = m.restart_count();
                    let out = match op {
                        0 => m.start(t),
                        1 => m.stop(t),
                        2 if w.spawn_pending => {
                            w.spawn_pending = false;
                            if ok {
                                w.next_pid += 1;
                                w.alive = Some(w.next_pid);
                                w.killed = false;
                                m.spawned(t, w.next_pid)
                            } else {
                                m.spawn_failed(t, "ENOENT".to_owned())
                            }
                        }
                        3 if w.alive.is_some() => m.ready(t),
                        4 if w.alive.is_some() => {
                            w.alive = None;
                            let exit = if w.killed { ExitStatus::Signal(9) } else { exit };
                            m.exited(t, exit)
                        }
                        5 => {
                            t = t.max(m.next_deadline().unwrap_or(t));
                            m.tick(t)
                        }
                        6 if w.alive.is_some() => m.unhealthy(t),
                        _ => m.tick(t),
                    };
                    apply(&mut w, &out)?;
                    prop_assert!(m.restart_count() >= restarts);
                    prop_assert_eq!(m.pid(), w.alive);
                    prop_assert_eq!(m.has_process(), w.alive.is_some() || w.spawn_pending);
                    check_after(&m, t, &out, &mut reported)?;
                }
                // Liveness: stop, let the world finish, and the machine must
                // come to rest in Stopped with nothing pending.
                let out = m.stop(t);
                apply(&mut w, &out)?;
                if w.spawn_pending {
                    w.spawn_pending = false;
                    w.next_pid += 1;
                    w.alive = Some(w.next_pid);
                    let out = m.spawned(t, w.next_pid);
                    apply(&mut w, &out)?;
                }
                if w.alive.take().is_some() {
                    let out = m.exited(t + 1, ExitStatus::Signal(15));
                    apply(&mut w, &out)?;
                }
                prop_assert_eq!(m.state(), State::Stopped);
                prop_assert_eq!(m.next_deadline(), None);
                prop_assert!(!m.has_process());
            }
        }
    }
}
