//! End to end through `guardian serve`: the real release binary and model, a Kafka-protocol
//! broker on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (`bash ops/services.sh up`). Every test
//! has its own topics, consumer group and Redis key prefix, so tests run in parallel and never
//! see records or cache entries of another test or of an earlier run.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use common::kafka::{
    corpus, free_port, missing, produce, produce_paced, producer, redis_keys, tally, unique,
    Collector, Msg, OtlpSink, RedisServer, Topics, Worker, REDIS_URL,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

fn msgs(ids: &[String], queries: &[String]) -> Vec<Msg> {
    ids.iter()
        .zip(queries)
        .map(|(i, q)| Msg::query(i, q))
        .collect()
}

/// Waits for a verdict per id (at most `timeout`), prints the counts, fails on a missing id.
fn expect_all(out: &Collector, t: &Topics, ids: &[String], timeout: Duration, what: &str) {
    let seen = out.wait_ids(&t.verdict, ids, ids.len(), timeout);
    let (distinct, records) = tally(&out.records(&t.verdict), ids);
    println!(
        "{what}: {distinct} of {} ids have verdicts, {records} verdict records, {} duplicates",
        ids.len(),
        records - distinct
    );
    assert_eq!(
        seen.len(),
        ids.len(),
        "{what}: no verdict within {timeout:?} for {:?}",
        missing(ids, &seen, 20)
    );
}

/// The first verdict of each id.
fn by_id(recs: &[common::kafka::Rec]) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for r in recs {
        if let Some(id) = r.id() {
            m.entry(id).or_insert_with(|| r.value.clone());
        }
    }
    m
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

fn close(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if (x - y).abs() <= 1e-3)
}

