//! The HTTP ingress: validate, enqueue, answer. It never runs job logic.
//!
//! - `POST /v1/queues/{queue}/jobs`, `POST /v1/queues/{queue}/jobs:batch` → 202 + ids
//! - `GET /v1/jobs/{queue}/{id}[?wait=N]` → queued | running | done | dead
//! - `POST /v1/hooks/{source}` → signed webhooks
//! - `GET /healthz`, `/readyz`, `/metrics`, `/openapi.json`
//! - the pipelines' text routes ([`TextRoute`], from the registry; the binary's
//!   `POST /v1/logs` is one): a text body → one job
//!
//! Every failure is one JSON envelope, `{"error":{"code","message","request_id"}}`,
//! rendered in one place (`envelope`) from an [`ApiError`] or, for failures axum
//! produces itself (unknown route, wrong method), from the status code. The request id
//! is also in the `x-request-id` header and in the request's log line.

pub mod admin;
mod auth;
mod codes;
mod routes;
mod serve;
mod text_route;
mod ui;
mod waiters;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::{info, warn};

use self::waiters::Waiters;
use crate::config::Config;
use crate::listener;
use crate::registry::Registry;
use crate::telemetry as t;

pub use auth::hash_token;
pub use codes::ERRORS;
pub use text_route::{Caller, Refusal, TextRoute, openapi_document};

