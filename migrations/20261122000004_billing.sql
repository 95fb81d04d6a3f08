-- Usage billing (../shared/SPEC-BILLING.md). Money: integer US cents for balances and
-- limits; numeric for per-request prices and amounts. Never floats.

CREATE TABLE customers (
    customer_id                     integer PRIMARY KEY CHECK (customer_id > 0),
    wallet_address                  varchar(66) UNIQUE,
    escrow_account                  varchar(66),
    max_monthly_usd_cents           bigint NOT NULL DEFAULT 20000 CHECK (max_monthly_usd_cents >= 0),
    current_balance_usd_cents       bigint NOT NULL DEFAULT 0,
    current_month_charged_usd_cents bigint NOT NULL DEFAULT 0 CHECK (current_month_charged_usd_cents >= 0),
    last_month_charged_usd_cents    bigint NOT NULL DEFAULT 0,
    current_month_start             date NOT NULL DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC')::date,
    created_at                      timestamptz NOT NULL DEFAULT now(),
    updated_at                      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE service_instances (
    instance_id    uuid PRIMARY KEY,
    customer_id    integer NOT NULL REFERENCES customers,
    service_type   varchar(20) NOT NULL,
    tier           text NOT NULL CHECK (tier IN ('starter', 'pro', 'enterprise')),
    state          text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended')),
    suspend_reason text,
    is_enabled     boolean NOT NULL DEFAULT true,
    config         jsonb NOT NULL DEFAULT '{}',
    enabled_at     timestamptz,
    disabled_at    timestamptz,
    UNIQUE (customer_id, service_type)
);

-- The key itself is never stored in plain text, only encrypted in the vault file.
CREATE TABLE api_keys (
    api_key_id   varchar(100) PRIMARY KEY,
    customer_id  integer NOT NULL REFERENCES customers,
    service_type varchar(20) NOT NULL,
    key_version  smallint NOT NULL DEFAULT 1,
    is_active    boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- Raw request log, partitioned by day (partitions created on demand by ingest_logs,
-- dropped after the retention). (file_sha256, line_no) says where each row came from.
CREATE TABLE haproxy_logs (
    id           bigserial,
    ts           timestamptz NOT NULL,
    customer_id  integer NOT NULL,
    service_type varchar(20) NOT NULL,
    method       varchar(16) NOT NULL,
    status_code  smallint NOT NULL,
    bytes_out    bigint NOT NULL,
    duration_ms  integer,
    client_ip    text NOT NULL,
    backend      text NOT NULL,
    server       text NOT NULL,
    file_sha256  char(64) NOT NULL,
    line_no      integer NOT NULL
) PARTITION BY RANGE (ts);
CREATE INDEX haproxy_logs_id_idx ON haproxy_logs (id);

-- A file (or POSTed batch) is ingested once: its rows and this row commit together.
CREATE TABLE ingested_files (
    sha256      char(64) PRIMARY KEY,
    source      text NOT NULL,
    lines       integer NOT NULL,
    inserted    integer NOT NULL,
    malformed   integer NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE usage_records (
    record_id         bigserial PRIMARY KEY,
    customer_id       integer NOT NULL,
    service_type      varchar(20) NOT NULL,
    window_start      timestamptz NOT NULL,
    window_end        timestamptz NOT NULL,
    request_count     bigint NOT NULL DEFAULT 0,
    billable_count    bigint NOT NULL DEFAULT 0,
    bytes_transferred bigint NOT NULL DEFAULT 0,
    charged_amount    numeric(20,8),
    UNIQUE (customer_id, service_type, window_start)
);

-- Aggregation watermarks: rows of haproxy_logs with id <= last_id are counted.
CREATE TABLE aggregation_watermarks (
    name    text PRIMARY KEY,
    last_id bigint NOT NULL DEFAULT 0
);
INSERT INTO aggregation_watermarks (name) VALUES ('usage');

CREATE TABLE escrow_transactions (
    tx_id       bigserial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers,
    tx_digest   varchar(128) NOT NULL UNIQUE,
    tx_type     text NOT NULL CHECK (tx_type IN ('deposit', 'withdraw', 'charge', 'credit')),
    amount      numeric(20,8) NOT NULL,
    asset_type  text NOT NULL DEFAULT 'USDC',
    ts          timestamptz NOT NULL DEFAULT now()
);

-- One row per vault file written: its plaintext content hash (the write is skipped
-- when unchanged) and row count.
CREATE TABLE vault_versions (
    version    bigserial PRIMARY KEY,
    path       text NOT NULL,
    sha256     char(64) NOT NULL,
    rows       integer NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);