#[test]
fn n_events_give_n_verdicts_equal_to_screen() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("equal");
    let out = Collector::start(&t.outputs());
    let queries: Vec<String> = corpus().into_iter().take(200).collect();
    let ids = ids("eq", 200);
    let mut events = msgs(&ids, &queries);
    // Every tenth event carries a W3C trace context: its outputs must continue that trace.
    for (i, m) in events.iter_mut().enumerate().step_by(10) {
        m.traceparent = Some(format!("00-{:032x}-{:016x}-01", 0x5eed_0000 + i, i + 1));
    }
    let mut worker = Worker::start("w", dir.path(), &t, &unique("g"), REDIS_URL, &unique("p"));
    let delivered = produce(&producer(), &t.input, &events);
    expect_all(&out, &t, &ids, secs(90), "200 events");
    let verdicts = out.records(&t.verdict);
    let all: HashSet<String> = verdicts.iter().filter_map(|r| r.id()).collect();
    assert_eq!(
        all,
        ids.iter().cloned().collect(),
        "verdicts for exactly the ids produced"
    );

    // The same JSONL through `guardian screen --no-cache`.
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let lines: Vec<String> = events
        .iter()
        .map(|m| String::from_utf8(m.value.clone()).unwrap())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let o = Command::new(common::bin())
        .args(["screen", "--no-cache", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env("GUARDIAN_HOME", common::home())
        .env("GUARDIAN_DEVICE", "cpu")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected: HashMap<String, Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    let served = by_id(&verdicts);
    for r in &verdicts {
        assert_eq!(r.key, r.id(), "verdicts are keyed by the event id");
        let tp = r.headers.get("traceparent").map_or("", String::as_str);
        assert_eq!(tp.len(), 55, "W3C traceparent header: {tp:?}");
    }
    let mut differing = Vec::new();
    for id in &ids {
        let (v, e) = (&served[id], &expected[id]);
        let same = ["label", "category", "action", "lang"]
            .iter()
            .all(|f| v[f] == e[f])
            && close(&v["scores"]["unsafe"], &e["scores"]["unsafe"])
            && e["scores"]["categories"]
                .as_object()
                .unwrap()
                .iter()
                .all(|(c, p)| close(&v["scores"]["categories"][c], p));
        if !same {
            differing.push(format!("serve {v}\n  screen {e}"));
        }
    }
    println!("verdicts differing from `screen`: {}", differing.len());
    assert!(differing.is_empty(), "{}", differing.join("\n"));

    // Traces continue; one audit record per id, pointing at the event's offset.
    let sent: HashMap<&String, (&Msg, &String, (i32, i64))> = ids
        .iter()
        .zip(events.iter().zip(&queries).zip(delivered))
        .map(|(id, ((m, q), d))| (id, (m, q, d)))
        .collect();
    for r in &verdicts {
        if let Some(tp_in) = &sent[&r.id().unwrap()].0.traceparent {
            assert_eq!(
                &r.headers["traceparent"][3..35],
                &tp_in[3..35],
                "trace id kept"
            );
        }
    }
    let audited = out.wait_ids(&t.audit, &ids, ids.len(), secs(30));
    println!("audit records: {} of {} ids", audited.len(), ids.len());
    assert_eq!(
        audited.len(),
        ids.len(),
        "{:?}",
        missing(&ids, &audited, 20)
    );
    for (id, a) in by_id(&out.records(&t.audit)) {
        let (m, query, (partition, offset)) = sent[&id];
        let src = &a["source"];
        assert_eq!(src["topic"], t.input.as_str(), "{a}");
        assert_eq!(src["partition"], partition, "{a}");
        assert_eq!(src["offset"], offset, "{a}");
        let trace_id = a["trace_id"].as_str().unwrap_or_default();
        assert!(is_hex(trace_id, 32), "{a}");
        if let Some(tp) = &m.traceparent {
            assert_eq!(trace_id, &tp[3..35], "audit trace id kept: {a}");
        }
        let sha = hex::encode(Sha256::digest(query.as_bytes()));
        assert_eq!(a["query_sha256"], sha.as_str(), "{a}");
        assert_eq!(a["verdict"]["label"], served[&id]["label"], "{a}");
    }
    let events_in = worker.metric("guardian_events_in");
    println!("guardian_events_in_total = {events_in}");
    assert!(events_in >= 200.0, "events-in counter: {events_in}");
    let status = worker.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
}

#[test]
fn sigkill_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("sigkill");
    let out = Collector::start(&[&t.verdict]);
    let (group, prefix) = (unique("g"), unique("p"));
    let ids = ids("k", 600);
    let mut a = Worker::start("a", dir.path(), &t, &group, REDIS_URL, &prefix);
    a.wait_assigned();
    // Paced, so the crash lands while events are still arriving and in flight.
    let producing = produce_paced(
        &t.input,
        msgs(&ids, &corpus()),
        25,
        Duration::from_millis(250),
    );
    let before = out.wait_ids(&t.verdict, &ids, 100, secs(120)).len();
    a.kill();
    println!("SIGKILLed worker a after {before} of 600 verdicts");
    assert!(
        before >= 100,
        "worker a screened only {before} events in 120 s"
    );
    assert!(
        before < 600,
        "worker a finished before the crash: not mid-stream"
    );
    let mut b = Worker::start("b", dir.path(), &t, &group, REDIS_URL, &prefix);
    producing.join().expect("producer thread");
    expect_all(&out, &t, &ids, secs(180), "after SIGKILL");
    let status = b.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
}

#[test]
fn two_workers_share_partitions_and_rebalance_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("rebalance");
    let out = Collector::start(&[&t.verdict, &t.audit]);
    let (group, prefix) = (unique("g"), unique("p"));
    let ids = ids("r", 600);
    let mut phase1 = msgs(&ids, &corpus());
    let mut phase2 = phase1.split_off(200);
    let phase3 = phase2.split_off(300);
    let p = producer();
    let mut a = Worker::start("a", dir.path(), &t, &group, REDIS_URL, &prefix);
    a.wait_assigned();
    produce(&p, &t.input, &phase1);
    let first = out.wait_ids(&t.verdict, &ids, 100, secs(120)).len();
    assert!(first >= 100, "worker a alone screened only {first} events");
    // Worker b joins while a works through the second phase.
    let producing = produce_paced(&t.input, phase2, 20, Duration::from_millis(250));
    let mut b = Worker::start("b", dir.path(), &t, &group, REDIS_URL, &prefix);
    b.wait_assigned();
    producing.join().expect("producer thread");
    let a_events = a.metric("guardian_events_in");
    let status = a.stop();
    assert_eq!(status.code(), Some(0), "worker a SIGTERM exit: {status}");
    // Only b is left to screen the last phase.
    produce(&p, &t.input, &phase3);
    expect_all(&out, &t, &ids, secs(180), "two workers, a stopped");
    let b_events = b.metric("guardian_events_in");
    let workers: HashSet<String> = out
        .records(&t.audit)
        .iter()
        .filter_map(|r| r.value["worker"].as_str().map(String::from))
        .collect();
    println!(
        "events in: worker a {a_events}, worker b {b_events}; audit worker names: {workers:?}"
    );
    assert!(a_events > 0.0, "worker a processed nothing");
    assert!(b_events > 0.0, "worker b processed nothing");
    // Audit records name their worker: both must appear.
    assert!(workers.is_empty() || workers.len() == 2, "{workers:?}");
    let status = b.stop();
    assert_eq!(status.code(), Some(0), "worker b SIGTERM exit: {status}");
}

