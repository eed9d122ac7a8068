//! The round robin of a bus (a serial port, a Modbus bus): one request in
//! flight at a time, devices take turns, so a busy device cannot starve the others.

use std::task::{Context, Poll};

use protocol::envelope::CommandMessage;
use tokio::sync::mpsc::Receiver;

/// Whose turn it is: the scan for the next command starts after the device served last.
#[derive(Debug, Default)]
pub(crate) struct Turns {
    next: usize,
}

/// A device's command queue, if it has one now (e.g. while online).
pub(crate) type QueueOf<T> = fn(&mut T) -> Option<&mut Receiver<CommandMessage>>;

impl Turns {
    /// The next queued command, scanning `devices` from the one after the
    /// device served last: `(index, Some(command))`, or `(index, None)` when
    /// that device's queue is closed (the bridge gave its id to a newer
    /// connection). Cancel-safe: a command is taken only when returned.
    pub(crate) async fn next<T>(
        &mut self,
        devices: &mut [T],
        queue: QueueOf<T>,
    ) -> (usize, Option<CommandMessage>) {
        std::future::poll_fn(|cx| self.poll_next(devices, queue, cx)).await
    }

    /// [`Turns::next`] as a poll; registers for wake-ups on every queue when none is ready.
    pub(crate) fn poll_next<T>(
        &mut self,
        devices: &mut [T],
        queue: QueueOf<T>,
        cx: &mut Context<'_>,
    ) -> Poll<(usize, Option<CommandMessage>)> {
        let n = devices.len();
        for k in 0..n {
            let index = (self.next + k) % n;
            let Some(commands) = queue(&mut devices[index]) else { continue };
            if let Poll::Ready(command) = commands.poll_recv(cx) {
                if command.is_some() {
                    self.next = index + 1;
                }
                return Poll::Ready((index, command));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::DeviceId;
    use uuid::Uuid;

    #[test]
    fn round_robin_starts_after_the_last_served_device() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut devices = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            senders.push(tx);
            devices.push(Some(rx));
        }
        let msg = |device: &str| CommandMessage {
            id: Uuid::now_v7(),
            device_id: DeviceId::parse(device).unwrap(),
            name: "x".into(),
            payload_base64: Vec::new(),
            attempt: 1,
            expires_at_ms: i64::MAX,
            reports_to: None,
        };
        for _ in 0..2 {
            senders[0].try_send(msg("d0")).unwrap();
        }
        senders[2].try_send(msg("d2")).unwrap();
        let mut turns = Turns::default();
        let order: Vec<usize> = (0..3)
            .map_while(|_| match turns.poll_next(&mut devices, Option::as_mut, &mut cx) {
                Poll::Ready((i, Some(_))) => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(order, [0, 2, 0]);
    }

    #[test]
    fn devices_without_a_queue_are_skipped_and_a_closed_queue_is_reported() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (tx, rx) = tokio::sync::mpsc::channel::<CommandMessage>(1);
        let mut devices = vec![None, Some(rx)];
        let mut turns = Turns::default();
        assert!(turns.poll_next(&mut devices, Option::as_mut, &mut cx).is_pending());
        drop(tx);
        assert!(matches!(turns.poll_next(&mut devices, Option::as_mut, &mut cx), Poll::Ready((1, None))));
    }
}
