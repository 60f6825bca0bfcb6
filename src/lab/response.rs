//! The load generator's HTTP/1.1 response parser: fed the bytes of one
//! connection as they are read, it tells when a response is complete, its
//! status, whether the server closes the connection, and the worker id its
//! body names.
//!
//! The head is parsed with `httparse` once complete (at most 64 KiB and 64
//! headers); the body is read by `Content-Length`, or to EOF when there is
//! none. Chunked bodies are not supported (the lab's apps do not send them):
//! they count as invalid, like bytes beyond the body, since no request was
//! pipelined to ask for them.

/// The largest response head accepted; a longer one is a parse error.
const MAX_HEAD: usize = 64 * 1024;
/// How much of each body is kept to look for `worker <ID>`.
const BODY_PREFIX: usize = 512;

/// How the end of a response body is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Length(usize),
    Eof,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy)]
struct Head {
    status: u16,
    body: BodyEnd,
    close: bool,
}

/// A complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) close: bool,
    pub(super) worker: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feed {
    More,
    Done(Answer),
    Invalid,
}

/// The response being read on one connection; its buffer is reused.
#[derive(Debug, Default)]
pub(super) struct ResponseReader {
    /// The head while incomplete, then the first [`BODY_PREFIX`] body bytes.
    buf: Vec<u8>,
    head: Option<Head>,
    body_read: usize,
}

impl ResponseReader {
    /// A reader whose buffer starts with room for `capacity` bytes.
    pub(super) fn with_capacity(capacity: usize) -> ResponseReader {
        ResponseReader {
            buf: Vec::with_capacity(capacity),
            ..ResponseReader::default()
        }
    }

    /// Forgets the response read so far, keeping the buffer's memory.
    pub(super) fn reset(&mut self) {
        self.buf.clear();
        self.head = None;
        self.body_read = 0;
    }

    /// Takes bytes just read.
    pub(super) fn feed(&mut self, data: &[u8]) -> Feed {
        match self.head {
            None => {
                self.buf.extend_from_slice(data);
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                let head_len = match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) if self.buf.len() <= MAX_HEAD => {
                        return Feed::More;
                    }
                    Ok(httparse::Status::Partial) | Err(_) => return Feed::Invalid,
                };
                let Some(head) = parse_head(&resp) else {
                    return Feed::Invalid;
                };
                self.head = Some(head);
                self.body_read = self.buf.len() - head_len;
                self.buf.drain(..head_len);
                self.buf.truncate(BODY_PREFIX);
            }
            Some(_) => {
                self.body_read += data.len();
                let room = BODY_PREFIX.saturating_sub(self.buf.len());
                self.buf.extend_from_slice(&data[..room.min(data.len())]);
            }
        }
        match self.head {
            Some(Head {
                body: BodyEnd::Length(n),
                ..
            }) if self.body_read == n => Feed::Done(self.answer()),
            // Bytes beyond the body: nothing was asked for them.
            Some(Head {
                body: BodyEnd::Length(n),
                ..
            }) if self.body_read > n => Feed::Invalid,
            _ => Feed::More,
        }
    }

    /// The peer closed: complete when the body runs to EOF.
    pub(super) fn eof(&self) -> Feed {
        match self.head {
            Some(Head {
                body: BodyEnd::Eof, ..
            }) => Feed::Done(self.answer()),
            _ => Feed::Invalid,
        }
    }

    fn answer(&self) -> Answer {
        let head = self.head.unwrap_or(Head {
            status: 0,
            body: BodyEnd::Eof,
            close: true,
        });
        Answer {
            status: head.status,
            close: head.close,
            worker: worker_id(&self.buf),
        }
    }
}

/// Status, body length and whether the server closes, from a parsed head;
/// `None` for a chunked body (not supported) or a bad `Content-Length`.
fn parse_head(resp: &httparse::Response<'_, '_>) -> Option<Head> {
    let status = resp.code?;
    let mut close = resp.version != Some(1);
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyEnd::Length(0)
    } else {
        match length {
            Some(n) => BodyEnd::Length(n),
            None => BodyEnd::Eof,
        }
    };
    if body == BodyEnd::Eof {
        close = true;
    }
    Some(Head {
        status,
        body,
        close,
    })
}

/// The number after the first `worker ` in `body`, if any.
fn worker_id(body: &[u8]) -> Option<u64> {
    const NEEDLE: &[u8] = b"worker ";
    let at = body.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let digits = &body[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_handles_split_heads_bodies_and_eof() {
        let mut r = ResponseReader::default();
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\nHello from worker 12 (pid 3)";
        for (k, b) in resp.iter().enumerate() {
            let feed = r.feed(std::slice::from_ref(b));
            if k + 1 < resp.len() {
                assert_eq!(feed, Feed::More, "at byte {k}");
            } else {
                assert_eq!(
                    feed,
                    Feed::Done(Answer {
                        status: 200,
                        close: false,
                        worker: Some(12)
                    })
                );
            }
        }
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nworker x"),
            Feed::More
        );
        assert_eq!(
            r.eof(),
            Feed::Done(Answer {
                status: 503,
                close: true,
                worker: None
            })
        );
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc"),
            Feed::Invalid
        );
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"),
            Feed::More
        );
        assert_eq!(r.eof(), Feed::Invalid);
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Feed::Invalid
        );
        r.reset();
        assert_eq!(r.feed(b"garbage\r\n\r\n"), Feed::Invalid);
    }

    #[test]
    fn worker_ids_from_bodies() {
        assert_eq!(worker_id(b"Hello from worker 3 (pid 42)\n"), Some(3));
        assert_eq!(worker_id(b"worker 10"), Some(10));
        assert_eq!(worker_id(b"worker x"), None);
        assert_eq!(worker_id(b"hello"), None);
    }
}
