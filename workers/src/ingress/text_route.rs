//! Routes a pipeline adds to the ingress without the runtime knowing the pipeline: a
//! text body, posted by a token that holds the route's scope, becomes one job of the
//! route's queue. The pipeline turns the text into args ([`TextRoute::to_args`]); the
//! ingress does everything else as for any enqueue (authentication, the body limit and
//! read timeout, args validation, the database deadline, the 202 answer) and serves the
//! route's OpenAPI path item in `/openapi.json`.

use serde_json::Value;

/// Who is posting, as far as a text route needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// `ingress.tokens[].customers`: the only customers this token may post for, if
    /// restricted.
    pub customers: Option<&'a [i64]>,
}

/// Why a text body makes no job. Each is an ingress error of its own code, so a
/// route adds no code the runtime does not document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 422 `empty_batch`: the body holds nothing to enqueue.
    Empty(String),
    /// 422 `invalid_args`: the body cannot be made into args.
    Invalid(String),
}

/// A text route (see the module docs).
#[derive(Clone)]
pub struct TextRoute {
    /// The path, e.g. `/v1/logs`; `POST` only.
    pub path: &'static str,
    /// The scope a token needs (`ingress.tokens[].scopes`).
    pub scope: &'static str,
    /// The queue (job kind) the job goes to; a registered kind.
    pub queue: &'static str,
    /// The body, as text (bytes that are not UTF-8, and NUL, already U+FFFD), into
    /// the job's args.
    pub to_args: fn(text: &str, caller: Caller<'_>) -> Result<Value, Refusal>,
    /// The route's OpenAPI path item, as JSON.
    pub openapi: &'static str,
}

impl std::fmt::Debug for TextRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextRoute")
            .field("path", &self.path)
            .field("scope", &self.scope)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The OpenAPI document served at `/openapi.json`: the runtime's ([`super::OPENAPI`])
/// with each text route's path item added.
pub fn openapi_document(routes: &[TextRoute]) -> Value {
    let mut doc: Value =
        serde_json::from_str(super::OPENAPI).expect("the OpenAPI document is JSON");
    for r in routes {
        let item: Value = serde_json::from_str(r.openapi)
            .unwrap_or_else(|e| panic!("the OpenAPI path item of {} is not JSON: {e}", r.path));
        doc["paths"][r.path] = item;
    }
    doc
}
