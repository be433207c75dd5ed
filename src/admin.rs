//! The admin HTTP endpoint (axum): `/healthz` (the process runs), `/readyz` (the core serves
//! requests), `/metrics` (Prometheus text), `/cluster` (the Raft groups as this node sees them,
//! JSON), and the cluster's membership changes, `POST /cluster/join` and `POST /cluster/leave`,
//! and leadership hand-overs, `POST /cluster/transfer-leader` (through the core's API; from this
//! host only unless `admin.remote_changes`). Changes no other broker state.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use wharf_core::node::{GroupLeader, GroupMembers};
use wharf_core::{Core, CoreError};

use crate::telemetry::{ADMIN_HTTP_REQUESTS_TOTAL, UPTIME_SECONDS};

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Paths served; any other path is counted as `other` so that scanners cannot grow the label set.
const PATHS: [&str; 7] = ["/healthz", "/readyz", "/metrics", CLUSTER_PATH, JOIN_PATH, LEAVE_PATH, TRANSFER_PATH];

/// Where the Raft groups' status is served.
pub const CLUSTER_PATH: &str = "/cluster";
/// Where a node is added to the cluster ([`JoinRequest`], POST).
pub const JOIN_PATH: &str = "/cluster/join";
/// Where a node is removed from the cluster ([`LeaveRequest`], POST).
pub const LEAVE_PATH: &str = "/cluster/leave";
/// Where leaderships are handed over ([`TransferRequest`], POST).
pub const TRANSFER_PATH: &str = "/cluster/transfer-leader";

/// Default of a membership change's `timeout_secs`: a new node's catching up (snapshots of every
/// group included) fits in it on a modest cluster.
pub const CHANGE_TIMEOUT_SECS_DEFAULT: u64 = 300;
/// Longest `timeout_secs` a membership change may ask for.
const CHANGE_TIMEOUT_SECS_MAX: u64 = 86_400;

/// The body of `POST /cluster/join`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The new node's `node.id`.
    pub id: u64,
    /// Its cluster listener's address as the others reach it, `host:port`.
    pub addr: String,
    /// How long the whole change may take, seconds (default [`CHANGE_TIMEOUT_SECS_DEFAULT`]).
    #[serde(default = "change_timeout_secs_default")]
    pub timeout_secs: u64,
}

/// The body of `POST /cluster/leave`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The node to remove (not the one asked).
    pub id: u64,
    /// How long the whole change may take, seconds (default [`CHANGE_TIMEOUT_SECS_DEFAULT`]).
    #[serde(default = "change_timeout_secs_default")]
    pub timeout_secs: u64,
}

/// The body of `POST /cluster/transfer-leader`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The node that is to lead.
    pub to: u64,
    /// One group (`meta`, `shard-3`); every group when absent.
    #[serde(default)]
    pub group: Option<String>,
    /// How long the whole hand-over may take, seconds (default [`CHANGE_TIMEOUT_SECS_DEFAULT`]).
    #[serde(default = "change_timeout_secs_default")]
    pub timeout_secs: u64,
}

/// The answer to a hand-over: the groups' leaders afterwards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeadersChanged {
    /// The node that was asked.
    pub node_id: u64,
    /// The groups handed over, with their leader.
    pub groups: Vec<GroupLeader>,
}

fn change_timeout_secs_default() -> u64 {
    CHANGE_TIMEOUT_SECS_DEFAULT
}

/// The answer to a membership change: every group's voters afterwards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MembersChanged {
    /// The node that made the change.
    pub node_id: u64,
    /// Every group's voters.
    pub groups: Vec<GroupMembers>,
}

/// The answer of `/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// Its view of every group.
    pub groups: Vec<wharf_core::node::GroupStatus>,
}

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Set once the core has opened. The endpoint starts first so that `/healthz` answers while
    /// the core recovers its logs, which can take a while; `/readyz` says 503 until then.
    core: Arc<OnceLock<Core>>,
    metrics: PrometheusHandle,
    started: Instant,
    /// Membership changes are taken from other hosts too (`admin.remote_changes`).
    remote_changes: bool,
}

impl AdminState {
    /// State for a process that started at `started` and whose core will be put in `core`;
    /// membership changes from other hosts only if `remote_changes`.
    pub fn new(core: Arc<OnceLock<Core>>, metrics: PrometheusHandle, started: Instant, remote_changes: bool) -> Self {
        Self { core, metrics, started, remote_changes }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route(CLUSTER_PATH, get(cluster))
        .route(JOIN_PATH, post(join))
        .route(LEAVE_PATH, post(leave))
        .route(TRANSFER_PATH, post(transfer))
        .fallback(not_found)
        // Added after the routes and the fallback, so it wraps all of them.
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

/// Serve the admin routes on `listener` until `shutdown` completes, then finish the requests in
/// flight and return.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    match state.core.get() {
        Some(core) if core.is_ready() => (StatusCode::OK, "ready\n"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: the core is opening\n"),
    }
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    gauge!(UPTIME_SECONDS).set(state.started.elapsed().as_secs_f64());
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], state.metrics.render()).into_response()
}

