//! The fuzz campaign: `cargo run --release --example fuzz -- --inputs 1000000` (`make fuzz`).
//!
//! Runs the seeded mutational harness of `fuzz/harness.rs` over its three targets (`decode`,
//! `manifest`, `upload`) from the seed corpus in `fuzz/corpus/`, prints a table, writes
//! `bench/results/fuzz.json`, saves failing inputs under `fuzz/crashes/`, and exits 1 if any
//! input panicked or got a bad answer. `--write-corpus` regenerates the seed corpus.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    /// Seed of the mutator (a run is reproducible from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only these targets (decode, manifest, upload).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The JSON report.
    #[arg(long, default_value = "bench/results/fuzz.json")]
    out: PathBuf,
    /// Regenerate fuzz/corpus/ and exit.
    #[arg(long)]
    write_corpus: bool,
}

fn write_corpus(root: &Path) {
    use image::{ImageFormat, Luma, Rgb, Rgba};
    let img = root.join("images");
    std::fs::create_dir_all(&img).unwrap();
    let rgb = image::RgbImage::from_fn(17, 11, |x, y| Rgb([(x * 15) as u8, (y * 23) as u8, 200]));
    rgb.save_with_format(img.join("rgb.png"), ImageFormat::Png).unwrap();
    rgb.save_with_format(img.join("rgb.jpg"), ImageFormat::Jpeg).unwrap();
    rgb.save_with_format(img.join("rgb.webp"), ImageFormat::WebP).unwrap();
    let rgba = image::RgbaImage::from_fn(9, 13, |x, y| Rgba([200, (x * 20) as u8, 30, (y * 19) as u8]));
    rgba.save_with_format(img.join("rgba.png"), ImageFormat::Png).unwrap();
    rgba.save_with_format(img.join("rgba.webp"), ImageFormat::WebP).unwrap();
    let grey = image::GrayImage::from_fn(8, 8, |x, y| Luma([((x + y) * 16) as u8]));
    grey.save_with_format(img.join("grey.png"), ImageFormat::Png).unwrap();
    let deep = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(5, 7, |x, y| {
        Rgb([x as u16 * 9000, y as u16 * 7000, 65535])
    });
    deep.save_with_format(img.join("rgb16.png"), ImageFormat::Png).unwrap();
    let man = root.join("manifest");
    std::fs::create_dir_all(&man).unwrap();
    let line = |id: &str, cat: &str, extra: &str| {
        format!(
            r#"{{"id":"{id}","image":"img/{id}.png","category":"{cat}","product":"p-{id}","variation":"v1","view":"google","split":"train"{extra}}}"#
        )
    };
    std::fs::write(
        man.join("small.jsonl"),
        [line("a", "Smileys & Emotion/face-smiling", ""), line("b", "Animals/mammal", r#","role":"query""#)].join("\n")
            + "\n",
    )
    .unwrap();
    std::fs::write(
        man.join("unicode.jsonl"),
        [
            line("ü-1", "Объекты/кухня", r#","role":"gallery""#),
            line("x", "a/b/c/d", r#","split":"test""#),
            String::new(),
            line("y", "a/b", ""),
        ]
        .join("\n"),
    )
    .unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    if a.write_corpus {
        write_corpus(&root.join("corpus"));
        println!("wrote {}", root.join("corpus").display());
        return;
    }
    let want = |t: &str| a.targets.is_empty() || a.targets.iter().any(|x| x == t);
    let crashes = root.join("crashes");
    let images = harness::corpus(&root.join("corpus/images"));
    let mut reports = Vec::new();
    if want("decode") {
        reports.push(harness::decode(&images, a.inputs, a.seed, &crashes));
    }
    if want("manifest") {
        reports.push(harness::manifest(&harness::corpus(&root.join("corpus/manifest")), a.inputs, a.seed, &crashes));
    }
    if want("upload") {
        let dir = tempfile::tempdir().unwrap();
        let app = harness::fixture(dir.path());
        reports.push(harness::upload(app, &images, a.inputs, a.seed, &crashes).await);
    }
    println!("| target | inputs | seconds | inputs/s | panics | bad answers | distinct outcomes |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} |",
            r.target,
            r.inputs,
            r.seconds,
            r.inputs as f64 / r.seconds.max(1e-9),
            r.panics,
            r.bad_answers,
            r.outcomes.len()
        );
    }
    for r in &reports {
        println!("\n{} outcomes:", r.target);
        for (k, v) in &r.outcomes {
            println!("  {v:>9}  {k}");
        }
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let machine = hiercon::runtime::machine_description();
    let json = serde_json::json!({ "machine": machine, "seed": a.seed, "reports": reports });
    std::fs::write(&a.out, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("\nreport: {}", a.out.display());
    if reports.iter().any(|r| !r.clean()) {
        eprintln!("failing inputs saved under {}", crashes.display());
        std::process::exit(1);
    }
}
