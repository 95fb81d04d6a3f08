//! The operator console (`/ui`) in a real browser: Debian's Chromium, headless, driven
//! through chromedriver (WebDriver) by fantoccini, against the real `longshore ingress`
//! and `longshore worker` binaries and a real PostgreSQL. `.ci/run` installs chromium
//! and chromium-driver when they are missing.
//!
//! The main pages' screenshots are written to docs/console/ by
//! `console_drives_the_fleet_from_a_browser` (the README shows them).

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Proc, RunTrace, config_dir, count, db, eventually, sha};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const WRITE_TOKEN: &str = "tok-console-write-0123456789";
const READ_TOKEN: &str = "tok-console-read-0123456789";

fn console_config() -> String {
    format!(
        r#"
[ingress]
listen = "127.0.0.1:0"

[[ingress.tokens]]
name = "ops"
sha256 = "{w}"
scopes = ["admin:write"]
rate_per_second = 1000
burst = 1000

[[ingress.tokens]]
name = "viewer"
sha256 = "{r}"
scopes = ["admin:read"]
rate_per_second = 1000
burst = 1000

[metrics]
sample_interval = "200ms"

[probe]
fault_knobs = true
"#,
        w = sha(WRITE_TOKEN),
        r = sha(READ_TOKEN),
    )
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    /// chromedriver and the Chromium it started share a process group: all of it goes,
    /// also when a test fails before closing its session.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A headless Chromium at a laptop's size (or a phone's: `width` 390).
async fn browser(width: u32, height: u32) -> (Driver, Client) {
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    let port = free_port();
    let child = Command::new(&driver)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{driver}: {e}; install Debian's chromium and chromium-driver (.ci/run does)")
        });
    let d = Driver { child, port };
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", format!("--window-size={width},{height}")],
        }),
    );
    let url = format!("http://127.0.0.1:{}", d.port);
    let client = eventually(Duration::from_secs(20), "chromedriver", || {
        let (caps, url) = (caps.clone(), url.clone());
        async move {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&url)
                .await
                .ok()
        }
    })
    .await;
    (d, client)
}

async fn sign_in(b: &Client, base: &str, token: &str) {
    b.goto(&format!("{base}/ui")).await.unwrap();
    // Not signed in: the console sends the browser to the sign-in page.
    assert!(b.current_url().await.unwrap().path().ends_with("/ui/login"));
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    b.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "signed in", || async {
        let u = b.current_url().await.ok()?;
        (u.path() == "/ui").then_some(())
    })
    .await;
}

