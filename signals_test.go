package main

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestToggleSignalMask: the nudge leaves the thread's signal mask as it
// found it, whether SIGWINCH was blocked or not (the runtime keeps its own
// record of each thread's mask). That it makes a stuck thread's SIGTERM
// arrive is TestStuckDisk's, end to end.
func TestToggleSignalMask(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	mask := func() unix.Sigset_t {
		var s unix.Sigset_t
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, nil, &s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	winch := sigwinchSet()
	for _, blocked := range []bool{false, true} {
		if blocked {
			if err := unix.PthreadSigmask(unix.SIG_BLOCK, &winch, nil); err != nil {
				t.Fatal(err)
			}
		}
		before := mask()
		toggleSignalMask()
		if after := mask(); after != before {
			t.Errorf("SIGWINCH blocked %v: mask %x after the nudge, %x before", blocked, after.Val[0], before.Val[0])
		}
	}
	if err := unix.PthreadSigmask(unix.SIG_UNBLOCK, &winch, nil); err != nil {
		t.Fatal(err)
	}
}
