//! The `hiercon` command line: parses arguments, sets up logging and the runtime, and calls
//! the library. `anyhow` lives only here.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hiercon::catalogue::sources::{emoji, fashion_mnist, folder};
use hiercon::catalogue::{Manifest, Split, SplitOptions, Subset, UnseenBy};
use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder, TestEncoder};
use hiercon::eval::{self, EvalConfig, EvaluatedModel, Retrieval};
use hiercon::http::{self, EncoderSource, ServeConfig};
use hiercon::image::{Augment, Limits};
use hiercon::index::{self, IndexConfig};
use hiercon::loss::{self, LossOptions, LossShape};
use hiercon::model::describe::DescribeOptions;
use hiercon::model::imported::{ImportOptions, Imported};
use hiercon::model::{self as hmodel, Arch, Init, ModelConfig};
use hiercon::runtime::{self, Device, RuntimeOptions};
use hiercon::search::{SearchConfig, Service};
use hiercon::train::{OptimizerKind, SamplerKind, TrainConfig, TrainEnv};
use tracing_subscriber::EnvFilter;

/// Hierarchical multi-label contrastive image search.
#[derive(Parser, Debug)]
#[command(name = "hiercon", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct GlobalArgs {
    /// Where graphs run: cpu, or cuda (needs a `--features cuda` build and `make ort-gpu`).
    #[arg(long, global = true, default_value = "cpu", env = "HIERCON_DEVICE")]
    device: Device,
    /// CPU threads for ONNX Runtime (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "HIERCON_THREADS")]
    threads: usize,
    /// Training on CPU: run the step's dense convolutions on ONNX Runtime's blocked NCHWc
    /// kernels (about 10% faster per step; the step graph is then not standard ONNX).
    #[arg(long, global = true, env = "HIERCON_CPU_NCHWC")]
    cpu_nchwc: bool,
    /// Log lines on stderr: `text` (colours only when stderr is a terminal and NO_COLOR is unset)
    /// or `json` (one JSON object a line, for log collectors). RUST_LOG picks what is logged.
    #[arg(long, global = true, default_value = "text", env = "HIERCON_LOG_FORMAT")]
    log_format: LogFormat,
}

