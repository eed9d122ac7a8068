//! `sqlx::migrate!` embeds `../migrations` at compile time; a migration added
//! or edited must rebuild the gateway.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
