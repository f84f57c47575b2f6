//! The frame codec: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The pure functions here ([`encode`], [`decode`]) do no I/O and are what the property
//! tests and fuzz targets exercise; [`read_frame`] and [`write_frame`] apply them to QUIC
//! streams. A frame longer than the limit is refused before any of it is buffered.
//!
//! # Memory
//!
//! A frame's memory is taken as its bytes arrive, never from the length it announces:
//! the buffer grows by doubling from [`READ_CHUNK`] up to that length, and each step is
//! paid for first from the process's [`PROCESS_BUDGET`] and, for the streams a peer opens
//! ([`crate::conn::serve_answers`]), from that connection's [`CONNECTION_BUDGET`]. A
//! frame that cannot get its next step within [`BUDGET_WAIT`] fails its stream with
//! [`FrameError::Budget`]; it never fails the connection or the process. While it waits
//! the stream is not read, so QUIC's flow control holds the peer back.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Bytes of frames being received that one connection's streams may hold at once.
pub const CONNECTION_BUDGET: usize = 64 * 1024 * 1024;
/// Bytes of frames being received that the whole process may hold at once.
pub const PROCESS_BUDGET: usize = 256 * 1024 * 1024;
/// How long a frame waits for budget before its stream fails.
pub const BUDGET_WAIT: Duration = Duration::from_secs(5);
/// The first buffer of a frame body; it doubles from there as bytes arrive.
pub const READ_CHUNK: usize = 64 * 1024;

static PROCESS: Semaphore = Semaphore::const_new(PROCESS_BUDGET);

/// Bytes of frame bodies this process holds right now (allocated, not yet decoded).
pub fn process_buffered() -> usize {
    PROCESS_BUDGET - PROCESS.available_permits()
}

/// Where the memory of received frames is paid from: always the process's budget, and
/// a connection's own when reading the streams its peer opened.
#[derive(Debug, Clone, Default)]
pub struct FrameBudget {
    connection: Option<Arc<Semaphore>>,
}

impl FrameBudget {
    /// The process's budget only.
    pub fn process() -> Self {
        Self { connection: None }
    }

    /// A new budget of [`CONNECTION_BUDGET`] for one connection, within the process's.
    pub fn connection() -> Self {
        Self {
            connection: Some(Arc::new(Semaphore::new(CONNECTION_BUDGET))),
        }
    }

    /// Bytes of frame bodies held under this connection's budget right now (0 without
    /// one).
    pub fn buffered(&self) -> usize {
        self.connection
            .as_ref()
            .map_or(0, |s| CONNECTION_BUDGET - s.available_permits())
    }

    /// Takes `n` more bytes into `held`, waiting at most [`BUDGET_WAIT`] in all.
    async fn take(&self, n: usize, held: &mut Held) -> Result<(), FrameError> {
        let exhausted = |scope: &'static str, limit: usize| FrameError::Budget {
            want: n,
            scope,
            limit,
        };
        let permits = u32::try_from(n).map_err(|_| exhausted("process", PROCESS_BUDGET))?;
        let work = async {
            // The connection first, then the process: one order for every stream, so
            // that two streams never wait for each other's half.
            let conn = match &self.connection {
                Some(sem) => Some(
                    sem.clone()
                        .acquire_many_owned(permits)
                        .await
                        .map_err(|_| exhausted("connection", CONNECTION_BUDGET))?,
                ),
                None => None,
            };
            let process = PROCESS
                .acquire_many(permits)
                .await
                .map_err(|_| exhausted("process", PROCESS_BUDGET))?;
            Ok::<_, FrameError>((conn, process))
        };
        let (conn, process) = match tokio::time::timeout(BUDGET_WAIT, work).await {
            Ok(r) => r?,
            Err(_) => {
                let conn_full = self
                    .connection
                    .as_ref()
                    .is_some_and(|s| (s.available_permits()) < n);
                return Err(if conn_full {
                    exhausted("connection", CONNECTION_BUDGET)
                } else {
                    exhausted("process", PROCESS_BUDGET)
                });
            }
        };
        match (&mut held.connection, conn) {
            (Some(h), Some(c)) => h.merge(c),
            (h @ None, c) => *h = c,
            (Some(_), None) => {}
        }
        match &mut held.process {
            Some(h) => h.merge(process),
            h @ None => *h = Some(process),
        }
        Ok(())
    }
}

/// Budget taken for one frame; given back when dropped.
///
/// Taken connection first, given back process first (fields drop in order): at no
/// moment does a connection's frame hold more of the process's budget than of its
/// connection's, so another stream of the connection cannot take the connection's
/// share while the process's is still counted for this one.
#[derive(Default)]
struct Held {
    process: Option<SemaphorePermit<'static>>,
    connection: Option<OwnedSemaphorePermit>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The payload is not the expected JSON.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The stream failed.
    #[error("stream error: {0}")]
    Stream(String),
    /// No memory for the frame's next bytes within [`BUDGET_WAIT`].
    #[error(
        "no memory for {want} more bytes of a frame: the {scope}'s budget of {} MiB for frames being received stayed exhausted for {}",
        limit / (1024 * 1024),
        crate::humanize(BUDGET_WAIT)
    )]
    Budget {
        /// Bytes asked for.
        want: usize,
        /// `connection` or `process`.
        scope: &'static str,
        /// That budget, in bytes.
        limit: usize,
    },
}

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN];
    // Serializing our own message types into a Vec cannot fail: they have string keys
    // and no fallible custom serializers.
    serde_json::to_writer(&mut buf, msg).expect("wire types always serialize");
    let len = u32::try_from(buf.len() - HEADER_LEN).expect("frames are far below 4 GiB");
    buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (more bytes are needed), and