#[test]
fn redis_outage_loses_nothing_and_cache_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("redis-outage");
    let out = Collector::start(&[&t.verdict]);
    let port = free_port();
    let mut redis = RedisServer::start(dir.path(), port);
    let prefix = unique("p");
    let group = unique("g");
    let mut w = Worker::start("w", dir.path(), &t, &group, &redis.url(), &prefix);
    w.wait_assigned();
    let queries: Vec<String> = corpus()[200..250].to_vec();
    let p = producer();
    // Round 1: 50 queries x 3 copies, query by query; Redis dies after the first 17 queries.
    let round1: Vec<(String, String)> = queries
        .iter()
        .enumerate()
        .flat_map(|(i, q)| (0..3).map(move |c| (format!("r1-{i:02}-{c}"), q.clone())))
        .collect();
    let r1_ids: Vec<String> = round1.iter().map(|(i, _)| i.clone()).collect();
    let r1: Vec<Msg> = round1.iter().map(|(i, q)| Msg::query(i, q)).collect();
    produce(&p, &t.input, &r1[..51]);
    let before = out.wait_ids(&t.verdict, &r1_ids, 51, secs(120)).len();
    assert_eq!(before, 51, "verdicts before the outage");
    redis.kill();
    println!("killed redis-server after {before} verdicts");
    produce(&p, &t.input, &r1[51..]);
    expect_all(&out, &t, &r1_ids, secs(120), "round 1, Redis killed");
    let down = w.wait_ready(secs(10), |v| v["redis"] == "down");
    assert_eq!(down["redis"], "down", "/readyz during the outage: {down}");

    // Redis is back (empty) on the same port.
    let _redis = RedisServer::start(dir.path(), port);
    let r2a = ids("r2a-", 50);
    produce(&p, &t.input, &msgs(&r2a, &queries));
    expect_all(&out, &t, &r2a, secs(90), "round 2, first copy");
    let up = w.wait_ready(secs(30), |v| v["redis"] == "up");
    assert_eq!(
        up["redis"], "up",
        "/readyz 30 s after Redis came back: {up}"
    );
    let r2b = ids("r2b-", 50);
    produce(&p, &t.input, &msgs(&r2b, &queries));
    expect_all(&out, &t, &r2b, secs(90), "round 2, second copy");
    let served = by_id(&out.records(&t.verdict));
    let cached = r2b
        .iter()
        .filter(|id| served[*id]["cached"] == true)
        .count();
    println!("round 2 second copy: {cached} of 50 cached");
    assert!(
        cached >= 40,
        "only {cached} of 50 repeats served from cache"
    );
    let errors = w.metric("guardian_redis_errors");
    println!("guardian_redis_errors_total = {errors}");
    assert!(errors > 0.0, "Redis errors not counted");

    // New queries are written to the new Redis: the shared cache works again.
    let fresh: Vec<String> = queries[..10].iter().map(|q| format!("{q} 2")).collect();
    let r3 = ids("r3-", 10);
    produce(&p, &t.input, &msgs(&r3, &fresh));
    expect_all(&out, &t, &r3, secs(90), "round 3, new queries");
    let mut keys = Vec::new();
    for _ in 0..50 {
        keys = redis_keys(&redis.url(), &prefix);
        if !keys.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("keys written to the restarted Redis: {}", keys.len());
    assert!(
        !keys.is_empty(),
        "nothing written to Redis after it came back"
    );

    // A fresh worker (empty memory cache) gets the round-3 queries from the restarted Redis.
    let status = w.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
    let w2 = Worker::start("w2", dir.path(), &t, &group, &redis.url(), &prefix);
    let r4 = ids("r4-", 10);
    produce(&p, &t.input, &msgs(&r4, &fresh));
    expect_all(&out, &t, &r4, secs(90), "round 4, fresh worker");
    let served = by_id(&out.records(&t.verdict));
    let from_redis = r4.iter().filter(|id| served[*id]["cached"] == true).count();
    println!("round 4, fresh worker: {from_redis} of 10 served from Redis");
    assert_eq!(from_redis, 10, "Redis hits after Redis came back");
    assert!(w2.metric("guardian_cache_hits") >= 10.0);
}

