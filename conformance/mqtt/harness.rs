//! The broker under test: starts the real `wharf` binary (`wharf serve`) on loopback ports in a
//! temporary data directory, waits until it is ready, and stops, kills or restarts it. Also finds
//! the external clients installed by `conformance/setup.sh` (the paho-mqtt venv, Mosquitto's
//! command-line clients). Touches only temporary directories, loopback ports and child processes.
//!
//! Every test starts its own broker; nothing is shared between tests but the compiled binary. A
//! broker's log (its stdout and stderr) goes to a file in its temporary directory and is printed
//! when the test owning it panics.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Longest wait for a node to answer `/readyz` (a cold debug build on a busy CI machine is slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the process to exit after SIGTERM (the binary's own limit is 30 s).
const EXIT_TIMEOUT: Duration = Duration::from_secs(40);
/// Per-request connect, read and write timeout of the readiness probe.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at starting on fresh ports when a port picked as free was taken in the meantime by a
/// test running in parallel.
const START_ATTEMPTS: usize = 5;
/// The log filter: the MQTT front-end's debug lines say why a connection was closed; openraft's
/// start-up chatter is left out.
const RUST_LOG: &str = "info,openraft=warn,wharf_mqtt=debug";

/// The command to run when the external clients are missing.
pub const SETUP_HINT: &str = "run `conformance/setup.sh` (as root, or with sudo available) first";

/// The workspace root (the root package's directory).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the venv made by `conformance/setup.sh`, with paho-mqtt importable. Panics (the
/// test fails, never silently passes) when it is missing.
pub fn python() -> PathBuf {
    let python = workspace_dir().join("target/conformance-venv/bin/python");
    assert!(python.exists(), "{} is missing: {SETUP_HINT}", python.display());
    python
}

/// `name` (e.g. `mosquitto_pub`) when it runs; panics with the setup hint otherwise.
pub fn require_program(name: &str) -> &str {
    let runs = Command::new(name).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    assert!(runs, "`{name}` is not installed: {SETUP_HINT}");
    name
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local address").port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `wharf` with an environment free of `WHARF__*` variables and `RUST_LOG` from the caller's shell.
fn wharf() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().to_ascii_uppercase().starts_with("WHARF__") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

/// A minimal HTTP/1.1 GET with `Connection: close`: the status code, or `None` if the server does
/// not answer (yet).
fn get_status(address: SocketAddr, path: &str) -> Option<u16> {
    get(address, path).map(|(status, _)| status)
}

/// A minimal HTTP/1.1 GET with `Connection: close`: the status code and the body.
fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

/// The loopback ports of one broker.
#[derive(Debug, Clone, Copy)]
struct Ports {
    admin: u16,
    mqtt: u16,
    ws: u16,
    amqp: u16,
    tls: Option<u16>,
    /// The AMQP-over-TLS listener, picked with `tls` (without a certificate it is not started).
    amqp_tls: Option<u16>,
    /// The native gRPC API (TLS when the broker has a certificate).
    native: u16,
}

impl Ports {
    fn pick(tls: bool) -> Self {
        // Every port's listener is held until all are picked, so no two of them are the same (a
        // port released at once can be handed out again by the next bind).
        let held: Vec<TcpListener> =
            (0..7).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")).collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().expect("local address").port()).collect();
        Self {
            admin: ports[0],
            mqtt: ports[1],
            ws: ports[2],
            amqp: ports[3],
            tls: tls.then_some(ports[4]),
            amqp_tls: tls.then_some(ports[5]),
            native: ports[6],
        }
    }
}

/// PEM files of a self-signed certificate for `127.0.0.1` and `localhost`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate, also the CA file clients trust.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to start a broker: `[mqtt]` and other settings as `WHARF__*` variables, and whether to
/// open the TLS listener.
#[derive(Debug, Default)]
pub struct BrokerBuilder {
    env: Vec<(String, String)>,
    tls: bool,
}

impl BrokerBuilder {
    /// Set a `WHARF__SECTION__KEY` variable (e.g. `WHARF__MQTT__RECEIVE_MAXIMUM`).
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        assert!(key.starts_with("WHARF__"), "{key} is not a wharf setting");
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    /// Open the MQTT-over-TLS and AMQP-over-TLS listeners with a freshly generated self-signed
    /// certificate.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Start the broker and wait until it is ready.
    pub fn start(self) -> Broker {
        let dir = tempfile::Builder::new().prefix("wharf-mqtt-conformance-").tempdir().expect("temp dir");
        let tls = self.tls.then(|| generate_certificate(dir.path()));
        let mut broker = Broker { child: None, dir, env: self.env, ports: Ports::pick(self.tls), tls, starts: 0 };
        let mut attempt = 1;
        loop {
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(log) if attempt < START_ATTEMPTS && log.contains("Address already in use") => {
                    // A port picked as free was taken by a test running in parallel: new ports.
                    attempt += 1;
                    broker.ports = Ports::pick(broker.tls.is_some());
                }
                Err(log) => panic!("wharf did not start\n{log}"),
            }
        }
    }
}

