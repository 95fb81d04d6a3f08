//! The registry of job kinds: each kind registered once, looked up by queue name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use serde_json::Value;

use crate::job::{Handler, JobArgs, JobContext, Outcome};
use crate::queue_name::QueueName;

/// A handler with its args type erased, so the runtime can hold many kinds.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call<'a>(&'a self, args: Value, ctx: &'a mut JobContext) -> BoxFuture<'a, Outcome>;
    fn validate(&self, args: &Value) -> Result<(), String>;
    fn public(&self) -> bool;
    fn pooler_safe(&self) -> bool;
}

struct Typed<H> {
    handler: H,
    /// Set once this kind has logged that it ignored unknown fields.
    warned: AtomicBool,
}

/// Job args are always a JSON object. (serde's derive would also accept an array in
/// field order, which no producer means.) Returns the args and the paths of fields the
/// kind does not know.
fn parse<A: JobArgs>(args: Value) -> Result<(A, Vec<String>), String> {
    if !args.is_object() {
        return Err(format!(
            "invalid args for {}: expected a JSON object",
            A::KIND
        ));
    }
    let mut unknown = Vec::new();
    // serde_ignored writes an Option's level as `?`; people know the path without it.
    let a = serde_ignored::deserialize(args, |path| {
        let p = path.to_string();
        unknown.push(
            p.split('.')
                .filter(|s| *s != "?")
                .collect::<Vec<_>>()
                .join("."),
        )
    })
    .map_err(|e| format!("invalid args for {}: {e}", A::KIND))?;
    Ok((a, unknown))
}

/// At the door (ingress, CLI, schedules): an unknown field is an error, so a typo never
/// passes silently.
fn parse_strict<A: JobArgs>(args: Value) -> Result<A, String> {
    let (a, unknown) = parse::<A>(args)?;
    match unknown.first().filter(|_| A::STRICT) {
        None => Ok(a),
        Some(f) => Err(format!("invalid args for {}: unknown field `{f}`", A::KIND)),
    }
}

impl<H: Handler> ErasedHandler for Typed<H> {
    /// In the worker, unknown fields are ignored (logged once per kind): during a rolling
    /// deploy a producer may already send a field this worker's build does not know,
    /// and its jobs must not be dead-lettered for it. Args that do not fit the kind
    /// otherwise are a `Fail`.
    fn call<'a>(&'a self, args: Value, ctx: &'a mut JobContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let args: H::Args = match parse(args) {
                Ok((a, _)) if let Err(e) = self.handler.check(&a) => {
                    return Outcome::Fail(format!("invalid args for {}: {e}", H::Args::KIND));
                }
                Ok((a, unknown)) => {
                    if !unknown.is_empty() && !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            kind = H::Args::KIND,
                            fields = ?unknown,
                            "args carry fields this build does not know; ignoring them (a newer producer?). Logged once per kind."
                        );
                    }
                    a
                }
                Err(e) => return Outcome::Fail(e),
            };
            match self.handler.handle(args, ctx).await {
                Ok(o) => o,
                Err(e) => e.into(),
            }
        })
    }

    fn validate(&self, args: &Value) -> Result<(), String> {
        let a = parse_strict::<H::Args>(args.clone())?;
        self.handler
            .check(&a)
            .map_err(|e| format!("invalid args for {}: {e}", H::Args::KIND))
    }

    fn public(&self) -> bool {
        H::Args::PUBLIC
    }

    fn pooler_safe(&self) -> bool {
        H::POOLER_SAFE
    }
}

/// Every job kind the process knows, by queue name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedHandler>>,
    /// Routes the pipelines add to the ingress.
    text_routes: Vec<crate::ingress::TextRoute>,
    /// Read-only pages the pipelines add to the admin API and the console.
    admin_views: Vec<AdminView>,
}

/// One table of an [`AdminView`]: a title, column names, rows of JSON values.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewSection {
    /// What the table shows.
    pub title: String,
    /// Column names.
    pub columns: Vec<String>,
    /// One array per row, as many values as columns.
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// What an [`AdminView`] is asked for: a window of time back from now (the
/// `?window=` of the request, `24h` when not given).
#[derive(Debug, Clone, Copy)]
pub struct ViewParams {
    /// How far back.
    pub window: std::time::Duration,
}

/// Reads an [`AdminView`]'s tables; bounded by the caller's statement deadline.
pub type ViewFn =
    for<'c> fn(
        &'c mut sqlx::PgConnection,
        ViewParams,
    ) -> futures::future::BoxFuture<'c, Result<Vec<ViewSection>, sqlx::Error>>;

/// A pipeline's read-only page for operators (chat credits, billing): served as
/// `GET /v1/admin/views/{name}` to `admin:read` tokens and shown in the console. Its
/// reads must stay bounded on big tables (indexed windows, capped counts).
#[derive(Clone, Copy)]
pub struct AdminView {
    /// Its name in the path (`[a-z_]+`).
    pub name: &'static str,
    /// Its title in the console.
    pub title: &'static str,
    /// Reads it.
    pub read: ViewFn,
    /// Shown on the errors page (and in `GET /v1/admin/errors`) rather than as a page
    /// of its own: a pipeline's failures (failed LLM attempts).
    pub errors: bool,
}

impl Registry {
    /// An empty registry; add kinds with `register`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a handler under its args' `KIND`.
    ///
    /// # Panics
    /// If the kind is not a valid queue name or is registered twice: both are
    /// programming errors found at start-up.
    pub fn register<H: Handler>(self, handler: H) -> Self {
        self.register_as(H::Args::KIND, handler)
    }

