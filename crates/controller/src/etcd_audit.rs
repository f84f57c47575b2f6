//! The audit trail in etcd (`--store etcd`): one history whichever controller of the
//! group leads. Each record is a key `<prefix>audit/<at_ms, 16 digits>-<uuid v7>` holding
//! its JSON, so keys sort by time; written only by the leader, fenced like the state
//! ([`crate::etcd_store`]), before its request is answered.
//!
//! Bounded by count: the newest [`KEEP`] records are kept. Every [`TRIM_EVERY`]-th
//! append (the first of each term included) lists the keys and deletes the older ones
//! in one fenced transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_proto::access::AuditRecord;

use crate::etcd::{Compare, Etcd, Op};
use crate::ha::Gate;

/// Records kept in etcd.
pub const KEEP: usize = 10_000;

/// Appends between two trims.
const TRIM_EVERY: u64 = 100;

/// The audit trail's keys in etcd.
#[derive(Debug)]
pub struct EtcdAudit {
    etcd: Etcd,
    prefix: String,
    gate: Arc<Gate>,
    appends: AtomicU64,
    keep: usize,
}

impl EtcdAudit {
    /// The trail under `<prefix>audit/`, written under `gate`'s fence.
    pub fn new(etcd: Etcd, prefix: &str, gate: Arc<Gate>) -> Self {
        Self {
            etcd: etcd.with_timeout(Duration::from_secs(5)),
            prefix: prefix.to_owned(),
            gate,
            appends: AtomicU64::new(0),
            keep: KEEP,
        }
    }

    fn dir(&self) -> String {
        format!("{}audit/", self.prefix)
    }

    /// Where the trail is, for messages.
    pub fn describe(&self) -> String {
        format!("in etcd under {}", self.dir())
    }

    /// The put that writes `record`, for a transaction of this trail's own or one that
    /// writes it together with the state (fenced the same way; see
    /// [`EtcdAudit::folded`]).
    pub fn put(&self, record: &AuditRecord) -> Result<Op, String> {
        let key = format!(
            "{}{:016}-{}",
            self.dir(),
            record.at_ms,
            uuid::Uuid::now_v7().simple()
        );
        let value = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        Ok(Op::Put {
            key: key.into_bytes(),
            value,
            lease: 0,
        })
    }

    /// Writes `record` if this controller still leads; `Err` names etcd.
    pub async fn append(&self, record: &AuditRecord) -> Result<(), String> {
        let (_, revision) = self
            .gate
            .serving()
            .map_err(|m| format!("not written to etcd: {m}"))?;
        let fence =
            Compare::CreateRevision(format!("{}leader", self.prefix).into_bytes(), revision);
        let put = self.put(record)?;
        let etcd = self
            .etcd
            .with_timeout(self.gate.time_left().max(Duration::from_millis(100)));
        let r = etcd
            .txn(std::slice::from_ref(&fence), &[put], &[])
            .await
            .map_err(|e| e.to_string())?;
        if !r.succeeded {
            self.gate.step_down();
            return Err(
                "etcd refused the write: this controller's leader key is gone or another controller leads"
                    .into(),
            );
        }
        self.counted(&etcd, fence).await;
        Ok(())
    }

    /// Counts a record that a state write carried ([`EtcdAudit::put`]), trimming when
    /// one is due as [`EtcdAudit::append`] does.
    pub async fn folded(&self) {
        let Ok((_, revision)) = self.gate.serving() else {
            // The next append trims.
            return;
        };
        let fence =
            Compare::CreateRevision(format!("{}leader", self.prefix).into_bytes(), revision);
        let etcd = self
            .etcd
            .with_timeout(self.gate.time_left().max(Duration::from_millis(100)));
        self.counted(&etcd, fence).await;
    }

    /// Counts one appended record; every [`TRIM_EVERY`]-th trims.
    async fn counted(&self, etcd: &Etcd, fence: Compare) {
        if self
            .appends
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(TRIM_EVERY)
            && let Err(e) = self.trim(etcd, fence).await
        {
            // The next trim catches up; the record itself is written.
            tracing::warn!("cannot trim the audit trail in etcd: {e}");
        }
    }

    /// Deletes all but the newest `keep` records.
    async fn trim(&self, etcd: &Etcd, fence: Compare) -> Result<(), String> {
        let dir = self.dir();
        let keys = etcd
            .get_prefix_keys(dir.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let Some(cutoff) = cutoff(&keys, self.keep) else {
            return Ok(());
        };
        let del = Op::DeleteRange {
            key: dir.into_bytes(),
            end: cutoff.to_vec(),
        };
        etcd.txn(&[fence], &[del], &[])
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The newest `limit` records at or after `since_ms` by `who`, oldest first.
    pub async fn read(
        &self,
        since_ms: Option<u64>,
        who: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, String> {
        let kvs = self
            .etcd
            .get_prefix(self.dir().as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut out: Vec<AuditRecord> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<AuditRecord>(&kv.value).ok())
            .filter(|r| since_ms.is_none_or(|s| r.at_ms >= s) && who.is_none_or(|w| r.is_by(w)))
            .collect();
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
        Ok(out)
    }
}

/// The oldest key to keep among `keys` (sorted, oldest first) when only the newest `keep`
/// are kept; `None` when all are.
fn cutoff(keys: &[Vec<u8>], keep: usize) -> Option<&[u8]> {
    keys.len()
        .checked_sub(keep)
        .filter(|n| *n > 0)
        .map(|n| keys[n].as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_keeps_the_newest_records() {
        let keys: Vec<Vec<u8>> = ["a", "b", "c", "d"]
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
        assert_eq!(cutoff(&keys, 2), Some(&b"c"[..]));
        assert_eq!(cutoff(&keys, 3), Some(&b"b"[..]));
        assert_eq!(cutoff(&keys, 4), None);
        assert_eq!(cutoff(&keys, 10), None);
        assert_eq!(cutoff(&[], 1), None);
    }
}
