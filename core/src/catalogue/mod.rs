//! The catalogue: vhosts, exchanges, queues and bindings (the replicated state of the Raft meta group),
//! the commands that change it, and routing over it. Deterministic in-memory data; uses
//! `crate::model`, `crate::config`, `crate::error` and the `crate::raft::ReplicatedState` trait, and
//! touches nothing else (no IO, no clocks, no shard state).
//!
//! Semantics are RabbitMQ's for AMQP 0-9-1 (see each command). Where RabbitMQ leaves a choice, this
//! module says which one it makes:
//! - `connection: None` on a command means "not on behalf of a client connection" (management, the
//!   runtime's own cleanup): exclusive-queue locks do not apply to it.
//! - An alternate exchange is used, as in RabbitMQ, when an exchange's own bindings match nothing
//!   (not when everything downstream of it matched nothing).
//! - Redeclare equivalence compares the arguments that mean something (parsed queue arguments,
//!   `alternate-exchange`), as RabbitMQ does; unknown arguments may differ.
//! - A topic binding with the argument `x-exclude-dollar-topics` = `true` follows MQTT's `$` rule
//!   ([`topic::EXCLUDE_DOLLAR_TOPICS`]); the argument is part of the binding's identity like any
//!   other.
//! - Front-end state records ([`state`]) live in their vhost and go with it, and with their owner
//!   queue.
//!
//! Routing indexes (a trie per topic exchange, a key map per direct exchange) are derived from the
//! bindings and are not part of a snapshot: they are kept up to date by `apply` once built, and built
//! on the first route after a restore.

pub mod args;
pub mod headers;
pub mod state;
pub mod topic;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use self::state::{Records, StateCaps, StateWrite};
use self::topic::TopicTrie;
use crate::config::Limits;
use crate::error::{CoreError, CoreResult};
use crate::model::{ConnectionId, FieldValue, Headers, QueueArgs, QueueId, QueueName, TxnId};
use crate::raft::ReplicatedState;

/// The exchanges every vhost has from its creation, all durable. `""` is the default exchange: every
/// queue is implicitly bound to it under its own name, and it can be neither declared, deleted nor
/// bound.
pub const PREDECLARED_EXCHANGES: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// Prefix of server-generated queue names.
pub const GENERATED_QUEUE_PREFIX: &str = "amq.gen-";

const DEFAULT_EXCHANGE_REFUSED: &str = "operation not permitted on the default exchange";

/// How an exchange matches a message against its bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeKind {
    /// Routing key equals the binding key.
    Direct,
    /// Every binding.
    Fanout,
    /// Routing key matches the binding's topic pattern ([`topic`]).
    Topic,
    /// Message headers match the binding's arguments ([`headers`]).
    Headers,
    /// `x-delayed-message` with `x-delayed-type: direct` (RabbitMQ's delayed-message exchange):
    /// routes as direct, and a message passing through it is delayed by its `x-delay` header.
    DelayedDirect,
    /// `x-delayed-message` routing as fanout.
    DelayedFanout,
    /// `x-delayed-message` routing as topic.
    DelayedTopic,
    /// `x-delayed-message` routing as headers.
    DelayedHeaders,
}

/// The exchange type of RabbitMQ's delayed-message exchanges.
pub const DELAYED_MESSAGE_TYPE: &str = "x-delayed-message";
/// The argument naming how a delayed-message exchange routes.
pub const DELAYED_TYPE_ARGUMENT: &str = "x-delayed-type";
/// The header giving a message's delay in milliseconds on a delayed-message exchange.
pub const DELAY_HEADER: &str = "x-delay";

impl ExchangeKind {
    /// The kind named by an AMQP `exchange.declare` type. Unknown types are refused; so is
    /// `x-delayed-message`, which needs its arguments ([`ExchangeKind::from_declare`]).
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "direct" => Ok(Self::Direct),
            "fanout" => Ok(Self::Fanout),
            "topic" => Ok(Self::Topic),
            "headers" => Ok(Self::Headers),
            other => Err(CoreError::InvalidArgument(format!("unknown exchange type '{other}'"))),
        }
    }

    /// The kind an `exchange.declare` of type `name` with `arguments` asks for: the four AMQP
    /// kinds, and `x-delayed-message`, whose routing comes from its `x-delayed-type` argument
    /// (refused with the plugin's text when that is missing or not one of the four).
    pub fn from_declare(name: &str, arguments: &Headers) -> CoreResult<Self> {
        if name != DELAYED_MESSAGE_TYPE {
            return Self::parse(name);
        }
        let named = arguments.get(DELAYED_TYPE_ARGUMENT).and_then(FieldValue::as_str);
        if named == Some(DELAYED_MESSAGE_TYPE) {
            return Err(CoreError::PreconditionFailed(format!(
                "Invalid argument, '{DELAYED_MESSAGE_TYPE}' can't be used for '{DELAYED_TYPE_ARGUMENT}'"
            )));
        }
        match named.map(Self::parse) {
            Some(Ok(Self::Direct)) => Ok(Self::DelayedDirect),
            Some(Ok(Self::Fanout)) => Ok(Self::DelayedFanout),
            Some(Ok(Self::Topic)) => Ok(Self::DelayedTopic),
            Some(Ok(Self::Headers)) => Ok(Self::DelayedHeaders),
            _ => Err(CoreError::PreconditionFailed(format!(
                "Invalid argument, '{DELAYED_TYPE_ARGUMENT}' must be an existing exchange type"
            ))),
        }
    }

    /// How bindings are matched: a delayed-message exchange routes as its `x-delayed-type`.
    pub fn routing(self) -> Self {
        match self {
            Self::Direct | Self::DelayedDirect => Self::Direct,
            Self::Fanout | Self::DelayedFanout => Self::Fanout,
            Self::Topic | Self::DelayedTopic => Self::Topic,
            Self::Headers | Self::DelayedHeaders => Self::Headers,
        }
    }

    /// Whether messages passing through are delayed by their `x-delay` header.
    pub fn is_delayed(self) -> bool {
        self != self.routing()
    }

    /// The AMQP type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::DelayedDirect | Self::DelayedFanout | Self::DelayedTopic | Self::DelayedHeaders => {
                DELAYED_MESSAGE_TYPE
            }
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a binding leads, within the source exchange's vhost.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// A queue, by name.
    Queue(String),
    /// An exchange, by name (exchange-to-exchange binding).
    Exchange(String),
}

impl Destination {
    /// The destination's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Queue(name) | Self::Exchange(name) => name,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Queue(name) => write!(f, "queue '{name}'"),
            Self::Exchange(name) => write!(f, "exchange '{name}'"),
        }
    }
}

/// A binding: what `queue.bind` / `exchange.bind` and their unbinds name, and what
/// [`Catalogue::bindings_to`] lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingSpec {
    /// Virtual host of both ends.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub destination: Destination,
    /// Binding key (a pattern for topic exchanges).
    pub routing_key: String,
    /// Binding arguments (the conditions of a headers binding).
    pub arguments: Headers,
}

/// Arguments of `exchange.declare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDeclare {
    /// Virtual host.
    pub vhost: String,
    /// Exchange name.
    pub name: String,
    /// Kind.
    pub kind: ExchangeKind,
    /// Survives a broker restart (Wharf keeps everything; recorded for equivalence and listing).
    pub durable: bool,
    /// Deleted when its last binding (as source) is removed.
    pub auto_delete: bool,
    /// Cannot be published to directly, only reached through bindings or as an alternate exchange.
    pub internal: bool,
    /// Only check that the exchange exists.
    pub passive: bool,
    /// Arguments (`alternate-exchange`).
    pub arguments: Headers,
}

/// Arguments of `queue.declare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDeclare {
    /// Virtual host.
    pub vhost: String,
    /// Queue name; empty asks for a server-generated name.
    pub name: String,
    /// Survives a broker restart (recorded; the runtime drops non-durable queues at restart).
    pub durable: bool,
    /// Deleted by the runtime when its last consumer goes.
    pub auto_delete: bool,
    /// Owned by `connection` and deleted when it closes.
    pub exclusive: bool,
    /// Only check that the queue exists (and that `connection` may use it).
    pub passive: bool,
    /// The declaring connection; required for an exclusive queue.
    pub connection: Option<ConnectionId>,
    /// `x-` arguments.
    pub arguments: Headers,
}

/// A command of the meta group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Adopt the configured limits (proposed at start when they differ from the replicated ones, so
    /// every replica enforces the same limits from the same log position on). Objects that
    /// already exceed a lowered limit stay; only new ones are refused.
    SetLimits(Limits),
    /// Create a vhost with the predeclared exchanges. Creating an existing vhost succeeds.
    CreateVhost {
        /// Vhost name.
        name: String,
    },
    /// Delete a vhost and everything in it; replies [`MetaReply::QueuesDeleted`].
    DeleteVhost {
        /// Vhost name.
        name: String,
    },
    /// Declare (or check) an exchange (`exchange.declare`); replies [`MetaReply::Ok`].
    DeclareExchange(ExchangeDeclare),
    /// Delete an exchange and every binding to or from it; replies [`MetaReply::Ok`].
    DeleteExchange {
        /// Virtual host.
        vhost: String,
        /// Exchange name.
        name: String,
        /// Refuse if the exchange is the source of a binding.
        if_unused: bool,
    },
    /// Declare (or check) a queue (`queue.declare`); replies [`MetaReply::QueueDeclared`].
    DeclareQueue(QueueDeclare),
    /// Delete a queue and its bindings; replies [`MetaReply::QueueDeleted`]. `if-unused` and
    /// `if-empty` depend on shard state, so the caller checks them first and names the queue it
    /// checked in `expected_id`: a queue redeclared in between has another id and is not deleted.
    DeleteQueue {
        /// Virtual host.
        vhost: String,
        /// Queue name.
        name: String,
        /// Delete only the queue with this id.
        expected_id: Option<QueueId>,
        /// The requesting connection (exclusive queues of others are locked).
        connection: Option<ConnectionId>,
    },
    /// Add a binding (`queue.bind`, `exchange.bind`; a duplicate is a no-op); replies
    /// [`MetaReply::Ok`].
    Bind {
        /// The binding.
        binding: BindingSpec,
        /// The requesting connection (exclusive queues of others are locked).
        connection: Option<ConnectionId>,
    },
    /// Remove a binding (a missing binding is a no-op, as in RabbitMQ; missing ends are not);
    /// replies [`MetaReply::Ok`].
    Unbind {
        /// The binding.
        binding: BindingSpec,
        /// The requesting connection (exclusive queues of others are locked).
        connection: Option<ConnectionId>,
    },
    /// Delete every exclusive queue owned by a connection of `node` from an incarnation before
    /// `incarnation_below`: cleanup after the node restarted. Replies [`MetaReply::QueuesDeleted`].
    DeleteOwnedBy {
        /// Node.
        node: u64,
        /// Owners with a smaller incarnation are gone.
        incarnation_below: u64,
    },
    /// Delete the exclusive queues of a closed connection; replies [`MetaReply::QueuesDeleted`].
    DeleteConnectionQueues {
        /// The closed connection.
        owner: ConnectionId,
    },
    /// Coordinator: a multi-shard transaction starts; its participants will prepare. It must be
    /// decided before `now + timeout_ms` or it can only abort.
    TxnBegin {
        /// Transaction.
        txn: TxnId,
        /// Shards taking part.
        participants: Vec<u32>,
        /// Time allowed until the decision.
        timeout_ms: u64,
        /// A half message: the producer group that decides it (and is asked, at this interval,
        /// when it stays silent).
        half: Option<HalfSpec>,
    },
    /// Coordinator: the producer of a half message was asked (check-back) and gave no decision.
    TxnChecked {
        /// Transaction.
        txn: TxnId,
    },
    /// Coordinator: record the decision (the first one recorded wins; commit after the deadline
    /// or for an unknown transaction becomes abort). Replies the decision in force.
    TxnDecide {
        /// Transaction.
        txn: TxnId,
        /// The proposer's wish.
        commit: bool,
    },
    /// Coordinator: every participant applied the decision; forget the transaction.
    TxnForget {
        /// Transaction.
        txn: TxnId,
    },
    /// Write front-end state records, in order, all or none ([`state`]); replies [`MetaReply::Ok`].
    WriteState {
        /// Virtual host.
        vhost: String,
        /// The writes.
        writes: Vec<StateWrite>,
        /// The bounds to enforce.
        caps: StateCaps,
    },
    /// Delete the front-end state records whose key starts with `prefix`; replies
    /// [`MetaReply::StateDeleted`].
    DeleteStatePrefix {
        /// Virtual host.
        vhost: String,
        /// Key prefix (empty: every record of the vhost).
        prefix: String,
    },
}

/// The coordinator's record of a multi-shard transaction or half message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// Shards taking part.
    pub participants: Vec<u32>,
    /// Committed time after which only abort can be decided.
    pub deadline_ms: u64,
    /// The decision: commit (`true`) or abort; none yet.
    pub decision: Option<bool>,
    /// For a half message: who decides it, and the check-backs so far.
    pub half: Option<HalfState>,
}

/// How a half message is checked back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfSpec {
    /// The producer group asked when the producer stays silent.
    pub group: String,
    /// Time between check-backs.
    pub check_interval_ms: u64,
}

/// A half message's check-back record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfState {
    /// The producer group.
    pub group: String,
    /// Time between check-backs.
    pub check_interval_ms: u64,
    /// Check-backs that got no decision.
    pub checks: u32,
    /// Committed time of the next check-back.
    pub next_check_ms: u64,
}

/// A queue that a command deleted: what the runtime needs to drop it from its shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedQueue {
    /// Its id.
    pub id: QueueId,
    /// Its name.
    pub name: QueueName,
    /// Its number of partitions.
    pub partitions: u32,
}

