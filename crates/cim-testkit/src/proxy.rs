//! A counting TCP proxy in front of an HTTP server (an S3 server in the tests): every byte is
//! passed through unchanged (signatures, `Host`, bodies and keep-alive stay exactly as the
//! client sent them), while the client's side is read as HTTP/1.1 to count requests by method.
//! It can be switched off — "the server is down": new connections are closed at once and
//! those open are cut — and on again. [`CountingProxy::plain`] forwards any TCP protocol
//! without reading it (a NATS leaf node connection cut and healed: a partition).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Requests seen, by method (`GET`, `PUT`, `HEAD`, `POST`, `DELETE`...).
pub type Counts = BTreeMap<String, u64>;

/// A running proxy; dropping it stops it.
pub struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Mutex<Counts>>,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for CountingProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingProxy").field("addr", &self.addr).field("up", &*self.up.borrow()).finish()
    }
}

impl CountingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` (`host:port`, or an
    /// `http://host:port` endpoint).
    pub async fn start(upstream: &str) -> Result<CountingProxy> {
        Self::listen(upstream, true).await
    }

    /// A proxy that forwards bytes without reading them as HTTP (nothing is counted): any
    /// TCP protocol, e.g. a leaf node connection (`nats-leaf://host:port` or `host:port`).
    pub async fn plain(upstream: &str) -> Result<CountingProxy> {
        let upstream = upstream.split("://").last().unwrap_or(upstream);
        Self::listen(upstream, false).await
    }

    async fn listen(upstream: &str, http: bool) -> Result<CountingProxy> {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Mutex::new(Counts::new()));
        let (up, up_rx) = watch::channel(true);
        let task = tokio::spawn(accept(listener, upstream, http.then(|| counts.clone()), up_rx));
        Ok(CountingProxy { addr, counts, up, task })
    }

    /// `http://127.0.0.1:<port>`: the endpoint to give clients instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests seen since the start (or the last [`CountingProxy::reset`]), by method.
    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All requests seen since the start or the last reset.
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    /// Requests of one method seen since the start or the last reset.
    pub fn count(&self, method: &str) -> u64 {
        self.counts().get(method).copied().unwrap_or(0)
    }

    /// Forgets the counts.
    pub fn reset(&self) {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Up (forwarding) or down (every connection closed at once, open ones cut).
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.up.send_replace(false);
    }
}

/// `counts`: where HTTP requests are counted, or `None` to forward bytes unread.
async fn accept(
    listener: TcpListener,
    upstream: String,
    counts: Option<Arc<Mutex<Counts>>>,
    up: watch::Receiver<bool>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if !*up.borrow() {
            drop(client);
            continue;
        }
        let (upstream, counts, up) = (upstream.clone(), counts.clone(), up.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            connection(client, server, counts, up).await;
        });
    }
}

/// Copies both ways until either side closes or the proxy goes down; counts the requests.
async fn connection(
    client: TcpStream,
    server: TcpStream,
    counts: Option<Arc<Mutex<Counts>>>,
    mut up: watch::Receiver<bool>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let to_server = async {
        let mut parser = RequestParser::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(counts) = &counts {
                for method in parser.feed(&buf[..n]) {
                    *counts.lock().unwrap_or_else(|e| e.into_inner()).entry(method).or_default() += 1;
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    let down = async {
        let _ = up.wait_for(|u| !*u).await;
    };
    tokio::select! {
        _ = async { tokio::join!(to_server, to_client) } => {}
        _ = down => {}
    }
}

/// Reads a client's byte stream as HTTP/1.1 requests, just enough to tell where each starts:
/// the head, then a body of `Content-Length` bytes or in chunks.
#[derive(Default)]
struct RequestParser {
    pending: Vec<u8>,
    state: State,
}

#[derive(Default, Debug, PartialEq)]
enum State {
    #[default]
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    Trailer,
}

impl RequestParser {
    /// Takes the next bytes; returns the methods of the requests that started in them.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut started = Vec::new();
        let mut input = bytes;
        loop {
            match self.state {
                State::Body(n) | State::ChunkData(n) => {
                    let take = (n as usize).min(input.len());
                    input = &input[take..];
                    let rest = n - take as u64;
                    if rest > 0 {
                        self.state = if matches!(self.state, State::Body(_)) {
                            State::Body(rest)
                        } else {
                            State::ChunkData(rest)
                        };
                        return started;
                    }
                    self.state = if matches!(self.state, State::Body(_)) { State::Head } else { State::ChunkSize };
                }
                State::Head | State::ChunkSize | State::Trailer => {
                    self.pending.extend_from_slice(input);
                    let end = if self.state == State::Head { b"\r\n\r\n".as_slice() } else { b"\r\n".as_slice() };
                    let Some(at) = find(&self.pending, end) else { return started };
                    let line: Vec<u8> = self.pending.drain(..at + end.len()).collect();
                    let text = String::from_utf8_lossy(&line[..at]).to_string();
                    // What follows the line is input again.
                    let rest = std::mem::take(&mut self.pending);
                    match self.state {
                        State::Head => {
                            if text.trim().is_empty() {
                                // A stray CRLF between requests.
                                self.state = State::Head;
                            } else {
                                started.push(text.split_whitespace().next().unwrap_or("?").to_string());
                                self.state = body_of(&text);
                            }
                        }
                        State::ChunkSize => {
                            let size =
                                u64::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
                            // Data, then its CRLF.
                            self.state = if size == 0 { State::Trailer } else { State::ChunkData(size + 2) };
                        }
                        _ => {
                            if text.is_empty() {
                                self.state = State::Head;
                            }
                        }
                    }
                    self.feed_rest(rest, &mut started);
                    return started;
                }
            }
            if input.is_empty() {
                return started;
            }
        }
    }

    fn feed_rest(&mut self, rest: Vec<u8>, started: &mut Vec<String>) {
        if !rest.is_empty() {
            started.extend(self.feed(&rest));
        }
    }
}

/// Where a request's body ends, from its head.
fn body_of(head: &str) -> State {
    let mut length = 0u64;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            return State::ChunkSize;
        }
        if name == "content-length" {
            length = value.parse().unwrap_or(0);
        }
    }
    if length > 0 { State::Body(length) } else { State::Head }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart_however_the_bytes_arrive() {
        let stream =
            b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b/k HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b/k?uploads HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n\
HEAD /b/k HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
        for split in [1usize, 2, 3, 7, 64, stream.len()] {
            let mut p = RequestParser::default();
            let mut seen = Vec::new();
            for piece in stream.chunks(split) {
                seen.extend(p.feed(piece));
            }
            assert_eq!(seen, ["PUT", "GET", "POST", "HEAD"], "pieces of {split}");
            assert_eq!(p.state, State::Head);
        }
    }
}
