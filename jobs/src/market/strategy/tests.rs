//! The strategy table, rule by rule and on its exact boundaries.

use super::*;

pub(crate) fn v1() -> StrategyConfig {
    StrategyConfig {
        version: "v1".into(),
        weights: Weights {
            rsi: 0.25,
            macd: 0.20,
            ema_cross: 0.20,
            trend: 0.15,
            ls_ratio: 0.10,
            volume: 0.10,
        },
        rsi_oversold: 30.0,
        rsi_overbought: 70.0,
        ls_crowded_short: 0.8,
        ls_crowded_long: 1.25,
        volume_spike: 1.5,
        volume_window: 20,
        high_volatility: 0.05,
        high_volatility_multiplier: 0.8,
        liquidation_distance: 0.02,
        liquidation_multiplier: 0.9,
        long_threshold: 0.6,
        short_threshold: -0.6,
        stop_loss_pct: 0.02,
        take_profit_pcts: vec![0.02, 0.05, 0.10],
    }
}

/// Inputs where no rule fires: RSI 50, MACD line = signal, EMAs equal to the
/// close, L/S 1.0, ordinary volume, calm volatility, no clusters near.
fn neutral() -> Inputs {
    Inputs {
        open: 100.0,
        close: 100.0,
        volume: 10.0,
        rsi: Some(50.0),
        macd: Some(Macd {
            line: 1.0,
            signal: 1.0,
            histogram: 0.0,
        }),
        ema20: Some(100.0),
        ema50: Some(100.0),
        volume_avg: Some(10.0),
        volatility: Some(0.01),
        ls_ratio: Some(1.0),
        clusters: Clusters::Known(vec![]),
    }
}

fn macd(line: f64, signal: f64) -> Option<Macd> {
    Some(Macd {
        line,
        signal,
        histogram: line - signal,
    })
}

const EPS: f64 = 1e-12;

#[test]
fn each_rule_contributes_its_weight() {
    type Edit = fn(&mut Inputs);
    let cases: Vec<(&str, Edit, &str, f64)> = vec![
        ("rsi 29.9", |x| x.rsi = Some(29.9), "rsi_oversold", 0.25),
        ("rsi 30 is not oversold", |x| x.rsi = Some(30.0), "", 0.0),
        ("rsi 70.1", |x| x.rsi = Some(70.1), "rsi_overbought", -0.25),
        ("rsi 70 is not overbought", |x| x.rsi = Some(70.0), "", 0.0),
        (
            "macd above",
            |x| x.macd = macd(1.5, 1.0),
            "macd_above_signal",
            0.20,
        ),
        (
            "macd below",
            |x| x.macd = macd(0.5, 1.0),
            "macd_below_signal",
            -0.20,
        ),
        (
            "ema20 above",
            |x| x.ema20 = Some(101.0),
            "ema20_above_ema50",
            0.20,
        ),
        (
            "ema20 below",
            |x| x.ema20 = Some(99.0),
            "ema20_below_ema50",
            -0.20,
        ),
        (
            "close above ema50",
            |x| {
                x.close = 101.0;
                x.open = 101.0
            },
            "close_above_ema50",
            0.15,
        ),
        (
            "close below ema50",
            |x| {
                x.close = 99.0;
                x.open = 99.0
            },
            "close_below_ema50",
            -0.15,
        ),
        (
            "l/s 0.79",
            |x| x.ls_ratio = Some(0.79),
            "ls_crowded_short",
            0.10,
        ),
        (
            "l/s 0.8 is not crowded",
            |x| x.ls_ratio = Some(0.8),
            "",
            0.0,
        ),
        (
            "l/s 1.26",
            |x| x.ls_ratio = Some(1.26),
            "ls_crowded_long",
            -0.10,
        ),
        (
            "l/s 1.25 is not crowded",
            |x| x.ls_ratio = Some(1.25),
            "",
            0.0,
        ),
        (
            "volume spike, green candle",
            |x| {
                x.volume = 15.1;
                x.open = 99.9
            },
            "volume_spike_up",
            0.10,
        ),
        (
            "volume spike, red candle",
            |x| {
                x.volume = 15.1;
                x.open = 100.1
            },
            "volume_spike_down",
            -0.10,
        ),
        (
            "volume 1.5x is not a spike",
            |x| {
                x.volume = 15.0;
                x.open = 99.9
            },
            "",
            0.0,
        ),
        ("volume spike, doji", |x| x.volume = 30.0, "", 0.0),
    ];
    let cfg = v1();
    for (name, edit, rule, want) in cases {
        let mut x = neutral();
        edit(&mut x);
        let e = evaluate(&cfg, &x);
        assert!(
            (e.score - want).abs() < EPS,
            "{name}: score {} want {want}",
            e.score
        );
        let fired = e.fired();
        if rule.is_empty() {
            assert!(fired.is_empty(), "{name}: fired {fired:?}");
        } else {
            assert_eq!(fired, vec![rule], "{name}");
            let c = e.reasons[0]["contribution"].as_f64().unwrap();
            assert!((c - want).abs() < EPS, "{name}: contribution {c}");
        }
        assert_eq!(
            e.direction,
            Direction::Flat,
            "{name}: one rule alone stays flat"
        );
    }
}

