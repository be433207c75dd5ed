//! A small replicated state for the Raft tests (counters by key) and its openraft type
//! configuration. Touches nothing.

use std::collections::BTreeMap;
use std::io::Cursor;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use wharf_core::raft::{Proposal, ReplicatedState, Replies};

/// Counters by key, and what was applied.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The counters.
    pub values: BTreeMap<String, u64>,
    /// Committed time seen by the last apply, to check it never goes backwards.
    pub last_now_ms: u64,
    /// Commands applied.
    pub applied_commands: u64,
}

/// The only command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CounterCommand {
    /// Add `delta` to `key`'s counter.
    Add { key: String, delta: u64 },
}

/// An effect: the key and its new value.
pub type CounterEffect = (String, u64);

impl ReplicatedState for Counters {
    type Command = CounterCommand;
    type Reply = u64;
    type Effect = CounterEffect;

    fn apply(&mut self, now_ms: u64, command: CounterCommand, effects: &mut Vec<CounterEffect>) -> u64 {
        assert!(now_ms >= self.last_now_ms, "committed time went backwards: {now_ms} < {}", self.last_now_ms);
        self.last_now_ms = now_ms;
        self.applied_commands += 1;
        let CounterCommand::Add { key, delta } = command;
        let value = self.values.entry(key.clone()).or_default();
        *value = value.wrapping_add(delta);
        effects.push((key, *value));
        *value
    }
}

openraft::declare_raft_types!(
    /// The counters' group types.
    pub TestConfig:
        D = Proposal<CounterCommand>,
        R = Replies<u64>,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);
