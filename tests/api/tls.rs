//! TLS and HTTP/2 (SPEC §8; the `server.tls.*` and `upstream.ca_file` keys of
//! §2; `X-Forwarded-Proto` in §3 step 7; certificate reload in §7): the TLS
//! listener beside the plain one, HTTP/1.1 and HTTP/2 on it through the same
//! pipeline, 50 MiB both ways, the TLS versions, the h2→h1 downgrade refusing
//! what an HTTP/1.1 upstream would read differently, certificate rotation
//! without a restart, a bad certificate or key at start-up and at reload,
//! HTTPS upstreams, and the parts of the pipeline that look at the connection
//! (the peer address, the slow-client watchdog) on a TLS connection.
//!
//! Every certificate is made here, at test time, by a CA of the test's own
//! (rcgen), for `localhost` and `127.0.0.1`. The clients are real: awc over
//! rustls for HTTP/1.1 and HTTP/2, a raw rustls connection for handshakes and
//! HTTP/1.1 byte by byte, hand-written HTTP/2 frames for what an HTTP/2
//! library refuses to send, and a hand-written ClientHello for the TLS
//! versions rustls cannot speak.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::Version;
use actix_web::web::Bytes;
use futures_util::StreamExt;
use gatehouse::settings::Settings;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::helpers::*;

const MIB: usize = 1024 * 1024;

/// How long a raw exchange waits for the gateway's answer.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// How long a request the gateway wrongly forwarded would take to show at
/// the upstream: a loopback write, well under this.
const SETTLE: Duration = Duration::from_millis(300);

/// ALPN protocol ids.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// 46 bytes, comfortably above the 32-byte minimum.
const SECRET: &str = "gatehouse-tls-test-secret-0123456789abcdefghij";

