#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| toe_fuzz::spec(data));
