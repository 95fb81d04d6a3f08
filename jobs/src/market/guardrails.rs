//! The doubling guardrails (SPEC-MARKET "compute_signals"): may the position double on
//! a signal? A pure function of its inputs, so every check is tested by a table.
//!
//! Policy (stated in docs/market.md): unknown inputs fail closed (no `positions` row
//! fails the size and cooldown checks; no volatility fails the volatility check); the
//! score delta is against the previous signal of the same timeframe and direction, at
//! six decimals; a flat signal has nothing to double.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::strategy::{Direction, round6};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailConfig {
    /// The score must have risen by more than this since the previous signal.
    pub score_delta_threshold: f64,
    /// The position must be below this share of the portfolio.
    pub max_position_pct: f64,
    /// The last increase must be more than this many seconds ago.
    pub cooldown_seconds: i64,
    /// Volatility must be below this.
    pub volatility_threshold: f64,
}

/// The previous signal for the symbol of the same timeframe and direction (same
/// strategy version): a long after a short is a new position, not an increase.
#[derive(Debug, Clone, PartialEq)]
pub struct Previous {
    pub id: i64,
    pub score: f64,
}

/// The symbol's row in `positions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub size: f64,
    pub portfolio_value: f64,
    pub last_increase_at: Option<DateTime<Utc>>,
}

