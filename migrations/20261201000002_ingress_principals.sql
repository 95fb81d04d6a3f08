-- Who enqueued a job (issue 14): the ingress answers a job's status only to the
-- principal that enqueued it (`token:<name>`, `hook:<source>`), or to a token that may
-- read every job of the queue. Queue, archive and dead-letter rows keep it in the
-- `principal` header; a completion record (on_done = "delete") keeps it here.
ALTER TABLE longshore.completions ADD COLUMN principal text;
