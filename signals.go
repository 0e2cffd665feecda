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
// signal (SIGWINCH, which nothing here waits for) and restores it: two
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
// kernel then looks again for signals pending on the process. Blocking
// SIGWINCH reads the old mask in the same call, so the usual case is two
// system calls; the kernel ignores a mask that does not change, so where
// SIGWINCH was already blocked it is unblocked instead.
func toggleSignalMask() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old unix.Sigset_t
	winch := sigwinchSet()
	if unix.PthreadSigmask(unix.SIG_BLOCK, &winch, &old) != nil {
		return
	}
	if old.Val[winchBit/64]&winch.Val[winchBit/64] != 0 {
		if unix.PthreadSigmask(unix.SIG_UNBLOCK, &winch, nil) != nil {
			return
		}
	}
	unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil)
}

// winchBit is SIGWINCH's bit in a unix.Sigset_t.
const winchBit = uint(unix.SIGWINCH - 1)

// sigwinchSet is the signal set holding SIGWINCH alone.
func sigwinchSet() unix.Sigset_t {
	var s unix.Sigset_t
	s.Val[winchBit/64] = 1 << (winchBit % 64)
	return s
}
