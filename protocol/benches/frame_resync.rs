//! Benchmark: the frame decoder on a worst-case crafted 1 MiB input (issue 13).
//!
//! The input is one frame header declaring a body that fills the whole 1 MiB,
//! and, every 24 bytes inside it, another header whose declared frame ends
//! exactly at the end of the input; every CRC is wrong. A decoder that
//! recomputes each candidate's CRC from its first byte does about
//! n²/48 bytes of CRC work on it (2.3·10¹⁰ for n = 1 MiB). It is fed as a
//! socket would be, 8 KiB at a time, followed by one valid PING that must
//! come out.
//!
//! Run: `cargo bench -p protocol --bench frame_resync` (prints the time per
//! 1 MiB and, with the current decoder, its CRC work per input byte).

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use protocol::frame::{encode, Frame, FrameCodec, DEFAULT_MAX_BODY, HEADER_LEN, MAGIC, TRAILER_LEN};
use tokio_util::codec::Decoder;

/// Size of the crafted input.
const INPUT: usize = 1024 * 1024;
/// Distance between two crafted headers.
const STRIDE: usize = 24;

/// The crafted input: a header every `STRIDE` bytes, each declaring a frame
/// that ends exactly at the end of the input, so each is checked (and fails)
/// only once the whole input is there.
fn crafted() -> Vec<u8> {
    let mut bytes = vec![0u8; INPUT];
    let mut at = 0;
    while at + HEADER_LEN + TRAILER_LEN <= INPUT {
        let body = INPUT - at - HEADER_LEN - TRAILER_LEN;
        assert!(body <= DEFAULT_MAX_BODY);
        bytes[at..at + 2].copy_from_slice(&MAGIC);
        bytes[at + 2] = 1;
        bytes[at + 3] = 0x03;
        bytes[at + 20..at + 24].copy_from_slice(&(body as u32).to_be_bytes());
        at += STRIDE;
    }
    bytes
}

/// Decodes `input` then a PING, fed 8 KiB at a time; returns the items seen and the time taken.
fn run(input: &[u8]) -> (usize, Duration, FrameCodec) {
    let mut codec = FrameCodec::default();
    let mut ping = BytesMut::new();
    encode(&Frame::Ping, &mut ping, DEFAULT_MAX_BODY).expect("a PING encodes");
    let mut stream = input.to_vec();
    stream.extend_from_slice(&ping);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut items = 0;
    let mut pings = 0;
    let started = Instant::now();
    for chunk in stream.chunks(8 * 1024) {
        buf.put_slice(chunk);
        while let Some(item) = codec.decode(&mut buf).expect("the decoder never fails") {
            items += 1;
            if item == Ok(Frame::Ping) {
                pings += 1;
            }
        }
    }
    let took = started.elapsed();
    assert_eq!(pings, 1, "the PING after the crafted input is decoded");
    (items, took, codec)
}

fn main() {
    let input = crafted();
    let rounds = 5;
    let mut best = Duration::MAX;
    for round in 0..rounds {
        let (items, took, codec) = run(&input);
        best = best.min(took);
        println!(
            "round {round}: {items} items in {:.3} ms; CRC work {:?} ({:.2} bytes per input byte)",
            took.as_secs_f64() * 1e3,
            codec.crc_work(),
            codec.crc_work().bytes as f64 / input.len() as f64
        );
    }
    println!(
        "frame_resync: worst-case crafted 1 MiB input decoded in {:.3} ms (best of {rounds})",
        best.as_secs_f64() * 1e3
    );
}
