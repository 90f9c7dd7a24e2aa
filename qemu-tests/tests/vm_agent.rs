//! VM tests of the agent on a real vnode (issue 5, scenarios 2 (agent part), 3 and 6): first boot
//! and reboot, refusals, a power cut during a scriptlet. Each test boots its own QEMU guest(s);
//! names start with `vm_` so they can be selected or skipped as a group.
use idhal_qemu_tests::env_or_skip;
use std::time::Duration;

/// `status --wait`'s deadline in the guest, after a run has ended: an answer takes two looks.
const WAIT: Duration = Duration::from_secs(30);

/// A scriptlet that announces itself on the console, so the harness can count runs per boot.
fn marker(text: &str, freq: &str) -> String {
    format!("#!/bin/sh\n# idhal: frequency={freq}\necho \"IDHAL-TEST {text}\" > /dev/console\n")
}

#[test]
fn vm_first_boot_pins_verifies_and_runs_once_then_reboot_runs_no_once_scriptlet_again() {
    let mut env = env_or_skip!("firstboot");
    env.project
        .scriptlet("000-once", &marker("once-ran", "once"));
    env.project
        .scriptlet("010-boot", &marker("boot-ran", "boot"));
    assert_eq!(env.project.sign(&[]), 1);

    let mut vm = env.boot();
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(
        r.status["pinned_key"]["fingerprint"],
        env.project.fingerprint.as_str()
    );
    assert_eq!(r.status["serial"], 1);
    assert_eq!(r.scriptlet_state("000-once").as_deref(), Some("done"));
    assert_eq!(r.scriptlet_state("010-boot").as_deref(), Some("done"));
    assert_eq!(
        (
            r.count("IDHAL-TEST once-ran"),
            r.count("IDHAL-TEST boot-ran")
        ),
        (1, 1)
    );
    // A second run in the same boot: nothing is due.
    let again = vm.run_again();
    assert_eq!(again.exit, 0);
    assert_eq!(
        (again.count("once-ran"), again.count("boot-ran")),
        (0, 0),
        "{:?}",
        again.lines
    );
    vm.poweroff();

    // Read back from the host, without mounting: the pinned key and the durable marker.
    let pinned = env
        .state_file("server.pub")
        .expect("pinned key on the disk");
    assert_eq!(
        pinned,
        std::fs::read_to_string(env.project.pubkey()).unwrap()
    );
    assert!(env.state_file("scriptlets/000-once/done").is_some());

    // Reboot on the same disk: a new boot id, so only the `boot` scriptlet runs.
    let mut vm = env.boot();
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(
        (r.count("once-ran"), r.count("boot-ran")),
        (0, 1),
        "{:?}",
        r.lines
    );
    assert_eq!(r.scriptlet_state("000-once").as_deref(), Some("done"));
    vm.poweroff();
}

#[test]
fn vm_tampered_or_rolled_back_manifest_is_refused_and_nothing_runs() {
    let mut env = env_or_skip!("refusals");
    env.project
        .scriptlet("000-once", &marker("once-ran", "once"));
    env.project
        .scriptlet("090-always", &marker("always-ran", "always"));
    assert_eq!(env.project.sign(&[]), 1);
    let v1_sig = std::fs::read(env.project.pubdir.join("manifest.minisig")).unwrap();

    let mut vm = env.boot();
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(r.count("always-ran"), 1);

    // Serial 2 adds a scriptlet, then one byte of the served manifest changes.
    env.project.scriptlet("050-new", &marker("new-ran", "once"));
    assert_eq!(env.project.sign(&[]), 2);
    let m2 = env.project.pubdir.join("manifests/2");
    let honest = std::fs::read_to_string(&m2).unwrap();
    let tampered = honest.replace("new-ran", "NEW-RAN");
    std::fs::write(&m2, tampered).unwrap();
    let r = vm.run_again();
    assert_eq!(r.exit, 5, "{:?}", r.lines);
    assert!(
        r.last_message().contains("tampered"),
        "{}",
        r.last_message()
    );
    assert_eq!(
        (r.count("-RAN"), r.count("new-ran"), r.count("always-ran")),
        (0, 0, 0),
        "{:?}",
        r.lines
    );
    assert_eq!(r.status["serial"], 1, "a refusal changes no state");
    assert_eq!(r.scriptlet_state("050-new"), None);
    // What a tool waiting on this node learns: refused, in this boot.
    let refused = |vm: &mut idhal_qemu_tests::Vm| {
        let (code, json) = vm.wait_status(WAIT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (code, &json["wait"]["result"]),
            (5, &"refused".into()),
            "{json}"
        );
        assert_eq!(json["last_run"]["this_boot"], true, "{json}");
    };
    refused(&mut vm);

    // An honest serial 3 is accepted and runs the new scriptlet once (`idhal sign` itself
    // refuses to publish over a tampered directory, so put serial 2 back first).
    std::fs::write(&m2, honest).unwrap();
    assert_eq!(env.project.sign(&[]), 3);
    let r = vm.run_again();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!((r.count("new-ran"), r.count("always-ran")), (1, 1));

    // Serving the old, validly signed serial 1 again is a rollback.
    std::fs::write(env.project.pubdir.join("manifest.minisig"), &v1_sig).unwrap();
    let r = vm.run_again();
    assert_eq!(r.exit, 5, "{:?}", r.lines);
    assert!(
        r.last_message().contains("rollback"),
        "{}",
        r.last_message()
    );
    assert_eq!(r.count("always-ran"), 0, "{:?}", r.lines);
    assert_eq!(r.status["serial"], 3);
    refused(&mut vm);
    vm.poweroff();
}

