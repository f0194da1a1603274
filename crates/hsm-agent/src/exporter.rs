//! The Prometheus endpoint (`[metrics] listen`, docs/METRICS.md): a small HTTP/1.1 server
//! on the agent's runtime answering `GET /metrics` with the text format 0.0.4. Hand-written
//! (about a hundred lines) rather than a new HTTP dependency: one path, one method, one
//! response per connection. A scrape reads relaxed atomics and two short-held locks; the
//! event threads never wait for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::debug;

use crate::AgentError;

/// The largest request head read; a longer one is dropped.
const MAX_REQUEST: usize = 8192;
/// A request must arrive within this long, and its response be written within it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// What renders the page on each scrape.
pub(crate) type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Bind the listener (at start-up, so a bad address is a start-up error naming it).
/// `SO_REUSEPORT` lets an agent taking over from a running one bind the same address.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    let err = |source| AgentError::MetricsListen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(64).map_err(err)
}

/// Serve scrapes until the returned task is aborted.
pub(crate) fn spawn(listener: TcpListener, render: Render) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let render = render.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, &render).await {
                    debug!(%peer, error = %e, "metrics: connection dropped");
                }
                drop(permit);
            });
        }
    })
}

async fn serve_one(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let response = respond(&head, render);
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response too slow"))?
}

/// Read up to the blank line that ends the head; refuse anything longer than MAX_REQUEST.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the request ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// The whole response to one request head.
fn respond(head: &[u8], render: &Render) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render();
            let mut r = response(
                "200 OK",
                hsm_core::metrics::PROMETHEUS_CONTENT_TYPE,
                body.len(),
                "",
            );
            if method == "GET" {
                r.extend_from_slice(body.as_bytes());
            }
            r
        }
        (_, "/metrics") => {
            let body = "method not allowed: use GET\n";
            let mut r = response(
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                body.len(),
                "Allow: GET, HEAD\r\n",
            );
            r.extend_from_slice(body.as_bytes());
            r
        }
        _ => {
            let body = "not found: the metrics are at /metrics\n";
            let mut r = response("404 Not Found", "text/plain; charset=utf-8", body.len(), "");
            r.extend_from_slice(body.as_bytes());
            r
        }
    }
}

fn response(status: &str, content_type: &str, len: usize, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n{extra}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render() -> Render {
        Arc::new(|| "# HELP x y\n# TYPE x counter\nx 1\n".to_string())
    }

    fn status(r: &[u8]) -> String {
        let t = String::from_utf8_lossy(r);
        t.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn routes_and_methods() {
        let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &render());
        let t = String::from_utf8(r).expect("utf8");
        assert!(t.starts_with("HTTP/1.1 200 OK\r\n"), "{t}");
        assert!(t.contains("Content-Type: text/plain; version=0.0.4"), "{t}");
        assert!(t.contains("Connection: close\r\n"), "{t}");
        assert!(
            t.ends_with("\r\n\r\n# HELP x y\n# TYPE x counter\nx 1\n"),
            "{t}"
        );
        assert!(t.contains("Content-Length: 32\r\n"), "{t}");
        let head = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &render());
        assert!(String::from_utf8_lossy(&head).ends_with("\r\n\r\n"));
        assert_eq!(
            status(&respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &render())),
            "HTTP/1.1 200 OK"
        );
        assert_eq!(
            status(&respond(b"GET / HTTP/1.1\r\n\r\n", &render())),
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            status(&respond(b"POST /metrics HTTP/1.1\r\n\r\n", &render())),
            "HTTP/1.1 405 Method Not Allowed"
        );
        assert_eq!(
            status(&respond(b"\r\n\r\n", &render())),
            "HTTP/1.1 404 Not Found"
        );
    }

    #[tokio::test]
    async fn serves_over_tcp_and_drops_oversized_requests() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = spawn(listener, render());
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read to close");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("x 1\n"), "{out}");

        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&vec![b'a'; MAX_REQUEST + 2048]).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty(), "no answer to an oversized request");
        task.abort();
    }

    #[tokio::test]
    async fn a_bound_address_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let e = bind(addr).expect_err("in use");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
