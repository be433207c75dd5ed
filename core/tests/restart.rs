//! Restart test: a child process publishes with confirms and is killed with SIGKILL mid-stream,
//! twice; then every message is consumed from the same data directory. Every confirmed message
//! must come back, at the position it was confirmed at, in order within its partition, none twice.
//! The child runs the real core: fjall storage, openraft, the shard state machines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HARNESS: &str = env!("CARGO_BIN_EXE_core-harness");

/// Confirmations to read before the kill; the publisher keeps 64 more in flight.
const KILL_AFTER: [usize; 2] = [3_000, 2_000];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    partition: u32,
    offset: u64,
}

fn parse(line: &str, word: &str) -> Option<(u64, Seen)> {
    let mut parts = line.split_whitespace();
    if parts.next()? != word {
        return None;
    }
    let seq = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some((seq, Seen { partition, offset }))
}

/// Run a publisher from `first`, read `kill_after` confirmations, SIGKILL it, return them.
fn publish_then_kill(dir: &str, first: u64, kill_after: usize) -> BTreeMap<u64, Seen> {
    let mut child = Command::new(HARNESS)
        .args(["publish", dir, "10000000", &first.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the harness");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut confirmed = BTreeMap::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read a line");
        if let Some((seq, seen)) = parse(&line, "confirmed") {
            assert!(confirmed.insert(seq, seen).is_none(), "sequence {seq} confirmed twice");
        }
        if confirmed.len() >= kill_after {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "publisher too slow: {} confirmed", confirmed.len());
    }
    assert_eq!(confirmed.len(), kill_after, "the publisher stopped early");
    // std's kill is SIGKILL on Unix: no shutdown, no flush, no destructor runs.
    child.kill().expect("SIGKILL the publisher");
    let status = child.wait().expect("reap the publisher");
    assert!(!status.success(), "the publisher was killed, not finished");
    confirmed
}

#[test]
fn confirmed_messages_survive_sigkill_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    let mut confirmed = publish_then_kill(path, 0, KILL_AFTER[0]);
    // A second run on the data left by the first crash, killed again.
    confirmed.extend(publish_then_kill(path, 1_000_000, KILL_AFTER[1]));

    // The runs must cross snapshots, so that restarts load one and replay only the log after it.
    let snapshots = std::fs::read_dir(dir.path().join("snapshots")).map(|d| d.count()).unwrap_or(0);
    assert!(snapshots > 0, "no snapshot was taken: the test would not cover restoring one");

    let output = Command::new(HARNESS).args(["consume", path]).stderr(Stdio::inherit()).output().expect("consume");
    assert!(output.status.success(), "consumer failed: {:?}", output.status);
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let mut delivered: BTreeMap<u64, Seen> = BTreeMap::new();
    let mut order: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for line in text.lines() {
        let Some((seq, seen)) = parse(line, "delivered") else { continue };
        assert!(delivered.insert(seq, seen).is_none(), "sequence {seq} delivered twice");
        order.entry(seen.partition).or_default().push((seen.offset, seq));
    }
    for (seq, seen) in &confirmed {
        assert_eq!(delivered.get(seq), Some(seen), "confirmed message {seq} lost or moved");
    }
    for (partition, items) in &order {
        let offsets: Vec<u64> = items.iter().map(|(o, _)| *o).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "partition {partition}: offsets out of order");
        // Within a partition, a publisher's messages keep its order.
        for run in [0..1_000_000u64, 1_000_000..u64::MAX] {
            let seqs: Vec<u64> = items.iter().map(|(_, s)| *s).filter(|s| run.contains(s)).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "partition {partition}: sequence out of order");
        }
    }
    // Messages published after the last confirmation read may or may not be there (they may
    // have been committed before the kill); they were checked above for order and duplicates.
    let partitions: BTreeSet<u32> = delivered.values().map(|s| s.partition).collect();
    assert!(partitions.len() > 1, "the test should cover several partitions");
}
