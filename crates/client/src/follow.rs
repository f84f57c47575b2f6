//! `logs -f` and `monitor` through a controller's restart or a leader's failover.
//!
//! A follow is a stream on one controller connection. When that controller goes away
//! (it stops or restarts, steps down as leader, or its host falls silent) while others
//! may take over, the follow goes on: the client says so on stderr, dials again (every
//! address it was given, following a follower's pointer to the leader) until a
//! controller answers, and asks anew. A log follow is taken up from where the last
//! lines it showed left each stream (the agent sends what the node wrote meanwhile, at
//! most its last MiB); a monitor subscribes again, and the events of the gap are lost:
//! it writes a `resubscribed` event where they would have been.
//! A connection ended for another reason (our certificate no longer trusted, Ctrl-C)
//! ends the command, as does a refusal when dialling again; any other failure to dial
//! is told (each reason once) and tried again.

use std::process::ExitCode;
use std::time::Duration;

use drover_proto::model::{LogResume, LogStream};
use drover_proto::msg::{ClientRequest, Event, EventRecord};

use crate::output::{self, Ended};
use crate::session::{Refused, Session};
use crate::settings::Settings;
use crate::stdio;

/// How long a stream that ended without an error waits for its connection to close
/// before it is taken for a plain end: a stopping controller ends its streams first.
const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

/// The pauses between attempts to dial again: from the first to the longest, doubling.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// What is followed.
pub(crate) enum Follow {
    /// `logs NODE -f`: the lines first shown of each stream, and the stream.
    Logs {
        node: String,
        lines: usize,
        stream: Option<LogStream>,
        /// Where control characters are written out (see [`crate::visible`]).
        escapes: crate::visible::Escapes,
    },
    /// `monitor [--logs]`.
    Monitor { logs: bool },
}

impl Follow {
    /// The request, the first time (`resume` none) or taken up again.
    fn request(&self, resume: Option<LogResume>) -> ClientRequest {
        match self {
            Self::Logs {
                node,
                lines,
                stream,
                ..
            } => ClientRequest::Logs {
                node: node.clone(),
                lines: if resume.is_some() { 0 } else { *lines },
                follow: true,
                stream: *stream,
                resume,
            },
            Self::Monitor { logs } => ClientRequest::Monitor { logs: *logs },
        }
    }

    /// What the note of a follow taken up again says of the gap.
    fn gap(&self, stands: &LogResume) -> &'static str {
        match self {
            Self::Logs { stream, .. } => {
                let known = match stream {
                    Some(LogStream::Stdout) => stands.stdout.is_some(),
                    Some(LogStream::Stderr) => stands.stderr.is_some(),
                    None => stands.stdout.is_some() && stands.stderr.is_some(),
                };
                if known {
                    "what the node wrote meanwhile follows"
                } else {
                    "what the node wrote meanwhile is not shown"
                }
            }
            Self::Monitor { .. } => "events meanwhile are not shown",
        }
    }
}

/// Runs `what` on `session`, and on the sessions that take over from it, until it ends.
pub(crate) async fn run(
    settings: &Settings,
    session: Session,
    what: &Follow,
) -> anyhow::Result<ExitCode> {
    let mut session = session;
    let mut stands = LogResume::default();
    let mut resume = None;
    let several = settings.controller_addrs().len() > 1;
    loop {
        let req = what.request(resume);
        let printed = async {
            match session.request_stream(&req).await {
                Ok(mut replies) => match what {
                    Follow::Logs { escapes, .. } => {
                        output::print_logs(&mut replies, true, &mut stands, *escapes).await
                    }
                    Follow::Monitor { .. } => output::print_events(&mut replies).await,
                },
                Err(e) => Ok(Ended::Broken(Some(e))),
            }
        };
        // A controller that welcomed us warning that it may not lead any more (cut off
        // from etcd) is left as soon as another welcomes us without: the leader its
        // agents went to.
        let moved = tokio::select! {
            ended = printed => Err(ended?),
            better = leader_elsewhere(settings, &session), if several && session.stale() => {
                Ok(better)
            }
        };
        let ended = match moved {
            Ok(better) => {
                stdio::errln(&format!(
                    "[drover: controller {} may not lead any more; following again through \
                     controller {}; {}]",
                    session.peer(),
                    better.peer(),
                    what.gap(&stands)
                ));
                session.close().await;
                session = better;
                session.watch_interrupts();
                say_resubscribed(what, &session, "it may not lead any more".to_owned())?;
                resume = Some(stands);
                continue;
            }
            Err(ended) => ended,
        };
        let broken = match ended {
            Ended::Done(ok) => {
                session.close().await;
                return Ok(crate::exit(ok));
            }
            Ended::Broken(e) => e,
        };
        let Some(why) = session.gone(CLOSE_PATIENCE).await else {
            session.close().await;
            return match broken {
                Some(e) => Err(e),
                None => Ok(ExitCode::SUCCESS),
            };
        };
        let was = session.peer();
        drop(session);
        stdio::errln(&format!(
            "[drover: controller {was} went away ({why}); following again once a controller answers]"
        ));
        session = match dial_again(settings).await? {
            Some(s) => s,
            // Stdout's reader went away meanwhile: nothing more to show.
            None => return Ok(ExitCode::SUCCESS),
        };
        stdio::errln(&format!(
            "[drover: following again through controller {}; {}]",
            session.peer(),
            what.gap(&stands)
        ));
        say_resubscribed(what, &session, why)?;
        resume = Some(stands);
    }
}

