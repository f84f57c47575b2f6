//! Fuzzes the frame codec: any bytes decode to a message or an error, never a panic,
//! and whatever decodes re-encodes to the same frame.
#![no_main]

use drover_net::frame::{decode, encode};
use drover_proto::msg::{ClientRequest, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode::<Request<ClientRequest>>(data, 1 << 20) {
        assert!(used <= data.len());
        let again = encode(&msg);
        let (back, _): (Request<ClientRequest>, usize) =
            decode(&again, 1 << 20).expect("re-encoded frame decodes").expect("whole");
        assert_eq!(back, msg);
    }
});
