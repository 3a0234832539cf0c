//! The configuration file parser: any text gives a configuration or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_user::config::{Config, RunArgs};

fuzz_target!(|text: &str| {
    let args = RunArgs {
        config: Some("fuzz.toml".into()),
        ..RunArgs::default()
    };
    if let Ok(config) = Config::from_text(&args, text) {
        let _ = config.describe();
    }
});
