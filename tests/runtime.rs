//! Database tests of the runtime: the store's fenced statements, the worker's outcome
//! handling, enqueue options and idempotency. Real PostgreSQL, a fresh database each.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{config, count, db, eventually};
use longshore_jobs::probe::Probe;
use longshore_workers::store::{Beat, Bury, Fence, QueueSql, Reschedule};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Outcome, QueueName, Registry, Worker,
    enqueue, enqueue_json, enqueue_many,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn probe_sql() -> QueueSql {
    QueueSql::new(QueueName::parse("probe").unwrap())
}

fn fence(c: &longshore_workers::store::Claimed) -> Fence {
    Fence {
        msg_id: c.msg_id,
        read_ct: c.read_ct,
    }
}

/// Runs a worker in this process until `done` holds, then shuts it down cleanly.
async fn work_until<F, Fut>(
    pool: &PgPool,
    registry: Registry,
    cfg: &[(&str, &str)],
    what: &str,
    done: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let stop = CancellationToken::new();
    let w = Worker::new(pool.clone(), registry, config(cfg));
    let h = tokio::spawn(w.run(stop.clone()));
    eventually(Duration::from_secs(20), what, done).await;
    stop.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn claim_and_ack_archive_keep_the_result() {
    let t = db().await;
    let q = probe_sql();
    let ids = enqueue_many(
        &t.pool,
        &[Probe::new(1), Probe::new(2), Probe::new(3)],
        Default::default(),
    )
    .await
    .unwrap();
    let batch = q.claim(&t.pool, 2, Duration::from_secs(30)).await.unwrap();
    assert_eq!(batch.iter().map(|c| c.msg_id).collect::<Vec<_>>(), ids[..2]);
    assert!(batch.iter().all(|c| c.read_ct == 1 && c.attempt() == 1));
    let stats = q.stats(&t.pool).await.unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.delayed), (1, 2, 0));

    let acks = vec![
        (fence(&batch[0]), Some(json!({"ok": 1}))),
        (fence(&batch[1]), None),
    ];
    assert_eq!(q.ack_archive(&t.pool, &acks).await.unwrap().len(), 2);
    let result: Option<Value> =
        sqlx::query_scalar("SELECT headers->'result' FROM pgmq.a_probe WHERE msg_id = $1")
            .bind(ids[0])
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(result, Some(json!({"ok": 1})));
    let stats = q.stats(&t.pool).await.unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.archived), (1, 0, 2));
}

