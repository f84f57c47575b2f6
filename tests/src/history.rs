//! A history checker for deploys across leader failovers.
//!
//! Clients deploy distinct configurations (each marked by a label) concurrently while
//! leaders are killed and paused; each records when its deploy began and ended and what
//! it was told: acknowledged, failed for certain (refused before anything was written),
//! or unknown (a timeout, a lost connection, a partial answer). Against that, the
//! history of what was written to etcd (every version of the desired and deployed
//! deploys, with their generations, read back revision by revision) and the final state
//! read from the leader, [`check`] names every violation of:
//!
//! - every acknowledged deploy was written (it has a generation);
//! - every acknowledged deploy is the one in effect at the end, or was superseded by a
//!   later generation of an acknowledged or unknown-outcome deploy (never by one that
//!   failed for certain, and never by nothing: a lost deploy);
//! - a deploy that failed for certain was never written;
//! - generations never go back: each desired write is above the one before, the
//!   deployed one never decreases and is never above the desired one, and reads of the
//!   generation in effect never decrease;
//! - real-time order: a deploy acknowledged before another began has a lower generation.

use std::collections::BTreeMap;
use std::time::Duration;

/// What a client was told about its deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged as successful.
    Acked,
    /// Refused before anything was written (not the leader, another deploy pending, ...).
    Failed,
    /// Anything else: it may or may not have been written.
    Unknown,
}

/// One client's deploy.
#[derive(Debug, Clone)]
pub struct Deploy {
    /// Which client ran it.
    pub client: usize,
    /// The mark of its configuration, unique per deploy.
    pub label: String,
    /// When it began and ended, from one clock shared by all clients.
    pub start: Duration,
    /// See `start`.
    pub end: Duration,
    /// What the client was told.
    pub outcome: Outcome,
}

/// One write of a deploy to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// etcd's revision of the write.
    pub revision: i64,
    /// The generation written.
    pub generation: u64,
    /// The label of the configuration written (empty for one no client deployed, such
    /// as the first).
    pub label: String,
}

/// Everything the checker looks at.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Every client's deploys.
    pub deploys: Vec<Deploy>,
    /// Every version of the desired deploy, in revision order.
    pub desired: Vec<Write>,
    /// Every version of the deployed deploy, in revision order.
    pub deployed: Vec<Write>,
    /// The deploy in effect at the end (the leader's desired one): generation and label.
    pub in_effect: Option<(u64, String)>,
    /// Generations in effect read during the run, in the order read.
    pub reads: Vec<u64>,
}

/// Every violation in `h`, described; empty when the history is correct.
pub fn check(h: &History) -> Vec<String> {
    let mut v = Vec::new();
    let written: BTreeMap<&str, u64> = h
        .desired
        .iter()
        .map(|w| (w.label.as_str(), w.generation))
        .collect();
    let by_label: BTreeMap<&str, &Deploy> =
        h.deploys.iter().map(|d| (d.label.as_str(), d)).collect();

    for w in h.desired.windows(2) {
        if w[1].generation <= w[0].generation {
            v.push(format!(
                "the desired generation went from {} ({}) to {} ({}) at revision {}",
                w[0].generation, w[0].label, w[1].generation, w[1].label, w[1].revision
            ));
        }
    }
    for w in h.deployed.windows(2) {
        if w[1].generation < w[0].generation {
            v.push(format!(
                "the deployed generation went back from {} to {} at revision {}",
                w[0].generation, w[1].generation, w[1].revision
            ));
        }
    }
    for d in &h.deployed {
        if written.get(d.label.as_str()) != Some(&d.generation) {
            v.push(format!(
                "deployed generation {} ({}) at revision {} was never desired",
                d.generation, d.label, d.revision
            ));
        }
    }
    for w in h.reads.windows(2) {
        if w[1] < w[0] {
            v.push(format!(
                "a read generation went back from {} to {}",
                w[0], w[1]
            ));
        }
    }
    let (final_generation, final_label) = match &h.in_effect {
        Some((g, l)) => (*g, l.as_str()),
        None => (0, ""),
    };
    if let Some(last) = h.desired.last()
        && (last.generation, last.label.as_str()) != (final_generation, final_label)
    {
        v.push(format!(
            "the leader's deploy in effect is generation {final_generation} ({final_label}), but etcd's last desired write is {} ({})",
            last.generation, last.label
        ));
    }

    for d in &h.deploys {
        let generation = written.get(d.label.as_str()).copied();
        match d.outcome {
            Outcome::Failed => {
                if let Some(g) = generation {
                    v.push(format!(
                        "deploy {} failed for certain, but was written as generation {g}",
                        d.label
                    ));
                }
            }
            Outcome::Unknown => {}
            Outcome::Acked => {
                let Some(g) = generation else {
                    v.push(format!(
                        "deploy {} was acknowledged but never written: lost",
                        d.label
                    ));
                    continue;
                };
                if final_label == d.label {
                    continue;
                }
                if final_generation < g {
                    v.push(format!(
                        "deploy {} was acknowledged as generation {g}, but generation {final_generation} ({final_label}) is in effect: lost",
                        d.label
                    ));
                    continue;
                }
                // Superseded: by a later generation some client may have been told of.
                let superseded = h.desired.iter().any(|w| {
                    w.generation > g
                        && by_label
                            .get(w.label.as_str())
                            .is_some_and(|s| s.outcome != Outcome::Failed)
                });
                if !superseded {
                    v.push(format!(
                        "deploy {} (generation {g}) was acknowledged, but {final_label} is in effect and no later deploy of a client superseded it",
                        d.label
                    ));
                }
            }
        }
    }

    // Real-time order: acknowledged before another began means a lower generation.
    let acked: Vec<(&Deploy, u64)> = h
        .deploys
        .iter()
        .filter(|d| d.outcome == Outcome::Acked)
        .filter_map(|d| Some((d, *written.get(d.label.as_str())?)))
        .collect();
    for (a, ga) in &acked {
        for (b, gb) in &acked {
            if a.end < b.start && ga >= gb {
                v.push(format!(
                    "deploy {} was acknowledged (generation {ga}) before {} began, which got generation {gb}",
                    a.label, b.label
                ));
            }
        }
    }
    v
}

