//! The stand-in Kubernetes API server (`observer::kube_standin`, which speaks the API's
//! real wire protocol since no API server runs here) for the privileged tests that run the
//! real agent with `--kube auto` and a kubeconfig pointing at it: serving the Services a test
//! gives it and no Pods or Nodes; ServiceCIDR answers 404 as on Kubernetes before 1.33.
//! It serves on a loopback port from a thread of its own and stops when dropped.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

pub use observer::kube_standin::objects::external_name_service;
use observer::kube_standin::{ApiState, BOOKMARK_EVERY, BackgroundStandIn, SERVICES};
use serde_json::Value;

/// The running stand-in; its kubeconfig file is removed on drop.
pub struct KubeApi(BackgroundStandIn);

impl KubeApi {
    /// Serves `services` on a free loopback port; writes a kubeconfig for it named after
    /// `tag` (a test's run id) in the temporary directory.
    pub fn start(services: Vec<Value>, tag: &str) -> std::io::Result<Self> {
        let mut state = ApiState::new();
        for service in services {
            state.upsert(SERVICES, service, false);
        }
        let kubeconfig = std::env::temp_dir().join(format!("observer-kubeconfig-{tag}"));
        BackgroundStandIn::start(Arc::new(Mutex::new(state)), BOOKMARK_EVERY, &kubeconfig)
            .map(KubeApi)
    }

    pub fn kubeconfig(&self) -> &Path {
        self.0.kubeconfig()
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr()
    }
}
