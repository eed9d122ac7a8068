#!/usr/bin/env python3
"""A Modbus server for the receiver's tests, built on pymodbus 3.x (a Modbus
stack not written in this project), so that the receiver is checked against
somebody else's reading of the protocol.

    modbus_server.py tcp PORT --unit 1 [--unit 2 ...]
    modbus_server.py rtu SERIAL_PATH --unit 3 [--unit 4 ...]

Every unit gets its own datastore, pre-set to known values (protocol addresses
start at 0; anything past the end answers exception 2, IllegalDataAddress):

    holding registers 0..99   = 100 + address
    input registers   0..31   = 1000 + address
    coils             0..63   = address % 3 == 0
    discrete inputs   0..63   = address % 2 == 0

RTU runs at 19200 baud, 8N1 (on a pseudo-terminal the line settings do not matter).
"""

import argparse
import asyncio
import logging

import pymodbus
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer

try:  # pymodbus >= 3.9
    from pymodbus.datastore import ModbusDeviceContext as UnitContext
except ImportError:  # pymodbus < 3.9
    from pymodbus.datastore import ModbusSlaveContext as UnitContext

HOLDING = [100 + a for a in range(100)]
INPUT = [1000 + a for a in range(32)]
COILS = [a % 3 == 0 for a in range(64)]
DISCRETE = [a % 2 == 0 for a in range(64)]


def unit_context():
    # pymodbus maps protocol address N to block address N + 1, so blocks start at 1.
    return UnitContext(
        hr=ModbusSequentialDataBlock(1, list(HOLDING)),
        ir=ModbusSequentialDataBlock(1, list(INPUT)),
        co=ModbusSequentialDataBlock(1, list(COILS)),
        di=ModbusSequentialDataBlock(1, list(DISCRETE)),
    )


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transport", choices=["tcp", "rtu"])
    parser.add_argument("where", help="TCP port, or serial port path")
    parser.add_argument("--unit", type=int, action="append", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    context = ModbusServerContext({u: unit_context() for u in args.unit}, single=False)
    print(f"pymodbus {pymodbus.__version__} {args.transport} {args.where} units {args.unit}", flush=True)
    if args.transport == "tcp":
        await StartAsyncTcpServer(context, address=("127.0.0.1", int(args.where)))
    else:
        await StartAsyncSerialServer(
            context, port=args.where, baudrate=19200, bytesize=8, parity="N", stopbits=1
        )


if __name__ == "__main__":
    asyncio.run(main())
