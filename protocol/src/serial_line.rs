//! [`SerialFormat`]: how a serial line frames each character (`8N1`, `7E2`, …),
//! parsed and printed in the usual three-character notation. Pure data: each
//! program maps it to its serial library's settings.

use std::fmt;
use std::str::FromStr;

/// Parity bit of each character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Parity {
    /// No parity bit (`N`).
    #[default]
    None,
    /// Even parity (`E`).
    Even,
    /// Odd parity (`O`).
    Odd,
}

impl Parity {
    /// The letter of the notation: `N`, `E` or `O`.
    pub fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

/// A character frame: `data_bits` 5 to 8, `parity`, `stop_bits` 1 or 2.
/// Written `DPS`, e.g. `8N1` (the default), `8E1` (Modbus RTU's), `7O2`.
/// The fields are private so every value is one a line can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SerialFormat {
    data_bits: u8,
    parity: Parity,
    stop_bits: u8,
}

/// Text that is not a frame format like `8N1`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a serial frame format: data bits 5-8, parity N/E/O, stop bits 1/2 (e.g. 8N1)")]
pub struct BadSerialFormat(pub String);

impl SerialFormat {
    /// 8 data bits, no parity, 1 stop bit.
    pub const EIGHT_N_ONE: SerialFormat = SerialFormat { data_bits: 8, parity: Parity::None, stop_bits: 1 };
    /// 8 data bits, even parity, 1 stop bit: the Modbus serial line default.
    pub const EIGHT_E_ONE: SerialFormat = SerialFormat { data_bits: 8, parity: Parity::Even, stop_bits: 1 };

    /// Checks the ranges: `data_bits` 5 to 8, `stop_bits` 1 or 2.
    pub fn new(data_bits: u8, parity: Parity, stop_bits: u8) -> Result<SerialFormat, BadSerialFormat> {
        if (5..=8).contains(&data_bits) && (1..=2).contains(&stop_bits) {
            Ok(SerialFormat { data_bits, parity, stop_bits })
        } else {
            Err(BadSerialFormat(format!("{data_bits}{}{stop_bits}", parity.letter())))
        }
    }

    /// Data bits per character, 5 to 8.
    pub fn data_bits(self) -> u8 {
        self.data_bits
    }

    /// The parity bit.
    pub fn parity(self) -> Parity {
        self.parity
    }

    /// Stop bits per character, 1 or 2.
    pub fn stop_bits(self) -> u8 {
        self.stop_bits
    }
}

impl Default for SerialFormat {
    fn default() -> Self {
        SerialFormat::EIGHT_N_ONE
    }
}

impl FromStr for SerialFormat {
    type Err = BadSerialFormat;

    /// `DPS`: a digit 5-8, a parity letter (either case), a digit 1-2.
    fn from_str(text: &str) -> Result<SerialFormat, BadSerialFormat> {
        let bad = || BadSerialFormat(text.to_owned());
        let &[d, p, s] = text.as_bytes() else { return Err(bad()) };
        let parity = match p.to_ascii_uppercase() {
            b'N' => Parity::None,
            b'E' => Parity::Even,
            b'O' => Parity::Odd,
            _ => return Err(bad()),
        };
        let digit = |b: u8| b.is_ascii_digit().then(|| b - b'0');
        let (data_bits, stop_bits) = digit(d).zip(digit(s)).ok_or_else(bad)?;
        SerialFormat::new(data_bits, parity, stop_bits).map_err(|_| bad())
    }
}

impl fmt::Display for SerialFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.data_bits, self.parity.letter(), self.stop_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_valid_format_and_prints_it_back() {
        for d in 5..=8 {
            for p in ['N', 'E', 'O'] {
                for s in 1..=2 {
                    let text = format!("{d}{p}{s}");
                    let format: SerialFormat = text.parse().unwrap();
                    assert_eq!((format.data_bits(), format.parity().letter(), format.stop_bits()), (d, p, s));
                    assert_eq!(format.to_string(), text);
                }
            }
        }
    }

    #[test]
    fn parity_letter_is_case_insensitive_and_the_default_is_8n1() {
        assert_eq!("7e2".parse(), SerialFormat::new(7, Parity::Even, 2));
        assert_eq!("8o1".parse::<SerialFormat>().unwrap().parity(), Parity::Odd);
        assert_eq!(SerialFormat::default().to_string(), "8N1");
        assert_eq!(SerialFormat::EIGHT_E_ONE.to_string(), "8E1");
    }

    #[test]
    fn refuses_what_a_line_cannot_use() {
        for bad in ["", "8N", "8N11", "9N1", "4N1", "8X1", "8N3", "8N0", "N81", "８N1"] {
            assert_eq!(bad.parse::<SerialFormat>(), Err(BadSerialFormat(bad.to_owned())), "{bad:?}");
        }
        assert!(SerialFormat::new(8, Parity::None, 3).is_err());
    }
}
