//! The operator console at `/ui`: server-rendered HTML (maud templates compiled into
//! the binary) with htmx for the live refresh, every asset embedded, no CDN.
//!
//! Sign-in takes an `admin:read` or `admin:write` token and makes a session (see the
//! `ui_sessions` migration): an `HttpOnly; SameSite=Strict` cookie, `Secure` unless the
//! console is reached on a loopback address. Every POST carries the session's CSRF
//! token and, when the browser sends one, an `Origin` of this host; a read-only token
//! sees no action buttons and gets 403 if it posts anyway. The pages read through the
//! same store functions as the admin API, and act through the same ones as the CLI, so
//! every action is recorded under `token:<name>`.
//!
//! Pages answer HTML even on errors (the JSON envelope leaves them alone: [`HtmlPage`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use super::admin::{self, READ, WRITE};
use super::auth::Token;
use super::{ApiError, Ingress, Peer};
use crate::queue_name::QueueName;
use crate::store::browse::{self, ListState};
use crate::store::{self, BulkAction, BulkFilter, BulkState};

const HTMX: &str = include_str!("htmx.min.js");
const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The session cookie's name.
pub const COOKIE: &str = "longshore_session";
/// How long a session lasts after sign-in.
const SESSION_HOURS: i32 = 12;
/// Most jobs one click of a bulk action acts on; the page says when more remain.
const BULK_PER_CLICK: u64 = 100_000;

/// Marks a response as a console page: the error envelope passes it through.
#[derive(Clone, Copy)]
pub(crate) struct HtmlPage;

/// The console's routes (mounted beside the API's).
pub(super) fn routes() -> Vec<(&'static str, MethodRouter<Arc<Ingress>>)> {
    vec![
        ("/ui", get(overview)),
        ("/ui/login", get(login_page).post(login)),
        ("/ui/logout", post(logout)),
        ("/ui/queues/{queue}", get(queue_page)),
        ("/ui/queues/{queue}/pause", post(pause)),
        ("/ui/queues/{queue}/resume", post(resume)),
        ("/ui/queues/{queue}/bulk", post(bulk)),
        ("/ui/jobs/{queue}/{id}", get(job_page)),
        ("/ui/jobs/{queue}/{id}/cancel", post(cancel)),
        ("/ui/jobs/{queue}/{id}/retry", post(retry)),
        ("/ui/dead", get(dead_page)),
        ("/ui/dead/{queue}/retry", post(dead_retry)),
        ("/ui/dead/{queue}/purge", post(dead_purge)),
        ("/ui/schedules", get(schedules_page)),
        ("/ui/errors", get(errors_page)),
        ("/ui/views/{name}", get(view_page)),
        ("/ui/assets/htmx.min.js", get(asset_htmx)),
        ("/ui/assets/console.css", get(asset_css)),
        ("/ui/assets/console.js", get(asset_js)),
    ]
}

/// A signed-in operator.
struct Session<'a> {
    token: &'a Token,
    csrf: String,
}

impl Session<'_> {
    fn write(&self) -> bool {
        self.token.has(WRITE)
    }
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Equal in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An HTML answer with the console's security headers.
fn page(status: StatusCode, body: Markup) -> Response {
    let mut r = (status, body.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.extensions_mut().insert(HtmlPage);
    r
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.extensions_mut().insert(HtmlPage);
    r
}

/// An error page: the code and message as the API would give them.
fn error_page(status: StatusCode, code: &str, message: &str) -> Response {
    page(
        status,
        bare(
            "Error",
            html! {
                div.card {
                    h1 { "Refused" }
                    p { code { (code) } ": " (message) }
                    p { a href="/ui" { "Back to the overview" } }
                }
            },
        ),
    )
}

fn from_api(e: ApiError) -> Response {
    error_page(e.status, e.code, &e.message)
}

type UiResult = Result<Response, Response>;

/// The session of this request, or a redirect to sign in (a GET) / 401 (a POST).
async fn session<'a>(
    st: &'a Ingress,
    headers: &HeaderMap,
    get: bool,
) -> Result<Session<'a>, Response> {
    let out = |code: &str, msg: &str| {
        if get && headers.contains_key("hx-request") {
            // A live refresh whose session ended: htmx sends the whole page to sign in
            // (a redirect would be swapped into the refreshed part and stop polling).
            let mut r = page(StatusCode::OK, html! {});
            r.headers_mut()
                .insert("hx-redirect", HeaderValue::from_static("/ui/login"));
            r
        } else if get {
            redirect("/ui/login")
        } else {
            error_page(StatusCode::UNAUTHORIZED, code, msg)
        }
    };
    let Some(id) = cookie_value(headers) else {
        return Err(out("missing_session", "sign in first"));
    };
    let id_hash = super::auth::hash_token(&id);
    let row: Option<(String, String)> = admin::read_db(st, async |c| {
        sqlx::query_as(
            "SELECT token_sha256, csrf FROM longshore.ui_sessions WHERE id_sha256 = $1 AND expires_at > now()",
        )
        .bind(&id_hash)
        .fetch_optional(c)
        .await
    })
    .await
    .map_err(from_api)?;
    let Some((token_hash, csrf)) = row else {
        return Err(out(
            "invalid_session",
            "the session has ended; sign in again",
        ));
    };
    let token = match st.tokens.by_hash(&token_hash) {
        Ok(t) => t,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            return Err(out(e.code, &e.message));
        }
        Err(e) => return Err(from_api(e)),
    };
    if !(token.has(READ) || token.has(WRITE)) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "scope_forbidden",
            "this token lacks the \"admin:read\" scope",
        ));
    }
    Ok(Session { token, csrf })
}

