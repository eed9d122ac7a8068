//! Commands as Modbus functions: a command name and JSON payload become an
//! [`Op`], an [`Op`] a tokio-modbus request, and the device's answer a JSON result.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tokio_modbus::{ExceptionCode, Request, Response};

use super::{CODE_BAD_PAYLOAD, CODE_UNKNOWN_COMMAND};

/// A command, parsed from its name and JSON payload: one Modbus function.
/// Addresses are the PDU's 0-based addresses; counts are in items (coils,
/// inputs or registers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    ReadCoils { address: u16, count: u16 },
    ReadDiscreteInputs { address: u16, count: u16 },
    ReadHoldingRegisters { address: u16, count: u16 },
    ReadInputRegisters { address: u16, count: u16 },
    WriteSingleCoil { address: u16, value: bool },
    WriteSingleRegister { address: u16, value: u16 },
    WriteMultipleCoils { address: u16, values: Vec<bool> },
    WriteMultipleRegisters { address: u16, values: Vec<u16> },
}

/// The command names [`Op::parse`] knows.
pub const COMMANDS: [&str; 8] = [
    "read_coils",
    "read_discrete_inputs",
    "read_holding_registers",
    "read_input_registers",
    "write_single_coil",
    "write_single_register",
    "write_multiple_coils",
    "write_multiple_registers",
];

/// Why a command cannot become a Modbus request; answered with a result, never sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCommand {
    #[error("unknown command {0:?}; a Modbus device knows {list}", list = COMMANDS.join(", "))]
    UnknownName(String),
    #[error("bad payload for {name}: {reason}")]
    Payload { name: String, reason: String },
}

