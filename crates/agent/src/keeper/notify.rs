//! Nodes' notify sockets, held by the log keeper so that they outlive the agent.
//!
//! The agent hands the keeper a duplicate of every notify socket it binds
//! ([`super::proto::Msg::Notify`]). While an agent that connected lives the keeper
//! never reads them: the agent does (also while its connection is lost: it is counted
//! until its process is gone). While none lives (an upgrade, a crash), the keeper reads
//! every one as datagrams come, so that a node's `sd_notify` never blocks on a full socket, and
//! keeps what the next agent needs of them ([`Heard`]: `READY=1`, `WATCHDOG=trigger`
//! and `STATUS=` lines, with the sender's pid and cgroup, at most [`HEARD_MAX`] per
//! node). The next agent's [`super::proto::Msg::Hello`] stops the reading; the keeper
//! hands it each socket with what it heard, and the agent goes on reading the same
//! socket, so nothing a node sends in between is lost. `WATCHDOG=1` pings are not kept:
//! an agent watches an adopted node's watchdog afresh from its adoption.

use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

pub use super::proto::Heard;

/// Datagrams kept per node while no agent is connected; beyond it the oldest that
/// says neither `READY=1` nor `WATCHDOG=trigger` goes.
pub const HEARD_MAX: usize = 16;

/// One node's notify socket as the keeper holds it.
pub struct Held {
    fd: AsyncFd<OwnedFd>,
    heard: std::cell::RefCell<Vec<Heard>>,
}

impl Held {
    /// Holds `fd` (made non-blocking here), and reads it whenever `agents` is 0 until the
    /// returned handle is dropped or aborted.
    pub fn start(
        fd: OwnedFd,
        agents: watch::Receiver<usize>,
    ) -> std::io::Result<(Rc<Self>, tokio::task::AbortHandle)> {
        super::set_nonblocking(std::os::fd::AsFd::as_fd(&fd))?;
        let held = Rc::new(Self {
            fd: super::server::register(fd)?,
            heard: std::cell::RefCell::default(),
        });
        let task = tokio::task::spawn_local(read_while_alone(held.clone(), agents));
        Ok((held, task.abort_handle()))
    }

    /// A duplicate of the socket, for an agent.
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self.fd.get_ref().try_clone()
    }

    /// What was heard since the last agent was handed the socket, which it now is.
    pub fn take_heard(&self) -> Vec<Heard> {
        std::mem::take(&mut self.heard.borrow_mut())
    }
}

thread_local! {
    /// The one buffer the sockets are read into (the keeper has one thread): a socket
    /// holds memory only for what it kept.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 4096]);
}

/// Reads the socket while no agent is connected.
async fn read_while_alone(held: Rc<Held>, mut agents: watch::Receiver<usize>) {
    let now = agents.clone();
    loop {
        if agents.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        tokio::select! {
            ready = held.fd.readable() => {
                let Ok(mut guard) = ready else { return };
                // An agent that connected meanwhile reads it from now on.
                if *now.borrow() != 0 {
                    continue;
                }
                let read = SCRATCH.with_borrow_mut(|buf| {
                    guard.try_io(|fd| {
                        let (n, pid) = crate::probe::recv_cred(fd.as_raw_fd(), buf)?;
                        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), pid))
                    })
                });
                match read {
                    Ok(Ok((text, pid))) => {
                        let cgroup = pid.and_then(crate::probe::cgroup_of);
                        keep(&mut held.heard.borrow_mut(), &text, pid, cgroup);
                        // A node sending flat out must not keep the thread (see the
                        // keeper's pipes).
                        tokio::task::consume_budget().await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("cannot read a node's notify socket: {e}");
                        return;
                    }
                    Err(_would_block) => {}
                }
            }
            _ = agents.wait_for(|n| *n != 0) => {}
        }
    }
}

/// Adds what a datagram says that an agent acts on to `heard` (see the module docs).
pub fn keep(heard: &mut Vec<Heard>, text: &str, pid: Option<u32>, cgroup: Option<String>) {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| matches!(*l, "READY=1" | "WATCHDOG=trigger"))
        .map(str::to_owned)
        .collect();
    // The last status only, as the agent reads one.
    if let Some(status) = text.lines().rev().find_map(|l| l.strip_prefix("STATUS=")) {
        let cut: String = status.chars().take(crate::probe::STATUS_MAX).collect();
        lines.push(format!("STATUS={cut}"));
    }
    if lines.is_empty() {
        return;
    }
    if heard.len() >= HEARD_MAX {
        drop_one(heard);
    }
    heard.push(Heard {
        text: lines.join("\n"),
        pid,
        cgroup,
    });
}

