//! `wsedge-load`: WebSocket load generator (scenarios land with issue 3).
fn main() {
    eprintln!("wsedge-load: scenarios are not implemented yet (see issue 3)");
    std::process::exit(2);
}
