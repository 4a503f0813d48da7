//! Host mode: without a Kubernetes API, identity runs on what the node itself says.
use observer::identity::{EnrichmentStatus, Identity, IdentityConfig, KubeMode};

#[tokio::test]
async fn auto_mode_without_any_cluster_config_runs_in_host_mode() {
    // No in-cluster environment and a kubeconfig that does not exist: `Config::infer` fails.
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::remove_var("KUBERNETES_SERVICE_HOST");
        std::env::remove_var("KUBERNETES_SERVICE_PORT");
        std::env::set_var("KUBECONFIG", "/nonexistent/observer-test/kubeconfig");
        std::env::set_var("HOME", "/nonexistent/observer-test");
    }
    let identity = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Identity::start(IdentityConfig {
            kube_mode: KubeMode::Auto,
            node_name: Some("node-a".into()),
            ..IdentityConfig::default()
        }),
    )
    .await
    .expect("start does not hang")
    .expect("host mode is not an error");
    assert_eq!(identity.status(), EnrichmentStatus::Disabled);
    assert!(identity.kube().is_none());
    assert!(identity.cluster_networks().is_empty());
    assert_eq!(identity.service_exists("default", "kubernetes"), None);
    // The root cgroup (id 1 on cgroup2) is a host scope, found from the real mount.
    let root = identity.resolve(1, Some(std::process::id()));
    assert_eq!(root.scope, observer::scope::ScopeKey::Host(1));
    assert_eq!(root.cgroup_path.as_deref(), Some("/"));
    assert!(root.resolver.is_some(), "resolv.conf of this process");

    let off = Identity::start(IdentityConfig {
        kube_mode: KubeMode::Off,
        ..IdentityConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(off.status(), EnrichmentStatus::Disabled);
}
