//! Request handlers: parse and check input, run the work off the async threads, shape the answer.
//! Every search goes through `search::Service`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::dto::{self, SearchParams};
use super::error::ApiError;
use super::state::{AppState, GenInfo};
use crate::search::{QueryConfig, SearchRequest, Service};

type ApiResult<T> = Result<T, ApiError>;

/// The pairs of a query string, or a 400.
fn query_pairs(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> ApiResult<Vec<(String, String)>> {
    q.map(|Query(p)| p).map_err(|e| ApiError::invalid_parameter(format!("query string: {}", e.body_text())))
}

fn live(state: &AppState) -> ApiResult<Arc<Service>> {
    state.service().ok_or_else(ApiError::not_ready)
}

/// The live generation's lookup tables (built off the async threads on first use; with Milvus
/// the live description may be read again there).
async fn live_info(state: &AppState) -> ApiResult<Arc<GenInfo>> {
    let service = live(state)?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || -> ApiResult<Arc<GenInfo>> { Ok(state.info(&service.live()?)) })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Runs a blocking lookup (an item, an image, readiness) off the async threads.
async fn lookup<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))?
}

/// A checked search: the service request, forced-exact flag, and the generation's tables.
struct Checked {
    req: SearchRequest,
    exact: bool,
}

fn check(state: &AppState, info: &GenInfo, p: &SearchParams) -> ApiResult<Checked> {
    let k = p.k.unwrap_or(10.min(state.config.max_k));
    if k == 0 || k > state.config.max_k {
        return Err(ApiError::invalid_parameter(format!("`k` must be in 1..={}, got {k}", state.config.max_k)));
    }
    if let Some(ef) = p.ef
        && (ef == 0 || ef > state.config.search.max_ef)
    {
        return Err(ApiError::invalid_parameter(format!(
            "`ef` must be in 1..={}, got {ef}",
            state.config.search.max_ef
        )));
    }
    let filter = p.filter();
    let not_found = |code: &'static str, what: &str, v: &str| {
        ApiError::new(StatusCode::NOT_FOUND, code, format!("no {what} {v:?} in {}", info.name))
    };
    if let Some(c) = &filter.category
        && !info.categories.contains(c)
    {
        return Err(not_found("unknown_category", "category", c));
    }
    if let (Some(v), Some(known)) = (&filter.product, &info.products)
        && !known.contains(v)
    {
        return Err(not_found("unknown_product", "product", v));
    }
    if let (Some(v), Some(known)) = (&filter.variation, &info.variations)
        && !known.contains(v)
    {
        return Err(not_found("unknown_variation", "variation", v));
    }
    if let Some(name) = filter.attributes.keys().find(|name| !info.attributes.contains_key(*name)) {
        let known: Vec<&str> = info.attributes.keys().map(String::as_str).collect();
        return Err(ApiError::invalid_parameter(format!(
            "unknown parameter `attr.{name}`: no item of {} has that attribute (attributes: {})",
            info.name,
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    }
    Ok(Checked { req: SearchRequest { k, filter, group_by: p.group_by, ef: p.ef }, exact: p.exact.unwrap_or(false) })
}

/// Searches with `embedding` and votes for a category. `exclude` (an item id) is dropped from
/// both the hits and the vote (for "more like this item"). Blocking.
fn search_and_vote(
    service: &Service,
    embedding: &[f32],
    c: &Checked,
    vote_k: usize,
    exclude: Option<&str>,
    started: Instant,
) -> ApiResult<dto::SearchResponse> {
    let planning = if c.exact {
        QueryConfig { exact_below_rows: usize::MAX, ..service.config().query }
    } else {
        service.config().query
    };
    let extra = usize::from(exclude.is_some());
    let mut req = c.req.clone();
    req.k += extra;
    let mut res = service.search_embedding_with(embedding, &req, &planning)?;
    if res.allowed == 0 {
        unknown_values(service, &c.req.filter, &res.generation)?;
    }
    let drop_excluded = |hits: &mut Vec<crate::search::SearchHit>, k: usize| {
        hits.retain(|h| Some(h.id.as_str()) != exclude);
        hits.truncate(k);
    };
    drop_excluded(&mut res.hits, c.req.k);
    // The vote is over the unfiltered, ungrouped nearest neighbours: reuse the hits when they are that.
    let plain = c.req.filter.is_empty() && c.req.group_by.is_none();
    let neighbours = if plain && res.hits.len() >= vote_k {
        res.hits[..vote_k].to_vec()
    } else {
        let vote_req = SearchRequest { k: vote_k + extra, ..SearchRequest::default() };
        let mut v = service.search_embedding_with(embedding, &vote_req, &planning)?.hits;
        drop_excluded(&mut v, vote_k);
        v
    };
    Ok(dto::SearchResponse {
        took_ms: started.elapsed().as_secs_f64() * 1e3,
        generation: res.generation,
        path: serde_json::to_value(res.answered_by).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        allowed: res.allowed,
        predicted: dto::vote(&neighbours),
        hits: res.hits.iter().map(dto::Hit::from).collect(),
    })
}

/// A 404 for a product or variation the index does not have, where the lookup tables could not
/// tell before the search (Milvus): asked only when a filter allowed nothing.
fn unknown_values(service: &Service, filter: &crate::search::Filter, generation: &str) -> ApiResult<()> {
    if service.local().is_some() {
        return Ok(());
    }
    let only = |f: crate::search::Filter| service.allowed(&f);
    if let Some(v) = &filter.product
        && only(crate::search::Filter { product: Some(v.clone()), ..Default::default() })? == 0
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_product",
            format!("no product {v:?} in {generation}"),
        ));
    }
    if let Some(v) = &filter.variation
        && only(crate::search::Filter { variation: Some(v.clone()), ..Default::default() })? == 0
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_variation",
            format!("no variation {v:?} in {generation}"),
        ));
    }
    Ok(())
}

