//! The binary device frame spoken between a receiver and its devices, over TCP
//! or a serial line, and its codec. Byte layout (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       2     magic 0xA5 0x5A        (lets a reader resynchronise on a noisy line)
//! 2       1     version (1)
//! 3       1     type (see FrameType)
//! 4       16    command id (UUID bytes; all zero for HELLO, PING, PONG, CHALLENGE, AUTH)
//! 20      4     body length L (at most the codec's max_body)
//! 24      L     body (per type)
//! 24+L    4     CRC-32C (Castagnoli) of bytes 2 .. 24+L
//! ```
//!
//! The decoder never fails and never panics: what it cannot use it reports as a
//! [`FrameError`] item and skips, resynchronising on the next magic. The caller
//! counts those and decides whether the connection is still worth keeping.
//!
//! Resynchronising costs linear time on any input (PROTOCOL.md §5.3): a
//! candidate frame whose CRC fails drops only its magic, so the bytes of a
//! long candidate are checked again as part of the candidates inside it. The
//! decoder never feeds a byte to the CRC twice for that: it keeps CRC-32C
//! values of the stream's prefix at every 32nd byte ([`Prefix`]), and the CRC
//! of any stretch follows from the two prefix values around it (CRC
//! linearity, as zlib's `crc32_combine`): at most 2 × 32 bytes of CRC and one
//! multiplication modulo the CRC polynomial per candidate, whatever its length.
//! [`FrameCodec::crc_work`] counts that work.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

use crate::device_auth::{KEY_LEN, NONCE_LEN};
use crate::DeviceId;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = [0xA5, 0x5A];
/// The only version this codec speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, type, id, length.
pub const HEADER_LEN: usize = 24;
/// Bytes after the body: the CRC.
pub const TRAILER_LEN: usize = 4;
/// Largest command or result payload a frame carries with the default codec.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Default cap on a frame body: the largest payload plus a command name and its length byte.
pub const DEFAULT_MAX_BODY: usize = MAX_PAYLOAD + 256;
/// Longest device id a HELLO may carry.
pub const MAX_DEVICE_ID_LEN: usize = 128;

const CRC32C: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);
/// Largest frame body before a HELLO and its AUTH: a HELLO's (128 bytes) is
/// the largest of HELLO, CHALLENGE and AUTH. A receiver decodes with this cap
/// until a connection has named (and proved) its device.
pub const HANDSHAKE_MAX_BODY: usize = MAX_DEVICE_ID_LEN;
/// Distance between two kept prefix CRCs, in bytes ([`Prefix`]).
const PREFIX_STEP: usize = 32;
/// A candidate's CRC over at most this many bytes is computed directly.
const DIRECT_CRC: usize = 2 * PREFIX_STEP;
/// After an item is taken, a read buffer of more than this capacity holding
/// at most [`KEEP_CAPACITY`] bytes is given back (copied into a small one).
const SHRINK_ABOVE: usize = 64 * 1024;
/// Capacity of the buffer a large one is shrunk to (tokio-util's initial read buffer).
const KEEP_CAPACITY: usize = 8 * 1024;

/// Frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// device → receiver, first frame on a connection (and, on a serial bus,
    /// receiver → device before each COMMAND): body = device id, a valid [`DeviceId`].
    Hello = 0x01,
    /// receiver → device: body = name length (u8), name (UTF-8), payload.
    Command = 0x02,
    /// device → receiver: body = code (i32, 0 = success), payload.
    Result = 0x03,
    /// either way, empty body: are you there?
    Ping = 0x04,
    /// answer to PING, empty body.
    Pong = 0x05,
    /// receiver → device, right after its HELLO when devices authenticate:
    /// body = a random nonce of [`NONCE_LEN`] bytes (PROTOCOL.md §5.9).
    Challenge = 0x06,
    /// device → receiver, answer to CHALLENGE: body = key generation (u32)
    /// then the proof, HMAC-SHA256 of [`KEY_LEN`] bytes (`device_auth`).
    Auth = 0x07,
}

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::Command,
            0x03 => Self::Result,
            0x04 => Self::Ping,
            0x05 => Self::Pong,
            0x06 => Self::Challenge,
            0x07 => Self::Auth,
            _ => return None,
        })
    }
}

/// A decoded, valid frame. A HELLO names a valid [`DeviceId`]: the decoder
/// refuses any other body as [`FrameError::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello { device_id: DeviceId },
    Command { id: Uuid, name: String, payload: Bytes },
    Result { id: Uuid, code: i32, payload: Bytes },
    Ping,
    Pong,
    Challenge { nonce: [u8; NONCE_LEN] },
    Auth { generation: u32, proof: [u8; KEY_LEN] },
}

