//! The primary's decoder of what a worker sends: any bytes, with any count
//! of fds, must decode or fail cleanly, never panic; what decodes must be
//! consistent with the bytes.
#![no_main]

use distributor::protocol::{MAX_MESSAGE, ToPrimary};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&fds, datagram)) = input.split_first() else {
        return;
    };
    let datagram = &datagram[..datagram.len().min(MAX_MESSAGE)];
    let fds = usize::from(fds % 4);
    match ToPrimary::decode(datagram, fds) {
        Ok(ToPrimary::Ack(ids) | ToPrimary::Return(ids)) => {
            assert_eq!(fds, 0);
            assert_eq!(ids.count(), (datagram.len() - 1) / 8);
        }
        Ok(ToPrimary::Message(payload)) => assert_eq!(payload.len(), datagram.len() - 1),
        Ok(ToPrimary::Hello { .. }) => assert_eq!(datagram.len(), 3),
        Ok(ToPrimary::Recycle) => assert_eq!(datagram.len(), 1),
        Ok(ToPrimary::Pong(_) | ToPrimary::Stats(_) | ToPrimary::Done(_)) => {
            assert_eq!(datagram.len(), 9)
        }
        // A message type added later must get its own check here.
        Ok(other) => panic!("a message this target does not check: {other:?}"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
