//! Logging: env_logger, with two kinds of records limited per second, so that a busy router
//! cannot flood the log or slow the relay: the eBPF program's records (its steering
//! decisions, via aya-log), at most [`EBPF_RECORDS_PER_SECOND`], and records written once per
//! connection or session ([`PER_FLOW`]: an upstream that failed, a flow refused), at most
//! [`PER_FLOW_RECORDS_PER_SECOND`]. What was held back is counted in one line, logged with
//! the next record after the second is over (or at exit).

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use log::{Log, Metadata, Record};

/// Most records from the eBPF program logged per second.
pub const EBPF_RECORDS_PER_SECOND: u32 = 100;

/// The log target of records written once per connection or session: one would be written
/// for every client when an upstream is unreachable.
pub const PER_FLOW: &str = "tproxy::per_flow";

/// Most [`PER_FLOW`] records logged per second.
pub const PER_FLOW_RECORDS_PER_SECOND: u32 = 10;

/// Installs the logger. `verbose` (`run -v`) shows each steering decision of the program,
/// unless `RUST_LOG` says otherwise.
pub fn init(verbose: bool) {
    let default = if verbose {
        "info,tproxy_ebpf=debug"
    } else {
        "info"
    };
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
            .build();
    log::set_max_level(inner.filter());
    let logger = RateLimited {
        inner,
        kinds: [
            Limited::new("tproxy_ebpf", "eBPF log records", EBPF_RECORDS_PER_SECOND),
            Limited::new(
                PER_FLOW,
                "per-connection log records",
                PER_FLOW_RECORDS_PER_SECOND,
            ),
        ],
    };
    let logger = LOGGER.get_or_init(|| Box::leak(Box::new(logger)));
    // Only fails if a logger is already installed, and nothing else installs one.
    let _ = log::set_logger(*logger);
}

/// The logger [`init`] installed.
static LOGGER: OnceLock<&'static RateLimited> = OnceLock::new();

/// One kind of rate-limited record: those whose target starts with `target`.
struct Limited {
    target: &'static str,
    what: &'static str,
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    logged: u32,
    held_back: u64,
}

impl Limited {
    fn new(target: &'static str, what: &'static str, per_second: u32) -> Self {
        Limited {
            target,
            what,
            per_second,
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                held_back: 0,
            }),
        }
    }

    /// Starts a new window once a second is over (or when `now` is asked for), logging the
    /// count of what the last one held back.
    fn roll(&self, window: &mut Window, inner: &env_logger::Logger, now: bool) {
        if !now && window.started.elapsed() < Duration::from_secs(1) {
            return;
        }
        if window.held_back > 0 {
            inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} {} held back (at most {} are shown a second)",
                        window.held_back, self.what, self.per_second
                    ))
                    .level(log::Level::Warn)
                    .target("tproxy::logging")
                    .build(),
            );
        }
        *window = Window {
            started: Instant::now(),
            logged: 0,
            held_back: 0,
        };
    }
}

struct RateLimited {
    inner: env_logger::Logger,
    kinds: [Limited; 2],
}

impl Log for RateLimited {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        for kind in &self.kinds {
            let mut window = kind.window.lock().unwrap();
            // Any record may be the one after a burst: its count comes before it.
            kind.roll(&mut window, &self.inner, false);
            if record.target().starts_with(kind.target) {
                if window.logged >= kind.per_second {
                    window.held_back += 1;
                    return;
                }
                window.logged += 1;
            }
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

impl RateLimited {
    fn log_held_back(&self) {
        for kind in &self.kinds {
            let mut window = kind.window.lock().unwrap();
            kind.roll(&mut window, &self.inner, true);
        }
    }
}

/// Logs the counts of records held back so far (at exit, so that none goes unsaid). Not in
/// `Log::flush`: aya-log flushes after every batch of the program's records.
pub fn log_held_back() {
    if let Some(logger) = LOGGER.get() {
        logger.log_held_back();
    }
}
