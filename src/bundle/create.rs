//! `bundle create` (filled in below the reader).
