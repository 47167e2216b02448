//! Starting a real node: the bridge, containerd, the CNI configuration, the kubelet, and the
//! waits until the Node is Ready and schedulable.

use super::*;

pub(super) struct Setup {
    pub(super) binaries: NodeBinaries,
    pub(super) options: RealNodeOptions,
    pub(super) kubectl: PathBuf,
    pub(super) admin_kubeconfig: PathBuf,
    pub(super) index: u8,
    pub(super) lock: File,
    pub(super) name: String,
    /// The kubelet's kubeconfig (text): the node's ServiceAccount token.
    pub(super) kubelet_kubeconfig: String,
    /// The bed's API proxy, where the `kubernetes` Service is DNATed.
    pub(super) api_proxy: (Ipv4Addr, u16),
}

impl Setup {
    pub(super) async fn start(self) -> Result<RealNode, NodeError> {
        let started = Instant::now();
        let index = self.index;
        let lock = self.lock;
        let name = self.name.clone();
        let node_ip = Ipv4Addr::new(10, 214, index, 1);
        let dir = tempfile::Builder::new()
            .prefix("pgrs-node-")
            .tempdir()
            .map_err(|source| NodeError::Io {
                path: std::env::temp_dir(),
                source,
            })?
            .keep();
        let paths = config::Paths::new(&dir);
        // The node is built up in a RealNode from here on, so that a failure removes what
        // is already there (bridge, directory, processes).
        let mut node = RealNode {
            name: name.clone(),
            kubelet: None,
            containerd: None,
            binaries: self.binaries.clone(),
            dir: dir.clone(),
            keep_dir: self.options.keep_dir,
            socket: paths.containerd_socket.clone(),
            index,
            kubectl: self.kubectl.clone(),
            admin_kubeconfig: self.admin_kubeconfig.clone(),
            timings: NodeTimings {
                containerd: Duration::ZERO,
                images: Duration::ZERO,
                kubelet: Duration::ZERO,
                total: Duration::ZERO,
            },
            service_route: None,
            stopped: false,
            _lock: lock,
        };
        // The bridge exists before the first pod (the CNI bridge plugin takes it as it is), so
        // that its address can be the node's: a local, non-loopback address the kubelet
        // accepts as --node-ip, reachable from the host and from the node's pods. A bridge
        // left by a crashed earlier owner of this subnet goes first.
        let bridge = bridge_name(index);
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("{node_ip}/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let mut command = Command::new("ip");
            command.args(&args);
            run(command)?;
        }
        node.service_route = Some(service_route::ServiceRoute::add(
            &bridge,
            (
                crate::testbed::KUBERNETES_SERVICE_IP,
                crate::testbed::IN_CLUSTER_API_PORT,
            ),
            self.api_proxy,
        )?);
        for d in paths.dirs() {
            mkdir(&d)?;
        }
        let subnet = Ipv4Addr::new(10, 214, index, 0);
        write(
            &paths.containerd_config,
            &config::containerd(&paths, &self.binaries, &NodeBinaries::pause_image()),
        )?;
        write(
            &paths.cni_conf_dir.join("10-pgrs-node.conflist"),
            &config::cni(&paths, &bridge_name(index), subnet),
        )?;

        let containerd = Component::start(
            "containerd",
            &self.binaries.containerd(),
            &[
                format!("--config={}", paths.containerd_config.display()),
                "--log-level=info".to_owned(),
            ],
            &paths.logs,
        )?;
        node.containerd = Some(containerd);
        wait_for(&mut node, "containerd answering", || {
            let out = ctr(&self.binaries, &paths.containerd_socket)
                .arg("version")
                .output();
            async move {
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await?;
        let containerd_ready = started.elapsed();

        import(
            &self.binaries,
            &paths.containerd_socket,
            &self.binaries.pause_archive(),
        )?;
        for archive in &self.options.images {
            import(&self.binaries, &paths.containerd_socket, archive)?;
        }
        let images_done = started.elapsed();

        let kubelet_kubeconfig = dir.join("kubelet.kubeconfig");
        write(&kubelet_kubeconfig, &self.kubelet_kubeconfig)?;
        let port = free_port().map_err(NodeError::Port)?;
        let healthz_port = free_port().map_err(NodeError::Port)?;
        write(
            &paths.kubelet_config,
            &config::kubelet(&paths, subnet, port, healthz_port),
        )?;
        let kubelet = Component::start(
            "kubelet",
            &self.binaries.kubelet(),
            &[
                format!("--config={}", paths.kubelet_config.display()),
                format!("--kubeconfig={}", kubelet_kubeconfig.display()),
                format!("--root-dir={}", paths.kubelet_root.display()),
                format!("--cert-dir={}", paths.kubelet_root.join("pki").display()),
                format!("--hostname-override={name}"),
                format!("--node-ip={node_ip}"),
                "--v=2".to_owned(),
            ],
            &paths.logs,
        )?;
        node.kubelet = Some(kubelet);
        let client = crate::control_plane::client_from_kubeconfig_file(&self.admin_kubeconfig)
            .await
            .map_err(NodeError::Client)?;
        let nodes: Api<Node> = Api::all(client);
        wait_for(&mut node, "the Node Ready", || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes
                    .get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no Node {name} yet"))?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "Ready");
                match ready {
                    Some(c) if c.status == "True" => Ok(()),
                    Some(c) => Err(format!(
                        "Ready={}: {} {}",
                        c.status,
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    )),
                    None => Err("no Ready condition yet".to_owned()),
                }
            }
        })
        .await?;
        untaint_not_ready(&nodes, &name).await?;
        let total = started.elapsed();
        node.timings = NodeTimings {
            containerd: containerd_ready,
            images: images_done - containerd_ready,
            kubelet: total - images_done,
            total,
        };
        Ok(node)
    }
}

/// The kubelet registers its Node with the taint `node.kubernetes.io/not-ready:NoSchedule`;
/// kube-controller-manager's node-lifecycle controller, which would remove it once the Node is
/// Ready, does not run on the bed (it would also judge the fake kubelet's Node), so the
/// harness removes it here, once.
async fn untaint_not_ready(nodes: &Api<Node>, name: &str) -> Result<(), NodeError> {
    let untaint = |source| NodeError::Untaint {
        node: name.to_owned(),
        source,
    };
    let node = nodes.get(name).await.map_err(untaint)?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| t.key != "node.kubernetes.io/not-ready")
        .cloned()
        .collect();
    if kept.len() == taints.len() {
        return Ok(());
    }
    nodes
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"taints": kept}})),
        )
        .await
        .map(|_| ())
        .map_err(untaint)
}

/// Polls `probe` every 200 ms; fails when containerd or the kubelet exits, or after
/// [`READY_TIMEOUT`], with their log tails.
async fn wait_for<F, Fut>(node: &mut RealNode, what: &str, mut probe: F) -> Result<(), NodeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last_error = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let exited = [
            ("containerd", node.containerd.as_mut()),
            ("kubelet", node.kubelet.as_mut()),
        ]
        .into_iter()
        .find_map(|(component, process)| Some((component, process?.exited()?)));
        if let Some((component, status)) = exited {
            return Err(NodeError::Exited {
                component,
                status,
                logs: node.log_tails(LOG_TAIL_LINES),
            });
        }
        if Instant::now() > deadline {
            return Err(NodeError::NotReady {
                what: format!("{} did not get {what}", node.name),
                timeout: READY_TIMEOUT,
                last_error,
                logs: node.log_tails(LOG_TAIL_LINES),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
