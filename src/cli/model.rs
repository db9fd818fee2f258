//! `hiercon import`, `hiercon model describe | quantize | rehash` and `hiercon pretrained`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hiercon::catalogue::Subset;
use hiercon::encoder::ModelMeta;
use hiercon::model::describe::DescribeOptions;
use hiercon::model::imported::{ImportOptions, Imported};
use hiercon::model::{self as hmodel, Arch};
use std::path::{Path, PathBuf};

use super::{parse_subset, rgb3};

#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    /// The ONNX model (opset 9 or later; external data is read from beside it).
    pub(crate) model: PathBuf,
    /// Image side the shapes are folded at (default: the file's fixed size, or 224).
    #[arg(long)]
    pub(crate) image_size: Option<usize>,
    /// The feature: a value name, or a node name meaning its first output; `output` for the
    /// graph's output (default: the input of the last Gemm / MatMul after the global pooling).
    #[arg(long)]
    pub(crate) cut: Option<String>,
    /// The model wants BGR channels (reversed in front of it).
    #[arg(long)]
    pub(crate) bgr: bool,
    /// Skip the comparison with ONNX Runtime.
    #[arg(long)]
    pub(crate) no_check: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ModelCommand {
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
pub(crate) struct DescribeArgs {
    /// The ONNX model.
    pub(crate) model: PathBuf,
    /// Input side in pixels (default: the file's fixed size, or 224).
    #[arg(long)]
    pub(crate) size: Option<usize>,
    /// Per-channel mean on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', default_values_t = hmodel::IMAGENET_MEAN, value_name = "R,G,B")]
    pub(crate) mean: Vec<f32>,
    /// Per-channel std on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', default_values_t = hmodel::IMAGENET_STD, value_name = "R,G,B")]
    pub(crate) std: Vec<f32>,
    /// The model wants BGR channels (Caffe models): the channels are reversed after
    /// normalisation, so --mean / --std stay in RGB order.
    #[arg(long)]
    pub(crate) bgr: bool,
    /// The graph output to embed with (default: the only one).
    #[arg(long, conflicts_with = "cut")]
    pub(crate) output: Option<String>,
    /// An inner value (or node name) to embed with instead, e.g. the classifier's input.
    #[arg(long)]
    pub(crate) cut: Option<String>,
    /// Also divide by the L2 norm inside the graph (the encoder normalises rows either way).
    #[arg(long)]
    pub(crate) normalize: bool,
    /// The servable model to write (`OUT.json` beside it).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct QuantizeArgs {
    /// The float model; its description is the `.json` beside it.
    pub(crate) model: PathBuf,
    /// The catalogue whose images calibrate the activation ranges.
    #[arg(long)]
    pub(crate) manifest: PathBuf,
    /// Where the calibration images come from: train (default), fit or val. Never test: the
    /// unseen split stays unseen.
    #[arg(long, default_value = "train", value_parser = parse_subset)]
    pub(crate) split: Subset,
    /// Calibration images (a seeded sample of the split).
    #[arg(long, default_value_t = 128)]
    pub(crate) calibration_images: usize,
    /// Other images of the split on which the int8 model is compared with the float one.
    #[arg(long, default_value_t = 64)]
    pub(crate) check_images: usize,
    /// Seed of the sample.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// How an activation's range is chosen: `minmax` (the smallest and largest value seen) or
    /// `percentile` (the central --percentile % of the values).
    #[arg(long, default_value = "minmax", value_parser = ["minmax", "percentile"])]
    pub(crate) method: String,
    /// With --method percentile: the share of values inside the range, in (50, 100].
    #[arg(long, default_value_t = 99.999)]
    pub(crate) percentile: f64,
    /// Leave this node in float (its name, or the name of its output); repeatable.
    #[arg(long, value_name = "NODE")]
    pub(crate) keep_float: Vec<String>,
    /// Weights in 7 bits (±63): for CPUs without VNNI, whose int8 dot product can saturate.
    #[arg(long)]
    pub(crate) reduce_range: bool,
    /// The int8 model to write (`OUT.json` beside it).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub(crate) enum PretrainedCommand {
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

pub(crate) fn import_model(args: ImportArgs) -> Result<()> {
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

pub(crate) fn quantize_model(args: QuantizeArgs) -> Result<()> {
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

pub(crate) fn describe_model(args: DescribeArgs) -> Result<()> {
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

pub(crate) fn pretrained(cmd: PretrainedCommand) -> Result<()> {
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

/// `hiercon model rehash`: recompute a model file's digest into its description.
pub(crate) fn rehash_model(model: &Path) -> Result<()> {
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let digest = hmodel::model_digest(model, &bytes)?;
    let path = ModelMeta::path_for(model);
    let mut meta = ModelMeta::read(&path)?;
    if meta.digest == digest {
        println!("{}: digest already {}", path.display(), &digest[..16]);
    } else {
        println!("{}: digest {} -> {}", path.display(), &meta.digest[..meta.digest.len().min(16)], &digest[..16]);
        meta.digest = digest;
        meta.write(&path)?;
    }
    Ok(())
}
