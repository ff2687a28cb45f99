//! (being written)
pub struct Diagnostic;
pub struct Diagnostics;
