//! Issue 5, scenario 7: the real-init test. A debootstrap'd Debian 12 image with systemd and
//! OpenVPN gets the agent, its config, the key and the enabled units baked in by idhal-image
//! (qcow2, not mounted on the host); booted, its systemd runs idhal-bootstrap.service, which
//! verifies the manifest and runs scriptlet 000: enrollment with a fw_cfg token, then the
//! tunnel in a unit of its own; the node becomes Alive in the real OAR and stays Alive after the
//! agent's unit has finished (a daemon left inside it would be killed by systemd).
use idhal_image_build::bake;
use idhal_qemu_tests::cluster::Cluster;
use idhal_qemu_tests::enroll;
use idhal_qemu_tests::{bins, host, rootfs, Env, EnvOptions, Limits};
use std::time::Duration;

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
    let overlay = bake::bake_overlay(
        &std::fs::read(&env.shared.agent).unwrap(),
        &std::fs::read(env.project.pubkey()).unwrap(),
        &bake::baked_config(&format!(
            "http://{}:{}/",
            idhal_qemu_tests::GUEST_HOST_IP,
            idhal_qemu_tests::GUEST_SERVE_PORT
        )),
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
    let enrolled = vm.wait_for("IDHAL-TEST enrolled ", Limits::BOOT);
    // The scriptlet gives up after 45 s of uptime and says so, with OpenVPN's log.
    let up = vm.wait_line(
        "the tunnel's address (or the scriptlet giving up)",
        Limits::RUN,
        |l| l.starts_with("IDHAL-TEST tunnel-up ") || l.starts_with("IDHAL-TEST tunnel-failed"),
    );
    assert!(
        up.starts_with("IDHAL-TEST tunnel-up "),
        "no tunnel: {up}; the guest reported:\n{}\nOpenVPN server log (tail):\n{}",
        vm.log().digest(80),
        idhal_test_support::tail(&env.vpn().log)
    );
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    let (node, address) = (field(&enrolled, "node="), field(&enrolled, "addr="));
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
         idhal-bootstrap.service finished {:.2} s",
        alive.as_secs_f64(),
        finished.as_secs_f64()
    );
}
