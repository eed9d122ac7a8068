//! Tables for people (comfy-table, no borders, columns two spaces apart):
//! drawn from the API's JSON documents, each field as docs/openapi.json
//! describes it. `--json` bypasses all of this.

use comfy_table::presets::NOTHING;
use comfy_table::Table;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A table with these column titles (none: a key/value table).
fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    if !header.is_empty() {
        table.set_header(header);
    }
    table
}

/// The table as text, each line without trailing blanks.
fn finish(mut table: Table) -> String {
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.lines().map(|l| l.trim_end().to_owned()).collect::<Vec<_>>().join("\n")
}

/// A scalar as text: strings bare, null as `-`, anything else as compact JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> &'static str {
    if v == true {
        "yes"
    } else {
        "no"
    }
}

/// Labels as `k=v` pairs (a string value bare, others as JSON).
fn labels(v: &Value) -> String {
    match v.as_object() {
        Some(map) if !map.is_empty() => {
            map.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(",")
        }
        _ => "-".into(),
    }
}

/// One device (the API's `Device`), a field a line.
pub(super) fn device(d: &Value) -> String {
    let mut t = table(&[]);
    t.add_row(["id", &cell(&d["id"])]);
    t.add_row(["enabled", yes_no(&d["enabled"])]);
    t.add_row(["online", yes_no(&d["online"])]);
    t.add_row(["receiver", &cell(&d["receiver_id"])]);
    t.add_row(["last seen", &cell(&d["last_seen_at"])]);
    t.add_row(["labels", &labels(&d["labels"])]);
    t.add_row(["created", &cell(&d["created_at"])]);
    t.add_row(["updated", &cell(&d["updated_at"])]);
    finish(t)
}

/// Devices (the `items` of a `DevicePage`), one a line.
pub(super) fn devices(items: &Value) -> String {
    let mut t = table(&["ID", "ONLINE", "ENABLED", "RECEIVER", "LAST SEEN", "LABELS"]);
    for d in items.as_array().into_iter().flatten() {
        t.add_row([
            cell(&d["id"]),
            yes_no(&d["online"]).into(),
            yes_no(&d["enabled"]).into(),
            cell(&d["receiver_id"]),
            cell(&d["last_seen_at"]),
            labels(&d["labels"]),
        ]);
    }
    finish(t)
}

/// A payload as the API shows it: JSON compact, binary as `base64:…`.
fn payload(v: &Value) -> String {
    match (v.get("payload"), v.get("payload_base64")) {
        (Some(p), _) => p.to_string(),
        (None, Some(b)) => format!("base64:{}", cell(b)),
        (None, None) => "-".into(),
    }
}

/// `code 0: {"ok":true}` of a command's `result`.
fn result(r: &Value) -> String {
    match r.is_null() {
        true => "-".into(),
        false => format!("code {}: {}", cell(&r["code"]), payload(r)),
    }
}

/// `device_error: message` of a command's `error`.
fn error(e: &Value) -> String {
    match (&e["kind"], &e["message"]) {
        (Value::Null, _) => "-".into(),
        (kind, Value::Null) => cell(kind),
        (kind, message) => format!("{}: {}", cell(kind), cell(message)),
    }
}

/// One command (the API's `Command`), a field a line.
pub(super) fn command(c: &Value) -> String {
    let mut t = table(&[]);
    t.add_row(["id", &cell(&c["id"])]);
    t.add_row(["device", &cell(&c["device_id"])]);
    t.add_row(["name", &cell(&c["name"])]);
    t.add_row(["status", &cell(&c["status"])]);
    t.add_row(["attempts", &format!("{} of {}", cell(&c["attempts"]), cell(&c["max_attempts"]))]);
    t.add_row(["payload", &payload(c)]);
    t.add_row(["result", &result(&c["result"])]);
    t.add_row(["error", &error(&c["error"])]);
    t.add_row(["created", &cell(&c["created_at"])]);
    if !c["scheduled_at"].is_null() {
        t.add_row(["scheduled", &cell(&c["scheduled_at"])]);
    }
    t.add_row(["delivered", &cell(&c["delivered_at"])]);
    t.add_row(["completed", &cell(&c["completed_at"])]);
    t.add_row(["expires", &cell(&c["expires_at"])]);
    if !c["idempotency_key"].is_null() {
        t.add_row(["idempotency key", &cell(&c["idempotency_key"])]);
    }
    finish(t)
}

