//! The messages of Node's cluster protocol, as JSON lines: parsing what a
//! Node worker sends, and writing what the primary answers. See
//! docs/NODE.md for the exchange.
//!
//! Parsing borrows from the line (no allocation for the per-connection
//! messages); writing appends to a caller's buffer, which is reused.

use std::io::Write;
use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Every field the primary reads from a worker's message, kept raw: an
/// app's own message may hold anything under these names.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    cmd: Option<&'a RawValue>,
    #[serde(borrow)]
    act: Option<&'a RawValue>,
    #[serde(borrow)]
    ack: Option<&'a RawValue>,
    #[serde(borrow)]
    accepted: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    index: Option<&'a RawValue>,
    #[serde(borrow)]
    address: Option<&'a RawValue>,
    #[serde(borrow)]
    port: Option<&'a RawValue>,
    #[serde(borrow, rename = "addressType")]
    address_type: Option<&'a RawValue>,
    #[serde(borrow)]
    backlog: Option<&'a RawValue>,
    #[serde(borrow)]
    fd: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// The kind of socket a worker's `listen()` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AddressType {
    /// TCP over IPv4 (`4`), also Node's choice when no address was given.
    V4,
    /// TCP over IPv6 (`6`).
    V6,
    /// Anything else: a Unix socket path (`-1`), UDP (`"udp4"`), ...
    Other(String),
}

/// A worker's `queryServer`: the `listen()` call it wants served.
#[derive(Debug, Clone)]
pub(crate) struct Query<'a> {
    pub seq: u64,
    /// The how-manyth server of this worker with the same address.
    pub index: i64,
    /// `None`: no address given (Node would bind `::`, dual-stack).
    pub address: Option<String>,
    pub port: i64,
    pub address_type: AddressType,
    /// 0: Node's default.
    pub backlog: i32,
    /// `listen({ fd })`: an fd of the worker's own.
    pub fd: Option<i64>,
    /// The server's data (a TLS server's ticket keys), raw JSON.
    pub data: &'a RawValue,
}

impl PartialEq for Query<'_> {
    fn eq(&self, other: &Self) -> bool {
        (self.seq, self.index, &self.address, self.port)
            == (other.seq, other.index, &other.address, other.port)
            && (&self.address_type, self.backlog, self.fd)
                == (&other.address_type, other.backlog, other.fd)
            && self.data.get() == other.data.get()
    }
}

/// One message from a Node worker.
#[derive(Debug, PartialEq)]
pub(crate) enum FromWorker<'a> {
    /// Its cluster module started.
    Online,
    QueryServer(Query<'a>),
    /// One of its servers is listening.
    Listening,
    /// Its answer to a `newconn`: `ack` is that message's `seq`.
    Accepted {
        ack: u64,
        accepted: bool,
    },
    /// It closed its server with this key.
    Close {
        key: &'a str,
    },
    /// It called `cluster.worker.disconnect()`: wants an answer to `seq`.
    ExitedAfterDisconnect {
        seq: u64,
    },
    /// The fd sent with the last `NODE_HANDLE` arrived.
    HandleAck,
    /// The fd sent with the last `NODE_HANDLE` did not arrive.
    HandleNack,
    /// An internal message the primary has no use for.
    OtherInternal,
    /// The app's own `process.send()`: the whole line is its JSON.
    App,
}

/// What is wrong with a line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadMessage(pub String);

impl std::fmt::Display for BadMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(what: impl Into<String>) -> BadMessage {
    BadMessage(what.into())
}

fn number<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    name: &str,
) -> Result<T, BadMessage> {
    let raw = raw.ok_or_else(|| bad(format!("no `{name}`")))?;
    serde_json::from_str(raw.get()).map_err(|_| bad(format!("`{name}` is {}", raw.get())))
}

fn string<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<&'a str, BadMessage> {
    let raw = raw.ok_or_else(|| bad(format!("no `{name}`")))?;
    serde_json::from_str(raw.get()).map_err(|_| bad(format!("`{name}` is {}", raw.get())))
}

/// Parses one line (without its newline).
pub(crate) fn parse(line: &[u8]) -> Result<FromWorker<'_>, BadMessage> {
    match per_connection(line) {
        Some(m) => Ok(m),
        None => parse_json(line),
    }
}

