//! Progress reporting for long work: an `indicatif` bar with rate and ETA when stderr is a
//! terminal, plain periodic `tracing` lines when it is not (CI logs, cron, systemd).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often the non-terminal reporter writes a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A progress reporter over `total` units of work (`unit` names them: "images", "steps").
pub struct Progress {
    what: String,
    unit: &'static str,
    total: u64,
    started: Instant,
    inner: Inner,
}

enum Inner {
    Bar(ProgressBar),
    Log(Mutex<LogState>),
    Hidden,
}

struct LogState {
    done: u64,
    last: Instant,
    message: String,
}

impl Progress {
    /// A bar on a terminal, periodic log lines otherwise.
    pub fn new(what: impl Into<String>, total: u64, unit: &'static str) -> Self {
        let inner = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {unit} ({per_sec}, ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("unit", move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(unit);
                }),
            );
            Inner::Bar(bar)
        } else {
            Inner::Log(Mutex::new(LogState { done: 0, last: Instant::now(), message: String::new() }))
        };
        let what = what.into();
        if let Inner::Bar(b) = &inner {
            b.set_prefix(what.clone());
        }
        Progress { what, unit, total, started: Instant::now(), inner }
    }

    /// A reporter that shows nothing (tests, nested work).
    pub fn hidden() -> Self {
        Progress { what: String::new(), unit: "", total: 0, started: Instant::now(), inner: Inner::Hidden }
    }

    /// Marks `n` more units done.
    pub fn inc(&self, n: u64) {
        match &self.inner {
            Inner::Bar(b) => b.inc(n),
            Inner::Log(state) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.done += n;
                if s.last.elapsed() >= LOG_EVERY {
                    s.last = Instant::now();
                    self.log_line(s.done, &s.message);
                }
            }
            Inner::Hidden => {}
        }
    }

    /// Sets the trailing message (e.g. the current loss).
    pub fn set_message(&self, msg: impl Into<String>) {
        match &self.inner {
            Inner::Bar(b) => b.set_message(msg.into()),
            Inner::Log(state) => state.lock().unwrap_or_else(|e| e.into_inner()).message = msg.into(),
            Inner::Hidden => {}
        }
    }

    /// Ends the bar and logs the total time.
    pub fn finish(&self) {
        match &self.inner {
            Inner::Bar(b) => b.finish(),
            Inner::Log(state) => {
                let s = state.lock().unwrap_or_else(|e| e.into_inner());
                self.log_line(s.done, &s.message);
            }
            Inner::Hidden => {}
        }
    }

    fn log_line(&self, done: u64, message: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 && self.total > done { (self.total - done) as f64 / rate } else { 0.0 };
        tracing::info!("{}: {done}/{} {} ({rate:.1}/s, ETA {eta:.0}s) {message}", self.what, self.total, self.unit);
    }
}
