//! The query data `sqlx::query!` in `jobs/` builds against (`jobs/.sqlx`, offline) must
//! describe the schema the migrations make: every cached query is described again on a
//! freshly migrated database and must have the same columns (names, types,
//! nullability) and parameters. A migration that renames or retypes a column a query
//! uses fails here until `.ci/sqlx-prepare` regenerates the data, and then fails the
//! build where the Rust no longer fits.

mod common;

use serde_json::{Value, json};
use sqlx::{Either, Executor};

/// What sqlx records of a query, in the cache's JSON shape: `PgTypeInfo(Int4)` →
/// `"Int4"`.
fn shape(d: &sqlx::Describe<sqlx::Postgres>) -> Value {
    let ty = |t: &sqlx::postgres::PgTypeInfo| {
        let dbg = format!("{t:?}");
        let inner = dbg
            .strip_prefix("PgTypeInfo(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or(&dbg);
        if inner.chars().all(|c| c.is_ascii_alphanumeric()) {
            json!(inner)
        } else {
            json!(sqlx::TypeInfo::name(t))
        }
    };
    let columns: Vec<Value> = d
        .columns()
        .iter()
        .map(|c| {
            json!({
                "name": sqlx::Column::name(c),
                "type_info": ty(sqlx::Column::type_info(c)),
            })
        })
        .collect();
    let parameters = match d.parameters() {
        Some(Either::Left(ps)) => json!({ "Left": ps.iter().map(ty).collect::<Vec<_>>() }),
        Some(Either::Right(n)) => json!({ "Right": n }),
        None => Value::Null,
    };
    let nullable: Vec<Value> = (0..d.columns().len())
        .map(|i| d.nullable(i).map_or(Value::Null, Value::Bool))
        .collect();
    json!({ "columns": columns, "parameters": parameters, "nullable": nullable })
}

/// The cache's record, with only what [`shape`] compares.
fn cached(describe: &Value) -> Value {
    let columns: Vec<Value> = describe["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| json!({ "name": c["name"], "type_info": c["type_info"] }))
        .collect();
    json!({
        "columns": columns,
        "parameters": describe["parameters"],
        "nullable": describe["nullable"],
    })
}

/// Where a cached record and a fresh description differ, said plainly.
fn differences(cached: &Value, now: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["columns", "parameters", "nullable"] {
        if cached[key] != now[key] {
            out.push(format!(
                "{key}: cached {} but the schema gives {}",
                cached[key], now[key]
            ));
        }
    }
    out
}

#[tokio::test]
async fn the_committed_query_data_matches_the_migrated_schema() {
    let t = common::db().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/.sqlx");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    // One file per query! in jobs/src, and none left over from a query that is gone.
    let mut macros = 0;
    let mut stack = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                macros += ["sqlx::query!(", "sqlx::query_scalar!(", "sqlx::query_as!("]
                    .iter()
                    .map(|m| text.matches(m).count())
                    .sum::<usize>();
            }
        }
    }
    assert!(macros >= 12, "{macros} query! calls in jobs/src");
    assert_eq!(
        files.len(),
        macros,
        "jobs/.sqlx holds {} queries for {macros} query! calls: run .ci/sqlx-prepare",
        files.len()
    );
    let mut conn = t.pool.acquire().await.unwrap();
    let mut stale = Vec::new();
    for path in &files {
        let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let sql = data["query"].as_str().expect("query");
        let now = match (&mut *conn).describe(sql).await {
            Ok(d) => shape(&d),
            Err(e) => {
                stale.push(format!("{sql}\n  no longer prepares: {e}"));
                continue;
            }
        };
        let was = cached(&data["describe"]);
        let diff = differences(&was, &now);
        if !diff.is_empty() {
            stale.push(format!("{sql}\n  {}", diff.join("\n  ")));
        }
    }
    assert!(
        stale.is_empty(),
        "jobs/.sqlx is stale (run .ci/sqlx-prepare, then fix what no longer builds):\n{}",
        stale.join("\n\n")
    );

    // The comparison sees a renamed column and a retyped parameter: a query described
    // now, against its record with one name and one type changed.
    let sql = "SELECT tier, created_at FROM credit_accounts WHERE user_id = $1";
    let now = shape(&(&mut *conn).describe(sql).await.unwrap());
    let mut was = now.clone();
    was["columns"][0]["name"] = json!("plan");
    was["parameters"]["Left"][0] = json!("Int8");
    let diff = differences(&was, &now);
    assert_eq!(diff.len(), 2, "{diff:?}");
    assert_eq!(now["columns"][0]["type_info"], json!("Text"), "{now}");
    assert_eq!(now["nullable"], json!([false, false]), "{now}");
}