/// Runs `f` on the blocking pool under the decode timeout.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let limit = state.config.decode_timeout;
    let Ok(Ok(_permit)) = tokio::time::timeout(limit, state.inflight.acquire()).await else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("{} images are being searched already; try again", state.config.max_inflight),
        ));
    };
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(ApiError::internal(format!("the search task failed: {join}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "decode_timeout",
            format!("decoding and embedding the image took longer than {} ms", limit.as_millis()),
        )),
    }
}

/// Reads the body under the size limit: 413 past it.
async fn read_body(body: Body, limit: usize) -> ApiResult<Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over the limit of {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("could not read the body: {e}"))),
    }
}

fn missing_image() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "missing_image",
        "send the image as the multipart field `image` or as the raw body with an image content type",
    )
}

/// The image bytes of a search request: the multipart field `image`, or the raw body.
async fn image_from_request(req: Request, limit: usize) -> ApiResult<Bytes> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body ({len} bytes) is over the limit of {limit} bytes"),
        ));
    }
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, limit).await?;
    let image = if mime == "multipart/form-data" {
        let req = Request::from_parts(parts, Body::from(bytes));
        let mut mp = Multipart::from_request(req, &()).await.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", format!("multipart body: {}", e.body_text()))
        })?;
        let bad = |e: axum::extract::multipart::MultipartError| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", format!("multipart body: {}", e.body_text()))
        };
        let mut image = None;
        let mut fields = 0;
        while let Some(field) = mp.next_field().await.map_err(bad)? {
            fields += 1;
            if fields > 16 {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", "more than 16 fields"));
            }
            if field.name() == Some("image") {
                if image.is_some() {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_multipart",
                        "more than one `image` field",
                    ));
                }
                image = Some(field.bytes().await.map_err(bad)?);
            }
        }
        image.ok_or_else(missing_image)?
    } else if mime.starts_with("image/") || mime == "application/octet-stream" {
        bytes
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {:?}: send multipart/form-data with an `image` field, or the image itself as image/png, image/jpeg or image/webp",
                content_type
            ),
        ));
    };
    if image.is_empty() {
        return Err(missing_image());
    }
    Ok(image)
}

