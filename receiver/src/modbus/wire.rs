//! The bytes under tokio-modbus. tokio-modbus writes a request and reads an
//! answer in one call and takes the first frame it reads for the answer;
//! [`Wire`] sits between it and the socket or serial port so that the bus
//! knows what happened on the line and tokio-modbus sees only the answer to
//! the request it sent:
//!
//! - just before a request is written, whatever the device sent since the
//!   last answer is discarded (a late or repeated answer), and a connection
//!   the device has closed or reset is noticed: the request is then not
//!   written at all and the write fails naming the cause;
//! - once the request is written and flushed, [`WireHandle::written`] says so
//!   (the bus reports `delivered` only then);
//! - the answer is framed here and checked against the request: on TCP the
//!   transaction id, unit id and function code (an exception to it too); on
//!   RTU the unit, the function and the CRC. Frames that do not match are
//!   discarded and the wait goes on until the request's timeout, as the
//!   Modbus TCP implementation guide and the serial-line specification tell a
//!   master to; a frame with a bad CRC is noise, not an answer;
//! - end of file and transport errors become errors that say what happened
//!   (tokio-modbus reports an end of file as the last OS error, e.g.
//!   "os error 115", which hides that the device closed the connection).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_serial::SerialStream;

use super::spec::Link;

/// How answers are framed on this bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// MBAP header with a length: transaction id, protocol 0, length, unit.
    Tcp,
    /// Unit, PDU, CRC-16; the length follows from the function code.
    Rtu,
}

/// Why a connection or port stopped working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Broken {
    /// The device closed the connection (end of file).
    Closed,
    /// Reset, aborted or a broken pipe, with the OS's words.
    Reset(String),
    /// Bytes that cannot be Modbus TCP framing (the stream is out of step).
    Garbled(String),
    /// Any other I/O error.
    Other(String),
}

impl Broken {
    fn of(e: &io::Error) -> Broken {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe => Broken::Reset(e.to_string()),
            UnexpectedEof => Broken::Closed,
            _ => Broken::Other(e.to_string()),
        }
    }

    fn error(&self) -> io::Error {
        io::Error::other(self.to_string())
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Closed => f.write_str("the device closed the connection"),
            Broken::Reset(e) => write!(f, "the connection was reset ({e})"),
            Broken::Garbled(e) => write!(f, "the answer is not Modbus TCP ({e})"),
            Broken::Other(e) => write!(f, "I/O error ({e})"),
        }
    }
}

/// What the bus learns about the request in flight.
#[derive(Debug, Default)]
struct Exchange {
    /// Set by [`WireHandle::begin`]: the next write starts a request.
    fresh: bool,
    /// The request's bytes written so far: its header is what an answer must match.
    sent: Vec<u8>,
    broken: Option<Broken>,
    /// Bytes received toward an answer that is not complete yet.
    partial: usize,
}

/// What a request's exchange came to, as far as the line goes.
#[derive(Debug)]
pub(super) struct Outcome {
    /// The whole request was written and flushed.
    pub(super) written: bool,
    pub(super) broken: Option<Broken>,
    /// Bytes of an incomplete answer.
    pub(super) partial: usize,
}

/// The bus's side of a [`Wire`].
#[derive(Debug, Clone)]
pub(super) struct WireHandle {
    exchange: Arc<Mutex<Exchange>>,
    written: Arc<watch::Sender<bool>>,
}

impl WireHandle {
    /// A request starts: the next write is checked and counted as its.
    pub(super) fn begin(&self) {
        *self.lock() = Exchange { fresh: true, ..Exchange::default() };
        self.written.send_replace(false);
    }

    /// Resolves once the current request is written and flushed.
    pub(super) async fn written(&self) {
        let mut rx = self.written.subscribe();
        // The sender lives as long as this handle: `wait_for` cannot fail.
        let _ = rx.wait_for(|w| *w).await;
    }

