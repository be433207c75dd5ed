//! Settings of the `wharf` binary, layered lowest first: built-in defaults, an optional TOML file,
//! `WHARF__SECTION__KEY` environment variables, then command-line flags. This module is the only
//! place in the workspace that reads configuration (files and the environment); it hands the core
//! a plain `CoreConfig` and touches nothing else.
//!
//! Every section is a typed struct with `deny_unknown_fields`, so a misspelt key is refused at
//! start-up instead of being silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;
use wharf_amqp::AmqpConfig;
use wharf_core::alarms::AlarmConfig;
use wharf_core::{CoreConfig, Limits, StorageKind};
use wharf_mqtt::MqttConfig;
use wharf_native::NativeConfig;

/// Prefix of environment variables read as settings: `WHARF__CORE__SHARD_COUNT=8` sets
/// `core.shard_count`. The double underscore separates the prefix, the section and the key, because
/// keys themselves contain single underscores.
pub const ENV_PREFIX: &str = "WHARF";

/// Separator between the prefix, the section and the key in an environment variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Data directory used when none is configured: relative to the working directory.
pub const DATA_DIR_DEFAULT: &str = "./data";

/// Admin HTTP listen address used when none is configured (see the ports in the design overview).
pub const ADMIN_LISTEN_DEFAULT: &str = "0.0.0.0:15672";

/// Log filter used when none is configured and `RUST_LOG` is unset: `info`, except for openraft and
/// lsm-tree, which log every election and flush at `info` (one line per shard each).
pub const LOG_LEVEL_DEFAULT: &str = "info,openraft=warn,lsm_tree=warn";

/// Why the settings were refused. Either way the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read or parsed, or a value has the wrong type or an unknown key
    /// (reported by the `config` crate, whose message names the key and where it came from).
    #[error("{0}")]
    Source(#[from] config::ConfigError),
    /// Every value parsed but one is out of range or inconsistent with another.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key, `section.key`, as written in the file.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

/// All settings of a node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[node]`: identity and storage.
    pub node: NodeSettings,
    /// `[core]`: Raft groups and timing.
    pub core: CoreSettings,
    /// `[limits]`: the core's limits, one key per field of `wharf_core::Limits`.
    pub limits: LimitsSettings,
    /// `[admin]`: the admin HTTP endpoint.
    pub admin: AdminSettings,
    /// `[listeners]`: the protocol listeners.
    pub listeners: ListenerSettings,
    /// `[mqtt]`: the MQTT front-end's behaviour and limits.
    pub mqtt: MqttConfig,
    /// `[amqp]`: the AMQP 0-9-1 front-end's behaviour and limits.
    pub amqp: AmqpConfig,
    /// `[native]`: the native gRPC front-end's limits.
    pub native: NativeConfig,
    /// `[alarms]`: memory and disk alarms (publishers are held back while one is raised).
    pub alarms: AlarmConfig,
    /// `[cluster]`: the nodes of the cluster (none: a single node).
    pub cluster: ClusterSettings,
    /// `[log]`: logging.
    pub log: LogSettings,
}

/// `[node]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// This node's id in the cluster; fixed at first start (a data directory written under another
    /// id is refused).
    pub id: u64,
    /// Directory holding the database and snapshots.
    pub data_dir: PathBuf,
    /// Storage backend: `fjall` (on disk) or `memory` (nothing survives the process).
    pub storage: StorageKind,
}

impl Default for NodeSettings {
    fn default() -> Self {
        let core = CoreConfig::single_node(DATA_DIR_DEFAULT);
        Self { id: core.node_id, data_dir: core.data_dir, storage: core.storage }
    }
}

/// `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Every node of the cluster, this one included, as `ID@HOST:PORT`: its `node.id` and the
    /// address of its `listeners.cluster` as the others reach it. Empty: a single node. Used to
    /// form the Raft groups on first start; the same list on every node. Afterwards the groups'
    /// stored members win (they change with `wharf cluster join|leave`), as long as the list
    /// still names one of them besides this node.
    pub peers: Vec<String>,
    /// This node joins a running cluster: on first start it forms no group and waits until
    /// `wharf cluster join` (on a node of the cluster) adds it. Its `peers` must list itself.
    pub join: bool,
    /// Largest Raft message or forwarded batch between nodes, bytes.
    pub message_size_max_bytes: u64,
}

/// Default of `cluster.message_size_max_bytes`: room for a batch of `limits.batch_bytes_max`
/// (16 MiB) entries, several to an append.
const CLUSTER_MESSAGE_SIZE_MAX_BYTES_DEFAULT: u64 = 64 << 20;

impl Default for ClusterSettings {
    fn default() -> Self {
        Self { peers: Vec::new(), join: false, message_size_max_bytes: CLUSTER_MESSAGE_SIZE_MAX_BYTES_DEFAULT }
    }
}