/// See [`GlobalArgs::log_format`].
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr through `tracing`, filtered by RUST_LOG (default `info,hnsw_rs=warn`).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,hnsw_rs=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            fmt.with_ansi(std::io::stderr().is_terminal() && !no_color).init()
        }
        // Event fields at the top level beside `timestamp`, `level`, `target`, `message`; the
        // innermost span's fields under `span`.
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn a source (emoji packages, Fashion-MNIST, a folder + CSV) into a catalogue manifest.
    Data(DataArgs),
    /// Train encoder + projection head with a hierarchical loss (or a baseline); checkpoints,
    /// resume, and export of `OUT/model.onnx` + `model.json`.
    Train(Box<TrainArgs>),
    /// Write a loss alone as an ONNX model: inputs `features` f32 [2N, D] and `labels` i64
    /// [N, K]; outputs `loss` (f32 scalar) and `features_grad` (f32 [2N, D]).
    ExportLoss(ExportLossArgs),
    /// Embed a catalogue into a new index generation, verify it and make it live.
    ///
    /// Exit codes: 0 new generation live; 1 unexpected failure; 2 usage or bad input;
    /// 3 verification failed (CURRENT unchanged); 4 another run holds the index lock.
    Index(IndexArgs),
    /// Serve the HTTP API and the web page over an index's live generation.
    ///
    /// Prints `listening on http://ADDR` once bound. Reloads a new generation on
    /// `POST /v1/admin/reload`, SIGHUP, and when a poll of CURRENT sees one; stops gracefully on
    /// SIGTERM / Ctrl-C.
    Serve(ServeArgs),
    /// Load test: start `hiercon serve` as a second process on a loopback port (or use --addr)
    /// and send image queries at each concurrency for a fixed time; writes a JSON report.
    #[command(hide = true)]
    BenchLoad(BenchLoadArgs),
    /// Retrieval accuracy per hierarchy level on a split (train = seen products, test = unseen),
    /// mAP, kNN accuracy, NMI; or, with --compare, one table across training runs.
    Eval(EvalArgs),
    /// Export a model without training: the pretrained backbone's L2-normalised pooled feature
    /// (`--no-head`), as `OUT.onnx` + `OUT.json` that `index`, `serve` and `eval` accept — the
    /// zero-shot baseline of a fine-tuned model.
    Export(ExportArgs),
    /// Pretrained weights: where hiercon finds them, what they hold, conversion to safetensors.
    #[command(subcommand)]
    Pretrained(PretrainedCommand),
    /// Read an ONNX image model as a backbone for `train --init-onnx`: report its input, the cut
    /// before its classifier, the feature width and the weight layers `--freeze` counts, and
    /// check the replayed graph against ONNX Runtime on the file itself.
    Import(ImportArgs),
    /// Foreign ONNX models: `model describe` makes one servable without training.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run the shipped default end to end: index the emoji catalogue with models/emoji-lite0-supcon.onnx
    /// into index/emoji, then serve it (run from the repository root; `make demo` does it all).
    Demo(DemoArgs),
    /// Show which ONNX Runtime library is loaded and whether the requested device works.
    Runtime,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Catalogue manifest (JSON Lines).
    #[arg(long)]
    manifest: PathBuf,
    /// Which part of the catalogue to train on: train (all seen products), or fit (seen products
    /// minus the validation hold-out: for runs that choose settings, evaluated on --split val).
    #[arg(long, default_value = "train", value_parser = parse_subset)]
    split: Subset,
    #[command(flatten)]
    loss: LossOptions,
    /// Backbone.
    #[arg(long, value_enum, default_value_t = Arch::ResnetMini)]
    arch: Arch,
    /// Initial backbone weights (default: pretrained for the EfficientNet-Lite archs, whose
    /// ImageNet weights `make pretrained` fetches; random for the ResNets).
    #[arg(long, value_enum)]
    init: Option<Init>,
    /// Pretrained weights file (`.pth` legacy PyTorch or safetensors; default: the arch's own
    /// under .cache/pretrained/).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Keep the first N backbone units frozen (constants, BatchNorm in inference form): the stem,
    /// then each stage (EfficientNet-Lite: stem, 7 block stages, head conv = 9 units; ResNet:
    /// stem + 4 layers; --init-onnx: the first N weight layers, as `hiercon import` numbers
    /// them). Needs a pretrained start.
    #[arg(long, default_value_t = 0)]
    freeze: usize,
    /// Side of the square training images, in pixels (default: 64; EfficientNet-Lite: its
    /// native 224 / 240 / 260; --init-onnx: the file's fixed size, or 224).
    #[arg(long)]
    image_size: Option<usize>,
    /// Fine-tune an imported ONNX model (see `hiercon import`): its graph cut before the
    /// classifier is the backbone, its initializers the start; --freeze N then counts its
    /// weight layers (Conv, Gemm, MatMul).
    #[arg(long, conflicts_with_all = ["arch", "init", "weights"])]
    init_onnx: Option<PathBuf>,
    /// With --init-onnx: where to cut (a value or node name; default: the classifier's input).
    #[arg(long, requires = "init_onnx")]
    cut: Option<String>,
    /// With --init-onnx: per-channel mean on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', requires = "init_onnx", value_name = "R,G,B")]
    mean: Option<Vec<f32>>,
    /// With --init-onnx: per-channel std on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', requires = "init_onnx", value_name = "R,G,B")]
    std: Option<Vec<f32>>,
    /// With --init-onnx: the model wants BGR channels (reversed after normalisation).
    #[arg(long, requires = "init_onnx")]
    bgr: bool,
    /// Samples per batch (each gives two augmented views).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Train until this many times the split's item count has been drawn:
    /// steps = ceil(epochs x items / batch size).
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Train for this many optimizer steps (default: 10 epochs).
    #[arg(long)]
    steps: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// Peak learning rate (default: 0.1 for sgd, 1e-3 for adamw).
    #[arg(long)]
    lr: Option<f64>,
    /// Weight decay (default: 1e-4 for sgd, 0.05 for adamw).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Linear warm-up steps before the cosine decay (default: 5% of the steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// Batch sampler.
    #[arg(long, value_enum, default_value_t = SamplerKind::Hierarchical)]
    sampler: SamplerKind,
    /// Seed of the initial parameters, the sampler and the augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Frozen-prefix view cache: draw K augmented views of every training image once, run them
    /// through the frozen units (--freeze) once, keep the result (f16, memory-mapped), and let each
    /// step run only the trainable units on two of an image's K views. Much faster; the cost is
    /// augmentation diversity (K fixed views per image instead of fresh ones each step). 0 = off.
    #[arg(long, default_value_t = 0, value_name = "K")]
    view_cache: usize,
    /// Leave a label column out of the loss and the sampler, by name (repeatable): level1, level2,
    /// .., product, variation. E.g. `--drop-level variation` makes the product the finest
    /// hierarchical level.
    #[arg(long = "drop-level", value_name = "NAME")]
    drop_levels: Vec<String>,
    /// Where view caches are kept (one folder per key: weights, frozen units, size,
    /// augmentation, seed, K, images); runs with equal keys share one.
    #[arg(long, env = "HIERCON_VIEW_CACHE_DIR", default_value = hiercon::train::trainer::DEFAULT_VIEW_CACHE_DIR)]
    view_cache_dir: PathBuf,
    /// Run directory (config.json, metrics.jsonl, loss.png, checkpoint, model.onnx).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Testing aid: stop abruptly after this step, as if killed (no checkpoint, no export).
    #[arg(long, hide = true)]
    halt_after: Option<usize>,
    /// Only redraw OUT/loss.png from OUT/metrics.jsonl.
    #[arg(long, hide = true)]
    replot: bool,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Backbone (one with pretrained weights).
    #[arg(long, value_enum)]
    arch: Arch,
    /// Where the weights come from (only `pretrained` makes sense without training).
    #[arg(long, value_enum, default_value_t = Init::Pretrained)]
    init: Init,
    /// Pretrained weights file (default: the arch's own under .cache/pretrained/).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Export the normalised pooled feature without a projection head (required: an untrained
    /// head would only scramble the feature).
    #[arg(long)]
    no_head: bool,
    /// Input side in pixels (default: the arch's native size).
    #[arg(long)]
    image_size: Option<usize>,
    /// Output model file `X.onnx` (`X.json` is written beside it).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The ONNX model (opset 9 or later; external data is read from beside it).
    model: PathBuf,
    /// Image side the shapes are folded at (default: the file's fixed size, or 224).
    #[arg(long)]
    image_size: Option<usize>,
    /// The feature: a value name, or a node name meaning its first output; `output` for the
    /// graph's output (default: the input of the last Gemm / MatMul after the global pooling).
    #[arg(long)]
    cut: Option<String>,
    /// The model wants BGR channels (reversed in front of it).
    #[arg(long)]
    bgr: bool,
    /// Skip the comparison with ONNX Runtime.
    #[arg(long)]
    no_check: bool,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Write a servable copy of any ONNX image embedder (`OUT` + `OUT.json`) for `index`,
    /// `serve` and `eval`: input `images` [batch, 3, S, S] (a Transpose in front of NHWC
    /// models), the chosen output or inner value flattened (and L2-normalised with
    /// --normalize) as `embeddings`. Runs it once to learn the width.
    Describe(DescribeArgs),
    /// Write an int8 copy of a servable model (`OUT` + `OUT.json`) that `index`, `serve` and
    /// `eval` accept like any other: BatchNorm folded, Conv/Gemm/MatMul weights int8 per output
    /// channel, activations uint8 with ranges calibrated on images of a seen split, as ONNX
    /// QDQ pairs that ONNX Runtime runs on its int8 kernels. Checked against the float model on
    /// other images of the split before it is written.
    Quantize(QuantizeArgs),
    /// Record MODEL.onnx's digest (sha256 over its initializers) in MODEL.json: for a pair
    /// exported before digests covered every initializer. Only for a pair known to belong
    /// together — the digest is what lets the encoder refuse mismatched files.
    Rehash {
        /// The model; its description is the `.json` beside it.
        model: PathBuf,
    },
}

