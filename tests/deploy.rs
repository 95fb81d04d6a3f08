//! The deployment files cannot run here (no Docker engine, no cluster), so what can
//! be checked is checked: the YAML parses, compose and Kubernetes run commands the CLI
//! has, and every PromQL series they use is one the binary really exports.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Proc, db, eventually, run_cli};
use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// `longshore_*` metric names in a PromQL expression, histogram suffixes removed (a
/// recording rule's name, `queue:longshore_…:rate5m`, is not a metric).
fn series(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in expr.match_indices("longshore_") {
        let before = expr[..i].chars().next_back();
        if before.is_some_and(|c| c == ':' || c == '_' || c.is_ascii_alphanumeric()) {
            continue;
        }
        let name: String = expr[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name.trim_end_matches("_bucket").to_string());
    }
    out
}

/// The subcommand of a `longshore …` command line must exist in the CLI.
fn assert_cli_has(sub: &str, context: &str) {
    let (code, _, err) = run_cli("postgres://unused@127.0.0.1:1/x", &[sub, "--help"], &[]);
    assert_eq!(
        code, 0,
        "{context}: `longshore {sub}` is not a command: {err}"
    );
}

#[test]
fn compose_file_is_complete_and_its_commands_exist() {
    let doc = &load("docker-compose.yml")[0];
    let services = &doc["services"];
    for s in [
        "postgres",
        "migrate",
        "ingress",
        "worker",
        "scheduler",
        "prometheus",
        "blackbox",
    ] {
        assert!(!services[s].is_badvalue(), "service {s} missing");
    }
    assert!(
        services["postgres"]["image"]
            .as_str()
            .unwrap()
            .contains("pgmq"),
        "postgres image has pgmq"
    );
    for s in ["migrate", "ingress", "worker", "scheduler"] {
        let cmd = services[s]["command"].as_vec().expect("command list");
        assert_cli_has(cmd[0].as_str().unwrap(), &format!("compose service {s}"));
    }
    let worker = &services["worker"];
    assert!(
        worker["ports"].is_badvalue() && worker["container_name"].is_badvalue(),
        "worker must be scalable"
    );
    load("deploy/prometheus/prometheus.yml");
}

/// The alert rules and the Prometheus configuration are checked by Prometheus's own
/// tool, and the rules' unit tests (deploy/prometheus/alerts.test.yml) pass: each rule
/// fires and stays quiet where it should.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("promtool is not installed (apt-get install prometheus; .ci/run does)");
    for args in [
        &["check", "config", "deploy/prometheus/prometheus.yml"][..],
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        &["test", "rules", "deploy/prometheus/alerts.test.yml"],
    ] {
        let out = std::process::Command::new(promtool)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The label values the rules match on are ones the fleet uses: each outcome is a
    // label the runtime writes, and each schedule one the pipelines define (a rename
    // would silence a rule without failing promtool's tests, which invent the series).
    let text = std::fs::read_to_string("deploy/prometheus/alerts.yml").unwrap();
    let mut runtime_src = String::new();
    for f in [
        "workers/src/outcome.rs",
        "workers/src/worker/execute.rs",
        "workers/src/worker/consumer.rs",
    ] {
        runtime_src.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let defaults = std::fs::read_to_string("jobs/defaults.toml").unwrap();
    let values = |label: &str| -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in text.match_indices(label) {
            let rest = &text[i + label.len()..];
            let Some(rest) = ["=~\"", "!~\"", "=\""]
                .iter()
                .find_map(|op| rest.strip_prefix(op))
            else {
                continue;
            };
            let v = &rest[..rest.find('"').unwrap()];
            out.extend(v.split('|').map(str::to_string));
        }
        out
    };
    let outcomes = values("outcome");
    assert!(outcomes.len() >= 7, "{outcomes:?}");
    for o in outcomes {
        assert!(
            runtime_src.contains(&format!("\"{o}\"")),
            "outcome {o:?} in alerts.yml is not a label the runtime writes"
        );
    }
    for s in values("schedule") {
        assert!(
            defaults.contains(&format!("name = \"{s}\"")),
            "schedule {s:?} in alerts.yml is not in jobs/defaults.toml"
        );
    }
    let scheduler_src = std::fs::read_to_string("workers/src/scheduler.rs").unwrap();
    for r in values("result") {
        assert!(
            scheduler_src.contains(&format!("\"result\" => \"{r}\"")),
            "result {r:?} in alerts.yml is not a label the scheduler writes"
        );
    }
    // Every alerting rule has a unit test.
    let rules = &load("deploy/prometheus/alerts.yml")[0];
    let tests = std::fs::read_to_string("deploy/prometheus/alerts.test.yml").unwrap();
    for g in rules["groups"].as_vec().unwrap() {
        for r in g["rules"].as_vec().unwrap() {
            if let Some(name) = r["alert"].as_str() {
                assert!(
                    tests.contains(&format!("alertname: {name}\n")),
                    "{name} has no test in alerts.test.yml"
                );
            }
        }
    }
}

