//! The book's unit tests, and a simulation that drives a book and its machine the way
//! the supervisor does, with outcomes, exits and messages arriving late, twice or for
//! processes long gone, and checks the module's invariants after every step.

use super::*;
use crate::machine::{self, MachineConfig, Readiness, RestartPolicy};

fn config(readiness: Readiness) -> MachineConfig {
    MachineConfig {
        restart: RestartPolicy::Always,
        backoff_initial_ms: 0,
        backoff_multiplier: 2.0,
        backoff_max_ms: 1_000,
        reset_after_ms: 1_000,
        max_failed_starts: 0,
        success_exit_codes: vec![0],
        readiness,
        stop_timeout_ms: 1_000,
    }
}

/// A book whose process is the pid itself and whose senders are pids.
type TestBook = Book<u32, u32>;

fn started(readiness: Readiness) -> (TestBook, u64) {
    let mut b = TestBook::new(Machine::new(config(readiness)));
    let actions = b.machine.start(0);
    assert!(actions.contains(&Action::Spawn));
    let n = b.next_spawn();
    b.announce(7);
    (b, n)
}

#[test]
fn a_spawn_outcome_that_is_not_awaited_hands_its_process_back() {
    let (mut b, n) = started(Readiness::StartPeriod { ms: 0 });
    assert!(matches!(b.spawned(1, n + 1, 10, 10), Spawned::Stale(10)));
    assert!(matches!(b.spawned(1, n - 1, 11, 11), Spawned::Stale(11)));
    assert_eq!(b.pid(), None);
    assert!(matches!(b.spawned(1, n, 12, 12), Spawned::Taken { .. }));
    assert_eq!((b.pid(), b.machine.pid()), (Some(12), Some(12)));
    // The same outcome again: the node has its process.
    assert!(matches!(b.spawned(1, n, 13, 13), Spawned::Stale(13)));
    assert_eq!(b.pid(), Some(12));
}

#[test]
fn messages_during_a_spawn_wait_for_it_and_a_failed_spawn_drops_them() {
    let (mut b, n) = started(Readiness::Notify { timeout_ms: 1_000 });
    for i in 0..NOTIFY_QUEUE + 5 {
        assert_eq!(b.notified(format!("STATUS={i}"), 1), None);
    }
    match b.spawned(1, n, 1, 1) {
        Spawned::Taken { held, .. } => {
            assert_eq!(held.len(), NOTIFY_QUEUE, "bounded");
            assert_eq!(held[0].0, "STATUS=0", "in order");
        }
        Spawned::Stale(_) => panic!("the awaited spawn"),
    }
    // With a process, messages are checked at once.
    assert_eq!(b.notified("READY=1".into(), 1), Some(("READY=1".into(), 1)));

    let (mut b, n) = started(Readiness::Notify { timeout_ms: 1_000 });
    assert_eq!(b.notified("READY=1".into(), 1), None);
    assert!(b.spawn_failed(1, n, "no such file".into()).is_some());
    assert!(b.held.is_empty());
    assert_eq!(b.last_error.as_deref(), Some("no such file"));
}

#[test]
fn exits_of_other_processes_change_nothing_and_the_last_one_is_kept() {
    let (mut b, n) = started(Readiness::StartPeriod { ms: 0 });
    let Spawned::Taken { .. } = b.spawned(1, n, 5, 5) else {
        panic!("awaited");
    };
    let before = format!("{b:?}");
    assert!(b.exited(2, n + 1, ExitStatus::Code(3), 0).is_none());
    assert!(b.ready(2, n + 1).is_empty());
    assert!(b.unhealthy(2, n + 1, "late".into()).is_none());
    assert_eq!(format!("{b:?}"), before, "stale news changed the book");

    let (process, actions) = b.exited(3, n, ExitStatus::Code(3), 2).expect("followed");
    assert_eq!(process, 5);
    assert!(
        actions.contains(&Action::StateChanged(machine::State::Crashed)),
        "{actions:?}"
    );
    assert_eq!(b.last_exit, Some(model::ExitStatus::Code(3)));
    assert_eq!(b.oom_kills, 2);
    assert_eq!(b.last_error.as_deref(), Some("oom-killed"));
    assert_eq!((b.pid(), b.machine.pid()), (None, None));
}

