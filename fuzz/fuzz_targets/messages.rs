//! Fuzzes the JSON decoding of every message a peer can send.
#![no_main]

use drover_proto::msg::{
    AgentRequest, AgentResponse, ClientRequest, ClientResponse, ControllerRequest, Hello, Reply,
    Request, Welcome,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Request<Hello>>(data);
    let _ = serde_json::from_slice::<Reply<Welcome>>(data);
    let _ = serde_json::from_slice::<Request<ClientRequest>>(data);
    let _ = serde_json::from_slice::<Reply<ClientResponse>>(data);
    let _ = serde_json::from_slice::<Request<AgentRequest>>(data);
    let _ = serde_json::from_slice::<Request<ControllerRequest>>(data);
    let _ = serde_json::from_slice::<Reply<AgentResponse>>(data);
});