/// The two lines a worker writes for every connection, in the exact form
/// Node writes them (`JSON.stringify` of its own objects): recognized
/// without a JSON parse, which was most of the primary's own CPU per
/// connection with Node workers. Anything else, or any variation of these
/// (spaces, other fields, a leading zero, a number too large), is `None`
/// and goes to the full parse.
fn per_connection(line: &[u8]) -> Option<FromWorker<'static>> {
    if line == br#"{"cmd":"NODE_HANDLE_ACK"}"# {
        return Some(FromWorker::HandleAck);
    }
    let rest = line.strip_prefix(br#"{"cmd":"NODE_CLUSTER","ack":"#)?;
    let (ack, rest) = leading_u64(rest)?;
    let (accepted, rest) = match rest.strip_prefix(br#","accepted":true,"seq":"#) {
        Some(rest) => (true, rest),
        None => (false, rest.strip_prefix(br#","accepted":false,"seq":"#)?),
    };
    let (_seq, rest) = leading_u64(rest)?;
    (rest == b"}").then_some(FromWorker::Accepted { ack, accepted })
}

/// For the fuzzer: where the per-connection fast path recognizes a line,
/// the full parse must read the same message from it.
pub(crate) fn assert_fast_path_agrees(line: &[u8]) {
    if let Some(fast) = per_connection(line) {
        assert_eq!(
            Ok(fast),
            parse_json(line),
            "the fast path differs from the full parse on {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// A JSON number that fits a `u64` at the start of `s` (digits only, no
/// leading zero), and what follows it.
fn leading_u64(s: &[u8]) -> Option<(u64, &[u8])> {
    let len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    let digits = &s[..len];
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let n = digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((n, &s[len..]))
}

/// [`parse`] by a full JSON parse.
fn parse_json(line: &[u8]) -> Result<FromWorker<'_>, BadMessage> {
    let text = std::str::from_utf8(line).map_err(|_| bad("not UTF-8"))?;
    let fields: Fields<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        // Valid JSON of another shape (an array, a string, a field twice)
        // is the app's; invalid JSON is nobody's.
        Err(e) => {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => Ok(FromWorker::App),
                Err(_) => Err(bad(format!("not JSON: {e}"))),
            };
        }
    };
    let cmd = fields.cmd.map(RawValue::get).unwrap_or("");
    if !cmd.starts_with("\"NODE_") {
        return Ok(FromWorker::App);
    }
    match cmd {
        "\"NODE_HANDLE_ACK\"" => return Ok(FromWorker::HandleAck),
        "\"NODE_HANDLE_NACK\"" => return Ok(FromWorker::HandleNack),
        "\"NODE_CLUSTER\"" => {}
        _ => return Ok(FromWorker::OtherInternal),
    }
    let act = fields.act.map(RawValue::get);
    Ok(match act {
        None if fields.accepted.is_some() => FromWorker::Accepted {
            ack: number(fields.ack, "ack")?,
            accepted: number(fields.accepted, "accepted")?,
        },
        Some("\"online\"") => FromWorker::Online,
        Some("\"listening\"") => FromWorker::Listening,
        Some("\"close\"") => FromWorker::Close {
            key: string(fields.key, "key")?,
        },
        Some("\"exitedAfterDisconnect\"") => FromWorker::ExitedAfterDisconnect {
            seq: number(fields.seq, "seq")?,
        },
        Some("\"queryServer\"") => FromWorker::QueryServer(query(&fields)?),
        _ => FromWorker::OtherInternal,
    })
}

fn query<'a>(f: &Fields<'a>) -> Result<Query<'a>, BadMessage> {
    let address = match f.address.map(RawValue::get) {
        None | Some("null") => None,
        Some(_) => Some(string(f.address, "address")?.to_string()),
    };
    let address_type = match f.address_type.map(RawValue::get) {
        Some("4") => AddressType::V4,
        Some("6") => AddressType::V6,
        Some(other) => AddressType::Other(other.trim_matches('"').to_string()),
        None => AddressType::Other("none".into()),
    };
    let fd = match f.fd.map(RawValue::get) {
        None | Some("null") => None,
        Some(_) => Some(number(f.fd, "fd")?),
    };
    // Node sends `false` or null when no backlog was given (0: the default).
    let backlog = match f.backlog.map(RawValue::get) {
        None | Some("null" | "false") => 0,
        Some(_) => number::<f64>(f.backlog, "backlog")?.clamp(0.0, i32::MAX as f64) as i32,
    };
    let port = match f.port.map(RawValue::get) {
        None | Some("null") => 0,
        Some(_) => number(f.port, "port")?,
    };
    const NULL: &str = "null";
    let data = match f.data {
        Some(d) => d,
        None => serde_json::from_str(NULL).expect("null is JSON"),
    };
    Ok(Query {
        seq: number(f.seq, "seq")?,
        index: number(f.index, "index")?,
        address,
        port,
        address_type,
        backlog,
        fd,
        data,
    })
}

