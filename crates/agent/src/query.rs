//! Value queries to running nodes (Zeek's get-id-value), over each node's
//! `DROVER_QUERY_SOCKET`.
//!
//! The protocol, which any program can implement: the node listens on a Unix stream
//! socket at the path in `DROVER_QUERY_SOCKET`; the agent connects, writes one line of
//! JSON `{"id": "<identifier>"}`, and reads one line back, `{"value": <any JSON>}` or
//! `{"error": "<message>"}`. See `crates/testprog/QUERY-PROTOCOL.md`.

use std::path::PathBuf;
use std::time::Duration;

use drover_proto::model::{MgmtResult, ResultData};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one node may take to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest answer accepted.
const MAX_ANSWER: u64 = 1024 * 1024;

/// Asks one node for `id`; the value as a JSON document, or why there is none.
pub async fn ask(socket: &std::path::Path, id: &str) -> Result<String, String> {
    let work = async {
        let mut stream = connect_no_follow(socket)
            .await
            .map_err(|e| format!("node does not answer value queries ({e})"))?;
        let mut req = serde_json::to_vec(&serde_json::json!({ "id": id })).expect("json");
        req.push(b'\n');
        stream
            .write_all(&req)
            .await
            .map_err(|e| format!("cannot send the query: {e}"))?;
        let mut bytes = Vec::new();
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_ANSWER));
        reader
            .read_until(b'\n', &mut bytes)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        // Measured before it is decoded: the cut may fall inside a character.
        if bytes.last() != Some(&b'\n') && bytes.len() as u64 >= MAX_ANSWER {
            return Err(format!(
                "node's answer is larger than {} MiB, the most a value may take",
                MAX_ANSWER / (1024 * 1024)
            ));
        }
        let line = String::from_utf8(bytes)
            .map_err(|_| "node sent an invalid answer: not UTF-8".to_owned())?;
        let answer: serde_json::Value = serde_json::from_str(line.trim_end())
            .map_err(|e| format!("node sent an invalid answer: {e}"))?;
        if let Some(v) = answer.get("value") {
            Ok(v.to_string())
        } else if let Some(e) = answer.get("error").and_then(|e| e.as_str()) {
            Err(e.to_owned())
        } else {
            Err("node sent an answer with neither value nor error".to_owned())
        }
    };
    match tokio::time::timeout(QUERY_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err("node did not answer in time".to_owned()),
    }
}

/// Connects to the socket at `socket` itself, never to what a symlink there points to:
/// a node running as its own user owns the directory of its query socket, and must
/// not make the agent connect to another program's socket. The socket file is opened
/// as a path without following (`O_PATH | O_NOFOLLOW`), checked to be a socket, and
/// reached through that descriptor, so nothing can be swapped in between.
async fn connect_no_follow(socket: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(socket)?;
    if !file.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::other(format!(
            "{} is not a socket",
            socket.display()
        )));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd())).await
}

/// Asks every target at once; one result per node.
pub async fn ask_all(
    instance: &str,
    id: &str,
    targets: Vec<(String, Result<PathBuf, String>)>,
) -> Vec<MgmtResult> {
    let mut set = tokio::task::JoinSet::new();
    for (node, target) in targets {
        let id = id.to_owned();
        set.spawn(async move {
            let r = match target {
                Ok(sock) => ask(&sock, &id).await,
                Err(e) => Err(e),
            };
            (node, r)
        });
    }
    let mut out = Vec::new();
    while let Some(Ok((node, r))) = set.join_next().await {
        out.push(match r {
            Ok(json) => MgmtResult::ok("", Some(ResultData::Json(json)))
                .on_instance(instance)
                .on_node(node),
            Err(e) => MgmtResult::err("", e).on_instance(instance).on_node(node),
        });
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queries_reach_the_socket_itself_and_never_follow_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.sock");
        let listener = tokio::net::UnixListener::bind(&real).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await.unwrap();
            assert_eq!(line, "{\"id\":\"x\"}\n");
            write.write_all(b"{\"value\": 7}\n").await.unwrap();
        });
        assert_eq!(ask(&real, "x").await, Ok("7".to_owned()));
        server.await.unwrap();
        let link = dir.path().join("query.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = ask(&link, "x").await.unwrap_err();
        assert!(err.contains("does not answer value queries"), "{err}");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let err = ask(&plain, "x").await.unwrap_err();
        assert!(err.contains("is not a socket"), "{err}");
    }

    /// An answer over the bound is said to be too large, not to be bad JSON.
    #[tokio::test]
    async fn an_answer_over_the_bound_is_said_to_be_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        // `{"value": "` and `"}` and the newline take 14 bytes: one that fits exactly,
        // one a byte over, and one over in two-byte characters, the bound falling
        // inside one of them.
        let max = usize::try_from(MAX_ANSWER).unwrap();
        let answers = [
            format!("{{\"value\": \"{}\"}}\n", "x".repeat(max - 14)),
            format!("{{\"value\": \"{}\"}}\n", "x".repeat(max + 1 - 14)),
            format!("{{\"value\": \"{}\"}}\n", "é".repeat(max / 2)),
        ];
        assert_eq!(answers[0].len(), max);
        let server = tokio::spawn(async move {
            for answer in answers {
                let (mut stream, _) = listener.accept().await.unwrap();
                // The agent stops reading at the bound: a write past it may fail.
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let fits = ask(&sock, "x").await;
        assert!(fits.is_ok(), "{fits:?}");
        for _ in 0..2 {
            let err = ask(&sock, "x").await.unwrap_err();
            assert_eq!(
                err,
                "node's answer is larger than 1 MiB, the most a value may take"
            );
        }
        server.await.unwrap();
    }
}