/// The OpenAPI document of these endpoints (checked in beside this file).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Shared state of the ingress.
/// Checks the ingress settings against the job kinds: every queue a token names is a
/// public kind, every hook targets a registered kind. An error names the key.
pub fn check_config(cfg: &Config, registry: &Registry) -> Result<(), String> {
    for (n, t) in cfg.ingress.tokens.iter().enumerate() {
        for q in t.queues.iter().filter(|q| *q != "*") {
            if !registry.contains(q) {
                return Err(format!("ingress.tokens[{n}].queues: no job kind {q:?}"));
            }
            if !registry.is_public(q) {
                return Err(format!(
                    "ingress.tokens[{n}].queues: {q:?} is an internal kind and is never enqueued over HTTP"
                ));
            }
        }
    }
    // Scopes: `read_all` and `admin:*` are the runtime's; the others are the text
    // routes'. The admin routes reach every registered queue and every customer's jobs:
    // a token that holds an admin scope and also names queues or customers would look
    // limited and not be.
    for (n, t) in cfg.ingress.tokens.iter().enumerate() {
        let admin = t
            .scopes
            .iter()
            .any(|s| s == admin::READ || s == admin::WRITE);
        if admin && (!t.queues.is_empty() || t.customers.is_some()) {
            return Err(format!(
                "ingress.tokens[{n}]: an admin:read/admin:write token acts on every queue; give it no queues or customers (enqueue with another token)"
            ));
        }
        for s in &t.scopes {
            let known = s == "read_all"
                || s == admin::READ
                || s == admin::WRITE
                || registry.text_routes().iter().any(|r| r.scope == s);
            if !known {
                let mut all: Vec<&str> = registry.text_routes().iter().map(|r| r.scope).collect();
                all.extend(["read_all", admin::READ, admin::WRITE]);
                all.sort_unstable();
                all.dedup();
                return Err(format!(
                    "ingress.tokens[{n}].scopes: {s:?}: known scopes are {}",
                    all.iter()
                        .map(|a| format!("{a:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    for r in registry.text_routes() {
        if !registry.contains(r.queue) {
            return Err(format!("text route {}: no job kind {:?}", r.path, r.queue));
        }
        // A route's scope is its own right: never the runtime's `read_all` (every
        // reading token could post), and spelt as a token's scopes must be.
        if r.scope == "read_all"
            || r.scope.is_empty()
            || !r.scope.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(format!(
                "text route {}: scope {:?} must be [a-z_]+ and not \"read_all\"",
                r.path, r.scope
            ));
        }
        // axum refuses (panics on) a segment in its old `:param` / `*rest` syntax.
        let old_syntax = r.path.split('/').any(|s| s.starts_with([':', '*']));
        if !r.path.starts_with("/v1/") || r.path.contains("{*") || old_syntax {
            return Err(format!(
                "text route {}: the path must be under /v1/ and have no catch-all segment nor a `:`/`*` one",
                r.path
            ));
        }
        if let Some(p) = Ingress::runtime_paths()
            .into_iter()
            .find(|p| paths_overlap(p, r.path))
        {
            return Err(format!(
                "text route {}: the path matches requests of the runtime's {p}",
                r.path
            ));
        }
    }
    // A path axum cannot take (`/v1/{a}.json`, an unclosed brace) would panic when the
    // ingress builds its router, after it started listening: refuse it here instead.
    let mut scratch = matchit::Router::new();
    for r in registry.text_routes() {
        scratch.insert(r.path, ()).map_err(|e| {
            format!(
                "text route {}: the path is not a route pattern: {e}",
                r.path
            )
        })?;
    }
    let routes = registry.text_routes();
    for (i, a) in routes.iter().enumerate() {
        if let Some(b) = routes[i + 1..]
            .iter()
            .find(|b| paths_overlap(a.path, b.path))
        {
            return Err(format!(
                "text routes {} and {}: the paths match the same requests",
                a.path, b.path
            ));
        }
    }
    for (name, h) in &cfg.hooks {
        if !registry.contains(&h.queue) {
            return Err(format!("hooks.{name}.queue: no job kind {:?}", h.queue));
        }
        if h.sign_delivery_id && h.delivery_header.is_none() {
            return Err(format!(
                "hooks.{name}.sign_delivery_id: needs delivery_header (the header the id comes in)"
            ));
        }
        // A signed delivery is accepted up to `tolerance` either side of now; its
        // dedupe key must outlive that window, or a replay late in it enqueues again.
        if h.timestamp_header.is_some() && h.tolerance * 2 > cfg.enqueue.idempotency_ttl {
            return Err(format!(
                "hooks.{name}.tolerance: {:?} is more than half of enqueue.idempotency_ttl ({:?}); a replay late in the window would not be recognised",
                h.tolerance, cfg.enqueue.idempotency_ttl
            ));
        }
    }
    Ok(())
}

/// The HTTP ingress: authenticates, limits and validates requests and only enqueues; see `docs/ingress.md`.
pub struct Ingress {
    pool: PgPool,
    registry: Registry,
    cfg: Arc<Config>,
    tokens: auth::Tokens,
    /// Requests no token vouches for (a failed authentication, a webhook, /readyz),
    /// per client address: an unauthenticated flood gets 429, not the database.
    anonymous: auth::Anonymous,
    waiters: Waiters,
    /// Job status reads so far (`GET /v1/jobs/...`, every re-check of a long poll).
    status_reads: std::sync::atomic::AtomicU64,
    /// Permits for `?wait=` long polls in progress (`ingress.max_waiters`).
    waiting: Arc<tokio::sync::Semaphore>,
    /// `ingress.trusted_proxies`.
    proxies: Vec<ipnet::IpNet>,
    metrics: Option<PrometheusHandle>,
    /// `/openapi.json`: the runtime's document with the text routes' path items.
    openapi: String,
}

/// The client's address, put into each request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub std::net::IpAddr);

impl Ingress {
    /// An ingress over `pool` for the kinds of `registry` (and the routes its pipelines mount), with `cfg`'s tokens, hooks and limits.
    pub fn new(
        pool: PgPool,
        registry: Registry,
        cfg: Arc<Config>,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Self> {
        let registry_routes = &registry.text_routes().to_vec();
        Arc::new(Ingress {
            tokens: auth::Tokens::from_config(&cfg.ingress.tokens),
            anonymous: auth::Anonymous::new(
                cfg.ingress.anonymous_rate_per_second,
                cfg.ingress.anonymous_burst,
            ),
            waiting: Arc::new(tokio::sync::Semaphore::new(cfg.ingress.max_waiters)),
            proxies: cfg
                .ingress
                .trusted_proxies
                .iter()
                .filter_map(|p| {
                    p.parse::<ipnet::IpNet>()
                        .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .ok()
                })
                .collect(),
            pool,
            registry,
            cfg,
            waiters: Waiters::default(),
            status_reads: Default::default(),
            metrics,
            openapi: openapi_document(registry_routes).to_string(),
        })
    }

    /// The client's address: the connection's peer, or, when that peer is a trusted
    /// proxy, the nearest address in `X-Forwarded-For` that is not one (the entries
    /// before it are the client's to write, so they are not believed).
    pub(crate) fn client(
        &self,
        peer: Option<axum::Extension<Peer>>,
        headers: &axum::http::HeaderMap,
    ) -> Option<std::net::IpAddr> {
        Some(forwarded_client(peer?.0.0, headers, &self.proxies))
    }

    /// Job status reads so far, long polls' re-checks included (the `waiters` bench).
    pub fn status_reads(&self) -> u64 {
        self.status_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The routes with the not-found fallback, the panic guard and the error envelope (each
    /// route keeps its own body limit). The connection caps and the header timeout are
    /// not here: [`Ingress::serve`] applies them to the listener.
    pub fn router(self: &Arc<Self>) -> Router {
        self.layered(self.routes())
    }

    /// The runtime's own routes: the one list its router is built from and the text
    /// routes are checked against.
    fn runtime_routes() -> [(&'static str, MethodRouter<Arc<Self>>); 23] {
        [
            ("/v1/queues/{queue}/jobs", post(routes::enqueue_one)),
            ("/v1/queues/{queue}/jobs:batch", post(routes::enqueue_batch)),
            ("/v1/jobs/{queue}/{id}", get(routes::job_status)),
            ("/v1/hooks/{source}", post(routes::hook)),
            ("/healthz", get(routes::healthz)),
            ("/readyz", get(routes::readyz)),
            ("/metrics", get(routes::public_metrics)),
            ("/openapi.json", get(routes::openapi)),
            ("/v1/admin/queues", get(admin::queues)),
            ("/v1/admin/queues/{queue}/pause", post(admin::pause)),
            ("/v1/admin/queues/{queue}/resume", post(admin::resume)),
            ("/v1/admin/jobs/{queue}/{id}/cancel", post(admin::cancel)),
            ("/v1/admin/jobs/{queue}/{id}/retry", post(admin::retry)),
            ("/v1/admin/queues/{queue}/jobs", get(admin::jobs)),
            ("/v1/admin/queues/{queue}/bulk", post(admin::bulk)),
            ("/v1/admin/jobs/{queue}/{id}", get(admin::job)),
            ("/v1/admin/dead_letters", get(admin::dead_letters)),
            (
                "/v1/admin/dead_letters/{queue}/retry",
                post(admin::dlq_retry),
            ),
            (
                "/v1/admin/dead_letters/{queue}/purge",
                post(admin::dlq_purge),
            ),
            ("/v1/admin/schedules", get(admin::schedules)),
            ("/v1/admin/errors", get(admin::errors)),
            ("/v1/admin/views", get(admin::views)),
            ("/v1/admin/views/{name}", get(admin::view)),
        ]
    }

    /// The paths the runtime serves itself (the pipelines' text routes come on top).
    pub fn runtime_paths() -> Vec<&'static str> {
        Self::runtime_routes().into_iter().map(|(p, _)| p).collect()
    }

    fn routes(&self) -> Router<Arc<Self>> {
        let mut r = Router::new();
        for (path, method) in Self::runtime_routes() {
            r = r.route(path, method);
        }
        // The console: HTML pages, not part of the API's document.
        for (path, method) in ui::routes() {
            r = r.route(path, method);
        }
        for (i, t) in self.registry.text_routes().iter().enumerate() {
            r = r.route(
                t.path,
                post(
                    move |st: axum::extract::State<Arc<Ingress>>,
                          slot: axum::Extension<CallerSlot>,
                          peer: Option<axum::Extension<Peer>>,
                          headers: axum::http::HeaderMap,
                          body: axum::body::Body| {
                        routes::text(st, slot, peer, headers, body, i)
                    },
                ),
            );
        }
        r
    }

    /// The routes with the fallback, the panic guard and the envelope.
    fn layered(self: &Arc<Self>, routes: Router<Arc<Self>>) -> Router {
        routes
            .fallback(routes::not_found)
            // A panic in a handler is a 500 in the envelope with the request id (the
            // layer below the envelope), never a reset connection.
            .layer(CatchPanicLayer::custom(panicked))
            .layer(middleware::from_fn(envelope))
            .with_state(self.clone())
    }

    /// Serves until `stop`; in-flight requests finish (graceful shutdown).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let waiters = self.waiters.clone();
        let on_done: listener::OnEvent = Arc::new(move |e| waiters.on_event(e));
        // No LISTEN through a transaction-mode pooler: `?wait` re-checks every second.
        let lst = (!crate::db::pooled()).then(|| {
            tokio::spawn(listener::run(
                self.pool.clone(),
                listener::DONE,
                on_done,
                stop.clone(),
            ))
        });
        let renew = {
            let (waiters, pool, stop) = (self.waiters.clone(), self.pool.clone(), stop.clone());
            let limit = self.cfg.ingress.db_timeout;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(waiters::RENEW_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = every.tick() => {
                            if tokio::time::timeout(limit, waiters.renew(&pool)).await.is_err() {
                                warn!("the completion watch was not renewed in time; waiters poll meanwhile");
                            }
                        }
                    }
                }
            })
        };
        let limits = serve::Limits {
            max_connections: self.cfg.ingress.max_connections,
            per_address: self.cfg.ingress.max_connections_per_address,
            header_timeout: self.cfg.ingress.header_timeout,
        };
        // /metrics (and the probes) on a listener of their own when configured, so the
        // public port carries only the API.
        let admin = match &self.cfg.ingress.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr).await?;
                info!(addr = %l.local_addr()?, "metrics listening");
                let admin_app = Router::new()
                    .route("/metrics", get(routes::metrics))
                    .route("/healthz", get(routes::healthz))
                    .route("/readyz", get(routes::readyz))
                    .fallback(routes::not_found)
                    .layer(middleware::from_fn(envelope))
                    .with_state(self.clone());
                Some(tokio::spawn(serve::run(l, admin_app, limits, stop.clone())))
            }
            None => None,
        };
        let r = serve::run(listener, self.router(), limits, stop.clone()).await;
        stop.cancel();
        if let Some(a) = admin {
            let _ = a.await;
        }
        if let Some(l) = lst {
            let _ = l.await;
        }
        let _ = renew.await;
        r
    }
}

/// The authenticated caller's name, filled in by the route, read by [`envelope`] for
/// the request's log line (the audit trail names who did what; never the token).
#[derive(Clone, Default)]
pub(crate) struct CallerSlot(Arc<Mutex<Option<String>>>);

impl CallerSlot {
    pub(crate) fn set(&self, name: &str) {
        *self.0.lock().expect("not poisoned") = Some(name.to_string());
    }
    fn get(&self) -> Option<String> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// A failure with its machine code. Rendered into the envelope by `envelope`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine code (`invalid_args`, `rate_limited`, …), one of [`ERRORS`].
    pub code: &'static str,
    /// The human message; never a secret or a caller's body.
    pub message: String,
    /// Seconds for a `Retry-After` header, if the caller should come back.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with its status and code; in debug builds the pair must be listed in [`ERRORS`].
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(
            codes::is_known(status.as_u16(), code),
            "undocumented ingress error {status} {code}: add it to ingress/codes.rs, the OpenAPI document and docs/ingress.md"
        );
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Asks the caller to retry after `secs` seconds (at least 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// A database failure: unreachable or too slow → 503 + Retry-After; other → 500.
    /// The message never carries the driver's text (it may name hosts or users).
    pub fn database(e: &sqlx::Error) -> Self {
        // Unreachable or shedding load: connection-level failures, and SQLSTATE classes
        // 57 (operator intervention: shutdown, restart, canceled statement, "cannot
        // connect now"), 08 (connection exception) and 53 (insufficient resources,
        // e.g. too many connections). All pass: 503, retry.
        let unavailable = match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("57") || c.starts_with("08") || c.starts_with("53")),
            _ => false,
        };
        warn!(error = %e, unavailable, "database error");
        if unavailable {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; try again",
            )
            .retry_after(1)
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

/// Carried from [`ApiError`] to the [`envelope`] middleware in the response extensions.
#[derive(Clone)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = self.status.into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r.extensions_mut().insert(ErrorBody {
            code: self.code,
            message: self.message,
        });
        r
    }
}

