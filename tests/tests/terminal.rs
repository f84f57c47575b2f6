//! What nodes wrote, shown on an operator's terminal: a node's output and `STATUS=` may
//! hold a stranger's bytes (a sensor logs what it saw on the wire), so `drover logs`,
//! `drover status` and the output tails of a failed restart write control characters
//! out (`\x1b`) instead of passing escape sequences to the terminal. A pipe or a file, or
//! `--raw`, gets the lines exactly as written.
//!
//! The terminal is a real pseudo-terminal the test opens; the CLI sees a tty on stdout
//! and stderr as it would in an operator's shell.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use drover_tests::{Cluster, PATIENCE, bin, eventually};

/// A title change, a screen wipe and a carriage return hiding what came before it.
const SNEAKY: &str = "\u{1b}]0;owned\u{7}title\u{1b}[2Jwiped\rhidden";
/// [`SNEAKY`] written out.
const SNEAKY_SHOWN: &str = r"\x1b]0;owned\x07title\x1b[2Jwiped\x0dhidden";

/// A CLI whose stdout and stderr are a pseudo-terminal, and what it wrote there so far
/// (the terminal's newlines, `\r\n`, back to `\n`).
struct OnTerminal {
    child: Child,
    seen: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl OnTerminal {
    fn spawn(mut cmd: Command) -> Self {
        let pty = nix::pty::openpty(None, None).unwrap();
        let out = pty.slave.try_clone().unwrap();
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(pty.slave));
        let child = cmd.spawn().unwrap();
        // The slave's copies in `cmd` go with it: the master reads an error once the CLI
        // has exited.
        drop(cmd);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut master = std::fs::File::from(pty.master);
        let into = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                into.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            seen,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&seen).replace("\r\n", "\n")
    }

    /// Waits for the CLI to exit: its exit code and everything it wrote.
    fn finish(mut self) -> (Option<i32>, String) {
        let code = self.child.wait().unwrap().code();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (code, self.text())
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drover_on_terminal(c: &Cluster, addr: SocketAddr, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = c.drover_command(addr);
    cmd.args(args);
    OnTerminal::spawn(cmd).finish()
}

#[test]
fn what_nodes_wrote_reaches_a_terminal_with_its_control_characters_written_out() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    let prog = bin("drover-testprog").display().to_string();
    // TOML's `\u001b` is the escape character itself.
    let toml_text = |s: &str| {
        s.replace('\u{1b}', r"\u001b")
            .replace('\u{7}', r"\u0007")
            .replace('\r', r"\r")
    };
    c.deploy_text(
        addr,
        "nodes.toml",
        &format!(
            r#"[instances.agent-1]

[nodes.chatty]
instance = "agent-1"
command = ["{prog}", "--status", "up{wipe}wiped", "--print", "plain", "--print", "{sneaky}", "--eprint", "err{red}red"]

[nodes.broken]
instance = "agent-1"
command = ["{prog}", "--eprint", "bad{wipe}news", "--exit-after", "0ms", "--exit-code", "3"]
restart = "never"
"#,
            wipe = toml_text("\u{1b}[2J"),
            red = toml_text("\u{1b}[31m"),
            sneaky = toml_text(SNEAKY),
        ),
    );

    // To a pipe: as written.
    let piped = eventually("chatty's lines", PATIENCE, || {
        let out = c.drover(addr, &["logs", "chatty"]);
        (out.code == Some(0) && out.stdout.contains("plain")).then_some(out)
    });
    assert!(piped.stdout.contains(SNEAKY), "{:?}", piped.stdout);
    assert!(
        piped.stderr.contains("err\u{1b}[31mred"),
        "{:?}",
        piped.stderr
    );

    // To a terminal: written out, and no escape character reaches it.
    let (code, shown) = drover_on_terminal(&c, addr, &["logs", "chatty"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("plain\n"), "{shown:?}");
    assert!(shown.contains(SNEAKY_SHOWN), "{shown:?}");
    assert!(shown.contains(r"err\x1b[31mred"), "{shown:?}");
    assert!(!shown.contains('\u{1b}'), "{shown:?}");

    // Unless asked for as written.
    let (code, raw) = drover_on_terminal(&c, addr, &["logs", "chatty", "--raw"]);
    assert_eq!(code, Some(0), "{raw}");
    assert!(raw.contains(SNEAKY), "{raw:?}");

    // A follow too.
    let mut cmd = c.drover_command(addr);
    cmd.args(["logs", "-f", "chatty"]);
    let follow = OnTerminal::spawn(cmd);
    let followed = eventually("the follow shows chatty's lines", PATIENCE, || {
        let text = follow.text();
        text.contains("red").then_some(text)
    });
    drop(follow);
    assert!(followed.contains(SNEAKY_SHOWN), "{followed:?}");
    assert!(!followed.contains('\u{1b}'), "{followed:?}");

    // The node's STATUS= in `drover status`.
    let (code, status) = eventually("chatty's status text", PATIENCE, || {
        let (code, status) = drover_on_terminal(&c, addr, &["status", "chatty"]);
        status.contains("wiped").then_some((code, status))
    });
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains(r"up\x1b[2Jwiped"), "{status:?}");
    assert!(!status.contains('\u{1b}'), "{status:?}");

    // A failed restart's last lines of output (its exit status is zeek-client's, 0).
    let (_, failed) = drover_on_terminal(&c, addr, &["restart", "broken"]);
    assert!(failed.contains("error: broken on agent-1"), "{failed:?}");
    assert!(failed.contains(r"bad\x1b[2Jnews"), "{failed:?}");
    assert!(!failed.contains('\u{1b}'), "{failed:?}");
}
