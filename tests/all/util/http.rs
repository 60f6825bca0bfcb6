//! A small HTTP/1.1 client: requests on real TCP connections, responses
//! framed by `Content-Length`, every read bounded by [`IO_TIMEOUT`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{IO_TIMEOUT, parse_worker};

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// A header's value (the first one), by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The worker that answered: (id, pid) from the body.
    pub fn worker(&self) -> (u64, u32) {
        parse_worker(&self.body).unwrap_or_else(|| panic!("no worker in the body of {self:?}"))
    }
}

/// A client connection that reads responses framed by `Content-Length`.
#[derive(Debug)]
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        HttpConn::connect_with_timeout(addr, IO_TIMEOUT)
    }

    /// As [`HttpConn::connect`], with `timeout` for the connect and for
    /// every read and write instead of [`IO_TIMEOUT`].
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Bytes received and not yet consumed as a response: after a failed
    /// [`HttpConn::read_response`], 0 means that no byte of the response
    /// came.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn send(&mut self, raw: &str) -> io::Result<()> {
        self.stream.write_all(raw.as_bytes())
    }

    /// Sends `GET / HTTP/1.1`, with `Connection: close` if `close`, and
    /// reads the response.
    pub fn get(&mut self, close: bool) -> io::Result<Response> {
        self.send(&request(close))?;
        self.read_response()
    }

    /// Reads one response (head, then `Content-Length` bytes of body).
    pub fn read_response(&mut self) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a whole response head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().map_err(|_| invalid(format!("bad length {v:?}"))))
            .transpose()?
            .ok_or_else(|| invalid(format!("no Content-Length in {head:?}")))?;
        while self.buf.len() < head_end + len {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a body",
                ));
            }
        }
        let body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Whether the server closes the connection (a read returns 0 bytes)
    /// within the read timeout, with no more bytes before that.
    pub fn expect_eof(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            return Err(invalid(format!(
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&self.buf)
            )));
        }
        match self.fill() {
            Ok(0) => Ok(()),
            // A reset is a close too (e.g. the server closed with unread input).
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Ok(_) => Err(invalid(format!(
                "expected end of file, got {:?}",
                String::from_utf8_lossy(&self.buf)
            ))),
            Err(e) => Err(e),
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A `GET /` request, HTTP/1.1.
pub fn request(close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET / HTTP/1.1\r\nHost: test\r\n{connection}\r\n")
}

/// One `Connection: close` request on a new connection; checks that the
/// server then closes it.
pub fn get_once(addr: SocketAddr) -> io::Result<Response> {
    let mut conn = HttpConn::connect(addr)?;
    let response = conn.get(true)?;
    conn.expect_eof()?;
    Ok(response)
}

/// `GET PATH` with `Connection: close` on a new connection; checks that
/// the server then closes it.
pub fn get_path(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut conn = HttpConn::connect(addr)?;
    conn.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    ))?;
    let response = conn.read_response()?;
    conn.expect_eof()?;
    Ok(response)
}

/// Whether nothing listens on `addr` any more: a connection is refused.
/// (A connect that "succeeds" onto its own port, TCP's simultaneous open
/// with a local port equal to `addr`'s, counts as refused.)
pub fn refuses_connections(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(s) => s.local_addr().ok() == Some(addr),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
