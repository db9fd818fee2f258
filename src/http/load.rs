//! A minimal blocking HTTP/1.1 client (keep-alive, Content-Length and chunked bodies) and the
//! closed-loop load generator behind `hiercon bench-load`: N workers, each with its own
//! connection, send requests back to back for a fixed time; latency percentiles, throughput and
//! errors per concurrency level.
//!
//! Loopback only by intent: it is for measuring a server on this machine.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn { reader: BufReader::new(stream), addr })
    }

    /// Sends one request and reads the whole response.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.addr, body.len());
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        s.flush()?;
        self.read_response(method == "HEAD")
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let status_line = self.read_line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').ok_or_else(|| invalid(format!("bad header {line:?}")))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut r = Response { status, headers, body: Vec::new() };
        if head_only || status == 204 || status == 304 {
            return Ok(r);
        }
        if r.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let size_line = self.read_line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let start = r.body.len();
                r.body.resize(start + size, 0);
                self.reader.read_exact(&mut r.body[start..])?;
                self.read_line()?;
            }
        } else if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
            r.body.resize(len, 0);
            self.reader.read_exact(&mut r.body)?;
        } else {
            self.reader.read_to_end(&mut r.body)?;
        }
        Ok(r)
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut c = Conn::connect(addr, Duration::from_secs(30))?;
    c.request(method, path, headers, body)
}

/// A multipart/form-data body with one file field; returns (content type, body).
pub fn multipart(field: &str, filename: &str, content_type: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = "hiercon-boundary-7d1c4b2a9e";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// What one load level sends.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub addr: SocketAddr,
    /// Request path with its query string, e.g. `/v1/search?k=10`.
    pub path: String,
    /// Content type of the bodies (e.g. `image/png`).
    pub content_type: String,
    /// Bodies sent round-robin (each worker starts at its own offset).
    pub bodies: Vec<Vec<u8>>,
    /// How long each level runs.
    pub duration: Duration,
    /// Requests per worker before measuring starts.
    pub warmup: usize,
}

/// The outcome of one concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub concurrency: usize,
    pub requests: usize,
    /// Non-200 answers and I/O failures.
    pub errors: usize,
    pub seconds: f64,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The `q`-quantile (nearest rank) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `concurrency` workers against `plan` for `plan.duration`.
pub fn run_level(plan: &LoadPlan, concurrency: usize) -> LevelResult {
    assert!(concurrency > 0 && !plan.bodies.is_empty());
    let headers = [("Content-Type", plan.content_type.as_str())];
    let barrier = std::sync::Barrier::new(concurrency);
    let results: Vec<(Vec<f64>, usize, f64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let barrier = &barrier;
                let headers = &headers;
                scope.spawn(move || {
                    let mut conn = Conn::connect(plan.addr, Duration::from_secs(30)).ok();
                    let mut i = w * 7919;
                    let send = |conn: &mut Option<Conn>, i: usize| -> bool {
                        let body = &plan.bodies[i % plan.bodies.len()];
                        if conn.is_none() {
                            *conn = Conn::connect(plan.addr, Duration::from_secs(30)).ok();
                        }
                        match conn.as_mut().map(|c| c.request("POST", &plan.path, headers, body)) {
                            Some(Ok(r)) if r.status == 200 => true,
                            Some(Ok(r)) => {
                                tracing::warn!(status = r.status, body = %r.text(), "load: error answer");
                                if r.header("connection") == Some("close") {
                                    *conn = None;
                                }
                                false
                            }
                            _ => {
                                *conn = None;
                                false
                            }
                        }
                    };
                    for _ in 0..plan.warmup {
                        send(&mut conn, i);
                        i += 1;
                    }
                    barrier.wait();
                    let (start, mut lat, mut errors) = (Instant::now(), Vec::new(), 0);
                    while start.elapsed() < plan.duration {
                        let t = Instant::now();
                        let ok = send(&mut conn, i);
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                        errors += usize::from(!ok);
                        i += 1;
                    }
                    (lat, errors, start.elapsed().as_secs_f64())
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("load worker")).collect()
    });
    let seconds = results.iter().map(|r| r.2).fold(0.0, f64::max);
    let errors = results.iter().map(|r| r.1).sum();
    let mut lat: Vec<f64> = results.into_iter().flat_map(|r| r.0).collect();
    lat.sort_by(f64::total_cmp);
    let n = lat.len();
    LevelResult {
        concurrency,
        requests: n,
        errors,
        seconds,
        throughput_rps: n as f64 / seconds.max(1e-9),
        p50_ms: quantile(&lat, 0.50),
        p90_ms: quantile(&lat, 0.90),
        p99_ms: quantile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        mean_ms: lat.iter().sum::<f64>() / n.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    /// A one-shot server on a loopback port that answers `reply` to one request.
    fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(reply).unwrap();
        });
        addr
    }

    #[test]
    fn client_reads_content_length_and_chunked_bodies() {
        let a = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello");
        let r = request(a, "GET", "/", &[], b"").unwrap();
        assert_eq!((r.status, r.text().as_str(), r.header("x-a")), (200, "hello", Some("b")));
        let a = serve_once(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let r = request(a, "GET", "/", &[], b"").unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "abcde"));
    }

    #[test]
    fn multipart_body_has_the_field_and_closing_boundary() {
        let (ct, body) = multipart("image", "a.png", "image/png", b"DATA");
        let boundary = ct.split("boundary=").nth(1).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.contains("name=\"image\"") && text.contains("\r\n\r\nDATA\r\n"));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
    }
}