/// Counts of a history's deploys by outcome: acknowledged, failed, unknown.
pub fn outcomes(deploys: &[Deploy]) -> (usize, usize, usize) {
    let count = |o| deploys.iter().filter(|d| d.outcome == o).count();
    (
        count(Outcome::Acked),
        count(Outcome::Failed),
        count(Outcome::Unknown),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn deploy(label: &str, start: u64, end: u64, outcome: Outcome) -> Deploy {
        Deploy {
            client: 0,
            label: label.into(),
            start: ms(start),
            end: ms(end),
            outcome,
        }
    }

    fn write(revision: i64, generation: u64, label: &str) -> Write {
        Write {
            revision,
            generation,
            label: label.into(),
        }
    }

    /// Two clients; a, b acknowledged, c unknown and written, d failed; c in effect.
    fn correct() -> History {
        History {
            deploys: vec![
                deploy("a", 0, 10, Outcome::Acked),
                deploy("b", 5, 30, Outcome::Acked),
                deploy("c", 31, 60, Outcome::Unknown),
                deploy("d", 40, 50, Outcome::Failed),
            ],
            desired: vec![
                write(2, 1, ""),
                write(5, 2, "a"),
                write(8, 3, "b"),
                write(12, 4, "c"),
            ],
            deployed: vec![write(3, 1, ""), write(6, 2, "a"), write(9, 3, "b")],
            in_effect: Some((4, "c".into())),
            reads: vec![1, 2, 2, 3, 4],
        }
    }

    #[test]
    fn a_correct_history_passes() {
        assert_eq!(check(&correct()), Vec::<String>::new());
        assert_eq!(outcomes(&correct().deploys), (2, 1, 1));
    }

    #[test]
    fn an_acknowledged_deploy_never_written_is_lost() {
        let mut h = correct();
        h.desired.retain(|w| w.label != "b");
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("deploy b was acknowledged but never written")),
            "{v:?}"
        );
    }

    #[test]
    fn an_acknowledged_deploy_overwritten_by_an_older_generation_is_lost() {
        let mut h = correct();
        // A deposed leader's write: generation 3 again, after b's.
        h.desired.pop();
        h.desired.push(write(12, 2, "a"));
        h.in_effect = Some((2, "a".into()));
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("desired generation went from 3")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|m| m.contains("deploy b was acknowledged as generation 3, but generation 2")),
            "{v:?}"
        );
    }

    #[test]
    fn an_acknowledged_deploy_superseded_only_by_a_failed_one_is_lost() {
        let mut h = correct();
        h.deploys[2].outcome = Outcome::Failed;
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("deploy c failed for certain, but was written")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|m| m.contains("no later deploy of a client superseded it")),
            "{v:?}"
        );
    }

    #[test]
    fn a_generation_going_back_is_named() {
        let mut h = correct();
        h.deployed.push(write(13, 2, "a"));
        h.reads.push(3);
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("deployed generation went back from 3 to 2")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|m| m.contains("read generation went back from 4 to 3")),
            "{v:?}"
        );
    }

    #[test]
    fn acknowledged_deploys_out_of_real_time_order_are_named() {
        let mut h = correct();
        // b began after a was acknowledged, yet got a lower generation.
        h.deploys[1].start = ms(20);
        h.desired = vec![
            write(2, 1, ""),
            write(5, 2, "b"),
            write(8, 3, "a"),
            write(12, 4, "c"),
        ];
        h.deployed = vec![write(3, 1, "")];
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("deploy a was acknowledged (generation 3) before b began")),
            "{v:?}"
        );
    }

    #[test]
    fn overlapping_acknowledged_deploys_may_take_either_order() {
        let mut h = correct();
        h.desired = vec![
            write(2, 1, ""),
            write(5, 2, "b"),
            write(8, 3, "a"),
            write(12, 4, "c"),
        ];
        h.deployed = vec![write(3, 1, ""), write(9, 3, "a")];
        assert_eq!(check(&h), Vec::<String>::new());
    }

    #[test]
    fn a_final_state_other_than_the_last_write_is_named() {
        let mut h = correct();
        h.in_effect = Some((3, "b".into()));
        let v = check(&h);
        assert!(
            v.iter()
                .any(|m| m.contains("etcd's last desired write is 4 (c)")),
            "{v:?}"
        );
    }
}