#[test]
fn procfile_commands_exist() {
    let text = std::fs::read_to_string("Procfile").unwrap();
    let mut kinds = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (kind, cmd) = line.split_once(':').expect("kind: command");
        let mut words = cmd.split_whitespace();
        assert_eq!(words.next(), Some("longshore"), "{line}");
        assert_cli_has(words.next().expect("subcommand"), line);
        kinds.insert(kind.trim().to_string());
    }
    assert_eq!(
        kinds,
        ["clock", "release", "web", "worker"]
            .map(String::from)
            .into()
    );
}

#[tokio::test]
async fn kubernetes_and_dashboard_name_series_the_binary_exports() {
    // Manifests parse; their containers run real subcommands.
    let mut queries = Vec::new();
    for path in [
        "deploy/kubernetes/longshore.yaml",
        "deploy/kubernetes/keda-scaledobject.yaml",
    ] {
        for doc in load(path) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            if let Some(cs) = doc["spec"]["template"]["spec"]["containers"].as_vec() {
                let ours = cs
                    .iter()
                    .filter(|c| c["image"].as_str().unwrap().starts_with("longshore:"));
                for c in ours {
                    assert_cli_has(c["args"][0].as_str().unwrap(), &format!("{path} {kind}"));
                }
            }
            if kind == "ScaledObject" {
                for t in doc["spec"]["triggers"].as_vec().unwrap() {
                    if t["type"].as_str() == Some("prometheus") {
                        queries.push(t["metadata"]["query"].as_str().unwrap().to_string());
                    }
                }
            }
        }
    }
    assert!(!queries.is_empty(), "a Prometheus ScaledObject");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/longshore-dashboard.json").unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let rules = &load("deploy/prometheus/alerts.yml")[0];
    for g in rules["groups"].as_vec().unwrap() {
        for r in g["rules"].as_vec().unwrap() {
            queries.push(r["expr"].as_str().unwrap().to_string());
        }
    }

    // A real worker with metrics on, after one job, plus the ingress's own series.
    let t = db().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut w = Proc::spawn(
        &t.url,
        &["worker", "--metrics-port", &port],
        &[("LONGSHORE__METRICS__SAMPLE_INTERVAL", "200ms")],
    );
    sqlx::query("SELECT pgmq.send('probe', '{\"id\":1}')")
        .execute(&t.pool)
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = eventually(
        Duration::from_secs(15),
        "worker metrics with a done job",
        || {
            let url = url.clone();
            async move {
                let t = reqwest::get(&url).await.ok()?.text().await.ok()?;
                (t.contains("longshore_jobs_total") && t.contains("longshore_queue_depth"))
                    .then_some(t)
            }
        },
    )
    .await;
    let mut exported: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("longshore_"))
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .unwrap()
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect();
    // Series other processes export (checked by their own tests): the ingress's and
    // the scheduler's, and the stale-ack counter that appears on the first lost lease.
    for other in [
        "longshore_http_requests_total",
        "longshore_http_request_duration_seconds",
        "longshore_schedule_fires_total",
        "longshore_stale_acks_total",
        // The chat pipeline's, recorded by llm_call (its histogram's buckets: the
        // runtime's telemetry unit test).
        longshore_jobs::telemetry::LLM_ATTEMPT_SECONDS,
    ] {
        exported.insert(other.to_string());
    }
    for q in &queries {
        for s in series(q) {
            assert!(
                exported.contains(&s),
                "{s} (in {q:?}) is not exported; exported: {exported:?}"
            );
        }
    }
    // The alternative KEDA trigger's SQL runs and counts what the gauge counts (with
    // no worker left to claim what it counts).
    w.kill9();
    let pg_query = load("deploy/kubernetes/keda-scaledobject.yaml")
        .into_iter()
        .flat_map(|d| d["spec"]["triggers"].as_vec().cloned().unwrap_or_default())
        .find(|t| t["type"].as_str() == Some("postgresql"))
        .expect("postgresql trigger")["metadata"]["query"]
        .as_str()
        .unwrap()
        .to_string();
    for sql in [
        "SELECT pgmq.send_batch('probe', array_fill('{\"id\":2}'::jsonb, ARRAY[3]))",
        "SELECT pgmq.send('maintenance', '{\"task\":\"expire_idempotency_keys\"}', 3600)",
    ] {
        sqlx::query(sql).execute(&t.pool).await.unwrap();
    }
    let visible: i64 = sqlx::query_scalar(&pg_query)
        .fetch_one(&t.pool)
        .await
        .expect("KEDA postgresql query runs");
    assert_eq!(
        visible, 3,
        "three probes visible, the maintenance job delayed"
    );
    for core in [
        "longshore_queue_depth",
        "longshore_job_duration_seconds",
        "longshore_job_wait_seconds",
        "longshore_dead_letters",
    ] {
        assert!(
            text.contains(core),
            "{core} missing from a worker's /metrics"
        );
    }
}