/// Search by image.
#[utoipa::path(
    post, path = "/v1/search", tag = "search",
    request_body(
        description = "multipart/form-data with the field `image`, or the image itself (image/png, image/jpeg, image/webp, or application/octet-stream: the format is read from the bytes)",
        content((dto::SearchForm = "multipart/form-data"), ("image/png"), ("image/jpeg"), ("image/webp"), ("application/octet-stream"))
    ),
    responses(
        (status = 200, description = "Ranked items", body = dto::SearchResponse),
        (status = 400, description = "Bad or unknown parameter, missing image, bad multipart body", body = dto::ErrorBody),
        (status = 404, description = "Unknown category / product / variation (not in the live generation)", body = dto::ErrorBody),
        (status = 413, description = "Body, image or pixel count over the limit", body = dto::ErrorBody),
        (status = 415, description = "Not an accepted content type or image format", body = dto::ErrorBody),
        (status = 422, description = "The image could not be decoded (or not in time)", body = dto::ErrorBody),
        (status = 503, description = "No index loaded yet, or too many images in flight", body = dto::ErrorBody),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    req: Request,
) -> ApiResult<Json<dto::SearchResponse>> {
    let started = Instant::now();
    let params = SearchParams::parse(&query_pairs(query)?)?;
    let service = live(&state)?;
    let info = live_info(&state).await?;
    let checked = check(&state, &info, &params)?;
    let image = image_from_request(req, state.config.max_body_bytes).await?;
    let vote_k = state.config.vote_k;
    let out = blocking(&state, move || {
        let embedding = service.embed_image(&image)?;
        search_and_vote(&service, &embedding, &checked, vote_k, None, started)
    })
    .await?;
    Ok(Json(out))
}

/// Items like a catalogue item (its stored embedding is the query; the item itself is left out).
#[utoipa::path(
    post, path = "/v1/search/similar/{id}", tag = "search",
    params(("id" = String, Path, description = "Item id")),
    responses(
        (status = 200, description = "Ranked items, the item itself left out", body = dto::SearchResponse),
        (status = 400, description = "Bad or unknown parameter", body = dto::ErrorBody),
        (status = 404, description = "No such item, or unknown category / product / variation", body = dto::ErrorBody),
        (status = 422, description = "The search did not finish in time", body = dto::ErrorBody),
        (status = 503, description = "No index loaded yet, or too many searches in flight", body = dto::ErrorBody),
    )
)]
pub async fn similar(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<dto::SearchResponse>> {
    let started = Instant::now();
    let params = SearchParams::parse(&query_pairs(query)?)?;
    let service = live(&state)?;
    let info = live_info(&state).await?;
    let checked = check(&state, &info, &params)?;
    let vote_k = state.config.vote_k;
    let out = blocking(&state, move || {
        let embedding = service.item_embedding(&id)?.ok_or_else(|| ApiError::item_not_found(&id))?;
        search_and_vote(&service, &embedding, &checked, vote_k, Some(&id), started)
    })
    .await?;
    Ok(Json(out))
}

/// One catalogue item.
#[utoipa::path(
    get, path = "/v1/items/{id}", tag = "catalogue",
    params(("id" = String, Path, description = "Item id")),
    responses(
        (status = 200, description = "The item", body = dto::Item),
        (status = 404, description = "No such item", body = dto::ErrorBody),
        (status = 503, description = "No index loaded yet", body = dto::ErrorBody),
    )
)]
pub async fn item(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<dto::Item>> {
    let service = live(&state)?;
    let (r, generation) = lookup(move || {
        let generation = service.live()?.name();
        let r = service.item(&id)?.ok_or_else(|| ApiError::item_not_found(&id))?;
        Ok((r, generation))
    })
    .await?;
    let it = &r.item;
    Ok(Json(dto::Item {
        id: it.id.clone(),
        title: it.title.clone(),
        category: it.category.clone(),
        product: it.product.clone(),
        variation: it.variation.clone(),
        view: it.view.clone(),
        split: it.split.as_str().to_string(),
        role: it.role.map(|r| r.as_str().to_string()),
        sha256: r.sha256.clone(),
        attributes: it.attributes.clone(),
        image_url: dto::image_url(&it.id),
        generation,
    }))
}

/// The content type of image bytes, from their signature.
fn image_mime(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        _ => "application/octet-stream",
    }
}

/// An item's image file.
#[utoipa::path(
    get, path = "/v1/images/{id}", tag = "catalogue",
    params(("id" = String, Path, description = "Item id")),
    responses(
        (status = 200, description = "The image bytes (ETag: the image's sha256; the type is read from the bytes)", content(("image/png"), ("image/jpeg"), ("image/webp"), ("image/gif"), ("application/octet-stream"))),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "No such item, or its image is gone", body = dto::ErrorBody),
        (status = 503, description = "No index loaded yet", body = dto::ErrorBody),
    )
)]
pub async fn image(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let service = live(&state)?;
    let wanted = id.clone();
    let (path, sha256) =
        lookup(move || service.image(&wanted)?.ok_or_else(|| ApiError::item_not_found(&wanted))).await?;
    let etag = format!("\"{sha256}\"");
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path).map_err(|e| (path, e)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|(path, e)| {
            tracing::warn!(path = %path.display(), error = %e, "image file unreadable");
            ApiError::new(StatusCode::NOT_FOUND, "image_not_found", format!("the image of {id:?} is not readable"))
        })?;
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(image_mime(&bytes))),
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300")),
        (header::ETAG, HeaderValue::from_str(&etag).map_err(|e| ApiError::internal(e.to_string()))?),
    ];
    Ok((headers, bytes).into_response())
}

