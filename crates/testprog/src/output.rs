//! Steady streams of numbered lines on stdout or stderr.

use std::io::{self, Write};
use std::thread;
use std::time::{Duration, Instant};

/// Which standard stream to write to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }

    fn write_line(self, line: &str) -> io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            Self::Stderr => {
                let mut out = io::stderr().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
        }
    }
}

/// Starts a thread (named `stdout-writer` or `stderr-writer`) that writes
/// `rate` lines per second, `testprog <pid> <stream> line <seq>` with `seq`
/// counting from 1, until `cap` lines are written or a write fails (for
/// instance with `EPIPE` once the reader is gone). The thread then ends; the
/// program keeps running.
pub(crate) fn start(stream: Stream, rate: u32, cap: Option<u64>) -> io::Result<()> {
    if rate == 0 || cap == Some(0) {
        return Ok(());
    }
    thread::Builder::new()
        .name(format!("{}-writer", stream.name()))
        .spawn(move || write_lines(stream, rate, cap))?;
    Ok(())
}

fn write_lines(stream: Stream, rate: u32, cap: Option<u64>) {
    let pid = std::process::id();
    let start = Instant::now();
    let mut seq: u64 = 0;
    while cap.is_none_or(|cap| seq < cap) {
        seq += 1;
        let line = format!("testprog {pid} {} line {seq}\n", stream.name());
        if stream.write_line(&line).is_err() {
            // EPIPE or any other failure: stop writing, keep living.
            return;
        }
        // Line `seq + 1` is due at `seq / rate` seconds after the start, so
        // the rate does not drift with the time spent writing.
        let nanos = u128::from(seq) * 1_000_000_000 / u128::from(rate);
        let due = Duration::new(
            u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
            u32::try_from(nanos % 1_000_000_000).unwrap_or(0),
        );
        thread::sleep(due.saturating_sub(start.elapsed()));
    }
}