/// For a program reading a monitor's events: the gap, in their own form.
fn say_resubscribed(what: &Follow, session: &Session, reason: String) -> anyhow::Result<()> {
    if let Follow::Monitor { .. } = what {
        let record = EventRecord {
            at_ms: now_ms(),
            event: Event::Resubscribed {
                controller: session.peer().to_string(),
                reason,
            },
        };
        stdio::outln(&crate::visible::json_line(&record)?)?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves to a session with a controller other than `current` that welcomes us without
/// a warning, looking every second.
async fn leader_elsewhere(settings: &Settings, current: &Session) -> Session {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(s) = Session::connect_saying(settings, false).await {
            if !s.stale() && s.peer() != current.peer() {
                return s;
            }
            s.close().await;
        }
        current.watch_interrupts();
    }
}

/// Dials until a controller answers (None once stdout's reader went away); a refusal
/// ends it, since asking again would be refused again.
async fn dial_again(settings: &Settings) -> anyhow::Result<Option<Session>> {
    let closed = stdio::stdout_closed();
    tokio::pin!(closed);
    let mut pause = FIRST_PAUSE;
    // The last reason told: each is told once, a new one as it comes (a certificate
    // that expired meanwhile, say, which its renewal on disk mends: the files are read
    // again at each attempt).
    let mut told = None;
    loop {
        let attempt = tokio::select! {
            s = Session::connect(settings) => s,
            () = &mut closed => return Ok(None),
        };
        match attempt {
            Ok(s) => return Ok(Some(s)),
            Err(e) if permanent(&e) => return Err(e),
            Err(e) => {
                let why = drover_proto::error_text::one_line(e.as_ref());
                if told.as_ref() != Some(&why) {
                    stdio::errln(&format!(
                        "[drover: no controller answers yet ({why}); trying again]"
                    ));
                    told = Some(why);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = &mut closed => return Ok(None),
        }
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// Whether a failure to connect would come again however often we tried: the
/// controller refused us, or something else than a controller answers there. Not our
/// certificate files failing to load, which a renewal under way mends.
fn permanent(e: &anyhow::Error) -> bool {
    use drover_net::NetError;
    e.downcast_ref::<Refused>().is_some()
        || matches!(
            e.downcast_ref::<NetError>(),
            Some(NetError::Identity(_) | NetError::Refused(_))
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::model::LogMark;

    #[test]
    fn a_follow_taken_up_again_asks_from_where_it_stood() {
        let what = Follow::Logs {
            node: "w".into(),
            lines: 10,
            stream: None,
            escapes: crate::visible::Escapes::RAW,
        };
        let first = what.request(None);
        assert!(
            matches!(
                &first,
                ClientRequest::Logs {
                    lines: 10,
                    follow: true,
                    resume: None,
                    ..
                }
            ),
            "{first:?}"
        );
        let mark = LogMark { ino: 7, len: 120 };
        let stands = LogResume {
            stdout: Some(mark),
            stderr: None,
        };
        let again = what.request(Some(stands));
        assert!(
            matches!(
                &again,
                ClientRequest::Logs { lines: 0, follow: true, resume: Some(r), .. } if *r == stands
            ),
            "{again:?}"
        );
        // Only stdout's place is known: what stderr got meanwhile is not shown.
        assert_eq!(
            what.gap(&stands),
            "what the node wrote meanwhile is not shown"
        );
        let only_stdout = Follow::Logs {
            node: "w".into(),
            lines: 10,
            stream: Some(LogStream::Stdout),
            escapes: crate::visible::Escapes::RAW,
        };
        assert_eq!(
            only_stdout.gap(&stands),
            "what the node wrote meanwhile follows"
        );
        assert_eq!(
            Follow::Monitor { logs: true }.gap(&stands),
            "events meanwhile are not shown"
        );
    }

    #[test]
    fn refusals_are_not_tried_again() {
        let refused = anyhow::Error::new(drover_net::NetError::Refused(
            drover_proto::msg::WireError::new(drover_proto::msg::ErrorCode::Forbidden, "no"),
        ));
        assert!(permanent(&refused));
        let creds = anyhow::Error::new(drover_net::NetError::Credentials("bad key".into()));
        assert!(!permanent(&creds), "a renewal may be under way");
        let away = anyhow::Error::new(drover_net::NetError::Connection(
            "nothing listens at udp 127.0.0.1:1: connection refused".into(),
        ));
        assert!(!permanent(&away));
    }
}
