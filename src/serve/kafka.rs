//! Kafka clients for the worker: the consumer-group context (rebalance handling, commit results,
//! lag statistics) and the client configurations (idempotent producer with acks=all, manual
//! commits, bounded prefetch). Properties from config pass straight through, for SASL/SSL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::serve::admin::Health;
use crate::serve::offsets::{OffsetTracker, Tp};
use crate::serve::telemetry::{LagTable, Metrics};

/// The consumer's context: runs inside librdkafka's poll, on the intake thread.
pub struct WorkerContext {
    pub tracker: Arc<OffsetTracker>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub lag: LagTable,
    /// How long a revocation waits for in-flight events of the revoked partitions.
    pub revoke_drain: Duration,
    /// Set on every assignment, so a paused consumer pauses its new partitions too.
    pub assignment_changed: AtomicBool,
}

pub fn tps(list: &TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

pub fn offsets_list(offsets: &[(Tp, i64)]) -> TopicPartitionList {
    let mut l = TopicPartitionList::new();
    for ((topic, partition), o) in offsets {
        // Offsets come from the tracker and are valid; a failure here would be a bug.
        l.add_partition_offset(topic, *partition, Offset::Offset(*o))
            .expect("valid offset");
    }
    l
}

impl WorkerContext {
    /// Commits synchronously; on failure the offsets go back to the tracker.
    pub fn commit_now<C: Consumer<Self>>(&self, consumer: &C, offsets: Vec<(Tp, i64)>) -> bool
    where
        Self: Sized,
    {
        if offsets.is_empty() {
            return true;
        }
        match consumer.commit(&offsets_list(&offsets), CommitMode::Sync) {
            Ok(()) => {
                self.metrics
                    .commits
                    .add(1, &[KeyValue::new("result", "ok")]);
                true
            }
            Err(e) => {
                self.metrics
                    .commits
                    .add(1, &[KeyValue::new("result", "error")]);
                tracing::warn!(error = %e, "offset commit failed; will retry");
                self.tracker.uncommit(&offsets);
                false
            }
        }
    }
}

impl ClientContext for WorkerContext {
    fn stats(&self, stats: Statistics) {
        let mut lag = self.lag.lock().expect("lag lock");
        lag.clear();
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" bucket; -1 lag: unknown.
                if partition >= 0 && p.consumer_lag >= 0 {
                    lag.insert((topic.clone(), partition), p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = tps(list);
            // Stop taking events for them, let in-flight ones finish (bounded), commit what is
            // done; whatever is still in flight is screened again by the new owner.
            self.tracker.revoke(&revoked);
            let left = self.tracker.wait_idle(Some(&revoked), self.revoke_drain);
            let done = self.tracker.take_committable(Some(&revoked));
            let committed = done.len();
            self.commit_now(consumer, done);
            tracing::info!(
                partitions = revoked.len(),
                committed,
                abandoned = left,
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned = tps(list);
                self.tracker.assign(&assigned);
                self.health
                    .assigned
                    .store(!assigned.is_empty(), Ordering::Relaxed);
                self.assignment_changed.store(true, Ordering::Relaxed);
                tracing::info!(
                    partitions = ?assigned.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
                    "partitions assigned"
                );
            }
            Rebalance::Revoke(list) => {
                self.tracker.remove(&tps(list));
                self.health.assigned.store(false, Ordering::Relaxed);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // Only asynchronous commits report here.
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .commits
            .add(1, &[KeyValue::new("result", label)]);
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            let back: Vec<(Tp, i64)> = offsets
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect();
            self.tracker.uncommit(&back);
        }
    }
}

fn base(cfg: &KafkaConfig, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// Consumer: manual commits only (offsets are stored and committed by the worker), bounded
/// prefetch so a paused or slow worker holds little, statistics for lag.
pub fn consumer_config(cfg: &KafkaConfig, extra: &[(String, String)]) -> ClientConfig {
    let mut c = base(cfg, &[]);
    c.set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            cfg.heartbeat_interval_ms.to_string(),
        )
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "10000")
        .set("statistics.interval.ms", "5000");
    for (k, v) in cfg
        .consumer_properties
        .iter()
        .chain(extra.iter().map(|(k, v)| (k, v)))
    {
        c.set(k, v);
    }
    c
}

/// Producer: idempotent, acks=all, so a retried record is written once and in order per key.
pub fn producer_config(cfg: &KafkaConfig, extra: &[(String, String)]) -> ClientConfig {
    let mut c = base(cfg, &[]);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string());
    for (k, v) in cfg
        .producer_properties
        .iter()
        .chain(extra.iter().map(|(k, v)| (k, v)))
    {
        c.set(k, v);
    }
    c
}