async fn text(b: &Client, css: &str) -> Option<String> {
    b.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn click(b: &Client, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Saves a screenshot of the page: under docs/console/ (the README shows them) with
/// `UPDATE_SCREENSHOTS=1`, else under target/ (a test run leaves the tree as it was).
async fn shot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        "docs/console"
    } else {
        "target/console-screenshots"
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(format!("{dir}/{name}.png"), png).unwrap();
}

/// POSTs a form from inside the page (same origin, with the session cookie), as a
/// hand-made request would: `(status, body)`.
async fn post_from_page(b: &Client, path: &str, form: &str) -> (u64, String) {
    let v = b
        .execute_async(
            r#"const [path, form, done] = arguments;
               fetch(path, {method: "POST", body: form, redirect: "manual",
                            headers: {"content-type": "application/x-www-form-urlencoded"}})
                 .then(async r => r.type === "opaqueredirect"
                     ? done([303, "a redirect"]) // what the browser shows of a 303 it may not follow
                     : done([r.status, await r.text()]))
                 .catch(e => done([0, String(e)]));"#,
            vec![json!(path), json!(form)],
        )
        .await
        .unwrap();
    (
        v[0].as_u64().unwrap(),
        v[1].as_str().unwrap_or("").to_string(),
    )
}

/// The session's CSRF token, as the page's forms carry it.
async fn csrf(b: &Client) -> String {
    b.find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap()
}

/// Sign in; the overview's depths are the database's; pause a queue in the console and
/// a running worker claims nothing from it; resume and it drains; retry a dead letter
/// and it runs; cancel a running job and its handler stops. Screenshots of the pages.
#[tokio::test]
async fn console_drives_the_fleet_from_a_browser() {
    let t = db().await;
    let trace = RunTrace::new("console");
    let dir = config_dir(&console_config());
    let env = [("LONGSHORE_ENV", "test")];
    let ingress = Proc::spawn_in(Some(&dir), &t.url, &["ingress"], &env);
    let base = format!("http://{}", ingress.ingress_addr().await);
    // 200 due now (each a 250 ms run), 40 for later, one dead letter: production-shaped,
    // not an empty queue.
    let send_visible = |from: i64, to: i64| {
        sqlx::query(
            "SELECT pgmq.send('probe', jsonb_build_object('id', i, 'sleep_ms', 250)) FROM generate_series($1::bigint, $2::bigint) i",
        )
        .bind(from)
        .bind(to)
        .execute(&t.pool)
    };
    send_visible(1, 200).await.unwrap();
    sqlx::query("SELECT pgmq.send('probe', jsonb_build_object('id', i), 3600) FROM generate_series(1001, 1040) i")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO longshore.dead_letters (queue, msg_id, message, attempts, last_error, enqueued_at) VALUES ('probe', 9000, '{\"id\": 9000}', 5, 'upstream 503 after 5 attempts', now())",
    )
    .execute(&t.pool)
    .await
    .unwrap();

    let (_d, b) = browser(1280, 900).await;
    sign_in(&b, &base, WRITE_TOKEN).await;
    let pool = t.pool.clone();
    let db_depth = count(&pool, "SELECT count(*) FROM pgmq.q_probe WHERE vt <= now()").await;
    let db_delayed = count(&pool, "SELECT count(*) FROM pgmq.q_probe WHERE vt > now()").await;
    assert_eq!((db_depth, db_delayed), (200, 40));
    let row = "#queues tr[data-queue=probe]";
    let visible_css = format!("{row} td[data-field=visible]");
    eventually(Duration::from_secs(15), "the overview's depths", || async {
        b.refresh().await.ok()?;
        let visible = text(&b, &visible_css).await?;
        let delayed = text(&b, &format!("{row} td[data-field=delayed]")).await?;
        let dead = text(&b, &format!("{row} td[data-field=dead_letters]")).await?;
        (visible == db_depth.to_string() && delayed == db_delayed.to_string() && dead == "1")
            .then_some(())
    })
    .await;

    // The live refresh, and its pause button: paused, new jobs do not show; resumed,
    // they do, with no reload.
    click(&b, "[data-live-toggle]").await;
    send_visible(201, 205).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        text(&b, &visible_css).await.as_deref(),
        Some("200"),
        "refresh paused"
    );
    click(&b, "[data-live-toggle]").await;
    eventually(Duration::from_secs(15), "the live refresh", || async {
        text(&b, &visible_css).await.filter(|v| v == "205")
    })
    .await;

    // A worker drains probe (4 at a time); pause it in the console while it runs: it
    // stops claiming (what it holds finishes); resume: it drains the rest.
    let (k, v) = trace.env();
    let mut worker = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["worker"],
        &[
            ("LONGSHORE_ENV", "test"),
            (k, &v),
            ("LONGSHORE__WORKER__CONCURRENCY", "4"),
            ("LONGSHORE__QUEUES__PROBE__LEASE", "6s"),
        ],
    );
    let done = || count(&pool, "SELECT count(*) FROM pgmq.a_probe");
    eventually(Duration::from_secs(20), "the worker claiming", || async {
        (done().await >= 8).then_some(())
    })
    .await;
    b.goto(&format!("{base}/ui/queues/probe")).await.unwrap();
    click(&b, "#pause").await;
    eventually(Duration::from_secs(10), "paused badge", || async {
        text(&b, "h1 .badge.paused").await.filter(|t| t == "paused")
    })
    .await;
    // What it held when the pause landed finishes within a run's 250 ms (and its
    // acknowledgement's flush): given 3 s on a busy machine.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (settled, started) = (done().await, trace.starts().len());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(done().await, settled, "a paused queue: nothing more done");
    assert_eq!(trace.starts().len(), started, "and no run started");
    assert!(settled < 205, "paused while it drained ({settled} done)");
    assert!(worker.logs().contains("worker started"));
    shot(&b, "queue").await;
    click(&b, "#resume").await;
    eventually(Duration::from_secs(60), "drained", || async {
        (done().await == 205).then_some(())
    })
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM pgmq.q_probe").await,
        40,
        "the delayed ones still wait"
    );
    b.goto(&format!("{base}/ui")).await.unwrap();
    shot(&b, "overview").await;

    // Retry the dead letter from the dead-letters page: it runs and is done.
    b.goto(&format!("{base}/ui/dead?queue=probe"))
        .await
        .unwrap();
    shot(&b, "dead-letters").await;
    click(&b, "#dead tr[data-dead-letter] input[name=ids]").await;
    click(&b, "#retry-selected").await;
    eventually(Duration::from_secs(10), "flash", || async {
        text(&b, ".flash")
            .await
            .filter(|t| t.contains("1 dead letter(s) re-sent"))
    })
    .await;
    eventually(
        Duration::from_secs(15),
        "the retried dead letter done",
        || async {
            (count(
                &pool,
                "SELECT count(*) FROM pgmq.a_probe WHERE message->>'id' = '9000'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );

    // Cancel a running job from its page: its handler stops long before its 60 s sleep.
    let id: i64 =
        sqlx::query_scalar("SELECT pgmq.send('probe', '{\"id\": 7000, \"sleep_ms\": 60000}')")
            .fetch_one(&pool)
            .await
            .unwrap();
    eventually(Duration::from_secs(15), "running", || async {
        (trace.starts().get(&7000) == Some(&1)).then_some(())
    })
    .await;
    b.goto(&format!("{base}/ui/jobs/probe/{id}")).await.unwrap();
    assert_eq!(text(&b, "#state").await.as_deref(), Some("running"));
    shot(&b, "job").await;
    let asked = std::time::Instant::now();
    click(&b, "button[data-action=cancel]").await;
    eventually(
        Duration::from_secs(60),
        "cancelled in the database",
        || async {
            (count(&pool, "SELECT count(*) FROM longshore.cancelled_jobs").await == 1).then_some(())
        },
    )
    .await;
    // The lease is 6 s, so a heartbeat every 2 s: stopped within a few, far from the
    // 60 s the handler would sleep.
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "the handler stopped at a heartbeat, not at the end of its sleep: {:?}",
        asked.elapsed()
    );
    eventually(
        Duration::from_secs(10),
        "the page says cancelled",
        || async {
            b.refresh().await.ok()?;
            text(&b, "#state").await.filter(|s| s == "cancelled")
        },
    )
    .await;
    let ended = std::fs::read_to_string(trace.dir.join("runs.log")).unwrap();
    assert!(
        ended.lines().any(|l| l.starts_with("end 7000")),
        "the handler's run ended: {ended}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM longshore.cancelled_jobs WHERE cancelled_by = 'token:ops'"
        )
        .await,
        1
    );
    assert_eq!(trace.starts().get(&7000), Some(&1), "it never ran again");

    // Every action the console took is recorded under the token's name.
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM longshore.operator_actions WHERE actor = 'token:ops' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(actions, vec!["pause", "resume", "dlq_retry", "cancel"]);

    // The other pages render (and are shown in the README).
    for (path, name, must) in [
        ("/ui/schedules", "schedules", "#schedules"),
        ("/ui/errors", "errors", "#errors"),
        ("/ui/views/credits", "credits", "h2"),
        ("/ui/views/billing", "billing", "h2"),
    ] {
        b.goto(&format!("{base}{path}")).await.unwrap();
        assert!(b.find(Locator::Css(must)).await.is_ok(), "{path}");
        shot(&b, name).await;
    }
    // Readable on a phone: the overview at 390 px wide, no horizontal page scroll.
    b.set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{base}/ui")).await.unwrap();
    let wide: Value = b
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(wide, json!(true), "the page fits a phone's width");
    shot(&b, "overview-phone").await;

    b.close().await.unwrap();
    worker.signal("TERM");
    let _ = worker.wait_exit(Duration::from_secs(15)).await;
}

/// A read-only token sees no action buttons and gets 403 when it posts anyway; a POST
/// with a wrong CSRF token is refused and changes nothing; without a session a POST is
/// 401 and a page sends the browser to sign in; the session cookie is HttpOnly and
/// SameSite=Strict and no script can read it.
#[tokio::test]
async fn console_refuses_what_a_token_or_a_form_may_not_do() {
    let t = db().await;
    let dir = config_dir(&console_config());
    let ingress = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["ingress"],
        &[("LONGSHORE_ENV", "test")],
    );
    let base = format!("http://{}", ingress.ingress_addr().await);
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 1}', 3600)")
        .execute(&t.pool)
        .await
        .unwrap();

    // The cookie, as the server sets it.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={READ_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let r = http
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // No session: a POST is 401, never an action.
    let r = http
        .post(format!("{base}/ui/queues/probe/pause"))
        .body("csrf=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A write session's form posted from another site: refused by its Origin.
    let r = http
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={WRITE_TOKEN}"))
        .send()
        .await
        .unwrap();
    let session = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = http
        .get(format!("{base}/ui/queues/probe"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = page
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_string();
    let r = http
        .post(format!("{base}/ui/queues/probe/pause"))
        .header("cookie", &session)
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("cross_origin"));

    let (_d, b) = browser(1280, 900).await;
    sign_in(&b, &base, READ_TOKEN).await;
    let readable: Value = b.execute("return document.cookie;", vec![]).await.unwrap();
    assert_eq!(readable, json!(""), "HttpOnly: no script reads the session");
    b.goto(&format!("{base}/ui/queues/probe?state=delayed"))
        .await
        .unwrap();
    assert!(
        b.find(Locator::Css("#jobs tr[data-id]")).await.is_ok(),
        "sees the job"
    );
    for css in [
        "#pause",
        "button[data-action=cancel]",
        "button[data-action=retry]",
        "form[action$='/bulk']",
    ] {
        assert!(
            b.find_all(Locator::Css(css)).await.unwrap().is_empty(),
            "a read-only token sees no {css}"
        );
    }
    let token = csrf(&b).await;
    let (status, body) =
        post_from_page(&b, "/ui/queues/probe/pause", &format!("csrf={token}")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("scope_forbidden"), "{body}");
    let id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.q_probe")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let (status, _) = post_from_page(
        &b,
        &format!("/ui/jobs/probe/{id}/cancel"),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(status, 403);

    // A write session, a forged form: refused, nothing changes.
    click(&b, "header form button").await; // sign out
    sign_in(&b, &base, WRITE_TOKEN).await;
    let (status, body) = post_from_page(&b, "/ui/queues/probe/pause", "csrf=0000").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("csrf_mismatch"), "{body}");
    let (status, _) = post_from_page(&b, &format!("/ui/jobs/probe/{id}/cancel"), "").await;
    assert_eq!(status, 403);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.queue_controls").await
            + count(&t.pool, "SELECT count(*) FROM longshore.operator_actions").await
            + count(&t.pool, "SELECT count(*) FROM longshore.cancelled_jobs").await,
        0,
        "no refused post acted"
    );
    // With the right token the same post acts.
    let token = csrf(&b).await;
    let (status, _) = post_from_page(&b, "/ui/queues/probe/pause", &format!("csrf={token}")).await;
    assert_eq!(status, 303);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.queue_controls WHERE paused AND changed_by = 'token:ops'").await,
        1
    );
    b.close().await.unwrap();
}