#[test]
fn oom_kills_while_it_runs_are_counted_once_and_blame_no_stop() {
    let (mut b, n) = started(Readiness::StartPeriod { ms: 0 });
    let Spawned::Taken { .. } = b.spawned(1, n, 5, 5) else {
        panic!("awaited");
    };
    // A child killed: counted now, the node runs on.
    assert_eq!(b.oom_while_running(2, n, 1), 1);
    assert_eq!(b.oom_while_running(2, n, 1), 0, "seen already");
    assert_eq!(b.oom_while_running(2, n + 1, 5), 0, "another process");
    assert_eq!(b.oom_kills, 1);
    assert_eq!(
        b.last_failure.as_deref(),
        Some("oom-killed: a process of the node")
    );
    assert_eq!(b.last_error, None, "the node did not fail");
    // An operator's stop: the kills seen at its end are counted, once, and blamed on
    // nothing.
    let _ = b.machine.stop(2);
    b.exited(3, n, ExitStatus::Signal(15), 2).expect("followed");
    assert_eq!(b.oom_kills, 2);
    assert_eq!(b.last_error, None);
    // Its own end, unasked: blamed on the kill.
    let _ = b.machine.start(4);
    let m = b.next_spawn();
    b.announce(8);
    let Spawned::Taken { .. } = b.spawned(5, m, 9, 9) else {
        panic!("awaited");
    };
    b.exited(6, m, ExitStatus::Signal(9), 1).expect("followed");
    assert_eq!(b.oom_kills, 3);
    assert_eq!(b.last_error.as_deref(), Some("oom-killed"));
    // The main process's own kill counted by the check just before it went: still its.
    let _ = b.machine.start(10_000);
    let k = b.next_spawn();
    b.announce(8);
    let Spawned::Taken { .. } = b.spawned(10_001, k, 11, 11) else {
        panic!("awaited");
    };
    b.last_error = None;
    assert_eq!(b.oom_while_running(10_002, k, 1), 1);
    b.exited(10_003, k, ExitStatus::Signal(9), 1)
        .expect("followed");
    assert_eq!(b.oom_kills, 4, "counted once");
    assert_eq!(b.last_error.as_deref(), Some("oom-killed"));
}

#[test]
fn an_unknown_exit_keeps_the_last_known_one() {
    let mut b = TestBook::new(Machine::new(config(Readiness::StartPeriod { ms: 0 })));
    b.last_exit = Some(model::ExitStatus::Signal(9));
    b.adopted(0, 40, true, 40);
    let n = b.live_spawn().expect("adopted");
    b.exited(1, n, ExitStatus::Code(-1), 0).expect("followed");
    assert_eq!(b.last_exit, Some(model::ExitStatus::Signal(9)));
}

#[test]
fn a_failed_health_check_counts_only_when_it_restarts_the_node() {
    let (mut b, n) = started(Readiness::Tcp { timeout_ms: 1_000 });
    let Spawned::Taken { .. } = b.spawned(1, n, 5, 5) else {
        panic!("awaited");
    };
    // Not ready yet: nothing to restart.
    assert_eq!(b.unhealthy(2, n, "no answer".into()), Some(Vec::new()));
    assert_eq!(b.liveness_failures, 0);
    assert!(!b.ready(3, n).is_empty());
    let actions = b.unhealthy(4, n, "no answer".into()).expect("followed");
    assert!(actions.contains(&Action::Kill), "{actions:?}");
    assert_eq!(b.liveness_failures, 1);
    assert_eq!(b.last_failure.as_deref(), Some("no answer"));
}

#[test]
fn a_notice_readies_only_a_notify_node_and_triggers_only_with_a_watchdog() {
    let notice = |ready, trigger| Notice {
        ready,
        watchdog: true,
        trigger,
        status: Some("up".into()),
    };
    let (mut b, n) = started(Readiness::Notify { timeout_ms: 1_000 });
    let Spawned::Taken { .. } = b.spawned(1, n, 5, 5) else {
        panic!("awaited");
    };
    let out = b.notice(2, notice(true, true), false, false);
    assert_eq!(
        out,
        Noticed {
            ping: true,
            status_changed: true,
            actions: Vec::new(),
            trigger: false,
        }
    );
    assert_eq!(b.status_text.as_deref(), Some("up"));
    let out = b.notice(3, notice(true, true), true, true);
    assert_eq!(
        out.actions,
        vec![Action::StateChanged(machine::State::Running)]
    );
    assert!(out.trigger);
}

