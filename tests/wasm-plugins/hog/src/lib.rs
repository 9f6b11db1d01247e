//! A plugin that asks for 64 MiB of memory on every request.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Hog) });
}}

struct Hog;

impl Context for Hog {}

impl HttpContext for Hog {
    fn on_http_request_headers(&mut self, _n: usize, _end: bool) -> Action {
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        Action::Continue
    }
}
