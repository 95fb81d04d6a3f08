//! The pipelines' pages in the admin API and the console (`GET /v1/admin/views/{name}`):
//! chat credits, billing, and the failed LLM attempts on the errors page. Each read is a window back from now over an index
//! (`credits_ledger_charges_created`, `llm_attempts_created`, `charge_intents_created`)
//! or a small table (customers, suspended services), and lists at most [`ROWS`] rows.

use futures::FutureExt;
use futures::future::BoxFuture;
use longshore_workers::{AdminView, ViewParams, ViewSection};
use serde_json::Value;
use sqlx::PgConnection;

/// Most rows in one table of a view.
pub const ROWS: i64 = 50;

/// Chat credits: top users by credits spent, per provider.
pub const CREDITS: AdminView = AdminView {
    name: "credits",
    title: "Credits",
    read: credits,
    errors: false,
};

/// Billing: customers, suspended services, charge intents by state.
pub const BILLING: AdminView = AdminView {
    name: "billing",
    title: "Billing",
    read: billing,
    errors: false,
};

/// Failed LLM attempts (on the errors page).
pub const LLM_ERRORS: AdminView = AdminView {
    name: "llm_errors",
    title: "Failed LLM attempts",
    read: llm_errors,
    errors: true,
};

fn secs(p: ViewParams) -> f64 {
    p.window.as_secs_f64()
}

/// Runs `sql` (its `$1` is the window in seconds, `$2` the row cap; both must appear, a
/// table that needs no window says `$1::float8 IS NOT NULL`) and makes a table of
/// it: each row is a JSON array, in the order of `columns`.
async fn table(
    c: &mut PgConnection,
    title: &str,
    columns: &[&str],
    sql: &str,
    p: ViewParams,
) -> Result<ViewSection, sqlx::Error> {
    let rows: Vec<Value> = sqlx::query_scalar(sql)
        .bind(secs(p))
        .bind(ROWS)
        .fetch_all(c)
        .await?;
    Ok(ViewSection {
        title: title.to_string(),
        columns: columns.iter().map(|s| s.to_string()).collect(),
        rows: rows
            .into_iter()
            .map(|r| match r {
                Value::Array(a) => a,
                other => vec![other],
            })
            .collect(),
    })
}

fn credits(
    c: &mut PgConnection,
    p: ViewParams,
) -> BoxFuture<'_, Result<Vec<ViewSection>, sqlx::Error>> {
    async move {
        let top = table(
            c,
            "Top users by credits spent",
            &["user", "credits", "calls"],
            r#"SELECT jsonb_build_array(user_id, -sum(delta), count(*))
                 FROM credits_ledger
                WHERE reason = 'charge' AND created_at > now() - make_interval(secs => $1)
                GROUP BY user_id ORDER BY -sum(delta) DESC LIMIT $2"#,
            p,
        )
        .await?;
        let providers = table(
            c,
            "Per provider",
            &[
                "provider",
                "credits",
                "calls",
                "input tokens",
                "output tokens",
            ],
            r#"WITH spent AS (
                 SELECT provider, -sum(delta) AS credits, count(*) AS calls
                   FROM credits_ledger
                  WHERE reason = 'charge' AND created_at > now() - make_interval(secs => $1)
                  GROUP BY provider),
               tokens AS (
                 SELECT provider, sum(input_tokens) AS i, sum(output_tokens) AS o
                   FROM llm_attempts
                  WHERE status = 'ok' AND created_at > now() - make_interval(secs => $1)
                  GROUP BY provider)
               SELECT jsonb_build_array(coalesce(s.provider, t.provider, 'unknown'),
                                        coalesce(s.credits, 0), coalesce(s.calls, 0),
                                        coalesce(t.i, 0), coalesce(t.o, 0))
                 FROM spent s FULL JOIN tokens t ON t.provider = s.provider
                ORDER BY coalesce(s.credits, 0) DESC LIMIT $2"#,
            p,
        )
        .await?;
        Ok(vec![top, providers])
    }
    .boxed()
}

fn llm_errors(
    c: &mut PgConnection,
    p: ViewParams,
) -> BoxFuture<'_, Result<Vec<ViewSection>, sqlx::Error>> {
    async move {
        let failed = table(
            c,
            "Failed LLM attempts",
            &["at", "provider", "model", "status", "http", "error"],
            r#"SELECT jsonb_build_array(created_at, provider, model, status, http_status, left(error, 300))
                 FROM llm_attempts
                WHERE status <> 'ok' AND created_at > now() - make_interval(secs => $1)
                ORDER BY created_at DESC LIMIT $2"#,
            p,
        )
        .await?;
        Ok(vec![failed])
    }
    .boxed()
}

fn billing(
    c: &mut PgConnection,
    p: ViewParams,
) -> BoxFuture<'_, Result<Vec<ViewSection>, sqlx::Error>> {
    async move {
        let customers = table(
            c,
            "Customers (highest month-to-date charges)",
            &["customer", "balance (¢)", "this month (¢)", "monthly limit (¢)", "services"],
            r#"SELECT jsonb_build_array(c.customer_id, c.current_balance_usd_cents,
                                        c.current_month_charged_usd_cents, c.max_monthly_usd_cents,
                                        (SELECT count(*) FROM service_instances s WHERE s.customer_id = c.customer_id))
                 FROM customers c
                WHERE $1::float8 IS NOT NULL
                ORDER BY c.current_month_charged_usd_cents DESC, c.customer_id LIMIT $2"#,
            p,
        )
        .await?;
        let suspended = table(
            c,
            "Suspended services",
            &["customer", "service", "reason", "since"],
            r#"SELECT jsonb_build_array(customer_id, service_type, suspend_reason, suspended_at)
                 FROM service_instances
                WHERE state = 'suspended' AND $1::float8 IS NOT NULL
                ORDER BY suspended_at DESC NULLS LAST LIMIT $2"#,
            p,
        )
        .await?;
        let intents = table(
            c,
            "Charge intents by state (in the window)",
            &["state", "intents", "amount (USD)", "last error"],
            r#"SELECT jsonb_build_array(state, count(*), sum(amount)::text,
                                        (array_agg(last_error ORDER BY updated_at DESC) FILTER (WHERE last_error IS NOT NULL))[1])
                 FROM charge_intents
                WHERE created_at > now() - make_interval(secs => $1)
                GROUP BY state ORDER BY state LIMIT $2"#,
            p,
        )
        .await?;
        Ok(vec![customers, suspended, intents])
    }
    .boxed()
}