/// A POST's form fields, after its session, its origin, its CSRF token and the
/// `admin:write` scope are checked (every action).
async fn posted<'a>(
    st: &'a Ingress,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Session<'a>, Vec<(String, String)>), Response> {
    posted_as(st, headers, body, true).await
}

/// [`posted`], with the write scope required or not (signing out is for every token).
async fn posted_as<'a>(
    st: &'a Ingress,
    headers: &HeaderMap,
    body: Body,
    write: bool,
) -> Result<(Session<'a>, Vec<(String, String)>), Response> {
    let s = session(st, headers, false).await?;
    if let Some(r) = cross_origin(headers) {
        return Err(r);
    }
    let form = read_form(st, headers, body).await?;
    let csrf = field(&form, "csrf").unwrap_or_default();
    if !same(&csrf, &s.csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "csrf_mismatch",
            "the form's CSRF token is not this session's; reload the page and try again",
        ));
    }
    if write && !s.write() {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "scope_forbidden",
            "this token lacks the \"admin:write\" scope",
        ));
    }
    Ok((s, form))
}

/// A form body (repeated keys kept: the dead letters selected), within the ingress's
/// body limit and read timeout.
async fn read_form(
    st: &Ingress,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<(String, String)>, Response> {
    let bytes = super::routes::read_body(st, headers, body)
        .await
        .map_err(from_api)?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// A POST from another site's page is refused (SameSite=Strict already keeps the
/// cookie off it; this also covers a browser that sends none).
fn cross_origin(headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    if origin_host.eq_ignore_ascii_case(host) {
        return None;
    }
    Some(error_page(
        StatusCode::FORBIDDEN,
        "cross_origin",
        "this form was posted from another site",
    ))
}

fn field(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Where to go after an action: the form's `back` if it is a console page, with a
/// message.
fn back(form: &[(String, String)], fallback: &str, msg: &str) -> Response {
    let to = field(form, "back")
        .filter(|b| b.starts_with("/ui") && !b.starts_with("//") && !b.contains(['\r', '\n']))
        .unwrap_or_else(|| fallback.to_string());
    let sep = if to.contains('?') { '&' } else { '?' };
    let msg: String = form_urlencoded::byte_serialize(msg.as_bytes()).collect();
    redirect(&format!("{to}{sep}msg={msg}"))
}

fn query_map(q: Result<Query<HashMap<String, String>>, QueryRejection>) -> HashMap<String, String> {
    q.map(|Query(m)| m).unwrap_or_default()
}

fn is_loopback(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let name = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

// ---------------------------------------------------------------- layout

/// Every page's head: the embedded stylesheet and scripts (htmx without eval, as the
/// Content-Security-Policy allows no eval).
fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
            title { (title) " · Longshore" }
            link rel="stylesheet" href="/ui/assets/console.css";
            script src="/ui/assets/htmx.min.js" {}
            script src="/ui/assets/console.js" {}
        }
    }
}

fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { main { (body) } }
        }
    }
}

fn layout(
    st: &Ingress,
    s: &Session<'_>,
    on: &str,
    title: &str,
    msg: Option<&str>,
    body: Markup,
) -> Markup {
    let link = |href: &str, name: &str, key: &str| {
        html! { a href=(href) class=[(on == key).then_some("on")] { (name) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    span.brand { "Longshore" }
                    (link("/ui", "Overview", "overview"))
                    (link("/ui/dead", "Dead letters", "dead"))
                    (link("/ui/schedules", "Schedules", "schedules"))
                    (link("/ui/errors", "Errors", "errors"))
                    @for v in st.registry.admin_views().iter().filter(|v| !v.errors) {
                        (link(&format!("/ui/views/{}", v.name), v.title, v.name))
                    }
                    form.inline method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(s.csrf);
                        span.who { (s.token.name) @if !s.write() { " (read-only)" } " " }
                        button type="submit" { "Sign out" }
                    }
                }
                main {
                    @if let Some(m) = msg {
                        div.flash role="status" { (m) }
                    }
                    (body)
                }
            }
        }
    }
}

/// A page of the console with its `?msg=` banner.
fn shown(
    st: &Ingress,
    s: &Session<'_>,
    on: &str,
    title: &str,
    m: &HashMap<String, String>,
    body: Markup,
) -> Response {
    page(
        StatusCode::OK,
        layout(st, s, on, title, m.get("msg").map(String::as_str), body),
    )
}

fn no_page() -> Response {
    error_page(StatusCode::NOT_FOUND, "not_found", "no such page")
}

