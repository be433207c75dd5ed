//! What every example shares: a `wharf serve` child process (loopback ports picked free, a
//! temporary data directory, its log in a file there; SIGKILL and start again on the same data and
//! ports), and the runtime and exit code of an example's `main`. Included (`#[path]`) by each
//! example and by the test that runs them; touches only its directory, its ports and its child
//! process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a start may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or killed) broker.
pub struct Broker {
    wharf: PathBuf,
    dir: tempfile::TempDir,
    pub mqtt: u16,
    pub amqp: u16,
    pub native: u16,
    admin: u16,
    child: Option<Child>,
}

impl Broker {
    /// Start `wharf` (a path to the binary) on fresh loopback ports and a fresh data directory.
    pub fn start(wharf: PathBuf) -> anyhow::Result<Self> {
        let held: Vec<TcpListener> = (0..4).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?;
        drop(held);
        let dir = tempfile::Builder::new().prefix("wharf-example-").tempdir()?;
        let mut broker =
            Self { wharf, dir, mqtt: ports[0], amqp: ports[1], native: ports[2], admin: ports[3], child: None };
        broker.spawn()?;
        Ok(broker)
    }

    /// Start the process (again) and wait until its listeners accept connections.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("wharf.log"))?;
        let loopback = |port: u16| format!("127.0.0.1:{port}");
        let child = Command::new(&self.wharf)
            .args(["serve", "--admin-listen", &loopback(self.admin), "--data-dir"])
            .arg(self.dir.path().join("data"))
            .env("WHARF__LISTENERS__MQTT", loopback(self.mqtt))
            .env("WHARF__LISTENERS__MQTT_WS", "")
            .env("WHARF__LISTENERS__AMQP", loopback(self.amqp))
            .env("WHARF__LISTENERS__NATIVE", loopback(self.native))
            .env("WHARF__MQTT__SYS_INTERVAL_SECS", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (build it first: cargo build --release)", self.wharf.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let ready = [self.amqp, self.mqtt, self.native].map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        while Instant::now() < deadline {
            if ready.iter().all(|address| TcpStream::connect_timeout(address, Duration::from_millis(200)).is_ok()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the broker did not start; its log:\n{}", self.log())
    }

    /// SIGKILL: nothing is flushed or closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Everything the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wharf.log")).unwrap_or_default()
    }

    /// The native API's endpoint.
    pub fn native_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.native)
    }

    /// The AMQP URI (default user, vhost `/`).
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `target/<profile>/wharf`, next to `target/<profile>/examples/<example>`.
pub fn default_wharf() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("wharf")))
        .unwrap_or_else(|| PathBuf::from("wharf"))
}

/// Run an example's future on a multi-threaded runtime: print its report and exit 0 when it
/// passed, 1 when it did not or failed to run (printing why), prefixing messages with `name`.
pub fn run_example(name: &str, example: impl Future<Output = anyhow::Result<(String, bool)>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(example) {
        Ok((report, passed)) => {
            print!("{report}");
            if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Refuse an unknown command-line argument (exit code 2).
pub fn unknown_argument(name: &str, argument: &str) -> ExitCode {
    eprintln!("{name}: unknown argument {argument:?}");
    ExitCode::from(2)
}
