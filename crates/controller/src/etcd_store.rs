//! The controller's state in etcd (`--store etcd`): the same three values as the state
//! dir (staged, desired, deployed), each under `<prefix>state/<name>`, written only by
//! the leader and only while it leads.
//!
//! A value is JSON compressed with deflate. One that is still larger than [`PART`] (etcd
//! refuses requests over 1.5 MiB by default) is split: its parts go first, each under
//! `<key>/parts/<id>/<n>`, then the key itself gets a manifest naming `<id>` and the
//! count, in one transaction, so a reader sees the old value or the whole new one. Parts
//! of the value replaced are deleted afterwards.
//!
//! Fencing: every write is a transaction whose success branch runs only if the leader
//! key's create revision is still this term's ([`crate::ha`]). A controller deposed,
//! paused or cut off cannot write, whatever it believes.
//!
//! The store's interface is synchronous (the file store's writes are too); calls run on
//! a thread of their own with its own runtime, and the caller waits for the answer.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::etcd::{Compare, Etcd, EtcdError, Op};
use crate::ha::Gate;

/// The largest part written in one request.
pub const PART: usize = 1 << 20;

const INLINE: &[u8] = b"drover-z1\n";
const SPLIT: &[u8] = b"drover-p1\n";

/// Errors of the etcd store; each names etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStoreError {
    /// etcd could not be asked or refused.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// This controller does not lead (any more): nothing was written.
    #[error("not written to etcd: {0}")]
    NotLeader(String),
    /// The thread that talks to etcd cannot start.
    #[error("cannot start the etcd client thread: {0}")]
    Thread(std::io::Error),
    /// A stored value cannot be read back.
    #[error("etcd key {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    id: String,
    parts: usize,
    len: usize,
}

type Job = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The state's keys in etcd, written under the leader's fence.
#[derive(Debug)]
pub struct EtcdStore {
    etcd: Etcd,
    prefix: String,
    gate: Arc<Gate>,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    part: usize,
}

