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
    /// Commits `offsets`; on failure they go back to the tracker and are committed again later.
    /// Asynchronous commits report success in `commit_callback`.
    pub fn commit<C: Consumer<Self>>(&self, consumer: &C, offsets: Vec<(Tp, i64)>, mode: CommitMode)
    where
        Self: Sized,
    {
        if offsets.is_empty() {
            return;
        }
        match consumer.commit(&offsets_list(&offsets), mode) {
            Ok(()) if matches!(mode, CommitMode::Sync) => self.commit_result(Ok(()), &offsets),
            Ok(()) => {}
            Err(e) => self.commit_result(Err(e), &offsets),
        }
    }

    /// Counts a commit's result; a failed one goes back to the tracker.
    fn commit_result(&self, result: KafkaResult<()>, offsets: &[(Tp, i64)]) {
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .commits
            .add(1, &[KeyValue::new("result", label)]);
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            self.tracker.uncommit(offsets);
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
            self.commit(consumer, done, CommitMode::Sync);
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
        let offsets: Vec<(Tp, i64)> = offsets
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                _ => None,
            })
            .collect();
        self.commit_result(result, &offsets);
    }
}

/// The brokers, the shared properties, then the client's own defaults, its properties from
/// config and the CLI's (later settings win).
fn client_config<'a>(
    cfg: &'a KafkaConfig,
    defaults: &[(&str, String)],
    own: impl Iterator<Item = (&'a String, &'a String)>,
    extra: &'a [(String, String)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    for (k, v) in defaults {
        c.set(*k, v);
    }
    for (k, v) in own.chain(extra.iter().map(|(k, v)| (k, v))) {
        c.set(k, v);
    }
    c
}

/// Consumer: manual commits only (offsets are stored and committed by the worker), bounded
/// prefetch so a paused or slow worker holds little, statistics for lag.
pub fn consumer_config(cfg: &KafkaConfig, extra: &[(String, String)]) -> ClientConfig {
    let defaults = [
        ("group.id", cfg.group.clone()),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        ("session.timeout.ms", cfg.session_timeout_ms.to_string()),
        (
            "heartbeat.interval.ms",
            cfg.heartbeat_interval_ms.to_string(),
        ),
        ("queued.max.messages.kbytes", "16384".into()),
        ("queued.min.messages", "10000".into()),
        ("statistics.interval.ms", "5000".into()),
    ];
    client_config(cfg, &defaults, cfg.consumer_properties.iter(), extra)
}

/// Producer: idempotent, acks=all, so a retried record is written once and in order per key.
pub fn producer_config(cfg: &KafkaConfig, extra: &[(String, String)]) -> ClientConfig {
    let defaults = [
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("linger.ms", "5".into()),
        ("message.timeout.ms", cfg.message_timeout_ms.to_string()),
    ];
    client_config(cfg, &defaults, cfg.producer_properties.iter(), extra)
}
