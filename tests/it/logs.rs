//! What `hiercon` writes to stderr: plain text without terminal escape sequences when stderr is
//! a file, and one JSON object a line with `--log-format json`.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::index::{Catalogue, DIM};

/// `hiercon index` over a small catalogue with stderr sent to a file, as `2> file` does.
fn index_to_file(c: &Catalogue, out: &str, extra: &[&str]) -> String {
    let log = c.dir.path().join(format!("{out}.log"));
    let status = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(extra)
        .args(["index", "--test-encoder", &DIM.to_string(), "--manifest"])
        .arg(c.manifest())
        .arg("--out")
        .arg(c.dir.path().join(out))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn stderr_in_a_file_has_no_escape_sequences() {
    let c = Catalogue::new(2);
    let text = index_to_file(&c, "plain", &[]);
    assert!(text.contains("phase: embedding"), "{text}");
    assert!(!text.contains('\u{1b}'), "escape sequences in a log file:\n{text:?}");
    // The run's span names the model by a short digest; the whole digest is logged once.
    let digest_lines = text.lines().filter(|l| l.contains("digest=")).count();
    assert_eq!(digest_lines, 1, "{text}");
}

#[test]
fn json_log_lines_parse_and_carry_level_message_and_span() {
    let c = Catalogue::new(2);
    let text = index_to_file(&c, "json", &["--log-format", "json"]);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(), "{l}");
    }
    let embedding = lines.iter().find(|l| l["message"] == "phase: embedding").expect("the embedding phase is logged");
    assert_eq!(embedding["span"]["name"], "run");
    assert_eq!(embedding["span"]["model"].as_str().map(str::len), Some(12), "{embedding}");
    assert!(embedding["items"].as_u64().is_some(), "event fields are top-level: {embedding}");
}
