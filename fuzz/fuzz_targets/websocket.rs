//! Arbitrary bytes from a client as WebSocket frames: never a panic, and the same events
//! (or the same error) however reads cut the bytes. The first byte picks the cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_serve::wire::{Decoder, Event};
use switchboard_engine::FrameError;

/// Every event of `bytes` fed `chunk` bytes at a time; the first error ends it.
fn decode(bytes: &[u8], chunk: usize) -> Vec<Result<Event, FrameError>> {
    let mut decoder = Decoder::new(4096, Vec::new());
    let mut events = Vec::new();
    for mut input in bytes.chunks(chunk.max(1)) {
        loop {
            match decoder.next(&mut input) {
                Ok(Some(event)) => events.push(Ok(event)),
                Ok(None) => break,
                Err(error) => {
                    events.push(Err(error));
                    return events;
                }
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    assert_eq!(decode(bytes, usize::from(cut)), decode(bytes, bytes.len()));
});