/// The category tree of the live generation, with item counts.
#[utoipa::path(
    get, path = "/v1/taxonomy", tag = "catalogue",
    responses(
        (status = 200, description = "The tree", body = dto::Taxonomy),
        (status = 503, description = "No index loaded yet", body = dto::ErrorBody),
    )
)]
pub async fn taxonomy(State(state): State<AppState>) -> ApiResult<Json<dto::Taxonomy>> {
    let info = live_info(&state).await?;
    Ok(Json(info.taxonomy.clone()))
}

/// A few catalogue items to try the search with: one per top-level category.
#[utoipa::path(
    get, path = "/v1/examples", tag = "catalogue",
    responses(
        (status = 200, description = "The examples", body = dto::Examples),
        (status = 503, description = "No index loaded yet", body = dto::ErrorBody),
    )
)]
pub async fn examples(State(state): State<AppState>) -> ApiResult<Json<dto::Examples>> {
    let info = live_info(&state).await?;
    Ok(Json(dto::Examples { generation: info.name.clone(), items: info.examples.clone() }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = dto::Health)))]
pub async fn healthz() -> Json<dto::Health> {
    Json(dto::Health { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into() })
}

/// Readiness: an index generation is loaded.
#[utoipa::path(
    get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "Ready", body = dto::Ready), (status = 503, description = "No index loaded", body = dto::Ready))
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<dto::Ready>) {
    let not_ready = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(dto::Ready { ready: false, generation: None, items: None, model_digest: None }),
        )
    };
    let Some(s) = state.service() else {
        return not_ready();
    };
    let digest = s.encoder().digest().to_string();
    match lookup(move || Ok(s.ready()?)).await {
        Ok(l) => {
            let ready = dto::Ready {
                ready: true,
                generation: Some(l.name()),
                items: Some(l.count()),
                model_digest: Some(digest),
            };
            (StatusCode::OK, Json(ready))
        }
        Err(e) => {
            tracing::warn!(code = e.code, message = %e.message, "not ready");
            not_ready()
        }
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Text exposition format 0.0.4", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

/// Loads the generation `CURRENT` names now (needs the API key).
#[utoipa::path(
    post, path = "/v1/admin/reload", tag = "admin",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Loaded (or already live)", body = dto::Reload),
        (status = 401, description = "Missing or wrong API key", body = dto::ErrorBody),
        (status = 403, description = "No API key configured: admin routes are off (`admin_disabled`)", body = dto::ErrorBody),
        (status = 409, description = "The generation was refused; the old one keeps serving", body = dto::ErrorBody),
    )
)]
pub async fn reload(State(state): State<AppState>) -> ApiResult<Json<dto::Reload>> {
    let s = state.clone();
    let r = tokio::task::spawn_blocking(move || s.reload()).await.map_err(|e| ApiError::internal(e.to_string()))?;
    match r {
        Ok(r) => Ok(Json(dto::Reload { previous: r.previous, current: r.current, changed: r.changed })),
        Err(e) => {
            let mut api = ApiError::from(e);
            if api.status.is_server_error() || api.code == "not_ready" {
                // Whatever stopped the load, the request itself was fine: say it was refused.
                api = ApiError::new(StatusCode::CONFLICT, "reload_refused", api.message);
            }
            Err(api)
        }
    }
}

/// The OpenAPI document of this server (its limits, the live generation's attributes).
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], super::openapi::document(&state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_mime_sniffs_signatures() {
        assert_eq!(image_mime(b"\x89PNG\r\n\x1a\n"), "image/png");
        assert_eq!(image_mime(b"\xFF\xD8\xFF\xE0"), "image/jpeg");
        assert_eq!(image_mime(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(image_mime(b"hello"), "application/octet-stream");
    }
}
