//! Resource and liveness behaviours: allocate memory, fork until the kernel refuses,
//! ping the systemd watchdog, serve HTTP, and hang (stop all of that) on request; and a
//! one-shot HTTP check, for exec probes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::{notify, spawn_thread};

/// Set once `--hang-after` has passed.
static HUNG: AtomicBool = AtomicBool::new(false);

/// True once the program plays hung.
pub(crate) fn hung() -> bool {
    HUNG.load(Ordering::SeqCst)
}

/// Plays hung after `delay`: watchdog pings, HTTP answers and the `--listen` socket stop.
pub(crate) fn hang_after(delay: Duration) {
    spawn_thread("hang", move || {
        thread::sleep(delay);
        HUNG.store(true, Ordering::SeqCst);
        println!("testprog: hanging as asked");
    });
}

/// Allocates `mib` MiB and writes to every page, so that it is resident, one MiB at a
/// time (an OOM kill comes part way through); then keeps it.
pub(crate) fn allocate(mib: u64) {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        kept.push(vec![u8::try_from(i % 251).unwrap_or(1) | 1; 1 << 20]);
    }
    println!("testprog: allocated {mib} MiB");
    std::mem::forget(kept);
}

/// Starts copies of this program that sleep until the kernel refuses a fork; prints how
/// many started and why the next did not.
pub(crate) fn fork_until_fail() {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => crate::fail(format_args!("--fork-until-fail: {e}")),
    };
    let mut n = 0u32;
    let error = loop {
        match std::process::Command::new(&exe)
            .arg("--sleep-forever")
            .stdin(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => {
                drop(child);
                n += 1;
                if n >= 10_000 {
                    break "stopped at 10000".to_owned();
                }
            }
            Err(e) => break e.to_string(),
        }
    };
    println!("testprog: forked {n} children, then: {error}");
}

/// Sends `WATCHDOG=1` at a quarter of `$WATCHDOG_USEC` until the program hangs; says
/// whether `$WATCHDOG_PID` is this process.
pub(crate) fn ping_watchdog() {
    let usec: u64 = match std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(u) if u > 0 => u,
        _ => crate::fail("--watchdog: WATCHDOG_USEC is not set"),
    };
    let pid_ok = std::env::var("WATCHDOG_PID").ok() == Some(std::process::id().to_string());
    println!(
        "testprog: WATCHDOG_PID {}",
        if pid_ok { "matches" } else { "does not match" }
    );
    let every = Duration::from_micros(usec / 4);
    spawn_thread("watchdog", move || {
        while !hung() {
            notify::notify("WATCHDOG=1\n");
            thread::sleep(every);
        }
    });
}

/// Answers every HTTP request on `addr` with `200 OK`, until the program hangs; then
/// accepts connections and never answers.
pub(crate) fn serve_http(addr: SocketAddr) {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => crate::fail(format_args!("--http: cannot listen on {addr}: {e}")),
    };
    spawn_thread("http", move || {
        for conn in listener.incoming().flatten() {
            spawn_thread("http-conn", move || answer(conn));
        }
    });
}

fn answer(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16_384 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    if hung() {
        // Hold the connection, answer nothing.
        loop {
            thread::park();
        }
    }
    let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
}

/// `--check-http ADDR`: exits 0 if `GET /` on `ADDR` answers 200, 1 otherwise; waits as
/// long as the server does.
pub(crate) fn check_http(addr: SocketAddr) -> ! {
    let ok = TcpStream::connect(addr).and_then(|mut s| {
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text.starts_with("HTTP/1.0 200"))
    });
    std::process::exit(i32::from(!matches!(ok, Ok(true))))
}
