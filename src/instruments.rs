//! Prometheus counters and histograms of the service, rendered at `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub tasks_created: IntCounter,
    pub task_outcomes: IntCounterVec,
    pub assignments: IntCounter,
    pub dispatch: IntCounterVec,
    pub job_runs: IntCounterVec,
    /// Evaluations of a capability contract against a payload, by site.
    pub contract_evaluations: IntCounterVec,
    pub job_duration: HistogramVec,
    pub tasks_by_status: IntGaugeVec,
    pub droplets_by_status: IntGaugeVec,
    pub ws_connections: IntGaugeVec,
    pub pool: IntGaugeVec,
    /// Pending tasks per limited key, the rest as `other` (a bounded label set).
    pub queue_depth: IntGaugeVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    // The names and labels are constants: registering them cannot fail.
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("orchestrator".into()), None).expect("valid prefix");
        let tasks_created =
            IntCounter::new("tasks_created_total", "Tasks created").expect("valid metric");
        r.register(Box::new(tasks_created.clone()))
            .expect("unique metric");
        let assignments = IntCounter::new("task_assignments_total", "Tasks assigned by the router")
            .expect("valid metric");
        r.register(Box::new(assignments.clone()))
            .expect("unique metric");
        Metrics {
            http_requests: counter_vec(
                &r,
                "http_requests_total",
                "HTTP requests by route and status",
                &["method", "route", "status"],
            ),
            http_latency: histogram_vec(
                &r,
                "http_request_duration_seconds",
                "HTTP request latency by route",
                &["method", "route"],
            ),
            tasks_created,
            task_outcomes: counter_vec(
                &r,
                "task_outcomes_total",
                "Tasks that ended, by outcome",
                &["outcome"],
            ),
            assignments,
            dispatch: counter_vec(
                &r,
                "dispatch_total",
                "Deliveries to droplets by outcome",
                &["outcome"],
            ),
            job_runs: counter_vec(
                &r,
                "job_runs_total",
                "Background job runs by outcome",
                &["job", "outcome"],
            ),
            contract_evaluations: counter_vec(
                &r,
                "contract_evaluations_total",
                "Capability contracts evaluated against a payload, by site (creation, routing, explain)",
                &["site"],
            ),
            job_duration: histogram_vec(
                &r,
                "job_duration_seconds",
                "Background job run time",
                &["job"],
            ),
            tasks_by_status: gauge_vec(&r, "tasks", "Tasks by status", &["status"]),
            droplets_by_status: gauge_vec(&r, "droplets", "Droplets by status", &["status"]),
            ws_connections: gauge_vec(
                &r,
                "websocket_connections",
                "Open WebSocket connections by feed",
                &["feed"],
            ),
            pool: gauge_vec(
                &r,
                "db_pool_connections",
                "Database pool connections",
                &["state"],
            ),
            queue_depth: gauge_vec(
                &r,
                "queue_depth",
                "Pending tasks per key with limits; every other key summed as key=\"other\"",
                &["key"],
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