#[test]
fn vm_killed_during_a_scriptlet_runs_it_again_at_next_boot_and_completes_once() {
    let mut env = env_or_skip!("powercut");
    // Counts its attempts on the state disk; only the first one hangs (until the power cut).
    env.project.scriptlet(
        "000-slow",
        "#!/bin/sh\n\
         f=\"$IDHAL_STATE_DIR/slow-attempts\"\n\
         n=$(( $(cat \"$f\" 2>/dev/null || echo 0) + 1 ))\n\
         echo $n > \"$f\" && sync\n\
         echo \"IDHAL-TEST slow-attempt=$n\" > /dev/console\n\
         [ $n -ge 2 ] || sleep 600\n\
         echo \"IDHAL-TEST slow-complete\" > /dev/console\n",
    );
    env.project.sign(&[]);

    let mut vm = env.boot();
    vm.wait_for("IDHAL-TEST slow-attempt=1", idhal_qemu_tests::Limits::BOOT);
    vm.kill();

    let mut vm = env.boot();
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(
        (r.count("slow-attempt=2"), r.count("slow-complete")),
        (1, 1),
        "{:?}",
        r.lines
    );
    assert_eq!(r.scriptlet_state("000-slow").as_deref(), Some("done"));
    let again = vm.run_again();
    assert_eq!(
        again.count("slow-attempt"),
        0,
        "done means done: {:?}",
        again.lines
    );
    vm.poweroff();
    assert_eq!(env.state_file("slow-attempts").as_deref(), Some("2\n"));
}

#[test]
fn vm_guest_has_what_enrollment_and_the_tunnel_need() {
    // The extension points of scenarios 1, 2, 4, 5: a one-time token over fw_cfg, OpenVPN with
    // its libraries, and /dev/net/tun. Checked from a scriptlet, as enrollment will use them.
    let mut env = env_or_skip!("guestkit");
    env.project.scriptlet(
        "000-probe",
        "#!/bin/sh\n\
         t=/sys/firmware/qemu_fw_cfg/by_name/opt/idhal/token/raw\n\
         echo \"IDHAL-TEST token=$(cat $t)\" > /dev/console\n\
         v=$(openvpn --version | head -n1 | cut -d' ' -f1,2)\n\
         echo \"IDHAL-TEST openvpn=$v\" > /dev/console\n\
         [ -c /dev/net/tun ] && echo \"IDHAL-TEST tun=yes\" > /dev/console\n",
    );
    env.project.sign(&[]);
    let token = env.path().join("token");
    std::fs::write(&token, "tok-123").unwrap();
    let mut spec = env.spec();
    spec.fw_cfg.push(("opt/idhal/token".into(), token));
    let mut vm = env.boot_spec(spec);
    let r = vm.wait_boot_run();
    assert_eq!(r.exit, 0, "{}", r.last_message());
    assert_eq!(r.count("IDHAL-TEST token=tok-123"), 1, "{:?}", r.lines);
    assert_eq!(
        r.count("IDHAL-TEST openvpn=OpenVPN 2.6"),
        1,
        "{:?}",
        r.lines
    );
    assert_eq!(r.count("IDHAL-TEST tun=yes"), 1, "{:?}", r.lines);
    vm.poweroff();
}