impl ClusterSettings {
    /// The peers by node id, or why one is malformed (`None`: a single node).
    pub fn voters(&self) -> Result<Option<BTreeMap<u64, String>>, String> {
        if self.peers.is_empty() {
            return Ok(None);
        }
        let mut voters = BTreeMap::new();
        for peer in &self.peers {
            let malformed = || format!("{peer:?} is not ID@HOST:PORT, such as 2@10.0.0.2:7655");
            let (id, address) = peer.split_once('@').ok_or_else(malformed)?;
            let id: u64 = id.trim().parse().map_err(|_| malformed())?;
            let (host, port) = address.rsplit_once(':').ok_or_else(malformed)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(malformed());
            }
            if voters.insert(id, address.to_owned()).is_some() {
                return Err(format!("node {id} is listed twice"));
            }
        }
        Ok(Some(voters))
    }
}

/// `[core]` section: the non-limit fields of `CoreConfig`, same names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoreSettings {
    /// Number of shard Raft groups; fixed at first start.
    pub shard_count: u32,
    /// Applied entries between snapshots (bounds log size on disk).
    pub snapshot_logs_since_last: u64,
    /// Raft heartbeat interval, milliseconds.
    pub raft_heartbeat_interval_ms: u64,
    /// Raft election timeout lower bound, milliseconds.
    pub raft_election_timeout_min_ms: u64,
    /// How long a leader waits for a follower to take one piece of a snapshot, milliseconds.
    pub raft_install_snapshot_timeout_ms: u64,
    /// Interval of the leader's time tick (TTLs, delays, expiry), milliseconds.
    pub tick_interval_ms: u64,
}

impl Default for CoreSettings {
    fn default() -> Self {
        // The core's single-node configuration is the one source of these defaults.
        let core = CoreConfig::single_node(DATA_DIR_DEFAULT);
        Self {
            shard_count: core.shard_count,
            snapshot_logs_since_last: core.snapshot_logs_since_last,
            raft_heartbeat_interval_ms: core.raft_heartbeat_interval_ms,
            raft_election_timeout_min_ms: core.raft_election_timeout_min_ms,
            raft_install_snapshot_timeout_ms: core.raft_install_snapshot_timeout_ms,
            tick_interval_ms: core.tick_interval_ms,
        }
    }
}

/// Declares `LimitsSettings` as a mirror of `wharf_core::Limits` (which does not refuse unknown keys)
/// together with the conversions both ways and the commented lines of `wharf config default`. The
/// conversions name every field without `..`, so a field added to `Limits` fails to compile here
/// until it is added to this list too.
macro_rules! limits_settings {
    ($($field:ident: $type:ty => $doc:literal,)+) => {
        /// `[limits]` section: every field of `wharf_core::Limits`, same names and units.
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct LimitsSettings {
            $(
                #[doc = $doc]
                pub $field: $type,
            )+
        }

        impl From<Limits> for LimitsSettings {
            fn from(limits: Limits) -> Self {
                let Limits { $($field),+ } = limits;
                Self { $($field),+ }
            }
        }

        impl From<LimitsSettings> for Limits {
            fn from(settings: LimitsSettings) -> Self {
                let LimitsSettings { $($field),+ } = settings;
                Self { $($field),+ }
            }
        }

        impl LimitsSettings {
            fn write_toml(&self, out: &mut String) {
                $(entry(out, $doc, stringify!($field), self.$field);)+
            }
        }
    };
}

limits_settings! {
    message_size_max_bytes: u64 => "Largest message payload accepted, in bytes.",
    name_len_max_bytes: u32 => "Longest exchange, queue, vhost or routing key name, in bytes (at most 255).",
    binding_key_len_max_bytes: u32 => "Longest binding key (topic pattern), in bytes (MQTT topic filters can be 65,535).",
    queue_messages_max: u64 => "Most messages held by one queue partition when the queue sets no x-max-length.",
    queue_bytes_max: u64 => "Most payload bytes held by one queue partition when the queue sets no x-max-length-bytes.",
    consumer_inflight_max: u32 => "Most unacknowledged deliveries one consumer may hold on one partition.",
    consumers_per_queue_max: u32 => "Most consumers attached to one queue partition.",
    batch_commands_max: u32 => "Most commands packed into one Raft entry by group commit.",
    batch_bytes_max: u64 => "Most payload bytes packed into one Raft entry (at least message_size_max_bytes).",
    pipeline_entries_max: u32 => "Most Raft entries proposed but not yet committed per group.",
    pending_requests_max: u32 => "Most requests waiting for a shard's group commit before callers get Overloaded.",
    queues_max: u32 => "Most queues in the catalogue.",
    exchanges_max: u32 => "Most exchanges in the catalogue.",
    bindings_max: u32 => "Most bindings in the catalogue.",
    partitions_per_queue_max: u32 => "Most partitions of one queue.",
    delay_max_ms: u64 => "Longest delivery delay accepted, in milliseconds.",
    idempotency_window_ms: u64 => "How long an idempotency key is remembered after its message was committed (default for queues without x-idempotency-window-ms), in milliseconds.",
    idempotency_keys_max: u64 => "Most idempotency keys remembered per queue partition (the oldest are forgotten first).",
    idempotency_key_bytes_max: u64 => "Most bytes of idempotency keys remembered per queue partition.",
    idempotency_key_len_max_bytes: u32 => "Longest idempotency key accepted, in bytes.",
    txn_timeout_ms: u64 => "Time a multi-shard transaction has to reach its commit decision, in milliseconds.",
    txn_operations_max: u32 => "Most operations (publishes and acknowledgements) in one transaction.",
    half_message_check_interval_ms: u64 => "How often the producer of an undecided half message is asked for its outcome (check-back), in milliseconds.",
    half_message_age_max_ms: u64 => "Age after which an undecided half message is rolled back, in milliseconds.",
    state_key_len_max_bytes: u32 => "Longest front-end state record key (MQTT sessions, retained messages), in bytes.",
    state_value_size_max_bytes: u64 => "Largest front-end state record value, in bytes (at least message_size_max_bytes).",
    state_records_max: u64 => "Most front-end state records on the node, all vhosts together.",
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Limits::default().into()
    }
}