/// Node's name for a server: what its own primary uses, so logs read alike.
pub(crate) fn server_key(q: &Query<'_>) -> String {
    let address = q.address.as_deref().unwrap_or("null");
    let kind = match &q.address_type {
        AddressType::V4 => "4",
        AddressType::V6 => "6",
        AddressType::Other(o) => o,
    };
    let fd = q.fd.map_or("undefined".to_string(), |f| f.to_string());
    format!("{address}:{}:{kind}:{fd}:{}", q.port, q.index)
}

/// The JSON text of a string, quotes included.
pub(crate) fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// Writes the answer to a `queryServer` for round-robin: no fd, the
/// listener's address in `sockname`.
pub(crate) fn reply_rr(
    out: &mut Vec<u8>,
    seq: u64,
    ack: u64,
    key_json: &str,
    data: &str,
    sockname: SocketAddr,
) {
    let family = if sockname.is_ipv4() { "IPv4" } else { "IPv6" };
    let _ = writeln!(
        out,
        r#"{{"cmd":"NODE_CLUSTER","errno":0,"key":{key_json},"ack":{ack},"data":{data},"sockname":{{"address":"{}","family":"{family}","port":{}}},"seq":{seq}}}"#,
        sockname.ip(),
        sockname.port()
    );
}

/// Writes the answer to a `queryServer` in the kernel modes: the reply
/// wrapped in a `NODE_HANDLE`, to be sent with the listening fd.
pub(crate) fn reply_handle(out: &mut Vec<u8>, seq: u64, ack: u64, key_json: &str, data: &str) {
    let _ = writeln!(
        out,
        r#"{{"cmd":"NODE_HANDLE","type":"net.Native","msg":{{"cmd":"NODE_CLUSTER","errno":0,"key":{key_json},"ack":{ack},"data":{data},"seq":{seq}}}}}"#
    );
}

/// Writes a failed `queryServer`'s answer: `errno` is negative (libuv's
/// convention), which the worker's server emits as its `error`.
pub(crate) fn reply_error(out: &mut Vec<u8>, seq: u64, ack: u64, key_json: &str, errno: i32) {
    let _ = writeln!(
        out,
        r#"{{"cmd":"NODE_CLUSTER","errno":{errno},"key":{key_json},"ack":{ack},"data":null,"seq":{seq}}}"#
    );
}

/// Writes a `newconn` for the server `key_json`; the connection's fd goes
/// with it.
pub(crate) fn newconn(out: &mut Vec<u8>, seq: u64, key_json: &str) {
    let _ = writeln!(
        out,
        r#"{{"cmd":"NODE_HANDLE","type":"net.Native","msg":{{"cmd":"NODE_CLUSTER","act":"newconn","key":{key_json},"seq":{seq}}}}}"#
    );
}

/// Writes the primary's `disconnect`: close your servers, then exit.
pub(crate) fn disconnect(out: &mut Vec<u8>, seq: u64) {
    let _ = writeln!(
        out,
        r#"{{"cmd":"NODE_CLUSTER","act":"disconnect","seq":{seq}}}"#
    );
}