/// Commands (the `items` of a `CommandPage`), one a line.
pub(super) fn commands(items: &Value) -> String {
    let mut t = table(&["ID", "DEVICE", "NAME", "STATUS", "ATTEMPTS", "CREATED", "OUTCOME"]);
    for c in items.as_array().into_iter().flatten() {
        let outcome = match (&c["result"], &c["error"]) {
            (r, Value::Null) if !r.is_null() => format!("code {}", cell(&r["code"])),
            (_, e) => error(e),
        };
        t.add_row([
            cell(&c["id"]),
            cell(&c["device_id"]),
            cell(&c["name"]),
            cell(&c["status"]),
            format!("{}/{}", cell(&c["attempts"]), cell(&c["max_attempts"])),
            cell(&c["created_at"]),
            outcome,
        ]);
    }
    finish(t)
}

fn instant(v: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(v.as_str()?, &Rfc3339).ok()
}

/// A command's events (the `items` of an `EventPage`), oldest first, with
/// the time since the one before.
pub(super) fn events(items: &Value) -> String {
    let mut t = table(&["AT", "AFTER", "CHANGE", "ATTEMPT", "DETAIL"]);
    let mut previous: Option<OffsetDateTime> = None;
    for e in items.as_array().into_iter().flatten() {
        let at = instant(&e["at"]);
        let after = match (previous, at) {
            (Some(p), Some(a)) => format!("+{:.3} s", (a - p).as_seconds_f64()),
            _ => "-".into(),
        };
        previous = at.or(previous);
        let change = match (&e["from"], &e["to"]) {
            (Value::Null, to) => format!("→ {}", cell(to)),
            (from, to) if from == to => format!("{} (note)", cell(to)),
            (from, to) => format!("{} → {}", cell(from), cell(to)),
        };
        let mut detail = cell(&e["detail"]);
        if let Some(n) = e["repeats"].as_i64() {
            detail = format!("{detail} (×{n}, last at {})", cell(&e["last_at"]));
        }
        t.add_row([cell(&e["at"]), after, change, cell(&e["attempt"]), detail]);
    }
    finish(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_device_list_lines_up_under_its_titles() {
        let items = json!([
            {"id": "dev-1", "online": true, "enabled": true, "receiver_id": "rx-1",
             "last_seen_at": "2026-11-30T08:00:00.000Z", "labels": {"site": "north", "floor": 2}},
            {"id": "dev-22", "online": false, "enabled": false, "receiver_id": null,
             "last_seen_at": null, "labels": {}},
        ]);
        let text = devices(&items);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["ID", "ONLINE", "ENABLED", "RECEIVER", "LAST", "SEEN", "LABELS"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["dev-1", "yes", "yes", "rx-1", "2026-11-30T08:00:00.000Z", "site=north,floor=2"]
        );
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["dev-22", "no", "no", "-", "-", "-"]);
        assert_eq!(lines[1].find("yes"), lines[0].find("ONLINE"), "{text}");
    }

    #[test]
    fn events_show_each_change_and_the_time_between() {
        let items = json!([
            {"at": "2026-11-30T08:00:00.000Z", "from": null, "to": "pending", "attempt": 0, "detail": null},
            {"at": "2026-11-30T08:00:00.250Z", "from": "pending", "to": "sent", "attempt": 1, "detail": "to rx-1"},
            {"at": "2026-11-30T08:00:01.250Z", "from": "sent", "to": "sent", "attempt": 1,
             "detail": "undeliverable", "repeats": 3, "last_at": "2026-11-30T08:00:02.000Z"},
        ]);
        let text = events(&items);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("→ pending") && lines[1].contains(" - "), "{text}");
        assert!(lines[2].contains("+0.250 s") && lines[2].contains("pending → sent"), "{text}");
        assert!(lines[3].contains("+1.000 s") && lines[3].contains("sent (note)"), "{text}");
        assert!(lines[3].ends_with("undeliverable (×3, last at 2026-11-30T08:00:02.000Z)"), "{text}");
    }

    #[test]
    fn a_command_shows_its_result_or_error() {
        let ok = json!({"id": "c1", "status": "succeeded", "attempts": 1, "max_attempts": 5,
            "payload": {"x": 1}, "result": {"code": 0, "payload": {"y": 2}, "message": null}, "error": null,
            "scheduled_at": null, "idempotency_key": null});
        let text = command(&ok);
        assert!(text.contains("attempts  1 of 5") || text.lines().any(|l| l.ends_with("1 of 5")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("result") && l.ends_with(r#"code 0: {"y":2}"#)), "{text}");
        assert!(text.lines().any(|l| l.starts_with("payload") && l.ends_with(r#"{"x":1}"#)), "{text}");
        let failed = json!({"status": "failed", "payload_base64": "AAE=", "result": null,
            "error": {"kind": "attempts_exhausted", "message": "no result after 5 attempts"}});
        let text = command(&failed);
        assert!(
            text.lines().any(|l| l.ends_with("attempts_exhausted: no result after 5 attempts")),
            "{text}"
        );
        assert!(text.lines().any(|l| l.ends_with("base64:AAE=")), "{text}");
    }
}
