//! The protocol listeners: MQTT over plain TCP, TLS (rustls, optional client certificates) and
//! WebSocket (path `/mqtt`, subprotocol `mqtt`); AMQP 0-9-1 over TCP and TLS; the native gRPC API
//! over HTTP/2 (TLS when configured). Accepts connections up to the configured maximum and hands
//! each byte stream to its front-end (`wharf_mqtt::serve`, `wharf_amqp::serve`, the tonic server
//! of `wharf_native`); owns sockets and nothing else.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::Message as WsMessage;
use tracing::{debug, info, warn};
use wharf_mqtt::Broker;

use crate::settings::ListenerSettings;

/// The WebSocket path MQTT clients connect to.
pub const WEBSOCKET_PATH: &str = "/mqtt";

/// Subprotocols accepted for MQTT over WebSocket (MQTT 5 section 6; `mqttv3.1` for 3.1 clients).
const WEBSOCKET_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Time a WebSocket or TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes buffered between a WebSocket and the MQTT engine.
const WEBSOCKET_BRIDGE_BYTES: usize = 64 * 1024;
/// Streams a peer may reset before the cluster listener accepted them, per connection. hyper's
/// default (20) guards public servers against rapid-reset floods; between nodes, a peer that
/// was frozen or cut off resets every request that timed out meanwhile, and hitting the limit
/// closed the whole connection, failing every request in flight on it.
const CLUSTER_PENDING_RESET_STREAMS_MAX: usize = 4_096;

/// Which kind of listener.
#[derive(Debug, Clone)]
enum Kind {
    MqttTcp,
    MqttTls,
    MqttWebSocket,
    AmqpTcp,
    AmqpTls,
    /// gRPC: accepted connections go to the tonic server through a channel.
    Native(mpsc::Sender<NativeIo>),
}

/// The protocol front-ends connections are handed to.
#[derive(Debug, Clone)]
pub struct FrontEnds {
    /// MQTT.
    pub mqtt: Arc<Broker>,
    /// AMQP 0-9-1.
    pub amqp: Arc<wharf_amqp::Broker>,
    /// The native gRPC API.
    pub native: Arc<wharf_native::Native>,
}

/// TLS acceptors, one per protocol (they differ in ALPN).
#[derive(Clone)]
struct Acceptors {
    mqtt: TlsAcceptor,
    amqp: TlsAcceptor,
    native: TlsAcceptor,
}

/// The running listeners.
#[derive(Debug)]
pub struct Listeners {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Listeners {
    /// Bind every configured listener and start accepting.
    pub async fn start(settings: &ListenerSettings, front_ends: FrontEnds) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(settings.connections_max as usize));
        let mut tasks = JoinSet::new();
        let tls = tls_config(settings)?.map(|config| {
            let mut mqtt = config.clone();
            mqtt.alpn_protocols = vec![b"mqtt".to_vec()];
            let mut native = config.clone();
            native.alpn_protocols = vec![b"h2".to_vec()];
            Acceptors {
                mqtt: TlsAcceptor::from(Arc::new(mqtt)),
                amqp: TlsAcceptor::from(Arc::new(config)),
                native: TlsAcceptor::from(Arc::new(native)),
            }
        });
        let mut plan: Vec<(&'static str, &str, Kind)> = vec![
            ("mqtt", &settings.mqtt, Kind::MqttTcp),
            ("mqtt_ws", &settings.mqtt_ws, Kind::MqttWebSocket),
            ("amqp", &settings.amqp, Kind::AmqpTcp),
        ];
        if tls.is_some() {
            plan.push(("mqtt_tls", &settings.mqtt_tls, Kind::MqttTls));
            plan.push(("amqp_tls", &settings.amqp_tls, Kind::AmqpTls));
        }
        if !settings.native.is_empty() {
            let (connections, incoming) = mpsc::channel(NATIVE_ACCEPTED_BUFFERED);
            tasks.spawn(serve_native(Arc::clone(&front_ends.native), incoming, stopped.clone()));
            plan.push(("native", &settings.native, Kind::Native(connections)));
        }
        for (name, address, kind) in plan {
            if address.is_empty() {
                continue;
            }
            let address: SocketAddr = address.parse().with_context(|| format!("listeners.{name}: not an address"))?;
            let listener =
                TcpListener::bind(address).await.with_context(|| format!("binding listeners.{name} on {address}"))?;
            let local = listener.local_addr()?;
            info!(listener = name, address = %local, "listening");
            tasks.spawn(accept_loop(
                listener,
                kind,
                front_ends.clone(),
                Arc::clone(&limit),
                tls.clone(),
                stopped.clone(),
            ));
        }
        Ok(Self { stop, tasks })
    }

    /// Stop accepting (open connections are closed by the broker's shutdown).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The TLS configuration, when a certificate is configured; with a client CA, client certificates
