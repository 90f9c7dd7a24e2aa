//! A deadline kept even while the main thread is stuck in a read (a FIFO, a hung disk): a second
//! thread sleeps until then and runs one function. Made with the C library's `pthread_create`,
//! not `std::thread`, which costs the static agent 24.7 KB (scripts/agent-size.sh); with
//! child.rs, the agent's only unsafe code.

use std::ffi::c_void;
use std::sync::Mutex;
use std::time::Duration;

/// When, and what, the thread runs: a static, so nothing crosses the C boundary but a null
/// pointer.
type Job = Option<(Duration, fn())>;
static JOB: Mutex<Job> = Mutex::new(None);

#[allow(unsafe_code)]
unsafe extern "C" {
    fn pthread_create(
        thread: *mut usize,
        attr: *const c_void,
        start: extern "C" fn(*mut c_void) -> *mut c_void,
        arg: *mut c_void,
    ) -> i32;
}

extern "C" fn start(_: *mut c_void) -> *mut c_void {
    let job = JOB.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((after, run)) = job {
        // nanosleep: the monotonic clock, a wall-clock jump does not move it.
        std::thread::sleep(after);
        run();
    }
    std::ptr::null_mut()
}

/// Runs `run` on a thread of its own `after` from now (once per process).
#[allow(unsafe_code)]
pub fn after(after: Duration, run: fn()) -> std::io::Result<()> {
    *JOB.lock().unwrap_or_else(|e| e.into_inner()) = Some((after, run));
    let mut thread = 0usize;
    // SAFETY: `thread` is a valid place for the id (pthread_t is an unsigned long on Linux with
    // musl and glibc), a null `attr` asks for the defaults, and `start` has the signature
    // pthread_create calls and uses no argument; a panic in it aborts (an `extern "C"` function
    // never unwinds). The thread is never joined: it ends the process, or the process ends
    // first.
    match unsafe { pthread_create(&mut thread, std::ptr::null(), start, std::ptr::null_mut()) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
