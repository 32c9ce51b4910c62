//! Harness of the end-to-end GUI tests: an Xvfb display, Debian's `WebKitWebDriver` (not
//! tauri-driver, DESIGN.md 6) and a small W3C WebDriver client over HTTP that drives the real
//! desktop app binary, plus X screenshots with ImageMagick's `import -window root`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver uses for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub type Result<T> = std::result::Result<T, String>;

/// Kills a child process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails with what is missing when a tool the GUI tests need is not installed.
pub fn require_tools() -> Result<()> {
    for (tool, package) in [
        ("Xvfb", "xvfb"),
        ("WebKitWebDriver", "webkit2gtk-driver"),
        ("import", "imagemagick"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "{tool} is not installed (Debian package {package}); scripts/test.sh installs it"
            ));
        }
    }
    Ok(())
}

/// A virtual X display.
pub struct Display {
    _xvfb: Killed,
    pub name: String,
}

impl Display {
    /// Starts Xvfb on the first free display number from 90 with a `width`x`height` screen.
    pub fn start(width: u32, height: u32) -> Result<Display> {
        for n in 90..200 {
            if Path::new(&format!("/tmp/.X{n}-lock")).exists()
                || Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
            {
                continue;
            }
            let child = Command::new("Xvfb")
                .arg(format!(":{n}"))
                .args([
                    "-screen",
                    "0",
                    &format!("{width}x{height}x24"),
                    "-nolisten",
                    "tcp",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting Xvfb: {e}"))?;
            let mut xvfb = Killed(child);
            let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if socket.exists() {
                    return Ok(Display {
                        _xvfb: xvfb,
                        name: format!(":{n}"),
                    });
                }
                if let Ok(Some(_)) = xvfb.0.try_wait() {
                    break; // lost a race for this number: try the next
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err("no free X display number in 90..200".into())
    }

    /// Saves the whole screen as a PNG.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let status = Command::new("import")
            .args(["-display", &self.name, "-window", "root"])
            .arg(path)
            .status()
            .map_err(|e| format!("running import: {e}"))?;
        if !status.success() {
            return Err(format!("import -window root failed: {status}"));
        }
        Ok(())
    }
}

/// `WebKitWebDriver` on a free local port; the app it starts inherits `env`.
pub struct Driver {
    _child: Killed,
    url: String,
}

impl Driver {
    pub fn start(display: &Display, env: &[(&str, &Path)], log: &Path) -> Result<Driver> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("WebKitWebDriver");
        cmd.arg(format!("--port={port}"))
            .env("DISPLAY", &display.name)
            .env("TAURI_WEBVIEW_AUTOMATION", "true")
            // No GPU under Xvfb: software rendering, no compositing surprises.
            .env("WEBKIT_DISABLE_COMPOSITING_MODE", "1")
            .env("LIBGL_ALWAYS_SOFTWARE", "1")
            .stdout(log_file)
            .stderr(err_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = Killed(
            cmd.spawn()
                .map_err(|e| format!("starting WebKitWebDriver: {e}"))?,
        );
        let driver = Driver {
            _child: child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        loop {
            if request("GET", &format!("{}/status", driver.url), None).is_ok() {
                return Ok(driver);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("WebKitWebDriver did not answer /status within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `binary` (a Tauri app) in a new session.
    pub fn session(&self, binary: &Path) -> Result<Session> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "webkitgtk:browserOptions": {"binary": binary, "args": []}
        }}});
        let v = request("POST", &format!("{}/session", self.url), Some(&caps))?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no sessionId in {v}"))?;
        Ok(Session {
            base: format!("{}/session/{id}", self.url),
        })
    }
}

fn request(method: &str, url: &str, body: Option<&Value>) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let resp = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, b) => agent
            .post(url)
            .header("content-type", "application/json")
            .send(b.cloned().unwrap_or_else(|| json!({})).to_string()),
    };
    let mut resp = resp.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{method} {url}: HTTP {status}, unreadable body: {e}"))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{method} {url}: HTTP {status}, not JSON ({e}): {text}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    // W3C WebDriver reports errors with an HTTP error status (and `value.error`).
    if status >= 400 {
        return Err(format!("{method} {url}: HTTP {status}: {value}"));
    }
    Ok(value)
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(Value);

impl Element {
    /// The driver's reference: the same DOM node keeps it, a new node gets another.
    pub fn reference(&self) -> &str {
        self.0[ELEMENT_KEY].as_str().unwrap_or_default()
    }
}

/// One WebDriver session: the app's window.
pub struct Session {
    base: String,
}

impl Session {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        request(method, &format!("{}{path}", self.base), body.as_ref())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Runs `script`, which must call `arguments[arguments.length - 1](value)` when done.
    pub fn execute_async(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.call(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
    }

    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"x": 0, "y": 0, "width": width, "height": height})),
        )
        .map(|_| ())
    }

    /// All elements matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .map(|a| a.iter().cloned().map(Element).collect())
            .unwrap_or_default())
    }

    fn element_path(&self, e: &Element, tail: &str) -> Result<String> {
        let id = e.0[ELEMENT_KEY]
            .as_str()
            .ok_or_else(|| format!("not an element reference: {}", e.0))?;
        Ok(format!("/element/{id}{tail}"))
    }

    pub fn click(&self, e: &Element) -> Result<()> {
        self.call("POST", &self.element_path(e, "/click")?, None)
            .map(|_| ())
    }

    pub fn clear(&self, e: &Element) -> Result<()> {
        self.call("POST", &self.element_path(e, "/clear")?, None)
            .map(|_| ())
    }

    pub fn type_text(&self, e: &Element, text: &str) -> Result<()> {
        self.call(
            "POST",
            &self.element_path(e, "/value")?,
            Some(json!({"text": text})),
        )
        .map(|_| ())
    }

    pub fn text(&self, e: &Element) -> Result<String> {
        let v = self.call("GET", &self.element_path(e, "/text")?, None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub fn attr(&self, e: &Element, name: &str) -> Result<Option<String>> {
        let v = self.call(
            "GET",
            &self.element_path(e, &format!("/attribute/{name}"))?,
            None,
        )?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Polls `probe` until it gives a value, failing after `timeout` with `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Session) -> Result<Option<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut last_err = String::new();
        loop {
            match probe(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = e,
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "timed out after {} s waiting for {what}{}",
                    timeout.as_secs(),
                    if last_err.is_empty() {
                        String::new()
                    } else {
                        format!(" (last error: {last_err})")
                    }
                ));
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Waits for the first element matching `css`.
    pub fn wait_element(&self, css: &str, timeout: Duration) -> Result<Element> {
        self.wait_for(css, timeout, |s| Ok(s.find_all(css)?.into_iter().next()))
    }

    /// Ends the session (closes the app).
    pub fn close(&self) -> Result<()> {
        self.call("DELETE", "", None).map(|_| ())
    }
}
