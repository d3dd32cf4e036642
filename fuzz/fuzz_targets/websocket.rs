//! Arbitrary bytes from a client as WebSocket frames: never a panic, and the same events
//! (or the same error) however reads cut the bytes. The first byte picks the cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_serve::wire::decode_in_chunks;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    assert_eq!(
        decode_in_chunks(bytes, usize::from(cut), 4096),
        decode_in_chunks(bytes, bytes.len(), 4096)
    );
});