impl BadCommand {
    /// The result code it is answered with: [`CODE_UNKNOWN_COMMAND`] or [`CODE_BAD_PAYLOAD`].
    pub fn code(&self) -> i32 {
        match self {
            BadCommand::UnknownName(_) => CODE_UNKNOWN_COMMAND,
            BadCommand::Payload { .. } => CODE_BAD_PAYLOAD,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    address: u16,
    count: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct One<T> {
    address: u16,
    value: T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Many<T> {
    address: u16,
    values: Vec<T>,
}

impl Op {
    /// Parses a command. The quantity limits are the Modbus specification's
    /// (what fits one PDU), and a range must not run past address 65535.
    pub fn parse(name: &str, payload: &[u8]) -> Result<Op, BadCommand> {
        let bad = |reason: String| BadCommand::Payload { name: name.to_owned(), reason };
        let range = |max: u16| -> Result<(u16, u16), BadCommand> {
            let r: Range = from_json(payload).map_err(bad)?;
            check_span(r.address, r.count, max).map_err(bad)?;
            Ok((r.address, r.count))
        };
        Ok(match name {
            "read_coils" => range(2000).map(|(address, count)| Op::ReadCoils { address, count })?,
            "read_discrete_inputs" => {
                range(2000).map(|(address, count)| Op::ReadDiscreteInputs { address, count })?
            }
            "read_holding_registers" => {
                range(125).map(|(address, count)| Op::ReadHoldingRegisters { address, count })?
            }
            "read_input_registers" => {
                range(125).map(|(address, count)| Op::ReadInputRegisters { address, count })?
            }
            "write_single_coil" => {
                let One { address, value } = from_json(payload).map_err(bad)?;
                Op::WriteSingleCoil { address, value }
            }
            "write_single_register" => {
                let One { address, value } = from_json(payload).map_err(bad)?;
                Op::WriteSingleRegister { address, value }
            }
            "write_multiple_coils" => {
                let Many { address, values } = from_json(payload).map_err(bad)?;
                check_span(address, values.len().try_into().unwrap_or(u16::MAX), 1968).map_err(bad)?;
                Op::WriteMultipleCoils { address, values }
            }
            "write_multiple_registers" => {
                let Many { address, values } = from_json(payload).map_err(bad)?;
                check_span(address, values.len().try_into().unwrap_or(u16::MAX), 123).map_err(bad)?;
                Op::WriteMultipleRegisters { address, values }
            }
            _ => return Err(BadCommand::UnknownName(name.to_owned())),
        })
    }

    pub(super) fn request(&self) -> Request<'static> {
        match self {
            Op::ReadCoils { address, count } => Request::ReadCoils(*address, *count),
            Op::ReadDiscreteInputs { address, count } => Request::ReadDiscreteInputs(*address, *count),
            Op::ReadHoldingRegisters { address, count } => Request::ReadHoldingRegisters(*address, *count),
            Op::ReadInputRegisters { address, count } => Request::ReadInputRegisters(*address, *count),
            Op::WriteSingleCoil { address, value } => Request::WriteSingleCoil(*address, *value),
            Op::WriteSingleRegister { address, value } => Request::WriteSingleRegister(*address, *value),
            Op::WriteMultipleCoils { address, values } => {
                Request::WriteMultipleCoils(*address, values.clone().into())
            }
            Op::WriteMultipleRegisters { address, values } => {
                Request::WriteMultipleRegisters(*address, values.clone().into())
            }
        }
    }

    /// The result payload for the device's answer (`None` if it answered another function).
    pub(super) fn answer(&self, response: Response) -> Option<serde_json::Value> {
        let values = |mut bits: Vec<bool>, count: &u16| {
            // Coils come in whole bytes: drop the padding bits.
            bits.truncate(usize::from(*count));
            json!({ "values": bits })
        };
        Some(match (self, response) {
            (Op::ReadCoils { count, .. }, Response::ReadCoils(bits)) => values(bits, count),
            (Op::ReadDiscreteInputs { count, .. }, Response::ReadDiscreteInputs(bits)) => values(bits, count),
            (Op::ReadHoldingRegisters { .. }, Response::ReadHoldingRegisters(words))
            | (Op::ReadInputRegisters { .. }, Response::ReadInputRegisters(words)) => {
                json!({ "values": words })
            }
            (Op::WriteSingleCoil { .. }, Response::WriteSingleCoil(..))
            | (Op::WriteSingleRegister { .. }, Response::WriteSingleRegister(..))
            | (Op::WriteMultipleCoils { .. }, Response::WriteMultipleCoils(..))
            | (Op::WriteMultipleRegisters { .. }, Response::WriteMultipleRegisters(..)) => {
                json!({ "ok": true })
            }
            _ => return None,
        })
    }
}

fn from_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| e.to_string())
}

fn check_span(address: u16, count: u16, max: u16) -> Result<(), String> {
    if count == 0 || count > max {
        return Err(format!("count must be 1 to {max}, not {count}"));
    }
    if u32::from(address) + u32::from(count) > 0x1_0000 {
        return Err(format!("{count} items from address {address} run past 65535"));
    }
    Ok(())
}

/// The result code and payload for a Modbus exception: the exception code, and its name.
pub(super) fn exception_result(e: ExceptionCode) -> (i32, serde_json::Value) {
    let name = match e {
        ExceptionCode::Custom(_) => "Unknown".to_owned(),
        known => format!("{known:?}"),
    };
    (i32::from(u8::from(e)), json!({ "exception": name }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_functions() {
        let p = |name: &str, payload: serde_json::Value| Op::parse(name, payload.to_string().as_bytes());
        assert_eq!(
            p("read_holding_registers", json!({"address": 10, "count": 3})),
            Ok(Op::ReadHoldingRegisters { address: 10, count: 3 })
        );
        assert_eq!(
            p("write_multiple_coils", json!({"address": 1, "values": [true, false]})),
            Ok(Op::WriteMultipleCoils { address: 1, values: vec![true, false] })
        );
        assert_eq!(
            p("write_single_register", json!({"address": 1, "value": 65535})),
            Ok(Op::WriteSingleRegister { address: 1, value: 65535 })
        );
        assert_eq!(p("reboot", json!(null)).unwrap_err().code(), CODE_UNKNOWN_COMMAND);
        for (name, bad) in [
            ("read_coils", json!(null)),
            ("read_coils", json!({"address": 0})),
            ("read_coils", json!({"address": 0, "count": 0})),
            ("read_holding_registers", json!({"address": 0, "count": 126})),
            ("read_holding_registers", json!({"address": 65535, "count": 2})),
            ("read_input_registers", json!({"address": -1, "count": 1})),
            ("write_single_register", json!({"address": 0, "value": 65536})),
            ("write_single_coil", json!({"address": 0, "value": 1})),
            ("write_multiple_registers", json!({"address": 0, "values": []})),
            ("write_multiple_registers", json!({"address": 0, "values": [1], "extra": 1})),
        ] {
            assert_eq!(p(name, bad.clone()).unwrap_err().code(), CODE_BAD_PAYLOAD, "{name} {bad}");
        }
        assert_eq!(Op::parse("read_coils", b"\xff").unwrap_err().code(), CODE_BAD_PAYLOAD);
    }

    #[test]
    fn answers_become_json() {
        let op = Op::ReadCoils { address: 0, count: 3 };
        assert_eq!(
            op.answer(Response::ReadCoils(vec![true, false, true, false])),
            Some(json!({"values": [true, false, true]}))
        );
        let op = Op::WriteSingleRegister { address: 0, value: 1 };
        assert_eq!(op.answer(Response::WriteSingleRegister(0, 1)), Some(json!({"ok": true})));
        assert_eq!(op.answer(Response::ReadCoils(vec![])), None);
        assert_eq!(
            exception_result(ExceptionCode::IllegalDataAddress),
            (2, json!({"exception": "IllegalDataAddress"}))
        );
        assert_eq!(exception_result(ExceptionCode::new(0x0B)).0, 11);
    }
}
