//! The rule-set translator: any text gives a translation or an error, never a panic, and a
//! translation is always a configuration that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(translation) = tproxy_user::tools::translate::translate(text) {
        toml::from_str::<toml::Value>(&translation.config).expect("translate printed invalid TOML");
    }
});