/// The bullish set without RSI: MACD, EMA cross, trend, L/S, volume = 0.75.
fn bullish() -> Inputs {
    Inputs {
        open: 104.0,
        close: 105.0,
        volume: 20.0,
        rsi: Some(60.0),
        macd: macd(2.0, 1.0),
        ema20: Some(103.0),
        ema50: Some(100.0),
        volume_avg: Some(10.0),
        volatility: Some(0.01),
        ls_ratio: Some(0.7),
        clusters: Clusters::Known(vec![]),
    }
}

fn bearish() -> Inputs {
    Inputs {
        open: 96.0,
        close: 95.0,
        volume: 20.0,
        rsi: Some(40.0),
        macd: macd(-2.0, -1.0),
        ema20: Some(97.0),
        ema50: Some(100.0),
        volume_avg: Some(10.0),
        volatility: Some(0.01),
        ls_ratio: Some(1.4),
        clusters: Clusters::Known(vec![]),
    }
}

#[test]
fn thresholds_multipliers_and_levels() {
    let cfg = v1();
    let e = evaluate(&cfg, &bullish());
    assert!((e.score - 0.75).abs() < EPS);
    assert_eq!(e.direction, Direction::Long);
    assert_eq!(e.entry, 105.0);
    assert!((e.stop_loss.unwrap() - 102.9).abs() < 1e-9);
    let tp: Vec<f64> = e
        .take_profits
        .iter()
        .map(|p| (p * 1e6).round() / 1e6)
        .collect();
    assert_eq!(tp, vec![107.1, 110.25, 115.5]);

    let e = evaluate(&cfg, &bearish());
    assert!((e.score + 0.75).abs() < EPS);
    assert_eq!(e.direction, Direction::Short);
    assert!((e.stop_loss.unwrap() - 96.9).abs() < 1e-9);
    let tp: Vec<f64> = e
        .take_profits
        .iter()
        .map(|p| (p * 1e6).round() / 1e6)
        .collect();
    assert_eq!(tp, vec![93.1, 90.25, 85.5]);

    // A cluster 1% away turns a long flat: MACD+EMA+trend+L/S = 0.65, × 0.9 = 0.585.
    let mut x = bullish();
    x.volume = 10.0;
    x.clusters = Clusters::Known(vec![Cluster {
        price: 106.05,
        volume: 5.0,
        side: "short".into(),
    }]);
    let e = evaluate(&cfg, &x);
    assert!((e.score - 0.65 * 0.9).abs() < EPS, "{}", e.score);
    assert_eq!(e.direction, Direction::Flat);
    assert!(e.fired().contains(&"liquidation_nearby"));
    assert!(e.stop_loss.is_none() && e.take_profits.is_empty());

    // A cluster 2.5% away does not count.
    x.clusters = Clusters::Known(vec![Cluster {
        price: 107.7,
        volume: 5.0,
        side: "short".into(),
    }]);
    let e = evaluate(&cfg, &x);
    assert!((e.score - 0.65).abs() < EPS);
    assert!(!e.fired().contains(&"liquidation_nearby"));
    assert_eq!(e.direction, Direction::Long);

    // High volatility turns a long (0.65) flat: 0.65 × 0.8 = 0.52.
    let mut x = bullish();
    x.volume = 10.0;
    x.volatility = Some(0.051);
    let e = evaluate(&cfg, &x);
    assert!((e.score - 0.52).abs() < EPS, "{}", e.score);
    assert_eq!(e.direction, Direction::Flat);
    assert!(e.fired().contains(&"high_volatility"));
    let mut x = bearish();
    x.volatility = Some(0.05);
    let e = evaluate(&cfg, &x);
    assert!(
        !e.fired().contains(&"high_volatility"),
        "0.05 is not above 0.05"
    );

    // The short threshold: −0.65 is short, −0.55 is flat.
    let mut x = bearish();
    x.volume = 10.0;
    assert_eq!(evaluate(&cfg, &x).direction, Direction::Short);
    x.ls_ratio = Some(1.0);
    let e = evaluate(&cfg, &x);
    assert!((e.score + 0.55).abs() < EPS);
    assert_eq!(e.direction, Direction::Flat);
}

