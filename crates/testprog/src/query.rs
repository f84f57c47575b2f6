//! The value query server on `$DROVER_QUERY_SOCKET`.
//!
//! See `QUERY-PROTOCOL.md` next to `Cargo.toml` for the protocol; in short,
//! a client writes one line `{"id": "<name>"}` and reads back one line,
//! `{"value": <json>}` or `{"error": "<message>"}`, then the server closes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

/// The variable naming the query socket.
pub(crate) const QUERY_SOCKET: &str = "DROVER_QUERY_SOCKET";

/// How long a connection may stay silent before it is answered with an error.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request line accepted, newline included.
const MAX_REQUEST: u64 = 64 * 1024;

/// Values answered in place of the built-in ones.
type Values = BTreeMap<String, Value>;

/// Binds the query socket at `path` (replacing a stale socket left there)
/// and serves it from a background thread.
pub(crate) fn serve(path: &Path, values: Values) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let values = Arc::new(values);
    thread::Builder::new()
        .name("query-server".to_owned())
        .spawn(move || accept_loop(&listener, &values))?;
    Ok(())
}

fn accept_loop(listener: &UnixListener, values: &Arc<Values>) {
    for connection in listener.incoming() {
        match connection {
            Ok(stream) => {
                let values = Arc::clone(values);
                // One short thread per connection, so a silent client
                // cannot hold up the others.
                let spawned = thread::Builder::new()
                    .name("query-conn".to_owned())
                    .spawn(move || handle(&stream, &values));
                if let Err(e) = spawned {
                    eprintln!("drover-testprog: cannot start a query thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("drover-testprog: query socket accept failed: {e}");
                // Do not spin if accept keeps failing (e.g. out of descriptors).
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(stream: &UnixStream, values: &Values) {
    // If the timeouts cannot be set, the reply below still goes out; the
    // thread may just wait longer for a silent client.
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let reply = match read_request(stream) {
        Ok(line) => answer(&line, values),
        Err(message) => json!({ "error": format!("bad request: {message}") }),
    };
    let mut reply = reply.to_string();
    reply.push('\n');
    let mut writer = stream;
    // The client may have gone already; nothing to do about it then.
    let _ = writer.write_all(reply.as_bytes());
    let _ = writer.flush();
}

fn read_request(stream: &UnixStream) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST + 1));
    match reader.read_until(b'\n', &mut line) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(format!(
                "no request line within {} s",
                READ_TIMEOUT.as_secs()
            ));
        }
        Err(e) => return Err(e.to_string()),
    }
    if line.len() as u64 > MAX_REQUEST {
        return Err(format!("request line longer than {MAX_REQUEST} bytes"));
    }
    if line.is_empty() {
        return Err("empty request".to_owned());
    }
    Ok(line)
}

/// Answers one request line with `{"value": ...}` or `{"error": ...}`.
fn answer(line: &[u8], values: &Values) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(request) => request,
        Err(e) => return json!({ "error": format!("bad request: {e}") }),
    };
    let Some(id) = request.get("id").and_then(Value::as_str) else {
        return json!({ "error": "bad request: expected a JSON object like {\"id\": \"<name>\"}" });
    };
    match lookup(id, values) {
        Some(value) => json!({ "value": value }),
        None => json!({ "error": format!("unknown identifier '{id}'") }),
    }
}

/// The value of `id`: a `--value` if one has that name, else a built-in.
fn lookup(id: &str, values: &Values) -> Option<Value> {
    if let Some(value) = values.get(id) {
        return Some(value.clone());
    }
    let env = |name: &str| {
        std::env::var_os(name).map_or(Value::Null, |v| {
            Value::String(v.to_string_lossy().into_owned())
        })
    };
    match id {
        "pid" => Some(json!(std::process::id())),
        "node" => Some(env("DROVER_NODE")),
        "args" => Some(Value::Array(
            std::env::args_os()
                .map(|arg| Value::String(arg.to_string_lossy().into_owned()))
                .collect(),
        )),
        _ => id
            .strip_prefix("env.")
            .map(env)
            .or_else(|| id.strip_prefix("file.").map(file)),
    }
}

/// The text of the file at `path` (relative to the working directory), or `null` when
/// it cannot be read.
fn file(path: &str) -> Value {
    fs::read(path).map_or(Value::Null, |bytes| {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(request: &str, values: &Values) -> Value {
        answer(request.as_bytes(), values)
    }

    #[test]
    fn answers() {
        let mut values = Values::new();
        values.insert("answer".to_owned(), json!(42));
        values.insert("pid".to_owned(), json!("overridden"));
        assert_eq!(ask("{\"id\": \"answer\"}\n", &values), json!({"value": 42}));
        assert_eq!(
            ask("{\"id\": \"pid\"}", &values),
            json!({"value": "overridden"})
        );
        assert_eq!(
            ask("{\"id\": \"pid\"}\n", &Values::new()),
            json!({"value": std::process::id()})
        );
        assert_eq!(
            ask("{\"id\": \"env.DROVER_TESTPROG_SURELY_UNSET\"}\n", &values),
            json!({"value": null})
        );
        assert!(ask("{\"id\": \"args\"}\n", &values)["value"].is_array());
        let dir = std::env::temp_dir().join(format!("testprog-query-{}", std::process::id()));
        fs::write(&dir, "layout\n").unwrap();
        assert_eq!(
            ask(&format!("{{\"id\": \"file.{}\"}}", dir.display()), &values),
            json!({"value": "layout\n"})
        );
        fs::remove_file(&dir).unwrap();
        assert_eq!(
            ask(&format!("{{\"id\": \"file.{}\"}}", dir.display()), &values),
            json!({"value": null})
        );
        assert_eq!(
            ask("{\"id\": \"nope\"}\n", &values),
            json!({"error": "unknown identifier 'nope'"})
        );
        for bad in ["garbage\n", "{\"id\": 3}\n", "[]\n", "{}\n"] {
            let reply = ask(bad, &values);
            let message = reply["error"].as_str().unwrap();
            assert!(
                message.starts_with("bad request: "),
                "{bad:?} gave {message}"
            );
        }
    }
}
