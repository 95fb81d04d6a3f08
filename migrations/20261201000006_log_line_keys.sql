-- Issue 15 item 10: a request is stored once, however its line arrives. Whole-file
-- checksums missed a spool file appended between scans, a POST retried with other batch
-- boundaries and a copytruncate re-cut: each re-inserted lines already billed. Every
-- line now carries a key from its own bytes (the first 16 bytes of the SHA-256 of the
-- line from the client address on, the syslog prefix left out), unique with its
-- timestamp (the partition key: the same line always parses to the same ts, so its
-- copies meet in one partition). Rows stored before have no key and are not compared:
-- the index is partial, so it indexes none of them (building it still reads each
-- retained partition once, holding ingests back meanwhile).
ALTER TABLE haproxy_logs ADD COLUMN line_key uuid;
CREATE UNIQUE INDEX haproxy_logs_line_key_idx ON haproxy_logs (ts, line_key)
    WHERE line_key IS NOT NULL;

-- Which file a row came from: the first 8 bytes of its ingested_files key, not the
-- whole 64-character checksum on every row (a third of the row's bytes, and of the
-- COPY's time). Rows stored before keep their file_sha256; new ones leave it NULL.
ALTER TABLE haproxy_logs
    ADD COLUMN file_key bigint,
    ALTER COLUMN file_sha256 DROP NOT NULL;
