//! The frame codec: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The pure functions here ([`encode`], [`decode`]) do no I/O and are what the property
//! tests and fuzz targets exercise; [`read_frame`] and [`write_frame`] apply them to QUIC
//! streams. A frame longer than the limit is refused before any of it is buffered.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

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

/// Reads one frame from a stream; `Ok(None)` if the stream ended cleanly before it.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
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
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => FrameError::Truncated {
            got: HEADER_LEN + n,
            want: HEADER_LEN + len,
        },
        quinn::ReadExactError::ReadError(e) => FrameError::Stream(e.to_string()),
    })?;
    Ok(Some(serde_json::from_slice(&body)?))
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