/// Request id, error envelope, metrics and one log line per request.
async fn envelope(mut req: Request, next: Next) -> Response {
    let rid = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // A closed set of labels: a made-up method must not mint a new series (or a long
    // log field) per request.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let slot = CallerSlot::default();
    req.extensions_mut().insert(slot.clone());
    let started = Instant::now();
    let mut resp = next.run(req).await;
    let mut status = resp.status();
    // A console page answers HTML, errors included.
    let html = resp.extensions().get::<ui::HtmlPage>().is_some();
    if !html && (status.is_client_error() || status.is_server_error()) {
        let (code, message) = match resp.extensions().get::<ErrorBody>() {
            Some(e) => (e.code, e.message.clone()),
            None => default_error(status),
        };
        // Only documented pairs leave: a status some layer produced that the table does
        // not list becomes its class's generic error.
        let code = if codes::is_known(status.as_u16(), code) {
            code
        } else if status.is_server_error() {
            status = StatusCode::INTERNAL_SERVER_ERROR;
            "internal"
        } else {
            status = StatusCode::BAD_REQUEST;
            "bad_request"
        };
        let keep: Vec<_> = [header::RETRY_AFTER, header::ALLOW]
            .into_iter()
            .filter_map(|h| resp.headers().get(&h).cloned().map(|v| (h, v)))
            .collect();
        resp = (
            status,
            axum::Json(json!({"error": {"code": code, "message": message, "request_id": rid}})),
        )
            .into_response();
        for (h, v) in keep {
            resp.headers_mut().insert(h, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let secs = started.elapsed().as_secs_f64();
    let st = status.as_u16().to_string();
    metrics::counter!(t::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => st).increment(1);
    metrics::histogram!(t::HTTP_DURATION, "route" => route.clone()).record(secs);
    let caller = slot.get();
    info!(request_id = %rid, method, route, status = status.as_u16(), ms = secs * 1e3,
        caller = %caller.as_deref().unwrap_or("-"), "request");
    resp
}

/// The code of a failure axum produced itself (no route, wrong method, a limit layer).
fn default_error(status: StatusCode) -> (&'static str, String) {
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    (
        code,
        status.canonical_reason().unwrap_or("error").to_lowercase(),
    )
}

/// The response for a handler that panicked: logged (without the request's data) and
/// rendered as a 500 envelope by [`envelope`].
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(panic = %what, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
    .into_response()
}

/// Deadline helper for long polls.
pub(crate) fn clamp_wait(secs: f64, max: Duration) -> Duration {
    if !secs.is_finite() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(secs.min(max.as_secs_f64()))
}

/// Whether some request path matches both route patterns: as many segments, each pair
/// equal or either one a `{parameter}` (a segment with a parameter in it, such as
/// `v{n}`, is taken to match anything: a refusal too many is the safe side).
fn paths_overlap(a: &str, b: &str) -> bool {
    let param = |s: &str| s.contains('{');
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| x == y || param(x) || param(y))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    /// A handler that panics answers a 500 envelope with its request id; the
    /// connection is not reset.
    #[tokio::test]
    async fn a_panicking_handler_is_a_500_envelope() {
        let cfg = Config::load_runtime_from(std::path::Path::new("/nonexistent"), None, Vec::new())
            .expect("defaults load");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let ingress = Ingress::new(pool, Registry::new(), Arc::new(cfg), None);
        async fn boom() -> &'static str {
            panic!("a bug in a route")
        }
        let app = ingress.layered(ingress.routes().route("/boom", get(boom)));
        let req = Request::builder()
            .uri("/boom")
            .header("x-request-id", "req-42")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.expect("a response, not a reset");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()["x-request-id"], "req-42");
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": "internal", "message": "internal error", "request_id": "req-42"}})
        );
    }
}