/// `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub listen: SocketAddr,
    /// Take membership changes (`POST /cluster/join`, `/cluster/leave`) from other hosts too,
    /// not only from this one. The endpoint has no authentication yet: only on a trusted network.
    pub remote_changes: bool,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: ADMIN_LISTEN_DEFAULT.parse().expect("the default admin address is valid"),
            remote_changes: false,
        }
    }
}

/// `[listeners]` section: where the protocols listen. An empty address turns a listener off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerSettings {
    /// MQTT over TCP.
    pub mqtt: String,
    /// MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`).
    pub mqtt_ws: String,
    /// MQTT over TLS; started only when `tls_cert_file` is set.
    pub mqtt_tls: String,
    /// AMQP 0-9-1 over TCP (`[::]` listens on IPv6 and IPv4).
    pub amqp: String,
    /// AMQP 0-9-1 over TLS; started only when `tls_cert_file` is set.
    pub amqp_tls: String,
    /// The native gRPC API (HTTP/2); TLS (ALPN h2) when `tls_cert_file` is set.
    pub native: String,
    /// Raft and forwarded requests between the nodes of a cluster (gRPC); started only when
    /// `cluster.peers` is set.
    pub cluster: String,
    /// PEM certificate chain of the TLS listeners ("" for no TLS).
    pub tls_cert_file: String,
    /// PEM private key of the TLS listeners.
    pub tls_key_file: String,
    /// PEM CA certificates that client certificates must chain to; when set, TLS clients must
    /// present one (mTLS).
    pub tls_client_ca_file: String,
    /// Most client connections open at once over all listeners; more are closed on accept.
    pub connections_max: u32,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        Self {
            mqtt: "0.0.0.0:1883".into(),
            mqtt_ws: "0.0.0.0:8083".into(),
            mqtt_tls: "0.0.0.0:8883".into(),
            amqp: "[::]:5672".into(),
            amqp_tls: "[::]:5671".into(),
            native: "[::]:7654".into(),
            cluster: "0.0.0.0:7655".into(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
            connections_max: 100_000,
        }
    }
}

/// `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a `tracing` filter such as
    /// `info,wharf_core=debug`. `RUST_LOG`, when set, replaces it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { level: LOG_LEVEL_DEFAULT.into() }
    }
}

/// Values given as command-line flags: the highest layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