/// The reply to a [`MetaCommand`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaReply {
    /// Done, nothing to report.
    Ok,
    /// A queue exists (now).
    QueueDeclared {
        /// Its id.
        id: QueueId,
        /// Its name (the generated one, if the declare named none).
        name: String,
        /// Its parsed arguments.
        args: QueueArgs,
        /// Whether this declare created it.
        created: bool,
        /// Its number of partitions.
        partitions: u32,
    },
    /// The queue a [`MetaCommand::DeleteQueue`] deleted.
    QueueDeleted(DeletedQueue),
    /// The queues a vhost deletion or an owner cleanup deleted, in id order.
    QueuesDeleted(Vec<DeletedQueue>),
    /// The decision in force for a transaction: commit (`true`) or abort.
    TxnDecision(bool),
    /// The command was refused; the state is unchanged.
    Error(CoreError),
    /// How many state records a [`MetaCommand::DeleteStatePrefix`] deleted.
    StateDeleted(u64),
}

impl MetaReply {
    /// The queues this reply says were deleted, as (id, partitions): what the runtime drops from its
    /// shards. Empty for replies that delete nothing.
    pub fn deleted_queues(&self) -> impl Iterator<Item = (QueueId, u32)> + '_ {
        let deleted: &[DeletedQueue] = match self {
            Self::QueueDeleted(queue) => std::slice::from_ref(queue),
            Self::QueuesDeleted(queues) => queues,
            _ => &[],
        };
        deleted.iter().map(|queue| (queue.id, queue.partitions))
    }
}

/// What the local runtime must act on after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEffect {
    /// A queue was created: its partitions must be created on their shards.
    QueueCreated {
        /// Its id.
        id: QueueId,
        /// Its name.
        name: QueueName,
        /// Its number of partitions.
        partitions: u32,
    },
    /// A queue was deleted (by any command): its partitions and consumers must go.
    QueueDeleted(DeletedQueue),
}

/// A queue as the catalogue knows it. Its messages live in shard state, not here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    /// Id, never reused.
    pub id: QueueId,
    /// Vhost and name.
    pub name: QueueName,
    /// Declared durable.
    pub durable: bool,
    /// Declared auto-delete (the runtime deletes it when its last consumer goes).
    pub auto_delete: bool,
    /// The owning connection of an exclusive queue.
    pub exclusive_owner: Option<ConnectionId>,
    /// The arguments as declared, unknown ones included.
    pub arguments: Headers,
    /// The parsed arguments.
    pub args: QueueArgs,
}

impl QueueDef {
    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.args.partitions
    }

    fn deleted(&self) -> DeletedQueue {
        DeletedQueue { id: self.id, name: self.name.clone(), partitions: self.args.partitions }
    }

    fn declared(&self, created: bool) -> MetaReply {
        MetaReply::QueueDeclared {
            id: self.id,
            name: self.name.name.clone(),
            args: self.args.clone(),
            created,
            partitions: self.args.partitions,
        }
    }

    /// Refuse a connection other than the owner of an exclusive queue.
    fn check_access(&self, connection: Option<ConnectionId>) -> CoreResult<()> {
        match (self.exclusive_owner, connection) {
            (Some(owner), Some(connection)) if owner != connection => Err(CoreError::ResourceLocked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally \
                 declared on another connection or the exclusive property value does not match that of the \
                 original declaration.",
                self.name.name, self.name.vhost
            ))),
            _ => Ok(()),
        }
    }
}

/// Identity of a binding within its source exchange. Ordered by destination first, so that the
/// bindings to one destination are a contiguous range (deleting a destination is a range removal).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct BindingKey {
    destination: Destination,
    routing_key: String,
    /// The arguments in a canonical byte form: sorted by name (stably), then postcard-encoded.
    /// RabbitMQ tells bindings apart by their sorted argument tables; encoding gives an order that
    /// `FieldValue` (with its floats) lacks.
    arguments: Vec<u8>,
}

impl BindingKey {
    fn new(destination: Destination, routing_key: String, arguments: &Headers) -> CoreResult<Self> {
        let mut sorted = arguments.0.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let arguments = postcard::to_allocvec(&sorted)
            .map_err(|e| CoreError::Internal(format!("cannot encode binding arguments: {e}")))?;
        Ok(Self { destination, routing_key, arguments })
    }

    /// The smallest key with this destination.
    fn first_for(destination: &Destination) -> Self {
        Self { destination: destination.clone(), routing_key: String::new(), arguments: Vec::new() }
    }
}

/// A binding as seen from its source exchange.
#[derive(Debug, Clone, Copy)]
pub struct BindingRef<'a> {
    /// Destination.
    pub destination: &'a Destination,
    /// Binding key.
    pub routing_key: &'a str,
    /// Binding arguments.
    pub arguments: &'a Headers,
}

/// An exchange and the bindings of which it is the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ExchangeKind,
    /// Declared durable.
    pub durable: bool,
    /// Deleted when its last binding (as source) is removed.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    pub internal: bool,
    /// Arguments as declared.
    pub arguments: Headers,
    /// Parsed `alternate-exchange`.
    pub alternate_exchange: Option<String>,
    /// Bindings from this exchange, with their arguments as given.
    bindings: BTreeMap<BindingKey, Headers>,
    /// Routing index derived from `bindings`; see the module comment.
    #[serde(skip)]
    index: OnceLock<RoutingIndex>,
}

impl ExchangeDef {
    fn new(name: String, kind: ExchangeKind, durable: bool) -> Self {
        Self {
            name,
            kind,
            durable,
            auto_delete: false,
            internal: false,
            arguments: Headers::new(),
            alternate_exchange: None,
            bindings: BTreeMap::new(),
            index: OnceLock::new(),
        }
    }

    /// The bindings from this exchange, by destination.
    pub fn bindings(&self) -> impl Iterator<Item = BindingRef<'_>> {
        self.bindings.iter().map(|(key, arguments)| BindingRef {
            destination: &key.destination,
            routing_key: &key.routing_key,
            arguments,
        })
    }

    /// Number of bindings from this exchange.
    pub fn binding_count(&self) -> usize {
        self.bindings.len()
    }

    fn index(&self) -> &RoutingIndex {
        self.index.get_or_init(|| RoutingIndex::build(self.kind.routing(), &self.bindings))
    }

    /// Add a binding; false if it was there.
    fn insert_binding(&mut self, key: BindingKey, arguments: Headers) -> bool {
        if self.bindings.contains_key(&key) {
            return false;
        }
        // An index not built yet will be built from `bindings` when first needed.
        if let Some(index) = self.index.get_mut() {
            index.insert(&key, &arguments);
        }
        self.bindings.insert(key, arguments);
        true
    }

    /// Remove a binding; false if it was not there.
    fn remove_binding(&mut self, key: &BindingKey) -> bool {
        let Some(arguments) = self.bindings.remove(key) else { return false };
        if let Some(index) = self.index.get_mut() {
            index.remove(key, &arguments);
        }
        true
    }

    fn has_bindings_to(&self, destination: &Destination) -> bool {
        self.bindings
            .range(BindingKey::first_for(destination)..)
            .next()
            .is_some_and(|(key, _)| key.destination == *destination)
    }

    /// Remove every binding to `destination`; returns how many there were.
    fn remove_bindings_to(&mut self, destination: &Destination) -> u64 {
        let keys: Vec<BindingKey> = self
            .bindings
            .range(BindingKey::first_for(destination)..)
            .take_while(|(key, _)| key.destination == *destination)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.remove_binding(key);
        }
        keys.len() as u64
    }

    /// Call `found` for the destination of every binding the message matches (a destination may be
    /// reported more than once).
    fn for_each_destination<'a>(
        &'a self,
        routing_key: &str,
        headers: &Headers,
        found: &mut impl FnMut(&'a Destination),
    ) {
        match self.kind.routing() {
            ExchangeKind::Fanout => {
                // Bindings are ordered by destination: report each destination once.
                let mut last = None;
                for key in self.bindings.keys() {
                    if last != Some(&key.destination) {
                        found(&key.destination);
                        last = Some(&key.destination);
                    }
                }
            }
            ExchangeKind::Headers => {
                for (key, arguments) in &self.bindings {
                    if headers::matches(arguments, headers) {
                        found(&key.destination);
                    }
                }
            }
            ExchangeKind::Direct | ExchangeKind::Topic => match self.index() {
                RoutingIndex::Direct(by_key) => {
                    if let Some(destinations) = by_key.get(routing_key) {
                        destinations.keys().for_each(found);
                    }
                }
                RoutingIndex::Topic(trie) => {
                    let words: Vec<&str> = routing_key.split('.').collect();
                    trie.for_each_match(&words, found);
                }
                RoutingIndex::Scan => {
                    // Not built for these kinds; kept correct rather than unreachable.
                    for (key, arguments) in &self.bindings {
                        let hit = match self.kind.routing() {
                            ExchangeKind::Topic if excludes_dollar_topics(arguments) => {
                                topic::matches_excluding_dollar(&key.routing_key, routing_key)
                            }
                            ExchangeKind::Topic => topic::matches(&key.routing_key, routing_key),
                            _ => key.routing_key == routing_key,
                        };
                        if hit {
                            found(&key.destination);
                        }
                    }
                }
            },
            ExchangeKind::DelayedDirect
            | ExchangeKind::DelayedFanout
            | ExchangeKind::DelayedTopic
            | ExchangeKind::DelayedHeaders => unreachable!("routing() is one of the four AMQP kinds"),
        }
    }
}

/// An exchange's bindings arranged for routing. Destinations are counted because two bindings may
/// share key and destination and differ only in arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoutingIndex {
    /// Direct: destinations by exact key.
    Direct(BTreeMap<String, BTreeMap<Destination, u32>>),
    /// Topic: a trie of patterns.
    Topic(TopicTrie<Destination>),
    /// Fanout and headers route by scanning the bindings.
    Scan,
}

impl RoutingIndex {
    fn build(kind: ExchangeKind, bindings: &BTreeMap<BindingKey, Headers>) -> Self {
        let mut index = match kind {
            ExchangeKind::Direct => Self::Direct(BTreeMap::new()),
            ExchangeKind::Topic => Self::Topic(TopicTrie::new()),
            ExchangeKind::Fanout | ExchangeKind::Headers => return Self::Scan,
            delayed => unreachable!("routing index built for the routing kind, not {delayed:?}"),
        };
        for (key, arguments) in bindings {
            index.insert(key, arguments);
        }
        index
    }

    fn insert(&mut self, key: &BindingKey, arguments: &Headers) {
        match self {
            Self::Direct(by_key) => {
                let destinations = by_key.entry(key.routing_key.clone()).or_default();
                *destinations.entry(key.destination.clone()).or_insert(0) += 1;
            }
            Self::Topic(trie) if excludes_dollar_topics(arguments) => {
                trie.insert_excluding_dollar(&key.routing_key, key.destination.clone())
            }
            Self::Topic(trie) => trie.insert(&key.routing_key, key.destination.clone()),
            Self::Scan => {}
        }
    }

    /// Undo [`RoutingIndex::insert`] of the same binding (same key, same arguments).
    fn remove(&mut self, key: &BindingKey, arguments: &Headers) {
        match self {
            Self::Direct(by_key) => {
                let Some(destinations) = by_key.get_mut(&key.routing_key) else { return };
                if let Some(count) = destinations.get_mut(&key.destination) {
                    *count -= 1;
                    if *count == 0 {
                        destinations.remove(&key.destination);
                    }
                }
                if destinations.is_empty() {
                    by_key.remove(&key.routing_key);
                }
            }
            Self::Topic(trie) if excludes_dollar_topics(arguments) => {
                trie.remove_excluding_dollar(&key.routing_key, &key.destination);
            }
            Self::Topic(trie) => {
                trie.remove(&key.routing_key, &key.destination);
            }
            Self::Scan => {}
        }
    }
}

/// Whether a topic binding's arguments turn the `$` rule on ([`topic::EXCLUDE_DOLLAR_TOPICS`]).
fn excludes_dollar_topics(arguments: &Headers) -> bool {
    matches!(arguments.get(topic::EXCLUDE_DOLLAR_TOPICS), Some(FieldValue::Bool(true)))
}

/// Counts kept so that limits are checked without walking the catalogue.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tally {
    exchanges: u64,
    bindings: u64,
    state_records: u64,
}

/// One vhost's objects.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Vhost {
    exchanges: BTreeMap<String, ExchangeDef>,
    queues: BTreeMap<String, QueueDef>,
    /// Every (destination, source exchange) pair with at least one binding: finds the bindings to a
    /// destination without scanning every exchange when the destination is deleted.
    sources: BTreeSet<(Destination, String)>,
    /// Front-end state records.
    state: Records,
}

impl Vhost {
    fn with_predeclared() -> Self {
        let exchanges = PREDECLARED_EXCHANGES
            .iter()
            .map(|&(name, kind)| (name.to_owned(), ExchangeDef::new(name.to_owned(), kind, true)))
            .collect();
        Self { exchanges, queues: BTreeMap::new(), sources: BTreeSet::new(), state: Records::default() }
    }

    fn binding_count(&self) -> u64 {
        self.exchanges.values().map(|exchange| exchange.bindings.len() as u64).sum()
    }

    fn insert_binding(&mut self, source: &str, key: BindingKey, arguments: Headers, tally: &mut Tally) {
        let Some(exchange) = self.exchanges.get_mut(source) else { return };
        let destination = key.destination.clone();
        if exchange.insert_binding(key, arguments) {
            tally.bindings += 1;
            self.sources.insert((destination, source.to_owned()));
        }
    }

    fn remove_binding(&mut self, source: &str, key: &BindingKey, tally: &mut Tally) -> bool {
        let Some(exchange) = self.exchanges.get_mut(source) else { return false };
        if !exchange.remove_binding(key) {
            return false;
        }
        tally.bindings = tally.bindings.saturating_sub(1);
        if !exchange.has_bindings_to(&key.destination) {
            self.sources.remove(&(key.destination.clone(), source.to_owned()));
        }
        true
    }

