//! `stowage inventory` (filled in below the reader).