/// May the position double on this signal? Every check is evaluated and recorded; the
/// decision is `allowed` only if all pass.
pub fn doubling(
    cfg: &GuardrailConfig,
    direction: Direction,
    score: f64,
    volatility: Option<f64>,
    previous: Option<&Previous>,
    position: Option<&Position>,
    now: DateTime<Utc>,
) -> Value {
    if direction == Direction::Flat {
        return json!({"applies": false, "allowed": false, "reason": "flat signal: nothing to double"});
    }
    let mut checks = Vec::new();
    let mut failed = Vec::new();
    let mut check = |name: &str, ok: bool, detail: Value| {
        if !ok {
            failed.push(name.to_string());
        }
        checks.push(json!({"check": name, "passed": ok, "detail": detail}));
    };

    let prev = previous.map_or(0.0, |p| p.score);
    let delta = round6(score - prev);
    check(
        "score_delta",
        delta > cfg.score_delta_threshold,
        json!({"delta": delta, "previous_score": prev, "previous_signal_id": previous.map(|p| p.id), "threshold": cfg.score_delta_threshold}),
    );
    // Unknown inputs fail closed: without a `positions` row neither the position's size
    // nor its last increase is known, as without volatility its level is not.
    let pct = position.map(|p| p.size.abs() / p.portfolio_value);
    check(
        "max_position_pct",
        pct.is_some_and(|p| p < cfg.max_position_pct),
        json!({"position_pct": pct, "max": cfg.max_position_pct, "position": if position.is_some() { "known" } else { "unknown" }}),
    );
    // A doubling is of a position on the signal's side (or none yet): a short signal
    // never doubles a long. Unknown: fails closed.
    let side = match direction {
        Direction::Long => 1.0,
        _ => -1.0,
    };
    check(
        "same_side",
        position.is_some_and(|p| p.size == 0.0 || p.size.signum() == side),
        json!({"position_size": position.map(|p| p.size), "position": if position.is_some() { "known" } else { "unknown" }}),
    );
    let last = position.and_then(|p| p.last_increase_at);
    let since = last.map(|t| (now - t).num_seconds());
    check(
        "cooldown",
        position.is_some() && since.is_none_or(|s| s > cfg.cooldown_seconds),
        json!({"last_increase_at": last, "seconds_since": since, "cooldown_seconds": cfg.cooldown_seconds, "position": if position.is_some() { "known" } else { "unknown" }}),
    );
    check(
        "volatility",
        volatility.is_some_and(|v| v < cfg.volatility_threshold),
        json!({"volatility": volatility, "threshold": cfg.volatility_threshold}),
    );
    json!({"applies": true, "allowed": failed.is_empty(), "failed": failed, "checks": checks})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> GuardrailConfig {
        GuardrailConfig {
            score_delta_threshold: 0.1,
            max_position_pct: 0.10,
            cooldown_seconds: 3600,
            volatility_threshold: 0.05,
        }
    }

    #[test]
    fn each_guardrail_can_refuse() {
        let now: DateTime<Utc> = "2026-11-19T12:00:00Z".parse().unwrap();
        let prev = Previous { id: 7, score: 0.62 };
        let pos = Position {
            size: 5_000.0,
            portfolio_value: 100_000.0,
            last_increase_at: Some(now - chrono::Duration::hours(2)),
        };
        // (name, score, volatility, previous, position, failed checks)
        type Case<'a> = (
            &'a str,
            f64,
            Option<f64>,
            Option<Previous>,
            Option<Position>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "all pass",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(pos.clone()),
                vec![],
            ),
            (
                // Unknown inputs fail closed (issue 17): no `positions` row, so neither
                // the size nor the last increase is known.
                "no history, no position",
                0.7,
                Some(0.01),
                None,
                None,
                vec!["max_position_pct", "same_side", "cooldown"],
            ),
            (
                "score rose by only 0.08",
                0.70,
                Some(0.01),
                Some(prev.clone()),
                Some(pos.clone()),
                vec!["score_delta"],
            ),
            (
                "score fell",
                0.61,
                Some(0.01),
                Some(prev.clone()),
                Some(pos.clone()),
                vec!["score_delta"],
            ),
            (
                "position at 10%",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    size: 10_000.0,
                    ..pos.clone()
                }),
                vec!["max_position_pct"],
            ),
            (
                "short position over 10%",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    size: -12_000.0,
                    ..pos.clone()
                }),
                vec!["max_position_pct", "same_side"],
            ),
            (
                // A long signal does not double a short (review, issue 17).
                "short position at 5%",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    size: -5_000.0,
                    ..pos.clone()
                }),
                vec!["same_side"],
            ),
            (
                "no position yet (size 0)",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    size: 0.0,
                    ..pos.clone()
                }),
                vec![],
            ),
            (
                "increased 30 min ago",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    last_increase_at: Some(now - chrono::Duration::minutes(30)),
                    ..pos.clone()
                }),
                vec!["cooldown"],
            ),
            (
                "increased exactly an hour ago",
                0.75,
                Some(0.01),
                Some(prev.clone()),
                Some(Position {
                    last_increase_at: Some(now - chrono::Duration::hours(1)),
                    ..pos.clone()
                }),
                vec!["cooldown"],
            ),
            (
                "volatility 0.05",
                0.75,
                Some(0.05),
                Some(prev.clone()),
                Some(pos.clone()),
                vec!["volatility"],
            ),
            (
                "volatility unknown",
                0.75,
                None,
                Some(prev.clone()),
                Some(pos.clone()),
                vec!["volatility"],
            ),
            (
                "everything fails",
                0.65,
                Some(0.2),
                Some(prev.clone()),
                Some(Position {
                    size: 50_000.0,
                    portfolio_value: 100_000.0,
                    last_increase_at: Some(now),
                }),
                vec!["score_delta", "max_position_pct", "cooldown", "volatility"],
            ),
        ];
        for (name, score, vol, prev, pos, want) in cases {
            let d = doubling(
                &guard(),
                Direction::Long,
                score,
                vol,
                prev.as_ref(),
                pos.as_ref(),
                now,
            );
            let failed: Vec<&str> = d["failed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(failed, want, "{name}: {d}");
            assert_eq!(d["allowed"], json!(want.is_empty()), "{name}");
            assert_eq!(
                d["checks"].as_array().unwrap().len(),
                5,
                "{name}: every check is recorded"
            );
        }
        // And a short signal does not double a long (scores are magnitudes, as stored).
        let d = doubling(
            &guard(),
            Direction::Short,
            0.75,
            Some(0.01),
            Some(&Previous { id: 7, score: 0.62 }),
            Some(&pos),
            now,
        );
        assert_eq!(d["failed"], json!(["same_side"]), "{d}");
        let flat = doubling(&guard(), Direction::Flat, 0.3, Some(0.01), None, None, now);
        assert_eq!(flat["applies"], json!(false));
        assert_eq!(flat["allowed"], json!(false));
    }

    /// The score delta is compared at six decimals too: 0.8 − 0.7 and 0.75 − 0.65 are
    /// both exactly 0.1, neither above a 0.1 threshold.
    #[test]
    fn the_score_delta_is_decided_as_decimals_decide_it() {
        let g = guard();
        let now = Utc::now();
        let pos = Position {
            size: 0.0,
            portfolio_value: 100.0,
            last_increase_at: None,
        };
        let failed = |score: f64, prev: f64| {
            let v = doubling(
                &g,
                Direction::Long,
                score,
                Some(0.01),
                Some(&Previous { id: 1, score: prev }),
                Some(&pos),
                now,
            );
            v["failed"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "score_delta")
        };
        assert!(failed(0.8, 0.7));
        assert!(failed(0.75, 0.65));
        assert!(failed(0.65, 0.55));
        assert!(!failed(0.800001, 0.7));
        assert!(!failed(0.76, 0.65));

        // Every pair of scores strategy v1 can produce (each subset of its six weights,
        // times each multiplier: ×0.8 high volatility, ×0.9 near a cluster, both),
        // computed in binary floating point and stored at six decimals as the strategy
        // does, against exact decimal arithmetic: the delta passes exactly when the
        // decimal difference is above 0.1.
        use rust_decimal::Decimal;
        use std::str::FromStr;
        let dec = |x: &str| Decimal::from_str(x).unwrap();
        let weights = ["0.25", "0.20", "0.20", "0.15", "0.10", "0.10"];
        let multipliers = ["1", "0.8", "0.9", "0.72"];
        let mut scores: Vec<(f64, Decimal)> = Vec::new();
        for set in 0u32..64 {
            let (mut f, mut d) = (0.0_f64, Decimal::ZERO);
            for (i, w) in weights.iter().enumerate() {
                if set & (1 << i) != 0 {
                    f += w.parse::<f64>().unwrap();
                    d += dec(w);
                }
            }
            for m in multipliers {
                let mf = if m == "0.72" {
                    0.8 * 0.9
                } else {
                    m.parse::<f64>().unwrap()
                };
                scores.push((
                    crate::market::strategy::round6(f * mf),
                    (d * dec(m)).round_dp(6),
                ));
            }
        }
        let (mut on_edge, mut pairs) = (0, 0);
        for (a, ad) in &scores {
            for (b, bd) in &scores {
                let passes = ad - bd > dec("0.1");
                on_edge += usize::from(ad - bd == dec("0.1"));
                pairs += 1;
                assert_eq!(!failed(*a, *b), passes, "{a} − {b}");
            }
        }
        assert_eq!(pairs, 256 * 256);
        assert!(on_edge > 100, "the table lands on the 0.1 edge: {on_edge}");
    }
}