    /// Remove every binding to `destination` (which is being deleted), then auto-delete the source
    /// exchanges this left without bindings, and so on down the chain.
    fn drop_destination(&mut self, destination: Destination, tally: &mut Tally) {
        let mut pending = vec![destination];
        while let Some(destination) = pending.pop() {
            let sources: Vec<String> = self
                .sources
                .range((destination.clone(), String::new())..)
                .take_while(|(bound, _)| *bound == destination)
                .map(|(_, source)| source.clone())
                .collect();
            for source in sources {
                self.sources.remove(&(destination.clone(), source.clone()));
                let Some(exchange) = self.exchanges.get_mut(&source) else { continue };
                let removed = exchange.remove_bindings_to(&destination);
                tally.bindings = tally.bindings.saturating_sub(removed);
                if exchange.auto_delete && removed > 0 && exchange.bindings.is_empty() {
                    self.remove_exchange_record(&source, tally);
                    pending.push(Destination::Exchange(source));
                }
            }
        }
    }

    /// Delete an exchange: its bindings as source, then as destination (cascading).
    fn delete_exchange(&mut self, name: &str, tally: &mut Tally) {
        self.remove_exchange_record(name, tally);
        self.drop_destination(Destination::Exchange(name.to_owned()), tally);
    }

    /// Remove an exchange and the bindings of which it is the source.
    fn remove_exchange_record(&mut self, name: &str, tally: &mut Tally) {
        let Some(exchange) = self.exchanges.remove(name) else { return };
        tally.exchanges = tally.exchanges.saturating_sub(1);
        tally.bindings = tally.bindings.saturating_sub(exchange.bindings.len() as u64);
        let mut last = None;
        for key in exchange.bindings.keys() {
            if last != Some(&key.destination) {
                self.sources.remove(&(key.destination.clone(), name.to_owned()));
                last = Some(&key.destination);
            }
        }
    }
}

/// The queues a publish reaches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Each queue once, ordered by name.
    pub queues: Vec<RoutedQueue>,
    /// The message passed through a delayed-message exchange: its `x-delay` header applies.
    pub delayed: bool,
}

/// One queue a publish reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedQueue {
    /// Its id.
    pub id: QueueId,
    /// Its name.
    pub name: QueueName,
    /// Its number of partitions.
    pub partitions: u32,
}

/// The catalogue: the state of the meta group. See the module comment.
///
/// Invariants (checked by the tests after random command sequences):
/// - every binding's source and destination exist in its vhost;
/// - `queue_ids`, `exclusive`, each vhost's `sources` and `tally` agree with the objects;
/// - queue ids are below `next_queue_id` and never reused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalogue {
    /// Part of the replicated state so that every replica enforces the same limits.
    limits: Limits,
    next_queue_id: u64,
    vhosts: BTreeMap<String, Vhost>,
    /// Every queue by id.
    queue_ids: BTreeMap<QueueId, QueueName>,
    /// Exclusive queues by owner, for closing connections and crash cleanup.
    exclusive: BTreeSet<(ConnectionId, QueueId)>,
    tally: Tally,
    /// Coordinator records of multi-shard transactions not yet forgotten.
    #[serde(default)]
    txns: BTreeMap<TxnId, TxnRecord>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Catalogue {
    /// An empty catalogue (no vhost: the runtime creates them, `/` at cluster bootstrap).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            next_queue_id: 1,
            vhosts: BTreeMap::new(),
            queue_ids: BTreeMap::new(),
            exclusive: BTreeSet::new(),
            tally: Tally::default(),
            txns: BTreeMap::new(),
        }
    }

    /// The coordinator's record of a transaction.
    pub fn txn(&self, txn: TxnId) -> Option<&TxnRecord> {
        self.txns.get(&txn)
    }

    /// Every transaction the coordinator remembers.
    pub fn txns(&self) -> impl Iterator<Item = (&TxnId, &TxnRecord)> {
        self.txns.iter()
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether a vhost exists.
    pub fn has_vhost(&self, name: &str) -> bool {
        self.vhosts.contains_key(name)
    }

    /// Vhost names, in order.
    pub fn vhosts(&self) -> impl Iterator<Item = &str> {
        self.vhosts.keys().map(String::as_str)
    }

    /// A queue by name.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDef> {
        self.vhosts.get(vhost)?.queues.get(name)
    }

    /// A queue by id.
    pub fn queue_by_id(&self, id: QueueId) -> Option<&QueueDef> {
        let name = self.queue_ids.get(&id)?;
        self.queue(&name.vhost, &name.name)
    }

    /// An exchange by name (`""` is the default exchange).
    pub fn exchange(&self, vhost: &str, name: &str) -> Option<&ExchangeDef> {
        self.vhosts.get(vhost)?.exchanges.get(name)
    }

    /// Every queue, by vhost then name (for reconciliation with shard state).
    pub fn queues(&self) -> impl Iterator<Item = &QueueDef> {
        self.vhosts.values().flat_map(|vhost| vhost.queues.values())
    }

    /// The queues of one vhost, by name.
    pub fn queues_in(&self, vhost: &str) -> impl Iterator<Item = &QueueDef> {
        self.vhosts.get(vhost).into_iter().flat_map(|vhost| vhost.queues.values())
    }

    /// The exchanges of one vhost, by name.
    pub fn exchanges_in(&self, vhost: &str) -> impl Iterator<Item = &ExchangeDef> {
        self.vhosts.get(vhost).into_iter().flat_map(|vhost| vhost.exchanges.values())
    }

    /// Every queue with an `x-expires`, with it in milliseconds (the runtime expires unused ones).
    pub fn queues_with_expiry(&self) -> impl Iterator<Item = (&QueueDef, u64)> {
        self.queues().filter_map(|queue| queue.args.expires_ms.map(|expires_ms| (queue, expires_ms)))
    }

    /// The bindings to a destination, by source exchange (e.g. an MQTT session's subscriptions).
    pub fn bindings_to(&self, vhost: &str, destination: &Destination) -> Vec<BindingSpec> {
        let Some(host) = self.vhosts.get(vhost) else { return Vec::new() };
        let mut out = Vec::new();
        for (_, source) in
            host.sources.range((destination.clone(), String::new())..).take_while(|(bound, _)| bound == destination)
        {
            let Some(exchange) = host.exchanges.get(source) else { continue };
            for (key, arguments) in exchange
                .bindings
                .range(BindingKey::first_for(destination)..)
                .take_while(|(key, _)| key.destination == *destination)
            {
                out.push(BindingSpec {
                    vhost: vhost.to_owned(),
                    source: source.clone(),
                    destination: destination.clone(),
                    routing_key: key.routing_key.clone(),
                    arguments: arguments.clone(),
                });
            }
        }
        out
    }

    /// Number of queues.
    pub fn queue_count(&self) -> u64 {
        self.queue_ids.len() as u64
    }

    /// Number of exchanges, the predeclared ones included.
    pub fn exchange_count(&self) -> u64 {
        self.tally.exchanges
    }

    /// Number of bindings (the implicit default-exchange ones excluded).
    pub fn binding_count(&self) -> u64 {
        self.tally.bindings
    }

    /// The queues a message published to `exchange` in `vhost` with `routing_key` and `headers`
    /// reaches, each once, ordered by name.
    ///
    /// Exchange-to-exchange bindings are followed transitively, and an exchange whose bindings match
    /// nothing passes the message to its alternate exchange, if any; each exchange is visited at most
    /// once, so cycles of bindings or alternates end. Errors: missing vhost or exchange (`NotFound`),
    /// internal exchange (`AccessRefused`).
    pub fn route(&self, vhost: &str, exchange: &str, routing_key: &str, headers: &Headers) -> CoreResult<Route> {
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        let start = host.exchanges.get(exchange).ok_or_else(|| no_exchange(vhost, exchange))?;
        if start.internal {
            return Err(CoreError::AccessRefused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
            )));
        }
        let mut queues: BTreeSet<&str> = BTreeSet::new();
        let mut seen: BTreeSet<&str> = BTreeSet::from([start.name.as_str()]);
        let mut pending = vec![start];
        let mut delayed = false;
        while let Some(current) = pending.pop() {
            delayed |= current.kind.is_delayed();
            let mut matched = false;
            if current.name.is_empty() {
                // The default exchange: every queue is bound under its own name.
                if let Some((name, _)) = host.queues.get_key_value(routing_key) {
                    matched = true;
                    queues.insert(name);
                }
            } else {
                current.for_each_destination(routing_key, headers, &mut |destination| {
                    matched = true;
                    match destination {
                        Destination::Queue(name) => {
                            queues.insert(name);
                        }
                        Destination::Exchange(name) => {
                            if seen.insert(name)
                                && let Some(next) = host.exchanges.get(name)
                            {
                                pending.push(next);
                            }
                        }
                    }
                });
            }
            if !matched
                && let Some(alternate) = &current.alternate_exchange
                && seen.insert(alternate)
                && let Some(next) = host.exchanges.get(alternate)
            {
                pending.push(next);
            }
        }
        let queues = queues
            .into_iter()
            .filter_map(|name| host.queues.get(name))
            .map(|queue| RoutedQueue { id: queue.id, name: queue.name.clone(), partitions: queue.args.partitions })
            .collect();
        Ok(Route { queues, delayed })
    }

    fn check_name_len(&self, what: &str, name: &str) -> CoreResult<()> {
        let max = self.limits.name_len_max_bytes;
        if name.len() > max as usize {
            return Err(CoreError::InvalidArgument(format!(
                "{what} is {} bytes, longer than limits.name_len_max_bytes ({max})",
                name.len()
            )));
        }
        Ok(())
    }

    fn create_vhost(&mut self, name: String) -> CoreResult<MetaReply> {
        if name.is_empty() {
            return Err(CoreError::InvalidArgument("vhost name must not be empty".into()));
        }
        self.check_name_len("vhost name", &name)?;
        if self.vhosts.contains_key(&name) {
            return Ok(MetaReply::Ok);
        }
        let needed = self.tally.exchanges + PREDECLARED_EXCHANGES.len() as u64;
        if needed > u64::from(self.limits.exchanges_max) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.exchanges_max",
                value: needed,
                max: self.limits.exchanges_max.into(),
            });
        }
        self.tally.exchanges = needed;
        self.vhosts.insert(name, Vhost::with_predeclared());
        Ok(MetaReply::Ok)
    }

    fn delete_vhost(&mut self, name: &str, effects: &mut Vec<MetaEffect>) -> CoreResult<MetaReply> {
        let host = self.vhosts.remove(name).ok_or_else(|| no_vhost(name))?;
        self.tally.exchanges = self.tally.exchanges.saturating_sub(host.exchanges.len() as u64);
        self.tally.bindings = self.tally.bindings.saturating_sub(host.binding_count());
        self.tally.state_records = self.tally.state_records.saturating_sub(host.state.len());
        let mut deleted: Vec<DeletedQueue> = host.queues.values().map(QueueDef::deleted).collect();
        deleted.sort_by_key(|queue| queue.id);
        for queue in host.queues.values() {
            self.forget_queue(queue);
        }
        effects.extend(deleted.iter().cloned().map(MetaEffect::QueueDeleted));
        Ok(MetaReply::QueuesDeleted(deleted))
    }

    fn declare_exchange(&mut self, declare: ExchangeDeclare) -> CoreResult<MetaReply> {
        let ExchangeDeclare { vhost, name, kind, durable, auto_delete, internal, passive, arguments } = declare;
        let vhost = vhost.as_str();
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        if name.is_empty() {
            // RabbitMQ lets a client check for the default exchange, never change it.
            return if passive {
                Ok(MetaReply::Ok)
            } else {
                Err(CoreError::AccessRefused(DEFAULT_EXCHANGE_REFUSED.into()))
            };
        }
        if passive {
            return match host.exchanges.get(&name) {
                Some(_) => Ok(MetaReply::Ok),
                None => Err(no_exchange(vhost, &name)),
            };
        }
        self.check_name_len("exchange name", &name)?;
        let parsed = args::parse_exchange_args(vhost, &name, &arguments)?;
        if let Some(existing) = host.exchanges.get(&name) {
            let inequivalent = |arg: &str, received: String, current: String| {
                Err(CoreError::PreconditionFailed(format!(
                    "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vhost}': received {received} but current is {current}"
                )))
            };
            if existing.kind.routing() != kind.routing() && existing.kind.is_delayed() && kind.is_delayed() {
                return inequivalent(DELAYED_TYPE_ARGUMENT, quoted(kind.routing()), quoted(existing.kind.routing()));
            }
            if existing.kind != kind {
                return inequivalent("type", quoted(kind), quoted(existing.kind));
            }
            if existing.durable != durable {
                return inequivalent("durable", quoted(durable), quoted(existing.durable));
            }
            if existing.auto_delete != auto_delete {
                return inequivalent("auto_delete", quoted(auto_delete), quoted(existing.auto_delete));
            }
            if existing.internal != internal {
                return inequivalent("internal", quoted(internal), quoted(existing.internal));
            }
            if existing.alternate_exchange != parsed.alternate_exchange {
                let arg = "alternate-exchange";
                return inequivalent(arg, args::described(&arguments, arg), args::described(&existing.arguments, arg));
            }
            return Ok(MetaReply::Ok);
        }
        // Checked only for a new exchange: redeclaring `amq.direct` equivalently is allowed.
        if name.starts_with("amq.") {
            return Err(CoreError::AccessRefused(format!("exchange name '{name}' contains reserved prefix 'amq.*'")));
        }
        let needed = self.tally.exchanges + 1;
        if needed > u64::from(self.limits.exchanges_max) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.exchanges_max",
                value: needed,
                max: self.limits.exchanges_max.into(),
            });
        }
        let mut exchange = ExchangeDef::new(name.clone(), kind, durable);
        exchange.auto_delete = auto_delete;
        exchange.internal = internal;
        exchange.arguments = arguments;
        exchange.alternate_exchange = parsed.alternate_exchange;
        let Some(host) = self.vhosts.get_mut(vhost) else { return Err(no_vhost(vhost)) };
        host.exchanges.insert(name, exchange);
        self.tally.exchanges = needed;
        Ok(MetaReply::Ok)
    }

    fn delete_exchange(&mut self, vhost: &str, name: &str, if_unused: bool) -> CoreResult<MetaReply> {
        let host = self.vhosts.get_mut(vhost).ok_or_else(|| no_vhost(vhost))?;
        if name.is_empty() {
            return Err(CoreError::AccessRefused(DEFAULT_EXCHANGE_REFUSED.into()));
        }
        if name.starts_with("amq.") {
            return Err(CoreError::AccessRefused(format!(
                "deletion of system exchange '{name}' in vhost '{vhost}' not allowed"
            )));
        }
        let exchange = host.exchanges.get(name).ok_or_else(|| no_exchange(vhost, name))?;
        if if_unused && !exchange.bindings.is_empty() {
            return Err(CoreError::PreconditionFailed(format!("exchange '{name}' in vhost '{vhost}' in use")));
        }
        host.delete_exchange(name, &mut self.tally);
        Ok(MetaReply::Ok)
    }

    fn declare_queue(&mut self, declare: QueueDeclare, effects: &mut Vec<MetaEffect>) -> CoreResult<MetaReply> {
        let QueueDeclare { vhost, name, durable, auto_delete, exclusive, passive, connection, arguments } = declare;
        let vhost = vhost.as_str();
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        if passive {
            let queue = host.queues.get(&name).ok_or_else(|| no_queue(vhost, &name))?;
            queue.check_access(connection)?;
            return Ok(queue.declared(false));
        }
        self.check_name_len("queue name", &name)?;
        if name.starts_with("amq.") {
            return Err(CoreError::AccessRefused(format!("queue name '{name}' contains reserved prefix 'amq.*'")));
        }
        if exclusive && connection.is_none() {
            return Err(CoreError::InvalidArgument("an exclusive queue needs a declaring connection".into()));
        }
        let id = QueueId(self.next_queue_id);
        let name = if name.is_empty() { generated_queue_name(id) } else { name };
        let parsed = args::parse_queue_args(vhost, &name, &arguments, &self.limits)?;
        if let Some(existing) = host.queues.get(&name) {
            existing.check_access(connection)?;
            let inequivalent = |arg: &str, received: String, current: String| {
                Err(CoreError::PreconditionFailed(format!(
                    "inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}': received {received} but current is {current}"
                )))
            };
            if existing.durable != durable {
                return inequivalent("durable", quoted(durable), quoted(existing.durable));
            }
            if existing.auto_delete != auto_delete {
                return inequivalent("auto_delete", quoted(auto_delete), quoted(existing.auto_delete));
            }
            if existing.exclusive_owner.is_some() != exclusive {
                return inequivalent("exclusive", quoted(exclusive), quoted(existing.exclusive_owner.is_some()));
            }
            // Parsed values decide (a 32-bit 10 equals a 64-bit 10); the text shows them as sent.
            if let Some(arg) = args::queue_args_difference(&parsed, &existing.args) {
                return inequivalent(arg, args::described(&arguments, arg), args::described(&existing.arguments, arg));
            }
            return Ok(existing.declared(false));
        }
        let count = self.queue_count() + 1;
        if count > u64::from(self.limits.queues_max) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.queues_max",
                value: count,
                max: self.limits.queues_max.into(),
            });
        }
        let Some(next_queue_id) = self.next_queue_id.checked_add(1) else {
            return Err(CoreError::Internal("queue ids exhausted".into()));
        };
        let owner = if exclusive { connection } else { None };
        let queue = QueueDef {
            id,
            name: QueueName { vhost: vhost.to_owned(), name: name.clone() },
            durable,
            auto_delete,
            exclusive_owner: owner,
            arguments,
            args: parsed,
        };
        let Some(host) = self.vhosts.get_mut(vhost) else { return Err(no_vhost(vhost)) };
        self.next_queue_id = next_queue_id;
        self.queue_ids.insert(id, queue.name.clone());
        if let Some(owner) = owner {
            self.exclusive.insert((owner, id));
        }
        effects.push(MetaEffect::QueueCreated { id, name: queue.name.clone(), partitions: queue.args.partitions });
        let reply = queue.declared(true);
        host.queues.insert(name, queue);
        Ok(reply)
    }

    fn delete_queue(
        &mut self,
        vhost: &str,
        name: &str,
        expected_id: Option<QueueId>,
        connection: Option<ConnectionId>,
        effects: &mut Vec<MetaEffect>,
    ) -> CoreResult<MetaReply> {
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        let queue = host.queues.get(name).ok_or_else(|| no_queue(vhost, name))?;
        queue.check_access(connection)?;
        if let Some(expected) = expected_id
            && expected != queue.id
        {
            return Err(CoreError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{vhost}' was redeclared (id {expected} became {}); not deleted",
                queue.id
            )));
        }
        let deleted = self.remove_queue(vhost, name, effects).ok_or_else(|| no_queue(vhost, name))?;
        Ok(MetaReply::QueueDeleted(deleted))
    }

    /// Delete a queue, its bindings (auto-deleting exchanges left unbound) and the state records it
    /// owns, and report it. Every path that deletes a queue ends here.
    fn remove_queue(&mut self, vhost: &str, name: &str, effects: &mut Vec<MetaEffect>) -> Option<DeletedQueue> {
        let host = self.vhosts.get_mut(vhost)?;
        let queue = host.queues.remove(name)?;
        host.drop_destination(Destination::Queue(name.to_owned()), &mut self.tally);
        let records = host.state.remove_owned_by(name);
        self.tally.state_records = self.tally.state_records.saturating_sub(records);
        self.forget_queue(&queue);
        let deleted = queue.deleted();
        effects.push(MetaEffect::QueueDeleted(deleted.clone()));
        Some(deleted)
    }

    /// Drop a deleted queue from the indexes.
    fn forget_queue(&mut self, queue: &QueueDef) {
        self.queue_ids.remove(&queue.id);
        if let Some(owner) = queue.exclusive_owner {
            self.exclusive.remove(&(owner, queue.id));
        }
    }

    /// Delete the given exclusive queues, in id order.
    fn remove_queues(&mut self, ids: Vec<QueueId>, effects: &mut Vec<MetaEffect>) -> MetaReply {
        let mut deleted = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(name) = self.queue_ids.get(&id).cloned() else { continue };
            deleted.extend(self.remove_queue(&name.vhost, &name.name, effects));
        }
        MetaReply::QueuesDeleted(deleted)
    }

    /// Check a bind or unbind; returns the binding's key.
    fn check_binding(&self, binding: &BindingSpec, connection: Option<ConnectionId>) -> CoreResult<BindingKey> {
        let vhost = &binding.vhost;
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        if binding.source.is_empty() || matches!(&binding.destination, Destination::Exchange(name) if name.is_empty()) {
            return Err(CoreError::AccessRefused(DEFAULT_EXCHANGE_REFUSED.into()));
        }
        // Binding keys have their own limit: MQTT topic filters are bound as patterns and can be far
        // longer than AMQP's short strings.
        let max = self.limits.binding_key_len_max_bytes;
        if binding.routing_key.len() > max as usize {
            return Err(CoreError::InvalidArgument(format!(
                "binding key is {} bytes, longer than limits.binding_key_len_max_bytes ({max})",
                binding.routing_key.len()
            )));
        }
        let source = host.exchanges.get(&binding.source).ok_or_else(|| no_exchange(vhost, &binding.source))?;
        match &binding.destination {
            Destination::Queue(name) => {
                host.queues.get(name).ok_or_else(|| no_queue(vhost, name))?.check_access(connection)?
            }
            Destination::Exchange(name) => {
                host.exchanges.get(name).ok_or_else(|| no_exchange(vhost, name))?;
            }
        }
        if source.kind.routing() == ExchangeKind::Headers {
            headers::validate_binding(&binding.arguments).map_err(CoreError::PreconditionFailed)?;
        }
        if source.kind.routing() == ExchangeKind::Topic
            && let Some(value) = binding.arguments.get(topic::EXCLUDE_DOLLAR_TOPICS)
            && !matches!(value, FieldValue::Bool(_))
        {
            // A front-end passing a string "true" would otherwise silently get AMQP matching.
            return Err(CoreError::PreconditionFailed(format!(
                "binding argument '{}' must be a boolean, got {value:?}",
                topic::EXCLUDE_DOLLAR_TOPICS
            )));
        }
        BindingKey::new(binding.destination.clone(), binding.routing_key.clone(), &binding.arguments)
    }

    fn bind(&mut self, binding: BindingSpec, connection: Option<ConnectionId>) -> CoreResult<MetaReply> {
        let key = self.check_binding(&binding, connection)?;
        let Some(host) = self.vhosts.get_mut(&binding.vhost) else { return Err(no_vhost(&binding.vhost)) };
        let Some(source) = host.exchanges.get(&binding.source) else {
            return Err(no_exchange(&binding.vhost, &binding.source));
        };
        if source.bindings.contains_key(&key) {
            return Ok(MetaReply::Ok);
        }
        let needed = self.tally.bindings + 1;
        if needed > u64::from(self.limits.bindings_max) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.bindings_max",
                value: needed,
                max: self.limits.bindings_max.into(),
            });
        }
        host.insert_binding(&binding.source, key, binding.arguments, &mut self.tally);
        Ok(MetaReply::Ok)
    }

    fn unbind(&mut self, binding: BindingSpec, connection: Option<ConnectionId>) -> CoreResult<MetaReply> {
        let key = self.check_binding(&binding, connection)?;
        let Some(host) = self.vhosts.get_mut(&binding.vhost) else { return Err(no_vhost(&binding.vhost)) };
        if host.remove_binding(&binding.source, &key, &mut self.tally)
            && host
                .exchanges
                .get(&binding.source)
                .is_some_and(|source| source.auto_delete && source.bindings.is_empty())
        {
            host.delete_exchange(&binding.source, &mut self.tally);
        }
        Ok(MetaReply::Ok)
    }
}