fn csrf_input(s: &Session<'_>) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

fn badge(state: &str) -> Markup {
    html! { span class={"badge " (state)} { (state) } }
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn short_json(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() > max {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    } else {
        s
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------- sign-in

async fn login_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if session(&st, &headers, true).await.is_ok() {
        return redirect("/ui");
    }
    let m = query_map(q);
    page(StatusCode::OK, login_form(m.get("msg").map(String::as_str)))
}

fn login_form(msg: Option<&str>) -> Markup {
    bare(
        "Sign in",
        html! {
            div.card.login {
                h1 { "Longshore console" }
                @if let Some(m) = msg { div.flash.error role="alert" { (m) } }
                form method="post" action="/ui/login" {
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="off" required;
                    button.primary type="submit" { "Sign in" }
                }
                p.muted { "A token with the admin:read scope sees everything; admin:write also acts." }
            }
        },
    )
}

async fn login(
    State(st): State<Arc<Ingress>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = cross_origin(&headers) {
        return r;
    }
    let form = match read_form(&st, &headers, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let presented = field(&form, "token").unwrap_or_default();
    let refuse = |msg: &str| page(StatusCode::UNAUTHORIZED, login_form(Some(msg)));
    // Every sign-in attempt spends the address's anonymous budget, before the token is
    // looked at: an address over it learns nothing about any guess.
    if let Err(e) = st.anonymous.check(st.client(peer, &headers)) {
        return from_api(e);
    }
    if presented.is_empty() {
        return refuse("Enter a token.");
    }
    let token_hash = super::auth::hash_token(&presented);
    let token = match st.tokens.by_hash(&token_hash) {
        Ok(t) => t,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            return refuse("That token is not valid.");
        }
        Err(e) => return from_api(e),
    };
    if !(token.has(READ) || token.has(WRITE)) {
        return refuse("That token has no admin scope (admin:read or admin:write).");
    }
    let id = random_hex();
    let csrf = random_hex();
    let id_hash = super::auth::hash_token(&id);
    let made = admin::read_db(&st, async |c| {
        // Ended sessions go a few at a time, so the table stays small.
        sqlx::query(
            "DELETE FROM longshore.ui_sessions WHERE id_sha256 IN (SELECT id_sha256 FROM longshore.ui_sessions WHERE expires_at < now() LIMIT 100)",
        )
        .execute(&mut *c)
        .await?;
        sqlx::query(
            "INSERT INTO longshore.ui_sessions (id_sha256, token_sha256, csrf, expires_at) VALUES ($1, $2, $3, now() + make_interval(hours => $4))",
        )
        .bind(&id_hash)
        .bind(&token_hash)
        .bind(&csrf)
        .bind(SESSION_HOURS)
        .execute(&mut *c)
        .await
    })
    .await;
    if let Err(e) = made {
        return from_api(e);
    }
    tracing::info!(token = %token.name, "console sign-in");
    let secure = if is_loopback(&headers) {
        ""
    } else {
        "; Secure"
    };
    let mut r = redirect("/ui");
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_HOURS * 3600
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(st): State<Arc<Ingress>>, headers: HeaderMap, body: Body) -> Response {
    if cookie_value(&headers).is_none() {
        return redirect("/ui/login");
    }
    if let Err(r) = posted_as(&st, &headers, body, false).await {
        return r;
    }
    if let Some(id) = cookie_value(&headers) {
        let id_hash = super::auth::hash_token(&id);
        let _ = admin::read_db(&st, async |c| {
            sqlx::query("DELETE FROM longshore.ui_sessions WHERE id_sha256 = $1")
                .bind(&id_hash)
                .execute(c)
                .await
        })
        .await;
    }
    let mut r = redirect("/ui/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "longshore_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// ---------------------------------------------------------------- pages

/// Most rows the chart counts per queue and refresh: the newest of the last 10 minutes
/// by the `archived_at` index, so a busy fleet's chart costs a bounded read (the
/// oldest buckets of a queue past it are left out, and the chart says so).
const CHART_ROWS: i64 = 5_000;

/// Jobs done per 30 s over the last 10 minutes, every queue together (oldest first), and
/// whether a queue had more rows than [`CHART_ROWS`].
async fn throughput(st: &Ingress) -> Result<(Vec<i64>, bool), ApiError> {
    let mut parts = vec![format!(
        "(SELECT floor(extract(epoch FROM now() - done_at) / 30)::int AS b, 'completions' AS src FROM longshore.completions WHERE done_at > now() - interval '10 minutes' ORDER BY done_at DESC LIMIT {CHART_ROWS})"
    )];
    for q in admin::migrated_queues(st).await? {
        parts.push(format!(
            "(SELECT floor(extract(epoch FROM now() - archived_at) / 30)::int, '{q}' FROM pgmq.a_{q} WHERE archived_at > now() - interval '10 minutes' ORDER BY archived_at DESC LIMIT {CHART_ROWS})"
        ));
    }
    let stmt = format!(
        "SELECT b, count(*)::bigint, max(n)::bigint FROM (SELECT b, count(*) OVER (PARTITION BY src) AS n FROM ({}) x) y GROUP BY b",
        parts.join(" UNION ALL ")
    );
    let rows: Vec<(i32, i64, i64)> =
        admin::read_db(st, async |c| sqlx::query_as(&stmt).fetch_all(c).await).await?;
    let mut buckets = vec![0_i64; 20];
    let mut capped = false;
    for (b, n, per_src) in rows {
        capped |= per_src >= CHART_ROWS;
        if (0..20).contains(&b) {
            buckets[19 - b as usize] = n;
        }
    }
    Ok((buckets, capped))
}

fn chart(buckets: &[i64]) -> Markup {
    let max = buckets.iter().copied().max().unwrap_or(0).max(1);
    let (w, h) = (600, 90);
    let bw = w / buckets.len().max(1);
    let mut bars = String::new();
    for (i, n) in buckets.iter().enumerate() {
        let bh = (*n as f64 / max as f64 * (h - 14) as f64).round() as i64;
        let _ = write!(
            bars,
            r#"<rect x="{}" y="{}" width="{}" height="{}"><title>{:.1} jobs/s</title></rect>"#,
            i * bw + 1,
            h - 12 - bh,
            bw - 2,
            bh,
            *n as f64 / 30.0
        );
    }
    let peak = max as f64 / 30.0;
    html! {
        svg.chart viewBox={"0 0 " (w) " " (h)} width="100%" height="90" role="img" aria-label="jobs per second, last 10 minutes" {
            (PreEscaped(bars))
            text x="0" y=(h - 1) { "−10 min" }
            text x=(w - 30) y=(h - 1) { "now" }
            text x=(w - 120) y="10" { (format!("peak {peak:.1} jobs/s")) }
        }
    }
}

async fn overview(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let m = query_map(q);
    let rows = admin::read_db(&st, async |c| crate::telemetry::read_samples(c).await)
        .await
        .map_err(from_api)?;
    let (buckets, capped) = throughput(&st).await.map_err(from_api)?;
    let now_rate = buckets.iter().rev().take(2).sum::<i64>() as f64 / 60.0;
    let body = html! {
        div.toolbar {
            h1 { "Queues" }
            button type="button" data-live-toggle { "Pause refresh" }
        }
        div #live hx-get="/ui" hx-trigger="every 3s" hx-select="#live" hx-swap="outerHTML" {
            div.card {
                div.muted {
                    "Jobs done per second, last 10 minutes (now " (format!("{now_rate:.1}")) "/s)"
                    @if capped { " — busy: only each queue's newest " (CHART_ROWS) " counted" }
                }
                (chart(&buckets))
            }
            div.card {
                table #queues {
                    thead { tr {
                        th { "Queue" } th.num { "Depth" } th.num { "In flight" } th.num { "Delayed" }
                        th.num { "Oldest (s)" } th.num { "Dead letters" } th { "State" }
                    } }
                    tbody {
                        @for (q, _age) in &rows {
                            tr data-queue=(q.queue) {
                                td { a href={"/ui/queues/" (q.queue)} { (q.queue) } }
                                td.num data-field="visible" { (q.visible) }
                                td.num data-field="in_flight" { (q.in_flight) }
                                td.num data-field="delayed" { (q.delayed) }
                                td.num { (format!("{:.0}", q.oldest_age_seconds)) }
                                td.num data-field="dead_letters" {
                                    @if q.dead_letters > 0 {
                                        a href={"/ui/dead?queue=" (q.queue)} { (q.dead_letters) }
                                    } @else { "0" }
                                }
                                td data-field="paused" { @if q.paused { (badge("paused")) } @else { span.muted { "running" } } }
                            }
                        }
                    }
                }
                p.muted { "Figures as the metrics have them, sampled for the fleet every metrics.sample_interval." }
            }
        }
    };
    Ok(shown(&st, &s, "overview", "Overview", &m, body))
}

async fn queue_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let Ok(Path(raw)) = path else {
        return Err(no_page());
    };
    let queue = super::routes::known_queue(&st, &raw).map_err(from_api)?;
    let m = query_map(q);
    let args = admin::list_args(&m).map_err(from_api)?;
    let sql = crate::enqueue::queue_sql(&queue);
    let page_ = admin::read_db(&st, async |c| browse::list_jobs(c, &sql, &args.query).await)
        .await
        .map_err(from_api)?;
    let paused = admin::read_db(&st, async |c| {
        sqlx::query_scalar::<_, bool>(
            "SELECT coalesce((SELECT paused FROM longshore.queue_controls WHERE queue = $1), false)",
        )
        .bind(queue.as_str())
        .fetch_one(c)
        .await
    })
    .await
    .map_err(from_api)?;
    let state = args.query.state;
    let here = format!("/ui/queues/{queue}?state={}", state.as_str());
    let qs = queue.as_str();
    let body = html! {
        div.toolbar {
            h1 { "Queue " (qs) " " @if paused { (badge("paused")) } }
            @if s.write() {
                @if paused {
                    form.inline method="post" action={"/ui/queues/" (qs) "/resume"} {
                        (csrf_input(&s)) input type="hidden" name="back" value=(here);
                        button.primary #resume type="submit" { "Resume" }
                    }
                } @else {
                    form.inline method="post" action={"/ui/queues/" (qs) "/pause"} {
                        (csrf_input(&s)) input type="hidden" name="back" value=(here);
                        input type="text" name="reason" placeholder="reason (optional)";
                        button #pause type="submit" { "Pause" }
                    }
                }
            }
        }
        nav.tabs {
            @for x in ListState::ALL {
                a href={"/ui/queues/" (qs) "?state=" (x.as_str())} class=[(x == state).then_some("on")] { (x.as_str()) }
            }
        }
        form.filters method="get" action={"/ui/queues/" (qs)} {
            input type="hidden" name="state" value=(state.as_str());
            label { "Job id" input type="text" name="id" inputmode="numeric" value=[m.get("id")]; }
            label { "Args contain (JSON)" input type="text" name="contains" placeholder=r#"{"user_id": 7}"# value=[m.get("contains")]; }
            button type="submit" { "Search" }
        }
        @if s.write() && matches!(state, ListState::Visible | ListState::Delayed | ListState::Retrying) {
            form.filters method="post" action={"/ui/queues/" (qs) "/bulk"} data-confirm={"Act on every " (state.as_str()) " job of " (qs) " that matches? A cancel cannot be undone."} {
                (csrf_input(&s)) input type="hidden" name="back" value=(here);
                input type="hidden" name="state" value=(state.as_str());
                label { "Last error contains" input type="text" name="error"; }
                label { "Enqueued at least (e.g. 1h) ago" input type="text" name="older_than"; }
                button.danger type="submit" name="action" value="cancel" { "Cancel all matching" }
                @if state != ListState::Visible {
                    button type="submit" name="action" value="retry" { "Retry all matching now" }
                }
            }
        }
        div.card {
            table #jobs {
                thead { tr { th { "Id" } th.num { "Attempts" } th { "Enqueued" } th { "Due / ended" } th { "Last error" } th { "Args" } @if s.write() { th {} } } }
                tbody {
                    @for j in &page_.jobs {
                        tr data-id=(j.id) {
                            td { a href={"/ui/jobs/" (qs) "/" (j.id)} { (j.id) } }
                            td.num { (j.attempts) }
                            td { (when(Some(j.enqueued_at))) }
                            td { (when(j.at)) }
                            td.wrap { (j.last_error.as_deref().unwrap_or("")) }
                            td.wrap { code { (short_json(&j.args, 120)) } }
                            @if s.write() {
                                td { (job_buttons(&s, qs, j.id, state, &here)) }
                            }
                        }
                    }
                }
            }
            @if page_.jobs.is_empty() {
                @if page_.next_before.is_some() {
                    p.muted { "None in this stretch of ids; older ones may match." }
                } @else {
                    p.muted { "No " (state.as_str()) " jobs." }
                }
            }
            @if let Some(b) = page_.next_before {
                p { a href={(here) "&before=" (b) (m.get("contains").map(|c| format!("&contains={}", form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>())).unwrap_or_default())} { "Older →" } }
            }
        }
    };
    Ok(shown(&st, &s, "", &format!("Queue {qs}"), &m, body))
}

fn job_buttons(s: &Session<'_>, queue: &str, id: i64, state: ListState, back: &str) -> Markup {
    let cancellable = matches!(
        state,
        ListState::Visible | ListState::Delayed | ListState::Retrying | ListState::Running
    );
    let retryable = matches!(state, ListState::Delayed | ListState::Retrying);
    html! {
        @if cancellable {
            form.inline method="post" action={"/ui/jobs/" (queue) "/" (id) "/cancel"} {
                (csrf_input(s)) input type="hidden" name="back" value=(back);
                button.danger type="submit" data-action="cancel" { "Cancel" }
            }
        }
        @if retryable {
            " "
            form.inline method="post" action={"/ui/jobs/" (queue) "/" (id) "/retry"} {
                (csrf_input(s)) input type="hidden" name="back" value=(back);
                button type="submit" data-action="retry" { "Run now" }
            }
        }
    }
}

async fn job_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let Ok(Path((raw, id))) = path else {
        return Err(no_page());
    };
    let queue = super::routes::known_queue(&st, &raw).map_err(from_api)?;
    let m = query_map(q);
    let not_found = || {
        error_page(
            StatusCode::NOT_FOUND,
            "unknown_job",
            &format!("no job {id:?} in queue {queue}"),
        )
    };
    let Ok(msg_id) = id.parse::<i64>() else {
        return Err(not_found());
    };
    let sql = crate::enqueue::queue_sql(&queue);
    let Some(d) = admin::read_db(&st, async |c| browse::job_detail(c, &sql, msg_id).await)
        .await
        .map_err(from_api)?
    else {
        return Err(not_found());
    };
    let here = format!("/ui/jobs/{queue}/{msg_id}");
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let body = html! {
        div.toolbar {
            h1 { "Job " (msg_id) " of " a href={"/ui/queues/" (queue)} { (queue) } " " span #state { (badge(d.state.as_str())) } }
            @if s.write() { (job_buttons(&s, queue.as_str(), msg_id, d.state, &here)) }
        }
        div.card {
            dl.kv {
                dt { "Attempts" } dd { (d.attempts) }
                dt { "Enqueued" } dd { (when(Some(d.enqueued_at))) }
                dt { "Due / ended" } dd { (when(d.at)) }
                dt { "Last error" } dd { (d.last_error.as_deref().unwrap_or("—")) }
            }
        }
        h2 { "Attempts that failed" }
        div.card {
            @if d.errors.is_empty() { p.muted { "None." } }
            @else {
                table #attempts { thead { tr { th.num { "Attempt" } th { "At" } th { "Error" } } }
                    tbody { @for e in &d.errors { tr {
                        td.num { (cell(&e["attempt"])) } td { (cell(&e["at"])) } td.wrap { (cell(&e["error"])) }
                    } } }
                }
            }
        }
        h2 { "Args" } div.card { pre { (pretty(&d.args)) } }
        h2 { "Headers" } div.card { pre { (pretty(&d.headers)) } }
        @if let Some(r) = &d.result { h2 { "Result" } div.card { pre { (pretty(r)) } } }
        h2 { "Operator actions" }
        div.card {
            @if d.actions.is_empty() { p.muted { "None." } }
            @else {
                table { thead { tr { th { "At" } th { "Who" } th { "Action" } th { "Detail" } } }
                    tbody { @for a in &d.actions { tr {
                        td { (cell(&a["at"])) } td { (cell(&a["actor"])) } td { (cell(&a["action"])) }
                        td.wrap { code { (short_json(&a["detail"], 200)) } }
                    } } }
                }
            }
        }
    };
    Ok(shown(&st, &s, "", &format!("Job {msg_id}"), &m, body))
}

async fn dead_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let m = query_map(q);
    let queue = match m.get("queue").filter(|v| !v.is_empty()) {
        Some(raw) => Some(super::routes::known_queue(&st, raw).map_err(from_api)?),
        None => None,
    };
    // Trimmed as the bulk form's is, so "all matching" is what the page lists.
    let error = m
        .get("error")
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let before = m
        .get("before")
        .and_then(|b| b.parse::<i64>().ok())
        .filter(|b| *b > 0);
    let dl = admin::read_db(&st, async |c| {
        browse::dead_letter_page(
            c,
            queue.as_ref().map(QueueName::as_str),
            error.as_deref(),
            before,
            50,
        )
        .await
    })
    .await
    .map_err(from_api)?;
    let mut here = String::from("/ui/dead?");
    if let Some(q) = &queue {
        let _ = write!(here, "queue={q}&");
    }
    if let Some(e) = &error {
        let _ = write!(
            here,
            "error={}&",
            form_urlencoded::byte_serialize(e.as_bytes()).collect::<String>()
        );
    }
    let kinds: Vec<&str> = st.registry.kinds().collect();
    let body = html! {
        h1 { "Dead letters" }
        form.filters method="get" action="/ui/dead" {
            label { "Queue" select name="queue" {
                option value="" { "every queue" }
                @for k in &kinds { option value=(k) selected[queue.as_ref().is_some_and(|q| q.as_str() == *k)] { (k) } }
            } }
            label { "Last error contains" input type="text" name="error" value=[error.as_deref()]; }
            button type="submit" { "Filter" }
        }
        @if s.write() {
            @if let Some(q) = &queue {
                form.filters method="post" action={"/ui/queues/" (q) "/bulk"} data-confirm="Act on every dead letter of this queue that matches the filter?" {
                    (csrf_input(&s)) input type="hidden" name="back" value=(here);
                    input type="hidden" name="state" value="dead";
                    input type="hidden" name="error" value=[error.as_deref()];
                    span.muted { "Every dead letter of " (q) " matching the filter: " }
                    button #retry-all type="submit" name="action" value="retry" { "Retry all matching" }
                    button.danger #purge-all type="submit" name="action" value="purge" { "Purge all matching" }
                }
            } @else {
                p.muted { "Choose a queue to act on every dead letter matching the filter." }
            }
        }
        div.card {
            @let selectable = s.write() && queue.is_some();
            form #dlform method="post" action={"/ui/dead/" (queue.as_ref().map(QueueName::as_str).unwrap_or("-")) "/retry"} {
                @if selectable {
                    (csrf_input(&s)) input type="hidden" name="back" value=(here);
                    div.toolbar {
                        button #retry-selected type="submit" { "Retry selected" }
                        button.danger #purge-selected type="submit" formaction={"/ui/dead/" (queue.as_ref().map(QueueName::as_str).unwrap_or("-")) "/purge"} { "Purge selected" }
                    }
                }
                table #dead {
                    thead { tr {
                        @if selectable { th { input type="checkbox" data-select-all aria-label="select all on this page"; } }
                        th { "Queue" } th { "Job" } th.num { "Attempts" } th { "Failed" } th { "Error" } th { "Args" }
                    } }
                    tbody {
                        @for d in &dl.dead_letters {
                            tr data-dead-letter=(d.id) {
                                @if selectable { td { input type="checkbox" name="ids" value=(d.id) aria-label="select"; } }
                                td { a href={"/ui/queues/" (d.queue) "?state=dead"} { (d.queue) } }
                                td { a href={"/ui/jobs/" (d.queue) "/" (d.msg_id)} { (d.msg_id) } }
                                td.num { (d.attempts) }
                                td { (when(Some(d.failed_at))) }
                                td.wrap { (d.last_error) }
                                td.wrap { code { (short_json(&d.message, 100)) } }
                            }
                        }
                    }
                }
            }
            @if dl.dead_letters.is_empty() {
                @if dl.next_before.is_some() {
                    p.muted { "None in this stretch of dead letters; older ones may match." }
                } @else {
                    p.muted { "No dead letters." }
                }
            }
            @if let Some(b) = dl.next_before { p { a href={(here) "before=" (b)} { "Older →" } } }
        }
    };
    Ok(shown(&st, &s, "dead", "Dead letters", &m, body))
}

