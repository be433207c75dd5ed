//! Crash-point tests of two-phase commit: a child process runs a consume-transform-produce
//! transaction over two shards up to a point (before any prepare, after one participant prepared,
//! after the decision was recorded, during a retry of the same key while in doubt), and is killed
//! with SIGKILL there. After a restart every case must be resolved: all of the transaction or none
//! of it, the input consumed exactly when the outputs exist, the payment never twice.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const HARNESS: &str = env!("CARGO_BIN_EXE_core-harness");

/// Run the transaction to `point` in a child, SIGKILL it, then restart and return the check lines.
fn crash_at(point: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    let mut child = Command::new(HARNESS)
        .args(["txn", path, point])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the harness");
    let stdout = child.stdout.take().expect("piped stdout");
    let line = BufReader::new(stdout).lines().next().expect("a line").expect("read");
    assert_eq!(line, "stopped", "the child reached the crash point");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let output = Command::new(HARNESS).args(["check", path]).stderr(Stdio::inherit()).output().expect("check");
    assert!(output.status.success(), "check failed: {:?}", output.status);
    let mut lines: Vec<String> = String::from_utf8(output.stdout).expect("utf-8").lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn lines(expected: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    lines.sort();
    lines
}

#[test]
fn crash_before_any_prepare_aborts() {
    // The input comes back (redelivered: its consumer died holding it); no output exists.
    assert_eq!(crash_at("after-begin"), lines(&["A input true", "key false", "coordinator 0"]));
}

#[test]
fn crash_after_one_participant_prepared_aborts() {
    assert_eq!(crash_at("after-one-prepare"), lines(&["A input true", "key false", "coordinator 0"]));
}

#[test]
fn crash_after_the_decision_commits_on_every_participant() {
    // The input was acknowledged by the transaction; both outputs exist; the key is committed.
    assert_eq!(
        crash_at("after-decision"),
        lines(&["A output-a false", "B output-b false", "key true", "coordinator 0"])
    );
}

#[test]
fn a_retry_of_the_key_while_in_doubt_is_stored_once() {
    // The retry stored the payment while the transaction was prepared; the transaction, undecided
    // when its coordinator died, aborts: the payment exists once (the retry's), the input is back.
    assert_eq!(crash_at("retry-in-doubt"), lines(&["A input true", "B output-b false", "key true", "coordinator 0"]));
}