/// are required and verified (mTLS).
fn tls_config(settings: &ListenerSettings) -> anyhow::Result<Option<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if settings.tls_cert_file.is_empty() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&settings.tls_cert_file)
        .with_context(|| format!("listeners.tls_cert_file: reading {}", settings.tls_cert_file))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("listeners.tls_cert_file: parsing {}", settings.tls_cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&settings.tls_key_file)
        .with_context(|| format!("listeners.tls_key_file: reading {}", settings.tls_key_file))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if settings.tls_client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&settings.tls_client_ca_file)
            .with_context(|| format!("listeners.tls_client_ca_file: reading {}", settings.tls_client_ca_file))?
        {
            roots
                .add(cert.context("listeners.tls_client_ca_file: parsing")?)
                .context("listeners.tls_client_ca_file")?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("listeners.tls_client_ca_file: building the client verifier")?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder.with_single_cert(certs, key).context("listeners.tls_cert_file / tls_key_file")?;
    Ok(Some(config))
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    front_ends: FrontEnds,
    limit: Arc<Semaphore>,
    tls: Option<Acceptors>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            // Over listeners.connections_max: refuse at once, before reading anything.
            metrics::counter!("wharf_connections_refused_total").increment(1);
            debug!(%peer, "connection refused: listeners.connections_max reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let front_ends = front_ends.clone();
        let peer = peer.to_string();
        // One spawn per kind: a task is as large as its future, so a plain MQTT connection must
        // not carry room for a TLS stream or an AMQP connection (memory per idle connection).
        match &kind {
            Kind::Native(connections) => match tls.clone() {
                None => {
                    let _ = connections.send(NativeIo { stream: NativeStream::Tcp(stream), _permit: permit }).await;
                }
                Some(tls) => {
                    let connections = connections.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.native.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let stream = NativeStream::Tls(Box::new(stream));
                                let _ = connections.send(NativeIo { stream, _permit: permit }).await;
                            }
                            Ok(Err(error)) => debug!(peer, %error, "TLS handshake failed"),
                            Err(_) => debug!(peer, "TLS handshake timed out"),
                        }
                    });
                }
            },
            Kind::MqttTcp => spawn_holding(permit, wharf_mqtt::serve(front_ends.mqtt, stream, peer)),
            Kind::AmqpTcp => spawn_holding(permit, wharf_amqp::serve(front_ends.amqp, stream, peer)),
            Kind::MqttTls | Kind::AmqpTls => {
                let Some(tls) = tls.clone() else { continue };
                let is_mqtt = matches!(kind, Kind::MqttTls);
                spawn_holding(permit, async move {
                    let acceptor = if is_mqtt { tls.mqtt } else { tls.amqp };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) if is_mqtt => wharf_mqtt::serve(front_ends.mqtt, stream, peer).await,
                        Ok(Ok(stream)) => wharf_amqp::serve(front_ends.amqp, stream, peer).await,
                        Ok(Err(error)) => debug!(peer, %error, "TLS handshake failed"),
                        Err(_) => debug!(peer, "TLS handshake timed out"),
                    }
                });
            }
            Kind::MqttWebSocket => spawn_holding(permit, serve_websocket(front_ends.mqtt, stream, peer)),
        }
    }
}

/// How long calls in flight on native connections may take to finish once the listeners stop.
const NATIVE_DRAIN: Duration = Duration::from_secs(2);

/// Accepted native connections waiting for the gRPC server.
const NATIVE_ACCEPTED_BUFFERED: usize = 64;

/// Serve the native gRPC API on the connections the accept loop hands over, until stopped.
async fn serve_native(
    native: Arc<wharf_native::Native>,
    incoming: mpsc::Receiver<NativeIo>,
    mut stopped: watch::Receiver<bool>,
) {
    let config = native.config();
    let keepalive = (config.keepalive_secs > 0).then(|| Duration::from_secs(config.keepalive_secs.into()));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
    let mut drained = stopped.clone();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.streams_per_connection_max))
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout_secs.into())))
        .add_service(native.service())
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        });
    // A graceful stop waits for clients to close their connections, which idle clients never
    // do: calls in flight get a moment to finish, then the connections are dropped.
    let drain = async move {
        let _ = drained.wait_for(|stop| *stop).await;
        tokio::time::sleep(NATIVE_DRAIN).await;
    };
    tokio::select! {
        served = server => if let Err(error) = served {
            warn!(%error, "the native gRPC server failed");
        },
        () = drain => debug!("native connections still open after the drain: dropped"),
    }
}