/// The client behind `peer`: `peer` itself unless it is one of `proxies`; then the
/// nearest `X-Forwarded-For` hop (from the right) that is not a proxy. Entries left of
/// it were written by the client and are not believed.
fn forwarded_client(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    proxies: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let trusted = |a: &std::net::IpAddr| proxies.iter().any(|n| n.contains(a));
    let peer = peer.to_canonical();
    if !trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    // From the right: past trusted proxies to the first hop they vouch for. A hop that
    // does not parse ends the walk (everything left of it is unverified): the last
    // trusted address is the client as far as anyone can tell.
    let mut client = peer;
    for h in hops.iter().rev() {
        match h
            .trim()
            .parse::<std::net::IpAddr>()
            .map(|a| a.to_canonical())
        {
            Ok(a) if trusted(&a) => client = a,
            Ok(a) => return a,
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod forwarded_tests {
    use super::forwarded_client;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let mut h = HeaderMap::new();
        // The client wrote a fake first hop; the proxy appended the real one.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 203.0.113.9"),
        );
        assert_eq!(
            forwarded_client(ip("10.1.1.1"), &h, &proxies),
            ip("203.0.113.9")
        );
        // A direct client's header is ignored.
        assert_eq!(
            forwarded_client(ip("198.51.100.7"), &h, &proxies),
            ip("198.51.100.7")
        );
        // Two proxies in a row: the first untrusted hop from the right.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 203.0.113.9, 10.2.2.2"),
        );
        assert_eq!(
            forwarded_client(ip("10.1.1.1"), &h, &proxies),
            ip("203.0.113.9")
        );
        // A hop the proxy wrote that does not parse: the client-written ones left of it
        // are not believed.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, unknown"),
        );
        assert_eq!(
            forwarded_client(ip("10.1.1.1"), &h, &proxies),
            ip("10.1.1.1")
        );
        // An IPv4-mapped peer is the IPv4 proxy it is.
        assert_eq!(
            forwarded_client(ip("::ffff:10.1.1.1"), &h, &proxies),
            ip("10.1.1.1")
        );
        // A proxy with no header: the proxy itself.
        assert_eq!(
            forwarded_client(ip("10.1.1.1"), &HeaderMap::new(), &proxies),
            ip("10.1.1.1")
        );
    }
}
