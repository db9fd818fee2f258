//! `hiercon serve` through the router (`oneshot`, no socket): every route and every bad input,
//! reloads, overload, and a seeded fuzz of `/v1/search`. `serve.rs` runs the real binary.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use hiercon::catalogue::Item;
use hiercon::http::load::{self, multipart};
use hiercon::http::{AppState, EncoderSource, ServeConfig, router};
use hiercon::index::build;
use hiercon::index::store::IndexDir;
use hiercon::search::{SearchConfig, Service};
use http_body_util::BodyExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tower::ServiceExt;

use crate::index::{Catalogue, DIM, draw, encoder};

pub(crate) const KEY: &str = "s3cret-key";
/// Small limits so the limit tests need small bodies.
const MAX_BODY: usize = 64 * 1024;
const MAX_PIXELS: u64 = 100_000;

fn config(c: &Catalogue) -> ServeConfig {
    let mut cfg = ServeConfig::new(c.index_dir());
    cfg.encoder = EncoderSource::Test { dim: DIM };
    cfg.api_key = Some(KEY.into());
    cfg.poll = None;
    cfg.max_body_bytes = MAX_BODY;
    cfg.search = SearchConfig::default();
    cfg.search.limits.max_bytes = MAX_BODY;
    cfg.search.limits.max_pixels = MAX_PIXELS;
    cfg
}

/// A catalogue with a live generation, and a router serving it.
fn fixture() -> (Catalogue, AppState, Router) {
    let c = Catalogue::new(3);
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let cfg = config(&c);
    let service = Service::open(c.index_dir(), encoder(), cfg.search.clone()).unwrap();
    let state = AppState::with_service(cfg, service);
    let app = router(state.clone());
    (c, state, app)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts the error shape and returns its code.
    fn error_code(&self) -> String {
        let j = self.json();
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        j["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {j}")).to_string()
    }
}

async fn call(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body }
}

async fn get(app: &Router, uri: &str) -> Answer {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, uri: &str, content_type: &str, body: Vec<u8>) -> Answer {
    let mut r = Request::post(uri);
    if !content_type.is_empty() {
        r = r.header(header::CONTENT_TYPE, content_type);
    }
    call(app, r.body(Body::from(body)).unwrap()).await
}

pub(crate) fn png(c: &Catalogue, id: &str) -> Vec<u8> {
    std::fs::read(c.image_path(id)).unwrap()
}

pub(crate) fn item<'a>(c: &'a Catalogue, id: &str) -> &'a Item {
    c.items.iter().find(|i| i.id == id).unwrap()
}

