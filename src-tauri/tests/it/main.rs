//! The integration tests of the desktop app, in one test binary: `state` (the app's state
//! without a window) and `gui` (the real window under Xvfb through WebKitWebDriver).

mod gui;
mod state;
