-- Market pipeline, issue 17.
--
-- Liquidation clusters are kept per timeframe, like risk_metric: keyed by symbol alone,
-- one timeframe's ingest used another's clusters as current. The rows there are cannot
-- be told apart (which ingest wrote them is unknown) and are refetched by the next
-- ingest of each pair, so they are dropped rather than guessed.
DELETE FROM liq_clusters;
ALTER TABLE liq_clusters DROP CONSTRAINT liq_clusters_symbol_at_key;
ALTER TABLE liq_clusters
    ADD COLUMN timeframe  text NOT NULL,
    -- When the source answered: clusters fetched long after their candle closed are
    -- not that candle's, and compute_signals treats them as missing.
    ADD COLUMN fetched_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE liq_clusters ADD CONSTRAINT liq_clusters_once UNIQUE (symbol, timeframe, at);

-- Every pruned column has an index, so each bounded batch of prune_market is a range
-- scan (candles and indicators had theirs).
CREATE INDEX liq_clusters_at ON liq_clusters (at);
CREATE INDEX risk_metric_at ON risk_metric (at);
CREATE INDEX watcher_tombstones_deleted_at ON watcher_tombstones (deleted_at);

-- The previous signal of a (symbol, timeframe, strategy): the doubling guardrails read
-- it for every candle evaluated.
CREATE INDEX signals_recent ON signals (symbol, timeframe, strategy_version, at DESC);
