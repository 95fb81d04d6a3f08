//! The dev traffic simulator (`[traffic]`, on in the `dev` overlay): every `interval`, a
//! file of `lines` HAProxy log lines for the demo customers in `spool_dir`, which the dev
//! schedules scan. Each file is written under a dot name and renamed when complete (as
//! a log shipper does), so the spool scan never reads half a file. Simulated traffic,
//! not real requests: the log says so.

use std::path::Path;
use std::time::Duration;

use longshore_workers::config::{Config, ConfigError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficConfig {
    /// Where the files go; "" (the default) turns the simulator off.
    #[serde(default)]
    pub spool_dir: String,
    /// Lines per file.
    #[serde(default = "default_lines")]
    pub lines: usize,
    /// One file per interval.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_lines() -> usize {
    400
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            spool_dir: String::new(),
            lines: default_lines(),
            interval: default_interval(),
        }
    }
}

impl TrafficConfig {
    pub fn from_config(cfg: &Config) -> Result<TrafficConfig, ConfigError> {
        let t: TrafficConfig = if cfg.raw_section("traffic").is_null() {
            TrafficConfig::default()
        } else {
            cfg.section("traffic")?
        };
        if !t.spool_dir.is_empty() && t.interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                key: "traffic.interval".into(),
                message: "must be at least 100ms".into(),
            });
        }
        Ok(t)
    }

    /// True when a spool directory is set.
    pub fn enabled(&self) -> bool {
        !self.spool_dir.is_empty()
    }
}

/// Writes a file every `interval` until `stop`.
pub async fn simulate(t: TrafficConfig, stop: CancellationToken) {
    use rand::SeedableRng as _;
    let dir = t.spool_dir.clone();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(dir, error = %e, "dev traffic simulator: cannot create the spool directory");
        return;
    }
    tracing::info!(dir, lines = t.lines, every = ?t.interval, "dev traffic simulator: writing HAProxy log files (simulated traffic, not real requests)");
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut tick = tokio::time::interval(t.interval);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let now = chrono::Utc::now();
        let text = super::seed::demo_lines(t.lines, now, &mut rng);
        let name = format!("haproxy-{}-{n}.log", now.format("%Y%m%dT%H%M%S%3f"));
        let tmp = Path::new(&dir).join(format!(".{name}"));
        let r = std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, Path::new(&dir).join(&name)));
        if let Err(e) = r {
            tracing::warn!(error = %e, "dev traffic simulator: write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_whole_files_and_stops() {
        let dir = std::env::temp_dir().join(format!("longshore-traffic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = TrafficConfig {
            spool_dir: dir.display().to_string(),
            lines: 5,
            interval: Duration::from_millis(100),
        };
        let stop = CancellationToken::new();
        let h = tokio::spawn(simulate(t, stop.clone()));
        tokio::time::sleep(Duration::from_millis(250)).await;
        stop.cancel();
        h.await.unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!files.is_empty(), "a file was written");
        for f in &files {
            assert!(
                !f.starts_with('.'),
                "no half-written file is left visible: {f}"
            );
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert_eq!(text.lines().count(), 5, "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