impl EtcdStore {
    /// A store under `prefix`, fenced by `gate`.
    pub fn new(etcd: Etcd, prefix: &str, gate: Arc<Gate>) -> Result<Self, EtcdStoreError> {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EtcdStoreError::Thread)?;
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || {
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job);
                    }
                });
            })
            .map_err(EtcdStoreError::Thread)?;
        Ok(Self {
            etcd: etcd.with_timeout(Duration::from_secs(10)),
            prefix: prefix.to_owned(),
            gate,
            jobs,
            part: PART,
        })
    }

    /// The same store splitting values over `part` bytes (to test splitting cheaply).
    pub fn with_part_size(mut self, part: usize) -> Self {
        self.part = part.max(1);
        self
    }

    /// Runs `fut` on the store's thread and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, EtcdStoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::pin(async move {
            let _ = tx.send(fut.await);
        });
        self.jobs
            .send(job)
            .map_err(|_| EtcdError::Unreachable("the etcd client thread is gone".into()))?;
        rx.recv()
            .map_err(|_| EtcdError::Unreachable("the etcd client thread is gone".into()).into())
    }

    fn key(&self, name: &str) -> String {
        format!("{}state/{}", self.prefix, name.trim_end_matches(".json"))
    }

    /// Writes `json` as the value `name`, if this controller still leads.
    pub fn save(&self, name: &str, json: &[u8]) -> Result<(), EtcdStoreError> {
        self.save_with(name, json, Vec::new())
    }

    /// As [`EtcdStore::save`], with `also` (puts of other keys, such as the request's
    /// audit record) in the same fenced transaction as the value: all or nothing.
    pub fn save_with(&self, name: &str, json: &[u8], also: Vec<Op>) -> Result<(), EtcdStoreError> {
        let (_, revision) = self.gate.serving().map_err(EtcdStoreError::NotLeader)?;
        let fence =
            Compare::CreateRevision(format!("{}leader", self.prefix).into_bytes(), revision);
        let key = self.key(name);
        let compressed = deflate(json);
        // A write that etcd has not taken by the time this controller must stop serving
        // fails then, naming etcd, rather than outliving the term it was asked in.
        let left = self.gate.time_left().max(Duration::from_millis(100));
        let etcd = self.etcd.with_timeout(left);
        let part = self.part;
        let gate = self.gate.clone();
        let write = async move {
            let fenced = |ok: bool| {
                if ok {
                    Ok(())
                } else {
                    // Someone else leads: stop serving now rather than at the lease's end.
                    gate.step_down();
                    Err(EtcdStoreError::NotLeader(
                        "etcd refused the write: this controller's leader key is gone or another controller leads".into(),
                    ))
                }
            };
            let head = if compressed.len() <= part {
                [INLINE, &compressed].concat()
            } else {
                let id = uuid::Uuid::now_v7().simple().to_string();
                let chunks: Vec<&[u8]> = compressed.chunks(part).collect();
                for (n, chunk) in chunks.iter().enumerate() {
                    let put = Op::Put {
                        key: format!("{key}/parts/{id}/{n:06}").into_bytes(),
                        value: chunk.to_vec(),
                        lease: 0,
                    };
                    fenced(
                        etcd.txn(std::slice::from_ref(&fence), &[put], &[])
                            .await?
                            .succeeded,
                    )?;
                }
                let manifest = Manifest {
                    id,
                    parts: chunks.len(),
                    len: compressed.len(),
                };
                [
                    SPLIT,
                    &serde_json::to_vec(&manifest).expect("json serializes"),
                ]
                .concat()
            };
            let get = Op::Get {
                key: key.clone().into_bytes(),
            };
            let put = Op::Put {
                key: key.clone().into_bytes(),
                value: head,
                lease: 0,
            };
            let ops: Vec<Op> = [get, put].into_iter().chain(also).collect();
            let r = etcd.txn(std::slice::from_ref(&fence), &ops, &[]).await?;
            fenced(r.succeeded)?;
            // The replaced value's parts are garbage now; failing to delete them costs
            // space, never correctness.
            let old = r.ranges.first().and_then(|l| l.first());
            if let Some(old) = old
                && let Some(m) = old.value.strip_prefix(SPLIT)
                && let Ok(m) = serde_json::from_slice::<Manifest>(m)
            {
                let del = Op::Delete {
                    key: format!("{key}/parts/{}/", m.id).into_bytes(),
                    prefix: true,
                };
                if let Err(e) = etcd.txn(&[fence], &[del], &[]).await {
                    tracing::warn!("cannot delete the parts of a replaced value: {e}");
                }
            }
            Ok(())
        };
        self.block(async move {
            tokio::time::timeout(left, write).await.unwrap_or_else(|_| {
                Err(EtcdError::Unreachable(format!(
                    "no answer within {left:?}, the time this controller may still lead without renewing its lease"
                ))
                .into())
            })
        })?
    }

    /// Deletes the parts that no value names: those of a write whose leader died between
    /// writing its parts and the value naming them, or of a replaced value whose parts
    /// could not be deleted. Run by a new leader of term `revision` (the leader key's
    /// create revision) before it serves; fenced like every write. Returns how many
    /// unfinished values' parts were deleted.
    pub fn sweep_parts(&self, revision: i64) -> Result<usize, EtcdStoreError> {
        let etcd = self.etcd.clone();
        let state = format!("{}state/", self.prefix);
        let fence =
            Compare::CreateRevision(format!("{}leader", self.prefix).into_bytes(), revision);
        self.block(async move {
            let keys = etcd.get_prefix_keys(state.as_bytes()).await?;
            // Every `<value>/parts/<id>/` by its value's key.
            let mut found: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
                std::collections::BTreeMap::new();
            for key in &keys {
                let key = String::from_utf8_lossy(key);
                if let Some((value, rest)) = key.split_once("/parts/")
                    && let Some((id, _)) = rest.split_once('/')
                {
                    found
                        .entry(value.to_owned())
                        .or_default()
                        .insert(id.to_owned());
                }
            }
            let mut swept = 0;
            for (value, ids) in found {
                let named = etcd
                    .get(value.as_bytes())
                    .await?
                    .and_then(|kv| {
                        let m = kv.value.strip_prefix(SPLIT)?;
                        serde_json::from_slice::<Manifest>(m).ok()
                    })
                    .map(|m| m.id);
                for id in ids.into_iter().filter(|id| Some(id) != named.as_ref()) {
                    let del = Op::Delete {
                        key: format!("{value}/parts/{id}/").into_bytes(),
                        prefix: true,
                    };
                    let r = etcd.txn(std::slice::from_ref(&fence), &[del], &[]).await?;
                    if !r.succeeded {
                        return Err(EtcdStoreError::NotLeader(
                            "etcd refused to delete orphaned parts: another controller leads"
                                .into(),
                        ));
                    }
                    tracing::info!(value = %value, id = %id, "deleted the parts of an unfinished or replaced value");
                    swept += 1;
                }
            }
            Ok(swept)
        })?
    }

    /// Reads the value `name` (JSON), if any.
    pub fn load(&self, name: &str) -> Result<Option<Vec<u8>>, EtcdStoreError> {
        let key = self.key(name);
        let etcd = self.etcd.clone();
        self.block(async move {
            let corrupt = |message: String| EtcdStoreError::Corrupt {
                key: key.clone(),
                message,
            };
            let Some(kv) = etcd.get(key.as_bytes()).await? else {
                return Ok(None);
            };
            let compressed = if let Some(z) = kv.value.strip_prefix(INLINE) {
                z.to_vec()
            } else if let Some(m) = kv.value.strip_prefix(SPLIT) {
                let m: Manifest =
                    serde_json::from_slice(m).map_err(|e| corrupt(format!("bad manifest: {e}")))?;
                let mut all = Vec::with_capacity(m.len);
                for n in 0..m.parts {
                    let part_key = format!("{key}/parts/{}/{n:06}", m.id);
                    let part = etcd
                        .get(part_key.as_bytes())
                        .await?
                        .ok_or_else(|| corrupt(format!("part {part_key} is missing")))?;
                    all.extend_from_slice(&part.value);
                }
                if all.len() != m.len {
                    return Err(corrupt(format!(
                        "parts hold {} bytes, the manifest says {}",
                        all.len(),
                        m.len
                    )));
                }
                all
            } else {
                return Err(corrupt("not a value written by drover".into()));
            };
            inflate(&compressed)
                .map(Some)
                .map_err(|e| corrupt(format!("cannot decompress: {e}")))
        })?
    }
}

/// The JSON of a value stored whole (not split), as [`EtcdStore::save`] wrote it; `None`
/// for a split value or anything else. For tools and tests that read etcd directly.
pub fn decode_inline(value: &[u8]) -> Option<Vec<u8>> {
    inflate(value.strip_prefix(INLINE)?).ok()
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

fn inflate(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_round_trips() {
        let json = br#"{"nodes": {"a": 1, "b": 2}}"#.repeat(1000);
        let z = deflate(&json);
        assert!(z.len() < json.len() / 10);
        assert_eq!(inflate(&z).unwrap(), json);
        assert!(inflate(b"not deflate at all \xff\xfe").is_err());
    }
}
