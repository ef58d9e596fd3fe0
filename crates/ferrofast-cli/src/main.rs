//! `ferrofast demo` and `ferrofast bench`.
fn main() {}
