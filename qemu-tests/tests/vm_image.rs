//! The vnode image itself: rebuilding from the same pinned inputs gives the same bytes.
use idhal_image_build as ib;

#[test]
fn vm_image_rebuild_from_the_same_pins_is_byte_identical() {
    let Some(shared) = idhal_qemu_tests::shared() else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    // Reuse the downloaded .debs (checked against the lock again), rebuild everything else.
    let debs = shared
        .base
        .initramfs
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("debs");
    std::fs::create_dir_all(cache.path().join("debs")).unwrap();
    for e in std::fs::read_dir(&debs).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".deb") {
            std::fs::copy(e.path(), cache.path().join("debs").join(e.file_name())).unwrap();
        }
    }
    let lock = ib::lock::Lock::parse(ib::lock::DEFAULT_LOCK).unwrap();
    let t = std::time::Instant::now();
    let again = ib::build_base(&ib::BaseSpec {
        lock: &lock,
        agent: &shared.agent,
        cache: cache.path(),
        mtime: 0,
    })
    .unwrap();
    eprintln!(
        "FIGURE image rebuild (debs cached, nothing else): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(again.built);
    assert_eq!(again.key, shared.base.key);
    let a = std::fs::read(&again.initramfs).unwrap();
    let b = std::fs::read(&shared.base.initramfs).unwrap();
    eprintln!(
        "FIGURE initramfs {} KiB (uncompressed cpio)",
        a.len() / 1024
    );
    assert!(
        a == b,
        "initramfs differs between two builds of the same inputs"
    );
    assert_eq!(
        std::fs::read(&again.kernel).unwrap(),
        std::fs::read(&shared.base.kernel).unwrap()
    );
    // The pinned kernel is LZ4 with a PVH entry: every VM test boots the unpacked ELF.
    let pvh = again
        .kernel_pvh
        .as_ref()
        .expect("the pinned kernel unpacks into a PVH ELF");
    assert_eq!(again.boot_kernel(), pvh.as_path());
    let elf = std::fs::read(pvh).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    eprintln!(
        "FIGURE kernel: bzImage {} KiB, unpacked ELF {} KiB",
        std::fs::metadata(&again.kernel).unwrap().len() / 1024,
        elf.len() / 1024
    );
    assert!(elf == std::fs::read(shared.base.kernel_pvh.as_ref().unwrap()).unwrap());

    // A second call is a cache hit.
    let t = std::time::Instant::now();
    let hit = ib::build_base(&ib::BaseSpec {
        lock: &lock,
        agent: &shared.agent,
        cache: cache.path(),
        mtime: 0,
    })
    .unwrap();
    assert!(!hit.built);
    eprintln!("FIGURE image cache hit: {:.3} s", t.elapsed().as_secs_f64());
}
