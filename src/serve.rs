//! `wharf serve`: the life of a node. Loads the settings, starts logging, metrics and the admin
//! endpoint, opens the core, and on SIGINT or SIGTERM shuts them down in order. Owns the Tokio
//! runtime and the process's exit code; touches the core only through `Core`'s public API.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use wharf_core::raft::grpc::GrpcTransport;
use wharf_core::raft::transport::RaftService;
use wharf_core::{ClusterLink, Core};

use crate::admin::{self, AdminState};
use crate::cli::ServeArgs;
use crate::listeners::{ClusterListener, FrontEnds, Listeners};
use crate::settings::{self, Settings};
use crate::telemetry;

/// Exit code for configuration refused at start-up (clap uses the same code for bad flags).
pub const EXIT_INVALID_CONFIG: u8 = 2;

/// Longest wait, from the shutdown signal, for the admin endpoint and the core to stop. Past it
/// the process exits with code 1, so a supervisor is not left waiting on a stuck node.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for client connections to store their sessions and close.
const CONNECTIONS_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long runtime shutdown waits for tasks still running after the node has stopped.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Run `wharf serve` to completion and return the process's exit code.
pub fn run(args: &ServeArgs) -> ExitCode {
    let started = Instant::now();
    // Configuration errors go to stderr directly: logging is configured by the settings.
    let settings = match Settings::load(args.config.as_deref(), None, &args.overrides()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("wharf: invalid configuration: {error}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if let Err(error) = telemetry::init_logging(&settings.log.level) {
        eprintln!("wharf: {error:#}");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("wharf").build() {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        serve(settings, started).await.unwrap_or_else(|error| {
            error!("{error:#}");
            ExitCode::FAILURE
        })
    });
    // Past a clean shutdown nothing should remain; after a timed-out one, do not wait again.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    code
}

async fn serve(settings: Settings, started: Instant) -> anyhow::Result<ExitCode> {
    let metrics = telemetry::init_metrics()?;
    tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let mut interval = tokio::time::interval(telemetry::METRICS_UPKEEP_INTERVAL);
            loop {
                interval.tick().await;
                metrics.run_upkeep();
            }
        }
    });
    // Installed before anything slow, so that an early signal is not lost to the default action.
    let mut signals = Signals::install().context("installing signal handlers")?;

    let core_config = settings.core_config();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        node_id = core_config.node_id,
        data_dir = %core_config.data_dir.display(),
        storage = settings::storage_name(core_config.storage),
        shard_count = core_config.shard_count,
        "starting wharf"
    );

    let listener = TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| format!("binding the admin HTTP listener on {}", settings.admin.listen))?;
    info!(address = %listener.local_addr()?, "admin HTTP listening");
    let core_cell = Arc::new(OnceLock::new());
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let mut admin = tokio::spawn(admin::serve(
        listener,
        AdminState::new(core_cell.clone(), metrics, started, settings.admin.remote_changes),
        async {
            // A dropped sender stops the endpoint too.
            let _ = admin_stopped.await;
        },
    ));

    // A node of a cluster serves its peers before it opens the core: electing leaders takes
    // their votes, and theirs take this node's.
    let (cluster, cluster_listener) = match settings.cluster.voters() {
        Ok(Some(voters)) => {
            let size_max = usize::try_from(settings.cluster.message_size_max_bytes).unwrap_or(usize::MAX);
            let service = Arc::new(RaftService::new());
            let listener = ClusterListener::start(
                &settings.listeners.cluster,
                core_config.node_id,
                Arc::clone(&service),
                size_max,
            )
            .await?;
            let join = settings.cluster.join;
            info!(peers = ?voters, join, "joining the cluster");
            let link = ClusterLink { voters, transport: GrpcTransport::new(size_max), service, join };
            (Some(link), Some(listener))
        }
        // Validated when the settings were loaded.
        Ok(None) | Err(_) => (None, None),
    };

    info!("opening the core");
    let core = tokio::select! {
        opened = Core::open_node(core_config, cluster) => match opened {
            Ok(core) => core,
            // The data directory contradicts the configuration (e.g. another shard count): a
            // configuration error like any other, with the same exit code.
            Err(wharf_core::CoreError::InvalidArgument(reason)) => {
                error!("opening the core: {reason}");
                let _ = stop_admin.send(());
                return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
            }
            Err(other) => return Err(other).context("opening the core"),
        },
        signal = signals.recv() => {
            // The core must survive a crash at any point, so abandoning the open is safe; waiting
            // for a long recovery to finish only to shut down would not be.
            info!(signal, "shutdown requested while the core was opening; abandoning the open");
            let _ = stop_admin.send(());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let _ = core_cell.set(core.clone());
    let broker = match wharf_mqtt::Broker::start(core.clone(), settings.mqtt.clone()).await {
        Ok(broker) => broker,
        Err(error) => {
            error!("starting the MQTT front-end: {error}");
            let _ = stop_admin.send(());
            let _ = core.shutdown().await;
            return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
        }
    };
    let amqp = match wharf_amqp::Broker::start(core.clone(), settings.amqp.clone()).await {
        Ok(amqp) => amqp,
        Err(error) => {
            error!("starting the AMQP front-end: {error}");
            broker.shutdown();
            let _ = stop_admin.send(());
            let _ = core.shutdown().await;
            return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
        }
    };
    let native = match wharf_native::Native::start(core.clone(), settings.native.clone()) {
        Ok(native) => native,
        Err(error) => {
            error!("starting the native front-end: {error}");
            broker.shutdown();
            amqp.shutdown();
            let _ = stop_admin.send(());
            let _ = core.shutdown().await;
            return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
        }
    };
    let front_ends = FrontEnds { mqtt: broker.clone(), amqp: amqp.clone(), native: native.clone() };
    let listeners = match Listeners::start(&settings.listeners, front_ends).await {
        Ok(listeners) => listeners,
        Err(error) => {
            error!("{error:#}");
            broker.shutdown();
            amqp.shutdown();
            native.shutdown();
            let _ = stop_admin.send(());
            let _ = core.shutdown().await;
            return Ok(ExitCode::from(EXIT_INVALID_CONFIG));
        }
    };
    info!(ready = core.is_ready(), "core open; serving");

    let admin_exited = tokio::select! {
        signal = signals.recv() => {
            info!(signal, "shutdown requested");
            false
        }
        exited = &mut admin => {
            // axum's server only returns once told to stop, so this is a bug or a panic.
            error!(result = ?exited, "admin HTTP endpoint stopped unexpectedly; shutting down");
            true
        }
    };

    let shutdown = async {
        info!("stopping the protocol listeners and closing client connections");
        // Streams end first: the gRPC server's graceful stop waits for open calls.
        native.shutdown();
        listeners.stop().await;
        broker.shutdown();
        amqp.shutdown();
        // Connections close on their own once told; give them a moment to store their sessions.
        let deadline = Instant::now() + CONNECTIONS_CLOSE_TIMEOUT;
        while (broker.stats().clients_connected.load(std::sync::atomic::Ordering::Relaxed) > 0
            || amqp.connections() > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!("stopping the admin HTTP listener");
        let _ = stop_admin.send(());
        // A finished `JoinHandle` must not be polled again.
        if !admin_exited {
            match admin.await {
                Ok(Ok(())) => info!("admin HTTP listener stopped"),
                Ok(Err(error)) => warn!(%error, "admin HTTP listener failed while stopping"),
                Err(error) => warn!(%error, "admin HTTP task failed while stopping"),
            }
        }
        info!("shutting down the core");
        let result = core.shutdown().await;
        if let Some(listener) = &cluster_listener {
            listener.stop();
        }
        result
    };
    tokio::select! {
        finished = tokio::time::timeout(SHUTDOWN_TIMEOUT, shutdown) => match finished {
            Ok(Ok(())) => {
                info!("core shut down; exiting");
                Ok(ExitCode::SUCCESS)
            }
            Ok(Err(error)) => {
                error!(%error, "core shutdown failed");
                Ok(ExitCode::FAILURE)
            }
            Err(_) => {
                error!(timeout_secs = SHUTDOWN_TIMEOUT.as_secs(), "shutdown did not finish in time; exiting");
                Ok(ExitCode::FAILURE)
            }
        },
        signal = signals.recv() => {
            error!(signal, "second signal during shutdown; exiting without finishing it");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// SIGTERM (supervisors) and SIGINT (a terminal's Ctrl-C), both meaning "shut down".
#[derive(Debug)]
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self { terminate: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    /// Wait for the next signal and return its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
