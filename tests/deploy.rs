//! The deployment files: Kubernetes manifests (schema-validated with
//! `kubernetes-validate --strict`, then checked against each other and against the
//! server's own configuration), the Docker Compose example and the systemd unit
//! (`systemd-analyze verify` where it exists).

#![cfg(target_os = "linux")]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;

const PORT: u64 = 8194;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    let mut v: Value = serde_yaml::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
    v
}

/// `v[a][b]...`, panicking with the path when a step is missing.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        cur = match cur {
            Value::Sequence(s) => key.parse::<usize>().ok().and_then(|n| s.get(n)),
            Value::Mapping(_) => cur.get(*key),
            _ => None,
        }
        .unwrap_or_else(|| panic!("missing `{}`", path[..=i].join(".")));
    }
    cur
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{}` is not a string", path.join(".")))
}

fn u64_at(v: &Value, path: &[&str]) -> u64 {
    at(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("`{}` is not a number", path.join(".")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            other => panic!("expected a string in the list, got {other:?}"),
        })
        .collect()
}

fn label_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("expected a label map, got {v:?}"))
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Every manifest under deploy/kubernetes, kustomizations apart.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && p.file_name().unwrap() != "kustomization.yaml"
            {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&k8s_dir(), &mut out);
    out.sort();
    out
}

fn manifest(rel: &str) -> Value {
    yaml(&k8s_dir().join(rel))
}

/// The server's configuration as the ConfigMap gives it.
fn configmap_config() -> Value {
    let cm = manifest("base/configmap.yaml");
    serde_yaml::from_str(str_at(&cm, &["data", "config.yaml"]))
        .expect("the ConfigMap's config.yaml is not valid YAML")
}

fn kubernetes_validate(args: &[&str], files: &[PathBuf]) -> Output {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(args)
        .args(files)
        .output()
        .expect("python3 not found: run ./install.sh --test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed: run ./install.sh --test"
    );
    out
}

/// Each file must be reported as passed for every resource it holds, with no warning
/// (a warning means a schema was not found, so nothing was checked).
fn assert_validates(version: &[&str], files: &[PathBuf]) {
    let out = kubernetes_validate(version, files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate {version:?} failed:\n{stdout}{stderr}"
    );
    assert!(
        !stdout.contains("WARN") && !stderr.contains("WARN"),
        "kubernetes-validate warned:\n{stdout}{stderr}"
    );
    for f in files {
        let passed = stdout
            .lines()
            .filter(|l| {
                l.starts_with("INFO") && l.contains(&*f.to_string_lossy()) && l.contains(" passed ")
            })
            .count();
        assert!(
            passed >= 1,
            "{} was not reported as passed:\n{stdout}",
            f.display()
        );
    }
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let files = manifests();
    assert!(files.len() >= 8, "expected the manifests, found {files:?}");
    // The version bundled as default, and 1.30, the first with securityContext.appArmorProfile.
    assert_validates(&[], &files);
    assert_validates(&["-k", "1.30.0"], &files);
}

#[test]
fn schema_validation_rejects_an_unknown_field() {
    // Proves --strict is in force: the same Deployment with one misspelt field fails.
    let dir = tempfile::tempdir().unwrap();
    let text = read(&k8s_dir().join("full/deployment-full.yaml")).replace(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    let bad = dir.path().join("bad.yaml");
    fs::write(&bad, text).unwrap();
    let out = kubernetes_validate(&[], &[bad]);
    assert!(!out.status.success(), "a misspelt field passed validation");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("terminationGracePeriodSecond"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The optional Ingress: TLS for the host it routes, to the Service's own port, with the
/// proxy settings a streamed job and the server's body limit need; and it builds into an
/// overlay as a component.
#[test]
fn the_optional_ingress_terminates_tls_for_the_service() {
    let ingress = manifest("ingress/ingress.yaml");
    let service = manifest("base/service.yaml");
    let rule = &at(&ingress, &["spec", "rules"])[0];
    let host = str_at(rule, &["host"]);
    let tls = &at(&ingress, &["spec", "tls"])[0];
    assert_eq!(strings(at(tls, &["hosts"])), vec![host.to_string()]);
    assert!(!str_at(tls, &["secretName"]).is_empty());
    let backend = at(&at(rule, &["http", "paths"])[0], &["backend", "service"]);
    assert_eq!(
        str_at(backend, &["name"]),
        str_at(&service, &["metadata", "name"])
    );
    let port = str_at(backend, &["port", "name"]);
    assert!(
        at(&service, &["spec", "ports"])
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| str_at(p, &["name"]) == port),
        "the Service has no port named {port}"
    );
    let notes = at(&ingress, &["metadata", "annotations"]);
    assert_eq!(
        str_at(notes, &["nginx.ingress.kubernetes.io/proxy-buffering"]),
        "off"
    );
    assert_eq!(
        str_at(notes, &["nginx.ingress.kubernetes.io/proxy-body-size"]),
        "16m"
    );
    let component = manifest("ingress/kustomization.yaml");
    assert_eq!(str_at(&component, &["kind"]), "Component");
    assert_eq!(strings(at(&component, &["resources"])), ["ingress.yaml"]);

    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        eprintln!("kubectl not installed: the component is checked by its resource list only");
        return;
    }
    // An overlay with the component, as the README says to write it.
    let dir = tempfile::tempdir().unwrap();
    // kustomize takes relative paths only: up to / from the overlay, then down.
    let up = "../".repeat(dir.path().components().count() - 1);
    let rel = |name: &str| {
        format!(
            "{up}{}",
            k8s_dir()
                .join(name)
                .display()
                .to_string()
                .trim_start_matches('/')
        )
    };
    fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "resources: [{}]\ncomponents: [{}]\n",
            rel("full"),
            rel("ingress")
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("kind: Ingress"), "{text}");
    let built = dir.path().join("with-ingress.yaml");
    fs::write(&built, text).unwrap();
    assert_validates(&[], &[built]);
}

#[test]
fn kustomizations_cover_every_manifest() {
    let list = |dir: &str| -> Vec<String> {
        strings(at(
            &manifest(&format!("{dir}/kustomization.yaml")),
            &["resources"],
        ))
    };
    let base: BTreeSet<String> = list("base").into_iter().collect();
    let on_disk: BTreeSet<String> = fs::read_dir(k8s_dir().join("base"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        base, on_disk,
        "base/kustomization.yaml must list every base manifest"
    );
    for (overlay, deployment) in [
        ("full", "deployment-full.yaml"),
        ("fallback", "deployment-fallback.yaml"),
    ] {
        assert_eq!(
            list(overlay),
            vec!["../base".to_string(), deployment.to_string()]
        );
        assert!(k8s_dir().join(overlay).join(deployment).is_file());
    }

    // Where kubectl is installed, build each overlay and validate the result as one stream.
    let Ok(v) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        eprintln!("kubectl not installed: overlays checked by their resource lists only");
        return;
    };
    assert!(v.status.success());
    let dir = tempfile::tempdir().unwrap();
    let mut built = Vec::new();
    for overlay in ["full", "fallback"] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(k8s_dir().join(overlay))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let kinds: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "ConfigMap",
                "Deployment",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "Secret",
                "Service"
            ]),
            "{overlay}"
        );
        let path = dir.path().join(format!("{overlay}.yaml"));
        fs::write(&path, text).unwrap();
        built.push(path);
    }
    let out = kubernetes_validate(&[], &built);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches(" passed ")
            .count(),
        12
    );
}

fn container(deployment: &Value) -> &Value {
    let containers = at(deployment, &["spec", "template", "spec", "containers"])
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    at(c, &["env"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (str_at(e, &["name"]).to_string(), e.clone()))
        .collect()
}

/// The numbers the drain time depends on, from the ConfigMap, with the Deployment's
/// environment overriding them as the server does.
fn effective(config: &Value, env: &BTreeMap<String, Value>, key: &str, var: &str) -> u64 {
    match env.get(var) {
        Some(e) => str_at(e, &["value"]).parse().unwrap(),
        None => u64_at(config, &[key]),
    }
}

fn quantity_bytes(q: &str) -> u64 {
    for (suffix, mult) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * mult;
        }
    }
    q.parse().unwrap()
}

#[test]
fn deployments_agree_with_service_hpa_pdb_and_config() {
    let config = configmap_config();
    let cm = manifest("base/configmap.yaml");
    let secret = manifest("base/secret.yaml");
    let service = manifest("base/service.yaml");
    let hpa = manifest("base/hpa.yaml");
    let pdb = manifest("base/pdb.yaml");
    assert_eq!(u64_at(&config, &["app", "port"]), PORT);

    for file in [
        "full/deployment-full.yaml",
        "fallback/deployment-fallback.yaml",
    ] {
        let d = manifest(file);
        let name = str_at(&d, &["metadata", "name"]);
        let pod_labels = label_map(at(&d, &["spec", "template", "metadata", "labels"]));
        assert!(
            selects(
                &label_map(at(&d, &["spec", "selector", "matchLabels"])),
                &pod_labels
            ),
            "{file}: selector"
        );
        assert!(
            selects(&label_map(at(&service, &["spec", "selector"])), &pod_labels),
            "{file}: Service selector"
        );
        assert!(
            selects(
                &label_map(at(&pdb, &["spec", "selector", "matchLabels"])),
                &pod_labels
            ),
            "{file}: PDB selector"
        );
        assert_eq!(
            str_at(&hpa, &["spec", "scaleTargetRef", "kind"]),
            "Deployment"
        );
        assert_eq!(
            str_at(&hpa, &["spec", "scaleTargetRef", "apiVersion"]),
            "apps/v1"
        );
        assert_eq!(
            str_at(&hpa, &["spec", "scaleTargetRef", "name"]),
            name,
            "{file}: HPA target"
        );
        assert!(
            u64_at(&hpa, &["spec", "minReplicas"]) >= 2,
            "one pod alone cannot satisfy the PDB while draining"
        );
        assert!(
            at(&d, &["spec"]).get("replicas").is_none(),
            "{file}: replicas fights the HPA"
        );

        let pod = at(&d, &["spec", "template", "spec"]);
        // A Service named `sandbox` would inject SANDBOX_PORT=tcp://... into the pod.
        assert_eq!(
            pod.get("enableServiceLinks").and_then(Value::as_bool),
            Some(false),
            "{file}"
        );
        let c = container(&d);
        assert_eq!(u64_at(c, &["ports", "0", "containerPort"]), PORT);
        assert_eq!(u64_at(&service, &["spec", "ports", "0", "port"]), PORT);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                str_at(c, &[probe, "httpGet", "path"]),
                "/health",
                "{file}: {probe}"
            );
            assert_eq!(
                u64_at(c, &[probe, "httpGet", "port"]),
                PORT,
                "{file}: {probe}"
            );
        }

        // Graceful shutdown: preStop, then every run in flight or queued drains.
        let env = env_of(c);
        let timeout = effective(&config, &env, "worker_timeout", "WORKER_TIMEOUT");
        let workers = effective(&config, &env, "max_workers", "MAX_WORKERS");
        let requests = effective(&config, &env, "max_requests", "MAX_REQUESTS");
        let pre_stop = strings(at(c, &["lifecycle", "preStop", "exec", "command"]));
        assert_eq!(pre_stop[0], "sleep");
        let pre_stop: u64 = pre_stop[1].parse().unwrap();
        let grace = u64_at(pod, &["terminationGracePeriodSeconds"]);
        let drain = pre_stop + requests.div_ceil(workers) * timeout;
        assert!(
            grace > timeout,
            "{file}: grace {grace}s <= worker_timeout {timeout}s"
        );
        assert!(
            grace > drain,
            "{file}: grace {grace}s < preStop + queued runs = {drain}s"
        );

        // Resources: a CPU request for the HPA; room for max_workers runs at their limit.
        assert!(
            at(c, &["resources", "requests", "cpu"]).as_str().is_some(),
            "{file}: HPA needs a CPU request"
        );
        let mem_limit = quantity_bytes(str_at(c, &["resources", "limits", "memory"]));
        let per_run = effective(&config, &env, "memory_limit_mb", "MEMORY_LIMIT_MB") << 20;
        assert!(
            mem_limit > workers * per_run,
            "{file}: memory limit below max_workers x memory_limit_mb"
        );

        // The config reaches the path the entrypoint reads; the key comes from the Secret.
        assert_eq!(
            strings(at(c, &["args"])),
            ["serve", "--config", "/etc/sandbox/config.yaml"]
        );
        let mounts = at(c, &["volumeMounts"]).as_sequence().unwrap();
        let mount_of = |path: &str| {
            let m = mounts
                .iter()
                .find(|m| str_at(m, &["mountPath"]) == path)
                .unwrap_or_else(|| panic!("{file}: nothing mounted at {path}"));
            let vname = str_at(m, &["name"]);
            at(pod, &["volumes"])
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| str_at(v, &["name"]) == vname)
                .unwrap()
                .clone()
        };
        assert_eq!(
            str_at(&mount_of("/etc/sandbox"), &["configMap", "name"]),
            str_at(&cm, &["metadata", "name"])
        );
        assert!(
            mount_of(str_at(&config, &["state_dir"]))
                .get("emptyDir")
                .is_some()
        );
        for key in ["dependencies_path", "nodejs_dependencies_path"] {
            let deps = str_at(&config, &[key]);
            let deps_key = deps
                .strip_prefix("/etc/sandbox/")
                .unwrap_or_else(|| panic!("{key} under the ConfigMap mount"));
            let data = at(&cm, &["data"])
                .get(deps_key)
                .unwrap_or_else(|| panic!("ConfigMap lacks {deps_key}"));
            if key == "nodejs_dependencies_path" {
                let manifest: serde_json::Value =
                    serde_json::from_str(data.as_str().expect("text"))
                        .expect("package.json is JSON");
                assert!(manifest["dependencies"].is_object(), "{manifest}");
            }
        }
        let key_ref = at(&env["API_KEY"], &["valueFrom", "secretKeyRef"]);
        assert_eq!(
            str_at(key_ref, &["name"]),
            str_at(&secret, &["metadata", "name"])
        );
        assert!(
            at(&secret, &["stringData"])
                .get(str_at(key_ref, &["key"]))
                .is_some()
        );
    }
}

#[test]
fn isolation_levels_differ_only_in_their_security_context() {
    let full = manifest("full/deployment-full.yaml");
    let fallback = manifest("fallback/deployment-fallback.yaml");

    let sc = at(container(&full), &["securityContext"]);
    assert_eq!(sc.get("privileged").and_then(Value::as_bool), Some(true));
    assert_eq!(u64_at(sc, &["runAsUser"]), 0);
    assert_eq!(str_at(sc, &["seccompProfile", "type"]), "Unconfined");
    assert_eq!(str_at(sc, &["appArmorProfile", "type"]), "Unconfined");

    let sc = at(container(&fallback), &["securityContext"]);
    assert_ne!(sc.get("privileged").and_then(Value::as_bool), Some(true));
    assert_eq!(u64_at(sc, &["runAsUser"]), 0);
    assert_eq!(
        sc.get("allowPrivilegeEscalation").and_then(Value::as_bool),
        Some(false)
    );
    assert_eq!(str_at(sc, &["seccompProfile", "type"]), "RuntimeDefault");
    assert_eq!(strings(at(sc, &["capabilities", "drop"])), ["ALL"]);
    let added: BTreeSet<String> = strings(at(sc, &["capabilities", "add"]))
        .into_iter()
        .collect();
    let needed: BTreeSet<String> = [
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "KILL",
        "MKNOD",
        "SETGID",
        "SETUID",
        "SYS_CHROOT",
    ]
    .map(String::from)
    .into();
    assert_eq!(added, needed, "fallback capabilities");
    // All within the `baseline` Pod Security level's allowed additions.
    let baseline = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    assert!(added.iter().all(|c| baseline.contains(&c.as_str())));
    assert_eq!(
        str_at(
            &env_of(container(&fallback))["SANDBOX_ISOLATION"],
            &["value"]
        ),
        "chroot"
    );
    // Without CAP_NET_ADMIN, networked runs are refused unless explicitly shared.
    assert_eq!(
        str_at(
            &env_of(container(&fallback))["NETWORK_ISOLATION"],
            &["value"]
        ),
        "shared"
    );
    assert!(!env_of(container(&full)).contains_key("NETWORK_ISOLATION"));

    // Everything else is the same, so the two files cannot drift apart.
    let strip = |d: &Value| {
        let mut d = d.clone();
        let c = &mut d["spec"]["template"]["spec"]["containers"][0];
        c.as_mapping_mut().unwrap().remove("securityContext");
        let env = c["env"].as_sequence_mut().unwrap();
        env.retain(|e| {
            !matches!(
                e["name"].as_str(),
                Some("SANDBOX_ISOLATION" | "NETWORK_ISOLATION")
            )
        });
        d
    };
    assert_eq!(strip(&full), strip(&fallback));
}

#[test]
fn configmap_config_is_accepted_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let cm = manifest("base/configmap.yaml");
    fs::write(&path, str_at(&cm, &["data", "config.yaml"])).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandbox"));
    cmd.arg("doctor").arg("--config").arg(&path).arg("--json");
    for var in [
        "API_KEY",
        "SANDBOX_PORT",
        "WORKER_TIMEOUT",
        "LOG_FORMAT",
        "METRICS_AUTH",
        "LOG_PATH",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let checks = report["checks"].as_array().unwrap();
    let config = checks
        .iter()
        .find(|c| c["name"] == "config")
        .expect("no config check");
    assert_eq!(config["status"], "ok", "{config}");
    assert!(
        !checks.iter().any(|c| c["name"] == "config keys"),
        "the ConfigMap has keys the server does not know: {checks:?}"
    );
}

// ---- Docker Compose ----

fn compose() -> Value {
    yaml(&root().join("docker/compose.yaml"))
}

/// `${VAR:-default}` -> default; anything else as it is.
fn compose_default(s: &str) -> &str {
    s.strip_prefix("${")
        .and_then(|s| s.strip_suffix('}'))
        .and_then(|s| s.split_once(":-"))
        .map_or(s, |(_, d)| d)
}

/// `90`, `90s`, `1m30s` -> 90 (systemd and Compose both read a bare number as seconds).
fn seconds(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| {
        humantime::parse_duration(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .as_secs()
    })
}

#[test]
fn compose_replaces_difys_sandbox_service() {
    let c = compose();
    let services = at(&c, &["services"]);
    for name in ["sandbox", "sandbox-fallback"] {
        let s = at(services, &[name]);
        let env = at(s, &["environment"]);
        // Dify's variable names, and its defaults.
        assert_eq!(
            str_at(env, &["API_KEY"]),
            "${SANDBOX_API_KEY:-dify-sandbox}"
        );
        for var in [
            "WORKER_TIMEOUT",
            "ENABLE_NETWORK",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "SANDBOX_PORT",
            "PIP_MIRROR_URL",
            "NPM_MIRROR_URL",
        ] {
            assert!(env.get(var).is_some(), "{name}: {var} missing");
        }
        assert_eq!(compose_default(str_at(env, &["SANDBOX_PORT"])), "8194");
        assert_eq!(
            str_at(env, &["DEPENDENCIES_PATH"]),
            "/dependencies/python-requirements.txt"
        );
        assert_eq!(
            str_at(env, &["NODEJS_DEPENDENCIES_PATH"]),
            "/dependencies/package.json"
        );
        let volumes = strings(at(s, &["volumes"]));
        assert!(
            volumes.contains(&"./volumes/sandbox/dependencies:/dependencies".to_string()),
            "{name}: {volumes:?}"
        );
        let ports = strings(at(s, &["ports"]));
        assert_eq!(ports, ["${SANDBOX_PORT:-8194}:${SANDBOX_PORT:-8194}"]);

        let test = strings(at(s, &["healthcheck", "test"]));
        assert_eq!(test[0], "CMD");
        assert!(
            test.iter().any(|a| a.contains("/health")),
            "{name}: {test:?}"
        );

        let timeout: u64 = compose_default(str_at(env, &["WORKER_TIMEOUT"]))
            .parse()
            .unwrap();
        assert_eq!(str_at(s, &["stop_signal"]), "SIGTERM");
        assert!(
            seconds(str_at(s, &["stop_grace_period"])) > timeout,
            "{name}: stop_grace_period"
        );
    }

    let full = at(services, &["sandbox"]);
    assert_eq!(
        strings(at(full, &["cap_add"])),
        ["SYS_ADMIN", "SYS_RAWIO", "NET_ADMIN"]
    );
    let opts: BTreeSet<String> = strings(at(full, &["security_opt"])).into_iter().collect();
    assert_eq!(
        opts,
        BTreeSet::from(["seccomp=unconfined".into(), "apparmor=unconfined".into()])
    );
    assert_eq!(str_at(full, &["cgroup"]), "host");
    // Runs' own networks are forwarded through the container.
    assert_eq!(
        at(full, &["sysctls", "net.ipv4.ip_forward"]).as_u64(),
        Some(1)
    );
    assert!(
        strings(at(full, &["volumes"])).contains(&"/sys/fs/cgroup:/sys/fs/cgroup:rw".to_string())
    );

    let fallback = at(services, &["sandbox-fallback"]);
    for key in ["cap_add", "cap_drop", "privileged", "cgroup"] {
        assert!(
            fallback.get(key).is_none(),
            "the fallback must keep Docker's defaults: {key}"
        );
    }
    assert_eq!(strings(at(fallback, &["profiles"])), ["fallback"]);
    // The same environment, but for runs sharing the container's network, which the
    // fallback cannot do otherwise.
    let mut shared = at(full, &["environment"]).clone();
    shared
        .as_mapping_mut()
        .unwrap()
        .insert("NETWORK_ISOLATION".into(), "shared".into());
    assert_eq!(at(fallback, &["environment"]), &shared);
    assert!(full.get("sysctls").is_some() && fallback.get("sysctls").is_none());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the server when the test ends, whichever way it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn compose_healthcheck_command_reaches_a_real_server() {
    // The healthcheck is run by Docker inside the container; run the same command here
    // against a real `sandbox serve`, with a proxy variable that would break it if the
    // command did not bypass proxies (Dify sets HTTP_PROXY to its ssrf_proxy).
    let c = compose();
    let test = strings(at(&c, &["services", "sandbox", "healthcheck", "test"]));
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .args(["serve"])
        .current_dir(state.path())
        .env("SANDBOX_PORT", port.to_string())
        .env("SANDBOX_STATE_DIR", state.path().join("state"))
        .env("DEPENDENCIES_PATH", state.path().join("none.txt"))
        .env("WARM_WORKERS", "0")
        .env("LOG_PATH", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            drop(server);
            let mut log = String::new();
            let _ = { stderr }.read_to_string(&mut log);
            panic!("sandbox serve did not listen on {port}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = |port: u16| {
        Command::new(&test[1])
            .args(&test[2..])
            .env("SANDBOX_PORT", port.to_string())
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .output()
            .unwrap()
    };
    let ok = run(port);
    assert!(
        ok.status.success(),
        "healthcheck failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    drop(server);
    let down = run(port);
    assert!(
        !down.status.success(),
        "the healthcheck passes with no server"
    );
}

/// `docker compose` (v2) or a v2 `docker-compose`, if one is installed.
fn compose_cli() -> Option<Vec<&'static str>> {
    for cmd in [vec!["docker", "compose"], vec!["docker-compose"]] {
        let Ok(out) = Command::new(cmd[0]).args(&cmd[1..]).arg("version").output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // Compose v1 does not know `cgroup:`; only v2 reads this file.
        if out.status.success() && !text.contains("version 1.") {
            return Some(cmd);
        }
    }
    None
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let Some(cmd) = compose_cli() else {
        eprintln!("no Docker Compose v2 here: docker/compose.yaml checked by its structure only");
        return;
    };
    let file = root().join("docker/compose.yaml");
    for profile in ["", "fallback"] {
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..]).arg("-f").arg(&file);
        if !profile.is_empty() {
            c.args(["--profile", profile]);
        }
        let out = c.args(["config", "-q"]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} config ({profile}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- systemd ----

fn unit_text() -> String {
    read(&root().join("deploy/systemd/sandbox.service"))
}

/// key -> values of the unit, comments and blank lines skipped.
fn unit_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        map.entry(k.trim().into())
            .or_default()
            .push(v.trim().into());
    }
    map
}

#[test]
fn systemd_unit_runs_as_root_delegates_cgroups_and_drains() {
    let keys = unit_keys(&unit_text());
    let one = |k: &str| -> &str {
        let v = keys.get(k).unwrap_or_else(|| panic!("{k}= missing"));
        assert_eq!(v.len(), 1, "{k}= given more than once");
        &v[0]
    };
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/sandbox serve --config /etc/sandbox/config.yaml"
    );
    assert_eq!(one("User"), "root");
    assert_eq!(one("Delegate"), "yes");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("StateDirectory"), "sandbox");

    // Longer than the worst drain of the config the install steps copy (conf/config.yaml).
    let config = yaml(&root().join("conf/config.yaml"));
    let timeout = u64_at(&config, &["worker_timeout"]);
    let drain =
        u64_at(&config, &["max_requests"]).div_ceil(u64_at(&config, &["max_workers"])) * timeout;
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop > drain,
        "TimeoutStopSec={stop}s, a full queue drains in {drain}s"
    );

    // Options that would take from the jail what it is built with.
    for k in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "ReadOnlyPaths",
        "TemporaryFileSystem",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictNamespaces",
        "DynamicUser",
        "PrivateUsers",
        "MountFlags",
    ] {
        assert!(
            !keys.contains_key(k),
            "{k}= breaks namespaces, mounts or cgroups of the runs"
        );
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: unit checked by its keys only");
        return;
    }
    // verify insists that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("sandbox.service");
    let text = unit_text().replace("/usr/local/bin/sandbox", env!("CARGO_BIN_EXE_sandbox"));
    fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and unparsable values are only warnings, printed with the unit's path.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sandbox.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warned:\n{}",
        about_unit.join("\n")
    );
}