impl Settings {
    /// Load the settings: defaults, then `file` if given (it must exist), then the environment,
    /// then `overrides`; then validate them, core settings included.
    ///
    /// `env` replaces the process environment when given, so tests need not mutate it.
    pub fn load(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
        overrides: &Overrides,
    ) -> Result<Self, SettingsError> {
        let mut builder = Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX).prefix_separator(ENV_SEPARATOR).separator(ENV_SEPARATOR).source(env),
        );
        let mut settings: Self = builder.build()?.try_deserialize()?;
        settings.apply(overrides);
        settings.validate()?;
        Ok(settings)
    }

    fn apply(&mut self, overrides: &Overrides) {
        if let Some(data_dir) = &overrides.data_dir {
            self.node.data_dir.clone_from(data_dir);
        }
        if let Some(listen) = overrides.admin_listen {
            self.admin.listen = listen;
        }
        if let Some(level) = &overrides.log_level {
            self.log.level.clone_from(level);
        }
    }

    /// Check the values the types alone do not: the log filter and everything `CoreConfig` checks.
    pub fn validate(&self) -> Result<(), SettingsError> {
        validate_log_level(&self.log.level)
            .map_err(|reason| SettingsError::Invalid { key: "log.level".into(), reason })?;
        self.validate_listeners()?;
        self.mqtt
            .validate()
            .map_err(|(key, reason)| SettingsError::Invalid { key: key.into(), reason: reason.into() })?;
        self.amqp
            .validate()
            .map_err(|(key, reason)| SettingsError::Invalid { key: key.into(), reason: reason.into() })?;
        self.native
            .validate()
            .map_err(|(key, reason)| SettingsError::Invalid { key: key.into(), reason: reason.into() })?;
        self.validate_cluster()?;
        self.core_config()
            .validate()
            .map_err(|error| SettingsError::Invalid { key: settings_key(error.key), reason: error.reason })
    }

    fn validate_cluster(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, reason: String| SettingsError::Invalid { key: key.into(), reason };
        let Some(voters) = self.cluster.voters().map_err(|reason| invalid("cluster.peers", reason))? else {
            if self.cluster.join {
                return Err(invalid("cluster.join", "a node joining a cluster needs cluster.peers".into()));
            }
            return Ok(());
        };
        if !voters.contains_key(&self.node.id) {
            let ids: Vec<_> = voters.keys().collect();
            return Err(invalid("cluster.peers", format!("this node's id {} is not among {ids:?}", self.node.id)));
        }
        if self.listeners.cluster.is_empty() {
            return Err(invalid("listeners.cluster", "a node of a cluster needs its cluster listener".into()));
        }
        if self.cluster.message_size_max_bytes < 1 << 20 {
            return Err(invalid("cluster.message_size_max_bytes", "must be at least 1048576 (1 MiB)".into()));
        }
        Ok(())
    }

    fn validate_listeners(&self) -> Result<(), SettingsError> {
        let listeners = &self.listeners;
        for (key, address) in [
            ("listeners.mqtt", &listeners.mqtt),
            ("listeners.mqtt_ws", &listeners.mqtt_ws),
            ("listeners.mqtt_tls", &listeners.mqtt_tls),
            ("listeners.amqp", &listeners.amqp),
            ("listeners.amqp_tls", &listeners.amqp_tls),
            ("listeners.native", &listeners.native),
            ("listeners.cluster", &listeners.cluster),
        ] {
            if !address.is_empty() && address.parse::<SocketAddr>().is_err() {
                return Err(SettingsError::Invalid {
                    key: key.into(),
                    reason: format!("{address:?} is not an address such as 0.0.0.0:1883 (or \"\" for off)"),
                });
            }
        }
        if listeners.tls_cert_file.is_empty() != listeners.tls_key_file.is_empty() {
            return Err(SettingsError::Invalid {
                key: "listeners.tls_key_file".into(),
                reason: "tls_cert_file and tls_key_file are set together".into(),
            });
        }
        if !listeners.tls_client_ca_file.is_empty() && listeners.tls_cert_file.is_empty() {
            return Err(SettingsError::Invalid {
                key: "listeners.tls_client_ca_file".into(),
                reason: "needs tls_cert_file and tls_key_file".into(),
            });
        }
        if listeners.connections_max == 0 {
            return Err(SettingsError::Invalid {
                key: "listeners.connections_max".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The core's configuration.
    pub fn core_config(&self) -> CoreConfig {
        // A struct literal without `..`: a field added to `CoreConfig` must be mapped here.
        CoreConfig {
            node_id: self.node.id,
            data_dir: self.node.data_dir.clone(),
            storage: self.node.storage,
            shard_count: self.core.shard_count,
            snapshot_logs_since_last: self.core.snapshot_logs_since_last,
            raft_heartbeat_interval_ms: self.core.raft_heartbeat_interval_ms,
            raft_election_timeout_min_ms: self.core.raft_election_timeout_min_ms,
            raft_install_snapshot_timeout_ms: self.core.raft_install_snapshot_timeout_ms,
            tick_interval_ms: self.core.tick_interval_ms,
            limits: self.limits.clone().into(),
            alarms: self.alarms.clone(),
        }
    }
}

/// A bare word is a target name to `tracing`'s filter syntax, so a misspelt level (`debgu`) would
/// silently select the logs of a target called `debgu`: bare words must be levels.
fn validate_log_level(level: &str) -> Result<(), String> {
    let is_bare_word = !level.contains(['=', ',', '[', ':']);
    if is_bare_word {
        return level
            .trim()
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .map(drop)
            .map_err(|_| "must be one of off, error, warn, info, debug, trace, or a filter with `=`".into());
    }
    tracing_subscriber::EnvFilter::builder().parse(level).map(drop).map_err(|error| error.to_string())
}

/// Maps a key named by `CoreConfig::validate` (relative to `CoreConfig`) to the key in the file.
fn settings_key(core_key: &str) -> String {
    match core_key {
        "node_id" => "node.id".into(),
        "data_dir" => "node.data_dir".into(),
        "storage" => "node.storage".into(),
        key if key.starts_with("limits.") || key.starts_with("alarms.") => key.into(),
        key => format!("core.{key}"),
    }
}

/// The commented default configuration file printed by `wharf config default`. It parses back to
/// `Settings::default()`.
pub fn default_file() -> String {
    let settings = Settings::default();
    let mut out = String::new();
    out.push_str(
        "# Wharf configuration. Every key is shown with its default value.\n\
         #\n\
         # Layers, lowest first: these defaults, this file (wharf serve --config FILE), environment\n\
         # variables WHARF__SECTION__KEY (e.g. WHARF__CORE__SHARD_COUNT=8), then command-line flags\n\
         # (--data-dir, --admin-listen, --log-level). Unknown keys are refused.\n",
    );

    section(&mut out, "node");
    entry(
        &mut out,
        "This node's id in the cluster; fixed at first start (a data directory written under another id is refused).",
        "id",
        settings.node.id,
    );
    entry(
        &mut out,
        "Directory of the database and snapshots.",
        "data_dir",
        toml_string(&settings.node.data_dir.to_string_lossy()),
    );
    entry(
        &mut out,
        "Storage backend: \"fjall\" (on disk) or \"memory\" (nothing survives the process).",
        "storage",
        toml_string(storage_name(settings.node.storage)),
    );

    section(&mut out, "core");
    let core = &settings.core;
    entry(
        &mut out,
        "Number of shard Raft groups. Fixed at first start: changing it later is refused.",
        "shard_count",
        core.shard_count,
    );
    entry(
        &mut out,
        "Applied entries after which a snapshot is taken and the log before it purged.",
        "snapshot_logs_since_last",
        core.snapshot_logs_since_last,
    );
    entry(
        &mut out,
        "Raft heartbeat interval, milliseconds.",
        "raft_heartbeat_interval_ms",
        core.raft_heartbeat_interval_ms,
    );
    entry(
        &mut out,
        "Raft election timeout lower bound, milliseconds (the upper bound is twice this).",
        "raft_election_timeout_min_ms",
        core.raft_election_timeout_min_ms,
    );
    entry(
        &mut out,
        "How long a leader waits for a follower to take one piece of a snapshot, milliseconds.",
        "raft_install_snapshot_timeout_ms",
        core.raft_install_snapshot_timeout_ms,
    );
    entry(
        &mut out,
        "How often the leader advances time for TTLs, delays and expiry, milliseconds.",
        "tick_interval_ms",
        core.tick_interval_ms,
    );

    section(&mut out, "limits");
    settings.limits.write_toml(&mut out);

    section(&mut out, "admin");
    entry(
        &mut out,
        "Admin HTTP address: /healthz, /readyz, /metrics (Prometheus), /cluster and the cluster's\n\
         membership changes (POST /cluster/join, /cluster/leave).",
        "listen",
        toml_string(&settings.admin.listen.to_string()),
    );
    entry(
        &mut out,
        "Take membership changes from other hosts too, not only from this one. The endpoint has no\n\
         authentication yet: only on a trusted network.",
        "remote_changes",
        settings.admin.remote_changes,
    );

    section(&mut out, "listeners");
    let listeners = &settings.listeners;
    entry(&mut out, "MQTT over TCP (\"\" turns a listener off).", "mqtt", toml_string(&listeners.mqtt));
    entry(&mut out, "MQTT over WebSocket: path /mqtt, subprotocol mqtt.", "mqtt_ws", toml_string(&listeners.mqtt_ws));
    entry(&mut out, "AMQP 0-9-1 over TCP ([::] listens on IPv6 and IPv4).", "amqp", toml_string(&listeners.amqp));
    entry(
        &mut out,
        "AMQP 0-9-1 over TLS; started only when tls_cert_file is set.",
        "amqp_tls",
        toml_string(&listeners.amqp_tls),
    );
    entry(
        &mut out,
        "MQTT over TLS; started only when tls_cert_file is set.",
        "mqtt_tls",
        toml_string(&listeners.mqtt_tls),
    );
    entry(
        &mut out,
        "The native gRPC API (HTTP/2); TLS (ALPN h2) when tls_cert_file is set.",
        "native",
        toml_string(&listeners.native),
    );
    entry(
        &mut out,
        "Raft and forwarded requests between cluster nodes (gRPC); started only when cluster.peers is set.",
        "cluster",
        toml_string(&listeners.cluster),
    );
    entry(
        &mut out,
        "PEM certificate chain of the TLS listeners.",
        "tls_cert_file",
        toml_string(&listeners.tls_cert_file),
    );
    entry(&mut out, "PEM private key of the TLS listeners.", "tls_key_file", toml_string(&listeners.tls_key_file));
    entry(
        &mut out,
        "PEM CA certificates client certificates must chain to; when set, clients must present one (mTLS).",
        "tls_client_ca_file",
        toml_string(&listeners.tls_client_ca_file),
    );
    entry(
        &mut out,
        "Most client connections open at once over all listeners.",
        "connections_max",
        listeners.connections_max,
    );

    section(&mut out, "cluster");
    entry(
        &mut out,
        "Every node of the cluster, this one included, as \"ID@HOST:PORT\" (its node.id and the address\n\
         its listeners.cluster is reached at); the same list on every node. Empty: a single node.\n\
         Forms the groups on first start; then the stored members (wharf cluster join|leave) win.",
        "peers",
        "[]",
    );
    entry(
        &mut out,
        "This node joins a running cluster: on first start it forms no group and waits until\n\
         `wharf cluster join` on a node of the cluster adds it (peers must list this node).",
        "join",
        settings.cluster.join,
    );
    entry(
        &mut out,
        "Largest Raft message or forwarded batch between nodes, bytes.",
        "message_size_max_bytes",
        settings.cluster.message_size_max_bytes,
    );

    section(&mut out, "mqtt");
    let mqtt = &settings.mqtt;
    entry(&mut out, "Virtual host MQTT clients live in.", "vhost", toml_string(&mqtt.vhost));
    entry(
        &mut out,
        "Topic exchange whose routing keys MQTT topics are (shared with AMQP).",
        "exchange",
        toml_string(&mqtt.exchange),
    );
    entry(
        &mut out,
        "Largest packet accepted from a client, bytes (announced as Maximum Packet Size).",
        "packet_size_max_bytes",
        mqtt.packet_size_max_bytes,
    );
    entry(
        &mut out,
        "Time a new connection has to send CONNECT, seconds.",
        "connect_timeout_secs",
        mqtt.connect_timeout_secs,
    );
    entry(
        &mut out,
        "Largest Keep Alive allowed, seconds; MQTT 5 clients asking more (or 0) get it as Server Keep Alive. 0: no maximum.",
        "keep_alive_max_secs",
        mqtt.keep_alive_max_secs,
    );
    entry(
        &mut out,
        "Largest Session Expiry Interval, seconds (MQTT 3.1.1 persistent sessions get it).",
        "session_expiry_max_secs",
        mqtt.session_expiry_max_secs,
    );
    entry(
        &mut out,
        "QoS 1/2 PUBLISHes a client may have unacknowledged towards the server (Receive Maximum).",
        "receive_maximum",
        mqtt.receive_maximum,
    );
    entry(
        &mut out,
        "QoS 1/2 PUBLISHes the server keeps unacknowledged towards one client.",
        "inflight_max",
        mqtt.inflight_max,
    );
    entry(
        &mut out,
        "Topic aliases a client may use towards the server (Topic Alias Maximum).",
        "topic_alias_max",
        mqtt.topic_alias_max,
    );
    entry(
        &mut out,
        "Longest client identifier, bytes (23 to 200).",
        "client_id_len_max_bytes",
        mqtt.client_id_len_max_bytes,
    );
    entry(
        &mut out,
        "Most subscriptions of one session.",
        "subscriptions_per_session_max",
        mqtt.subscriptions_per_session_max,
    );
    entry(
        &mut out,
        "Most messages queued for one session; more are dropped.",
        "session_queue_messages_max",
        mqtt.session_queue_messages_max,
    );
    entry(&mut out, "Most retained messages.", "retained_messages_max", mqtt.retained_messages_max);
    entry(
        &mut out,
        "Interval of $SYS/broker statistics, seconds (0: off).",
        "sys_interval_secs",
        mqtt.sys_interval_secs,
    );

    section(&mut out, "amqp");
    let amqp = &settings.amqp;
    entry(
        &mut out,
        "Largest frame, bytes (negotiated down by clients; checked before buffering).",
        "frame_max_bytes",
        amqp.frame_max_bytes,
    );
    entry(&mut out, "Most channels per connection (negotiated down by clients).", "channel_max", amqp.channel_max);
    entry(&mut out, "Heartbeat interval offered, seconds (0: none).", "heartbeat_secs", amqp.heartbeat_secs);
    entry(
        &mut out,
        "Time a new connection has to finish the handshake, seconds.",
        "connect_timeout_secs",
        amqp.connect_timeout_secs,
    );
    entry(
        &mut out,
        "User name accepted (PLAIN, AMQPLAIN) until users are configurable.",
        "default_user",
        toml_string(&amqp.default_user),
    );
    entry(&mut out, "Its password.", "default_pass", toml_string(&amqp.default_pass));
    entry(
        &mut out,
        "Where a publish's idempotency key comes from: \"header\" (x-idempotency-key),\n\
         \"message-id\", \"header-or-message-id\" or \"none\". Per vhost, add a table:\n\
         [amqp.idempotency_key_by_vhost]\n\
         \"/payments\" = \"message-id\"",
        "idempotency_key",
        toml_string(amqp.idempotency_key.as_str()),
    );

    section(&mut out, "native");
    let native = &settings.native;
    entry(
        &mut out,
        "Largest gRPC message accepted or sent, bytes (refused before decoding).",
        "grpc_message_size_max_bytes",
        native.grpc_message_size_max_bytes,
    );
    entry(
        &mut out,
        "Concurrent calls per connection (HTTP/2 max concurrent streams).",
        "streams_per_connection_max",
        native.streams_per_connection_max,
    );
    entry(&mut out, "Messages in one PublishBatch call.", "batch_messages_max", native.batch_messages_max);
    entry(
        &mut out,
        "Transactions begun and not finished on this node, all clients together.",
        "transactions_open_max",
        native.transactions_open_max,
    );
    entry(
        &mut out,
        "Seconds an open (not prepared) transaction may go without a call before it is discarded.",
        "txn_idle_secs",
        native.txn_idle_secs,
    );
    entry(
        &mut out,
        "Deliveries a consumer may be granted and not yet sent.",
        "consumer_credit_max",
        native.consumer_credit_max,
    );
    entry(&mut out, "HTTP/2 keepalive ping interval, seconds (0: none).", "keepalive_secs", native.keepalive_secs);
    entry(
        &mut out,
        "Time a client has to answer a keepalive ping, seconds.",
        "keepalive_timeout_secs",
        native.keepalive_timeout_secs,
    );

    section(&mut out, "alarms");
    let alarms = &settings.alarms;
    entry(
        &mut out,
        "Resident memory at which the memory alarm is raised, bytes\n\
         (0: 40% of physical memory, as RabbitMQ; 18446744073709551615: never).",
        "memory_high_watermark_bytes",
        alarms.memory_high_watermark_bytes,
    );
    entry(
        &mut out,
        "Free space of the data directory's file system below which the disk alarm is raised,\n\
         bytes (0: never).",
        "disk_free_min_bytes",
        alarms.disk_free_min_bytes,
    );
    entry(&mut out, "How often both are measured, milliseconds.", "check_interval_ms", alarms.check_interval_ms);

    section(&mut out, "log");
    entry(
        &mut out,
        "Level (error, warn, info, debug, trace) or a filter such as \"info,wharf_core=debug\".\n\
         The default quietens openraft and lsm_tree, which log every election and flush at info.\n\
         RUST_LOG, when set, replaces it.",
        "level",
        toml_string(&settings.log.level),
    );
    out
}

/// The name of a storage backend as written in the configuration.
pub fn storage_name(storage: StorageKind) -> &'static str {
    match storage {
        StorageKind::Fjall => "fjall",
        StorageKind::Memory => "memory",
    }
}

fn section(out: &mut String, name: &str) {
    let _ = write!(out, "\n[{name}]\n");
}

fn entry(out: &mut String, doc: &str, key: &str, value: impl std::fmt::Display) {
    for line in doc.lines() {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "{key} = {value}");
}

/// A TOML basic string: quoted, with backslashes, quotes and control characters escaped.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), contents).expect("write config");
        file
    }

    fn load_error(file: Option<&str>, env_pairs: &[(&str, &str)]) -> String {
        let file = file.map(write_file);
        Settings::load(file.as_ref().map(|f| f.path()), env(env_pairs), &Overrides::default())
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn no_sources_gives_defaults() {
        let settings = Settings::load(None, env(&[]), &Overrides::default()).expect("defaults load");
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.node.data_dir, Path::new("./data"));
        assert_eq!(settings.admin.listen.to_string(), "0.0.0.0:15672");
        assert_eq!(settings.log.level, "info,openraft=warn,lsm_tree=warn");
        assert_eq!(Limits::from(settings.limits), Limits::default());
    }

    #[test]
    fn default_file_parses_back_to_the_defaults() {
        let file = write_file(&default_file());
        let settings = Settings::load(Some(file.path()), env(&[]), &Overrides::default()).expect("default file loads");
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn default_file_has_every_limit() {
        let text = default_file();
        for key in ["message_size_max_bytes", "batch_bytes_max", "delay_max_ms", "partitions_per_queue_max"] {
            assert!(text.contains(&format!("\n{key} = ")), "{key} missing from the default file");
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let file = write_file(
            "[node]\nid = 7\ndata_dir = \"/from/file\"\n[core]\nshard_count = 8\n\
             [limits]\nqueues_max = 10\n[log]\nlevel = \"warn\"\n",
        );
        let env = env(&[
            ("WHARF__CORE__SHARD_COUNT", "16"),
            ("WHARF__NODE__DATA_DIR", "/from/env"),
            ("WHARF__LIMITS__EXCHANGES_MAX", "20"),
            ("WHARF__ADMIN__LISTEN", "127.0.0.1:9000"),
            ("UNRELATED__CORE__SHARD_COUNT", "99"),
        ]);
        let overrides =
            Overrides { data_dir: Some("/from/flag".into()), admin_listen: None, log_level: Some("debug".into()) };
        let settings = Settings::load(Some(file.path()), env, &overrides).expect("loads");
        assert_eq!(settings.node.id, 7, "file over default");
        assert_eq!(settings.core.shard_count, 16, "env over file");
        assert_eq!(settings.limits.queues_max, 10, "file over default");
        assert_eq!(settings.limits.exchanges_max, 20, "env over default");
        assert_eq!(settings.node.data_dir, Path::new("/from/flag"), "flag over env over file");
        assert_eq!(settings.admin.listen.to_string(), "127.0.0.1:9000", "env over default");
        assert_eq!(settings.log.level, "debug", "flag over file");
        assert_eq!(settings.core.tick_interval_ms, CoreSettings::default().tick_interval_ms);

        let core = settings.core_config();
        assert_eq!((core.node_id, core.shard_count, core.limits.queues_max), (7, 16, 10));
    }

    #[test]
    fn env_keys_are_case_insensitive_and_strings_stay_strings() {
        let env = env(&[("wharf__node__data_dir", "1234"), ("WHARF__NODE__STORAGE", "memory")]);
        let settings = Settings::load(None, env, &Overrides::default()).expect("loads");
        assert_eq!(settings.node.data_dir, Path::new("1234"));
        assert_eq!(settings.node.storage, StorageKind::Memory);
    }

    #[test]
    fn unknown_key_in_file_is_refused_with_its_name() {
        let error = load_error(Some("[core]\nshard_cont = 8\n"), &[]);
        assert!(error.contains("shard_cont"), "{error}");
        let error = load_error(Some("[nodes]\nid = 1\n"), &[]);
        assert!(error.contains("nodes"), "{error}");
    }

    #[test]
    fn unknown_key_in_env_is_refused_with_its_name() {
        let error = load_error(None, &[("WHARF__LIMITS__QUEUES_MAXX", "5")]);
        assert!(error.contains("queues_maxx"), "{error}");
    }

    #[test]
    fn wrong_type_is_refused_with_its_key() {
        let error = load_error(None, &[("WHARF__CORE__SHARD_COUNT", "many")]);
        assert!(error.contains("core.shard_count"), "{error}");
        let error = load_error(Some("[node]\nstorage = \"rocks\"\n"), &[]);
        assert!(error.contains("rocks"), "{error}");
        let error = load_error(Some("[admin]\nlisten = \"nowhere\"\n"), &[]);
        assert!(error.contains("admin.listen"), "{error}");
    }

    #[test]
    fn core_validation_names_the_key_in_the_file() {
        let error = load_error(None, &[("WHARF__CORE__SHARD_COUNT", "0")]);
        assert!(error.starts_with("core.shard_count: "), "{error}");
        let error = load_error(Some("[limits]\nbatch_bytes_max = 1024\n"), &[]);
        assert!(error.starts_with("limits.batch_bytes_max: "), "{error}");
        let error =
            load_error(Some("[core]\nraft_heartbeat_interval_ms = 500\nraft_election_timeout_min_ms = 500\n"), &[]);
        assert!(error.starts_with("core.raft_election_timeout_min_ms: "), "{error}");
    }

    #[test]
    fn invalid_log_filter_is_refused() {
        for level in ["debgu", "info,wharf_core=loud"] {
            let error = load_error(None, &[("WHARF__LOG__LEVEL", level)]);
            assert!(error.starts_with("log.level: "), "{level}: {error}");
        }
        for level in ["warn", "DEBUG", "info,wharf_core=debug"] {
            Settings::load(None, env(&[("WHARF__LOG__LEVEL", level)]), &Overrides::default()).expect(level);
        }
    }

    #[test]
    fn missing_file_is_refused() {
        let error = Settings::load(Some(Path::new("/nonexistent/wharf.toml")), env(&[]), &Overrides::default())
            .expect_err("refused")
            .to_string();
        assert!(error.contains("/nonexistent/wharf.toml"), "{error}");
    }

    #[test]
    fn toml_string_escapes() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn cluster_peers_are_read_by_id_and_checked() {
        let file = write_file(
            "[node]\nid = 2\n[cluster]\npeers = [\"1@10.0.0.1:7655\", \"2@10.0.0.2:7655\", \"3@[::1]:7655\"]\n",
        );
        let settings = Settings::load(Some(file.path()), env(&[]), &Overrides::default()).expect("valid");
        let voters = settings.cluster.voters().expect("valid").expect("a cluster");
        assert_eq!(voters.get(&3).map(String::as_str), Some("[::1]:7655"));
        assert_eq!(voters.len(), 3);
        assert_eq!(Settings::default().cluster.voters(), Ok(None), "no peers: a single node");

        for (peers, expected) in [
            ("[\"1@10.0.0.1:7655\", \"3@10.0.0.3:7655\"]", "this node's id 2 is not among"),
            ("[\"2@10.0.0.2:7655\", \"2@10.0.0.3:7655\"]", "node 2 is listed twice"),
            ("[\"2:10.0.0.2:7655\"]", "is not ID@HOST:PORT"),
            ("[\"2@10.0.0.2\"]", "is not ID@HOST:PORT"),
        ] {
            let error = load_error(Some(&format!("[node]\nid = 2\n[cluster]\npeers = {peers}\n")), &[]);
            assert!(error.contains("cluster.peers") && error.contains(expected), "{peers}: {error}");
        }
        let error =
            load_error(Some("[node]\nid = 1\n[cluster]\npeers = [\"1@h:1\"]\nmessage_size_max_bytes = 10\n"), &[]);
        assert!(error.contains("cluster.message_size_max_bytes"), "{error}");
    }
}