mod simulation {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Start,
        Stop,
        /// The spawner answers the `i`th outstanding job (also ones long answered).
        Outcome {
            i: usize,
            ok: bool,
        },
        /// A process of the node dies.
        Dies {
            i: usize,
            exit: ExitStatus,
            oom: u64,
        },
        /// News of spawn `n` back from the current one.
        Ready {
            back: u64,
        },
        Unhealthy {
            back: u64,
        },
        Exited {
            back: u64,
        },
        Notify {
            belongs: bool,
            ready: bool,
            trigger: bool,
        },
        Tick,
    }

    fn event() -> impl Strategy<Value = Ev> {
        let exit = prop_oneof![
            (0i32..3).prop_map(ExitStatus::Code),
            Just(ExitStatus::Code(-1)),
            Just(ExitStatus::Signal(9)),
        ];
        prop_oneof![
            2 => Just(Ev::Start),
            1 => Just(Ev::Stop),
            4 => (0usize..4, prop::bool::weighted(0.8)).prop_map(|(i, ok)| Ev::Outcome { i, ok }),
            2 => (0usize..3, exit, prop_oneof![4 => Just(0u64), 1 => 1u64..3])
                .prop_map(|(i, exit, oom)| Ev::Dies { i, exit, oom }),
            2 => (0u64..3).prop_map(|back| Ev::Ready { back }),
            1 => (0u64..3).prop_map(|back| Ev::Unhealthy { back }),
            1 => (1u64..3).prop_map(|back| Ev::Exited { back }),
            3 => (any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(belongs, ready, trigger)| Ev::Notify { belongs, ready, trigger }),
            2 => Just(Ev::Tick),
        ]
    }

    /// The supervisor's side: spawn jobs, real processes, a clock.
    struct World {
        book: TestBook,
        now: Millis,
        /// Spawn numbers asked for, in order; answered ones stay (answered again,
        /// they must be refused).
        jobs: Vec<u64>,
        /// Live processes made for the node: pid → its spawn number.
        alive: BTreeMap<u32, u64>,
        next_pid: u32,
    }

    impl World {
        fn carry_out(&mut self, actions: Vec<Action>) {
            for a in actions {
                if a == Action::Spawn {
                    let n = self.book.next_spawn();
                    self.book.announce(n * 1_000);
                    self.jobs.push(n);
                }
            }
        }

        fn check_held(&mut self, held: Vec<(String, u32)>) {
            for (text, sender) in held {
                let Some(_) = self.book.notified(text, sender) else {
                    panic!("held again with a process");
                };
            }
        }

        fn step(&mut self, ev: Ev) {
            self.now += 5;
            let now = self.now;
            match ev {
                Ev::Start => {
                    let a = self.book.machine.start(now);
                    self.carry_out(a);
                }
                Ev::Stop => {
                    let a = self.book.machine.stop(now);
                    self.carry_out(a);
                }
                Ev::Outcome { i, ok } => {
                    let Some(&n) = self.jobs.get(self.jobs.len().saturating_sub(1 + i)) else {
                        return;
                    };
                    if ok {
                        let pid = self.next_pid;
                        self.next_pid += 1;
                        self.alive.insert(pid, n);
                        match self.book.spawned(now, n, pid, pid) {
                            Spawned::Stale(p) => {
                                assert_eq!(p, pid);
                                self.alive.remove(&p);
                            }
                            Spawned::Taken { actions, held } => {
                                assert_eq!(self.book.last_error, None);
                                self.carry_out(actions);
                                self.check_held(held);
                            }
                        }
                    } else if let Some(a) = self.book.spawn_failed(now, n, "gone".into()) {
                        assert_eq!(n, self.book.spawns());
                        self.carry_out(a);
                    }
                }
                Ev::Dies { i, exit, oom } => {
                    let Some((&pid, &n)) = self.alive.iter().nth(i) else {
                        return;
                    };
                    self.alive.remove(&pid);
                    match self.book.exited(now, n, exit, oom) {
                        Some((p, a)) => {
                            assert_eq!(p, pid);
                            self.carry_out(a);
                        }
                        None => panic!("process {pid} of spawn {n} was made but not followed"),
                    }
                }
                Ev::Ready { back } | Ev::Unhealthy { back } | Ev::Exited { back }
                    if self
                        .book
                        .spawns()
                        .checked_sub(back)
                        .is_none_or(|n| self.book.live_spawn() != Some(n)) =>
                {
                    // News of a process that is not the followed one.
                    let n = self.book.spawns().saturating_sub(back);
                    let before = format!("{:?}", self.book);
                    match ev {
                        Ev::Ready { .. } => assert!(self.book.ready(now, n).is_empty()),
                        Ev::Unhealthy { .. } => {
                            assert!(self.book.unhealthy(now, n, "x".into()).is_none());
                        }
                        _ => assert!(self.book.exited(now, n, ExitStatus::Code(1), 1).is_none()),
                    }
                    assert_eq!(
                        format!("{:?}", self.book),
                        before,
                        "stale news changed the book"
                    );
                }
                Ev::Ready { back } => {
                    let a = self.book.ready(now, self.book.spawns() - back);
                    self.carry_out(a);
                }
                Ev::Unhealthy { back } => {
                    let a = self
                        .book
                        .unhealthy(now, self.book.spawns() - back, "hung".into());
                    self.carry_out(a.expect("the followed process"));
                }
                // Exits of followed processes come as `Dies`.
                Ev::Exited { .. } => {}
                Ev::Notify {
                    belongs,
                    ready,
                    trigger,
                } => {
                    let sender = if belongs {
                        self.book.pid().unwrap_or(0)
                    } else {
                        0
                    };
                    if let Some((_, sender)) = self.book.notified("READY=1".into(), sender)
                        && sender != 0
                        && Some(sender) == self.book.pid()
                    {
                        let notice = Notice {
                            ready,
                            watchdog: false,
                            trigger,
                            status: None,
                        };
                        let out = self.book.notice(now, notice, true, true);
                        self.carry_out(out.actions);
                        if out.trigger {
                            let n = self.book.live_spawn().expect("followed");
                            let a = self.book.unhealthy(now, n, "trigger".into());
                            self.carry_out(a.unwrap_or_default());
                        }
                    }
                }
                Ev::Tick => {
                    if let Some(at) = self.book.machine.next_deadline() {
                        self.now = self.now.max(at);
                        let a = self.book.machine.tick(self.now);
                        self.carry_out(a);
                    }
                }
            }
        }

        fn check(&self) {
            let b = &self.book;
            assert_eq!(
                b.pid(),
                b.machine.pid(),
                "book and machine disagree on the process"
            );
            assert!(b.held.len() <= NOTIFY_QUEUE);
            assert!(
                b.held.is_empty() || b.awaits_spawn(),
                "held without a spawn under way"
            );
            // No process runs that the book does not follow.
            let untracked: Vec<_> = self.alive.keys().filter(|p| Some(**p) != b.pid()).collect();
            assert!(untracked.is_empty(), "untracked processes {untracked:?}");
            if let Some(pid) = b.pid() {
                assert!(self.alive.contains_key(&pid), "following a dead process");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn every_process_is_followed_or_handed_back(
            readiness in prop_oneof![
                Just(Readiness::StartPeriod { ms: 0 }),
                Just(Readiness::StartPeriod { ms: 30 }),
                Just(Readiness::Notify { timeout_ms: 50 }),
                Just(Readiness::Tcp { timeout_ms: 50 }),
            ],
            events in prop::collection::vec(event(), 0..120),
        ) {
            let mut w = World {
                book: TestBook::new(Machine::new(config(readiness))),
                now: 0,
                jobs: Vec::new(),
                alive: BTreeMap::new(),
                next_pid: 100,
            };
            for ev in events {
                w.step(ev);
                w.check();
            }
        }
    }
}

#[test]
fn a_start_killed_for_want_of_readiness_says_why_until_its_next_process() {
    for (readiness, why) in [
        (
            Readiness::Notify { timeout_ms: 1_500 },
            "not ready within 1.5s: it sent no READY=1 on its NOTIFY_SOCKET; killed",
        ),
        (
            Readiness::Tcp { timeout_ms: 2_000 },
            "not ready within 2s: its readiness port accepted no connection; killed",
        ),
    ] {
        let (mut b, n) = started(readiness);
        assert!(matches!(b.spawned(0, n, 9, 9), Spawned::Taken { .. }));
        assert_eq!(b.error(), None);
        assert_eq!(b.machine.tick(2_000), vec![Action::Kill]);
        assert_eq!(b.error().as_deref(), Some(why));
        let _ = b.exited(2_001, n, ExitStatus::Signal(9), 0);
        assert_eq!(b.error().as_deref(), Some(why), "after the kill");
        // An error the book was told comes first: the spawn's own.
        let _ = b.machine.tick(3_000);
        let m = b.next_spawn();
        b.announce(8);
        let _ = b.spawn_failed(3_000, m, "cannot execute /x".to_owned());
        assert_eq!(b.error().as_deref(), Some("cannot execute /x"));
        let _ = b.machine.tick(10_000);
        let k = b.next_spawn();
        b.announce(9);
        assert!(matches!(
            b.spawned(10_000, k, 10, 10),
            Spawned::Taken { .. }
        ));
        assert_eq!(b.error(), None, "a new process runs");
    }
}
