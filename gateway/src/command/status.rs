//! Where a command stands, and which moves between statuses are legal. The
//! rest of the state machine (what a move writes, which events it logs) is
//! `machine`; both are pure.

use serde::Serialize;

/// Where a command stands. `Succeeded`, `Failed`, `Expired` and `Canceled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted with a future `scheduled_at`: nothing published yet.
    Scheduled,
    /// Stored, not yet handed to the broker.
    Pending,
    /// Published to the receiver that holds the device.
    Sent,
    /// The receiver wrote it to the device.
    Delivered,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Scheduled,
        Status::Pending,
        Status::Sent,
        Status::Delivered,
        Status::Succeeded,
        Status::Failed,
        Status::Expired,
        Status::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Expired | Status::Canceled)
    }

    /// Whether `self → to` is a legal move. Statuses only move forward: a late
    /// or duplicate report can never take a command back.
    pub fn can_move_to(self, to: Status) -> bool {
        use Status::*;
        if self.is_final() {
            return false;
        }
        match to {
            Scheduled => false,
            Pending => self == Scheduled,
            // A re-send moves `delivered` back to `sent` only through the sweeper's attempt path.
            Sent => matches!(self, Scheduled | Pending | Delivered | Sent),
            Delivered => matches!(self, Pending | Sent),
            Succeeded | Failed | Expired | Canceled => true,
        }
    }

    /// Statuses from which `to` may be reached.
    pub fn sources_of(to: Status) -> Vec<Status> {
        Status::ALL.into_iter().filter(|from| from.can_move_to(to)).collect()
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_statuses_never_move() {
        for from in Status::ALL.into_iter().filter(|s| s.is_final()) {
            for to in Status::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_late_delivery_report_cannot_undo_a_result() {
        assert!(Status::Sent.can_move_to(Status::Delivered));
        assert!(!Status::Succeeded.can_move_to(Status::Delivered));
        assert_eq!(Status::sources_of(Status::Delivered), vec![Status::Pending, Status::Sent]);
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
    }
}
