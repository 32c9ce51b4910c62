//! What the CLI test binaries share: reading a run's JSON or its failure, and killing a run at
//! a fail point.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The one JSON object a successful `ramole args` printed.
pub fn json_of(out: Output, args: &[&str]) -> Value {
    assert!(
        out.status.success(),
        "ramole {args:?}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The stderr of a run that must fail.
pub fn failure_of(out: Output, args: &[&str]) -> String {
    assert!(!out.status.success(), "ramole {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Runs `cmd` until it announces the fail point `point`, then SIGKILLs it.
pub fn kill_at(mut cmd: Command, point: &str) {
    let mut child = cmd
        .env("RAMOLE_FAIL_POINT", point)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reached = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(&format!("fail point {point} reached")));
    assert!(reached, "the process ended before fail point {point}");
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
}
