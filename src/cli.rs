//! The command line of the `wharf` binary (clap derive): subcommands and flags only. Parses
//! arguments; reads no files and does no IO.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::Overrides;

/// Wharf message broker: MQTT, AMQP 0.9.1 and gRPC on one replicated, transactional core.
#[derive(Debug, Parser)]
#[command(name = "wharf", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker node (single node, storage under ./data, by default).
    Serve(ServeArgs),
    /// Print or check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Load-test an MQTT or AMQP broker (Wharf or any other): throughput, losses, duplicates,
    /// latency percentiles.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Inspect a cluster through a node's admin endpoint.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `wharf cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every Raft group as one node sees it: its role, the leader, the term, the log, the voters,
    /// and on the leader how far each node has replicated.
    Status {
        /// The node's admin HTTP address (`admin.listen`).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15672")]
        admin: SocketAddr,
        /// Print the node's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node to every Raft group of the cluster, online: a learner first, a voter once it
    /// has caught up. Start the new node first, with `cluster.join = true`.
    Join {
        /// The admin HTTP address of a node of the cluster (on this host, unless that node has
        /// `admin.remote_changes`).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15672")]
        admin: SocketAddr,
        /// The new node as `ID@HOST:PORT`: its `node.id` and its cluster listener's address.
        #[arg(long, value_name = "ID@HOST:PORT")]
        node: String,
        /// How long the change may take, catching up included, seconds.
        #[arg(long, value_name = "SECS", default_value_t = crate::admin::CHANGE_TIMEOUT_SECS_DEFAULT)]
        timeout_secs: u64,
    },
    /// Hand the leadership of one Raft group, or of every group, over to a node (for balancing
    /// leaderships, or before maintenance).
    TransferLeader {
        /// The admin HTTP address of a node of the cluster.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15672")]
        admin: SocketAddr,
        /// The node that is to lead.
        #[arg(long, value_name = "ID")]
        to: u64,
        /// One group (`meta`, `shard-3`); every group when absent.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// How long the hand-over may take, seconds.
        #[arg(long, value_name = "SECS", default_value_t = crate::admin::CHANGE_TIMEOUT_SECS_DEFAULT)]
        timeout_secs: u64,
    },
    /// Remove a node from every Raft group of the cluster, online (the node may be down). Ask
    /// another node than the one removed.
    Leave {
        /// The admin HTTP address of a node that stays.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15672")]
        admin: SocketAddr,
        /// The id of the node to remove.
        #[arg(long, value_name = "ID")]
        node: u64,
        /// How long the change may take, seconds.
        #[arg(long, value_name = "SECS", default_value_t = crate::admin::CHANGE_TIMEOUT_SECS_DEFAULT)]
        timeout_secs: u64,
    },
}

/// Flags of `wharf serve`. Flags override the configuration file and the environment.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (see `wharf config default`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory; overrides `node.data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin HTTP address (`/healthz`, `/readyz`, `/metrics`); overrides `admin.listen`.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Log level or filter; overrides `log.level`. `RUST_LOG`, when set, wins over both.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// The flags that override settings.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            admin_listen: self.admin_listen,
            log_level: self.log_level.clone(),
        }
    }
}

/// `wharf config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a commented configuration file holding every default to stdout.
    Default,
    /// Check a configuration file as `wharf serve --config FILE` would load it (the file, then
    /// WHARF__SECTION__KEY environment variables); exit 0 if valid, 1 with the error if not.
    Check {
        /// The TOML file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse() {
        let cli = Cli::try_parse_from([
            "wharf",
            "serve",
            "--config",
            "w.toml",
            "--data-dir",
            "/d",
            "--admin-listen",
            "127.0.0.1:1",
            "--log-level",
            "debug",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        let overrides = args.overrides();
        assert_eq!(args.config.as_deref(), Some(std::path::Path::new("w.toml")));
        assert_eq!(overrides.data_dir.as_deref(), Some(std::path::Path::new("/d")));
        assert_eq!(overrides.admin_listen, Some("127.0.0.1:1".parse().expect("address")));
        assert_eq!(overrides.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn cluster_join_and_leave_parse() {
        let cli = Cli::try_parse_from(["wharf", "cluster", "join", "--node", "4@127.0.0.1:7685"]).expect("parses");
        let Command::Cluster(ClusterCommand::Join { admin, node, timeout_secs }) = cli.command else { panic!("join") };
        assert_eq!((admin.port(), node.as_str(), timeout_secs), (15672, "4@127.0.0.1:7685", 300));
        let cli = Cli::try_parse_from(["wharf", "cluster", "leave", "--admin", "127.0.0.1:1", "--node", "2"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Cluster(ClusterCommand::Leave { node: 2, .. })));
        assert!(Cli::try_parse_from(["wharf", "cluster", "leave"]).is_err(), "--node is required");
        let cli = Cli::try_parse_from(["wharf", "cluster", "transfer-leader", "--to", "3", "--group", "shard-1"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::TransferLeader { to: 3, group: Some(ref g), .. }) if g == "shard-1"
        ));
    }

    #[test]
    fn config_check_requires_a_file() {
        assert!(Cli::try_parse_from(["wharf", "config", "check"]).is_err());
    }
}
