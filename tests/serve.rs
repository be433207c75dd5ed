//! Black-box smoke tests of the real `wharf` binary: start `wharf serve`, probe the admin HTTP
//! endpoint over a plain TCP socket, stop it with SIGTERM; and check that bad configuration is
//! refused at start-up. Touches only temporary directories, loopback ports and child processes.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Longest wait for the node to answer `/healthz` and `/readyz` (a cold debug build on a busy CI
/// machine can be slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the process to exit after SIGTERM (the binary's own limit is 30 s).
const EXIT_TIMEOUT: Duration = Duration::from_secs(40);
/// Per-request connect, read and write timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `wharf` with an environment free of `WHARF__*` variables from the developer's shell.
fn wharf() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().to_ascii_uppercase().starts_with("WHARF__") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG");
    // Protocol listeners on ephemeral loopback ports, so tests running at once never collide.
    command.env("WHARF__LISTENERS__MQTT", "127.0.0.1:0");
    command.env("WHARF__LISTENERS__MQTT_WS", "127.0.0.1:0");
    command.env("WHARF__LISTENERS__AMQP", "127.0.0.1:0");
    command.env("WHARF__LISTENERS__AMQP_TLS", "127.0.0.1:0");
    command.env("WHARF__LISTENERS__NATIVE", "127.0.0.1:0");
    command
}

/// A loopback port free at the time of asking.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local address").port()
}

/// A minimal HTTP/1.1 GET with `Connection: close`: the status code and the body, or `None` if the
/// server does not answer (yet).
fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Poll `path` until it answers `status`, or panic after `START_TIMEOUT`.
fn wait_for(node: &mut Node, path: &str, status: u16) -> String {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(exit) = node.child.try_wait().expect("poll the child") {
            panic!("wharf exited early with {exit} while waiting for {path}\n{}", node.log());
        }
        match get(node.admin, path) {
            Some((code, body)) if code == status => return body,
            other => last = other,
        }
        sleep(Duration::from_millis(100));
    }
    panic!("{path} did not answer {status} within {START_TIMEOUT:?}; last answer {last:?}\n{}", node.log());
}

