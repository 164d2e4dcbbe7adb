//! HTTP and gRPC requests for every network sink: one pooled hyper client
//! per protocol, rustls for `https`, connect and request timeouts, and the
//! answer classified as delivered, to be retried, or refused for good.
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use super::{Delivery, grpc};

/// How a delivery attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    /// May succeed later; `after` is the server's Retry-After, if any.
    Retry {
        cause: String,
        after: Option<Duration>,
    },
    /// Will never succeed as sent.
    Refused {
        cause: String,
    },
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The longest error answer read (its start goes into the log).
const MAX_ANSWER: usize = 64 << 10;

pub(crate) struct Transport {
    /// HTTP/1.1, or HTTP/2 when TLS negotiates it.
    http: HttpsClient,
    /// HTTP/2 only (gRPC), also over plain TCP.
    grpc: HttpsClient,
    request_timeout: Duration,
}

impl Transport {
    pub(crate) fn new(delivery: &Delivery) -> anyhow::Result<Self> {
        let tls = tls_config(delivery.ca_file.as_deref())?;
        let connector = |http2_only: bool| {
            let mut tcp = HttpConnector::new();
            tcp.enforce_http(false);
            tcp.set_connect_timeout(Some(delivery.connect_timeout));
            tcp.set_nodelay(true);
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            if http2_only {
                builder.enable_http2().wrap_connector(tcp)
            } else {
                builder.enable_http1().enable_http2().wrap_connector(tcp)
            }
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector(false));
        let grpc = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(connector(true));
        Ok(Self {
            http,
            grpc,
            request_timeout: delivery.request_timeout,
        })
    }

    /// POSTs `body` to `uri` and classifies the HTTP answer.
    pub(crate) async fn post(&self, uri: &Uri, headers: &HeaderMap, body: Bytes) -> Outcome {
        let request = build_request(uri, headers, body);
        let answer = self.exchange(&self.http, request).await;
        match answer {
            Ok((status, headers, body, _)) => classify_http(status, &headers, &body),
            Err(outcome) => outcome,
        }
    }

    /// A gRPC unary call: `message` framed to `uri` (the method's full path),
    /// classified by `grpc-status`.
    pub(crate) async fn grpc(&self, uri: &Uri, headers: &HeaderMap, message: &[u8]) -> Outcome {
        let mut headers = headers.clone();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let request = build_request(uri, &headers, grpc::frame(message));
        match self.exchange(&self.grpc, request).await {
            Ok((status, headers, body, trailers)) => {
                if status != StatusCode::OK {
                    return classify_http(status, &headers, &body);
                }
                grpc::classify(&headers, trailers.as_ref())
            }
            Err(outcome) => outcome,
        }
    }

    /// Sends the request and reads the whole answer within the request
    /// timeout; a transport failure is an `Err` outcome (always retried).
    async fn exchange(
        &self,
        client: &HttpsClient,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes, Option<HeaderMap>), Outcome> {
        let retry = |cause: String| Outcome::Retry { cause, after: None };
        let attempt = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| retry(chain(&e)))?;
            let (parts, body) = response.into_parts();
            let collected = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| retry(format!("reading the answer: {e}")))?;
            let trailers = collected.trailers().cloned();
            Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
        };
        match tokio::time::timeout(self.request_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(retry(format!(
                "no answer within {:?} (request timeout)",
                self.request_timeout
            ))),
        }
    }
}

/// `base` (`http[s]://host[:port][/prefix]`) with `path` appended; a
/// one-line error naming the flag's value otherwise.
pub(crate) fn join_url(base: &str, path: &str) -> anyhow::Result<Uri> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    match url.parse::<Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
            Ok(uri)
        }
        _ => bail!("`{base}` is not an http:// or https:// URL with a host"),
    }
}

/// Adds `name: value` to `headers`, with a one-line error for a value or name
/// HTTP does not allow.
pub(crate) fn add_header(headers: &mut HeaderMap, name: &str, value: &str) -> anyhow::Result<()> {
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .with_context(|| format!("`{name}` is not a valid HTTP header name"))?;
    let value = http::HeaderValue::from_str(value.trim())
        .with_context(|| format!("the value of header `{name}` is not valid in HTTP"))?;
    headers.append(name, value);
    Ok(())
}

fn build_request(uri: &Uri, headers: &HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    request.headers_mut().extend(headers.clone());
    request
        .headers_mut()
        .entry(http::header::USER_AGENT)
        .or_insert(http::HeaderValue::from_static(concat!(
            "prof-bpf/",
            env!("CARGO_PKG_VERSION")
        )));
    request
}

/// An error and its causes on one line (hyper's own message is terse:
/// "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// 2xx: delivered. 408, 429 and 5xx: retried (after Retry-After seconds when
/// given). Any other status: refused.
pub(crate) fn classify_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cause = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    };
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        let after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Outcome::Retry { cause, after }
    } else {
        Outcome::Refused { cause }
    }
}

/// rustls with the ring provider; trusts `ca_file`'s certificates when
/// given, else the system's roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading CA certificates from {}", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("bad CA certificate in {}", path.display()))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A malformed system certificate is skipped, as every TLS client does.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            log::warn!(
                "sinks: no system CA certificates found ({} errors); https needs --ca",
                found.errors.len()
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<&str>, body: &str) -> Outcome {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        }
        classify_http(
            StatusCode::from_u16(code).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    #[test]
    fn http_statuses_are_classified() {
        assert_eq!(status(200, None, ""), Outcome::Delivered);
        assert_eq!(status(204, None, ""), Outcome::Delivered);
        assert_eq!(
            status(503, Some("7"), "down\nfor now"),
            Outcome::Retry {
                cause: "HTTP 503 Service Unavailable: down for now".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            status(429, None, ""),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(status(500, None, ""), Outcome::Retry { .. }));
        assert!(matches!(status(408, None, ""), Outcome::Retry { .. }));
        assert_eq!(
            status(400, None, "bad profile"),
            Outcome::Refused {
                cause: "HTTP 400 Bad Request: bad profile".into()
            }
        );
        assert!(matches!(status(401, None, ""), Outcome::Refused { .. }));
        assert!(matches!(status(404, None, ""), Outcome::Refused { .. }));
    }

    #[test]
    fn urls_are_joined_and_checked() {
        let uri = join_url("http://h:4040/", "/push.v1.PusherService/Push").unwrap();
        assert_eq!(uri.to_string(), "http://h:4040/push.v1.PusherService/Push");
        let uri = join_url("https://h/prefix", "/v1development/profiles").unwrap();
        assert_eq!(uri.to_string(), "https://h/prefix/v1development/profiles");
        let e = join_url("h:4040", "/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "`h:4040` is not an http:// or https:// URL with a host"
        );
        assert!(join_url("http://bad host", "/x").is_err());
    }

    #[test]
    fn a_missing_ca_file_is_a_one_line_error() {
        let e = tls_config(Some(std::path::Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }
}
