//! Every error the ingress can answer, as `(HTTP status, machine code)`. The OpenAPI
//! document and docs/ingress.md list exactly these (a test checks both, and that no code
//! in the source is missing here); [`super::ApiError::new`] refuses, in debug builds,
//! a pair that is not listed.

/// Every `(HTTP status, machine code)` the ingress answers with.
pub const ERRORS: &[(u16, &str)] = &[
    (400, "invalid_json"),
    (400, "bad_request"),
    (400, "missing_delivery_id"),
    (401, "missing_token"),
    (401, "invalid_token"),
    (401, "token_revoked"),
    (401, "missing_signature"),
    (401, "invalid_signature"),
    (401, "missing_timestamp"),
    (401, "stale_timestamp"),
    (403, "queue_forbidden"),
    (403, "scope_forbidden"),
    (404, "not_found"),
    (404, "unknown_queue"),
    (404, "unknown_job"),
    (404, "unknown_view"),
    (405, "method_not_allowed"),
    (408, "request_timeout"),
    (409, "idempotency_conflict"),
    (413, "body_too_large"),
    (422, "invalid_args"),
    (422, "invalid_options"),
    (422, "invalid_idempotency_key"),
    (422, "invalid_batch"),
    (422, "empty_batch"),
    (422, "bulk_not_applicable"),
    (429, "rate_limited"),
    (500, "internal"),
    (503, "database_unavailable"),
];

/// Whether `(status, code)` is a documented error.
pub fn is_known(status: u16, code: &str) -> bool {
    ERRORS.iter().any(|(s, c)| *s == status && *c == code)
}