async fn cluster(State(state): State<AdminState>) -> Response {
    let Some(core) = state.core.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: the core is opening\n").into_response();
    };
    json_or_error(Ok(ClusterStatus { node_id: core.config().node_id, groups: core.group_status() }))
}

async fn join(State(state): State<AdminState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, body: Bytes) -> Response {
    let (core, request, timeout) = match change_request(&state, peer, &body, |r: &JoinRequest| r.timeout_secs) {
        Ok(checked) => checked,
        Err(refusal) => return refusal.into_response(),
    };
    members_changed(core, core.add_node(request.id, &request.addr, timeout).await)
}

async fn leave(State(state): State<AdminState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, body: Bytes) -> Response {
    let (core, request, timeout) = match change_request(&state, peer, &body, |r: &LeaveRequest| r.timeout_secs) {
        Ok(checked) => checked,
        Err(refusal) => return refusal.into_response(),
    };
    members_changed(core, core.remove_node(request.id, timeout).await)
}

async fn transfer(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let (core, request, timeout) = match change_request(&state, peer, &body, |r: &TransferRequest| r.timeout_secs) {
        Ok(checked) => checked,
        Err(refusal) => return refusal.into_response(),
    };
    let moved = core.transfer_leadership(request.group.as_deref(), request.to, timeout).await;
    json_or_error(moved.map(|groups| LeadersChanged { node_id: core.config().node_id, groups }))
}

/// A membership change's core, request and timeout (read by `timeout_secs`), or the answer
/// refusing it: from another host (unless allowed), before the core opened, with a body that is
/// not the request, or with a timeout out of range.
fn change_request<'a, T: serde::de::DeserializeOwned>(
    state: &'a AdminState,
    peer: SocketAddr,
    body: &[u8],
    timeout_secs: fn(&T) -> u64,
) -> Result<(&'a Core, T, Duration), (StatusCode, String)> {
    if !state.remote_changes && !peer.ip().is_loopback() {
        let text = format!(
            "membership changes are taken from this host only (admin.remote_changes), not from {}\n",
            peer.ip()
        );
        return Err((StatusCode::FORBIDDEN, text));
    }
    let Some(core) = state.core.get() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "not ready: the core is opening\n".into()));
    };
    let request: T = serde_json::from_slice(body)
        .map_err(|error| (StatusCode::BAD_REQUEST, format!("malformed request: {error}\n")))?;
    let timeout_secs = timeout_secs(&request);
    if timeout_secs == 0 || timeout_secs > CHANGE_TIMEOUT_SECS_MAX {
        let text = format!("timeout_secs must be between 1 and {CHANGE_TIMEOUT_SECS_MAX}, not {timeout_secs}\n");
        return Err((StatusCode::BAD_REQUEST, text));
    }
    Ok((core, request, Duration::from_secs(timeout_secs)))
}

/// The answer to a membership change: the groups' voters, or the core's error with its status.
fn members_changed(core: &Core, changed: Result<Vec<GroupMembers>, CoreError>) -> Response {
    json_or_error(changed.map(|groups| MembersChanged { node_id: core.config().node_id, groups }))
}

/// `answer` as JSON, or the core's error with its status (400 for a refusal, 404 for an unknown
/// group, 503 for what may work when asked again).
fn json_or_error<T: serde::Serialize>(answer: Result<T, CoreError>) -> Response {
    match answer {
        Ok(answer) => match serde_json::to_string(&answer) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        },
        Err(error) => {
            let status = match &error {
                CoreError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                CoreError::NotFound(_) => StatusCode::NOT_FOUND,
                error if error.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, format!("{error}\n")).into_response()
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found\n")
}

async fn count_requests(request: Request, next: Next) -> Response {
    let path = path_label(request.uri().path());
    let response = next.run(request).await;
    counter!(ADMIN_HTTP_REQUESTS_TOTAL, "path" => path, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

fn path_label(path: &str) -> &'static str {
    PATHS.into_iter().find(|known| *known == path).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(path_label("/readyz"), "/readyz");
        assert_eq!(path_label("/readyz/"), "other");
        assert_eq!(path_label("/wp-login.php"), "other");
    }
}
