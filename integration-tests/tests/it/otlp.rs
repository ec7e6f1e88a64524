//! A minimal OTLP/HTTP trace receiver on loopback: accepts `POST /v1/traces` and keeps the
//! raw protobuf bodies, so a test can check that a service exported a span of a given trace.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

pub struct Collector {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Result<Collector> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let store = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    while let Ok(Some(body)) = read_request(&mut conn).await {
                        store.lock().unwrap().push(body);
                        let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                        if conn.write_all(ok.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Collector { addr, bodies, task })
    }

    /// Value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    pub fn received_containing(&self, needle: &[u8]) -> bool {
        self.bodies.lock().unwrap().iter().any(|b| b.windows(needle.len()).any(|w| w == needle))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body; None at end of stream.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    anyhow::ensure!(head.starts_with("post /v1/traces"), "unexpected request: {head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse())
        .transpose()?
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok(Some(body))
}
