-- Issue 19: console sessions. Signing in with a token makes a session: the browser keeps
-- a random id in an HttpOnly, SameSite=Strict cookie; this table keeps its SHA-256 (a
-- leaked table row signs no one in), the configured token's hash it stands for (so a
-- token revoked or removed from the config ends its sessions at once) and the CSRF token
-- every form of the session carries. In the database, so any ingress replica serves any
-- session.
CREATE TABLE longshore.ui_sessions (
    id_sha256    text PRIMARY KEY,
    token_sha256 text NOT NULL,
    csrf         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX ui_sessions_expires_idx ON longshore.ui_sessions (expires_at);
