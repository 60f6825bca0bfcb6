//! The worker's decoder of what the primary sends: any bytes, with any
//! count of fds, must decode or fail cleanly, never panic. A CONNECTION
//! that decodes must yield exactly one entry per fd, and re-encoding its
//! entries must give back the same bytes.
#![no_main]

use distributor::protocol::{Encoder, MAX_FDS, MAX_MESSAGE, ToWorker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&fds, datagram)) = input.split_first() else {
        return;
    };
    let datagram = &datagram[..datagram.len().min(MAX_MESSAGE)];
    let fds = usize::from(fds) % (MAX_FDS + 2);
    if let Ok(ToWorker::Connection(entries)) = ToWorker::decode(datagram, fds) {
        let entries: Vec<_> = entries.collect();
        assert_eq!(entries.len(), fds);
        let mut enc = Encoder::default();
        enc.connection();
        for (id, peer) in entries {
            enc.entry(id, peer);
        }
        // IPv6 flow info and scope are not carried, so compare via a
        // second decode rather than the raw bytes.
        let again = ToWorker::decode(enc.as_bytes(), fds).expect("re-encoded entries decode");
        let ToWorker::Connection(again) = again else {
            panic!("re-encoded CONNECTION decoded as something else");
        };
        assert_eq!(again.count(), fds);
        assert_eq!(enc.as_bytes(), datagram);
    }
});