#[derive(Args, Debug)]
struct DescribeArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Input side in pixels (default: the file's fixed size, or 224).
    #[arg(long)]
    size: Option<usize>,
    /// Per-channel mean on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', default_values_t = hmodel::IMAGENET_MEAN, value_name = "R,G,B")]
    mean: Vec<f32>,
    /// Per-channel std on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', default_values_t = hmodel::IMAGENET_STD, value_name = "R,G,B")]
    std: Vec<f32>,
    /// The model wants BGR channels (Caffe models): the channels are reversed after
    /// normalisation, so --mean / --std stay in RGB order.
    #[arg(long)]
    bgr: bool,
    /// The graph output to embed with (default: the only one).
    #[arg(long, conflicts_with = "cut")]
    output: Option<String>,
    /// An inner value (or node name) to embed with instead, e.g. the classifier's input.
    #[arg(long)]
    cut: Option<String>,
    /// Also divide by the L2 norm inside the graph (the encoder normalises rows either way).
    #[arg(long)]
    normalize: bool,
    /// The servable model to write (`OUT.json` beside it).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// The float model; its description is the `.json` beside it.
    model: PathBuf,
    /// The catalogue whose images calibrate the activation ranges.
    #[arg(long)]
    manifest: PathBuf,
    /// Where the calibration images come from: train (default), fit or val. Never test: the
    /// unseen split stays unseen.
    #[arg(long, default_value = "train", value_parser = parse_subset)]
    split: Subset,
    /// Calibration images (a seeded sample of the split).
    #[arg(long, default_value_t = 128)]
    calibration_images: usize,
    /// Other images of the split on which the int8 model is compared with the float one.
    #[arg(long, default_value_t = 64)]
    check_images: usize,
    /// Seed of the sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How an activation's range is chosen: `minmax` (the smallest and largest value seen) or
    /// `percentile` (the central --percentile % of the values).
    #[arg(long, default_value = "minmax", value_parser = ["minmax", "percentile"])]
    method: String,
    /// With --method percentile: the share of values inside the range, in (50, 100].
    #[arg(long, default_value_t = 99.999)]
    percentile: f64,
    /// Leave this node in float (its name, or the name of its output); repeatable.
    #[arg(long, value_name = "NODE")]
    keep_float: Vec<String>,
    /// Weights in 7 bits (±63): for CPUs without VNNI, whose int8 dot product can saturate.
    #[arg(long)]
    reduce_range: bool,
    /// The int8 model to write (`OUT.json` beside it).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum PretrainedCommand {
    /// Print where each architecture's weights come from and whether they are on disk.
    List,
    /// Print a weights file's tensors (name, shape) and totals.
    Info {
        /// A `.pth` (PyTorch legacy) or safetensors file.
        file: PathBuf,
    },
    /// Convert a PyTorch legacy `.pth` checkpoint to safetensors (float tensors, by name).
    Convert {
        /// The `.pth` file (or an arch name's default file, with --arch).
        #[arg(required_unless_present = "arch")]
        file: Option<PathBuf>,
        /// Use this architecture's default weights file.
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ExportLossArgs {
    /// Samples per batch N (the features have 2N rows: two views per sample).
    #[arg(long)]
    batch: usize,
    /// Label columns K (coarse -> fine, the last one the image id).
    #[arg(long)]
    columns: usize,
    /// Feature dimension D.
    #[arg(long)]
    dim: usize,
    /// Classes C of the `ce` baseline (required for `--loss ce`).
    #[arg(long)]
    classes: Option<usize>,
    #[command(flatten)]
    loss: LossOptions,
    /// Output model file.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct DataArgs {
    #[command(subcommand)]
    source: DataSource,
}

#[derive(Subcommand, Debug)]
enum DataSource {
    /// Emoji from the emoji-datasource packages (`make fetch-emoji`): category / subcategory /
    /// emoji / skin tone; Twitter's drawings are the queries, Google's the gallery.
    Emoji {
        /// Folder holding the unpacked emoji-datasource, -google and -twitter packages.
        #[arg(long, default_value = ".cache/npm")]
        packages: PathBuf,
        /// Output catalogue folder (images/, manifest.jsonl, ATTRIBUTION.md).
        #[arg(long, default_value = "data/emoji")]
        out: PathBuf,
        #[command(flatten)]
        split: SplitArgs,
    },
    /// Fashion-MNIST from its IDX files: group / class; every image is its own product.
    FashionMnist {
        /// Folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*.
        #[arg(long)]
        source: PathBuf,
        /// Output catalogue folder.
        #[arg(long, default_value = "data/fashion-mnist")]
        out: PathBuf,
        /// `official`: the dataset's 60,000 / 10,000 train/test split; `hashed`: the hashed
        /// per-class split drawn by --seed / --unseen-fraction / --unseen-by.
        #[arg(long, default_value = "official", value_parser = ["official", "hashed"])]
        split: String,
        #[command(flatten)]
        split_args: SplitArgs,
    },
    /// Any images plus a CSV with the header image,category,product,variation[,view,role,title,attr.NAME...]
    /// (image paths relative to the CSV). An `attr.NAME` cell becomes the attribute NAME:
    /// true/false a boolean, a JSON number a number, other text a string; empty: none.
    Folder {
        #[arg(long)]
        csv: PathBuf,
        /// Output catalogue folder (the images are copied under images/).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        split: SplitArgs,
    },
}

/// The seen/unseen split.
#[derive(Args, Debug, Clone)]
struct SplitArgs {
    /// Seed of the stable hash that picks the unseen products.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of products (or of leaf categories) held out as unseen (`test`).
    #[arg(long, default_value_t = 0.25)]
    unseen_fraction: f64,
    /// What is held out: `product` (a share of every leaf category's products) or `category`
    /// (whole leaf categories).
    #[arg(long, default_value = "product")]
    unseen_by: UnseenBy,
}

impl From<SplitArgs> for SplitOptions {
    fn from(a: SplitArgs) -> Self {
        SplitOptions { seed: a.seed, unseen_fraction: a.unseen_fraction, unseen_by: a.unseen_by }
    }
}

/// The demo catalogue `hiercon demo` summarises.
const DEMO_MANIFEST: &str = "data/emoji/manifest.jsonl";
const DEMO_MODEL: &str = "models/emoji-lite0-supcon.onnx";
const DEMO_INDEX: &str = "index/emoji";

#[derive(Args, Debug)]
struct DemoArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1", env = "HIERCON_HOST")]
    host: std::net::IpAddr,
    /// Port to serve on.
    #[arg(long, default_value_t = 8080, env = "HIERCON_PORT")]
    port: u16,
}

#[derive(Args, Debug)]
struct IndexArgs {
    /// Catalogue manifest (JSON Lines; image paths are relative to it).
    #[arg(long)]
    manifest: PathBuf,
    /// Exported model `X.onnx` (its description `X.json` must be beside it).
    #[arg(long, required_unless_present = "test_encoder")]
    model: Option<PathBuf>,
    /// Index directory, e.g. `index/emoji`; generations `gen-<n>/` and `CURRENT` live inside.
    #[arg(long, required_unless_present = "milvus")]
    out: Option<PathBuf>,
    /// Index into Milvus at this address (`HOST:PORT` of its proxy) instead of a local directory:
    /// each run writes a collection `<collection>_g<n>`, verifies it and points the alias
    /// `--collection` at it.
    #[arg(long, requires = "collection", conflicts_with_all = ["out", "full", "max_tombstones", "max_new"])]
    milvus: Option<String>,
    /// With --milvus: the alias the live collection is reached by (what `serve --collection` names).
    #[arg(long, requires = "milvus")]
    collection: Option<String>,
    /// With --milvus: seconds each Milvus call may take.
    #[arg(long, default_value_t = 30.0, requires = "milvus")]
    milvus_timeout: f64,
    /// With --milvus: in-memory replicas of the collection (needs as many query nodes).
    #[arg(long, default_value_t = 1, requires = "milvus")]
    replicas: i32,
    /// With --milvus: write a new collection even when nothing changed.
    #[arg(long, requires = "milvus")]
    force: bool,
    /// Index only this split: train or test (default: every item).
    #[arg(long, value_parser = parse_split)]
    split: Option<Split>,
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// HNSW links per node and layer.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW candidate list width while building.
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// HNSW search breadth used by verification and by `serve` unless a query asks otherwise.
    #[arg(long, default_value_t = 64)]
    ef_search: usize,
    /// Verification may double `--ef-search` up to this to reach `--min-recall` (the breadth that
    /// reached it is served); equal to `--ef-search` turns that off.
    #[arg(long, default_value_t = 512)]
    max_ef_search: usize,
    /// Generations to keep on disk (the live one is never deleted); with --milvus, earlier
    /// collections kept besides the live one (default 1).
    #[arg(long)]
    keep: Option<usize>,
    /// Minimum recall@10 of HNSW against exact search on the sample; below it the new
    /// generation is not switched to.
    #[arg(long, default_value_t = 0.98)]
    min_recall: f64,
    /// Items sampled for the recall check.
    #[arg(long, default_value_t = 1000)]
    recall_sample: usize,
    /// Items tolerated that do not find themselves first.
    #[arg(long, default_value_t = 0)]
    max_self_misses: usize,
    /// Build the graph from nothing even when the live generation's graph could be reused.
    #[arg(long)]
    full: bool,
    /// Reuse the live generation's graph only while the nodes of removed and changed items
    /// (tombstones, skipped by searches) stay at or below this share of the graph.
    #[arg(long, default_value_t = 0.1)]
    max_tombstones: f64,
    /// Reuse the live generation's graph only while at most this share of the items is new or changed.
    #[arg(long, default_value_t = 0.3)]
    max_new: f64,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    test_encoder: Option<usize>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Compare run directories instead (each `runs/NAME/` with model.json and eval-train.json /
    /// eval-test.json): one table, rows = runs, columns = metrics on seen and unseen products.
    #[arg(long, num_args = 1.., conflicts_with_all = ["model", "manifest", "index", "split", "test_encoder"])]
    compare: Vec<PathBuf>,
    /// Summarise a multi-seed study instead (`DIR/NAME-s<seed>/eval-<split>.json` and
    /// `eval-backbone-<split>.json`, as scripts/study.sh writes them): mean ± std over seeds per
    /// setting, split and level (top-1, top-5, mAP, NMI).
    #[arg(long, conflicts_with_all = ["model", "manifest", "index", "split", "test_encoder", "compare"])]
    study: Option<PathBuf>,
    /// With --study: settings to compare, `A,B` (A − B and its standard error); repeatable.
    #[arg(long, requires = "study", value_name = "A,B")]
    pair: Vec<String>,
    /// Exported model `X.onnx` (its description `X.json` beside it).
    #[arg(long, required_unless_present_any = ["test_encoder", "compare", "study"])]
    model: Option<PathBuf>,
    /// Catalogue manifest; its images of the chosen split are embedded (not needed with --index
    /// or --milvus).
    #[arg(long, required_unless_present_any = ["index", "milvus", "compare", "study"])]
    manifest: Option<PathBuf>,
    /// `train` evaluates the seen products (shown in training), `test` the unseen ones, `val`
    /// the validation hold-out of the seen products (choose settings here, on a run trained with
    /// --split fit), `fit` the seen products outside it.
    #[arg(long, value_parser = parse_subset, required_unless_present_any = ["compare", "study"])]
    split: Option<Subset>,
    /// Evaluate what is served: rank through `index/<name>`'s live generation (built with the
    /// same model) via the search service, and report recall@10 of HNSW against exact search.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Evaluate what Milvus serves instead: the collection the alias `--collection` names at this
    /// address (its items and stored embeddings of the split, ranked by Milvus's HNSW search).
    #[arg(long, requires = "collection", conflicts_with_all = ["index", "compare", "study"])]
    milvus: Option<String>,
    /// With --milvus: the alias `hiercon index --milvus --collection` switches.
    #[arg(long, requires = "milvus")]
    collection: Option<String>,
    /// Write PATH.md, PATH.json and PATH-acc.png (with --compare: PATH.md and PATH.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Evaluate a seeded random sample of at most this many queries (the gallery stays whole).
    #[arg(long)]
    max_queries: Option<usize>,
    /// Seed of the query sample and of k-means.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Levels with more classes than this get no NMI (k-means cost grows with classes).
    #[arg(long, default_value_t = 2000)]
    nmi_max_classes: usize,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    test_encoder: Option<usize>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Index directory (`index/<name>`) whose live generation (CURRENT) is served.
    #[arg(long, env = "HIERCON_INDEX", required_unless_present = "milvus")]
    index: Option<PathBuf>,
    /// Serve from Milvus at this address (`HOST:PORT` of its proxy) instead of a local index:
    /// the collection the alias `--collection` names, followed across switches.
    #[arg(long, env = "HIERCON_MILVUS", requires = "collection", conflicts_with = "index")]
    milvus: Option<String>,
    /// With --milvus: the alias `hiercon index --milvus --collection` switches.
    #[arg(long, env = "HIERCON_COLLECTION", requires = "milvus")]
    collection: Option<String>,
    /// With --milvus: milliseconds each Milvus call may take (then 503 `backend_unavailable`).
    #[arg(long, default_value_t = 2000, env = "HIERCON_MILVUS_TIMEOUT_MS")]
    milvus_timeout_ms: u64,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "HIERCON_HOST")]
    host: std::net::IpAddr,
    /// Port to listen on (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080, env = "HIERCON_PORT")]
    port: u16,
    /// Exported model `X.onnx` for queries (default: the model path the live generation records).
    #[arg(long, env = "HIERCON_MODEL")]
    model: Option<PathBuf>,
    /// Key that guards /v1/admin/* (`Authorization: Bearer KEY`); unset, those routes answer 403.
    /// Prefer the environment variable to the flag (flags show in `ps`).
    #[arg(long, env = "HIERCON_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds between checks of CURRENT for a new generation (0: only reload / SIGHUP); with
    /// --milvus at most 5 (searches follow the alias by themselves; the poll retries a server
    /// that could not open and refreshes the metrics).
    #[arg(long, default_value_t = 30.0, env = "HIERCON_POLL_SECS")]
    poll_secs: f64,
    /// Largest request body in bytes (also the largest encoded image).
    #[arg(long, default_value_t = 20 * 1024 * 1024, env = "HIERCON_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Largest image in pixels (width x height), checked from the header before decoding.
    #[arg(long, default_value_t = 40_000_000, env = "HIERCON_MAX_PIXELS")]
    max_pixels: u64,
    /// Longest time decoding + embedding + searching one image may take, in milliseconds.
    #[arg(long, default_value_t = 5000, env = "HIERCON_DECODE_TIMEOUT_MS")]
    decode_timeout_ms: u64,
    /// Largest `k` a query may ask for.
    #[arg(long, default_value_t = 100, env = "HIERCON_MAX_K")]
    max_k: usize,
    /// Images decoded and embedded at once; more wait up to the decode timeout, then get 503
    /// (default: 4 x cores).
    #[arg(long, env = "HIERCON_MAX_INFLIGHT")]
    max_inflight: Option<usize>,
    /// ONNX Runtime sessions of the model: concurrent queries run on different sessions
    /// (`--threads` is per session; e.g. 4 sessions x 4 threads on 16 cores).
    #[arg(long, default_value_t = 1, env = "HIERCON_SESSIONS")]
    sessions: usize,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    test_encoder: Option<usize>,
}