impl Frame {
    fn kind(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Command { .. } => FrameType::Command,
            Frame::Result { .. } => FrameType::Result,
            Frame::Ping => FrameType::Ping,
            Frame::Pong => FrameType::Pong,
            Frame::Challenge { .. } => FrameType::Challenge,
            Frame::Auth { .. } => FrameType::Auth,
        }
    }

    fn id(&self) -> Uuid {
        match self {
            Frame::Command { id, .. } | Frame::Result { id, .. } => *id,
            _ => Uuid::nil(),
        }
    }
}

/// Something the decoder skipped. Never fatal to the codec; see module docs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} byte(s) of garbage before a frame")]
    Garbage(usize),
    #[error("declared body length {0} exceeds the limit")]
    Oversized(usize),
    #[error("CRC mismatch")]
    BadCrc,
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {0:?} body: {1}")]
    Malformed(FrameType, &'static str),
}

/// Errors when encoding a frame that cannot be represented.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("command name longer than 255 bytes")]
    NameTooLong,
    #[error("body of {0} bytes exceeds the limit")]
    Oversized(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// tokio-util codec for [`Frame`]s. Items are `Result<Frame, FrameError>`:
/// an `Err` item is a skipped piece of input, not a broken stream.
///
/// The decoder keeps state about the bytes it was given (prefix CRCs, see
/// the module docs): one codec decodes one byte stream, from one buffer that
/// only the codec consumes (as `Framed` does). It also gives back a large
/// read buffer once the large frame that needed it is through.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_body: usize,
    prefix: Prefix,
    work: CrcWork,
}

/// CRC work a decoder has done so far (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrcWork {
    /// Bytes fed to the CRC-32C.
    pub bytes: u64,
    /// Multiplications modulo the CRC polynomial (each about as costly as
    /// 4 to 16 bytes of CRC): one per candidate frame longer than 64 bytes.
    pub shifts: u64,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BODY)
    }
}

impl FrameCodec {
    /// A codec that takes frame bodies of at most `max_body` bytes, both
    /// ways: a longer declared length is skipped as [`FrameError::Oversized`],
    /// a longer frame is not encoded ([`EncodeError::Oversized`]).
    pub fn new(max_body: usize) -> Self {
        Self { max_body, prefix: Prefix::default(), work: CrcWork::default() }
    }

    /// The largest body taken, in bytes.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Changes the largest body taken from now on (e.g. from
    /// [`HANDSHAKE_MAX_BODY`] to [`DEFAULT_MAX_BODY`] once a device is known).
    pub fn set_max_body(&mut self, max_body: usize) {
        self.max_body = max_body;
    }

    /// The CRC work done so far by this codec's decoder.
    pub fn crc_work(&self) -> CrcWork {
        self.work
    }

    /// Takes at most one item off the front of `src`; `None` means more bytes are needed.
    fn decode_one(&mut self, src: &mut BytesMut) -> Option<Result<Frame, FrameError>> {
        self.prefix.check(src.len());
        let skipped = skip_to_magic(src);
        if skipped > 0 {
            self.consume(src, skipped);
            return Some(Err(FrameError::Garbage(skipped)));
        }
        if src.len() < HEADER_LEN {
            return None;
        }
        let body_len = u32::from_be_bytes([src[20], src[21], src[22], src[23]]) as usize;
        if body_len > self.max_body {
            // The length itself may be the corrupted byte: drop only the magic and rescan.
            self.consume(src, MAGIC.len());
            return Some(Err(FrameError::Oversized(body_len)));
        }
        let total = HEADER_LEN + body_len + TRAILER_LEN;
        if src.len() < total {
            // Room for this frame only while it is being read (given back in `consume`).
            src.reserve(total - src.len());
            return None;
        }
        let crc_at = HEADER_LEN + body_len;
        let expected = u32::from_be_bytes([src[crc_at], src[crc_at + 1], src[crc_at + 2], src[crc_at + 3]]);
        if self.prefix.crc(src, MAGIC.len(), crc_at, &mut self.work) != expected {
            self.consume(src, MAGIC.len());
            return Some(Err(FrameError::BadCrc));
        }
        self.prefix.consumed(src, total, &mut self.work);
        let frame = src.split_to(total).freeze();
        shrink(src);
        Some(parse_checked(&frame, body_len))
    }

    /// Drops the first `n` bytes of `src`.
    fn consume(&mut self, src: &mut BytesMut, n: usize) {
        self.prefix.consumed(src, n, &mut self.work);
        src.advance(n);
        shrink(src);
    }
}

/// Gives back a large read buffer that holds little (see [`SHRINK_ABOVE`]).
fn shrink(src: &mut BytesMut) {
    if src.capacity() > SHRINK_ABOVE && src.len() <= KEEP_CAPACITY {
        let mut small = BytesMut::with_capacity(KEEP_CAPACITY);
        small.extend_from_slice(src);
        *src = small;
    }
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, FrameError>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(self.decode_one(src))
    }
}

