//! A short run of the fuzz harness (`fuzz/harness.rs`; the million-input campaign is
//! `make fuzz`): 3,000 mutated inputs per target from the committed seed corpus, none panics,
//! every upload answer is below 500 with the error shape, and the mutations reach past the first
//! checks (some inputs still decode, parse or get a 200).

#[path = "../../fuzz/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn decoder_and_manifest_reader_survive_mutated_inputs() {
    let crashes = tempfile::tempdir().unwrap();
    let images = harness::corpus(&root().join("fuzz/corpus/images"));
    let r = harness::decode(&images, 3000, 11, crashes.path());
    assert!(r.clean(), "{r:?}");
    assert!(r.outcomes.get("ok").is_some_and(|&n| n > 50) && r.outcomes.len() >= 3, "{:?}", r.outcomes);
    let manifests = harness::corpus(&root().join("fuzz/corpus/manifest"));
    let r = harness::manifest(&manifests, 3000, 12, crashes.path());
    assert!(r.clean(), "{r:?}");
    assert!(r.outcomes.get("ok").is_some_and(|&n| n > 50) && r.outcomes.contains_key("Manifest"), "{:?}", r.outcomes);
}

#[tokio::test]
async fn the_upload_handler_answers_mutated_bodies_with_specific_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let app = harness::fixture(dir.path());
    let images = harness::corpus(&root().join("fuzz/corpus/images"));
    let r = harness::upload(app, &images, 3000, 13, dir.path()).await;
    assert!(r.clean(), "{r:?}");
    assert!(r.outcomes.contains_key("200"), "{:?}", r.outcomes);
    assert!(r.outcomes.keys().filter(|k| k.starts_with('4')).count() >= 4, "{:?}", r.outcomes);
}