/// A running `wharf serve`, killed on drop so a failing test leaves no process behind; its log is
/// printed if the test panics.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    ports: Ports,
    tls: Option<TlsFiles>,
    /// Number of processes started on this data directory (numbers the log's sections).
    starts: usize,
}

impl Broker {
    /// A broker with the default settings ($SYS publications off).
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// The MQTT-over-TCP listener.
    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        match get(loopback(self.ports.admin), "/metrics") {
            Some((200, body)) => body,
            other => panic!("GET /metrics answered {other:?}"),
        }
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        loopback(self.ports.mqtt)
    }

    pub fn mqtt_port(&self) -> u16 {
        self.ports.mqtt
    }

    /// The MQTT-over-WebSocket listener (path `/mqtt`, subprotocol `mqtt`).
    pub fn ws_port(&self) -> u16 {
        self.ports.ws
    }

    /// The AMQP 0-9-1 port.
    pub fn amqp_port(&self) -> u16 {
        self.ports.amqp
    }

    /// The native gRPC API's port.
    pub fn native_port(&self) -> u16 {
        self.ports.native
    }

    /// The native API's endpoint (`http://127.0.0.1:port`).
    pub fn native_url(&self) -> String {
        format!("http://{}", loopback(self.ports.native))
    }

    /// The admin HTTP port (`/metrics`, `/readyz`).
    pub fn admin_port(&self) -> u16 {
        self.ports.admin
    }

    /// The MQTT-over-TLS listener and its certificate, when started with [`BrokerBuilder::tls`].
    pub fn tls(&self) -> Option<(u16, &TlsFiles)> {
        Some((self.ports.tls?, self.tls.as_ref()?))
    }

    /// The AMQP-over-TLS listener (same certificate as [`Broker::tls`]), when started with
    /// [`BrokerBuilder::tls`].
    pub fn amqp_tls_port(&self) -> Option<u16> {
        self.ports.amqp_tls
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("wharf.log")
    }

    /// Everything the broker processes wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let _ = writeln!(log, "===== conformance harness: start #{} =====", self.starts);
        let mut command = wharf();
        command
            .args(["serve", "--admin-listen", &loopback(self.ports.admin).to_string(), "--data-dir"])
            .arg(self.dir.path().join("data"))
            .env("RUST_LOG", RUST_LOG)
            .env("WHARF__LISTENERS__MQTT", loopback(self.ports.mqtt).to_string())
            .env("WHARF__LISTENERS__MQTT_WS", loopback(self.ports.ws).to_string())
            .env("WHARF__LISTENERS__AMQP", loopback(self.ports.amqp).to_string())
            .env("WHARF__LISTENERS__NATIVE", loopback(self.ports.native).to_string())
            // Replaced by a picked port below when the broker has a certificate.
            .env("WHARF__LISTENERS__AMQP_TLS", "127.0.0.1:0")
            // $SYS publications are off unless a test turns them on (it may override below).
            .env("WHARF__MQTT__SYS_INTERVAL_SECS", "0");
        // Without a certificate the TLS listener is not started.
        if let (Some(port), Some(files)) = (self.ports.tls, &self.tls) {
            command
                .env("WHARF__LISTENERS__MQTT_TLS", loopback(port).to_string())
                .env("WHARF__LISTENERS__TLS_CERT_FILE", &files.cert)
                .env("WHARF__LISTENERS__TLS_KEY_FILE", &files.key);
        }
        if let (Some(port), Some(_)) = (self.ports.amqp_tls, &self.tls) {
            command.env("WHARF__LISTENERS__AMQP_TLS", loopback(port).to_string());
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        // Logs go to a file: an unread pipe could fill up and block the node.
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start wharf");
        self.child = Some(child);
        self.wait_ready()
    }

    /// Poll `/readyz` until it answers 200, then the MQTT and AMQP ports (and the AMQP TLS one,
    /// bound last) until they accept: a port taken meanwhile fails the start before that. `Err(log)`
    /// if the process exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let admin = loopback(self.ports.admin);
        let mut ready = false;
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("a process was started");
            if let Some(status) = child.try_wait().expect("poll the child") {
                self.child = None;
                return Err(format!("wharf exited early with {status}\n{}", self.log()));
            }
            if !ready {
                ready = get_status(admin, "/readyz") == Some(200);
            }
            if ready
                && TcpStream::connect_timeout(&self.mqtt_addr(), REQUEST_TIMEOUT).is_ok()
                && TcpStream::connect_timeout(&loopback(self.ports.amqp), REQUEST_TIMEOUT).is_ok()
                && self
                    .ports
                    .amqp_tls
                    .is_none_or(|port| TcpStream::connect_timeout(&loopback(port), REQUEST_TIMEOUT).is_ok())
            {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        panic!("wharf was not ready within {START_TIMEOUT:?}\n{}", self.log());
    }

    /// SIGKILL the broker and wait for it to be gone (a crash: nothing is flushed or closed).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the broker and wait for it to exit; panics if it does not exit cleanly.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("poll the child") {
                assert!(status.success(), "wharf exited with {status} after SIGTERM\n{}", self.log());
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("wharf did not exit within {EXIT_TIMEOUT:?} of SIGTERM\n{}", self.log());
    }

    /// Start again on the same data directory and ports (after [`Broker::kill`] or
    /// [`Broker::stop`]), and wait until ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs a stopped broker: call kill() or stop() first");
        if let Err(log) = self.spawn_and_wait() {
            panic!("wharf did not restart\n{log}");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "\n===== wharf log ({}) =====\n{}\n===== end of wharf log =====",
                self.log_path().display(),
                self.log()
            );
        }
    }
}

/// A self-signed certificate (also its own CA) for `127.0.0.1` and `localhost`, with the `openssl`
/// command when present, else with Python's `cryptography` from the conformance venv.
fn generate_certificate(dir: &Path) -> TlsFiles {
    let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    let openssl = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(&files.key)
        .arg("-out")
        .arg(&files.cert)
        .stdin(Stdio::null())
        .output();
    match openssl {
        Ok(output) if output.status.success() => return files,
        Ok(output) => eprintln!(
            "openssl could not make a certificate ({}); trying Python's cryptography\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => eprintln!("openssl is not available ({error}); using Python's cryptography"),
    }
    let output = Command::new(python())
        .arg(workspace_dir().join("conformance/mqtt/paho/paho_check.py"))
        .args(["gen-cert", "--cert"])
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "generating a certificate with Python failed ({SETUP_HINT}):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    files
}

/// Run a command expected to finish by itself within `timeout`; its exit status, stdout and stderr.
/// Killed (and the test failed) if it is still running then.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        Some(status) => (status, stdout, stderr),
        None => panic!("{command:?} did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    }
}