/// CRC-32C values of the stream's prefix, so that the CRC of any stretch of
/// the buffered bytes costs at most `2 × PREFIX_STEP` bytes of CRC and one
/// shift, and each byte of the stream is fed to the CRC once for them.
///
/// `P(x)` is the CRC-32C (as in the frame) of the stream's bytes from some
/// start up to offset `x`; then for `a ≤ b`, `crc(bytes a..b) = P(b) ^ P(a)·x^(8(b−a))
/// mod the polynomial` ([`shift`]). Offsets are counted from the stream's first byte.
/// Kept only while needed: the first long candidate starts it (with `P` = 0
/// at the buffer's front), and it is dropped once the front passes the last mark.
#[derive(Debug, Clone, Default)]
struct Prefix {
    /// Stream offset of the buffer's first byte.
    origin: u64,
    /// Whether `P` is kept now.
    active: bool,
    /// `P(origin)`, when active.
    at_origin: u32,
    /// Stream offset of `marks[0]`; `marks[i]` is `P(first + i·PREFIX_STEP)`,
    /// all ahead of `origin`.
    first: u64,
    marks: std::collections::VecDeque<u32>,
}

impl Prefix {
    /// Drops what is kept if the buffer holds fewer bytes than were marked
    /// (someone else consumed it: the marks no longer match it).
    fn check(&mut self, buffered: usize) {
        if self.active && self.frontier() > self.origin + buffered as u64 {
            self.active = false;
            self.marks.clear();
        }
    }

    /// The stream offset up to which `P` is known.
    fn frontier(&self) -> u64 {
        match self.marks.len() {
            0 => self.origin,
            n => self.first + ((n - 1) * PREFIX_STEP) as u64,
        }
    }

    /// The first `n` bytes of `src` are about to be consumed.
    fn consumed(&mut self, src: &[u8], n: usize, work: &mut CrcWork) {
        let to = self.origin + n as u64;
        if self.active {
            let (mut at, mut p) = (self.origin, self.at_origin);
            while self.first <= to {
                let Some(mark) = self.marks.pop_front() else { break };
                (at, p) = (self.first, mark);
                self.first += PREFIX_STEP as u64;
            }
            if self.marks.is_empty() {
                // Past everything marked: nothing of it is needed any more.
                self.active = false;
            } else {
                let from = (at - self.origin) as usize;
                self.at_origin = extend(p, &src[from..n], work);
            }
        }
        self.origin = to;
    }

    /// CRC-32C of `src[a..b]`, where `a` is within the first `PREFIX_STEP`
    /// bytes of the buffer.
    fn crc(&mut self, src: &[u8], a: usize, b: usize, work: &mut CrcWork) -> u32 {
        if b - a <= DIRECT_CRC {
            work.bytes += (b - a) as u64;
            return CRC32C.checksum(&src[a..b]);
        }
        if !self.active {
            self.active = true;
            self.at_origin = 0;
            self.first = self.origin + PREFIX_STEP as u64;
            self.marks.clear();
        }
        // Mark up to `b`, each byte once.
        let end = self.origin + b as u64;
        while self.frontier() + PREFIX_STEP as u64 <= end {
            let from = (self.frontier() - self.origin) as usize;
            let last = self.marks.back().copied().unwrap_or(self.at_origin);
            let next = extend(last, &src[from..from + PREFIX_STEP], work);
            self.marks.push_back(next);
        }
        let p_a = extend(self.at_origin, &src[..a], work);
        let (mark_at, mark) = if self.first <= end {
            let i = ((end - self.first) / PREFIX_STEP as u64) as usize;
            (self.first + (i * PREFIX_STEP) as u64, self.marks[i])
        } else {
            (self.origin, self.at_origin)
        };
        let p_b = extend(mark, &src[(mark_at - self.origin) as usize..b], work);
        work.shifts += 1;
        p_b ^ shift(p_a, (b - a) as u64)
    }
}

/// The CRC-32C of a stream whose CRC-32C so far is `crc`, after `bytes` more.
fn extend(crc: u32, bytes: &[u8], work: &mut CrcWork) -> u32 {
    work.bytes += bytes.len() as u64;
    // The crc crate's state for a reflected CRC is the bit-reversed value
    // before the final XOR: `digest_with_initial` takes it un-reversed.
    let mut digest = CRC32C.digest_with_initial((crc ^ 0xFFFF_FFFF).reverse_bits());
    digest.update(bytes);
    digest.finalize()
}