    pub(super) fn outcome(&self) -> Outcome {
        let x = self.lock();
        Outcome { written: *self.written.borrow(), broken: x.broken.clone(), partial: x.partial }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Exchange> {
        self.exchange.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A socket or serial port as tokio-modbus's transport (see the module docs).
#[derive(Debug)]
pub(super) struct Wire<T> {
    io: T,
    framing: Framing,
    handle: WireHandle,
    /// Received, not yet framed.
    inbuf: Vec<u8>,
    /// The matching answer, being handed to tokio-modbus.
    outbuf: Vec<u8>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Wire<T> {
    fn new(io: T, framing: Framing) -> (Wire<T>, WireHandle) {
        let handle = WireHandle { exchange: Arc::default(), written: Arc::new(watch::channel(false).0) };
        (Wire { io, framing, handle: handle.clone(), inbuf: Vec::new(), outbuf: Vec::new() }, handle)
    }

    /// Reads whatever is there without waiting: stale bytes are dropped, and
    /// an end of file or error means the line is gone.
    fn drain(&mut self, cx: &mut Context<'_>) -> Result<usize, Broken> {
        let mut stale = std::mem::take(&mut self.inbuf).len() + std::mem::take(&mut self.outbuf).len();
        let mut scratch = [0u8; 512];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Ok(stale),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Err(Broken::Closed),
                Poll::Ready(Ok(())) => stale += buf.filled().len(),
                Poll::Ready(Err(e)) => return Err(Broken::of(&e)),
            }
        }
    }

    fn fail(&self, broken: Broken) -> io::Error {
        let e = broken.error();
        self.handle.lock().broken = Some(broken);
        e
    }

    /// Takes the first frame in `inbuf` that answers the request sent,
    /// discarding frames that do not; `None` until one is complete.
    fn next_answer(&mut self) -> Result<Option<Vec<u8>>, Broken> {
        let sent = self.handle.lock().sent.clone();
        let found = match self.framing {
            Framing::Tcp => take_tcp_answer(&mut self.inbuf, &sent),
            Framing::Rtu => Ok(take_rtu_answer(&mut self.inbuf, &sent)),
        };
        self.handle.lock().partial = self.inbuf.len();
        found
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Wire<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if std::mem::take(&mut this.handle.lock().fresh) {
            match this.drain(cx) {
                Ok(0) => {}
                Ok(stale) => tracing::info!(
                    bytes = stale,
                    "discarded bytes received before the request (a late or repeated answer)"
                ),
                Err(broken) => return Poll::Ready(Err(this.fail(broken))),
            }
        }
        match ready!(Pin::new(&mut this.io).poll_write(cx, buf)) {
            Ok(n) => {
                this.handle.lock().sent.extend_from_slice(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(this.fail(Broken::of(&e)))),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.io).poll_flush(cx)) {
            Ok(()) => {
                if !this.handle.lock().sent.is_empty() {
                    this.handle.written.send_replace(true);
                }
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(this.fail(Broken::of(&e)))),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Wire<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.outbuf.is_empty() {
                let n = this.outbuf.len().min(buf.remaining());
                buf.put_slice(&this.outbuf[..n]);
                this.outbuf.drain(..n);
                return Poll::Ready(Ok(()));
            }
            match this.next_answer() {
                Ok(Some(frame)) => {
                    this.outbuf = frame;
                    continue;
                }
                Ok(None) => {}
                Err(broken) => return Poll::Ready(Err(this.fail(broken))),
            }
            let mut scratch = [0u8; 512];
            let mut more = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.io).poll_read(cx, &mut more)) {
                Ok(()) if more.filled().is_empty() => return Poll::Ready(Err(this.fail(Broken::Closed))),
                Ok(()) => this.inbuf.extend_from_slice(more.filled()),
                Err(e) => return Poll::Ready(Err(this.fail(Broken::of(&e)))),
            }
        }
    }
}

/// The first whole Modbus TCP frame in `inbuf` with the transaction id, unit
/// id and function (or its exception) of the request `sent`; the frames
/// before it are dropped. A header that cannot be Modbus TCP is an error: the
/// stream is out of step and only a new connection helps.
fn take_tcp_answer(inbuf: &mut Vec<u8>, sent: &[u8]) -> Result<Option<Vec<u8>>, Broken> {
    loop {
        if inbuf.len() < 8 || sent.len() < 8 {
            return Ok(None);
        }
        let protocol = u16::from_be_bytes([inbuf[2], inbuf[3]]);
        let len = usize::from(u16::from_be_bytes([inbuf[4], inbuf[5]]));
        if protocol != 0 || !(2..=254).contains(&len) {
            return Err(Broken::Garbled(format!("protocol id {protocol}, length {len}")));
        }
        if inbuf.len() < 6 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = inbuf.drain(..6 + len).collect();
        let (tid, want_tid) = (&frame[0..2], &sent[0..2]);
        let (unit, function) = (frame[6], frame[7]);
        if tid == want_tid && unit == sent[6] && function & 0x7F == sent[7] {
            return Ok(Some(frame));
        }
        tracing::info!(
            transaction = u16::from_be_bytes([frame[0], frame[1]]),
            unit,
            function,
            expected_transaction = u16::from_be_bytes([sent[0], sent[1]]),
            expected_unit = sent[6],
            expected_function = sent[7],
            "discarded an answer that is not to the request in flight"
        );
    }
}