/// The longest poll with --milvus.
const MILVUS_POLL: std::time::Duration = std::time::Duration::from_secs(5);

impl ServeArgs {
    fn config(&self, rt_opts: &RuntimeOptions) -> Result<ServeConfig> {
        let mut cfg = ServeConfig::new(self.index.clone().unwrap_or_default());
        if let (Some(address), Some(alias)) = (&self.milvus, &self.collection) {
            anyhow::ensure!(self.milvus_timeout_ms > 0, "--milvus-timeout-ms must be positive");
            cfg.milvus = Some(hiercon::http::MilvusTarget {
                address: address.clone(),
                alias: alias.clone(),
                timeout: std::time::Duration::from_millis(self.milvus_timeout_ms),
            });
        }
        cfg.addr = std::net::SocketAddr::new(self.host, self.port);
        cfg.encoder = match (&self.test_encoder, &self.model) {
            (Some(dim), _) => EncoderSource::Test { dim: *dim },
            (None, Some(m)) => EncoderSource::Model(m.clone()),
            (None, None) => EncoderSource::FromIndex,
        };
        cfg.runtime = *rt_opts;
        cfg.api_key = self.api_key.clone().filter(|k| !k.is_empty());
        anyhow::ensure!(self.poll_secs.is_finite() && self.poll_secs >= 0.0, "--poll-secs must be >= 0");
        cfg.poll = (self.poll_secs > 0.0).then(|| std::time::Duration::from_secs_f64(self.poll_secs));
        if cfg.milvus.is_some() {
            // Searches follow the alias by themselves; the poll only retries a server that could
            // not open yet and refreshes the metrics: keep it short.
            cfg.poll = Some(cfg.poll.unwrap_or(MILVUS_POLL).min(MILVUS_POLL));
        }
        cfg.max_body_bytes = self.max_body_bytes;
        cfg.search.limits.max_bytes = self.max_body_bytes;
        cfg.search.limits.max_pixels = self.max_pixels;
        cfg.decode_timeout = std::time::Duration::from_millis(self.decode_timeout_ms);
        cfg.max_k = self.max_k;
        cfg.sessions = self.sessions;
        if let Some(n) = self.max_inflight {
            cfg.max_inflight = n;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug)]
struct BenchLoadArgs {
    /// Index served by the server this starts.
    #[arg(long, required_unless_present = "addr")]
    index: Option<PathBuf>,
    /// Model for that server (default: the one the index records).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Test encoder width for that server (tests only).
    #[arg(long, hide = true)]
    test_encoder: Option<usize>,
    /// Drive an already running server at this address instead of starting one.
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Catalogue whose images are the queries.
    #[arg(long)]
    manifest: PathBuf,
    /// Distinct query images (the first ones of the manifest), sent round-robin.
    #[arg(long, default_value_t = 64)]
    queries: usize,
    /// Concurrency levels.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Query string of each search.
    #[arg(long, default_value = "k=10")]
    query: String,
    /// Report file.
    #[arg(long, default_value = "bench/results/load.json")]
    out: PathBuf,
    /// More flags for the server it starts, space-separated (e.g. "--sessions 4 --threads 4").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    server_args: String,
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "test" => Ok(Split::Test),
        _ => Err(format!("{s:?} is not a split (train, test)")),
    }
}