/// Drops the oldest entry that says neither `READY=1` nor `WATCHDOG=trigger`, else the
/// oldest.
fn drop_one(heard: &mut Vec<Heard>) {
    let matters = |h: &Heard| {
        h.text
            .lines()
            .any(|l| l == "READY=1" || l == "WATCHDOG=trigger")
    };
    if !heard.is_empty() {
        let at = heard.iter().position(|h| !matters(h)).unwrap_or(0);
        heard.remove(at);
    }
}

/// The message handing node `node`'s socket to an agent with what was heard, within
/// half of [`super::proto::MAX_MESSAGE`] (status texts of control characters grow six
/// times as JSON): entries are dropped as [`keep`] drops them until it fits.
pub fn holding(node: &str, mut heard: Vec<Heard>) -> super::proto::Msg {
    use super::proto::{MAX_MESSAGE, Msg, encode};
    let msg = |heard: Vec<Heard>| Msg::HoldingNotify {
        node: node.to_owned(),
        heard,
    };
    while !heard.is_empty() && encode(&msg(heard.clone())).len() > MAX_MESSAGE / 2 {
        drop_one(&mut heard);
    }
    msg(heard)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(heard: &[Heard]) -> Vec<&str> {
        heard.iter().map(|h| h.text.as_str()).collect()
    }

    #[test]
    fn only_what_an_agent_acts_on_is_kept() {
        let mut heard = Vec::new();
        keep(&mut heard, "WATCHDOG=1\n", Some(7), None);
        keep(&mut heard, "MAINPID=3\nX=y", Some(7), None);
        assert!(heard.is_empty());
        keep(
            &mut heard,
            "WATCHDOG=1\nREADY=1\nSTATUS=up\n",
            Some(7),
            Some("/n".into()),
        );
        assert_eq!(texts(&heard), ["READY=1\nSTATUS=up"]);
        assert_eq!(heard[0].pid, Some(7));
        assert_eq!(heard[0].cgroup.as_deref(), Some("/n"));
        let long = format!("STATUS={}", "x".repeat(1000));
        keep(&mut heard, &long, None, None);
        assert_eq!(
            heard[1].text.len(),
            "STATUS=".len() + crate::probe::STATUS_MAX
        );
    }

    #[test]
    fn what_is_handed_over_fits_a_message_whatever_the_statuses_hold() {
        let mut heard = Vec::new();
        let nasty = format!("STATUS={}", "\u{1}".repeat(1000));
        for _ in 0..HEARD_MAX {
            // Fifteen statuses in one datagram: the last is kept.
            let text = std::iter::repeat_n(nasty.as_str(), 15)
                .chain(["READY=1"])
                .collect::<Vec<_>>()
                .join("\n");
            keep(&mut heard, &text, Some(1), Some("/x".repeat(100)));
        }
        assert_eq!(heard.len(), HEARD_MAX);
        assert!(heard[0].text.matches("STATUS=").count() == 1);
        let msg = holding("n1", heard);
        assert!(super::super::proto::encode(&msg).len() <= super::super::proto::MAX_MESSAGE / 2);
        let super::super::proto::Msg::HoldingNotify { heard, .. } = msg else {
            panic!("a holding message");
        };
        assert!(!heard.is_empty(), "some kept");
    }

    #[test]
    fn a_flood_of_status_lines_never_pushes_out_a_readiness() {
        let mut heard = Vec::new();
        keep(&mut heard, "STATUS=first", Some(1), None);
        keep(&mut heard, "READY=1", Some(1), None);
        keep(&mut heard, "WATCHDOG=trigger", Some(1), None);
        for i in 0..100 {
            keep(&mut heard, &format!("STATUS={i}"), Some(1), None);
        }
        assert_eq!(heard.len(), HEARD_MAX);
        assert_eq!(heard[0].text, "READY=1");
        assert_eq!(heard[1].text, "WATCHDOG=trigger");
        assert_eq!(heard.last().map(|h| h.text.as_str()), Some("STATUS=99"));
        // Only readiness and triggers: the oldest goes.
        let mut heard = Vec::new();
        for i in 0..=HEARD_MAX {
            keep(&mut heard, &format!("READY=1\nSTATUS={i}"), Some(1), None);
        }
        assert_eq!(heard.len(), HEARD_MAX);
        assert_eq!(heard[0].text, "READY=1\nSTATUS=1");
    }
}