/// The first RTU frame in `inbuf` from the unit of the request `sent`, to its
/// function (or its exception), with a good CRC. RTU frames carry no length
/// and no transaction id: bytes before such a frame (another unit's answer,
/// noise, a frame with a bad CRC) are skipped one at a time.
fn take_rtu_answer(inbuf: &mut Vec<u8>, sent: &[u8]) -> Option<Vec<u8>> {
    let mut skipped = 0;
    let found = loop {
        if inbuf.len() < 2 || sent.len() < 2 {
            break None;
        }
        let (unit, function) = (inbuf[0], inbuf[1]);
        let len = if unit != sent[0] || function & 0x7F != sent[1] {
            None
        } else if function & 0x80 != 0 {
            Some(5)
        } else if (1..=4).contains(&function) {
            match inbuf.get(2) {
                Some(count) => Some(5 + usize::from(*count)),
                None => break None,
            }
        } else {
            Some(8)
        };
        match len {
            Some(len) if inbuf.len() < len => break None,
            Some(len) if crc16(&inbuf[..len - 2]) == inbuf[len - 2..len] => {
                break Some(inbuf.drain(..len).collect());
            }
            _ => {
                inbuf.remove(0);
                skipped += 1;
            }
        }
    };
    if skipped > 0 {
        tracing::info!(
            bytes = skipped,
            unit = sent[0],
            "skipped bytes that are no answer from the unit (another unit's frame, noise or a bad CRC)"
        );
    }
    found
}

/// CRC-16/MODBUS, low byte first as on the line.
fn crc16(data: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for byte in data {
        crc ^= u16::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc.to_le_bytes()
}

/// Opens a bus: a new TCP connection or a freshly opened serial port (with
/// its input buffer cleared), wrapped in a [`Wire`] under a tokio-modbus
/// context.
pub(super) async fn connect(
    link: &Link,
    timeout: Duration,
) -> io::Result<(tokio_modbus::client::Context, WireHandle)> {
    match link {
        Link::Tcp(addr) => {
            let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await.map_err(
                |_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")),
            )??;
            stream.set_nodelay(true)?;
            let (wire, handle) = Wire::new(stream, Framing::Tcp);
            Ok((tokio_modbus::client::tcp::attach(wire), handle))
        }
        Link::Rtu(line) => {
            let port: SerialStream = line.open().map_err(io::Error::from)?;
            use tokio_serial::SerialPort;
            port.clear(tokio_serial::ClearBuffer::Input).map_err(io::Error::from)?;
            let (wire, handle) = Wire::new(port, Framing::Rtu);
            Ok((tokio_modbus::client::rtu::attach(wire), handle))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtu(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut frame = vec![unit];
        frame.extend(pdu);
        let crc = crc16(&frame);
        frame.extend(crc);
        frame
    }

    #[test]
    fn crc_of_a_known_frame() {
        assert_eq!(rtu(1, &[3, 0, 0, 0, 1]), [1, 3, 0, 0, 0, 1, 0x84, 0x0A]);
    }

    #[test]
    fn tcp_answers_must_match_transaction_unit_and_function() {
        let sent = [0, 7, 0, 0, 0, 6, 1, 3, 0, 10, 0, 1];
        let frame = |tid: u8, unit: u8, function: u8| vec![0, tid, 0, 0, 0, 5, unit, function, 2, 0, 110];
        let right = frame(7, 1, 3);
        let mut inbuf = [frame(6, 1, 3), frame(7, 2, 3), frame(7, 1, 4), right.clone()].concat();
        inbuf.extend(&right[..4]);
        assert_eq!(take_tcp_answer(&mut inbuf, &sent), Ok(Some(right.clone())));
        assert_eq!(take_tcp_answer(&mut inbuf, &sent), Ok(None), "a partial frame waits");
        let exception = vec![0, 7, 0, 0, 0, 3, 1, 0x83, 2];
        assert_eq!(take_tcp_answer(&mut exception.clone(), &sent), Ok(Some(exception)));
        let mut garbage = vec![0x48, 0x54, 0x54, 0x50, 0x2F, 0x31, 0x2E, 0x31];
        assert!(matches!(take_tcp_answer(&mut garbage, &sent), Err(Broken::Garbled(_))));
    }

    #[test]
    fn rtu_answers_skip_other_units_noise_and_bad_crcs() {
        let sent = rtu(5, &[3, 0, 10, 0, 1]);
        let right = rtu(5, &[3, 2, 0, 110]);
        let mut bad_crc = right.clone();
        bad_crc[6] ^= 0xFF;
        let mut inbuf = [vec![0, 0xFF], rtu(6, &[3, 2, 0x27, 0x0F]), bad_crc, right.clone()].concat();
        assert_eq!(take_rtu_answer(&mut inbuf, &sent), Some(right.clone()));
        assert!(inbuf.is_empty());
        let mut half = right[..4].to_vec();
        assert_eq!(take_rtu_answer(&mut half, &sent), None);
        assert_eq!(half.len(), 4, "an incomplete answer is kept");
        let exception = rtu(5, &[0x83, 2]);
        assert_eq!(take_rtu_answer(&mut exception.clone(), &sent), Some(exception));
        let written = rtu(5, &[6, 0, 12, 0, 4]);
        assert_eq!(take_rtu_answer(&mut written.clone(), &written), Some(written));
    }
}
