//! The configuration file parser: any text gives a configuration or an error, never a panic.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use tproxy_user::{cli, config::Config};

fuzz_target!(|text: &str| {
    let cli = cli::Cli::try_parse_from(["tproxy", "run", "--config", "fuzz.toml"]).unwrap();
    let cli::Command::Run(args) = cli.command else { unreachable!() };
    if let Ok(config) = Config::from_text(&args, text) {
        let _ = config.describe();
    }
});