pub(crate) fn hit_ids(j: &Value) -> Vec<String> {
    j["hits"].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn search_by_raw_image_and_by_multipart_finds_the_item_first() {
    let (c, _, app) = fixture();
    let id = "p4-v1-w0";
    let raw = post(&app, "/v1/search", "image/png", png(&c, id)).await;
    assert_eq!(raw.status, StatusCode::OK, "{}", String::from_utf8_lossy(&raw.body));
    let j = raw.json();
    assert_eq!(hit_ids(&j)[0], id);
    assert_eq!(j["hits"].as_array().unwrap().len(), 10, "k defaults to 10");
    assert_eq!(j["generation"], "gen-1");
    assert_eq!(j["path"], "exact", "a small index is scanned");
    assert_eq!(j["allowed"], c.items.len());
    assert!(j["took_ms"].as_f64().unwrap() >= 0.0);
    let first = &j["hits"][0];
    let it = item(&c, id);
    assert!((first["score"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert_eq!((first["category"].as_str(), first["product"].as_str()), (Some(&*it.category), Some(&*it.product)));
    assert_eq!(first["variation"], it.variation.as_str());
    assert_eq!(first["image_url"], format!("/v1/images/{id}"));
    let scores: Vec<f64> = j["hits"].as_array().unwrap().iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // The vote is a category of the catalogue with a share in (0, 1].
    let p = &j["predicted"];
    let conf = p["confidence"].as_f64().unwrap();
    assert!(conf > 0.0 && conf <= 1.0 + 1e-6, "{p}");
    assert!(c.items.iter().any(|i| p["category"] == i.category.as_str()), "{p}");
    assert_eq!(p["neighbours"], 10);

    let (ct, body) = multipart("image", "q.png", "image/png", &png(&c, id));
    let mp = post(&app, "/v1/search?k=3", &ct, body).await;
    assert_eq!(mp.status, StatusCode::OK);
    let mj = mp.json();
    assert_eq!(hit_ids(&mj), hit_ids(&j)[..3].to_vec(), "multipart and raw bodies answer alike");
    let octet = post(&app, "/v1/search?k=3", "application/octet-stream", png(&c, id)).await;
    assert_eq!(hit_ids(&octet.json()), hit_ids(&mj));
}

#[tokio::test]
async fn search_parameters_filter_group_and_force_exact() {
    let (c, _, app) = fixture();
    let q = png(&c, "p0-v0-w1");
    let search = |uri: String| {
        let (app, q) = (app.clone(), q.clone());
        async move {
            let a = post(&app, &uri, "image/png", q).await;
            assert_eq!(a.status, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&a.body));
            a.json()
        }
    };
    let j = search("/v1/search?k=100&category=garden".into()).await;
    let garden = c.items.iter().filter(|i| i.category.starts_with("garden/")).count();
    assert_eq!((j["hits"].as_array().unwrap().len(), j["allowed"].as_u64().unwrap() as usize), (garden, garden));
    assert!(j["hits"].as_array().unwrap().iter().all(|h| h["category"].as_str().unwrap().starts_with("garden/")));
    // Category paths are normalised: spaces and stray slashes do not matter.
    let j2 = search("/v1/search?k=100&category=%20garden%20/".into()).await;
    assert_eq!(hit_ids(&j2), hit_ids(&j));

    let j = search("/v1/search?k=100&group_by=product".into()).await;
    let products: Vec<&str> = j["hits"].as_array().unwrap().iter().map(|h| h["product"].as_str().unwrap()).collect();
    let distinct: std::collections::HashSet<_> = products.iter().collect();
    assert_eq!(distinct.len(), products.len(), "one hit per product");
    assert_eq!(products.len(), c.items.iter().map(|i| &i.product).collect::<std::collections::HashSet<_>>().len());

    let j = search("/v1/search?k=5&group_by=category".into()).await;
    let cats: std::collections::HashSet<_> =
        j["hits"].as_array().unwrap().iter().map(|h| h["category"].clone()).collect();
    assert_eq!(cats.len(), 5);

    let j = search("/v1/search?product=p2&variation=v1".into()).await;
    let ids = hit_ids(&j);
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| id.starts_with("p2-v1-")), "{ids:?}");

    let j = search("/v1/search?k=4&exact=true&ef=16".into()).await;
    assert_eq!(j["path"], "exact");
    assert_eq!(hit_ids(&j)[0], "p0-v0-w1");
}

/// Titles and attributes come back in every hit and item; `attr.NAME` filters match exactly
/// (text, numbers by value, booleans) together with the other filters; the OpenAPI document
/// lists the generation's attributes.
#[tokio::test]
async fn titles_and_attributes_in_hits_items_filters_and_the_document() {
    let (c, _, app) = fixture();
    let q = png(&c, "p3-v1-w0");
    let search = |uri: &str| {
        let (app, q, uri) = (app.clone(), q.clone(), uri.to_string());
        async move {
            let a = post(&app, &uri, "image/png", q).await;
            assert_eq!(a.status, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&a.body));
            a.json()
        }
    };
    let j = search("/v1/search?k=3").await;
    let first = &j["hits"][0];
    assert_eq!(first["id"], "p3-v1-w0");
    assert_eq!(first["title"], "p3 sport");
    assert_eq!(first["attributes"], serde_json::json!({"brand": "globex", "price": 3, "sale": true}));
    let it = get(&app, "/v1/items/p3-v1-w0").await.json();
    assert_eq!((&it["title"], &it["attributes"]["price"]), (&first["title"], &Value::from(3)));

    let want = |f: &dyn Fn(&Item) -> bool| {
        let mut ids: Vec<String> = c.items.iter().filter(|i| f(i)).map(|i| i.id.clone()).collect();
        ids.sort();
        ids
    };
    let got = |j: &Value| {
        let mut ids = hit_ids(j);
        ids.sort();
        ids
    };
    let acme = search("/v1/search?k=100&attr.brand=acme").await;
    assert_eq!(got(&acme), want(&|i| i.attributes["brand"].to_string() == "acme"));
    assert_eq!(acme["allowed"].as_u64().unwrap() as usize, got(&acme).len());
    // Numbers compare by value, booleans by their words; every filter must hold.
    let cheap = search("/v1/search?k=100&attr.price=4.0&attr.sale=true").await;
    assert_eq!(got(&cheap), want(&|i| i.product == "p4" && i.variation == "v1"));
    assert!(!got(&cheap).is_empty());
    let garden = search("/v1/search?k=100&category=garden&attr.brand=globex&group_by=product").await;
    let hits = garden["hits"].as_array().unwrap();
    assert!(!hits.is_empty());
    assert!(
        hits.iter()
            .all(|h| h["category"].as_str().unwrap().starts_with("garden/") && h["attributes"]["brand"] == "globex")
    );
    // A value no item has is an empty answer, not an error.
    let none = search("/v1/search?attr.brand=initech").await;
    assert_eq!((none["allowed"].as_u64(), none["hits"].as_array().unwrap().len()), (Some(0), 0));

    let o = get(&app, "/openapi.json").await.json();
    let names: Vec<String> = o["paths"]["/v1/search"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for n in ["attr.brand", "attr.price", "attr.sale"] {
        assert!(names.contains(&n.to_string()), "{n} not documented: {names:?}");
    }
    let id = &o["paths"]["/v1/items/{id}"]["get"]["parameters"][0]["example"];
    assert_eq!(get(&app, &format!("/v1/items/{}", id.as_str().unwrap())).await.status, StatusCode::OK);
}

/// Every bad input gets its own 4xx and the JSON error shape.
#[tokio::test]
async fn bad_search_input_gets_its_own_client_error() {
    let (c, _, app) = fixture();
    let good = png(&c, "p1-v0-w0");
    let big = image::RgbImage::from_pixel(400, 400, image::Rgb([9, 9, 9]));
    let mut big_png = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut big_png), image::ImageFormat::Png).unwrap();
    assert!(big_png.len() < MAX_BODY, "the pixel test must not trip the byte limit");
    let mut gif = Vec::new();
    image::RgbImage::new(4, 4).write_to(&mut std::io::Cursor::new(&mut gif), image::ImageFormat::Gif).unwrap_or(());
    if gif.is_empty() {
        gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    }
    let (mp_ct, mp_wrong_field) = multipart("picture", "q.png", "image/png", &good);
    let (mp_ct2, mut mp_broken) = multipart("image", "q.png", "image/png", &good);
    mp_broken.truncate(mp_broken.len() - 20);
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("/v1/search?k=0", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?k=101", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?k=ten", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?k=1&k=2", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?ef=0", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?group_by=shop", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?exact=maybe", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?categroy=garden", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?group_by=", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?exact=1", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?product=", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?attr.colour=red", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?attr.=red", "image/png", good.clone(), 400, "invalid_parameter"),
        ("/v1/search?category=garden/roses", "image/png", good.clone(), 404, "unknown_category"),
        ("/v1/search?category=gard", "image/png", good.clone(), 404, "unknown_category"),
        ("/v1/search?product=p999", "image/png", good.clone(), 404, "unknown_product"),
        ("/v1/search?variation=v9", "image/png", good.clone(), 404, "unknown_variation"),
        ("/v1/search", "image/png", Vec::new(), 400, "missing_image"),
        ("/v1/search", "text/plain", good.clone(), 415, "unsupported_media_type"),
        ("/v1/search", "", good.clone(), 415, "unsupported_media_type"),
        ("/v1/search", "image/png", b"definitely not an image".to_vec(), 415, "unsupported_image_format"),
        ("/v1/search", "image/gif", gif, 415, "unsupported_image_format"),
        ("/v1/search", "image/png", good[..good.len() / 2].to_vec(), 422, "image_decode_failed"),
        ("/v1/search", "image/png", vec![7u8; MAX_BODY + 1], 413, "body_too_large"),
        ("/v1/search", "image/png", big_png, 413, "image_too_many_pixels"),
        ("/v1/search", &mp_ct, mp_wrong_field, 400, "missing_image"),
        ("/v1/search", &mp_ct2, mp_broken, 400, "invalid_multipart"),
        ("/v1/search", "multipart/form-data", good.clone(), 400, "invalid_multipart"),
    ];
    for (uri, ct, body, status, code) in cases {
        let a = post(&app, uri, ct, body).await;
        assert_eq!(a.status.as_u16(), status, "{uri} {ct}: {}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.error_code(), code, "{uri} {ct}");
    }
}

