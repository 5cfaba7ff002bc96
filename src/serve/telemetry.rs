//! OpenTelemetry for the worker: one meter provider feeds both the Prometheus registry behind
//! `/metrics` and, when an endpoint is configured, an OTLP/HTTP exporter; one tracer provider
//! makes a span per batch and per event (exported by OTLP when configured; otherwise the spans
//! still carry trace ids into the outputs and audit records).
//!
//! Labels are bounded sets (label, category, action, reason, topic, partition): never query text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;
use crate::error::{Error, Result};
use crate::serve::offsets::Tp;

/// Consumer lag per partition, as librdkafka's statistics report it.
pub type LagTable = Arc<Mutex<HashMap<Tp, i64>>>;

pub struct Metrics {
    pub events_in: Counter<u64>,
    pub verdicts: Counter<u64>,
    pub dead_letters: Counter<u64>,
    pub batch_events: Histogram<u64>,
    pub engine_batch_size: Histogram<u64>,
    pub engine_batch_tokens: Histogram<u64>,
    pub inference_seconds: Histogram<f64>,
    pub end_to_end_seconds: Histogram<f64>,
    pub cache_hits: Counter<u64>,
    pub cache_misses: Counter<u64>,
    pub second_opinions: Counter<u64>,
    pub redis_errors: Counter<u64>,
    pub commits: Counter<u64>,
    pub publish_retries: Counter<u64>,
    pub pauses: Counter<u64>,
}

pub struct Telemetry {
    pub registry: prometheus::Registry,
    pub metrics: Arc<Metrics>,
    pub tracer: SdkTracer,
    meter_provider: SdkMeterProvider,
    tracer_provider: SdkTracerProvider,
    meter: Meter,
}

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
const TOKENS: &[f64] = &[
    16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

impl Telemetry {
    pub fn start(cfg: &TelemetryConfig) -> Result<Self> {
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build();
        let registry = prometheus::Registry::new();
        let prom = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| Error::Serve(format!("prometheus exporter: {e}")))?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prom);
        let mut tracers = SdkTracerProvider::builder().with_resource(resource);
        if !cfg.otlp_endpoint.is_empty() {
            let base = cfg.otlp_endpoint.trim_end_matches('/');
            let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(format!("{base}/v1/metrics"))
                .build()
                .map_err(|e| Error::Serve(format!("OTLP metrics exporter: {e}")))?;
            meters = meters.with_reader(
                PeriodicReader::builder(metric_exporter)
                    .with_interval(Duration::from_secs(10))
                    .build(),
            );
            let span_exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{base}/v1/traces"))
                .build()
                .map_err(|e| Error::Serve(format!("OTLP span exporter: {e}")))?;
            tracers = tracers.with_batch_exporter(span_exporter);
        }
        let meter_provider = meters.build();
        let tracer_provider = tracers.build();
        let meter = meter_provider.meter("guardian");
        let tracer = tracer_provider.tracer("guardian");
        let metrics = Arc::new(Metrics::new(&meter));
        Ok(Self {
            registry,
            metrics,
            tracer,
            meter_provider,
            tracer_provider,
            meter,
        })
    }

    /// Registers gauges read at collection time.
    pub fn observe_gauges(
        &self,
        lag: LagTable,
        in_flight: impl Fn() -> u64 + Send + Sync + 'static,
        redis_up: impl Fn() -> Option<bool> + Send + Sync + 'static,
    ) {
        // The instruments live as long as the provider; the handles need not be kept.
        let _ = self
            .meter
            .i64_observable_gauge("guardian.consumer.lag")
            .with_description("Messages behind the partition's high watermark")
            .with_callback(move |o| {
                for ((topic, partition), l) in lag.lock().expect("lag lock").iter() {
                    o.observe(
                        *l,
                        &[
                            KeyValue::new("topic", topic.clone()),
                            KeyValue::new("partition", i64::from(*partition)),
                        ],
                    );
                }
            })
            .build();
        let _ = self
            .meter
            .u64_observable_gauge("guardian.in_flight")
            .with_description("Events taken from Kafka and not yet published and acknowledged")
            .with_callback(move |o| o.observe(in_flight(), &[]))
            .build();
        let _ = self
            .meter
            .u64_observable_gauge("guardian.redis.up")
            .with_description("1 while the shared Redis cache answers, 0 while it does not")
            .with_callback(move |o| {
                if let Some(up) = redis_up() {
                    o.observe(u64::from(up), &[]);
                }
            })
            .build();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render_prometheus(&self) -> String {
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = prometheus::Encoder::encode(&encoder, &self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Flushes exporters; called once at exit.
    pub fn shutdown(&self) {
        let _ = self.tracer_provider.force_flush();
        let _ = self.meter_provider.force_flush();
        let _ = self.tracer_provider.shutdown();
        let _ = self.meter_provider.shutdown();
    }
}

impl Metrics {
    fn new(m: &Meter) -> Self {
        let counter = |name: &'static str, help: &'static str| {
            m.u64_counter(name).with_description(help).build()
        };
        let seconds = |name: &'static str, help: &'static str| {
            m.f64_histogram(name)
                .with_description(help)
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .build()
        };
        let sizes = |name: &'static str, help: &'static str, b: &[f64]| {
            m.u64_histogram(name)
                .with_description(help)
                .with_boundaries(b.to_vec())
                .build()
        };
        Self {
            events_in: counter("guardian.events.in", "Events received from the input topic"),
            verdicts: counter(
                "guardian.verdicts",
                "Verdicts published, by label, category and action",
            ),
            dead_letters: counter(
                "guardian.dead_letters",
                "Dead-letter records published, by reason",
            ),
            batch_events: sizes(
                "guardian.batch.events",
                "Events per consumer micro-batch",
                COUNTS,
            ),
            engine_batch_size: sizes(
                "guardian.engine.batch.size",
                "Queries per encoder forward pass",
                COUNTS,
            ),
            engine_batch_tokens: sizes(
                "guardian.engine.batch.tokens",
                "Tokens per encoder forward pass",
                TOKENS,
            ),
            inference_seconds: seconds(
                "guardian.inference.duration",
                "Time of one encoder forward pass",
            ),
            end_to_end_seconds: seconds(
                "guardian.end_to_end.duration",
                "From receiving an event to its outputs being acknowledged",
            ),
            cache_hits: counter(
                "guardian.cache.hits",
                "Verdicts served from a cache, by tier",
            ),
            cache_misses: counter(
                "guardian.cache.misses",
                "Queries that had to be screened by the model",
            ),
            second_opinions: counter(
                "guardian.second_opinions",
                "Queries re-scored by the second opinion (model.second_opinion)",
            ),
            redis_errors: counter(
                "guardian.redis.errors",
                "Failed or timed-out Redis calls, by operation",
            ),
            commits: counter("guardian.commits", "Offset commits, by result"),
            publish_retries: counter(
                "guardian.publish.retries",
                "Batches whose records had to be published again",
            ),
            pauses: counter(
                "guardian.consumer.pauses",
                "Times the consumer paused its partitions for backpressure",
            ),
        }
    }
}