impl ReplicatedState for Catalogue {
    type Command = MetaCommand;
    type Reply = MetaReply;
    type Effect = MetaEffect;

    /// Every handler validates before it changes anything, so a refused command leaves the state as
    /// it was and pushes no effect.
    fn apply(&mut self, now_ms: u64, command: MetaCommand, effects: &mut Vec<MetaEffect>) -> MetaReply {
        let result = match command {
            MetaCommand::SetLimits(limits) => {
                self.limits = limits;
                Ok(MetaReply::Ok)
            }
            MetaCommand::CreateVhost { name } => self.create_vhost(name),
            MetaCommand::DeleteVhost { name } => self.delete_vhost(&name, effects),
            MetaCommand::DeclareExchange(declare) => self.declare_exchange(declare),
            MetaCommand::DeleteExchange { vhost, name, if_unused } => self.delete_exchange(&vhost, &name, if_unused),
            MetaCommand::DeclareQueue(declare) => self.declare_queue(declare, effects),
            MetaCommand::DeleteQueue { vhost, name, expected_id, connection } => {
                self.delete_queue(&vhost, &name, expected_id, connection, effects)
            }
            MetaCommand::Bind { binding, connection } => self.bind(binding, connection),
            MetaCommand::Unbind { binding, connection } => self.unbind(binding, connection),
            MetaCommand::DeleteOwnedBy { node, incarnation_below } => {
                let mut ids: Vec<QueueId> = self
                    .exclusive
                    .iter()
                    .filter(|(owner, _)| owner.node == node && owner.incarnation < incarnation_below)
                    .map(|&(_, id)| id)
                    .collect();
                ids.sort();
                Ok(self.remove_queues(ids, effects))
            }
            MetaCommand::DeleteConnectionQueues { owner } => {
                let ids: Vec<QueueId> =
                    self.exclusive.range((owner, QueueId(0))..=(owner, QueueId(u64::MAX))).map(|&(_, id)| id).collect();
                Ok(self.remove_queues(ids, effects))
            }
            MetaCommand::TxnBegin { txn, participants, timeout_ms, half } => {
                self.txns.entry(txn).or_insert(TxnRecord {
                    participants,
                    deadline_ms: now_ms.saturating_add(timeout_ms),
                    decision: None,
                    half: half.map(|spec| HalfState {
                        group: spec.group,
                        check_interval_ms: spec.check_interval_ms,
                        checks: 0,
                        next_check_ms: now_ms.saturating_add(spec.check_interval_ms),
                    }),
                });
                Ok(MetaReply::Ok)
            }
            MetaCommand::TxnChecked { txn } => {
                if let Some(half) = self.txns.get_mut(&txn).and_then(|r| r.half.as_mut()) {
                    half.checks = half.checks.saturating_add(1);
                    half.next_check_ms = now_ms.saturating_add(half.check_interval_ms);
                }
                Ok(MetaReply::Ok)
            }
            MetaCommand::TxnDecide { txn, commit } => {
                let decision = match self.txns.get_mut(&txn) {
                    // Never begun, or already forgotten by everyone: nothing can commit.
                    None => false,
                    Some(record) => *record.decision.get_or_insert(commit && now_ms < record.deadline_ms),
                };
                Ok(MetaReply::TxnDecision(decision))
            }
            MetaCommand::TxnForget { txn } => {
                self.txns.remove(&txn);
                Ok(MetaReply::Ok)
            }
            MetaCommand::WriteState { vhost, writes, caps } => self.write_state(&vhost, writes, caps),
            MetaCommand::DeleteStatePrefix { vhost, prefix } => self.delete_state_prefix(&vhost, &prefix),
        };
        result.unwrap_or_else(MetaReply::Error)
    }
}

/// A server-generated queue name. Derived from the queue id through a bijective mix (SplitMix64's
/// finaliser), so names are deterministic on every replica, unique because ids are, and do not look
/// sequential to clients that might otherwise guess each other's reply queues.
fn generated_queue_name(id: QueueId) -> String {
    let mut x = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{GENERATED_QUEUE_PREFIX}{x:016x}")
}

fn quoted(value: impl fmt::Display) -> String {
    format!("'{value}'")
}