/// The reflected CRC-32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `a·b` modulo the CRC polynomial, both in the CRC's reflected bit order
/// (zlib's `multmodp`).
fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    let mut m = 1u32 << 31;
    while m != 0 && a & (m | (m - 1)) != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(8·k)` modulo the polynomial for `k < 2^33`, from three tables of 2048
/// powers each (24 KiB, computed on first use): `k`'s 11-bit digits.
fn power_of_x8(k: u64) -> u32 {
    static POWERS: std::sync::LazyLock<Box<[[u32; 2048]; 3]>> = std::sync::LazyLock::new(|| {
        let mut t = Box::new([[0u32; 2048]; 3]);
        let x = 1u32 << 30;
        let x8 = (0..3).fold(x, |p, _| multmodp(p, p));
        let mut step = x8;
        for digit in t.iter_mut() {
            digit[0] = 1 << 31;
            for j in 1..2048 {
                digit[j] = multmodp(digit[j - 1], step);
            }
            step = multmodp(digit[2047], step);
        }
        t
    });
    debug_assert!(k < 1 << 33);
    let t = &**POWERS;
    let lo = t[0][(k & 2047) as usize];
    let mid = t[1][((k >> 11) & 2047) as usize];
    let hi = t[2][((k >> 22) & 2047) as usize];
    multmodp(multmodp(lo, mid), hi)
}

/// `crc` moved `k` bytes further: the CRC-32C of A followed by `k` zero
/// bytes' worth of polynomial shift, so that `crc(A ‖ B) = shift(crc(A), |B|) ^ crc(B)`.
fn shift(crc: u32, k: u64) -> u32 {
    multmodp(power_of_x8(k), crc)
}

impl Encoder<&Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        encode(frame, dst, self.max_body)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        encode(&frame, dst, self.max_body)
    }
}

/// Appends `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut, max_body: usize) -> Result<(), EncodeError> {
    let body_len = match frame {
        // A DeviceId is 1 to MAX_DEVICE_ID_LEN bytes by construction.
        Frame::Hello { device_id } => device_id.as_str().len(),
        Frame::Command { name, payload, .. } => {
            if name.len() > u8::MAX as usize {
                return Err(EncodeError::NameTooLong);
            }
            1 + name.len() + payload.len()
        }
        Frame::Result { payload, .. } => 4 + payload.len(),
        Frame::Ping | Frame::Pong => 0,
        Frame::Challenge { .. } => NONCE_LEN,
        Frame::Auth { .. } => 4 + KEY_LEN,
    };
    if body_len > max_body {
        return Err(EncodeError::Oversized(body_len));
    }
    dst.reserve(HEADER_LEN + body_len + TRAILER_LEN);
    let start = dst.len();
    dst.put_slice(&MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(frame.kind() as u8);
    dst.put_slice(frame.id().as_bytes());
    dst.put_u32(body_len as u32);
    match frame {
        Frame::Hello { device_id } => dst.put_slice(device_id.as_str().as_bytes()),
        Frame::Command { name, payload, .. } => {
            dst.put_u8(name.len() as u8);
            dst.put_slice(name.as_bytes());
            dst.put_slice(payload);
        }
        Frame::Result { code, payload, .. } => {
            dst.put_i32(*code);
            dst.put_slice(payload);
        }
        Frame::Ping | Frame::Pong => {}
        Frame::Challenge { nonce } => dst.put_slice(nonce),
        Frame::Auth { generation, proof } => {
            dst.put_u32(*generation);
            dst.put_slice(proof);
        }
    }
    let crc = CRC32C.checksum(&dst[start + MAGIC.len()..]);
    dst.put_u32(crc);
    Ok(())
}

/// How many bytes come before the next magic (keeping a trailing first magic
/// byte, which may be completed by the next read): those are garbage.
fn skip_to_magic(src: &[u8]) -> usize {
    let found = src.windows(2).position(|w| w == MAGIC);
    let skip = match found {
        Some(at) => at,
        None if src.last() == Some(&MAGIC[0]) => src.len() - 1,
        None => src.len(),
    };
    skip
}

/// Parses a frame whose length and CRC have been checked.
fn parse_checked(frame: &Bytes, body_len: usize) -> Result<Frame, FrameError> {
    let version = frame[2];
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let kind = FrameType::from_byte(frame[3]).ok_or(FrameError::UnknownType(frame[3]))?;
    let id = Uuid::from_slice(&frame[4..20]).expect("16 bytes");
    let body = frame.slice(HEADER_LEN..HEADER_LEN + body_len);
    match kind {
        FrameType::Hello => {
            // Length first: a long body is refused without being copied.
            let text = std::str::from_utf8(&body).ok().filter(|id| id.len() <= MAX_DEVICE_ID_LEN);
            let device_id = text.and_then(|id| DeviceId::parse(id).ok());
            Ok(Frame::Hello { device_id: device_id.ok_or(FrameError::Malformed(kind, "invalid device id"))? })
        }
        FrameType::Command => {
            let name_len = *body.first().ok_or(FrameError::Malformed(kind, "empty body"))? as usize;
            if body.len() < 1 + name_len {
                return Err(FrameError::Malformed(kind, "name longer than body"));
            }
            let name = std::str::from_utf8(&body[1..1 + name_len])
                .map_err(|_| FrameError::Malformed(kind, "name is not UTF-8"))?;
            Ok(Frame::Command { id, name: name.to_owned(), payload: body.slice(1 + name_len..) })
        }
        FrameType::Result => {
            if body.len() < 4 {
                return Err(FrameError::Malformed(kind, "body shorter than the code"));
            }
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(Frame::Result { id, code, payload: body.slice(4..) })
        }
        FrameType::Ping if body.is_empty() => Ok(Frame::Ping),
        FrameType::Pong if body.is_empty() => Ok(Frame::Pong),
        FrameType::Ping | FrameType::Pong => Err(FrameError::Malformed(kind, "non-empty body")),
        FrameType::Challenge => {
            let nonce =
                body[..].try_into().map_err(|_| FrameError::Malformed(kind, "nonce is not 32 bytes"))?;
            Ok(Frame::Challenge { nonce })
        }
        FrameType::Auth => {
            if body.len() != 4 + KEY_LEN {
                return Err(FrameError::Malformed(kind, "body is not 36 bytes"));
            }
            let generation = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let proof = body[4..].try_into().expect("32 bytes");
            Ok(Frame::Auth { generation, proof })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(frame: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode(frame, &mut b, DEFAULT_MAX_BODY).unwrap();
        b
    }

    fn decode_all(buf: &mut BytesMut) -> Vec<Result<Frame, FrameError>> {
        let mut codec = FrameCodec::default();
        let mut out = Vec::new();
        while let Some(item) = codec.decode(buf).unwrap() {
            out.push(item);
        }
        out
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = any::<u128>().prop_map(Uuid::from_u128);
        let payload = proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes::from);
        prop_oneof![
            "[a-zA-Z0-9_.:-]{1,128}".prop_map(|id| Frame::Hello { device_id: DeviceId::parse(&id).unwrap() }),
            (id.clone(), "[a-z_]{0,40}", payload.clone()).prop_map(|(id, name, payload)| Frame::Command {
                id,
                name,
                payload
            }),
            (id, any::<i32>(), payload).prop_map(|(id, code, payload)| Frame::Result { id, code, payload }),
            Just(Frame::Ping),
            Just(Frame::Pong),
            any::<[u8; NONCE_LEN]>().prop_map(|nonce| Frame::Challenge { nonce }),
            (any::<u32>(), any::<[u8; KEY_LEN]>())
                .prop_map(|(generation, proof)| Frame::Auth { generation, proof }),
        ]
    }

    /// The decoder as it was before prefix CRCs (each candidate's CRC
    /// computed from its first byte): the reference for what must come out.
    fn naive_decode_all(src: &mut BytesMut, max_body: usize) -> Vec<Result<Frame, FrameError>> {
        let mut out = Vec::new();
        loop {
            let skipped = skip_to_magic(src);
            if skipped > 0 {
                src.advance(skipped);
                out.push(Err(FrameError::Garbage(skipped)));
                continue;
            }
            if src.len() < HEADER_LEN {
                return out;
            }
            let body_len = u32::from_be_bytes([src[20], src[21], src[22], src[23]]) as usize;
            if body_len > max_body {
                src.advance(MAGIC.len());
                out.push(Err(FrameError::Oversized(body_len)));
                continue;
            }
            let total = HEADER_LEN + body_len + TRAILER_LEN;
            if src.len() < total {
                return out;
            }
            let crc_at = HEADER_LEN + body_len;
            let expected = u32::from_be_bytes(src[crc_at..crc_at + 4].try_into().unwrap());
            if CRC32C.checksum(&src[MAGIC.len()..crc_at]) != expected {
                src.advance(MAGIC.len());
                out.push(Err(FrameError::BadCrc));
                continue;
            }
            let frame = src.split_to(total).freeze();
            out.push(parse_checked(&frame, body_len));
        }
    }

    /// Decodes `bytes` fed in pieces of the given sizes (cycled), as reads
    /// from a socket would; returns the items, what is left, and the work.
    fn decode_in_pieces(
        bytes: &[u8],
        pieces: &[usize],
        max_body: usize,
    ) -> (Vec<Result<Frame, FrameError>>, BytesMut, CrcWork) {
        let mut codec = FrameCodec::new(max_body);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        for piece in pieces.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + piece.max(&1)).min(bytes.len());
            buf.extend_from_slice(&bytes[at..end]);
            at = end;
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        (out, buf, codec.crc_work())
    }

    /// Input built to make resynchronisation work hard: runs of magics,
    /// headers declaring lengths that reach far (bad CRCs), short headers
    /// with good or bad CRCs, valid frames, random bytes.
    fn adversarial(max_body: usize) -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (1usize..40).prop_map(|n| MAGIC.repeat(n)),
            (0..=max_body as u32, any::<u8>()).prop_map(|(len, kind)| {
                let mut h = MAGIC.to_vec();
                h.extend_from_slice(&[VERSION, kind]);
                h.extend_from_slice(&[0; 16]);
                h.extend_from_slice(&len.to_be_bytes());
                h
            }),
            arb_frame().prop_filter_map("fits", move |f| {
                let mut b = BytesMut::new();
                encode(&f, &mut b, max_body).ok().map(|()| b.to_vec())
            }),
            (0usize..8).prop_map(|n| {
                // The densest pattern of long candidates: magics, then zero
                // length bytes under every one of them.
                let mut b = MAGIC.repeat(10);
                b.extend_from_slice(&[0, 0x0F].repeat(10));
                b.repeat(n + 1)
            }),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    /// `items` with each run of garbage as one item (how garbage is split
    /// into items depends on how the bytes arrived).
    fn merged(items: Vec<Result<Frame, FrameError>>) -> Vec<Result<Frame, FrameError>> {
        let mut out: Vec<Result<Frame, FrameError>> = Vec::new();
        for item in items {
            match (out.last_mut(), &item) {
                (Some(Err(FrameError::Garbage(n))), Err(FrameError::Garbage(m))) => *n += m,
                _ => out.push(item),
            }
        }
        out
    }

    /// The bound on CRC work per input byte the module docs promise: each
    /// byte once for the marks and once as the front moves, and at most
    /// 64 bytes per candidate, at most one candidate per 4 input bytes.
    fn assert_linear(work: CrcWork, n: usize) -> Result<(), TestCaseError> {
        let n = n as u64;
        prop_assert!(work.bytes <= 18 * n + 64, "{work:?} for {n} input bytes");
        prop_assert!(work.shifts <= n / 4 + 1, "{work:?} for {n} input bytes");
        Ok(())
    }

    /// `bytes` fed in `pieces` decodes to what the old decoder makes of it
    /// (garbage runs merged), with linear CRC work.
    fn same_as_naive_in_linear_work(bytes: &[u8], pieces: &[usize]) -> Result<(), TestCaseError> {
        let (items, rest, work) = decode_in_pieces(bytes, pieces, 4096);
        assert_linear(work, bytes.len())?;
        let mut all = BytesMut::from(bytes);
        prop_assert_eq!(merged(items), merged(naive_decode_all(&mut all, 4096)));
        prop_assert_eq!(rest, all);
        Ok(())
    }

    proptest! {
        #[test]
        fn resync_work_is_linear_on_arbitrary_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..8192),
            pieces in proptest::collection::vec(1usize..3000, 1..8),
        ) {
            same_as_naive_in_linear_work(&bytes, &pieces)?;
        }

        #[test]
        fn resync_work_is_linear_on_adversarial_input(
            bytes in adversarial(4096),
            pieces in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            same_as_naive_in_linear_work(&bytes, &pieces)?;
        }

        #[test]
        fn every_valid_frame_in_garbage_is_decoded(
            parts in proptest::collection::vec((adversarial(4096), arb_frame()), 1..6),
            pieces in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            let mut bytes = Vec::new();
            for (garbage, frame) in &parts {
                bytes.extend_from_slice(garbage);
                bytes.extend_from_slice(&enc(frame));
            }
            // Zeros (no magic) after the last one, so that every candidate
            // in the garbage is complete and resolved.
            bytes.extend_from_slice(&vec![0; 4096 + HEADER_LEN + TRAILER_LEN]);
            let (items, _, work) = decode_in_pieces(&bytes, &pieces, 4096);
            assert_linear(work, bytes.len())?;
            let frames: Vec<_> = items.into_iter().filter_map(Result::ok).collect();
            let wanted: Vec<_> = parts.iter().map(|(_, f)| f.clone()).collect();
            // A garbage piece may hold valid frames of its own: the wanted ones
            // come out in order among them.
            let mut found = frames.iter();
            for w in &wanted {
                prop_assert!(found.any(|f| f == w), "{:?} not decoded", w);
            }
        }

        #[test]
        fn prefix_crcs_agree_with_the_direct_crc(
            a in proptest::collection::vec(any::<u8>(), 0..300),
            b in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut work = CrcWork::default();
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(extend(CRC32C.checksum(&a), &b, &mut work), CRC32C.checksum(&whole));
            prop_assert_eq!(
                shift(CRC32C.checksum(&a), b.len() as u64) ^ CRC32C.checksum(&b),
                CRC32C.checksum(&whole)
            );
        }

        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let items = decode_all(&mut buf);
            // Whatever is left is a possible frame prefix, never more than one frame.
            prop_assert!(buf.len() <= HEADER_LEN + DEFAULT_MAX_BODY + TRAILER_LEN);
            prop_assert!(items.len() <= bytes.len());
        }

        #[test]
        fn encode_then_decode_is_identity(frames in proptest::collection::vec(arb_frame(), 1..8)) {
            let mut buf = BytesMut::new();
            for f in &frames {
                encode(f, &mut buf, DEFAULT_MAX_BODY).unwrap();
            }
            let decoded: Vec<_> = decode_all(&mut buf).into_iter().map(Result::unwrap).collect();
            prop_assert_eq!(decoded, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn resynchronises_after_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..64), frame in arb_frame()) {
            let mut buf = BytesMut::from(&garbage[..]);
            buf.extend_from_slice(&enc(&frame));
            let frames: Vec<_> = decode_all(&mut buf).into_iter().filter_map(Result::ok).collect();
            prop_assert_eq!(frames.last(), Some(&frame));
        }

        #[test]
        fn a_hello_decodes_exactly_when_its_body_is_a_valid_id(body in "[a-zA-Z0-9_.:/ +#-]{0,130}") {
            let mut raw = raw_frame(FrameType::Hello, body.as_bytes());
            let decoded = decode_all(&mut raw);
            prop_assert_eq!(decoded.len(), 1);
            match &decoded[0] {
                Ok(Frame::Hello { device_id }) => prop_assert_eq!(device_id.as_str(), body.as_str()),
                other => prop_assert!(!DeviceId::is_valid(&body), "{:?} refused: {:?}", body, other),
            }
        }

        #[test]
        fn a_flipped_bit_is_never_a_frame(frame in arb_frame(), bit in any::<prop::sample::Index>()) {
            let mut bytes = enc(&frame);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let next = enc(&Frame::Ping);
            bytes.extend_from_slice(&next);
            let items = decode_all(&mut bytes);
            let frames: Vec<_> = items.iter().filter_map(|i| i.as_ref().ok()).collect();
            // CRC-32C catches every single-bit error: the only frame that can come
            // out is the PING that followed (unless an enlarged length swallowed it).
            prop_assert!(frames.len() <= 1);
            prop_assert!(frames.iter().all(|f| **f == Frame::Ping));
        }
    }

    #[test]
    fn shift_covers_long_distances() {
        // x^(8k) by digits agrees with repeated squaring, past each table's range.
        for k in [0u64, 1, 2047, 2048, 2049, 4_194_303, 4_194_304, 1 << 32, (1 << 33) - 1] {
            let mut p = 1u32 << 31;
            let mut sq = (0..3).fold(1u32 << 30, |p, _| multmodp(p, p));
            let mut e = k;
            while e > 0 {
                if e & 1 == 1 {
                    p = multmodp(p, sq);
                }
                sq = multmodp(sq, sq);
                e >>= 1;
            }
            assert_eq!(power_of_x8(k), p, "k = {k}");
        }
    }

    /// The benchmark's input (benches/frame_resync.rs), smaller: a header
    /// every 24 bytes, each declaring a frame that ends at the end of the
    /// input. Linear work, and the PING after it comes out.
    #[test]
    fn a_crafted_long_frame_costs_linear_work() {
        let n = 256 * 1024;
        let mut bytes = vec![0u8; n];
        for at in (0..n - HEADER_LEN - TRAILER_LEN).step_by(24) {
            bytes[at..at + 2].copy_from_slice(&MAGIC);
            bytes[at + 2] = VERSION;
            bytes[at + 3] = FrameType::Result as u8;
            let body = (n - at - HEADER_LEN - TRAILER_LEN) as u32;
            bytes[at + 20..at + 24].copy_from_slice(&body.to_be_bytes());
        }
        bytes.extend_from_slice(&enc(&Frame::Ping));
        let (items, rest, work) = decode_in_pieces(&bytes, &[8192], DEFAULT_MAX_BODY);
        assert_eq!(items.last(), Some(&Ok(Frame::Ping)));
        assert!(rest.is_empty());
        assert!(work.bytes <= 3 * bytes.len() as u64, "{work:?}");
        assert!(work.shifts <= (bytes.len() / 24) as u64 + 1, "{work:?}");
    }

    #[test]
    fn a_large_read_buffer_is_given_back_after_its_frame() {
        let big =
            Frame::Result { id: Uuid::from_u128(1), code: 0, payload: Bytes::from(vec![7; 512 * 1024]) };
        let mut bytes = enc(&big);
        bytes.extend_from_slice(&enc(&Frame::Ping));
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&bytes[..HEADER_LEN]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() >= 512 * 1024, "room for the declared frame while it is read");
        buf.extend_from_slice(&bytes[HEADER_LEN..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Ok(big)));
        assert!(buf.capacity() <= KEEP_CAPACITY, "given back: {}", buf.capacity());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Ok(Frame::Ping)));
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let full =
            enc(&Frame::Result { id: Uuid::from_u128(7), code: -3, payload: Bytes::from_static(b"oops") });
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in full.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let item = codec.decode(&mut buf).unwrap();
            if i + 1 < full.len() {
                assert!(item.is_none(), "decoded early at byte {i}");
            } else {
                assert!(matches!(item, Some(Ok(Frame::Result { code: -3, .. }))));
            }
        }
    }

    #[test]
    fn oversized_length_is_reported_and_skipped() {
        let mut bytes = enc(&Frame::Ping);
        bytes[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        bytes.extend_from_slice(&enc(&Frame::Pong));
        let items = decode_all(&mut bytes);
        assert_eq!(items.first(), Some(&Err(FrameError::Oversized(u32::MAX as usize))));
        assert_eq!(items.last(), Some(&Ok(Frame::Pong)));
    }

    #[test]
    fn unknown_type_with_good_crc_is_reported() {
        let mut bytes = enc(&Frame::Ping);
        bytes[3] = 0x7F;
        let crc = CRC32C.checksum(&bytes[2..HEADER_LEN]);
        bytes[HEADER_LEN..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode_all(&mut bytes), vec![Err(FrameError::UnknownType(0x7F))]);
    }

    /// A frame of type `kind` with `body` as given (and a nil id), whose CRC is right.
    fn raw_frame(kind: FrameType, body: &[u8]) -> BytesMut {
        let mut raw = BytesMut::new();
        raw.put_slice(&MAGIC);
        raw.put_u8(VERSION);
        raw.put_u8(kind as u8);
        raw.put_slice(&[0; 16]);
        raw.put_u32(body.len() as u32);
        raw.put_slice(body);
        let crc = CRC32C.checksum(&raw[2..]);
        raw.put_u32(crc);
        raw
    }

    #[test]
    fn challenge_and_auth_have_fixed_bodies() {
        // The worked example of PROTOCOL.md §5.9.
        let challenge = Frame::Challenge { nonce: std::array::from_fn(|i| 0xA0 + i as u8) };
        let bytes = enc(&challenge);
        assert_eq!(&bytes[..4], &[0xA5, 0x5A, 0x01, 0x06]);
        assert_eq!(&bytes[20..24], &[0, 0, 0, 32]);
        assert_eq!(bytes.len(), HEADER_LEN + 32 + TRAILER_LEN);
        assert_eq!(&bytes[bytes.len() - 4..], &[0xcf, 0x3a, 0xa8, 0x9b], "the CRC printed in PROTOCOL.md");
        // The AUTH answering it in PROTOCOL.md §5.9 (generation 1, the vector's proof).
        let proof: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"aaf03c823bf61faa82e0dd7157f6fe82bf7ba7f35c9347e480b51a1f15f7a1ca"[2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        let documented = enc(&Frame::Auth { generation: 1, proof: proof.try_into().unwrap() });
        assert_eq!(&documented[documented.len() - 4..], &[0xfd, 0x62, 0x74, 0xbf]);
        let auth = Frame::Auth { generation: 2, proof: [0x11; KEY_LEN] };
        let bytes = enc(&auth);
        assert_eq!(&bytes[3..4], &[0x07]);
        assert_eq!(&bytes[20..28], &[0, 0, 0, 36, 0, 0, 0, 2]);
        let mut both = enc(&challenge);
        both.extend_from_slice(&enc(&auth));
        assert_eq!(decode_all(&mut both), vec![Ok(challenge), Ok(auth)]);
        for (kind, len, why) in [
            (FrameType::Challenge, 31, "nonce is not 32 bytes"),
            (FrameType::Challenge, 0, "nonce is not 32 bytes"),
            (FrameType::Auth, 35, "body is not 36 bytes"),
            (FrameType::Auth, 37, "body is not 36 bytes"),
        ] {
            let mut raw = raw_frame(kind, &vec![0; len]);
            assert_eq!(decode_all(&mut raw), vec![Err(FrameError::Malformed(kind, why))], "{kind:?} {len}");
        }
    }

    #[test]
    fn truncated_command_body_is_malformed() {
        // The name says 10 bytes, the body has 1.
        let mut raw = raw_frame(FrameType::Command, &[10, b'x']);
        assert_eq!(
            decode_all(&mut raw),
            vec![Err(FrameError::Malformed(FrameType::Command, "name longer than body"))]
        );
    }

    #[test]
    fn encoder_rejects_what_the_format_cannot_hold() {
        let mut b = BytesMut::new();
        let long = "n".repeat(256);
        let cmd = Frame::Command { id: Uuid::nil(), name: long, payload: Bytes::new() };
        assert!(matches!(encode(&cmd, &mut b, DEFAULT_MAX_BODY), Err(EncodeError::NameTooLong)));
        assert!(b.is_empty(), "nothing written on error");
        // A HELLO's id is a DeviceId: one the format cannot hold is refused before any encoding.
        assert!(DeviceId::parse("").is_err() && DeviceId::parse(&"x".repeat(MAX_DEVICE_ID_LEN + 1)).is_err());
    }

    #[test]
    fn a_hello_naming_no_valid_device_is_a_body_error() {
        let too_long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        for body in [&b""[..], b"a/b", b"dev 1", b"\xff\xfe", too_long.as_bytes()] {
            let mut raw = raw_frame(FrameType::Hello, body);
            let expected = Err(FrameError::Malformed(FrameType::Hello, "invalid device id"));
            assert_eq!(decode_all(&mut raw), vec![expected], "{body:?}");
        }
        let mut raw = raw_frame(FrameType::Hello, b"dev-1:a.b_c");
        assert_eq!(
            decode_all(&mut raw),
            vec![Ok(Frame::Hello { device_id: DeviceId::parse("dev-1:a.b_c").unwrap() })]
        );
    }
}
