//! OTLP profiles export: `ExportProfilesServiceRequest` (built by the
//! mapping module) over HTTP (`POST URL/v1development/profiles`,
//! `application/x-protobuf`) or gRPC (`ProfilesService/Export`).
//!
//! Endpoint, first found: the target's URL (a base, the signal path is
//! appended); `OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT` (as is);
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base); `http://localhost:4318` (HTTP) or
//! `:4317` (gRPC). Headers: `OTEL_EXPORTER_OTLP_HEADERS`, then
//! `OTEL_EXPORTER_OTLP_PROFILES_HEADERS`, then the target's, later ones
//! replacing earlier ones of the same name.
use bytes::Bytes;
use http::{HeaderMap, Uri};
use prost::Message as _;

use super::{
    Prepared, otlp_map,
    transport::{Outcome, Transport, add_header, join_url},
};

/// The HTTP path of the profiles signal.
pub const HTTP_PATH: &str = "/v1development/profiles";
/// The gRPC method path of `ProfilesService.Export`.
pub const GRPC_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// How OTLP is carried (`--otlp-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// HTTP with protobuf bodies (`http/protobuf`).
    #[default]
    Http,
    Grpc,
}

/// An OTLP receiver (an OpenTelemetry Collector, a vendor's endpoint).
#[derive(Clone, Debug, Default)]
pub struct OtlpTarget {
    /// Base URL; `None` takes the OTEL_EXPORTER_OTLP_* variables or the
    /// default.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Extra headers (e.g. an API key), after the environment's.
    pub headers: Vec<(String, String)>,
}

pub(crate) struct Otlp {
    uri: Uri,
    headers: HeaderMap,
    protocol: OtlpProtocol,
}

impl Otlp {
    pub(crate) fn new(target: &OtlpTarget) -> anyhow::Result<Self> {
        Self::with_env(target, |name| std::env::var(name).ok())
    }

    /// [`Otlp::new`] reading the environment through `env`.
    fn with_env(target: &OtlpTarget, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let uri = endpoint(target, &env)?;
        let mut headers = HeaderMap::new();
        let from_env = [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_PROFILES_HEADERS",
        ]
        .into_iter()
        .filter_map(|name| Some((name, env(name)?)));
        for (name, list) in from_env {
            for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("{name}: `{pair}` is not of the form key=value")
                })?;
                headers.remove(k.trim());
                add_header(&mut headers, k, &percent_decode(v))?;
            }
        }
        for (k, v) in &target.headers {
            headers.remove(k.trim());
            add_header(&mut headers, k, v)?;
        }
        if target.protocol == OtlpProtocol::Http {
            add_header(&mut headers, "content-type", "application/x-protobuf")?;
        }
        Ok(Self {
            uri,
            headers,
            protocol: target.protocol,
        })
    }

    pub(crate) fn name(&self) -> String {
        match self.protocol {
            OtlpProtocol::Http => format!("otlp {}", self.uri),
            OtlpProtocol::Grpc => {
                let base = self.uri.to_string();
                format!("otlp-grpc {}", base.trim_end_matches(GRPC_PATH))
            }
        }
    }

    pub(crate) fn encode(message: &Prepared) -> Bytes {
        otlp_map::export_request(message).encode_to_vec().into()
    }

    pub(crate) async fn deliver(&self, transport: &Transport, body: Bytes) -> Outcome {
        match self.protocol {
            OtlpProtocol::Http => transport.post(&self.uri, &self.headers, body).await,
            OtlpProtocol::Grpc => transport.grpc(&self.uri, &self.headers, &body).await,
        }
    }
}

/// The URL requests go to (see the module's documentation).
fn endpoint(target: &OtlpTarget, env: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Uri> {
    let signal_path = match target.protocol {
        OtlpProtocol::Http => HTTP_PATH,
        OtlpProtocol::Grpc => GRPC_PATH,
    };
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let (base, path) = if let Some(url) = &target.endpoint {
        (url.clone(), signal_path)
    } else if let Some(url) = var("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT") {
        let uri = join_url(&url, "")?;
        if target.protocol == OtlpProtocol::Http {
            return Ok(uri);
        }
        // gRPC: the method path is fixed, only the server is taken.
        let server = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str())
        );
        (server, signal_path)
    } else if let Some(url) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        (url, signal_path)
    } else {
        let default = match target.protocol {
            OtlpProtocol::Http => "http://localhost:4318",
            OtlpProtocol::Grpc => "http://localhost:4317",
        };
        (default.to_owned(), signal_path)
    };
    join_url(&base, path)
}

/// Decodes `%XX` escapes (OTEL_EXPORTER_OTLP_HEADERS values, grpc-message);
/// a malformed escape is kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(target: &OtlpTarget, vars: &[(&str, &str)]) -> Otlp {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Otlp::with_env(target, |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    const ALL: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    const SIGNAL: &str = "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT";

    #[test]
    fn endpoint_precedence_and_paths() {
        let http = OtlpTarget::default();
        let grpc = OtlpTarget {
            protocol: OtlpProtocol::Grpc,
            ..OtlpTarget::default()
        };
        let uri = |t: &OtlpTarget, vars: &[(&str, &str)]| resolve(t, vars).uri.to_string();
        assert_eq!(
            uri(&http, &[]),
            "http://localhost:4318/v1development/profiles"
        );
        assert_eq!(uri(&grpc, &[]), format!("http://localhost:4317{GRPC_PATH}"));
        assert_eq!(
            uri(&http, &[(ALL, "https://c:1234/otlp/")]),
            "https://c:1234/otlp/v1development/profiles"
        );
        // The signal's own variable is used as is, and wins.
        assert_eq!(
            uri(
                &http,
                &[(ALL, "http://a:1"), (SIGNAL, "http://b:2/custom/path")]
            ),
            "http://b:2/custom/path"
        );
        assert_eq!(
            uri(&grpc, &[(SIGNAL, "https://b:2/ignored")]),
            format!("https://b:2{GRPC_PATH}")
        );
        // An explicit endpoint wins over the environment.
        let explicit = OtlpTarget {
            endpoint: Some("http://e:9".into()),
            ..OtlpTarget::default()
        };
        assert_eq!(
            uri(&explicit, &[(SIGNAL, "http://b:2/x")]),
            "http://e:9/v1development/profiles"
        );
    }

    #[test]
    fn headers_come_from_the_environment_then_the_target() {
        let target = OtlpTarget {
            headers: vec![("x-team".into(), "target".into())],
            ..OtlpTarget::default()
        };
        let otlp = resolve(
            &target,
            &[
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=a%20b%3Dc, x-team=env",
                ),
                ("OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "x-signal=1"),
            ],
        );
        assert_eq!(otlp.headers["api-key"], "a b=c");
        assert_eq!(otlp.headers["x-signal"], "1");
        assert_eq!(otlp.headers.get_all("x-team").iter().count(), 1);
        assert_eq!(otlp.headers["x-team"], "target");
        assert_eq!(otlp.headers["content-type"], "application/x-protobuf");
    }

    #[test]
    fn bad_headers_variable_is_a_one_line_error() {
        let e = Otlp::with_env(&OtlpTarget::default(), |name| {
            (name == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "novalue".to_owned())
        })
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "OTEL_EXPORTER_OTLP_HEADERS: `novalue` is not of the form key=value"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2c%zz%"), "a b,%zz%");
    }
}
