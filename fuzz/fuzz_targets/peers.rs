//! Arbitrary bytes from the cluster broker as peer envelopes: never a panic, and what
//! decodes encodes back to an envelope that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_engine::peer::wire::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = decode(&bytes::Bytes::copy_from_slice(data)) {
        assert!(decode(&encode(&envelope)).is_ok());
    }
});