fn parse_subset(s: &str) -> Result<Subset, String> {
    s.parse::<Subset>().map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    let is_index = matches!(cli.command, Command::Index(_));
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // `hiercon index` has documented exit codes a scheduler can act on.
            match e.downcast_ref::<hiercon::Error>() {
                Some(err) if is_index => std::process::ExitCode::from(index::exit_code(err)),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let rt_opts =
        RuntimeOptions { device: cli.global.device, threads: cli.global.threads, cpu_nchwc: cli.global.cpu_nchwc };
    match cli.command {
        Command::Runtime => {
            let rt = runtime::init()?;
            println!("ONNX Runtime {} from {}", rt.version, rt.path.display());
            rt.session_builder(&rt_opts)?;
            println!("device {}: available", rt_opts.device);
            Ok(())
        }
        Command::Data(args) => data(args.source),
        Command::Train(args) => train(*args, &rt_opts),
        Command::ExportLoss(args) => export_loss(args),
        Command::Index(args) => run_index(args, &rt_opts),
        Command::Serve(args) => serve(args, &rt_opts),
        Command::BenchLoad(args) => bench_load(args),
        Command::Eval(args) => run_eval(args, &rt_opts),
        Command::Demo(args) => demo(args, &rt_opts),
        Command::Export(args) => export_model(args),
        Command::Pretrained(cmd) => pretrained(cmd),
        Command::Import(args) => import_model(args),
        Command::Model(ModelCommand::Describe(args)) => describe_model(args),
        Command::Model(ModelCommand::Quantize(args)) => quantize_model(args),
        Command::Model(ModelCommand::Rehash { model }) => {
            let bytes = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let digest = hmodel::model_digest(&model, &bytes)?;
            let path = ModelMeta::path_for(&model);
            let mut meta = ModelMeta::read(&path)?;
            if meta.digest == digest {
                println!("{}: digest already {}", path.display(), &digest[..16]);
            } else {
                println!(
                    "{}: digest {} -> {}",
                    path.display(),
                    &meta.digest[..meta.digest.len().min(16)],
                    &digest[..16]
                );
                meta.digest = digest;
                meta.write(&path)?;
            }
            Ok(())
        }
    }
}

/// `--mean` / `--std`: three values, positive std.
fn rgb3(name: &str, v: Option<&[f32]>, default: [f32; 3]) -> Result<[f32; 3]> {
    match v {
        None => Ok(default),
        Some([r, g, b]) if name != "std" || [r, g, b].iter().all(|x| **x > 0.0) => Ok([*r, *g, *b]),
        Some([_, _, _]) => anyhow::bail!("--std values must be positive"),
        Some(v) => anyhow::bail!("--{name} takes three comma-separated values (R,G,B), got {}", v.len()),
    }
}

fn import_model(args: ImportArgs) -> Result<()> {
    let o = ImportOptions { cut: args.cut, size: args.image_size, bgr: args.bgr };
    let m = Imported::load(&args.model, &o)?;
    let f = &m.file;
    let input = f.image_input()?;
    let dims: Vec<String> = input.dims.iter().map(|d| d.map_or("?".into(), |v| v.to_string())).collect();
    println!("model    {} ({}, opset {}, sha256 {})", args.model.display(), f.producer, f.opset, &m.sha256[..16]);
    println!(
        "input    `{}` [{}] {:?}, fed from images [N, 3, {s}, {s}]",
        input.name,
        dims.join(", "),
        m.layout,
        s = m.size
    );
    println!("cut      `{}`: {}", m.cut, m.cut_reason);
    println!("feature  {}-d", m.feature_dim);
    let ops: Vec<String> = m.op_counts().iter().map(|(o, n)| format!("{o} {n}")).collect();
    println!("nodes    {} of {} ({})", m.needed.len(), f.nodes.len(), ops.join(", "));
    let w = m.weights();
    let params: usize = w.values().map(|t| t.shape().iter().product::<usize>()).sum();
    println!("weights  {} tensors, {:.2} M values", w.len(), params as f64 / 1e6);
    println!("layers   {} weight layers; --freeze N keeps the first N (and what precedes them) frozen:", m.units.len());
    for (k, name, op, shape) in m.layers() {
        println!("  {k:>4}  {op:<6} {shape:<18} {name}", shape = format!("{shape:?}"));
    }
    if !args.no_check {
        let (diff, rms) = m.check_against_ort(2)?;
        println!("check    replay vs ONNX Runtime on the file, 2 images: max |diff| {diff:.2e} (feature RMS {rms:.3})");
        if diff > 1e-3 * rms.max(1.0) {
            anyhow::bail!("the replayed graph differs from ONNX Runtime by {diff:.2e}; please report this model");
        }
    }
    Ok(())
}

fn quantize_model(args: QuantizeArgs) -> Result<()> {
    use hiercon::model::quantize::{CalibrationSet, QuantizeOptions, RangeMethod, quantize};
    let set =
        CalibrationSet::sample(&args.manifest, args.split, args.calibration_images, args.check_images, args.seed)?;
    let method = match args.method.as_str() {
        "minmax" => RangeMethod::MinMax,
        _ => RangeMethod::Percentile(args.percentile),
    };
    let o =
        QuantizeOptions { method, keep_float: args.keep_float, reduce_range: args.reduce_range, ..Default::default() };
    let (meta, r) = quantize(&args.model, &args.out, &set, &o)?;
    println!(
        "wrote {} + {}: {} nodes int8 ({} BatchNorms folded, {} activations calibrated on {} `{}` images, {}), \
         digest {}",
        args.out.display(),
        ModelMeta::path_for(&args.out).display(),
        r.quantized_nodes,
        r.folded_batchnorms,
        r.quantized_tensors,
        set.calibration.len(),
        args.split.as_str(),
        method.describe(),
        &meta.digest[..16]
    );
    if !r.kept_float.is_empty() {
        println!("kept in float: {}", r.kept_float.join(", "));
    }
    println!(
        "check    float vs int8 embeddings on {} other images: cosine mean {:.4}, worst {:.4}",
        r.check_images, r.cosine_mean, r.cosine_min
    );
    Ok(())
}

fn describe_model(args: DescribeArgs) -> Result<()> {
    let o = DescribeOptions {
        size: args.size,
        mean: rgb3("mean", Some(&args.mean), hmodel::IMAGENET_MEAN)?,
        std: rgb3("std", Some(&args.std), hmodel::IMAGENET_STD)?,
        bgr: args.bgr,
        output: args.output,
        cut: args.cut,
        normalize: args.normalize,
    };
    let meta = hmodel::describe::describe(&args.model, &args.out, &o)?;
    println!(
        "wrote {} + {}: `{}` [batch, 3, {s}, {s}] -> `{}` [batch, {}], digest {}",
        args.out.display(),
        ModelMeta::path_for(&args.out).display(),
        meta.input.name,
        meta.output.name,
        meta.output.dim,
        &meta.digest[..16],
        s = meta.input.size
    );
    Ok(())
}

fn train(args: TrainArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    if args.replot {
        return Ok(hiercon::train::replot(&args.out)?);
    }
    let items = if args.steps.is_none() {
        let m = Manifest::read(&args.manifest)?;
        args.split.select(&m.items).len()
    } else {
        0
    };
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, e) => (e.unwrap_or(10.0) * items as f64 / args.batch_size.max(1) as f64).ceil() as usize,
    };
    let (arch, image_size, normalization) = match &args.init_onnx {
        Some(path) => {
            let size = match args.image_size {
                Some(s) => s,
                None => {
                    let o = ImportOptions { cut: args.cut.clone(), size: None, bgr: args.bgr };
                    Imported::load(path, &o)?.size
                }
            };
            let norm = (
                rgb3("mean", args.mean.as_deref(), hmodel::IMAGENET_MEAN)?,
                rgb3("std", args.std.as_deref(), hmodel::IMAGENET_STD)?,
            );
            (Arch::Onnx, size, Some(norm))
        }
        None => {
            let a = args.arch;
            (a, args.image_size.unwrap_or(if a.is_efficientnet() { a.native_size() } else { 64 }), None)
        }
    };
    let cfg = TrainConfig {
        manifest: args.manifest,
        split: args.split,
        loss: args.loss,
        arch,
        image_size,
        batch_size: args.batch_size,
        steps,
        optimizer: args.optimizer,
        lr: args.lr.unwrap_or(TrainConfig::default_lr(args.optimizer)),
        weight_decay: args.weight_decay.unwrap_or(TrainConfig::default_weight_decay(args.optimizer)),
        warmup: args.warmup.unwrap_or(steps / 20),
        sampler: args.sampler,
        augment: Augment::default(),
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        init: if args.init_onnx.is_some() { Init::Pretrained } else { args.init.unwrap_or(Init::default_for(arch)) },
        weights: args.weights,
        freeze: args.freeze,
        init_onnx: args.init_onnx,
        cut: args.cut,
        normalization,
        bgr: args.bgr,
        view_cache: args.view_cache,
        drop_levels: args.drop_levels,
    };
    let env =
        TrainEnv { halt_after: args.halt_after, view_cache_dir: Some(args.view_cache_dir), ..TrainEnv::default() };
    let out = hiercon::train::train(&cfg, &args.out, args.resume, rt_opts, &env)?;
    println!(
        "trained {} steps in {:.1} s, final loss {:.4}; model: {}",
        out.steps,
        out.seconds,
        out.final_loss,
        out.model.display()
    );
    Ok(())
}

