//! Issue 5, scenario 7: the real-init smoke test. A debootstrap'd Debian 12 image with systemd
//! gets the agent, its config, the key and the enabled units baked in by idhal-image (qcow2, not
//! mounted on the host); booted, its systemd runs idhal-bootstrap.service, which verifies the
//! manifest and runs the scriptlet.
use idhal_image_build::bake;
use idhal_qemu_tests::{bins, env_or_skip, host, rootfs, Limits};

#[test]
fn vm_debootstrap_systemd_image_with_the_agent_baked_in_runs_the_unit() {
    let mut env = env_or_skip!("systemd");
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

    env.project.scriptlet(
        "000-smoke",
        "#!/bin/sh\necho \"IDHAL-TEST smoke-ran serial=$IDHAL_SERIAL\" > /dev/console\n",
    );
    env.project.sign(&[]);
    let mut spec = env.spec();
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
    vm.wait_for("IDHAL-TEST smoke-ran serial=1", Limits::BOOT);
    let ran = vm.started.elapsed();
    vm.next_line("the unit finishing", Limits::RUN, |l| {
        l.contains("Finished") && l.contains("idhal-bootstrap.s")
    });
    eprintln!(
        "FIGURE systemd-boot1: QEMU start to scriptlet run by idhal-bootstrap.service {:.2} s wall, unit finished {:.2} s",
        ran.as_secs_f64(),
        vm.started.elapsed().as_secs_f64()
    );
}
