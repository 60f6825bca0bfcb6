//! The primary's parser of what a Node worker sends: any line must parse
//! or fail cleanly, never panic; a query's answers must be JSON whatever
//! its `data` and address; an app's message must be re-encodable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if line.contains(&b'\n') {
        return;
    }
    let _ = distributor::__private::node_fuzz_line(line);
});
