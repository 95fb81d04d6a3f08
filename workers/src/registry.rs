//! The registry of job kinds: each kind registered once, looked up by queue name.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::job::{Handler, JobArgs, JobContext, Outcome};
use crate::queue_name::QueueName;

/// A handler with its args type erased, so the runtime can hold many kinds.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call<'a>(&'a self, args: Value, ctx: &'a mut JobContext) -> BoxFuture<'a, Outcome>;
    fn validate(&self, args: &Value) -> Result<(), String>;
}

struct Typed<H>(H);

/// Job args are always a JSON object. (serde's derive would also accept an array in
/// field order, which no producer means.)
fn parse<A: JobArgs>(args: Value) -> Result<A, String> {
    if !args.is_object() {
        return Err(format!(
            "invalid args for {}: expected a JSON object",
            A::KIND
        ));
    }
    serde_json::from_value(args).map_err(|e| format!("invalid args for {}: {e}", A::KIND))
}

impl<H: Handler> ErasedHandler for Typed<H> {
    fn call<'a>(&'a self, args: Value, ctx: &'a mut JobContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let args: H::Args = match parse(args) {
                Ok(a) => a,
                Err(e) => return Outcome::Fail(e),
            };
            match self.0.handle(args, ctx).await {
                Ok(o) => o,
                Err(e) => e.into(),
            }
        })
    }

    fn validate(&self, args: &Value) -> Result<(), String> {
        parse::<H::Args>(args.clone()).map(|_| ())
    }
}

/// Every job kind the process knows, by queue name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedHandler>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a handler under its args' `KIND`.
    ///
    /// # Panics
    /// If the kind is not a valid queue name or is registered twice: both are
    /// programming errors found at start-up.
    pub fn register<H: Handler>(mut self, handler: H) -> Self {
        let kind = H::Args::KIND;
        if let Err(e) = QueueName::parse(kind) {
            panic!("job kind {kind:?} is not a valid queue name: {e}");
        }
        let prev = self.kinds.insert(kind, Arc::new(Typed(handler)));
        assert!(prev.is_none(), "job kind {kind:?} registered twice");
        self
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
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