/// Writes a bare answer to the worker's message `ack`.
pub(crate) fn reply(out: &mut Vec<u8>, seq: u64, ack: u64) {
    let _ = writeln!(out, r#"{{"cmd":"NODE_CLUSTER","ack":{ack},"seq":{seq}}}"#);
}

/// The embedding program's message as a line for Node workers: one JSON
/// value, written compactly (a line may hold no newline), that Node will
/// not take for one of its own (`cmd` starting with `NODE_`).
pub(crate) fn app_line(data: &[u8]) -> Result<Vec<u8>, String> {
    let value: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| format!("a message to Node workers must be JSON ({e})"))?;
    if value
        .get("cmd")
        .and_then(|c| c.as_str())
        .is_some_and(|c| c.starts_with("NODE_"))
    {
        return Err("a `cmd` starting with NODE_ is Node's own".into());
    }
    let mut line = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_node_20_sends() {
        let q = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":18090,"addressType":4,"backlog":0,"seq":1}"#;
        let FromWorker::QueryServer(q) = parse(q).unwrap() else {
            panic!("a query");
        };
        assert_eq!(q.seq, 1);
        assert_eq!(q.port, 18090);
        assert_eq!(q.address, None);
        assert_eq!(q.address_type, AddressType::V4);
        assert_eq!(q.data.get(), "null");
        assert_eq!(server_key(&q), "null:18090:4:undefined:0");
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}"#),
            Ok(FromWorker::Accepted {
                ack: 2,
                accepted: true
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#),
            Ok(FromWorker::HandleAck)
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            Ok(FromWorker::Online)
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"close","key":"a:1","seq":5}"#),
            Ok(FromWorker::Close { key: "a:1" })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":9}"#),
            Ok(FromWorker::ExitedAfterDisconnect { seq: 9 })
        );
    }

    #[test]
    fn the_per_connection_lines_parse_as_the_full_parse_does() {
        let lines: &[&[u8]] = &[
            br#"{"cmd":"NODE_HANDLE_ACK"}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":0,"accepted":false,"seq":0}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":18446744073709551615,"accepted":true,"seq":1}"#,
        ];
        for line in lines {
            let fast = per_connection(line);
            assert!(fast.is_some(), "{}", String::from_utf8_lossy(line));
            assert_eq!(fast.map(Ok), Some(parse_json(line)));
        }
        // Variations go to the full parse, which decides.
        let others: &[&[u8]] = &[
            br#"{"cmd":"NODE_HANDLE_ACK" }"#,
            br#"{"cmd":"NODE_HANDLE_NACK"}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":02,"accepted":true,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":18446744073709551616,"accepted":true,"seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":-1,"accepted":true,"seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3,"x":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":1,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":,"accepted":true,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":2.5,"accepted":true,"seq":3}"#,
        ];
        for line in others {
            assert_eq!(
                per_connection(line),
                None,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3,"x":1}"#),
            Ok(FromWorker::Accepted {
                ack: 2,
                accepted: true
            })
        );
        assert!(parse(br#"{"cmd":"NODE_CLUSTER","ack":-1,"accepted":true,"seq":1}"#).is_err());
    }

    #[test]
    fn data_is_kept_raw() {
        let q = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":1,"data":{"ticketKeys":"ab12"},"address":"::1","port":0,"addressType":6,"backlog":511,"seq":4}"#;
        let FromWorker::QueryServer(q) = parse(q).unwrap() else {
            panic!("a query");
        };
        assert_eq!(q.data.get(), r#"{"ticketKeys":"ab12"}"#);
        let no_backlog = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":80,"addressType":4,"backlog":false,"seq":1}"#;
        let FromWorker::QueryServer(nb) = parse(no_backlog).unwrap() else {
            panic!("a query");
        };
        assert_eq!(nb.backlog, 0);
        assert_eq!(q.address.as_deref(), Some("::1"));
        assert_eq!(q.backlog, 511);
        assert_eq!(q.address_type, AddressType::V6);
    }

    #[test]
    fn app_messages_are_anything_else() {
        for line in [
            &br#"{"hello":1}"#[..],
            br#"[1,2]"#,
            br#""text""#,
            br#"{"cmd":"mine","port":"x"}"#,
            br#"{"cmd":5}"#,
            br#"{"a":1,"a":2}"#,
        ] {
            assert_eq!(parse(line), Ok(FromWorker::App), "{line:?}");
        }
        assert!(parse(b"{nope").is_err());
        assert!(parse(b"\xff").is_err());
        assert!(parse(br#"{"cmd":"NODE_CLUSTER","ack":"x","accepted":true}"#).is_err());
    }

    #[test]
    fn writes_lines_node_reads() {
        let mut out = Vec::new();
        newconn(&mut out, 7, &json_string("null:0:4:undefined:0"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["msg"]["act"], "newconn");
        assert_eq!(v["msg"]["seq"], 7);
        assert!(out.ends_with(b"}\n"));
        out.clear();
        reply_rr(
            &mut out,
            3,
            1,
            "\"k\"",
            r#"{"t":1}"#,
            "[::]:8080".parse().unwrap(),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["sockname"]["family"], "IPv6");
        assert_eq!(v["sockname"]["address"], "::");
        assert_eq!(v["sockname"]["port"], 8080);
        assert_eq!(v["data"]["t"], 1);
        assert_eq!(v["ack"], 1);
        out.clear();
        reply_error(&mut out, 4, 2, "\"k\"", -98);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["errno"], -98);
    }
}