fn export_model(args: ExportArgs) -> Result<()> {
    if !args.no_head {
        anyhow::bail!(
            "export without training writes the backbone's feature: pass --no-head (a projection head needs `hiercon train`)"
        );
    }
    if args.init != Init::Pretrained {
        anyhow::bail!("a zero-shot model of random weights measures nothing: use --init pretrained");
    }
    let path = hmodel::pretrained::locate(args.arch, args.weights.as_deref())?;
    let weights = hmodel::pretrained::load(&path)?;
    let cfg = ModelConfig::feature_only(args.arch, args.image_size.unwrap_or(args.arch.native_size()));
    let mut extra = serde_json::Map::new();
    // `eval --compare` shows this as the row's loss.
    extra.insert("loss".into(), serde_json::Value::String("none (zero-shot)".into()));
    extra.insert(
        "zero_shot".into(),
        serde_json::json!({
            "weights": path,
            "sha256": hmodel::pretrained::file_digest(&path)?,
            "feature": "L2-normalised global-average-pooled backbone feature, no head, no training",
        }),
    );
    let meta = hmodel::export(&cfg, &weights, &args.out, extra)?;
    println!(
        "exported {} ({}-d feature at {} px, weights {}) to {}",
        args.arch,
        meta.output.dim,
        meta.input.size,
        path.display(),
        args.out.display()
    );
    Ok(())
}

