//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process is alive and its
//! loops run) and `/readyz` (subscribed and assigned partitions; Redis state reported, but a down
//! Redis only degrades: the worker screens without it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::error::{Error, Result};
use crate::serve::redis_cache::RedisState;
use crate::serve::telemetry::Telemetry;

/// What the health endpoints report; written by the worker's loops.
#[derive(Default)]
pub struct Health {
    /// The consumer subscribed and its loop runs.
    pub consuming: AtomicBool,
    /// Partitions are assigned to this worker (a worker with none, in a group larger than the
    /// topic's partition count, is alive but idle).
    pub assigned: AtomicBool,
    /// Shutting down: not ready any more.
    pub stopping: AtomicBool,
    /// 0 disabled, 1 up, 2 down.
    pub redis: AtomicU8,
}

impl Health {
    pub fn set_redis(&self, s: RedisState) {
        let v = match s {
            RedisState::Disabled => 0,
            RedisState::Up => 1,
            RedisState::Down => 2,
        };
        self.redis.store(v, Ordering::Relaxed);
    }

    fn redis(&self) -> RedisState {
        match self.redis.load(Ordering::Relaxed) {
            0 => RedisState::Disabled,
            1 => RedisState::Up,
            _ => RedisState::Down,
        }
    }

    /// `(http status, body)` for `/readyz`.
    pub fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let consuming = self.consuming.load(Ordering::Relaxed);
        let stopping = self.stopping.load(Ordering::Relaxed);
        let redis = self.redis();
        let status = if stopping {
            "stopping"
        } else if !consuming {
            "starting"
        } else if redis == RedisState::Down {
            "degraded"
        } else {
            "ready"
        };
        let code = match status {
            "ready" | "degraded" => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = json!({
            "status": status,
            "kafka": if consuming { "consuming" } else { "connecting" },
            "partitions_assigned": self.assigned.load(Ordering::Relaxed),
            "redis": redis.as_str(),
        });
        (code, body)
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    telemetry: Arc<Telemetry>,
}

/// Binds the listener now (so a taken port fails the start) and serves it in the background.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    telemetry: Arc<Telemetry>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Serve(format!(
            "admin listener on {addr}: {e} (choose another with --admin-addr, or \"\" to turn it off)"
        ))
    })?;
    let bound = listener.local_addr().map_err(|e| Error::io("admin", e))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { health, telemetry });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.telemetry.render_prometheus(),
    )
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    let alive = !s.health.stopping.load(Ordering::Relaxed);
    let code = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, if alive { "ok\n" } else { "stopping\n" })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let (code, body) = s.health.readiness();
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