    /// Registers a handler under another queue name than its args' `KIND` (the
    /// benchmark's many synthetic queues of one kind). Panics as [`Registry::register`].
    pub fn register_as<H: Handler>(mut self, kind: &'static str, handler: H) -> Self {
        if let Err(e) = QueueName::parse(kind) {
            panic!("job kind {kind:?} is not a valid queue name: {e}");
        }
        let prev = self.kinds.insert(
            kind,
            Arc::new(Typed {
                handler,
                warned: AtomicBool::new(false),
            }),
        );
        assert!(prev.is_none(), "job kind {kind:?} registered twice");
        self
    }

    /// Adds a route to the ingress: a text body that becomes one job of `route.queue`
    /// (see [`crate::ingress::TextRoute`]).
    ///
    /// # Panics
    /// If the path is taken by another text route (a programming error found at
    /// start-up). That the queue is registered and the path is not the runtime's is
    /// checked by [`crate::ingress::check_config`].
    pub fn text_route(mut self, route: crate::ingress::TextRoute) -> Self {
        assert!(
            self.text_routes.iter().all(|r| r.path != route.path),
            "text route {} registered twice",
            route.path
        );
        self.text_routes.push(route);
        self
    }

    /// The routes the pipelines add to the ingress.
    pub fn text_routes(&self) -> &[crate::ingress::TextRoute] {
        &self.text_routes
    }

    /// Adds a read-only admin page (see [`AdminView`]).
    ///
    /// # Panics
    /// If the name is not `[a-z_]+` or is taken: programming errors found at start-up.
    pub fn admin_view(mut self, view: AdminView) -> Self {
        assert!(
            !view.name.is_empty()
                && view
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
            "admin view name {:?} must be [a-z_]+",
            view.name
        );
        assert!(
            self.admin_views.iter().all(|v| v.name != view.name),
            "admin view {} registered twice",
            view.name
        );
        self.admin_views.push(view);
        self
    }

    /// The pipelines' admin pages.
    pub fn admin_views(&self) -> &[AdminView] {
        &self.admin_views
    }

    /// The registered kinds (each a queue).
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Whether `kind` is registered and may be enqueued and read over HTTP.
    pub fn is_public(&self, kind: &str) -> bool {
        self.kinds.get(kind).is_some_and(|h| h.public())
    }

    /// Whether `kind`'s handler says it runs every statement in a transaction
    /// ([`crate::Handler::POOLER_SAFE`]).
    pub fn pooler_safe(&self, kind: &str) -> bool {
        self.kinds.get(kind).is_some_and(|h| h.pooler_safe())
    }

    /// Checks JSON args against the kind's args type without enqueuing.
    pub fn validate(&self, kind: &str, args: &Value) -> Result<(), String> {
        match self.kinds.get(kind) {
            Some(h) => h.validate(args),
            None => Err(format!("unknown job kind {kind:?}")),
        }
    }

    pub(crate) fn get(&self, kind: &str) -> Option<(&'static str, Arc<dyn ErasedHandler>)> {
        self.kinds.get_key_value(kind).map(|(k, h)| (*k, h.clone()))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::job::JobError;

    #[derive(Serialize, Deserialize)]
    struct Args {
        id: i64,
        #[serde(default)]
        inner: Option<Inner>,
    }
    #[derive(Serialize, Deserialize)]
    struct Inner {
        x: i64,
    }
    impl JobArgs for Args {
        const KIND: &'static str = "kind_a";
    }
    struct H;
    impl Handler for H {
        type Args = Args;
        async fn handle(&self, _a: Args, _c: &mut JobContext) -> Result<Outcome, JobError> {
            Outcome::done()
        }
    }

    #[test]
    fn the_door_refuses_unknown_fields_at_any_depth() {
        let r = Registry::new().register(H);
        assert!(r.validate("kind_a", &json!({"id": 1})).is_ok());
        let e = r
            .validate("kind_a", &json!({"id": 1, "zz": 2}))
            .unwrap_err();
        assert!(e.contains("unknown field `zz`"), "{e}");
        let e = r
            .validate("kind_a", &json!({"id": 1, "inner": {"x": 1, "y": 2}}))
            .unwrap_err();
        assert!(e.contains("unknown field `inner.y`"), "{e}");
        let e = r.validate("kind_a", &json!({"id": "one"})).unwrap_err();
        assert!(e.contains("invalid args for kind_a"), "{e}");
        assert!(
            r.validate("kind_a", &json!([1])).is_err(),
            "arrays are not args"
        );
    }

    #[derive(Serialize, Deserialize)]
    struct Long;
    impl JobArgs for Long {
        // 48 characters: one more than pgmq allows.
        const KIND: &'static str = "a_kind_name_that_is_exactly_forty_eight_chars_xx";
    }
    struct LongH;
    impl Handler for LongH {
        type Args = Long;
        async fn handle(&self, _a: Long, _c: &mut JobContext) -> Result<Outcome, JobError> {
            Outcome::done()
        }
    }

    #[test]
    #[should_panic(expected = "longer than 47 characters")]
    fn a_kind_longer_than_pgmq_allows_is_refused_at_registration() {
        assert_eq!(Long::KIND.len(), 48);
        let _ = Registry::new().register(LongH);
    }
}
