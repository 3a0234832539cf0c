//! Logging: env_logger, with the eBPF program's records (its steering decisions, via aya-log)
//! limited to [`EBPF_RECORDS_PER_SECOND`], so that tracing a busy router cannot flood the log
//! or slow the relay; what was held back is counted in one line per second.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use log::{Log, Metadata, Record};

/// Most records from the eBPF program logged per second.
pub const EBPF_RECORDS_PER_SECOND: u32 = 100;

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
        window: Mutex::new(Window {
            started: Instant::now(),
            logged: 0,
            held_back: 0,
        }),
    };
    // Only fails if a logger is already installed, and nothing else installs one.
    let _ = log::set_boxed_logger(Box::new(logger));
}

struct Window {
    started: Instant,
    logged: u32,
    held_back: u64,
}

struct RateLimited {
    inner: env_logger::Logger,
    window: Mutex<Window>,
}

impl Log for RateLimited {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        if record.target().starts_with("tproxy_ebpf") {
            let mut window = self.window.lock().unwrap();
            if window.started.elapsed() >= Duration::from_secs(1) {
                if window.held_back > 0 {
                    self.inner.log(
                        &Record::builder()
                            .args(format_args!(
                                "{} eBPF log records held back in the last second (at most {EBPF_RECORDS_PER_SECOND} are shown a second)",
                                window.held_back
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
            if window.logged >= EBPF_RECORDS_PER_SECOND {
                window.held_back += 1;
                return;
            }
            window.logged += 1;
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}
