//! Grafana Pyroscope's push API: a Connect unary call (`POST
//! URL/push.v1.PusherService/Push`, `Content-Type: application/proto`)
//! carrying a `push.v1.PushRequest` with one series per profile: the series
//! labels and the gzip'd pprof bytes.
use bytes::Bytes;
use http::{HeaderMap, Uri};
use prost::Message as _;

use super::{
    Prepared,
    transport::{Outcome, Transport, add_header, join_url},
};

/// The Connect procedure path of `push.v1.PusherService.Push`.
pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";

/// A Pyroscope server (or Grafana Cloud Profiles) and its credentials.
#[derive(Clone, Debug, Default)]
pub struct PyroscopeTarget {
    /// Base URL, e.g. `http://pyroscope:4040`.
    pub url: String,
    /// HTTP basic authentication (user, password).
    pub basic_auth: Option<(String, String)>,
    pub bearer_token: Option<String>,
    /// Multi-tenant Pyroscope: sent as `X-Scope-OrgID`.
    pub tenant_id: Option<String>,
}

impl PyroscopeTarget {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

/// The messages, from grafana/pyroscope `api/push/v1/push.proto` (package
/// `push.v1`) and `api/types/v1/types.proto` (`types.v1.LabelPair`). Field
/// numbers checked against those files.
mod proto {
    /// `push.v1.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        /// `repeated RawProfileSeries series = 1;`
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<RawProfileSeries>,
    }

    /// `push.v1.RawProfileSeries` (field 3, `annotations`, is dropped by
    /// the server when pushed, so it is not sent).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        /// `repeated types.v1.LabelPair labels = 1;`
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        /// `repeated RawSample samples = 2;`
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }

    /// `types.v1.LabelPair`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        /// `string name = 1;`
        #[prost(string, tag = "1")]
        pub name: String,
        /// `string value = 2;`
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `push.v1.RawSample`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        /// `bytes raw_profile = 1;` (pprof, gzip'd or not)
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
        /// `string ID = 2;` (unique ID of the profile)
        #[prost(string, tag = "2")]
        pub id: String,
    }
}

pub(crate) struct Pyroscope {
    uri: Uri,
    headers: HeaderMap,
}

impl Pyroscope {
    pub(crate) fn new(target: &PyroscopeTarget) -> anyhow::Result<Self> {
        let uri = join_url(&target.url, PUSH_PATH)?;
        let mut headers = HeaderMap::new();
        add_header(&mut headers, "content-type", "application/proto")?;
        add_header(&mut headers, "connect-protocol-version", "1")?;
        if let Some((user, password)) = &target.basic_auth {
            let token = base64(format!("{user}:{password}").as_bytes());
            add_header(&mut headers, "authorization", &format!("Basic {token}"))?;
        }
        if let Some(token) = &target.bearer_token {
            add_header(&mut headers, "authorization", &format!("Bearer {token}"))?;
        }
        if let Some(tenant) = &target.tenant_id {
            add_header(&mut headers, "x-scope-orgid", tenant)?;
        }
        Ok(Self { uri, headers })
    }

    pub(crate) fn name(&self) -> String {
        let base = self.uri.to_string();
        format!("pyroscope {}", base.trim_end_matches(PUSH_PATH))
    }

    pub(crate) fn encode(message: &Prepared) -> Bytes {
        let labels = message
            .source
            .series_labels(message.kind)
            .into_iter()
            .map(|(name, value)| proto::LabelPair { name, value })
            .collect();
        proto::PushRequest {
            series: vec![proto::RawProfileSeries {
                labels,
                samples: vec![proto::RawSample {
                    raw_profile: message.pprof.to_vec(),
                    id: random_uuid(),
                }],
            }],
        }
        .encode_to_vec()
        .into()
    }

    pub(crate) async fn deliver(&self, transport: &Transport, body: Bytes) -> Outcome {
        transport.post(&self.uri, &self.headers, body).await
    }
}

/// A random (version 4) UUID in its text form.
fn random_uuid() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_le_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Standard base64 with padding (RFC 4648), for basic authentication.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }

    #[test]
    fn uuids_are_version_4_and_differ() {
        let a = random_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!("89ab".contains(&a[19..20]), "{a}");
        assert_ne!(a, random_uuid());
    }

    #[test]
    fn headers_carry_every_credential() {
        let target = PyroscopeTarget {
            url: "https://p.example:443".into(),
            basic_auth: Some(("u".into(), "p".into())),
            bearer_token: None,
            tenant_id: Some("team-a".into()),
        };
        let p = Pyroscope::new(&target).unwrap();
        assert_eq!(
            p.uri.to_string(),
            "https://p.example:443/push.v1.PusherService/Push"
        );
        assert_eq!(p.headers["authorization"], "Basic dTpw");
        assert_eq!(p.headers["x-scope-orgid"], "team-a");
        assert_eq!(p.headers["content-type"], "application/proto");
    }
}
