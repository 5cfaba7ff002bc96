//! EmbeddingGemma-300M, our candle forward pass, against sentence-transformers' own output on
//! the same snapshot (tests/data/embeddinggemma-reference.json: the token ids and full embeddings
//! of six Korean and English sentences and one 392-token text that crosses the sliding window,
//! encoded with the "Classification" prompt), and the cross-lingual structure the backbone is
//! chosen for. `ops/test.sh` fetches the model first
//! (`guardian models fetch --backbone embeddinggemma-300m`, 1.2 GB); without it these tests fail
//! and say so.

mod common;

use candle_core::Device;
use guardian::model::{Backbone, Backend, Embedder, Model, ModelSpec, WeightFormat};

fn spec(max_tokens: usize) -> ModelSpec {
    ModelSpec {
        backbone: Backbone::EmbeddingGemma300m,
        max_tokens,
        ..common::spec(WeightFormat::F32)
    }
}

/// Fails the test, saying how to fetch the model, when its files are not there.
fn require_model() {
    let weights = guardian::model::fetch::models_dir(&common::home())
        .join(guardian::model::fetch::GEMMA_WEIGHTS);
    assert!(
        weights.exists(),
        "{} is missing; run `guardian models fetch --backbone embeddinggemma-300m` \
         (ops/test.sh does)",
        weights.display()
    );
}

fn embedder(max_tokens: usize) -> Embedder {
    require_model();
    Embedder::load(&spec(max_tokens), &Device::Cpu).expect("EmbeddingGemma loads")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

struct Reference {
    prompt: String,
    sentences: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    long: (String, Vec<u32>, Vec<f32>),
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/embeddinggemma-reference.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings =
        |v: &serde_json::Value| -> Vec<String> { serde_json::from_value(v.clone()).unwrap() };
    let long = &v["long"];
    Reference {
        prompt: v["prompt"].as_str().unwrap().to_string(),
        sentences: strings(&v["sentences"]),
        ids: serde_json::from_value(v["ids"].clone()).unwrap(),
        embeddings: serde_json::from_value(v["embeddings"].clone()).unwrap(),
        long: (
            long["sentence"].as_str().unwrap().to_string(),
            serde_json::from_value(long["ids"].clone()).unwrap(),
            serde_json::from_value(long["embedding"].clone()).unwrap(),
        ),
    }
}

/// The first eight values of each reference embedding (sentence-transformers, f32 CPU).
const FIRST_8: [[f32; 8]; 6] = [
    [
        -0.120092, 0.022424, 0.017491, -0.008623, -0.042194, 0.052674, -0.019668, -0.031494,
    ],
    [
        -0.113631, 0.039581, 0.055336, 0.032313, -0.041891, 0.108322, -0.001759, 0.027608,
    ],
    [
        -0.092339, 0.084540, 0.032504, 0.032896, -0.032588, -0.006861, -0.085718, 0.032337,
    ],
    [
        -0.142895, -0.007502, 0.010954, 0.002661, -0.034504, 0.044109, -0.022649, -0.005531,
    ],
    [
        -0.148997, -0.022693, 0.011842, 0.009328, 0.043259, 0.082389, -0.038454, -0.006830,
    ],
    [
        -0.103154, 0.060990, 0.029872, 0.010198, -0.060821, 0.012534, -0.073571, 0.028149,
    ],
];

#[test]
fn matches_sentence_transformers_on_the_same_snapshot() {
    let e = embedder(512);
    let r = reference();
    assert_eq!(e.tokenizer.prefix(), r.prompt, "the Classification prompt");
    assert_eq!(e.encoder_id, "embeddinggemma-300m/f32");
    assert_eq!(e.hidden_size(), 768);
    for (s, want) in r.sentences.iter().zip(&r.ids) {
        let got = e.tokenizer.encode(s).unwrap().ids;
        assert_eq!(&got, want, "token ids of {s:?} (<bos> prompt text <eos>)");
    }
    // One padded batch of all six: lengths 13 to 48 tokens.
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let got = e.embed_texts(&texts).unwrap();
    let mut cosines = Vec::new();
    for (i, (g, want)) in got.iter().zip(&r.embeddings).enumerate() {
        assert!((dot(g, g) - 1.0).abs() < 1e-4, "L2-normalised");
        let c = cosine(g, want);
        cosines.push(c);
        assert!(c >= 0.999, "{}: cosine {c} with the reference", texts[i]);
        for (k, (a, b)) in g.iter().zip(&FIRST_8[i]).enumerate() {
            assert!(
                (a - b).abs() < 2e-3,
                "{}: value {k} is {a}, the reference {b}",
                texts[i]
            );
        }
    }
    eprintln!("cosine with sentence-transformers: {cosines:?}");
    // The CPU runs packed sequences; the padded graph (the GPU path) must agree.
    let Backend::Gemma(g) = &e.backend else {
        panic!("not the EmbeddingGemma backend")
    };
    let toks: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| e.tokenizer.encode(t).unwrap().ids)
        .collect();
    let seq = toks.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for t in &toks {
        ids.extend(t.iter().copied().chain(std::iter::repeat(0)).take(seq));
        mask.extend((0..seq).map(|i| if i < t.len() { 1f32 } else { 0.0 }));
    }
    let padded = g
        .embed(&ids, &mask, toks.len(), seq)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for ((t, p), want) in texts.iter().zip(&padded).zip(&r.embeddings) {
        let c = cosine(p, want);
        assert!(
            c >= 0.999,
            "{t}: padded graph, cosine {c} with the reference"
        );
    }
    // Padding must not leak: each text alone gives the same embedding as in the batch.
    for (t, b) in texts.iter().zip(&got) {
        let single = &e.embed_texts(&[t]).unwrap()[0];
        let c = cosine(single, b);
        assert!(c > 0.99999, "{t}: alone vs batched cosine {c}");
    }
}

