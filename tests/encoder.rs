//! The encoder reads the E5S1 weights right: translations find each other, batching does not
//! change embeddings, our forward pass matches candle-transformers' stock BERT on the same
//! weights, and the Q4_0 path stays within 0.01 cosine of f32.

mod common;

use candle_core::{DType, Device, Tensor};
use guardian::model::e5s1::{dequantize_q4_0, E5s1};
use guardian::model::{Embedder, WeightFormat};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn embedder(w: WeightFormat) -> Embedder {
    Embedder::load(&common::spec(w), &Device::Cpu)
        .expect("model files present: run `guardian models fetch`")
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
fn korean_and_english_translations_are_nearest_neighbours() {
    let e = embedder(WeightFormat::F32);
    let ko = e.embed_texts(&KO).unwrap();
    let en = e.embed_texts(&EN).unwrap();
    for v in ko.iter().chain(&en) {
        assert!(
            (dot(v, v) - 1.0).abs() < 1e-4,
            "embeddings are L2-normalised"
        );
    }
    for i in 0..KO.len() {
        let sims: Vec<f32> = en.iter().map(|v| dot(&ko[i], v)).collect();
        let best = sims
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, i, "{} -> {} (sims {sims:?})", KO[i], EN[best]);
        let back: Vec<f32> = ko.iter().map(|v| dot(&en[i], v)).collect();
        let best = back
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, i, "{} -> {}", EN[i], KO[best]);
    }
}

#[test]
fn batched_and_single_embeddings_agree() {
    for w in [WeightFormat::F32, WeightFormat::Q4] {
        let e = embedder(w);
        let texts: Vec<&str> = KO.iter().chain(EN.iter()).copied().collect();
        let batched = e.embed_texts(&texts).unwrap();
        for (t, b) in texts.iter().zip(&batched) {
            let single = &e.embed_texts(&[t]).unwrap()[0];
            let diff = single
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{w}: {t}: max abs diff {diff}");
        }
    }
}

#[test]
fn q4_stays_within_001_cosine_of_f32() {
    let (f, q) = (embedder(WeightFormat::F32), embedder(WeightFormat::Q4));
    let texts: Vec<&str> = KO.iter().chain(EN.iter()).copied().collect();
    let (a, b) = (
        f.embed_texts(&texts).unwrap(),
        q.embed_texts(&texts).unwrap(),
    );
    for (t, (x, y)) in texts.iter().zip(a.iter().zip(&b)) {
        let c = dot(x, y);
        assert!(c > 0.99, "{t}: cosine {c}");
    }
}