#[test]
fn bad_events_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("dlq");
    let out = Collector::start(&t.outputs());
    let w = Worker::start("w", dir.path(), &t, &unique("g"), REDIS_URL, &unique("p"));
    let long: String = "how to bake sourdough bread at home "
        .repeat(150)
        .chars()
        .take(5000)
        .collect();
    let bad = [
        ("invalid_json", Msg::raw("b1", r#"{"id":"b1","query":"#)),
        ("not_an_object", Msg::raw("b2", "[1,2]")),
        ("missing_query", Msg::raw("m1", r#"{"id":"m1"}"#)),
        ("empty_query", Msg::raw("e1", r#"{"id":"e1","query":""}"#)),
        (
            "query_not_string",
            Msg::raw("n1", r#"{"id":"n1","query":5}"#),
        ),
        ("bad_id", Msg::raw("b3", r#"{"id":[1],"query":"hello"}"#)),
        ("invalid_utf8", Msg::raw("b4", b"\xff\xfe bad".to_vec())),
        (
            "unknown_schema_version",
            Msg::raw("s9", r#"{"id":"s9","query":"hello","schema_version":9}"#),
        ),
        ("query_too_long", Msg::query("long1", &long)),
    ];
    let good = ["g1", "g2", "g3"].map(String::from);
    let good_q = ["best pizza near me", "서울 맛집 추천", "how to learn rust"].map(String::from);
    let (reasons, mut events): (Vec<&str>, Vec<Msg>) = bad.into_iter().unzip();
    events.extend(msgs(&good, &good_q));
    let delivered = produce(&producer(), &t.input, &events);
    let screened: Vec<String> = ["g1", "g2", "g3", "long1"].map(String::from).to_vec();
    expect_all(&out, &t, &screened, secs(90), "good and over-long events");
    let found = |recs: &[common::kafka::Rec]| {
        reasons
            .iter()
            .zip(&delivered)
            .filter(|(_, (p, o))| {
                recs.iter().any(|r| {
                    r.value["source"]["partition"] == *p && r.value["source"]["offset"] == *o
                })
            })
            .count()
    };
    out.wait(&t.dlq, secs(60), |r| found(r) == reasons.len());
    let dead = out.records(&t.dlq);
    println!(
        "dead letters: {} records, {} of {} bad events",
        dead.len(),
        found(&dead),
        reasons.len()
    );
    for (reason, (p, o)) in reasons.iter().zip(&delivered) {
        let d = dead
            .iter()
            .find(|r| r.value["source"]["partition"] == *p && r.value["source"]["offset"] == *o)
            .unwrap_or_else(|| panic!("no dead letter for the {reason} event at {p}/{o}"));
        let v = &d.value;
        assert_eq!(v["error"], *reason, "{v}");
        assert_eq!(v["source"]["topic"], t.input.as_str(), "{v}");
        assert!(!v["detail"].as_str().unwrap_or_default().is_empty(), "{v}");
        assert!(!v["raw"].as_str().unwrap_or_default().is_empty(), "{v}");
        assert_eq!(v["screened"], *reason == "query_too_long", "{v}");
    }
    let missing_q = dead.iter().find(|r| r.value["error"] == "missing_query");
    assert_eq!(missing_q.map(|r| r.value["id"].clone()), Some("m1".into()));
    let served = by_id(&out.records(&t.verdict));
    assert_eq!(served["long1"]["truncated"], true, "{}", served["long1"]);
    for id in &good {
        assert!(served[id].get("truncated").is_none_or(|v| v == false));
    }
    let health = w.get("/healthz").map(|(code, _)| code);
    assert_eq!(health, Some(200), "the worker is alive after bad events");
}

#[test]
fn repeated_query_is_served_from_redis_by_a_second_worker() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("p");
    let query = "제주도 한 달 살기 비용이 얼마나 드나요";
    let (ta, tb) = (Topics::create("shared-a"), Topics::create("shared-b"));
    let (out_a, out_b) = (
        Collector::start(&[&ta.verdict]),
        Collector::start(&[&tb.verdict]),
    );
    let p = producer();

    let mut a = Worker::start("a", dir.path(), &ta, &unique("g1"), REDIS_URL, &prefix);
    let q1 = vec!["q1".to_string()];
    produce(&p, &ta.input, &msgs(&q1, &[query.into()]));
    expect_all(&out_a, &ta, &q1, secs(90), "worker a");
    let v1 = by_id(&out_a.records(&ta.verdict))["q1"].clone();
    assert_eq!(v1["cached"], false, "a new query is screened: {v1}");
    // The cache write happens beside the publish: wait for it before stopping a.
    let mut keys = Vec::new();
    for _ in 0..50 {
        keys = redis_keys(REDIS_URL, &prefix);
        if !keys.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "Redis keys under the test prefix after worker a: {}",
        keys.len()
    );
    assert_eq!(keys.len(), 1, "worker a stores its verdict in Redis");
    let status = a.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");

    let mut b = Worker::start("b", dir.path(), &tb, &unique("g2"), REDIS_URL, &prefix);
    let q2 = vec!["q2".to_string()];
    produce(&p, &tb.input, &msgs(&q2, &[query.into()]));
    expect_all(&out_b, &tb, &q2, secs(90), "worker b");
    let v2 = by_id(&out_b.records(&tb.verdict))["q2"].clone();
    println!("worker b verdict: cached = {}", v2["cached"]);
    assert_eq!(v2["cached"], true, "served from Redis: {v2}");
    for f in ["label", "category", "action"] {
        assert_eq!(v1[f], v2[f], "the cached verdict is the same ({f})");
    }
    assert!(close(&v1["scores"]["unsafe"], &v2["scores"]["unsafe"]));
    let status = b.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
}

#[test]
fn spans_and_metrics_are_exported_over_otlp() {
    let dir = tempfile::tempdir().unwrap();
    let t = Topics::create("otlp");
    let out = Collector::start(&t.outputs());
    let sink = OtlpSink::start();
    let endpoint = sink.endpoint();
    let mut w = Worker::start_with(
        "w",
        dir.path(),
        &t,
        &unique("g"),
        REDIS_URL,
        &unique("p"),
        &["--otlp-endpoint", &endpoint],
    );
    let queries: Vec<String> = corpus().into_iter().take(20).collect();
    let ids = ids("ot", 20);
    let mut events = msgs(&ids, &queries);
    let trace_id: [u8; 16] = *b"guardian-otlp-t1";
    let hex: String = trace_id.iter().map(|b| format!("{b:02x}")).collect();
    events[0].traceparent = Some(format!("00-{hex}-00f067aa0ba902b7-01"));
    produce(&producer(), &t.input, &events);
    expect_all(&out, &t, &ids, secs(90), "20 events");
    // SIGTERM flushes the span batch and the last metric collection.
    let status = w.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");

    let traces = sink.bodies("/v1/traces");
    let metrics = sink.bodies("/v1/metrics");
    let has = |bodies: &[Vec<u8>], needle: &[u8]| {
        bodies
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle))
    };
    println!(
        "OTLP: {} trace exports ({} bytes), {} metric exports ({} bytes)",
        traces.len(),
        traces.iter().map(Vec::len).sum::<usize>(),
        metrics.len(),
        metrics.iter().map(Vec::len).sum::<usize>()
    );
    assert!(
        has(&traces, &trace_id),
        "the input's trace id is in an exported span"
    );
    assert!(has(&traces, b"guardian.event"), "per-event spans exported");
    assert!(has(&traces, b"guardian.batch"), "per-batch spans exported");
    assert!(
        has(&metrics, b"guardian.events.in"),
        "the events-in counter exported"
    );
    assert!(
        !has(&traces, queries[0].as_bytes()) && !has(&metrics, queries[0].as_bytes()),
        "no query text leaves in telemetry"
    );
    let log = w.log();
    assert!(log.contains("\"message\":\"serving\""), "JSON logs: {log}");
    let leaked: Vec<&String> = queries
        .iter()
        .filter(|q| log.contains(q.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "query text in the worker's log: {leaked:?}"
    );
}
