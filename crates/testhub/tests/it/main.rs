//! The integration tests of the fake Hub, one module per area, in one test binary.

mod common;
mod faults;
mod files;
mod listing;