#[test]
fn every_rule_fires_at_once() {
    // Oversold RSI in an uptrend with every other rule bullish: 1.0, then both
    // multipliers: 1.0 × 0.8 × 0.9 = 0.72.
    let mut x = bullish();
    x.rsi = Some(25.0);
    x.volatility = Some(0.08);
    x.clusters = Clusters::Known(vec![Cluster {
        price: 104.0,
        volume: 1.0,
        side: "long".into(),
    }]);
    let e = evaluate(&v1(), &x);
    assert_eq!(
        e.fired(),
        vec![
            "rsi_oversold",
            "macd_above_signal",
            "ema20_above_ema50",
            "close_above_ema50",
            "ls_crowded_short",
            "volume_spike_up",
            "high_volatility",
            "liquidation_nearby"
        ]
    );
    assert!((e.score - 0.72).abs() < EPS, "{}", e.score);
    assert_eq!(e.direction, Direction::Long);
    assert!(e.missing.is_empty());
}

#[test]
fn missing_inputs_fire_nothing_and_are_listed() {
    let x = Inputs {
        open: 10.0,
        close: 10.0,
        volume: 1.0,
        ..Inputs::default()
    };
    let e = evaluate(&v1(), &x);
    assert_eq!(e.score, 0.0);
    assert_eq!(e.direction, Direction::Flat);
    assert!(e.fired().is_empty());
    assert_eq!(
        e.missing,
        vec![
            "rsi",
            "macd",
            "ema",
            "ls_ratio",
            "volume_average",
            "volatility"
        ]
    );
    assert_eq!(
        e.reasons,
        vec![json!({"note": "liquidation_clusters_not_configured"})]
    );
}

#[test]
fn config_checks() {
    assert!(v1().check().is_ok());
    let mut c = v1();
    c.weights.rsi = 0.3;
    assert!(c.check().unwrap_err().contains("sum to 1"));
    let mut c = v1();
    c.short_threshold = 0.1;
    assert!(c.check().is_err());
    let mut c = v1();
    c.rsi_oversold = 80.0;
    assert!(c.check().is_err());
}

/// Item 3 of issue 17: every combination of rules and multipliers, in both
/// directions, decided as exact decimal arithmetic decides it, so the ones that land
/// on ±0.6 (0.75 × 0.8, 0.25 + 0.20 + 0.15, …) are flat, as "> 0.6 is long" says.
#[test]
fn boundaries_are_decided_as_decimals_decide_them() {
    use rust_decimal::Decimal;
    use std::str::FromStr;
    let cfg = v1();
    let d = |x: f64| Decimal::from_str(&x.to_string()).unwrap();
    let w = &cfg.weights;
    let weights = [w.rsi, w.macd, w.ema_cross, w.trend, w.ls_ratio, w.volume];
    let (mut on_boundary, mut total) = (0, 0);
    for bull in [true, false] {
        for set in 0u32..64 {
            for (hot, near) in [(false, false), (true, false), (false, true), (true, true)] {
                let fires = |i: u32| set & (1 << i) != 0;
                let mut x = neutral();
                x.ema50 = Some(100.0);
                let s = if bull { 1.0 } else { -1.0 };
                if fires(0) {
                    x.rsi = Some(if bull { 25.0 } else { 75.0 });
                }
                if fires(1) {
                    x.macd = macd(1.0 + s, 1.0);
                }
                x.ema20 = Some(if fires(2) { 100.0 + s } else { 100.0 });
                x.close = if fires(3) { 100.0 + s } else { 100.0 };
                if fires(4) {
                    x.ls_ratio = Some(if bull { 0.5 } else { 2.0 });
                }
                if fires(5) {
                    x.volume = 100.0;
                    x.open = x.close - s;
                } else {
                    x.open = x.close;
                }
                if hot {
                    x.volatility = Some(0.06);
                }
                if near {
                    x.clusters = Clusters::Known(vec![Cluster {
                        price: x.close * 1.01,
                        volume: 1.0,
                        side: "long".into(),
                    }]);
                }
                let mut exact: Decimal = (0..6)
                    .filter(|i| fires(*i))
                    .map(|i| d(weights[i as usize]))
                    .sum();
                if hot {
                    exact *= d(cfg.high_volatility_multiplier);
                }
                if near {
                    exact *= d(cfg.liquidation_multiplier);
                }
                if !bull {
                    exact = -exact;
                }
                let want = if exact > d(cfg.long_threshold) {
                    Direction::Long
                } else if exact < d(cfg.short_threshold) {
                    Direction::Short
                } else {
                    Direction::Flat
                };
                if exact.abs() == d(cfg.long_threshold) {
                    on_boundary += 1;
                }
                total += 1;
                let e = evaluate(&cfg, &x);
                assert_eq!(
                    e.direction, want,
                    "set {set:06b} bull {bull} hot {hot} near {near}: exact {exact}, score {}",
                    e.score
                );
            }
        }
    }
    assert_eq!(total, 512);
    // The table does reach the boundary (else it would prove nothing about it).
    assert!(on_boundary >= 4, "{on_boundary} combinations on ±0.6");
}