fn no_vhost(vhost: &str) -> CoreError {
    CoreError::NotFound(format!("no vhost '{vhost}'"))
}

fn no_exchange(vhost: &str, name: &str) -> CoreError {
    CoreError::NotFound(format!("no exchange '{name}' in vhost '{vhost}'"))
}

fn no_queue(vhost: &str, name: &str) -> CoreError {
    CoreError::NotFound(format!("no queue '{name}' in vhost '{vhost}'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V: &str = "/";

    fn run(catalogue: &mut Catalogue, command: MetaCommand) -> MetaReply {
        let mut effects = Vec::new();
        let reply = catalogue.apply(0, command, &mut effects);
        if matches!(reply, MetaReply::Error(_)) {
            assert!(effects.is_empty(), "a refused command has no effects: {effects:?}");
        }
        reply
    }

    fn ok(catalogue: &mut Catalogue, command: MetaCommand) {
        let reply = run(catalogue, command.clone());
        assert!(!matches!(reply, MetaReply::Error(_)), "{command:?} failed: {reply:?}");
    }

    fn refused(catalogue: &mut Catalogue, command: MetaCommand) -> CoreError {
        match run(catalogue, command.clone()) {
            MetaReply::Error(error) => error,
            reply => panic!("{command:?} succeeded: {reply:?}"),
        }
    }

    fn with_vhost(limits: Limits) -> Catalogue {
        let mut catalogue = Catalogue::new(limits);
        ok(&mut catalogue, MetaCommand::CreateVhost { name: V.into() });
        catalogue
    }

    fn catalogue() -> Catalogue {
        with_vhost(Limits::default())
    }

    fn exchange(name: &str, kind: ExchangeKind) -> ExchangeDeclare {
        ExchangeDeclare {
            vhost: V.into(),
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            passive: false,
            arguments: Headers::new(),
        }
    }

    fn declare_exchange(catalogue: &mut Catalogue, name: &str, kind: ExchangeKind) {
        ok(catalogue, MetaCommand::DeclareExchange(exchange(name, kind)));
    }

    fn queue(name: &str) -> QueueDeclare {
        QueueDeclare {
            vhost: V.into(),
            name: name.into(),
            durable: true,
            auto_delete: false,
            exclusive: false,
            passive: false,
            connection: None,
            arguments: Headers::new(),
        }
    }

    fn declare_queue(catalogue: &mut Catalogue, declare: QueueDeclare) -> (QueueId, String, bool) {
        match run(catalogue, MetaCommand::DeclareQueue(declare)) {
            MetaReply::QueueDeclared { id, name, created, .. } => (id, name, created),
            other => panic!("declare failed: {other:?}"),
        }
    }

    fn binding(source: &str, destination: Destination, key: &str) -> BindingSpec {
        BindingSpec {
            vhost: V.into(),
            source: source.into(),
            destination,
            routing_key: key.into(),
            arguments: Headers::new(),
        }
    }

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn x(name: &str) -> Destination {
        Destination::Exchange(name.into())
    }

    fn bind(catalogue: &mut Catalogue, source: &str, destination: Destination, key: &str) {
        ok(catalogue, MetaCommand::Bind { binding: binding(source, destination, key), connection: None });
    }

    fn unbind(catalogue: &mut Catalogue, source: &str, destination: Destination, key: &str) {
        ok(catalogue, MetaCommand::Unbind { binding: binding(source, destination, key), connection: None });
    }

    fn routed_with(catalogue: &Catalogue, exchange: &str, key: &str, headers: &Headers) -> Vec<String> {
        let route = catalogue.route(V, exchange, key, headers).expect("routes");
        route.queues.into_iter().map(|queue| queue.name.name).collect()
    }

    fn routed(catalogue: &Catalogue, exchange: &str, key: &str) -> Vec<String> {
        routed_with(catalogue, exchange, key, &Headers::new())
    }

    fn connection(node: u64, incarnation: u64, seq: u64) -> ConnectionId {
        ConnectionId { node, incarnation, seq }
    }

    fn text(value: &str) -> FieldValue {
        FieldValue::LongString(value.into())
    }

    /// Recompute every index and count from the objects and compare.
    fn check_invariants(catalogue: &Catalogue) {
        let mut exchanges = 0;
        let mut bindings = 0;
        let mut queue_ids = BTreeMap::new();
        let mut exclusive = BTreeSet::new();
        let mut state_records = 0;
        for (vhost_name, vhost) in &catalogue.vhosts {
            state_records += vhost.state.len();
            assert_eq!(vhost.state.owned(), &vhost.state.owned_recomputed(), "owner index of {vhost_name}");
            for (owner, key) in vhost.state.owned() {
                assert!(vhost.queues.contains_key(owner), "record {key} outlived its owner {owner}");
            }
            exchanges += vhost.exchanges.len() as u64;
            let mut sources = BTreeSet::new();
            for (name, exchange) in &vhost.exchanges {
                assert_eq!(name, &exchange.name);
                bindings += exchange.bindings.len() as u64;
                if let Some(index) = exchange.index.get() {
                    assert_eq!(
                        index,
                        &RoutingIndex::build(exchange.kind.routing(), &exchange.bindings),
                        "index of {name}"
                    );
                }
                for key in exchange.bindings.keys() {
                    match &key.destination {
                        Destination::Queue(queue) => assert!(vhost.queues.contains_key(queue), "dangling {key:?}"),
                        Destination::Exchange(to) => assert!(vhost.exchanges.contains_key(to), "dangling {key:?}"),
                    }
                    sources.insert((key.destination.clone(), name.clone()));
                }
            }
            assert_eq!(sources, vhost.sources, "reverse index of {vhost_name}");
            for (name, queue) in &vhost.queues {
                assert_eq!(name, &queue.name.name);
                assert_eq!(vhost_name, &queue.name.vhost);
                assert!(queue.id.0 < catalogue.next_queue_id);
                queue_ids.insert(queue.id, queue.name.clone());
                if let Some(owner) = queue.exclusive_owner {
                    exclusive.insert((owner, queue.id));
                }
            }
        }
        assert_eq!(catalogue.tally.exchanges, exchanges);
        assert_eq!(catalogue.tally.bindings, bindings);
        assert_eq!(catalogue.tally.state_records, state_records);
        assert_eq!(catalogue.queue_ids, queue_ids);
        assert_eq!(catalogue.exclusive, exclusive);
    }

    fn round_trip(catalogue: &Catalogue) -> Catalogue {
        let bytes = postcard::to_allocvec(catalogue).expect("serialises");
        postcard::from_bytes(&bytes).expect("deserialises")
    }

    #[test]
    fn vhost_has_the_predeclared_exchanges() {
        let catalogue = catalogue();
        let names: Vec<&str> = catalogue.exchanges_in(V).map(|exchange| exchange.name.as_str()).collect();
        assert_eq!(names, ["", "amq.direct", "amq.fanout", "amq.headers", "amq.match", "amq.topic"]);
        assert_eq!(catalogue.exchange(V, "amq.match").map(|exchange| exchange.kind), Some(ExchangeKind::Headers));
        assert!(catalogue.exchanges_in(V).all(|exchange| exchange.durable));
        assert_eq!(catalogue.exchange_count(), 6);
        assert!(catalogue.has_vhost(V));
    }

    #[test]
    fn delayed_message_exchanges_route_as_their_delayed_type_and_mark_the_route() {
        let mut catalogue = catalogue();
        let mut arguments = Headers::new();
        arguments.push(DELAYED_TYPE_ARGUMENT, "fanout");
        let kind = ExchangeKind::from_declare(DELAYED_MESSAGE_TYPE, &arguments).expect("kind");
        assert_eq!(
            (kind, kind.routing(), kind.is_delayed()),
            (ExchangeKind::DelayedFanout, ExchangeKind::Fanout, true)
        );
        let mut declare = exchange("later", kind);
        declare.arguments = arguments;
        ok(&mut catalogue, MetaCommand::DeclareExchange(declare.clone()));
        ok(&mut catalogue, MetaCommand::DeclareExchange(declare.clone()));
        declare_queue(&mut catalogue, queue("a"));
        declare_queue(&mut catalogue, queue("b"));
        bind(&mut catalogue, "later", q("a"), "x");
        bind(&mut catalogue, "amq.direct", x("later"), "via");
        bind(&mut catalogue, "amq.direct", q("b"), "plain");
        assert_eq!(routed(&catalogue, "later", "anything"), ["a"], "fanout routing");
        assert!(catalogue.route(V, "later", "k", &Headers::new()).expect("route").delayed);
        // Passing through the delayed exchange after another marks the route too.
        assert!(catalogue.route(V, "amq.direct", "via", &Headers::new()).expect("route").delayed);
        assert!(!catalogue.route(V, "amq.direct", "plain", &Headers::new()).expect("route").delayed);
        // Redeclaring with another x-delayed-type, or as a plain fanout, is inequivalent.
        let mut other = declare.clone();
        other.kind = ExchangeKind::DelayedTopic;
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(other));
        assert!(error.to_string().contains("inequivalent arg 'x-delayed-type'"), "{error}");
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("later", ExchangeKind::Fanout)));
        assert!(error.to_string().contains("received 'fanout' but current is 'x-delayed-message'"), "{error}");
        let mut bad = Headers::new();
        bad.push(DELAYED_TYPE_ARGUMENT, "x-delayed-message");
        assert!(ExchangeKind::from_declare(DELAYED_MESSAGE_TYPE, &bad).is_err());
        assert!(ExchangeKind::from_declare("x-consistent-hash", &Headers::new()).is_err());
        check_invariants(&catalogue);
    }

    #[test]
    fn default_exchange_routes_by_queue_name_and_is_untouchable() {
        let mut catalogue = catalogue();
        declare_queue(&mut catalogue, queue("orders"));
        assert_eq!(routed(&catalogue, "", "orders"), ["orders"]);
        assert!(routed(&catalogue, "", "other").is_empty());
        let refusal = CoreError::AccessRefused("operation not permitted on the default exchange".into());
        assert_eq!(refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("", ExchangeKind::Direct))), refusal);
        let delete = MetaCommand::DeleteExchange { vhost: V.into(), name: String::new(), if_unused: false };
        assert_eq!(refused(&mut catalogue, delete), refusal);
        let bind_from = MetaCommand::Bind { binding: binding("", q("orders"), "k"), connection: None };
        assert_eq!(refused(&mut catalogue, bind_from), refusal);
        let bind_to = MetaCommand::Bind { binding: binding("amq.direct", x(""), "k"), connection: None };
        assert_eq!(refused(&mut catalogue, bind_to), refusal);
        let mut passive = exchange("", ExchangeKind::Direct);
        passive.passive = true;
        ok(&mut catalogue, MetaCommand::DeclareExchange(passive));
    }

    #[test]
    fn direct_routes_by_key_equality() {
        let mut catalogue = catalogue();
        for name in ["a", "b", "c"] {
            declare_queue(&mut catalogue, queue(name));
        }
        bind(&mut catalogue, "amq.direct", q("a"), "red");
        bind(&mut catalogue, "amq.direct", q("b"), "red");
        bind(&mut catalogue, "amq.direct", q("c"), "green");
        // Same key and queue, different arguments: a second binding, still one delivery.
        let mut with_args = binding("amq.direct", q("a"), "red");
        with_args.arguments.push("k", "v");
        ok(&mut catalogue, MetaCommand::Bind { binding: with_args, connection: None });
        assert_eq!(catalogue.binding_count(), 4);
        assert_eq!(routed(&catalogue, "amq.direct", "red"), ["a", "b"]);
        assert_eq!(routed(&catalogue, "amq.direct", "green"), ["c"]);
        assert!(routed(&catalogue, "amq.direct", "red.x").is_empty());
        unbind(&mut catalogue, "amq.direct", q("a"), "red");
        assert_eq!(routed(&catalogue, "amq.direct", "red"), ["a", "b"], "the binding with arguments remains");
        unbind(&mut catalogue, "amq.direct", q("b"), "red");
        assert_eq!(routed(&catalogue, "amq.direct", "red"), ["a"]);
    }

    #[test]
    fn fanout_routes_to_every_binding() {
        let mut catalogue = catalogue();
        declare_queue(&mut catalogue, queue("a"));
        declare_queue(&mut catalogue, queue("b"));
        declare_queue(&mut catalogue, queue("unbound"));
        bind(&mut catalogue, "amq.fanout", q("b"), "x");
        bind(&mut catalogue, "amq.fanout", q("a"), "");
        bind(&mut catalogue, "amq.fanout", q("a"), "y");
        assert_eq!(routed(&catalogue, "amq.fanout", "anything"), ["a", "b"]);
    }

    #[test]
    fn topic_routes_by_pattern() {
        let mut catalogue = catalogue();
        for (name, pattern) in [("all", "#"), ("orange", "*.orange.*"), ("rabbit", "*.*.rabbit"), ("lazy", "lazy.#")] {
            declare_queue(&mut catalogue, queue(name));
            bind(&mut catalogue, "amq.topic", q(name), pattern);
        }
        assert_eq!(routed(&catalogue, "amq.topic", "quick.orange.rabbit"), ["all", "orange", "rabbit"]);
        assert_eq!(routed(&catalogue, "amq.topic", "lazy.orange.elephant"), ["all", "lazy", "orange"]);
        assert_eq!(routed(&catalogue, "amq.topic", "lazy.pink.rabbit"), ["all", "lazy", "rabbit"]);
        assert_eq!(routed(&catalogue, "amq.topic", "quick.brown.fox"), ["all"]);
        assert_eq!(routed(&catalogue, "amq.topic", "lazy"), ["all", "lazy"]);
        assert_eq!(routed(&catalogue, "amq.topic", ""), ["all"]);
        unbind(&mut catalogue, "amq.topic", q("all"), "#");
        assert!(routed(&catalogue, "amq.topic", "quick.brown.fox").is_empty());
    }

    #[test]
    fn headers_routes_by_arguments() {
        let mut catalogue = catalogue();
        declare_queue(&mut catalogue, queue("pdf"));
        declare_queue(&mut catalogue, queue("any"));
        let mut all = binding("amq.headers", q("pdf"), "ignored");
        all.arguments.push("format", "pdf");
        all.arguments.push("type", "report");
        ok(&mut catalogue, MetaCommand::Bind { binding: all, connection: None });
        let mut any = binding("amq.headers", q("any"), "");
        any.arguments.push("x-match", "any");
        any.arguments.push("format", "zip");
        any.arguments.push("type", "report");
        ok(&mut catalogue, MetaCommand::Bind { binding: any, connection: None });
        let message = Headers(vec![("format".into(), text("pdf")), ("type".into(), text("report"))]);
        assert_eq!(routed_with(&catalogue, "amq.headers", "", &message), ["any", "pdf"]);
        let message = Headers(vec![("format".into(), text("zip"))]);
        assert_eq!(routed_with(&catalogue, "amq.headers", "", &message), ["any"]);
        assert!(routed_with(&catalogue, "amq.headers", "", &Headers::new()).is_empty());
        let mut bad = binding("amq.headers", q("any"), "");
        bad.arguments.push("x-match", "most");
        let error = refused(&mut catalogue, MetaCommand::Bind { binding: bad, connection: None });
        assert!(matches!(error, CoreError::PreconditionFailed(_)), "{error:?}");
    }

    #[test]
    fn exchange_to_exchange_bindings_follow_a_cycle_once() {
        let mut catalogue = catalogue();
        declare_exchange(&mut catalogue, "one", ExchangeKind::Fanout);
        declare_exchange(&mut catalogue, "two", ExchangeKind::Topic);
        declare_queue(&mut catalogue, queue("q1"));
        declare_queue(&mut catalogue, queue("q2"));
        bind(&mut catalogue, "one", x("two"), "");
        bind(&mut catalogue, "two", x("one"), "#");
        bind(&mut catalogue, "one", q("q1"), "");
        bind(&mut catalogue, "two", q("q2"), "a.*");
        bind(&mut catalogue, "one", x("one"), ""); // a self-loop too
        assert_eq!(routed(&catalogue, "one", "a.b"), ["q1", "q2"]);
        assert_eq!(routed(&catalogue, "two", "a.b"), ["q1", "q2"]);
        assert_eq!(routed(&catalogue, "two", "b"), ["q1"]);
        check_invariants(&catalogue);
    }

    #[test]
    fn alternate_exchange_takes_unroutable_messages() {
        let mut catalogue = catalogue();
        let mut main = exchange("main", ExchangeKind::Direct);
        main.arguments.push("alternate-exchange", "ae");
        ok(&mut catalogue, MetaCommand::DeclareExchange(main));
        let mut ae = exchange("ae", ExchangeKind::Fanout);
        ae.internal = true;
        ok(&mut catalogue, MetaCommand::DeclareExchange(ae));
        declare_queue(&mut catalogue, queue("routed"));
        declare_queue(&mut catalogue, queue("unroutable"));
        bind(&mut catalogue, "main", q("routed"), "known");
        bind(&mut catalogue, "ae", q("unroutable"), "");
        assert_eq!(routed(&catalogue, "main", "known"), ["routed"]);
        assert_eq!(routed(&catalogue, "main", "other"), ["unroutable"]);
        assert_eq!(catalogue.exchange(V, "main").and_then(|e| e.alternate_exchange.clone()), Some("ae".to_owned()));
    }

    #[test]
    fn alternate_exchange_cycles_and_missing_alternates_end() {
        let mut catalogue = catalogue();
        let mut first = exchange("first", ExchangeKind::Direct);
        first.arguments.push("alternate-exchange", "second");
        let mut second = exchange("second", ExchangeKind::Direct);
        second.arguments.push("alternate-exchange", "first");
        let mut third = exchange("third", ExchangeKind::Direct);
        third.arguments.push("alternate-exchange", "missing");
        for declare in [first, second, third] {
            ok(&mut catalogue, MetaCommand::DeclareExchange(declare));
        }
        assert!(routed(&catalogue, "first", "k").is_empty());
        assert!(routed(&catalogue, "third", "k").is_empty());
        declare_queue(&mut catalogue, queue("q"));
        bind(&mut catalogue, "second", q("q"), "k");
        assert_eq!(routed(&catalogue, "first", "k"), ["q"], "first matches nothing, its alternate does");
        assert!(routed(&catalogue, "first", "j").is_empty());
    }

    #[test]
    fn internal_exchange_refuses_publishes_but_not_bindings() {
        let mut catalogue = catalogue();
        let mut internal = exchange("inside", ExchangeKind::Fanout);
        internal.internal = true;
        ok(&mut catalogue, MetaCommand::DeclareExchange(internal));
        declare_queue(&mut catalogue, queue("q"));
        bind(&mut catalogue, "inside", q("q"), "");
        bind(&mut catalogue, "amq.fanout", x("inside"), "");
        assert_eq!(
            catalogue.route(V, "inside", "k", &Headers::new()),
            Err(CoreError::AccessRefused("cannot publish to internal exchange 'inside' in vhost '/'".into()))
        );
        assert_eq!(routed(&catalogue, "amq.fanout", "k"), ["q"]);
    }

    #[test]
    fn routing_to_missing_things() {
        let catalogue = catalogue();
        assert_eq!(
            catalogue.route(V, "nope", "k", &Headers::new()),
            Err(CoreError::NotFound("no exchange 'nope' in vhost '/'".into()))
        );
        assert!(matches!(catalogue.route("other", "", "k", &Headers::new()), Err(CoreError::NotFound(_))));
    }

    #[test]
    fn exchange_redeclare_must_be_equivalent() {
        let mut catalogue = catalogue();
        declare_exchange(&mut catalogue, "x", ExchangeKind::Direct);
        declare_exchange(&mut catalogue, "x", ExchangeKind::Direct);
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("x", ExchangeKind::Fanout))),
            CoreError::PreconditionFailed(
                "inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'"
                    .into()
            )
        );
        let mut transient = exchange("x", ExchangeKind::Direct);
        transient.durable = false;
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(transient));
        assert!(matches!(&error, CoreError::PreconditionFailed(text) if text.contains("'durable'")), "{error:?}");
        let mut with_ae = exchange("x", ExchangeKind::Direct);
        with_ae.arguments.push("alternate-exchange", "ae");
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(with_ae));
        assert!(matches!(&error, CoreError::PreconditionFailed(text) if text.contains("'alternate-exchange'")));
        let mut unknown_arg = exchange("x", ExchangeKind::Direct);
        unknown_arg.arguments.push("x-unknown", "ignored");
        ok(&mut catalogue, MetaCommand::DeclareExchange(unknown_arg));
    }

    #[test]
    fn queue_redeclare_must_be_equivalent() {
        let mut catalogue = catalogue();
        let mut first = queue("q");
        first.arguments.push("x-max-length", FieldValue::I32(10));
        let (id, _, created) = declare_queue(&mut catalogue, first);
        assert!(created);
        let mut same = queue("q");
        same.arguments.push("x-max-length", FieldValue::I64(10));
        assert_eq!(declare_queue(&mut catalogue, same), (id, "q".to_owned(), false));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(queue("q"))),
            CoreError::PreconditionFailed(
                "inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received none but current is \
                 the value '10' of type 'signedint'"
                    .into()
            )
        );
        let mut transient = queue("q");
        transient.durable = false;
        transient.arguments.push("x-max-length", FieldValue::I32(10));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(transient)),
            CoreError::PreconditionFailed(
                "inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'".into()
            )
        );
    }

    #[test]
    fn amq_prefix_is_reserved() {
        let mut catalogue = catalogue();
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("amq.foo", ExchangeKind::Direct))),
            CoreError::AccessRefused("exchange name 'amq.foo' contains reserved prefix 'amq.*'".into())
        );
        declare_exchange(&mut catalogue, "amq.direct", ExchangeKind::Direct);
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("amq.direct", ExchangeKind::Topic)));
        assert!(matches!(error, CoreError::PreconditionFailed(_)));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(queue("amq.q"))),
            CoreError::AccessRefused("queue name 'amq.q' contains reserved prefix 'amq.*'".into())
        );
        let delete = MetaCommand::DeleteExchange { vhost: V.into(), name: "amq.topic".into(), if_unused: false };
        assert!(matches!(refused(&mut catalogue, delete), CoreError::AccessRefused(_)));
        assert_eq!(catalogue.exchange_count(), 6);
    }

    #[test]
    fn server_named_queues_are_unique_and_deterministic() {
        let mut catalogue = catalogue();
        let (first_id, first, _) = declare_queue(&mut catalogue, queue(""));
        let (second_id, second, _) = declare_queue(&mut catalogue, queue(""));
        assert_ne!(first_id, second_id);
        assert_ne!(first, second);
        assert!(first.starts_with(GENERATED_QUEUE_PREFIX) && second.starts_with(GENERATED_QUEUE_PREFIX));
        assert_eq!(first, generated_queue_name(first_id));
        assert!(catalogue.queue(V, &first).is_some());
    }

    #[test]
    fn exclusive_queues_are_locked_to_their_connection() {
        let mut catalogue = catalogue();
        let owner = connection(1, 1, 1);
        let other = connection(1, 1, 2);
        let mut declare = queue("mine");
        declare.exclusive = true;
        declare.connection = Some(owner);
        let (id, _, created) = declare_queue(&mut catalogue, declare.clone());
        assert!(created);
        assert!(!declare_queue(&mut catalogue, declare.clone()).2, "the owner may redeclare");
        let locked = |error: CoreError| matches!(error, CoreError::ResourceLocked(text) if text.contains("'mine'"));
        declare.connection = Some(other);
        assert!(locked(refused(&mut catalogue, MetaCommand::DeclareQueue(declare.clone()))));
        declare.passive = true;
        assert!(locked(refused(&mut catalogue, MetaCommand::DeclareQueue(declare))));
        let bind = MetaCommand::Bind { binding: binding("amq.direct", q("mine"), "k"), connection: Some(other) };
        assert!(locked(refused(&mut catalogue, bind)));
        let delete = |connection| MetaCommand::DeleteQueue {
            vhost: V.into(),
            name: "mine".into(),
            expected_id: None,
            connection,
        };
        assert!(locked(refused(&mut catalogue, delete(Some(other)))));
        let mut without_owner = queue("alone");
        without_owner.exclusive = true;
        assert!(matches!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(without_owner)),
            CoreError::InvalidArgument(_)
        ));
        assert_eq!(
            run(&mut catalogue, delete(Some(owner))),
            MetaReply::QueueDeleted(DeletedQueue {
                id,
                name: QueueName { vhost: V.into(), name: "mine".into() },
                partitions: 1
            })
        );
    }

    #[test]
    fn passive_declares_only_check() {
        let mut catalogue = catalogue();
        let mut passive_queue = queue("q");
        passive_queue.passive = true;
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(passive_queue.clone())),
            CoreError::NotFound("no queue 'q' in vhost '/'".into())
        );
        let mut passive_exchange = exchange("x", ExchangeKind::Topic);
        passive_exchange.passive = true;
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareExchange(passive_exchange.clone())),
            CoreError::NotFound("no exchange 'x' in vhost '/'".into())
        );
        assert_eq!(catalogue.queue_count(), 0);
        assert_eq!(catalogue.exchange_count(), 6);
        let mut durable = queue("q");
        durable.arguments.push("x-max-length", FieldValue::I32(5));
        let (id, _, _) = declare_queue(&mut catalogue, durable);
        declare_exchange(&mut catalogue, "x", ExchangeKind::Direct);
        // Passive declares ignore the other properties, as in RabbitMQ.
        passive_queue.durable = false;
        assert_eq!(declare_queue(&mut catalogue, passive_queue), (id, "q".to_owned(), false));
        ok(&mut catalogue, MetaCommand::DeclareExchange(passive_exchange));
    }

    #[test]
    fn invalid_queue_arguments_are_refused_before_anything_changes() {
        let mut catalogue = catalogue();
        let mut declare = queue("q");
        declare.arguments.push("x-max-length", FieldValue::I32(-1));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(declare)),
            CoreError::PreconditionFailed(
                "invalid arg 'x-max-length' for queue 'q' in vhost '/': {value_negative,-1}".into()
            )
        );
        assert_eq!(catalogue.queue_count(), 0);
        let (id, _, _) = declare_queue(&mut catalogue, queue("q"));
        assert_eq!(id, QueueId(1), "a refused declare uses no id");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            queues_max: 2,
            exchanges_max: 7,
            bindings_max: 2,
            name_len_max_bytes: 10,
            binding_key_len_max_bytes: 10,
            partitions_per_queue_max: 4,
            ..Limits::default()
        };
        let mut catalogue = with_vhost(limits);
        declare_queue(&mut catalogue, queue("a"));
        declare_queue(&mut catalogue, queue("b"));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(queue("c"))),
            CoreError::LimitExceeded { limit: "limits.queues_max", value: 3, max: 2 }
        );
        declare_queue(&mut catalogue, queue("a")); // a redeclare is not a new queue
        declare_exchange(&mut catalogue, "x", ExchangeKind::Direct);
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareExchange(exchange("y", ExchangeKind::Direct))),
            CoreError::LimitExceeded { limit: "limits.exchanges_max", value: 8, max: 7 }
        );
        assert!(matches!(
            refused(&mut catalogue, MetaCommand::CreateVhost { name: "other".into() }),
            CoreError::LimitExceeded { limit: "limits.exchanges_max", .. }
        ));
        bind(&mut catalogue, "x", q("a"), "1");
        bind(&mut catalogue, "x", q("a"), "2");
        bind(&mut catalogue, "x", q("a"), "2"); // a duplicate is not a new binding
        assert_eq!(
            refused(&mut catalogue, MetaCommand::Bind { binding: binding("x", q("b"), "3"), connection: None }),
            CoreError::LimitExceeded { limit: "limits.bindings_max", value: 3, max: 2 }
        );
        let long = "n".repeat(11);
        let error = refused(&mut catalogue, MetaCommand::DeclareExchange(exchange(&long, ExchangeKind::Direct)));
        assert!(matches!(&error, CoreError::InvalidArgument(text) if text.contains("limits.name_len_max_bytes")));
        unbind(&mut catalogue, "x", q("a"), "1");
        let error =
            refused(&mut catalogue, MetaCommand::Bind { binding: binding("x", q("b"), &long), connection: None });
        assert!(
            matches!(&error, CoreError::InvalidArgument(text) if text.contains("limits.binding_key_len_max_bytes"))
        );
        let mut wide = queue("a");
        wide.arguments.push("x-partitions", FieldValue::I32(5));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeclareQueue(wide)),
            CoreError::LimitExceeded { limit: "limits.partitions_per_queue_max", value: 5, max: 4 }
        );
        check_invariants(&catalogue);
    }

    #[test]
    fn auto_delete_exchange_goes_with_its_last_binding() {
        let mut catalogue = catalogue();
        let mut auto = exchange("auto", ExchangeKind::Direct);
        auto.auto_delete = true;
        ok(&mut catalogue, MetaCommand::DeclareExchange(auto.clone()));
        declare_queue(&mut catalogue, queue("q"));
        unbind(&mut catalogue, "auto", q("q"), "k"); // never bound: an unbind of nothing keeps it
        assert!(catalogue.exchange(V, "auto").is_some());
        bind(&mut catalogue, "auto", q("q"), "k1");
        bind(&mut catalogue, "auto", q("q"), "k2");
        unbind(&mut catalogue, "auto", q("q"), "k1");
        assert!(catalogue.exchange(V, "auto").is_some());
        unbind(&mut catalogue, "auto", q("q"), "k2");
        assert!(catalogue.exchange(V, "auto").is_none());
        // Cascade: deleting the queue removes the last binding of `auto`, whose deletion removes the
        // last binding of `upstream`.
        ok(&mut catalogue, MetaCommand::DeclareExchange(auto));
        let mut upstream = exchange("upstream", ExchangeKind::Fanout);
        upstream.auto_delete = true;
        ok(&mut catalogue, MetaCommand::DeclareExchange(upstream));
        bind(&mut catalogue, "auto", q("q"), "k");
        bind(&mut catalogue, "upstream", x("auto"), "");
        let delete =
            MetaCommand::DeleteQueue { vhost: V.into(), name: "q".into(), expected_id: None, connection: None };
        ok(&mut catalogue, delete);
        assert!(catalogue.exchange(V, "auto").is_none());
        assert!(catalogue.exchange(V, "upstream").is_none());
        assert_eq!(catalogue.binding_count(), 0);
        check_invariants(&catalogue);
    }

    #[test]
    fn deleting_removes_bindings_both_ways() {
        let mut catalogue = catalogue();
        declare_exchange(&mut catalogue, "hub", ExchangeKind::Topic);
        let (old_id, _, _) = declare_queue(&mut catalogue, queue("q"));
        bind(&mut catalogue, "hub", q("q"), "#");
        bind(&mut catalogue, "amq.direct", q("q"), "k");
        bind(&mut catalogue, "amq.fanout", x("hub"), "");
        assert_eq!(catalogue.bindings_to(V, &q("q")).len(), 2);
        let delete =
            MetaCommand::DeleteQueue { vhost: V.into(), name: "q".into(), expected_id: None, connection: None };
        let mut effects = Vec::new();
        let reply = catalogue.apply(0, delete, &mut effects);
        assert_eq!(reply.deleted_queues().collect::<Vec<_>>(), [(old_id, 1)]);
        assert!(matches!(effects.as_slice(), [MetaEffect::QueueDeleted(DeletedQueue { id, .. })] if *id == old_id));
        assert_eq!(catalogue.binding_count(), 1);
        let (new_id, _, _) = declare_queue(&mut catalogue, queue("q"));
        assert_ne!(new_id, old_id, "ids are never reused");
        assert!(catalogue.queue_by_id(old_id).is_none());
        assert!(routed(&catalogue, "hub", "a").is_empty(), "the new queue inherits no binding");
        bind(&mut catalogue, "hub", q("q"), "#");
        let delete = MetaCommand::DeleteExchange { vhost: V.into(), name: "hub".into(), if_unused: true };
        assert_eq!(
            refused(&mut catalogue, delete),
            CoreError::PreconditionFailed("exchange 'hub' in vhost '/' in use".into())
        );
        ok(&mut catalogue, MetaCommand::DeleteExchange { vhost: V.into(), name: "hub".into(), if_unused: false });
        assert_eq!(catalogue.binding_count(), 0, "bindings from and to the exchange are gone");
        assert!(routed(&catalogue, "amq.fanout", "a").is_empty());
        check_invariants(&catalogue);
    }

    #[test]
    fn delete_queue_only_deletes_the_expected_id() {
        let mut catalogue = catalogue();
        let (id, _, _) = declare_queue(&mut catalogue, queue("q"));
        let stale = MetaCommand::DeleteQueue {
            vhost: V.into(),
            name: "q".into(),
            expected_id: Some(QueueId(id.0 + 100)),
            connection: None,
        };
        assert!(matches!(refused(&mut catalogue, stale), CoreError::PreconditionFailed(_)));
        assert!(catalogue.queue(V, "q").is_some());
        let missing =
            MetaCommand::DeleteQueue { vhost: V.into(), name: "z".into(), expected_id: None, connection: None };
        assert_eq!(refused(&mut catalogue, missing), CoreError::NotFound("no queue 'z' in vhost '/'".into()));
    }

    #[test]
    fn bindings_need_both_ends_and_are_idempotent() {
        let mut catalogue = catalogue();
        declare_queue(&mut catalogue, queue("q"));
        assert_eq!(
            refused(&mut catalogue, MetaCommand::Bind { binding: binding("nope", q("q"), "k"), connection: None }),
            CoreError::NotFound("no exchange 'nope' in vhost '/'".into())
        );
        assert_eq!(
            refused(
                &mut catalogue,
                MetaCommand::Bind { binding: binding("amq.direct", q("z"), "k"), connection: None }
            ),
            CoreError::NotFound("no queue 'z' in vhost '/'".into())
        );
        assert_eq!(
            refused(
                &mut catalogue,
                MetaCommand::Bind { binding: binding("amq.direct", x("z"), "k"), connection: None }
            ),
            CoreError::NotFound("no exchange 'z' in vhost '/'".into())
        );
        bind(&mut catalogue, "amq.direct", q("q"), "k");
        bind(&mut catalogue, "amq.direct", q("q"), "k");
        assert_eq!(catalogue.binding_count(), 1);
        unbind(&mut catalogue, "amq.direct", q("q"), "other");
        assert_eq!(catalogue.binding_count(), 1);
        unbind(&mut catalogue, "amq.direct", q("q"), "k");
        assert_eq!(catalogue.binding_count(), 0);
        check_invariants(&catalogue);
    }

    #[test]
    fn delete_owned_by_removes_exclusive_queues_of_earlier_incarnations() {
        let mut catalogue = catalogue();
        let mut ids = BTreeMap::new();
        for (name, owner) in [
            ("old", Some(connection(1, 1, 7))),
            ("current", Some(connection(1, 2, 1))),
            ("other-node", Some(connection(2, 1, 1))),
            ("shared", None),
        ] {
            let mut declare = queue(name);
            declare.exclusive = owner.is_some();
            declare.connection = owner;
            ids.insert(name, declare_queue(&mut catalogue, declare).0);
        }
        bind(&mut catalogue, "amq.fanout", q("old"), "");
        let mut effects = Vec::new();
        let reply = catalogue.apply(0, MetaCommand::DeleteOwnedBy { node: 1, incarnation_below: 2 }, &mut effects);
        assert_eq!(reply.deleted_queues().collect::<Vec<_>>(), [(ids["old"], 1)]);
        assert_eq!(effects.len(), 1);
        let names: Vec<&str> = catalogue.queues().map(|queue| queue.name.name.as_str()).collect();
        assert_eq!(names, ["current", "other-node", "shared"]);
        assert_eq!(catalogue.binding_count(), 0);
        let reply = run(&mut catalogue, MetaCommand::DeleteConnectionQueues { owner: connection(2, 1, 1) });
        assert_eq!(reply.deleted_queues().collect::<Vec<_>>(), [(ids["other-node"], 1)]);
        let reply = run(&mut catalogue, MetaCommand::DeleteConnectionQueues { owner: connection(9, 9, 9) });
        assert_eq!(reply, MetaReply::QueuesDeleted(Vec::new()));
        check_invariants(&catalogue);
    }

    #[test]
    fn delete_vhost_reports_its_queues() {
        let mut catalogue = catalogue();
        ok(&mut catalogue, MetaCommand::CreateVhost { name: "other".into() });
        let (a, _, _) = declare_queue(&mut catalogue, queue("a"));
        let mut partitioned = queue("b");
        partitioned.arguments.push("x-partitions", FieldValue::U8(3));
        let (b, _, _) = declare_queue(&mut catalogue, partitioned);
        bind(&mut catalogue, "amq.topic", q("b"), "#");
        let mut effects = Vec::new();
        let reply = catalogue.apply(0, MetaCommand::DeleteVhost { name: V.into() }, &mut effects);
        assert_eq!(reply.deleted_queues().collect::<Vec<_>>(), [(a, 1), (b, 3)]);
        assert_eq!(effects.len(), 2);
        assert!(!catalogue.has_vhost(V));
        assert_eq!(catalogue.queue_count(), 0);
        assert_eq!(catalogue.exchange_count(), 6);
        assert_eq!(catalogue.binding_count(), 0);
        assert_eq!(
            refused(&mut catalogue, MetaCommand::DeleteVhost { name: V.into() }),
            CoreError::NotFound("no vhost '/'".into())
        );
        check_invariants(&catalogue);
    }

    #[test]
    fn lookups_and_expiry() {
        let mut catalogue = catalogue();
        let mut expiring = queue("tmp");
        expiring.arguments.push("x-expires", FieldValue::I32(60_000));
        let (id, _, _) = declare_queue(&mut catalogue, expiring);
        declare_queue(&mut catalogue, queue("kept"));
        assert_eq!(catalogue.queue_by_id(id).map(|queue| queue.name.name.as_str()), Some("tmp"));
        let expiring: Vec<(&str, u64)> =
            catalogue.queues_with_expiry().map(|(queue, ms)| (queue.name.name.as_str(), ms)).collect();
        assert_eq!(expiring, [("tmp", 60_000)]);
        let route = catalogue.route(V, "", "tmp", &Headers::new()).expect("routes");
        assert_eq!(
            route.queues,
            [RoutedQueue { id, name: QueueName { vhost: V.into(), name: "tmp".into() }, partitions: 1 }]
        );
    }

    #[test]
    fn errors_survive_reply_serialisation() {
        for error in [
            CoreError::LimitExceeded { limit: "limits.queues_max", value: 3, max: 2 },
            CoreError::NotFound("no queue 'q' in vhost '/'".into()),
            CoreError::NotLeader { leader: Some(3) },
        ] {
            let reply = MetaReply::Error(error);
            let bytes = postcard::to_allocvec(&reply).expect("serialises");
            assert_eq!(postcard::from_bytes::<MetaReply>(&bytes).expect("deserialises"), reply);
        }
    }

    /// A catalogue with every exchange kind, e2e bindings, an alternate and headers bindings.
    fn busy_catalogue() -> Catalogue {
        let mut catalogue = catalogue();
        let mut main = exchange("main", ExchangeKind::Topic);
        main.arguments.push("alternate-exchange", "amq.fanout");
        ok(&mut catalogue, MetaCommand::DeclareExchange(main));
        declare_exchange(&mut catalogue, "direct", ExchangeKind::Direct);
        for name in ["q1", "q2", "q3", "q4"] {
            declare_queue(&mut catalogue, queue(name));
        }
        bind(&mut catalogue, "main", q("q1"), "a.*");
        bind(&mut catalogue, "main", q("q2"), "#.b");
        bind(&mut catalogue, "main", x("direct"), "a.#");
        bind(&mut catalogue, "direct", q("q3"), "a.b");
        bind(&mut catalogue, "amq.fanout", q("q4"), "");
        let mut headers = binding("amq.headers", q("q1"), "");
        headers.arguments.push("kind", "x");
        ok(&mut catalogue, MetaCommand::Bind { binding: headers, connection: None });
        catalogue
    }

    #[test]
    fn catalogue_round_trips_through_postcard_and_routes_the_same() {
        let catalogue = busy_catalogue();
        let keys = ["a.b", "a.c", "x.b", "zzz", "a", ""];
        let message = Headers(vec![("kind".into(), text("x"))]);
        // Build the indexes before serialising, so the copy must rebuild them from the bindings.
        let before: Vec<Vec<String>> = keys.iter().map(|key| routed(&catalogue, "main", key)).collect();
        assert_eq!(before[0], ["q1", "q2", "q3"]);
        assert_eq!(before[3], ["q4"], "the alternate takes what main cannot route");
        let copy = round_trip(&catalogue);
        let after: Vec<Vec<String>> = keys.iter().map(|key| routed(&copy, "main", key)).collect();
        assert_eq!(before, after);
        assert_eq!(routed_with(&copy, "amq.headers", "", &message), ["q1"]);
        assert_eq!(postcard::to_allocvec(&copy).expect("ser"), postcard::to_allocvec(&catalogue).expect("ser"));
        check_invariants(&copy);
    }

    fn excluding_dollar(mut binding: BindingSpec) -> BindingSpec {
        binding.arguments.push(topic::EXCLUDE_DOLLAR_TOPICS, FieldValue::Bool(true));
        binding
    }

    #[test]
    fn topic_bindings_with_the_dollar_rule_skip_dollar_topics() {
        let mut catalogue = catalogue();
        for name in ["mqtt", "amqp", "sys"] {
            declare_queue(&mut catalogue, queue(name));
        }
        let with_rule = |destination: &str, pattern: &str| MetaCommand::Bind {
            binding: excluding_dollar(binding("amq.topic", q(destination), pattern)),
            connection: None,
        };
        ok(&mut catalogue, with_rule("mqtt", "#"));
        ok(&mut catalogue, with_rule("mqtt", "*.status"));
        bind(&mut catalogue, "amq.topic", q("amqp"), "#");
        ok(&mut catalogue, with_rule("sys", "$SYS.#"));
        assert_eq!(routed(&catalogue, "amq.topic", "a.status"), ["amqp", "mqtt"]);
        assert_eq!(routed(&catalogue, "amq.topic", "$SYS.status"), ["amqp", "sys"], "MQTT 4.7.2");
        assert_eq!(routed(&catalogue, "amq.topic", "a.$SYS"), ["amqp", "mqtt"], "only the first word counts");

        // The argument is part of the binding's identity: the same key and queue with and without
        // it are two bindings, removed one at a time.
        bind(&mut catalogue, "amq.topic", q("mqtt"), "#");
        assert_eq!(catalogue.binding_count(), 5);
        assert_eq!(routed(&catalogue, "amq.topic", "$SYS.x"), ["amqp", "mqtt", "sys"]);
        let copy = round_trip(&catalogue);
        assert_eq!(routed(&copy, "amq.topic", "$SYS.x"), ["amqp", "mqtt", "sys"], "rebuilt index agrees");
        unbind(&mut catalogue, "amq.topic", q("mqtt"), "#");
        assert_eq!(routed(&catalogue, "amq.topic", "$SYS.x"), ["amqp", "sys"]);
        assert_eq!(routed(&catalogue, "amq.topic", "x"), ["amqp", "mqtt"], "the binding with the rule stays");
        ok(
            &mut catalogue,
            MetaCommand::Unbind { binding: excluding_dollar(binding("amq.topic", q("mqtt"), "#")), connection: None },
        );
        assert_eq!(routed(&catalogue, "amq.topic", "x"), ["amqp"]);
        check_invariants(&catalogue);

        // `false` is AMQP matching; a value that is not a boolean is refused.
        let mut off = binding("amq.topic", q("amqp"), "*");
        off.arguments.push(topic::EXCLUDE_DOLLAR_TOPICS, FieldValue::Bool(false));
        ok(&mut catalogue, MetaCommand::Bind { binding: off, connection: None });
        assert_eq!(routed(&catalogue, "amq.topic", "$x"), ["amqp"]);
        let mut bad = binding("amq.topic", q("amqp"), "#");
        bad.arguments.push(topic::EXCLUDE_DOLLAR_TOPICS, "true");
        let error = refused(&mut catalogue, MetaCommand::Bind { binding: bad, connection: None });
        assert!(matches!(error, CoreError::PreconditionFailed(_)), "{error:?}");
    }

    const STATE_CAPS: StateCaps = StateCaps { key_len_max_bytes: 16, value_size_max_bytes: 8, records_max: 4 };

    fn write_state(writes: Vec<StateWrite>) -> MetaCommand {
        MetaCommand::WriteState { vhost: V.into(), writes, caps: STATE_CAPS }
    }

    fn scan(catalogue: &Catalogue, prefix: &str) -> Vec<(String, String)> {
        catalogue
            .state_scan(V, prefix)
            .map(|(key, value)| (key.clone(), String::from_utf8_lossy(value).into_owned()))
            .collect()
    }

    #[test]
    fn state_records_are_written_all_or_none_within_their_caps() {
        let mut catalogue = catalogue();
        declare_queue(&mut catalogue, queue("session"));
        ok(
            &mut catalogue,
            write_state(vec![StateWrite::put("s/b", "1"), StateWrite::put_owned("s/a", "2", "session")]),
        );
        ok(&mut catalogue, write_state(vec![StateWrite::put("r/x", "3"), StateWrite::put("s", "4")]));
        assert_eq!(scan(&catalogue, "s/"), [("s/a".into(), "2".into()), ("s/b".into(), "1".into())]);
        assert_eq!(catalogue.state_get(V, "s").map(|v| v.to_vec()), Some(b"4".to_vec()));
        assert_eq!(catalogue.state_record_count(), 4);

        let before = scan(&catalogue, "");
        let too_many = write_state(vec![StateWrite::put("s/b", "5"), StateWrite::put("new", "6")]);
        assert_eq!(
            refused(&mut catalogue, too_many),
            CoreError::LimitExceeded { limit: "limits.state_records_max", value: 5, max: 4 }
        );
        let long_value = write_state(vec![StateWrite::put("s/b", "5"), StateWrite::put("k", "123456789")]);
        assert_eq!(
            refused(&mut catalogue, long_value),
            CoreError::LimitExceeded { limit: "limits.state_value_size_max_bytes", value: 9, max: 8 }
        );
        let long_key = write_state(vec![StateWrite::delete("s/b"), StateWrite::put("k".repeat(17), "v")]);
        assert_eq!(
            refused(&mut catalogue, long_key),
            CoreError::LimitExceeded { limit: "limits.state_key_len_max_bytes", value: 17, max: 16 }
        );
        let orphan = write_state(vec![StateWrite::delete("s/b"), StateWrite::put_owned("k", "v", "nope")]);
        assert_eq!(refused(&mut catalogue, orphan), CoreError::NotFound("no queue 'nope' in vhost '/'".into()));
        let elsewhere = MetaCommand::WriteState { vhost: "other".into(), writes: Vec::new(), caps: STATE_CAPS };
        assert_eq!(refused(&mut catalogue, elsewhere), CoreError::NotFound("no vhost 'other'".into()));
        assert_eq!(scan(&catalogue, ""), before, "a refused write changes nothing");

        // At the bound, a write that does not add records passes: a delete and a put, a rewrite.
        ok(&mut catalogue, write_state(vec![StateWrite::delete("s"), StateWrite::put("new", "6")]));
        ok(&mut catalogue, write_state(vec![StateWrite::put("new", "7"), StateWrite::put("new", "8")]));
        assert_eq!(catalogue.state_get(V, "new").map(|v| v.to_vec()), Some(b"8".to_vec()), "the last write wins");
        assert_eq!(catalogue.state_record_count(), 4);
        let reply = run(&mut catalogue, MetaCommand::DeleteStatePrefix { vhost: V.into(), prefix: "s/".into() });
        assert_eq!(reply, MetaReply::StateDeleted(2));
        assert_eq!(scan(&catalogue, ""), [("new".into(), "8".into()), ("r/x".into(), "3".into())]);
        assert_eq!(catalogue.state_record_count(), 2);
        check_invariants(&catalogue);
    }

    #[test]
    fn state_records_go_with_their_owner_queue_and_vhost() {
        let caps = StateCaps { records_max: 100, ..STATE_CAPS };
        let write_state = |writes| MetaCommand::WriteState { vhost: V.into(), writes, caps };
        let mut catalogue = catalogue();
        ok(&mut catalogue, MetaCommand::CreateVhost { name: "other".into() });
        let owner = connection(1, 1, 1);
        for (name, exclusive) in [("deleted", false), ("closed", true), ("stale", true), ("kept", false)] {
            let mut declare = queue(name);
            declare.exclusive = exclusive;
            declare.connection = exclusive.then_some(if name == "stale" { connection(1, 1, 2) } else { owner });
            declare_queue(&mut catalogue, declare);
            ok(&mut catalogue, write_state(vec![StateWrite::put_owned(format!("{name}/1"), "v", name)]));
        }
        // A record moved to another owner follows the new one.
        ok(&mut catalogue, write_state(vec![StateWrite::put_owned("kept/1", "v", "deleted")]));
        ok(&mut catalogue, write_state(vec![StateWrite::put("free", "v")]));
        let keys = |catalogue: &Catalogue| -> Vec<String> { scan(catalogue, "").into_iter().map(|(k, _)| k).collect() };
        let delete =
            MetaCommand::DeleteQueue { vhost: V.into(), name: "deleted".into(), expected_id: None, connection: None };
        ok(&mut catalogue, delete);
        assert_eq!(keys(&catalogue), ["closed/1", "free", "stale/1"]);
        ok(&mut catalogue, MetaCommand::DeleteConnectionQueues { owner });
        assert_eq!(keys(&catalogue), ["free", "stale/1"]);
        ok(&mut catalogue, MetaCommand::DeleteOwnedBy { node: 1, incarnation_below: 2 });
        assert_eq!(keys(&catalogue), ["free"]);
        check_invariants(&catalogue);
        let copy = round_trip(&catalogue);
        assert_eq!(scan(&copy, ""), scan(&catalogue, ""), "records are in the snapshot");
        check_invariants(&copy);

        let other = MetaCommand::WriteState {
            vhost: "other".into(),
            writes: vec![StateWrite::put("free", "o")],
            caps: STATE_CAPS,
        };
        ok(&mut catalogue, other);
        assert_eq!(catalogue.state_get("other", "free").map(|v| v.to_vec()), Some(b"o".to_vec()), "per vhost");
        ok(&mut catalogue, MetaCommand::DeleteVhost { name: V.into() });
        assert_eq!(catalogue.state_record_count(), 1, "the vhost's records went with it");
        assert_eq!(catalogue.state_get(V, "free"), None);
        check_invariants(&catalogue);
    }

    /// A small vocabulary so that random commands collide often.
    const NAMES: [&str; 8] = ["a", "b", "c", "amq.direct", "amq.topic", "amq.fanout", "amq.headers", ""];

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(NAMES.to_vec()).prop_map(String::from)
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["k", "j", "*", "#", "", "$k"]), 1..4).prop_map(|w| w.join("."))
    }

    fn destination() -> impl Strategy<Value = Destination> {
        prop_oneof![name().prop_map(Destination::Queue), name().prop_map(Destination::Exchange)]
    }

    fn arguments() -> impl Strategy<Value = Headers> {
        let condition = prop::option::of(prop::sample::select(vec!["k", "j"]))
            .prop_map(|value| value.map(|v| ("h".to_owned(), text(v))));
        let dollar_rule = prop::option::of(any::<bool>())
            .prop_map(|rule| rule.map(|on| (topic::EXCLUDE_DOLLAR_TOPICS.to_owned(), FieldValue::Bool(on))));
        (condition, dollar_rule).prop_map(|(condition, rule)| Headers(condition.into_iter().chain(rule).collect()))
    }

    fn state_write() -> impl Strategy<Value = StateWrite> {
        let key = prop::sample::select(vec!["a", "ab", "b", "ba"]);
        (key, prop::option::of(prop::sample::select(vec!["1", "2"])), prop::option::of(name()))
            .prop_map(|(key, value, owner)| StateWrite { key: key.into(), value: value.map(bytes::Bytes::from), owner })
    }

    fn binding_spec() -> impl Strategy<Value = BindingSpec> {
        (name(), destination(), pattern(), arguments()).prop_map(|(source, destination, key, arguments)| BindingSpec {
            vhost: V.into(),
            source,
            destination,
            routing_key: key,
            arguments,
        })
    }

    fn command() -> impl Strategy<Value = MetaCommand> {
        let kind = prop::sample::select(vec![
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ]);
        let owner =
            prop::option::of((1u64..3, 1u64..3).prop_map(|(node, incarnation)| connection(node, incarnation, 1)));
        prop_oneof![
            1 => (name(), kind, any::<bool>(), prop::option::of(name())).prop_map(|(name, kind, auto_delete, ae)| {
                let mut declare = exchange(&name, kind);
                declare.auto_delete = auto_delete;
                if let Some(ae) = ae {
                    declare.arguments.push("alternate-exchange", ae);
                }
                MetaCommand::DeclareExchange(declare)
            }),
            1 => (name(), any::<bool>())
                .prop_map(|(name, if_unused)| MetaCommand::DeleteExchange { vhost: V.into(), name, if_unused }),
            1 => (name(), owner).prop_map(|(name, owner)| {
                let mut declare = queue(&name);
                declare.exclusive = owner.is_some();
                declare.connection = owner;
                MetaCommand::DeclareQueue(declare)
            }),
            1 => name().prop_map(|name| MetaCommand::DeleteQueue {
                vhost: V.into(),
                name,
                expected_id: None,
                connection: None
            }),
            3 => binding_spec().prop_map(|binding| MetaCommand::Bind { binding, connection: None }),
            1 => binding_spec().prop_map(|binding| MetaCommand::Unbind { binding, connection: None }),
            1 => (1u64..3, 1u64..4)
                .prop_map(|(node, incarnation_below)| MetaCommand::DeleteOwnedBy { node, incarnation_below }),
            2 => prop::collection::vec(state_write(), 1..4).prop_map(write_state),
            1 => prop::sample::select(vec!["", "a", "b", "ab"])
                .prop_map(|prefix| MetaCommand::DeleteStatePrefix { vhost: V.into(), prefix: prefix.into() }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Random command sequences never panic, keep every index consistent, and a restored copy
        /// (indexes rebuilt from scratch) routes exactly as the live one (indexes kept up to date
        /// incrementally).
        #[test]
        fn random_commands_keep_the_catalogue_consistent(
            commands in prop::collection::vec(command(), 1..60),
            keys in prop::collection::vec(pattern(), 1..6),
        ) {
            let mut catalogue = catalogue();
            for command in commands {
                run(&mut catalogue, command);
                check_invariants(&catalogue);
                // Route through every exchange so that each one's index is built as soon as it
                // exists and later commands must keep it up to date.
                for name in NAMES {
                    let _ = catalogue.route(V, name, "k", &Headers::new());
                }
            }
            let copy = round_trip(&catalogue);
            check_invariants(&copy);
            prop_assert_eq!(
                catalogue.state_scan(V, "").collect::<Vec<_>>(),
                copy.state_scan(V, "").collect::<Vec<_>>()
            );
            let message = Headers(vec![("h".to_owned(), text("k"))]);
            for exchange in NAMES {
                for key in &keys {
                    prop_assert_eq!(
                        catalogue.route(V, exchange, key, &message),
                        copy.route(V, exchange, key, &message)
                    );
                }
            }
        }
    }
}
