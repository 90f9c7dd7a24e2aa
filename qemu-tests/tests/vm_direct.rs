//! Issue 11, the rig: a second NIC on a LAN segment between two guests (QEMU `-netdev socket`
//! over 127.0.0.1), the QEMU monitor's `set_link`, and a shell in the guest (`Vm::sh`).
use idhal_qemu_tests::console::READY;
use idhal_qemu_tests::vm::LAN;
use idhal_qemu_tests::{env_or_skip, LanNic, Limits, Vm};
use std::time::Duration;

/// One `sh` request: each is a few busybox commands.
const SH: Duration = Duration::from_secs(60);

/// The boot figure of the test vnode: QEMU start to `IDHAL-EVENT ready` (printed, never
/// asserted), and the size of the base initramfs.
#[test]
fn vm_direct_boot_to_ready_figure() {
    let mut env = env_or_skip!("readyfig");
    assert_eq!(env.project.sign(&[]), 1);
    let size = std::fs::metadata(&env.shared.base.initramfs).unwrap().len();
    let mut vm = env.boot();
    let line = vm.wait_for(READY, Limits::BOOT);
    eprintln!(
        "FIGURE boot: initramfs {size} B, QEMU start to ready {:.2} s wall ({line})",
        vm.started.elapsed().as_secs_f64()
    );
    vm.kill();
}

/// What the rig gets from outside its control: a malformed `idhal.lan=`, commands whose output
/// imitates the frame or never ends, a command that is not one line or outlives the harness's
/// deadline, a monitor id that does not exist or smuggles a second command.
#[test]
fn vm_direct_rig_refuses_hostile_input() {
    let mut env = env_or_skip!("righostile");
    assert_eq!(env.project.sign(&[]), 1);
    let mut spec = env.spec();
    spec.cmdline.push("idhal.lan=192.168.77.300/24".into());
    let mut vm = env.boot_spec(spec);
    vm.wait_for(READY, Limits::BOOT);
    assert!(vm
        .log()
        .find(|l| l.starts_with("IDHAL-EVENT lan-failed"))
        .is_some());
    assert!(vm
        .log()
        .find(|l| l.starts_with("IDHAL-EVENT lan="))
        .is_none());

    // Output that imitates the frame (after a CR, as a terminal would show it) is content.
    let (code, out) = vm
        .sh(
            "printf 'x\\rIDHAL-SH 1 exit=0\\n\\tIDHAL-SH 1 | fake\\n'; exit 7",
            SH,
        )
        .unwrap();
    assert_eq!(code, 7, "{out}");
    assert_eq!(out, "x?IDHAL-SH 1 exit=0\n IDHAL-SH 1 | fake");
    // An endless writer is cut at 64 KiB (SIGXFSZ), and says so.
    let (code, out) = vm.sh("yes 0123456789abcdef", SH).unwrap();
    assert_eq!(code, 153);
    assert!(
        out.ends_with("[sh: output truncated at 64 KiB]"),
        "{}",
        &out[out.len() - 80..]
    );
    assert_eq!(out.lines().count(), 65536 / 17 + 1 + 1);
    // Empty output, and a request that is not one line.
    assert_eq!(vm.sh("true", SH).unwrap(), (0, String::new()));
    assert!(vm
        .sh("echo a\necho b", SH)
        .unwrap_err()
        .contains("one line"));
    assert!(vm
        .sh(&"x".repeat(5000), SH)
        .unwrap_err()
        .contains("one line"));
    assert!(vm
        .set_link("no-such-nic", false)
        .unwrap_err()
        .contains("not found"));
    assert!(vm.set_link("lan\ninfo", false).is_err());
    // A command that outlives the harness's deadline: an error, and the next request still
    // gets its own output, not the late one's.
    let late = vm.sh("sleep 3; echo late", Duration::from_millis(300));
    assert!(late.unwrap_err().contains("no exit code"));
    assert_eq!(vm.sh("echo next", SH).unwrap(), (0, "next".to_string()));
    vm.kill();
}

/// The segment between two guests carries frames, and `set_link` cuts and restores it; a
/// connecting side needs a started listener.
#[test]
fn vm_direct_lan_segment_between_two_guests_and_set_link() {
    let mut env = env_or_skip!("lan");
    assert_eq!(env.project.sign(&[]), 1);
    let mut spec = env.spec();
    spec.cmdline.push("idhal.lan=192.168.77.11/24".into());
    spec.lan = Some(LanNic::listen());
    let mut a = env.boot_spec(spec);
    let mut spec = env.spec();
    spec.disk = env.new_disk("b.img");
    spec.cmdline.push("idhal.lan=192.168.77.12/24".into());
    spec.lan = Some(LanNic::connect_to(&mut a).unwrap());
    let mut b = env.boot_spec(spec);
    assert!(LanNic::connect_to(&mut b)
        .unwrap_err()
        .contains("nothing to connect to"));
    assert!(LanNic::connect_to(&mut a)
        .unwrap_err()
        .contains("has its other end already"));
    for vm in [&mut a, &mut b] {
        vm.wait_for(READY, Limits::BOOT);
    }
    // Until one ping answers (ARP, the other guest still booting), bounded by the guest.
    let ping = |vm: &mut Vm, to: &str| {
        vm.sh(
            &format!(
                "for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 {to} && exit 0; done; exit 1"
            ),
            SH,
        )
        .unwrap()
    };
    assert_eq!(ping(&mut a, "192.168.77.12").0, 0);
    assert_eq!(ping(&mut b, "192.168.77.11").0, 0);
    a.set_link(LAN, false).unwrap();
    // One side's link off cuts both directions.
    let (code, out) = a.sh("ping -c 2 -W 1 192.168.77.12", SH).unwrap();
    assert_ne!(code, 0, "{out}");
    let (code, out) = b.sh("ping -c 2 -W 1 192.168.77.11", SH).unwrap();
    assert_ne!(code, 0, "{out}");
    a.set_link(LAN, true).unwrap();
    assert_eq!(ping(&mut b, "192.168.77.11").0, 0);
}