// ---------------------------------------------------------------------------
// A test CA and the certificates it issues
// ---------------------------------------------------------------------------

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority of the test's own.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A certificate for `localhost` and `127.0.0.1`, and its key.
#[derive(Clone)]
struct Leaf {
    /// The last byte of the serial number, which tells rotated certificates apart.
    serial: u8,
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Self {
            der: certificate.der().clone(),
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1` with serial
    /// `0a:<serial>`, signed by this CA, with a key of its own.
    fn issue(&self, serial: u8) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.serial_number = Some(SerialNumber::from_slice(&[0x0a, serial]));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            serial,
            der: certificate.der().clone(),
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }
}

/// A CA, the certificate the gateway serves, and the files it reads them from.
struct Pki {
    ca: TestCa,
    leaf: Leaf,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A fresh CA and certificate (serial `0a:a1`), written to the files.
    fn new() -> Self {
        let ca = TestCa::new("gatehouse test CA");
        let leaf = ca.issue(0xa1);
        let pki = Self {
            ca,
            leaf,
            dir: tempfile::tempdir().unwrap(),
        };
        pki.install(&pki.leaf);
        pki
    }

    fn cert_file(&self) -> PathBuf {
        self.dir.path().join("gatehouse.crt")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("gatehouse.key")
    }

    /// Writes `leaf`'s certificate and key over the gateway's files, in place.
    fn install(&self, leaf: &Leaf) {
        self.write(&leaf.cert_pem, &leaf.key_pem);
    }

    /// Writes these texts as the certificate and key files, in place.
    fn write(&self, cert: &str, key: &str) {
        std::fs::write(self.cert_file(), cert).unwrap();
        std::fs::write(self.key_file(), key).unwrap();
    }

    /// The `[server]` lines of a TLS listener on a free loopback port
    /// serving these files.
    fn server_lines(&self) -> String {
        format!(
            "tls.listen = \"127.0.0.1:0\"\ntls.cert_file = {:?}\ntls.key_file = {:?}",
            self.cert_file(),
            self.key_file()
        )
    }
}

/// A gateway builder with the TLS listener of `pki` beside the plain one.
fn with_tls(pki: &Pki) -> GatewayBuilder<TestGateway> {
    TestGateway::builder().server(&pki.server_lines())
}

fn tls_address(gateway: &TestGateway) -> SocketAddr {
    gateway.tls_address.expect("the gateway has a TLS listener")
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A rustls client configuration that trusts only `ca`, offers `alpn`, and
/// speaks `versions`.
fn client_config(
    ca: &TestCa,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Arc::new(config)
}

/// awc over rustls, trusting `ca` and offering `alpn`: `[H2]` speaks
/// HTTP/2, `[HTTP11]` HTTP/1.1. Like [`client`], it neither follows
/// redirects nor decompresses.
fn tls_client(ca: &TestCa, alpn: &[&[u8]]) -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(client_config(ca, alpn, rustls::ALL_VERSIONS)))
        .disable_redirects()
        .timeout(Duration::from_secs(30))
        .finish()
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        _ => "another version",
    }
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to `address` for `localhost`, handshake completed.
fn handshake(address: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStream> {
    let tcp = TcpStream::connect(address)?;
    tcp.set_read_timeout(Some(READ_LIMIT))?;
    let connection =
        ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// The certificate a new handshake with the gateway gets.
fn served_certificate(address: SocketAddr, ca: &TestCa) -> CertificateDer<'static> {
    let stream = handshake(address, client_config(ca, &[HTTP11], rustls::ALL_VERSIONS)).expect("the TLS handshake");
    leaf_of(&stream)
}

fn leaf_of(stream: &TlsStream) -> CertificateDer<'static> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the gateway sent a certificate")
        .clone()
}

/// Which of `known` this certificate is, by its serial.
fn which(der: &CertificateDer<'_>, known: &[&Leaf]) -> String {
    known
        .iter()
        .find(|leaf| leaf.der == *der)
        .map_or("an unknown certificate".to_owned(), |leaf| {
            format!("the certificate with serial 0a:{:02x}", leaf.serial)
        })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Reads one HTTP/1.1 response (its head and the body its `Content-Length`
/// declares) off a kept-alive stream.
fn read_one_response(stream: &mut impl Read) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = find(&received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return String::from_utf8_lossy(&received).into_owned();
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) => panic!(
                "reading the response: {err}; so far {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
}

/// Reads until the gateway closes the connection or `limit` passes: what
/// arrived, and whether it closed (a clean TLS close, an end without one,
/// or a reset all count).
fn read_until_close(stream: &mut TlsStream, limit: Duration) -> (String, bool) {
    let started = Instant::now();
    stream.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buffer) {
            Ok(0) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), false)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(pattern_byte).collect()
}

/// An HS256 token for `sub`, valid for an hour.
fn token(sub: &str) -> String {
    hs256_token(SECRET, sub)
}

// ---------------------------------------------------------------------------
// HTTP/2 by hand
// ---------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// One frame as it goes on the wire.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(9 + payload.len());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    bytes.push(kind);
    bytes.push(flags);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The payload without the padding and priority fields (HEADERS, DATA).
    fn content(&self) -> &[u8] {
        let mut content = &self.payload[..];
        let mut padding = 0;
        if self.flags & PADDED != 0 && !content.is_empty() {
            padding = content[0] as usize;
            content = &content[1..];
        }
        if self.kind == HEADERS && self.flags & PRIORITY != 0 {
            content = content.get(5..).unwrap_or_default();
        }
        &content[..content.len().saturating_sub(padding)]
    }

    fn code(&self, at: usize) -> u32 {
        self.payload
            .get(at..at + 4)
            .map_or(u32::MAX, |bytes| u32::from_be_bytes(bytes.try_into().unwrap()))
    }
}

/// An HPACK integer with an `prefix_bits`-bit prefix, whose first byte
/// carries `first`'s high bits (RFC 7541 §5.1).
fn hpack_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A "literal header field without indexing — new name" (RFC 7541 §6.2.2):
/// the name and value go raw, no Huffman, whatever bytes they hold.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The HPACK integer at `at`: its value and where the next field starts.
fn hpack_integer_at(block: &[u8], at: usize, prefix_bits: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix_bits) - 1;
    let first = *block.get(at)? as usize & max;
    if first < max {
        return Some((first, at + 1));
    }
    let (mut value, mut shift, mut next) = (max, 0, at + 1);
    loop {
        let byte = *block.get(next)?;
        value += ((byte & 0x7f) as usize) << shift;
        next += 1;
        if byte & 0x80 == 0 {
            return Some((value, next));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Three digits in HPACK's Huffman code (RFC 7541 Appendix B: `0`–`2` are
/// the 5-bit codes 0–2, `3`–`9` the 6-bit codes 0x19–0x1f).
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |shift| (byte >> shift) & 1))
        .collect();
    let code = |from: usize, len: usize| -> Option<u8> {
        Some(
            bits.get(from..from + len)?
                .iter()
                .fold(0, |code, bit| (code << 1) | bit),
        )
    };
    let (mut digits, mut at) = (String::new(), 0);
    while digits.len() < 3 {
        let short = code(at, 5)?;
        if short < 3 {
            digits.push((b'0' + short) as char);
            at += 5;
            continue;
        }
        let long = code(at, 6)?;
        if !(0x19..=0x1f).contains(&long) {
            return None;
        }
        digits.push((b'3' + long - 0x19) as char);
        at += 6;
    }
    Some(digits)
}

/// The `:status` of a response header block, which servers encode first:
/// indexed from the static table (200, 204, 206, 304, 400, 404, 500) or a
/// literal with the `:status` name, raw or Huffman-coded. `None` for
/// anything else (such as a status from the dynamic table).
fn response_status(block: &[u8]) -> Option<u16> {
    const INDEXED: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let mut at = 0;
    // Dynamic table size updates may open the block.
    while block.get(at)? & 0xe0 == 0x20 {
        at = hpack_integer_at(block, at, 5)?.1;
    }
    let first = *block.get(at)?;
    if first & 0x80 != 0 {
        let (index, _) = hpack_integer_at(block, at, 7)?;
        return (8..=14).contains(&index).then(|| INDEXED[index - 8]);
    }
    let prefix_bits = if first & 0xc0 == 0x40 { 6 } else { 4 };
    let (name_index, value_at) = hpack_integer_at(block, at, prefix_bits)?;
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let huffman = block.get(value_at)? & 0x80 != 0;
    let (len, start) = hpack_integer_at(block, value_at, 7)?;
    let raw = block.get(start..start + len)?;
    let digits = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    digits.parse().ok()
}

type Field = (Vec<u8>, Vec<u8>);

fn field(name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Field {
    (name.as_ref().to_vec(), value.as_ref().to_vec())
}

/// The pseudo-header fields of a request.
fn request_fields(method: &str, authority: &str, path: &str) -> Vec<Field> {
    vec![
        field(":method", method),
        field(":scheme", "https"),
        field(":authority", authority),
        field(":path", path),
    ]
}

/// How the gateway dealt with one stream.
enum Outcome {
    /// A response: its status (when it could be read) and body.
    Answered { status: Option<u16>, body: String },
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended without either.
    Closed(String),
    /// Nothing within the limit.
    Silent,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered { status, body } => write!(f, "a {status:?} response, body {body:?}"),
            Outcome::Reset(code) => write!(f, "RST_STREAM with error code {code:#x}"),
            Outcome::GoAway(code) => write!(f, "GOAWAY with error code {code:#x}"),
            Outcome::Closed(why) => write!(f, "the connection ended without GOAWAY ({why})"),
            Outcome::Silent => write!(f, "nothing within {READ_LIMIT:?}"),
        }
    }
}

impl Outcome {
    fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answered { status, .. } => *status,
            _ => None,
        }
    }

    fn body(&self) -> &str {
        match self {
            Outcome::Answered { body, .. } => body,
            _ => "",
        }
    }

    /// A 400, RST_STREAM or GOAWAY: what SPEC §8 allows for a malformed
    /// request (RFC 9113 §8.1.1, §5.4.1).
    fn refused(&self) -> bool {
        matches!(self, Outcome::Reset(_) | Outcome::GoAway(_)) || self.status() == Some(400)
    }
}

/// An HTTP/2 connection spoken frame by frame over rustls (ALPN `h2`): the
/// preface and SETTINGS are exchanged on opening; each request is written
/// in one piece, its header block in HPACK literals.
struct H2Connection {
    tls: TlsStream,
    next_stream: u32,
    buffer: Vec<u8>,
}

impl H2Connection {
    fn open(address: SocketAddr, ca: &TestCa) -> Self {
        let tls = handshake(address, client_config(ca, &[H2], rustls::ALL_VERSIONS)).expect("the TLS handshake");
        assert_eq!(tls.conn.alpn_protocol(), Some(H2), "ALPN did not pick h2");
        let mut connection = Self {
            tls,
            next_stream: 1,
            buffer: Vec::new(),
        };
        let mut opening = PREFACE.to_vec();
        // SETTINGS_ENABLE_PUSH = 0
        opening.extend(frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]));
        connection.write(&opening).expect("writing the connection preface");
        // The server's SETTINGS, acknowledged before any request, so that
        // nothing is written after a request (a write to a connection the
        // gateway has closed could cost the answer already on its way).
        let deadline = Instant::now() + READ_LIMIT;
        loop {
            match connection.read_frame(deadline) {
                Ok(Some(settings)) if settings.kind == SETTINGS && settings.flags & ACK == 0 => break,
                Ok(Some(_)) => {}
                other => panic!("the gateway sent no SETTINGS: {other:?}"),
            }
        }
        connection
            .write(&frame(SETTINGS, ACK, 0, &[]))
            .expect("acknowledging the SETTINGS");
        connection
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// The next frame, or `None` once `deadline` has passed.
    fn read_frame(&mut self, deadline: Instant) -> io::Result<Option<Frame>> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.buffer.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buffer[0], self.buffer[1], self.buffer[2]]) as usize;
                if self.buffer.len() >= 9 + len {
                    let bytes: Vec<u8> = self.buffer.drain(..9 + len).collect();
                    return Ok(Some(Frame {
                        kind: bytes[3],
                        flags: bytes[4],
                        stream: u32::from_be_bytes(bytes[5..9].try_into().unwrap()) & 0x7fff_ffff,
                        payload: bytes[9..].to_vec(),
                    }));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.tls
                .sock
                .set_read_timeout(Some(left.min(Duration::from_millis(100))))?;
            match self.tls.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the gateway closed the connection",
                    ))
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Writes a request, HEADERS (END_HEADERS, and END_STREAM without a
    /// body) then one DATA frame per chunk, in one write; its stream id.
    fn send(&mut self, fields: &[Field], body: &[&[u8]]) -> u32 {
        self.send_paced(fields, body, Duration::ZERO)
    }

    /// As [`Self::send`], with `pause` between the HEADERS and the DATA
    /// frames (each written on its own), so the gateway sees the request
    /// before its body.
    fn send_paced(&mut self, fields: &[Field], body: &[&[u8]], pause: Duration) -> u32 {
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        for (name, value) in fields {
            hpack_literal(&mut block, name, value);
        }
        let flags = END_HEADERS | if body.is_empty() { END_STREAM } else { 0 };
        let mut bytes = frame(HEADERS, flags, stream, &block);
        if !pause.is_zero() {
            let _ = self.write(&std::mem::take(&mut bytes));
            std::thread::sleep(pause);
        }
        for (index, chunk) in body.iter().enumerate() {
            let flags = if index + 1 == body.len() { END_STREAM } else { 0 };
            bytes.extend(frame(DATA, flags, stream, chunk));
        }
        // A failed write shows as the outcome.
        let _ = self.write(&bytes);
        stream
    }

    /// Reads frames until the gateway has answered `stream` whole, reset
    /// it, or gone away; answers its SETTINGS and PINGs meanwhile.
    fn outcome(&mut self, stream: u32, limit: Duration) -> Outcome {
        let deadline = Instant::now() + limit;
        let (mut block, mut status, mut head_done, mut body) = (Vec::new(), None, false, Vec::new());
        let answered = |status, body: &[u8]| Outcome::Answered {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        };
        loop {
            let frame_in = match self.read_frame(deadline) {
                Ok(Some(frame_in)) => frame_in,
                Ok(None) => return Outcome::Silent,
                Err(err) => return Outcome::Closed(err.to_string()),
            };
            let ours = frame_in.stream == stream;
            match frame_in.kind {
                SETTINGS if frame_in.flags & ACK == 0 => {
                    let _ = self.write(&frame(SETTINGS, ACK, 0, &[]));
                }
                PING if frame_in.flags & ACK == 0 => {
                    let _ = self.write(&frame(PING, ACK, 0, &frame_in.payload));
                }
                GOAWAY => return Outcome::GoAway(frame_in.code(4)),
                RST_STREAM if ours => {
                    return match status {
                        Some(_) => answered(status, &body),
                        None => Outcome::Reset(frame_in.code(0)),
                    };
                }
                HEADERS | CONTINUATION if ours => {
                    if !head_done {
                        block.extend_from_slice(frame_in.content());
                        if frame_in.flags & END_HEADERS != 0 {
                            head_done = true;
                            status = response_status(&block);
                        }
                    }
                    if frame_in.flags & END_STREAM != 0 {
                        return answered(status, &body);
                    }
                }
                DATA if ours => {
                    body.extend_from_slice(frame_in.content());
                    if frame_in.flags & END_STREAM != 0 {
                        return answered(status, &body);
                    }
                }
                _ => {}
            }
        }
    }

    /// A request with these fields and body, and its outcome.
    fn exchange(&mut self, fields: &[Field], body: &[&[u8]]) -> Outcome {
        let stream = self.send(fields, body);
        self.outcome(stream, READ_LIMIT)
    }

    /// [`Self::exchange`] with the body sent 300 ms after the headers.
    fn exchange_paced(&mut self, fields: &[Field], body: &[&[u8]]) -> Outcome {
        let stream = self.send_paced(fields, body, Duration::from_millis(300));
        self.outcome(stream, READ_LIMIT)
    }
}

// ---------------------------------------------------------------------------
// Upstreams on raw sockets
// ---------------------------------------------------------------------------

/// A loopback listener that hands every connection to `serve` on a thread of
/// its own. Dropping it stops accepting and sets the flag `serve` watches.
struct Acceptor {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    fn start(serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let serve = Arc::new(serve);
        let thread = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (serve, stopped) = (serve.clone(), stopped.clone());
                        connections.push(std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            serve(stream, &stopped)
                        }));
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
            drop(listener);
            for connection in connections {
                let _ = connection.join();
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads from `stream` until `done` says the bytes so far are enough, the
/// peer closes, `limit` passes or `stopped` is set. Short read timeouts
/// must be set on the socket.
fn read_while(
    stream: &mut impl Read,
    received: &mut Vec<u8>,
    limit: Duration,
    stopped: &AtomicBool,
    done: impl Fn(&[u8]) -> bool,
) {
    let give_up = Instant::now() + limit;
    let mut buffer = [0u8; 8192];
    while !done(received) {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stopped.load(Ordering::SeqCst) || Instant::now() >= give_up {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// What reached a [`RecordingUpstream`] of one request: its head, the body
/// bytes that followed it, and whether they made a whole body by the head's
/// own framing.
#[derive(Debug, Clone)]
struct Arrival {
    head: String,
    body: Vec<u8>,
    complete: bool,
    /// Bytes past a declared `Content-Length`: a next request, to HTTP/1.1.
    excess: usize,
}

/// How the head of a request says its body ends.
enum BodyFraming {
    Length(usize),
    Chunked,
    None,
}

fn body_framing(head: &str) -> BodyFraming {
    let mut framing = BodyFraming::None;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        if name == "transfer-encoding" && value.ends_with("chunked") {
            return BodyFraming::Chunked;
        }
        if name == "content-length" {
            framing = BodyFraming::Length(value.parse().unwrap_or(usize::MAX));
        }
    }
    framing
}

/// A raw HTTP/1.1 upstream that records, for every request but its health
/// probes, the head and every body byte that reaches it: the upstream end
/// of the h2→h1 downgrade, seen byte for byte. It answers a request whose
/// body is complete with 200 `{"received":N}`, and closes each connection.
struct RecordingUpstream {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    acceptor: Acceptor,
}

impl RecordingUpstream {
    fn start() -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::<Arrival>::new()));
        let recorded = arrivals.clone();
        let acceptor = Acceptor::start(move |mut stream, stopped| {
            stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut received = Vec::new();
            read_while(&mut stream, &mut received, Duration::from_secs(5), stopped, |bytes| {
                find(bytes, b"\r\n\r\n").is_some()
            });
            let Some(end) = find(&received, b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            if head.starts_with("GET /health ") {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
            let framing = body_framing(&head);
            let complete = |body: &[u8]| match framing {
                BodyFraming::Length(len) => body.len() >= len,
                BodyFraming::Chunked => body.ends_with(b"0\r\n\r\n"),
                BodyFraming::None => true,
            };
            // Recorded as soon as the head is in, the body as it comes.
            let index = {
                let mut arrivals = recorded.lock().unwrap();
                arrivals.push(Arrival {
                    head,
                    body: Vec::new(),
                    complete: false,
                    excess: 0,
                });
                arrivals.len() - 1
            };
            let mut body = received[end + 4..].to_vec();
            loop {
                let whole = complete(&body);
                {
                    let mut arrivals = recorded.lock().unwrap();
                    let arrival = &mut arrivals[index];
                    arrival.body = body.clone();
                    arrival.complete = whole;
                    arrival.excess = match framing {
                        BodyFraming::Length(len) => body.len().saturating_sub(len),
                        _ => 0,
                    };
                }
                if whole {
                    break;
                }
                let before = body.len();
                read_while(&mut stream, &mut body, Duration::from_secs(2), stopped, |bytes| {
                    bytes.len() > before
                });
                if body.len() == before {
                    return; // closed, or nothing more in time: no answer
                }
            }
            let answer = format!("{{\"received\":{}}}", body.len());
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .as_bytes(),
            );
        });
        Self { arrivals, acceptor }
    }

    fn url(&self) -> String {
        format!("http://{}", self.acceptor.address)
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// The body every request but `/health` gets from a [`TlsUpstream`].
const TLS_UPSTREAM_BODY: &str = "hello from an https upstream";

/// An upstream that speaks HTTP/1.1 over TLS (rustls on std sockets) with a
/// certificate of a test CA: 200 `{"status":"ok"}` on `GET /health`, 200
/// [`TLS_UPSTREAM_BODY`] on anything else; one request per connection. A
/// client that refuses its certificate gets no request through.
struct TlsUpstream {
    hits: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    /// The SNI of every handshake that got as far as a request head.
    server_names: Arc<Mutex<Vec<String>>>,
    acceptor: Acceptor,
}

impl TlsUpstream {
    fn start(leaf: &Leaf) -> Self {
        let config = Arc::new(
            ServerConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
                )
                .unwrap(),
        );
        let hits = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let server_names = Arc::new(Mutex::new(Vec::new()));
        let (counted, seen, named) = (hits.clone(), heads.clone(), server_names.clone());
        let acceptor = Acceptor::start(move |stream, stopped| {
            stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let Ok(connection) = ServerConnection::new(config.clone()) else {
                return;
            };
            let mut tls = StreamOwned::new(connection, stream);
            let mut received = Vec::new();
            read_while(&mut tls, &mut received, Duration::from_secs(5), stopped, |bytes| {
                find(bytes, b"\r\n\r\n").is_some()
            });
            let Some(end) = find(&received, b"\r\n\r\n") else {
                return;
            };
            if let Some(name) = tls.conn.server_name() {
                named.lock().unwrap().push(name.to_owned());
            }
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let body = if head.starts_with("GET /health ") {
                r#"{"status":"ok"}"#
            } else {
                counted.fetch_add(1, Ordering::SeqCst);
                seen.lock().unwrap().push(head);
                TLS_UPSTREAM_BODY
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(response.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        });
        Self {
            hits,
            heads,
            server_names,
            acceptor,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.acceptor.address.port())
    }

    /// Requests other than health probes that got through.
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn server_names(&self) -> Vec<String> {
        self.server_names.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// 1. HTTP/1.1 and HTTP/2 over TLS, beside the plain listener
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn http11_and_http2_over_tls_reach_the_upstream_as_https_while_the_plain_listener_stays_http() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);
    let tls_host = format!("localhost:{}", address.port());

    for (offered, expected) in [
        (&[HTTP11][..], Version::HTTP_11),
        (&[H2][..], Version::HTTP_2),
        (&[H2, HTTP11][..], Version::HTTP_2),
    ] {
        let offered_names: Vec<_> = offered.iter().map(|id| String::from_utf8_lossy(id)).collect();
        let response = tls_client(&pki.ca, offered)
            .get(gateway.tls_url("/api/over-tls?q=1"))
            // An untrusted client's own forwarding headers are replaced.
            .insert_header(("x-forwarded-proto", "http"))
            .send()
            .await
            .unwrap_or_else(|err| panic!("offering {offered_names:?}: the request failed: {err}"));
        assert_eq!(
            version_name(response.version()),
            version_name(expected),
            "offering {offered_names:?}"
        );
        let reply = read_reply(response).await;
        assert_eq!(reply.status, 200, "offering {offered_names:?}: {}", reply.text());
        assert!(reply.header("x-request-id").is_some_and(is_uuid));
        let seen = upstream.last_seen();
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.target, "/api/over-tls?q=1");
        assert_eq!(
            values(&seen, "x-forwarded-proto"),
            ["https"],
            "offering {offered_names:?}"
        );
        assert_eq!(
            values(&seen, "x-forwarded-host"),
            [tls_host.as_str()],
            "offering {offered_names:?}: X-Forwarded-Host is the Host / :authority the client used"
        );
    }
    assert_eq!(upstream.hits(), 3);

    // The plain listener of the same gateway is still plain HTTP.
    let reply = get(&gateway.url("/api/plain")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(values(&upstream.last_seen(), "x-forwarded-proto"), ["http"]);

    // ALPN as the TLS layer reports it.
    for (offered, picked) in [
        (&[H2, HTTP11][..], H2),
        (&[HTTP11, H2][..], H2),
        (&[HTTP11][..], HTTP11),
    ] {
        let stream = handshake(address, client_config(&pki.ca, offered, rustls::ALL_VERSIONS)).unwrap();
        assert_eq!(
            stream.conn.alpn_protocol().map(String::from_utf8_lossy),
            Some(String::from_utf8_lossy(picked)),
            "offering {:?}",
            offered.iter().map(|id| String::from_utf8_lossy(id)).collect::<Vec<_>>()
        );
    }

    // Over HTTP/2 the host is the :authority, whatever it names.
    let mut h2 = H2Connection::open(address, &pki.ca);
    let outcome = h2.exchange(&request_fields("GET", "api.gatehouse.test", "/api/authority"), &[]);
    assert_eq!(outcome.status(), Some(200), "{outcome}");
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/api/authority");
    assert_eq!(values(&seen, "x-forwarded-host"), ["api.gatehouse.test"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["https"]);
}

#[actix_web::test]
async fn over_http2_the_authority_picks_a_route_with_hosts_as_the_host_header_does() {
    let pki = Pki::new();
    let (named, other) = (Upstream::start("named"), Upstream::start("other"));
    let gateway = with_tls(&pki).start(&format!(
        "{}hosts = [\"api.gatehouse.test\"]\n{}",
        service_at("named", "/api/x", &[named.url()]),
        service_at("other", "/api", &[other.url()]),
    ));
    let mut h2 = H2Connection::open(tls_address(&gateway), &pki.ca);
    for (authority, expected) in [
        ("api.gatehouse.test", "named"),
        ("API.gatehouse.test:443", "named"),
        ("elsewhere.test", "other"),
    ] {
        let (named_before, other_before) = (named.hits(), other.hits());
        let outcome = h2.exchange(&request_fields("GET", authority, "/api/x/1"), &[]);
        assert_eq!(outcome.status(), Some(200), "{authority}: {outcome}");
        let reached = if named.hits() > named_before {
            "named"
        } else if other.hits() > other_before {
            "other"
        } else {
            "none"
        };
        assert_eq!(reached, expected, ":authority {authority}");
    }
}

// ---------------------------------------------------------------------------
// 2. 50 MiB each way
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn fifty_mib_bodies_stream_through_intact_both_ways_over_http2_and_http11_on_tls() {
    let pki = Pki::new();
    let upstream = Upstream::start("big");
    let gateway =
        with_tls(&pki)
            .server("max_body_bytes = 104857600")
            .start(&service_at("api", "/api", &[upstream.url()]));
    let size = 50 * MIB;
    let expected_sha256 = pattern_sha256(size);

    for (offered, version) in [(H2, Version::HTTP_2), (HTTP11, Version::HTTP_11)] {
        let over = version_name(version);
        let big = tls_client(&pki.ca, &[offered]);

        // Upload: generated chunk by chunk, never held whole.
        let response = big
            .post(gateway.tls_url("/api/upload"))
            .timeout(Duration::from_secs(600))
            .send_stream(pattern_stream::<io::Error>(size))
            .await
            .unwrap_or_else(|err| panic!("{over}: the upload failed: {err}"));
        assert_eq!(version_name(response.version()), over);
        let reply = read_reply(response).await;
        assert_eq!(reply.status, 200, "{over}: {}", reply.text());
        let seen = upstream.last_seen();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body_len, size, "{over}: bytes the upstream received");
        assert_eq!(seen.body_sha256, expected_sha256, "{over}: the upload arrived altered");

        // Download: hashed as it streams, never collected.
        let mut response = big
            .get(gateway.tls_url(&format!("/api/download/{size}")))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap_or_else(|err| panic!("{over}: the download failed to start: {err}"));
        assert_eq!(response.status(), 200, "{over}");
        assert_eq!(version_name(response.version()), over);
        if let Some(length) = response.headers().get("content-length") {
            assert_eq!(length.to_str().unwrap(), size.to_string(), "{over}");
        }
        let (mut received, mut hasher) = (0, Sha256::new());
        while let Some(chunk) = response.next().await {
            let chunk = chunk.unwrap_or_else(|err| panic!("{over}: the download broke after {received} bytes: {err}"));
            received += chunk.len();
            hasher.update(&chunk);
        }
        assert_eq!(received, size, "{over}: bytes the client received");
        assert_eq!(
            hex(&hasher.finalize()),
            expected_sha256,
            "{over}: the download arrived altered"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. The pipeline over HTTP/2: auth, limits, max_body_bytes
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn auth_rate_limits_and_max_body_bytes_hold_over_http2() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).server("max_body_bytes = 1000").start(&format!(
        r#"
[auth]
jwt_secret = "{SECRET}"

[rate_limit]
global = ""
[rate_limit.policies.two]
window_s = 60
max = 2
message = "Two is plenty"

[services.api]
instances = {instances}

[routes.secure]
prefix = "/secure"
service = "api"
auth = true

[routes.limited]
prefix = "/limited"
service = "api"
rate_limit = "two"

[routes.upload]
prefix = "/upload"
service = "api"
"#,
        instances = instances(&[&upstream]),
    ));
    let h2 = tls_client(&pki.ca, &[H2]);
    async fn send_h2(request: awc::ClientRequest, body: Option<Vec<u8>>) -> Reply {
        let response = match body {
            Some(body) => request.send_body(body).await,
            None => request.send().await,
        }
        .expect("the request reaches the gateway");
        assert_eq!(version_name(response.version()), "HTTP/2");
        read_reply(response).await
    }

    // Auth: no token, 401; a valid one, through with X-User-Id.
    let reply = send_h2(h2.get(gateway.tls_url("/secure/profile")), None).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Access token required"}"#);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert_eq!(upstream.hits(), 0, "a request without a token reached the upstream");
    let reply = send_h2(
        h2.get(gateway.tls_url("/secure/profile"))
            .insert_header(("authorization", format!("Bearer {}", token("h2-user")))),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(values(&upstream.last_seen(), "x-user-id"), ["h2-user"]);

    // A policy of 2: the third request is over it.
    for attempt in 1..=2 {
        let reply = send_h2(h2.get(gateway.tls_url("/limited/x")), None).await;
        assert_eq!(reply.status, 200, "request {attempt}: {}", reply.text());
    }
    let reply = send_h2(h2.get(gateway.tls_url("/limited/x")), None).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Two is plenty"}"#);
    assert!(reply.header("retry-after").is_some(), "429 without Retry-After");
    let hits = upstream.hits();

    // max_body_bytes: declared over it, 413 and nothing forwarded.
    let reply = send_h2(h2.post(gateway.tls_url("/upload/declared")), Some(pattern(1001))).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Payload too large"}"#);
    assert_eq!(
        upstream.hits(),
        hits,
        "a declared body over the limit reached the upstream"
    );

    // A body without a declared length that grows past it: 413, and the
    // upstream never gets more than the limit.
    let response = h2
        .post(gateway.tls_url("/upload/streamed"))
        .send_stream(futures_util::stream::iter([
            Ok::<_, io::Error>(Bytes::from(pattern(1200)).slice(..600)),
            Ok(Bytes::from(pattern(1200)).slice(600..)),
        ]))
        .await
        .expect("the request reaches the gateway");
    assert_eq!(version_name(response.version()), "HTTP/2");
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.text(), r#"{"error":"Payload too large"}"#);
    for seen in upstream.seen() {
        assert!(seen.body_len <= 1000, "the upstream got {} bytes", seen.body_len);
    }

    // Exactly the limit passes intact.
    let reply = send_h2(h2.post(gateway.tls_url("/upload/exact")), Some(pattern(1000))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.last_seen();
    assert_eq!(seen.target, "/upload/exact");
    assert_eq!(seen.body_len, 1000);
    assert_eq!(seen.body_sha256, pattern_sha256(1000));
}

// ---------------------------------------------------------------------------
// 4. TLS versions
// ---------------------------------------------------------------------------

/// A ClientHello in the pre-1.3 style, with `version` as `client_version`
/// and no `supported_versions` extension: ECDHE-ECDSA suites (the test
/// certificates have P-256 keys) in GCM and CBC, and what a TLS 1.2 server
/// needs besides (SNI, groups, point formats, signature algorithms).
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut hello = version.to_vec();
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // no session id
    let suites: [u16; 8] = [0xc02b, 0xc02c, 0xcca9, 0xc023, 0xc009, 0xc00a, 0x002f, 0x0035];
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        hello.extend_from_slice(&suite.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]); // compression: null only
    let mut extensions = Vec::new();
    let name = b"localhost";
    let mut server_name = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    server_name.push(0);
    server_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name.extend_from_slice(name);
    extension(&mut extensions, 0x0000, &server_name);
    extension(&mut extensions, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
    extension(&mut extensions, 0x000b, &[1, 0]); // uncompressed points
    extension(
        &mut extensions,
        0x000d,
        &[0, 8, 0x04, 0x03, 0x05, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    extension(&mut extensions, 0x0017, &[]); // extended master secret
    extension(&mut extensions, 0xff01, &[0]); // renegotiation info
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);

    let mut handshake = vec![1]; // ClientHello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// The first bytes the gateway answers a hand-written ClientHello with
/// (empty if it closes without a byte).
fn answer_to_hello(address: SocketAddr, version: [u8; 2]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(READ_LIMIT)).unwrap();
    tcp.write_all(&legacy_client_hello(version)).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while answer.len() < 11 {
        match tcp.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    answer
}

/// A handshake record whose first message is a ServerHello.
fn is_server_hello(answer: &[u8]) -> bool {
    answer.len() >= 6 && answer[0] == 0x16 && answer[5] == 0x02
}

#[test]
fn tls_12_and_13_handshakes_succeed_and_tls_10_and_11_are_refused() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);

    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let mut stream = handshake(address, client_config(&pki.ca, &[HTTP11], &[version]))
            .unwrap_or_else(|err| panic!("a {expected:?} handshake failed: {err}"));
        assert_eq!(stream.conn.protocol_version(), Some(expected));
        stream
            .write_all(b"GET /api/versions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let response = read_one_response(&mut stream);
        assert!(response.starts_with("HTTP/1.1 200 "), "over {expected:?}: {response:?}");
    }

    // The same hand-written hello that offers TLS 1.2 gets a ServerHello for
    // TLS 1.2, so its refusal as 1.0 or 1.1 is about the version alone.
    let answer = answer_to_hello(address, [3, 3]);
    assert!(
        is_server_hello(&answer) && answer[9..11] == [3, 3],
        "a hand-written TLS 1.2 hello got no TLS 1.2 ServerHello: {answer:02x?}"
    );
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        let answer = answer_to_hello(address, version);
        assert!(!is_server_hello(&answer), "{name} was accepted: {answer:02x?}");
        // An alert record (fatal), or the connection closed.
        if let Some(&record_type) = answer.first() {
            assert_eq!(record_type, 0x15, "{name}: expected an alert, got {answer:02x?}");
            assert_eq!(answer.get(5), Some(&2), "{name}: the alert is not fatal: {answer:02x?}");
        }
    }
    assert_eq!(upstream.hits(), 2);
}

// ---------------------------------------------------------------------------
// 5. The h2→h1 downgrade: malformed HTTP/2 never reaches the upstream
// ---------------------------------------------------------------------------

/// One malformed request: the fields after the pseudo-headers, the body,
/// and whether its fault is a body that disagrees with `content-length`.
struct Malformed {
    what: &'static str,
    fields: Vec<Field>,
    body: Vec<&'static [u8]>,
    length_mismatch: bool,
}

fn malformed_header(what: &'static str, name: &[u8], value: &[u8]) -> Malformed {
    Malformed {
        what,
        fields: vec![field(name, value)],
        body: Vec::new(),
        length_mismatch: false,
    }
}

fn malformed_requests() -> Vec<Malformed> {
    let mut cases = vec![
        malformed_header("an uppercase header name", b"X-Smuggle", b"1"),
        malformed_header("a CR in a value", b"x-note", b"a\rb"),
        malformed_header("an LF in a value", b"x-note", b"a\nGET /api/smuggled HTTP/1.1"),
        malformed_header("a NUL in a value", b"x-note", b"a\0b"),
        malformed_header("a CR in a name", b"x-no\rte", b"1"),
        malformed_header("an LF in a name", b"x-no\nte", b"1"),
        malformed_header("a NUL in a name", b"x-no\0te", b"1"),
        malformed_header("connection: keep-alive", b"connection", b"keep-alive"),
        malformed_header("keep-alive", b"keep-alive", b"timeout=5"),
        malformed_header("proxy-connection", b"proxy-connection", b"keep-alive"),
        malformed_header("upgrade", b"upgrade", b"h2c"),
        malformed_header("te: gzip", b"te", b"gzip"),
    ];
    cases.push(Malformed {
        what: "transfer-encoding: chunked",
        fields: vec![field("transfer-encoding", "chunked")],
        body: vec![b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"],
        length_mismatch: false,
    });
    cases.push(Malformed {
        what: "content-length: 10 with 5 bytes of DATA",
        fields: vec![field("content-length", "10")],
        body: vec![b"01234"],
        length_mismatch: true,
    });
    cases.push(Malformed {
        what: "content-length: 10 with 15 bytes of DATA",
        fields: vec![field("content-length", "10")],
        body: vec![b"0123456789ABCDE"],
        length_mismatch: true,
    });
    cases
}

#[test]
fn malformed_http2_requests_are_refused_and_nothing_of_them_reaches_the_upstream() {
    let pki = Pki::new();
    let upstream = RecordingUpstream::start();
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);
    let authority = format!("localhost:{}", address.port());

    // Controls: the same connection set-up and the same raw encoding, well
    // formed (lower-case names, `te: trailers`, a body as long as declared),
    // pass; so the refusals below are about the faults alone.
    let mut h2 = H2Connection::open(address, &pki.ca);
    let mut fields = request_fields("GET", &authority, "/api/control");
    fields.extend([field("te", "trailers"), field("x-note", "well formed")]);
    let outcome = h2.exchange(&fields, &[]);
    assert_eq!(outcome.status(), Some(200), "the well-formed GET: {outcome}");
    let mut fields = request_fields("POST", &authority, "/api/control-body");
    fields.push(field("content-length", "5"));
    let outcome = h2.exchange(&fields, &[b"01234"]);
    assert_eq!(outcome.status(), Some(200), "the well-formed POST: {outcome}");
    assert_eq!(outcome.body(), r#"{"received":5}"#, "the upstream's answer");
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 2, "{arrivals:#?}");
    assert!(
        arrivals[0].head.starts_with("GET /api/control HTTP/1.1\r\n"),
        "{arrivals:#?}"
    );
    assert!(
        arrivals[0]
            .head
            .to_ascii_lowercase()
            .contains("\r\nx-note: well formed"),
        "{arrivals:#?}"
    );
    assert!(
        !arrivals[0].head.to_ascii_lowercase().contains("\r\nte:"),
        "TE is hop-by-hop: {arrivals:#?}"
    );
    assert!(arrivals[1].head.starts_with("POST /api/control-body HTTP/1.1\r\n"));
    assert!(arrivals[1].complete && arrivals[1].body == b"01234", "{arrivals:#?}");

    let mut problems = Vec::new();
    for case in malformed_requests() {
        let before = upstream.arrivals().len();
        let method = if case.body.is_empty() { "GET" } else { "POST" };
        let mut fields = request_fields(method, &authority, "/api/malformed");
        fields.extend(case.fields.iter().cloned());
        let mut connection = H2Connection::open(address, &pki.ca);
        // A length mismatch is also tried with its DATA arriving after the
        // request has reached the gateway.
        let outcome = if case.length_mismatch {
            let paced = connection.exchange_paced(&fields, &case.body);
            let at_once = H2Connection::open(address, &pki.ca).exchange(&fields, &case.body);
            if at_once.refused() {
                paced
            } else {
                at_once
            }
        } else {
            connection.exchange(&fields, &case.body)
        };
        if !outcome.refused() {
            problems.push(format!(
                "{}: expected a 400, RST_STREAM or GOAWAY, got {outcome}",
                case.what
            ));
        }
        std::thread::sleep(SETTLE);
        let arrived = upstream.arrivals().split_off(before);
        if case.length_mismatch && !arrived.is_empty() {
            // A declared body up to 64 KiB is read whole before anything is
            // forwarded, so a length that disagrees with the DATA frames is
            // refused before the upstream hears of the request.
            for arrival in &arrived {
                problems.push(format!(
                    "{}: a request reached the upstream ({} body bytes, {} past the declared length, complete: {}):\n{}",
                    case.what,
                    arrival.body.len(),
                    arrival.excess,
                    arrival.complete,
                    arrival.head
                ));
            }
        } else if !arrived.is_empty() {
            // The header block is whole before the gateway sees the request:
            // nothing at all may reach the upstream.
            problems.push(format!(
                "{}: {} request(s) reached the upstream, the first:\n{}",
                case.what,
                arrived.len(),
                arrived[0].head
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    assert!(
        upstream
            .arrivals()
            .iter()
            .all(|arrival| !arrival.head.contains("/api/smuggled")),
        "a smuggled request reached the upstream"
    );
}

// ---------------------------------------------------------------------------
// 6. Certificate rotation
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn after_a_reload_new_handshakes_get_the_rotated_certificate_while_an_open_h2_connection_keeps_working() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);
    let authority = format!("localhost:{}", address.port());
    let cert_a = pki.leaf.clone();
    let cert_b = pki.ca.issue(0xb2);
    assert_ne!(cert_a.der, cert_b.der);

    let served = served_certificate(address, &pki.ca);
    assert!(
        served == cert_a.der,
        "before the rotation: {}",
        which(&served, &[&cert_a, &cert_b])
    );

    // An HTTP/2 connection opened on A, which answers.
    let mut open = H2Connection::open(address, &pki.ca);
    assert!(leaf_of(&open.tls) == cert_a.der);
    let outcome = open.exchange(&request_fields("GET", &authority, "/api/before"), &[]);
    assert_eq!(outcome.status(), Some(200), "{outcome}");

    // B over the same files, then a reload.
    pki.install(&cert_b);
    gateway.reload().await.expect("the reload with certificate B succeeds");

    // New handshakes (whichever worker takes them) get B.
    for attempt in 1..=4 {
        let served = served_certificate(address, &pki.ca);
        assert!(
            served == cert_b.der,
            "handshake {attempt} after the rotation got {}",
            which(&served, &[&cert_a, &cert_b])
        );
    }

    // The connection opened on A still answers, on a new stream.
    let outcome = open.exchange(&request_fields("GET", &authority, "/api/after"), &[]);
    assert_eq!(
        outcome.status(),
        Some(200),
        "the open HTTP/2 connection after the rotation: {outcome}"
    );
    assert_eq!(upstream.last_seen().target, "/api/after");
    assert!(leaf_of(&open.tls) == cert_a.der, "the open connection keeps A");
}

#[actix_web::test]
async fn a_bad_certificate_or_key_at_reload_is_refused_naming_the_key_and_the_running_certificate_keeps_serving() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);
    let h2 = tls_client(&pki.ca, &[H2]);

    // A good rotation first: B is the running certificate.
    let cert_b = pki.ca.issue(0xb2);
    pki.install(&cert_b);
    gateway.reload().await.expect("the reload with certificate B succeeds");
    assert!(served_certificate(address, &pki.ca) == cert_b.der);

    let cert_c = pki.ca.issue(0xc3);
    let stranger_key = KeyPair::generate().unwrap().serialize_pem();
    for (what, cert, key, named) in [
        (
            "a key that does not match the certificate",
            cert_c.cert_pem.as_str(),
            stranger_key.as_str(),
            "server.tls.key_file",
        ),
        (
            "a key file with no key in it",
            cert_c.cert_pem.as_str(),
            "not a key\n",
            "server.tls.key_file",
        ),
        (
            "a certificate file with no certificate in it",
            "not a certificate\n",
            cert_c.key_pem.as_str(),
            "server.tls.cert_file",
        ),
    ] {
        pki.write(cert, key);
        let error = match gateway.reload().await {
            Ok(generation) => panic!("a reload with {what} succeeded (generation {generation})"),
            Err(error) => error,
        };
        assert!(
            error.contains(named),
            "{what}: the error does not name {named}: {error}"
        );

        let served = served_certificate(address, &pki.ca);
        assert!(
            served == cert_b.der,
            "after the refused reload with {what}, a new handshake got {}",
            which(&served, &[&pki.leaf, &cert_b, &cert_c])
        );
        let response = h2
            .get(gateway.tls_url("/api/still-serving"))
            .send()
            .await
            .unwrap_or_else(|err| panic!("after the refused reload with {what}: {err}"));
        assert_eq!(response.status(), 200, "after the refused reload with {what}");
    }
    let report = health(&gateway).await;
    let last_error = report["config"]["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("server.tls.cert_file"),
        "/health's last_reload_error: {}",
        report["config"]
    );
}

#[actix_web::test]
async fn with_watch_config_a_certificate_rewritten_in_place_is_served_without_a_signal() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki)
        .server("watch_config = true")
        .start(&service_at("api", "/api", &[upstream.url()]));
    let address = tls_address(&gateway);
    assert!(served_certificate(address, &pki.ca) == pki.leaf.der);

    // As certbot and cert-manager do: the files rewritten where they are.
    let cert_b = pki.ca.issue(0xb2);
    pki.install(&cert_b);
    let rotated = eventually(Duration::from_secs(5), async || {
        served_certificate(address, &pki.ca) == cert_b.der
    })
    .await;
    assert!(
        rotated,
        "new handshakes still get the old certificate 5 s after the files changed"
    );
}

// ---------------------------------------------------------------------------
// 7. A bad certificate or key at start-up
// ---------------------------------------------------------------------------

fn starts(toml: &str) -> bool {
    let dir = settings_dir(toml);
    Settings::load(&sources_of(dir.path())).is_ok_and(|settings| gatehouse::gateway::compile(&settings).is_ok())
}

/// A whole settings file: both listeners, the TLS one with these files.
fn tls_settings(cert: &Path, key: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nworkers = 1\ntls.listen = \"127.0.0.1:{}\"\ntls.cert_file = {cert:?}\ntls.key_file = {key:?}\n{}",
        free_port(),
        free_port(),
        service_at("api", "/api", &[closed_port_url()])
    )
}

#[test]
fn a_missing_unreadable_or_mismatched_certificate_or_key_refuses_start_up_naming_the_key() {
    let ca = TestCa::new("gatehouse start-up CA");
    let leaf = ca.issue(0x11);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = file("good.crt", &leaf.cert_pem);
    let key = file("good.key", &leaf.key_pem);
    let stranger_key = file("stranger.key", &KeyPair::generate().unwrap().serialize_pem());
    let garbage = file("garbage.pem", "this is not PEM\n");
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let missing = dir.path().join("missing.pem");

    assert!(starts(&tls_settings(&cert, &key)), "the good pair is refused");
    for (what, cert, key, named) in [
        ("a missing certificate file", &missing, &key, "server.tls.cert_file"),
        (
            "an unreadable certificate file (a folder)",
            &folder,
            &key,
            "server.tls.cert_file",
        ),
        (
            "a certificate file with no certificate in it",
            &garbage,
            &key,
            "server.tls.cert_file",
        ),
        ("a missing key file", &cert, &missing, "server.tls.key_file"),
        (
            "an unreadable key file (a folder)",
            &cert,
            &folder,
            "server.tls.key_file",
        ),
        ("a key file with no key in it", &cert, &garbage, "server.tls.key_file"),
        (
            "a key file holding the certificate",
            &cert,
            &cert,
            "server.tls.key_file",
        ),
        (
            "a key that does not match the certificate",
            &cert,
            &stranger_key,
            "server.tls.key_file",
        ),
    ] {
        let found = problems(&tls_settings(cert, key));
        assert!(
            found.iter().any(|problem| problem.contains(named)),
            "{what}: no problem names {named}: {found:?}"
        );
    }
}

#[test]
fn the_binary_and_check_config_refuse_a_key_that_does_not_match_naming_it() {
    let ca = TestCa::new("gatehouse start-up CA");
    let leaf = ca.issue(0x12);
    let files = tempfile::tempdir().unwrap();
    let cert = files.path().join("gatehouse.crt");
    let key = files.path().join("stranger.key");
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let dir = settings_dir(&tls_settings(&cert, &key));

    let checked = run_gatehouse(dir.path(), Some("test"), &[], &["check-config"]);
    assert_eq!(checked.code, Some(1), "check-config: {}", checked.both());
    assert!(checked.stderr.contains("server.tls.key_file"), "{}", checked.stderr);

    let served = run_gatehouse(dir.path(), Some("test"), &[], &[]);
    assert!(
        served.code.is_some_and(|code| code != 0),
        "the gateway started with a mismatched key: {}",
        served.both()
    );
    assert!(served.stderr.contains("server.tls.key_file"), "{}", served.stderr);
}

#[test]
fn a_tls_listener_needs_its_certificate_and_key_and_one_listener_is_needed() {
    let upstream_url = closed_port_url();
    let api = service_at("api", "/api", &[upstream_url]);

    let found = problems(&format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\ntls.listen = \"127.0.0.1:{}\"\n{api}",
        free_port(),
        free_port()
    ));
    for named in ["server.tls.cert_file", "server.tls.key_file"] {
        assert!(
            found.iter().any(|problem| problem.contains(named)),
            "a TLS listener without files: nothing names {named}: {found:?}"
        );
    }

    let found = problems(&format!("[server]\nlisten = \"\"\n{api}"));
    assert!(
        found.iter().any(|problem| problem.starts_with("server.listen")),
        "no listener at all: {found:?}"
    );

    let pki = Pki::new();
    assert!(
        starts(&format!(
            "[server]\nlisten = \"\"\n{}\n{api}",
            pki.server_lines()
                .replace("127.0.0.1:0", &format!("127.0.0.1:{}", free_port()))
        )),
        "a TLS-only configuration is refused"
    );
}

/// The binary, killed when dropped.
struct Running {
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_web::test]
async fn a_tls_only_gateway_serves_over_tls_alone() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let port = free_port();
    let dir = settings_dir(&format!(
        "[server]\nlisten = \"\"\nworkers = 1\n{}\n{}",
        pki.server_lines().replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
        service_at("api", "/api", &[upstream.url()])
    ));
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut command = gatehouse_command(dir.path(), Some("test"));
    command
        .env("GATEHOUSE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr.reopen().unwrap());
    let mut running = Running {
        child: command.spawn().expect("the gatehouse binary starts"),
        stderr,
    };
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(address).is_err() {
        if Instant::now() >= deadline || running.child.try_wait().unwrap().is_some() {
            panic!(
                "the TLS-only gateway did not listen on {address}: {}",
                std::fs::read_to_string(running.stderr.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let response = tls_client(&pki.ca, &[H2])
        .get(format!("https://localhost:{port}/api/tls-only"))
        .send()
        .await
        .expect("the request reaches the TLS-only gateway");
    assert_eq!(version_name(response.version()), "HTTP/2");
    let reply = read_reply(response).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(values(&upstream.last_seen(), "x-forwarded-proto"), ["https"]);
}

// ---------------------------------------------------------------------------
// 8. HTTPS upstreams
// ---------------------------------------------------------------------------

/// A gateway in front of `upstream` (service `secure` at `/secure`), with
/// `upstream.ca_file` when given; probes every 500 ms.
fn in_front_of_https(upstream: &TlsUpstream, ca_file: Option<&Path>) -> TestGateway {
    let ca_line = ca_file.map_or(String::new(), |path| format!("ca_file = {path:?}"));
    TestGateway::start(&format!(
        "[upstream]\n{ca_line}\n[health]\ninterval_ms = 500\ntimeout_ms = 2000\n{}",
        service_at("secure", "/secure", &[upstream.url()])
    ))
}

/// The `/health` entry of the `secure` instance once it has been probed.
async fn probed(gateway: &TestGateway, url: &str) -> serde_json::Value {
    let checked = eventually(Duration::from_secs(5), async || {
        !instance(&health(gateway).await, "secure", url)["last_check"].is_null()
    })
    .await;
    let report = health(gateway).await;
    assert!(checked, "the instance was never probed: {report}");
    instance(&report, "secure", url).clone()
}

#[actix_web::test]
async fn an_https_upstream_signed_by_upstream_ca_file_is_proxied_and_probed_healthy() {
    let ca = TestCa::new("upstream CA");
    let upstream = TlsUpstream::start(&ca.issue(0x21));
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let gateway = in_front_of_https(&upstream, Some(&ca_file));

    let reply = get(&gateway.url("/secure/hello?x=1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), TLS_UPSTREAM_BODY);
    assert_eq!(upstream.hits(), 1);
    let head = upstream.heads().pop().unwrap();
    assert!(head.starts_with("GET /secure/hello?x=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        upstream.server_names().iter().all(|name| name == "localhost") && !upstream.server_names().is_empty(),
        "the gateway's SNI: {:?}",
        upstream.server_names()
    );

    let probe = probed(&gateway, &upstream.url()).await;
    assert_eq!(probe["healthy"], true, "{probe}");
    assert!(probe["error"].is_null(), "{probe}");
    assert_eq!(health(&gateway).await["status"], "ok");
}

#[actix_web::test]
async fn an_https_upstream_whose_certificate_does_not_verify_is_unhealthy_and_answered_503() {
    let ca = TestCa::new("upstream CA");
    let upstream = TlsUpstream::start(&ca.issue(0x22));
    let files = tempfile::tempdir().unwrap();
    let other_ca_file = files.path().join("another-ca.pem");
    std::fs::write(&other_ca_file, TestCa::new("another CA").pem).unwrap();

    for (what, ca_file) in [
        ("no ca_file (the public roots only)", None),
        ("a ca_file of another CA", Some(other_ca_file.as_path())),
    ] {
        let gateway = in_front_of_https(&upstream, ca_file);
        let probe = probed(&gateway, &upstream.url()).await;
        assert_eq!(probe["healthy"], false, "{what}: {probe}");
        assert!(!probe["error"].is_null(), "{what}: {probe}");

        let reply = get(&gateway.url("/secure/hello")).await;
        assert_eq!(reply.status, 503, "{what}: {}", reply.text());
        assert_eq!(
            reply.json(),
            json!({"error": "Service unavailable", "service": "secure"}),
            "{what}"
        );
    }
    assert_eq!(
        upstream.hits(),
        0,
        "a request went through a certificate that does not verify"
    );
}

// ---------------------------------------------------------------------------
// 9. What looks at the connection: peer address, slow-client watchdog
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn the_upstream_sees_the_tls_clients_address_in_x_forwarded_for_on_every_request_of_a_connection() {
    let pki = Pki::new();
    let upstream = Upstream::start("api");
    let gateway = with_tls(&pki).start(&service_at("api", "/api", &[upstream.url()]));
    for offered in [H2, HTTP11] {
        // Several requests on one kept-alive connection.
        let kept = tls_client(&pki.ca, &[offered]);
        for attempt in 1..=3 {
            let reply = read_reply(
                kept.get(gateway.tls_url("/api/who"))
                    .insert_header(("x-forwarded-for", "6.6.6.6"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(
                values(&upstream.last_seen(), "x-forwarded-for"),
                ["127.0.0.1"],
                "{} request {attempt}",
                String::from_utf8_lossy(offered)
            );
        }
    }
}

#[test]
fn a_tls_keep_alive_connection_stalled_in_its_second_request_head_is_closed() {
    let pki = Pki::new();
    let upstream = Upstream::start("keep-alive");
    // One worker, so both requests share its connection watch.
    let gateway = with_tls(&pki)
        .workers(1)
        .server("client_request_timeout_ms = 1000")
        .start(&service_at("api", "/api", &[upstream.url()]));
    let mut stream = handshake(
        tls_address(&gateway),
        client_config(&pki.ca, &[HTTP11], rustls::ALL_VERSIONS),
    )
    .expect("the TLS handshake");
    stream
        .write_all(b"GET /api/first HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let first = read_one_response(&mut stream);
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");

    stream.write_all(b"GET /api/second HTTP/1.1\r\nHost: loc").unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut stream, Duration::from_secs(15));
    let elapsed = started.elapsed();
    assert!(closed, "the stalled TLS connection was still open after {elapsed:?}");
    // The head timeout, the 5 s keep-alive, and the watchdog's 1 s tick.
    assert!(elapsed < Duration::from_secs(10), "closed after {elapsed:?}");
    assert_eq!(upstream.hits(), 1, "the half-sent request never reached the upstream");
}

// ---------------------------------------------------------------------------
// WebSocket over the TLS listener (wss://)
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_websocket_tunnel_opens_and_relays_over_the_tls_listener() {
    use futures_util::{SinkExt, StreamExt};
    let pki = Pki::new();
    let upstream = Upstream::start("chat");
    let gateway = with_tls(&pki).start(&format!(
        "{}websocket = true\n",
        service_at("chat", "/chat", &[upstream.url()])
    ));
    let url = gateway.tls_url("/chat/ws").replacen("https://", "wss://", 1);
    let (response, mut tunnel) = tls_client(&pki.ca, &[HTTP11])
        .ws(url)
        .connect()
        .await
        .expect("the WebSocket handshake over TLS succeeds");
    assert_eq!(response.status(), 101);
    assert_eq!(values(&upstream.last_seen(), "x-forwarded-proto"), ["https"]);
    tunnel.send(awc::ws::Message::Text("over tls".into())).await.unwrap();
    match actix_web::rt::time::timeout(Duration::from_secs(10), tunnel.next()).await {
        Ok(Some(Ok(awc::ws::Frame::Text(text)))) => assert_eq!(&text[..], b"over tls"),
        other => panic!("expected the echo, got {other:?}"),
    }
}
