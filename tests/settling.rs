//! How outcomes are settled, against a real PostgreSQL (issue 13): one bad row cannot
//! fail its batch, settles are idempotent and lock in one order, a crash loop is buried
//! at claim time, suspects run one at a time, in-flight acknowledgements are not
//! counted as lost leases, and idempotency keys follow the jobs they name.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{config, count, db, eventually};
use longshore_jobs::probe::Probe;
use longshore_workers::store::{
    Beat, ClaimRequest, Fence, QueueSql, Reschedule, Selection, retry_dead_letters,
};
use longshore_workers::{
    EnqueueOptions, Handler, JobArgs, JobContext, JobError, Observer, Outcome, QueueName, Registry,
    Worker, enqueue, enqueue_many,
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

/// Counts what the runtime reports.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    done: AtomicUsize,
    stale: AtomicUsize,
    lost: AtomicUsize,
}

impl Observer for Counts {
    fn job_started(&self, _q: &str, _id: i64, _attempt: u32) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
    fn acked(&self, _q: &str, done: usize, stale: usize) {
        self.done.fetch_add(done, Ordering::SeqCst);
        self.stale.fetch_add(stale, Ordering::SeqCst);
    }
    fn lease_lost(&self, _q: &str, _id: i64) {
        self.lost.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs a worker in this process until `done` holds (or 60 s pass), then stops it.
async fn work_until<F, Fut>(
    pool: &PgPool,
    registry: Registry,
    cfg: &[(&str, &str)],
    observer: Arc<Counts>,
    what: &str,
    done: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let stop = CancellationToken::new();
    let w = Worker::new(pool.clone(), registry, config(cfg)).observer(observer);
    let h = tokio::spawn(w.run(stop.clone()));
    eventually(Duration::from_secs(60), what, done).await;
    stop.cancel();
    h.await.unwrap().unwrap();
}

/// A job kind on the probe queue whose outcome is chosen by its args.
#[derive(Serialize, Deserialize)]
struct Poison {
    id: i64,
    #[serde(default)]
    mode: String,
}
impl JobArgs for Poison {
    const KIND: &'static str = "probe";
}
struct PoisonHandler;
impl Handler for PoisonHandler {
    type Args = Poison;
    async fn handle(&self, a: Poison, _ctx: &mut JobContext) -> Result<Outcome, JobError> {
        match a.mode.as_str() {
            "nul_error" => Err(JobError::Fail("bad\0input\0".into())),
            "nul_retry" => Err(JobError::Retry("flaky\0".into())),
            "nul_result" => Outcome::done_with(json!({"text": "a\u{0}b", "k\u{0}": 1})),
            "snooze_forever" => Ok(Outcome::Snooze(Duration::MAX)),
            _ => Outcome::done_with(json!({"id": a.id})),
        }
    }
}

const BATCHED: [(&str, &str); 4] = [
    ("LONGSHORE__WORKER__ACK_BATCH", "500"),
    ("LONGSHORE__WORKER__ACK_FLUSH", "200ms"),
    ("LONGSHORE__WORKER__CONCURRENCY", "500"),
    ("LONGSHORE__QUEUES__DEFAULT__MAX_ATTEMPTS", "2"),
];

/// 499 good jobs and one poison value in one acknowledgement batch: the good ones are
/// done once, the bad one ends dead-lettered, done with a cleaned value, or snoozed
/// within range, and nothing loops. Before the fix, the one bad value failed the
/// batched statement, every acknowledgement of the flush was dropped, and the jobs ran
/// again and again.
#[tokio::test]
async fn one_poison_value_in_a_batch_affects_only_its_job() {
    for mode in [
        "nul_error",
        "nul_retry",
        "nul_result",
        "snooze_forever",
        "free_reads",
    ] {
        let t = db().await;
        let mut jobs: Vec<Value> = (1..=499).map(|i| json!({"id": i})).collect();
        jobs.insert(250, json!({"id": 1000, "mode": mode}));
        // A producer-written header the runtime reads: malformed.
        let headers = if mode == "free_reads" {
            json!({"free_reads": "x", "deaths": [1]})
        } else {
            json!({})
        };
        sqlx::query(
            r#"INSERT INTO pgmq.q_probe (vt, message, headers)
             SELECT now(), m, CASE WHEN m->>'id' = '1000' THEN $2 ELSE NULL END FROM unnest($1::jsonb[]) m"#,
        )
        .bind(&jobs)
        .bind(&headers)
        .execute(&t.pool)
        .await
        .unwrap();
        let counts = Arc::new(Counts::default());
        let pool = t.pool.clone();
        work_until(
            &t.pool,
            Registry::new().register(PoisonHandler),
            &BATCHED,
            counts.clone(),
            &format!("the 499 good jobs done ({mode})"),
            || {
                let pool = pool.clone();
                async move {
                    let good = count(&pool, "SELECT count(*) FROM pgmq.a_probe WHERE message->>'id' <> '1000'").await;
                    let bad_settled = count(&pool,
                        r#"SELECT (SELECT count(*) FROM pgmq.a_probe WHERE message->>'id' = '1000')
                              + (SELECT count(*) FROM longshore.dead_letters)
                              + (SELECT count(*) FROM pgmq.q_probe WHERE vt > now() + interval '3000 days')"#).await;
                    (good == 499 && bad_settled == 1).then_some(())
                }
            },
        )
        .await;
        assert_eq!(
            count(
                &t.pool,
                "SELECT count(*) FROM pgmq.a_probe WHERE read_ct = 1 AND message->>'id' <> '1000'"
            )
            .await,
            499,
            "{mode}: each good job ran once"
        );
        assert_eq!(counts.stale.load(Ordering::SeqCst), 0, "{mode}");
        let bad: Option<(String, Value)> = sqlx::query_as(
            r#"SELECT 'done', headers FROM pgmq.a_probe WHERE message->>'id' = '1000'
             UNION ALL SELECT 'dead', to_jsonb(last_error) FROM longshore.dead_letters
             UNION ALL SELECT 'snoozed', to_jsonb(extract(epoch FROM vt - now())) FROM pgmq.q_probe"#,
        )
        .fetch_optional(&t.pool)
        .await
        .unwrap();
        let (state, v) = bad.expect("the bad job is settled");
        match mode {
            "nul_error" => {
                assert_eq!(state, "dead");
                assert_eq!(v, json!("bad\u{FFFD}input\u{FFFD}"));
            }
            "nul_retry" => {
                assert_eq!(state, "dead", "retried, then exhausted (max_attempts 2)");
                assert!(v.as_str().unwrap().starts_with("flaky\u{FFFD}"), "{v}");
            }
            "nul_result" => {
                assert_eq!(state, "done");
                assert_eq!(v["result"], json!({"text": "a\u{FFFD}b", "k\u{FFFD}": 1}));
            }
            "snooze_forever" => {
                assert_eq!(state, "snoozed");
                let secs = v.as_f64().unwrap();
                let ten_years = 10.0 * 365.0 * 86400.0;
                assert!(
                    (secs - ten_years).abs() < 3600.0,
                    "clamped to ten years: {secs}"
                );
            }
            "free_reads" => {
                assert_eq!(state, "done");
                assert_eq!(v["result"]["id"], 1000);
            }
            _ => unreachable!(),
        }
    }
}

/// A row whose outcome PostgreSQL refuses for a reason no cleaning can foresee (here a
/// user's trigger on the archive) fails its batch; the batch is then settled row by
/// row, the 499 others are archived once, and the bad one, which did complete, stays
/// done: a completion record instead of the archive row (never a dead letter, which
/// would invite an operator to run it again).
#[tokio::test]
async fn a_batch_that_still_fails_is_settled_row_by_row() {
    let t = db().await;
    sqlx::raw_sql(
        r#"CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.message->>'id' = '13' THEN RAISE EXCEPTION 'job 13 may not be archived'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse_13 BEFORE INSERT ON pgmq.a_probe FOR EACH ROW EXECUTE FUNCTION refuse_13();"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    common::send_probes(&t.pool, 500, json!({})).await;
    let counts = Arc::new(Counts::default());
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        Registry::new().register(PoisonHandler),
        &BATCHED,
        counts.clone(),
        "499 archived and job 13 recorded done",
        || {
            let pool = pool.clone();
            async move {
                let done = count(&pool, "SELECT count(*) FROM pgmq.a_probe").await;
                let recorded = count(&pool, "SELECT count(*) FROM longshore.completions").await;
                (done == 499 && recorded == 1).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE read_ct = 1"
        )
        .await,
        499,
        "each ran once"
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        0
    );
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 0);
    let id: i64 = sqlx::query_scalar("SELECT msg_id FROM longshore.completions")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let status = probe_sql().status(&t.pool, id).await.unwrap().unwrap();
    assert_eq!(status.state, longshore_workers::store::JobState::Done);
}

/// A message that is valid jsonb but that serde_json cannot decode (a number beyond
/// f64): the claim has committed, so it must not fail as a whole. The bad message is
/// dead-lettered with the reason; the others in its claim are done once.
#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_alone() {
    let t = db().await;
    common::send_probes(&t.pool, 50, json!({})).await;
    sqlx::query("SELECT pgmq.send('probe', '{\"id\": 1000, \"huge\": 1e400}'::jsonb)")
        .execute(&t.pool)
        .await
        .unwrap();
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        Registry::new().register(PoisonHandler),
        &[],
        Arc::new(Counts::default()),
        "50 done and the undecodable one dead",
        || {
            let pool = pool.clone();
            async move {
                let done = count(&pool, "SELECT count(*) FROM pgmq.a_probe").await;
                let dead = count(&pool, "SELECT count(*) FROM longshore.dead_letters").await;
                (done == 50 && dead == 1).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        count(
            &t.pool,
            "SELECT count(*) FROM pgmq.a_probe WHERE read_ct = 1"
        )
        .await,
        50
    );
    let err: String = sqlx::query_scalar("SELECT last_error FROM longshore.dead_letters")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert!(err.contains("cannot be decoded"), "{err}");
}

/// A release (or retry) applied twice, as when its first answer was lost and the
/// statement is retried, changes the message once: one free read, not two.
#[tokio::test]
async fn a_reschedule_applied_twice_changes_the_message_once() {
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
    let release = Reschedule {
        fence: fence(&c),
        delay: Duration::ZERO,
        error: None,
        free: true,
    };
    assert_eq!(
        q.reschedule(&t.pool, std::slice::from_ref(&release))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        q.reschedule(&t.pool, &[release]).await.unwrap().is_empty(),
        "the second application matches nothing"
    );
    let free: Value = sqlx::query_scalar("SELECT headers->'free_reads' FROM pgmq.q_probe")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(free, json!(1));
    let c2 = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((c2.read_ct, c2.attempt()), (2, 1));
}

/// Settling statements lock their rows in msg_id order whatever order their fences
/// come in. Transaction A holds job 1 and will want job 2; an acknowledgement of
/// [2, 1] arrives meanwhile. Locking in input order it would take 2 and wait for 1:
/// a deadlock as soon as A asks for 2. In msg_id order it waits for 1 holding nothing.
#[tokio::test]
async fn settling_statements_lock_in_msg_id_order() {
    let t = db().await;
    let q = Arc::new(probe_sql());
    enqueue_many(&t.pool, &[Probe::new(1), Probe::new(2)], Default::default())
        .await
        .unwrap();
    let c = q.claim(&t.pool, 2, Duration::from_secs(30)).await.unwrap();
    let (one, two) = (fence(&c[0]), fence(&c[1]));
    let later = |f: Fence| Reschedule {
        fence: f,
        delay: Duration::from_secs(60),
        error: None,
        free: false,
    };
    let mut a = t.pool.begin().await.unwrap();
    assert_eq!(q.reschedule(&mut *a, &[later(one)]).await.unwrap().len(), 1);
    let (qb, pb) = (q.clone(), t.pool.clone());
    let b = tokio::spawn(async move {
        let mut tx = pb.begin().await?;
        let n = qb
            .ack_archive(&mut *tx, &[(two, None), (one, None)])
            .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(n)
    });
    eventually(
        Duration::from_secs(10),
        "the ack waits for a row lock",
        || {
            let pool = t.pool.clone();
            async move {
                let waiting = count(
                    &pool,
                    r#"SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'"#,
                )
                .await;
                (waiting == 1).then_some(())
            }
        },
    )
    .await;
    let second = q.reschedule(&mut *a, &[later(two)]).await;
    assert_eq!(
        second
            .expect("no deadlock: the ack holds no lock A wants")
            .len(),
        1
    );
    a.commit().await.unwrap();
    let acked = b.await.unwrap().expect("the ack did not fail either");
    assert!(acked.is_empty(), "both were rescheduled first: {acked:?}");
}

/// A message claimed again and again without ever returning an outcome (its worker
/// died each time) is dead-lettered by the claim itself once its attempts are spent.
/// Its second death in a row makes it a suspect: the normal claim skips it, and only a
/// claim with the suspect slot free takes it, flagged.
#[tokio::test]
async fn a_crash_loop_is_buried_at_claim_and_suspects_are_claimed_apart() {
    let t = db().await;
    let q = probe_sql();
    enqueue(&t.pool, &Probe::new(1), Default::default())
        .await
        .unwrap();
    let req = |suspects| ClaimRequest {
        limit: 10,
        lease: Duration::from_secs(30),
        suspects,
        max_attempts: 3,
    };
    let expire = || async {
        sqlx::query("UPDATE pgmq.q_probe SET vt = now() - interval '1 second'")
            .execute(&t.pool)
            .await
            .unwrap();
    };
    let first = q.claim_batch(&t.pool, &req(1), &[]).await.unwrap();
    assert_eq!(first.claimed.len(), 1);
    assert!(!first.claimed[0].orphan);
    expire().await; // the worker died
    let second = q.claim_batch(&t.pool, &req(0), &[]).await.unwrap();
    let c = &second.claimed[0];
    assert!(c.orphan && !c.suspect, "one death: retried normally");
    assert_eq!((c.attempt(), c.deaths()), (2, 1));
    expire().await; // died again
    assert!(
        q.claim_batch(&t.pool, &req(0), &[])
            .await
            .unwrap()
            .claimed
            .is_empty(),
        "a suspect is not taken by a claim without the suspect slot"
    );
    let third = q.claim_batch(&t.pool, &req(1), &[]).await.unwrap();
    let c = &third.claimed[0];
    assert!(c.suspect, "two deaths in a row: a suspect");
    assert_eq!((c.attempt(), c.deaths()), (3, 2));
    expire().await; // and a third time
    let fourth = q.claim_batch(&t.pool, &req(1), &[]).await.unwrap();
    assert!(fourth.claimed.is_empty());
    assert_eq!(fourth.buried.len(), 1);
    let reason = &fourth.buried[0].reason;
    assert!(
        reason.contains("died or lost its lease running this job 3 time(s) in a row")
            && reason.contains("gave up after 3 attempts"),
        "{reason}"
    );
    let (attempts, err): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM longshore.dead_letters")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!((attempts, err.as_str()), (3, reason.as_str()));
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 0);
}

/// A `deaths` header no run of ours wrote (a producer's) is dropped on the first read:
/// it cannot make a job a suspect, nor misstate a later burial's count. And a claim
/// never takes a message the caller says it still holds.
#[tokio::test]
async fn producer_deaths_are_dropped_and_held_messages_are_not_reclaimed() {
    let t = db().await;
    let q = probe_sql();
    for h in [json!({"deaths": 5}), json!("deaths")] {
        sqlx::query(
            "INSERT INTO pgmq.q_probe (vt, message, headers) VALUES (now(), '{\"id\": 1}', $1)",
        )
        .bind(&h)
        .execute(&t.pool)
        .await
        .unwrap();
    }
    let got = q.claim(&t.pool, 10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 2, "a scalar header fails nothing");
    for c in &got {
        assert!(
            !c.orphan && !c.suspect && c.deaths() == 0,
            "{:?}",
            c.headers
        );
    }
    sqlx::query("UPDATE pgmq.q_probe SET vt = now() - interval '1 second'")
        .execute(&t.pool)
        .await
        .unwrap();
    let req = ClaimRequest {
        limit: 10,
        lease: Duration::from_secs(30),
        suspects: 1,
        max_attempts: 20,
    };
    let held = [got[0].msg_id];
    let again = q.claim_batch(&t.pool, &req, &held).await.unwrap();
    assert_eq!(again.claimed.len(), 1, "the held one is left alone");
    assert_eq!(again.claimed[0].msg_id, got[1].msg_id);
    assert_eq!(again.claimed[0].deaths(), 1, "one death, counted from zero");
}

/// An idempotency key's repeat must ask for the same options too: the same args with
/// another delay is a different request (for the ingress: 409), not a retry.
#[tokio::test]
async fn a_key_repeated_with_another_delay_is_not_the_same_request() {
    let t = db().await;
    let opts = |secs| {
        EnqueueOptions::default()
            .key("k-delay")
            .delay(Duration::from_secs(secs))
    };
    let a = enqueue(&t.pool, &Probe::new(1), opts(10)).await.unwrap();
    let b = enqueue(&t.pool, &Probe::new(1), opts(10)).await.unwrap();
    assert!(b.duplicate && b.same_body && b.id == a.id);
    let c = enqueue(&t.pool, &Probe::new(1), opts(20)).await.unwrap();
    assert!(c.duplicate && !c.same_body, "{c:?}");
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 1);
}

/// A run that returns an outcome clears its deaths: a job that died once and then
/// retried is not a suspect the next time it is claimed.
#[tokio::test]
async fn an_outcome_clears_the_deaths() {
    let t = db().await;
    let q = probe_sql();
    enqueue(&t.pool, &Probe::new(1), Default::default())
        .await
        .unwrap();
    q.claim(&t.pool, 1, Duration::from_secs(30)).await.unwrap();
    sqlx::query("UPDATE pgmq.q_probe SET vt = now() - interval '1 second'")
        .execute(&t.pool)
        .await
        .unwrap();
    let c = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(c.deaths(), 1);
    let retry = Reschedule {
        fence: fence(&c),
        delay: Duration::ZERO,
        error: Some("flaky".into()),
        free: false,
    };
    q.reschedule(&t.pool, &[retry]).await.unwrap();
    let c = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert!(!c.orphan && c.deaths() == 0, "{:?}", c.headers);
}

/// The heartbeat never waits for a row lock: a message whose acknowledgement is
/// committing is reported busy, not extended and not lost.
#[tokio::test]
async fn the_heartbeat_skips_a_row_an_ack_holds() {
    let t = db().await;
    let q = probe_sql();
    enqueue_many(&t.pool, &[Probe::new(1), Probe::new(2)], Default::default())
        .await
        .unwrap();
    let c = q.claim(&t.pool, 2, Duration::from_secs(30)).await.unwrap();
    let (a, b) = (fence(&c[0]), fence(&c[1]));
    let mut tx = t.pool.begin().await.unwrap();
    assert_eq!(
        q.ack_archive(&mut *tx, &[(a, None)]).await.unwrap().len(),
        1
    );
    let beats = tokio::time::timeout(
        Duration::from_secs(5),
        q.heartbeat(&t.pool, &[a, b], Duration::from_secs(60)),
    )
    .await
    .expect("the heartbeat did not wait for the lock")
    .unwrap();
    assert_eq!(beats, vec![(a, Beat::Busy), (b, Beat::Extended)]);
    tx.commit().await.unwrap();
    let beats = q
        .heartbeat(&t.pool, &[a, b], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(beats, vec![(a, Beat::Gone), (b, Beat::Extended)]);
}

/// Rolling deploys: a producer already sends a field this build does not know. The
/// worker ignores it and runs the job; the door (validation) still refuses it.
#[tokio::test]
async fn workers_accept_unknown_fields_the_door_refuses_them() {
    let t = db().await;
    common::send_probes(&t.pool, 3, json!({"effect": true, "added_in_v2": {"x": 1}})).await;
    let counts = Arc::new(Counts::default());
    let pool = t.pool.clone();
    work_until(
        &t.pool,
        common::registry(),
        &[],
        counts,
        "three jobs with an unknown field done",
        || {
            let pool = pool.clone();
            async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 3).then_some(()) }
        },
    )
    .await;
    common::assert_probes_done_exactly_once(&t.pool, 3).await;
    let e = common::registry()
        .validate("probe", &json!({"id": 1, "added_in_v2": 1}))
        .unwrap_err();
    assert!(e.contains("unknown field `added_in_v2`"), "{e}");
    // Nested ones too (a message of an llm_call).
    let e = common::registry()
        .validate(
            "llm_call",
            &json!({"request_id": "7d8f4e2a-1111-4c3b-9a57-0f7c1d2e3f40",
                    "user_id": "0b7e0a52-2222-4c3b-9a57-0f7c1d2e3f40",
                    "messages": [{"role": "user", "content": "hi", "mood": "happy"}]}),
        )
        .unwrap_err();
    assert!(e.contains("unknown field `messages.0.mood`"), "{e}");
}

