//! Fuzzes what the controller's Zeek WebSocket front does with a client's text message:
//! the subscription, Broker's JSON data model (decode, encode, decode: the same value),
//! the request events, and a staged configuration's conversion, validation, cluster
//! layout and get-config round trip (`drover_controller::zeek::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // WebSocket text messages are UTF-8; the front never sees anything else as text.
    if let Ok(text) = std::str::from_utf8(data) {
        drover_controller::zeek::fuzzing::websocket_message(text);
    }
});
