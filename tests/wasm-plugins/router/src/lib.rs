//! A routing plugin for the proxy's Wasm host: routes on a combination no declarative rule
//! can express (a header's number above a threshold, from a given calling workload), edits
//! headers, answers locally, logs, and reads the Dubbo properties.
//!
//! Configuration (the route file's `pluginConfig`, as JSON):
//! `{"threshold": 1000, "workload": "frontend", "cluster": "reviews/v2"}`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Config {
    threshold: u64,
    workload: String,
    cluster: String,
}

#[derive(Default)]
struct Root {
    config: Config,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(raw) = self.get_plugin_configuration() else {
            return true;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            proxy_wasm::hostcalls::log(LogLevel::Error, "router: configuration is not JSON").ok();
            return false;
        };
        self.config = Config {
            threshold: v["threshold"].as_u64().unwrap_or(u64::MAX),
            workload: v["workload"].as_str().unwrap_or_default().to_owned(),
            cluster: v["cluster"].as_str().unwrap_or_default().to_owned(),
        };
        proxy_wasm::hostcalls::log(
            LogLevel::Info,
            &format!("router: configured, cluster {}", self.config.cluster),
        )
        .ok();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Router {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Router {
    config: Config,
}

impl Context for Router {}

fn text(v: Option<Vec<u8>>) -> String {
    v.map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl HttpContext for Router {
    fn on_http_request_headers(&mut self, _n: usize, _end: bool) -> Action {
        let method = text(self.get_property(vec!["request", "method"]));
        let path = text(self.get_property(vec!["request", "path"]));
        let workload = text(self.get_property(vec!["source", "workload"]));
        proxy_wasm::hostcalls::log(
            LogLevel::Info,
            &format!("router: {method} {path} from {workload}"),
        )
        .ok();
        if self.get_http_request_header("x-deny").is_some() {
            self.send_http_response(
                403,
                vec![("x-denied-by", "router")],
                Some(b"denied by plugin\n"),
            );
            return Action::Pause;
        }
        self.set_http_request_header("x-remove-me", None);
        self.set_http_request_header("x-plugin", Some("router"));
        self.add_http_request_header("x-added", "1");
        let headers = self.get_http_request_headers();
        self.set_http_request_header("x-header-count", Some(&headers.len().to_string()));

        let amount = self
            .get_http_request_header("x-amount")
            .and_then(|a| a.parse::<u64>().ok());
        if amount.is_some_and(|a| a > self.config.threshold)
            && !self.config.workload.is_empty()
            && workload.contains(&self.config.workload)
        {
            self.set_property(vec!["icp", "cluster"], Some(self.config.cluster.as_bytes()));
        }
        if let Some(name) = self.get_http_request_header("x-route-name") {
            self.set_property(vec!["icp", "route"], Some(name.as_bytes()));
        }
        // A Dubbo request: route `greet` calls whose first argument starts with "vip" and
        // whose caller names itself in the `application` attachment.
        let dubbo_method = text(self.get_property(vec!["dubbo", "method"]));
        if !dubbo_method.is_empty() {
            let arg0 = text(self.get_property(vec!["dubbo", "args", "0"]));
            let app = text(self.get_property(vec!["dubbo", "attachments", "application"]));
            if dubbo_method == "greet" && arg0.starts_with("vip") && !app.is_empty() {
                self.set_property(vec!["icp", "cluster"], Some(self.config.cluster.as_bytes()));
            }
        }
        Action::Continue
    }
}
