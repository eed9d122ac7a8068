//! Free loopback ports for programs started later (the demo, the benchmark,
//! the tests): below the kernel's ephemeral range, so that no outgoing
//! connection made meanwhile can be given the port before the listener binds
//! it (a port from `bind(:0)` can: a gateway started by `bench --quick` in CI
//! once failed with "Address already in use" that way).

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// The ports [`free_low_port`] hands out: below the ephemeral range
/// (32768–60999 on Linux by default), above most fixed service ports.
pub const LOW_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port on 127.0.0.1, free when chosen, below 32768, and reserved for
/// as long as this value lives: the reservation is a UDP socket bound to the
/// same port number, which another process's [`free_low_port`] cannot bind
/// (the servers use only TCP). The kernel releases it when the process dies,
/// however it dies.
#[derive(Debug)]
pub struct LowPort {
    port: u16,
    _reservation: UdpSocket,
}

impl LowPort {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A free TCP port on 127.0.0.1 in [`LOW_PORTS`]: starts at a random
/// candidate and walks on, skipping ports another process holds or that
/// anything listens on. `None` if every one is taken.
pub fn free_low_port() -> Option<LowPort> {
    let span = u32::from(LOW_PORTS.end - LOW_PORTS.start);
    let start = rand::random::<u32>() % span;
    for step in 0..span {
        let port = LOW_PORTS.start + ((start + step) % span) as u16;
        let Ok(reservation) = UdpSocket::bind(("127.0.0.1", port)) else { continue };
        // Free for TCP right now (std sets SO_REUSEADDR, so a port in TIME_WAIT
        // counts as free, as it does for the servers, which set it too).
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Some(LowPort { port, _reservation: reservation });
        }
    }
    None
}

/// [`free_low_port`]'s address, its reservation held until this process
/// ends (so no port is handed out twice): for a listener started later.
/// An error if no port in [`LOW_PORTS`] is free.
pub fn reserve_free_port() -> std::io::Result<SocketAddr> {
    static HELD: std::sync::Mutex<Vec<LowPort>> = std::sync::Mutex::new(Vec::new());
    let port = free_low_port().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free port in 127.0.0.1:{LOW_PORTS:?}"))
    })?;
    let addr = port.addr();
    HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(port);
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reserved port is below the ephemeral range, bindable for TCP, and
    /// not handed out again while reserved.
    #[test]
    fn reserved_ports_are_low_free_and_distinct() {
        let ports: Vec<LowPort> = (0..20).map(|_| free_low_port().expect("a free port")).collect();
        let mut numbers: Vec<u16> = ports.iter().map(LowPort::port).collect();
        assert!(numbers.iter().all(|p| LOW_PORTS.contains(p)));
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), 20, "no port handed out twice");
        for p in &ports {
            TcpListener::bind(p.addr()).expect("free for TCP");
        }
    }
}