async fn schedules_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let m = query_map(q);
    let v = admin::schedules_value(&st).await.map_err(from_api)?;
    let empty = Vec::new();
    let list = v["schedules"].as_array().unwrap_or(&empty);
    let body = html! {
        h1 { "Schedules" }
        div.card {
            table #schedules {
                thead { tr { th { "Schedule" } th { "Queue" } th { "Cron" } th { "Next fire" } th { "Last fires" } } }
                tbody {
                    @for x in list {
                        tr {
                            td { (cell(&x["name"])) }
                            td { a href={"/ui/queues/" (cell(&x["queue"]))} { (cell(&x["queue"])) } }
                            td { code { (cell(&x["cron"])) } }
                            td { (cell(&x["next_fire"])) }
                            td.wrap {
                                @for f in x["last_fires"].as_array().unwrap_or(&empty) {
                                    a href={"/ui/jobs/" (cell(&x["queue"])) "/" (cell(&f["id"]))} title=(cell(&f["fire_at"])) {
                                        (badge(f["state"].as_str().unwrap_or("pruned")))
                                    } " "
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(shown(&st, &s, "schedules", "Schedules", &m, body))
}

async fn errors_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let m = query_map(q);
    let v = admin::errors_value(&st, 50).await.map_err(from_api)?;
    let empty = Vec::new();
    let body = html! {
        h1 { "Recent errors" }
        div.card {
            table #errors {
                thead { tr { th { "Queue" } th { "Job" } th { "State" } th.num { "Attempts" } th { "At" } th { "Error" } } }
                tbody {
                    @for e in v["errors"].as_array().unwrap_or(&empty) {
                        tr {
                            td { (cell(&e["queue"])) }
                            td { a href={"/ui/jobs/" (cell(&e["queue"])) "/" (cell(&e["id"]))} { (cell(&e["id"])) } }
                            td { (badge(e["state"].as_str().unwrap_or(""))) }
                            td.num { (cell(&e["attempts"])) }
                            td { (cell(&e["at"])) }
                            td.wrap { (cell(&e["error"])) }
                        }
                    }
                }
            }
        }
        @for pl in v["pipelines"].as_array().unwrap_or(&empty) {
            @for sec in pl["sections"].as_array().unwrap_or(&empty) {
                h2 { (cell(&sec["title"])) " (last 24 h)" }
                div.card {
                    table {
                        thead { tr { @for c in sec["columns"].as_array().unwrap_or(&empty) { th { (cell(c)) } } } }
                        tbody { @for r in sec["rows"].as_array().unwrap_or(&empty) {
                            tr { @for x in r.as_array().unwrap_or(&empty) { td.wrap { (cell(x)) } } }
                        } }
                    }
                    @if sec["rows"].as_array().is_none_or(Vec::is_empty) { p.muted { "None." } }
                }
            }
        }
    };
    Ok(shown(&st, &s, "errors", "Errors", &m, body))
}

async fn view_page(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> UiResult {
    let s = session(&st, &headers, true).await?;
    let Ok(Path(name)) = path else {
        return Err(no_page());
    };
    let m = query_map(q);
    let window = m.get("window").cloned().unwrap_or_else(|| "24h".into());
    let (view, sections) = admin::view_value(&st, &name, Some(&window))
        .await
        .map_err(from_api)?;
    let body = html! {
        div.toolbar {
            h1 { (view.title) }
            nav.tabs {
                @for w in ["1h", "24h", "7d", "30d"] {
                    a href={"/ui/views/" (view.name) "?window=" (w)} class=[(w == window).then_some("on")] { (w) }
                }
            }
        }
        @for sec in &sections {
            h2 { (sec.title) }
            div.card {
                table {
                    thead { tr { @for c in &sec.columns { th { (c) } } } }
                    tbody { @for r in &sec.rows { tr { @for v in r { td.wrap { (cell(v)) } } } } }
                }
                @if sec.rows.is_empty() { p.muted { "Nothing in this window." } }
            }
        }
    };
    Ok(shown(&st, &s, view.name, view.title, &m, body))
}

// ---------------------------------------------------------------- actions

async fn pause(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> UiResult {
    set_paused(st, headers, path, body, true).await
}

async fn resume(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> UiResult {
    set_paused(st, headers, path, body, false).await
}

fn queue_of(
    st: &Ingress,
    path: Result<Path<String>, PathRejection>,
) -> Result<QueueName, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(super::routes::no_route());
    };
    super::routes::known_queue(st, &raw)
}

async fn set_paused(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
    paused: bool,
) -> UiResult {
    let (s, form) = posted(&st, &headers, body).await?;
    let queue = queue_of(&st, path).map_err(from_api)?;
    let reason = field(&form, "reason").map(|r| crate::clean::error_text(&r));
    let actor = s.token.principal.clone();
    admin::write_db(&st, async |tx| {
        store::set_paused(tx, &queue, paused, &actor, reason.as_deref()).await
    })
    .await
    .map_err(from_api)?;
    let what = if paused { "paused" } else { "resumed" };
    Ok(back(
        &form,
        &format!("/ui/queues/{queue}"),
        &format!("Queue {queue} {what}."),
    ))
}

async fn cancel(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> UiResult {
    job_action(st, headers, path, body, true).await
}

async fn retry(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> UiResult {
    job_action(st, headers, path, body, false).await
}

async fn job_action(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
    cancel: bool,
) -> UiResult {
    let (s, form) = posted(&st, &headers, body).await?;
    let Ok(Path((raw, id))) = path else {
        return Err(no_page());
    };
    let queue = super::routes::known_queue(&st, &raw).map_err(from_api)?;
    let Ok(msg_id) = id.parse::<i64>() else {
        return Err(error_page(
            StatusCode::NOT_FOUND,
            "unknown_job",
            "no such job",
        ));
    };
    let sql = crate::enqueue::queue_sql(&queue);
    let actor = s.token.principal.clone();
    let msg = admin::write_db(&st, async |tx| {
        Ok(if cancel {
            match store::cancel_job(tx, &sql, msg_id, &actor).await? {
                store::Cancel::Cancelled => format!("Job {msg_id} cancelled."),
                store::Cancel::Requested => {
                    format!("Job {msg_id} is running: its worker stops it at its next heartbeat.")
                }
                store::Cancel::Final => format!("Job {msg_id} had already ended."),
                store::Cancel::Unknown => format!("No job {msg_id} in {queue}."),
            }
        } else {
            match store::retry_now(tx, &sql, msg_id, &actor).await? {
                store::RetryNow::Visible => format!("Job {msg_id} is due now."),
                store::RetryNow::Unchanged => {
                    format!("Job {msg_id} was not waiting for later: unchanged.")
                }
            }
        })
    })
    .await
    .map_err(from_api)?;
    Ok(back(&form, &format!("/ui/jobs/{queue}/{msg_id}"), &msg))
}

async fn bulk(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> UiResult {
    let (s, form) = posted(&st, &headers, body).await?;
    let queue = queue_of(&st, path).map_err(from_api)?;
    let bad = |m: &str| error_page(StatusCode::BAD_REQUEST, "bad_request", m);
    let action = match field(&form, "action").as_deref() {
        Some("retry") => BulkAction::Retry,
        Some("purge") => BulkAction::Purge,
        Some("cancel") => BulkAction::Cancel,
        _ => return Err(bad("action: retry, purge or cancel")),
    };
    let Some(state) = field(&form, "state").as_deref().and_then(BulkState::parse) else {
        return Err(bad("state: dead, visible, delayed or retrying"));
    };
    let older_than = match field(&form, "older_than") {
        None => None,
        Some(d) => Some(
            humantime::parse_duration(&d).map_err(|e| bad(&format!("older than {d:?}: {e}")))?,
        ),
    };
    let filter = BulkFilter {
        state,
        error: field(&form, "error").map(|e| crate::clean::error_text(&e)),
        older_than,
    };
    let (mut after, mut up_to, mut total) = (0_i64, None, 0_u64);
    let still = loop {
        let v = admin::bulk_step(
            &st,
            &queue,
            &filter,
            action,
            after,
            up_to,
            &s.token.principal,
        )
        .await
        .map_err(from_api)?;
        total += v["affected"].as_u64().unwrap_or(0);
        after = v["after"].as_i64().unwrap_or(after);
        up_to = v["up_to"].as_i64();
        if v["done"].as_bool().unwrap_or(true) {
            break v["still_matching"].as_i64().unwrap_or(0);
        }
        if total >= BULK_PER_CLICK {
            return Ok(back(
                &form,
                &format!("/ui/queues/{queue}"),
                &format!("{total} jobs done so far; more match: click again to go on."),
            ));
        }
    };
    let verb = match action {
        BulkAction::Retry => "retried",
        BulkAction::Purge => "purged",
        BulkAction::Cancel => "cancelled",
    };
    let mut msg = format!("{total} {} job(s) {verb}.", state.as_str());
    if still > 0 {
        let _ = write!(
            msg,
            " {still} still match (a worker held them as the action passed): run it again."
        );
    }
    Ok(back(&form, &format!("/ui/queues/{queue}"), &msg))
}

async fn dead_retry(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> UiResult {
    dead_action(st, headers, path, body, true).await
}

async fn dead_purge(
    st: State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> UiResult {
    dead_action(st, headers, path, body, false).await
}

async fn dead_action(
    State(st): State<Arc<Ingress>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
    retry: bool,
) -> UiResult {
    let (s, form) = posted(&st, &headers, body).await?;
    let queue = queue_of(&st, path).map_err(from_api)?;
    let ids: Vec<i64> = form
        .iter()
        .filter(|(k, _)| k == "ids")
        .filter_map(|(_, v)| v.parse().ok())
        .take(1000)
        .collect();
    if ids.is_empty() {
        return Ok(back(&form, "/ui/dead", "Select dead letters first."));
    }
    let out = admin::act_on_dead_letters(&st, &queue, &ids, retry, &s.token.principal)
        .await
        .map_err(from_api)?;
    let n = out["affected"].as_u64().unwrap_or(0);
    let verb = if retry { "re-sent" } else { "purged" };
    Ok(back(
        &form,
        "/ui/dead",
        &format!("{n} dead letter(s) {verb}."),
    ))
}

// ---------------------------------------------------------------- assets

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn asset_htmx() -> Response {
    asset("text/javascript; charset=utf-8", HTMX)
}

async fn asset_css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn asset_js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}