#[tokio::test]
async fn a_stale_read_ct_changes_nothing() {
    let t = db().await;
    let q = probe_sql();
    enqueue(&t.pool, &Probe::new(1), Default::default())
        .await
        .unwrap();
    // Worker A claims with a lease that runs out; worker B claims the same message.
    let a = q
        .claim(&t.pool, 1, Duration::from_millis(50))
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let b = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(a.msg_id, b.msg_id);
    assert_eq!((a.read_ct, b.read_ct), (1, 2));

    let stale = fence(&a);
    assert!(
        q.ack_archive(&t.pool, &[(stale, None)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(q.ack_delete(&t.pool, &[stale]).await.unwrap().is_empty());
    assert_eq!(
        q.heartbeat(&t.pool, &[stale], Duration::from_secs(60))
            .await
            .unwrap(),
        vec![(stale, Beat::Gone)]
    );
    let r = Reschedule {
        fence: stale,
        delay: Duration::ZERO,
        error: Some("x".into()),
        free: false,
    };
    assert!(q.reschedule(&t.pool, &[r]).await.unwrap().is_empty());
    let bury = Bury {
        fence: stale,
        attempts: 1,
        error: "x".into(),
    };
    assert!(q.bury(&t.pool, &[bury]).await.unwrap().is_empty());
    // Still B's, untouched.
    let s = q.stats(&t.pool).await.unwrap();
    assert_eq!((s.in_flight, s.dead_letters, s.archived), (1, 0, 0));
    assert_eq!(
        q.ack_archive(&t.pool, &[(fence(&b), None)]).await.unwrap(),
        vec![b.msg_id]
    );
}

#[tokio::test]
async fn snooze_and_release_do_not_spend_attempts_or_fencing_tokens() {
    let t = db().await;
    let q = probe_sql();
    enqueue(&t.pool, &Probe::new(1), Default::default())
        .await
        .unwrap();
    let c = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let r = Reschedule {
        fence: fence(&c),
        delay: Duration::ZERO,
        error: None,
        free: true,
    };
    assert_eq!(q.reschedule(&t.pool, &[r]).await.unwrap().len(), 1);
    let c2 = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    // read_ct still grows (it is the fencing token), the attempt does not.
    assert_eq!((c2.read_ct, c2.attempt()), (2, 1));
    // The holder of read_ct 1 cannot act even though the attempt number is the same.
    assert!(
        q.ack_archive(&t.pool, &[(fence(&c), None)])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn reschedule_records_the_error_and_delays() {
    let t = db().await;
    let q = probe_sql();
    enqueue(&t.pool, &Probe::new(1), Default::default())
        .await
        .unwrap();
    let c = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let r = Reschedule {
        fence: fence(&c),
        delay: Duration::from_secs(60),
        error: Some("boom".into()),
        free: false,
    };
    q.reschedule(&t.pool, &[r]).await.unwrap();
    assert!(
        q.claim(&t.pool, 1, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    let s = q.stats(&t.pool).await.unwrap();
    assert_eq!((s.visible, s.in_flight, s.delayed), (0, 0, 1));
    let err: String = sqlx::query_scalar("SELECT headers->>'last_error' FROM pgmq.q_probe")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(err, "boom");
}

#[tokio::test]
async fn retry_then_done_and_the_effect_commits_once() {
    let t = db().await;
    let mut p = Probe::new(7);
    p.fail_times = Some(2);
    p.effect = Some(true);
    enqueue(&t.pool, &p, Default::default()).await.unwrap();
    let pool = t.pool.clone();
    work_until(&t.pool, common::registry(), &[("LONGSHORE__QUEUES__DEFAULT__BACKOFF_BASE", "10ms")], "probe 7 done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 1).then_some(()) }
    })
    .await;
    let (attempt,): (i32,) = sqlx::query_as("SELECT attempt FROM probe_effects WHERE id = 7")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(attempt, 3, "two retries, then the effect");
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects").await,
        1
    );
    let hdr: Value = sqlx::query_scalar("SELECT headers FROM pgmq.a_probe")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(hdr["result"]["attempt"], 3);
    assert!(
        hdr["last_error"].as_str().unwrap().contains("attempt 2"),
        "{hdr}"
    );
    // Every failed attempt with its error (issue 19), in order.
    let errors = hdr["errors"].as_array().expect("an errors history");
    let attempts: Vec<i64> = errors
        .iter()
        .map(|e| e["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, vec![1, 2], "{hdr}");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("attempt 1"),
        "{hdr}"
    );
    assert!(errors.iter().all(|e| e["at"].is_string()), "{hdr}");
}

#[tokio::test]
async fn bad_args_panics_and_exhaustion_dead_letter_while_good_jobs_finish() {
    let t = db().await;
    sqlx::query("SELECT pgmq.send('probe', '\"not an object\"')")
        .execute(&t.pool)
        .await
        .unwrap();
    let mut panicky = Probe::new(2);
    panicky.panic = Some(true);
    let mut failing = Probe::new(3);
    failing.fail_times = Some(100);
    enqueue(&t.pool, &panicky, Default::default())
        .await
        .unwrap();
    enqueue(&t.pool, &failing, Default::default())
        .await
        .unwrap();
    let good: Vec<Probe> = (100..150).map(Probe::new).collect();
    enqueue_many(&t.pool, &good, Default::default())
        .await
        .unwrap();
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        common::registry(),
        &[
            ("LONGSHORE__QUEUES__DEFAULT__BACKOFF_BASE", "5ms"),
            ("LONGSHORE__QUEUES__DEFAULT__MAX_ATTEMPTS", "3"),
        ],
        "3 dead letters and 50 done",
        || {
            let pool = pool.clone();
            async move {
                let dead = count(&pool, "SELECT count(*) FROM longshore.dead_letters").await;
                let done = count(&pool, "SELECT count(*) FROM pgmq.a_probe").await;
                (dead == 3 && done == 50).then_some(())
            }
        },
    )
    .await;
    let rows: Vec<(Value, i32, String)> = sqlx::query_as(
        "SELECT message, attempts, last_error FROM longshore.dead_letters ORDER BY msg_id",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].1, 1, "unparseable args die at once");
    assert!(
        rows[0].2.contains("invalid args for probe"),
        "{}",
        rows[0].2
    );
    assert_eq!(rows[1].1, 3, "panics retry up to max_attempts");
    let history: Vec<i64> = sqlx::query_scalar(
        "SELECT (e->>'attempt')::bigint FROM longshore.dead_letters d, jsonb_array_elements(d.headers->'errors') WITH ORDINALITY AS x(e, o) WHERE d.message->>'id' = '3' ORDER BY o",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![1, 2, 3],
        "each attempt's error, the last one's too"
    );
    assert!(
        rows[1]
            .2
            .contains("handler panicked: probe 2 asked to panic"),
        "{}",
        rows[1].2
    );
    assert_eq!(rows[2].1, 3);
    assert!(
        rows[2].2.contains("gave up after 3 attempts"),
        "{}",
        rows[2].2
    );
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 0);
}

#[tokio::test]
async fn timeouts_are_retries() {
    let t = db().await;
    let mut slow = Probe::new(1);
    slow.sleep_ms = Some(5_000);
    enqueue(&t.pool, &slow, Default::default()).await.unwrap();
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        common::registry(),
        &[
            ("LONGSHORE__QUEUES__PROBE__TIMEOUT", "100ms"),
            ("LONGSHORE__QUEUES__PROBE__MAX_ATTEMPTS", "2"),
            ("LONGSHORE__QUEUES__PROBE__BACKOFF_BASE", "5ms"),
        ],
        "timed-out job dead-lettered",
        || {
            let pool = pool.clone();
            async move {
                (count(&pool, "SELECT count(*) FROM longshore.dead_letters").await == 1)
                    .then_some(())
            }
        },
    )
    .await;
    let err: String = sqlx::query_scalar("SELECT last_error FROM longshore.dead_letters")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert!(err.contains("timed out after 0.100s"), "{err}");
}

/// Snoozes twice, then completes; with max_attempts = 1 it would be dead otherwise.
#[derive(Serialize, Deserialize)]
struct Nap {
    id: i64,
}
impl JobArgs for Nap {
    const KIND: &'static str = "probe";
}
struct NapHandler(Arc<AtomicU32>);
impl Handler for NapHandler {
    type Args = Nap;
    async fn handle(&self, _a: Nap, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        assert_eq!(ctx.attempt, 1, "snoozes must not spend attempts");
        if self.0.fetch_add(1, Ordering::SeqCst) < 2 {
            return Outcome::snooze(Duration::from_millis(20));
        }
        Outcome::done()
    }
}

#[tokio::test]
async fn snooze_does_not_spend_an_attempt() {
    let t = db().await;
    enqueue_json(
        &t.pool,
        &QueueName::parse("probe").unwrap(),
        json!({"id": 1}),
        Default::default(),
    )
    .await
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        Registry::new().register(NapHandler(runs.clone())),
        &[("LONGSHORE__QUEUES__PROBE__MAX_ATTEMPTS", "1"), ("LONGSHORE__WORKER__POLL_INTERVAL", "10ms")],
        "napper done",
        || {
            let pool = pool.clone();
            async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );
}

/// Writes its effect, but before it returns another worker takes the message over
/// (the lease is forced to expire and the message claimed again). The runtime's fenced
/// acknowledgement must fail and roll the effect back.
#[derive(Serialize, Deserialize)]
struct Overtaken {
    id: i64,
}
impl JobArgs for Overtaken {
    const KIND: &'static str = "probe";
}
struct OvertakenHandler;
static STOLEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
impl Handler for OvertakenHandler {
    type Args = Overtaken;
    async fn handle(&self, a: Overtaken, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        sqlx::query("INSERT INTO probe_effects (id, attempt) VALUES ($1, $2)")
            .bind(a.id)
            .bind(ctx.attempt as i32)
            .execute(ctx.tx().await?)
            .await?;
        if ctx.attempt == 1 {
            // Expire the lease and claim in one transaction, so the worker's own poll
            // cannot take the message in between and leave the thief with nothing.
            let mut thief = ctx.pool().begin().await?;
            sqlx::query(
                "UPDATE pgmq.q_probe SET vt = now() - interval '1 second' WHERE msg_id = $1",
            )
            .bind(ctx.job_id)
            .execute(&mut *thief)
            .await?;
            let stolen = probe_sql()
                .claim(&mut *thief, 1, Duration::from_millis(200))
                .await?;
            thief.commit().await?;
            STOLEN.store(stolen.len() == 1, Ordering::SeqCst);
        }
        Outcome::done()
    }
}

#[tokio::test]
async fn a_lost_lease_rolls_back_the_handlers_effects() {
    let t = db().await;
    enqueue_json(
        &t.pool,
        &QueueName::parse("probe").unwrap(),
        json!({"id": 9}),
        Default::default(),
    )
    .await
    .unwrap();
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        Registry::new().register(OvertakenHandler),
        &[("LONGSHORE__WORKER__POLL_INTERVAL", "20ms")],
        "the re-delivered run completes",
        || {
            let pool = pool.clone();
            async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 1).then_some(()) }
        },
    )
    .await;
    // One effect, from a later run: the first run's was fenced out and rolled back.
    // The thief (read_ct 2) never completes; once its short lease expires the worker
    // claims again, so the winner is attempt 3.
    let rows: Vec<(i64, i32)> = sqlx::query_as("SELECT id, attempt FROM probe_effects")
        .fetch_all(&t.pool)
        .await
        .unwrap();
    assert!(STOLEN.load(Ordering::SeqCst), "the thief's claim happened");
    assert_eq!(rows, vec![(9, 3)], "only the run after the thief's lease");
}