/// Our forward pass against candle-transformers' BertModel loaded with the same weights,
/// dequantized by the format's definition (not by candle), under Hugging Face tensor names.
#[test]
fn matches_stock_candle_bert_on_the_same_weights() {
    use candle_transformers::models::bert::{BertModel, Config, HiddenAct, PositionEmbeddingType};
    let home = common::home();
    let path = guardian::model::fetch::models_dir(&home).join(guardian::model::fetch::E5_WEIGHTS);
    let file = E5s1::open(&path).unwrap();
    let d = file.dims;
    let dev = Device::Cpu;
    let mut map = std::collections::HashMap::new();
    let q4 = |name: &str, rows: usize, cols: usize| {
        Tensor::from_vec(
            dequantize_q4_0(file.q4_raw(name, rows * cols).unwrap()),
            (rows, cols),
            &dev,
        )
        .unwrap()
    };
    let f32t = |name: &str, shape: &[usize]| file.f32(name, shape, &dev).unwrap();
    map.insert(
        "embeddings.word_embeddings.weight".to_string(),
        q4("emb.word", d.vocab, d.hidden),
    );
    map.insert(
        "embeddings.position_embeddings.weight".into(),
        f32t("emb.pos", &[d.max_positions, d.hidden]),
    );
    map.insert(
        "embeddings.token_type_embeddings.weight".into(),
        f32t("emb.type", &[d.token_types, d.hidden]),
    );
    map.insert(
        "embeddings.LayerNorm.weight".into(),
        f32t("emb.ln.w", &[d.hidden]),
    );
    map.insert(
        "embeddings.LayerNorm.bias".into(),
        f32t("emb.ln.b", &[d.hidden]),
    );
    for l in 0..d.layers {
        let p = format!("encoder.layer.{l}");
        let lin = |ours: &str,
                   hf: &str,
                   rows,
                   cols,
                   map: &mut std::collections::HashMap<String, Tensor>| {
            map.insert(
                format!("{p}.{hf}.weight"),
                q4(&format!("l{l}.{ours}.w"), rows, cols),
            );
            map.insert(
                format!("{p}.{hf}.bias"),
                f32t(&format!("l{l}.{ours}.b"), &[rows]),
            );
        };
        lin("q", "attention.self.query", d.hidden, d.hidden, &mut map);
        lin("k", "attention.self.key", d.hidden, d.hidden, &mut map);
        lin("v", "attention.self.value", d.hidden, d.hidden, &mut map);
        lin("ao", "attention.output.dense", d.hidden, d.hidden, &mut map);
        lin("fi", "intermediate.dense", d.ffn, d.hidden, &mut map);
        lin("fo", "output.dense", d.hidden, d.ffn, &mut map);
        for (ours, hf) in [
            ("aln", "attention.output.LayerNorm"),
            ("oln", "output.LayerNorm"),
        ] {
            map.insert(
                format!("{p}.{hf}.weight"),
                f32t(&format!("l{l}.{ours}.w"), &[d.hidden]),
            );
            map.insert(
                format!("{p}.{hf}.bias"),
                f32t(&format!("l{l}.{ours}.b"), &[d.hidden]),
            );
        }
    }
    let cfg = Config {
        vocab_size: d.vocab,
        hidden_size: d.hidden,
        num_hidden_layers: d.layers,
        num_attention_heads: d.heads,
        intermediate_size: d.ffn,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.0,
        max_position_embeddings: d.max_positions,
        type_vocab_size: d.token_types,
        initializer_range: 0.02,
        layer_norm_eps: file.layer_norm_eps,
        pad_token_id: d.pad_id as usize,
        position_embedding_type: PositionEmbeddingType::Absolute,
        use_cache: false,
        classifier_dropout: None,
        model_type: None,
    };
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
    let stock = BertModel::load(vb, &cfg).unwrap();

    // Both of our forward passes: the candle graph and the packed CPU kernels.
    let graph = guardian::model::Encoder::load(&file, WeightFormat::F32, &dev).unwrap();
    let packed = guardian::model::packed::PackedEncoder::load(&file).unwrap();
    let tok = embedder(WeightFormat::F32).tokenizer;
    let texts = [KO[0], EN[2], "how to kill a python process"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap().ids).collect();
    let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let packed_all = packed.last_hidden(&refs);
    let max_diff = |a: &Tensor, b: Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mut row = 0;
    for (text, ids) in texts.iter().zip(&ids) {
        let n = ids.len();
        let ids_t = Tensor::from_vec(ids.clone(), (1, n), &dev).unwrap();
        let types = ids_t.zeros_like().unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &dev).unwrap();
        let want = stock
            .forward(&ids_t, &types, Some(&mask))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let got = graph
            .last_hidden(ids, &vec![1.0; n], 1, n)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = max_diff(&want, got);
        assert!(
            diff < 1e-3,
            "graph: {text}: max abs diff {diff} from stock BERT"
        );
        let got = Tensor::from_vec(
            packed_all[row * d.hidden..(row + n) * d.hidden].to_vec(),
            (n, d.hidden),
            &dev,
        )
        .unwrap();
        row += n;
        let diff = max_diff(&want, got);
        assert!(
            diff < 1e-3,
            "packed: {text}: max abs diff {diff} from stock BERT"
        );
    }
}
