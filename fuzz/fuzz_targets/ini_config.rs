//! Fuzzes the Zeek INI cluster-file parser, the INI and TOML writers and format
//! detection: errors, never panics; what the parser accepts prints and reads back with
//! the same nodes.
#![no_main]

use drover_proto::ini;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ini::detect_format("-", text);
    let Ok(config) = ini::parse_ini("fuzz.ini", text) else {
        return;
    };
    let _ = ini::to_toml(&config);
    let printed = ini::to_ini(&config);
    if let Ok(back) = ini::parse_ini("printed.ini", &printed) {
        let names = |c: &drover_proto::Configuration| {
            c.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&back), names(&config), "printed:\n{printed}");
    }
});
