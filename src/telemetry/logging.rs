//! slog setup: JSON lines (`ts`, `level`, `msg`, fields) or a terminal format.
//!
//! Records go through `slog_async` so a slow stdout never blocks an actor;
//! the returned [`LogGuard`] must live until exit, its drop flushes the tail.
//! Output errors are ignored (`ignore_res`), so `outbox-relay … | head`
//! cannot panic the logging thread.

use std::io;

use slog::{o, Drain, FnValue, Level, Logger, PushFnValue, Record};

use crate::config::LogConfig;

/// Keeps the async logging thread alive; dropping it flushes pending lines.
pub struct LogGuard {
    _guard: Option<slog_async::AsyncGuard>,
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Critical => "critical",
        Level::Error => "error",
        Level::Warning => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// Build the process logger from `[log]`. The config was validated before.
pub fn init(cfg: &LogConfig) -> (Logger, LogGuard) {
    let level = cfg.level().unwrap_or(Level::Info);
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = if cfg.format == "text" {
        let decorator = slog_term::PlainSyncDecorator::new(Scrubbed::new(io::stdout()));
        Box::new(slog_term::FullFormat::new(decorator).build().ignore_res())
    } else {
        let json = slog_json::Json::new(Scrubbed::new(io::stdout()))
            .set_newlines(true)
            .add_key_value(o!(
                "ts" => FnValue(|_: &Record| {
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
                }),
                "level" => FnValue(|r: &Record| level_name(r.level())),
                "msg" => PushFnValue(|r: &Record, ser| ser.emit(r.msg())),
            ))
            .build();
        Box::new(json.ignore_res())
    };
    let (async_drain, guard) = slog_async::Async::new(drain)
        .chan_size(8192)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .build_with_guard();
    let drain = async_drain.filter_level(level).ignore_res();
    let log = Logger::root(drain, o!());
    forward_library_logs(&log, level);
    (log, LogGuard { _guard: Some(guard) })
}

/// A writer that passes whole lines on with every secret scrubbed
/// (`redact::scrub`): the last line of defence, for anything a library put
/// into a message (an error quoting a URL, say).
struct Scrubbed<W: io::Write> {
    inner: W,
    line: Vec<u8>,
}

impl<W: io::Write> Scrubbed<W> {
    fn new(inner: W) -> Self {
        Scrubbed {
            inner,
            line: Vec::with_capacity(512),
        }
    }

    fn emit(&mut self, upto: usize) -> io::Result<()> {
        let rest = self.line.split_off(upto);
        let line = std::mem::replace(&mut self.line, rest);
        let text = String::from_utf8_lossy(&line);
        self.inner.write_all(crate::redact::scrub(&text).as_bytes())
    }
}

impl<W: io::Write> io::Write for Scrubbed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        while let Some(nl) = self.line.iter().position(|&b| b == b'\n') {
            self.emit(nl + 1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.emit(self.line.len())?;
        }
        self.inner.flush()
    }
}

/// Route what our libraries say through the `log` facade (redis-rs's
/// cluster recovery, tokio-postgres's server notices, bb8) into the same
/// log lines, tagged `"source": "library"` and the library's module path.
/// Libraries speak one step quieter than we do: at our `info` only their
/// errors pass (redis-rs warns once per failed reconnect attempt, dozens
/// of lines a second while a node is down), at `debug` their warnings, at
/// `trace` their info as our debug.
fn forward_library_logs(log: &Logger, level: Level) {
    struct Bridge {
        log: Logger,
        max: log::LevelFilter,
    }
    impl log::Log for Bridge {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.max
        }
        fn log(&self, r: &log::Record) {
            if !self.enabled(r.metadata()) {
                return;
            }
            let target = r.target().to_string();
            let msg = r.args().to_string();
            let kv = o!("source" => "library", "target" => target);
            let l = self.log.new(kv);
            match r.level() {
                log::Level::Error => slog::error!(l, "{}", msg),
                log::Level::Warn => slog::warn!(l, "{}", msg),
                log::Level::Info => slog::debug!(l, "{}", msg),
                log::Level::Debug | log::Level::Trace => slog::trace!(l, "{}", msg),
            }
        }
        fn flush(&self) {}
    }
    let max = match level {
        Level::Critical | Level::Error | Level::Warning | Level::Info => log::LevelFilter::Error,
        Level::Debug => log::LevelFilter::Warn,
        Level::Trace => log::LevelFilter::Info,
    };
    // Only the first logger built in a process is installed (tests build many).
    if log::set_boxed_logger(Box::new(Bridge { log: log.clone(), max })).is_ok() {
        log::set_max_level(max);
    }
}

/// Lets a recurring warning through at most once per `every`, counting the
/// occurrences it held back so the next line can say how many. A tick runs
/// every few milliseconds while Redis is refusing; one line per tick would
/// bury everything else.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    pub fn new(every: std::time::Duration) -> Self {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many
    /// were held back since the last line; `None` to stay quiet.
    pub fn pass(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// A logger that discards everything (library callers, unit tests).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs(1);
        let mut t = Throttle::new(10 * s);
        assert_eq!(t.pass(t0), Some(0), "the first occurrence is logged");
        assert_eq!(t.pass(t0 + s), None);
        assert_eq!(t.pass(t0 + 9 * s), None);
        assert_eq!(t.pass(t0 + 10 * s), Some(2), "the next line reports the two held back");
        assert_eq!(t.pass(t0 + 11 * s), None);
        assert_eq!(t.pass(t0 + 30 * s), Some(1));
        assert_eq!(t.pass(t0 + 31 * s), None);
    }
}
