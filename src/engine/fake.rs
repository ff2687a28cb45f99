//! In-memory engine for planner and loop tests.
