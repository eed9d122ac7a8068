//! A device played by hand over TCP: HELLO, then COMMAND frames read and
//! RESULT frames written when the test says — for behaviour the simulator
//! does not have (hanging up after a read, answers of any size).

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::{DeviceId, Frame, FrameCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use uuid::Uuid;

/// One connection of a hand-played device.
pub struct RawDevice {
    framed: Framed<TcpStream, FrameCodec>,
}

/// A COMMAND frame as the device read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadCommand {
    pub id: Uuid,
    pub name: String,
    pub payload: Vec<u8>,
}

impl RawDevice {
    /// Connects to a receiver's device port and says HELLO as `device_id`.
    pub async fn connect(receiver: SocketAddr, device_id: &str) -> RawDevice {
        let socket = TcpStream::connect(receiver).await.expect("receiver's device port");
        let mut framed = Framed::new(socket, FrameCodec::default());
        let device_id: DeviceId = device_id.parse().expect("a valid device id");
        framed.send(&Frame::Hello { device_id }).await.expect("HELLO written");
        RawDevice { framed }
    }

    /// The next COMMAND frame (other frames skipped), within `within`.
    pub async fn next_command(&mut self, within: Duration) -> ReadCommand {
        let read = async {
            loop {
                match self.framed.next().await {
                    Some(Ok(Ok(Frame::Command { id, name, payload }))) => {
                        return ReadCommand { id, name, payload: payload.to_vec() }
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("connection ended while waiting for a COMMAND: {other:?}"),
                }
            }
        };
        tokio::time::timeout(within, read).await.expect("a COMMAND in time")
    }

    /// True when the receiver closes the connection within `within` (frames before that skipped).
    pub async fn is_closed(&mut self, within: Duration) -> bool {
        let end = async {
            loop {
                match self.framed.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(within, end).await.is_ok()
    }

    /// Writes a RESULT frame.
    pub async fn answer(&mut self, id: Uuid, code: i32, payload: Vec<u8>) {
        self.framed.send(&Frame::Result { id, code, payload: payload.into() }).await.expect("RESULT written");
    }
}
