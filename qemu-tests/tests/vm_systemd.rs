//! Issue 5, scenario 7: the real-init test. A debootstrap'd Debian 12 image with systemd and
//! OpenVPN gets the agent, its config, the key and the enabled units baked in by idhal-image
//! (qcow2, not mounted on the host); booted, its systemd runs idhal-bootstrap.service, which
//! verifies the manifest and runs scriptlet 000: enrollment with a fw_cfg token, then the
//! tunnel in a unit of its own; the node becomes Alive in the real OAR and stays Alive after the
//! agent's unit has finished (a daemon left inside it would be killed by systemd). A test unit
//! started beside the agent's runs `idhal-bootstrap status --wait`, which says when the boot's
//! work is done.
use idhal_image_build::bake;
use idhal_qemu_tests::cluster::Cluster;
use idhal_qemu_tests::enroll;
use idhal_qemu_tests::{bins, host, rootfs, Env, EnvOptions, Limits};
use std::time::Duration;

/// A test unit baked beside the agent's: started with it (no ordering), so usually before its
/// run, it waits for the boot's work with the agent's own `status --wait` and prints the
/// verdict on the console, one line: `IDHAL-WAIT exit=N {json}`. `$$` is systemd's `$`.
const WAIT_UNIT: &str = "[Unit]\n\
Description=idhal test: wait for the first boot's work\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/bin/sh -c 'o=$$(/usr/local/sbin/idhal-bootstrap status --wait --timeout 120s --json); \
echo \"IDHAL-WAIT exit=$$? $$o\" > /dev/console'\n";
const WAIT_LINE: &str = "IDHAL-WAIT exit=";