/// A running `wharf serve`, killed on drop so a failing test leaves no process behind.
struct Node {
    child: Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        Self::start_with(None, &[])
    }

    /// Start with a configuration file and environment variables on top of the defaults.
    fn start_with(config: Option<&str>, envs: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Logs go to a file: an unread pipe could fill up and block the node.
        let log = std::fs::File::create(dir.path().join("wharf.log")).expect("log file");
        let mut command = wharf();
        command.args(["serve", "--admin-listen", &admin.to_string(), "--data-dir"]).arg(dir.path().join("data"));
        if let Some(config) = config {
            let file = dir.path().join("wharf.toml");
            std::fs::write(&file, config).expect("write config");
            command.arg("--config").arg(file);
        }
        let child = command
            .envs(envs.iter().map(|(key, value)| (*key, value.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start wharf");
        Self { child, admin, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wharf.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            sleep(Duration::from_millis(50));
        }
        panic!("wharf did not exit within {EXIT_TIMEOUT:?} of SIGTERM\n{}", self.log());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn serve_answers_admin_endpoints_and_stops_on_sigterm() {
    let mut node = Node::start();

    assert_eq!(wait_for(&mut node, "/healthz", 200).trim(), "ok");
    // With the real core, readiness follows leader election: poll rather than expect it at once.
    wait_for(&mut node, "/readyz", 200);

    let (status, metrics) = get(node.admin, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE wharf_build_info gauge"), "{metrics}");
    assert!(metrics.contains(&format!("wharf_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{metrics}");
    assert!(metrics.contains("wharf_uptime_seconds "), "{metrics}");
    assert!(metrics.contains("wharf_admin_http_requests_total{path=\"/healthz\",status=\"200\"}"), "{metrics}");

    assert_eq!(get(node.admin, "/no-such-path").expect("404 answers").0, 404);

    node.terminate();
    let status = node.wait_exit();
    let log = node.log();
    assert_eq!(status.code(), Some(0), "wharf exited with {status}\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("admin HTTP listener stopped"), "{log}");
    assert!(log.contains("core shut down"), "{log}");
    assert!(get(node.admin, "/healthz").is_none(), "admin endpoint still answers after exit");
}

/// Run a command expected to exit on its own, killing it (and failing) if it is still running
/// after `EXIT_TIMEOUT`: a configuration wrongly accepted would otherwise leave a node serving.
fn run(command: &mut Command) -> Output {
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start wharf");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().expect("poll the child").is_some() {
            return child.wait_with_output().expect("collect the output");
        }
        sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("collect the output");
    panic!("wharf did not exit within {EXIT_TIMEOUT:?}\n{}", stderr(&output));
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn serve_refuses_invalid_env_value_with_exit_code_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run(wharf()
        .args(["serve", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("WHARF__CORE__SHARD_COUNT", "0"));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("core.shard_count"), "{}", stderr(&output));
}

#[test]
fn serve_refuses_unknown_key_in_file_with_exit_code_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("wharf.toml");
    std::fs::write(&file, "[core]\nshard_cuont = 8\n").expect("write config");
    let output = run(wharf()
        .args(["serve", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&file));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("shard_cuont"), "{}", stderr(&output));
}

#[test]
fn config_default_passes_config_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run(wharf().args(["config", "default"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &output.stdout).expect("write config");

    let output = run(wharf().args(["config", "check", "--config"]).arg(&file));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    std::fs::write(&file, "[limits]\nqueues_max = 0\n").expect("write config");
    let output = run(wharf().args(["config", "check", "--config"]).arg(&file));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("limits.queues_max"), "{}", stderr(&output));
}

#[test]
fn version_flag_prints_the_version() {
    let output = run(wharf().arg("--version"));
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), format!("wharf {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn missing_config_file_is_refused() {
    let output = run(wharf().args(["serve", "--config"]).arg(Path::new("/nonexistent/wharf.toml")));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("/nonexistent/wharf.toml"), "{}", stderr(&output));
}

#[test]
fn serve_refuses_a_shard_count_or_node_id_other_than_the_data_directorys() {
    let mut node = Node::start();
    wait_for(&mut node, "/readyz", 200);
    node.terminate();
    assert_eq!(node.wait_exit().code(), Some(0), "{}", node.log());
    let data_dir = node.dir.path().join("data");
    for (variable, value, refusal) in [
        ("WHARF__CORE__SHARD_COUNT", "7", "core.shard_count"),
        ("WHARF__NODE__ID", "2", "node.id: the data directory belongs to node 1"),
    ] {
        let output = run(wharf()
            .args(["serve", "--admin-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env(variable, value));
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(refusal), "{}", stderr(&output));
    }
}

/// Three `wharf serve` processes form a cluster from their `[cluster]` sections: an MQTT message
/// published on one node reaches a subscriber on another, and after one node is killed the other
/// two carry on, with nothing confirmed lost, doubled or reordered.
#[test]
fn three_nodes_form_a_cluster_carry_mqtt_messages_between_them_and_survive_a_killed_node() {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mqtt_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> =
        cluster_ports.iter().enumerate().map(|(i, port)| format!("\"{}@127.0.0.1:{port}\"", i + 1)).collect();
    let config = format!("[cluster]\npeers = [{}]\n", peers.join(", "));
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start_with(
                Some(&config),
                &[
                    ("WHARF__NODE__ID", (i + 1).to_string()),
                    ("WHARF__LISTENERS__CLUSTER", format!("127.0.0.1:{}", cluster_ports[i])),
                    ("WHARF__LISTENERS__MQTT", format!("127.0.0.1:{}", mqtt_ports[i])),
                ],
            )
        })
        .collect();
    for node in &mut nodes {
        wait_for(node, "/readyz", 200);
        let log = node.log();
        assert!(log.contains("joining the cluster") && log.contains("cluster listener serving"), "{log}");
    }

    // `wharf cluster status` on each node: every group has the three voters and one leader.
    let status = |node: &Node| {
        let output = run(wharf().args(["cluster", "status", "--admin", &node.admin.to_string()]));
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    for node in &nodes {
        let table = status(node);
        let groups: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(groups.len(), 5, "meta and four shards (the default shard count): {table}");
        assert!(groups.iter().all(|line| line.contains("1,2,3")), "{table}");
    }

    let mqtt = |node: usize, client_id: &str| {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", mqtt_ports[node]);
        options.set_keep_alive(Duration::from_secs(30));
        Client::new(options, 64)
    };
    let (subscriber, mut incoming) = mqtt(2, "sub-on-3");
    subscriber.subscribe("orders/+", QoS::AtLeastOnce).expect("subscribe");
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    let sink = std::sync::Arc::clone(&received);
    std::thread::spawn(move || {
        for event in incoming.iter() {
            match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    sink.lock().unwrap().push(String::from_utf8_lossy(&publish.payload).into_owned());
                }
                Ok(_) => {}
                Err(_) => sleep(Duration::from_millis(100)),
            }
        }
    });
    subscribed_rx.recv_timeout(START_TIMEOUT).expect("SUBACK from node 3");

    // QoS 1 publishes, each waited for (PUBACK) before the next; a connection broken by the kill
    // is re-established by rumqttc, which resends what was not acknowledged.
    let publish_all = |node: usize, client_id: &str, range: std::ops::Range<u32>| {
        let (publisher, mut connection) = mqtt(node, client_id);
        let mut pending = range.clone().peekable();
        if let Some(&first) = pending.peek() {
            publisher.publish("orders/new", QoS::AtLeastOnce, false, format!("m{first:04}")).expect("publish");
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while pending.peek().is_some() {
            assert!(Instant::now() < deadline, "publishes on node {} not acknowledged in time", node + 1);
            match connection.recv_timeout(Duration::from_secs(1)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    pending.next();
                    if let Some(&next) = pending.peek() {
                        publisher
                            .publish("orders/new", QoS::AtLeastOnce, false, format!("m{next:04}"))
                            .expect("publish");
                    }
                }
                Ok(Err(_)) => sleep(Duration::from_millis(100)),
                _ => {}
            }
        }
        let _ = publisher.disconnect();
    };
    publish_all(1, "pub-on-2", 0..50);
    nodes[0].kill();
    publish_all(1, "pub-on-2-again", 50..100);

    let expected: Vec<String> = (0..100).map(|n| format!("m{n:04}")).collect();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let got = received.lock().unwrap().clone();
        // At least once: a redelivery after the kill may repeat a message, never lose or reorder one.
        let mut distinct = got.clone();
        distinct.dedup();
        if distinct.len() >= expected.len() {
            assert_eq!(distinct, expected, "every message, in order");
            break;
        }
        assert!(Instant::now() < deadline, "node 3 received {} of 100: {got:?}\n{}", distinct.len(), nodes[2].log());
        sleep(Duration::from_millis(50));
    }
    let _ = subscriber.disconnect();

    // The survivors come to lead every group; the killed node's endpoint no longer answers.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let table = status(&nodes[1]);
        let led_by_survivors =
            table.lines().skip(2).all(|line| matches!(line.split_whitespace().nth(2), Some("2" | "3")));
        if led_by_survivors {
            break;
        }
        assert!(Instant::now() < deadline, "a group still led by the killed node 1: {table}");
        sleep(Duration::from_millis(200));
    }
    let output = run(wharf().args(["cluster", "status", "--admin", &nodes[0].admin.to_string()]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}

#[test]
fn a_node_joins_a_running_cluster_with_wharf_cluster_join_and_another_leaves() {
    let cluster_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let peers: Vec<String> =
        cluster_ports.iter().enumerate().map(|(i, port)| format!("\"{}@127.0.0.1:{port}\"", i + 1)).collect();
    let start = |i: usize, config: &str| {
        Node::start_with(
            Some(config),
            &[
                ("WHARF__NODE__ID", (i + 1).to_string()),
                ("WHARF__LISTENERS__CLUSTER", format!("127.0.0.1:{}", cluster_ports[i])),
                ("WHARF__CORE__SHARD_COUNT", "2".into()),
            ],
        )
    };
    let three = format!("[cluster]\npeers = [{}]\n", peers[..3].join(", "));
    let mut nodes: Vec<Node> = (0..3).map(|i| start(i, &three)).collect();
    for node in &mut nodes {
        wait_for(node, "/readyz", 200);
    }
    // Node 4 lists the running nodes and itself, and waits to be added.
    let mut joining = start(3, &format!("[cluster]\njoin = true\npeers = [{}]\n", peers.join(", ")));
    wait_for(&mut joining, "/healthz", 200);
    sleep(Duration::from_secs(2));
    assert_eq!(get(joining.admin, "/readyz").map(|(code, _)| code), Some(503), "{}", joining.log());

    let cluster = |args: &[&str]| run(wharf().arg("cluster").args(args));
    let node4 = format!("4@127.0.0.1:{}", cluster_ports[3]);
    let output = cluster(&["join", "--admin", &nodes[0].admin.to_string(), "--node", &node4]);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{}\n{}", stderr(&output), joining.log());
    assert!(printed.starts_with("node 4 added (through node 1)"), "{printed}");
    assert_eq!(printed.lines().filter(|line| line.ends_with("voters 1,2,3,4")).count(), 3, "{printed}");
    wait_for(&mut joining, "/readyz", 200);
    let output = cluster(&["status", "--admin", &joining.admin.to_string()]);
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(table.lines().skip(2).all(|line| line.contains("1,2,3,4")), "{table}");

    // Every leadership to the new node, asked through node 2.
    let output = cluster(&["transfer-leader", "--admin", &nodes[1].admin.to_string(), "--to", "4"]);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(printed.lines().filter(|line| line.ends_with("leader 4")).count(), 3, "{printed}");

    // Node 1 leaves, asked through node 4; asking node 1 to remove itself is refused.
    let output = cluster(&["leave", "--admin", &nodes[0].admin.to_string(), "--node", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("400") && stderr(&output).contains("cannot remove itself"), "{}", stderr(&output));
    let output = cluster(&["leave", "--admin", &joining.admin.to_string(), "--node", "1"]);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(printed.lines().filter(|line| line.ends_with("voters 2,3,4")).count(), 3, "{printed}");
    nodes[0].kill();
    // A malformed request is refused with 400 and the reason.
    let output =
        cluster(&["join", "--admin", &joining.admin.to_string(), "--node", "5@127.0.0.1:1", "--timeout-secs", "0"]);
    assert!(stderr(&output).contains("400") && stderr(&output).contains("timeout_secs"), "{}", stderr(&output));
}

#[test]
fn the_example_cluster_configs_pass_config_check() {
    for node in 1..=3 {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/cluster/node{node}.toml"));
        let output = run(wharf().args(["config", "check", "--config"]).arg(&file));
        assert_eq!(output.status.code(), Some(0), "{}: {}", file.display(), stderr(&output));
    }
}