#[tokio::test]
async fn heartbeats_keep_a_slow_job_from_running_twice() {
    let t = db().await;
    let mut slow = Probe::new(1);
    slow.sleep_ms = Some(2_600);
    slow.effect = Some(true);
    enqueue(&t.pool, &slow, Default::default()).await.unwrap();
    // Two workers with a 1 s lease: without heartbeats the second would take it.
    let cfg = [
        ("LONGSHORE__QUEUES__PROBE__LEASE", "1s"),
        ("LONGSHORE__WORKER__POLL_INTERVAL", "50ms"),
    ];
    let stop = CancellationToken::new();
    let a = tokio::spawn(
        Worker::new(t.pool.clone(), common::registry(), config(&cfg)).run(stop.clone()),
    );
    let b = tokio::spawn(
        Worker::new(t.pool.clone(), common::registry(), config(&cfg)).run(stop.clone()),
    );
    let pool = t.pool.clone();
    eventually(Duration::from_secs(10), "slow job done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 1).then_some(()) }
    })
    .await;
    stop.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        count(&t.pool, "SELECT read_ct::bigint FROM pgmq.a_probe").await,
        1,
        "claimed once"
    );
    assert_eq!(
        count(&t.pool, "SELECT attempt::bigint FROM probe_effects").await,
        1
    );
}

