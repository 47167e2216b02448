//! Preparing a pod before its containers start: directories, volumes, ownership, the
//! environment and the command of each container.

use super::*;

impl PodRun {
    /// Resolves images, creates the network namespace and volumes, builds each
    /// container's command and environment.
    pub(super) async fn prepare(&mut self) -> Result<(), StartFailure> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let all: Vec<(Container, bool)> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.clone(), true))
            .chain(spec.containers.iter().map(|c| (c.clone(), false)))
            .collect();
        let mut resolved = Vec::new();
        for (container, init) in &all {
            let image = container.image.clone().unwrap_or_default();
            let (program, argv) = self
                .ctx
                .config
                .images
                .resolve(
                    &image,
                    container.command.as_deref().unwrap_or_default(),
                    container.args.as_deref().unwrap_or_default(),
                )
                .map_err(|e| StartFailure {
                    reason: "ErrImagePull",
                    message: format!("container {:?}: {e}", container.name),
                })?;
            resolved.push((container.clone(), *init, program, argv));
        }

        self.runners.clear();
        let iface = match self.iface.clone() {
            Some(iface) => iface,
            None => {
                let network = self.ctx.network.clone();
                tokio::task::spawn_blocking(move || network.add_pod())
                    .await
                    .map_err(|e| StartFailure {
                        reason: "FailedCreatePodSandBox",
                        message: e.to_string(),
                    })?
                    .map_err(|e| StartFailure {
                        reason: "FailedCreatePodSandBox",
                        message: format!("failed to create the pod network namespace: {e}"),
                    })?
            }
        };
        let pod_ip = iface.ip;
        let netns = iface.netns_path();
        self.ctx.remember_sandbox(crate::kubelet::PodSandbox {
            namespace: self.namespace(),
            name: self.name(),
            uid: self.pod.metadata.uid.clone().unwrap_or_default(),
            interface: iface.clone(),
        });
        self.iface = Some(iface);
        // The pod IP is known from here on: env and downward API may use it.
        let status = self.pod.status.get_or_insert_with(Default::default);
        status.pod_ip = Some(pod_ip.to_string());
        status.host_ip = Some(self.ctx.config.node_ip.to_string());
        self.patch_status("Pending").await;

        let pod_dir = self.pod_dir();
        let logs = pod_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| StartFailure {
            reason: "FailedCreatePodSandBox",
            message: format!("failed to create {}: {e}", logs.display()),
        })?;
        let pod_volumes = volumes::prepare(
            &self.ctx.client,
            &self.pod,
            &pod_dir,
            &self.ctx.config.state_dir,
        )
        .await
        .map_err(|e| StartFailure {
            reason: "FailedMount",
            message: format!("{e}"),
        })?;

        let hostname = spec.hostname.clone().unwrap_or_else(|| self.name());
        let mut base = BTreeMap::new();
        base.insert(
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        );
        base.insert("HOSTNAME".to_owned(), hostname.clone());
        // In-cluster config (always set, as by the kubelet): the API via the pods' gateway.
        base.insert(
            "KUBERNETES_SERVICE_HOST".to_owned(),
            self.ctx.config.api_host.to_string(),
        );
        base.insert(
            "KUBERNETES_SERVICE_PORT".to_owned(),
            self.ctx.config.api_port.to_string(),
        );
        base.insert(
            "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
            self.ctx.config.api_port.to_string(),
        );
        // The kubelet's `format.Pod`: name_namespace(uid).
        let pod_label = format!(
            "{}_{}({})",
            self.name(),
            self.namespace(),
            self.pod.metadata.uid.as_deref().unwrap_or_default()
        );
        for (container, init, program, argv) in resolved {
            let settings = security::effective(
                spec.security_context.as_ref(),
                container.security_context.as_ref(),
            );
            let security =
                security::resolve(&settings, &pod_label, &container.name, security::host_user)
                    .map_err(|e| StartFailure {
                        reason: "CreateContainerConfigError",
                        message: e.to_string(),
                    })?;
            let mut image_base = base.clone();
            image_base.extend(crate::kubelet::images::image_env(
                container.image.as_deref().unwrap_or_default(),
            ));
            let env = container_env(&self.ctx.client, &self.pod, &container, image_base)
                .await
                .map_err(|e| StartFailure {
                    reason: "CreateContainerConfigError",
                    message: format!("container {:?}: {e}", container.name),
                })?;
            let argv = argv
                .iter()
                .map(|a| crate::kubelet::env::expand(a, &env))
                .collect();
            let binds = pod_volumes
                .binds(container.volume_mounts.as_deref().unwrap_or_default())
                .map_err(|e| StartFailure {
                    reason: "CreateContainerConfigError",
                    message: format!("container {:?}: {e}", container.name),
                })?;
            let workdir = container.working_dir.clone().map(PathBuf::from);
            if let Some(dir) = &workdir {
                let _ = std::fs::create_dir_all(dir);
            }
            let log = logs.join(format!("{}.log", container.name));
            let sandbox = Sandbox::Container {
                netns: netns.clone(),
                hostname: hostname.clone(),
                binds,
                workdir,
                keep_visible: vec![program.clone()],
                security,
            };
            self.runners.push(Runner::new(
                container, init, program, argv, env, sandbox, log,
            ));
        }
        Ok(())
    }
}
