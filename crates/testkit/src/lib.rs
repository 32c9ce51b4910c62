//! ramole-testkit: what the tests of every crate share, kept out of the crates' public APIs.
//!
//! - [`models`]: the committed fixtures and the real test models (`scripts/fetch-test-models.sh`);
//!   a test that needs a missing model fails with the command that fetches it.
//! - [`peft`]: seeded random PEFT adapters (also what `ramole bench` writes).
//! - `hub` (feature `hub`): adapter repositories for the local fake Hub (`ramole-testhub`).
//! - `gui` (feature `gui`): the GUI harness: Xvfb, Debian's WebKitWebDriver and a small W3C
//!   WebDriver client, X screenshots.

#[cfg(feature = "gui")]
pub mod gui;
#[cfg(feature = "hub")]
pub mod hub;
pub mod models;
pub mod peft;

pub use peft::write_random_peft;