/// A native connection's byte stream, holding its `listeners.connections_max` permit.
struct NativeIo {
    stream: NativeStream,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for NativeIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NativeIo")
    }
}

enum NativeStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for NativeIo {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for NativeIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            NativeStream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            NativeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NativeIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            NativeStream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            NativeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            NativeStream::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            NativeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            NativeStream::Tcp(stream) => stream.is_write_vectored(),
            NativeStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            NativeStream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            NativeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            NativeStream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            NativeStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Run `connection` as a task holding its `listeners.connections_max` permit until it ends.
fn spawn_holding(permit: OwnedSemaphorePermit, connection: impl Future<Output = ()> + Send + 'static) {
    // `map` keeps the future in place; an async block awaiting it would hold it twice.
    tokio::spawn(connection.map(move |()| drop(permit)));
}

/// Accept a WebSocket on `/mqtt` with subprotocol `mqtt`, and bridge its binary messages to the
/// MQTT engine as a byte stream (an MQTT packet may span messages, and a message hold several).
async fn serve_websocket(broker: Arc<Broker>, stream: TcpStream, peer: String) {
    let ws =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::accept_hdr_async(stream, websocket_handshake))
            .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(error)) => {
                debug!(peer, %error, "WebSocket handshake failed");
                return;
            }
            Err(_) => {
                debug!(peer, "WebSocket handshake timed out");
                return;
            }
        };
    let (engine_side, bridge_side) = tokio::io::duplex(WEBSOCKET_BRIDGE_BYTES);
    let engine = tokio::spawn(wharf_mqtt::serve(broker, engine_side, peer));
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut from_engine, mut to_engine) = tokio::io::split(bridge_side);
    let inbound = async {
        while let Some(message) = ws_rx.next().await {
            match message {
                Ok(WsMessage::Binary(data)) => {
                    if to_engine.write_all(&data).await.is_err() {
                        break;
                    }
                }
                // MQTT over WebSocket is binary only [MQTT-6.0.0-1]: anything else closes.
                Ok(WsMessage::Text(_)) | Ok(WsMessage::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = to_engine.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; WEBSOCKET_BRIDGE_BYTES];
        loop {
            match from_engine.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(WsMessage::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    // Either side ending ends the bridge: the engine sees end of stream, or the peer is gone.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    // The engine sees the end of its stream at once (rather than lingering on an open pipe).
    drop((from_engine, to_engine));
    let _ = engine.await;
}

/// Check the WebSocket upgrade request: path `/mqtt` and an MQTT subprotocol, which is echoed.
#[expect(clippy::result_large_err, reason = "the error type is tungstenite's handshake callback's")]
fn websocket_handshake(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != WEBSOCKET_PATH {
        let mut error = ErrorResponse::new(Some(format!("MQTT is served on {WEBSOCKET_PATH}")));
        *error.status_mut() = StatusCode::NOT_FOUND;
        return Err(error);
    }
    let offered = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find(|protocol| WEBSOCKET_SUBPROTOCOLS.contains(protocol))
        .map(str::to_owned);
    match offered {
        Some(protocol) => {
            if let Ok(value) = HeaderValue::from_str(&protocol) {
                response.headers_mut().insert("sec-websocket-protocol", value);
            }
            Ok(response)
        }
        None => {
            let mut error = ErrorResponse::new(Some("the WebSocket subprotocol must be mqtt".into()));
            *error.status_mut() = StatusCode::BAD_REQUEST;
            Err(error)
        }
    }
}

/// The cluster listener of a node of a cluster: its peers' Raft RPCs and forwarded requests, over
/// gRPC, served until the returned task is aborted.
#[derive(Debug)]
pub struct ClusterListener {
    task: tokio::task::JoinHandle<()>,
}

impl ClusterListener {
    /// Bind `address` and serve `service`'s groups there as node `me`, with messages of at most
    /// `message_size_max_bytes`.
    pub async fn start(
        address: &str,
        me: u64,
        service: Arc<wharf_core::raft::transport::RaftService>,
        message_size_max_bytes: usize,
    ) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(address).await.with_context(|| format!("binding the cluster listener on {address}"))?;
        let address = listener.local_addr()?;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_max_pending_accept_reset_streams(Some(CLUSTER_PENDING_RESET_STREAMS_MAX))
            .add_service(wharf_core::raft::grpc::raft_server(me, service, message_size_max_bytes));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            if let Err(error) = router.serve_with_incoming(incoming).await {
                warn!(%error, "the cluster listener failed");
            }
        });
        info!(%address, "cluster listener serving");
        Ok(Self { task })
    }

    /// Stop serving: peers' connections are dropped (after the core has shut down, they would only
    /// be answered "unreachable").
    pub fn stop(&self) {
        self.task.abort();
    }
}
