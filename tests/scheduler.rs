//! The scheduler through the real binary: replicas fire each tick once (row 14), the
//! missed-fire policies, and maintenance as scheduled jobs.

mod common;

use std::time::Duration;

use common::{Proc, config_dir, count, db, eventually};
use longshore_workers::maintenance::{Maintenance, Task};
use longshore_workers::{enqueue, enqueue_many};
use sqlx::PgPool;

async fn fire_times(pool: &PgPool, schedule: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar(
        "SELECT fire_at FROM longshore.schedule_fires WHERE schedule = $1 ORDER BY fire_at",
    )
    .bind(schedule)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Row 14 and issue 3's acceptance test: three scheduler processes on a one-second
/// schedule produce exactly one job per second between them.
#[tokio::test]
async fn row14_three_schedulers_fire_each_second_exactly_once() {
    let t = db().await;
    let dir = config_dir(
        r#"
[[schedules]]
name = "every_second"
cron = "* * * * * *"
queue = "probe"
args = { id = 1 }
"#,
    );
    let env = [("LONGSHORE_ENV", "test")];
    let mut procs: Vec<Proc> = (0..3)
        .map(|_| Proc::spawn_in(Some(&dir), &t.url, &["scheduler"], &env))
        .collect();
    let pool = t.pool.clone();
    eventually(Duration::from_secs(20), "6 fires", || {
        let pool = pool.clone();
        async move { (fire_times(&pool, "every_second").await.len() >= 6).then_some(()) }
    })
    .await;
    for p in &procs {
        p.signal("TERM");
    }
    for p in &mut procs {
        assert_eq!(
            p.wait_exit(Duration::from_secs(10)).await,
            Some(0),
            "{}",
            p.logs()
        );
    }
    let fires = fire_times(&t.pool, "every_second").await;
    // Consecutive seconds, no gaps, no repeats.
    for w in fires.windows(2) {
        assert_eq!((w[1] - w[0]).num_milliseconds(), 1000, "{fires:?}");
    }
    let jobs = count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await;
    assert_eq!(jobs as usize, fires.len(), "one job per fire");
    let per_fire = count(
        &t.pool,
        "SELECT count(DISTINCT headers->>'fire_at') FROM pgmq.q_probe WHERE headers->>'schedule' = 'every_second'",
    )
    .await;
    assert_eq!(per_fire, jobs);
    // All three really took part: each logged at least one fire or found it taken.
    let fired_by: usize = procs.iter().filter(|p| p.logs().contains("fired")).count();
    assert!(fired_by >= 1);
}

#[tokio::test]
async fn missed_fires_latest_enqueues_one_skip_enqueues_none() {
    let t = db().await;
    let dir = config_dir(
        r#"
[[schedules]]
name = "catch_up"
cron = "0 */10 * * * *"
queue = "probe"
args = { id = 1 }
missed = "latest"

[[schedules]]
name = "let_go"
cron = "0 */10 * * * *"
queue = "probe"
args = { id = 2 }
missed = "skip"
"#,
    );
    // Both last fired three hours ago; the schedulers were down since.
    for s in ["catch_up", "let_go"] {
        sqlx::query("INSERT INTO longshore.schedule_fires (schedule, fire_at, msg_id) VALUES ($1, date_trunc('hour', now()) - interval '3 hours', 0)")
            .bind(s)
            .execute(&t.pool)
            .await
            .unwrap();
    }
    let p = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["scheduler"],
        &[("LONGSHORE_ENV", "test")],
    );
    let pool = t.pool.clone();
    eventually(Duration::from_secs(10), "the latest missed fire", || {
        let pool = pool.clone();
        async move { (fire_times(&pool, "catch_up").await.len() == 2).then_some(()) }
    })
    .await;
    let latest = fire_times(&t.pool, "catch_up").await[1];
    let now = chrono::Utc::now();
    assert!(
        latest <= now && now - latest < chrono::Duration::minutes(10),
        "{latest} is the latest 10-minute mark"
    );
    assert_eq!(latest.timestamp() % 600, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fire_times(&t.pool, "let_go").await.len(),
        1,
        "skip: no back-fill\n{}",
        p.logs()
    );
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.q_probe").await, 1);
}

