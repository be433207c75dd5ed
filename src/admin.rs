//! The admin HTTP endpoint (axum): `/healthz` (the process runs), `/readyz` (the core serves
//! requests), `/metrics` (Prometheus text) and `/cluster` (the Raft groups as this node sees
//! them, JSON). Reads the core's readiness and state and renders metrics; it changes no broker
//! state.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use wharf_core::Core;

use crate::telemetry::{ADMIN_HTTP_REQUESTS_TOTAL, UPTIME_SECONDS};

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Paths served; any other path is counted as `other` so that scanners cannot grow the label set.
const PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", CLUSTER_PATH];

/// Where the Raft groups' status is served.
pub const CLUSTER_PATH: &str = "/cluster";

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
}

impl AdminState {
    /// State for a process that started at `started` and whose core will be put in `core`.
    pub fn new(core: Arc<OnceLock<Core>>, metrics: PrometheusHandle, started: Instant) -> Self {
        Self { core, metrics, started }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route(CLUSTER_PATH, get(cluster))
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
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
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
    let status = ClusterStatus { node_id: core.config().node_id, groups: core.group_status() };
    match serde_json::to_string(&status) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
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
