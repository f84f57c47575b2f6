//! Bad input to the `drover` CLI: each mistake is one clear line on stderr and exit
//! status 1, never a panic, and nothing is sent that the controller would refuse.

use std::process::Command;
use std::time::Duration;

use drover_tests::{CliOutput, bin, run_cli};

fn drover(args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(args)
        .env_remove("DROVER_CONTROLLER")
        .env_remove("DROVER_CLIENT_SETTINGS")
        .env_remove("DROVER_CLIENT_CONFIG")
        .env("HOME", "/nonexistent");
    run_cli(cmd, Duration::from_secs(60))
}

/// Asserts a failure whose stderr is exactly one `error: ` line containing `needle`.
fn assert_one_line_error(out: &CliOutput, needle: &str) {
    assert_eq!(
        out.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let err = out.stderr.trim_end();
    assert!(
        err.starts_with("error: ") && !err.contains('\n'),
        "not one error line: {err}"
    );
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn ca_days_out_of_range_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki = pki.to_str().unwrap();
    for days in ["0", "-1", "36501", "100000000", "9223372036854775807"] {
        let out = drover(&["ca", "init", "--dir", pki, "--days", days]);
        assert_one_line_error(&out, &format!("--days {days} is out of range"));
        assert!(out.stderr.contains("1 to 36500 days"), "{}", out.stderr);
        assert!(
            !dir.path().join("pki/ca.key").exists(),
            "a refused init writes nothing"
        );
    }
    let out = drover(&["ca", "init", "--dir", pki, "--days", "36500"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    for days in ["0", "-7", "36501", "100000000", "-9223372036854775808"] {
        let out = drover(&[
            "ca", "issue", "--dir", pki, "--role", "client", "--name", "ops", "--days", days,
        ]);
        assert_one_line_error(&out, &format!("--days {days} is out of range"));
        assert!(!dir.path().join("pki/ops.key").exists());
    }
    let out = drover(&[
        "ca", "issue", "--dir", pki, "--role", "client", "--name", "ops", "--days", "36500",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(dir.path().join("pki/ops.crt").exists());

    // Not a number at all is clap's usage error, still without a panic.
    let out = drover(&[
        "ca", "issue", "--dir", pki, "--role", "client", "--name", "x", "--days", "lots",
    ]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("invalid value 'lots'"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