#[test]
fn vm_debootstrap_systemd_image_with_the_agent_baked_in_enrolls_and_becomes_alive() {
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let Some(mut env) = Env::with(
        "systemd",
        EnvOptions {
            server_toml: cluster.server_toml(),
            pool: Some("10.134.7.0/24".into()),
            vpn: true,
            ..EnvOptions::default()
        },
    ) else {
        return;
    };
    let cache = bins::target_dir().join("idhal-image-cache");
    let Some(raw) = host::or_skip(rootfs::debian_systemd_image(&cache), "debootstrap image") else {
        return;
    };
    let image = env.path().join("debian.qcow2");
    let out = std::process::Command::new("/usr/bin/qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = std::time::Instant::now();
    let mut overlay = bake::bake_overlay(
        &std::fs::read(&env.shared.agent).unwrap(),
        &std::fs::read(env.project.pubkey()).unwrap(),
        &bake::baked_config(&format!(
            "http://{}:{}/",
            idhal_qemu_tests::GUEST_HOST_IP,
            idhal_qemu_tests::GUEST_SERVE_PORT
        )),
    );
    let sys = "bake/etc/systemd/system";
    overlay.file(
        &format!("{sys}/idhal-test-wait.service"),
        0o644,
        WAIT_UNIT.as_bytes().to_vec(),
    );
    overlay.symlink(
        &format!("{sys}/multi-user.target.wants/idhal-test-wait.service"),
        "/etc/systemd/system/idhal-test-wait.service",
    );
    bake::bake(
        &env.shared.base,
        &image,
        bake::ImageFormat::Qcow2,
        &overlay,
        env.path(),
        Limits::BOOT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "FIGURE bake into qcow2 (helper VM boot + copy): {:.1} s",
        t.elapsed().as_secs_f64()
    );

    env.project.scriptlet("000-enroll", enroll::SCRIPTLET);
    env.project.sign(&[]);
    let (_, token) = env.token("vnode", &[]);
    let mut spec = env.spec();
    spec.fw_cfg
        .push((enroll::FW_CFG_TOKEN.into(), token.to_path_buf()));
    spec.disk = image;
    spec.disk_format = "qcow2".into();
    spec.memory_mib = 512;
    // The helper initramfs loads virtio and brings eth0 up, then hands over to systemd; the
    // server URL comes from the baked config, not the command line.
    spec.cmdline = vec!["idhal.mode=root".into(), "systemd.show_status=1".into()];
    let mut vm = env.boot_spec(spec);
    // The root is on partition 1, as in Debian's cloud images.
    vm.wait_for("IDHAL-EVENT image=/dev/vda1", Limits::BOOT);
    vm.wait_for("IDHAL-EVENT switch-root", Limits::BOOT);
    // The agent's own verdict on the boot's work (the scriptlet gives up on the tunnel after
    // 45 s of uptime, with OpenVPN's log, and fails; the wait's own deadline is 120 s).
    let verdict = vm.wait_for(WAIT_LINE, Limits::BOOT + Limits::RUN);
    let done_at = vm.started.elapsed();
    let (code, json) = verdict[WAIT_LINE.len()..]
        .split_once(' ')
        .unwrap_or_else(|| panic!("no JSON in {verdict:?}"));
    let wait: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("status --wait is not JSON ({e}): {json}"));
    assert!(
        code == "0" && wait["wait"]["result"] == "done",
        "status --wait exited {code}: {wait}\nthe guest reported:\n{}\nOpenVPN server log \
         (tail):\n{}",
        vm.log().digest(80),
        idhal_test_support::tail(&env.vpn().log)
    );
    let row = &wait["scriptlets"][0];
    assert!(
        row["id"] == "000-enroll" && row["state"] == "done",
        "{wait}"
    );
    assert_eq!(wait["last_run"]["exit"], 0, "{wait}");
    // Done means the scriptlet's lines are on the console already.
    let printed = |prefix: &str| {
        vm.log()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("done, but no {prefix:?} line: {wait}"))
    };
    let (enrolled, up) = (
        printed("IDHAL-TEST enrolled "),
        printed("IDHAL-TEST tunnel-up "),
    );
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    let (node, address) = (field(&enrolled, "node="), field(&enrolled, "addr="));
    assert_eq!(wait["enrollment"]["node"], node.as_str(), "{wait}");
    assert_eq!(wait["enrollment"]["address"], address.as_str(), "{wait}");
    assert_eq!(
        field(&up, "addr="),
        address,
        "tun0 has the enrolled address"
    );
    let host = Cluster::host(&address);
    let resource = cluster.wait_state(&host, "Alive", Limits::ALIVE);
    let alive = vm.started.elapsed();
    assert_eq!(resource["idhalcn"], node.as_str(), "{resource}");
    assert_eq!(resource["ip"], address.as_str(), "{resource}");
    vm.wait_line("the agent's unit finishing", Limits::RUN, |l| {
        l.contains("Finished") && l.contains("idhal-bootstrap.s")
    });
    let finished = vm.started.elapsed();
    // The tunnel outlives the oneshot unit that started it. A daemon left in the unit is killed
    // as the unit ends, and OpenVPN drops a client whose TCP connection closed at once: so the
    // server's next status snapshot (written every 10 s) taken strictly after the unit finished
    // must still list the node, and no disconnect hook may have run.
    let finished_unix = idhal_test_support::now();
    let status = &env.ca.status_file;
    let snapshot = idhal_qemu_tests::wait_until(
        "an OpenVPN status snapshot taken after the unit finished",
        Duration::from_secs(40),
        || {
            let text = std::fs::read_to_string(status).ok()?;
            let at: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("TIME,"))?
                .rsplit(',')
                .next()?
                .parse()
                .ok()?;
            // A whole snapshot (OpenVPN rewrites the file in place; v2 ends with END).
            (at > finished_unix && text.trim_end().ends_with("END")).then_some(text)
        },
    );
    assert!(
        snapshot
            .lines()
            .any(|l| l.starts_with(&format!("CLIENT_LIST,{node},"))),
        "the tunnel died with idhal-bootstrap.service: {snapshot}"
    );
    let disconnect = format!("idhal hook client-disconnect: {node}:");
    assert!(
        env.vpn()
            .seen(vm.started, |l| l.contains(&disconnect))
            .is_none(),
        "the tunnel died with idhal-bootstrap.service"
    );
    assert_eq!(cluster.resources(&host)[0]["state"], "Alive");
    eprintln!(
        "FIGURE systemd-boot1: QEMU start to Alive in OAR {:.2} s wall ({node} {address} {host}), \
         status --wait done {:.2} s (waited {} ms in the guest), idhal-bootstrap.service \
         finished {:.2} s",
        alive.as_secs_f64(),
        done_at.as_secs_f64(),
        wait["wait"]["waited_ms"],
        finished.as_secs_f64()
    );
}
