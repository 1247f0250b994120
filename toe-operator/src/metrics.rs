//! Prometheus metrics of the operator, in the OpenMetrics text format (prometheus-client).

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    /// `Validated`, or the reason of a rejection (`InvalidArgument`, ...).
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    /// Admission decisions written into a status (not repeated for an unchanged decision).
    pub decisions: Family<Decision, Counter>,
    pub webhook_requests: Family<Decision, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("toe_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let decisions = Family::<Decision, Counter>::default();
        let webhook_requests = Family::<Decision, Counter>::default();
        registry.register(
            "reconciles",
            "PowerTool reconciliations",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "PowerTool reconciliations that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "decisions",
            "Admission decisions written to PowerTool status",
            decisions.clone(),
        );
        registry.register(
            "webhook_requests",
            "Admission webhook requests by decision",
            webhook_requests.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            decisions,
            webhook_requests,
        }
    }
}

impl Metrics {
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