/// `Ok(Some((msg, used)))` with the number of bytes consumed otherwise.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((serde_json::from_slice(body)?, HEADER_LEN + len)))
}

/// Decodes a buffer that must hold exactly one whole frame (a finished stream).
pub fn decode_exact<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<T, FrameError> {
    match decode(buf, max)? {
        Some((msg, used)) if used == buf.len() => Ok(msg),
        Some((_, used)) => Err(FrameError::Stream(format!(
            "{} unexpected bytes after the frame",
            buf.len() - used
        ))),
        None => {
            let want = if buf.len() >= HEADER_LEN {
                HEADER_LEN
                    + u32::from_be_bytes(buf[..HEADER_LEN].try_into().expect("4 bytes")) as usize
            } else {
                HEADER_LEN
            };
            Err(FrameError::Truncated {
                got: buf.len(),
                want,
            })
        }
    }
}

/// Writes one frame to a stream.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    send.write_all(&encode(msg))
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))
}

/// Reads one frame from a stream; `Ok(None)` if the stream ended cleanly before it. Its
/// memory comes from the process's budget only.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, FrameError> {
    read_frame_in(recv, max, &FrameBudget::process()).await
}

/// Reads one frame from a stream, paying its memory from `budget` as its bytes arrive
/// (module doc); `Ok(None)` if the stream ended cleanly before it.
pub async fn read_frame_in<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: &FrameBudget,
) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match recv.read(&mut header[got..]).await {
            Ok(Some(n)) => got += n,
            Ok(None) if got == 0 => return Ok(None),
            Ok(None) => {
                return Err(FrameError::Truncated {
                    got,
                    want: HEADER_LEN,
                });
            }
            Err(e) => return Err(FrameError::Stream(e.to_string())),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut held = Held::default();
    let mut body: Vec<u8> = Vec::new();
    while body.len() < len {
        if body.len() == body.capacity() {
            let cap = (body.capacity() * 2).clamp(READ_CHUNK.min(len), len);
            budget.take(cap - body.capacity(), &mut held).await?;
            body.reserve_exact(cap - body.len());
        }
        let room = body.capacity().min(len) - body.len();
        match recv.read_chunk(room, true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameError::Truncated {
                    got: HEADER_LEN + body.len(),
                    want: HEADER_LEN + len,
                });
            }
            Err(e) => return Err(FrameError::Stream(e.to_string())),
        }
    }
    let msg = serde_json::from_slice(&body)?;
    drop(body);
    drop(held);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::msg::{ClientRequest, Hello, PeerRole, Request};
    use proptest::prelude::*;

    fn hello(name: String, version: u32) -> Request<Hello> {
        Request {
            id: format!("id-{name}"),
            timeout_ms: Some(5),
            body: Hello {
                api_version: version,
                role: PeerRole::Agent,
                name,
                software: "drover test".into(),
                lost_term: None,
            },
        }
    }

    proptest! {
        #[test]
        fn round_trip(name in "\\PC{0,64}", version in any::<u32>()) {
            let msg = hello(name, version);
            let bytes = encode(&msg);
            let (back, used): (Request<Hello>, usize) = decode(&bytes, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn truncated_frames_ask_for_more_and_are_errors_at_the_end(name in "[a-z]{0,32}", cut in 0usize..64) {
            let bytes = encode(&hello(name, 1));
            let cut = cut.min(bytes.len() - 1);
            let part = &bytes[..cut];
            prop_assert!(decode::<Request<Hello>>(part, 1 << 20).unwrap().is_none());
            let is_truncated = matches!(
                decode_exact::<Request<Hello>>(part, 1 << 20),
                Err(FrameError::Truncated { .. })
            );
            prop_assert!(is_truncated);
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request<ClientRequest>>(&bytes, 128);
            let _ = decode_exact::<Request<ClientRequest>>(&bytes, 128);
        }

        #[test]
        fn garbage_payload_with_a_valid_header_is_malformed(body in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assume!(serde_json::from_slice::<Request<ClientRequest>>(&body).is_err());
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let is_malformed = matches!(
                decode::<Request<ClientRequest>>(&bytes, 1024),
                Err(FrameError::Malformed(_))
            );
            prop_assert!(is_malformed);
        }
    }

    #[test]
    fn oversize_frames_are_refused_from_the_header_alone() {
        let header = (10_000u32).to_be_bytes();
        let err = decode::<Request<Hello>>(&header, 1000).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 10_000,
                max: 1000
            }
        ));
        assert_eq!(
            err.to_string(),
            "frame of 10000 bytes exceeds the limit of 1000 bytes"
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&hello("a".into(), 1));
        bytes.push(0);
        assert!(decode_exact::<Request<Hello>>(&bytes, 1 << 20).is_err());
    }
}
