//! Fuzzes the TOML cluster-file parser and validation: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = drover_proto::config::parse_toml("fuzz.toml", text) {
            // A valid configuration survives the wire.
            let json = serde_json::to_vec(&config).expect("serializes");
            let back: drover_proto::Configuration = serde_json::from_slice(&json).expect("decodes");
            assert_eq!(back.nodes.len(), config.nodes.len());
        }
    }
});
