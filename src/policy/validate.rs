//! (being written)
pub fn load() {}
pub fn parse() {}