#[tokio::test]
async fn idempotency_keys_return_the_first_job() {
    let t = db().await;
    let q = QueueName::parse("probe").unwrap();
    let o = || EnqueueOptions::default().key("order-42");
    let a = enqueue_json(&t.pool, &q, json!({"id": 1}), o())
        .await
        .unwrap();
    let b = enqueue_json(&t.pool, &q, json!({ "id" : 1 }), o())
        .await
        .unwrap();
    assert!(!a.duplicate && b.duplicate && b.same_body);
    assert_eq!(a.id, b.id);
    let c = enqueue_json(&t.pool, &q, json!({"id": 2}), o())
        .await
        .unwrap();
    assert_eq!((c.id, c.duplicate, c.same_body), (a.id, true, false));
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 1);

    // After the TTL the key is free again.
    let short = || {
        EnqueueOptions::default()
            .key("short")
            .ttl(Duration::from_millis(100))
    };
    let d = enqueue_json(&t.pool, &q, json!({"id": 3}), short())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = enqueue_json(&t.pool, &q, json!({"id": 3}), short())
        .await
        .unwrap();
    assert!(!e.duplicate && e.id != d.id);
}

#[tokio::test]
async fn racing_enqueues_with_one_key_make_one_job() {
    let t = db().await;
    let q = QueueName::parse("probe").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let pool = t.pool.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            enqueue_json(
                &pool,
                &q,
                json!({"id": 1}),
                EnqueueOptions::default().key("race"),
            )
            .await
            .unwrap()
            .id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 1);
}

