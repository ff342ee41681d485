//! `/metrics` in Prometheus text format: the gateway's own requests (count
//! and latency by route and status), and the database's state read at
//! scrape time (outbox, worker, messages per trigger).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    ingested: Family<Labels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let ingested = Family::<Labels, Counter>::default();
        registry.register(
            "nudge_gateway_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "nudge_gateway_request_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "nudge_gateway_events",
            "Events and reports by source and outcome (stored, replayed, ignored)",
            ingested.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            ingested,
        }
    }

    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("route".into(), route.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route".into(), route.into())])
            .observe(seconds);
    }

    pub fn counted(&self, source: &str, outcome: &str, n: usize) {
        if n > 0 {
            self.ingested
                .get_or_create(&vec![
                    ("source".into(), source.into()),
                    ("outcome".into(), outcome.into()),
                ])
                .inc_by(n as u64);
        }
    }

    /// The gateway's metrics, then the database's (gauges read just now).
    pub fn render(&self, db: &[(&'static str, &'static str, Labels, f64)]) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        let mut scraped = Registry::default();
        let mut families: Vec<(&str, Family<Labels, Gauge<f64, AtomicU64>>)> = Vec::new();
        for (name, help, labels, value) in db {
            let family = match families.iter().find(|(n, _)| n == name) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
                    scraped.register(*name, *help, f.clone());
                    families.push((name, f.clone()));
                    f
                }
            };
            family.get_or_create(labels).set(*value);
        }
        let mut db_text = String::new();
        encode(&mut db_text, &scraped).expect("writing to a String");
        // one exposition: a single # EOF, at the end
        out.truncate(out.trim_end().strip_suffix("# EOF").unwrap_or(&out).len());
        out.push_str(&db_text);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_exposition_with_both_parts() {
        let m = Metrics::new();
        m.request("/v1/batch", 200, 0.004);
        m.counted("segment", "stored", 3);
        let text = m.render(&[(
            "nudge_outbox_messages",
            "by status",
            vec![("status".into(), "pending".into())],
            2.0,
        )]);
        assert!(
            text.contains("nudge_gateway_requests_total{route=\"/v1/batch\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nudge_gateway_events_total{source=\"segment\",outcome=\"stored\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("nudge_outbox_messages{status=\"pending\"} 2"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
