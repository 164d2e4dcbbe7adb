//! Parca's profile store: the gRPC unary call
//! `parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw` with the
//! gzip'd pprof bytes and the series labels.
use bytes::Bytes;
use http::{HeaderMap, Uri};
use prost::Message as _;

use super::{
    Prepared,
    transport::{Outcome, Transport, add_header, join_url},
};

/// The gRPC method path of `ProfileStoreService.WriteRaw`.
pub const WRITE_RAW_PATH: &str = "/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw";

/// A Parca server (`http://` for plaintext HTTP/2, `https://` for TLS).
#[derive(Clone, Debug, Default)]
pub struct ParcaTarget {
    /// Base URL, e.g. `http://parca:7070`.
    pub url: String,
    pub bearer_token: Option<String>,
}

impl ParcaTarget {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

/// The messages, from parca-dev/parca
/// `proto/parca/profilestore/v1alpha1/profilestore.proto`. Field numbers
/// checked against that file.
mod proto {
    /// `WriteRawRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRawRequest {
        /// `string tenant = 1;` (not used: Parca tenants come from auth)
        #[prost(string, tag = "1")]
        pub tenant: String,
        /// `repeated RawProfileSeries series = 2;`
        #[prost(message, repeated, tag = "2")]
        pub series: Vec<RawProfileSeries>,
        /// `bool normalized = 3;`
        #[prost(bool, tag = "3")]
        pub normalized: bool,
    }

    /// `RawProfileSeries`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        /// `LabelSet labels = 1;`
        #[prost(message, optional, tag = "1")]
        pub labels: Option<LabelSet>,
        /// `repeated RawSample samples = 2;`
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }

    /// `LabelSet`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelSet {
        /// `repeated Label labels = 1;`
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
    }

    /// `Label`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        /// `string name = 1;`
        #[prost(string, tag = "1")]
        pub name: String,
        /// `string value = 2;`
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `RawSample`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        /// `bytes raw_profile = 1;`
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
    }
}

pub(crate) struct Parca {
    uri: Uri,
    headers: HeaderMap,
}

impl Parca {
    pub(crate) fn new(target: &ParcaTarget) -> anyhow::Result<Self> {
        let uri = join_url(&target.url, WRITE_RAW_PATH)?;
        let mut headers = HeaderMap::new();
        if let Some(token) = &target.bearer_token {
            add_header(&mut headers, "authorization", &format!("Bearer {token}"))?;
        }
        Ok(Self { uri, headers })
    }

    pub(crate) fn name(&self) -> String {
        let base = self.uri.to_string();
        format!("parca {}", base.trim_end_matches(WRITE_RAW_PATH))
    }

    pub(crate) fn encode(message: &Prepared) -> Bytes {
        let mut labels = message.source.series_labels(message.kind);
        // Parca's convention (its agent relabels `__meta_process_pid` to
        // `pid`): the pid is a series label. Its label names follow
        // Prometheus' syntax, so OTel's `process.pid` cannot be one.
        labels.push(("pid".to_owned(), message.source.pid.to_string()));
        let labels = labels
            .into_iter()
            .map(|(name, value)| proto::Label { name, value })
            .collect();
        proto::WriteRawRequest {
            tenant: String::new(),
            series: vec![proto::RawProfileSeries {
                labels: Some(proto::LabelSet { labels }),
                samples: vec![proto::RawSample {
                    raw_profile: message.pprof.to_vec(),
                }],
            }],
            // Our pprof locations hold addresses as the process saw them,
            // with each mapping's start, limit and file offset (see
            // output::pprof): Parca normalizes them itself.
            normalized: false,
        }
        .encode_to_vec()
        .into()
    }

    pub(crate) async fn deliver(&self, transport: &Transport, body: Bytes) -> Outcome {
        transport.grpc(&self.uri, &self.headers, &body).await
    }
}
