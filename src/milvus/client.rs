//! A small blocking Milvus client: the gRPC calls hiercon makes, over tonic with the generated
//! message types, each with a deadline.
//!
//! The calls run on a runtime the client owns (one worker thread), so callers are plain threads:
//! `hiercon index`, and `serve`'s blocking pool. A channel made with [`Client::new`] connects
//! lazily and reconnects by itself, so a client made while Milvus is down starts working once it
//! is back. Transport failures and deadlines are [`Error::MilvusUnavailable`] (retry later);
//! errors Milvus answers with are [`Error::Milvus`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tonic::transport::{Channel, Endpoint};

use super::proto::{api, common, schema};
use crate::{Error, Result};

/// The gRPC service every call goes to.
const SERVICE: &str = "/milvus.proto.milvus.MilvusService/";
/// Largest answer accepted (a page of query results with vectors can be tens of MB).
const MAX_MESSAGE: usize = 512 << 20;

/// A connection to one Milvus proxy.
///
/// Reads (search, query) are eventually consistent unless [`Client::read_after`] set a
/// timestamp: then each read sees everything written before it (Milvus's "customized"
/// consistency), and the client's own writes move that timestamp forward, so an index run reads
/// what it wrote without paying for "strong" consistency on every call.
pub struct Client {
    address: String,
    channel: Channel,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
    /// 0: eventually consistent reads; otherwise the hybrid timestamp reads must see.
    guarantee: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("address", &self.address).field("timeout", &self.timeout).finish()
    }
}

/// A response that carries a Milvus status.
trait Answered {
    fn status(&self) -> Option<&common::Status>;
}

macro_rules! answered {
    ($($t:ty),*) => {$(
        impl Answered for $t {
            fn status(&self) -> Option<&common::Status> {
                self.status.as_ref()
            }
        }
    )*};
}
answered!(
    api::BoolResponse,
    api::DescribeCollectionResponse,
    api::ShowCollectionsResponse,
    api::MutationResult,
    api::FlushResponse,
    api::DescribeIndexResponse,
    api::GetLoadStateResponse,
    api::SearchResults,
    api::QueryResults,
    api::GetVersionResponse,
    api::GetCollectionStatisticsResponse,
    api::AllocTimestampResponse
);

impl Answered for common::Status {
    fn status(&self) -> Option<&common::Status> {
        Some(self)
    }
}

/// Milvus reports success as error_code 0 (older servers, a field newer protos deprecate) and
/// code 0 (newer ones).
#[allow(deprecated)]
fn check_status(op: &'static str, s: Option<&common::Status>) -> Result<()> {
    match s {
        Some(s) if s.error_code != 0 || s.code != 0 => {
            let reason = if s.reason.is_empty() {
                format!("error code {} / {}", s.error_code, s.code)
            } else {
                s.reason.clone()
            };
            Err(Error::Milvus { op, reason })
        }
        _ => Ok(()),
    }
}

/// The key-value pairs Milvus takes its parameters as.
pub fn params<K: ToString, V: ToString>(pairs: impl IntoIterator<Item = (K, V)>) -> Vec<common::KeyValuePair> {
    pairs.into_iter().map(|(k, v)| common::KeyValuePair { key: k.to_string(), value: v.to_string() }).collect()
}

/// An address as `http://HOST:PORT` (a bare `HOST:PORT` is taken as plain HTTP/2).
fn endpoint_uri(address: &str) -> String {
    if address.contains("://") { address.to_string() } else { format!("http://{address}") }
}

