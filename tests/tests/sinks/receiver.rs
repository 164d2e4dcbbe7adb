//! An HTTP/1.1 + HTTP/2 server on 127.0.0.1 standing in for a backend: it
//! records every request and answers from a script (then the default
//! answer), plain or TLS, and can be killed and restarted on its port.
//! gRPC receivers answer a success as gRPC does (status in the trailers).
use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    HeaderMap, Request, Response, StatusCode, Version,
    body::{Body, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, task::JoinSet};

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// Success: HTTP 200 (gRPC: 200 with `grpc-status: 0` in trailers).
    Ok,
    /// This HTTP status and body.
    Status(u16, &'static str),
    /// Never answer (the connection stays open).
    Hang,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
}

pub struct Receiver {
    addr: SocketAddr,
    grpc: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// An HTTP receiver (answers 200 with an empty body).
    pub fn http() -> Self {
        Self::start(false, None, 0)
    }

    /// A gRPC receiver (answers an empty message with status OK).
    pub fn grpc() -> Self {
        Self::start(true, None, 0)
    }

    /// A receiver on `port` (0: any free port), TLS when `tls` is given.
    pub fn start(grpc: bool, tls: Option<Arc<rustls::ServerConfig>>, port: u16) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:{port}: {e}"));
        let mut receiver = Self {
            addr: listener.local_addr().unwrap(),
            grpc,
            tls,
            state: Arc::default(),
            task: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let (state, grpc, tls) = (Arc::clone(&self.state), self.grpc, self.tls.clone());
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task: killing the receiver cuts every
            // connection too.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(answer(&state, grpc, request).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        }));
    }

    /// `http://127.0.0.1:PORT` (https with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Answers the next requests with `replies`, in order.
    pub fn script(&self, replies: &[Reply]) {
        self.state
            .script
            .lock()
            .unwrap()
            .extend(replies.iter().copied());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Stops listening and cuts every open connection; returns once both
    /// are closed.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port (after [`Receiver::kill`]).
    pub fn restart(&mut self) {
        let listener = std::net::TcpListener::bind(self.addr)
            .unwrap_or_else(|e| panic!("rebind {}: {e}", self.addr));
        self.serve(listener);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn answer(state: &State, grpc: bool, request: Request<Incoming>) -> Response<ReplyBody> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    state.requests.lock().unwrap().push(Recorded {
        path: parts.uri.path().to_owned(),
        version: parts.version,
        headers: parts.headers,
        body,
    });
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Ok);
    match reply {
        Reply::Hang => std::future::pending().await,
        Reply::Status(code, text) => {
            let mut response =
                Response::new(ReplyBody::new(Bytes::from_static(text.as_bytes()), None));
            *response.status_mut() = StatusCode::from_u16(code).unwrap();
            response
        }
        Reply::Ok if grpc => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            // An empty response message: flag 0, length 0.
            let mut response = Response::new(ReplyBody::new(
                Bytes::from_static(&[0, 0, 0, 0, 0]),
                Some(trailers),
            ));
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            response
        }
        Reply::Ok => Response::new(ReplyBody::new(Bytes::new(), None)),
    }
}

/// A body of one data frame and optional trailers.
pub struct ReplyBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl ReplyBody {
    fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            data: Some(data).filter(|d| !d.is_empty()),
            trailers,
        }
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// A TLS server configuration from PEM files, offering HTTP/2 and HTTP/1.1.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}