/// `dlq retry` moves the job's idempotency key to the new job: an enqueue repeated with
/// the key afterwards finds the job that runs now, not the dead one.
#[tokio::test]
async fn a_retried_dead_letter_takes_its_idempotency_key_along() {
    let t = db().await;
    let q = probe_sql();
    let key = || EnqueueOptions::default().key("order-77");
    let first = enqueue(&t.pool, &Probe::new(1), key()).await.unwrap();
    let c = q
        .claim(&t.pool, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    q.bury(
        &t.pool,
        &[longshore_workers::store::Bury {
            fence: fence(&c),
            attempts: 1,
            error: "boom".into(),
        }],
    )
    .await
    .unwrap();
    let mut tx = t.pool.begin().await.unwrap();
    let moved = retry_dead_letters(
        &mut tx,
        &q,
        Selection::Oldest {
            up_to: i64::MAX,
            limit: 10,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(moved.len(), 1);
    let new_id = moved[0].1;
    assert_ne!(new_id, first.id);
    let again = enqueue(&t.pool, &Probe::new(1), key()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, new_id, "the key names the re-sent job");
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 1);
}

/// `enqueue_many` with a key: the key covers the batch, so a repeated call returns the
/// first batch's ids and enqueues nothing (before the fix the key was dropped).
#[tokio::test]
async fn enqueue_many_keeps_the_callers_key_for_the_batch() {
    let t = db().await;
    let batch: Vec<Probe> = (1..=5).map(Probe::new).collect();
    let opts = || EnqueueOptions::default().key("import-2026-12-01");
    let a = enqueue_many(&t.pool, &batch, opts()).await.unwrap();
    let b = enqueue_many(&t.pool, &batch, opts()).await.unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(a, b, "the same ids");
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 5);
    let keyed = count(
        &t.pool,
        "SELECT count(*) FROM pgmq.q_probe WHERE headers->>'idempotency_key' = 'import-2026-12-01'",
    )
    .await;
    assert_eq!(keyed, 5, "each job names the batch's key");
}
