// `sqlx::migrate!` embeds `migrations/` at compile time; without this, adding a migration file
// alone does not rebuild the crate and the binary runs without it (sqlx's documented remedy).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
