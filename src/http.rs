//! HTTP, served and read with a library: axum routes on hyper's HTTP/1.1
//! server, one connection task each, and hyper's client for idem's own
//! reads of an endpoint (the benchmark, the conformance suite, the tests).
//! The metrics endpoint serves on it; the front door will too.
//!
//! What every server here does, by construction rather than by hand:
//! keep-alive, HEAD answered as GET without a body, 404 for an unknown
//! path and 405 (with `Allow`) for a known path's other methods, a client
//! that does not finish its request head within [`HEADER_READ_TIMEOUT`]
//! disconnected, a handler that takes longer than [`REQUEST_TIMEOUT`]
//! answered 408, and a request body bounded at [`MAX_BODY_BYTES`] (413).
//!
//! Why axum on hyper: hyper is the HTTP implementation the Rust field
//! runs in production (it is under axum, reqwest and tonic), and axum adds
//! routing and extractors on tower's middleware with nothing else; both
//! are tokio-native like the rest of idem. A smaller server (tiny_http,
//! astra) would mean threads beside tokio and none of the middleware the
//! front door needs.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower_http::timeout::TimeoutLayer;

/// A client must send its whole request head within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A handler must answer within this (else 408).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body read (else 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Binds `listen` and serves `router` on it until the process ends; the
/// address it listens on (a port 0 resolved).
pub async fn serve(listen: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let router =
        router
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                REQUEST_TIMEOUT,
            ));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                // A client that went away or sent garbage: nothing to do.
                let _ = connection.await;
            });
        }
    });
    Ok(address)
}

/// An answer read by [`get`]: the status and the body as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// An answer read by [`send`]: the status, the headers (names in lower
/// case) and the body as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `path` from an idem endpoint on loopback `port`; `None` when
/// nothing answers there.
pub async fn get(port: u16, path: &str) -> Option<Answer> {
    let reply = send(port, "GET", path, &[], Vec::new()).await?;
    Some(Answer {
        status: reply.status,
        body: String::from_utf8_lossy(&reply.body).into_owned(),
    })
}

/// Sends one request to loopback `port` on a connection of its own; `None`
/// when nothing answers there.
pub async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Option<Reply> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header(axum::http::header::HOST, format!("127.0.0.1:{port}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes()
        .to_vec();
    Some(Reply {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get as route_get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> u16 {
        let router = Router::new()
            .route("/hello", route_get(|| async { "hello\n" }))
            .route(
                "/slow",
                route_get(|| async {
                    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
                    "late\n"
                }),
            )
            .route(
                "/echo",
                axum::routing::post(
                    |body: axum::body::Bytes| async move { body.len().to_string() },
                ),
            );
        serve("127.0.0.1:0".parse().unwrap(), router)
            .await
            .unwrap()
            .port()
    }

    /// Sends `request` raw and reads until the server closes or `until`
    /// appears; the text read.
    async fn raw(port: u16, request: &str, until: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if n == 0 || (!until.is_empty() && text.contains(until)) {
                return text.into_owned();
            }
        }
    }

    #[tokio::test]
    async fn a_get_a_head_an_unknown_path_and_another_method() {
        let port = server().await;
        let hello = get(port, "/hello").await.unwrap();
        assert_eq!((hello.status, hello.body.as_str()), (200, "hello\n"));
        assert_eq!(get(port, "/nowhere").await.unwrap().status, 404);
        let head = raw(
            port,
            "HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {head:?}"
        );
        let post = raw(
            port,
            "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get,head"),
            "{post}"
        );
    }

    #[tokio::test]
    async fn two_requests_share_one_connection() {
        let port = server().await;
        let two = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let answers = raw(port, two, "").await;
        assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    }

    #[tokio::test]
    async fn a_body_past_the_bound_is_refused() {
        let port = server().await;
        let small =
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        assert!(raw(port, small, "").await.ends_with("\r\n\r\n3"));
        let big = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            MAX_BODY_BYTES + 1,
            "x".repeat(MAX_BODY_BYTES + 1)
        );
        let answer = raw(port, &big, "\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_is_answered_408() {
        let port = server().await;
        let answer = get(port, "/slow").await.unwrap();
        assert_eq!(answer.status, 408);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_head_is_disconnected() {
        let port = server().await;
        // The head never ends: the server closes after HEADER_READ_TIMEOUT
        // (time is paused, so the test does not wait for it).
        let head = raw(port, "GET /hello HTTP/1.1\r\nHost: x\r\n", "");
        let answer = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, head)
            .await
            .expect("the server closes a connection whose head never ends");
        assert!(!answer.contains("200"), "{answer}");
    }
}