impl Client {
    /// A client for the proxy at `address` (`HOST:PORT` or `http://HOST:PORT`). It connects on
    /// the first call, not here; `timeout` bounds every call.
    pub fn new(address: &str, timeout: Duration) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("milvus-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Milvus { op: "client", reason: format!("cannot start its runtime: {e}") })?;
        let uri = endpoint_uri(address);
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| Error::InvalidArgument {
                name: "milvus",
                reason: format!("{address:?} is not an address: {e}"),
            })?
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true);
        let channel = {
            let _in_rt = rt.enter();
            endpoint.connect_lazy()
        };
        Ok(Client { address: address.to_string(), channel, timeout, rt, guarantee: AtomicU64::new(0) })
    }

    /// From now on, reads see every write Milvus accepted before this call (and every later
    /// write of this client).
    pub fn read_after_now(&self) -> Result<()> {
        let req = api::AllocTimestampRequest::default();
        let r: api::AllocTimestampResponse = self.call("allocate timestamp", "AllocTimestamp", req)?;
        self.read_after(r.timestamp);
        Ok(())
    }

    /// Reads see every write up to hybrid timestamp `ts` (kept at the largest asked).
    pub fn read_after(&self, ts: u64) {
        self.guarantee.fetch_max(ts, Ordering::SeqCst);
    }

    /// A write's timestamp moves the read guarantee when one is set.
    fn wrote(&self, ts: u64) {
        if self.guarantee.load(Ordering::SeqCst) != 0 {
            self.read_after(ts);
        }
    }

    /// The consistency level and guarantee timestamp of a read.
    fn consistency(&self) -> (i32, u64) {
        match self.guarantee.load(Ordering::SeqCst) {
            0 => (common::ConsistencyLevel::Eventually as i32, 0),
            ts => (common::ConsistencyLevel::Customized as i32, ts),
        }
    }

    /// Where the client connects.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The deadline of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One unary call with the client's deadline.
    fn call<Q, A>(&self, op: &'static str, method: &'static str, req: Q) -> Result<A>
    where
        Q: Message + Send + Sync + 'static,
        A: Message + Default + Answered + Send + Sync + 'static,
    {
        self.call_with(op, method, req, self.timeout)
    }

    fn call_with<Q, A>(&self, op: &'static str, method: &'static str, req: Q, timeout: Duration) -> Result<A>
    where
        Q: Message + Send + Sync + 'static,
        A: Message + Default + Answered + Send + Sync + 'static,
    {
        let path: http::uri::PathAndQuery = format!("{SERVICE}{method}")
            .parse()
            .map_err(|e| Error::Milvus { op, reason: format!("bad method path: {e}") })?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        let unavailable = |reason: String| Error::MilvusUnavailable { address: self.address.clone(), op, reason };
        let fut = async move {
            grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            grpc.unary(tonic::Request::new(req), path, tonic_prost::ProstCodec::<Q, A>::default()).await
        };
        let answer = match self.rt.block_on(async move { tokio::time::timeout(timeout, fut).await }) {
            Err(_) => return Err(unavailable(format!("no answer within {:.1} s", timeout.as_secs_f64()))),
            Ok(Err(s)) => {
                return Err(match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        unavailable(source_chain(&s))
                    }
                    // A connection dropped mid-call (Milvus stopping) surfaces as Unknown.
                    tonic::Code::Unknown if s.message().contains("transport error") => unavailable(source_chain(&s)),
                    _ => Error::Milvus { op, reason: format!("{:?}: {}", s.code(), s.message()) },
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        check_status(op, answer.status())?;
        Ok(answer)
    }

    /// The server's version (also a cheap health check).
    pub fn version(&self) -> Result<String> {
        let r: api::GetVersionResponse = self.call("version", "GetVersion", api::GetVersionRequest::default())?;
        Ok(r.version)
    }

    pub fn has_collection(&self, name: &str) -> Result<bool> {
        let req = api::HasCollectionRequest { collection_name: name.into(), ..Default::default() };
        let r: api::BoolResponse = self.call("has collection", "HasCollection", req)?;
        Ok(r.value)
    }

    /// A collection's schema, physical name and aliases (`name` may be an alias).
    pub fn describe_collection(&self, name: &str) -> Result<api::DescribeCollectionResponse> {
        let req = api::DescribeCollectionRequest { collection_name: name.into(), ..Default::default() };
        self.call("describe collection", "DescribeCollection", req)
    }

    /// Every collection's name.
    pub fn collections(&self) -> Result<Vec<String>> {
        let r: api::ShowCollectionsResponse =
            self.call("show collections", "ShowCollections", api::ShowCollectionsRequest::default())?;
        Ok(r.collection_names)
    }

    pub fn create_collection(&self, name: &str, schema: &schema::CollectionSchema, shards: i32) -> Result<()> {
        let req = api::CreateCollectionRequest {
            collection_name: name.into(),
            schema: schema.encode_to_vec(),
            shards_num: shards,
            consistency_level: common::ConsistencyLevel::Bounded as i32,
            ..Default::default()
        };
        let _: common::Status = self.call("create collection", "CreateCollection", req)?;
        Ok(())
    }

    /// Sets a collection property (a key-value pair Milvus keeps with the collection).
    pub fn set_property(&self, collection: &str, key: &str, value: &str) -> Result<()> {
        let req = api::AlterCollectionRequest {
            collection_name: collection.into(),
            properties: params([(key, value)]),
            ..Default::default()
        };
        let _: common::Status = self.call("alter collection", "AlterCollection", req)?;
        Ok(())
    }

    pub fn drop_collection(&self, name: &str) -> Result<()> {
        let req = api::DropCollectionRequest { collection_name: name.into(), ..Default::default() };
        let _: common::Status = self.call("drop collection", "DropCollection", req)?;
        Ok(())
    }

    /// Inserts `num_rows` rows given column by column.
    pub fn insert(&self, collection: &str, fields: Vec<schema::FieldData>, num_rows: usize) -> Result<()> {
        let req = api::InsertRequest {
            collection_name: collection.into(),
            fields_data: fields,
            num_rows: num_rows as u32,
            ..Default::default()
        };
        let r: api::MutationResult = self.call("insert", "Insert", req)?;
        self.wrote(r.timestamp);
        if r.insert_cnt as usize != num_rows {
            return Err(Error::Milvus {
                op: "insert",
                reason: format!("{} of {num_rows} rows inserted", r.insert_cnt),
            });
        }
        Ok(())
    }

    /// Deletes the rows matching `expr` (Milvus 2.3 takes a primary-key `in` list); the number
    /// Milvus reports deleted.
    pub fn delete(&self, collection: &str, expr: &str) -> Result<u64> {
        let req = api::DeleteRequest { collection_name: collection.into(), expr: expr.into(), ..Default::default() };
        let r: api::MutationResult = self.call("delete", "Delete", req)?;
        self.wrote(r.timestamp);
        Ok(r.delete_cnt.max(0) as u64)
    }

    /// Rows `expr` matches (`""`: all), counted by Milvus at the client's read consistency
    /// (deleted rows excluded, unlike [`Client::row_count`]).
    pub fn count(&self, collection: &str, expr: &str) -> Result<u64> {
        let fields = self.query(collection, expr, &["count(*)"], None)?;
        let n = super::collection::long_column(&fields, "count(*)")?;
        Ok(n.first().copied().unwrap_or(0).max(0) as u64)
    }

    /// Seals what was inserted into segments on storage.
    pub fn flush(&self, collection: &str) -> Result<()> {
        let req = api::FlushRequest { collection_names: vec![collection.into()], ..Default::default() };
        let _: api::FlushResponse = self.call_with("flush", "Flush", req, self.timeout.max(Duration::from_secs(60)))?;
        Ok(())
    }

    /// Rows in a collection (from flushed segments' statistics).
    pub fn row_count(&self, collection: &str) -> Result<u64> {
        let req = api::GetCollectionStatisticsRequest { collection_name: collection.into(), ..Default::default() };
        let r: api::GetCollectionStatisticsResponse =
            self.call("collection statistics", "GetCollectionStatistics", req)?;
        let n = r.stats.iter().find(|kv| kv.key == "row_count").map(|kv| kv.value.clone()).unwrap_or_default();
        n.parse().map_err(|_| Error::Milvus { op: "collection statistics", reason: format!("row_count {n:?}") })
    }

    pub fn create_index(&self, collection: &str, field: &str, extra: Vec<common::KeyValuePair>) -> Result<()> {
        let req = api::CreateIndexRequest {
            collection_name: collection.into(),
            field_name: field.into(),
            extra_params: extra,
            index_name: format!("{field}_index"),
            ..Default::default()
        };
        let _: common::Status = self.call("create index", "CreateIndex", req)?;
        Ok(())
    }

    /// The index of `field`: (state, indexed rows, total rows, failure reason).
    pub fn index_progress(&self, collection: &str, field: &str) -> Result<(common::IndexState, i64, i64, String)> {
        let req = api::DescribeIndexRequest {
            collection_name: collection.into(),
            field_name: field.into(),
            ..Default::default()
        };
        let r: api::DescribeIndexResponse = self.call("describe index", "DescribeIndex", req)?;
        let d = r.index_descriptions.into_iter().find(|d| d.field_name == field).ok_or_else(|| Error::Milvus {
            op: "describe index",
            reason: format!("{collection} has no index on {field}"),
        })?;
        let state = common::IndexState::try_from(d.state).unwrap_or(common::IndexState::None);
        Ok((state, d.indexed_rows, d.total_rows, d.index_state_fail_reason))
    }

    pub fn load(&self, collection: &str, replicas: i32) -> Result<()> {
        let req = api::LoadCollectionRequest {
            collection_name: collection.into(),
            replica_number: replicas,
            ..Default::default()
        };
        let _: common::Status = self.call("load collection", "LoadCollection", req)?;
        Ok(())
    }

    pub fn release(&self, collection: &str) -> Result<()> {
        let req = api::ReleaseCollectionRequest { collection_name: collection.into(), ..Default::default() };
        let _: common::Status = self.call("release collection", "ReleaseCollection", req)?;
        Ok(())
    }

    pub fn load_state(&self, collection: &str) -> Result<common::LoadState> {
        let req = api::GetLoadStateRequest { collection_name: collection.into(), ..Default::default() };
        let r: api::GetLoadStateResponse = self.call("load state", "GetLoadState", req)?;
        Ok(common::LoadState::try_from(r.state).unwrap_or(common::LoadState::NotExist))
    }

    /// Points `alias` at `collection`, creating the alias when it does not exist.
    pub fn point_alias(&self, alias: &str, collection: &str, exists: bool) -> Result<()> {
        if exists {
            let req = api::AlterAliasRequest {
                collection_name: collection.into(),
                alias: alias.into(),
                ..Default::default()
            };
            let _: common::Status = self.call("alter alias", "AlterAlias", req)?;
        } else {
            let req = api::CreateAliasRequest {
                collection_name: collection.into(),
                alias: alias.into(),
                ..Default::default()
            };
            let _: common::Status = self.call("create alias", "CreateAlias", req)?;
        }
        Ok(())
    }

    /// A vector search. `vectors` are the queries (each `dim` long); `params` are the search
    /// parameters (`anns_field`, `topk`, `metric_type`, `params`, ...).
    pub fn search(
        &self,
        collection: &str,
        vectors: &[&[f32]],
        expr: &str,
        output_fields: &[&str],
        search_params: Vec<common::KeyValuePair>,
    ) -> Result<schema::SearchResultData> {
        let values = vectors.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let (consistency_level, guarantee_timestamp) = self.consistency();
        let group = common::PlaceholderGroup {
            placeholders: vec![common::PlaceholderValue {
                tag: "$0".into(),
                r#type: common::PlaceholderType::FloatVector as i32,
                values,
                ..Default::default()
            }],
        };
        let req = api::SearchRequest {
            collection_name: collection.into(),
            dsl: expr.into(),
            dsl_type: common::DslType::BoolExprV1 as i32,
            output_fields: output_fields.iter().map(|s| s.to_string()).collect(),
            search_params,
            nq: vectors.len() as i64,
            search_input: Some(api::search_request::SearchInput::PlaceholderGroup(group.encode_to_vec())),
            consistency_level,
            guarantee_timestamp,
            ..Default::default()
        };
        let r: api::SearchResults = self.call("search", "Search", req)?;
        Ok(r.results.unwrap_or_default())
    }

    /// Rows matching `expr`, the named fields of each (`limit` / `offset` page through them).
    pub fn query(
        &self,
        collection: &str,
        expr: &str,
        output_fields: &[&str],
        page: Option<(usize, usize)>,
    ) -> Result<Vec<schema::FieldData>> {
        let query_params = match page {
            Some((offset, limit)) => params([("offset", offset), ("limit", limit)]),
            None => Vec::new(),
        };
        let (consistency_level, guarantee_timestamp) = self.consistency();
        let req = api::QueryRequest {
            collection_name: collection.into(),
            expr: expr.into(),
            output_fields: output_fields.iter().map(|s| s.to_string()).collect(),
            query_params,
            consistency_level,
            guarantee_timestamp,
            ..Default::default()
        };
        let r: api::QueryResults = self.call("query", "Query", req)?;
        Ok(r.fields_data)
    }
}

/// A tonic status's message with its sources (the connection error is usually two levels down).
fn source_chain(s: &tonic::Status) -> String {
    let mut out = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        out.push_str(": ");
        out.push_str(&e.to_string());
        src = e.source();
    }
    out
}