#[test]
fn a_text_longer_than_the_sliding_window_matches_too() {
    // 392 tokens: the sliding layers see only |i - j| <= 256.
    let e = embedder(512);
    let (text, ids, want) = reference().long;
    assert_eq!(e.tokenizer.encode(&text).unwrap().ids, ids);
    let got = &e.embed_texts(&[text.as_str(), "짧은 질문"]).unwrap()[0];
    let c = cosine(got, &want);
    eprintln!("392-token text: cosine {c} with sentence-transformers");
    assert!(c >= 0.999, "cosine {c}");
}

const KO: [&str; 6] = [
    "오늘 서울 날씨는 맑고 따뜻합니다",
    "가까운 약국이 어디에 있나요",
    "이 노트북의 배터리는 얼마나 오래 가나요",
    "김치찌개 맛있게 끓이는 방법",
    "다음 주 월요일에 회의가 있습니다",
    "고양이가 소파 위에서 자고 있어요",
];
const EN: [&str; 6] = [
    "The weather in Seoul today is clear and warm",
    "Where is the nearest pharmacy",
    "How long does this laptop's battery last",
    "How to make delicious kimchi stew",
    "There is a meeting next Monday",
    "The cat is sleeping on the sofa",
];

#[test]
fn translations_score_far_above_unrelated_pairs() {
    let e = embedder(128);
    let ko = e.embed_texts(&KO).unwrap();
    let en = e.embed_texts(&EN).unwrap();
    for i in 0..KO.len() {
        let own = dot(&ko[i], &en[i]);
        let other = (0..EN.len())
            .filter(|&j| j != i)
            .map(|j| dot(&ko[i], &en[j]).max(dot(&en[i], &ko[j])))
            .fold(f32::MIN, f32::max);
        assert!(
            own > 0.75 && own > other + 0.2,
            "{} / {}: translation {own:.3}, best unrelated {other:.3}",
            KO[i],
            EN[i]
        );
    }
}

#[test]
fn refuses_heads_trained_for_another_backbone() {
    require_model();
    // The built-in heads read e5-small embeddings.
    let Err(err) = Model::load(&spec(128)) else {
        panic!("e5-small heads loaded onto EmbeddingGemma");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("trained for the e5-small backbone")
            && msg.contains("embeddinggemma-300m")
            && msg.contains("--heads"),
        "{msg}"
    );
}