#[tokio::test]
async fn a_bad_schedule_is_refused_at_start_naming_it() {
    let t = db().await;
    for (toml, needle) in [
        (
            "[[schedules]]\nname = \"x\"\ncron = \"every minute\"\nqueue = \"probe\"\nargs = { id = 1 }\n",
            "].cron`: \"every minute\"",
        ),
        (
            "[[schedules]]\nname = \"y\"\ncron = \"* * * * * *\"\nqueue = \"probe\"\nargs = { nope = 1 }\n",
            "schedule \"y\": args for probe",
        ),
        (
            "[[schedules]]\nname = \"z\"\ncron = \"* * * * * *\"\nqueue = \"probe\"\ntimezone = \"Mars/Olympus\"\nargs = { id = 1 }\n",
            "].timezone",
        ),
    ] {
        let dir = config_dir(toml);
        let mut p = Proc::spawn_in(
            Some(&dir),
            &t.url,
            &["scheduler"],
            &[("LONGSHORE_ENV", "test")],
        );
        assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(2));
        assert!(
            p.logs().contains(needle),
            "expected {needle:?} in {}",
            p.logs()
        );
    }
}

/// Maintenance tasks, run by a worker as ordinary jobs.
#[tokio::test]
async fn maintenance_prunes_what_is_past_retention() {
    let t = db().await;
    let probes: Vec<longshore_jobs::probe::Probe> =
        (0..3).map(longshore_jobs::probe::Probe::new).collect();
    enqueue_many(&t.pool, &probes, Default::default())
        .await
        .unwrap();
    let mut w = Proc::spawn(&t.url, &["worker"], &[]);
    let pool = t.pool.clone();
    eventually(Duration::from_secs(10), "probes archived", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_probe").await == 3).then_some(()) }
    })
    .await;
    sqlx::query("UPDATE pgmq.a_probe SET archived_at = now() - interval '8 days' WHERE msg_id IN (SELECT min(msg_id) FROM pgmq.a_probe)")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO longshore.idempotency_keys (queue, key, msg_id, expires_at) VALUES ('probe', 'old', 1, now() - interval '1 second'), ('probe', 'live', 2, now() + interval '1 hour')")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO longshore.dead_letters (queue, msg_id, attempts, last_error, enqueued_at, failed_at) VALUES ('probe', 100, 1, 'x', now(), now() - interval '31 days'), ('probe', 101, 1, 'x', now(), now())")
        .execute(&t.pool)
        .await
        .unwrap();
    // Fire rows: two old ones of "a" (the older goes, the newer stays as "a"'s latest),
    // one old "b" (its latest: kept), one recent "a".
    sqlx::query(
        r#"INSERT INTO longshore.schedule_fires (schedule, fire_at, msg_id) VALUES
         ('a', now() - interval '20 days', 1), ('a', now() - interval '10 days', 2),
         ('b', now() - interval '20 days', 3), ('a', now() - interval '1 hour', 4)"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    let days = |d: u64| Some(Duration::from_secs(d * 86_400));
    for (task, older_than) in [
        (Task::PruneArchives, days(7)),
        (Task::ExpireIdempotencyKeys, None),
        (Task::PruneDeadLetters, days(30)),
        (Task::PruneScheduleFires, days(7)),
        (Task::VacuumQueues, None),
    ] {
        enqueue(
            &t.pool,
            &Maintenance {
                task,
                older_than,
                min_dead_tuples: None,
            },
            Default::default(),
        )
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(10), "maintenance done", || {
        let pool = pool.clone();
        async move { (count(&pool, "SELECT count(*) FROM pgmq.a_maintenance").await == 5).then_some(()) }
    })
    .await;
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.a_probe").await, 2);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.idempotency_keys").await,
        1
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.dead_letters").await,
        1
    );
    let fires: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM longshore.schedule_fires ORDER BY msg_id")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(
        fires,
        vec![3, 4],
        "old fires pruned, each schedule's latest kept"
    );
}

