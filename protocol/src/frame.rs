//! The binary device frame spoken between a receiver and its devices, over TCP
//! or a serial line, and its codec. Byte layout (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       2     magic 0xA5 0x5A        (lets a reader resynchronise on a noisy line)
//! 2       1     version (1)
//! 3       1     type (see FrameType)
//! 4       16    command id (UUID bytes; all zero for HELLO, PING, PONG)
//! 20      4     body length L (at most the codec's max_body)
//! 24      L     body (per type)
//! 24+L    4     CRC-32C (Castagnoli) of bytes 2 .. 24+L
//! ```
//!
//! The decoder never fails and never panics: what it cannot use it reports as a
//! [`FrameError`] item and skips, resynchronising on the next magic. The caller
//! counts those and decides whether the connection is still worth keeping.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

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

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

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
}

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Hello,
            0x02 => Self::Command,
            0x03 => Self::Result,
            0x04 => Self::Ping,
            0x05 => Self::Pong,
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
}

impl Frame {
    fn kind(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Command { .. } => FrameType::Command,
            Frame::Result { .. } => FrameType::Result,
            Frame::Ping => FrameType::Ping,
            Frame::Pong => FrameType::Pong,
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
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_body: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BODY)
    }
}

impl FrameCodec {
    pub fn new(max_body: usize) -> Self {
        Self { max_body }
    }
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, FrameError>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(decode_one(src, self.max_body))
    }
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
    }
    let crc = CRC32C.checksum(&dst[start + MAGIC.len()..]);
    dst.put_u32(crc);
    Ok(())
}

/// Takes at most one item off the front of `src`; `None` means more bytes are needed.
fn decode_one(src: &mut BytesMut, max_body: usize) -> Option<Result<Frame, FrameError>> {
    let skipped = skip_to_magic(src);
    if skipped > 0 {
        return Some(Err(FrameError::Garbage(skipped)));
    }
    if src.len() < HEADER_LEN {
        return None;
    }
    let body_len = u32::from_be_bytes([src[20], src[21], src[22], src[23]]) as usize;
    if body_len > max_body {
        // The length itself may be the corrupted byte: drop only the magic and rescan.
        src.advance(MAGIC.len());
        return Some(Err(FrameError::Oversized(body_len)));
    }
    let total = HEADER_LEN + body_len + TRAILER_LEN;
    if src.len() < total {
        src.reserve(total - src.len());
        return None;
    }
    let crc_at = HEADER_LEN + body_len;
    let expected = u32::from_be_bytes([src[crc_at], src[crc_at + 1], src[crc_at + 2], src[crc_at + 3]]);
    if CRC32C.checksum(&src[MAGIC.len()..crc_at]) != expected {
        src.advance(MAGIC.len());
        return Some(Err(FrameError::BadCrc));
    }
    let frame = src.split_to(total).freeze();
    Some(parse_checked(&frame, body_len))
}

/// Drops bytes up to the next magic (keeping a trailing first magic byte, which
/// may be completed by the next read). Returns how many were dropped.
fn skip_to_magic(src: &mut BytesMut) -> usize {
    let found = src.windows(2).position(|w| w == MAGIC);
    let skip = match found {
        Some(at) => at,
        None if src.last() == Some(&MAGIC[0]) => src.len() - 1,
        None => src.len(),
    };
    src.advance(skip);
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
        ]
    }

    proptest! {
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
