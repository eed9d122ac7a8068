//! docs/ARCHITECTURE.md's "step of a command → file::function" table stays
//! true: every `path/file.rs::[Type::]function` it names exists, and the
//! function is defined in that file (in `impl Type` when a type is named).

use std::path::Path;

/// Every `` `…/….rs::…` `` reference in the step table.
fn references(doc: &str) -> Vec<String> {
    let start = doc.find("## Step of a command → file::function").expect("the step table's heading");
    let table = &doc[start..];
    let table = &table[..table[3..].find("\n## ").map_or(table.len(), |end| end + 3)];
    table.split('`').skip(1).step_by(2).filter(|code| code.contains(".rs::")).map(str::to_owned).collect()
}

/// Whether `source` defines `function`, inside `impl Type …` when `ty` is given.
fn defines(source: &str, ty: Option<&str>, function: &str) -> bool {
    let defined_at = |text: &str| {
        ["fn ", "async fn "].iter().any(|prefix| {
            text.match_indices(&format!("{prefix}{function}"))
                .any(|(i, m)| text[i + m.len()..].starts_with(['(', '<']))
        })
    };
    let Some(ty) = ty else { return defined_at(source) };
    // The text of each `impl … Ty … {` block up to the next top-level `impl`.
    source.match_indices("\nimpl").any(|(i, _)| {
        let rest = &source[i + 1..];
        let header = &rest[..rest.find('{').unwrap_or(0)];
        let names_type = header.split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == ty);
        let block = &rest[..rest[4..].find("\nimpl").map_or(rest.len(), |end| end + 4)];
        names_type && defined_at(block)
    })
}

#[test]
fn every_step_of_the_table_lands_on_its_function() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let refs = references(&doc);
    assert!(refs.len() >= 25, "the table names the steps ({} references found)", refs.len());
    let mut wrong = Vec::new();
    for reference in &refs {
        let (file, path) = reference.split_once(".rs::").unwrap();
        let file = format!("{file}.rs");
        let Ok(source) = std::fs::read_to_string(root.join(&file)) else {
            wrong.push(format!("{reference}: no file {file}"));
            continue;
        };
        let parts: Vec<&str> = path.split("::").collect();
        let (ty, function) = match parts.as_slice() {
            [function] => (None, *function),
            [ty, function] => (Some(*ty), *function),
            _ => panic!("{reference}: expected file.rs::fn or file.rs::Type::fn"),
        };
        if !defines(&source, ty, function) {
            wrong.push(format!("{reference}: {file} defines no {path}"));
        }
    }
    assert!(wrong.is_empty(), "the step table points nowhere:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_tells_a_method_from_a_free_function() {
    let source = "struct A;\nimpl A {\n    pub async fn go(&self) {}\n}\nfn free() {}\nimpl B {\n    fn other() {}\n}\n";
    assert!(defines(source, Some("A"), "go"));
    assert!(defines(source, None, "free"));
    assert!(!defines(source, Some("A"), "other"));
    assert!(!defines(source, Some("A"), "g"));
    assert!(!defines(source, None, "missing"));
}