/// Issue 13: a scheduler that stalls (SIGSTOP for 4 s on a one-second schedule with
/// `missed = "skip"`) fires none of the ticks it slept through when it wakes, not a
/// burst of four (the issue asks for at most one; `skip` means none).
#[tokio::test]
async fn a_stalled_scheduler_fires_once_on_waking_not_a_burst() {
    let t = db().await;
    let dir = config_dir(
        r#"
[[schedules]]
name = "every_second"
cron = "* * * * * *"
queue = "probe"
args = { id = 1 }
missed = "skip"
"#,
    );
    let p = Proc::spawn_in(
        Some(&dir),
        &t.url,
        &["scheduler"],
        &[("LONGSHORE_ENV", "test")],
    );
    let pool = t.pool.clone();
    eventually(Duration::from_secs(20), "2 fires", || {
        let pool = pool.clone();
        async move { (fire_times(&pool, "every_second").await.len() >= 2).then_some(()) }
    })
    .await;
    p.signal("STOP");
    let stopped_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    p.signal("CONT");
    let resumed_at = chrono::Utc::now();
    // Fires after waking: at least one more than the ones during the stall.
    let pool = t.pool.clone();
    eventually(Duration::from_secs(20), "fires after the stall", || {
        let pool = pool.clone();
        async move {
            let later = fire_times(&pool, "every_second")
                .await
                .into_iter()
                .filter(|f| *f > resumed_at + chrono::Duration::seconds(1))
                .count();
            (later >= 2).then_some(())
        }
    })
    .await;
    // Ticks whose time fell in the stall (the first full second after the stop to the
    // resume): at most one of them fired (the latest, late).
    let slept_through = fire_times(&t.pool, "every_second")
        .await
        .into_iter()
        .filter(|f| *f > stopped_at + chrono::Duration::seconds(1) && *f <= resumed_at)
        .count();
    assert_eq!(
        slept_through,
        0,
        "fires for ticks slept through with missed = \"skip\"\n{}",
        p.logs()
    );
}

/// Issue 16: retention converges. 13,000 archived rows past the retention in two queues,
/// pruned through a pool whose statement timeout is 1 s. A test trigger makes each
/// delete from `a_probe` sleep 1 ms, so how long a statement takes is set by how many
/// rows it deletes, not by how fast or busy this machine is: one statement over that
/// backlog (as before) takes at least 3 s and is cancelled, deleting nothing; committed
/// batches of 100 (about 100 ms each, well inside the timeout) take every old row, and
/// no young one.
#[tokio::test]
async fn retention_deletes_in_committed_batches_under_the_statement_timeout() {
    let t = db().await;
    for (q, n) in [("probe", 3_000), ("maintenance", 10_000)] {
        sqlx::query(&format!(
            r#"INSERT INTO pgmq.a_{q} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
             SELECT i, 1, now() - interval '9 days', now() - interval '8 days' + i * interval '1 ms', now(), '{{}}'
             FROM generate_series(1, $1::bigint) i"#
        ))
        .bind(n as i64)
        .execute(&t.pool)
        .await
        .unwrap();
        sqlx::query(&format!(
            r#"INSERT INTO pgmq.a_{q} (msg_id, read_ct, enqueued_at, archived_at, vt, message)
             VALUES ($1, 1, now(), now(), now(), '{{}}')"#
        ))
        .bind(n as i64 + 1)
        .execute(&t.pool)
        .await
        .unwrap();
    }
    // And completion records of `delete` queues: 1,000 old, one young.
    sqlx::query(
        r#"INSERT INTO longshore.completions (queue, msg_id, attempts, done_at)
         SELECT 'probe', i, 1, CASE WHEN i > 1000 THEN now() ELSE now() - interval '8 days' END
         FROM generate_series(1, 1001) i"#,
    )
    .execute(&t.pool)
    .await
    .unwrap();
    for ddl in [
        r#"CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN PERFORM pg_sleep(0.001); RETURN OLD; END $$"#,
        r#"CREATE TRIGGER slow_delete BEFORE DELETE ON pgmq.a_probe
         FOR EACH ROW EXECUTE FUNCTION slow_delete()"#,
        "ANALYZE pgmq.a_probe",
    ] {
        sqlx::query(ddl).execute(&t.pool).await.unwrap();
    }
    let mut dbcfg = common::config(&[]).database.clone();
    dbcfg.statement_timeout = Duration::from_secs(1);
    let pool = longshore_workers::db::connect(&t.url, &dbcfg, "retention-test")
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 86_400);
    // What one unbounded statement does under that timeout: cancelled, nothing deleted.
    let whole =
        sqlx::query("DELETE FROM pgmq.a_probe WHERE archived_at < now() - interval '7 days'")
            .execute(&pool)
            .await;
    assert!(
        whole.is_err(),
        "the whole backlog in one statement fits the timeout: make it larger"
    );
    let deleted = longshore_workers::store::prune_archives(&pool, week, 100)
        .await
        .unwrap();
    assert_eq!(deleted, 14_000);
    assert_eq!(count(&t.pool, "SELECT count(*) FROM pgmq.a_probe").await, 1);
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM pgmq.a_maintenance").await,
        1
    );
    assert_eq!(
        count(&t.pool, "SELECT count(*) FROM longshore.completions").await,
        1
    );
}

