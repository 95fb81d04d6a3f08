-- The market pipeline (../shared/SPEC-MARKET.md). Prices are numeric; indicator values
-- live in jsonb as JSON numbers (they are computed in f64 and never summed as money).

CREATE TABLE watchers (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL,
    symbol     text NOT NULL CHECK (symbol ~ '^[A-Z0-9]{1,20}/[A-Z0-9]{1,10}$'),
    timeframe  text NOT NULL CHECK (timeframe IN ('1m','5m','15m','30m','1h','4h','1d','1w')),
    strategy   jsonb NOT NULL DEFAULT '{}',
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The app's own updated_at: a delivery older than the row is ignored.
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, symbol, timeframe)
);
CREATE INDEX watchers_active ON watchers (symbol, timeframe) WHERE active;

-- A DELETE delivery leaves a tombstone, so a late INSERT/UPDATE of the same watcher
-- (webhooks arrive out of order) cannot bring it back.
CREATE TABLE watcher_tombstones (
    id         uuid PRIMARY KEY,
    deleted_at timestamptz NOT NULL
);

CREATE TABLE candles (
    symbol    text NOT NULL,
    timeframe text NOT NULL,
    open_time timestamptz NOT NULL,
    open      numeric NOT NULL CHECK (open > 0),
    high      numeric NOT NULL CHECK (high > 0),
    low       numeric NOT NULL CHECK (low > 0),
    close     numeric NOT NULL CHECK (close > 0),
    volume    numeric NOT NULL CHECK (volume >= 0),
    PRIMARY KEY (symbol, timeframe, open_time)
);
CREATE INDEX candles_open_time ON candles (open_time);

CREATE TABLE indicators (
    id        bigserial PRIMARY KEY,
    symbol    text NOT NULL,
    timeframe text NOT NULL,
    at        timestamptz NOT NULL,
    data      jsonb NOT NULL,
    source    text NOT NULL CHECK (source IN ('cryptometer', 'kingfisher', 'internal')),
    UNIQUE (symbol, timeframe, at, source)
);
CREATE INDEX indicators_at ON indicators (at);

-- Per timeframe as well: the spec's unique (symbol, at) would let a symbol's 5m and
-- 1h series overwrite each other's metrics at the same instant.
CREATE TABLE risk_metric (
    id        bigserial PRIMARY KEY,
    symbol    text NOT NULL,
    timeframe text NOT NULL,
    at        timestamptz NOT NULL,
    metrics   jsonb NOT NULL,
    UNIQUE (symbol, timeframe, at)
);

CREATE TABLE liq_clusters (
    id       bigserial PRIMARY KEY,
    symbol   text NOT NULL,
    at       timestamptz NOT NULL,
    clusters jsonb NOT NULL,
    UNIQUE (symbol, at)
);

CREATE TABLE signals (
    id               bigserial PRIMARY KEY,
    symbol           text NOT NULL,
    timeframe        text NOT NULL,
    at               timestamptz NOT NULL,
    direction        text NOT NULL CHECK (direction IN ('long', 'short', 'flat')),
    score            numeric NOT NULL CHECK (score BETWEEN 0 AND 1),
    entry_price      numeric NOT NULL,
    stop_loss        numeric,
    take_profit      numeric[] NOT NULL DEFAULT '{}',
    confidence       numeric NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    reasons          jsonb NOT NULL,
    strategy_version text NOT NULL DEFAULT 'v1',
    metadata         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX signals_once ON signals (symbol, timeframe, at, strategy_version);
CREATE INDEX signals_symbol_at ON signals (symbol, strategy_version, at DESC);

-- The book the doubling guardrails read. `size` is the position's notional value in
-- the quote currency, so size / portfolio_value is its share of the portfolio.
CREATE TABLE positions (
    symbol           text PRIMARY KEY,
    size             numeric NOT NULL DEFAULT 0,
    portfolio_value  numeric NOT NULL CHECK (portfolio_value > 0),
    last_increase_at timestamptz
);

CREATE TABLE win_rate (
    symbol           text NOT NULL,
    timeframe        text NOT NULL,
    lookback_days    integer NOT NULL CHECK (lookback_days > 0),
    strategy_version text NOT NULL DEFAULT 'v1',
    win_rate         numeric CHECK (win_rate BETWEEN 0 AND 1),
    sample_size      integer NOT NULL,
    params           jsonb NOT NULL,
    computed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, timeframe, lookback_days, strategy_version)
);