#[tokio::test]
async fn similar_items_and_images_by_id() {
    let (c, _, app) = fixture();
    let id = "p7-v0-w0";
    let a = post(&app, &format!("/v1/search/similar/{id}?k=5"), "", Vec::new()).await;
    assert_eq!(a.status, StatusCode::OK);
    let ids = hit_ids(&a.json());
    assert_eq!(ids.len(), 5);
    assert!(!ids.contains(&id.to_string()), "the item itself is left out: {ids:?}");
    // Its closest neighbour is its other view (same product and variation, small noise).
    assert_eq!(ids[0], "p7-v0-w1");
    let a = post(&app, "/v1/search/similar/p7-v0-w0?category=garden&k=3", "", Vec::new()).await;
    assert!(
        a.json()["hits"].as_array().unwrap().iter().all(|h| h["category"].as_str().unwrap().starts_with("garden/"))
    );
    assert_eq!(post(&app, "/v1/search/similar/nope", "", Vec::new()).await.error_code(), "item_not_found");
    assert_eq!(post(&app, "/v1/search/similar/p7-v0-w0?k=0", "", Vec::new()).await.error_code(), "invalid_parameter");

    let a = get(&app, &format!("/v1/items/{id}")).await;
    let j = a.json();
    let it = item(&c, id);
    assert_eq!((j["id"].as_str(), j["category"].as_str()), (Some(id), Some(&*it.category)));
    assert_eq!((j["product"].as_str(), j["split"].as_str()), (Some(&*it.product), Some(it.split.as_str())));
    assert_eq!(j["generation"], "gen-1");
    assert_eq!(j["sha256"].as_str().unwrap().len(), 64);
    let missing = get(&app, "/v1/items/nope").await;
    assert_eq!((missing.status, missing.error_code().as_str()), (StatusCode::NOT_FOUND, "item_not_found"));

    let img = get(&app, j["image_url"].as_str().unwrap()).await;
    assert_eq!(img.status, StatusCode::OK);
    assert_eq!(img.body.as_ref(), png(&c, id).as_slice());
    assert_eq!(img.headers[header::CONTENT_TYPE], "image/png");
    let etag = img.headers[header::ETAG].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", j["sha256"].as_str().unwrap()));
    let cached = call(
        &app,
        Request::get(format!("/v1/images/{id}")).header(header::IF_NONE_MATCH, &etag).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
    assert_eq!(get(&app, "/v1/images/nope").await.status, StatusCode::NOT_FOUND);
    // Percent-encoded ids are decoded.
    assert_eq!(get(&app, "/v1/items/p7%2Dv0%2Dw0").await.json()["id"], id);
}

#[tokio::test]
async fn taxonomy_health_readiness_metrics_openapi_and_page() {
    let (c, _, app) = fixture();
    let t = get(&app, "/v1/taxonomy").await.json();
    assert_eq!(t["items"], c.items.len());
    let roots: Vec<&str> = t["roots"].as_array().unwrap().iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(roots, ["clothing", "garden"]);
    let clothing = &t["roots"][0];
    let want = c.items.iter().filter(|i| i.category.starts_with("clothing/")).count();
    assert_eq!(clothing["items"], want);
    let tops = clothing["children"].as_array().unwrap().iter().find(|n| n["name"] == "tops").unwrap();
    assert_eq!(tops["path"], "clothing/tops");
    assert_eq!(tops["children"].as_array().unwrap().len(), 2);

    assert_eq!(get(&app, "/healthz").await.json()["status"], "ok");
    let r = get(&app, "/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    let rj = r.json();
    assert_eq!((rj["ready"].as_bool(), rj["generation"].as_str()), (Some(true), Some("gen-1")));
    assert_eq!(rj["items"], c.items.len());

    // Metrics count what was answered above, by route template and status.
    post(&app, "/v1/search", "image/png", png(&c, "p0-v0-w0")).await;
    post(&app, "/v1/search?k=0", "image/png", png(&c, "p0-v0-w0")).await;
    get(&app, "/v1/items/p0-v0-w0").await;
    get(&app, "/no/such/route").await;
    let m = get(&app, "/metrics").await;
    assert!(m.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for line in [
        "hiercon_http_requests_total{route=\"/v1/search\",method=\"POST\",status=\"200\"} 1",
        "hiercon_http_requests_total{route=\"/v1/search\",method=\"POST\",status=\"400\"} 1",
        "hiercon_http_requests_total{route=\"/v1/items/{id}\",method=\"GET\",status=\"200\"} 1",
        "hiercon_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "hiercon_http_requests_total{route=\"/v1/taxonomy\",method=\"GET\",status=\"200\"} 1",
        "hiercon_index_generation 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains(&format!("hiercon_index_items {}", c.items.len())));
    assert!(text.contains("hiercon_http_request_duration_seconds_bucket{route=\"/v1/search\",method=\"POST\",status=\"200\",le=\"+Inf\"} 1"));

    let o = get(&app, "/openapi.json").await.json();
    assert!(o["openapi"].as_str().unwrap().starts_with("3."));
    let paths = o["paths"].as_object().unwrap();
    for p in [
        "/v1/search",
        "/v1/search/similar/{id}",
        "/v1/items/{id}",
        "/v1/images/{id}",
        "/v1/taxonomy",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/admin/reload",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the OpenAPI document");
    }
    let params: Vec<&str> = o["paths"]["/v1/search"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["k", "category", "product", "variation", "group_by", "exact"] {
        assert!(params.contains(&p), "{p} not documented: {params:?}");
    }
    let schemas = o["components"]["schemas"].as_object().unwrap();
    for s in ["SearchResponse", "Hit", "Prediction", "ErrorBody", "TaxonomyNode"] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    // Every field the response carries is in its schema.
    let props = schemas["SearchResponse"]["properties"].as_object().unwrap();
    let sample = post(&app, "/v1/search", "image/png", png(&c, "p0-v0-w0")).await.json();
    for k in sample.as_object().unwrap().keys() {
        assert!(props.contains_key(k), "field {k} not in the SearchResponse schema");
    }

    let page = get(&app, "/").await;
    assert!(page.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("<script src=\"/app.js\">") && html.contains("/style.css"));
    assert!(String::from_utf8(get(&app, "/app.js").await.body.to_vec()).unwrap().contains("/v1/search"));
    assert_eq!(get(&app, "/style.css").await.status, StatusCode::OK);

    let nf = get(&app, "/v2/nothing").await;
    assert_eq!((nf.status, nf.error_code().as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let wrong_method = get(&app, "/v1/search").await;
    assert_eq!(
        (wrong_method.status, wrong_method.error_code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn without_an_index_the_server_is_alive_but_not_ready() {
    let c = Catalogue::new(1);
    let state = AppState::new(config(&c));
    let app = router(state.clone());
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);
    let r = get(&app, "/readyz").await;
    assert_eq!((r.status, r.json()["ready"].as_bool()), (StatusCode::SERVICE_UNAVAILABLE, Some(false)));
    let s = post(&app, "/v1/search", "image/png", png(&c, "p0-v0-w0")).await;
    assert_eq!((s.status, s.error_code().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"));
    for uri in ["/v1/taxonomy", "/v1/items/p0-v0-w0", "/v1/images/p0-v0-w0"] {
        assert_eq!(get(&app, uri).await.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
    }
    // An admin reload before any generation exists is refused, not a 500.
    let a = call(&app, admin_reload(Some(KEY))).await;
    assert_eq!((a.status, a.error_code().as_str()), (StatusCode::CONFLICT, "reload_refused"));
    // Once `hiercon index` has run, a reload makes it ready.
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let a = call(&app, admin_reload(Some(KEY))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["previous"], Value::Null);
    assert_eq!(get(&app, "/readyz").await.json()["generation"], "gen-1");
}

fn admin_reload(key: Option<&str>) -> Request<Body> {
    let mut r = Request::post("/v1/admin/reload");
    if let Some(k) = key {
        r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    r.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn admin_routes_need_the_api_key() {
    let (c, _, app) = fixture();
    let none = call(&app, admin_reload(None)).await;
    assert_eq!((none.status, none.error_code().as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(none.headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(call(&app, admin_reload(Some("wrong"))).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, admin_reload(Some(&format!("{KEY}x")))).await.status, StatusCode::UNAUTHORIZED);
    let ok = call(&app, admin_reload(Some(KEY))).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["changed"], false);
    let x = Request::post("/v1/admin/reload").header("x-api-key", KEY).body(Body::empty()).unwrap();
    assert_eq!(call(&app, x).await.status, StatusCode::OK);
    assert_eq!(get(&app, "/v1/admin/reload").await.status, StatusCode::METHOD_NOT_ALLOWED);

    // Without a configured key the admin routes are off.
    let mut cfg = config(&c);
    cfg.api_key = None;
    let service = Service::open(c.index_dir(), encoder(), cfg.search.clone()).unwrap();
    let off = router(AppState::with_service(cfg, service));
    let a = call(&off, admin_reload(Some(KEY))).await;
    assert_eq!((a.status, a.error_code().as_str()), (StatusCode::FORBIDDEN, "admin_disabled"));
    // ... and the document says so: no security scheme to satisfy, 403 its only answer.
    let doc = get(&off, "/openapi.json").await.json();
    let op = &doc["paths"]["/v1/admin/reload"]["post"];
    assert!(op.get("security").is_none(), "{op}");
    assert_eq!(op["responses"].as_object().unwrap().keys().collect::<Vec<_>>(), ["403"]);
    let doc = get(&app, "/openapi.json").await.json();
    assert_eq!(doc["paths"]["/v1/admin/reload"]["post"]["security"], serde_json::json!([{"api_key": []}]));
}

/// Adds a product to the catalogue and indexes it: the next generation.
pub(crate) fn next_generation(c: &mut Catalogue, product: u64) -> String {
    let id = format!("new{product}");
    c.add(&id, "garden/pots", &format!("p{product}"), "v0", draw(product, 0, product), 0);
    c.write_manifest();
    build::run(&c.config(), encoder().as_ref()).unwrap().generation
}

/// A copy of the live generation as `gen-<n+1>` with one data file damaged, made live by hand
/// (as a disk fault or a bad copy would): it fails its checksum on load.
pub(crate) fn corrupt_generation(index: &Path) -> String {
    let root = IndexDir::new(index);
    let live = root.current().unwrap().unwrap();
    let n = root.generations().unwrap().last().unwrap().0 + 1;
    let name = format!("gen-{n}");
    let (src, dst) = (index.join(&live), index.join(&name));
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let items = dst.join("items.jsonl");
    let mut text = std::fs::read(&items).unwrap();
    text[10] ^= 0x20;
    std::fs::write(&items, text).unwrap();
    root.switch_current(&name).unwrap();
    name
}

#[tokio::test]
async fn reload_swaps_in_a_new_generation_and_refuses_a_broken_one() {
    let (mut c, state, app) = fixture();
    let gen2 = next_generation(&mut c, 900);
    assert_eq!(gen2, "gen-2");
    // Not picked up until asked.
    assert_eq!(get(&app, "/readyz").await.json()["generation"], "gen-1");
    assert!(state.current_changed());
    let r = call(&app, admin_reload(Some(KEY))).await.json();
    assert_eq!(
        (r["previous"].as_str(), r["current"].as_str(), r["changed"].as_bool()),
        (Some("gen-1"), Some("gen-2"), Some(true))
    );
    assert!(!state.current_changed());
    let s = post(&app, "/v1/search?k=1", "image/png", png(&c, "new900")).await.json();
    assert_eq!((s["generation"].as_str(), hit_ids(&s)[0].as_str()), (Some("gen-2"), "new900"));
    assert_eq!(get(&app, "/v1/items/new900").await.status, StatusCode::OK);
    assert!(get(&app, "/v1/taxonomy").await.json()["items"] == c.items.len(), "the taxonomy follows the generation");

    let broken = corrupt_generation(&c.index_dir());
    let a = call(&app, admin_reload(Some(KEY))).await;
    assert_eq!((a.status, a.error_code().as_str()), (StatusCode::CONFLICT, "reload_refused"));
    assert!(
        a.json()["error"]["message"].as_str().unwrap().contains(&broken)
            || a.json()["error"]["message"].as_str().unwrap().contains("items.jsonl")
    );
    // The old generation keeps serving, and the poll does not retry the refused one.
    assert_eq!(get(&app, "/readyz").await.json()["generation"], "gen-2");
    assert_eq!(post(&app, "/v1/search", "image/png", png(&c, "new900")).await.status, StatusCode::OK);
    assert!(!state.current_changed());
    let m = String::from_utf8(get(&app, "/metrics").await.body.to_vec()).unwrap();
    assert!(m.contains("hiercon_index_reloads_total{outcome=\"refused\"} 1"), "{m}");
    assert!(m.contains("hiercon_index_reloads_total{outcome=\"switched\"} 1"), "{m}");
    assert!(m.contains("hiercon_index_generation 2"), "{m}");

    // A generation built with another model is refused too (the server's model is fixed here).
    let mut cfg = c.config();
    cfg.keep = 10;
    let other = hiercon::encoder::TestEncoder::new(DIM, 1);
    let other_gen = build::run(&cfg, &other).unwrap().generation;
    let a = call(&app, admin_reload(Some(KEY))).await;
    assert_eq!(a.error_code(), "reload_refused", "{other_gen} has another model digest");
    assert_eq!(get(&app, "/readyz").await.json()["generation"], "gen-2");
}

/// Random bytes, mutated images, random multipart bodies and random query strings at
/// `/v1/search`: no panic, never a 5xx, always the error shape.
#[tokio::test]
async fn fuzz_search_never_panics_or_answers_5xx() {
    let (c, _, app) = fixture();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let seeds: Vec<Vec<u8>> = c.items.iter().take(8).map(|i| png(&c, &i.id)).collect();
    let content_types = [
        "image/png",
        "image/jpeg",
        "image/webp",
        "application/octet-stream",
        "multipart/form-data; boundary=xyz",
        "text/plain",
        "",
    ];
    let params = [
        "",
        "k=5",
        "k=-3",
        "k=99999999999999999999",
        "category=%FF%FE",
        "group_by=product",
        "exact=1",
        "product=",
        "k=%00",
        "a=b&&&",
        "ef=3",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..400 {
        let body: Vec<u8> = match round % 4 {
            0 => (0..rng.random_range(0..2048)).map(|_| rng.random()).collect(),
            1 => {
                let mut b = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..16) {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                if rng.random_bool(0.3) {
                    b.truncate(rng.random_range(0..b.len()));
                }
                b
            }
            2 => {
                let payload: Vec<u8> = if rng.random_bool(0.5) {
                    seeds[0].clone()
                } else {
                    (0..rng.random_range(0..512)).map(|_| rng.random()).collect()
                };
                let field = ["image", "img", "", "image\"; x=\"y"][rng.random_range(0..4)];
                let (_, mut b) = multipart(field, "f.png", "image/png", &payload);
                if rng.random_bool(0.5) {
                    let cut = rng.random_range(0..b.len());
                    b.truncate(cut);
                }
                b
            }
            _ => {
                let mut b = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n".to_vec();
                b.extend((0..rng.random_range(0..256)).map(|_| rng.random::<u8>()));
                if rng.random_bool(0.5) {
                    b.extend_from_slice(b"\r\n--xyz--\r\n");
                }
                b
            }
        };
        let ct = match round % 4 {
            2 => load::multipart("image", "f", "image/png", b"").0,
            3 => "multipart/form-data; boundary=xyz".to_string(),
            _ => content_types[rng.random_range(0..content_types.len())].to_string(),
        };
        let q = params[rng.random_range(0..params.len())];
        let uri = if q.is_empty() { "/v1/search".to_string() } else { format!("/v1/search?{q}") };
        let a = post(&app, &uri, &ct, body).await;
        assert!(
            a.status.as_u16() < 500,
            "round {round}: {uri} {ct} -> {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        if a.status != StatusCode::OK {
            a.error_code();
        }
        *statuses.entry(a.status.as_u16()).or_insert(0) += 1;
    }
    // The fuzz reached past the parameter checks into decoding, and some mutated images still decode.
    assert!(statuses.contains_key(&200) && statuses.contains_key(&415) && statuses.len() >= 4, "{statuses:?}");
    // Methods and paths around the routes.
    for m in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        let a = call(&app, Request::builder().method(m.clone()).uri("/v1/search").body(Body::empty()).unwrap()).await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{m}");
    }
}

/// With every image permit taken the search waits up to the decode timeout, then answers 503
/// `overloaded`; work that outlasts the timeout is a 422 `decode_timeout`.
#[tokio::test]
async fn overload_and_decode_timeout_have_their_own_answers() {
    let c = Catalogue::new(1);
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let mut cfg = config(&c);
    cfg.max_inflight = 1;
    cfg.decode_timeout = Duration::from_millis(200);
    let service = Service::open(c.index_dir(), encoder(), cfg.search.clone()).unwrap();
    let state = AppState::with_service(cfg.clone(), service);
    let app = router(state.clone());
    let q = png(&c, "p0-v0-w0");
    let held = state.inflight.acquire().await.unwrap();
    let t = Instant::now();
    let a = post(&app, "/v1/search", "image/png", q.clone()).await;
    assert_eq!((a.status, a.error_code().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "overloaded"));
    assert!(t.elapsed() >= Duration::from_millis(190), "it waited for the timeout");
    drop(held);
    assert_eq!(post(&app, "/v1/search", "image/png", q).await.status, StatusCode::OK);

    // A timeout far below what decoding a 3000x3000 PNG takes (tens of ms).
    cfg.decode_timeout = Duration::from_millis(1);
    cfg.max_body_bytes = 20 << 20;
    cfg.search.limits = hiercon::image::Limits::default();
    let service = Service::open(c.index_dir(), encoder(), cfg.search.clone()).unwrap();
    let app = router(AppState::with_service(cfg, service));
    let img = image::RgbImage::from_fn(3000, 3000, |x, y| image::Rgb([(x / 12) as u8, (y / 12) as u8, 128]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    let a = post(&app, "/v1/search", "image/png", bytes).await;
    assert_eq!((a.status, a.error_code().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "decode_timeout"));
}
