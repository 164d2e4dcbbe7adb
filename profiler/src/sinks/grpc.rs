//! gRPC unary calls over HTTP/2 (the framing and the status; the transport
//! sends them): a message is prefixed by a compression flag and its length,
//! and the answer's `grpc-status` (trailers, or headers for a trailers-only
//! answer) says how it went.
use bytes::{BufMut as _, Bytes, BytesMut};
use http::HeaderMap;

use super::transport::Outcome;

/// One uncompressed length-prefixed message.
pub(crate) fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// gRPC's status codes by number.
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes a client should retry: the ones OTLP's specification lists, and
/// RESOURCE_EXHAUSTED (a rate limit).
const RETRYABLE: &[u32] = &[1, 4, 8, 10, 11, 14, 15];

/// The outcome of a call answered with HTTP 200.
pub(crate) fn classify(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Outcome {
    let field = |name: &str| {
        trailers
            .and_then(|t| t.get(name))
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
    };
    let Some(code) = field("grpc-status").and_then(|s| s.trim().parse::<u32>().ok()) else {
        return Outcome::Retry {
            cause: "gRPC answer without grpc-status (connection cut?)".into(),
            after: None,
        };
    };
    if code == 0 {
        return Outcome::Delivered;
    }
    let message = field("grpc-message")
        .map(percent_decode)
        .unwrap_or_default();
    let name = usize::try_from(code)
        .ok()
        .and_then(|c| NAMES.get(c))
        .unwrap_or(&"");
    let mut cause = format!("gRPC status {code} {name}");
    if !message.is_empty() {
        cause = format!("{}: {message}", cause.trim_end());
    }
    if RETRYABLE.contains(&code) {
        Outcome::Retry { cause, after: None }
    } else {
        Outcome::Refused { cause }
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    super::otlp::percent_decode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_flag_length_message() {
        assert_eq!(&frame(b"abc")[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    }

    fn with(status: &str, message: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", status.parse().unwrap());
        if let Some(m) = message {
            h.insert("grpc-message", m.parse().unwrap());
        }
        h
    }

    #[test]
    fn statuses_are_classified_from_trailers_or_headers() {
        let empty = HeaderMap::new();
        assert_eq!(classify(&empty, Some(&with("0", None))), Outcome::Delivered);
        // Trailers-only answers carry the status in the headers.
        assert_eq!(classify(&with("0", None), None), Outcome::Delivered);
        assert_eq!(
            classify(&empty, Some(&with("14", Some("going%20away")))),
            Outcome::Retry {
                cause: "gRPC status 14 UNAVAILABLE: going away".into(),
                after: None
            }
        );
        assert_eq!(
            classify(&empty, Some(&with("3", Some("bad")))),
            Outcome::Refused {
                cause: "gRPC status 3 INVALID_ARGUMENT: bad".into()
            }
        );
        assert!(matches!(classify(&empty, None), Outcome::Retry { .. }));
    }
}