/// Issue 16 (bloat): a queue table past the dead-tuple threshold is vacuumed, one below
/// it is left alone, and queue tables carry autovacuum settings for their churn (a
/// fixed threshold plus a small fraction, not a fifth of a table that is mostly dead).
#[tokio::test]
async fn vacuum_queues_reclaims_the_bloated_queue_tables_only() {
    let t = db().await;
    let opts: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(reloptions) FROM pg_class WHERE oid = 'pgmq.q_probe'::regclass",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    for o in [
        "autovacuum_vacuum_scale_factor=0.02",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_analyze_scale_factor=0.02",
        "autovacuum_analyze_threshold=1000",
    ] {
        assert!(opts.iter().any(|x| x == o), "{o} not in {opts:?}");
    }
    // On a server with autovacuum on, it must not get there first.
    for q in ["q_probe", "q_maintenance"] {
        sqlx::query(&format!(
            "ALTER TABLE pgmq.{q} SET (autovacuum_enabled = false)"
        ))
        .execute(&t.pool)
        .await
        .unwrap();
    }
    common::send_probes(&t.pool, 2_000, serde_json::json!({})).await;
    let mut c = t.pool.acquire().await.unwrap();
    for _ in 0..3 {
        sqlx::query("UPDATE pgmq.q_probe SET vt = vt")
            .execute(&mut *c)
            .await
            .unwrap();
    }
    sqlx::query("SELECT pgmq.send('maintenance', '{\"task\":\"expire_idempotency_keys\"}')")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query("UPDATE pgmq.q_maintenance SET vt = vt")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let dead = |table: &'static str| {
        let pool = t.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'pgmq' AND relname = $1",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    eventually(Duration::from_secs(10), "dead tuples counted", || async {
        (dead("q_probe").await >= 1_000 && dead("q_maintenance").await >= 1).then_some(())
    })
    .await;
    let done = longshore_workers::store::vacuum_queues(&t.pool, 1_000)
        .await
        .unwrap();
    assert_eq!(done.vacuumed, vec!["q_probe".to_string()], "{done:?}");
    assert!(done.failed.is_empty(), "{done:?}");
    assert!(dead("q_probe").await < 100, "{}", dead("q_probe").await);
    assert!(dead("q_maintenance").await >= 1);
    let vacuumed: Vec<String> = sqlx::query_scalar(
        r#"SELECT relname::text FROM pg_stat_user_tables WHERE schemaname = 'pgmq'
          AND last_vacuum IS NOT NULL"#,
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(vacuumed, vec!["q_probe".to_string()]);
    // Nothing left worth it: nothing vacuumed.
    let again = longshore_workers::store::vacuum_queues(&t.pool, 1_000)
        .await
        .unwrap();
    assert!(again.vacuumed.is_empty(), "{again:?}");
}