fn pretrained(cmd: PretrainedCommand) -> Result<()> {
    match cmd {
        PretrainedCommand::List => {
            for arch in hmodel::ARCHS {
                let Some(src) = hmodel::pretrained::source(arch) else { continue };
                let found = hmodel::pretrained::locate(arch, None).ok();
                println!(
                    "{:<20} {}=={} ({}) -> {}",
                    arch.name(),
                    src.package,
                    src.version,
                    src.member,
                    found.map_or("not fetched (make pretrained)".into(), |p| p.display().to_string())
                );
            }
        }
        PretrainedCommand::Info { file } => {
            let w = hmodel::pretrained::load(&file)?;
            for (n, t) in &w {
                println!("{n}\t{:?}", t.shape());
            }
            let (tensors, elements) = hmodel::pretrained::summary(&w);
            println!("{tensors} float tensors, {elements} values");
        }
        PretrainedCommand::Convert { file, arch, out } => {
            let file = match (file, arch) {
                (Some(f), _) => f,
                (None, Some(a)) => hmodel::pretrained::locate(a, None)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let w = hmodel::pretrained::load(&file)?;
            hmodel::pretrained::write_safetensors(&w, &out)?;
            let (tensors, elements) = hmodel::pretrained::summary(&w);
            println!("{} -> {} ({tensors} tensors, {elements} values)", file.display(), out.display());
        }
    }
    Ok(())
}

fn export_loss(args: ExportLossArgs) -> Result<()> {
    let shape = LossShape { batch: args.batch, columns: args.columns, dim: args.dim, classes: args.classes };
    let bytes = loss::export_loss(&args.loss, shape)?;
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(path = %args.out.display(), loss = args.loss.kind.name(), "wrote the loss model");
    Ok(())
}

fn run_index(args: IndexArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let encoder: Arc<dyn Encoder> = match (&args.test_encoder, &args.model) {
        (Some(dim), _) => Arc::new(TestEncoder::new(*dim, 0)),
        (None, Some(model)) => Arc::new(OrtEncoder::load(model, rt_opts)?),
        (None, None) => unreachable!("clap requires --model without --test-encoder"),
    };
    if let Some(address) = &args.milvus {
        return run_index_milvus(&args, address, encoder.as_ref());
    }
    let out_dir = args.out.clone().context("--out is required without --milvus")?;
    let mut cfg = IndexConfig::new(&args.manifest, &out_dir);
    cfg.model_path = args.model.clone();
    cfg.split = args.split;
    cfg.batch_size = args.batch_size;
    cfg.hnsw = index::HnswParams { m: args.m, ef_construction: args.ef_construction };
    cfg.ef_search = args.ef_search;
    cfg.keep = args.keep.unwrap_or(3);
    cfg.verify.min_recall = args.min_recall;
    cfg.verify.recall_sample = args.recall_sample;
    cfg.verify.max_self_misses = args.max_self_misses;
    cfg.verify.max_ef = args.max_ef_search;
    cfg.rebuild.full = args.full;
    cfg.rebuild.max_tombstones = args.max_tombstones;
    cfg.rebuild.max_inserted = args.max_new;
    let out = index::build::run(&cfg, encoder.as_ref())?;
    println!("{} build: {}", out.build.path, out.build.reason);
    let phases: Vec<String> = out.seconds.iter().map(|(p, s)| format!("{p} {s:.1} s")).collect();
    println!("took {}", phases.join(", "));
    println!(
        "{} is live in {}: {} items (embedded {}, reused {}, skipped {}), recall@{} {:.4} at ef {}",
        out.generation,
        out_dir.display(),
        out.count,
        out.stats.embedded,
        out.stats.reused,
        out.stats.skipped,
        out.report.recall_k,
        out.report.recall,
        out.report.ef_search
    );
    Ok(())
}

/// `hiercon index --milvus`.
fn run_index_milvus(args: &IndexArgs, address: &str, encoder: &dyn Encoder) -> Result<()> {
    let alias = args.collection.as_deref().context("--collection is required with --milvus")?;
    anyhow::ensure!(args.milvus_timeout.is_finite() && args.milvus_timeout > 0.0, "--milvus-timeout must be positive");
    let mut cfg = hiercon::milvus::MilvusIndexConfig::new(address, alias, &args.manifest);
    cfg.model_path = args.model.clone();
    cfg.split = args.split;
    cfg.batch_size = args.batch_size;
    cfg.hnsw = index::HnswParams { m: args.m, ef_construction: args.ef_construction };
    cfg.ef_search = args.ef_search;
    cfg.keep = args.keep.unwrap_or(1);
    cfg.verify.min_recall = args.min_recall;
    cfg.verify.recall_sample = args.recall_sample;
    cfg.verify.max_self_misses = args.max_self_misses;
    cfg.verify.max_ef = args.max_ef_search;
    cfg.timeout = std::time::Duration::from_secs_f64(args.milvus_timeout);
    cfg.replicas = args.replicas;
    cfg.force = args.force;
    let out = hiercon::milvus::index::run(&cfg, encoder)?;
    let phases: Vec<String> = out.seconds.iter().map(|(p, s)| format!("{p} {s:.1} s")).collect();
    println!("took {}", phases.join(", "));
    match &out.verify {
        None => println!(
            "nothing changed: {alias} still names {} ({} items, reused {}); nothing written",
            out.collection, out.count, out.reused
        ),
        Some(v) => println!(
            "full build: {alias} now names {} (was {}): {} items (embedded {}, reused {}, skipped {}), recall@{} {:.4} at ef {}{}",
            out.collection,
            out.previous.as_deref().unwrap_or("nothing"),
            out.count,
            out.embedded,
            out.reused,
            out.skipped,
            v.recall_k,
            v.recall,
            v.ef_search,
            if out.dropped.is_empty() { String::new() } else { format!("; dropped {}", out.dropped.join(", ")) }
        ),
    }
    Ok(())
}

/// `hiercon eval`: one evaluation, or a comparison of run directories.
fn run_eval(args: EvalArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    if let Some(dir) = &args.study {
        let pairs: Vec<(String, String)> = args
            .pair
            .iter()
            .map(|p| {
                p.split_once(',')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("--pair {p:?}: expected two settings as A,B"))
            })
            .collect::<Result<_>>()?;
        let summary = eval::study::summarize(&eval::study::read_study(dir)?, &pairs);
        println!("{}", summary.to_markdown());
        if let Some(prefix) = &args.report {
            for f in summary.write(prefix)? {
                eprintln!("wrote {}", f.display());
            }
        }
        return Ok(());
    }
    if !args.compare.is_empty() {
        let cmp = eval::compare::compare(&args.compare)?;
        println!("{}", cmp.to_markdown());
        if let Some(prefix) = &args.report {
            for f in cmp.write(prefix)? {
                eprintln!("wrote {}", f.display());
            }
        }
        return Ok(());
    }
    let split = args.split.context("--split is required")?;
    let encoder: Arc<dyn Encoder> = match (&args.test_encoder, &args.model) {
        (Some(dim), _) => Arc::new(TestEncoder::new(*dim, 0)),
        (None, Some(model)) => Arc::new(OrtEncoder::load(model, rt_opts)?),
        (None, None) => unreachable!("clap requires --model without --test-encoder"),
    };
    let mut model = EvaluatedModel {
        path: args.model.clone(),
        digest: encoder.digest().to_string(),
        dim: encoder.dim(),
        ..Default::default()
    };
    if let Some(path) = &args.model {
        let meta = ModelMeta::read(&ModelMeta::path_for(path))?;
        model.arch = Some(meta.arch);
        model.loss = meta.extra.get("loss").and_then(|v| v.as_str()).map(String::from);
    }
    let mut cfg = EvalConfig::new(split);
    cfg.max_queries = args.max_queries;
    cfg.seed = args.seed;
    cfg.nmi_max_classes = args.nmi_max_classes;
    let report = match &args.index {
        None if args.milvus.is_some() => {
            let (address, alias) =
                (args.milvus.as_deref().unwrap_or_default(), args.collection.as_deref().unwrap_or_default());
            let backend = hiercon::milvus::MilvusBackend::new(address, alias, std::time::Duration::from_secs(60))?;
            let data = eval::data_from_milvus(&backend, split)?;
            let service = Service::open_milvus(backend, encoder.clone(), SearchConfig::default())?;
            eval::evaluate(&data, Retrieval::Served(&service), &cfg, model)?
        }
        Some(index_dir) => {
            let service = Service::open(index_dir.clone(), encoder.clone(), SearchConfig::default())?;
            let g = service.local().context("a local index")?;
            if let Some(m) = &args.manifest
                && std::path::absolute(m).ok().as_ref() != Some(&g.meta.manifest)
            {
                tracing::warn!(
                    given = %m.display(), indexed = %g.meta.manifest.display(),
                    "--manifest differs from the manifest the index was built from; evaluating the index's items"
                );
            }
            let data = eval::data_from_generation(&g, split)?;
            eval::evaluate(&data, Retrieval::Served(&service), &cfg, model)?
        }
        None => {
            let manifest = args.manifest.as_ref().context("--manifest is required without --index")?;
            let data = eval::embed_manifest(manifest, split, encoder.as_ref(), args.batch_size, &Limits::default())?;
            eval::evaluate(&data, Retrieval::Exact, &cfg, model)?
        }
    };
    println!("{}", report.to_markdown());
    if let Some(prefix) = &args.report {
        for f in report.write(prefix)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

/// `hiercon serve`: bind, print the address, serve until SIGTERM / Ctrl-C.
fn serve(args: ServeArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let cfg = args.config(rt_opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = http::Server::bind(cfg).await?;
        let addr = server.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        server.run(http::shutdown_signal()).await?;
        Ok(())
    })
}

/// `hiercon bench-load`: closed-loop load over loopback, one JSON report.
fn bench_load(args: BenchLoadArgs) -> Result<()> {
    use std::io::BufRead as _;
    let manifest = Manifest::read(&args.manifest)?;
    anyhow::ensure!(args.queries > 0 && !manifest.items.is_empty(), "no query images");
    let bodies: Vec<Vec<u8>> = manifest
        .items
        .iter()
        .take(args.queries)
        .map(|it| std::fs::read(manifest.image_path(it)).with_context(|| format!("reading the image of {}", it.id)))
        .collect::<Result<_>>()?;
    let content_type = match bodies[0].get(..4) {
        Some([0x89, b'P', b'N', b'G']) => "image/png",
        Some([0xFF, 0xD8, 0xFF, _]) => "image/jpeg",
        _ => "image/webp",
    };
    // The server under test is a second process, so client and server do not share a runtime.
    let mut child = None;
    let addr = match (args.addr, &args.index) {
        (Some(a), _) => a,
        (None, Some(index)) => {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(["serve", "--port", "0", "--host", "127.0.0.1", "--poll-secs", "0", "--index"]).arg(index);
            if let Some(m) = &args.model {
                cmd.arg("--model").arg(m);
            }
            if let Some(d) = args.test_encoder {
                cmd.args(["--test-encoder", &d.to_string()]);
            }
            cmd.args(args.server_args.split_whitespace());
            cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
            let mut c = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting hiercon serve")?;
            let mut line = String::new();
            std::io::BufReader::new(c.stdout.take().expect("piped")).read_line(&mut line)?;
            let addr = line.trim().strip_prefix("listening on http://").map(str::parse).transpose()?;
            child = Some(c);
            addr.ok_or_else(|| anyhow::anyhow!("the server did not start (it printed {line:?})"))?
        }
        (None, None) => unreachable!("clap requires --index without --addr"),
    };
    let plan = http::load::LoadPlan {
        addr,
        path: format!("/v1/search?{}", args.query),
        content_type: content_type.into(),
        bodies,
        duration: std::time::Duration::from_secs_f64(args.seconds),
        warmup: 5,
    };
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let r = http::load::run_level(&plan, c);
        eprintln!(
            "concurrency {:>3}: {:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            c, r.throughput_rps, r.p50_ms, r.p99_ms, r.errors
        );
        levels.push(r);
    }
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    let report = serde_json::json!({
        "bench": "load",
        "machine": format!("{}; client and server on the same machine over loopback", runtime::machine_description()),
        "index": args.index, "model": args.model, "test_encoder": args.test_encoder,
        "manifest": args.manifest, "queries": plan.bodies.len(),
        "mean_query_bytes": plan.bodies.iter().map(Vec::len).sum::<usize>() / plan.bodies.len(),
        "content_type": content_type, "request": plan.path, "seconds_per_level": args.seconds,
        "server_args": args.server_args,
        "levels": levels,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", args.out.display());
    let errors: usize = levels.iter().map(|l| l.errors).sum();
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}

/// `hiercon data ...`: import a source and print its summary.
fn data(source: DataSource) -> Result<()> {
    let manifest = match source {
        DataSource::Emoji { packages, out, split } => emoji::import(&packages, &out, &split.into())
            .with_context(|| format!("importing emoji from {} (run `make fetch-emoji`)", packages.display()))?,
        DataSource::FashionMnist { source, out, split, split_args } => {
            let split = match split.as_str() {
                "hashed" => fashion_mnist::FashionSplit::Hashed(split_args.into()),
                _ => fashion_mnist::FashionSplit::Official,
            };
            fashion_mnist::import(&source, &out, &split)
                .with_context(|| format!("importing Fashion-MNIST from {}", source.display()))?
        }
        DataSource::Folder { csv, out, split } => folder::import(&csv, &out, &split.into())
            .with_context(|| format!("importing images listed in {}", csv.display()))?,
    };
    println!("{}\n{}", manifest.dir.join(hiercon::catalogue::MANIFEST_FILE).display(), manifest.summary());
    Ok(())
}

/// `hiercon demo`: summarise the emoji catalogue, index it with the shipped model, serve it.
fn demo(args: DemoArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let manifest = PathBuf::from(DEMO_MANIFEST);
    let model = PathBuf::from(DEMO_MODEL);
    if !manifest.is_file() {
        anyhow::bail!("{DEMO_MANIFEST} not found: run `make demo` (or `make data`) in the repository first");
    }
    if !model.is_file() {
        anyhow::bail!("{DEMO_MODEL} not found: run `hiercon demo` from the repository root");
    }
    println!("{DEMO_MANIFEST}\n{}", Manifest::read(&manifest)?.summary());
    // Index with the shipped model (a re-run reuses the cached embeddings), then serve it.
    run_index(
        IndexArgs::parse_from_args(&["--manifest", DEMO_MANIFEST, "--model", DEMO_MODEL, "--out", DEMO_INDEX])?,
        rt_opts,
    )?;
    let serve_args = ServeArgs::parse_from_args(&[
        "--index",
        DEMO_INDEX,
        "--host",
        &args.host.to_string(),
        "--port",
        &args.port.to_string(),
    ])?;
    println!("open http://{}:{}/ in a browser (Ctrl-C stops)", args.host, args.port);
    serve(serve_args, rt_opts)
}

/// Parses one subcommand's flags alone (`demo` reuses `index` and `serve` with fixed arguments).
trait ParseFromArgs: Sized {
    fn parse_from_args(args: &[&str]) -> Result<Self>;
}

impl<T: clap::FromArgMatches + clap::Args> ParseFromArgs for T {
    fn parse_from_args(args: &[&str]) -> Result<Self> {
        let cmd = T::augment_args(clap::Command::new("hiercon"));
        let matches = cmd.try_get_matches_from(std::iter::once("hiercon").chain(args.iter().copied()))?;
        Ok(T::from_arg_matches(&matches)?)
    }
}
