//! How many refused requests of one client the audit trail records one by one.
//!
//! The trail is bounded and rotated, and a refusal is the one record any certificate,
//! however little it may do, can make the controller write: a viewer sending refused
//! requests in a loop would push the records of everyone else (admins' deploys
//! included) out of the trail. So each client gets a budget: [`BURST`] refusals at
//! once, then one every [`REFILL_MS`]; past it a refusal is answered as any other but
//! only counted, and the next refusal recorded carries a record before it that says
//! how many were not. With the trail's defaults a client alone would need about a month
//! to rotate a record out. A pure core: the caller hands it the time.

use std::collections::HashMap;

/// Refusals of one client recorded in a row before the budget applies.
pub const BURST: u32 = 30;

/// One more refusal may be recorded every this many milliseconds.
pub const REFILL_MS: u64 = 60_000;

/// Clients the budget keeps track of before it forgets those with a full budget.
const TRACKED: usize = 4096;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Record it; `unrecorded` refusals of this client were not recorded before it,
    /// the first of them at `since_ms`.
    Record {
        /// Refusals not recorded since the last one recorded, and when the first was.
        unrecorded: Option<(u64, u64)>,
    },
    /// Do not record it: the client's budget is spent.
    Skip,
}

/// One client's budget.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Refusals it may still have recorded, in milliseconds of refill (one refusal is
    /// [`REFILL_MS`] of them), so that no time is lost to rounding.
    credit: u64,
    /// When `credit` was last brought up to date.
    at_ms: u64,
    /// Refusals not recorded since the last recorded one, and when the first was.
    skipped: Option<(u64, u64)>,
}

/// The budgets of every client that was refused lately.
#[derive(Debug, Default)]
pub struct Budget {
    clients: HashMap<String, Bucket>,
}

impl Budget {
    /// Whether the refusal of `client` at `now_ms` (a clock that never goes back) is
    /// recorded.
    pub fn admit(&mut self, client: &str, now_ms: u64) -> Admit {
        if self.clients.len() >= TRACKED && !self.clients.contains_key(client) {
            self.clients
                .retain(|_, b| b.skipped.is_some() || refilled(b, now_ms) < full());
        }
        let b = self.clients.entry(client.to_owned()).or_insert(Bucket {
            credit: full(),
            at_ms: now_ms,
            skipped: None,
        });
        b.credit = refilled(b, now_ms);
        b.at_ms = now_ms.max(b.at_ms);
        if b.credit >= REFILL_MS {
            b.credit -= REFILL_MS;
            Admit::Record {
                unrecorded: b.skipped.take(),
            }
        } else {
            b.skipped.get_or_insert((0, now_ms)).0 += 1;
            Admit::Skip
        }
    }
}

/// Milliseconds on a clock that never goes back (since its first reading), for
/// [`Budget::admit`]: a wall clock set back would hold budgets empty meanwhile.
pub fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn full() -> u64 {
    u64::from(BURST) * REFILL_MS
}

/// `b`'s credit at `now_ms`.
fn refilled(b: &Bucket, now_ms: u64) -> u64 {
    b.credit
        .saturating_add(now_ms.saturating_sub(b.at_ms))
        .min(full())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_recorded_then_one_per_refill_and_the_rest_counted() {
        let mut b = Budget::default();
        for _ in 0..BURST {
            assert_eq!(b.admit("viewer", 0), Admit::Record { unrecorded: None });
        }
        // A flood: none recorded until the budget refills.
        for t in 0..100 {
            assert_eq!(b.admit("viewer", t), Admit::Skip);
        }
        // Another client is not held back by the first.
        assert_eq!(b.admit("admin", 50), Admit::Record { unrecorded: None });
        // One refill later: recorded, with the count of those that were not.
        assert_eq!(
            b.admit("viewer", REFILL_MS),
            Admit::Record {
                unrecorded: Some((100, 0))
            }
        );
        assert_eq!(b.admit("viewer", REFILL_MS + 1), Admit::Skip);
        // A long quiet spell gives the whole burst back, and no more.
        let later = 1_000 * REFILL_MS;
        for _ in 0..BURST {
            assert!(matches!(b.admit("viewer", later), Admit::Record { .. }));
        }
        assert_eq!(b.admit("viewer", later), Admit::Skip);
    }

    #[test]
    fn at_most_one_refusal_per_refill_is_recorded_at_any_rate() {
        let mut b = Budget::default();
        let (mut recorded, mut counted) = (0u64, 0u64);
        // Ten refusals a second for two hours.
        let (end, step) = (7_200_000, 100);
        for t in (0..end).step_by(step) {
            match b.admit("viewer", t) {
                Admit::Record { unrecorded } => {
                    recorded += 1;
                    counted += unrecorded.map_or(0, |(n, _)| n);
                }
                Admit::Skip => {}
            }
        }
        assert!(
            recorded <= u64::from(BURST) + end / REFILL_MS + 1,
            "{recorded}"
        );
        // Every refusal is either recorded or counted by a later record, but for
        // those after the last record (less than a refill's worth).
        let sent = end / step as u64;
        assert!(
            recorded + counted >= sent - REFILL_MS / step as u64,
            "{recorded} + {counted} of {sent}"
        );
    }

    #[test]
    fn the_clients_tracked_are_bounded() {
        let mut b = Budget::default();
        for i in 0..(TRACKED as u64 * 3) {
            // Each refused once, long enough ago to have its budget back.
            b.admit(&format!("c{i}"), i * REFILL_MS);
        }
        assert!(b.clients.len() <= TRACKED, "{}", b.clients.len());
    }
}
