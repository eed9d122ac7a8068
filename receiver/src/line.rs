//! A serial line's settings (path, baud rate, character format) and the one
//! place they become tokio-serial settings; used by [`crate::serial`] and
//! [`crate::modbus`] (RTU). Parsing a format like `8N1` is `protocol`'s.

use protocol::serial_line::Parity;
use protocol::SerialFormat;
use tokio_serial::{DataBits, SerialPortBuilderExt, SerialStream, StopBits};

/// A serial port and how to talk on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    /// The device path, e.g. `/dev/ttyUSB0` (a pseudo-terminal in tests).
    pub path: String,
    /// Bits per second.
    pub baud: u32,
    /// Character format, e.g. 8N1.
    pub format: SerialFormat,
}

impl SerialLine {
    /// Opens the port with these settings. Fails when it does not exist, is
    /// busy, or refuses the settings.
    pub fn open(&self) -> tokio_serial::Result<SerialStream> {
        tokio_serial::new(&self.path, self.baud)
            .data_bits(data_bits(self.format))
            .parity(parity(self.format))
            .stop_bits(stop_bits(self.format))
            .open_native_async()
    }
}

fn data_bits(format: SerialFormat) -> DataBits {
    match format.data_bits() {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    }
}

fn parity(format: SerialFormat) -> tokio_serial::Parity {
    match format.parity() {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    }
}

fn stop_bits(format: SerialFormat) -> StopBits {
    match format.stop_bits() {
        2 => StopBits::Two,
        _ => StopBits::One,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_map_to_tokio_serial_settings() {
        let f: SerialFormat = "7E2".parse().unwrap();
        assert_eq!(
            (data_bits(f), parity(f), stop_bits(f)),
            (DataBits::Seven, tokio_serial::Parity::Even, StopBits::Two)
        );
        let f = SerialFormat::default();
        assert_eq!(
            (data_bits(f), parity(f), stop_bits(f)),
            (DataBits::Eight, tokio_serial::Parity::None, StopBits::One)
        );
        assert_eq!(data_bits("5O1".parse().unwrap()), DataBits::Five);
        assert_eq!(data_bits("6N1".parse().unwrap()), DataBits::Six);
    }
}