#[tokio::test]
async fn enqueue_inside_a_transaction_commits_or_rolls_back_with_it() {
    let t = db().await;
    let mut tx = t.pool.begin().await.unwrap();
    enqueue(&mut *tx, &Probe::new(1), Default::default())
        .await
        .unwrap();
    enqueue(&mut tx, &Probe::new(2), EnqueueOptions::default().key("k"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 0);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.idempotency_keys").await,
        0
    );

    let mut tx = t.pool.begin().await.unwrap();
    enqueue(&mut *tx, &Probe::new(1), Default::default())
        .await
        .unwrap();
    enqueue(&mut tx, &Probe::new(2), EnqueueOptions::default().key("k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 2);
}

#[tokio::test]
async fn delayed_jobs_wait_until_due() {
    let t = db().await;
    let q = probe_sql();
    // A busy machine can stall for a while between two statements, so the test
    // never asserts "not yet due" after the delay could have passed: it reads the
    // clock around each claim instead of trusting a short sleep.
    let delay = Duration::from_secs(2);
    let started = std::time::Instant::now();
    enqueue(
        &t.pool,
        &Probe::new(1),
        EnqueueOptions::default().delay(delay),
    )
    .await
    .unwrap();
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    enqueue(
        &t.pool,
        &Probe::new(2),
        EnqueueOptions::default().run_at(at),
    )
    .await
    .unwrap();
    let early = q.claim(&t.pool, 10, Duration::from_secs(30)).await.unwrap();
    if started.elapsed() < delay {
        assert!(
            early.is_empty(),
            "a delayed job was claimed before it was due"
        );
        assert_eq!(q.stats(&t.pool).await.unwrap().delayed, 2);
    }
    let mut got = early;
    let deadline = started + Duration::from_secs(30);
    while got.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = q.claim(&t.pool, 10, Duration::from_secs(30)).await.unwrap();
    }
    assert!(started.elapsed() >= delay, "claimed before its delay");
    assert_eq!(
        got.len(),
        1,
        "only the job that is due; the other waits an hour"
    );
    assert_eq!(got[0].message["id"], 1);
    assert!(
        got[0].due_at() > got[0].enqueued_at,
        "run_at header drives the wait metric"
    );
}

#[tokio::test]
async fn unknown_queue_and_bad_names_are_clear_errors() {
    let t = db().await;
    let e = enqueue_json(
        &t.pool,
        &QueueName::parse("nosuch").unwrap(),
        json!({}),
        Default::default(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("queue \"nosuch\" does not exist"),
        "{e}"
    );
    let e = enqueue_json(
        &t.pool,
        &QueueName::parse("probe").unwrap(),
        json!({}),
        EnqueueOptions::default().key(""),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("idempotency key"), "{e}");
}

#[tokio::test]
async fn dead_letters_can_be_retried_and_purged() {
    let t = db().await;
    let q = probe_sql();
    enqueue_many(&t.pool, &[Probe::new(1), Probe::new(2)], Default::default())
        .await
        .unwrap();
    let batch = q.claim(&t.pool, 2, Duration::from_secs(30)).await.unwrap();
    let bury: Vec<Bury> = batch
        .iter()
        .map(|c| Bury {
            fence: fence(c),
            attempts: 1,
            error: "nope".into(),
        })
        .collect();
    assert_eq!(q.bury(&t.pool, &bury).await.unwrap().len(), 2);
    let name = QueueName::parse("probe").unwrap();
    let dl = longshore_workers::store::dead_letters(&t.pool, &name, &[], 10)
        .await
        .unwrap();
    assert_eq!(dl.len(), 2);
    assert_eq!(dl[0].last_error, "nope");
    let mut tx = t.pool.begin().await.unwrap();
    let moved = longshore_workers::store::retry_dead_letters(
        &mut tx,
        &q,
        longshore_workers::store::Selection::Ids(&[dl[0].id]),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(moved.len(), 1);
    let fresh = q.claim(&t.pool, 10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(
        (fresh[0].attempt(), fresh[0].message.clone()),
        (1, dl[0].message.clone())
    );
    assert!(fresh[0].headers.get("last_error").is_none());
    assert_eq!(
        longshore_workers::store::purge_dead_letters(&t.pool, &name, &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let t = db().await;
    let before = count(&t.pool, "SELECT count(*) FROM pg_class").await;
    for _ in 0..2 {
        longshore_workers::db::migrate(&t.pool, &common::MIGRATOR, &common::registry())
            .await
            .unwrap();
    }
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pg_class").await,
        before
    );
    let kinds = common::registry().kinds().count() as i64;
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.meta").await,
        kinds
    );
}

/// Issue 16: the queue gauges are counted once per interval for the whole fleet. Three
/// processes sampling at once: one counts, all three get its figures; sampling again
/// within the interval counts nothing; once due, one counts again and sees the change.
/// The archive is not counted (a million archived rows used to be read by every
/// process every 5 s).
#[tokio::test]
async fn one_process_per_interval_counts_the_queues_for_the_fleet() {
    use longshore_workers::telemetry::sample_once;
    let t = db().await;
    for i in 0..3 {
        enqueue(&t.pool, &Probe::new(i), EnqueueOptions::default())
            .await
            .unwrap();
    }
    enqueue(
        &t.pool,
        &Probe::new(9),
        EnqueueOptions::default().delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let pools: Vec<PgPool> = (0..3).map(|_| t.pool.clone()).collect();
    let every = Duration::from_secs(2);
    let samples = futures::future::join_all(pools.iter().map(|p| sample_once(p, every))).await;
    let samples: Vec<_> = samples.into_iter().map(Result::unwrap).collect();
    let counted: Vec<_> = samples.iter().filter(|s| s.counted).collect();
    assert_eq!(
        counted.len(),
        1,
        "exactly one of three counted: {samples:?}"
    );
    let probe = |s: &longshore_workers::telemetry::Sample| {
        s.queues
            .iter()
            .find(|q| q.queue == "probe")
            .cloned()
            .expect("probe sampled")
    };
    let p = probe(counted[0]);
    assert_eq!((p.visible, p.delayed, p.in_flight), (3, 1, 0));
    // Within the interval: nobody counts, everybody reads the counted figures (the
    // two that ran beside the count read what was there before it: gauges lag by at
    // most one interval).
    enqueue(&t.pool, &Probe::new(4), EnqueueOptions::default())
        .await
        .unwrap();
    for _ in 0..3 {
        let again = sample_once(&t.pool, every).await.unwrap();
        assert!(!again.counted);
        assert_eq!(again.queues, counted[0].queues);
    }
    // Due again: counted, with the new job.
    tokio::time::sleep(every).await;
    let due = sample_once(&t.pool, every).await.unwrap();
    assert!(due.counted);
    let p = probe(&due);
    assert_eq!(p.visible, 4);
    assert_eq!(p.archived, 0, "the archive is never counted for the gauges");
    assert!(due.failed.is_empty() && due.age_seconds < 1.0, "{due:?}");
    // A queue whose count fails (its table is gone) keeps its last figures, is named,
    // and ages; the others are still counted.
    sqlx::query("SELECT pgmq.create('broken')")
        .execute(&t.pool)
        .await
        .unwrap();
    tokio::time::sleep(every).await;
    assert!(sample_once(&t.pool, every).await.unwrap().counted);
    sqlx::query("DROP TABLE pgmq.q_broken")
        .execute(&t.pool)
        .await
        .unwrap();
    enqueue(&t.pool, &Probe::new(5), EnqueueOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(every).await;
    let partial = sample_once(&t.pool, every).await.unwrap();
    assert!(partial.counted);
    assert_eq!(partial.failed, ["broken"]);
    assert_eq!(probe(&partial).visible, 5, "the other queues are counted");
    assert!(
        partial.queues.iter().any(|q| q.queue == "broken"),
        "the failed queue keeps its last figures"
    );
    assert!(partial.age_seconds >= every.as_secs_f64(), "{partial:?}");
}

/// Claims take jobs in the order they became visible, and a `run_at` in the past is
/// visible now: a producer cannot put its job ahead of those already waiting (before
/// the claim ordered by `vt`, this was by id; a `vt` of 1970 would now jump the queue).
#[tokio::test]
async fn a_run_at_in_the_past_does_not_jump_the_queue() {
    let t = db().await;
    let first = enqueue(&t.pool, &Probe::new(1), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let late = enqueue(
        &t.pool,
        &Probe::new(2),
        EnqueueOptions::default().run_at(epoch),
    )
    .await
    .unwrap()
    .id;
    let claimed = probe_sql()
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.msg_id).collect::<Vec<_>>(),
        [first]
    );
    let vt_ok: bool = sqlx::query_scalar(
        "SELECT vt > now() - interval '1 minute' FROM pgmq.q_probe WHERE msg_id = $1",
    )
    .bind(late)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert!(vt_ok, "a past run_at is stored as now");
}

async fn listen(
    t: &longshore_workers::testing::TestDb,
    channel: &str,
) -> sqlx::postgres::PgListener {
    let mut l = sqlx::postgres::PgListener::connect(&t.url).await.unwrap();
    l.listen(channel).await.unwrap();
    l
}

async fn next_payload(l: &mut sqlx::postgres::PgListener) -> String {
    tokio::time::timeout(Duration::from_secs(10), l.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap()
        .payload()
        .to_string()
}

/// Issue 16 (commits): a completion notifies only while an ingress watches its queue,
/// and names its jobs. Notifications arrive in commit order, so "the first one heard
/// names the job completed after the watch" proves the earlier completion was silent.
#[tokio::test]
async fn completions_notify_only_while_watched_and_name_their_jobs() {
    let t = db().await;
    let mut l = listen(&t, "longshore_done").await;
    let ids = enqueue_many(
        &t.pool,
        &(0..705).map(Probe::new).collect::<Vec<_>>(),
        Default::default(),
    )
    .await
    .unwrap();
    let archive = |id: i64| {
        let pool = t.pool.clone();
        async move {
            sqlx::query("SELECT pgmq.archive('probe', $1::bigint)")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let watch = |secs: f64| {
        let pool = t.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO longshore.done_watch VALUES ('probe', now() + make_interval(secs => $1))
                 ON CONFLICT (queue) DO UPDATE SET until = excluded.until",
            )
            .bind(secs)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    archive(ids[0]).await; // nobody watches: silent
    watch(60.0).await;
    archive(ids[1]).await;
    assert_eq!(next_payload(&mut l).await, format!("probe {}", ids[1]));

    watch(-1.0).await; // lapsed: silent again
    archive(ids[2]).await;
    watch(60.0).await;
    // A dead letter and a completion record (on_done = "delete") notify with their ids.
    sqlx::query(
        "INSERT INTO longshore.dead_letters (queue, msg_id, attempts, last_error, enqueued_at)
         VALUES ('probe', $1, 1, 'x', now())",
    )
    .bind(ids[3])
    .execute(&t.pool)
    .await
    .unwrap();
    assert_eq!(next_payload(&mut l).await, format!("probe {}", ids[3]));
    sqlx::query(
        "INSERT INTO longshore.completions (queue, msg_id, attempts) VALUES ('probe', $1, 1)",
    )
    .bind(ids[4])
    .execute(&t.pool)
    .await
    .unwrap();
    assert_eq!(next_payload(&mut l).await, format!("probe {}", ids[4]));

    // 700 archived in one statement: every id, in payloads of at most 300.
    sqlx::query("SELECT pgmq.archive('probe', $1::bigint[])")
        .bind(&ids[5..])
        .execute(&t.pool)
        .await
        .unwrap();
    let mut heard = Vec::new();
    for _ in 0..3 {
        let p = next_payload(&mut l).await;
        let (q, list) = p.split_once(' ').unwrap();
        assert_eq!(q, "probe");
        let part: Vec<i64> = list.split(',').map(|s| s.parse().unwrap()).collect();
        assert!(part.len() <= 300, "{} ids in one payload", part.len());
        heard.extend(part);
    }
    heard.sort_unstable();
    assert_eq!(heard, ids[5..].to_vec());
}

/// Issue 16 (commits): enqueue notifications are debounced per queue by a sequence that
/// holds the last notification's time, only in a transaction that began a moment ago
/// (an enqueue later in a longer transaction may commit much later, and its
/// notification with it); a queue without the sequence always notifies. Silence is shown by order: a
/// marker notified after a silent enqueue is the next thing heard.
#[tokio::test]
async fn enqueue_notifications_are_debounced_per_queue() {
    let t = db().await;
    let mut l = listen(&t, "longshore_enqueue").await;
    let stamp = |us: i64| {
        let pool = t.pool.clone();
        async move {
            sqlx::query("SELECT setval('longshore.enq_probe', $1)")
                .bind(us)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let marker = |m: &'static str| {
        let pool = t.pool.clone();
        async move {
            sqlx::query("SELECT pg_notify('longshore_enqueue', $1)")
                .bind(m)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let now_us = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
        )
        .fetch_one(&t.pool)
        .await
        .unwrap()
    };
    // Notified "just now" (stamped 0.8 s ahead, so a slow machine is still within the
    // window): an autocommit enqueue is silent. A machine that stalls for 10 ms inside
    // the enqueue's own transaction makes it notify (it counts as a long transaction),
    // so a few tries are allowed; a debounce that never silences fails every one.
    let mut silent = false;
    for i in 0..5 {
        stamp(now_us().await + 800_000).await;
        enqueue(&t.pool, &Probe::new(1), Default::default())
            .await
            .unwrap();
        let m: &'static str = ["m0a", "m0b", "m0c", "m0d", "m0e"][i];
        marker(m).await;
        let first = next_payload(&mut l).await;
        if first == m {
            silent = true;
            break;
        }
        assert_eq!(first, "probe");
        assert_eq!(next_payload(&mut l).await, m);
    }
    assert!(silent, "the debounced enqueue notified every time");

    // The same stamp, but the enqueue comes more than 10 ms into its transaction: it
    // notifies (at its commit), whatever the stamp says.
    stamp(now_us().await + 800_000).await;
    let mut tx = t.pool.begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    enqueue(&mut *tx, &Probe::new(2), Default::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    marker("m2").await;
    assert_eq!(next_payload(&mut l).await, "probe");
    assert_eq!(next_payload(&mut l).await, "m2");

    // A stamp in the past by more than the window: notifies, and stamps the clock.
    stamp(1).await;
    enqueue(&t.pool, &Probe::new(3), Default::default())
        .await
        .unwrap();
    marker("m3").await;
    assert_eq!(next_payload(&mut l).await, "probe");
    assert_eq!(next_payload(&mut l).await, "m3");
    let last: i64 = sqlx::query_scalar("SELECT pg_sequence_last_value('longshore.enq_probe')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let now = now_us().await;
    assert!(last <= now && last > now - 60_000_000, "{last} vs {now}");

    // A clock that went back (a stamp far ahead of any real time) does not silence it.
    stamp(i64::MAX / 2).await;
    enqueue(&t.pool, &Probe::new(4), Default::default())
        .await
        .unwrap();
    marker("m4").await;
    assert_eq!(next_payload(&mut l).await, "probe");
    assert_eq!(next_payload(&mut l).await, "m4");

    // Without its sequence, every statement notifies.
    sqlx::query("DROP SEQUENCE longshore.enq_probe")
        .execute(&t.pool)
        .await
        .unwrap();
    for i in 0..3 {
        enqueue(&t.pool, &Probe::new(10 + i), Default::default())
            .await
            .unwrap();
    }
    marker("m5").await;
    for _ in 0..3 {
        assert_eq!(next_payload(&mut l).await, "probe");
    }
    assert_eq!(next_payload(&mut l).await, "m5");
}

/// Counts the runs in progress across every queue it serves.
#[derive(Clone, Default)]
struct Gauge {
    running: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
    done: Arc<AtomicU32>,
}
impl Handler for Gauge {
    type Args = Probe;
    async fn handle(&self, _a: Probe, _ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        Outcome::done()
    }
}

/// Issue 16 (many queues): `worker.max_handlers` caps the handlers running at once in
/// one process, all queues together, below what the queues' concurrency would allow.
#[tokio::test]
async fn max_handlers_caps_the_process_across_queues() {
    let t = db().await;
    let g = Gauge::default();
    let queues = ["probe", "llm_call"];
    for q in queues {
        let qn = QueueName::parse(q).unwrap();
        for i in 0..15 {
            enqueue_json(&t.pool, &qn, json!({"id": i}), Default::default())
                .await
                .unwrap();
        }
    }
    let reg = Registry::new()
        .register_as("probe", g.clone())
        .register_as("llm_call", g.clone());
    let done = g.done.clone();
    work_until(
        &t.pool,
        reg,
        &[
            ("LONGSHORE__WORKER__CONCURRENCY", "10"),
            ("LONGSHORE__QUEUES__LLM_CALL__CONCURRENCY", "10"),
            ("LONGSHORE__WORKER__MAX_HANDLERS", "4"),
        ],
        "every job of both queues",
        || {
            let done = done.clone();
            async move { (done.load(Ordering::SeqCst) == 30).then_some(()) }
        },
    )
    .await;
    let most = g.most.load(Ordering::SeqCst);
    assert!(
        most <= 4,
        "{most} handlers ran at once under max_handlers = 4"
    );
    assert!(
        most >= 2,
        "the cap is shared, not a queue at a time: {most}"
    );
}

/// Issue 16 (idle queues): with the listener up, an idle consumer sleeps until its
/// queue's next due message, capped at `idle_poll_max` (here two minutes). A delayed
/// job and a retry in backoff must still start about when due, not at the cap: the
/// sleep is computed from the queue, and a reschedule wakes its consumer to look again.
#[tokio::test]
async fn idle_consumers_wake_for_delayed_jobs_and_retries_not_at_the_cap() {
    let t = db().await;
    let stop = CancellationToken::new();
    let w = Worker::new(
        t.pool.clone(),
        common::registry(),
        config(&[
            ("LONGSHORE__WORKER__POLL_INTERVAL", "1s"),
            ("LONGSHORE__WORKER__IDLE_POLL_MAX", "120s"),
            ("LONGSHORE__QUEUES__PROBE__BACKOFF_BASE", "2s"),
            ("LONGSHORE__QUEUES__PROBE__BACKOFF_CAP", "2s"),
        ]),
    )
    .only(&["probe".into()])
    .unwrap();
    let h = tokio::spawn(w.run(stop.clone()));
    let effects = |n: i64| {
        let pool = t.pool.clone();
        move || {
            let pool = pool.clone();
            async move { (count(&pool, "SELECT count(*) FROM probe_effects").await == n).then_some(()) }
        }
    };
    // A first job: the worker is up and has heard its listener.
    enqueue(
        &t.pool,
        &Probe {
            effect: Some(true),
            ..Probe::new(0)
        },
        Default::default(),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the first job", effects(1)).await;
    // Past the short poll that follows a notification: the consumer now sleeps long.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = std::time::Instant::now();
    enqueue(
        &t.pool,
        &Probe {
            effect: Some(true),
            ..Probe::new(1)
        },
        EnqueueOptions::default().delay(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    // And a job that fails once, then waits up to 2 s in backoff.
    enqueue(
        &t.pool,
        &Probe {
            effect: Some(true),
            fail_times: Some(1),
            ..Probe::new(2)
        },
        Default::default(),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(60),
        "the delayed job and the retry",
        effects(3),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "{took:?}: the consumer slept towards its 120 s cap instead of until the jobs were due"
    );
    stop.cancel();
    h.await.unwrap().unwrap();
}

fn probe(id: i64) -> Probe {
    Probe {
        effect: Some(true),
        ..Probe::new(id)
    }
}

/// The test kit (`longshore_workers::testing`) over a real queue: what is enqueued, a
/// drain through the real worker that leaves delayed jobs alone, and the results.
#[tokio::test]
async fn the_test_kit_sees_enqueued_jobs_drains_due_ones_and_reads_results() {
    use longshore_workers::testing::{
        all_enqueued, assert_enqueued, count_done, count_enqueued, drain, job_result, job_status,
        results,
    };
    let t = db().await;
    let mut ids = Vec::new();
    for id in 1..=3 {
        ids.push(
            longshore_workers::enqueue(&t.pool, &probe(id), EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let later = longshore_workers::enqueue(
        &t.pool,
        &probe(4),
        EnqueueOptions::default().delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap()
    .id;
    let queued = all_enqueued::<Probe>(&t.pool).await;
    assert_eq!(
        queued.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        assert_enqueued::<Probe>(&t.pool, json!({"id": 2})).await,
        vec![probe(2)]
    );
    // A job that is not there fails the assertion, naming what is.
    let missing = tokio::spawn({
        let pool = t.pool.clone();
        async move { assert_enqueued::<Probe>(&pool, json!({"id": 99})).await }
    })
    .await
    .expect_err("no job 99");
    let msg = missing.into_panic();
    let msg = msg
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(msg.contains("the queue holds 4"), "{msg}");

    let cfg = config(&[]);
    let registry = longshore_jobs::registry(&cfg).unwrap();
    drain(&t.pool, registry, cfg, &["probe"], Duration::from_secs(30)).await;

    // The delayed job is still waiting; the three due ones ran once each.
    assert_eq!(count_enqueued(&t.pool, "probe").await, 1);
    assert_eq!(all_enqueued::<Probe>(&t.pool).await, vec![probe(4)]);
    assert_eq!(count_done(&t.pool, "probe").await, 3);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM probe_effects").await,
        3
    );
    let done = results(&t.pool, "probe").await;
    assert_eq!(done.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert_eq!(
        job_result(&t.pool, "probe", ids[1]).await,
        Some(json!({"id": 2, "attempt": 1, "duplicate": false}))
    );
    assert_eq!(
        job_status(&t.pool, "probe", later).await.map(|s| s.state),
        Some(longshore_workers::store::JobState::Queued)
    );
    assert_eq!(job_result(&t.pool, "probe", later).await, None);
}

/// The errors history keeps the newest 10 failures in order, whatever a producer put in
/// the header (not an array, not an object at all).
#[tokio::test]
async fn the_errors_history_keeps_the_last_ten_in_order() {
    let t = db().await;
    let (attempts, first_error): (Vec<i64>, String) = sqlx::query_as(
        r#"
WITH RECURSIVE h(n, hdr) AS (
    SELECT 0, '{"errors": "not an array"}'::jsonb
    UNION ALL
    SELECT n + 1, hdr || jsonb_build_object('errors', longshore.error_history(hdr, n + 1, 'boom ' || (n + 1)))
      FROM h WHERE n < 12
)
SELECT array_agg((e->>'attempt')::bigint ORDER BY o), (array_agg(e->>'error' ORDER BY o))[1]
  FROM (SELECT hdr FROM h WHERE n = 12) last, jsonb_array_elements(last.hdr->'errors') WITH ORDINALITY AS x(e, o)
"#,
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(attempts, (3..=12).collect::<Vec<i64>>());
    assert_eq!(first_error, "boom 3");
    let from_null: i64 = sqlx::query_scalar(
        "SELECT jsonb_array_length(longshore.error_history(NULL, 1, repeat('x', 900)))::bigint",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(from_null, 1);
    let cut: i64 = sqlx::query_scalar(
        "SELECT length(longshore.error_history('\"scalar\"', 1, repeat('x', 900)) -> 0 ->> 'error')::bigint",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(cut, 500, "each error cut at 500 characters");
}

/// Issue 20 (groundwork): a fleet-wide rate limit. Three pools (three processes' worth
/// of connections) take from one key at 10/s with no burst for 4 s: never more than 10
/// takes in any one-second window across all three, and together they get the rate,
/// not a third of it.
#[tokio::test]
async fn a_rate_limit_shared_by_three_pools_passes_the_rate_and_no_more() {
    use longshore_workers::limits::{self, RateLimit};
    let t = db().await;
    let limit = RateLimit::per(10, Duration::from_secs(1), 1);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&t.url)
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut at = Vec::new();
            while started.elapsed() < Duration::from_secs(4) {
                limits::until_ready(&pool, "cryptometer", limit)
                    .await
                    .unwrap();
                at.push(started.elapsed());
            }
            at
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let most = all
        .iter()
        .map(|from| {
            all.iter()
                .filter(|t| **t >= *from && **t < *from + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    // 10 a second; one more for the jitter of reading the clock here, not in the database.
    assert!(most <= 11, "{most} takes in one second: {all:?}");
    assert!(
        all.len() >= 36,
        "the three together got the rate: {} takes in 4 s",
        all.len()
    );
    // A burst: after a quiet spell, `burst` takes at once, then the rate.
    let burst = RateLimit::per(1, Duration::from_secs(60), 3);
    for _ in 0..3 {
        assert_eq!(limits::take(&t.pool, "burst", burst).await.unwrap(), None);
    }
    let wait = limits::take(&t.pool, "burst", burst)
        .await
        .unwrap()
        .expect("the fourth waits");
    assert!(
        wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
}
