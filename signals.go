package main

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// signalNudge is how often nudgeSignals runs.
const signalNudge = 200 * time.Millisecond

// nudgeSignals makes a signal sent to the process reach it while the
// thread the kernel chose for it is stuck in the kernel, until done is
// closed.
//
// The kernel hands a process's signal to one thread, the main thread if it
// can take it, and only that thread is woken. A writer blocked in a write to
// a frozen or hung filesystem sleeps uninterruptibly; when it runs on the
// main thread, SIGTERM then waits until the disk comes back, and with it the
// bounded shutdown (-shutdown.timeout) that a stuck disk calls for
// (TestStuckDisk: 2 runs in 20 with both cores busy never saw the signal).
// Another thread picks a pending signal up when its signal mask changes: so
// every signalNudge one thread that is running toggles the mask of one
// signal (SIGWINCH, which nothing here waits for) and restores it: three
// system calls, off the packet path.
func nudgeSignals(done <-chan struct{}) {
	tick := time.NewTicker(signalNudge)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			toggleSignalMask()
		}
	}
}

// toggleSignalMask changes this thread's signal mask and restores it; the
// kernel then looks again for signals pending on the process.
func toggleSignalMask() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old, one unix.Sigset_t
	if unix.PthreadSigmask(unix.SIG_BLOCK, nil, &old) != nil {
		return
	}
	bit := uint(unix.SIGWINCH - 1)
	one.Val[bit/64] = 1 << (bit % 64)
	how := unix.SIG_BLOCK
	if old.Val[bit/64]&one.Val[bit/64] != 0 {
		how = unix.SIG_UNBLOCK
	}
	if unix.PthreadSigmask(how, &one, nil) == nil {
		unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil)
	}
}
